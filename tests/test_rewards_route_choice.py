"""The route-choice reward: a step's small/large answer credited with that boundary policy's outcome (our
one-step approximation of BoPO's boundary-relative reward)."""

from __future__ import annotations

from typing import Any

import pytest

from budgetlm import rewards
from budgetlm.errors import ConfigError
from budgetlm.rewards import BoundaryRoutingReward, RouteChoiceReward


def cols(ok_s: Any, ok_l: Any, c_s: Any, c_l: Any) -> dict[str, list[Any]]:
    return {"success_small": [ok_s], "success_large": [ok_l], "cost_small": [c_s], "cost_large": [c_l]}


@pytest.mark.parametrize("completion, ok_s, ok_l, c_s, c_l, expected", [
    ("small", True, True, 10, 50, 1.0),  # easy task, small chosen: as cheap as always-small, full reward
    ("large", True, True, 10, 50, 0.0),  # easy task, large chosen: the cost of always-large, 0
    ("large", False, True, 10, 50, 0.0),  # hard task, large chosen: success at C_large still earns 0
    ("small", False, True, 10, 50, 0.0),  # hard task, small chosen: small fails
    ("large", True, False, 10, 50, 0.0),  # large fails
    ("large", True, True, 30, 30, 1.0),  # equal costs: the cost term is 1
    ("small", 1, 0, 10.5, 20, 1.0),  # 0/1 flags and float costs are fine
    ("LARGE", False, True, 20, 20, 1.0),  # case-insensitive
    ("I think: small. Not large.", True, True, 10, 50, 1.0),  # the first of the two words counts
    ("smaller", True, True, 10, 50, 0.0),  # no whole word: invalid_reward (default 0)
    ("", True, True, 10, 50, 0.0),  # empty completion: invalid_reward
])
def test_route_choice_values(completion: str, ok_s: Any, ok_l: Any, c_s: float, c_l: float, expected: float) -> None:
    r = RouteChoiceReward()
    assert r(completions=[completion], **cols(ok_s, ok_l, c_s, c_l)) == [pytest.approx(expected)]


def test_route_choice_matches_the_boundary_reward_of_the_chosen_arm() -> None:
    r = RouteChoiceReward()
    for ok_s, ok_l, c_s, c_l in [(True, True, 10, 50), (False, True, 5, 9), (True, False, 7, 3), (True, True, 9, 4)]:
        got = r(completions=["small", "large"], success_small=[ok_s] * 2, success_large=[ok_l] * 2,
                cost_small=[c_s] * 2, cost_large=[c_l] * 2)
        value = BoundaryRoutingReward.value
        assert got == [value(ok_s, c_s, c_s, c_l), value(ok_l, c_l, c_s, c_l)]


@pytest.mark.parametrize("completion, ok_s, ok_l, expected", [
    ("large", False, True, 0.5),  # hard task: a successful large choice earns the floor
    ("small", False, True, 0.0),  # ... and a failing small choice nothing
    ("small", True, True, 1.0),  # easy task: small keeps the full reward
    ("large", True, True, 0.5),  # ... large only the floor
    ("large", False, False, 0.0),  # intractable: nothing either way
])
def test_route_choice_success_floor(completion: str, ok_s: bool, ok_l: bool, expected: float) -> None:
    r = RouteChoiceReward(success_floor=0.5)
    assert r(completions=[completion], **cols(ok_s, ok_l, 10, 50)) == [pytest.approx(expected)]


def test_invalid_output_gets_invalid_reward() -> None:
    r = RouteChoiceReward(invalid_reward=-1.0)
    assert r(completions=["medium", "small"], success_small=[True, True], success_large=[True, True],
             cost_small=[1, 1], cost_large=[2, 2]) == [-1.0, 1.0]


def test_message_completions() -> None:
    r = RouteChoiceReward()
    got = r(completions=[[{"role": "assistant", "content": "large"}], [{"role": "assistant", "content": "Small"}]],
            **{k: v * 2 for k, v in cols(False, True, 10, 10).items()})
    assert got == [1.0, 0.0]


def test_missing_and_bad_columns_name_the_column() -> None:
    r = RouteChoiceReward()
    with pytest.raises(ConfigError, match=r"`cost_large` must be a dataset column"):
        r(completions=["small"], success_small=[True], success_large=[True], cost_small=[1])
    with pytest.raises(ConfigError, match=r"`success_small` must be a dataset column"):
        r(completions=["small"], success_large=[True], cost_small=[1], cost_large=[1])
    with pytest.raises(ConfigError, match=r"`success_large` must hold booleans \(or 0/1\), got 'yes' at row 0"):
        r(completions=["small"], **cols(True, "yes", 1, 2))
    with pytest.raises(ConfigError, match=r"`cost_small` must hold finite numbers, got 'x' at row 0"):
        r(completions=["small"], **cols(True, True, "x", 2))
    with pytest.raises(ConfigError, match=r"`completions` must be a list of completions"):
        r(**cols(True, True, 1, 2))


def test_custom_column_names() -> None:
    r = RouteChoiceReward(small_success_column="ok_s", large_success_column="ok_l", small_cost_column="usd_s",
                          large_cost_column="usd_l")
    assert r(completions=["large"], ok_s=[False], ok_l=[True], usd_s=[1.0], usd_l=[1.0]) == [1.0]
    with pytest.raises(ConfigError, match=r"`usd_l` must be a dataset column"):
        r(completions=["large"], ok_s=[False], ok_l=[True], usd_s=[1.0])


@pytest.mark.parametrize("params, match", [
    ({"invalid_reward": float("nan")}, r"`invalid_reward` must be a finite number"),  # NaN would poison advantages
    ({"invalid_reward": True}, r"`invalid_reward` must be a finite number"),  # a bool is not a reward
    ({"success_floor": 1.5}, r"`success_floor` must be a number in \[0, 1\]"),  # above the best reward
    ({"success_floor": -0.1}, r"`success_floor` must be a number in \[0, 1\]"),  # below a failure
])
def test_bad_params(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RouteChoiceReward(**params)


def test_registered() -> None:
    r = rewards.get("route_choice", invalid_reward=-0.5)
    assert isinstance(r, RouteChoiceReward) and r.__name__ == "route_choice" and r.invalid_reward == -0.5
    assert "route_choice" in rewards.names()
