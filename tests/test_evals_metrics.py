"""Evaluation metrics: hand-computed examples for every formula of ALGORITHMS.md §10."""

from __future__ import annotations

import math
from typing import Any

import pytest

from budgetlm.errors import ConfigError
from budgetlm.evals.metrics import (
    accuracy_vs_cost_curves,
    bootstrap_ci,
    cost_of_pass,
    first_correct_fraction,
    frontier_cost_of_pass,
    frontier_summaries,
    intelligence_per_joule,
    oracle_accuracy,
    oracle_curve,
    overthinking_efficiency,
    pareto_frontier,
    summarize,
    token_complexity,
    token_threshold,
)
from budgetlm.evals.records import EvalRecord

INF = math.inf


def rec(**kw: Any) -> EvalRecord:
    base: dict[str, Any] = {"item_id": "q1", "suite": "s", "config_id": "A", "model": "m", "strategy": "direct"}
    base.update(kw)
    return EvalRecord(**base)


# ------------------------------------------------------------------ Pareto frontier


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        # b is dominated by a (cheaper and more accurate); c is the accurate end
        ([("a", 1, 0.5), ("b", 2, 0.4), ("c", 3, 0.9)], ["a", "c"]),
        # identical points do not dominate each other: both kept, ordered by id; c costs more for the same accuracy
        ([("b", 1, 0.5), ("a", 1, 0.5), ("c", 2, 0.5)], ["a", "b"]),
        # same cost, higher accuracy wins
        ([("a", 1, 0.5), ("b", 1, 0.7)], ["b"]),
        # a single point is its own frontier
        ([("a", 5, 0.0)], ["a"]),
        # an infinite cost stays when nothing else is as accurate; sorted cheapest first
        ([("a", INF, 1.0), ("b", 1, 0.5)], ["b", "a"]),
        # NaN coordinates are ignored
        ([("a", math.nan, 1.0), ("b", 1, 0.5)], ["b"]),
        # no points, no frontier
        ([], []),
    ],
)
def test_pareto_frontier(points: list[tuple[str, float, float]], expected: list[str]) -> None:
    assert pareto_frontier(points) == expected


def test_pareto_frontier_is_deterministic_under_input_order() -> None:
    pts = [("a", 1, 0.5), ("b", 1, 0.5), ("c", 2, 0.8), ("d", 2, 0.8), ("e", 3, 0.6)]
    assert pareto_frontier(pts) == pareto_frontier(list(reversed(pts))) == ["a", "b", "c", "d"]


# ------------------------------------------------------------------ cost-of-pass


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        ("output_tokens", 20 / (2 / 3)),  # mean output 20, accuracy 2/3
        ("total_tokens", (20 + 5) / (2 / 3)),  # prompt tokens 5 each are added
        ("usd", 0.2 / (2 / 3)),  # mean dollars 0.2
        ("flops", 2e9 / (2 / 3)),  # mean FLOPs 2e9
    ],
)
def test_cost_of_pass(cost: str, expected: float) -> None:
    recs = [
        rec(item_id=f"q{i}", output_tokens=t, prompt_tokens=5, usd=t / 100, flops=t * 1e8, correct=c)
        for i, (t, c) in enumerate([(10, True), (20, False), (30, True)])
    ]
    assert cost_of_pass(recs, cost) == pytest.approx(expected)  # type: ignore[arg-type]


def test_cost_of_pass_zero_accuracy_is_inf_and_bad_input_raises() -> None:
    assert cost_of_pass([rec(output_tokens=10), rec(item_id="q2", output_tokens=5)]) == INF
    with pytest.raises(ConfigError, match="`cost` must be one of"):
        cost_of_pass([rec()], "joules")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`records` must be a non-empty"):
        cost_of_pass([])


def test_frontier_cost_of_pass_by_hand() -> None:
    recs = [
        # p1: A -> 10 / 0.5 = 20; B -> 30 / 1 = 30; frontier 20 (A)
        rec(item_id="p1", config_id="A", output_tokens=10, correct=True),
        rec(item_id="p1", config_id="A", output_tokens=10, correct=False),
        rec(item_id="p1", config_id="B", output_tokens=30, correct=True),
        # p2: A -> inf; B -> mean(40, 20) / 1 = 30; frontier 30 (B)
        rec(item_id="p2", config_id="A", output_tokens=10, correct=False),
        rec(item_id="p2", config_id="B", output_tokens=40, correct=True),
        rec(item_id="p2", config_id="B", output_tokens=20, correct=True),
        # p3: nobody solves it -> inf, counted as unsolved
        rec(item_id="p3", config_id="A", output_tokens=5, correct=False),
        rec(item_id="p3", config_id="B", output_tokens=50, correct=False),
    ]
    fc = frontier_cost_of_pass(recs)
    assert fc.mean == pytest.approx((20 + 30) / 2)
    assert (fc.n_problems, fc.n_unsolved) == (3, 1)
    assert fc.per_problem == {("s", "p1"): 20, ("s", "p2"): 30, ("s", "p3"): INF}
    assert fc.best_config == {("s", "p1"): ("", "A"), ("s", "p2"): ("", "B"), ("s", "p3"): None}
    # the frontier beats each configuration's own cost-of-pass (A: 8.75 / 0.25 = 35, B: 35 / 0.75)
    assert fc.mean < min(cost_of_pass([r for r in recs if r.config_id == c]) for c in "AB")


