"""The FastAPI application: OpenAI-compatible chat completions under budgets, per-key allowances, metrics.

Endpoints:

- ``POST /v1/chat/completions`` — answer with a strategy under a budget (see
  :mod:`budgetlm.server.protocol` for the fields, documented in ``/openapi.json``); streaming as
  server-sent events;
- ``GET /v1/models`` — ``budgetlm/<strategy>`` and ``<backend>/<strategy>`` for every backend and
  allowed strategy;
- ``GET /v1/allowance`` — the calling key's allowance, spend and what is left today;
- ``GET /health`` — liveness, backends, requests running per backend, engine figures, upstream servers (up, outstanding);
- ``GET /metrics`` — Prometheus text (:mod:`budgetlm.server.metrics`).

**Execution.**  Each request is an asyncio task running its strategy program on the shared engine
(:class:`~budgetlm.server.dispatch.RequestJob`): no worker thread, no batching window.  A client
that disconnects cancels its task: the engine aborts the request's generations and the key is
charged once, with what was actually generated.

**Errors** use the OpenAI error shape with the status the official client maps to its exceptions:
400 bad request (unknown strategy, listing the names; malformed budget; a field of the wrong type,
booleans included, with ``param`` naming it; a content part other than text; a prompt longer than
the model's context, code ``context_length_exceeded``; a request the backend rejects), 401 missing or
wrong key, 404 unknown backend, 413 body too large, 429 allowance spent, 500 strategy failure.
Only 429 and 5xx are retried by the official client.

**Streaming.**  The role chunk is sent at once.  Strategies whose answer is one sample
(``strategy.streams``: ``sample`` with n=1 and the single-sample strategies ported to the execution
core) then send the answer's real token deltas as the engine produces them.  Strategies whose answer
needs all their samples (votes) send keep-alive comments while they run, then the finished answer in
word-sized chunks.  The response header ``x-budgetlm-stream`` (``tokens`` or ``buffered``) and the
``budgetlm.stream`` field of the finish chunk say which it was.  Both end with the finish chunk
(carrying the ``budgetlm`` ledger) and, with ``stream_options.include_usage``, the usage chunk.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

try:  # this module is imported only by create_app, so `import budgetlm.server` stays light
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.background import BackgroundTask
except ImportError as exc:  # pragma: no cover - the server extra is installed by the test command
    from budgetlm.errors import MissingDependency

    raise MissingDependency("fastapi", "budgetlm serve", extra="server") from exc

from pydantic import ValidationError

from budgetlm.backends import load as load_backend
from budgetlm.backends.base import Backend, GenerationRequest, Message
from budgetlm.backends.pool import ServerPool, ServerStats
from budgetlm.backends.streaming import Delta
from budgetlm.budget import UNITS, Budget, check_limits
from budgetlm.costs import estimate_tokens
from budgetlm.errors import BackendUnavailable, ConfigError
from budgetlm.io import JsonObject, JsonValue
from budgetlm.meter import Meter
from budgetlm.server.checks import (
    ApiError,
    api_error,
    check_bool_params,
    check_context,
    check_messages,
    params_error,
    session_id_of,
)
from budgetlm.server.config import ServerConfig
from budgetlm.server.dispatch import Outcome, RequestJob, StrategyCache
from budgetlm.server.metrics import Metrics
from budgetlm.server.protocol import (
    ChatRequest,
    chunk,
    completion,
    error_body,
    extra_block,
    finish_reason,
    request_body_schema,
    request_error,
    usage_block,
)
from budgetlm.server.route import RouteDecision, StepRouter
from budgetlm.server.sessions import (
    FINAL_INSTRUCTION,
    NO_TOOL_CALLS_LEFT,
    SESSION_HEADER,
    SessionExhausted,
    SessionStore,
    SessionTicket,
    parse_session_budget,
)
from budgetlm.server.store import AllowanceExceeded, AllowanceStore, Reservation
from budgetlm.server.tool_parsers import EngineToolParser
from budgetlm.server.tools import (
    TOOL_STRATEGIES,
    ToolCallHoldback,
    ToolConfig,
    ToolsError,
    ToolTurn,
    render_messages,
    tool_config,
)
from budgetlm.strategies import STRATEGIES
from budgetlm.strategies.base import Problem, Strategy, param_names
from budgetlm.thinking import ThinkingFormat, split_thinking

__all__ = ["ANONYMOUS", "ApiError", "create_app"]

ANONYMOUS = "anonymous"
"""The allowance key of requests when the server has no API keys."""
KEEPALIVE_S = 10.0
"""Seconds without output after which a stream sends a keep-alive comment."""
FORCED_FINAL_HEADER = "x-budgetlm-forced-final"
"""Response header of session calls: ``true`` when the call was forced to be the session's final answer (known
before it runs, so streamed responses carry it too; frameworks that hide the body expose headers)."""
STREAM_HEADER = "x-budgetlm-stream"
"""Response header of streamed requests: ``tokens`` (real token deltas) or ``buffered`` (the finished answer)."""
THREADS = 256
"""Worker threads of the server's event loop (strategies not yet ported to async programs run in one each)."""


