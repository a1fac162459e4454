"""The budgetlm command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from budgetlm.cli import app

runner = CliRunner()


def test_run_prints_answer_and_spend_as_json() -> None:
    res = runner.invoke(app, ["run", "What is 2+3?", "--backend", "scripted", "--max-tokens", "8", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["answer"] == "42"
    assert rec["usage"]["output_tokens"] == 2
    assert rec["ledger"]["units"]["output_tokens"]["limit"] == 8
    assert "budgetlm" in rec["versions"]


def test_run_clamps_to_max_tokens() -> None:
    res = runner.invoke(app, ["run", "q", "-b", "scripted?script=none", "-m", "1", "--json"])
    # the scripted backend's default script is "Answer: 42" (2 tokens); one token fits
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["usage"]["output_tokens"] == 1 and rec["truncated"]


def test_run_with_a_strategy_and_parameters() -> None:
    res = runner.invoke(app, ["run", "q", "-b", "scripted", "-s", "majority", "-p", "n=3", "-m", "30", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["strategy"] == "majority" and rec["params"]["n"] == 3 and rec["answer"] == "42"
    assert rec["usage"]["output_tokens"] == 6 <= 30


@pytest.mark.parametrize(("name", "params"), [
    ("bavt", ["width=2", "scorer=logprob"]),  # a tree search with a value scorer by name
    ("beam", ["beams=2", "expand=2"]),
    ("rebase", ['scorer_params={}', "width=3"]),  # JSON values
])
def test_run_tree_searches(name: str, params: list[str]) -> None:
    args = ["run", "q", "-b", "scripted", "-s", name, "-m", "60", "--json"]
    for p in params:
        args += ["-p", p]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["answer"] == "42" and rec["usage"]["output_tokens"] <= 60
    assert rec["trace"][-1]["tree"]["output_tokens"] == rec["usage"]["output_tokens"]


@pytest.mark.parametrize(("pairs", "expected"), [
    (["n=3"], {"n": 3}),  # numbers are coerced
    (['scorer_params={"path": "/m", "batch_size": 4}'], {"scorer_params": {"path": "/m", "batch_size": 4}}),  # JSON
    (["scorer_params.path=/m", "scorer_params.batch_size=4"], {"scorer_params": {"path": "/m", "batch_size": 4}}),  # dotted
    (["stop=[1, 2]"], {"stop": [1, 2]}),  # JSON list
])
def test_parse_params(pairs: list[str], expected: dict) -> None:
    from budgetlm.cli import _parse_params

    assert _parse_params(pairs) == expected


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["run", "q", "-b", "scripted", "-s", "bavt", "-p", "scorer_params={bad"], "valid JSON"),  # broken JSON
        (["run", "q", "-b", "scripted", "-s", "bavt", "-p", "scorer=nosuch"], "available"),  # unknown value scorer
        (["run", "q", "-b", "scripted", "-s", "nosuch"], "available"),  # unknown strategy
        (["run", "q", "-b", "scripted", "-s", "majority", "-p", "nn=3"], "valid: n"),  # unknown parameter
        (["run", "q", "-b", "scripted", "-p", "novalue"], "key=value"),  # malformed parameter
        (["run", "q", "-b", "nope:x"], "unknown backend kind"),  # bad backend spec
        (["run", "q", "-b", "scripted", "-m", "0"], "--max-tokens"),  # non-positive budget
        (["run", "q", "-b", "scripted", "--budget", "usd=-1"], "usd"),  # invalid budget value
        (["run", "q", "-b", "hf:/does/not/exist"], "does not exist"),  # missing model path
    ],
)
def test_run_bad_input(args: list[str], match: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert match in res.output


@pytest.mark.slow
def test_demo_on_the_real_default_model(tmp_path) -> None:
    """The README's main job, small: real model (transformers), real reasoning-gym items, two budgets."""
    args = ["demo", "--backend", "hf:default", "--problems", "2", "--budgets", "8,24", "--vote", "2", "--out",
            str(tmp_path / "d"), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    configs = summary["configs"]
    assert len(configs) == 3 and all(c["n"] == 2 for c in configs)
    assert sorted(c["budget"]["output_tokens"] for c in configs) == [8, 24, 96]  # greedy x2, majority@2
    assert all(c["mean_output_tokens"] <= c["budget"]["output_tokens"] for c in configs)
    assert (tmp_path / "d" / "report.html").exists()


def _cascade_config(tmp_path, stages: str) -> str:
    data = tmp_path / "qa.jsonl"
    # the scripted backend answers "42": half of the items are right, so stage 1 can be calibrated
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "42" if i % 2 else "7"}) + "\n" for i in range(6)))
    cfg = tmp_path / "cascade.yaml"
    cfg.write_text(f"stages: {stages}\nsuite: 'jsonl:{data}'\ncalibration_items: 6\nmodel: scripted\n"
                   "budget: {output_tokens: 64}\n")
    return str(cfg)


