"""Tools an agent step may call, in the Hermes/Qwen ``<tool_call>`` format, charged to a meter.

A tool-using step ends with a tool call written as JSON between tags::

    <tool_call>{"name": "calculator", "arguments": {"expression": "3 * 7"}}</tool_call>

:func:`parse_tool_call` reads it (``"arguments"`` may also be given as ``"args"``; a bare
``name(arg)`` inside the tags is accepted for small models that do not write JSON and passes the
text between the parentheses as the single argument ``input``).  :func:`call_tool` runs it and
charges one ``tool_calls`` unit to the meter **before** running it (after checking the arguments
against the function's signature: a call with bad arguments is refused for free), so a tool-call
budget is never exceeded.  Failures never raise into the agent loop: an unknown tool, bad arguments or an
exception inside the tool become an ``error: ...`` observation (recorded in the outcome) and the
agent continues; only an exhausted ``tool_calls`` (or wall-time) budget is reported as
``skipped`` so the caller can stop or force an answer.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from budgetlm.errors import BudgetExceeded, ConfigError
from budgetlm.io import JsonObject
from budgetlm.meter import Meter

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
"""Tags around a tool call; ``TOOL_CALL_CLOSE`` is the stop string of a tool-calling step."""
OBSERVATION_TEMPLATE = "\n<tool_response>{observation}</tool_response>\n"
"""How a tool's result is appended to the trajectory after the call."""
MAX_OBSERVATION_CHARS = 2000
"""Observations are cut to this many characters (a tool cannot flood the context)."""

_BARE = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    """A named function an agent may call."""

    name: str
    """Name the model writes in its tool call."""
    fn: Callable[..., object]
    """The function; called with the call's arguments as keyword arguments."""
    description: str = ""
    """One line shown to the model in the tool list."""

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z_][\w.-]*", self.name):
            raise ConfigError(f"`name` must be an identifier-like tool name, got {self.name!r}")
        if not callable(self.fn):
            raise ConfigError(f"`fn` of tool {self.name!r} must be callable, got {type(self.fn).__name__}")


@dataclass(frozen=True)
class ToolCall:
    """A parsed tool call."""

    name: str
    """The tool's name."""
    arguments: dict[str, Any]
    """Keyword arguments."""

    @property
    def key(self) -> str:
        """The call as a vote key: ``tool:`` + JSON of name and arguments with sorted keys (equal calls vote together)."""
        return "tool:" + json.dumps([self.name, self.arguments], sort_keys=True, default=str)


def calls_key(calls: list[ToolCall]) -> str:
    """The vote key of a reply's tool calls (one call: :attr:`ToolCall.key`; several: all of them, in order)."""
    if len(calls) == 1:
        return calls[0].key
    return "tool:" + json.dumps([[c.name, c.arguments] for c in calls], sort_keys=True, default=str)


@dataclass
class ToolOutcome:
    """What running a tool call gave."""

    call: ToolCall | None
    """The parsed call (``None`` when the text could not be parsed)."""
    observation: str
    """The tool's result as text, or ``"error: ..."``."""
    error: str | None = None
    """Why the call failed (unknown tool, bad arguments, exception), or ``None``."""
    skipped: str | None = None
    """Set (``"budget exhausted: tool_calls"``) when the budget refused the call; nothing ran."""
    latency_s: float = 0.0
    """Seconds the tool ran."""

    def to_json(self) -> JsonObject:
        """A JSON-ready record for traces."""
        return {"name": self.call.name if self.call else None, "arguments": self.call.arguments if self.call else None,
                "observation": self.observation, "error": self.error, "skipped": self.skipped,
                "latency_s": self.latency_s}


def as_tools(tools: Iterable[Tool | Callable[..., object]] | Mapping[str, Callable[..., object]] | None) -> dict[str, Tool]:
    """Normalise tools given as :class:`Tool` s, plain functions (named by ``__name__``) or a name → function map."""
    if tools is None:
        return {}
    out: dict[str, Tool] = {}
    items: Iterable[Tool | Callable[..., object]] = (Tool(k, v) for k, v in tools.items()) if isinstance(tools, Mapping) else tools
    for t in items:
        tool = t if isinstance(t, Tool) else Tool(getattr(t, "__name__", ""), t, (getattr(t, "__doc__", "") or "").strip())
        if tool.name in out:
            raise ConfigError(f"tool names must be unique, got {tool.name!r} twice")
        out[tool.name] = tool
    return out