class ServerState:
    """Everything a request needs: config, backends, allowances, metrics, strategies, requests running."""

    def __init__(self, cfg: ServerConfig, backends: dict[str, Backend] | None) -> None:
        self.cfg = cfg
        self.given = dict(backends or {})
        self.backends: dict[str, Backend] = {}
        self.store = AllowanceStore(cfg.db_path)
        self.sessions = SessionStore(cfg.db_path, cfg.session_ttl_s)
        self.routers: dict[str, StepRouter] = {}
        self.tool_parsers: dict[str, EngineToolParser] = {}
        """vLLM tool parsers by backend name (``tool_parsers`` in the config)."""
        """Per-step routers by route name (built at start, on the loaded backends)."""
        self.metrics = Metrics()
        self.strategies = StrategyCache()
        self.started = time.time()
        self.jobs: dict[str, set[RequestJob]] = {name: set() for name in cfg.backends}
        """Requests running per backend (until settled)."""

    def start(self) -> None:
        for name, spec in self.cfg.backends.items():
            self.backends[name] = self.given.get(name) or load_backend(spec)
        for name, route in self.cfg.routes.items():
            self.routers[name] = StepRouter(name, route, self.backends)
        for name, parser in self.cfg.tool_parsers.items():
            self.tool_parsers[name] = EngineToolParser.for_backend(parser, self.backends[name], name)
        self.sessions.purge()

    def stop(self) -> None:
        self.strategies.close()
        for r in self.routers.values():
            r.close()
        self.sessions.close()
        for name, be in self.backends.items():
            if name not in self.given:
                be.close()
        self.store.close()

    def running(self) -> dict[str, int]:
        """Requests running per backend."""
        return {name: len(jobs) for name, jobs in self.jobs.items()}

    def engines(self) -> dict[str, dict[str, int]]:
        """Engine figures of backends that run a shared engine loop (vLLM): steps, running, most in one step."""
        out = {}
        for name, be in self.backends.items():
            try:
                eng = getattr(be, "engine", None)
            except BackendUnavailable:
                continue
            if eng is not None and hasattr(eng, "steps"):
                out[name] = {"steps": int(eng.steps), "running": int(getattr(eng, "running", 0)),
                             "max_running": int(getattr(eng, "max_running", 0))}
        return out

    def upstreams(self) -> dict[str, list[ServerStats]]:
        """Per-server state of every backend over OpenAI-compatible servers (its :class:`ServerPool`)."""
        return {name: pool.snapshot() for name, be in self.backends.items()
                if isinstance(pool := getattr(be, "pool", None), ServerPool)}

    # ------------------------------------------------------------------ request parsing
    def allowed(self) -> list[str]:
        return self.cfg.strategies or STRATEGIES.names()

    def resolve_model(self, model: str) -> tuple[str, str, str | None]:
        """``(backend name, strategy name, route name or None)`` of a model id (a route's backend is its cheap one
        until the router decides)."""
        first = next(iter(self.cfg.backends))
        head, sep, tail = model.partition("/")
        if tail == "route" and (head in self.cfg.routes or (head == "budgetlm" and self.cfg.routes)):
            name = head if head in self.cfg.routes else next(iter(self.cfg.routes))
            spec = self.cfg.routes[name]
            return spec.cheap, spec.strategy, name
        if not sep:
            if head in self.cfg.backends or head == "budgetlm":
                return (first if head == "budgetlm" else head), "sample", None
            raise ApiError(404, f"`model` must be budgetlm/<strategy>, <backend>/<strategy> or <route>/route, got {model!r}; "
                                f"backends: {', '.join(self.cfg.backends)}; GET /v1/models lists every id",
                           "model", "model_not_found")
        backend = first if head == "budgetlm" else head
        if backend not in self.cfg.backends:
            routes = f"; routes (<name>/route): {', '.join(self.cfg.routes)}" if self.cfg.routes else ""
            raise ApiError(404, f"unknown backend {head!r} in model {model!r}; backends: budgetlm (= {first}), "
                                f"{', '.join(self.cfg.backends)}{routes}", "model", "model_not_found")
        if tail not in self.allowed():
            raise ApiError(400, f"unknown strategy {tail!r} in model {model!r}; available strategies: "
                                f"{', '.join(self.allowed())}", "model", "unknown_strategy")
        return backend, tail, None

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
        for param, limit in caps:
            if limit is None:
                continue
            if isinstance(limit, bool) or limit < 1:
                raise ApiError(400, f"`{param}` must be >= 1, got {limit!r}", param)
            b["output_tokens"] = min(b.get("output_tokens", limit), limit)
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

    def params(self, strategy: str, req: ChatRequest, budget: dict[str, float]) -> dict[str, JsonValue]:
        """The strategy's parameters: ``strategy_params`` plus the standard sampling fields it takes."""
        params: dict[str, JsonValue] = dict(req.strategy_params or {})
        check_bool_params(strategy, params)
        accepted = param_names(strategy)
        for name, value in (("temperature", req.temperature), ("top_p", req.top_p)):
            if value is not None and name in accepted and name not in params:
                params[name] = value
        budget_sized = "n" in accepted and params.get("n", STRATEGIES.get(strategy).Params.model_fields["n"].default) is None
        if "max_tokens" in accepted and "max_tokens" not in params and not budget_sized:
            # one server-wide per-call cap, so requests with different budgets share one cached strategy; each
            # request's meter clamps every call to its own budget.  Not for a budget-sized sample count (n
            # None): it divides the budget by max_tokens, so the strategy's own per-sample max_tokens stays.
            params["max_tokens"] = self.call_cap()
        return params

    def cap_source(self, req: ChatRequest, budget: dict[str, float], clamped: dict[str, float],
                   need: int) -> tuple[str, str]:
        """``(what, fix)``: what set the request's output-token cap ``clamped["output_tokens"]`` (as the client would
        write it) and how to give the samples ``need`` output tokens in all."""
        cap = clamped["output_tokens"]
        if cap < budget.get("output_tokens", float("inf")):
            return f"the key's allowance left today (output_tokens={cap:g})", "lower strategy_params n or max_tokens"
        for name, value in (("max_completion_tokens", req.max_completion_tokens), ("max_tokens", req.max_tokens)):
            if value == cap:
                return f"{name}={value}", (f"raise {name} to {need} (it caps the whole request, not each sample) or "
                                           f"leave it out and send budget/strategy_params instead")
        if req.reasoning_effort is not None and self.cfg.effort_budgets.get(req.reasoning_effort) == cap:
            return (f"reasoning_effort={req.reasoning_effort!r} (output_tokens={cap:g})",
                    "send a higher reasoning_effort or budget/strategy_params instead")
        if req.budget is not None and Budget.parse(req.budget).limits().get("output_tokens") == cap:
            return f"budget output_tokens={cap:g}", f"raise budget output_tokens to {need} or lower strategy_params n"
        what = "max_budget" if req.budget is not None else "default budget"
        return (f"the server's {what} (output_tokens={cap:g})",
                f"send a budget with output_tokens={need} or lower strategy_params n")


