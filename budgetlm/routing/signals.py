"""Threshold routers on signals the cheap model gives for free, and the two boundary policies.

- ``always_small`` / ``always_large``: the boundary policies every router is measured against.
- ``random``: ``w ~ U(0, 1)`` (seeded): the baseline whose APGR is 0.5 in expectation.
- ``logprob``: ``w = 1 − exp(mean token logprob)`` of the cheap model's greedy answer: a low
  per-token probability means an unsure cheap model (the confidence signal of cascades, §5).
- ``consistency``: ``w = 1 − (top vote share)`` over ``k`` cheap samples (self-consistency as a
  difficulty signal, as in adaptive-consistency routing).
- ``self_rated``: the cheap model rates the question's difficulty from 1 to 10; ``w = (r − 1)/9``.
  When the backend returns top logprobs for the first token the rating is their expectation over the
  digits 1–9 (a smooth score); otherwise the first number in the reply.  Unparseable → 0.5.

``logprob`` and ``consistency`` produce the cheap answer while scoring (``uses_cheap_model``): a
query routed to the cheap model reuses it, so the signal is free, and one routed up paid for it.
All calls go through the backend and are charged to the query's meter; a query whose budget cannot
afford the signal gets ``w = 1.0`` only when ``on_no_budget="strong"``, else 0.0 (default: route
cheap, as nothing stronger is affordable either).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from typing import Literal

from budgetlm.answers import extract_answer
from budgetlm.backends.base import Backend, GenerationRequest, SamplingParams
from budgetlm.errors import ConfigError, invalid, missing
from budgetlm.meter import Meter
from budgetlm.routing.base import ROUTERS, CheapAnswer, RouteQuery, Router


class AlwaysSmall(Router):
    """Every query to the cheapest model (boundary policy)."""

    name = "always_small"

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        return [0.0] * len(queries)


class AlwaysLarge(Router):
    """Every query to the strongest model (boundary policy)."""

    name = "always_large"
    default_threshold = 0.5

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        return [1.0] * len(queries)


class RandomRouter(Router):
    """``w ~ U(0, 1)``, seeded: routes a share ``1 − t`` of queries up at random."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        return [self._rng.random() for _ in queries]


def _need(backend: Backend | None, router: str) -> Backend:
    if backend is None:
        raise ConfigError(f"router {router!r} needs the cheap model's backend to compute its signal; pass `backend`")
    return backend


def _meters(meters: Sequence[Meter | None] | None, n: int) -> list[Meter | None]:
    out: list[Meter | None] = list(meters) if meters is not None else [None] * n
    if len(out) != n:
        raise invalid("meters", f"one meter (or None) per query ({n})", f"{len(out)} meters")
    return out


class _CheapAnswerRouter(Router):
    """Shared generation of the cheap answer(s) for output-based routers."""

    uses_cheap_model = True

    def __init__(self, max_tokens: int = 256, on_no_budget: Literal["cheap", "strong"] = "cheap") -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid("max_tokens", "a positive integer", max_tokens)
        if on_no_budget not in ("cheap", "strong"):
            raise invalid("on_no_budget", "'cheap' or 'strong'", on_no_budget)
        self.max_tokens = max_tokens
        self.on_no_budget = on_no_budget

    def _sampling(self) -> SamplingParams:
        raise NotImplementedError

    def _w(self, c: CheapAnswer) -> float:
        raise NotImplementedError

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        ms = _meters(meters, len(queries))
        todo = [i for i, q in enumerate(queries) if q.cheap is None or not self._has_signal(q.cheap)]
        if todo:
            be = _need(backend, self.name)
            reqs = [GenerationRequest(messages=queries[i].messages, sampling=self._sampling(), meter=ms[i],
                                      id=queries[i].id) for i in todo]
            for i, g in zip(todo, be.generate(reqs, on_budget_exhausted="skip"), strict=True):
                if g.skipped or not g.completions:
                    continue
                votes = []
                for c in g.completions:
                    votes.append(None if c.thinking_truncated else extract_answer(c.answer).text)
                first = g.completions[0]
                text = "" if first.thinking_truncated else first.answer
                queries[i].cheap = CheapAnswer(text=text, answer=votes[0], mean_logprob=first.mean_logprob,
                                               votes=votes, finish_reason=first.finish_reason)
        fallback = 1.0 if self.on_no_budget == "strong" else 0.0
        return [self._w(q.cheap) if q.cheap is not None and self._has_signal(q.cheap) else fallback for q in queries]

    def _has_signal(self, c: CheapAnswer) -> bool:
        return True


