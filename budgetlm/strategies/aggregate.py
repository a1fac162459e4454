"""Answer aggregation shared by all strategies.

Answers are extracted with :func:`budgetlm.answers.extract_answer` and normalised with
:func:`budgetlm.answers.normalize_answer`, so "7", "7.0" and "\\boxed{7}" vote together.

:func:`vote` implements the voting rules of ALGORITHMS.md §2: plain majority is the mode of the
normalised answers; ties go to the answer with the highest summed score, then to the one seen
first.  Weighted majority uses the summed scores as the weight.  Samples without an answer never
win unless no sample has one.  A sample that calls tools votes with its calls
(:func:`action_key`), so samples vote over tool calls and answers together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from budgetlm.answers import extract_answer, normalize_answer
from budgetlm.tools import TOOL_CALL_OPEN, calls_key, parse_tool_calls


def answer_key(text: str | None) -> str | None:
    """The normalised answer of a sample's answer text (``None`` when there is none)."""
    return normalize_answer(extract_answer(text).text) if text else None


def action_key(text: str | None) -> str | None:
    """The vote key of a sample: its tool calls (:func:`~budgetlm.tools.calls_key`, same function and arguments
    vote together) when it makes any, else its normalised answer (:func:`answer_key`)."""
    if text and TOOL_CALL_OPEN in text:
        _, calls = parse_tool_calls(text)
        if calls:
            return calls_key(calls)
    return answer_key(text)


@dataclass(frozen=True)
class Vote:
    """Outcome of a vote."""

    winner: str | None
    """The winning normalised answer (``None`` when no sample had one)."""
    index: int | None
    """Index of the first sample that gave the winner (its text is the result's text)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Votes per answer."""
    weights: dict[str, float] = field(default_factory=dict)
    """Summed scores per answer."""

    @property
    def margin(self) -> int:
        """Votes of the leader minus votes of the runner-up."""
        c = sorted(self.counts.values(), reverse=True)
        return (c[0] - (c[1] if len(c) > 1 else 0)) if c else 0


def vote(answers: Sequence[str | None], scores: Sequence[float] | None = None, *, weighted: bool = False) -> Vote:
    """Majority (or, with ``weighted=True``, score-weighted majority) over normalised answers."""
    if scores is not None and len(scores) != len(answers):
        raise ValueError(f"`scores` must have one entry per answer ({len(answers)}), got {len(scores)}")
    sc = list(scores) if scores is not None else [0.0] * len(answers)
    counts: dict[str, int] = {}
    weights: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, (a, s) in enumerate(zip(answers, sc, strict=True)):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        weights[a] = weights.get(a, 0.0) + float(s)
        first.setdefault(a, i)
    if not counts:
        return Vote(None, None, {}, {})
    if weighted:
        winner = max(counts, key=lambda a: (weights[a], counts[a], -first[a]))
    else:
        winner = max(counts, key=lambda a: (counts[a], weights[a], -first[a]))
    return Vote(winner, first[winner], counts, weights)
