"""The backend protocol: batched generation, scoring, tokenisation, and enforced spend.

Every backend subclasses :class:`Backend` and implements three small hooks:

* :meth:`Backend._generate` — run a batch of already-rendered, already-clamped requests;
* :meth:`Backend._score` — log-probabilities of given continuations;
* tokenisation (:meth:`Backend.encode`, :meth:`Backend.decode`, :meth:`Backend.apply_chat_template`).

The public :meth:`Backend.generate` does the rest identically for all backends: it validates and
renders requests, asks each request's :class:`~budgetlm.meter.Meter` for a reservation (which
clamps ``max_tokens`` so no call can overshoot a token, FLOP or dollar budget), calls the engine
once for the whole batch, splits thinking from answers, builds one :class:`~budgetlm.usage.Usage`
per request (tokens, thinking tokens, latency, FLOPs, dollars, joules) and charges it.

Logprobs are always those of the model's *raw* distribution (before temperature, top-k and top-p),
as vLLM reports them by default, so that :meth:`Backend.score` agrees with generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable

from pydantic import ConfigDict, Field, model_validator

from budgetlm.backends.streaming import Delta, DeltaCallback, Sink
from budgetlm.config import Config
from budgetlm.costs import CostModel, EnergyMeter, ModelInfo, PriceTable, estimate_tokens
from budgetlm.errors import BudgetExceeded, ConfigError, ContextLengthExceeded
from budgetlm.meter import Meter, Reservation
from budgetlm.thinking import NO_THINKING, ThinkingFormat, count_thinking_tokens, split_thinking
from budgetlm.usage import FinishReason, Usage

if TYPE_CHECKING:
    import numpy as np
    import torch

Message = dict[str, str]


class SamplingParams(Config):
    """Sampling settings of one request (validated at construction)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(default=1, ge=1, description="Samples to draw for the prompt (at least one).")
    temperature: float = Field(default=1.0, ge=0, description="Softmax temperature; 0 means greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass in (0, 1].")
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens; 0 disables.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens per sample (the meter may clamp it).")
    stop: list[str] = Field(default_factory=list, description="Strings that end a sample (not included).")
    logprobs: int | None = Field(
        default=None, ge=0, description="None: no logprobs; 0: the sampled token's; k > 0: also the top-k alternatives."
    )
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="Constrain each sample's output to this JSON schema (needs a backend with constrained decoding).",
    )

    @property
    def greedy(self) -> bool:
        """True for temperature 0."""
        return self.temperature == 0


class SpeculativeDecoding(Config):
    """Decode one request speculatively: draft with ``drafter``, verify with the target (ALGORITHMS.md §6-7).

    Set on :attr:`GenerationRequest.speculative`; only backends with a speculative token loop
    (:attr:`Backend.speculative_decoding`, the transformers backend) accept it.  Per request, so
    requests decoded differently can run side by side on one backend.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    drafter: str = Field(default="layerskip", min_length=1, description=(
        "'layerskip' (the target's first `layers` layers), 'ngram' (prompt lookup) or a path to a smaller "
        "model with the same tokenizer."))
    gamma: int = Field(default=4, ge=1, description="Draft tokens per round.")
    adaptive: bool = Field(default=False, description="Adapt gamma to the acceptance rate.")
    layers: int | None = Field(default=None, ge=1, description="Layers of the layerskip drafter (None: half).")
    ngram: int = Field(default=3, ge=1, description="n-gram length of the ngram drafter.")
    rule: str | None = Field(default=None, description=(
        "A speculative-cascade deferral rule (lossy): chow, diff, opt, v1, v2, v3; None: lossless verification."))
    alpha: float = Field(default=0.0, ge=0, le=1, description="Lenience of the deferral rule (ignored without one).")

    @model_validator(mode="after")
    def _check(self) -> SpeculativeDecoding:
        if self.rule is not None:
            from budgetlm.specdec import RULES  # lazy: torch

            if self.rule not in RULES:
                raise ValueError(f"`rule` must be one of {', '.join(RULES)} or None, got {self.rule!r}")
        return self


class GenerationRequest(Config):
    """One prompt to complete: chat ``messages``, a raw ``prompt`` or ``prompt_token_ids``."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    messages: list[Message] | None = Field(default=None, description="Chat messages (role/content dicts).")
    prompt: str | None = Field(default=None, description="A raw, already formatted prompt.")
    prompt_token_ids: list[int] | None = Field(default=None, description="A prompt as token ids.")
    assistant_prefix: str | None = Field(default=None, description="Text the reply starts with; generation continues it.")
    sampling: SamplingParams = Field(default_factory=SamplingParams, description="Sampling settings.")
    may_think: bool = Field(default=True, description="False when the reply cannot contain thinking (thinking budget not applied).")
    meter: Meter | None = Field(default=None, description="Meter charged for this request (else the call's meter).", exclude=True)
    id: str | None = Field(default=None, description="Caller's id, echoed in the result.")
    speculative: SpeculativeDecoding | None = Field(default=None, description=(
        "Decode this request speculatively (backends with `speculative_decoding` only); None: plain decoding."))

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerationRequest:
        given = [k for k in ("messages", "prompt", "prompt_token_ids") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a request must have exactly one of `messages`, `prompt`, `prompt_token_ids`, got {given or 'none'}"
            )
        if self.messages is not None:
            if not self.messages:
                raise ValueError("`messages` must be a non-empty list of chat messages, got []")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError(f"`messages[{i}]` must be a dict with 'role' and 'content', got {m!r}")
        if self.prompt is not None and not self.prompt.strip() and not self.assistant_prefix:
            raise ValueError("`prompt` must be a non-empty string, got an empty prompt; pass the question text")
        if self.prompt_token_ids is not None and not self.prompt_token_ids:
            raise ValueError("`prompt_token_ids` must be a non-empty list, got []")
        return self