def _cap_warnings(state: ServerState, req: ChatRequest, name: str, strategy: Strategy, budget: dict[str, float],
                  clamped: dict[str, float]) -> list[str]:
    """``budgetlm.warnings`` of a request whose output cap, shared by the strategy's ``n`` samples, leaves each sample
    fewer tokens than the strategy's per-sample ``max_tokens`` (the client's, else the strategy's default).

    The cap is the whole request's, as documented; the warning makes the division visible (a client coming
    from a proxy where ``max_tokens`` is per sample otherwise sees only ``finish_reason=length``).
    """
    fields = STRATEGIES.get(name).Params.model_fields
    cap = clamped.get("output_tokens")
    if "n" not in fields or "max_tokens" not in fields or cap is None:
        return []
    sp = req.strategy_params or {}
    # n as the strategy validated it; max_tokens as the client sent it (the server itself passes a wide per-call cap)
    n = getattr(strategy, "n", None)
    per = getattr(strategy, "max_tokens", None) if "max_tokens" in sp else fields["max_tokens"].default
    if not isinstance(n, int) or not isinstance(per, int) or n < 2:
        return []
    share = int(cap) // n
    if share >= per:
        return []
    what, fix = state.cap_source(req, budget, clamped, n * per)
    whose = "strategy_params max_tokens" if "max_tokens" in sp else "the strategy's max_tokens"
    return [f"{what} caps the whole request: each of n={n} samples gets about {max(share, 1)} tokens ({whose} is "
            f"{per}); {fix}"]


