"""Batching concurrent requests onto backends: one worker thread per backend.

Backends are synchronous and batch-friendly (a vLLM engine answers 32 prompts about as fast as
one), and every strategy already solves a batch of problems with one meter each.  So each backend
gets a :class:`BackendWorker` thread: it takes the first queued job, waits up to
``batch_window_ms`` for more (at most ``max_batch``), groups the jobs by strategy configuration,
and runs each group with one ``strategy.run(problems, meters, backend)`` call.  Each job's own
meter enforces its budget, so batching never lets one request spend another's budget.  Results
(or the exception) go back through a :class:`concurrent.futures.Future` the async endpoint awaits.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from budgetlm.backends.base import Backend
from budgetlm.meter import Meter
from budgetlm.strategies import get as get_strategy
from budgetlm.strategies.base import Problem, Result, Strategy

__all__ = ["BackendWorker", "Job", "StrategyCache"]


class StrategyCache:
    """Strategy instances by (name, parameters), built once (LRU, ``size`` entries)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[str, Strategy] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(name: str, params: dict[str, Any]) -> str:
        """The cache key of a configuration."""
        return json.dumps({"name": name, "params": params}, sort_keys=True, default=str)

    def get(self, name: str, params: dict[str, Any]) -> tuple[str, Strategy]:
        """The key and the strategy (built now when new; errors are the registry's ConfigErrors)."""
        k = self.key(name, params)
        with self._lock:
            if k in self._items:
                self._items.move_to_end(k)
                return k, self._items[k]
        strategy = get_strategy(name, **params)
        with self._lock:
            self._items[k] = strategy
            while len(self._items) > self.size:
                _, old = self._items.popitem(last=False)
                close = getattr(old, "close", None)
                if callable(close):
                    close()
        return k, strategy

    def close(self) -> None:
        """Close every cached strategy that holds resources."""
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        for s in items:
            close = getattr(s, "close", None)
            if callable(close):
                close()


@dataclass
class Job:
    """One request waiting for its backend."""

    problem: Problem
    """The conversation to answer."""
    meter: Meter
    """The request's meter (its budget, clamped to the key's allowance)."""
    key: str
    """The strategy configuration key (jobs with equal keys run in one batch)."""
    strategy: Strategy
    """The strategy to run."""
    future: Future[Result] = field(default_factory=Future)
    """Completed with the job's :class:`Result` (ledger filled) or the exception."""
    enqueued: float = field(default_factory=time.monotonic)
    """When the job was queued (latency includes waiting)."""


class BackendWorker(threading.Thread):
    """Runs one backend's jobs in batches, one batch at a time."""

    def __init__(self, name: str, backend: Backend, *, window_ms: float = 5.0, max_batch: int = 32) -> None:
        super().__init__(name=f"budgetlm-backend-{name}", daemon=True)
        self.backend = backend
        self.window = window_ms / 1000
        self.max_batch = max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0
        """Strategy batches run so far (for tests and metrics)."""

    def submit(self, job: Job) -> Future[Result]:
        """Queue ``job``; its future completes when its batch has run."""
        self.queue.put(job)
        return job.future

    def stop(self) -> None:
        """Finish the queued jobs and end the thread."""
        self.queue.put(None)
        self.join(timeout=60)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, stop = [first], False
        deadline = time.monotonic() + self.window
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            groups: dict[str, list[Job]] = {}
            for j in jobs:
                groups.setdefault(j.key, []).append(j)
            for group in groups.values():
                self._run_group(group)
            if stop:
                return

    def _run_group(self, group: list[Job]) -> None:
        live = [j for j in group if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        try:
            results = live[0].strategy.run([j.problem for j in live], [j.meter for j in live], self.backend)
            if len(results) != len(live):  # a strategy bug must not kill the worker or strand requests
                raise RuntimeError(f"strategy {live[0].strategy.name!r} returned {len(results)} results for "
                                   f"{len(live)} problems")
            for j, r in zip(live, results, strict=True):
                r.ledger = j.meter.summary()
        except BaseException as exc:  # noqa: BLE001 - every waiting request must hear about it
            for j in live:
                j.future.set_exception(exc)
            return
        for j, r in zip(live, results, strict=True):
            j.future.set_result(r)
