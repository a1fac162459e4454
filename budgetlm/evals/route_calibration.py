"""Calibrating a router on a suite's calibration split (``budgetlm route calibrate``).

RouteLLM (arXiv 2406.18665) calibrates a router's threshold so that a chosen share ``f`` of
queries goes to the strong model: ``t`` is the (1 − f) quantile of the router's scores on
calibration prompts (ALGORITHMS.md §8).  A YAML config names the router, the arms (cheapest
first; default greedy ``sample`` → ``majority@8``), the suite, how many of its first items form
the calibration split, the model and the per-problem budget::

    router: {name: embedding, params: {features: hashing}}
    suite: reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=200&seed=1
    calibration_items: 100
    model: default
    budget: {output_tokens: 2048}
    seed: 1

:func:`calibrate_route_config` runs the cheapest and the strongest arm on the split (their
accuracies go into the file; trainable routers are fitted on the "strong needed" labels, i.e. the
user's own model pair), scores the split with the router, sets the thresholds for ``share`` and
writes a JSON that ``strategies.get("route", calibration=PATH)`` loads: router block, learned
state, thresholds, the realised share and the routed accuracy on the split, suite, seed, versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, TypedDict, cast

from pydantic import Field

from budgetlm.errors import ConfigError, invalid
from budgetlm.evals.calibration import SplitConfig, SplitRecord
from budgetlm.io import JsonValue
from budgetlm.meter import Meter
from budgetlm.routing import RouteQuery, calibrate_threshold, decide, strong_needed_labels, strong_share
from budgetlm.routing import get as get_router
from budgetlm.strategies import Problem
from budgetlm.strategies.route import DEFAULT_ARMS, Arm
from budgetlm.versions import library_versions


class RouteConfig(SplitConfig):
    """What ``budgetlm route calibrate`` reads."""

    what: ClassVar[str] = "route config"

    calibration_items: int = Field(default=100, ge=2, description="Items of the calibration split (the first N; a "
                                                                  "quantile needs several scores).")
    router: str | dict[str, Any] = Field(default="logprob", description="Router name or {name, params} block.")
    arms: list[dict[str, Any]] | None = Field(default=None, description="Arms, cheapest first (default: sample → majority@8).")
    budget: dict[str, float] = Field(default_factory=lambda: cast(dict[str, float], {"output_tokens": 2048}),
                                     description="Per-problem budget while calibrating (majority@8 needs room).")


class RouterBlock(TypedDict):
    """The calibrated router's name and parameters."""

    name: str
    params: dict[str, JsonValue]


class RouteOnSplit(TypedDict):
    """Accuracies and output tokens on the calibration split."""

    n_items: int
    weak_accuracy: float
    strong_accuracy: float
    strong_needed: float
    routed_accuracy: float
    weak_mean_output_tokens: float
    strong_mean_output_tokens: float
    signal_mean_output_tokens: float


class RouteCalibration(SplitRecord):
    """The calibration JSON that :func:`calibrate_route_config` writes (the router's keys below, then the
    split's) and returns, and ``strategies.get("route", calibration=PATH)`` loads."""

    router: RouterBlock
    state: dict[str, JsonValue]
    thresholds: list[float]
    share: float | list[float]
    realised_share: float
    on_split: RouteOnSplit
    scores: list[float]
    arms: list[dict[str, JsonValue]]


def _shares(share: float | list[float], n_arms: int) -> list[float]:
    """Shares of queries at or above each threshold, ascending thresholds → descending shares."""
    ss = [float(share)] if isinstance(share, (int, float)) else [float(s) for s in share]
    if len(ss) != n_arms - 1 or any(not 0 <= s <= 1 for s in ss) or ss != sorted(ss, reverse=True):
        raise invalid("share", f"{n_arms - 1} fraction(s) in [0, 1], descending (share routed to arm k or above)", share)
    return ss


def calibrate_route_config(cfg: RouteConfig, share: float | list[float], out: str | Path | None = None,
                           backend: Any = None) -> RouteCalibration:
    """Calibrate the config's router for strong-call ``share``; write (when ``out``) and return the document."""
    from budgetlm.backends import load
    from budgetlm.evals.suites import get as get_suite

    suite = get_suite(cfg.suite)
    items = suite.items()[: cfg.calibration_items]
    if len(items) < 2:
        raise ConfigError(f"suite {cfg.suite!r} has {len(items)} item(s); calibration needs at least 2 (check its size)")
    arms = [Arm(s, i) for i, s in enumerate(cfg.arms or DEFAULT_ARMS)]
    shares = _shares(share, len(arms))
    router = get_router(cfg.router)
    own = backend is None
    if own:
        backend = load(cfg.model, **({"seed": cfg.seed} if cfg.model.split(":", 1)[0] in ("default", "vllm") else {}))
    try:
        problems = [Problem(id=it.id, messages=it.messages, metadata=it.metadata) for it in items]
        correct: list[list[bool]] = []
        tokens: list[list[int]] = []
        for k in (0, len(arms) - 1):
            res = arms[k].strategy.solve(problems, backend=backend, budget=cfg.budget)
            correct.append([suite.grade(it, None if r.thinking_truncated else r.text).correct for it, r in zip(items, res, strict=True)])
            tokens.append([r.usage.output_tokens for r in res])
        queries = [RouteQuery(messages=list(p.messages), id=p.id) for p in problems]
        fit = getattr(router, "fit", None)
        labels = strong_needed_labels(correct[0], correct[1])
        if callable(fit):
            if len(set(labels)) < 2:
                raise ConfigError(f"cannot train router {router.name!r}: on the split every label is {labels[0]} "
                                  "(the strong arm never/always helps); use more calibration_items or another suite")
            fit(queries, labels, backend)
        meters = [Meter(cfg.budget, name=f"signal:{p.id}") for p in problems]
        scores = router.score(queries, backend, meters)
    finally:
        if own:
            backend.close()
    thresholds = sorted(calibrate_threshold(scores, s) for s in shares)
    picks = [decide(w, thresholds) for w in scores]
    two = [min(p, 1) for p in picks]  # accuracy on the split is known for the two boundary arms
    routed = [correct[1][i] if two[i] else correct[0][i] for i in range(len(items))]
    doc: RouteCalibration = {
        "router": {"name": router.name, "params": router.params()},
        "state": router.state(),
        "thresholds": thresholds,
        "share": shares[0] if len(shares) == 1 else shares,
        "realised_share": strong_share(scores, thresholds[0]),
        "on_split": {
            "n_items": len(items), "weak_accuracy": sum(correct[0]) / len(items),
            "strong_accuracy": sum(correct[1]) / len(items), "strong_needed": sum(labels) / len(items),
            "routed_accuracy": sum(routed) / len(items),
            "weak_mean_output_tokens": sum(tokens[0]) / len(items),
            "strong_mean_output_tokens": sum(tokens[1]) / len(items),
            "signal_mean_output_tokens": sum(m.spent("output_tokens") for m in meters) / len(items),
        },
        "scores": scores,
        "arms": [a.spec() for a in arms],
        "suite": cfg.suite, "calibration_items": len(items), "model": cfg.model, "seed": cfg.seed,
        "budget": cfg.budget, "versions": library_versions(),
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return doc