class LogprobRouter(_CheapAnswerRouter):
    """``w = 1 − exp(mean logprob)`` of the cheap model's greedy answer."""

    name = "logprob"

    def _sampling(self) -> SamplingParams:
        return SamplingParams(n=1, temperature=0.0, max_tokens=self.max_tokens, logprobs=0)

    def _has_signal(self, c: CheapAnswer) -> bool:
        return c.mean_logprob is not None

    def _w(self, c: CheapAnswer) -> float:
        if c.mean_logprob is None:
            raise missing('c.mean_logprob')
        w = 1.0 - math.exp(c.mean_logprob)
        return w + (1.0 if c.answer is None else 0.0)  # no extractable answer: surely needs help (w > 1)


class ConsistencyRouter(_CheapAnswerRouter):
    """``w = 1 − (share of the most common answer)`` over ``k`` cheap samples at ``temperature``."""

    name = "consistency"

    def __init__(self, k: int = 4, temperature: float = 0.7, max_tokens: int = 256,
                 on_no_budget: Literal["cheap", "strong"] = "cheap", seed: int | None = None) -> None:
        super().__init__(max_tokens=max_tokens, on_no_budget=on_no_budget)
        if not isinstance(k, int) or k < 2:
            raise invalid("k", "an integer >= 2 (agreement needs several samples)", k)
        if not 0 < temperature <= 2:
            raise invalid("temperature", "in (0, 2] (greedy samples always agree)", temperature)
        self.k = k
        self.temperature = temperature
        self.seed = seed

    def _sampling(self) -> SamplingParams:
        return SamplingParams(n=self.k, temperature=self.temperature, max_tokens=self.max_tokens, logprobs=0,
                              seed=self.seed)

    def _has_signal(self, c: CheapAnswer) -> bool:
        return len(c.votes) >= 2

    def _w(self, c: CheapAnswer) -> float:
        from budgetlm.answers import normalize_answer

        keys = [normalize_answer(v) for v in c.votes]
        counted = [k for k in keys if k is not None]
        if not counted:
            return 1.0
        top = max(counted.count(k) for k in set(counted))
        # the cheap answer reused for a cheap route is the majority one
        best = max(set(counted), key=lambda k: (counted.count(k), -keys.index(k)))
        c.answer = c.votes[keys.index(best)]
        return 1.0 - top / len(keys)


_RATING_PROMPT = ("How hard is the following question for you? Rate it from 1 (trivial) to 9 (very hard). "
                  "Reply with one digit only.\n\nQuestion:\n{question}")
_DIGIT = re.compile(r"\b([1-9]|10)\b")


class SelfRatedRouter(Router):
    """The cheap model rates the difficulty (1–9); ``w = (rating − 1) / 8``."""

    name = "self_rated"

    def __init__(self, prompt: str = _RATING_PROMPT) -> None:
        if "{question}" not in prompt:
            raise invalid("prompt", "a template containing {question}", prompt)
        self.prompt = prompt

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        be = _need(backend, self.name)
        ms = _meters(meters, len(queries))
        digit_ids = {}
        for d in range(1, 10):
            ids = be.encode(str(d))
            if len(ids) == 1:
                digit_ids[ids[0]] = d
        sp = SamplingParams(n=1, temperature=0.0, max_tokens=4, logprobs=20)
        reqs = []
        for q, m in zip(queries, ms, strict=True):
            question = str(q.messages[-1].get("content", ""))
            reqs.append(GenerationRequest(messages=[{"role": "user", "content": self.prompt.replace("{question}", question)}],
                                          sampling=sp, meter=m, id=q.id))
        out = []
        for g in be.generate(reqs, on_budget_exhausted="skip"):
            if g.skipped or not g.completions:
                out.append(0.0)
                continue
            c = g.first
            rating = None
            if c.top_logprobs:
                probs = {digit_ids[t]: math.exp(lp) for t, lp in c.top_logprobs[0].items() if t in digit_ids}
                mass = sum(probs.values())
                if mass > 0.05:
                    rating = sum(d * p for d, p in probs.items()) / mass
            if rating is None:
                found = _DIGIT.search(c.answer or c.text)
                rating = min(9.0, float(found.group(1))) if found else None
            out.append(0.5 if rating is None else (rating - 1.0) / 8.0)
        return out


for _cls in (AlwaysSmall, AlwaysLarge, RandomRouter, LogprobRouter, ConsistencyRouter, SelfRatedRouter):
    ROUTERS.register(_cls.name, _cls)
