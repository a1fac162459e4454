"""Routing and agent-trajectory rewards: the boundary-relative reward (ALGORITHMS.md §8) and the
DEPO-style dual-efficiency bonus (our choice)."""

from __future__ import annotations

from typing import Any

import pytest

from budgetlm import ConfigError
from budgetlm.rewards import BoundaryRoutingReward, DualEfficiency, boundary_class


@pytest.mark.parametrize("success, cost, small, large, expected", [
    (True, 1.0, 1.0, 5.0, 1.0),  # as cheap as always-small: full reward
    (True, 5.0, 1.0, 5.0, 0.0),  # as costly as always-large: 0
    (True, 2.0, 1.0, 5.0, 0.75),  # a quarter of the way to large
    (True, 0.5, 1.0, 5.0, 1.0),  # cheaper than small: clipped to 1
    (True, 9.0, 1.0, 5.0, 0.0),  # dearer than large: clipped to 0
    (False, 1.0, 1.0, 5.0, 0.0),  # failure: 0 however cheap
    (True, 3.0, 2.0, 2.0, 1.0),  # C_large = C_small: the cost term is 1
    (False, 3.0, 2.0, 2.0, 0.0),  # ... but failure is still 0
    (True, 5.0, 10.0, 5.0, 1.0),  # always-large was the cheaper boundary: matching it earns full reward
    (True, 10.0, 10.0, 5.0, 0.0),  # ... and matching the dearer always-small earns 0
    (True, 7.0, 10.0, 5.0, 0.6),  # in between, measured from the cheaper boundary
])
def test_boundary_routing(success: bool, cost: float, small: float, large: float, expected: float) -> None:
    r = BoundaryRoutingReward()
    assert r(completions=["x"], success=[success], cost=[cost], cost_small=[small], cost_large=[large]) == [
        pytest.approx(expected)]


def test_boundary_routing_columns_and_errors() -> None:
    r = BoundaryRoutingReward(cost_column="usd", success_column="ok")
    assert r(ok=[1, 0], usd=[3, 1], cost_small=[1, 1], cost_large=[5, 5]) == [0.5, 0.0]
    with pytest.raises(ConfigError, match=r"`ok` must hold booleans \(or 0/1\), got 'yes' at row 0"):
        r(ok=["yes"], usd=[1], cost_small=[1], cost_large=[2])
    with pytest.raises(ConfigError, match=r"`cost_large` must be a dataset column"):
        r(ok=[True], usd=[1], cost_small=[1])
    with pytest.raises(ConfigError, match=r"`usd` must have one value per completion \(2\), got 1"):
        r(completions=["a", "b"], ok=[True, True], usd=[1], cost_small=[1, 1], cost_large=[2, 2])


@pytest.mark.parametrize("small, large, expected", [
    (True, True, "easy"),  # the small model suffices
    (True, False, "easy"),  # small succeeds even if large does not
    (False, True, "hard"),  # only the large model succeeds
    (False, False, "intractable"),  # neither succeeds
])
def test_boundary_class(small: bool, large: bool, expected: str) -> None:
    assert boundary_class(small, large) == expected


@pytest.mark.parametrize("cols, expected", [
    ({"success": [True], "steps": [0], "tokens": [0]}, 1.0),  # no steps, no tokens: full bonus
    ({"success": [True], "steps": [5], "tokens": [250]}, 0.5 * 0.5 + 0.5 * 0.5),  # half of both maxima
    ({"success": [True], "steps": [10], "tokens": [1000]}, 0.0),  # at both maxima
    ({"success": [True], "steps": [20], "tokens": [0]}, 0.0),  # step term −0.5 cancels the token term: clipped
    ({"success": [False], "steps": [1], "tokens": [1]}, 0.0),  # failure: no bonus
    ({"success": [True], "step_tokens": [[100, 0, 50]]}, 0.5 * 0.7 + 0.5 * 0.5),  # per-step lists
    ({"success": [True], "step_tokens": [[]]}, 1.0),  # an empty trajectory
    ({"success": [True], "step_tokens": [[100]], "steps": [9], "tokens": [9000]}, 0.5 * 0.9 + 0.5 * 0.0),  # lists win
])
def test_dual_efficiency(cols: dict[str, Any], expected: float) -> None:
    r = DualEfficiency(max_steps=10, max_step_tokens=100)
    assert r(**cols) == [pytest.approx(expected)]


def test_dual_efficiency_weights_and_errors() -> None:
    r = DualEfficiency(max_steps=10, max_step_tokens=100, step_weight=1.0, token_weight=0.0)
    assert r(success=[True], steps=[2], tokens=[10_000]) == [pytest.approx(0.8)]  # tokens ignored
    with pytest.raises(ConfigError, match=r"`steps` must be a dataset column.*pass `steps` and `tokens` columns"):
        r(success=[True])
    with pytest.raises(ConfigError, match=r"`steps` must hold non-negative numbers, got -1.0 at row 0"):
        r(success=[True], steps=[-1], tokens=[1])
    with pytest.raises(ConfigError, match=r"`step_tokens` must hold lists of non-negative token counts, got 'abc'"):
        r(success=[True], step_tokens=["abc"])
