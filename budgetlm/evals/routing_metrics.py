"""Metrics for routers that send each prompt to a cheap (weak) or an expensive (strong) model.

Follows RouteLLM (Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data",
arXiv 2406.18665, §2-§5).  A router gives every prompt ``x`` a score ``w = P(strong needed | x)``
and sends it to the strong model iff ``w >= t``.  Everything here is pure numpy over per-item
arrays: ``scores`` (router scores), ``weak_success`` / ``strong_success`` (1/0 or a score in
[0, 1] of each model's answer on the item) and optional per-item costs.

Metrics
-------
* **Threshold calibration** (:func:`calibrate_threshold`): to make a fraction ``f`` of calls go
  to the strong model, take ``t`` as the ``(1 - f)`` quantile of ``w`` on calibration prompts.  We
  only return cut points that are observed scores (or ``inf``), and pick the one whose realised
  share on the calibration set is closest to ``f`` (ties between candidates go to the *smaller*
  share, i.e. the cheaper threshold).  With distinct scores the realised share is within ``1/(2n)``
  of ``f``; tied scores always route together, so a block of ``m`` equal scores may force a
  larger error (up to about ``m/(2n)``).
* **% strong calls** (:func:`strong_share`): share of prompts with ``w >= t``.
* **Routing curve** (:func:`routing_curve`): quality and cost at every distinct cut point, from
  all-weak (share 0, ``t = inf``) to all-strong (share 1, ``t = min w``).  Items with equal
  scores move together.
* **PGR** (:func:`pgr`): performance gap recovered by one operating point,
  ``(q - q_weak) / (q_strong - q_weak)``.
* **APGR** (:func:`apgr`): ``(AUC - AUC_weak) / (AUC_strong - AUC_weak)`` with ``AUC`` the area
  under quality vs. strong-call share over [0, 1].  The two boundary policies are constant lines,
  so ``AUC_weak = q_weak`` and ``AUC_strong = q_strong``.  ``AUC`` is the trapezoid over the
  curve's cut points; linear interpolation between adjacent cut points is exactly the expected
  quality of routing the boundary block of tied items at random, so a constant (or random) router
  scores 0.5 in expectation, an oracle close to 1.  (The paper averages PGR over 10 evenly
  spaced call shares instead; the two agree up to discretisation.)  A zero gap gives ``nan``.
* **CPT(x%)** (:func:`cpt`): call-performance threshold, the smallest strong-call share among the
  curve's cut points whose quality is ``>= q_weak + x/100 · (q_strong - q_weak)`` (no
  interpolation); ``nan`` when the gap is ``<= 0`` or the level is never reached.
* **Cost/success frontier** (:func:`cost_success_frontier`): non-dominated (cost ↓, success ↑)
  points, via :func:`budgetlm.evals.metrics.pareto_frontier`.
* **Budget violations** (:func:`budget_violations`): records flagged ``over_budget``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import numpy as np

from budgetlm.errors import invalid
from budgetlm.evals.metrics import pareto_frontier
from budgetlm.evals.records import EvalRecord
from budgetlm.io import JsonObject
from budgetlm.routing.calibrate import ArrayLike, _threshold, _vector, calibrate_threshold, strong_share

_GAP_TOL = 1e-12

__all__ = [
    "RoutingCurve",
    "apgr",
    "apgr_from",
    "budget_violations",
    "calibrate_threshold",
    "cost_success_frontier",
    "cpt",
    "pgr",
    "routing_curve",
    "strong_share",
    "summarize_router",
]

# ------------------------------------------------------------------------------------------------
# costs


def _cost(param: str, values: ArrayLike | float | None, default: float, n: int) -> np.ndarray:
    """A per-item cost array; ``None`` gives ``default`` and a scalar is broadcast."""
    if values is None:
        return np.full(n, default)
    if np.ndim(values) == 0:
        return np.full(n, float(np.asarray(values, dtype=float)))
    return _vector(param, cast(ArrayLike, values), n)


# ------------------------------------------------------------------------------------------------
# routing curve


@dataclass
class RoutingCurve:
    """Quality and cost of a router at each distinct cut point, from all-weak to all-strong."""

    shares: np.ndarray
    """Fraction of items routed to the strong model per point, ascending from 0 to 1."""
    quality: np.ndarray
    """Mean success per point (``quality[0]`` all-weak, ``quality[-1]`` all-strong)."""
    cost: np.ndarray
    """Mean cost per item per point."""
    thresholds: np.ndarray
    """Threshold per point: ``inf``, then the distinct scores in descending order."""


def routing_curve(
    scores: ArrayLike,
    weak_success: ArrayLike,
    strong_success: ArrayLike,
    weak_cost: ArrayLike | float | None = None,
    strong_cost: ArrayLike | float | None = None,
    *,
    cheap_always_runs: bool = False,
) -> RoutingCurve:
    """Quality and mean cost when items with ``w >= t`` go to the strong model, for every cut point.

    Costs are per item (or a scalar for all); they default to 0 for the weak and 1 for the strong
    model, so ``cost`` is then the strong-call share.  With ``cheap_always_runs`` (a cascade whose
    routing signal needs the weak model's answer) routed items pay the weak cost too.

    >>> c = routing_curve([0.9, 0.1, 0.5, 0.3], weak_success=[1, 0, 1, 0], strong_success=[1, 1, 1, 1])
    >>> c.shares.tolist(), c.quality.tolist()
    ([0.0, 0.25, 0.5, 0.75, 1.0], [0.5, 0.5, 0.5, 0.75, 1.0])
    """
    w = _vector("scores", scores)
    n = w.size
    ws = _vector("weak_success", weak_success, n)
    ss = _vector("strong_success", strong_success, n)
    wc = _cost("weak_cost", weak_cost, 0.0, n)
    sc = _cost("strong_cost", strong_cost, 1.0, n)
    routed_cost = sc + wc if cheap_always_runs else sc

    order = np.argsort(-w, kind="stable")  # descending scores
    w_sorted = w[order]
    # index just past each block of equal scores: the cut points
    ends = np.flatnonzero(np.append(w_sorted[1:] != w_sorted[:-1], True)) + 1
    d_quality = np.concatenate([[0.0], np.cumsum((ss - ws)[order])])
    d_cost = np.concatenate([[0.0], np.cumsum((routed_cost - wc)[order])])
    idx = np.concatenate([[0], ends])
    return RoutingCurve(
        shares=idx / n,
        quality=ws.mean() + d_quality[idx] / n,
        cost=wc.mean() + d_cost[idx] / n,
        thresholds=np.concatenate([[math.inf], w_sorted[ends - 1]]),
    )


def _auc(curve: RoutingCurve) -> float:
    x, y = np.asarray(curve.shares, dtype=float), np.asarray(curve.quality, dtype=float)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _ends(curve: RoutingCurve, weak_quality: float | None, strong_quality: float | None) -> tuple[float, float]:
    if len(curve.shares) < 2:
        raise invalid(
            "curve", "a routing curve with at least 2 points", len(curve.shares), "build it with routing_curve"
        )
    wq = float(curve.quality[0]) if weak_quality is None else float(weak_quality)
    sq = float(curve.quality[-1]) if strong_quality is None else float(strong_quality)
    return wq, sq


# ------------------------------------------------------------------------------------------------
# gap-recovered metrics


def pgr(quality: float, weak_quality: float, strong_quality: float) -> float:
    """Performance gap recovered ``(q - q_weak) / (q_strong - q_weak)``; ``nan`` for a zero gap.

    >>> round(pgr(0.7, weak_quality=0.5, strong_quality=0.9), 3)  # half the gap recovered
    0.5
    """
    gap = float(strong_quality) - float(weak_quality)
    if math.isnan(gap) or abs(gap) <= _GAP_TOL:
        return math.nan
    return (float(quality) - float(weak_quality)) / gap


def apgr(curve: RoutingCurve, weak_quality: float | None = None, strong_quality: float | None = None) -> float:
    """Average performance gap recovered: ``(AUC - q_weak) / (q_strong - q_weak)``.

    ``q_weak`` / ``q_strong`` default to the curve's all-weak and all-strong points (the mean weak
    and strong success).  ``nan`` when the gap is zero.

    >>> apgr(routing_curve([0.9, 0.1, 0.5, 0.3], [1, 0, 1, 0], [1, 1, 1, 1]))
    0.25
    """
    wq, sq = _ends(curve, weak_quality, strong_quality)
    return pgr(_auc(curve), wq, sq)


def apgr_from(scores: ArrayLike, weak_success: ArrayLike, strong_success: ArrayLike) -> float:
    """:func:`apgr` of :func:`routing_curve` of the per-item arrays.

    >>> apgr_from([0.9, 0.1, 0.5, 0.3], weak_success=[1, 0, 1, 0], strong_success=[1, 1, 1, 1])
    0.25
    """
    return apgr(routing_curve(scores, weak_success, strong_success))


def cpt(
    curve: RoutingCurve,
    weak_quality: float | None = None,
    strong_quality: float | None = None,
    pct: float = 50.0,
) -> float:
    """Smallest strong-call share on the curve recovering ``pct`` % of the weak→strong gap.

    ``nan`` when the gap is ``<= 0`` or no point reaches the level (with the default end
    qualities the all-strong point always reaches 100 %).

    >>> cpt(routing_curve([0.9, 0.1, 0.5, 0.3], [1, 0, 1, 0], [1, 1, 1, 1]), pct=50)  # share of strong calls
    0.75
    """
    p = float(pct)
    if not (math.isfinite(p) and p >= 0.0):
        raise invalid("pct", "a finite percentage >= 0", pct, "pass e.g. pct=50 for CPT(50%)")
    wq, sq = _ends(curve, weak_quality, strong_quality)
    gap = sq - wq
    if math.isnan(gap) or gap <= _GAP_TOL:
        return math.nan
    target = wq + p / 100.0 * gap
    hits = np.flatnonzero(np.asarray(curve.quality, dtype=float) >= target - _GAP_TOL * max(1.0, abs(target)))
    return float(curve.shares[hits[0]]) if hits.size else math.nan


# ------------------------------------------------------------------------------------------------
# frontier and budget adherence


def cost_success_frontier(points: Iterable[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The ``(label, cost, success)`` points not dominated in (cost ↓, success ↑), sorted by cost.

    Same rules as :func:`budgetlm.evals.metrics.pareto_frontier`: identical points are all kept,
    NaN points dropped; ties in cost sort by success descending, then label.

    >>> cost_success_frontier([("a", 1.0, 0.5), ("b", 2.0, 0.4), ("c", 3.0, 0.8)])
    [('a', 1.0, 0.5), ('c', 3.0, 0.8)]
    """
    pts = [(str(label), float(c), float(s)) for label, c, s in points]
    keep = pareto_frontier((i, c, s) for i, (_, c, s) in enumerate(pts))
    return sorted((pts[i] for i in keep), key=lambda p: (p[1], -p[2], p[0]))


