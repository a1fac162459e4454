"""``budgetlm report``: the default (write the report, print the table), ``--format md|json|html``, and
the full-width Markdown table printed when stdout is not a terminal (a pipe, a log file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from budgetlm.cli import app
from budgetlm.evals.records import EvalRecord
from budgetlm.evals.report import summary_doc

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
LONG = "bavt-logprob-robust-with-a-label-far-wider-than-any-terminal-column"
PARAMS = {"delimiter": "\n\n", "scorer": "logp robust", "stop": ["\t", "Answer:"], "width": 3}


def _run(run_dir: Path) -> Path:
    """Two strategies (one with a long label and whitespace parameters) x 2 budgets x 3 suites x 3 items."""
    run_dir.mkdir(parents=True)
    lines = []
    for strategy, params in [("sample", {"temperature": 0.0}), (LONG, PARAMS)]:
        for budget in (64, 512):
            for suite in ("reasoning_gym:chain_sum?size=3", "jsonl:data/gsm8k_test.jsonl", "humaneval?limit=3"):
                for i in range(3):
                    correct = i < (1 if budget == 64 else 2)
                    lines.append(EvalRecord(
                        item_id=f"q{i}", suite=suite, config_id=f"{strategy[:4]}-{budget}", model="hf:/models/tiny",
                        strategy=strategy, params=params, budget={"output_tokens": budget}, gold="1",
                        answer="1" if correct else "x", correct=correct, score=float(correct),
                        output_tokens=budget // 4 + i, seed=0).model_dump_json())
    (run_dir / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run_dir


def _table(text: str) -> list[str]:
    """The first Markdown table's lines in ``text``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def _cells(line: str) -> int:
    return line.replace("\\|", "").count("|") - 1


def test_a_redirected_report_prints_a_full_width_markdown_table(tmp_path: Path) -> None:
    run = _run(tmp_path / "r" / ("deep-" * 12 + "run"))  # a path wider than 80 columns
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80", "TERM": "dumb"}
    env.pop("FORCE_COLOR", None)
    res = subprocess.run([sys.executable, "-m", "budgetlm.cli", "report", str(run)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    table = _table(res.stdout)
    assert len(table) == 2 + 4  # header, separator, one row per configuration
    assert all(line.startswith("| ") or line.startswith("|---") for line in table)
    assert all(line.endswith("|") and _cells(line) == _cells(table[0]) for line in table)  # nothing wrapped
    long_rows = [line for line in table if f"| {LONG} |" in line]
    assert len(long_rows) == 2
    assert all(r"delimiter='\n\n', scorer='logp robust', stop=['\t', 'Answer:'], width=3" in r for r in long_rows)
    assert any("0.333 [" in line for line in table) and "★" in "\n".join(table)
    assert f"report: {run}/report.html" in res.stdout.splitlines()  # the path on one line too
    assert (run / "report.html").is_file()


def test_report_default_on_a_pipe_keeps_writing_the_report(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert _table(res.stdout)[0].startswith("| run | model | strategy | params |")
    assert {"summary.json", "summary.md", "report.html"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert res.stdout.rstrip().endswith(f"report: {tmp_path / 'out'}/report.html")


def test_report_format_md_prints_the_tables_and_notes_and_writes_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    res = runner.invoke(app, ["report", str(run), "--format", "md"])
    assert res.exit_code == 0, res.output
    assert "- Token complexity (hf:/models/tiny): 9 question(s)" in res.stdout
    assert "- Budget adherence: 0 record(s) over budget (ok)" in res.stdout
    assert "## Per suite" in res.stdout and len(_table(res.stdout)) == 6
    per_suite = _table(res.stdout.split("## Per suite")[1])
    assert len(per_suite) == 2 + 4 * 3 and all(line.endswith("|") for line in per_suite)
    assert sorted(p.name for p in run.iterdir()) == ["records.jsonl"]  # nothing written


def test_report_format_json_prints_summary_json(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    res = runner.invoke(app, ["report", str(run), "-f", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc == json.loads(json.dumps(summary_doc([run])))
    assert doc["n_configs"] == 4
    assert {c["params"].get("delimiter") for c in doc["configs"] if c["strategy"] == LONG} == {"\n\n"}
    res = runner.invoke(app, ["report", str(run)])  # the same as the summary.json the default writes
    assert json.loads((run / "summary.json").read_text()) == doc


def test_report_format_html_refreshes_the_report_and_prints_its_path(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    (run / "report.html").write_text("stale")
    res = runner.invoke(app, ["report", str(run), "--format", "html"])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{run / 'report.html'}\n"
    text = (run / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and "delimiter=&#x27;\\n\\n&#x27;" in text


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--format", "pdf"], "`--format` must be one of md, json, html, got 'pdf'"),
        (["--format", "md", "--out", "x"], "`--out` must be left out with `--format md`"),
        (["--format", "json"], "run `budgetlm eval` first"),  # a folder with no records
    ],
)
def test_report_bad_input(tmp_path: Path, args: list[str], match: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["report", str(empty), *args])
    assert res.exit_code == 2
    assert match in " ".join(res.output.split())
