"""Routers that wrap routers: budget-aware tightening, a score cache, and a learned step policy.

- :class:`BudgetAwareRouter` tightens the threshold as the budget runs out (Budget-Aware Agentic
  Routing, arXiv 2602.21227): with ρ the share of the budget left (the query's ``context["rho"]``),
  the effective threshold is ``t_eff = t + (t_max − t)·(1 − ρ)^γ`` (``t_max`` defaults to one
  more than the largest of the thresholds, 1 and every score seen so far, i.e. "never strong"), so a full budget routes as calibrated and a
  nearly spent one routes everything cheap.  Whether the strong call is *affordable* at all is
  checked separately by whoever runs the route (the controller falls back to the cheap model).
- :class:`CachedRouter` remembers scores by query text: a repeated query is not re-scored.
- :class:`PolicyRouter` routes agent steps with a learned policy: any callable
  ``policy(query) -> probability of the large model`` (e.g. a model trained with the BoPO-style
  boundary-relative reward of the training module); the interface the training issue plugs into.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from budgetlm.backends.base import Backend
from budgetlm.errors import ConfigError, invalid
from budgetlm.io import JsonObject, JsonValue
from budgetlm.meter import Meter
from budgetlm.routing.base import ROUTERS, RouteQuery, Router, decide
from budgetlm.routing.base import get as get_router


class BudgetAwareRouter(Router):
    """Raises the threshold of ``inner`` as the query's remaining budget ρ falls."""

    name = "budget_aware"

    def __init__(self, inner: str | Router | Mapping[str, object] = "logprob", gamma: float = 1.0,
                 t_max: float | None = None) -> None:
        if not gamma > 0:
            raise invalid("gamma", "a positive exponent (1: linear tightening)", gamma)
        self.inner = get_router(inner)
        self.gamma = float(gamma)
        self.t_max = t_max
        self.uses_cheap_model = self.inner.uses_cheap_model
        self.default_threshold = self.inner.default_threshold
        self._seen = 1.0

    def effective(self, thresholds: Sequence[float], rho: float) -> list[float]:
        """The thresholds at budget share ``rho`` left."""
        top = self.t_max if self.t_max is not None else max([*thresholds, self._seen]) + 1.0
        k = (1.0 - min(max(rho, 0.0), 1.0)) ** self.gamma
        return [t + (max(top, t) - t) * k for t in thresholds]

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        return self.inner.score(queries, backend, meters)

    def choose(self, queries: Sequence[RouteQuery], thresholds: Sequence[float], backend: Backend | None = None,
               meters: Sequence[Meter | None] | None = None) -> tuple[list[int], list[float]]:
        ws = self.score(queries, backend, meters)
        self._seen = max([self._seen, *ws])
        ms = list(meters) if meters is not None else [None] * len(queries)
        arms = []
        for q, w, m in zip(queries, ws, ms, strict=True):
            rho = float(q.context.get("rho", m.rho() if m is not None else 1.0))
            arms.append(decide(w, self.effective(thresholds, rho)))
        return arms, ws

    def update(self, query: RouteQuery, arm: int, reward: float) -> None:
        self.inner.update(query, arm, reward)

    def state(self) -> JsonObject:
        return self.inner.state()

    def load_state(self, state: Mapping[str, JsonValue]) -> None:
        self.inner.load_state(state)


class CachedRouter(Router):
    """Caches ``inner``'s scores by query text (LRU, ``size`` entries)."""

    name = "cached"

    def __init__(self, inner: str | Router | Mapping[str, object] = "logprob", size: int = 10_000) -> None:
        if not isinstance(size, int) or size < 1:
            raise invalid("size", "a positive number of cached queries", size)
        self.inner = get_router(inner)
        self.size = size
        self.uses_cheap_model = self.inner.uses_cheap_model
        self.default_threshold = self.inner.default_threshold
        self._cache: OrderedDict[str, float] = OrderedDict()
        self.hits = 0
        """Scores served from the cache."""

    @staticmethod
    def key(q: RouteQuery) -> str:
        """The cache key of a query (a hash of its messages)."""
        return hashlib.sha256(q.text.encode()).hexdigest()

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        keys = [self.key(q) for q in queries]
        ms = list(meters) if meters is not None else [None] * len(queries)
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            fresh = self.inner.score([queries[i] for i in todo], backend, [ms[i] for i in todo])
            for i, w in zip(todo, fresh, strict=True):
                self._cache[keys[i]] = w
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
        self.hits += len(queries) - len(todo)
        out = []
        for k in keys:
            self._cache.move_to_end(k)
            out.append(self._cache[k])
        return out


class PolicyRouter(Router):
    """Routes with a learned policy: ``policy(query) -> P(large model)`` (BoPO-style step policies)."""

    name = "policy"

    def __init__(self, policy: Callable[[RouteQuery], float] | None = None) -> None:
        if policy is None or not callable(policy):
            raise ConfigError("router 'policy' needs `policy`, a callable RouteQuery -> probability of the large model "
                              "(e.g. a step policy trained with budgetlm.training); got "
                              f"{type(policy).__name__}")
        self.policy = policy

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        return [float(self.policy(q)) for q in queries]


for _cls in (BudgetAwareRouter, CachedRouter, PolicyRouter):
    ROUTERS.register(_cls.name, _cls)
