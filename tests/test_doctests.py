"""The ``>>>`` examples in docstrings (every reward, every metric) run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import budgetlm.rewards

REWARD_MODULES = sorted(f"budgetlm.rewards.{m.name}" for m in pkgutil.iter_modules(budgetlm.rewards.__path__))
MODULES = [
    *REWARD_MODULES,
    "budgetlm.evals.metrics",
    "budgetlm.evals.routing_metrics",
    "budgetlm.costs",
    "budgetlm.strategies.confidence",
    "budgetlm.strategies.deepconf",
    "budgetlm.tools",
    "budgetlm.training.preferences",
]
NO_EXAMPLES = {"budgetlm.rewards.__init__", "budgetlm.rewards.base"}
"""Modules without a reward or metric of their own (registry and helpers): examples optional."""


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
    if name not in NO_EXAMPLES:
        assert result.attempted > 0, f"{name} has no >>> examples"


def _has_example(obj: object) -> bool:
    import inspect

    return ">>>" in (inspect.getdoc(obj) or "")


def test_every_registered_reward_has_an_example() -> None:
    from budgetlm.rewards import REWARDS

    missing = [name for name in REWARDS.names() if not _has_example(REWARDS.get(name))]
    assert not missing, f"rewards without a >>> example: {missing}"


@pytest.mark.parametrize("name", ["budgetlm.evals.metrics", "budgetlm.evals.routing_metrics"])
def test_every_public_metric_function_has_an_example(name: str) -> None:
    import inspect

    module = importlib.import_module(name)
    functions = [f for n, f in inspect.getmembers(module, inspect.isfunction)
                 if f.__module__ == name and not n.startswith("_")]
    assert functions
    missing = [f.__name__ for f in functions if not _has_example(f)]
    assert not missing, f"{name}: functions without a >>> example: {missing}"