def make_request(
    item: str | list[Message] | GenerationRequest, sampling: SamplingParams | None = None, **kw: Any
) -> GenerationRequest:
    """A request from a question string (one user message), a message list, or a request."""
    if isinstance(item, GenerationRequest):
        return item
    if isinstance(item, str):
        if not item.strip():
            raise ConfigError("`prompt` must be a non-empty string, got ''; pass the question text")
        return GenerationRequest(messages=[{"role": "user", "content": item}], sampling=sampling or SamplingParams(), **kw)
    if not isinstance(item, list):
        raise ConfigError(f"a request must be a string, a message list or a GenerationRequest, got {type(item).__name__}")
    return GenerationRequest(messages=list(item), sampling=sampling or SamplingParams(), **kw)


@dataclass
class Completion:
    """One sample of a request."""

    text: str
    """The generated text (assistant prefix not included)."""
    token_ids: list[int]
    """Generated token ids; ``len(token_ids)`` is what the sample cost in output tokens."""
    finish_reason: str
    """One of :data:`~budgetlm.usage.FinishReason`: ``stop`` (end of sequence or stop string), ``length``
    (max_tokens), ``abort``, ``deadline``, ``error``."""
    logprobs: list[float] | None = None
    """Raw log-probability of each generated token, when asked."""
    top_logprobs: list[dict[int, float]] | None = None
    """Top-k alternatives per position (token id → logprob), when ``logprobs > 0``."""
    thinking: str = ""
    """The thinking part (tags removed)."""
    answer: str = ""
    """The text after thinking (the whole text for models without thinking)."""
    thinking_tokens: int = 0
    """Generated tokens inside thinking."""
    thinking_truncated: bool = False
    """Thinking was cut off before its end tag: no answer may be extracted."""
    stop_string: str | None = None
    """The stop string that ended the sample; ``None`` for end of sequence, length, or when the engine
    does not say (OpenAI-compatible servers other than vLLM)."""

    @property
    def truncated(self) -> bool:
        """True when the token limit stopped the sample."""
        return self.finish_reason == "length"

    @property
    def mean_logprob(self) -> float | None:
        """Mean token logprob (a confidence signal), when logprobs were asked."""
        if not self.logprobs:
            return None
        return sum(self.logprobs) / len(self.logprobs)


@dataclass
class GenerationResult:
    """The samples of one request and what they cost."""

    request: GenerationRequest
    """The request as given."""
    completions: list[Completion]
    """The samples (empty when the request was skipped for lack of budget)."""
    usage: Usage
    """Spend of the request: prompt once, all samples' output."""
    prompt_token_ids: list[int] = field(default_factory=list)
    """The rendered prompt's token ids (when the backend tokenises locally)."""
    max_tokens: int = 0
    """The per-sample ``max_tokens`` actually used after clamping."""
    clamped_by: str | None = None
    """The budget unit that clamped ``max_tokens``, if any."""
    skipped: str | None = None
    """Why the request was not run (budget exhausted), or ``None``."""

    @property
    def first(self) -> Completion:
        """The first sample."""
        return self.completions[0]


