"""Checks of a chat-completions request before it runs, and the server's error type.

Every refusal is an :class:`ApiError`: the HTTP status and the OpenAI error body (``message``,
``type``, ``param``, ``code``), with a message saying what is wrong and how to fix it.  The checks
here need no server state: message content parts (text only, anything else refused rather than
dropped), strategy parameters given as JSON booleans where numbers are expected, typed-parameter
errors named ``strategy_params.<field>``, a conversation longer than the model's context, and the
session id of the header and the body.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from budgetlm.backends.base import Backend, GenerationRequest, Message
from budgetlm.costs import estimate_tokens
from budgetlm.errors import ConfigError, ContextLengthExceeded
from budgetlm.server.sessions import SESSION_HEADER, check_session_id
from budgetlm.server.tools import ToolsError, format_calls, history_calls
from budgetlm.strategies import STRATEGIES
from budgetlm.strategies.base import param_names

__all__ = ["ApiError", "api_error", "check_bool_params", "check_context", "check_messages", "params_error", "session_id_of"]

class ApiError(Exception):
    """An error answered with ``status`` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers


def api_error(exc: BaseException | None) -> ApiError:
    """The HTTP error of a request whose strategy raised ``exc``.

    A prompt longer than the model's context is 400 ``context_length_exceeded`` (the official client
    does not retry it); other invalid input the backend rejects is 400; anything else is 500.
    """
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, ConfigError):
        return ApiError(400, f"the backend rejected the request: {exc}", None, "invalid_request")
    if exc is None:  # cancelled without a client that left (the server is shutting down)
        return ApiError(503, "the request was cancelled because the server is shutting down; retry", None,
                        "server_shutting_down", "server_error")
    return ApiError(500, f"the strategy failed: {exc}", None, "strategy_failed", "server_error")


_ANNOTATION_KIND = {int: "an integer", float: "a number"}


def expects_number(annotation: object) -> str | None:
    """"an integer" / "a number" when a parameter's type admits numbers but not booleans (else ``None``)."""
    if annotation is Any or annotation is bool:
        return None
    args = get_args(annotation) if get_origin(annotation) in (Union, type(int | None)) else (annotation,)
    if bool in args or Any in args:
        return None
    kinds = [_ANNOTATION_KIND[a] for a in args if a in _ANNOTATION_KIND]
    return ("a number" if "a number" in kinds else kinds[0]) if kinds else None


def check_bool_params(strategy: str, params: Mapping[str, object]) -> None:
    """400 for ``true``/``false`` where a strategy parameter is a number (pydantic would read true as 1)."""
    fields = STRATEGIES.get(strategy).Params.model_fields
    for name, value in params.items():
        if isinstance(value, bool) and name in fields:
            kind = expects_number(fields[name].annotation)
            if kind is not None:
                raise ApiError(400, f"strategy {strategy!r}: `strategy_params.{name}` must be {kind}, got "
                                    f"{json.dumps(value)}; send {'a whole number' if kind == 'an integer' else 'a number'} (JSON "
                                    f"true/false are not numbers), e.g. "
                                    f"strategy_params {{\"{name}\": {example_value(fields[name])}}}",
                               f"strategy_params.{name}")


def example_value(field: FieldInfo) -> str:
    default = field.default
    return json.dumps(default) if isinstance(default, int | float) and not isinstance(default, bool) else "8"


def params_error(strategy: str, exc: BaseException) -> ApiError:
    """The 400 of ``strategy_params`` the strategy's typed Params refused, naming the parameter and the fix."""
    msg = str(exc)
    m = re.search(r"`([A-Za-z_][\w.\[\]]*)` (?:must|is)", msg)
    param = f"strategy_params.{m.group(1)}" if m else "strategy_params"
    if m and "valid:" not in msg:
        msg += (f"; fix `strategy_params.{m.group(1)}` (the parameters of {strategy!r}: "
                f"{', '.join(param_names(strategy))})")
    return ApiError(400, f"strategy {strategy!r}: {msg}", param)


_TEXT_PARTS = ("text",)