def _open_session(state: ServerState, key: str, sid: str, req: ChatRequest,
                  budget: dict[str, float]) -> tuple[SessionTicket, dict[str, float]]:
    """Hold this call's share of session ``sid``: the ticket and the call's budget clamped to the session's rest."""
    default = state.cfg.session_budget_for(key)
    try:
        sb = parse_session_budget(req.session_budget if req.session_budget is not None else default or {})
        return state.sessions.reserve(key, sid, sb, budget, explicit=req.session_budget is not None)
    except SessionExhausted as exc:
        if exc.held:  # the session's calls in flight hold the rest: retrying after they finish can succeed
            raise ApiError(429, str(exc), "session", "session_budget_held", "rate_limit_error",
                           headers={"x-should-retry": "true", "retry-after": "1", SESSION_HEADER: sid}) from None
        raise ApiError(429, str(exc), "session", "session_budget_exhausted", "rate_limit_error",
                       headers={"x-should-retry": "false", SESSION_HEADER: sid}) from None
    except ConfigError as exc:
        raise ApiError(400, str(exc), "session_budget", "invalid_session_budget") from None


def _with_final_instruction(messages: list[Message], backend: Backend, meter: Meter,
                            warnings: list[str]) -> list[Message]:
    """``messages`` plus the instruction to answer now, when the longer prompt still fits the call's prompt-counted
    budget (``input_tokens``, ``total_tokens``); otherwise unchanged, with a warning (the tools are withheld anyway)."""
    extended = [*messages, {"role": "user", "content": FINAL_INSTRUCTION}]
    rooms = [r for r in (meter.remaining("input_tokens"), meter.remaining("total_tokens")) if r is not None]
    if rooms:
        text, ids = backend.render(GenerationRequest(messages=extended))
        need = len(ids) if ids is not None else estimate_tokens(text or "")
        if need >= min(rooms):
            warnings.append("forced final answer: the instruction to answer now did not fit the tokens left; the "
                            "tools were withheld only")
            return messages
    return extended


def _final_reason(ticket: SessionTicket | None, tools: ToolConfig | None) -> str | None:
    """Why this call must be its session's final answer (``None``: it may go on)."""
    if ticket is None:
        return None
    if ticket.final is not None:
        return ticket.final
    if tools is not None and tools.active and ticket.tool_calls_left is not None and ticket.tool_calls_left < 1:
        return NO_TOOL_CALLS_LEFT
    return None


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