def test_cascade_calibrate_writes_a_file_the_strategy_loads(tmp_path) -> None:
    stages = "[{strategy: sample, params: {temperature: 0.0}}, {strategy: majority, params: {n: 2}}]"
    cfg, out = _cascade_config(tmp_path, stages), tmp_path / "cal.json"
    res = runner.invoke(app, ["cascade", "calibrate", cfg, "--epsilon", "0.05", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["thresholds"]) == 1 and doc["n_items"] == 6 and doc["stats"][0]["accuracy"] == 0.5
    assert "budgetlm" in doc["versions"] and doc["suite"].startswith("jsonl:")
    from budgetlm.strategies import get

    c = get("cascade", stages=doc["stages"], calibration=str(out))
    assert c.thresholds == doc["thresholds"]


@pytest.mark.parametrize(("stages", "epsilon", "match"), [
    ("[{strategy: sample}]", "0.01", "at least two stages"),  # nothing to cascade into
    ("[{strategy: sample}, {strategy: nosuch}]", "0.01", "available"),  # unknown strategy
    ("[{strategy: sample}, {strategy: majority}]", "1.5", "epsilon"),  # ε outside [0, 1]
    ("[{strategy: sample", "0.01", "valid YAML"),  # broken config file
])
def test_cascade_calibrate_bad_input(tmp_path, stages: str, epsilon: str, match: str) -> None:
    res = runner.invoke(app, ["cascade", "calibrate", _cascade_config(tmp_path, stages), "-e", epsilon,
                              "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 2 and match in res.output


def _route_config(tmp_path, router: str) -> str:
    data = tmp_path / "qa.jsonl"
    # the scripted backend answers "42": half of the items are right for both arms
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": "42" if i % 2 else "7"}) + "\n" for i in range(6)))
    cfg = tmp_path / "route.yaml"
    cfg.write_text(f"router: {router}\narms: [{{strategy: sample, params: {{max_tokens: 8}}}}, "
                   "{strategy: majority, params: {n: 2, max_tokens: 8}}]\n"
                   f"suite: 'jsonl:{data}'\ncalibration_items: 6\nmodel: scripted\nbudget: {{output_tokens: 64}}\n")
    return str(cfg)


def test_route_calibrate_writes_a_file_the_strategy_loads(tmp_path) -> None:
    out = tmp_path / "route.json"
    res = runner.invoke(app, ["route", "calibrate", _route_config(tmp_path, "{name: random, params: {seed: 3}}"),
                              "--share", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["router"]["name"] == "random" and len(doc["thresholds"]) == 1
    assert doc["realised_share"] == 0.5  # 3 of 6 distinct random scores reach the threshold
    assert doc["on_split"]["weak_accuracy"] == 0.5 and doc["on_split"]["strong_accuracy"] == 0.5
    assert "budgetlm" in doc["versions"] and doc["suite"].startswith("jsonl:")
    from budgetlm.strategies import get

    r = get("route", calibration=str(out))
    assert r.thresholds == doc["thresholds"] and [a.label for a in r.arms] == ["sample#0", "majority#1"]


@pytest.mark.parametrize(("router", "share", "match"), [
    ("random", "1.5", "share"),  # a share outside [0, 1]
    ("nosuch", "0.5", "available"),  # unknown router lists the registered ones
    ("{name: embedding, params: {features: hashing}}", "0.5", "every label is 0"),  # nothing to learn on this split
])
def test_route_calibrate_bad_input(tmp_path, router: str, share: str, match: str) -> None:
    res = runner.invoke(app, ["route", "calibrate", _route_config(tmp_path, router), "-s", share,
                              "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and match in res.output, res.output


# ------------------------------------------------------------------ eval: errored records; logs off stdout


SUITE = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=6&seed=1"


def _eval_config(tmp_path) -> str:
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"name: cli\nsuites: ['{SUITE}']\nmodels: ['scripted']\nbudgets: [{{output_tokens: 8}}]\n"
                   "batch_size: 3\n")
    return str(cfg)


def _scripted_load(fail_on: set[str]):
    from budgetlm.backends.scripted import ScriptedBackend
    from budgetlm.errors import BackendError

    def script(prompt: str, i: int, sampling: object) -> str:
        for q in fail_on:
            if q in prompt:
                raise BackendError(f"engine fell over on {q!r}")
        return "Answer: 42"

    return lambda spec, **kw: ScriptedBackend(script=script)


def test_eval_prints_errors_exits_0_and_retries_them_on_rerun(tmp_path, monkeypatch) -> None:
    from budgetlm.evals.suites import get as get_suite

    items = get_suite(SUITE).items()
    cfg, run_dir = _eval_config(tmp_path), tmp_path / "run"
    monkeypatch.setattr("budgetlm.evals.runner.load", _scripted_load({items[1].question, items[4].question}))
    res = runner.invoke(app, ["eval", cfg, "--out", str(run_dir), "--no-progress"])
    assert res.exit_code == 0, res.output  # errored records do not fail the run
    assert f"2 errors; first: {items[1].id}: engine fell over on" in res.stderr
    assert "re-run the same command to retry" in res.stderr
    assert "⚠ 2" in res.stdout  # flagged in the table (stdout) and told on stderr
    assert "2 errored records in sample" in res.stderr and "errored records in" not in res.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["configs"][0]["n_errors"] == 2 and not any(summary["configs"][0]["on_frontier"].values())

    monkeypatch.setattr("budgetlm.evals.runner.load", _scripted_load(set()))
    res = runner.invoke(app, ["eval", cfg, "--out", str(run_dir), "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    assert "2 records written, 4 already done, retrying 2 errored records, 0 errors" in res.stderr
    assert "retrying 2 errored records" in (run_dir / "eval.log").read_text()
    doc = json.loads(res.stdout)  # --json: summary.json alone on stdout
    assert (doc["configs"][0]["n"], doc["configs"][0]["n_errors"]) == (6, 0)
    assert doc["configs"][0]["on_frontier"]["output_tokens"]


def test_eval_json_needs_the_report(tmp_path) -> None:
    res = runner.invoke(app, ["eval", _eval_config(tmp_path), "--out", str(tmp_path / "r"), "--json", "--no-report"])
    assert res.exit_code == 2 and "--no-report" in res.output


_LOGS_SCRIPT = r"""
import logging, os, sys
from budgetlm.logs import configure_logging, stdout_to_stderr

# an engine imported before the CLI set it up: its handler writes to stdout (what vLLM does by default)
vlog = logging.getLogger("vllm")
vlog.addHandler(logging.StreamHandler(sys.stdout))
vlog.propagate = False
configure_logging(int(sys.argv[1]))
vlog.info("vllm info line")
vlog.error("vllm error line")
logging.getLogger("budgetlm.x").info("budgetlm info line")
logging.getLogger("budgetlm.x").warning("budgetlm warning line")
logging.getLogger("transformers.y").info("transformers info line")
with stdout_to_stderr():
    print("python print inside")
    sys.stdout.flush()
    os.write(1, b"fd write inside\n")
print('{"machine": "output"}')
"""


@pytest.mark.parametrize("verbosity", [0, 1])
def test_logs_and_engine_output_never_reach_stdout(tmp_path, verbosity: int) -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _LOGS_SCRIPT, str(verbosity)], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "VLLM_LOGGING_LEVEL": ""})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"machine": "output"}  # nothing else on stdout
    for line in ("vllm error line", "budgetlm warning line", "python print inside", "fd write inside"):
        assert line in res.stderr
    for line in ("vllm info line", "budgetlm info line", "transformers info line"):
        assert (line in res.stderr) == (verbosity > 0)


def test_engine_env_sends_vllm_logs_to_stderr_quietly() -> None:
    from budgetlm.logs import engine_env

    env: dict[str, str] = {"VLLM_LOGGING_STREAM": "ext://sys.stdout"}
    engine_env(0, env)
    assert env == {"VLLM_LOGGING_STREAM": "ext://sys.stderr", "VLLM_LOGGING_LEVEL": "ERROR",
                   "TRANSFORMERS_VERBOSITY": "warning"}
    engine_env(2, env)
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG" and env["TRANSFORMERS_VERBOSITY"] == "debug"
    user = {"VLLM_LOGGING_LEVEL": "WARNING"}
    engine_env(0, user)
    assert user["VLLM_LOGGING_LEVEL"] == "WARNING"  # a level the user exported is kept at the default verbosity


def test_verbose_is_a_global_countable_flag() -> None:
    import logging

    res = runner.invoke(app, ["-vv", "run", "q", "-b", "scripted", "-m", "8", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["answer"] == "42"
    assert logging.getLogger("budgetlm").level == logging.DEBUG
    res = runner.invoke(app, ["run", "q", "-b", "scripted", "-m", "8", "--json"])
    assert res.exit_code == 0 and logging.getLogger("budgetlm").level == logging.WARNING


@pytest.mark.slow
def test_run_json_on_the_real_engine_keeps_stdout_parseable() -> None:
    """vLLM logs INFO/WARNING lines while loading; they must go to stderr, not before the JSON on stdout."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "budgetlm.cli", "run", "What is 2 + 3?", "--backend", "default",
                          "--max-tokens", "8", "--json"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(res.stdout)  # stdout is the JSON document alone
    assert rec["backend"] == "default" and rec["usage"]["output_tokens"] <= 8


def test_strategies_lists_every_strategy_and_one_strategys_typed_parameters() -> None:
    from budgetlm.strategies import STRATEGIES

    res = runner.invoke(app, ["strategies", "--json"])
    assert res.exit_code == 0, res.output
    tables = json.loads(res.stdout)
    assert sorted(tables) == sorted(STRATEGIES.names())
    for name, table in tables.items():
        assert table, f"strategy {name!r} lists no typed parameters"
        assert all(row["description"] for row in table.values()), name  # every field documented
    assert tables["adaptive"]["delta"] == {"type": "float", "default": 0.05, "constraints": "> 0, < 1",
                                           "description": "Stop when P(leader stays) >= 1 - delta."}
    one = runner.invoke(app, ["strategies", "majority"])
    assert one.exit_code == 0 and "temperature" in one.stdout and "default" in one.stdout
    bad = runner.invoke(app, ["strategies", "nosuch"])
    assert bad.exit_code == 2 and "majority" in bad.output  # the error lists the names
