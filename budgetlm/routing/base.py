"""Routers: which of N models (ranked by cost) should answer a query or take an agent step.

A :class:`Router` gives every query a score ``w`` = how much it needs a stronger model
(RouteLLM, arXiv 2406.18665: w = P(strong needed | x)); the route is the strong model iff
``w >= t`` (ALGORITHMS.md §8).  With N > 2 models ranked cheapest first, ``N - 1`` ascending
thresholds cut the score axis into N bands: :func:`decide` returns how many thresholds ``w``
reaches.  :func:`calibrate_threshold` sets ``t`` to the (1 − f) quantile of calibration scores so a
share ``f`` of queries goes to the strong model (:mod:`budgetlm.routing.calibrate`).

Routers never import strategies: a router sees a :class:`RouteQuery` (the messages, plus whatever
the cheap model already produced) and, when its signal needs the cheap model (answer logprob,
self-consistency, self-rated difficulty, embeddings), the cheap backend and the query's meter, so
every signal call is charged to the query's budget like any other call.

Routers are registered by name (:data:`ROUTERS`; :func:`get` lists names and parameters).
"""

from __future__ import annotations

import bisect
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from budgetlm.backends.base import Backend, Message
from budgetlm.errors import ConfigError, invalid
from budgetlm.io import JsonObject, JsonValue
from budgetlm.meter import Meter
from budgetlm.registry import Registry


@dataclass
class CheapAnswer:
    """What the cheap model said about a query while a router computed its signal."""

    text: str
    """The answer text (thinking removed)."""
    answer: str | None
    """The extracted answer."""
    mean_logprob: float | None = None
    """Mean token logprob of the answer sample, when asked."""
    votes: list[str | None] = field(default_factory=list)
    """Extracted answers of all samples (self-consistency routers)."""
    finish_reason: str | None = None
    """Finish reason of the answer sample."""


@dataclass
class RouteQuery:
    """One query (or agent step) to route."""

    messages: list[Message]
    """The chat messages the chosen model would answer."""
    id: str = ""
    """The problem id (records, caches)."""
    cheap: CheapAnswer | None = None
    """The cheap model's answer, when a router already produced it (cascade-style signals)."""
    features: np.ndarray | None = None
    """A feature vector (embedding), when computed."""
    context: dict[str, float] = field(default_factory=dict)
    """Extra state for step routers: ``step``, ``max_steps``, ``rho`` (budget left), ``tool_calls``."""

    @property
    def text(self) -> str:
        """The messages as one string (for embeddings and caches)."""
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in self.messages)


class Router(ABC):
    """Scores queries; higher means a stronger (more expensive) model is needed."""

    name: ClassVar[str] = "router"
    uses_cheap_model: bool = False
    """True when the score comes from the cheap model's own output (its answer is then reusable)."""
    default_threshold: float = 0.5
    """The threshold used when none is given or calibrated."""

    @abstractmethod
    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        """One score per query; calls to ``backend`` are charged to ``meters[i]``."""

    def choose(self, queries: Sequence[RouteQuery], thresholds: Sequence[float], backend: Backend | None = None,
               meters: Sequence[Meter | None] | None = None) -> tuple[list[int], list[float]]:
        """Arm index (0 = cheapest) and score per query: :func:`decide` on :meth:`score` by default."""
        ws = self.score(queries, backend, meters)
        return [decide(w, thresholds) for w in ws], ws

    def update(self, query: RouteQuery, arm: int, reward: float) -> None:  # noqa: B027 -- optional hook
        """Learn from the reward of routing ``query`` to ``arm`` (online routers; default: nothing)."""

    def state(self) -> JsonObject:
        """JSON-ready learned state (saved with a calibration; default: none)."""
        return {}

    def load_state(self, state: Mapping[str, JsonValue]) -> None:  # noqa: B027 -- optional hook
        """Restore :meth:`state`."""

    def params(self) -> JsonObject:
        """The router's constructor parameters (recorded with results)."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)
                and isinstance(getattr(self, k), (int, float, str, bool, type(None)))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


ROUTERS: Registry[type[Router]] = Registry("router")
"""Router name → class."""


def get(name: str | Router | Mapping[str, object], **params: Any) -> Router:
    """The router ``name`` with ``params`` (or a ``{"name": ..., "params": {...}}`` block); errors list names."""
    if isinstance(name, Router):
        return name
    if isinstance(name, Mapping):
        block = dict(name)
        block_name, block_params = block.get("name"), block.get("params") or {}
        if not isinstance(block_name, str):
            raise ConfigError(f"a router block needs a `name` ({', '.join(ROUTERS.names())}), got {block!r}")
        if not isinstance(block_params, Mapping):
            raise ConfigError(f"a router block's `params` must be a mapping of constructor parameters, got {block!r}")
        params = {**dict(block_params), **params}
        name = block_name
    cls = ROUTERS.get(str(name))
    valid = [k for k, p in inspect.signature(cls.__init__).parameters.items()
             if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for router {name!r}; "
                          f"valid: {', '.join(valid) or '(none)'}")
    return cls(**params)


def names() -> list[str]:
    """Registered router names."""
    return ROUTERS.names()


def check_thresholds(thresholds: float | Sequence[float], n_arms: int) -> list[float]:
    """``thresholds`` as an ascending list of ``n_arms - 1`` numbers (one float is fine for two arms)."""
    ts = [float(thresholds)] if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
    if len(ts) != n_arms - 1:
        raise invalid("thresholds", f"{n_arms - 1} number(s) for {n_arms} arms (one cut between neighbours)", thresholds)
    if any(math.isnan(t) for t in ts) or ts != sorted(ts):
        raise invalid("thresholds", "ascending numbers (cheapest arm below the first)", thresholds)
    return ts


def decide(score: float, thresholds: Sequence[float]) -> int:
    """The arm index for ``score``: how many of the ascending ``thresholds`` it reaches (``w >= t``)."""
    return bisect.bisect_right(list(thresholds), score)
