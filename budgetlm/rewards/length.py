"""Length rewards: LCPO (L1), Kimi 1.5, DAPO overlong, ThinkPrune and cosine scaling (ALGORITHMS.md §9).

Lengths ``n``/``L`` are generated tokens, ``len(completion_ids[i])`` (see
:meth:`~budgetlm.rewards.base.RewardFunction.lengths` for the fallback without ids);
``1[correct]`` comes from a :class:`~budgetlm.rewards.correctness.Correctness` (default: the math
grader on the ``answer`` column).

- LCPO-Exact (L1, arXiv 2503.04697): ``r = 1[correct] − α·|n_target − n_used|``, ``α = 0.0003``;
  ``n_target`` is the per-example column the prompt states ("Think for {N} tokens.").
- LCPO-Max: ``r = 1[correct]·clip(α·(n_target − n_used) + δ, 0, 1)``, ``δ = 0.5``
  ("Think for maximum {N} tokens.").
- Kimi 1.5 length penalty (arXiv 2501.12599), group-wise by prompt id:
  ``λ_i = 0.5 − (len_i − min)/(max − min)``; correct → ``λ_i``, wrong → ``min(0, λ_i)``; all equal
  lengths → 0.  Only the length term: add :class:`Correctness` as another reward function.
- DAPO soft overlong punishment (arXiv 2503.14476): 0 if ``L ≤ Lmax − Lc``;
  ``((Lmax − Lc) − L)/Lc`` if ``L ≤ Lmax``; −1 otherwise.
- ThinkPrune (arXiv 2504.01296): the correctness reward if the completion finished (thinking closed
  and an answer present) within ``limit`` tokens, else 0.
- Cosine length scaling (Demystifying Long CoT, arXiv 2502.03373):
  ``r = r_L + ½(r_0 − r_L)(1 + cos(πL/L_max))``, with ``(r_0, r_L) = (2, 1)`` for correct answers
  and ``(−10, 0)`` for wrong ones (the paper's defaults), and ``−10`` once ``L ≥ L_max`` (the
  generation hit the length cap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from budgetlm.errors import invalid
from budgetlm.rewards.base import RewardBatch, RewardFunction, number_column, positive, positive_int
from budgetlm.rewards.correctness import GradedReward

__all__ = ["CosineLength", "DAPOOverlong", "KimiLength", "LCPOExact", "LCPOMax", "ThinkPrune"]


def _targets(batch: RewardBatch, column: str) -> list[float]:
    return number_column(batch, column, positive=True,
                         fix=f"store the target token count N > 0 stated in each prompt in `{column}`")


@dataclass(eq=False)
class LCPOExact(GradedReward):
    """L1's LCPO-Exact: ``1[correct] − α·|n_target − n_used|`` (highest at the target length).

    >>> from budgetlm.rewards import Correctness
    >>> r = LCPOExact(alpha=0.01, correctness=Correctness("exact"))
    >>> r(completions=["<think>a</think>4", "<think>b</think>5"], completion_ids=[[0] * 30, [0] * 10],
    ...   answer=["4", "4"], target_tokens=[20, 20])  # 1 - 0.01·10 (right, 10 over), 0 - 0.01·10 (wrong)
    [0.9, -0.1]
    """

    default_name: ClassVar[str] = "lcpo_exact"

    alpha: float = 0.0003
    """Penalty per token of distance from the target, α."""
    target_column: str = "target_tokens"
    """Column with each prompt's target length ``n_target`` (tokens, > 0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = positive("alpha", self.alpha, "a positive penalty per token (paper: 0.0003)")

    def score(self, batch: RewardBatch) -> list[float | None]:
        correct = self.correct(batch)
        targets = _targets(batch, self.target_column)
        return [float(c) - self.alpha * abs(t - n) for c, t, n in zip(correct, targets, self.lengths(batch))]


