"""Confidence cascades (ALGORITHMS.md §5; Chow's rule as in arXiv 1805.10982, adapted to LLMs).

Stages run from cheapest to most expensive.  A stage is a (backend, strategy) pair, so it can be a
smaller model or a cheaper strategy on the same model (greedy → majority@8 → a larger model).  All
problems still open at stage ``i`` go to that stage together (one ``solve`` call, batched by the
strategy); each answer gets a confidence ``s`` and is returned when ``s >= δ_i``; the others are
deferred to stage ``i + 1``.  The last stage always answers.  Every stage charges the problem's
own meter, so the cascade as a whole never exceeds the problem's budget; when a later stage cannot
afford anything the best earlier answer is returned with ``stop_reason`` saying why.

Confidence signals (``confidence`` of a stage):

* ``"logprob_mean"`` / ``"logprob_min"`` — mean / min token log-probability of the stage's reply
  under the stage's model (one batched :meth:`~budgetlm.backends.base.Backend.score_batch` call
  over the answered problems, charged as input tokens);
* ``"agreement"`` — the share of the stage's samples that voted for its answer (voting strategies;
  from the ``vote`` entry of the trace);
* ``"verifier"`` — mean log-probability of the reply under a separate ``verifier`` backend.

``seed`` seeds every stage whose strategy samples and was given no seed of its own (the evaluation
runner passes its config's seed).  Thresholds come from ``thresholds`` (one per stage but the last), or from a calibration file
written by :func:`calibrate` (``calibration="cal.json"``).  Without either, every stage answers
(δ = -∞), i.e. the cascade is its first stage.

Calibration from a tolerance ε (§5): run every stage on a calibration split; for stage ``i`` sort the
items by ``s``; let ``α_i(δ)`` be its accuracy on items with ``s >= δ``; then
``δ_i = min{δ : α_i(δ) >= max_δ' α_i(δ') - ε}`` over the observed scores.  The reference is the
stage's own best residual accuracy, so a larger ε never raises a threshold.  The file records the
thresholds, the per-stage answer rate and accuracy on the split, ε, and the stages.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

from pydantic import Field, InstanceOf, field_validator, model_validator

from budgetlm.backends.base import Backend
from budgetlm.errors import ConfigError
from budgetlm.io import JsonValue
from budgetlm.meter import Meter
from budgetlm.strategies.base import (
    STRATEGIES,
    Context,
    Problem,
    Result,
    Strategy,
    StrategyParams,
    get,
    param_names,
)
from budgetlm.usage import Usage

Signal = Literal["logprob_mean", "logprob_min", "agreement", "verifier"]
SIGNALS: tuple[str, ...] = ("logprob_mean", "logprob_min", "agreement", "verifier")
"""Valid confidence signals."""


@dataclass
class Stage:
    """One stage of a cascade."""

    strategy: str = "sample"
    """Registered strategy name."""
    params: dict[str, Any] = field(default_factory=dict)
    """The strategy's parameters."""
    backend: str | None = None
    """Backend spec (``budgetlm.backends.load``); ``None``: the backend given to ``solve``."""
    confidence: str = "logprob_mean"
    """Confidence signal: logprob_mean, logprob_min, agreement or verifier."""
    verifier: str | None = None
    """Backend spec of the verifier (``confidence="verifier"`` only)."""
    label: str | None = None
    """Name in traces and reports (default: strategy and backend)."""

    def __post_init__(self) -> None:
        if self.confidence not in SIGNALS:
            raise ConfigError(f"`confidence` must be one of {', '.join(SIGNALS)}, got {self.confidence!r}")
        if self.confidence == "verifier" and not self.verifier:
            raise ConfigError("`verifier` must be a backend spec when `confidence` is 'verifier', got None")
        STRATEGIES.get(self.strategy)  # unknown names list the registered ones

    @property
    def name(self) -> str:
        return self.label or f"{self.strategy}@{self.backend or 'default'}"

    @classmethod
    def parse(cls, spec: Stage | dict[str, Any]) -> Stage:
        if isinstance(spec, Stage):
            return spec
        if not isinstance(spec, dict):
            raise ConfigError(f"a stage must be a mapping like {{'strategy': 'sample'}}, got {spec!r}")
        unknown = set(spec) - {"strategy", "params", "backend", "confidence", "verifier", "label"}
        if unknown:
            raise ConfigError(f"unknown stage field(s) {sorted(unknown)}; valid: strategy, params, backend, "
                              "confidence, verifier, label")
        return cls(**spec)


