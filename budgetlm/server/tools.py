"""Client-side function tools on the chat-completions endpoint: check, render, parse, charge.

A request's ``tools`` (OpenAI function tools) and ``tool_choice`` become a :class:`ToolConfig`
(:func:`tool_config`; malformed input raises :class:`ToolsError` naming the field, answered 400).

**Rendering.**  Every chat template can render plain role/content messages, not every one renders
tools (SmolLM2's does not), so budgetlm renders them itself, in the Hermes/Qwen format its own
agents use (:mod:`budgetlm.tools`), and the backend's template sees ordinary messages:

- the tool list (name, description, JSON schema of the parameters) and the call format
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` go into the system message
  (appended to the conversation's first system message, else a new one);
- an earlier assistant turn's ``tool_calls`` become ``<tool_call>`` blocks after its content;
- ``tool`` messages become ``<tool_response>…</tool_response>`` in a user turn (consecutive ones
  share one turn), so templates that insist on alternating roles accept them.

Nothing of an earlier turn is dropped, with or without ``tools`` on the current request.

**Choices.**  ``auto``: the model may call tools.  ``none``: the tool list is not shown and no
tool call is returned.  ``required`` / a named function: the reply is started for the model
(``assistant_prefix``: ``<tool_call>``, plus ``{"name": "<fn>", "arguments": `` for a named
function), so it continues a call.  On a backend with constrained decoding (vLLM) the reply is
``<tool_call>`` plus JSON decoded under the tools' schemas (:meth:`ToolConfig.call_schema`: the name
is one of the allowed functions, the arguments match its ``parameters``), so even a small model
writes a valid call; elsewhere the arguments are not constrained.

**Parsing and charging** (:class:`ToolTurn`, after the strategy answered): the answer text's
``<tool_call>`` blocks (several: parallel calls) become OpenAI ``tool_calls``; the text before the
first block is the message ``content``, text after the last is dropped.  Each returned call is
charged one ``tool_calls`` unit on the request's meter; calls the budget cannot pay for are
dropped (with a ``budgetlm.warnings`` entry), and a request whose budget has no tool call left
before it starts is answered without tools (the list is not shown; a warning says so).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeGuard

from budgetlm.backends.base import Message
from budgetlm.errors import BudgetExceeded
from budgetlm.io import JsonObject, JsonValue
from budgetlm.meter import Meter
from budgetlm.strategies.base import Result
from budgetlm.tools import OBSERVATION_TEMPLATE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, parse_tool_calls

__all__ = ["TOOL_STRATEGIES", "FunctionTool", "ToolConfig", "ToolReply", "ToolTurn", "ToolsError",
           "history_calls", "render_messages", "tool_config"]

TOOL_STRATEGIES = ("sample", "cot", "best_of_n", "majority", "weighted_majority", "adaptive", "route", "cascade")
"""Strategies that answer with tool calls (the voting ones vote over calls and answers together)."""
CHOICES = ("auto", "none", "required")
"""String values of ``tool_choice`` (or ``{"type": "function", "function": {"name": ...}}``)."""
Choice = Literal["auto", "none", "required", "function"]
"""A request's tool choice (``function``: a named ``tool_choice``)."""
_NAME = re.compile(r"[A-Za-z_][\w.-]{0,63}")