class _AnswerText:
    """The streamed answer: token deltas in, content (and reasoning) deltas out.

    For models with thinking tags the thinking goes to ``reasoning_content`` and only the answer to
    ``content`` (as in the final ``Result.text``); a tag split across deltas is held back until it
    is complete.
    """

    def __init__(self, fmt: ThinkingFormat) -> None:
        self.fmt = fmt
        self.raw = ""
        self.content = ""
        self.reasoning = ""

    def feed(self, text: str) -> tuple[str, str]:
        """``(reasoning delta, content delta)`` after ``text`` arrived."""
        self.raw += text
        if not self.fmt.enabled:
            self.content += text
            return "", text
        held = self._held()
        if held is None:
            return "", ""
        sp = split_thinking(held, self.fmt)
        dr = dc = ""
        if sp.thinking.startswith(self.reasoning):
            dr, self.reasoning = sp.thinking[len(self.reasoning):], sp.thinking
        if sp.answer.startswith(self.content):
            dc, self.content = sp.answer[len(self.content):], sp.answer
        return dr, dc

    def _held(self) -> str | None:
        """The text safe to split now (``None``: it may still turn into the opening tag)."""
        raw, fmt = self.raw, self.fmt
        head = raw.lstrip()
        if not fmt.starts_in_thinking and fmt.start.startswith(head):
            return None
        for tag in (fmt.end, fmt.start):
            for k in range(len(tag) - 1, 0, -1):
                if raw.endswith(tag[:k]):
                    return raw[:-k]
        return raw

    def rest(self, final: str) -> str:
        """What is left to send of the final answer text (empty when the stream already sent it or diverged)."""
        return final[len(self.content):] if final.startswith(self.content) else ""


