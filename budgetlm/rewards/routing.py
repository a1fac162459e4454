"""Rewards for routing and agent trajectories: boundary-relative cost and DEPO-style dual efficiency.

Both read per-trajectory columns (success, costs, steps, tokens), for example the extra fields a
TRL ``rollout_func`` returns, and ignore the completion text.

- :class:`BoundaryRoutingReward` (ALGORITHMS.md §8, **our choice** until BoPO's exact form, arXiv
  2602.21227, is known): ``r = 1[success]·clip(1 − (C − C_small)/(C_large − C_small), 0, 1)`` and 0 on
  failure, where ``C_small``/``C_large`` are what the always-small/always-large boundary policies
  spent on the task; when ``C_large = C_small`` the cost term is 1.  :func:`boundary_class` names a
  task's class from those policies' successes (easy, hard, intractable).
- :class:`DualEfficiency` (**DEPO-style, our choice**: DEPO, arXiv 2511.15392, adds an efficiency
  bonus for fewer steps and fewer tokens per step to desirable samples of a KTO objective; this form
  is ours): ``bonus = w_s·(1 − steps/max_steps) + w_t·(1 − tokens_per_step/max_step_tokens)``
  clipped to [0, 1], paid only on success (0 on failure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from budgetlm.errors import ConfigError, invalid
from budgetlm.rewards.base import RewardBatch, RewardFunction, flag, number_column, positive

__all__ = ["BoundaryRoutingReward", "DualEfficiency", "boundary_class"]

BoundaryClass = Literal["easy", "hard", "intractable"]


def boundary_class(small_success: bool, large_success: bool) -> BoundaryClass:
    """A task's class: ``easy`` if the small model alone succeeds, ``hard`` if only the large one does,
    ``intractable`` if neither does."""
    if small_success:
        return "easy"
    return "hard" if large_success else "intractable"


@dataclass(eq=False)
class BoundaryRoutingReward(RewardFunction):
    """``1[success]·clip(1 − (C − C_small)/(C_large − C_small), 0, 1)``; 0 on failure."""

    default_name: ClassVar[str] = "boundary_routing"

    cost_column: str = "cost"
    """Column with the trajectory's cost C (any unit, the same for all three cost columns)."""
    small_cost_column: str = "cost_small"
    """Column with what the always-small policy spent on the task."""
    large_cost_column: str = "cost_large"
    """Column with what the always-large policy spent on the task."""
    success_column: str = "success"
    """Column with whether the trajectory succeeded (bool or 0/1)."""

    @staticmethod
    def value(success: bool, cost: float, cost_small: float, cost_large: float) -> float:
        """The reward of one trajectory."""
        if not success:
            return 0.0
        if cost_large == cost_small:
            return 1.0
        return min(max(1.0 - (cost - cost_small) / (cost_large - cost_small), 0.0), 1.0)

    def score(self, batch: RewardBatch) -> list[float | None]:
        ok = [flag(self.success_column, v, i) for i, v in enumerate(batch.column(self.success_column))]
        c = number_column(batch, self.cost_column)
        cs = number_column(batch, self.small_cost_column)
        cl = number_column(batch, self.large_cost_column)
        return [self.value(*row) for row in zip(ok, c, cs, cl)]


@dataclass(eq=False)
class DualEfficiency(RewardFunction):
    """DEPO-style efficiency bonus on success: fewer steps and fewer tokens per step earn more (our choice).

    Steps and tokens come from a ``step_tokens`` column (a list of generated tokens per step) when
    present, else from ``steps`` and ``tokens`` (total generated tokens) columns, tokens per step
    being ``tokens / steps`` (0 for zero steps).
    """

    default_name: ClassVar[str] = "dual_efficiency"

    max_steps: float
    """Steps at which the step term reaches 0."""
    max_step_tokens: float
    """Tokens per step at which the token term reaches 0."""
    step_weight: float = 0.5
    """Weight ``w_s`` of the step (trajectory-level) term."""
    token_weight: float = 0.5
    """Weight ``w_t`` of the tokens-per-step (step-level) term."""
    success_column: str = "success"
    """Column with whether the trajectory succeeded (bool or 0/1)."""
    steps_column: str = "steps"
    """Column with the number of steps (used without ``step_tokens_column``)."""
    tokens_column: str = "tokens"
    """Column with the trajectory's total generated tokens (used without ``step_tokens_column``)."""
    step_tokens_column: str = "step_tokens"
    """Column with a list of generated tokens per step (preferred when present)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_steps = positive("max_steps", self.max_steps)
        self.max_step_tokens = positive("max_step_tokens", self.max_step_tokens)
        for p in ("step_weight", "token_weight"):
            w = getattr(self, p)
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w:
                raise invalid(p, "a non-negative weight", w)
        if self.step_weight + self.token_weight <= 0:
            raise invalid("step_weight/token_weight", "weights with a positive sum",
                          (self.step_weight, self.token_weight))

    def value(self, success: bool, steps: float, tokens_per_step: float) -> float:
        """The bonus of one trajectory."""
        if not success:
            return 0.0
        bonus = (self.step_weight * (1.0 - steps / self.max_steps)
                 + self.token_weight * (1.0 - tokens_per_step / self.max_step_tokens))
        return min(max(bonus, 0.0), 1.0)

    def _steps_and_rates(self, batch: RewardBatch) -> tuple[list[float], list[float]]:
        if batch.has(self.step_tokens_column):
            steps, rates = [], []
            for i, st in enumerate(batch.column(self.step_tokens_column)):
                if isinstance(st, str | bytes) or not hasattr(st, "__len__") or any(
                        isinstance(t, bool) or not isinstance(t, int | float) or t < 0 for t in st):
                    raise ConfigError(f"`{self.step_tokens_column}` must hold lists of non-negative token counts, "
                                      f"got {st!r} at row {i}; store one list of tokens per step per trajectory")
                steps.append(float(len(st)))
                rates.append(sum(st) / len(st) if len(st) else 0.0)
            return steps, rates
        fix = (f"pass `{self.steps_column}` and `{self.tokens_column}` columns, or a "
               f"`{self.step_tokens_column}` column of per-step token counts")
        steps = number_column(batch, self.steps_column, fix=fix)
        tokens = number_column(batch, self.tokens_column, fix=fix)
        for col, vals in ((self.steps_column, steps), (self.tokens_column, tokens)):
            for i, v in enumerate(vals):
                if v < 0:
                    raise ConfigError(f"`{col}` must hold non-negative numbers, got {v!r} at row {i}; {fix}")
        return steps, [t / s if s else 0.0 for s, t in zip(steps, tokens)]

    def score(self, batch: RewardBatch) -> list[float | None]:
        ok = [flag(self.success_column, v, i) for i, v in enumerate(batch.column(self.success_column))]
        steps, rates = self._steps_and_rates(batch)
        return [self.value(*row) for row in zip(ok, steps, rates)]