def thresholds_for(scores: Sequence[float], correct: Sequence[bool], epsilon: float) -> float:
    """``δ = min{δ : α(δ) >= max_δ' α(δ') - ε}`` over the observed scores (ALGORITHMS.md §5).

    ``α(δ)`` is the accuracy on items with score ``>= δ``.  Raises :class:`ConfigError` when no
    item is correct (nothing to calibrate against).
    """
    if not 0 <= epsilon <= 1:
        raise ConfigError(f"`epsilon` must be in [0, 1] (the accuracy you accept to lose), got {epsilon}")
    if len(scores) != len(correct) or not scores:
        raise ConfigError(f"calibration needs one correctness per score and at least one item, got "
                          f"{len(scores)} scores and {len(correct)} labels")
    if not any(correct):
        raise ConfigError("the calibration split has no correct answer for this stage; thresholds cannot be "
                          "calibrated (use a larger or easier split)")
    pairs = sorted(zip(scores, correct, strict=True), key=lambda x: -x[0])
    # accuracy of the items with score >= each distinct observed score (suffix from the top)
    acc: list[tuple[float, float]] = []
    n = hits = 0
    for i, (s, c) in enumerate(pairs):
        n += 1
        hits += bool(c)
        if i + 1 == len(pairs) or pairs[i + 1][0] != s:
            acc.append((s, hits / n))
    best = max(a for _, a in acc)
    ok = [s for s, a in acc if a >= best - epsilon - 1e-12]
    return min(ok)


class CascadeParams(StrategyParams):
    """Parameters of :class:`Cascade`."""

    stages: list[InstanceOf[Stage] | dict[str, Any]] = Field(default_factory=list, validate_default=True, description=(
        "Stages cheapest first: Stage objects or mappings with strategy, params, backend, confidence, verifier, "
        "label (at least one; the last always answers)."))
    thresholds: list[float] | None = Field(default=None, description=(
        "Confidence threshold of each stage but the last (None: every stage answers, unless `calibration`)."))
    calibration: str | None = Field(default=None, description=(
        "A calibration file written by `budgetlm cascade calibrate`, holding the thresholds (exclusive with "
        "`thresholds`)."))
    seed: int | None = Field(default=None, description=(
        "Seed of every sampling stage given none of its own (None: unseeded)."))

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, v: object) -> object:
        if isinstance(v, list | tuple):
            if not v:
                raise ValueError("`stages` must list at least one stage, e.g. [{'strategy': 'sample'}, "
                                 "{'strategy': 'majority', 'params': {'n': 8}}]")
            for i, s in enumerate(v):
                if not isinstance(s, Stage | Mapping):
                    raise ValueError(f"`stages[{i}]`: a stage must be a mapping like {{'strategy': 'sample'}}, "
                                     f"got {s!r}")
            return [s if isinstance(s, Stage) else dict(s) for s in v]
        return v

    @field_validator("calibration", mode="before")
    @classmethod
    def _path(cls, v: object) -> object:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @model_validator(mode="after")
    def _thresholds(self) -> CascadeParams:
        if self.thresholds is not None and self.calibration is not None:
            raise ValueError(f"`thresholds` must be None when `calibration` is given (the file holds the "
                             f"thresholds), got {self.thresholds}; pass `thresholds` or `calibration`, not both")
        if self.thresholds is not None and len(self.thresholds) != len(self.stages) - 1:
            raise ValueError(f"`thresholds` must have one value per stage but the last ({len(self.stages) - 1}), "
                             f"got {len(self.thresholds)}")
        return self