@dataclass(eq=False)
class LCPOMax(GradedReward):
    """L1's LCPO-Max: ``1[correct]·clip(α·(n_target − n_used) + δ, 0, 1)`` (a soft maximum length).

    >>> from budgetlm.rewards import Correctness
    >>> r = LCPOMax(alpha=0.01, correctness=Correctness("exact"))
    >>> r(completions=["<think>a</think>4", "<think>b</think>4"], completion_ids=[[0] * 30, [0] * 10],
    ...   answer=["4", "4"], target_tokens=[20, 20])  # 0.01·(20 − 30) + 0.5, 0.01·(20 − 10) + 0.5
    [0.4, 0.6]
    """

    default_name: ClassVar[str] = "lcpo_max"

    alpha: float = 0.0003
    """Slope per token under/over the target, α."""
    delta: float = 0.5
    """Offset δ: the reward of a correct answer exactly at the target."""
    target_column: str = "target_tokens"
    """Column with each prompt's maximum length ``n_target`` (tokens, > 0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = positive("alpha", self.alpha, "a positive slope per token (paper: 0.0003)")
        self.delta = positive("delta", self.delta, "a positive offset (paper: 0.5)")

    def score(self, batch: RewardBatch) -> list[float | None]:
        correct = self.correct(batch)
        targets = _targets(batch, self.target_column)
        return [float(c) * min(max(self.alpha * (t - n) + self.delta, 0.0), 1.0)
                for c, t, n in zip(correct, targets, self.lengths(batch))]


@dataclass(eq=False)
class KimiLength(GradedReward):
    """Kimi 1.5's group-wise length reward: ``λ_i = 0.5 − (len_i − min)/(max − min)``; wrong → ``min(0, λ_i)``.

    >>> from budgetlm.rewards import Correctness
    >>> r = KimiLength(correctness=Correctness("exact"))
    >>> r(completions=["<think>a</think>4", "<think>b</think>4", "<think>c</think>5"],
    ...   completion_ids=[[0] * 10, [0] * 20, [0] * 30], answer=["4"] * 3, prompt_id=["p"] * 3)
    [0.5, 0.0, -0.5]
    """

    default_name: ClassVar[str] = "kimi_length"
    group_wise: ClassVar[bool] = True

    prompt_id_column: str = "prompt_id"
    """Column whose value groups a prompt's completions."""

    def score(self, batch: RewardBatch) -> list[float | None]:
        groups = self.groups(batch, self.prompt_id_column)
        lengths = self.lengths(batch)
        correct = self.correct(batch)
        out: list[float | None] = [0.0] * len(lengths)
        for rows in groups.values():
            lo, hi = min(lengths[i] for i in rows), max(lengths[i] for i in rows)
            if hi == lo:
                continue  # all equal: 0
            for i in rows:
                lam = 0.5 - (lengths[i] - lo) / (hi - lo)
                out[i] = lam if correct[i] else min(0.0, lam)
        return out