@dataclass
class RawCompletion:
    """What an engine returns for one sample, before budgetlm's accounting."""

    token_ids: list[int]
    text: str
    finish_reason: str  # one of FinishReason
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    stop_string: str | None = None


@dataclass
class RawResult:
    """What an engine returns for one request."""

    completions: list[RawCompletion]
    prompt_tokens: int | None = None
    """Engine-reported prompt tokens (else the local count is used)."""
    cached_prompt_tokens: int = 0
    """Engine-reported prefix-cache hits."""
    usage_check: dict[str, int] | None = None
    """Server usage fields kept for cross-checking (OpenAI backend)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Engine facts kept in the usage record (e.g. speculative-decoding statistics); ``flops_extra``
    is added to the call's FLOPs (compute beyond prompt and output tokens, such as drafting)."""


@dataclass
class PreparedRequest:
    """A request rendered to its final prompt, with clamped sampling settings."""

    request: GenerationRequest
    prompt_text: str | None
    """The full prompt as text (chat template and assistant prefix applied), if known."""
    prompt_token_ids: list[int] | None
    """The full prompt as token ids, if the backend tokenises locally."""
    sampling: SamplingParams
    """Sampling settings with ``max_tokens`` clamped."""
    deadline: float | None = None
    """Deadline on the backend's :attr:`~Backend.clock` from the wall-seconds budget, if any."""
    abort: threading.Event | None = None
    """Set when the caller gave the request up (token loops stop at it)."""


@dataclass
class ScoreResult:
    """Log-probabilities of a given continuation."""

    token_ids: list[int]
    """The continuation's token ids."""
    logprobs: list[float]
    """Raw log-probability of each continuation token given everything before it."""
    usage: Usage
    """Spend: the whole sequence as prompt tokens, no output tokens."""
    skipped: str | None = None
    """Why the pair was not scored (budget exhausted), or ``None``."""

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean(self) -> float:
        return float(sum(self.logprobs) / len(self.logprobs)) if self.logprobs else 0.0


@runtime_checkable
class SpeculativeBackend(Protocol):
    """A backend whose token loop can draft and verify (lossless speculative decoding, speculative cascades)."""

    def speculative(self, drafter: str = "layerskip", gamma: int = 4, *, adaptive: bool = False,
                    rule: str | None = None, alpha: float = 0.0, layers: int | None = None,
                    ngram: int = 3) -> contextlib.AbstractContextManager[object]:
        """A context manager within which requests without their own ``speculative`` setting decode speculatively
        (per request: :attr:`GenerationRequest.speculative`)."""