@STRATEGIES.register("cascade")
class Cascade(Strategy):
    """Answer with the cheapest confident stage; see the module docstring."""

    name = "cascade"
    Params = CascadeParams
    p: CascadeParams
    stages: list[dict[str, Any]]
    """The stages as plain dicts (JSON-ready, as recorded)."""
    thresholds: list[float] | None
    """Thresholds in use (given, loaded from ``calibration``, or set by :func:`calibrate`); ``None``: every stage answers."""
    calibration: str | None
    seed: int | None

    def setup(self) -> None:
        parsed = [Stage.parse(s) for s in self.p.stages]  # unknown fields, signals and strategies are reported here
        if self.calibration is not None:
            thresholds = load_calibration(self.calibration, parsed)
            if len(thresholds) != len(parsed) - 1:
                raise ConfigError(f"`thresholds` must have one value per stage but the last ({len(parsed) - 1}), "
                                  f"got {len(thresholds)}")
            self.thresholds = thresholds
        elif self.thresholds is not None:
            self.thresholds = list(self.thresholds)  # calibrate() may replace them; the params stay as given
        self.stages = [asdict(s) for s in parsed]
        self._stages = parsed
        self._strategies = [get(s.strategy, **_seeded(s, self.seed)) for s in parsed]
        self._backends: dict[str, Backend] = {}

    def params(self) -> dict[str, object]:
        return {"stages": self.stages, "thresholds": self.thresholds, "calibration": self.calibration, "seed": self.seed}

    def _backend(self, spec: str | None, default: Backend) -> Backend:
        if spec is None:
            return default
        if spec not in self._backends:
            from budgetlm.backends import load

            self._backends[spec] = load(spec)
        return self._backends[spec]

    def close(self) -> None:
        """Close the backends the cascade loaded itself."""
        for b in self._backends.values():
            b.close()
        self._backends.clear()

    def confidences(self, stage: Stage, problems: Sequence[Problem], results: Sequence[Result],
                    meters: Sequence[Meter], backend: Backend) -> list[float]:
        """The confidence of each result under ``stage``'s signal (``-inf`` when it cannot be computed)."""
        if stage.confidence == "agreement":
            out = []
            for r in results:
                share = _vote_share(r)
                if share is None:
                    raise ConfigError(f"confidence 'agreement' needs a voting strategy (majority, adaptive, ...), "
                                      f"got stage strategy {stage.strategy!r}")
                out.append(share)
            return out
        scorer = self._backend(stage.verifier, backend) if stage.confidence == "verifier" else backend
        todo = [i for i, r in enumerate(results) if r.text.strip()]
        scored = scorer.score_batch([(problems[i].messages, results[i].text) for i in todo],
                                    meters=[meters[i] for i in todo], on_budget_exhausted="skip") if todo else []
        out = [-math.inf] * len(results)
        for i, sr in zip(todo, scored, strict=True):
            if sr.skipped or not sr.logprobs:
                continue
            out[i] = min(sr.logprobs) if stage.confidence == "logprob_min" else sr.mean
        return out

    def run_stage(self, k: int, problems: Sequence[Problem], meters: Sequence[Meter],
                  backend: Backend, score: bool = True) -> tuple[list[Result], list[float]]:
        """Run stage ``k`` on ``problems`` and score its answers (used by :func:`calibrate` too)."""
        stage = self._stages[k]
        be = self._backend(stage.backend, backend)
        results = self._strategies[k].run(problems, meters, be)
        if k == len(self._stages) - 1 or not score:  # the last stage always answers: no confidence needed
            return results, [math.inf] * len(results)
        return results, self.confidences(stage, problems, results, meters, be)

    @property
    def streams(self) -> bool:
        """The last stage's tokens stream when its strategy streams (an earlier stage's answer is sent at the end)."""
        return self._strategies[-1].streams

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        m = ctx.meter
        final: Result | None = None
        final_stage: int | None = None
        trail: list[dict[str, Any]] = []
        for k, stage in enumerate(self._stages):
            last = k == len(self._stages) - 1
            if m.exhausted():  # nothing left for this stage: keep the best earlier answer
                trail.append({"stage": k, "name": stage.name, "skipped": m.exhausted_reason()})
                break
            before = m.spent("output_tokens")
            be = self._backend(stage.backend, ctx.backend)
            r = await self._strategies[k].solve_one(problem, Context(be, m, ctx.on_delta if last else None))
            if last or self.thresholds is None:
                s = math.inf
            else:
                [s] = await asyncio.to_thread(self.confidences, stage, [problem], [r], [m], be)
            threshold = -math.inf if self.thresholds is None else (math.inf if last else self.thresholds[k])
            answered = last or s >= threshold or self.thresholds is None
            trail.append({"stage": k, "name": stage.name, "answer": r.answer, "confidence": s,
                          "threshold": None if last else threshold, "answered": answered,
                          "output_tokens": int(m.spent("output_tokens") - before),
                          "sequential_tokens": r.sequential_tokens, "stop_reason": r.stop_reason})
            if final is None or r.answer is not None:
                final, final_stage = r, k
            elif r.stop_reason.startswith("budget exhausted"):  # refused mid-stage: the earlier answer stands
                trail[-1]["skipped"] = r.stop_reason
            if answered or r.stop_reason.startswith("budget exhausted"):
                break
        if final is None:
            return Result(problem.id, "", None, Usage.zero(), stop_reason=m.exhausted_reason(),
                          trace=[{"cascade": trail}])
        reason = final.stop_reason
        if any("skipped" in e for e in trail):
            reason = next(e["skipped"] for e in trail if "skipped" in e)
        elif m.stop_reason and reason == "done" and trail[-1].get("stage") != final_stage:
            reason = m.stop_reason
        return Result(problem.id, final.text, final.answer, Usage.zero(), stop_reason=reason,
                      finish_reason=final.finish_reason, truncated=final.truncated,
                      thinking_truncated=final.thinking_truncated,
                      sequential_tokens=sum(e.get("sequential_tokens", 0) for e in trail),
                      trace=[{"cascade": trail, "stage": final_stage}])


