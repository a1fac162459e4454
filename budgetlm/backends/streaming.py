"""Per-request output as the engine produces it: deltas, the sink that collects them, and streams.

The async engine layer (:meth:`budgetlm.backends.base.Backend.agenerate_one`,
:meth:`~budgetlm.backends.base.Backend.astream`) hands every backend a :class:`Sink` per request.
The backend pushes each new piece of output into it as the engine emits it (from the engine's
thread or from the event loop); the sink

* keeps the exact tokens generated so far, so that a request that is cancelled, hits its deadline
  or fails is charged *what was generated* (prompt once admitted, plus the partial output), never
  the reservation and never zero;
* forwards :class:`Delta` s to the consumer's callback on the consumer's event loop (thread-safe),
  which is how streaming works on every backend.

A backend marks the moment its engine has accepted the request with :meth:`Sink.admit` (from then
on the prompt counts as spent).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from budgetlm.errors import missing

if TYPE_CHECKING:
    from budgetlm.backends.base import RawResult


@dataclass
class Delta:
    """New output of one sample of a streamed request."""

    index: int
    """Which sample (0..n-1) the delta belongs to."""
    text: str
    """New text (may be empty when a token completes no character yet)."""
    token_ids: list[int] = field(default_factory=list)
    """New token ids."""
    finish_reason: str | None = None
    """One of :data:`~budgetlm.usage.FinishReason`, set on the sample's last delta: ``stop``, ``length``, ``abort`` or ``deadline``."""
    logprobs: list[float] | None = None
    """Log-probability of each new token, when the request asked for logprobs (online confidence monitors)."""
    top_logprobs: list[dict[int, float]] | None = None
    """Top-k alternatives of each new token (token id → logprob), when the request asked for ``logprobs > 0``."""


DeltaCallback = Callable[[Delta], None]


class _Sample:
    __slots__ = ("token_ids", "text", "logprobs", "top_logprobs", "finish_reason", "stop_string")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[float] | None = None
        self.top_logprobs: list[dict[int, float]] | None = None
        self.finish_reason: str | None = None
        self.stop_string: str | None = None


class Sink:
    """Collects one request's output as it is generated; thread-safe (see the module docstring)."""

    def __init__(self, n: int, on_delta: DeltaCallback | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.n = n
        self._samples = [_Sample() for _ in range(n)]
        self._lock = threading.Lock()
        self._on_delta = on_delta
        self._loop = loop
        self._thread = threading.get_ident()
        self.admitted = False
        """True once the engine accepted the request (its prompt then counts as spent)."""
        self.prompt_tokens: int | None = None
        """Engine-reported prompt tokens, when known."""
        self.cached_prompt_tokens = 0
        """Engine-reported prefix-cache hits, when known."""
        self.abort = threading.Event()
        """Set when the consumer gave the request up; backends that poll (token loops) stop at it."""
        self.deadline: float | None = None
        """Clock deadline after which token loops stop with ``finish_reason="deadline"``."""
        self.end_reason: str | None = None
        """Why the consumer ended the request early (``"deadline"``); open samples end with it, not ``abort``."""

    def admit(self, prompt_tokens: int | None = None, cached_prompt_tokens: int = 0) -> None:
        """The engine accepted the request."""
        with self._lock:
            self.admitted = True
            if prompt_tokens is not None:
                self.prompt_tokens = prompt_tokens
            self.cached_prompt_tokens = cached_prompt_tokens

    def push(self, index: int, token_ids: list[int], text: str, *, logprobs: list[float] | None = None,
             top_logprobs: list[dict[int, float]] | None = None, finish_reason: str | None = None,
             stop_string: str | None = None) -> None:
        """Append new output of sample ``index`` (and end it when ``finish_reason`` is given)."""
        with self._lock:
            self.admitted = True
            s = self._samples[index]
            if s.finish_reason is not None:
                return  # a sample ends once
            s.token_ids.extend(token_ids)
            s.text += text
            if logprobs is not None:
                s.logprobs = (s.logprobs or []) + list(logprobs)
            if top_logprobs is not None:
                s.top_logprobs = (s.top_logprobs or []) + list(top_logprobs)
            if finish_reason is not None:
                s.finish_reason = finish_reason
                s.stop_string = stop_string
        if self._on_delta is not None and (token_ids or text or finish_reason):
            self._emit(Delta(index, text, list(token_ids), finish_reason,
                             None if logprobs is None else list(logprobs),
                             None if top_logprobs is None else list(top_logprobs)))

    def _emit(self, delta: Delta) -> None:
        cb = self._on_delta
        if cb is None:
            raise missing('cb')
        loop = self._loop
        if loop is None or threading.get_ident() == self._thread:
            cb(delta)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(cb, delta)

    def output(self, index: int) -> tuple[list[int], str, bool]:
        """Sample ``index``'s token ids and text so far, and whether it has ended."""
        with self._lock:
            s = self._samples[index]
            return list(s.token_ids), s.text, s.finish_reason is not None

    @property
    def generated(self) -> int:
        """Tokens generated so far over all samples."""
        with self._lock:
            return sum(len(s.token_ids) for s in self._samples)

    @property
    def done(self) -> bool:
        """True when every sample has ended."""
        with self._lock:
            return all(s.finish_reason is not None for s in self._samples)

    def raw(self, open_finish: str = "abort") -> RawResult:
        """What was generated so far as a :class:`RawResult`; samples still open end with ``open_finish``."""
        from budgetlm.backends.base import RawCompletion, RawResult

        with self._lock:
            open_finish = self.end_reason or open_finish
            comps = [
                RawCompletion(list(s.token_ids), s.text, s.finish_reason or open_finish,
                              None if s.logprobs is None else list(s.logprobs),
                              None if s.top_logprobs is None else list(s.top_logprobs), s.stop_string)
                for s in self._samples
            ]
            return RawResult(comps, prompt_tokens=self.prompt_tokens, cached_prompt_tokens=self.cached_prompt_tokens)

    def close_open(self, finish: str) -> list[Delta]:
        """End every open sample with ``finish`` (deadline, abort) and emit its last delta."""
        ended = []
        finish = self.end_reason or finish
        with self._lock:
            for i, s in enumerate(self._samples):
                if s.finish_reason is None:
                    s.finish_reason = finish
                    ended.append(Delta(i, "", [], finish))
        if self._on_delta is not None:
            for d in ended:
                self._emit(d)
        return ended
