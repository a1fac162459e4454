"""e1 Adaptive Effort Control reward (arXiv 2510.27042; ALGORITHMS.md §9, **our choice for the exact form**).

``r = 1[correct] · 1[ℓ ≤ e·T_avg(x)]``: ``ℓ`` is the completion's thinking length (tokens inside
thinking, :meth:`~budgetlm.rewards.base.RewardFunction.thinking_lengths`), ``e ∈ (0, 1]`` the
effort fraction the prompt states (the ``effort`` column), and ``T_avg(x)`` the current average
thinking length for the prompt:

- ``mode="group"``: the mean thinking length of this call's rollouts with the same prompt id;
- ``mode="ema"``: an exponential moving average kept per prompt id in the reward instance.  A
  prompt seen for the first time starts at its group mean; afterwards
  ``T ← decay·T + (1 − decay)·group_mean`` before the reward is computed, so the current rollouts
  count.  The state pickles with the instance; each training process keeps its own copy, the same on
  every process because each scores the gathered whole batch (see :mod:`budgetlm.rewards.base`).

With ``length="completion"`` ``ℓ`` counts every generated token instead (for models that write no
thinking tags, such as the embedded default model).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import ClassVar

from budgetlm.errors import ConfigError, invalid
from budgetlm.rewards.base import RewardBatch, number_column
from budgetlm.rewards.correctness import GradedReward

__all__ = ["EffortReward"]

MODES = ("group", "ema")
"""How ``T_avg`` is estimated."""
LENGTHS = ("thinking", "completion")
"""What ``ℓ`` counts."""


@dataclass(eq=False)
class EffortReward(GradedReward):
    """e1: 1 for a correct answer whose thinking stays within ``e·T_avg`` of its prompt, else 0.

    >>> from budgetlm.rewards import Correctness
    >>> r = EffortReward(correctness=Correctness("exact"))
    >>> r(completions=["<think>one two</think>4", "<think>one two three four five six</think>4"],
    ...   answer=["4"] * 2, effort=[0.5, 0.5], prompt_id=["p"] * 2)  # T_avg = 4 words: 2 <= 0.5·4 < 6
    [1.0, 0.0]
    """

    default_name: ClassVar[str] = "effort"
    group_wise: ClassVar[bool] = True

    effort_column: str = "effort"
    """Column with the effort fraction ``e ∈ (0, 1]`` stated in each prompt."""
    mode: str = "group"
    """``group`` (mean of the current rollouts) or ``ema`` (moving average per prompt id)."""
    ema_decay: float = 0.9
    """Weight of the old average in ``ema`` mode, in [0, 1)."""
    prompt_id_column: str = "prompt_id"
    """Column whose value groups a prompt's completions (and keys the EMA)."""
    length: str = "thinking"
    """What ``ℓ`` counts: ``thinking`` tokens, or all ``completion`` tokens (models without thinking tags)."""
    ema: dict[Hashable, float] = field(default_factory=dict, init=False, repr=False)
    """``T_avg`` per prompt id in ``ema`` mode (state, updated by each call)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise invalid("mode", f"one of {', '.join(MODES)}", self.mode)
        d = self.ema_decay
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0.0 <= d < 1.0:
            raise invalid("ema_decay", "a number in [0, 1) (weight of the previous average)", d)
        if self.length not in LENGTHS:
            raise invalid("length", f"one of {', '.join(LENGTHS)}", self.length,
                          "use 'completion' for models that do not write thinking tags")

    def efforts(self, batch: RewardBatch) -> list[float]:
        """The effort column, checked to lie in (0, 1]."""
        fix = f"store the effort fraction e in (0, 1] stated in each prompt in `{self.effort_column}`"
        values = number_column(batch, self.effort_column, fix=fix)
        for i, e in enumerate(values):
            if not 0.0 < e <= 1.0:
                raise ConfigError(f"`{self.effort_column}` must hold effort fractions in (0, 1], got {e!r} at "
                                  f"row {i}; {fix}")
        return values

    def averages(self, batch: RewardBatch, thinking: list[int]) -> list[float]:
        """``T_avg`` for every row (updates the EMA in ``ema`` mode)."""
        out = [0.0] * len(thinking)
        for pid, rows in self.groups(batch, self.prompt_id_column).items():
            mean = sum(thinking[i] for i in rows) / len(rows)
            if self.mode == "ema":
                old = self.ema.get(pid)
                mean = mean if old is None else self.ema_decay * old + (1.0 - self.ema_decay) * mean
                self.ema[pid] = mean
            for i in rows:
                out[i] = mean
        return out

    def score(self, batch: RewardBatch) -> list[float | None]:
        efforts = self.efforts(batch)
        thinking = self.thinking_lengths(batch) if self.length == "thinking" else self.lengths(batch)
        correct = self.correct(batch)
        t_avg = self.averages(batch, thinking)
        # a relative 1e-9 slack keeps ℓ = e·T_avg inside despite float rounding (0.29·100 < 29)
        return [1.0 if ok and ell <= e * t * (1 + 1e-9) else 0.0
                for ok, ell, e, t in zip(correct, thinking, efforts, t_avg)]
