"""Batching concurrent requests per backend, and the strategy cache."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from budgetlm.backends.base import Backend
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.budget import Budget
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.server import dispatch
from budgetlm.server.dispatch import BackendWorker, Job, StrategyCache
from budgetlm.strategies import get as get_strategy
from budgetlm.strategies.base import Problem, Result, Strategy


def _echo(prompt: str, i: int, sampling: Any) -> str:
    """Answers with the question's text, so each result shows which problem it belongs to."""
    question = prompt.split("<|user|> ", 1)[1].split("\n", 1)[0]
    return f"Answer: {question}"


def _job(q: str, strategy: Strategy, key: str, tokens: int = 20) -> Job:
    return Job(Problem(id=q, messages=[{"role": "user", "content": q}]), Meter(Budget(output_tokens=tokens), name=q),
               key, strategy)


@pytest.fixture()
def backend() -> ScriptedBackend:
    return ScriptedBackend(_echo)


@pytest.fixture()
def worker_factory(backend: ScriptedBackend) -> Iterator[Any]:
    started: list[BackendWorker] = []

    def make(window_ms: float = 200.0, max_batch: int = 32, be: Backend | None = None) -> BackendWorker:
        w = BackendWorker("test", be or backend, window_ms=window_ms, max_batch=max_batch)
        w.start()
        started.append(w)
        return w

    yield make
    for w in started:
        if w.is_alive():
            w.stop()


class Recording(Strategy):
    """Records each batch it runs; raises or returns too few results on demand."""

    name = "recording"

    def __init__(self, fail: BaseException | None = None, short: bool = False) -> None:
        self.fail, self.short = fail, short
        self.calls: list[list[str]] = []

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        self.calls.append([p.id for p in problems])
        if self.fail is not None:
            raise self.fail
        out = [get_strategy("sample").run([p], [m], backend)[0] for p, m in zip(problems, meters, strict=True)]
        return out[:-1] if self.short else out


def test_concurrent_jobs_with_one_key_run_as_one_batch(worker_factory: Any, backend: ScriptedBackend) -> None:
    w = worker_factory(window_ms=200)
    strategy = get_strategy("sample", max_tokens=20)
    jobs = [_job(f"q{i}", strategy, "sample-20") for i in range(8)]
    futures = [w.submit(j) for j in jobs]
    results = [f.result(timeout=30) for f in futures]
    assert w.batches == 1 and backend.batches == [8]  # one strategy.run, one engine call
    for i, (j, r) in enumerate(zip(jobs, results, strict=True)):
        assert r.problem_id == f"q{i}" and r.text == f"Answer: q{i}" and r.answer == f"q{i}"
        assert r.ledger["name"] == j.meter.name == f"q{i}"  # each job's own meter's summary, filled in
        assert r.ledger["units"]["output_tokens"]["limit"] == 20
        assert r.ledger["units"]["output_tokens"]["spent"] == r.usage.output_tokens == 2


def test_different_keys_run_as_separate_groups(worker_factory: Any, backend: ScriptedBackend) -> None:
    w = worker_factory(window_ms=200)
    a, b = Recording(), Recording()
    jobs = [_job(f"q{i}", a if i % 2 else b, "a" if i % 2 else "b") for i in range(6)]
    futures = [w.submit(j) for j in jobs]
    results = [f.result(timeout=30) for f in futures]
    assert w.batches == 2
    assert a.calls == [["q1", "q3", "q5"]] and b.calls == [["q0", "q2", "q4"]]  # grouped, order kept
    assert [r.problem_id for r in results] == [f"q{i}" for i in range(6)]


def test_max_batch_is_respected(worker_factory: Any, backend: ScriptedBackend) -> None:
    w = worker_factory(window_ms=200, max_batch=3)
    strategy = Recording()
    futures = [w.submit(_job(f"q{i}", strategy, "k")) for i in range(8)]
    results = [f.result(timeout=30) for f in futures]
    assert [len(c) for c in strategy.calls] == [3, 3, 2] and w.batches == 3
    assert [r.text for r in results] == [f"Answer: q{i}" for i in range(8)]


def test_zero_window_still_answers(worker_factory: Any) -> None:
    w = worker_factory(window_ms=0)
    strategy = Recording()
    futures = [w.submit(_job(f"q{i}", strategy, "k")) for i in range(5)]
    assert [f.result(timeout=30).answer for f in futures] == [f"q{i}" for i in range(5)]
    assert sum(len(c) for c in strategy.calls) == 5


@pytest.mark.parametrize("exc", [
    RuntimeError("engine died"),  # an ordinary failure
    KeyboardInterrupt(),  # even a BaseException reaches the waiting requests
])
def test_strategy_exception_reaches_every_job(worker_factory: Any, exc: BaseException) -> None:
    w = worker_factory(window_ms=200)
    bad = Recording(fail=exc)
    futures = [w.submit(_job(f"q{i}", bad, "bad")) for i in range(4)]
    for f in futures:
        with pytest.raises(type(exc)):
            f.result(timeout=30)
    assert bad.calls == [["q0", "q1", "q2", "q3"]]
    good = w.submit(_job("after", Recording(), "good")).result(timeout=30)  # the worker lives on
    assert good.answer == "after" and w.is_alive()


def test_wrong_number_of_results_fails_every_job_and_keeps_the_worker(worker_factory: Any) -> None:
    w = worker_factory(window_ms=200)
    short = Recording(short=True)
    futures = [w.submit(_job(f"q{i}", short, "short")) for i in range(3)]
    for f in futures:  # a strategy bug must not leave some requests waiting forever
        with pytest.raises(Exception):  # noqa: B017 - any error will do, as long as it arrives
            f.result(timeout=30)
    assert w.is_alive()
    assert w.submit(_job("after", Recording(), "good")).result(timeout=30).answer == "after"


def test_cancelled_jobs_are_skipped(worker_factory: Any) -> None:
    gate = threading.Event()

    class Slow(Recording):
        def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
            gate.wait(timeout=30)
            return super().run(problems, meters, backend)

    w = worker_factory(window_ms=0)
    slow, rec = Slow(), Recording()
    first = w.submit(_job("first", slow, "slow"))
    time.sleep(0.2)  # the worker is now inside the slow batch
    cancelled = w.submit(_job("cancelled", rec, "k"))
    assert cancelled.cancel()
    kept = w.submit(_job("kept", rec, "k"))
    gate.set()
    assert first.result(timeout=30).answer == "first" and kept.result(timeout=30).answer == "kept"
    assert rec.calls == [["kept"]]


def test_stop_finishes_queued_jobs_and_ends_the_thread(worker_factory: Any) -> None:
    w = worker_factory(window_ms=50)
    strategy = Recording()
    futures = [w.submit(_job(f"q{i}", strategy, "k")) for i in range(4)]
    w.stop()
    assert not w.is_alive()
    assert all(f.done() for f in futures) and [f.result().answer for f in futures] == [f"q{i}" for i in range(4)]


def test_stop_of_an_idle_worker(worker_factory: Any) -> None:
    w = worker_factory()
    t0 = time.monotonic()
    w.stop()
    assert not w.is_alive() and time.monotonic() - t0 < 5


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
