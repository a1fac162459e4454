"""The FastAPI application: OpenAI-compatible chat completions under budgets, per-key allowances, metrics.

Endpoints:

- ``POST /v1/chat/completions`` — answer with a strategy under a budget (see
  :mod:`budgetlm.server.protocol` for the fields); streaming as server-sent events;
- ``GET /v1/models`` — ``budgetlm/<strategy>`` and ``<backend>/<strategy>`` for every backend and
  allowed strategy;
- ``GET /v1/allowance`` — the calling key's allowance, spend and what is left today;
- ``GET /health`` — liveness, backends and queue lengths;
- ``GET /metrics`` — Prometheus text (:mod:`budgetlm.server.metrics`).

Errors use the OpenAI error shape with the status the official client maps to its exceptions:
400 bad request (unknown strategy, listing the names; malformed budget), 401 missing or wrong key,
404 unknown backend, 413 body too large, 429 allowance spent, 500 strategy failure.

**Streaming.**  Strategies finish before their answer is known (a vote needs all its samples), so
a streamed response sends the role chunk at once, keep-alive comments while the strategy runs, then
the answer in word-sized chunks, the finish chunk (with the ``budgetlm`` ledger) and, with
``stream_options.include_usage``, the usage chunk.  Token-by-token streaming of plain sampling is
not implemented.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

try:  # this module is imported only by create_app, so `import budgetlm.server` stays light
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.background import BackgroundTask
except ImportError as exc:  # pragma: no cover - the server extra is installed by the test command
    from budgetlm.errors import MissingDependency

    raise MissingDependency("fastapi", "budgetlm serve", extra="server") from exc

from budgetlm.backends import load as load_backend
from budgetlm.backends.base import Backend
from budgetlm.budget import UNITS, Budget, check_limits
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.server.config import ServerConfig
from budgetlm.server.dispatch import BackendWorker, Job, StrategyCache
from budgetlm.server.metrics import Metrics
from budgetlm.server.protocol import ChatRequest, chunk, completion, error_body, extra_block, finish_reason, usage_block
from budgetlm.server.store import AllowanceExceeded, AllowanceStore
from budgetlm.strategies import STRATEGIES
from budgetlm.strategies.base import Problem, Result

__all__ = ["ANONYMOUS", "ApiError", "create_app"]

ANONYMOUS = "anonymous"
"""The allowance key of requests when the server has no API keys."""
KEEPALIVE_S = 10.0


class ApiError(Exception):
    """An error answered with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