def create_app(cfg: ServerConfig, backends: dict[str, Backend] | None = None) -> FastAPI:
    """The FastAPI app for ``cfg``; ``backends`` (name → backend) replace loading those names' specs."""
    state = ServerState(cfg, backends)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # strategies not yet ported to async programs (and scoring) run in the loop's worker threads;
        # the default pool (cores + 4) would queue concurrent requests behind each other
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(THREADS, thread_name_prefix="budgetlm"))
        await asyncio.to_thread(state.start)
        try:
            yield
        finally:
            jobs = [j for js in state.jobs.values() for j in js]
            for j in jobs:  # requests still running at shutdown end now and are settled
                j.abandon()
            if jobs:
                await asyncio.wait([j.settled for j in jobs], timeout=60)
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="budgetlm", lifespan=lifespan,
                  description="Budget-aware OpenAI-compatible chat completions (see docs/server.md).")
    app.state.budgetlm = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backends": cfg.backends, "uptime_s": time.time() - state.started,
                "running": state.running(), "engines": state.engines(), "in_flight": state.metrics.in_flight,
                "upstreams": {name: [{"url": st.url, "up": st.up, "outstanding": st.outstanding} for st in stats]
                              for name, stats in state.upstreams().items()}}

    @app.get("/metrics")
    async def metrics() -> Any:  # FastAPI reads the annotation: Any keeps /openapi.json as it was
        return PlainTextResponse(state.metrics.render(state.upstreams()), media_type="text/plain; version=0.0.4")

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

    @app.get("/v1/sessions/{session_id}")
    async def session(session_id: str, request: Request) -> dict[str, Any]:
        key = _key(state, request.headers.get("authorization"))
        report = await asyncio.to_thread(state.sessions.report, key, session_id)
        if report is None:
            raise ApiError(404, f"no session {session_id!r} for this API key (never used, or idle longer than "
                                f"session_ttl_s={cfg.session_ttl_s:g} s and deleted)", "session_id", "session_not_found")
        return report

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": request_body_schema()},
              summary="Answer a conversation with a strategy under a budget")
    async def chat(request: Request) -> Any:  # as for /metrics
        state.metrics.started()
        model_name, status = "?", "500"
        counted = False  # the request's job counts it in the metrics when it is settled
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
            except ValidationError as exc:
                msg, param = request_error(exc)
                code = "invalid_session" if param == "session" else \
                    "invalid_session_budget" if (param or "").startswith("session_budget") else None
                raise ApiError(400, msg, param, code) from None
            backend_name, strategy_name, route_name = state.resolve_model(req.model)
            model_name = req.model  # only once resolved: client-chosen strings must not become metric labels
            if req.n not in (None, 1):
                raise ApiError(400, f"`n` must be 1, got {req.n}; ask a voting strategy for samples instead, e.g. "
                                    f"model 'budgetlm/majority' with strategy_params {{'n': {req.n}}}", "n")
            try:
                tools = tool_config(req.tools, req.tool_choice)
                checked = check_messages(req.messages)
            except ToolsError as exc:
                raise ApiError(400, str(exc), exc.param) from None
            if tools is not None and tools.active and strategy_name not in TOOL_STRATEGIES:
                raise ApiError(400, f"`tools` are supported by the strategies {', '.join(TOOL_STRATEGIES)}, got "
                                    f"{strategy_name!r}; use one of those, or send tool_choice 'none'", "tools",
                               "tools_unsupported")
            messages = render_messages(checked, tools)
            budget = state.budget(req)
            params = state.params(strategy_name, req, budget)
            try:
                _, strategy = state.strategies.get(strategy_name, params)
            except (ConfigError, TypeError, ValueError) as exc:  # TypeError: a parameter of the wrong type
                raise params_error(strategy_name, exc) from None
            backend = state.backends[backend_name]
            check_context(backend, messages)
            sid = session_id_of(request.headers.get(SESSION_HEADER), req.session)
            ticket: SessionTicket | None = None
            if sid is not None:
                ticket, budget = _open_session(state, key, sid, req, budget)
            try:
                res, clamped = state.store.reserve(key, cfg.allowance_for(key), budget,
                                                   request_id=ticket.request_id if ticket else None)
            except AllowanceExceeded as exc:
                if ticket is not None:
                    state.sessions.release(ticket)
                raise ApiError(429, str(exc), None, "allowance_exceeded", "rate_limit_error") from None
            meter = Meter(Budget.of(clamped), name=res.id)
            warnings = _cap_warnings(state, req, strategy_name, strategy, budget, clamped)
            final = _final_reason(ticket, tools)
            ctx = _Request(state=state, res=res, meter=meter, model=req.model, strategy=strategy_name, params=params,
                           budget=clamped, backend=cfg.backends[backend_name], key=key, warnings=warnings,
                           session=ticket, final=final, backend_name=backend_name)
            if route_name is not None:
                try:
                    decision = await state.routers[route_name].decide(
                        messages, meter, rho=ticket.rho if ticket else meter.rho(),
                        step=ticket.step if ticket else 0, final=final is not None)
                except Exception as exc:  # noqa: BLE001 -- the router's model failed: settle what it spent, answer
                    await asyncio.to_thread(_settle, ctx, Outcome(None, error=exc))
                    counted = True
                    raise api_error(exc) from None
                ctx.route = decision
                spec = cfg.routes[route_name]
                if decision.arm == "expensive" and spec.expensive_strategy is not None:
                    strategy_name = spec.expensive_strategy
                    params = {**state.params(strategy_name, req.model_copy(update={"strategy_params": None}), budget),
                              **spec.expensive_params}
                    try:
                        _, strategy = state.strategies.get(strategy_name, params)
                    except (ConfigError, TypeError, ValueError) as exc:  # the server config's expensive_params
                        await asyncio.to_thread(_settle, ctx, Outcome(None, error=exc))
                        counted = True
                        raise ApiError(500, f"`routes.{route_name}.expensive_params` are invalid for "
                                            f"{strategy_name!r}: {exc}; fix the server config", None,
                                       "server_config", "server_error") from None
                    ctx.strategy, ctx.params = strategy_name, params
                backend_name = decision.backend
                backend = state.backends[backend_name]
                ctx.backend, ctx.backend_name = cfg.backends[backend_name], backend_name
            turn = ToolTurn.plan(tools, meter, backend.constrained_decoding) if tools is not None else None
            if turn is not None and backend_name in state.tool_parsers:
                engine_parser = state.tool_parsers[backend_name]
                turn.parser = functools.partial(engine_parser.parse, tools=list(req.tools or []))
                turn.parser_name = f"vllm:{engine_parser.name}"
            if turn is not None and final is not None:
                turn = ToolTurn(turn.cfg, offered=False, warnings=[f"forced final answer: {final}; the tools were "
                                                                   f"withheld and the model was told to answer now"])
            if turn is not None and not turn.offered:
                messages = render_messages(checked, None)
            if final is not None:
                messages = _with_final_instruction(messages, backend, meter, warnings)
            # a forced call (assistant_prefix) is all tool call: it is sent at the end, not token by token
            tokens = bool(req.stream) and bool(getattr(strategy, "streams", False)) and not (turn and turn.prefix)
            ctx.tools = turn
            mode = "tokens" if tokens else "buffered"
            ctx.stream = mode if req.stream else None
            headers: dict[str, str] = {SESSION_HEADER: ticket.session, FORCED_FINAL_HEADER: str(final is not None).lower()} \
                if ticket is not None else {}
            queue: asyncio.Queue[Delta | None] = asyncio.Queue()
            problem = Problem(id=res.id, messages=messages, assistant_prefix=turn.prefix if turn else None,
                              json_schema=turn.json_schema if turn else None, calls_tools=bool(turn and turn.active))
            job = RequestJob(strategy, problem, meter, backend, on_delta=queue.put_nowait if tokens else None,
                             on_end=lambda out: _settle(ctx, out), finish=turn.finish if turn else None)
            counted = True
            jobs = state.jobs[backend_name]
            jobs.add(job)
            job.settled.add_done_callback(lambda _f: jobs.discard(job))
            if req.stream:
                job.settled.add_done_callback(lambda _f: queue.put_nowait(None))
                include_usage = bool((req.stream_options or {}).get("include_usage"))
                status = "stream"
                return StreamingResponse(_stream(ctx, job, queue, include_usage, backend),
                                         media_type="text/event-stream",
                                         headers={STREAM_HEADER: mode, **headers},
                                         background=BackgroundTask(_abandon, job))
            out = await _until_done_or_gone(request, job)
            if out is None:  # the client left: nobody reads this; the job was cancelled and settles itself
                status = "499"
                return JSONResponse(error_body("the client disconnected; the request was cancelled", "invalid_request_error",
                                               None, "client_disconnected"), status_code=499, headers=headers)
            if out.result is None:
                raise api_error(out.error)
            status = "ok"
            return JSONResponse(completion(res.id, req.model, out.result, out.extra, turn.reply if turn else None),
                                headers=headers)
        except ApiError as exc:
            status = str(exc.status)
            raise
        finally:
            if not counted:
                state.metrics.finished(model_name, status)

    return app


