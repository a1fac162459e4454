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
(``reuse_cheap``).  Online routers (``linucb``) learn after each batch from the arms' answers when
the problem carries a gold answer in ``metadata["gold"]`` (reward mixes success and normalised
cost, §8); otherwise they do not learn.

With ``cache=True`` a query whose messages were answered before (in this strategy object) is
answered from the cache at no cost (``details["cached"]``).

Every result records ``details["route"]``: arm index and label, score, thresholds, whether the
cheap answer was reused, and ``expensive_calls`` (1 when an arm above the cheapest ran).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from budgetlm.answers import normalize_answer
from budgetlm.backends import load as load_backend
from budgetlm.backends.base import Backend
from budgetlm.errors import ConfigError, invalid
from budgetlm.meter import Meter
from budgetlm.routing import RouteQuery, Router, bandit_reward, check_thresholds
from budgetlm.routing import get as get_router
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy
from budgetlm.strategies.base import get as get_strategy
from budgetlm.usage import Usage

DEFAULT_ARMS: list[dict[str, Any]] = [
    {"label": "small", "strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 256}},
    {"label": "large", "strategy": "majority", "params": {"n": 8, "temperature": 0.7, "max_tokens": 256}},
]
"""Cheap = one greedy sample; expensive = majority over 8 samples, on the same model."""


class Arm:
    """One routable arm: a configured strategy on a backend (``None``: the strategy's backend)."""

    def __init__(self, spec: Mapping[str, Any], index: int) -> None:
        if not isinstance(spec, Mapping) or not isinstance(spec.get("strategy"), str):
            raise invalid(f"arms[{index}]", "a dict with a `strategy` name and optional `params`, `model`, `label`", spec)
        unknown = set(spec) - {"strategy", "params", "model", "label"}
        if unknown:
            raise invalid(f"arms[{index}]", "keys among strategy, params, model, label", sorted(unknown))
        self.params = dict(spec.get("params") or {})
        self.strategy = get_strategy(spec["strategy"], **self.params)
        self.model: str | None = spec.get("model")
        self.label: str = spec.get("label") or f"{spec['strategy']}#{index}"
        n = int(getattr(self.strategy, "n", None) or self.params.get("n") or 1)  # n=None (budget-sized) counts as 1
        self.worst_tokens = (n, int(getattr(self.strategy, "max_tokens", None) or self.params.get("max_tokens") or 512))
        """``(samples, max_tokens)`` of one call: what must be affordable before the arm runs."""

    def spec(self) -> dict[str, Any]:
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


class Route(Strategy):
    """Route each query to one of several arms by a router's score and thresholds."""

    name = "route"

    def __init__(self, router: str | Mapping[str, Any] | Router = "logprob", arms: Sequence[Mapping[str, Any]] | None = None,
                 threshold: float | list[float] | None = None, calibration: str | None = None,
                 reuse_cheap: bool = True, cost_weight: float = 0.3, cache: bool = False) -> None:
        cal: dict[str, Any] = load_route_calibration(calibration) if calibration else {}
        specs = list(arms) if arms is not None else (cal.get("arms") or DEFAULT_ARMS)  # a calibration names its arms
        if len(specs) < 2:
            raise invalid("arms", "at least two arms, cheapest first", len(specs))
        self.arms = [Arm(s, i) for i, s in enumerate(specs)]
        labels = [a.label for a in self.arms]
        if len(set(labels)) != len(labels):
            raise invalid("arms", "arms with distinct labels", labels)
        self._router = get_router(cal.get("router") or router)  # a calibration names the router it calibrated
        if cal.get("state"):
            self._router.load_state(cal["state"])
        if threshold is not None and calibration:
            raise ConfigError("give either `threshold` or `calibration`, not both; the calibration file holds thresholds")
        raw = threshold if threshold is not None else cal.get("thresholds", None)
        if raw is None:
            raw = [self._router.default_threshold] * (len(self.arms) - 1)
        self._thresholds = check_thresholds(raw, len(self.arms))
        used = cal.get("router") or router  # what actually routes (a calibration names its router)
        self.router = used if isinstance(used, (str, dict)) else self._router.name
        self.threshold = threshold
        self.calibration = calibration
        self.reuse_cheap = reuse_cheap
        self.cost_weight = cost_weight
        self.cache = cache
        self._backends: dict[str, Backend] = {}
        self._answers: dict[str, Result] = {}

    def params(self) -> dict[str, Any]:
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

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        if not self.cache:
            return self._run(problems, meters, backend)
        keys = [json.dumps(p.messages, sort_keys=True, default=str) for p in problems]
        todo = [i for i, k in enumerate(keys) if k not in self._answers]
        first = {}  # a query repeated inside the batch runs once
        for i in todo:
            first.setdefault(keys[i], i)
        run_idx = sorted(first.values())
        fresh = self._run([problems[i] for i in run_idx], [meters[i] for i in run_idx], backend) if run_idx else []
        for i, r in zip(run_idx, fresh, strict=True):
            self._answers[keys[i]] = r
        out = []
        for i, (p, k) in enumerate(zip(problems, keys, strict=True)):
            if i in run_idx:
                out.append(self._answers[k])
                continue
            hit = self._answers[k]
            out.append(Result(p.id, hit.text, hit.answer, Usage.zero(), finish_reason=hit.finish_reason,
                              truncated=hit.truncated, trace=[{"cached": True, "from": hit.problem_id}],
                              details={**hit.details, "cached": True, "expensive_calls": 0}))
        return out

    def _run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        cheap_be = self._backend(self.arms[0], backend)
        queries = [RouteQuery(messages=list(p.messages), id=p.id, context={"rho": m.rho()}) for p, m in zip(problems, meters, strict=True)]
        signal_meters = [m.child(name="router") for m in meters]
        chosen, scores = self._router.choose(queries, self._thresholds, cheap_be, signal_meters)
        picks: list[int] = []
        downgraded: list[bool] = []
        for m, a in zip(meters, chosen, strict=True):
            arm = a  # arm 0 always runs: its strategy clamps to what is left or reports the exhausted budget
            while arm > 0 and not self._affordable(m, self.arms[arm]):
                arm -= 1
            picks.append(arm)
            downgraded.append(arm != a)
        results: list[Result | None] = [None] * len(problems)
        for k, arm in enumerate(self.arms):
            idx = [i for i, a in enumerate(picks) if a == k]
            if k == 0 and self.reuse_cheap and self._router.uses_cheap_model:
                for i in [i for i in idx if queries[i].cheap is not None]:
                    c = queries[i].cheap
                    assert c is not None
                    results[i] = Result(problems[i].id, c.text, c.answer, Usage.zero(), finish_reason=c.finish_reason,
                                        truncated=c.finish_reason == "length", trace=[{"reused_cheap_answer": True}])
                idx = [i for i in idx if results[i] is None]
            if not idx:
                continue
            arm_meters = [meters[i].child(name=f"arm:{arm.label}") for i in idx]
            out = arm.strategy.run([problems[i] for i in idx], arm_meters, self._backend(arm, backend))
            for i, r in zip(idx, out, strict=True):
                results[i] = r
        final: list[Result] = []
        for i, (p, r) in enumerate(zip(problems, results, strict=True)):
            assert r is not None
            sig = signal_meters[i].total()
            r.usage = sig + r.usage
            r.sequential_tokens += sig.output_tokens
            route = {"arm": picks[i], "label": self.arms[picks[i]].label, "score": scores[i],
                     "thresholds": self._thresholds, "chosen_by_router": chosen[i], "downgraded": downgraded[i],
                     "reused_cheap": bool(r.trace and r.trace[0].get("reused_cheap_answer")),
                     "signal_output_tokens": sig.output_tokens}
            r.details = {**r.details, "route": route, "expensive_calls": int(picks[i] > 0)}
            r.trace = [{"route": route}] + r.trace
            if r.stop_reason == "done" and meters[i].exhausted():
                r.stop_reason = meters[i].stop_reason or r.stop_reason
            final.append(r)
            self._learn(p, queries[i], picks[i], r)
        return final

    def _learn(self, p: Problem, q: RouteQuery, arm: int, r: Result) -> None:
        gold = p.metadata.get("gold") if isinstance(p.metadata, dict) else None
        if gold is None or type(self._router).update is Router.update:
            return
        ok = float(r.answer is not None and normalize_answer(r.answer) == normalize_answer(str(gold)))
        self._router.update(q, arm, bandit_reward(ok, arm / (len(self.arms) - 1), self.cost_weight))


STRATEGIES.register(Route.name, Route)
