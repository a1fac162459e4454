"""Local trace confidence from per-token log-probabilities (DeepConf; Fu et al. 2025, arXiv 2508.15260).

Used by the ``deepconf`` strategy (:mod:`budgetlm.strategies.deepconf`) and, as ``scorer="confidence"``, by
``best_of_n``, ``weighted_majority`` and ``adaptive``.  Everything here is pure arithmetic over what a
:class:`~budgetlm.backends.base.Completion` (or a streamed :class:`~budgetlm.backends.streaming.Delta`) carries.

Token confidence at position ``i`` (paper eq. 2): ``C_i = -(1/k) Σ_{j≤k} log P_i(j)`` over the ``k`` most likely
tokens (the request asks for ``logprobs=k``; high ``C`` = a peaked distribution = confident).  **Fallback (our
choice):** when the backend gives no top-k alternatives (the scripted backend, OpenAI-compatible servers that
drop them) the sampled token's own log-probability is the token confidence (``C_i = log p(sampled)``, also higher
= more confident; the paper's formula with ``k = 1`` would *invert* the order).  The two scales differ, so a
trace uses one of them throughout (top-k when every position has at least two alternatives) and
:func:`mode` says which; thresholds are always calibrated on traces of the same run.

Group confidence (eq. 3): the mean of ``C_i`` over a sliding window of ``window`` tokens (the paper uses 2048
for its long traces; ours are 10-100 tokens, so the window is a parameter, default :data:`DEFAULT_WINDOW`).  A
trace shorter than the window has one group: the whole trace.

Trace measures (:data:`MEASURES`):

* ``"mean"`` — average trace confidence (eq. 1's mean over all tokens);
* ``"lowest"`` — lowest group confidence (the min over windows; the online mode's stop signal);
* ``"bottom10"`` — mean of the lowest 10 % of group confidences (at least one group);
* ``"tail"`` — mean confidence of the last ``window`` tokens.

As a *score* for the voting helpers (whose weights are ``exp(score)``) a measure ``c`` becomes
:func:`log_score`: ``log(c)`` for top-k confidences (positive: weight ``c``, the paper's vote weight) and
``c`` itself for the sampled-logprob fallback (a mean logprob: weight = the geometric-mean token probability).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Annotated

from pydantic import Field, field_validator

from budgetlm.backends.base import Completion
from budgetlm.errors import missing
from budgetlm.strategies.base import StrategyParams

MEASURES = ("mean", "lowest", "bottom10", "tail")
"""Valid trace confidence measures."""
DEFAULT_WINDOW = 8
"""Default group window (tokens): our traces are 10-100 tokens long (the paper's 2048 is for 10k-token traces)."""
DEFAULT_K = 5
"""Default top-k of token confidence (logprobs asked per token)."""
BOTTOM_FRACTION = 0.1
"""Share of the lowest groups averaged by ``"bottom10"``."""

# Typed fields shared by the parameter models of the strategies that accept ``scorer="confidence"``.
Measure = Annotated[str, Field(description="Trace confidence measure (scorer='confidence'): mean, lowest, "
                                           "bottom10 or tail (lowest/tail over `confidence_window` tokens).")]
Window = Annotated[int, Field(ge=1, description="Sliding window (tokens) of group confidence.")]
TopK = Annotated[int, Field(ge=0, le=20, description=(
    "Top-k log-probabilities per token for token confidence C_i = -mean(top-k logprobs); 0: the sampled "
    "token's logprob (also the fallback when the backend returns no alternatives)."))]


def check_measure(v: str, param: str = "confidence_measure") -> str:
    """``v`` when it is a known measure, else a ``ValueError`` naming ``param`` and the valid values."""
    if v not in MEASURES:
        raise ValueError(f"`{param}` must be one of {', '.join(MEASURES)}, got {v!r}")
    return v


class ConfidenceParams(StrategyParams):
    """The trace-confidence parameters (``scorer="confidence"``) of the voting strategies and ``adaptive``.

    Put it *first* among a parameter model's bases, before the model of the strategy's own fields: pydantic
    lists the fields of the later bases first, so these stay the last parameters (as users see them listed).
    """

    confidence_measure: Measure = "lowest"
    confidence_window: Window = DEFAULT_WINDOW
    confidence_k: TopK = DEFAULT_K

    @field_validator("confidence_measure")
    @classmethod
    def _measure(cls, v: str) -> str:
        return check_measure(v)


class ConfidenceScoring:
    """The :class:`ConfidenceParams` fields as attributes of a strategy (set from its validated parameters)."""

    confidence_measure: str
    confidence_window: int
    confidence_k: int


def token_confidence(logprob: float | None, top: dict[int, float] | None, k: int) -> tuple[float, str]:
    """``(C_i, mode)`` of one position: ``-mean`` of the ``k`` best of ``top`` (mode ``"topk"``) when it has at
    least two entries and ``k >= 2``, else the sampled token's ``logprob`` (mode ``"sampled"``).

    >>> token_confidence(-0.1, {1: -0.1, 2: -3.0, 3: -5.0}, 3)
    (2.7, 'topk')
    >>> token_confidence(-0.7, None, 5)
    (-0.7, 'sampled')
    """
    if top is not None and len(top) >= 2 and k >= 2:
        best = sorted(top.values(), reverse=True)[:k]
        return round(-sum(best) / len(best), 12), "topk"
    if logprob is None:
        raise ValueError("`logprob` must be a float when no top-k alternatives are given, got None; "
                         "ask the backend for logprobs (SamplingParams.logprobs >= 0)")
    return float(logprob), "sampled"


def mode(logprobs: Sequence[float] | None, top_logprobs: Sequence[dict[int, float]] | None, k: int) -> str:
    """``"topk"`` when every position has at least two alternatives (and ``k >= 2``), else ``"sampled"``."""
    n = len(logprobs or ()) or len(top_logprobs or ())
    if k >= 2 and top_logprobs is not None and len(top_logprobs) >= n and all(len(t) >= 2 for t in top_logprobs):
        return "topk"
    return "sampled"


def token_confidences(logprobs: Sequence[float] | None, top_logprobs: Sequence[dict[int, float]] | None = None,
                      k: int = DEFAULT_K) -> list[float]:
    """``C_i`` of every position of one trace, all in one :func:`mode`.

    >>> token_confidences([-0.1, -2.0], [{1: -0.1, 2: -3.1}, {1: -1.0, 2: -2.0}], k=2)
    [1.6, 1.5]
    >>> token_confidences([-0.1, -2.0], None)
    [-0.1, -2.0]
    """
    if mode(logprobs, top_logprobs, k) == "topk":
        if top_logprobs is None:
            raise missing('top_logprobs')
        return [token_confidence(None, t, k)[0] for t in top_logprobs]
    return [float(x) for x in (logprobs or ())]


def group_confidences(conf: Sequence[float], window: int = DEFAULT_WINDOW) -> list[float]:
    """Means of ``conf`` over every window of ``window`` consecutive tokens (one group, the whole trace, when the
    trace is shorter; none for an empty trace).

    >>> group_confidences([1.0, 2.0, 3.0, 4.0], 2)
    [1.5, 2.5, 3.5]
    >>> group_confidences([1.0, 3.0], 4)
    [2.0]
    """
    if window < 1:
        raise ValueError(f"`window` must be >= 1, got {window}")
    if not conf:
        return []
    if len(conf) <= window:
        return [sum(conf) / len(conf)]
    out, run = [], sum(conf[:window])
    out.append(run / window)
    for i in range(window, len(conf)):
        run += conf[i] - conf[i - window]
        out.append(run / window)
    return out


def trace_confidence(conf: Sequence[float], measure: str = "lowest", window: int = DEFAULT_WINDOW) -> float | None:
    """The trace measure ``measure`` (:data:`MEASURES`) of token confidences ``conf``; ``None`` for an empty trace.

    >>> c = [2.0, 2.0, 0.5, 0.5, 2.0, 2.0]
    >>> trace_confidence(c, "mean"), trace_confidence(c, "lowest", 2), trace_confidence(c, "tail", 2)
    (1.5, 0.5, 2.0)
    >>> trace_confidence(c, "bottom10", 2)
    0.5
    """
    check_measure(measure, "measure")
    if not conf:
        return None
    if measure == "mean":
        return sum(conf) / len(conf)
    if measure == "tail":
        tail = conf[-window:]
        return sum(tail) / len(tail)
    groups = group_confidences(conf, window)
    if measure == "lowest":
        return min(groups)
    low = sorted(groups)[: max(1, math.ceil(BOTTOM_FRACTION * len(groups)))]
    return sum(low) / len(low)


def completion_confidence(c: Completion, measure: str = "lowest", window: int = DEFAULT_WINDOW,
                          k: int = DEFAULT_K) -> tuple[float | None, str]:
    """``(measure, mode)`` of a :class:`~budgetlm.backends.base.Completion` (``None`` without logprobs)."""
    lps, tops = c.logprobs, c.top_logprobs
    m = mode(lps, tops, k)
    return trace_confidence(token_confidences(lps, tops, k), measure, window), m


def log_score(value: float | None, mode_: str) -> float | None:
    """The voting log-score of a confidence ``value``: ``log(value)`` for top-k confidences (vote weight =
    the confidence, as in the paper), ``value`` for the sampled-logprob fallback (weight = geometric-mean
    probability).

    >>> round(log_score(2.0, "topk"), 4), log_score(-0.5, "sampled")
    (0.6931, -0.5)
    """
    if value is None:
        return None
    return math.log(max(value, 1e-12)) if mode_ == "topk" else value


class RunningConfidence:
    """Online group confidence of one trace as its tokens stream in (the paper's online stop signal).

    :meth:`push` the new tokens' logprobs (and top-k alternatives); :attr:`current` is the mean confidence of the
    last ``window`` tokens once at least ``window`` tokens arrived (``None`` before), :attr:`lowest` the lowest
    such group so far.  The mode is fixed by the first position (top-k when it has two alternatives).
    """

    def __init__(self, window: int = DEFAULT_WINDOW, k: int = DEFAULT_K) -> None:
        self.window, self.k = window, k
        self.mode: str | None = None
        self.tokens = 0
        self.lowest: float | None = None
        self._buf: deque[float] = deque(maxlen=window)
        self._all: list[float] = []

    def push(self, logprobs: Sequence[float] | None, top_logprobs: Sequence[dict[int, float] | None] | None = None
             ) -> float | None:
        """Add tokens; returns the lowest group confidence reached *by these tokens* (``None`` if no full group)."""
        n = len(logprobs) if logprobs is not None else len(top_logprobs or ())
        low: float | None = None
        for j in range(n):
            lp = None if logprobs is None else logprobs[j]
            top = None if top_logprobs is None else top_logprobs[j]
            if self.mode is None:
                self.mode = "topk" if (top is not None and len(top) >= 2 and self.k >= 2) else "sampled"
            c = token_confidence(lp, top, self.k)[0] if self.mode == "topk" else token_confidence(lp, None, 0)[0]
            self._buf.append(c)
            self._all.append(c)
            self.tokens += 1
            if len(self._buf) == self.window:
                g = sum(self._buf) / self.window
                low = g if low is None else min(low, g)
        if low is not None:
            self.lowest = low if self.lowest is None else min(self.lowest, low)
        return low

    @property
    def current(self) -> float | None:
        """Mean confidence of the last ``window`` tokens (``None`` before ``window`` tokens)."""
        return sum(self._buf) / self.window if len(self._buf) == self.window else None

    @property
    def confidences(self) -> list[float]:
        """Every token confidence so far."""
        return list(self._all)
