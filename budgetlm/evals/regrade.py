"""Re-grade a finished evaluation run with another grader, without generating anything.

``budgetlm regrade RUN_DIR --grader NAME`` (:func:`regrade`) reads ``RUN_DIR/records.jsonl`` (the
last record of each cell) and ``RUN_DIR/traces.jsonl``, and grades again:

* each record's answer text (``text``; no answer when thinking was cut off, as the runner grades)
  against the item's gold answer gives the new ``correct``, ``score`` and ``answer``;
* for voting strategies (``majority``, ``weighted_majority``, ``best_of_n``, ``adaptive``), whose
  traces hold every sample's text, tokens and extracted answer, the vote is recomputed from the
  stored samples (same rule as the strategy: normalised answers, which no grader changes) and the
  text of the sample it picks is graded — normally the record's own text; a vote that no longer
  matches the record is counted (``vote_mismatch``) as an audit finding.  Every stored sample is
  graded too: ``details["regrade"]`` holds ``samples`` and ``samples_correct`` (how many samples
  the new grader accepts: an oracle's pass@n).

The gold answer and the grader's metadata (a reasoning-gym entry, a data row) come from the
suites named in ``run.json``, rebuilt from their specs (data only, no model); when a suite cannot
be rebuilt, the record's ``gold`` text is used with no metadata.  ``--grader suite`` grades with
each suite's own grader (what the run used); any other name is a grader of
:mod:`budgetlm.evals.graders`.  Errored records are copied unchanged.

Output, next to the run's files (the originals are never touched): ``records.regraded.jsonl``
(the records with the new verdicts, the old one in ``details["regrade"]["was_correct"]``) and
``regrade.json`` (grader, counts of changed verdicts, accuracy before and after per strategy).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from budgetlm.errors import BudgetLMError, ConfigError
from budgetlm.evals import graders as _graders
from budgetlm.evals.records import EvalRecord
from budgetlm.evals.rundir import RunDir
from budgetlm.evals.suites.base import EvalItem, Grade, Suite
from budgetlm.io import JsonObject, write_json_atomic, write_jsonl_atomic
from budgetlm.strategies.aggregate import action_key, vote

__all__ = ["REGRADED_FILE", "SUITE_GRADER", "SUMMARY_FILE", "RegradeOutcome", "grader_names", "regrade"]

log = logging.getLogger("budgetlm.evals")

REGRADED_FILE = RunDir.REGRADED
"""The re-graded records, next to ``records.jsonl``."""
SUMMARY_FILE = RunDir.REGRADE_JSON
"""The summary of a re-grade."""
SUITE_GRADER = "suite"
"""The ``--grader`` name that grades with each suite's own grader."""
VOTING = {"majority": "majority", "adaptive": "majority", "weighted_majority": "weighted", "best_of_n": "best"}
"""How each voting strategy picks its answer from the stored samples."""


def grader_names() -> list[str]:
    """The valid ``--grader`` names: :data:`SUITE_GRADER` and the registered graders."""
    return [SUITE_GRADER, *_graders.names()]


@dataclass
class RegradeOutcome:
    """What one re-grade found."""

    grader: str
    records: int = 0
    """Records re-graded (errored records excluded)."""
    changed: int = 0
    """Records whose ``correct`` changed."""
    now_correct: int = 0
    """Of those, records now correct."""
    now_wrong: int = 0
    """Of those, records now wrong."""
    errors_skipped: int = 0
    """Errored records, copied unchanged."""
    vote_mismatch: int = 0
    """Records whose stored samples vote for another answer than the record holds (an audit finding)."""
    without_samples: int = 0
    """Voting records whose trace holds no sample texts (runs written before traces kept them)."""
    gold_from_records: int = 0
    """Records graded against the record's gold text because their suite could not be rebuilt."""
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per strategy label: ``{"before": ..., "after": ..., "n": ...}``."""
    out: str = ""
    """The re-graded records file."""

    def line(self) -> str:
        """One line for a person: how many verdicts changed."""
        return (f"regraded {self.records} records with {self.grader!r}: {self.changed} changed "
                f"({self.now_correct} now correct, {self.now_wrong} now wrong)"
                + (f", {self.errors_skipped} errored records copied unchanged" if self.errors_skipped else "")
                + (f", {self.vote_mismatch} votes do not match their stored samples" if self.vote_mismatch else ""))


def _run_dir(run_dir: str | Path) -> RunDir:
    d = RunDir(run_dir)
    if not d.has_records():
        raise ConfigError(f"`RUN_DIR` must be a run folder holding {RunDir.RECORDS}, got {str(d.path)!r}"
                          + ("" if d.path.is_dir() else " (no such folder)")
                          + "; pass the --out folder of a `budgetlm eval` run")
    return d


def _grader(name: str) -> _graders.Grader | None:
    """The named grader, or ``None`` for :data:`SUITE_GRADER`; unknown names list the valid ones."""
    if name == SUITE_GRADER:
        return None
    if name not in _graders.names():
        raise ConfigError(f"`--grader` must be one of {', '.join(grader_names())}, got {name!r}; "
                          f"'{SUITE_GRADER}' re-grades with each suite's own grader")
    return _graders.get_grader(name)


def _config(run_dir: RunDir) -> dict[str, Any]:
    return (run_dir.read_meta() or {}).get("config") or {}


def _strategy_names(config: dict[str, Any]) -> dict[str, str]:
    """Record ``strategy`` (a label or a name) -> registered strategy name, from the run's config."""
    return {s.get("label") or s["name"]: s["name"] for s in config.get("strategies") or [] if "name" in s}