@dataclass(eq=False)
class DAPOOverlong(RewardFunction):
    """DAPO's soft overlong punishment: 0 up to ``Lmax − Lc``, linear to −1 at ``Lmax``, −1 beyond (length only).

    >>> DAPOOverlong(max_length=100, cache_length=20)(completions=["a", "b", "c"],
    ...                                               completion_ids=[[0] * 50, [0] * 90, [0] * 120])
    [0.0, -0.5, -1.0]
    """

    default_name: ClassVar[str] = "dapo_overlong"

    max_length: int
    """``Lmax``: the length from which the punishment is −1 (tokens)."""
    cache_length: int
    """``Lc``: the width of the soft punishment interval before ``Lmax`` (tokens, ≤ ``max_length``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_length = positive_int("max_length", self.max_length, "a positive integer Lmax (tokens)")
        self.cache_length = positive_int("cache_length", self.cache_length, "a positive integer Lc (tokens)")
        if self.cache_length > self.max_length:
            raise invalid("cache_length", f"at most max_length ({self.max_length})", self.cache_length)

    def value(self, length: float) -> float:
        """The punishment of one completion of ``length`` tokens."""
        start = self.max_length - self.cache_length
        if length <= start:
            return 0.0
        if length <= self.max_length:
            return (start - length) / self.cache_length
        return -1.0

    def score(self, batch: RewardBatch) -> list[float | None]:
        return [self.value(n) for n in self.lengths(batch)]


@dataclass(eq=False)
class ThinkPrune(GradedReward):
    """ThinkPrune: correctness if the completion finished within ``limit`` tokens, else 0.

    Finished: thinking closed (not cut off) and a non-empty answer after it.

    >>> from budgetlm.rewards import Correctness
    >>> r = ThinkPrune(limit=20, correctness=Correctness("exact"))
    >>> r(completions=["<think>a</think>4", "<think>b</think>4", "<think>c"],  # in time, too long, unfinished
    ...   completion_ids=[[0] * 10, [0] * 30, [0] * 10], answer=["4"] * 3)
    [1.0, 0.0, 0.0]
    """

    default_name: ClassVar[str] = "think_prune"

    limit: int
    """Length limit L (tokens); longer completions earn 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.limit = positive_int("limit", self.limit, "a positive integer length limit (tokens)")

    def score(self, batch: RewardBatch) -> list[float | None]:
        texts = batch.require_texts()
        correct = self.correct(batch)
        out: list[float | None] = []
        for text, ok, n in zip(texts, correct, self.lengths(batch)):
            sp = self.split(text)
            finished = not sp.truncated and bool(sp.answer.strip()) and n <= self.limit
            out.append(float(ok) if finished else 0.0)
        return out


@dataclass(eq=False)
class CosineLength(GradedReward):
    """Cosine length scaling: shorter correct answers earn more, longer wrong answers are punished less.

    ``r = r_L + ½(r_0 − r_L)(1 + cos(πL/L_max))`` runs from ``r_0`` at ``L = 0`` to ``r_L`` at
    ``L_max``; defaults are the paper's: correct 2.0 → 1.0, wrong −10.0 → 0.0, and ``exceed_reward``
    −10.0 when ``L ≥ L_max``.

    >>> from budgetlm.rewards import Correctness
    >>> r = CosineLength(max_length=100, correctness=Correctness("exact"))
    >>> r(completions=["<think>a</think>4", "<think>b</think>5", "<think>c</think>4"],  # right, wrong, capped
    ...   completion_ids=[[0] * 50, [0] * 50, [0] * 100], answer=["4"] * 3)
    [1.5, -5.0, -10.0]
    """

    default_name: ClassVar[str] = "cosine_length"

    max_length: int
    """``L_max``: the generation cap (tokens); completions this long get ``exceed_reward``."""
    correct_at_zero: float = 2.0
    """``r_0`` for correct answers (reward at length 0)."""
    correct_at_max: float = 1.0
    """``r_L`` for correct answers (reward approached at ``L_max``)."""
    wrong_at_zero: float = -10.0
    """``r_0`` for wrong answers."""
    wrong_at_max: float = 0.0
    """``r_L`` for wrong answers."""
    exceed_reward: float = -10.0
    """Reward once ``L ≥ L_max`` (correct or not)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_length = positive_int("max_length", self.max_length, "a positive integer L_max (tokens)")
        for p in ("correct_at_zero", "correct_at_max", "wrong_at_zero", "wrong_at_max", "exceed_reward"):
            v = getattr(self, p)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise invalid(p, "a finite number", v)

    def value(self, length: float, correct: bool) -> float:
        """The reward of one completion."""
        if length >= self.max_length:
            return float(self.exceed_reward)
        r0, rl = (self.correct_at_zero, self.correct_at_max) if correct else (self.wrong_at_zero, self.wrong_at_max)
        return rl + 0.5 * (r0 - rl) * (1.0 + math.cos(math.pi * length / self.max_length))

    def score(self, batch: RewardBatch) -> list[float | None]:
        return [self.value(n, c) for n, c in zip(self.lengths(batch), self.correct(batch))]