def part_text(i: int, j: int, part: object) -> str | None:
    """The text of content part ``j`` of message ``i`` (``None``: not a text part)."""
    where = f"messages[{i}].content[{j}]"
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ApiError(400, f"`{where}` must be a content part object such as {{\"type\": \"text\", \"text\": "
                            f"\"...\"}}, got {json.dumps(part, default=str)[:80]}", where)
    if part["type"] not in _TEXT_PARTS:
        return None
    text = part.get("text")
    if not isinstance(text, str):
        raise ApiError(400, f"`{where}.text` must be a string, got {json.dumps(text, default=str)[:80]}; send "
                            f"{{\"type\": \"text\", \"text\": \"...\"}}", f"{where}.text")
    return text


def content_text(i: int, parts: list[Any]) -> str:
    """The text of message ``i``'s content parts: text parts joined; any other part (image_url, input_audio, file,
    ...) is refused, since the models behind this server read text only and dropping it would change the question."""
    texts = [part_text(i, j, p) for j, p in enumerate(parts)]
    other = [(j, p["type"]) for j, (p, t) in enumerate(zip(parts, texts, strict=True)) if t is None]
    if not other:
        return "".join(t for t in texts if t is not None)
    j, kind = other[0]
    if len(other) == len(parts):  # nothing but unsupported parts: the message would be empty
        kinds = ", ".join(sorted({k for _, k in other}))
        raise ApiError(400, f"`messages[{i}].content` must hold at least one text part, got only unsupported "
                            f"{kinds} part(s); this server's models read text only: send the message as text "
                            f"(e.g. describe the {kind} in words)", f"messages[{i}].content", "unsupported_content")
    raise ApiError(400, f"`messages[{i}].content[{j}]` must be a text part, got unsupported part type {kind!r}; this "
                        f"server's models read text only and do not drop parts silently: remove the {kind} part or "
                        f"send its content as text", f"messages[{i}].content[{j}]", "unsupported_content")


def check_messages(messages: list[dict[str, object]]) -> list[Message]:
    if not messages:
        raise ApiError(400, "`messages` must hold at least one message, got []", "messages")
    out: list[Message] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"`messages[{i}].role` must be system, user, assistant or tool, got {role!r}",
                           f"messages[{i}].role")
        if isinstance(content, list):  # content parts: text parts joined, any other part refused
            content = content_text(i, content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"`messages[{i}].content` must be text, got {type(content).__name__}",
                           f"messages[{i}].content")
        if role == "assistant" and m.get("tool_calls"):  # the calls of an earlier turn, as the model wrote them
            content = (content + "\n" if content else "") + format_calls(history_calls(i, m["tool_calls"]))
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise ToolsError(f"`messages[{i}].tool_call_id` must be the id of the call this message answers, got "
                             f"{json.dumps(m.get('tool_call_id'), default=str)}", f"messages[{i}].tool_call_id")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def session_id_of(header: str | None, body: str | None) -> str | None:
    """The call's session id (the header or the body field; both must agree)."""
    if header is not None:
        try:
            check_session_id(header, SESSION_HEADER)
        except ConfigError as exc:
            raise ApiError(400, str(exc), SESSION_HEADER, "invalid_session") from None
        if body is not None and body != header:
            raise ApiError(400, f"`session` must match the {SESSION_HEADER} header, got {body!r} and {header!r}; "
                                f"send one of them", "session", "invalid_session")
        return header
    return body


def check_context(backend: Backend, messages: list[Message]) -> None:
    """400 ``context_length_exceeded`` before anything runs when the conversation alone fills the context.

    (Strategies that add to the prompt may still overflow later; that is mapped to the same error.)
    """
    limit_of = getattr(backend, "_max_context", None)
    limit = limit_of() if callable(limit_of) else 0
    if not limit:
        return
    try:
        text, ids = backend.render(GenerationRequest(messages=messages))
    except Exception:  # noqa: BLE001 -- e.g. a chat template that refuses a role: the strategy reports it
        return
    n = len(ids) if ids is not None else estimate_tokens(text or "")
    if n >= limit:
        err = ContextLengthExceeded(n, limit)
        raise ApiError(400, str(err), "messages", "context_length_exceeded")
