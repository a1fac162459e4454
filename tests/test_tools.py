"""Tools: parsing ``<tool_call>`` text, normalising tool lists, and running calls against a meter."""

from __future__ import annotations

from typing import Any

import pytest

from budgetlm import Budget, ConfigError, Meter
from budgetlm.tools import (
    MAX_OBSERVATION_CHARS,
    OBSERVATION_TEMPLATE,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    Tool,
    ToolCall,
    as_tools,
    call_tool,
    describe_tools,
    parse_tool_call,
)


def tagged(body: str, close: bool = True) -> str:
    return TOOL_CALL_OPEN + body + (TOOL_CALL_CLOSE if close else "")


class Recorder:
    """A tool function that records its calls and returns a fixed result (or raises)."""

    def __init__(self, result: Any = "ok", raises: BaseException | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.result, self.raises = result, raises

    def __call__(self, **kw: Any) -> Any:
        self.calls.append(kw)
        if self.raises is not None:
            raise self.raises
        return self.result


def calc(x: int, y: int = 0) -> int:
    """Adds two numbers."""
    return x + y


# ------------------------------------------------------------------ parse_tool_call
@pytest.mark.parametrize(("text", "expected"), [
    # the Hermes/Qwen JSON form
    (tagged('{"name": "calc", "arguments": {"x": 1, "y": 2}}'), ToolCall("calc", {"x": 1, "y": 2})),
    # "args" is accepted as an alias of "arguments"
    (tagged('{"name": "calc", "args": {"x": 3}}'), ToolCall("calc", {"x": 3})),
    # "arguments" wins over "args" when both are given
    (tagged('{"name": "calc", "arguments": {"x": 1}, "args": {"x": 2}}'), ToolCall("calc", {"x": 1})),
    # no arguments at all: an empty dict
    (tagged('{"name": "now"}'), ToolCall("now", {})),
    # arguments as a JSON-encoded string (OpenAI style) are decoded
    (tagged('{"name": "calc", "arguments": "{\\"x\\": 5}"}'), ToolCall("calc", {"x": 5})),
    # arguments as a plain (non-JSON) string become the single argument `input`
    (tagged('{"name": "search", "arguments": "cats and dogs"}'), ToolCall("search", {"input": "cats and dogs"})),
    # a JSON string that decodes to a non-dict is wrapped too
    (tagged('{"name": "f", "arguments": "[1, 2]"}'), ToolCall("f", {"input": [1, 2]})),
    # a non-dict JSON value is wrapped as `input`
    (tagged('{"name": "f", "arguments": 7}'), ToolCall("f", {"input": 7})),
    # the bare name(arg) form of small models: the text between the parentheses is `input`
    (tagged("calculator(3 * 7)"), ToolCall("calculator", {"input": "3 * 7"})),
    # ... with surrounding quotes stripped and whitespace around it
    (tagged('  search("budget llm")  '), ToolCall("search", {"input": "budget llm"})),
    # ... dotted / dashed names are identifiers too
    (tagged("math.sqrt(16)"), ToolCall("math.sqrt", {"input": "16"})),
    # the closing tag may be missing (steps stop at it)
    (tagged('{"name": "calc", "arguments": {"x": 1}}', close=False), ToolCall("calc", {"x": 1})),
    # text around the call is ignored; whitespace inside the tags too
    ('I will compute.\n' + tagged('\n {"name": "calc", "arguments": {"x": 9}} \n') + " then stop",
     ToolCall("calc", {"x": 9})),
    # with several calls, the last one is read
    (tagged('{"name": "a", "arguments": {}}') + " then " + tagged('{"name": "b", "arguments": {"k": 1}}'),
     ToolCall("b", {"k": 1})),
])
def test_parse_tool_call(text: str, expected: ToolCall) -> None:
    assert parse_tool_call(text) == expected


@pytest.mark.parametrize("text", [
    "",  # nothing
    "no tool call here",  # no opening tag
    '{"name": "calc", "arguments": {"x": 1}}',  # JSON without the tags
    tagged(""),  # empty call
    tagged("not json at all"),  # neither JSON nor name(arg)
    tagged('{"arguments": {"x": 1}}'),  # no name
    tagged('{"name": 5, "arguments": {}}'),  # name is not a string
    tagged('["calc", {"x": 1}]'),  # JSON but not an object
    tagged('"calc"'),  # JSON string
    tagged('{"name": "calc", "arguments": {"x": 1}'),  # broken JSON (missing brace)
    tagged("1calc(2)"),  # bare form with a name that is not an identifier
    tagged('{"name": "calc"} trailing', close=False),  # trailing garbage after the JSON, no close tag
])
def test_parse_tool_call_garbage_is_none(text: str) -> None:
    assert parse_tool_call(text) is None


# ------------------------------------------------------------------ Tool / as_tools
def test_as_tools_from_functions_mapping_and_tools() -> None:
    def search(q: str) -> str:
        """  Looks things up.  """
        return q

    got = as_tools([calc, search])
    assert list(got) == ["calc", "search"]
    assert got["calc"].fn is calc and got["calc"].description == "Adds two numbers."
    assert got["search"].description == "Looks things up."  # docstring stripped

    got = as_tools({"add": calc, "find": search})
    assert list(got) == ["add", "find"]  # named by the mapping's keys, not __name__
    assert got["add"].fn is calc and got["add"].description == ""

    t = Tool("c", calc, "custom")
    assert as_tools([t, search]) == {"c": t, "search": Tool("search", search, "Looks things up.")}
    assert as_tools(None) == {} and as_tools([]) == {}


@pytest.mark.parametrize(("tools", "match"), [
    # the same function twice
    ([calc, calc], "tool names must be unique, got 'calc' twice"),
    # a Tool and a function with the same name
    ([Tool("calc", print), calc], "tool names must be unique, got 'calc' twice"),
    # two Tools with the same name
    ([Tool("t", calc), Tool("t", print)], "tool names must be unique, got 't' twice"),
    # a lambda has no usable name
    ([lambda x: x], "`name` must be an identifier-like tool name, got '<lambda>'"),
    # a mapping key that is not an identifier
    ({"two words": calc}, "`name` must be an identifier-like tool name, got 'two words'"),
    # a mapping value that is not callable
    ({"calc": 3}, "`fn` of tool 'calc' must be callable, got int"),
])
def test_as_tools_errors(tools: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        as_tools(tools)


@pytest.mark.parametrize("name", ["", "1abc", "a b", "x(y)"])
def test_tool_rejects_bad_names(name: str) -> None:
    with pytest.raises(ConfigError, match="`name` must be an identifier-like tool name"):
        Tool(name, calc)


def test_describe_tools_lists_every_tool_and_the_format() -> None:
    text = describe_tools(as_tools([calc, Tool("now", lambda: 1)]))
    assert "- calc: Adds two numbers." in text and "- now: (no description)" in text
    assert TOOL_CALL_OPEN in text and TOOL_CALL_CLOSE in text
    # the format shown to the model is itself parseable
    example = text[text.index(TOOL_CALL_OPEN): text.index(TOOL_CALL_CLOSE) + len(TOOL_CALL_CLOSE)]
    assert parse_tool_call(example.replace('"<tool>"', '"calc"').replace("{...}", "{}")) == ToolCall("calc", {})


# ------------------------------------------------------------------ call_tool
def test_call_tool_runs_and_charges_one_call() -> None:
    rec = Recorder(result=21)
    meter = Meter(Budget(tool_calls=5))
    out = call_tool(tagged('{"name": "calc", "arguments": {"x": 1, "y": 2}}'), {"calc": Tool("calc", rec)}, meter)
    assert rec.calls == [{"x": 1, "y": 2}]
    assert (out.observation, out.error, out.skipped) == ("21", None, None)
    assert out.call == ToolCall("calc", {"x": 1, "y": 2}) and out.latency_s >= 0
    assert meter.spent("tool_calls") == 1 and meter.total().tool_calls == 1
    assert meter.spent("output_tokens") == 0  # a tool call costs no tokens
    assert out.to_json() == {"name": "calc", "arguments": {"x": 1, "y": 2}, "observation": "21", "error": None,
                             "skipped": None, "latency_s": out.latency_s}


def test_call_tool_accepts_a_parsed_call_and_no_meter() -> None:
    out = call_tool(ToolCall("calc", {"x": 2, "y": 3}), as_tools([calc]))
    assert (out.observation, out.error) == ("5", None)


def test_unknown_tool_lists_available_and_charges_nothing() -> None:
    rec = Recorder()
    meter = Meter(Budget(tool_calls=3))
    tools = as_tools({"calc": rec, "search": rec})
    out = call_tool(tagged('{"name": "weather", "arguments": {}}'), tools, meter)
    assert out.error == "unknown tool"
    assert out.observation == "error: unknown tool 'weather'; available: calc, search"
    assert out.skipped is None and out.call == ToolCall("weather", {})
    assert rec.calls == [] and meter.spent("tool_calls") == 0 and meter.records == []


def test_unknown_tool_with_no_tools_says_none() -> None:
    out = call_tool(ToolCall("x", {}), {}, Meter())
    assert out.observation == "error: unknown tool 'x'; available: (none)"


def test_unparsable_call_is_an_observation_and_charges_nothing() -> None:
    meter = Meter(Budget(tool_calls=1))
    out = call_tool(tagged("what is this"), as_tools([calc]), meter)
    assert out.call is None and out.error == "unparsable tool call"
    assert out.observation.startswith("error: could not parse the tool call")
    assert TOOL_CALL_OPEN in out.observation  # tells the model the expected format
    assert meter.spent("tool_calls") == 0
    assert out.to_json()["name"] is None and out.to_json()["arguments"] is None


@pytest.mark.parametrize(("exc", "observation", "error"), [
    (ValueError("boom"), "error: ValueError: boom", "ValueError: boom"),
    (ZeroDivisionError("division by zero"), "error: ZeroDivisionError: division by zero",
     "ZeroDivisionError: division by zero"),
    (KeyError("k"), "error: KeyError: 'k'", "KeyError: 'k'"),
])
def test_tool_exception_is_an_error_observation_and_still_charged(exc: Exception, observation: str, error: str) -> None:
    rec = Recorder(raises=exc)
    meter = Meter(Budget(tool_calls=2))
    out = call_tool(ToolCall("f", {"a": 1}), {"f": Tool("f", rec)}, meter)  # must not raise
    assert rec.calls == [{"a": 1}]
    assert (out.observation, out.error, out.skipped) == (observation, error, None)
    assert meter.spent("tool_calls") == 1  # it ran, so it counts


@pytest.mark.parametrize(("arguments", "fragment"), [
    ({"z": 1}, "unexpected keyword argument 'z'"),  # unknown keyword
    ({}, "missing a required argument: 'x'"),  # missing required argument
    ({"input": "1 + 2"}, "unexpected keyword argument 'input'"),  # bare-form call to a keyword tool
])
def test_bad_arguments(arguments: dict, fragment: str) -> None:
    meter = Meter(Budget(tool_calls=2))
    out = call_tool(ToolCall("calc", arguments), as_tools([calc]), meter)
    assert out.error is not None and out.error.startswith("bad arguments:") and fragment in out.error
    assert out.observation.startswith("error: bad arguments for 'calc':") and fragment in out.observation
    assert out.skipped is None
    assert meter.spent("tool_calls") == 0  # refused before charging: nothing ran


def test_type_error_inside_the_tool_is_not_bad_arguments() -> None:
    def broken(x: int) -> int:
        return x + "1"  # type: ignore[operator]  # the tool's own bug, not the caller's arguments

    out = call_tool(ToolCall("broken", {"x": 1}), as_tools([broken]))
    assert out.error is not None and not out.error.startswith("bad arguments")


def test_observation_is_cut() -> None:
    out = call_tool(ToolCall("big", {}), {"big": Tool("big", lambda: "x" * (MAX_OBSERVATION_CHARS + 500))})
    assert out.observation == "x" * MAX_OBSERVATION_CHARS


def test_observation_template_wraps_the_result() -> None:
    assert OBSERVATION_TEMPLATE.format(observation="42") == "\n<tool_response>42</tool_response>\n"


# ------------------------------------------------------------------ budget
def test_tool_call_budget_of_one_allows_one_call() -> None:
    rec = Recorder(result="r")
    tools = {"f": Tool("f", rec)}
    meter = Meter(Budget(tool_calls=1))
    first = call_tool(ToolCall("f", {"i": 1}), tools, meter)
    assert (first.observation, first.skipped, first.error) == ("r", None, None)
    second = call_tool(ToolCall("f", {"i": 2}), tools, meter)
    assert second.skipped == "budget exhausted: tool_calls"
    assert second.observation == "error: no tool calls left in the budget"
    assert second.error is not None and "tool_calls" in second.error
    assert second.call == ToolCall("f", {"i": 2}) and second.latency_s == 0.0
    assert rec.calls == [{"i": 1}]  # the refused call did not run
    assert meter.spent("tool_calls") == 1 and meter.remaining("tool_calls") == 0
    assert meter.stop_reason == "budget exhausted: tool_calls"


@pytest.mark.parametrize("attempts", [1, 3])
def test_zero_tool_call_budget_never_runs_the_tool(attempts: int) -> None:
    rec = Recorder()
    meter = Meter(Budget(tool_calls=0, output_tokens=100))
    for _ in range(attempts):
        out = call_tool(tagged('{"name": "f", "arguments": {}}'), {"f": Tool("f", rec)}, meter)
        assert out.skipped == "budget exhausted: tool_calls"
    assert rec.calls == [] and meter.spent("tool_calls") == 0


def test_tool_call_budget_of_a_parent_meter_applies() -> None:
    rec = Recorder()
    root = Meter(Budget(tool_calls=1))
    a, b = root.child(name="a"), root.child(name="b")
    assert call_tool(ToolCall("f", {}), {"f": Tool("f", rec)}, a).skipped is None
    assert call_tool(ToolCall("f", {}), {"f": Tool("f", rec)}, b).skipped == "budget exhausted: tool_calls"
    assert len(rec.calls) == 1 and root.spent("tool_calls") == 1 and b.spent("tool_calls") == 0


def test_exhausted_wall_time_skips_the_tool() -> None:
    now = [0.0]
    rec = Recorder()
    meter = Meter(Budget(wall_seconds=1.0), clock=lambda: now[0])
    now[0] = 2.0
    out = call_tool(ToolCall("f", {}), {"f": Tool("f", rec)}, meter)
    assert out.skipped == "budget exhausted: wall_seconds"
    assert rec.calls == [] and meter.spent("tool_calls") == 0


def test_unknown_tool_does_not_use_up_the_budget() -> None:
    rec = Recorder(result="done")
    meter = Meter(Budget(tool_calls=1))
    tools = {"f": Tool("f", rec)}
    for _ in range(3):
        assert call_tool(ToolCall("nope", {}), tools, meter).error == "unknown tool"
    out = call_tool(ToolCall("f", {}), tools, meter)
    assert (out.observation, out.skipped) == ("done", None)