class StageCalibration(TypedDict):
    """One stage's line of a cascade calibration (every stage ran on every item of the split)."""

    stage: str
    accuracy: float
    mean_output_tokens: float
    threshold: NotRequired[float]
    """Confidence threshold (every stage but the last)."""
    answer_rate: NotRequired[float]
    """Share of the split at or above ``threshold`` (every stage but the last)."""
    accuracy_answered: NotRequired[float]
    """Accuracy on the items it answers (every stage but the last)."""


class CascadeOnSplit(TypedDict):
    """What the calibrated cascade did on the split, against always using the last stage."""

    accuracy: float
    mean_output_tokens: float
    last_stage_accuracy: float
    last_stage_mean_output_tokens: float
    answered_per_stage: list[float]
    tokens_saved: float


class ThresholdCalibration(TypedDict):
    """What :func:`calibrate` returns and writes (in this key order)."""

    epsilon: float
    thresholds: list[float]
    stages: list[dict[str, JsonValue]]
    stats: list[StageCalibration]
    cascade_on_split: CascadeOnSplit
    n_items: int


def calibrate(cascade: Cascade, problems: Sequence[Problem], grade: Callable[[int, Result], bool], backend: Backend,
              epsilon: float, path: str | Path | None = None, budget: dict[str, Any] | None = None) -> ThresholdCalibration:
    """Calibrate ``cascade``'s thresholds on ``problems`` for tolerance ``epsilon``; write ``path`` if given.

    ``grade(i, result) -> bool`` says whether stage result of problem ``i`` is correct.  Every stage
    runs on every problem (each with a fresh ``budget`` meter), so the file can also report what the
    calibrated cascade would have done on the split: per-stage answer rates, its accuracy and output
    tokens, and the share of tokens saved against always using the last stage.
    """
    from budgetlm.budget import Budget

    if not 0 <= epsilon <= 1:
        raise ConfigError(f"`epsilon` must be in [0, 1] (the accuracy you accept to lose), got {epsilon}")
    if not problems:
        raise ConfigError("`problems` must be a non-empty calibration split, got none")
    stats: list[StageCalibration] = []
    thresholds: list[float] = []
    per_stage: list[tuple[list[bool], list[int], list[float]]] = []
    for k, stage in enumerate(cascade._stages):
        root = Meter(None, name="calibration")
        meters = [root.child(Budget.parse(budget), name=p.id) for p in problems]
        results, conf = cascade.run_stage(k, problems, meters, backend)
        correct = [bool(grade(i, r)) for i, r in enumerate(results)]
        per_stage.append((correct, [int(m.spent("output_tokens")) for m in meters], conf))
        entry: StageCalibration = {"stage": stage.name, "accuracy": sum(correct) / len(correct),
                             "mean_output_tokens": sum(per_stage[-1][1]) / len(results)}
        if k < len(cascade._stages) - 1:
            finite = [s if math.isfinite(s) else -1e300 for s in conf]
            delta = thresholds_for(finite, correct, epsilon)
            if delta <= -1e300:  # only unscorable items are below: they still defer (-inf < any threshold)
                delta = -1e300
            answered = [s >= delta for s in conf]
            entry["threshold"] = delta
            entry["answer_rate"] = sum(answered) / len(answered)
            entry["accuracy_answered"] = (sum(c for c, a in zip(correct, answered, strict=True) if a)
                                          / max(1, sum(answered)))
            thresholds.append(delta)
        stats.append(entry)
    # what the calibrated cascade does on the split: each item stops at its first confident stage
    hits, tokens, stops = 0, 0, [0] * len(per_stage)
    for i in range(len(problems)):
        spent = 0
        for k, (correct, toks, conf) in enumerate(per_stage):
            spent += toks[i]
            if k == len(per_stage) - 1 or conf[i] >= thresholds[k]:
                hits += correct[i]
                stops[k] += 1
                break
        tokens += spent
    last_correct, last_tokens, _ = per_stage[-1]
    mean_tokens, last_mean_tokens = tokens / len(problems), sum(last_tokens) / len(problems)
    summary: CascadeOnSplit = {"accuracy": hits / len(problems), "mean_output_tokens": mean_tokens,
                           "last_stage_accuracy": sum(last_correct) / len(problems),
                           "last_stage_mean_output_tokens": last_mean_tokens,
                           "answered_per_stage": [n / len(problems) for n in stops],
                           "tokens_saved": 1 - mean_tokens / max(1e-9, last_mean_tokens)}
    doc: ThresholdCalibration = {"epsilon": epsilon, "thresholds": thresholds, "stages": cascade.stages,
                                 "stats": stats, "cascade_on_split": summary, "n_items": len(problems)}
    cascade.thresholds = thresholds
    if path is not None:
        Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return doc


