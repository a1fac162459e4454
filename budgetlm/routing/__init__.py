"""Routing between cheap and expensive models, per query and per agent step (ALGORITHMS.md §8).

``budgetlm.routing.get("logprob")`` gives a registered :class:`Router`; :func:`calibrate_threshold`
sets its threshold to a target share of strong calls.  Routers: ``always_small``, ``always_large``,
``random``, ``logprob``, ``consistency``, ``self_rated`` (:mod:`.signals`), ``embedding``
(:mod:`.classifier`), ``linucb`` (:mod:`.bandit`), ``budget_aware``, ``cached``, ``policy``
(:mod:`.wrappers`), ``lm_policy`` (:mod:`.lm_policy`).  The ``route`` strategy and the agent
:class:`~budgetlm.agents.BudgetController` use them.
"""

from __future__ import annotations

from budgetlm.routing.bandit import LinUCB, bandit_reward
from budgetlm.routing.base import ROUTERS, CheapAnswer, RouteQuery, Router, check_thresholds, decide, get, names
from budgetlm.routing.calibrate import calibrate_threshold, strong_share
from budgetlm.routing.classifier import EmbeddingClassifierRouter, hashing_features, strong_needed_labels
from budgetlm.routing.lm_policy import LMPolicyRouter, parse_choice, route_prompt
from budgetlm.routing.signals import (
    AlwaysLarge,
    AlwaysSmall,
    ConsistencyRouter,
    LogprobRouter,
    RandomRouter,
    SelfRatedRouter,
)
from budgetlm.routing.wrappers import BudgetAwareRouter, CachedRouter, PolicyRouter

__all__ = [
    "ROUTERS", "AlwaysLarge", "AlwaysSmall", "BudgetAwareRouter", "CachedRouter", "CheapAnswer", "ConsistencyRouter",
    "EmbeddingClassifierRouter", "LMPolicyRouter", "LinUCB", "LogprobRouter", "PolicyRouter", "RandomRouter",
    "RouteQuery", "Router", "SelfRatedRouter", "bandit_reward", "calibrate_threshold", "check_thresholds", "decide",
    "get", "hashing_features", "names", "parse_choice", "route_prompt", "strong_needed_labels", "strong_share",
]