class ServerState:
    """Everything a request needs: config, backends and their workers, allowances, metrics, strategies."""

    def __init__(self, cfg: ServerConfig, backends: dict[str, Backend] | None) -> None:
        self.cfg = cfg
        self.given = dict(backends or {})
        self.backends: dict[str, Backend] = {}
        self.workers: dict[str, BackendWorker] = {}
        self.store = AllowanceStore(cfg.db_path)
        self.metrics = Metrics()
        self.strategies = StrategyCache()
        self.started = time.time()

    def start(self) -> None:
        for name, spec in self.cfg.backends.items():
            be = self.given.get(name) or load_backend(spec)
            self.backends[name] = be
            w = BackendWorker(name, be, window_ms=self.cfg.batch_window_ms, max_batch=self.cfg.max_batch)
            w.start()
            self.workers[name] = w

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()
        self.strategies.close()
        for name, be in self.backends.items():
            if name not in self.given:
                be.close()
        self.store.close()

    # ------------------------------------------------------------------ request parsing
    def allowed(self) -> list[str]:
        return self.cfg.strategies or STRATEGIES.names()

    def resolve_model(self, model: str) -> tuple[str, str]:
        """``(backend name, strategy name)`` of a model id."""
        first = next(iter(self.cfg.backends))
        head, sep, tail = model.partition("/")
        if not sep:
            if head in self.cfg.backends or head == "budgetlm":
                return (first if head == "budgetlm" else head), "sample"
            raise ApiError(404, f"`model` must be budgetlm/<strategy> or <backend>/<strategy>, got {model!r}; "
                                f"backends: {', '.join(self.cfg.backends)}; GET /v1/models lists every id",
                           "model", "model_not_found")
        backend = first if head == "budgetlm" else head
        if backend not in self.cfg.backends:
            raise ApiError(404, f"unknown backend {head!r} in model {model!r}; backends: budgetlm (= {first}), "
                                f"{', '.join(self.cfg.backends)}", "model", "model_not_found")
        if tail not in self.allowed():
            raise ApiError(400, f"unknown strategy {tail!r} in model {model!r}; available strategies: "
                                f"{', '.join(self.allowed())}", "model", "unknown_strategy")
        return backend, tail

    def budget(self, req: ChatRequest) -> dict[str, float]:
        """The request's budget: its ``budget`` field (else the default), capped by the standard fields."""
        try:
            if req.budget is not None:
                b = Budget.parse(req.budget).limits()
            else:  # the server's default, within the server's cap (the client asked for nothing above it)
                cap = self.cfg.max_budget or {}
                b = {u: min(lim, cap.get(u, lim)) for u, lim in self.cfg.default_budget.items()}
            check_limits(b, "budget")
        except ConfigError as exc:
            raise ApiError(400, f"`budget` is malformed: {exc}", "budget", "invalid_budget") from None
        except ValueError as exc:  # a zero limit
            raise ApiError(400, str(exc), "budget", "invalid_budget") from None
        caps: list[tuple[str, int | None]] = [("max_completion_tokens", req.max_completion_tokens),
                                              ("max_tokens", req.max_tokens)]
        if req.reasoning_effort is not None:
            if req.reasoning_effort not in self.cfg.effort_budgets:
                raise ApiError(400, f"`reasoning_effort` must be one of {', '.join(self.cfg.effort_budgets)}, got "
                                    f"{req.reasoning_effort!r}", "reasoning_effort")
            caps.append(("reasoning_effort", self.cfg.effort_budgets[req.reasoning_effort]))
        for param, cap in caps:
            if cap is None:
                continue
            if isinstance(cap, bool) or cap < 1:
                raise ApiError(400, f"`{param}` must be >= 1, got {cap!r}", param)
            b["output_tokens"] = min(b.get("output_tokens", cap), cap)
        for unit, lim in (self.cfg.max_budget or {}).items():
            if unit in b and b[unit] > lim:
                raise ApiError(400, f"`budget.{unit}` must be at most {lim:g} on this server, got {b[unit]:g}; ask for "
                                    f"less", "budget", "budget_too_large")
            b.setdefault(unit, lim)
        return b

    def call_cap(self) -> int:
        """The per-call token cap given to strategies: the largest output-token budget a request may have."""
        caps = [int(self.cfg.default_budget.get("output_tokens", 0)), *self.cfg.effort_budgets.values()]
        if self.cfg.max_budget and "output_tokens" in self.cfg.max_budget:
            return int(self.cfg.max_budget["output_tokens"])
        return max([16384, *caps])

    def params(self, strategy: str, req: ChatRequest, budget: dict[str, float]) -> dict[str, Any]:
        """The strategy's parameters: ``strategy_params`` plus the standard sampling fields it takes."""
        params = dict(req.strategy_params or {})
        accepted = inspect.signature(STRATEGIES.get(strategy).__init__).parameters
        for name, value in (("temperature", req.temperature), ("top_p", req.top_p)):
            if value is not None and name in accepted and name not in params:
                params[name] = value
        if "max_tokens" in accepted and "max_tokens" not in params:
            # one server-wide per-call cap, so requests with different budgets share a batch; each request's
            # meter clamps every call to its own budget
            params["max_tokens"] = self.call_cap()
        return params


def _check_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise ApiError(400, "`messages` must hold at least one message, got []", "messages")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"`messages[{i}].role` must be system, user, assistant or tool, got {role!r}",
                           f"messages[{i}].role")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"`messages[{i}].content` must be text, got {type(content).__name__}",
                           f"messages[{i}].content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _key(state: ServerState, authorization: str | None) -> str:
    if state.cfg.api_keys is None:
        return ANONYMOUS
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>' (the official client's "
                            "api_key)", None, "missing_api_key", "authentication_error")
    key = authorization[7:].strip()
    if key not in state.cfg.api_keys:
        raise ApiError(401, "invalid API key; use one of the keys the server was started with", None,
                       "invalid_api_key", "authentication_error")
    return key


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text) or [""]


