"""One asyncio task per request on the shared engine (RequestJob), settled once; and the strategy cache."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from budgetlm.backends.base import Backend, PreparedRequest, RawResult
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.backends.streaming import Delta, Sink
from budgetlm.budget import Budget
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.server import dispatch
from budgetlm.server.dispatch import Outcome, RequestJob, StrategyCache
from budgetlm.strategies import get as get_strategy
from budgetlm.strategies.base import Context, Problem, Result, Strategy

LONG = " ".join(f"w{i}" for i in range(40)) + " Answer: 7"  # 42 tokens


def _echo(prompt: str, i: int, sampling: Any) -> str:
    """Answers with the question's text, so each result shows which problem it belongs to."""
    question = prompt.split("<|user|> ", 1)[1].split("\n", 1)[0]
    return f"Answer: {question}"


def _problem(q: str) -> Problem:
    return Problem(id=q, messages=[{"role": "user", "content": q}])


class Counting(ScriptedBackend):
    """Counts the requests running on the engine at once (the most seen is ``max_running``)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.running = 0
        self.max_running = 0

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            return await super()._agenerate_request(p, sink)
        finally:
            self.running -= 1


class Recorder:
    """Collects on_end calls."""

    def __init__(self, fail: bool = False) -> None:
        self.outcomes: list[Outcome] = []
        self.fail = fail

    def __call__(self, out: Outcome) -> Any:
        self.outcomes.append(out)
        if self.fail:
            raise RuntimeError("the store is gone")
        return {"settled": len(self.outcomes)}


class Short(Strategy):
    """A broken strategy: its batch API returns no result for the problem."""

    name = "short"

    async def arun(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend,
                   on_delta: Any = None) -> list[Result]:
        return []


class ScoresSlowly(Strategy):
    """A ported strategy that scores (scoring runs in a worker thread) and then samples."""

    name = "scores-slowly"

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        await ctx.score_batch([(problem.messages, "Answer: 7")])
        g = await ctx.generate(problem.messages)
        return Result(problem.id, g.first.text, None, g.usage)


class SlowScoring(ScriptedBackend):
    def __init__(self, *a: Any, started: threading.Event, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.started = started

    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        self.started.set()
        time.sleep(0.5)
        return super()._score(prompts, continuations)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_request_runs_its_strategy_and_settles_once() -> None:
    backend = ScriptedBackend(_echo)
    rec = Recorder()

    async def go() -> Outcome:
        meter = Meter(Budget(output_tokens=20), name="q1")
        job = RequestJob(get_strategy("sample", max_tokens=50), _problem("q1"), meter, backend, on_end=rec)
        return await job.wait()

    out = _run(go())
    assert rec.outcomes == [out] and out.extra == {"settled": 1}
    r = out.result
    assert r is not None and r.text == "Answer: q1" and r.answer == "q1" and not out.cancelled and out.error is None
    assert r.ledger["name"] == "q1" and r.ledger["units"]["output_tokens"]["spent"] == r.usage.output_tokens == 2
    assert r.ledger["units"]["output_tokens"]["limit"] == 20 and out.latency_s > 0


def test_concurrent_requests_overlap_on_the_engine_without_a_window() -> None:
    backend = Counting(_echo, token_time=0.02)
    strategy = get_strategy("sample", max_tokens=50)

    async def go() -> list[Outcome]:
        jobs = [RequestJob(strategy, _problem(f"q{i}"), Meter(Budget(output_tokens=20), name=f"q{i}"), backend)
                for i in range(8)]
        return list(await asyncio.gather(*(j.wait() for j in jobs)))

    t0 = time.monotonic()
    outs = _run(go())
    wall = time.monotonic() - t0
    assert [o.result.answer for o in outs if o.result] == [f"q{i}" for i in range(8)]  # each its own answer
    assert backend.max_running == 8 and backend.requests == 8  # all eight ran at once, one request each
    assert wall < 8 * 2 * 0.02 + 1.0  # not one after another


def test_abandon_cancels_and_charges_what_was_generated() -> None:
    backend = ScriptedBackend([LONG], token_time=0.02)
    rec = Recorder()
    deltas: list[Delta] = []

    async def go() -> tuple[Outcome, Meter]:
        meter = Meter(Budget(output_tokens=100), name="long")
        job = RequestJob(get_strategy("sample", max_tokens=100), _problem("q"), meter, backend,
                         on_delta=deltas.append, on_end=rec)
        while len(deltas) < 5:
            await asyncio.sleep(0.005)
        job.abandon()
        job.abandon()  # twice is harmless
        out = await job.wait()
        job.abandon()  # and after the end too
        await asyncio.sleep(0.1)  # nothing more is generated or charged
        return out, meter

    out, meter = _run(go())
    assert out.cancelled and out.disconnected and out.result is None and out.error is None
    assert rec.outcomes == [out]  # settled once
    generated = sum(len(d.token_ids) for d in deltas)
    assert 5 <= generated < 42  # stopped early
    assert meter.spent("output_tokens") == generated  # charged exactly what was generated
    assert meter.spent("input_tokens") == 3 and meter.reserved("output_tokens") == 0  # nothing stays held


def test_a_strategy_error_is_the_outcome() -> None:
    backend = ScriptedBackend(["x"], fail=lambda prompt: True)
    rec = Recorder()

    async def go() -> Outcome:
        job = RequestJob(get_strategy("sample"), _problem("q"), Meter(Budget(output_tokens=5)), backend, on_end=rec)
        return await job.wait()

    out = _run(go())
    assert out.result is None and not out.cancelled and "scripted failure" in str(out.error)
    assert rec.outcomes == [out]


def test_wrong_number_of_results_is_an_error() -> None:
    async def go() -> Outcome:
        job = RequestJob(Short(), _problem("q"), Meter(Budget(output_tokens=5)), ScriptedBackend())
        return await job.wait()

    out = _run(go())
    assert out.result is None and out.error is not None  # a strategy bug must not look like an answer


def test_on_end_failing_still_resolves_the_request() -> None:
    rec = Recorder(fail=True)

    async def go() -> Outcome:
        job = RequestJob(get_strategy("sample"), _problem("q"), Meter(Budget(output_tokens=5)), ScriptedBackend(),
                         on_end=rec)
        return await asyncio.wait_for(job.wait(), 10)

    out = _run(go())
    assert out.result is not None and out.extra is None and len(rec.outcomes) == 1


def test_settling_waits_for_calls_still_running_in_threads() -> None:
    started = threading.Event()
    backend = SlowScoring(["Answer: 7"], started=started)
    rec = Recorder()
    seen: list[float] = []

    def on_end(out: Outcome) -> Any:
        seen.append(meter.spent("input_tokens"))
        return rec(out)

    meter = Meter(Budget(output_tokens=20))

    async def go() -> Outcome:
        job = RequestJob(ScoresSlowly(), _problem("q"), meter, backend, on_end=on_end)
        while not started.is_set():
            await asyncio.sleep(0.01)
        job.abandon()  # the task ends at once; the scoring thread charges later
        return await job.wait()

    out = _run(go())
    assert out.cancelled and len(rec.outcomes) == 1
    assert seen == [3 + 2]  # the scored prompt and continuation (3 + 2 tokens) were charged before settling
    assert meter.reserved("input_tokens") == 0


# ------------------------------------------------------------------------------------- strategy cache


@pytest.mark.parametrize(("a", "b", "same"), [
    (("majority", {"n": 3, "max_tokens": 8}), ("majority", {"max_tokens": 8, "n": 3}), True),  # dict order ignored
    (("sample", {}), ("sample", {}), True),  # no parameters
    (("majority", {"n": 3}), ("majority", {"n": 4}), False),  # different parameters
    (("sample", {}), ("cot", {}), False),  # different strategies
])
def test_strategy_cache_identity(a: tuple[str, dict[str, Any]], b: tuple[str, dict[str, Any]], same: bool) -> None:
    cache = StrategyCache()
    ka, sa = cache.get(*a)
    kb, sb = cache.get(*b)
    assert (sa is sb) is same and (ka == kb) is same
    assert sa.name == a[0]


@pytest.mark.parametrize(("name", "params", "listed"), [
    ("nope", {}, ["majority", "sample", "cot"]),  # unknown strategy: the registered names
    ("majority", {"bogus": 1}, ["'bogus'", "n", "max_tokens"]),  # unknown parameter: the valid ones
    ("sample", {"n": 0}, ["`n` must be >= 1"]),  # the strategy's own validation
])
def test_strategy_cache_errors(name: str, params: dict[str, Any], listed: list[str]) -> None:
    cache = StrategyCache()
    with pytest.raises(ConfigError) as ei:
        cache.get(name, params)
    for word in listed:
        assert word in str(ei.value)


def test_strategy_cache_evicts_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[str] = []

    class Closable:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def close(self) -> None:
            closed.append(self.tag)

    monkeypatch.setattr(dispatch, "get_strategy", lambda name, **params: Closable(f"{name}{params}"))
    cache = StrategyCache(size=2)
    _, s1 = cache.get("a", {})
    cache.get("b", {})
    assert cache.get("a", {})[1] is s1  # a is now the most recently used
    cache.get("c", {})  # evicts b, the least recently used
    assert closed == ["b{}"]
    assert cache.get("a", {})[1] is s1
    cache.close()
    assert sorted(closed) == ["a{}", "b{}", "c{}"]