def budget_violations(records: Iterable[EvalRecord | Mapping[str, object]]) -> int:
    """How many records (``EvalRecord`` or dicts) have ``over_budget`` true.

    >>> budget_violations([{"over_budget": True}, {"over_budget": False}])
    1
    """
    count = 0
    for r in records:
        flag = r.get("over_budget", False) if isinstance(r, Mapping) else getattr(r, "over_budget", False)
        count += bool(flag)
    return count


# ------------------------------------------------------------------------------------------------
# summary


def _json_num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarize_router(
    name: str,
    scores: ArrayLike,
    weak_success: ArrayLike,
    strong_success: ArrayLike,
    weak_cost: ArrayLike | float | None = None,
    strong_cost: ArrayLike | float | None = None,
    *,
    target_share: float | None = None,
    threshold: float | None = None,
    cheap_always_runs: bool = False,
) -> JsonObject:
    """A JSON-ready summary of one router: APGR, CPT(50%), CPT(80%) and one operating point.

    Pass ``threshold``, or ``target_share`` to calibrate one on these same scores (in-sample), to
    add the realised ``share``, ``quality``, ``cost`` and ``pgr`` there.  Non-finite numbers
    (``nan`` APGR, ``inf`` threshold) are written as ``None``.

    >>> # a perfect router: the two items the weak model fails score highest, so half the calls reach full quality
    >>> s = summarize_router("logprob", scores=[0.9, 0.1, 0.6, 0.3], weak_success=[0, 1, 0, 1],
    ...                      strong_success=[1, 1, 1, 1], target_share=0.5)
    >>> s["weak_quality"], s["strong_quality"], s["apgr"], s["share"], s["quality"]
    (0.5, 1.0, 0.75, 0.5, 1.0)
    """
    if target_share is not None and threshold is not None:
        raise invalid("threshold", "None when target_share is given", threshold, "pass one of the two")
    curve = routing_curve(
        scores, weak_success, strong_success, weak_cost, strong_cost, cheap_always_runs=cheap_always_runs
    )
    wq, sq = float(curve.quality[0]), float(curve.quality[-1])
    out: JsonObject = {
        "name": str(name),
        "n": int(np.asarray(scores).size),
        "weak_quality": wq,
        "strong_quality": sq,
        "apgr": _json_num(apgr(curve)),
        "cpt50": _json_num(cpt(curve, pct=50.0)),
        "cpt80": _json_num(cpt(curve, pct=80.0)),
    }
    if target_share is not None:
        threshold = calibrate_threshold(scores, target_share)
        out["target_share"] = float(target_share)
    if threshold is not None:
        t = _threshold(threshold)
        w = np.asarray(scores, dtype=float)
        # the operating point is the curve point with the same set of routed items
        k = int(np.searchsorted(curve.shares, float(np.mean(w >= t)) - 0.5 / w.size))
        q = float(curve.quality[k])
        out.update(
            threshold=_json_num(t),
            share=float(curve.shares[k]),
            quality=q,
            cost=float(curve.cost[k]),
            pgr=_json_num(pgr(q, wq, sq)),
        )
    return out
