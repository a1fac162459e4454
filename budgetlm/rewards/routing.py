"""Rewards for routing and agent trajectories: boundary-relative cost, DEPO-style dual efficiency, route choices.

The first two read per-trajectory columns (success, costs, steps, tokens), for example the extra
fields a TRL ``rollout_func`` returns, and ignore the completion text; :class:`RouteChoiceReward`
reads the arm the completion names and the boundary policies' outcomes from columns.

- :class:`BoundaryRoutingReward` (ALGORITHMS.md §8, **our choice** until BoPO's exact form, arXiv
  2602.21227, is known): ``r = 1[success]·clip(1 − (C − C_small)/(C_large − C_small), 0, 1)`` and 0 on
  failure, where ``C_small``/``C_large`` are what the always-small/always-large boundary policies
  spent on the task; when ``C_large = C_small`` the cost term is 1.  When the large policy happens to
  be the cheaper one on a task (it may finish in fewer steps), the two boundaries swap: the cost is
  placed between ``min`` and ``max`` of them, so a cheaper trajectory never earns less.
  :func:`boundary_class` names a
  task's class from those policies' successes (easy, hard, intractable).
- :class:`DualEfficiency` (**DEPO-style, our choice**: DEPO, arXiv 2511.15392, adds an efficiency
  bonus for fewer steps and fewer tokens per step to desirable samples of a KTO objective; this form
  is ours): ``bonus = w_s·(1 − steps/max_steps) + w_t·(1 − tokens_per_step/max_step_tokens)``
  clipped to [0, 1], paid only on success (0 on failure).
- :class:`RouteChoiceReward` (**a one-step, bandit approximation of BoPO, our choice**): the policy's
  completion names the arm of one agent step (the first whole word ``small`` or ``large``), and the
  choice is credited with the outcome of the boundary policy that always takes that arm on the task:
  ``r = BoundaryRoutingReward.value(success_arm, C_arm, C_small, C_large)``, lifted to
  ``floor + (1 − floor)·r`` on success when ``success_floor > 0``.  BoPO rolls out whole mixed
  trajectories; crediting one step with a pure boundary trajectory ignores what the other steps
  would choose.  With ``success_floor = 0`` (the plain boundary reward) ``large`` earns 0 whenever
  ``C_large ≠ C_small``, as much as a failure, so on hard tasks both arms earn 0 and only easy tasks
  carry signal (toward ``small``); a positive floor pays a successful ``large`` on a hard task.  An
  unparseable completion earns ``invalid_reward``.  The completion is parsed with
  :func:`budgetlm.routing.lm_policy.parse_choice`, the parser the ``lm_policy`` router uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import ClassVar, Literal

from budgetlm.errors import ConfigError, invalid
from budgetlm.rewards.base import RewardBatch, RewardFunction, flag, number_column, positive
from budgetlm.routing.lm_policy import parse_choice

__all__ = ["BoundaryRoutingReward", "DualEfficiency", "RouteChoiceReward", "boundary_class"]

BoundaryClass = Literal["easy", "hard", "intractable"]


def boundary_class(small_success: bool, large_success: bool) -> BoundaryClass:
    """A task's class: ``easy`` if the small model alone succeeds, ``hard`` if only the large one does,
    ``intractable`` if neither does."""
    if small_success:
        return "easy"
    return "hard" if large_success else "intractable"


@dataclass(eq=False)
class BoundaryRoutingReward(RewardFunction):
    """``1[success]·clip(1 − (C − C_small)/(C_large − C_small), 0, 1)``; 0 on failure.

    >>> BoundaryRoutingReward()(completions=["a", "b", "c"], cost=[10, 25, 40], cost_small=[10] * 3,
    ...                         cost_large=[40] * 3, success=[True, True, False])
    [1.0, 0.5, 0.0]
    """

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
        lo, hi = min(cost_small, cost_large), max(cost_small, cost_large)
        if hi == lo:
            return 1.0
        return min(max(1.0 - (cost - lo) / (hi - lo), 0.0), 1.0)

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

    >>> DualEfficiency(max_steps=10, max_step_tokens=100)(completions=["a", "b"], success=[True, False],
    ...                                                   steps=[2, 2], tokens=[100, 100])
    [0.65, 0.0]
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
                if isinstance(st, str | bytes) or not isinstance(st, Sized) or not isinstance(st, Iterable) or any(
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


@dataclass(eq=False)
class RouteChoiceReward(RewardFunction):
    """The boundary-relative reward of the arm the completion names (one-step BoPO approximation, our choice).

    ``small`` → ``value(success_small, C_small, C_small, C_large)``; ``large`` →
    ``value(success_large, C_large, C_small, C_large)`` (see :meth:`BoundaryRoutingReward.value`),
    each lifted to ``success_floor + (1 − success_floor)·value`` on success; no ``small``/``large``
    word → :attr:`invalid_reward`.

    >>> RouteChoiceReward()(completions=["small", "large", "either"], success_small=[True] * 3,
    ...                     success_large=[True] * 3, cost_small=[1] * 3, cost_large=[5] * 3)
    [1.0, 0.0, 0.0]
    """

    default_name: ClassVar[str] = "route_choice"

    invalid_reward: float = 0.0
    """Reward of a completion that names neither ``small`` nor ``large``."""
    success_floor: float = 0.0
    """Least reward of a successful choice, in [0, 1] (0: the plain boundary-relative reward)."""
    small_success_column: str = "success_small"
    """Column with whether the always-small policy solved the task (bool or 0/1)."""
    large_success_column: str = "success_large"
    """Column with whether the always-large policy solved the task (bool or 0/1)."""
    small_cost_column: str = "cost_small"
    """Column with what the always-small policy spent on the task (any unit, the same for both)."""
    large_cost_column: str = "cost_large"
    """Column with what the always-large policy spent on the task."""

    def __post_init__(self) -> None:
        super().__post_init__()
        v = self.invalid_reward
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise invalid("invalid_reward", "a finite number (the reward of an unparseable choice)", v)
        self.invalid_reward = float(v)
        f = self.success_floor
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 <= f <= 1:
            raise invalid("success_floor", "a number in [0, 1] (0: the plain boundary-relative reward)", f)
        self.success_floor = float(f)

    def value(self, arm: str | None, success_small: bool, success_large: bool, cost_small: float,
              cost_large: float) -> float:
        """The reward of choosing ``arm`` (``small``, ``large`` or None for unparseable) on one task."""
        if arm is None:
            return self.invalid_reward
        ok, cost = (success_small, cost_small) if arm == "small" else (success_large, cost_large)
        if not ok:
            return 0.0
        return self.success_floor + (1.0 - self.success_floor) * BoundaryRoutingReward.value(
            ok, cost, cost_small, cost_large)

    def score(self, batch: RewardBatch) -> list[float | None]:
        texts = batch.require_texts()
        ok_s = [flag(self.small_success_column, v, i) for i, v in enumerate(batch.column(self.small_success_column))]
        ok_l = [flag(self.large_success_column, v, i) for i, v in enumerate(batch.column(self.large_success_column))]
        cs = number_column(batch, self.small_cost_column)
        cl = number_column(batch, self.large_cost_column)
        return [self.value(parse_choice(t), s, large, c_s, c_l) for t, s, large, c_s, c_l in zip(texts, ok_s, ok_l, cs, cl)]
