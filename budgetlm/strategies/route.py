"""Per-query routing between cheap and expensive arms (RouteLLM, arXiv 2406.18665; ALGORITHMS.md §8).

An *arm* is a strategy on a model: ``{"strategy": "sample", "params": {...}, "model": "default"}``,
listed cheapest first (default: greedy ``sample`` then ``majority`` over 8 samples on the same
model, the "cheap" and "expensive" policies of the routing benchmark).  For every query the router
gives a score ``w`` (:mod:`budgetlm.routing`); the query goes to arm ``decide(w, thresholds)``,
i.e. the strong arm iff ``w >= t`` for two arms.  Thresholds come from ``threshold``, from a
calibration JSON written by ``budgetlm route calibrate`` (threshold for a target share of strong
calls, plus the router's learned state), or from the router's default.

Budget: everything — the router's signal calls and the chosen arm — is charged to the query's
meter (the signal to a child meter ``router``, the arm to a child ``arm:<label>``).  Before an arm
runs, its worst case (``n × max_tokens`` from its parameters) must be affordable; if not, the query
falls back to the most expensive arm that is (recorded as ``downgraded``), so routing never plans
a call the budget cannot pay for.  Routers whose signal *is* the cheap model's answer (``logprob``,
``consistency``) hand it over: a query routed to arm 0 reuses it instead of calling again
(``reuse_cheap``).  Each query is its own program on the shared engine (routing, then its arm), so
queries routed to different arms run concurrently.  Online routers (``linucb``) learn after each
query from the arm's answer when
the problem carries a gold answer in ``metadata["gold"]`` (reward mixes success and normalised
cost, §8); otherwise they do not learn.

With ``cache=True`` a query whose messages were answered before (in this strategy object) is
answered from the cache at no cost (``details["cached"]``).

Every result records ``details["route"]``: arm index and label, score, thresholds, whether the
cheap answer was reused, and ``expensive_calls`` (1 when an arm above the cheapest ran).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from budgetlm.answers import normalize_answer
from budgetlm.backends import load as load_backend
from budgetlm.backends.base import Backend
from budgetlm.errors import ConfigError, invalid
from budgetlm.io import JsonObject
from budgetlm.meter import Meter
from budgetlm.routing import RouteQuery, Router, bandit_reward, check_thresholds
from budgetlm.routing import get as get_router
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.strategies.base import get as get_strategy
from budgetlm.usage import Usage

DEFAULT_ARMS: list[JsonObject] = [
    {"label": "small", "strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 256}},
    {"label": "large", "strategy": "majority", "params": {"n": 8, "temperature": 0.7, "max_tokens": 256}},
]
"""Cheap = one greedy sample; expensive = majority over 8 samples, on the same model."""


def check_arm(spec: object, index: int) -> None:
    """Raise a :class:`ConfigError` naming ``arms[index]`` unless ``spec`` is an arm mapping (strategy, params, model, label)."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("strategy"), str):
        raise invalid(f"arms[{index}]", "a dict with a `strategy` name and optional `params`, `model`, `label`", spec)
    unknown = set(spec) - {"strategy", "params", "model", "label"}
    if unknown:
        raise invalid(f"arms[{index}]", "keys among strategy, params, model, label", sorted(unknown))


def check_arms(specs: Sequence[Any]) -> None:
    """Raise a :class:`ConfigError` naming ``arms`` unless ``specs`` are at least two arms with distinct labels."""
    if len(specs) < 2:
        raise invalid("arms", "at least two arms, cheapest first", len(specs))
    for i, spec in enumerate(specs):
        check_arm(spec, i)
    labels = [spec.get("label") or f"{spec['strategy']}#{i}" for i, spec in enumerate(specs)]
    if len(set(labels)) != len(labels):
        raise invalid("arms", "arms with distinct labels", labels)


class Arm:
    """One routable arm: a configured strategy on a backend (``None``: the strategy's backend)."""

    def __init__(self, spec: Mapping[str, Any], index: int) -> None:
        check_arm(spec, index)
        self.params = dict(spec.get("params") or {})
        self.strategy = get_strategy(spec["strategy"], **self.params)
        self.model: str | None = spec.get("model")
        self.label: str = spec.get("label") or f"{spec['strategy']}#{index}"
        n = int(getattr(self.strategy, "n", None) or self.params.get("n") or 1)  # n=None (budget-sized) counts as 1
        self.worst_tokens = (n, int(getattr(self.strategy, "max_tokens", None) or self.params.get("max_tokens") or 512))
        """``(samples, max_tokens)`` of one call: what must be affordable before the arm runs."""

    def spec(self) -> JsonObject:
        return {"label": self.label, "strategy": self.strategy.name, "params": self.params, "model": self.model}