class ToolsError(ValueError):
    """A malformed ``tools`` / ``tool_choice`` / tool message; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _show(v: object) -> str:
    return json.dumps(v, default=str)[:80]


@dataclass(frozen=True)
class FunctionTool:
    """One function the client offers (``{"type": "function", "function": {...}}``)."""

    name: str
    """The function's name (identifier-like, at most 64 characters)."""
    description: str = ""
    """What it does (shown to the model)."""
    parameters: dict[str, JsonValue] = field(default_factory=dict)
    """JSON schema of its arguments (shown to the model)."""

    def spec(self) -> JsonObject:
        """The function as the model sees it in the tool list."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True)
class ToolConfig:
    """A request's tools and its ``tool_choice``."""

    tools: tuple[FunctionTool, ...]
    """The functions offered (may be empty only with ``choice="none"``)."""
    choice: Choice = "auto"
    """``function``: the named function :attr:`function` must be called."""
    function: str | None = None
    """The function a named ``tool_choice`` requires."""

    @property
    def active(self) -> bool:
        """Whether the model may call tools (tools offered and ``tool_choice`` not ``none``)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def prefix(self) -> str | None:
        """The start of the reply that forces a call (``required`` / named), else ``None``."""
        if self.choice == "required":
            return TOOL_CALL_OPEN
        if self.choice == "function":
            return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(self.function)}, "arguments": '
        return None

    def call_schema(self) -> JsonObject | None:
        """The JSON schema a forced call's body must match (``required`` / named), else ``None``.

        One object ``{"name": <one of the names>, "arguments": <that tool's parameters>}`` per allowed tool
        (``anyOf`` when ``required`` offers several)."""
        if self.choice == "function":
            allowed = [t for t in self.tools if t.name == self.function]
        elif self.choice == "required":
            allowed = list(self.tools)
        else:
            return None
        one: list[JsonObject] = [{"type": "object",
                "properties": {"name": {"enum": [t.name]}, "arguments": t.parameters or {"type": "object"}},
                "required": ["name", "arguments"]} for t in allowed]
        return one[0] if len(one) == 1 else {"anyOf": one}

    def system_text(self) -> str:
        """The tool list and call format for the system message."""
        specs = "\n".join(json.dumps(t.spec()) for t in self.tools)
        must = {"required": "\nYou must call at least one function in this reply.",
                "function": f"\nYou must call the function {self.function!r} in this reply."}.get(self.choice, "")
        return ("You can call functions. Their signatures (JSON schema of the arguments):\n<tools>\n"
                f"{specs}\n</tools>\nTo call a function, reply with\n"
                f'{TOOL_CALL_OPEN}{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}{TOOL_CALL_CLOSE}\n'
                "(one block per call); the results come back in <tool_response> blocks." + must)


def _function_tool(i: int, raw: object) -> FunctionTool:
    where = f"tools[{i}]"
    if not isinstance(raw, dict):
        raise ToolsError(f"`{where}` must be an object such as {{\"type\": \"function\", \"function\": {{\"name\": "
                         f"\"get_weather\", \"parameters\": {{...}}}}}}, got {_show(raw)}", where)
    if raw.get("type") != "function":
        raise ToolsError(f"`{where}.type` must be \"function\", got {_show(raw.get('type'))}; only function tools are "
                         f"supported", f"{where}.type")
    fn = raw.get("function")
    if not isinstance(fn, dict):
        raise ToolsError(f"`{where}.function` must be an object with `name`, `description` and `parameters`, got "
                         f"{_show(fn)}", f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolsError(f"`{where}.function.name` must be an identifier-like name (letters, digits, _ . -, at most "
                         f"64 characters, not starting with a digit), got {_show(name)}", f"{where}.function.name")
    desc = fn.get("description", "") or ""
    if not isinstance(desc, str):
        raise ToolsError(f"`{where}.function.description` must be a string, got {_show(desc)}",
                         f"{where}.function.description")
    params = fn.get("parameters", {}) or {}
    if not isinstance(params, dict):
        raise ToolsError(f"`{where}.function.parameters` must be a JSON schema object such as {{\"type\": \"object\", "
                         f"\"properties\": {{...}}}}, got {_show(params)}", f"{where}.function.parameters")
    return FunctionTool(name, desc, params)


def _named_choice(v: str) -> TypeGuard[Literal["auto", "none", "required"]]:
    return v in CHOICES


def tool_config(tools: object, tool_choice: object) -> ToolConfig | None:
    """The request's :class:`ToolConfig` (``None``: no tools and no ``tool_choice``); raises :class:`ToolsError`."""
    if tools is not None and not isinstance(tools, list):
        raise ToolsError(f"`tools` must be a list of function tools, got {_show(tools)}", "tools")
    fns = tuple(_function_tool(i, t) for i, t in enumerate(tools or []))
    names = [f.name for f in fns]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ToolsError(f"`tools[{i}].function.name` must be unique, got {n!r} twice; rename or remove one",
                             f"tools[{i}].function.name")
    if tool_choice is None:
        return ToolConfig(fns) if fns else None
    choice: Choice
    if isinstance(tool_choice, str):
        if not _named_choice(tool_choice):
            raise ToolsError(f"`tool_choice` must be one of {', '.join(CHOICES)} or {{\"type\": \"function\", "
                             f"\"function\": {{\"name\": ...}}}}, got {_show(tool_choice)}", "tool_choice")
        choice, function = tool_choice, None
    else:
        fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolsError(f"`tool_choice` must be one of {', '.join(CHOICES)} or {{\"type\": \"function\", "
                             f"\"function\": {{\"name\": ...}}}}, got {_show(tool_choice)}", "tool_choice")
        if name not in names:
            raise ToolsError(f"`tool_choice.function.name` must name one of the request's tools "
                             f"({', '.join(names) or 'none given'}), got {name!r}; add it to `tools` or fix the name",
                             "tool_choice.function.name")
        choice, function = "function", name
    if choice != "none" and not fns:
        raise ToolsError(f"`tool_choice` {_show(tool_choice)} needs `tools`, got none; send the functions in `tools` "
                         f"or leave tool_choice out", "tool_choice")
    return ToolConfig(fns, choice, function)


def history_calls(i: int, raw: object) -> list[ToolCall]:
    """The ``tool_calls`` of an earlier assistant message ``i`` (OpenAI shape, arguments as a JSON string)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(raw, list):
        raise ToolsError(f"`{where}` must be a list of tool calls, got {_show(raw)}", where)
    calls = []
    for j, c in enumerate(raw):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolsError(f"`{where}[{j}].function.name` must be a string (a call is {{\"id\": ..., \"type\": "
                             f"\"function\", \"function\": {{\"name\": ..., \"arguments\": \"{{...}}\"}}}}), got "
                             f"{_show(c)}", f"{where}[{j}].function.name")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                args = {"input": args}  # rendered as the model wrote it, never dropped
        if not isinstance(args, dict):
            args = {"input": args}
        calls.append(ToolCall(fn["name"], args))
    return calls


def format_calls(calls: list[ToolCall]) -> str:
    """Tool calls as the model writes them (one ``<tool_call>`` block each)."""
    return "\n".join(f"{TOOL_CALL_OPEN}{json.dumps({'name': c.name, 'arguments': c.arguments})}{TOOL_CALL_CLOSE}"
                     for c in calls)


def render_messages(messages: list[Message], cfg: ToolConfig | None) -> list[Message]:
    """Role/content messages for any chat template: ``tool`` turns as user ``<tool_response>`` turns, and the
    tool list in the system message when the model may call tools (assistant calls were rendered by
    :func:`history_calls` / :func:`format_calls` when the messages were checked)."""
    out: list[Message] = []
    responses = False  # the last message of ``out`` holds tool responses (the next one joins it)
    for m in messages:
        if m["role"] == "tool":
            resp = OBSERVATION_TEMPLATE.format(observation=m["content"]).strip()
            if responses:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + resp}
            else:
                out.append({"role": "user", "content": resp})
            responses = True
        else:
            out.append(dict(m))
            responses = False
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if cfg is not None and cfg.active:
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + cfg.system_text()).strip()}
        else:
            out.insert(0, {"role": "system", "content": cfg.system_text()})
    return out


@dataclass
class ToolReply:
    """The answer as an OpenAI assistant message with tool calls."""

    content: str | None
    """Text before the first call (``None`` when there is none)."""
    calls: list[ToolCall]
    """The calls returned (each charged one ``tool_calls`` unit)."""
    ids: list[str] = field(default_factory=list)
    """``call_…`` ids, one per call."""

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = [f"call_{secrets.token_hex(12)}" for _ in self.calls]

    def tool_calls(self, deltas: bool = False) -> list[JsonObject]:
        """The ``tool_calls`` of the message (``deltas``: of a stream chunk, with ``index``)."""
        out: list[JsonObject] = []
        for i, (c, cid) in enumerate(zip(self.calls, self.ids, strict=True)):
            item: JsonObject = {"id": cid, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            out.append({"index": i, **item} if deltas else item)
        return out


@dataclass
class ToolTurn:
    """One request's tools: whether they are shown, the reply's parsed calls, the warnings."""

    cfg: ToolConfig
    """The request's tools and choice."""
    offered: bool = True
    """False when the budget had no tool call left: the tools were not shown."""
    reply: ToolReply | None = None
    """Set by :meth:`finish` when the answer calls tools."""
    warnings: list[str] = field(default_factory=list)
    """``budgetlm.warnings`` entries (tool calls dropped for the budget)."""

    @classmethod
    def plan(cls, cfg: ToolConfig, meter: Meter, constrained: bool = False) -> ToolTurn:
        """The turn under ``meter``'s budget: without tools when no ``tool_calls`` are left; ``constrained``: the
        backend has constrained decoding (a forced call is decoded under its JSON schema)."""
        left = meter.remaining("tool_calls")
        if cfg.active and left is not None and left < 1:
            return cls(cfg, offered=False, constrained=constrained, warnings=[
                "the budget has no tool_calls left: answered without tools (the tool list was not shown and no tool "
                "call is returned); raise budget.tool_calls or wait for the allowance"])
        return cls(cfg, constrained=constrained)

    @property
    def active(self) -> bool:
        """Whether the model may call tools in this request."""
        return self.offered and self.cfg.active

    constrained: bool = False
    """True when a forced call is decoded under :meth:`ToolConfig.call_schema` (the backend has constrained
    decoding): the reply starts with ``<tool_call>`` and the model writes the call's JSON only."""
    parser: Callable[[str], tuple[str, list[ToolCall]]] | None = None
    """Parses a reply into ``(content, calls)`` (a vLLM tool parser, :mod:`.tool_parsers`); ``None``: budgetlm's."""
    parser_name: str = "budgetlm"
    """The parser's name, for the ledger."""

    @property
    def prefix(self) -> str | None:
        """The request's ``assistant_prefix`` (``required`` / named choices)."""
        if not self.active:
            return None
        return TOOL_CALL_OPEN if self.constrained and self.cfg.prefix else self.cfg.prefix

    @property
    def json_schema(self) -> JsonObject | None:
        """The request's JSON schema (a forced call on a backend with constrained decoding), else ``None``."""
        return self.cfg.call_schema() if self.active and self.constrained else None

    def finish(self, result: Result, meter: Meter) -> Result:
        """Parse the answer's tool calls and charge each to ``meter`` (those that do not fit are dropped)."""
        if not self.active:
            return result
        text = result.text
        if self.json_schema is not None and text.startswith(TOOL_CALL_OPEN) and TOOL_CALL_CLOSE not in text:
            text += TOOL_CALL_CLOSE  # the schema ends the reply with the call's JSON: close its block
        content, calls = (self.parser or parse_tool_calls)(text)
        if not calls:
            cut = text.find(TOOL_CALL_OPEN)
            if cut >= 0:  # a call that never closed or parsed (cut by max_tokens): never returned as content
                result.text = text[:cut].rstrip()
                why = "it was cut by the token limit" if result.truncated or result.finish_reason == "length" else \
                    "its JSON did not parse"
                self.warnings.append(f"the reply started a tool call that was dropped because {why}; raise "
                                     f"strategy_params.max_tokens (or the budget) for longer calls")
            return result
        kept: list[ToolCall] = []
        for c in calls:
            try:
                result.usage = result.usage + meter.record_tool_call(1, name=c.name)
            except BudgetExceeded:
                break
            kept.append(c)
        if len(kept) < len(calls):
            self.warnings.append(f"the budget's tool_calls allowed {len(kept)} of the {len(calls)} tool call(s) the "
                                 f"model made: {len(calls) - len(kept)} dropped; raise budget.tool_calls")
        if kept:
            self.reply = ToolReply(content or None, kept)
        else:
            result.text = content
        return result

    def ledger(self) -> JsonObject:
        """The ``budgetlm.tools`` block: choice, whether tools were shown, calls returned."""
        return {"choice": self.cfg.function or self.cfg.choice, "offered": self.active,
                "constrained": self.json_schema is not None, "calls": len(self.reply.calls) if self.reply else 0,
                "parser": self.parser_name}


class ToolCallHoldback:
    """Streamed content in, content safe to send out: text from a ``<tool_call>`` tag on (or a partial tag at the
    end) is held back, so a call is never streamed as content."""

    def __init__(self) -> None:
        self.seen = ""
        self.sent = ""

    def feed(self, text: str) -> str:
        """The part of the content so far that can be sent now."""
        self.seen += text
        cut = self.seen.find(TOOL_CALL_OPEN)
        if cut == -1:
            cut = len(self.seen)
            for k in range(len(TOOL_CALL_OPEN) - 1, 0, -1):
                if self.seen.endswith(TOOL_CALL_OPEN[:k]):
                    cut -= k
                    break
        cut = len(self.seen[:cut].rstrip())  # whitespace before a call is not content: held until text follows
        out = self.seen[len(self.sent):cut] if cut > len(self.sent) else ""
        self.sent += out
        return out
