"""Budget-aware inference strategies.

Strategies use backends only through the :class:`~budgetlm.backends.base.Backend` protocol and
charge every call to per-problem :class:`~budgetlm.meter.Meter` s (see
:mod:`budgetlm.strategies.base`).  Registered: ``sample`` (plain sampling); budget forcing,
voting, PDR, tree search and cascades are added by later releases.
"""

from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy, get
from budgetlm.strategies.sample import Sample

__all__ = ["STRATEGIES", "Problem", "Result", "Sample", "Strategy", "get", "names"]


def names() -> list[str]:
    """Registered strategy names."""
    return STRATEGIES.names()