def load_calibration(path: str | Path, stages: Sequence[Stage]) -> list[float]:
    """Thresholds from a calibration file, checked against the stages they were calibrated for."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"`calibration` must be a file written by `budgetlm cascade calibrate`, got {str(p)!r} "
                          "(not found)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
        thresholds = [float(t) for t in doc["thresholds"]]
        old = [Stage.parse(s) for s in doc["stages"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"`calibration` file {str(p)!r} is not a cascade calibration ({e})") from e
    if [_identity(s) for s in old] != [_identity(s) for s in stages]:
        k = next((i for i, (a, b) in enumerate(zip(old, stages)) if _identity(a) != _identity(b)), min(len(old), len(stages)))
        diff = (f"stage {k}: {_identity(old[k]) if k < len(old) else 'none'} vs "
                f"{_identity(stages[k]) if k < len(stages) else 'none'}")
        raise ConfigError(f"`calibration` file {str(p)!r} was calibrated for stages {[s.name for s in old]}, got "
                          f"{[s.name for s in stages]} ({diff}); recalibrate for these stages")
    return thresholds


def _vote_share(r: Result) -> float | None:
    """The share of the samples that voted for ``r``'s answer, from the vote entry a voting strategy puts in its
    trace (``-inf`` without an answer); ``None`` when the trace holds no vote."""
    vote = next((e["vote"] for e in reversed(r.trace) if "vote" in e), None)
    if not isinstance(vote, Mapping):
        return None
    if r.answer is None:
        return -math.inf
    counts, samples = vote.get("counts"), vote.get("samples")
    hits = counts.get(r.answer, 0) if isinstance(counts, Mapping) else 0
    return (hits if isinstance(hits, int | float) else 0) / max(1, samples if isinstance(samples, int) else 0)


def _seeded(stage: Stage, seed: int | None) -> dict[str, object]:
    """The stage's parameters, with the cascade's ``seed`` for sampling strategies that were given none."""
    params = dict(stage.params)
    if seed is not None and "seed" not in params and "seed" in param_names(stage.strategy):
        params["seed"] = seed
    return params


def _identity(stage: Stage) -> dict[str, object]:
    """What a threshold depends on: everything about a stage but its sampling seed."""
    d = asdict(stage)
    d["params"] = {k: v for k, v in d["params"].items() if k != "seed"}
    return d