def load_route_calibration(path: str | Path) -> dict[str, Any]:
    """A calibration JSON written by ``budgetlm route calibrate`` (thresholds, router, state)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`calibration` must be a route calibration JSON file, got {str(path)!r} (not found); "
                          "write one with `budgetlm route calibrate CONFIG --share F --out FILE`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"`calibration` file {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "thresholds" not in data:
        raise ConfigError(f"`calibration` file {str(p)!r} has no `thresholds`; rewrite it with `budgetlm route calibrate`")
    return data


class RouteParams(StrategyParams):
    """Parameters of :class:`Route`."""

    router: str | dict[str, Any] | Router = Field(default="logprob", description=(
        "The router: a registered name, a {name, params} block, or a Router object (a calibration names its own)."))
    arms: list[dict[str, Any]] | None = Field(default=None, description=(
        "Arms cheapest first, each {strategy, params, model, label} (None: the calibration's arms, else "
        "DEFAULT_ARMS)."))
    threshold: float | list[float] | None = Field(default=None, description=(
        "Router cut(s) between neighbouring arms, ascending (None: the calibration's, else the router's default)."))
    calibration: str | None = Field(default=None, description=(
        "A JSON file written by `budgetlm route calibrate` (router, state, thresholds; exclusive with `threshold`)."))
    reuse_cheap: bool = Field(default=True, description=(
        "Answer a query routed to arm 0 with the cheap answer the router already produced, if any."))
    cost_weight: float = Field(default=0.3, ge=0, le=1, description=(
        "Weight of cost against success in the reward of online routers (0: success only, 1: cost only)."))
    cache: bool = Field(default=False, description="Answer repeated queries from this strategy's earlier answers.")

    @field_validator("arms", mode="before")
    @classmethod
    def _arms(cls, v: object) -> object:
        if isinstance(v, list | tuple):
            check_arms(v)
            return [dict(a) for a in v]
        return v

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, v: object) -> object:
        if v is not None and not isinstance(v, int | float | list | tuple):
            raise ValueError(f"`threshold` must be a number or a list of ascending numbers, got {v!r}")
        return v

    @field_validator("calibration", mode="before")
    @classmethod
    def _path(cls, v: object) -> object:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @model_validator(mode="after")
    def _exclusive(self) -> RouteParams:
        if self.threshold is not None and self.calibration:
            raise ValueError(f"`threshold` must be None when `calibration` is given (the calibration file holds "
                             f"thresholds), got {self.threshold}; give either `threshold` or `calibration`, not both")
        return self


class Route(Strategy):
    """Route each query to one of several arms by a router's score and thresholds."""

    name = "route"
    Params = RouteParams
    p: RouteParams
    router: str | dict[str, Any]
    """The router that routes, as recorded (a Router object is recorded by its name)."""
    threshold: float | list[float] | None
    calibration: str | None
    reuse_cheap: bool
    cost_weight: float
    cache: bool

    def setup(self) -> None:
        cal: dict[str, Any] = load_route_calibration(self.calibration) if self.calibration else {}
        specs = self.p.arms if self.p.arms is not None else (cal.get("arms") or DEFAULT_ARMS)  # a calibration names its arms
        if self.p.arms is None:
            check_arms(specs)
        self.arms = [Arm(s, i) for i, s in enumerate(specs)]
        used = cal.get("router") or self.p.router  # what actually routes (a calibration names the router it calibrated)
        self._router = get_router(used)
        if cal.get("state"):
            self._router.load_state(cal["state"])
        raw = self.threshold if self.threshold is not None else cal.get("thresholds", None)
        if raw is None:
            raw = [self._router.default_threshold] * (len(self.arms) - 1)
        self._thresholds = check_thresholds(raw, len(self.arms))
        self.router = used if isinstance(used, str | dict) else self._router.name
        self._backends: dict[str, Backend] = {}
        self._answers: dict[str, Result] = {}

    def params(self) -> dict[str, object]:
        return {"router": self.router, "arms": [a.spec() for a in self.arms], "threshold": self.threshold,
                "calibration": self.calibration, "reuse_cheap": self.reuse_cheap, "thresholds": self._thresholds}

    @property
    def thresholds(self) -> list[float]:
        """The thresholds in use (ascending, one fewer than arms)."""
        return list(self._thresholds)

    def _backend(self, arm: Arm, default: Backend) -> Backend:
        if arm.model is None:
            return default
        if arm.model not in self._backends:
            self._backends[arm.model] = load_backend(arm.model)
        return self._backends[arm.model]

    def close(self) -> None:
        """Close the backends this strategy loaded itself (arms with their own ``model``)."""
        for b in self._backends.values():
            b.close()
        self._backends.clear()

    def _affordable(self, m: Meter, arm: Arm) -> bool:
        n, max_tokens = arm.worst_tokens
        return m.can_afford(tokens=max_tokens, n=n)

    @property
    def streams(self) -> bool:
        """A query routed to a streaming arm streams its tokens (a reused cheap answer is sent at the end)."""
        return any(a.strategy.streams for a in self.arms)

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        key = json.dumps(problem.messages, sort_keys=True, default=str)
        if self.cache and key in self._answers:
            hit = self._answers[key]
            return Result(problem.id, hit.text, hit.answer, Usage.zero(), finish_reason=hit.finish_reason,
                          truncated=hit.truncated, trace=[{"cached": True, "from": hit.problem_id}],
                          details={**hit.details, "cached": True, "expensive_calls": 0})
        r = await self._route_one(problem, ctx)
        if self.cache:
            self._answers.setdefault(key, r)
        return r

    async def _route_one(self, problem: Problem, ctx: Context) -> Result:
        m = ctx.meter
        cheap_be = self._backend(self.arms[0], ctx.backend)
        query = RouteQuery(messages=list(problem.messages), id=problem.id, context={"rho": m.rho()})
        signal_meter = m.child(name="router")
        chosen, scores = await asyncio.to_thread(self._router.choose, [query], self._thresholds, cheap_be,
                                                 [signal_meter])
        arm = chosen[0]  # arm 0 always runs: its strategy clamps to what is left or reports the exhausted budget
        while arm > 0 and not self._affordable(m, self.arms[arm]):
            arm -= 1
        r: Result | None = None
        if arm == 0 and self.reuse_cheap and self._router.uses_cheap_model and query.cheap is not None:
            c = query.cheap
            r = Result(problem.id, c.text, c.answer, Usage.zero(), finish_reason=c.finish_reason,
                       truncated=c.finish_reason == "length", trace=[{"reused_cheap_answer": True}])
        if r is None:
            spec = self.arms[arm]
            r = await spec.strategy.solve_one(problem, Context(self._backend(spec, ctx.backend),
                                                             m.child(name=f"arm:{spec.label}"), ctx.on_delta))
        sig = signal_meter.total()
        r.sequential_tokens += sig.output_tokens
        route: JsonObject = {"arm": arm, "label": self.arms[arm].label, "score": scores[0], "thresholds": self._thresholds,
                 "chosen_by_router": chosen[0], "downgraded": arm != chosen[0],
                 "reused_cheap": bool(r.trace and r.trace[0].get("reused_cheap_answer")),
                 "signal_output_tokens": sig.output_tokens}
        r.details = {**r.details, "route": route, "expensive_calls": int(arm > 0)}
        r.trace = [{"route": route}, *r.trace]
        if r.stop_reason == "done" and m.exhausted():
            r.stop_reason = m.stop_reason or r.stop_reason
        self._learn(problem, query, arm, r)
        return r

    def _learn(self, p: Problem, q: RouteQuery, arm: int, r: Result) -> None:
        gold = p.metadata.get("gold") if isinstance(p.metadata, dict) else None
        if gold is None or type(self._router).update is Router.update:
            return
        ok = float(r.answer is not None and normalize_answer(r.answer) == normalize_answer(str(gold)))
        self._router.update(q, arm, bandit_reward(ok, arm / (len(self.arms) - 1), self.cost_weight))


STRATEGIES.register(Route.name, Route)