def test_frontier_cost_of_pass_keys_configs_by_run_and_all_unsolved_is_inf() -> None:
    recs = [
        rec(config_id="A", run="r1", output_tokens=10, correct=True),
        rec(config_id="A", run="r2", output_tokens=4, correct=True),  # same config id, other run: cheaper
    ]
    fc = frontier_cost_of_pass(recs)
    assert fc.mean == 4 and fc.best_config[("s", "q1")] == ("r2", "A")
    none = frontier_cost_of_pass([rec(output_tokens=3)])
    assert none.mean == INF and none.n_unsolved == 1


# ------------------------------------------------------------------ token complexity and oracle accuracy


@pytest.mark.parametrize(
    ("tokens", "correct", "tau"),
    [
        ([10, 20, 30, 40], [False, False, True, True], 30),  # separable: the first correct length
        ([15, 5, 25], [True, True, True], 5),  # all right: the minimum tokens
        ([15, 5, 25], [False, False, False], INF),  # all wrong: infinity
        ([10, 20, 30, 40, 50], [False, True, False, True, True], 20),  # tau 20 and 40 both misclassify 1: smallest wins
        ([10, 20, 30, 40], [True, False, True, False], 10),  # tau 10, 30, inf tie at 2 hits: smallest wins
        ([10, 20, 30], [True, False, False], INF),  # one short lucky hit: predicting all wrong errs least
        ([], [], math.nan),  # no responses
    ],
)
def test_token_threshold(tokens: list[int], correct: list[bool], tau: float) -> None:
    got = token_threshold(tokens, correct)
    assert (math.isnan(got) and math.isnan(tau)) or got == tau


def test_token_complexity_per_question_skips_errors() -> None:
    recs = [
        rec(item_id="a", config_id="c1", output_tokens=10, correct=False),
        rec(item_id="a", config_id="c2", output_tokens=30, correct=True),
        rec(item_id="a", config_id="c3", output_tokens=2, correct=False, error="boom"),  # errors left out
        rec(item_id="b", config_id="c1", output_tokens=7, correct=True),
        rec(item_id="c", config_id="c1", output_tokens=7, correct=False),
        rec(item_id="d", config_id="c1", correct=False, error="boom"),  # only an error: no tau at all
    ]
    assert token_complexity(recs) == {("s", "a"): 30, ("s", "b"): 7, ("s", "c"): INF}


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (5, 0.0),  # even the easiest question (10) exceeds the mean budget
        (15, 0.5),  # 10 and 20 have mean 15 <= 15; adding 60 makes it 30
        (30, 0.75),  # 10, 20, 60 have mean 30
        (1e9, 0.75),  # the infinite-tau question is never chosen
    ],
)
def test_oracle_accuracy(budget: float, expected: float) -> None:
    taus = {("s", "q1"): 60.0, ("s", "q2"): 10.0, ("s", "q3"): INF, ("s", "q4"): 20.0}
    assert oracle_accuracy(taus, budget) == expected


def test_oracle_curve_and_errors() -> None:
    assert oracle_curve([10, 20, 60, INF], [30, 5, 15]) == [(5, 0.0), (15, 0.5), (30, 0.75)]
    with pytest.raises(ConfigError, match="`taus`"):
        oracle_accuracy([], 10)
    with pytest.raises(ConfigError, match="`budget_b`"):
        oracle_accuracy([1.0], -1)


# ------------------------------------------------------------------ overthinking outcome efficiency


def test_xi_o_uses_tokens_to_first_correct() -> None:
    recs = [
        rec(output_tokens=100, correct=True, tokens_to_first_correct=25),  # 0.25
        rec(item_id="q2", output_tokens=100, correct=False, tokens_to_first_correct=10),  # wrong: 0
    ]
    assert overthinking_efficiency(recs) == pytest.approx(0.125)