def create_app(cfg: ServerConfig, backends: dict[str, Backend] | None = None) -> Any:
    """The FastAPI app for ``cfg``; ``backends`` (name → backend) replace loading those names' specs."""
    state = ServerState(cfg, backends)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await asyncio.to_thread(state.start)
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="budgetlm", lifespan=lifespan)
    app.state.budgetlm = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Any, exc: ApiError) -> Any:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backends": cfg.backends, "uptime_s": time.time() - state.started,
                "queued": {n: w.queue.qsize() for n, w in state.workers.items()},
                "in_flight": state.metrics.in_flight}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _key(state, request.headers.get("authorization"))
        ids = [f"budgetlm/{s}" for s in state.allowed()]
        ids += [f"{b}/{s}" for b in cfg.backends for s in state.allowed()]
        created = int(state.started)
        return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "budgetlm"}
                                           for i in ids]}

    @app.get("/v1/allowance")
    async def allowance(request: Request) -> dict[str, Any]:
        key = _key(state, request.headers.get("authorization"))
        limits = cfg.allowance_for(key)
        return {"key": key if key == ANONYMOUS else key[:4] + "…", "allowance": limits,
                "spent_today": state.store.spent(key), "remaining": state.store.remaining(key, limits)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        state.metrics.started()
        model_name, status, strategy_name = "?", "500", None
        counted = False  # _settle has recorded the request in the metrics
        try:
            key = _key(state, request.headers.get("authorization"))
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > cfg.max_request_bytes:
                raise ApiError(413, f"the request body must be at most {cfg.max_request_bytes} bytes, got {length}; "
                                    f"send a shorter conversation", None, "request_too_large")
            raw = await request.body()
            if len(raw) > cfg.max_request_bytes:
                raise ApiError(413, f"the request body must be at most {cfg.max_request_bytes} bytes, got {len(raw)}; "
                                    f"send a shorter conversation", None, "request_too_large")
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise ApiError(400, f"the request body must be JSON, got an unparsable body ({exc})") from None
            if not isinstance(data, dict):
                raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
            try:
                req = ChatRequest(**data)
            except Exception as exc:  # pydantic's ValidationError
                raise ApiError(400, f"malformed request: {exc}") from None
            backend_name, strategy_name = state.resolve_model(req.model)
            model_name = req.model  # only once resolved: client-chosen strings must not become metric labels
            if req.n not in (None, 1):
                raise ApiError(400, f"`n` must be 1, got {req.n}; ask a voting strategy for samples instead, e.g. "
                                    f"model 'budgetlm/majority' with strategy_params {{'n': {req.n}}}", "n")
            if req.tools:
                raise ApiError(400, "`tools` are not supported: budgetlm strategies answer without client-side tool "
                                    "calls; send the request without tools", "tools")
            messages = _check_messages(req.messages)
            budget = state.budget(req)
            params = state.params(strategy_name, req, budget)
            try:
                ckey, strategy = state.strategies.get(strategy_name, params)
            except (ConfigError, TypeError, ValueError) as exc:  # TypeError: a parameter of the wrong type
                raise ApiError(400, f"strategy {strategy_name!r}: {exc}", "strategy_params") from None
            try:
                res, clamped = state.store.reserve(key, cfg.allowance_for(key), budget)
            except AllowanceExceeded as exc:
                raise ApiError(429, str(exc), None, "allowance_exceeded", "rate_limit_error") from None
            meter = Meter(Budget(**clamped), name=res.id)
            job = Job(Problem(id=res.id, messages=messages), meter, ckey, strategy)
            future = state.workers[backend_name].submit(job)
            ctx = {"state": state, "res": res, "meter": meter, "model": req.model, "strategy": strategy_name,
                   "params": params, "budget": clamped, "backend": cfg.backends[backend_name], "key": key,
                   "enqueued": job.enqueued}
            if req.stream:
                include_usage = bool((req.stream_options or {}).get("include_usage"))
                status = "stream"
                return StreamingResponse(_stream(ctx, future, include_usage), media_type="text/event-stream",
                                         background=BackgroundTask(_after_stream, ctx, future))
            try:
                result = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                counted = True
                _settle_when_done(ctx, future)
                raise
            except Exception as exc:
                counted = True
                ctx["settling"] = True
                _settle(ctx, None, str(exc))
                raise ApiError(500, f"the strategy failed: {exc}", None, "strategy_failed", "server_error") from None
            ctx["settling"] = True
            extra = _settle(ctx, result, None)
            status = "ok"
            return JSONResponse(completion(res.id, req.model, result, extra))
        except ApiError as exc:
            status = str(exc.status)
            raise
        finally:
            if not counted and status not in ("ok", "stream"):
                state.metrics.finished(model_name, status)

    return app


def _settle(ctx: dict[str, Any], result: Result | None, error: str | None) -> dict[str, Any]:
    """Commit the request's real spend to the key's allowance and the request log; update metrics."""
    state: ServerState = ctx["state"]
    meter: Meter = ctx["meter"]
    spend = {u: meter.spent(u) for u in UNITS if u not in ("wall_seconds", "joules")}
    ledger = result.ledger if result is not None else meter.summary()
    usage = usage_block(result) if result is not None else {"completion_tokens": meter.spent("output_tokens")}
    state.store.commit(ctx["res"], spend, model=ctx["model"], strategy=ctx["strategy"],
                       status="ok" if error is None else f"error: {error}", usage=usage, ledger=ledger)
    latency = time.monotonic() - ctx["enqueued"]
    if result is not None:
        u = result.usage
        state.metrics.finished(ctx["model"], "ok", ctx["strategy"], latency, u.prompt_tokens, u.output_tokens,
                               u.thinking_tokens, u.cached_prompt_tokens, u.usd, u.flops)
    else:
        state.metrics.finished(ctx["model"], "500", ctx["strategy"], latency)
    left = state.store.remaining(ctx["key"], state.cfg.allowance_for(ctx["key"])) or None
    if result is None:
        return {}
    return extra_block(result, ctx["strategy"], ctx["params"], ctx["budget"], ctx["backend"], left)


def _settle_when_done(ctx: dict[str, Any], future: Any) -> None:
    """Settle a request whose client left before its answer was sent, once its job ends (at most once).

    Without this the reservation would stay held until a restart (the key loses that much allowance)
    and the job's real spend would never be charged.  Runs on the event loop; the settling itself
    runs in the backend worker's thread when the job finishes (the store and metrics are thread-safe).
    """
    if ctx.get("settling"):
        return
    ctx["settling"] = True

    def done(f: Any) -> None:
        if f.cancelled():
            _settle(ctx, None, "cancelled: the client disconnected before the request ran")
        elif f.exception() is not None:
            _settle(ctx, None, str(f.exception()))
        else:
            _settle(ctx, f.result(), None)

    future.add_done_callback(done)


async def _after_stream(ctx: dict[str, Any], future: Any) -> None:
    """After a streamed response (also when the client hung up before the stream started)."""
    _settle_when_done(ctx, future)


async def _stream(ctx: dict[str, Any], future: Any, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        async for part in _stream_parts(ctx, future, include_usage):
            yield part
    finally:  # the client left mid-stream: the job runs on, and is settled when it ends
        _settle_when_done(ctx, future)


async def _stream_parts(ctx: dict[str, Any], future: Any, include_usage: bool) -> AsyncIterator[bytes]:
    rid, model, created = ctx["res"].id, ctx["model"], int(time.time())

    def event(obj: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    yield event(chunk(rid, model, created, {"role": "assistant", "content": ""}))
    wrapped = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=KEEPALIVE_S)
        if done:
            break
        yield b": keep-alive\n\n"
    ctx["settling"] = True
    try:
        result = wrapped.result()
    except Exception as exc:
        _settle(ctx, None, str(exc))
        yield event(error_body(f"the strategy failed: {exc}", "server_error", None, "strategy_failed"))
        yield b"data: [DONE]\n\n"
        return
    extra = _settle(ctx, result, None)
    for piece in _words(result.text):
        yield event(chunk(rid, model, created, {"content": piece}))
    yield event(chunk(rid, model, created, {}, finish_reason(result), extra=extra))
    if include_usage:
        yield event(chunk(rid, model, created, None, usage=usage_block(result)))
    yield b"data: [DONE]\n\n"
