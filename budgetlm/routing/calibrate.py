"""Threshold calibration for routers (RouteLLM, arXiv 2406.18665; ALGORITHMS.md §8).

A router routes a query to the strong model iff its score ``w >= t``.  To send a share ``f`` of
queries to the strong model, ``t`` is set to the (1 − f) quantile of the scores on calibration
prompts: :func:`calibrate_threshold` picks, among ``inf`` (share 0) and the distinct calibration
scores, the one whose realised share is closest to ``f``.  Equal scores always route together, so
with distinct scores the realised share is within 1/(2n) of ``f``, and with ties it is the closest
reachable share.  :func:`strong_share` is the share a threshold realises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from budgetlm.errors import invalid

ArrayLike = Sequence[float] | Sequence[bool] | np.ndarray


def _vector(param: str, values: ArrayLike, n: int | None = None) -> np.ndarray:
    """``values`` as a finite, non-empty 1-D float array (of length ``n`` when given)."""
    try:
        x = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise invalid(param, "a sequence of numbers", type(values).__name__, "pass one number per item") from None
    if x.ndim != 1:
        raise invalid(param, "a 1-D sequence of per-item numbers", f"shape {x.shape}", "pass one number per item")
    if x.size == 0:
        raise invalid(param, "non-empty", "an empty sequence", "pass at least one item")
    if n is not None and x.size != n:
        raise invalid(param, f"as long as scores ({n} items)", f"{x.size} items", "pass one value per item")
    if not np.all(np.isfinite(x)):
        raise invalid(param, "finite numbers", "NaN or inf values", "drop or fix the non-finite items")
    return x


def _share(param: str, share: float) -> float:
    s = float(share)
    if not 0.0 <= s <= 1.0:  # also rejects NaN
        raise invalid(param, "in [0, 1]", share, "pass the fraction of calls to send to the strong model")
    return s


def _threshold(threshold: float) -> float:
    t = float(threshold)
    if math.isnan(t):
        raise invalid("threshold", "a number (inf routes nothing to the strong model)", threshold)
    return t


def calibrate_threshold(scores: ArrayLike, share: float) -> float:
    """The threshold ``t`` whose realised share ``mean(scores >= t)`` is closest to ``share``.

    Candidates are ``inf`` (share 0) and every distinct score (the share of scores ``>=`` it), so
    ``share=0`` gives ``inf`` and ``share=1`` gives ``min(scores)``.  Equal scores always route
    together; between two equally close candidates the smaller share (higher ``t``) wins.
    """
    s = _share("share", share)
    w = _vector("scores", scores)
    uniq = np.unique(w)  # ascending
    realised = (w.size - np.searchsorted(np.sort(w), uniq, side="left")) / w.size  # descending
    cands = np.concatenate([[math.inf], uniq[::-1]])
    shares = np.concatenate([[0.0], realised[::-1]])  # ascending with the candidates
    best = int(np.argmin(np.abs(shares - s)))  # argmin keeps the first (smallest share) on ties
    return float(cands[best])


def strong_share(scores: ArrayLike, threshold: float) -> float:
    """Fraction of ``scores`` routed to the strong model, i.e. with ``w >= threshold``."""
    return float(np.mean(_vector("scores", scores) >= _threshold(threshold)))
