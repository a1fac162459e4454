"""Budget validation and helpers."""

from __future__ import annotations

import math

import pytest

from budgetlm import Budget, ConfigError


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output_tokens": -1}, "output_tokens"),  # negative limit
        ({"usd": float("nan")}, "usd"),  # NaN is not a number
        ({"output_tokens": 1.5}, "whole number"),  # tokens are integers
        ({"tool_calls": math.inf}, "finite"),  # integer units cannot be infinite
        ({"output_tokens": "many"}, "output_tokens"),  # wrong type
        ({"output_tokens": True}, "output_tokens"),  # bool is not a number here
        ({"outputs": 5}, "unknown budget unit"),  # typo in the unit name
    ],
)
def test_invalid_budgets_raise_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Budget(**kwargs)


def test_limits_and_unlimited() -> None:
    assert Budget().is_unlimited()
    b = Budget(output_tokens=100, usd=0.5)
    assert b.limits() == {"output_tokens": 100, "usd": 0.5}
    assert not b.is_unlimited()
    assert Budget(output_tokens=100.0).output_tokens == 100  # whole floats become ints


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("output_tokens=2000,usd=0.01", {"output_tokens": 2000, "usd": 0.01}),  # string form
        ({"flops": 1e12}, {"flops": 1e12}),  # dict form
        (None, {}),  # None is unlimited
        (" output_tokens = 5 ", {"output_tokens": 5}),  # whitespace tolerated
    ],
)
def test_parse(spec: object, expected: dict) -> None:
    assert Budget.parse(spec).limits() == expected


@pytest.mark.parametrize("spec", ["output_tokens", "output_tokens=abc", 42])
def test_parse_errors(spec: object) -> None:
    with pytest.raises(ConfigError):
        Budget.parse(spec)


def test_scaled_and_merged() -> None:
    b = Budget(output_tokens=101, usd=1.0)
    assert b.scaled(0.5).limits() == {"output_tokens": 50, "usd": 0.5}
    m = b.merged(Budget(output_tokens=10, flops=5.0))
    assert m.limits() == {"output_tokens": 10, "usd": 1.0, "flops": 5.0}
    with pytest.raises(ConfigError):
        b.scaled(-1)


# check_limits: the one validator of budget dicts in configs (eval grids, server, route recipe).
@pytest.mark.parametrize(("limits", "match"), [
    ({"output_tokens": 0}, r"`b\.output_tokens` must be > 0, got 0"),  # a limit nothing fits under
    ({"usd": -1.0}, "usd"),  # negative: Budget itself refuses it
    ({"tokenz": 5}, "tokenz"),  # unknown unit, named
])
def test_check_limits_rejects(limits: dict, match: str) -> None:
    from budgetlm.budget import check_limits
    from budgetlm.errors import ConfigError

    with pytest.raises((ValueError, ConfigError), match=match):
        check_limits(limits, "b")


def test_check_limits_passes_valid_limits_through() -> None:
    from budgetlm.budget import check_limits

    assert check_limits({"output_tokens": 10, "usd": 0.5}, "b") == {"output_tokens": 10, "usd": 0.5}