@runtime_checkable
class TokenLevelBackend(Protocol):
    """Backends that expose next-token distributions (for token-level algorithms)."""

    def next_token_logprobs(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw next-token log-probabilities after each sequence, shape ``[batch, vocab]``."""
        ...


@runtime_checkable
class EmbeddingBackend(Protocol):
    """Backends that give a fixed-size vector per text (features for learned routers)."""

    def embed(self, texts: Sequence[str]) -> np.ndarray | torch.Tensor:
        """One vector per text, shape ``[batch, dim]`` (array or tensor)."""
        ...


@runtime_checkable
class ThinkingBudgetBackend(Protocol):
    """Backends whose engine can cap thinking itself (vLLM's ``thinking_token_budget``)."""

    @property
    def supports_thinking_budget(self) -> bool:
        """True when the engine applies per-request thinking budgets (a reasoning parser is set)."""
        ...

    def thinking_token_budgets(self, budgets: Sequence[tuple[GenerationRequest, int]]) -> contextlib.AbstractContextManager[None]:
        """A context manager inside which ``generate`` passes each request its thinking budget."""
        ...


@contextlib.asynccontextmanager
async def _held(res: Reservation | None) -> AsyncIterator[Reservation | None]:
    """``async with`` a reservation, or nothing when the request has no meter."""
    if res is None:
        yield None
        return
    async with res:
        yield res


class GenerationStream:
    """The deltas of one streamed request (``async for``), then its :class:`GenerationResult`.

    Made by :meth:`Backend.astream`.  The request starts on the first ``__anext__``.  Closing the
    stream early (``break`` out of ``async for`` and :meth:`aclose`, or an error in the consumer)
    cancels the request: the engine aborts it and its meter is charged what was generated.
    """

    def __init__(self, backend: Backend, request: GenerationRequest | str | list[Message], meter: Meter | None,
                 sampling: SamplingParams | None) -> None:
        self._backend = backend
        self._request = request
        self._meter = meter
        self._sampling = sampling
        self._queue: asyncio.Queue[Delta | None] = asyncio.Queue()
        self._task: asyncio.Task[GenerationResult] | None = None
        self.result: GenerationResult | None = None
        """The request's result once the stream is exhausted."""

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Delta:
        if self._task is None:
            # Validate and reserve now, so that bad input and exhausted budgets raise here, not later.
            self._task = asyncio.ensure_future(self._backend.agenerate_one(
                self._request, self._meter, sampling=self._sampling, on_delta=self._queue.put_nowait))
            self._task.add_done_callback(lambda _t: self._queue.put_nowait(None))
        item = await self._queue.get()
        if item is None:
            self.result = await self._task  # re-raises the request's error
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Cancel the request if it is still running (charging what was generated)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Backend(ABC):
    """Base class of all backends; see the module docstring."""

    kind: str = "base"
    speculative_decoding: bool = False
    """True when requests may set :attr:`GenerationRequest.speculative` (a draft-and-verify token loop)."""
    constrained_decoding: bool = False
    """True when requests may set :attr:`SamplingParams.json_schema` (structured outputs)."""

    def __init__(
        self,
        *,
        name: str,
        thinking: ThinkingFormat | None = None,
        prices: PriceTable | None = None,
        flops: Literal["plain", "kinetics"] = "kinetics",
        measure_energy: bool = True,
    ) -> None:
        self.name = name
        self.thinking = thinking or NO_THINKING
        self.prices = prices or PriceTable()
        self._flops_kind = flops
        self._cost_model: CostModel | None = None
        self._energy = EnergyMeter() if measure_energy else None
        self.clock: Callable[[], float] = time.monotonic
        """The clock deadlines are measured on (meters' wall seconds use the same; tests may replace both)."""

    # ------------------------------------------------------------------ hooks
    @property
    @abstractmethod
    def info(self) -> ModelInfo:
        """Model facts for cost models."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` (special tokens skipped)."""

    @abstractmethod
    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The model's chat template applied to ``messages``."""

    @abstractmethod
    def _generate(self, batch: list[PreparedRequest]) -> list[RawResult]:
        """Run all requests of the batch in one engine call."""

    @abstractmethod
    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        """Raw logprobs of each continuation token after its prompt."""

    def close(self) -> None:
        """Release the engine (threads, processes, GPU memory)."""

    # ------------------------------------------------------------------ shared
    @property
    def cost_model(self) -> CostModel:
        """The FLOPs model of this backend's model."""
        if self._cost_model is None:
            self._cost_model = CostModel(self.info, kind=self._flops_kind)
        return self._cost_model

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``."""
        return len(self.encode(text))

    def render(self, request: GenerationRequest) -> tuple[str | None, list[int] | None]:
        """The full prompt of ``request`` as text and token ids."""
        prefix = request.assistant_prefix or ""
        if request.messages is not None:
            text = self.apply_chat_template(request.messages, add_generation_prompt=True) + prefix
            return text, self._encode_prompt(text)
        if request.prompt is not None:
            text = request.prompt + prefix
            return text, self._encode_prompt(text)
        ids = list(request.prompt_token_ids or [])
        if prefix:
            ids += self.encode(prefix)
        return None, ids

    def _encode_prompt(self, text: str) -> list[int]:
        """Prompt text to ids; chat templates already contain the special tokens."""
        return self.encode(text)

    def _estimate(self, prompt_tokens: int, max_tokens: int, n: int, model: str | None = None) -> tuple[float, float]:
        flops = self.cost_model.flops(prompt_tokens, max_tokens, n)
        usd = self.prices.cost(model or self.name, prompt_tokens, 0, n * max_tokens)
        return flops, usd

    # ------------------------------------------------------------------ one request: prepare and account
    def _prepare(self, req: GenerationRequest, meter: Meter | None,
                 share: int | None = None) -> tuple[PreparedRequest, Reservation | None]:
        """Render ``req``, check its context, and reserve its worst case on its meter (clamping ``max_tokens``).

        Raises :class:`~budgetlm.errors.BudgetExceeded` when not one token fits and
        :class:`~budgetlm.errors.ContextLengthExceeded` when the prompt fills the model's context.
        """
        if req.speculative is not None and not self.speculative_decoding:
            raise ConfigError(
                f"`speculative` decoding needs a backend with a speculative token loop (hf:PATH), got "
                f"{type(self).__name__}; for vLLM pass speculative_config to the engine instead"
            )
        if req.sampling.json_schema is not None and not self.constrained_decoding:
            raise ConfigError(
                f"`json_schema` needs a backend with constrained decoding (vLLM), got {type(self).__name__}; "
                "serve the model with vllm:PATH or leave json_schema unset"
            )
        text, ids = self.render(req)
        n_prompt = len(ids) if ids is not None else estimate_tokens(text or "")
        ctx = self._max_context()
        if ctx and n_prompt >= ctx:
            raise ContextLengthExceeded(n_prompt, ctx)
        m = req.meter or meter
        sp = req.sampling
        res = None
        deadline = None
        if m is not None:
            res = m.reserve(
                prompt_tokens=n_prompt,
                max_tokens=sp.max_tokens if share is None else max(1, min(sp.max_tokens, share)),
                n=sp.n,
                may_think=req.may_think and self.thinking.enabled,
                cost=lambda p, k, n: self._estimate(p, k, n),
            )
            if res.max_tokens < sp.max_tokens and res.binding_unit is None:
                res.binding_unit = "output_tokens"  # the fair share of a meter shared in the batch
            res.requested_max_tokens = sp.max_tokens
            if res.max_tokens != sp.max_tokens:
                sp = sp.model_copy(update={"max_tokens": res.max_tokens})
            rw = m.remaining("wall_seconds")
            deadline = None if rw is None else self.clock() + rw
        return PreparedRequest(req, text, ids, sp, deadline), res

    def _max_context(self) -> int:
        """The model's context in tokens (0: unknown, not checked)."""
        return 0

    def _account(self, p: PreparedRequest, raw: RawResult, latency: float,
                 joules: float | None = None) -> tuple[list[Completion], Usage]:
        """Completions and the :class:`Usage` of one request's raw engine output."""
        fmt = self._thinking_for(p.request)
        comps = [self._finish(c, fmt) for c in raw.completions]
        n_prompt = raw.prompt_tokens if raw.prompt_tokens is not None else (
            len(p.prompt_token_ids) if p.prompt_token_ids is not None else estimate_tokens(p.prompt_text or "")
        )
        lengths = [len(c.token_ids) for c in comps]
        usage = Usage(
            prompt_tokens=n_prompt,
            cached_prompt_tokens=raw.cached_prompt_tokens,
            output_tokens=sum(lengths),
            thinking_tokens=sum(c.thinking_tokens for c in comps),
            latency_s=latency,
            flops=self.cost_model.flops_for_outputs(n_prompt, lengths) + float(raw.extra.get("flops_extra", 0.0)),
            usd=self.prices.cost(self.name, n_prompt, raw.cached_prompt_tokens, sum(lengths)),
            joules=joules,
            model=self.name,
            finish_reason=cast("FinishReason | None", comps[-1].finish_reason if comps else None),
            extra={k: v for k, v in raw.extra.items() if k != "flops_extra"},
        )
        if raw.usage_check:
            usage.extra.update({k: float(v) for k, v in raw.usage_check.items() if isinstance(v, (int, float))})
        return comps, usage

    def _shares(self, reqs: list[GenerationRequest], meter: Meter | None) -> dict[int, int]:
        """Per-sample token shares of the meters that several requests of one batch share (see
        :meth:`Meter.fair_share <budgetlm.meter.Meter.fair_share>`)."""
        groups: dict[int, tuple[Meter, int, int, int]] = {}
        for req in reqs:
            m = req.meter or meter
            if m is None:
                continue
            text, ids = self.render(req)
            n_prompt = len(ids) if ids is not None else estimate_tokens(text or "")
            _, k, samples, prompts = groups.get(id(m), (m, 0, 0, 0))
            groups[id(m)] = (m, k + 1, samples + req.sampling.n, prompts + n_prompt)
        shares: dict[int, int] = {}
        for key, (m, k, samples, prompts) in groups.items():
            if k >= 2:
                share = m.fair_share(samples, prompts, may_think=self.thinking.enabled)
                if share is not None:
                    shares[key] = share
        return shares

    # ------------------------------------------------------------------ batch (sync) API
    def generate(
        self,
        requests: Sequence[GenerationRequest | str | list[Message]],
        meter: Meter | None = None,
        *,
        sampling: SamplingParams | None = None,
        on_budget_exhausted: Literal["raise", "skip"] = "raise",
    ) -> list[GenerationResult]:
        """Generate for all ``requests`` in one engine call, clamped to and charged on the meter.

        Strings and message lists become requests with ``sampling``.  When a request's budget
        cannot afford even one token, ``on_budget_exhausted="raise"`` raises
        :class:`~budgetlm.errors.BudgetExceeded` before anything runs, and ``"skip"`` returns a
        result with no completions and ``skipped`` set, running the other requests.
        """
        if on_budget_exhausted not in ("raise", "skip"):
            raise ConfigError(f"`on_budget_exhausted` must be 'raise' or 'skip', got {on_budget_exhausted!r}")
        reqs = [make_request(r, sampling) for r in requests]
        results: list[GenerationResult | None] = [None] * len(reqs)
        prepared: list[tuple[int, PreparedRequest, Reservation | None]] = []
        shares = self._shares(reqs, meter)
        with contextlib.ExitStack() as held:  # every reservation is settled or released on the way out
            for i, req in enumerate(reqs):
                try:
                    p, res = self._prepare(req, meter, shares.get(id(req.meter or meter)))
                except BudgetExceeded as exc:
                    if on_budget_exhausted == "raise":
                        raise
                    text, ids = self.render(req)
                    results[i] = GenerationResult(req, [], Usage.zero(), ids or [], 0, exc.unit, skipped=str(exc))
                    continue
                if res is not None:
                    held.enter_context(res)
                prepared.append((i, p, res))
            if not prepared:
                return [r for r in results if r is not None]
            e0 = self._energy.read_mj() if self._energy else None
            t0 = time.perf_counter()
            raws = self._generate([p for _, p, _ in prepared])
            latency = time.perf_counter() - t0
            joules = self._energy.joules_since(e0) if self._energy else None
            total_out = sum(len(c.token_ids) for raw in raws for c in raw.completions) or 1
            for (idx, p, res), raw in zip(prepared, raws, strict=True):
                out = sum(len(c.token_ids) for c in raw.completions)
                comps, usage = self._account(p, raw, latency, None if joules is None else joules * out / total_out)
                if res is not None:
                    res.settle(usage)
                results[idx] = GenerationResult(
                    p.request, comps, usage, p.prompt_token_ids or [], p.sampling.max_tokens,
                    res.binding_unit if res is not None else None,
                )
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ per-request (async) API
    async def agenerate_one(
        self,
        request: GenerationRequest | str | list[Message],
        meter: Meter | None = None,
        *,
        sampling: SamplingParams | None = None,
        on_delta: DeltaCallback | None = None,
        share: int | None = None,
    ) -> GenerationResult:
        """Generate one request on the running engine, concurrently with every other request in flight.

        The request is reserved on its meter (``max_tokens`` clamped), runs until it ends, its
        meter's wall-clock deadline passes (``finish_reason="deadline"``), or the awaiting task is
        cancelled — which aborts it in the engine and charges exactly the tokens generated (prompt
        plus partial output) before :class:`asyncio.CancelledError` propagates.  ``on_delta`` is
        called on this event loop with every new piece of output (:class:`Delta`).  ``share`` caps
        the per-sample tokens (the fair share of a meter several requests use at once).
        """
        req = make_request(request, sampling)
        p, res = self._prepare(req, meter, share)
        sink = Sink(p.sampling.n, on_delta, asyncio.get_running_loop())
        sink.deadline = p.deadline
        t0 = time.perf_counter()
        async with _held(res) as r:
            try:
                raw = await self._run_request(p, sink)
            except BaseException:
                if r is not None and sink.admitted:  # charge what was generated before the error/cancel
                    r.progress(self._account(p, sink.raw("abort"), time.perf_counter() - t0)[1])
                raise
            comps, usage = self._account(p, raw, time.perf_counter() - t0)
            if r is not None:
                r.settle(usage)
        return GenerationResult(req, comps, usage, p.prompt_token_ids or [], p.sampling.max_tokens,
                                res.binding_unit if res is not None else None)

    def astream(self, request: GenerationRequest | str | list[Message], meter: Meter | None = None, *,
                sampling: SamplingParams | None = None) -> GenerationStream:
        """Stream one request: ``async for delta in backend.astream(...)``; ``.result`` once it ends.

        Leaving the loop early (``break``, an exception, :meth:`GenerationStream.aclose`) cancels the
        request: the engine aborts it and the meter is charged what was generated.
        """
        return GenerationStream(self, request, meter, sampling)

    async def _run_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        """:meth:`_agenerate_request` under the request's deadline (``finish_reason="deadline"`` at it)."""
        if p.deadline is None:
            return await self._agenerate_request(p, sink)
        task = asyncio.ensure_future(self._agenerate_request(p, sink))
        try:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, p.deadline - self.clock()))
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if task in done:
            return task.result()
        sink.end_reason = "deadline"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sink.close_open("deadline")
        return sink.raw("deadline")

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        """Run one prepared request, pushing output into ``sink``; backends with an async engine override it.

        Contract: on cancellation, stop the engine's work on the request and leave ``sink`` holding
        exactly what was generated before re-raising.  This default runs the batch hook
        :meth:`_generate` for one request in a worker thread; cancelling sets ``sink.abort`` (token
        loops that poll it stop) and waits for the thread, whose output is then what was generated.
        """
        fut = asyncio.ensure_future(asyncio.to_thread(self._generate_one_blocking, p, sink))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            sink.abort.set()
            while not fut.done():  # wait for the thread whatever further cancellations arrive
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.shield(fut)
            if sink.admitted and not fut.cancelled() and fut.exception() is None:
                for i, c in enumerate(fut.result().completions):
                    sink.push(i, c.token_ids, c.text, finish_reason=sink.end_reason or "abort")
            raise

    def _generate_one_blocking(self, p: PreparedRequest, sink: Sink) -> RawResult:
        """One request through the batch hook (called in a worker thread by the default async path)."""
        if sink.abort.is_set():  # given up before it started: nothing ran, nothing is charged
            return RawResult([RawCompletion([], "", "abort") for _ in range(p.sampling.n)], prompt_tokens=0)
        sink.admit()
        raw = self._generate([dataclasses.replace(p, abort=sink.abort)])[0]
        if raw.prompt_tokens is not None:
            sink.admit(raw.prompt_tokens, raw.cached_prompt_tokens)
        if not sink.abort.is_set():
            for i, c in enumerate(raw.completions):
                sink.push(i, c.token_ids, c.text, logprobs=c.logprobs, top_logprobs=c.top_logprobs,
                          finish_reason=c.finish_reason, stop_string=c.stop_string)
        return raw

    async def agenerate(
        self,
        requests: Sequence[GenerationRequest | str | list[Message]],
        meter: Meter | None = None,
        *,
        sampling: SamplingParams | None = None,
        on_budget_exhausted: Literal["raise", "skip"] = "raise",
    ) -> list[GenerationResult]:
        """Async :meth:`generate`: every request runs concurrently through :meth:`agenerate_one`."""
        if on_budget_exhausted not in ("raise", "skip"):
            raise ConfigError(f"`on_budget_exhausted` must be 'raise' or 'skip', got {on_budget_exhausted!r}")
        reqs = [make_request(r, sampling) for r in requests]
        shares = self._shares(reqs, meter)

        async def one(req: GenerationRequest) -> GenerationResult:
            try:
                return await self.agenerate_one(req, meter, share=shares.get(id(req.meter or meter)))
            except BudgetExceeded as exc:
                if on_budget_exhausted == "raise":
                    raise
                _, ids = self.render(req)
                return GenerationResult(req, [], Usage.zero(), ids or [], 0, exc.unit, skipped=str(exc))

        return list(await asyncio.gather(*(one(r) for r in reqs)))

    async def ascore(self, prompt: str | list[int] | list[Message], continuation: str | list[int],
                     meter: Meter | None = None) -> ScoreResult:
        """Async :meth:`score` (runs beside generation on the same engine)."""
        return await asyncio.to_thread(self.score, prompt, continuation, meter)

    def _thinking_for(self, request: GenerationRequest) -> ThinkingFormat:
        """The thinking format for a request, given where its assistant prefix leaves off.

        A prefix that leaves thinking open (``<think>…``) makes the output start inside thinking;
        one that closes it (``…</think>``, also when the template opened the tag) makes the output
        start after it, so a continued answer is not counted as thinking.
        """
        fmt = self.thinking
        if fmt.enabled and request.assistant_prefix:
            sp = split_thinking(request.assistant_prefix, fmt)
            if sp.has_thinking and sp.truncated != fmt.starts_in_thinking:
                fmt = fmt.model_copy(update={"starts_in_thinking": sp.truncated})
        return fmt

    def _finish(self, c: RawCompletion, fmt: ThinkingFormat | None = None) -> Completion:
        fmt = fmt or self.thinking
        sp = split_thinking(c.text, fmt, c.finish_reason)
        n_think = count_thinking_tokens(c.token_ids, self.decode, fmt) if sp.has_thinking else 0
        return Completion(
            text=c.text,
            token_ids=list(c.token_ids),
            finish_reason=c.finish_reason,
            logprobs=c.logprobs,
            top_logprobs=c.top_logprobs,
            thinking=sp.thinking,
            answer=sp.answer,
            thinking_tokens=n_think,
            thinking_truncated=sp.truncated,
            stop_string=c.stop_string,
        )

    def score(
        self,
        prompt: str | list[int] | list[Message],
        continuation: str | list[int],
        meter: Meter | None = None,
    ) -> ScoreResult:
        """Raw log-probabilities of ``continuation`` after ``prompt`` (one per continuation token)."""
        return self.score_batch([(prompt, continuation)], meter)[0]

    def score_batch(
        self,
        pairs: Sequence[tuple[str | list[int] | list[Message], str | list[int]]],
        meter: Meter | None = None,
        *,
        meters: Sequence[Meter | None] | None = None,
        on_budget_exhausted: Literal["raise", "skip"] = "raise",
    ) -> list[ScoreResult]:
        """:meth:`score` for many pairs in one engine call; charged as prompt tokens.

        ``meters`` gives each pair its own meter (else ``meter`` is charged for all).  A pair whose
        meter cannot afford it raises :class:`~budgetlm.errors.BudgetExceeded` before anything
        runs, or with ``on_budget_exhausted="skip"`` gets a result with no logprobs and ``skipped``
        set while the other pairs run.
        """
        if meters is not None and len(meters) != len(pairs):
            raise ConfigError(f"`meters` must have one entry per pair ({len(pairs)}), got {len(meters)}")
        if on_budget_exhausted not in ("raise", "skip"):
            raise ConfigError(f"`on_budget_exhausted` must be 'raise' or 'skip', got {on_budget_exhausted!r}")
        prompts: list[list[int]] = []
        conts: list[list[int]] = []
        for i, (p, c) in enumerate(pairs):
            if isinstance(p, str):
                if not p:
                    raise ConfigError(f"`prompt` of pair {i} must be non-empty, got ''")
                pid = self._encode_prompt(p)
            elif p and isinstance(p[0], dict):
                pid = self._encode_prompt(self.apply_chat_template(p, add_generation_prompt=True))
            else:
                pid = [int(t) for t in cast(list[int], p)]
            cid = self.encode(c) if isinstance(c, str) else [int(t) for t in c]
            if not pid or not cid:
                raise ConfigError(f"`prompt` and `continuation` of pair {i} must both be non-empty")
            prompts.append(pid)
            conts.append(cid)
        pair_meters = list(meters) if meters is not None else [meter] * len(pairs)
        reservations: list[Reservation | None] = []
        skipped: dict[int, str] = {}
        try:
            for j, (pid, cid, m) in enumerate(zip(prompts, conts, pair_meters, strict=True)):
                if m is None:
                    reservations.append(None)
                    continue
                try:
                    reservations.append(m.reserve(
                        prompt_tokens=len(pid) + len(cid), max_tokens=0, min_tokens=0,
                        cost=lambda p, k, n: self._estimate(p, k, n),
                    ))
                except BudgetExceeded as e:
                    if on_budget_exhausted == "raise":
                        raise
                    reservations.append(None)
                    skipped[j] = f"budget exhausted: {e.unit}" if e.unit else "budget exhausted"
        except BudgetExceeded:
            for r in reservations:
                if r is not None:
                    r.release()
            raise
        run = [j for j in range(len(pairs)) if j not in skipped]
        t0 = time.perf_counter()
        try:
            lps = self._score([prompts[j] for j in run], [conts[j] for j in run]) if run else []
        except BaseException:
            for r in reservations:
                if r is not None:
                    r.release()
            raise
        latency = time.perf_counter() - t0
        by_pair = dict(zip(run, lps, strict=True))
        out = []
        for j, (pid, cid) in enumerate(zip(prompts, conts, strict=True)):
            if j in skipped:
                out.append(ScoreResult(cid, [], Usage(calls=0, model=self.name), skipped=skipped[j]))
                continue
            n = len(pid) + len(cid)
            usage = Usage(
                prompt_tokens=n, latency_s=latency, flops=self.cost_model.flops(n, 0, 1),
                usd=self.prices.cost(self.name, n, 0, 0), model=self.name, finish_reason="stop",
            )
            m = pair_meters[j]
            if m is not None:
                m.charge(usage, reservations[j])
            out.append(ScoreResult(cid, [float(x) for x in by_pair[j]], usage))
        return out

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
