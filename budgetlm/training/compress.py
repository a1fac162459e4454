"""The ``compress`` recipe: shorter answers at (nearly) the same accuracy, with one of three rewards.

- ``method="lcr1"`` — LC-R1 (arXiv 2506.14755): correctness + the group-wise length reward
  ``1 − L_i / max_{j correct} L_j`` + the compress reward (share of thinking spent after the answer
  was first reached, −1 when it never appears in the thinking).  LC-R1 needs a model that writes
  thinking tags; on other models the compress term is −1 for every correct answer (a constant per
  group, so it cancels in GRPO's group-relative advantage and only the length term acts).
- ``method="thinkprune"`` — ThinkPrune (arXiv 2504.01296): correctness paid only when the
  completion finished within ``limit`` tokens (default: half of TRL's ``max_completion_length``).
- ``method="kimi"`` — Kimi 1.5 (arXiv 2501.12599) length penalty over a prompt's samples, added to
  correctness with weight ``length_weight``.

Prompts are the suite's own (no control line).  The final evaluation compares the base and the
trained model with greedy ``sample`` (accuracy and tokens).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from budgetlm.evals.config import StrategySpec
from budgetlm.evals.suites.base import EvalItem
from budgetlm.io import JsonObject
from budgetlm.rewards import KimiLength, LCR1Compress, LCR1Length, RewardFunction, ThinkPrune
from budgetlm.training.base import RECIPES, Recipe, RecipeContext, RecipeParams, base_row, correctness_for

__all__ = ["CompressParams", "CompressRecipe"]


class CompressParams(RecipeParams):
    """Parameters of the ``compress`` recipe."""

    method: Literal["lcr1", "thinkprune", "kimi"] = Field(default="lcr1", description="Which compression reward to train with.")
    limit: int | None = Field(default=None, ge=1, description="ThinkPrune's length limit L in tokens; None: max_completion_length // 2.")
    length_weight: float = Field(default=1.0, ge=0, description="Weight of the length (LC-R1, Kimi) reward next to correctness.")
    compress_weight: float = Field(default=1.0, ge=0, description="Weight of LC-R1's compress reward.")
    grader: str = Field(default="auto", description="Correctness grader; auto: reasoning_gym for reasoning-gym rows, else math.")


class CompressRecipe(Recipe):
    """LC-R1, ThinkPrune or Kimi length rewards on the suite's own prompts."""

    name = "compress"
    Params = CompressParams
    params: CompressParams

    def build_rows(self, items: Sequence[EvalItem], rng: random.Random, ctx: RecipeContext) -> list[JsonObject]:
        return [base_row(item) for item in items]

    def rewards(self, rows: Sequence[JsonObject], ctx: RecipeContext) -> list[RewardFunction]:
        p = self.params
        correct = correctness_for(rows, p.grader)
        if p.method == "thinkprune":
            return [ThinkPrune(limit=p.limit or max(1, ctx.max_completion_length // 2), correctness=correct)]
        if p.method == "kimi":
            return [correct, KimiLength(correctness=correct)]
        return [correct, LCR1Length(correctness=correct), LCR1Compress(correctness=correct)]

    def reward_weights(self) -> list[float] | None:
        p = self.params
        if p.method == "thinkprune":
            return None
        if p.method == "kimi":
            return [1.0, p.length_weight]
        return [1.0, p.length_weight, p.compress_weight]

    def eval_strategies(self, max_tokens: int) -> list[StrategySpec]:
        return [StrategySpec(name="sample", label="greedy", params={"temperature": 0.0, "max_tokens": max_tokens})]


RECIPES.register("compress", CompressRecipe)
