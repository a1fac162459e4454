"""The ``effort`` recipe: train a model to follow a token target (L1/LCPO) or an effort fraction (e1).

- ``mode="exact"`` — LCPO-Exact (L1, arXiv 2503.04697, eq. 2): each prompt ends with
  ``"Think for {N} tokens."``, ``N`` drawn per example; reward
  ``1[correct] − α·|N − n_used|`` (:class:`~budgetlm.rewards.LCPOExact`).
- ``mode="max"`` — LCPO-Max (eq. 3): ``"Think for maximum {N} tokens."``; reward
  ``1[correct]·clip(α·(N − n_used) + δ, 0, 1)`` (:class:`~budgetlm.rewards.LCPOMax`).
- ``mode="effort"`` — e1 (arXiv 2510.27042): ``"Use {E}% of your usual reasoning effort."``,
  ``E`` drawn per example; reward ``1[correct]·1[ℓ ≤ e·T_avg(x)]`` (:class:`~budgetlm.rewards.EffortReward`).

The prompt line is :func:`budgetlm.strategies.controlled.control_instruction`, which the
``controlled`` strategy writes at inference, so the trained model is asked the way it was trained.

**Deviations.**  L1 draws ``N`` from 100..4000 with ``α = 0.0003``, so a miss of the whole range
costs about 1.2 correct answers.  Small models on short tasks need targets of tens of tokens; the
recipe keeps that trade-off by default, ``α = 1.2 / max_target`` (``alpha`` overrides it).  Targets
are drawn uniformly from ``target_range`` (or from the ``targets`` list); efforts from ``efforts``.
``count="completion"`` (the default) measures every generated token, as L1 does; e1 counts thinking
tokens, so pick ``count="thinking"`` for models that write thinking tags.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from budgetlm.evals.config import StrategySpec
from budgetlm.evals.suites.base import EvalItem
from budgetlm.io import JsonObject
from budgetlm.rewards import EffortReward, LCPOExact, LCPOMax, RewardFunction
from budgetlm.strategies.controlled import with_control
from budgetlm.training.base import RECIPES, Recipe, RecipeContext, RecipeParams, base_row, correctness_for

__all__ = ["EffortParams", "EffortRecipe"]


class EffortParams(RecipeParams):
    """Parameters of the ``effort`` recipe."""

    mode: Literal["exact", "max", "effort"] = Field(default="exact", description="LCPO-Exact, LCPO-Max or e1 effort.")
    target_range: tuple[int, int] = Field(default=(16, 128), description="Token targets are drawn uniformly from this closed range.")
    targets: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1, description="Draw token targets from this list instead of target_range.")
    efforts: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1, description="Effort fractions drawn per example (mode=effort).")
    alpha: float | None = Field(default=None, gt=0, description="LCPO's length weight α; None: 1.2 / the largest target.")
    delta: float = Field(default=0.5, description="LCPO-Max's offset δ.")
    average: Literal["group", "ema"] = Field(default="group", description="e1's T_avg: group mean or per-prompt EMA.")
    count: Literal["completion", "thinking"] = Field(default="completion", description="Length counted: all generated tokens or thinking tokens.")
    grader: str = Field(default="auto", description="Correctness grader; auto: reasoning_gym for reasoning-gym rows, else math.")
    eval_targets: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1, description="Targets (or, for mode=effort, efforts ×100) compared in the final evaluation; None: 3 spread over the range.")

    @field_validator("target_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if lo < 1 or hi < lo:
            raise ValueError(f"`target_range` must be (low, high) with 1 <= low <= high tokens, got {list(v)}; "
                             f"target lengths must be positive")
        return v

    @model_validator(mode="after")
    def _mode(self) -> EffortParams:
        if self.mode != "effort" and self.count == "thinking":
            raise ValueError("`count` must be 'completion' for the LCPO modes (L1 counts every generated token), "
                             "got 'thinking'; use count='thinking' only with mode='effort'")
        if self.mode == "effort" and self.eval_targets and any(t > 100 for t in self.eval_targets):
            raise ValueError(f"`eval_targets` must be effort percentages in 1..100 for mode='effort', got "
                             f"{self.eval_targets}; e.g. [25, 50, 100] evaluates efforts 0.25, 0.5 and 1.0")
        return self

    def max_target(self) -> int:
        """The largest token target that can be drawn."""
        return max(self.targets) if self.targets else self.target_range[1]


class EffortRecipe(Recipe):
    """L1 token targets or e1 effort fractions in the prompt, with the matching reward."""

    name = "effort"
    Params = EffortParams
    params: EffortParams

    def _draw(self, rng: random.Random) -> int | float:
        p = self.params
        if p.mode == "effort":
            return rng.choice(p.efforts)
        return rng.choice(p.targets) if p.targets else rng.randint(*p.target_range)

    def build_rows(self, items: Sequence[EvalItem], rng: random.Random, ctx: RecipeContext) -> list[JsonObject]:
        rows = []
        for item in items:
            row = base_row(item)
            value = self._draw(rng)
            row["prompt"] = with_control(item.messages, self.params.mode, value)
            row["effort" if self.params.mode == "effort" else "target_tokens"] = value
            rows.append(row)
        return rows

    def alpha(self) -> float:
        """α in use (the explicit one, else 1.2 / the largest target)."""
        return self.params.alpha if self.params.alpha is not None else 1.2 / self.params.max_target()

    def rewards(self, rows: Sequence[JsonObject], ctx: RecipeContext) -> list[RewardFunction]:
        p = self.params
        correct = correctness_for(rows, p.grader)
        if p.mode == "exact":
            return [LCPOExact(alpha=self.alpha(), correctness=correct)]
        if p.mode == "max":
            return [LCPOMax(alpha=self.alpha(), delta=p.delta, correctness=correct)]
        return [EffortReward(mode=p.average, length=p.count, correctness=correct)]

    def eval_values(self) -> list[int] | list[float]:
        """The targets (or efforts) of the final evaluation."""
        p = self.params
        if p.mode == "effort":
            return [e / 100 for e in p.eval_targets] if p.eval_targets else sorted(set(p.efforts))
        if p.eval_targets:
            return p.eval_targets
        if p.targets:
            return sorted(set(p.targets))
        lo, hi = p.target_range
        return sorted({lo, (lo + hi) // 2, hi})

    def eval_strategies(self, max_tokens: int) -> list[StrategySpec]:
        p = self.params
        key = "effort" if p.mode == "effort" else "target_tokens"
        return [StrategySpec(name="controlled", label=f"{p.mode}={v}",
                             params={"mode": p.mode, key: v, "temperature": 0.0, "max_tokens": max_tokens})
                for v in self.eval_values()]


RECIPES.register("effort", EffortRecipe)
