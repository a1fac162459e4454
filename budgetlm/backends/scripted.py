"""A deterministic scripted backend for unit tests of strategies and of the ledger.

It runs no model: a ``script`` decides each sample's text.  ``script`` is either a list of texts
(used in turn, cycling) or a callable ``(prompt_text, sample_index, sampling) -> str``.  Text is
tokenised into words with their trailing whitespace, so token counts are easy to reason about.
Everything else (``max_tokens`` truncation with ``finish_reason="length"``, stop strings, logprobs,
scoring, thinking split, budget clamping and charging) behaves as in real backends because it goes
through :class:`~budgetlm.backends.base.Backend`.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from budgetlm.backends.base import Backend, Message, PreparedRequest, RawCompletion, RawResult, SamplingParams
from budgetlm.backends.streaming import Sink
from budgetlm.costs import ModelInfo
from budgetlm.errors import BackendError, ConfigError


class VirtualClock:
    """A clock that moves only when told (deterministic deadline tests); pass it to the backend and the meter."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


Script = Sequence[str] | Callable[[str, int, SamplingParams], str]
_TOKEN = re.compile(r"\S+\s*|\s+")


class ScriptedBackend(Backend):
    """Returns scripted texts; one engine "call" per :meth:`generate` (counted in ``calls``)."""

    kind = "scripted"

    def __init__(self, script: Script | None = None, *, name: str = "scripted", n_params: int = 1_000_000,
                 delay: float = 0.0, token_time: float = 0.0, clock: Callable[[], float] | None = None,
                 fail: Callable[[str], bool] | None = None,
                 logprob: Callable[[str, str], float] | None = None, **kw: Any):
        super().__init__(name=name, measure_energy=False, **kw)
        if script is None:
            script = ["Answer: 42"]
        if not callable(script):
            texts = list(script)
            if not texts:
                raise ConfigError("`script` must be a non-empty list of texts or a callable, got []")
            cyc = itertools.cycle(texts)
            self._script: Callable[[str, int, SamplingParams], str] = lambda p, i, s: next(cyc)
        else:
            self._script = script
        self._vocab: dict[str, int] = {}
        self._inv: list[str] = []
        self._n_params = n_params
        self.delay = delay
        """Seconds each engine call sleeps (to test interruption of long runs)."""
        self.calls = 0
        """Engine calls made (one per batch)."""
        self.batches: list[int] = []
        """Size of each batch sent to the engine."""
        self.requests = 0
        """Requests run through the per-request (async) path."""
        self.token_time = token_time
        """Seconds between generated tokens on the per-request path (virtual with a :class:`VirtualClock`)."""
        self.fail = fail
        """A predicate on the prompt text: matching requests raise :class:`BackendError` (fault tests)."""
        self.logprob = logprob
        """``(sample text so far, token text) -> logprob`` of each generated token (confidence tests); ``None``:
        a deterministic hash of the context in [-3.05, -0.05]."""
        if clock is not None:
            self.clock = clock

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, n_params=self._n_params, n_layers=2, hidden_size=64, n_heads=4,
                         n_kv_heads=4, head_dim=16, vocab_size=max(1, len(self._inv)))

    def _id(self, piece: str) -> int:
        if piece not in self._vocab:
            self._vocab[piece] = len(self._inv)
            self._inv.append(piece)
        return self._vocab[piece]

    def encode(self, text: str) -> list[int]:
        return [self._id(p) for p in _TOKEN.findall(text)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self._inv[i] for i in token_ids)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        out = "".join(f"<|{m['role']}|> {m['content']}\n" for m in messages)
        return out + ("<|assistant|> " if add_generation_prompt else "")

    @staticmethod
    def _logprob(context: str, token: int) -> float:
        h = hashlib.sha256(f"{context}|{token}".encode()).digest()
        return -0.05 - 3.0 * (int.from_bytes(h[:4], "big") / 2**32)

    def _prompt(self, p: PreparedRequest) -> str:
        return p.prompt_text if p.prompt_text is not None else self.decode(p.prompt_token_ids or [])

    def _sample(self, prompt: str, i: int, sampling: SamplingParams) -> RawCompletion:
        """Sample ``i`` of a request: the script's text, cut at a stop string or at ``max_tokens``."""
        text = self._script(prompt, i, sampling)
        finish = "stop"
        hits = sorted((text.find(s), s) for s in sampling.stop if s and s in text)
        matched = hits[0][1] if hits else None
        if hits:
            text = text[: hits[0][0]]
        ids = self.encode(text)
        if len(ids) > sampling.max_tokens:
            ids, finish, matched = ids[: sampling.max_tokens], "length", None
        lps = None
        if sampling.logprobs is not None and self.logprob is not None:
            lps = [float(self.logprob(self.decode(ids[:j]), self._inv[t])) for j, t in enumerate(ids)]
        elif sampling.logprobs is not None:
            lps = [self._logprob(prompt + self.decode(ids[:j]), t) for j, t in enumerate(ids)]
        return RawCompletion(ids, self.decode(ids), finish, lps, stop_string=matched)

    def _generate(self, batch: list[PreparedRequest]) -> list[RawResult]:
        self.calls += 1
        self.batches.append(len(batch))
        if self.delay:
            time.sleep(self.delay)
        for p in batch:
            if self.fail is not None and self.fail(self._prompt(p)):
                raise BackendError(f"scripted failure for prompt {self._prompt(p)[-40:]!r}")
        return [RawResult([self._sample(self._prompt(p), i, p.sampling) for i in range(p.sampling.n)]) for p in batch]

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        """Emit the scripted samples token by token (one token per sample per step, ``token_time`` apart).

        Steps advance :attr:`clock` by ``token_time`` when it is a :class:`VirtualClock` (no real
        waiting), else sleep ``token_time`` seconds.  Cancellation between steps leaves exactly the
        tokens emitted so far in ``sink``; a deadline on the clock ends open samples with ``deadline``.
        """
        self.calls += 1
        self.requests += 1
        prompt = self._prompt(p)
        comps = [self._sample(prompt, i, p.sampling) for i in range(p.sampling.n)]
        if self.fail is not None and self.fail(prompt):
            raise BackendError(f"scripted failure for prompt {prompt[-40:]!r}")
        sink.admit()
        if self.delay:
            await asyncio.sleep(self.delay)
        step = 0
        while not sink.done:
            if sink.deadline is not None and self.clock() >= sink.deadline:
                sink.close_open("deadline")
                break
            for i, c in enumerate(comps):
                if step < len(c.token_ids):
                    last = step == len(c.token_ids) - 1
                    sink.push(i, [c.token_ids[step]], self.decode([c.token_ids[step]]),
                              logprobs=None if c.logprobs is None else [c.logprobs[step]],
                              finish_reason=c.finish_reason if last else None,
                              stop_string=c.stop_string if last else None)
                elif step == 0:  # an empty sample
                    sink.push(i, [], "", logprobs=[] if c.logprobs is not None else None,
                              finish_reason=c.finish_reason, stop_string=c.stop_string)
            step += 1
            if isinstance(self.clock, VirtualClock):
                self.clock.advance(self.token_time)
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(self.token_time)
        return sink.raw()

    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        self.calls += 1
        res = []
        for pid, cid in zip(prompts, continuations):
            prompt = self.decode(pid)
            res.append([self._logprob(prompt + self.decode(cid[:j]), t) for j, t in enumerate(cid)])
        return res
