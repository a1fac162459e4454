"""Budget-aware inference strategies.

Strategies use backends only through the :class:`~budgetlm.backends.base.Backend` protocol and
charge every call to per-problem :class:`~budgetlm.meter.Meter` s (see
:mod:`budgetlm.strategies.base`).  Registered:

* ``sample`` — plain sampling (:mod:`budgetlm.strategies.sample`);
* ``cot`` — chain of thought with budget forcing (:mod:`budgetlm.strategies.cot`);
* ``best_of_n``, ``majority``, ``weighted_majority`` — voting (:mod:`budgetlm.strategies.voting`);
* ``adaptive`` — adaptive majority with budget reallocation (:mod:`budgetlm.strategies.adaptive`);
* ``deepconf`` — confidence-filtered voting, online early stop of low-confidence traces
  (:mod:`budgetlm.strategies.deepconf`, confidences in :mod:`budgetlm.strategies.confidence`);
* ``pdr``, ``sr`` — Parallel-Distill-Refine and Sequential Refinement (:mod:`budgetlm.strategies.pdr`);
* ``bavt`` — budget-aware value tree search (:mod:`budgetlm.strategies.bavt`);
* ``beam``, ``rebase`` — PRM-scored step beam search and reward-balanced search
  (:mod:`budgetlm.strategies.beam`, :mod:`budgetlm.strategies.rebase`), on the tree core of
  :mod:`budgetlm.strategies.tree` (base class in :mod:`budgetlm.strategies.treesearch`) with the value
  scorers of :mod:`budgetlm.strategies.values`;
* ``speculative``, ``speculative_cascade`` — speculative decoding and speculative cascades through a
  backend's draft-and-verify token loop (:mod:`budgetlm.strategies.speculative`);
* ``cascade`` — confidence cascades over (backend, strategy) stages with calibrated thresholds
  (:mod:`budgetlm.strategies.cascade`);
* ``route`` — per-query routing between cheap and expensive arms by a router's score
  (:mod:`budgetlm.strategies.route`, routers in :mod:`budgetlm.routing`);
* ``controlled`` — one sample with a token target or effort fraction written into the prompt, as
  the ``effort`` training recipe trains it (:mod:`budgetlm.strategies.controlled`);
* ``hyper`` — HyPER: a step-wise path pool expanded/reduced online with ρ (:mod:`budgetlm.strategies.hyper`);
* ``agent`` — a tool-using agent loop under a :class:`~budgetlm.agents.BudgetController`, routing
  each step (:mod:`budgetlm.strategies.agent`).
"""

from budgetlm.strategies.adaptive import AdaptiveMajority
from budgetlm.strategies.agent import Agent
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy, get, param_table
from budgetlm.strategies.bavt import BAVT
from budgetlm.strategies.beam import BeamSearch
from budgetlm.strategies.cascade import Cascade, Stage
from budgetlm.strategies.controlled import Controlled
from budgetlm.strategies.cot import BudgetForcing
from budgetlm.strategies.deepconf import DeepConf
from budgetlm.strategies.hyper import Hyper
from budgetlm.strategies.pdr import ParallelDistillRefine, SequentialRefinement
from budgetlm.strategies.rebase import Rebase
from budgetlm.strategies.route import Route
from budgetlm.strategies.sample import Sample
from budgetlm.strategies.speculative import Speculative, SpeculativeCascade
from budgetlm.strategies.voting import BestOfN, Majority, WeightedMajority

__all__ = [
    "BAVT",
    "STRATEGIES",
    "AdaptiveMajority",
    "Agent",
    "BeamSearch",
    "Cascade",
    "Controlled",
    "DeepConf",
    "BestOfN",
    "BudgetForcing",
    "Hyper",
    "Majority",
    "ParallelDistillRefine",
    "Problem",
    "Rebase",
    "Result",
    "Route",
    "Sample",
    "Speculative",
    "SpeculativeCascade",
    "Stage",
    "SequentialRefinement",
    "Strategy",
    "WeightedMajority",
    "get",
    "names",
    "param_table",
]


def names() -> list[str]:
    """Registered strategy names."""
    return STRATEGIES.names()
