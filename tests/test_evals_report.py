"""Evaluation reports: summary.json, summary.md, PNG charts and a self-contained report.html."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from budgetlm.errors import ConfigError
from budgetlm.evals.records import EvalRecord
from budgetlm.evals.report import PLOTS, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, name: str | None, usd_per_token: float, skill: float) -> None:
    """2 strategies x 3 budgets x 2 suites x 4 items; accuracy grows with budget."""
    run_dir.mkdir(parents=True)
    lines = []
    for strategy, params in [("direct", {}), ("vote", {"n": 3})]:
        for budget in (64, 128, 256):
            cid = f"{strategy}-{budget}"
            for suite in ("arith", "logic"):
                for i in range(4):
                    tokens = budget // 2 + 7 * i + (20 if strategy == "vote" else 0)
                    correct = (i + 1) / 4 <= skill * budget / 256
                    lines.append(EvalRecord(
                        item_id=f"{suite}-{i}", suite=suite, config_id=cid, model="hf:/models/tiny",
                        strategy=strategy, params=params, budget={"output_tokens": budget}, text=f"so it is {i}",
                        gold=str(i), answer=str(i) if correct else "x", correct=correct, score=float(correct),
                        prompt_tokens=30, output_tokens=tokens, sequential_tokens=tokens, model_calls=1,
                        flops=1e6 * tokens, usd=usd_per_token * tokens, truncated=tokens >= budget, seed=0,
                    ).model_dump_json())
    (run_dir / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if name is not None:
        meta = {"name": name, "config": {"suites": ["arith", "logic"]}, "versions": {"budgetlm": "0.1.0"}, "seed": 0}
        (run_dir / "run.json").write_text(json.dumps(meta), encoding="utf-8")


class _Imgs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")
        self.tables += tag == "table"


@pytest.mark.parametrize(
    ("usd_per_token", "cost_unit"),
    [
        (1e-6, "usd"),  # priced model: the cost chart uses dollars
        (0.0, "flops"),  # local model: the cost chart falls back to FLOPs
    ],
)
def test_write_report_two_runs(tmp_path: Path, usd_per_token: float, cost_unit: str) -> None:
    import matplotlib.image as mpimg

    _write_run(tmp_path / "run_a", "alpha <&>", usd_per_token, skill=1.0)  # name needs HTML escaping
    _write_run(tmp_path / "run_b", None, usd_per_token, skill=0.5)  # no run.json: named after the directory
    out = tmp_path / "report"
    html_path = write_report([tmp_path / "run_a", tmp_path / "run_b"], out)
    assert html_path == out / "report.html"

    doc = json.loads((out / "summary.json").read_text())
    assert doc["cost_unit"] == cost_unit and doc["n_configs"] == 12
    assert [r["name"] for r in doc["runs"]] == ["alpha <&>", "run_b"]
    assert doc["runs"][0]["meta"]["versions"] == {"budgetlm": "0.1.0"}
    cfg = doc["configs"][0]
    for key in ("run", "model", "strategy", "params", "budget", "n", "accuracy", "accuracy_ci_low",
                "accuracy_ci_high", "mean_output_tokens", "median_output_tokens", "mean_usd", "mean_flops",
                "mean_joules", "truncation_rate", "thinking_truncation_rate", "over_budget_rate", "n_errors",
                "cost_of_pass", "overthinking_efficiency", "per_suite", "on_frontier"):
        assert key in cfg, key
    assert set(cfg["per_suite"]) == {"arith", "logic"} and cfg["n"] == 8
    assert doc["n_over_budget_records"] == 0
    assert doc["pareto_frontier"]["output_tokens"] and cost_unit in doc["pareto_frontier"]
    assert doc["frontier_cost_of_pass"]["output_tokens"]["n_problems"] == 8
    tc = doc["token_complexity"]["hf:/models/tiny"]
    assert tc["n_questions"] == 8 and tc["oracle_curve"]

    md, per_suite = (out / "summary.md").read_text().split("## Per suite")
    assert md.count("| alpha <&> |") == 6 and md.count("| run_b |") == 6 and "★" in md  # one row per config
    assert per_suite.count("| alpha <&> |") == 12  # one row per config and suite

    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert mpimg.imread(out / name).ndim == 3

    text = html_path.read_text()
    parser = _Imgs()
    parser.feed(text)
    parser.close()
    assert len(parser.srcs) == len(PLOTS) and parser.tables == 2
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert "alpha &lt;&amp;&gt;" in text and "alpha <&>" not in text
    assert "&quot;budgetlm&quot;: &quot;0.1.0&quot;" in text  # run metadata, escaped


def test_write_report_defaults_to_first_run_dir(tmp_path: Path) -> None:
    _write_run(tmp_path / "r", "r", 0.0, skill=1.0)
    assert write_report([tmp_path / "r"]) == tmp_path / "r" / "report.html"
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"summary.json", "summary.md", *PLOTS}


@pytest.mark.parametrize(
    "content",
    [
        None,  # no records.jsonl at all
        "",  # an empty records.jsonl
    ],
)
def test_missing_records_is_a_config_error(tmp_path: Path, content: str | None) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    if content is not None:
        (run / "records.jsonl").write_text(content)
    with pytest.raises(ConfigError, match="run `budgetlm eval` first") as exc:
        write_report([run])
    assert str(run / "records.jsonl") in str(exc.value)


def test_no_run_dirs_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="`run_dirs` must be"):
        write_report([])


def test_tree_search_eval_writes_traces_and_the_report_draws_a_tree(tmp_path: Path) -> None:
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.runner import TRACES_FILE, run_eval
    from budgetlm.evals.treeplot import read_traces, tree_of

    suite = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=3&seed=1"
    cfg = EvalConfig(name="trees", suites=[suite], models=["scripted"], budgets=[{"output_tokens": 40}],
                     strategies=[{"name": "bavt", "params": {"scorer": "logprob", "width": 2}},
                                 {"name": "majority", "params": {"n": 2}}])
    out = run_eval(cfg, tmp_path / "run", progress=False)
    traces = read_traces(tmp_path / "run" / TRACES_FILE)
    assert len(traces) == 6 and {t["strategy"] for t in traces} == {"bavt", "majority"}
    bavt = [t for t in traces if t["strategy"] == "bavt"]
    found = tree_of(bavt[0]["trace"])
    assert found is not None and len(found[0]["nodes"]) > 1
    assert tree_of([t for t in traces if t["strategy"] == "majority"][0]["trace"]) is None
    report = out.report
    assert report is not None and (report / "tree_bavt.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (report / "tree_majority.png").exists()  # no tree, no figure
    html_text = (report / "report.html").read_text(encoding="utf-8")
    assert html_text.count("data:image/png;base64,") == len(PLOTS) + 1
    assert "![tree_bavt.png](tree_bavt.png)" in (report / "summary.md").read_text(encoding="utf-8")


def _rec(cid: str, item: str, tokens: int, correct: bool, error: str | None = None, budget: int = 64) -> str:
    return EvalRecord(item_id=item, suite="arith", config_id=cid, model="hf:/models/tiny", strategy="direct",
                      budget={"output_tokens": budget}, gold="1", answer="1" if correct else "x", correct=correct,
                      score=float(correct), output_tokens=tokens, error=error, seed=0).model_dump_json()


def test_a_configuration_with_errored_records_is_flagged_and_never_a_pareto_point(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    # cheap: 10 tokens, accuracy 0.5 — on the frontier
    lines += [_rec("cheap", f"q{i}", 10, i < 2, budget=16) for i in range(4)]
    # pricier and better (accuracy 0.75 over its 4 graded items) but one item errored: counted as a wrong answer
    # at 0 tokens it would be (0.6, 16 tokens) and on the frontier; it must be flagged, not ranked
    lines += [_rec("errored", f"q{i}", 20, i < 3, budget=32) for i in range(4)]
    lines += [_rec("errored", "q4", 0, False, error="BackendError: engine died", budget=32)]
    # an errored record superseded by its successful retry (a later line of the same cell) does not count
    lines += [_rec("retried", "q0", 0, False, error="transient", budget=64)]
    lines += [_rec("retried", f"q{i}", 40, True, budget=64) for i in range(4)]
    (run / "records.jsonl").write_text("\n".join(lines) + "\n")
    html_path = write_report([run])
    doc = json.loads((run / "summary.json").read_text())
    by = {c["config_id"]: c for c in doc["configs"]}
    err = by["errored"]
    assert (err["n"], err["n_errors"], err["errored"]) == (4, 1, True)
    assert err["accuracy"] == 0.75 and err["mean_output_tokens"] == 20  # the error is left out, not wrong at 0
    assert err["on_frontier"] == {"output_tokens": False}
    assert (by["retried"]["n"], by["retried"]["n_errors"], by["retried"]["errored"]) == (4, 0, False)
    assert by["retried"]["accuracy"] == 1.0
    assert doc["pareto_frontier"]["output_tokens"] == [["run", "cheap"], ["run", "retried"]]
    assert doc["n_errored_records"] == 1 and doc["errored_configs"] == [["run", "errored"]]
    assert doc["frontier_cost_of_pass"]["output_tokens"]["n_problems"] == 4  # graded records only: no q4

    md = (run / "summary.md").read_text().split("## Per suite")[0]
    rows = {line.split(" | ")[4]: line for line in md.splitlines() if line.startswith("| run |")}
    assert "⚠ 1 errored" in rows["output_tokens=32"] and "★" not in rows["output_tokens=32"]
    assert "not ranked (errored)" in rows["output_tokens=32"]
    assert "★" in rows["output_tokens=16"] and "errored" not in rows["output_tokens=64"]
    assert "0.750 [" in rows["output_tokens=32"]
    html_text = html_path.read_text()
    assert "<th>errored</th>" in html_text and "⚠ 1 errored" in html_text
    assert "1 errored record(s) in 1 configuration(s)" in html_text


def test_a_configuration_whose_every_record_errored_is_reported_without_figures(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [_rec("ok", f"q{i}", 10, i < 2) for i in range(2)]
    lines += [_rec("dead", f"q{i}", 0, False, error="boom", budget=128) for i in range(2)]
    (run / "records.jsonl").write_text("\n".join(lines) + "\n")
    write_report([run])
    doc = json.loads((run / "summary.json").read_text())
    dead = next(c for c in doc["configs"] if c["config_id"] == "dead")
    assert (dead["n"], dead["n_errors"], dead["accuracy"], dead["mean_output_tokens"]) == (0, 2, None, None)
    assert doc["pareto_frontier"]["output_tokens"] == [["run", "ok"]]
    assert "⚠ 2 errored" in (run / "summary.md").read_text()
