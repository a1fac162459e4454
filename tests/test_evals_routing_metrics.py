"""Tests of budgetlm.evals.routing_metrics (RouteLLM-style router metrics)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetlm.errors import ConfigError
from budgetlm.evals.records import EvalRecord
from budgetlm.evals.routing_metrics import (
    RoutingCurve,
    apgr,
    apgr_from,
    budget_violations,
    calibrate_threshold,
    cost_success_frontier,
    cpt,
    pgr,
    routing_curve,
    strong_share,
    summarize_router,
)


def _outcomes(rng: np.random.Generator, n: int, p_weak: float = 0.5, p_strong: float = 0.8):
    """Per-item weak/strong success flags with weak ⊂ strong-ish, as in typical benchmarks."""
    weak = rng.random(n) < p_weak
    strong = weak | (rng.random(n) < (p_strong - p_weak) / (1 - p_weak))
    return weak.astype(float), strong.astype(float)


# ------------------------------------------------------------------------------------------------
# calibrate_threshold / strong_share


@pytest.mark.parametrize(
    ("scores", "share", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.4], 0.0, math.inf),  # share 0: above every score
        ([0.1, 0.2, 0.3, 0.4], 1.0, 0.1),  # share 1: the minimum score
        ([0.1, 0.2, 0.3, 0.4], 0.5, 0.3),  # top two routed
        ([0.1, 0.2, 0.3, 0.4], 0.25, 0.4),  # top one routed
        ([0.4, 0.1, 0.3, 0.2], 0.5, 0.3),  # order of the input does not matter
        ([0.1, 0.2, 0.3, 0.4], 0.375, 0.4),  # exactly between 1/4 and 2/4: the cheaper (smaller) share
        ([0.5, 0.5, 0.5, 0.5], 0.4, math.inf),  # all tied: only 0 or 1 reachable, 0 is closer
        ([0.5, 0.5, 0.5, 0.5], 0.6, 0.5),  # all tied: 1 is closer
        ([0.1, 0.5, 0.5, 0.9], 0.5, 0.9),  # ties move together: share 1/4 and 3/4 equally close -> cheaper
        ([0.1, 0.5, 0.5, 0.9], 0.6, 0.5),  # 3/4 is closest
        ([7.0], 0.6, 7.0),  # one item
    ],
)
def test_calibrate_threshold_table(scores, share, expected):
    assert calibrate_threshold(scores, share) == expected


def test_calibrate_threshold_realises_share_within_one_step():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        scores = rng.random(n)
        for share in [0.0, 1.0, *rng.random(5)]:
            t = calibrate_threshold(scores, share)
            assert abs(strong_share(scores, t) - share) <= 1.0 / n + 1e-12


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40, unique=True),
    share=st.floats(0.0, 1.0),
)
def test_calibrate_threshold_property_distinct_scores(scores, share):
    t = calibrate_threshold(scores, share)
    realised = strong_share(scores, t)
    assert abs(realised - share) <= 0.5 / len(scores) + 1e-12  # nearest achievable share
    assert t == math.inf or t in scores


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.integers(0, 5).map(float), min_size=1, max_size=30), share=st.floats(0.0, 1.0))
def test_calibrate_threshold_property_ties_nearest_achievable(scores, share):
    # with ties the result is the closest share any threshold can realise
    t = calibrate_threshold(scores, share)
    achievable = [0.0] + [strong_share(scores, v) for v in set(scores)]
    assert abs(strong_share(scores, t) - share) == pytest.approx(min(abs(a - share) for a in achievable))


def test_strong_share_monotone_in_threshold():
    rng = np.random.default_rng(1)
    scores = rng.random(50).round(1)  # plenty of ties
    thresholds = np.sort(np.concatenate([scores, rng.random(20), [-1.0, 2.0, math.inf]]))
    shares = [strong_share(scores, t) for t in thresholds]
    assert all(a >= b for a, b in zip(shares, shares[1:]))
    assert shares[0] == 1.0 and shares[-1] == 0.0


# ------------------------------------------------------------------------------------------------
# routing curve


def test_routing_curve_by_hand():
    scores = [0.9, 0.1, 0.5, 0.5]
    weak = [0, 1, 0, 1]
    strong = [1, 1, 1, 0]
    c = routing_curve(scores, weak, strong)
    assert c.thresholds.tolist() == [math.inf, 0.9, 0.5, 0.1]
    assert c.shares.tolist() == [0.0, 0.25, 0.75, 1.0]  # the two 0.5s move together
    assert c.quality.tolist() == pytest.approx([0.5, 0.75, 0.75, 0.75])
    assert c.cost.tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])  # default costs 0/1


def test_routing_curve_ties_move_together():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, size=40).astype(float)
    weak, strong = _outcomes(rng, 40)
    c = routing_curve(scores, weak, strong)
    assert len(c.shares) == len(np.unique(scores)) + 1
    for t, s in zip(c.thresholds, c.shares):
        assert s == strong_share(scores, t)
    assert np.all(np.diff(c.shares) > 0) and c.shares[0] == 0.0 and c.shares[-1] == 1.0


@pytest.mark.parametrize(
    ("cheap_always_runs", "expected_cost"),
    [
        (False, [2.0, 6.0, 10.0]),  # routed items pay only the strong cost (10)
        (True, [2.0, 7.0, 12.0]),  # cascade: routed items also paid the weak cost (2)
    ],
)
def test_cheap_always_runs_adds_weak_cost(cheap_always_runs, expected_cost):
    c = routing_curve([1.0, 0.0], [0, 0], [1, 1], 2.0, [10.0, 10.0], cheap_always_runs=cheap_always_runs)
    assert c.cost.tolist() == pytest.approx(expected_cost)


# ------------------------------------------------------------------------------------------------
# APGR, CPT, PGR


def test_oracle_router():
    rng = np.random.default_rng(3)
    weak, strong = _outcomes(rng, 400)
    oracle = ((strong == 1) & (weak == 0)).astype(float)
    gain = oracle.mean()
    c = routing_curve(oracle, weak, strong)
    # only gain items are routed before the gap is closed: APGR = 1 - gain/2 exactly
    assert apgr(c) == pytest.approx(1 - gain / 2)
    assert apgr(c) > 0.8  # gain is ~0.3 here
    assert cpt(c, pct=50) == pytest.approx(gain)  # the tied block of gain items moves together
    assert cpt(c, pct=80) == pytest.approx(gain)


def test_random_router_apgr_is_half_on_average():
    rng = np.random.default_rng(4)
    weak, strong = _outcomes(rng, 300)
    values = [apgr_from(rng.random(300), weak, strong) for _ in range(400)]
    # std of one draw is ~0.05 here, so the mean of 400 is within ~0.0025 of 0.5
    assert np.mean(values) == pytest.approx(0.5, abs=0.015)


def test_constant_router_apgr_is_exactly_half():
    # one tie block: the curve is the straight line weak -> strong
    rng = np.random.default_rng(5)
    weak, strong = _outcomes(rng, 50)
    assert apgr_from(np.zeros(50), weak, strong) == pytest.approx(0.5)


def test_anti_oracle_below_half():
    rng = np.random.default_rng(6)
    weak, strong = _outcomes(rng, 400)
    anti = 1.0 - ((strong == 1) & (weak == 0))
    c = routing_curve(anti, weak, strong)
    assert apgr(c) < 0.5
    assert cpt(c, pct=50) == 1.0  # needs every call


def test_cpt_by_hand():
    c = RoutingCurve(
        shares=np.array([0.0, 0.25, 0.5, 1.0]),
        quality=np.array([0.4, 0.5, 0.7, 0.8]),
        cost=np.zeros(4),
        thresholds=np.array([math.inf, 3.0, 2.0, 1.0]),
    )
    assert cpt(c, pct=0) == 0.0  # share 0 already recovers 0%
    assert cpt(c, pct=25) == 0.25  # 0.5 reaches 0.4 + 0.25*0.4 = 0.5 exactly
    assert cpt(c, pct=50) == 0.5
    assert cpt(c, 0.4, 0.8, 75) == 0.5  # explicit end qualities, positional
    assert cpt(c, 0.4, 0.8, 80) == 1.0  # 0.72 needs the all-strong point
    assert cpt(c, pct=100) == 1.0  # the all-strong point always reaches 100%
    assert math.isnan(cpt(c, pct=150))  # never reached
    assert math.isnan(cpt(c, 0.5, 0.5, 50))  # zero gap
    assert math.isnan(cpt(c, 0.8, 0.4, 50))  # negative gap
    # trapezoid: 0.25*0.45 + 0.25*0.6 + 0.5*0.75 = 0.6375; (0.6375-0.4)/0.4
    assert apgr(c) == pytest.approx(0.59375)


@pytest.mark.parametrize(
    ("weak", "strong"),
    [
        ([1, 0, 1], [1, 0, 1]),  # same outcomes
        ([1, 0, 0], [0, 1, 0]),  # different items, same mean
    ],
)
def test_zero_gap_gives_nan(weak, strong):
    c = routing_curve([0.3, 0.2, 0.1], weak, strong)
    assert math.isnan(apgr(c))
    assert math.isnan(cpt(c, pct=50))
    assert math.isnan(pgr(0.5, 0.5, 0.5))


@pytest.mark.parametrize(
    ("q", "weak", "strong", "expected"),
    [
        (0.5, 0.5, 0.9, 0.0),  # all-weak quality
        (0.9, 0.5, 0.9, 1.0),  # all-strong quality
        (0.7, 0.5, 0.9, 0.5),  # halfway
        (1.0, 0.5, 0.9, 1.25),  # beats the strong model
    ],
)
def test_pgr(q, weak, strong, expected):
    assert pgr(q, weak, strong) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda: calibrate_threshold([0.1, 0.2], 1.5), "share"),  # share above 1
        (lambda: calibrate_threshold([0.1, 0.2], -0.1), "share"),  # share below 0
        (lambda: calibrate_threshold([0.1, 0.2], math.nan), "share"),  # NaN share
        (lambda: calibrate_threshold([], 0.5), "scores"),  # empty scores
        (lambda: calibrate_threshold([0.1, math.nan], 0.5), "scores"),  # NaN score
        (lambda: strong_share([0.1], math.nan), "threshold"),  # NaN threshold
        (lambda: routing_curve([0.1, 0.2], [1], [1, 1]), "weak_success"),  # length mismatch
        (lambda: routing_curve([0.1, 0.2], [1, 0], [1]), "strong_success"),  # length mismatch
        (lambda: routing_curve([], [], []), "scores"),  # empty
        (lambda: routing_curve([0.1, 0.2], [1, 0], [1, 1], [1, 2, 3]), "weak_cost"),  # cost length
        (lambda: routing_curve([0.1, 0.2], [1, 0], [1, 1], None, [1.0]), "strong_cost"),  # cost length
        (lambda: routing_curve([[0.1, 0.2]], [1, 0], [1, 1]), "scores"),  # 2-D scores
        (lambda: cpt(routing_curve([0.1], [0], [1]), pct=-5), "pct"),  # negative pct
        (lambda: summarize_router("r", [0.1], [0], [1], target_share=0.5, threshold=0.1), "threshold"),  # both
        (lambda: summarize_router("r", [0.1], [0], [1], target_share=2.0), "share"),  # bad target share
    ],
)
def test_bad_inputs_raise_config_error(call, param):
    with pytest.raises(ConfigError, match=f"`{param}`"):
        call()


def test_error_message_pattern():
    with pytest.raises(ConfigError, match=r"`share` must be in \[0, 1\], got 1\.5; "):
        calibrate_threshold([0.1], 1.5)


# ------------------------------------------------------------------------------------------------
# frontier, budget violations, summary


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        # "mid" is dominated by "cheap-good" (cheaper and better); the rest trade off
        (
            [("weak", 1.0, 0.5), ("mid", 5.0, 0.55), ("cheap-good", 3.0, 0.6), ("strong", 10.0, 0.8)],
            ["weak", "cheap-good", "strong"],
        ),
        # equal cost: only the more accurate survives
        ([("a", 2.0, 0.5), ("b", 2.0, 0.7)], ["b"]),
        # identical points are both kept, ordered by label
        ([("z", 1.0, 0.5), ("y", 1.0, 0.5)], ["y", "z"]),
        # NaN points are dropped
        ([("nan", math.nan, 0.9), ("ok", 1.0, 0.1)], ["ok"]),
        ([], []),  # nothing in, nothing out
    ],
)
def test_cost_success_frontier(points, expected):
    front = cost_success_frontier(points)
    assert [label for label, _, _ in front] == expected
    assert [c for _, c, _ in front] == sorted(c for _, c, _ in front)


def test_budget_violations_counts_records_and_dicts():
    base = {"item_id": "1", "suite": "s", "config_id": "c", "model": "m", "strategy": "x"}
    records = [
        EvalRecord(**base, over_budget=True),
        EvalRecord(**base),
        {"over_budget": True},
        {"over_budget": False},
        {},  # missing flag counts as within budget
    ]
    assert budget_violations(records) == 2
    assert budget_violations([]) == 0


def test_summarize_router():
    scores = [0.9, 0.1, 0.5, 0.5]
    weak, strong = [0, 1, 0, 1], [1, 1, 1, 0]
    s = summarize_router("oracle-ish", scores, weak, strong, target_share=0.3)
    json.dumps(s, allow_nan=False)  # JSON-ready
    assert s["name"] == "oracle-ish" and s["n"] == 4
    assert s["weak_quality"] == 0.5 and s["strong_quality"] == 0.75
    assert s["threshold"] == 0.9 and s["share"] == 0.25
    assert s["quality"] == 0.75 and s["cost"] == 0.25 and s["pgr"] == 1.0
    assert s["cpt50"] == 0.25 and s["cpt80"] == 0.25
    assert s["apgr"] == pytest.approx(apgr(routing_curve(scores, weak, strong)))

    s0 = summarize_router("r", scores, weak, strong, threshold=math.inf)
    assert s0["threshold"] is None and s0["share"] == 0.0 and s0["pgr"] == 0.0
    assert "share" not in summarize_router("plain", scores, weak, strong)

    flat = summarize_router("flat", scores, [1, 0, 0, 1], [1, 0, 0, 1], target_share=1.0)
    json.dumps(flat, allow_nan=False)
    assert flat["apgr"] is None and flat["pgr"] is None and flat["share"] == 1.0
