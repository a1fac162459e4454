"""Sample texts in traces.jsonl (voting strategies), trace compression, and ``budgetlm regrade``."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from budgetlm import ConfigError
from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.cli import app
from budgetlm.evals import records as records_mod
from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import read_records, read_traces, trace_line
from budgetlm.evals.regrade import REGRADED_FILE, SUMMARY_FILE, grader_names, regrade
from budgetlm.evals.runner import TRACES_FILE, run_eval

SCRIPT = {  # three samples per question; the majority answer is the first text's
    "qa": ["Answer: 7", "so Answer: 7", "Answer: 2"],   # gold 7.0: wrong for `exact`, right for `normalized`
    "qb": ["Answer: 3", "Answer: 4", "Answer: 3"],      # gold 3: right for every grader
    "qc": ["Answer: 1", "Answer: 1", "Answer: 5"],      # gold 5: wrong, one sample right
}
GOLD = {"qa": "7.0", "qb": "3", "qc": "5"}
VOTERS = ["majority", "weighted_majority", "best_of_n", "adaptive"]


def script_backend() -> ScriptedBackend:
    seen: dict[str, int] = defaultdict(int)

    def script(prompt: str, i: int, sampling: SamplingParams) -> str:
        q = re.search(r"<\|user\|> (\S+)", prompt).group(1)  # type: ignore[union-attr]
        t = SCRIPT[q][seen[q] % 3]
        seen[q] += 1
        return t

    return ScriptedBackend(script)


def finished_run(tmp_path: Path, strategies: list[str] = VOTERS) -> Path:
    data = tmp_path / "qs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": g}) + "\n" for q, g in GOLD.items()))
    specs = [{"name": s, "params": {"max_samples": 3, "batch_size": 3, "min_samples": 3, "max_tokens": 8}}
             if s == "adaptive" else {"name": s, "params": {"n": 3, "max_tokens": 8}} for s in strategies]
    cfg = EvalConfig(name="t", suites=[f"jsonl:{data}?grader=exact"], models=["scripted"],
                     budgets=[{"output_tokens": 64}], batch_size=1, strategies=specs)
    out = tmp_path / "run"
    run_eval(cfg, out, progress=False, report=False, backends={"scripted": script_backend()})
    return out


def test_traces_hold_every_sample_of_a_voting_run(tmp_path: Path) -> None:
    out = finished_run(tmp_path)
    recs = read_records(out / "records.jsonl")
    traces = {(t["item_id"], t["strategy"]): t["trace"] for t in read_traces(out / TRACES_FILE)}
    assert len(recs) == len(traces) == 12
    for rec in recs:
        samples = [e for e in traces[(rec.item_id, rec.strategy)] if "sample" in e]
        q = rec.question
        assert [s["text"] for s in samples] == SCRIPT[q]
        assert [s["tokens"] for s in samples] == [len(t.split()) for t in SCRIPT[q]]
        assert [s["answer"] for s in samples] == [t.rsplit(" ", 1)[1] for t in SCRIPT[q]]
        assert sum(s["tokens"] for s in samples) == rec.output_tokens  # every sample generated is stored
    by = {(r.item_id, r.strategy): r for r in recs}
    assert by[("qs-0", "majority")].answer == "7" and by[("qs-0", "majority")].text == "Answer: 7"


def test_large_traces_are_gzipped_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = [{"sample": 0, "text": "x " * 500}]
    small = trace_line({"item_id": "a"}, trace)
    big = trace_line({"item_id": "a"}, trace, gzip_over=100)
    assert small["trace"] == trace and "trace_gz" not in small
    assert "trace" not in big and len(json.dumps(big)) < len(json.dumps(small))
    monkeypatch.setattr(records_mod, "TRACE_GZIP_BYTES", 200)
    out = finished_run(tmp_path, ["majority"])
    raw = [json.loads(line) for line in (out / TRACES_FILE).read_text().splitlines()]
    assert all("trace_gz" in line and "trace" not in line for line in raw)
    decoded = read_traces(out / TRACES_FILE)
    assert [[e["text"] for e in t["trace"] if "sample" in e] for t in decoded] == list(SCRIPT.values())
    assert regrade(out, "suite").changed == 0  # regrade reads compressed traces


def test_regrade_with_the_same_grader_changes_nothing(tmp_path: Path) -> None:
    out = finished_run(tmp_path)
    before = read_records(out / "records.jsonl")
    for name in ("suite", "exact"):
        res = regrade(out, name)
        assert (res.records, res.changed, res.vote_mismatch, res.without_samples) == (12, 0, 0, 0)
        after = read_records(out / REGRADED_FILE)
        assert [(r.key, r.correct, r.score, r.answer) for r in after] == [(r.key, r.correct, r.score, r.answer)
                                                                          for r in before]
    # qa: only qb is right under `exact`; samples right per question: qa 0, qb 2, qc 1
    assert [r.correct for r in before if r.strategy == "majority"] == [False, True, False]
    assert [r.details["regrade"]["samples_correct"] for r in after if r.strategy == "majority"] == [0, 2, 1]


def test_regrade_with_another_grader_changes_what_it_should(tmp_path: Path) -> None:
    out = finished_run(tmp_path)
    records_before = (out / "records.jsonl").read_text()
    res = regrade(out, "normalized")
    # qa ("7" = "7.0") under each majority vote; best_of_n picked qa's "Answer: 2" (highest logprob): still wrong
    assert (res.changed, res.now_correct, res.now_wrong) == (3, 3, 0)
    after = {(r.item_id, r.strategy): r for r in read_records(out / REGRADED_FILE)}
    for s in VOTERS:
        qa = after[("qs-0", s)]
        assert qa.details["regrade"]["samples_correct"] == 2 and qa.details["regrade"]["samples"] == 3
        assert qa.details["regrade"]["was_correct"] is False and qa.correct is (s != "best_of_n")
        if s != "best_of_n":
            assert after[("qs-1", s)].correct and not after[("qs-2", s)].correct
    assert res.accuracy["majority"] == {"n": 3, "before": 1 / 3, "after": 2 / 3}
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["grader"] == "normalized" and summary["changed"] == 3
    assert (out / "records.jsonl").read_text() == records_before  # the run itself is never touched


def test_regrade_cli_prints_changes_and_lists_graders_on_errors(tmp_path: Path) -> None:
    out = finished_run(tmp_path, ["majority"])
    runner = CliRunner()
    res = runner.invoke(app, ["regrade", str(out), "--grader", "normalized"])
    assert res.exit_code == 0, res.output
    assert "regraded 3 records with 'normalized': 1 changed (1 now correct, 0 now wrong)" in res.stdout
    assert "majority: accuracy 0.333 -> 0.667" in res.stdout
    bad = runner.invoke(app, ["regrade", str(out), "--grader", "fuzzy"])
    assert bad.exit_code == 2
    assert "`--grader` must be one of suite, exact, math" in bad.output.replace("\n", " ")
    missing = runner.invoke(app, ["regrade", str(tmp_path / "nope"), "--grader", "exact"])
    assert missing.exit_code == 2 and "`RUN_DIR` must be a run folder holding records.jsonl" in missing.output
    assert "suite" in grader_names() and "numeric" in grader_names()


def test_regrade_errors() -> None:
    with pytest.raises(ConfigError, match=r"`RUN_DIR` must be a run folder holding records\.jsonl, got '/nonexistent' "
                                          r"\(no such folder\); pass the --out folder"):
        regrade("/nonexistent", "exact")
