"""Calibrating a confidence cascade on a suite's calibration split (``budgetlm cascade calibrate``).

A YAML config names the stages, the suite, how many of its items form the calibration split (the
first ``calibration_items``; the rest are left for testing), the model and the per-problem budget::

    stages:
      - {strategy: sample, params: {temperature: 0.0, max_tokens: 96}, confidence: logprob_mean}
      - {strategy: majority, params: {n: 8, max_tokens: 96, temperature: 0.7}}
    suite: reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=200&seed=1
    calibration_items: 100
    model: default
    budget: {output_tokens: 1024}
    seed: 1

:func:`calibrate_config` runs every stage on the calibration split, sets the thresholds for the
tolerance ε (ALGORITHMS.md §5) and writes the calibration JSON that
``strategies.get("cascade", stages=..., calibration=PATH)`` loads; the file also records the suite,
the split, the seed and library versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self, TypedDict, cast

from pydantic import ConfigDict, Field, field_validator

from budgetlm.budget import Budget
from budgetlm.config import Config
from budgetlm.errors import ConfigError
from budgetlm.io import JsonValue
from budgetlm.strategies import Problem
from budgetlm.strategies.cascade import Cascade, Stage, ThresholdCalibration, calibrate
from budgetlm.versions import library_versions


class SplitConfig(Config):
    """Fields shared by the calibration configs: the split, the model, the budget and the seed."""

    model_config = ConfigDict(extra="forbid")
    what: ClassVar[str] = "calibration config"
    """How errors name the file."""

    suite: str | dict[str, Any] = Field(description="Suite spec whose first items form the calibration split.")
    calibration_items: int = Field(default=100, ge=1, description="Items of the calibration split (the first N).")
    model: str = Field(default="default", description="Backend spec of parts without their own backend.")
    budget: dict[str, float] = Field(default_factory=lambda: cast(dict[str, float], {"output_tokens": 1024}),
                                     description="Per-problem budget while calibrating.")
    seed: int = Field(default=0, description="Seed for the engine and sampling parts.")

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: dict[str, float]) -> dict[str, float]:
        Budget.of(v)
        return v

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read and validate a YAML config file."""
        return cls.from_yaml(path, cls.what)


class CascadeConfig(SplitConfig):
    """What ``budgetlm cascade calibrate`` reads."""

    what: ClassVar[str] = "cascade config"

    stages: list[dict[str, Any]] = Field(description="Cascade stages, cheapest first (see `budgetlm.strategies.Stage`).")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(v) < 2:
            raise ValueError(f"`stages` must list at least two stages to calibrate, got {len(v)}")
        for s in v:
            Stage.parse(s)
        return v


class SplitRecord(TypedDict):
    """What a calibration document records about its split (a :class:`SplitConfig`) and the run."""

    suite: str | dict[str, JsonValue]
    calibration_items: int
    model: str
    seed: int
    budget: dict[str, float]
    versions: dict[str, str]


class CascadeCalibration(ThresholdCalibration, SplitRecord):
    """The calibration JSON that :func:`calibrate_config` writes (the threshold document's keys, then the
    split's) and returns, and ``strategies.get("cascade", calibration=PATH)`` loads:
    :func:`~budgetlm.strategies.cascade.calibrate`'s document and the split it ran on."""


def calibrate_config(cfg: CascadeConfig, epsilon: float, out: str | Path) -> CascadeCalibration:
    """Calibrate the config's cascade for tolerance ``epsilon``; write and return the calibration document."""
    from budgetlm.backends import BackendSpec, load
    from budgetlm.evals.suites import get as get_suite

    suite = get_suite(cfg.suite)
    items = suite.items()[: cfg.calibration_items]
    if not items:
        raise ConfigError(f"suite {cfg.suite!r} has no items; check its size")
    cascade = Cascade(stages=cfg.stages, seed=cfg.seed)
    problems = [Problem(id=it.id, messages=it.messages, metadata=it.metadata) for it in items]
    parsed = BackendSpec.parse(cfg.model)
    backend = load(parsed, **({"seed": cfg.seed} if parsed.seeded else {}))
    try:
        doc = calibrate(cascade, problems, lambda i, r: suite.grade(items[i], r.text).correct, backend, epsilon,
                        budget=cfg.budget)
    finally:
        cascade.close()
        backend.close()
    cal: CascadeCalibration = {
        "epsilon": doc["epsilon"], "thresholds": doc["thresholds"], "stages": doc["stages"], "stats": doc["stats"],
        "cascade_on_split": doc["cascade_on_split"], "n_items": doc["n_items"],
        "suite": cfg.suite, "calibration_items": len(items), "model": cfg.model, "seed": cfg.seed,
        "budget": cfg.budget, "versions": library_versions()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(cal, indent=2, default=str) + "\n", encoding="utf-8")
    return cal
