"""Running requests on the shared engine: one asyncio task per request, settled exactly once.

Each chat-completions request becomes a :class:`RequestJob`: an asyncio task on the server's event
loop running ``await strategy.arun([problem], [meter], backend, on_delta=...)``.  Every call of
every request goes straight to the backend's running engine (vLLM: one continuous batch for the
whole process, :mod:`budgetlm.backends.vllm_engine`), so there is no worker thread and no batching
window: a request starts decoding on the engine's next step, and a short request never waits for a
long one to finish.

**Cancelling.**  :meth:`RequestJob.abandon` (the client disconnected) cancels the task: the engine
aborts the request's generations between two steps, and each call's meter reservation is charged
exactly what was generated (prompt once admitted, plus the partial output).  Strategies not yet
written as per-problem programs (they override the old batch ``run``) run in a worker thread that
cannot be interrupted; those run on and are settled when they end.

**Settling.**  When the task has ended (answer, error or cancellation) and the meter has no call in
flight any more, ``on_end`` runs once with the :class:`Outcome` (the server commits the meter's
actual spend to the key's allowance there), and :attr:`RequestJob.settled` resolves with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from budgetlm.backends.base import Backend
from budgetlm.backends.streaming import DeltaCallback
from budgetlm.io import JsonObject
from budgetlm.meter import Meter
from budgetlm.strategies import get as get_strategy
from budgetlm.strategies.base import Problem, Result, Strategy

__all__ = ["Outcome", "RequestJob", "StrategyCache"]

log = logging.getLogger("budgetlm.server")

SETTLE_WAIT_S = 120.0
"""Longest wait, after a request's task ended, for calls still running in worker threads to be charged."""


class StrategyCache:
    """Strategy instances by (name, parameters), built once (LRU, ``size`` entries)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[str, Strategy] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(name: str, params: Mapping[str, object]) -> str:
        """The cache key of a configuration."""
        return json.dumps({"name": name, "params": params}, sort_keys=True, default=str)

    def get(self, name: str, params: Mapping[str, object]) -> tuple[str, Strategy]:
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


def _calls_in_flight(meter: Meter) -> bool:
    """True while some call holds a reservation on ``meter`` (e.g. scoring in a worker thread)."""
    return meter.reserved("output_tokens") > 0 or meter.reserved("input_tokens") > 0


@dataclass
class Outcome:
    """How a request ended."""

    result: Result | None
    """The strategy's result (ledger filled), or ``None`` after an error or a cancellation."""
    error: BaseException | None = None
    """The strategy's exception (``None`` when it answered or was cancelled)."""
    cancelled: bool = False
    """The task was cancelled (the client left): what ran was charged, there is no answer."""
    disconnected: bool = False
    """The client left before the answer was sent (``cancelled``, or a thread strategy that ran on)."""
    extra: JsonObject | None = None
    """What ``on_end`` returned (the server: the response's ``budgetlm`` block)."""
    latency_s: float = 0.0
    """Seconds from submission to the end of the task."""


class RequestJob:
    """One request's strategy program running as an asyncio task (see the module docstring).

    Create it inside the running event loop.  ``on_delta`` receives the answer's token deltas when
    the strategy streams (``strategy.streams``); ``finish(result, meter)`` post-processes the answer (charging
    what it adds to ``meter``) before the ledger is taken; ``on_end(outcome)`` is called exactly once, in a worker
    thread, when the task has ended and every call of the request has been charged to ``meter``.
    """

    def __init__(self, strategy: Strategy, problem: Problem, meter: Meter, backend: Backend, *,
                 on_delta: DeltaCallback | None = None, on_end: Callable[[Outcome], JsonObject | None] | None = None,
                 finish: Callable[[Result, Meter], Result] | None = None) -> None:
        self.strategy = strategy
        self.problem = problem
        self.meter = meter
        self.backend = backend
        self.on_delta = on_delta
        self.on_end = on_end
        self.finish = finish
        """Runs on the answer before its ledger is taken (the server parses and charges tool calls there)."""
        self.enqueued = time.monotonic()
        self.disconnected = False
        self._loop = asyncio.get_running_loop()
        self.settled: asyncio.Future[Outcome] = self._loop.create_future()
        """Resolves with the :class:`Outcome` once the request is settled (never cancelled by awaiting it)."""
        self.task: asyncio.Task[Result] = self._loop.create_task(self._run(), name=f"budgetlm-request-{problem.id}")
        self.task.add_done_callback(self._ended)

    async def _run(self) -> Result:
        results = await self.strategy.arun([self.problem], [self.meter], self.backend, on_delta=self.on_delta)
        if len(results) != 1:  # a strategy bug must not look like an answer
            raise RuntimeError(f"strategy {self.strategy.name!r} returned {len(results)} results for 1 problem")
        r = results[0]
        if self.finish is not None:
            r = self.finish(r, self.meter)
        r.ledger = self.meter.summary()
        return r

    def abandon(self) -> None:
        """The client left: cancel the program (the engine aborts its calls) unless it already ended.

        Safe to call any number of times, also after the request ended.
        """
        if self.task.done():
            return
        self.disconnected = True
        self.task.cancel()

    async def wait(self) -> Outcome:
        """The outcome, once settled (cancelling the caller does not cancel the request)."""
        return await asyncio.shield(self.settled)

    def _ended(self, task: asyncio.Task[Result]) -> None:
        latency = time.monotonic() - self.enqueued
        if task.cancelled():
            out = Outcome(None, cancelled=True, disconnected=True, latency_s=latency)
        elif task.exception() is not None:
            out = Outcome(None, error=task.exception(), disconnected=self.disconnected, latency_s=latency)
        else:
            out = Outcome(task.result(), disconnected=self.disconnected, latency_s=latency)
        self._settling = self._loop.create_task(self._settle(out))  # referenced: the loop keeps tasks weakly

    async def _settle(self, out: Outcome) -> None:
        deadline = time.monotonic() + SETTLE_WAIT_S
        while _calls_in_flight(self.meter) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        try:
            if self.on_end is not None:  # in a worker thread: committing to the store may wait for the disk
                out.extra = await asyncio.to_thread(self.on_end, out)
        except Exception:  # noqa: BLE001 -- the waiting response must still hear about the request
            log.exception("settling request %s failed", self.problem.id)
        self.settled.set_result(out)