async def _abandon(job: RequestJob) -> None:
    """After a streamed response (also when the client hung up before the stream started)."""
    job.abandon()


async def _until_done_or_gone(request: Request, job: RequestJob) -> Outcome | None:
    """The request's outcome, or ``None`` when the client disconnected first (the job is then cancelled)."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher: asyncio.Future[None] = asyncio.ensure_future(gone())
    try:
        waiting: set[asyncio.Future[Outcome] | asyncio.Future[None]] = {job.settled, watcher}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        job.abandon()
        raise
    finally:
        watcher.cancel()
    if job.settled.done():
        return job.settled.result()
    job.abandon()
    return None


@dataclass
class _Request:
    """What settling and streaming one chat request need (the router may change strategy and backend)."""

    state: ServerState
    res: Reservation
    meter: Meter
    model: str
    """The request's ``model`` id."""
    strategy: str
    params: dict[str, JsonValue]
    budget: dict[str, float]
    """The request's budget, clamped to the key's allowance (and its session's rest)."""
    backend: str
    """The backend's spec."""
    key: str
    warnings: list[str]
    session: SessionTicket | None
    final: str | None
    """Why this call is its session's final answer (``None``: it is not)."""
    backend_name: str
    route: RouteDecision | None = None
    tools: ToolTurn | None = None
    stream: str | None = None
    """``tokens`` or ``buffered`` for a streamed response, else ``None``."""


