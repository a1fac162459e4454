"""The report's prose agrees with its tables: every figure in the notes is read back and checked
against ``summary.json``, and parameter values are shown unambiguously (``delimiter='\\n\\n'``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from budgetlm.evals.report import format_value, markdown_summary, write_report

SUITE = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=6&seed=1"


def _script(items: list[Any]):
    """Items 0-1 never solved; 2-3 solved only at the smallest budget (short right answer, longer wrong
    ones: τ = ∞ although solved); 4-5 solved once the budget fits ten words of reasoning (finite τ)."""

    def script(prompt: str, i: int, sampling: Any) -> str:
        k, item = next((k, it) for k, it in enumerate(items) if it.question in prompt)
        if k < 2:
            return "Answer: 999"
        if k < 4:
            return f"Answer: {item.gold}" if sampling.max_tokens <= 4 else "I think hard and so on and on Answer: 999"
        return "so " * 10 + f"Answer: {item.gold}"

    return script


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from budgetlm.backends.scripted import ScriptedBackend
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.runner import run_eval
    from budgetlm.evals.suites import get as get_suite

    mp = pytest.MonkeyPatch()
    items = get_suite(SUITE).items()
    mp.setattr("budgetlm.evals.runner.load", lambda spec, **kw: ScriptedBackend(script=_script(items)))
    out = tmp_path_factory.mktemp("notes") / "run"
    try:
        cfg = EvalConfig(name="notes", suites=[SUITE], models=["scripted"],
                         strategies=[{"name": "sample", "params": {"temperature": 0.0}}],
                         budgets=[{"output_tokens": b} for b in (4, 8, 32)])
        run_eval(cfg, out, progress=False)
    finally:
        mp.undo()
    return out


def _num(text: str) -> float | None:
    """A figure as the notes print it: ``1,234.5``, ``9.95e+07``, ``∞`` or ``—`` (undefined)."""
    if text == "—":
        return None
    return math.inf if text == "∞" else float(text.replace(",", ""))


def _close(printed: str, value: float | None) -> bool:
    got = _num(printed)
    if got is not None and math.isinf(got):
        return value is None or math.isinf(value)  # summary.json writes ∞ as null
    if got is None or value is None:
        return got is None and value is None
    return math.isclose(got, value, rel_tol=5e-3, abs_tol=0.051)  # printed to 1 decimal or 4 significant digits


_BUDGET = re.compile(r"Budget adherence: (\d+) record\(s\) over budget( — BUDGET VIOLATED| \(ok\))")
_FRONT = re.compile(r"Frontier cost-of-pass \((.+)\): (?:(\S+) per correct answer over (\d+) solved problem\(s\)|∞ \(no "
                    r"problem solved by any configuration\)) of (\d+); (\d+) never solved by any configuration")
_TAU = re.compile(r"Token complexity \((.+)\): (\d+) question\(s\); finite τ for (\d+) \(mean (\S+), median (\S+) output "
                  r"tokens\); τ = ∞ for (\d+): (\d+) never solved by any configuration(?:, (\d+) solved too rarely for "
                  r"a token threshold to beat 'always wrong')?")
_CONFIG = re.compile(r"(.+) · (\S+)(?: (.+))? \[(.+)\]: cost-of-pass (\S+) output tokens, ξ_O (\S+)"
                     r"(?:, accuracy/J (\S+))?, errors (\d+)( ⚠ ERRORED: not ranked)?")


def check_notes(notes: list[str], doc: dict[str, Any]) -> None:
    """Parse every note (each must match one sentence pattern in full) and compare its figures to ``doc``."""
    fronts = iter(doc["frontier_cost_of_pass"].items())
    taus = iter(doc["token_complexity"].items())
    configs = iter(doc["configs"])
    for note in notes:
        if m := _BUDGET.fullmatch(note):
            assert int(m[1]) == doc["n_over_budget_records"] and (m[2] == " (ok)") == (int(m[1]) == 0), note
        elif m := _FRONT.fullmatch(note):
            unit, fc = next(fronts)
            assert m[1] == unit.replace("_", " "), note
            assert (int(m[4]), int(m[5])) == (fc["n_problems"], fc["n_unsolved"]), note
            if m[2] is None:
                assert fc["n_unsolved"] == fc["n_problems"], note
            else:
                assert int(m[3]) == fc["n_problems"] - fc["n_unsolved"] and _close(m[2], fc["mean_over_solved"]), note
        elif m := _TAU.fullmatch(note):
            model, tc = next(taus)
            assert m[1] == model, note
            assert (int(m[2]), int(m[3]), int(m[6]), int(m[7])) == (
                tc["n_questions"], tc["n_finite_tau"], tc["n_infinite_tau"], tc["n_never_solved"]), note
            assert int(m[8] or 0) == tc["n_infinite_tau"] - tc["n_never_solved"], note
            assert _close(m[4], tc["mean_finite_tau"]) and _close(m[5], tc["median_finite_tau"]), note
            per_q = tc["per_question"].values()
            assert tc["n_finite_tau"] == sum(v is not None for v in per_q)
            assert tc["n_infinite_tau"] == sum(v is None for v in per_q)
        elif m := _CONFIG.fullmatch(note):
            c = next(configs)
            assert (m[1], m[2], int(m[8])) == (c["run"], c["strategy"], c["n_errors"]), note
            assert bool(m[9]) == bool(c["n_errors"]), note
            cop = c["cost_of_pass"]["output_tokens"]
            assert _close(m[5], cop) if c["n"] else m[5] == "—", note
            assert _close(m[6], c["overthinking_efficiency"]), note
            assert (m[7] is None) == (c["intelligence_per_joule"] is None), note
        elif note.startswith("⚠ "):
            m = re.fullmatch(r"⚠ (\d+) errored record\(s\) in (\d+) configuration\(s\): .*", note)
            assert m and (int(m[1]), int(m[2])) == (doc["n_errored_records"], len(doc["errored_configs"])), note
        else:
            pytest.fail(f"a note no pattern reads: {note!r}")
    for rest in (fronts, taus, configs):
        assert next(rest, None) is None  # every summary entry has its note


def _notes_of(md: str) -> list[str]:
    return [line[2:] for line in md.splitlines() if line.startswith("- ")]


def test_every_figure_in_the_notes_is_the_summarys(run: Path) -> None:
    write_report([run])
    doc = json.loads((run / "summary.json").read_text())
    notes = _notes_of((run / "summary.md").read_text())
    assert len(notes) == 1 + 2 + 1 + 3  # adherence, frontier (tokens, FLOPs), τ, one per budget
    check_notes(notes, doc)
    assert _notes_of(markdown_summary(doc)) == notes


def test_never_solved_counts_questions_no_configuration_solved_not_infinite_tau(run: Path) -> None:
    """The issue: "98 never solved" where 82 were never solved and 98 had τ = ∞."""
    write_report([run])
    doc = json.loads((run / "summary.json").read_text())
    [tc] = doc["token_complexity"].values()
    fc = doc["frontier_cost_of_pass"]["output_tokens"]
    assert (tc["n_questions"], tc["n_finite_tau"], tc["n_infinite_tau"], tc["n_never_solved"]) == (6, 2, 4, 2)
    assert tc["n_never_solved"] == fc["n_unsolved"] == 2  # one model: the same questions by the same function
    [note] = [n for n in _notes_of((run / "summary.md").read_text()) if n.startswith("Token complexity")]
    assert "τ = ∞ for 4: 2 never solved by any configuration, 2 solved too rarely" in note
    front = next(n for n in _notes_of((run / "summary.md").read_text()) if n.startswith("Frontier"))
    assert "over 4 solved problem(s) of 6; 2 never solved by any configuration" in front


def test_the_notes_of_a_report_with_errors_and_several_runs_are_the_summarys(tmp_path: Path) -> None:
    from test_evals_report import _rec, _write_run

    _write_run(tmp_path / "a", "a", 1e-6, skill=1.0)
    _write_run(tmp_path / "b", None, 1e-6, skill=0.5)
    err = tmp_path / "err"
    err.mkdir()
    lines = [_rec("ok", f"q{i}", 10, i < 2) for i in range(3)]
    lines += [_rec("dead", f"q{i}", 0, False, error="boom", budget=128) for i in range(2)]
    (err / "records.jsonl").write_text("\n".join(lines) + "\n")
    write_report([tmp_path / "a", tmp_path / "b", err], tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    notes = _notes_of((tmp_path / "out" / "summary.md").read_text())
    assert any(n.startswith("⚠ 2 errored record(s) in 1 configuration(s)") for n in notes)
    assert sum(n.startswith("Frontier cost-of-pass") for n in notes) == 2  # tokens and usd
    check_notes(notes, doc)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("\n\n", r"'\n\n'"),  # the issue: a blank `delimiter=` cell
        ("a\tb", r"'a\tb'"),
        ("two words", "'two words'"),
        (" ", "' '"),
        ("", "''"),
        ("greedy", "greedy"),
        ("bavt-logprob-robust", "bavt-logprob-robust"),
        ('say "hi"', "'say \"hi\"'"),
        ("it's", '"it\'s"'),
        ("a=b,c", "'a=b,c'"),
        ("café→π", "café→π"),
        ("non\u00a0breaking", r"'non\xa0breaking'"),
        ("bell\x07", r"'bell\x07'"),
        (3, "3"),
        (2.0, "2"),
        (0.7, "0.7"),
        (1e-06, "1e-06"),
        (True, "True"),
        (None, "None"),
        (["\n\n", "Answer:"], r"['\n\n', 'Answer:']"),
        ([1, 2.0, None], "[1, 2, None]"),
        ({"path": "/m", "k": 2}, "{'path': '/m', 'k': 2}"),
        ({"nested": {"stop": ["\n"]}}, r"{'nested': {'stop': ['\n']}}"),
        ((1,), "(1,)"),
    ],
)
def test_parameter_values_are_shown_unambiguously_on_one_line(value: Any, shown: str) -> None:
    text = format_value(value)
    assert text == shown
    assert "\n" not in text and all(c.isprintable() for c in text)
