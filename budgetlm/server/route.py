"""Per-step routing in the server: each chat call of an agent session goes to a cheap or an expensive backend.

A server config's ``routes`` names routes (``{agents: {cheap: small, expensive: default}}``); model
``<name>/route`` uses route ``name``, and ``budgetlm/route`` the first route when any is configured
(without routes, ``budgetlm/route`` is the per-query ``route`` strategy on one backend).

For every call, :meth:`StepRouter.decide` asks the route's router for a score ``w`` of the
conversation so far and sends the call to the expensive backend iff ``w`` reaches the threshold.  The
default router is :class:`~budgetlm.routing.wrappers.BudgetAwareRouter` (Budget-Aware Agentic Routing,
arXiv 2602.21227) around ``logprob``: with ρ the share of the **session's** budget left (tightest unit,
steps included; the call's own budget outside a session), its threshold rises as
``t_eff = t + (t_max − t)·(1 − ρ)^γ``, so a fresh session routes as calibrated and a nearly spent one
routes cheap.  The BoPO step policy trained by ``budgetlm train`` (recipe ``route``) plugs in as
``router: {name: lm_policy, params: {model: "hf:CHECKPOINT"}}`` (wrap it in ``budget_aware`` to keep
the tightening).  Routers are the registry's (:mod:`budgetlm.routing`).

What the router spends (``logprob`` samples the cheap model once) is charged to the call's meter, so
it counts against the call's, the session's and the key's budgets.  A call forced to be the session's
final answer skips the router and runs cheap (our choice: the final step only has to answer).  Each
decision — backend, score, thresholds, ρ, reason — is returned in ``budgetlm.route`` and stored with
the session's call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field, field_validator, model_validator

from budgetlm.backends.base import Backend, Message
from budgetlm.config import Config
from budgetlm.io import JsonObject, JsonValue
from budgetlm.meter import Meter
from budgetlm.routing import RouteQuery, Router
from budgetlm.routing import get as get_router

__all__ = ["RouteDecision", "RouteSpec", "StepRouter"]

DEFAULT_ROUTER: dict[str, JsonValue] = {"name": "budget_aware", "params": {"inner": "logprob"}}
"""Budget-aware tightening around the cheap model's answer log-probability."""


class RouteSpec(Config):
    """One server route: the two backends and the router between them."""

    cheap: str = Field(description="Backend name (of `backends`) for steps routed cheap.")
    expensive: str = Field(description="Backend name (of `backends`) for steps routed expensive.")
    router: str | dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_ROUTER),
        description="A router of budgetlm.routing: a name or {name, params}; default budget_aware around logprob.")
    threshold: float | None = Field(default=None, description="Score at or above which a step goes expensive; None: "
                                                              "the router's default.")
    strategy: str = Field(default="sample", description="The strategy each step runs on the chosen backend (sample, "
                                                        "or a voting strategy; tools work with these).")
    expensive_strategy: str | None = Field(
        default=None, description="The strategy of steps routed expensive (None: `strategy`), e.g. majority: with "
                                  "one model, the expensive arm can be more samples instead of a larger model.")
    expensive_params: dict[str, Any] = Field(
        default_factory=dict, description="Parameters of `expensive_strategy` (they replace the request's "
                                          "strategy_params on expensive steps), e.g. {n: 4, temperature: 0.7}.")

    @model_validator(mode="after")
    def _expensive(self) -> RouteSpec:
        if self.expensive_params and self.expensive_strategy is None:
            raise ValueError("`expensive_params` needs `expensive_strategy` (the strategy they are for); set it, e.g. "
                             "expensive_strategy: majority")
        return self

    @field_validator("router")
    @classmethod
    def _router(cls, v: str | dict[str, Any]) -> str | dict[str, Any]:
        get_router(v)  # unknown names and parameters are refused here, listing the valid ones
        return v


@dataclass
class RouteDecision:
    """Where one call went and why."""

    route: str
    """The route's name."""
    backend: str
    """The backend that ran the call."""
    arm: str
    """``cheap`` or ``expensive``."""
    score: float | None
    """The router's score (``None``: not asked)."""
    threshold: float
    """The configured threshold."""
    effective_threshold: float | None
    """The threshold after budget-aware tightening at ρ (``None``: the router does not tighten)."""
    rho: float
    """The budget share left when the call started (the session's, else the call's)."""
    reason: str
    """``routed``, or why the router was not asked."""

    def to_json(self) -> JsonObject:
        """JSON-ready fields."""
        return asdict(self)


class StepRouter:
    """One route's router (built once per server; scores run in a worker thread, one at a time)."""

    def __init__(self, name: str, spec: RouteSpec, backends: Mapping[str, Backend]) -> None:
        self.name, self.spec = name, spec
        self.cheap, self.expensive = backends[spec.cheap], backends[spec.expensive]
        self.router: Router = get_router(spec.router)
        self.threshold = float(spec.threshold if spec.threshold is not None else self.router.default_threshold)
        self._lock = threading.Lock()  # routers keep state (seen scores, bandit statistics): one decision at a time

    def _choose(self, messages: Sequence[Message], meter: Meter, rho: float, step: int) -> tuple[int, float]:
        q = RouteQuery(messages=[dict(m) for m in messages])
        q.context.update(rho=rho, step=step, tool_calls=meter.spent("tool_calls"))
        with self._lock:
            arms, scores = self.router.choose([q], [self.threshold], self.cheap, [meter])
        return arms[0], float(scores[0])

    async def decide(self, messages: Sequence[Message], meter: Meter, *, rho: float = 1.0, step: int = 0,
                     final: bool = False) -> RouteDecision:
        """The backend for this call (``final``: the session's forced final answer, sent cheap unasked)."""
        eff = getattr(self.router, "effective", None)
        effective = float(eff([self.threshold], rho)[0]) if callable(eff) else None
        if final:
            return RouteDecision(self.name, self.spec.cheap, "cheap", None, self.threshold, effective, rho,
                                 "forced final answer: sent cheap without asking the router")
        arm, score = await asyncio.to_thread(self._choose, messages, meter, rho, step)
        chosen = "expensive" if arm >= 1 else "cheap"
        return RouteDecision(self.name, self.spec.expensive if arm >= 1 else self.spec.cheap, chosen, score,
                             self.threshold, effective, rho, "routed")

    def close(self) -> None:
        """Release what the router loaded (``lm_policy`` loads its policy model)."""
        close = getattr(self.router, "close", None)
        if callable(close):
            close()