def _suites(config: dict[str, Any]) -> dict[str, tuple[Suite, dict[str, EvalItem]]]:
    """The run's suites rebuilt from its config (data only), by suite name; those that fail are left out."""
    from budgetlm.evals.runner import _suite_name
    from budgetlm.evals.suites import get as get_suite

    specs = config.get("suites") or []
    out: dict[str, tuple[Suite, dict[str, EvalItem]]] = {}
    for spec in specs:
        try:
            suite = get_suite(spec)
            out[_suite_name(spec)] = (suite, {it.id: it for it in suite.items()})
        except (BudgetLMError, ImportError, OSError) as exc:
            log.warning("regrade: suite %s could not be rebuilt (%s); grading against the records' gold text",
                        _suite_name(spec), exc)
    return out


def _samples(trace: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [e for e in trace or [] if "sample" in e and "text" in e]


def _voted_text(strategy: str, samples: list[dict[str, Any]]) -> str:
    """The text of the sample the strategy's rule picks from the stored samples."""
    keys = [action_key(s["text"]) if s["text"] else None for s in samples]
    weights = [float(s.get("weight") or 0.0) for s in samples]
    rule = VOTING[strategy]
    if rule == "best":
        pool = [j for j, k in enumerate(keys) if k is not None] or list(range(len(samples)))
        best = max(pool, key=lambda j: (-float("inf") if samples[j].get("score") is None else samples[j]["score"], -j))
        best_text: str = samples[best]["text"]
        return best_text
    v = vote(keys, weights, weighted=rule == "weighted")
    voted_text: str = samples[v.index if v.index is not None else 0]["text"]
    return voted_text


def regrade(run_dir: str | Path, grader: str) -> RegradeOutcome:
    """Re-grade the finished run in ``run_dir`` with ``grader`` (a name of :func:`grader_names`); see the module doc."""
    d = _run_dir(run_dir)
    g = _grader(grader)
    config = _config(d)
    suites = _suites(config)
    names = _strategy_names(config)
    records = d.read_records()
    traces = {(t.get("suite"), t.get("item_id"), t.get("config_id")): t.get("trace")
              for t in d.read_traces()}
    outcome = RegradeOutcome(grader=grader)
    tally: dict[str, list[int]] = {}  # label -> [n, correct before, correct after]

    def grade(rec: EvalRecord, text: str | None) -> Grade:
        suite, items = suites.get(rec.suite, (None, {}))
        item = items.get(rec.item_id)
        if suite is None or item is None:
            if g is None:
                raise ConfigError(f"`--grader {SUITE_GRADER}` needs the run's suites, but suite {rec.suite!r} "
                                  f"could not be rebuilt (or lacks item {rec.item_id!r}); name a grader: "
                                  f"{', '.join(_graders.names())}")
            return g.grade(text, rec.gold, {})
        return suite.grade(item, text) if g is None else g.grade(text, item.gold, item.metadata)

    lines: list[str] = []
    for rec in records:
        if rec.error is not None:
            outcome.errors_skipped += 1
            lines.append(rec.model_dump_json())
            continue
        outcome.records += 1
        if rec.suite not in suites:
            outcome.gold_from_records += 1
        text = None if rec.thinking_truncated else rec.text
        info: JsonObject = {"grader": grader, "was_correct": rec.correct, "was_score": rec.score,
                                "was_answer": rec.answer}
        samples = _samples(traces.get(rec.key))
        strategy = names.get(rec.strategy, rec.strategy)
        if strategy in VOTING or samples:
            if samples:
                info["samples"] = len(samples)
                info["samples_correct"] = sum(
                    grade(rec, None if s.get("thinking_truncated") else s["text"]).correct for s in samples)
                if strategy in VOTING and text is not None and _voted_text(strategy, samples) != text:
                    outcome.vote_mismatch += 1
                    info["vote_mismatch"] = True
            elif strategy in VOTING:
                outcome.without_samples += 1
        new = grade(rec, text)
        if new.correct != rec.correct:
            outcome.changed += 1
            outcome.now_correct += new.correct
            outcome.now_wrong += not new.correct
        t = tally.setdefault(rec.strategy, [0, 0, 0])
        t[0] += 1
        t[1] += rec.correct
        t[2] += new.correct
        upd = rec.model_copy(update={"correct": new.correct, "score": new.score, "answer": new.answer,
                                     "details": {**rec.details, "regrade": info}})
        lines.append(upd.model_dump_json())
    write_jsonl_atomic(d.regraded, lines)
    outcome.accuracy = {k: {"n": n, "before": b / n, "after": a / n} for k, (n, b, a) in tally.items()}
    outcome.out = str(d.regraded)
    write_json_atomic(d.regrade_json, asdict(outcome), default=None)
    return outcome