def _settle(ctx: _Request, out: Outcome) -> JsonObject | None:
    """Commit the request's actual spend (its meter's) to the key's allowance and the request log, once;
    update the metrics.  Returns the response's ``budgetlm`` block (``None`` without an answer)."""
    state = ctx.state
    meter = ctx.meter
    spend: dict[str, float] = {u: meter.spent(u) for u in UNITS if u not in ("wall_seconds", "joules")}
    total = meter.total()
    result = out.result
    if out.cancelled:
        row_status = "cancelled: the client disconnected; charged what was generated"
    elif out.error is not None:
        row_status = f"error: {out.error}"
    else:
        row_status = "ok" if not out.disconnected else "ok (the client disconnected before the answer)"
    usage = usage_block(result if result is not None else total)
    state.store.commit(ctx.res, spend, model=ctx.model, strategy=ctx.strategy, status=row_status,
                       usage=usage, ledger=result.ledger if result is not None else meter.summary())
    ticket = ctx.session
    decision = ctx.route
    if ticket is not None:
        state.sessions.commit(ticket, spend, model=ctx.model, backend=ctx.backend_name, strategy=ctx.strategy,
                              status=row_status, usage=usage, forced_final=ctx.final is not None, reason=ctx.final,
                              route=decision.to_json() if decision is not None else None)
    if out.disconnected:
        status = "499"
    elif result is not None:
        status = "ok"
    else:
        status = str(api_error(out.error).status)
    state.metrics.finished(ctx.model, status, ctx.strategy, out.latency_s if status == "ok" else None,
                           total.prompt_tokens, total.output_tokens, total.thinking_tokens,
                           total.cached_prompt_tokens, total.usd, total.flops)
    if result is None:
        return None
    left = state.store.remaining(ctx.key, state.cfg.allowance_for(ctx.key)) or None
    extra = extra_block(result, ctx.strategy, ctx.params, ctx.budget, ctx.backend, left)
    warnings = list(ctx.warnings)
    extra["warnings"] = warnings
    turn = ctx.tools
    if turn is not None:
        warnings += turn.warnings  # the same list, still in ``extra``
        extra["tools"] = turn.ledger()
    if ctx.stream is not None:
        extra["stream"] = ctx.stream
    extra["forced_final"] = ctx.final is not None
    if ctx.final is not None:
        extra["forced_final_reason"] = ctx.final
    if decision is not None:
        extra["route"] = decision.to_json()
    if ticket is not None:
        extra["session"] = (state.sessions.report(ticket.key, ticket.session, calls=False) or {}) | {"step": ticket.step}
    return extra


def _buffered_note(strategy: str) -> str:
    return (f"strategy {strategy!r} does not stream token by token (its answer is known only when it finishes, "
            f"e.g. a vote over all its samples): the finished answer was sent in chunks; for token streaming use a "
            f"single-sample strategy such as budgetlm/sample")


async def _stream(ctx: _Request, job: RequestJob, queue: asyncio.Queue[Delta | None], include_usage: bool,
                  backend: Backend) -> AsyncIterator[bytes]:
    try:
        async for part in _stream_parts(ctx, job, queue, include_usage, backend):
            yield part
    finally:  # the client left mid-stream (or the stream ended): cancel what still runs; it settles itself
        job.abandon()


async def _stream_parts(ctx: _Request, job: RequestJob, queue: asyncio.Queue[Delta | None],
                        include_usage: bool, backend: Backend) -> AsyncIterator[bytes]:
    rid, model, created = ctx.res.id, ctx.model, int(time.time())
    tokens = ctx.stream == "tokens"

    def event(obj: JsonObject) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    yield event(chunk(rid, model, created, {"role": "assistant", "content": ""}))
    answer = _AnswerText(backend.thinking)
    turn = ctx.tools
    hold = ToolCallHoldback() if turn is not None and turn.active else None  # a call is never streamed as text
    while True:
        if not queue.empty():
            item = queue.get_nowait()
        else:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
        if item is None:
            break
        if item.index != 0 or not item.text:
            continue
        reasoning, content = answer.feed(item.text)
        if reasoning:
            yield event(chunk(rid, model, created, {"reasoning_content": reasoning}))
        if content and hold is not None:
            content = hold.feed(content)
        if content:
            yield event(chunk(rid, model, created, {"content": content}))
    out = job.settled.result()
    if out.result is None:
        err = api_error(out.error)
        yield event(error_body(err.message, err.type, err.param, err.code))
        yield b"data: [DONE]\n\n"
        return
    result = out.result
    extra = out.extra
    reply = turn.reply if turn is not None else None
    text = (reply.content or "") if reply is not None else result.text
    if tokens:
        sent = answer.content if hold is None else hold.sent
        rest = text[len(sent):] if text.startswith(sent) else ""
        if rest:
            yield event(chunk(rid, model, created, {"content": rest}))
    else:
        if extra is not None:
            extra["stream_note"] = _buffered_note(ctx.strategy)
        if text:
            for piece in _words(text):
                yield event(chunk(rid, model, created, {"content": piece}))
    if reply is not None:
        yield event(chunk(rid, model, created, {"tool_calls": reply.tool_calls(deltas=True)}))
        yield event(chunk(rid, model, created, {}, "tool_calls", extra=extra))
    else:
        yield event(chunk(rid, model, created, {}, finish_reason(result), extra=extra))
    if include_usage:
        yield event(chunk(rid, model, created, None, usage=usage_block(result)))
    yield b"data: [DONE]\n\n"