@pytest.mark.parametrize(
    ("text", "gold", "output_tokens", "thinking_tokens", "expected"),
    [
        ("abcd 42 " + "z" * 12, "42", 40, 0, 7 / 20),  # "42" ends at char 7 of 20
        ("abcd 42 " + "z" * 12, "42", 40, 20, (20 + 20 * 7 / 20) / 40),  # hidden thinking counted before it
        ("1234 then 12 and more", "12", 10, 0, 12 / 21),  # "12" inside 1234 is not an occurrence
        ("The Answer: Paris.", "paris", 10, 0, 17 / 18),  # case-insensitive
        ("it is one half", "0.5", 10, 0, 1.0),  # gold not found verbatim: T-hat = T
        ("", "3", 0, 0, 1.0),  # no output tokens: counts 1
    ],
)
def test_xi_o_text_position_estimate(text: str, gold: str, output_tokens: int, thinking_tokens: int,
                                     expected: float) -> None:
    r = rec(text=text, gold=gold, output_tokens=output_tokens, thinking_tokens=thinking_tokens, correct=True)
    assert first_correct_fraction(r) == pytest.approx(expected)
    assert overthinking_efficiency([r, rec(item_id="w", correct=False, text=text, gold=gold)]) == pytest.approx(
        expected / 2)


# ------------------------------------------------------------------ bootstrap, summaries, energy


def test_bootstrap_ci_contains_mean_and_is_seeded() -> None:
    vals = [0, 1, 1, 0, 1, 1, 0, 1]
    low, high = bootstrap_ci(vals, seed=3)
    assert low <= sum(vals) / len(vals) <= high and 0 <= low < high <= 1
    assert bootstrap_ci(vals, seed=3) == (low, high)
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    with pytest.raises(ConfigError, match="`alpha`"):
        bootstrap_ci(vals, alpha=1.5)
    with pytest.raises(ConfigError, match="`n_resamples`"):
        bootstrap_ci(vals, n_resamples=0)


def test_summarize_rates_and_breakdown() -> None:
    recs = [
        rec(item_id="1", suite="s1", correct=True, score=1.0, output_tokens=10, truncated=True),
        rec(item_id="2", suite="s1", correct=False, output_tokens=30, over_budget=True, thinking_truncated=True),
        rec(item_id="3", suite="s2", correct=True, score=1.0, output_tokens=20, usd=0.5),
        rec(item_id="4", suite="s2", correct=False, output_tokens=0, error="boom"),
        rec(item_id="1", suite="s1", config_id="B", correct=True, output_tokens=5, joules=4.0),
    ]
    a, b = summarize(recs, run="r")
    assert (a.run, a.config_id, a.n, b.n) == ("r", "A", 4, 1)
    assert a.accuracy == 0.5 and a.accuracy_ci_low <= 0.5 <= a.accuracy_ci_high
    assert a.mean_output_tokens == 15 and a.median_output_tokens == 15
    assert a.truncation_rate == 0.25 and a.thinking_truncation_rate == 0.25
    assert a.over_budget_rate == 0.25  # budget adherence: must be 0 in a correct run
    assert a.n_errors == 1 and a.mean_usd == 0.125
    assert a.cost_of_pass["output_tokens"] == 30 and a.cost_of_pass["usd"] == 0.25
    assert a.mean_joules is None and a.intelligence_per_joule is None
    assert b.mean_joules == 4.0 and b.intelligence_per_joule == 0.25
    assert set(a.per_suite) == {"s1", "s2"} and a.per_suite["s1"].accuracy == 0.5 and a.per_suite["s2"].n == 2
    assert a.to_dict()["per_suite"]["s1"]["mean_output_tokens"] == 20


@pytest.mark.parametrize(
    ("joules", "correct", "expected"),
    [
        ([None, None], [True, False], None),  # nothing measured: None, never 0
        ([10.0, 30.0], [True, False], 0.5 / 20),  # accuracy 0.5 / mean 20 J
        ([10.0, None], [True, True], 1 / 10),  # mean over the measured records only
        ([0.0, 0.0], [True, True], None),  # zero energy cannot be divided by
    ],
)
def test_intelligence_per_joule(joules: list[float | None], correct: list[bool], expected: float | None) -> None:
    recs = [rec(item_id=str(i), joules=j, correct=c) for i, (j, c) in enumerate(zip(joules, correct))]
    got = intelligence_per_joule(recs)
    assert got == (None if expected is None else pytest.approx(expected))


def test_curves_group_budgets_and_frontier_of_summaries() -> None:
    recs = []
    for cid, budget, toks, ok in [("b1", 100, 50, False), ("b2", 200, 150, True), ("b3", 300, 120, True)]:
        recs.append(rec(config_id=cid, budget={"output_tokens": budget}, output_tokens=toks, correct=ok))
    recs.append(rec(config_id="x", strategy="vote", params={"n": 3}, output_tokens=400, correct=True))
    summaries = summarize(recs, run="r")
    curves = accuracy_vs_cost_curves(summaries)
    assert [c.strategy for c in curves] == ["direct", "vote"]
    assert [p.config_id for p in curves[0].points] == ["b1", "b3", "b2"]  # ordered by mean tokens
    assert curves[1].label == "vote"  # one run, one model, one params set: the short label
    assert [s.config_id for s in frontier_summaries(summaries)] == ["b1", "b3"]
