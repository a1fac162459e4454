"""RunDir: the run folder's layout, and the torn-line rule on a run's records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import read_records
from budgetlm.evals.rundir import PLOTS, RunDir
from budgetlm.evals.runner import TRACES_FILE, run_eval
from budgetlm.io import DamagedFileError

SUITE = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=4&seed=1"


def _config() -> EvalConfig:
    return EvalConfig(name="rd", suites=[SUITE], models=["scripted"], budgets=[{"output_tokens": 8}], batch_size=2)


def test_layout_names() -> None:
    rd = RunDir("runs/x")
    assert rd.path == Path("runs/x") and rd == RunDir(Path("runs/x"))
    assert rd.records == Path("runs/x/records.jsonl") and rd.traces == Path("runs/x/traces.jsonl")
    assert rd.run_json == Path("runs/x/run.json") and rd.eval_log == Path("runs/x/eval.log")
    assert (rd.summary_json.name, rd.summary_md.name, rd.report_html.name) == ("summary.json", "summary.md", "report.html")
    assert (rd.regraded.name, rd.regrade_json.name) == ("records.regraded.jsonl", "regrade.json")
    assert TRACES_FILE == RunDir.TRACES
    with pytest.raises(AttributeError):
        rd.path = Path("y")  # type: ignore[misc]  # frozen


def test_an_eval_run_writes_exactly_the_files_rundir_names(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = run_eval(_config(), tmp_path / "run", progress=False)
    rd = RunDir(out.out_dir)
    assert out.report == rd.path
    assert set(rd.path.iterdir()) == rd.eval_files()  # no stray temporary file either
    meta = rd.read_meta()
    assert meta is not None and meta["name"] == "rd" and meta["sessions"][-1]["written"] == 4
    assert len(rd.read_records()) == 4 == len(rd.read_traces())
    assert json.loads(rd.summary_json.read_text())["configs"]
    assert {p.name for p in rd.eval_files()} >= {*PLOTS, "report.html"}


def test_without_report_only_the_run_files(tmp_path: Path) -> None:
    run_eval(_config(), tmp_path / "run", progress=False, report=False)
    rd = RunDir(tmp_path / "run")
    assert set(rd.path.iterdir()) == rd.eval_files(report=False)
    assert RunDir(tmp_path / "none").read_meta() is None and not RunDir(tmp_path / "none").has_records()


def test_a_damaged_middle_record_stops_the_resume_naming_file_and_line(tmp_path: Path) -> None:
    run_eval(_config(), tmp_path / "run", progress=False, report=False)
    rd = RunDir(tmp_path / "run")
    lines = rd.records.read_text().splitlines(keepends=True)
    rd.records.write_text(lines[0] + lines[1][:20] + "\n" + "".join(lines[2:]))  # damage, not a crash
    with pytest.raises(DamagedFileError, match=r"records\.jsonl` line 2 is not valid JSON"):
        read_records(rd.records)
    with pytest.raises(DamagedFileError, match="line 2"):
        run_eval(_config(), rd.path, progress=False, report=False)