def describe_tools(tools: Mapping[str, Tool]) -> str:
    """The tool list and call format, for a system or user prompt."""
    lines = [f"- {t.name}: {t.description or '(no description)'}" for t in tools.values()]
    return ("You can call tools. To call one, write\n"
            f'{TOOL_CALL_OPEN}{{"name": "<tool>", "arguments": {{...}}}}{TOOL_CALL_CLOSE}\n'
            "and wait for the result. Tools:\n" + "\n".join(lines))


def parse_tool_call(text: str) -> ToolCall | None:
    """The last tool call in ``text`` (its closing tag may be missing: steps stop at it), or ``None``."""
    start = text.rfind(TOOL_CALL_OPEN)
    if start == -1:
        return None
    body = text[start + len(TOOL_CALL_OPEN):]
    end = body.find(TOOL_CALL_CLOSE)
    return _parse_body(body if end == -1 else body[:end])


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """``(text before the first call, every call)`` of a reply holding one or more ``<tool_call>`` blocks.

    The last block's closing tag may be missing; blocks that do not parse are skipped, text after the
    last block is dropped.  No parsable call: ``(text, [])``.

    >>> parse_tool_calls('Let me look. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    ('Let me look.', [ToolCall(name='f', arguments={'x': 1})])
    """
    first = text.find(TOOL_CALL_OPEN)
    if first == -1:
        return text, []
    calls = []
    for block in text[first:].split(TOOL_CALL_OPEN)[1:]:
        end = block.find(TOOL_CALL_CLOSE)
        call = _parse_body(block if end == -1 else block[:end])
        if call is not None:
            calls.append(call)
    return (text[:first].strip(), calls) if calls else (text, [])


def _parse_body(body: str) -> ToolCall | None:
    """The call written between the tags (JSON, or a bare ``name(arg)``), or ``None``."""
    body = body.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        m = _BARE.match(body)
        if m is None:
            return None
        return ToolCall(m.group(1), {"input": m.group(2).strip().strip("'\"")})
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("args", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = {"input": args}
    if not isinstance(args, dict):
        args = {"input": args}
    return ToolCall(obj["name"], args)


def _argument_problem(fn: Callable[..., object], arguments: dict[str, Any]) -> str | None:
    """Why ``fn(**arguments)`` cannot bind (unexpected or missing keywords), or ``None``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature available (some builtins): let the call decide
        return None
    params = sig.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unexpected = [k for k in arguments if k not in params or params[k].kind is params[k].POSITIONAL_ONLY]
        if unexpected:
            takes = ", ".join(params) or "no arguments"
            return f"unexpected keyword argument {unexpected[0]!r} (takes: {takes})"
    try:
        sig.bind(**arguments)
    except TypeError as e:
        return str(e)
    return None


def call_tool(text_or_call: str | ToolCall, tools: Mapping[str, Tool], meter: Meter | None = None) -> ToolOutcome:
    """Parse (when given text) and run a tool call, charging one tool call to ``meter`` first."""
    call = parse_tool_call(text_or_call) if isinstance(text_or_call, str) else text_or_call
    if call is None:
        return ToolOutcome(None, "error: could not parse the tool call; write "
                           f'{TOOL_CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{TOOL_CALL_CLOSE}',
                           error="unparsable tool call")
    tool = tools.get(call.name)
    if tool is None:
        avail = ", ".join(sorted(tools)) or "(none)"
        return ToolOutcome(call, f"error: unknown tool {call.name!r}; available: {avail}", error="unknown tool")
    problem = _argument_problem(tool.fn, call.arguments)
    if problem:
        return ToolOutcome(call, f"error: bad arguments for {call.name!r}: {problem}", error=f"bad arguments: {problem}")
    if meter is not None:
        try:
            meter.record_tool_call(1, name=call.name)
        except BudgetExceeded as e:
            return ToolOutcome(call, "error: no tool calls left in the budget", error=str(e),
                               skipped=f"budget exhausted: {e.unit}" if getattr(e, "unit", None) else "budget exhausted")
    t0 = time.perf_counter()
    try:
        result = tool.fn(**call.arguments)
        obs, err = str(result), None
    except Exception as e:  # a failing tool is an observation, not a crash
        obs, err = f"error: {type(e).__name__}: {e}", f"{type(e).__name__}: {e}"
    return ToolOutcome(call, obs[:MAX_OBSERVATION_CHARS], error=err, latency_s=time.perf_counter() - t0)
