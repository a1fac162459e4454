"""Training recipes: GRPO on TRL's ``GRPOTrainer`` (effort control, length compression, routing) and step-level DPO.

Three GRPO recipes (:data:`RECIPES`), each turning a budgetlm suite into a TRL dataset with the rewards of
:mod:`budgetlm.rewards`:

* ``effort`` — L1/LCPO token targets or e1 effort fractions in the prompt (:mod:`.effort`);
* ``compress`` — LC-R1, ThinkPrune or Kimi length rewards (:mod:`.compress`);
* ``route`` — a small/large step policy with the BoPO-style boundary-relative reward on the offline
  agent benchmark (:mod:`.route`).

and one DPO recipe on TRL's ``DPOTrainer``: ``dpo`` — step-level preference pairs from tree searches
of the policy (MCTS-DPO), iterated on-policy (:mod:`.dpo`, :mod:`.preferences`).

Run one from Python or with ``budgetlm train CONFIG.yaml``::

    from budgetlm.training import TrainConfig, run

    cfg = TrainConfig(recipe="effort", suite="reasoning_gym:chain_sum?size=200&split=calibration", max_steps=20)
    outcome = run(cfg, "runs/train-effort")      # trains (resumable), then evaluates trained vs base

``import budgetlm.training`` does not import trl; :func:`train` does.
"""

from __future__ import annotations

from budgetlm.training import compress as _compress  # noqa: F401  (registers the recipe)
from budgetlm.training import dpo as _dpo  # noqa: F401
from budgetlm.training import effort as _effort  # noqa: F401
from budgetlm.training import route as _route  # noqa: F401
from budgetlm.training.base import RECIPES, Recipe, RecipeContext, RecipeParams
from budgetlm.training.config import LoraSpec, TrainConfig, TrainEvalSpec
from budgetlm.training.grpo import TrainOutcome, build_grpo_config, resolve_device, train
from budgetlm.training.pipeline import RunResult, run

__all__ = [
    "RECIPES", "LoraSpec", "Recipe", "RecipeContext", "RecipeParams", "RunResult", "TrainConfig", "TrainEvalSpec", "TrainOutcome",
    "build_grpo_config", "names", "resolve_device", "run", "train",
]


def names() -> list[str]:
    """Registered recipe names."""
    return RECIPES.names()
