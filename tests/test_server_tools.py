"""Client-side function tools on the server: the official ``openai`` client against uvicorn, scripted backends.

Every scripted backend records the prompts it saw (the chat template of the scripted backend is
``<|role|> content`` per message), so the tests check what the model was shown as well as what the
client got back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server_app import Server, Start, _start

from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.budget import Budget
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.server.tools import ToolCallHoldback, ToolTurn, render_messages, tool_config
from budgetlm.strategies.aggregate import action_key
from budgetlm.strategies.base import Result
from budgetlm.tools import ToolCall, parse_tool_calls
from budgetlm.usage import Usage

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time of a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
USER = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


class Recorder:
    """A script that answers by rules on the prompt and records every prompt."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.prompts: list[str] = []

    def __call__(self, prompt: str, i: int, sampling: SamplingParams) -> str:
        self.prompts.append(prompt)
        return self.reply(prompt, i) if callable(self.reply) else self.reply


@pytest.fixture()
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts servers (as in test_server_app) and stops them at the end."""
    servers: list[Server] = []

    def go(**kw: Any) -> Server:
        servers.append(_start(tmp_path / f"server{len(servers)}.sqlite", **kw))
        return servers[-1]

    yield go
    for s in servers:
        s.stop()


def _server(start: Start, reply: Any, **cfg: Any) -> tuple[Server, Recorder]:
    rec = Recorder(reply)
    return start(backends={"default": ScriptedBackend(rec)}, **cfg), rec


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Recorder]]:
    """One server whose model calls get_weather(Paris) after a sentence, for read-only tests."""
    rec = Recorder(f"Let me check. {CALL}")
    s = _start(tmp_path_factory.mktemp("tools") / "server.sqlite", backends={"default": ScriptedBackend(rec)})
    yield s, rec
    s.stop()


# ------------------------------------------------------------------------------------------ answers


def test_a_tool_call_is_returned_as_tool_calls(echo: tuple[Server, Recorder]) -> None:
    s, rec = echo
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    extra = r.model_extra["budgetlm"]
    assert extra["ledger"]["units"]["tool_calls"]["spent"] == 1  # one unit per returned call
    assert extra["tools"] == {"choice": "auto", "offered": True, "constrained": False, "calls": 1,
                              "parser": "budgetlm"}
    prompt = rec.prompts[-1]  # the tool list with its schema, in the system turn, before the user's question
    assert prompt.startswith("<|system|> You can call functions.") and '"name": "get_weather"' in prompt
    assert '"required": ["city"]' in prompt and "<|user|> Weather in Paris?" in prompt


def test_a_text_answer_with_tools_is_a_plain_answer(start: Start) -> None:
    s, _ = _server(start, "It is sunny. Answer: sunny")
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == "It is sunny. Answer: sunny"
    assert r.model_extra["budgetlm"]["ledger"]["units"].get("tool_calls", {}).get("spent", 0) == 0


def test_parallel_calls(start: Start) -> None:
    s, _ = _server(start, CALL + '\n<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>')
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS)
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"] and r.choices[0].message.content is None
    assert len({c.id for c in calls}) == 2
    assert r.model_extra["budgetlm"]["ledger"]["units"]["tool_calls"]["spent"] == 2


def test_a_follow_up_turn_renders_the_calls_and_the_results(echo: tuple[Server, Recorder]) -> None:
    s, rec = echo
    messages = [*USER,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C, clear"},
                {"role": "tool", "tool_call_id": "call_2", "content": "14:05"}]
    s.client().chat.completions.create(model="budgetlm/sample", messages=messages, tools=TOOLS)
    prompt = rec.prompts[-1]
    assert ('<|assistant|> <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n') in prompt
    # both results in one user turn (templates that insist on alternating roles accept it)
    assert "<|user|> <tool_response>18C, clear</tool_response>\n<tool_response>14:05</tool_response>\n" in prompt
    # without tools on the follow-up, the history is still rendered (nothing dropped), the list is not shown
    s.client().chat.completions.create(model="budgetlm/sample", messages=messages)
    assert "<tool_response>18C, clear</tool_response>" in rec.prompts[-1] and "get_time" in rec.prompts[-1]
    assert "You can call functions" not in rec.prompts[-1]


# --------------------------------------------------------------------------------------------- votes


def _votes(calls: int) -> Any:
    """Samples 0..calls-1 call get_weather (arguments in different key orders), the rest answer 12."""
    def reply(prompt: str, i: int) -> str:
        args = '{"city": "Paris", "unit": "C"}' if i % 2 else '{"unit": "C", "city": "Paris"}'
        return f'<tool_call>{{"name": "get_weather", "arguments": {args}}}</tool_call>' if i < calls else "Answer: 12"
    return reply


@pytest.mark.parametrize("strategy", ["majority", "weighted_majority", "best_of_n", "adaptive"])
def test_votes_over_tool_calls(start: Start, strategy: str) -> None:
    s, _ = _server(start, _votes(2))
    params = {"max_samples": 3, "max_tokens": 64} if strategy == "adaptive" else {"n": 3}
    r = s.client().chat.completions.create(model=f"budgetlm/{strategy}", messages=USER, tools=TOOLS,
                                           extra_body={"strategy_params": params})
    if strategy != "best_of_n":  # best_of_n picks by score; the vote itself is checked in the trace
        # (adaptive: each sample is its own request, sample index 0, so every sample calls the tool)
        assert r.choices[0].finish_reason == "tool_calls"
        [call] = r.choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    extra = r.model_extra["budgetlm"]
    # one call returned = one unit, whatever the number of samples that made it
    spent = extra["ledger"]["units"].get("tool_calls", {}).get("spent", 0)
    assert spent == (1 if r.choices[0].finish_reason == "tool_calls" else 0)


def test_cot_returns_a_call_that_ends_its_reasoning_without_forcing_an_answer(start: Start) -> None:
    s, rec = _server(start, f"I should look it up. {CALL} and more")
    r = s.client().chat.completions.create(model="budgetlm/cot", messages=USER, tools=TOOLS,
                                           extra_body={"strategy_params": {"thinking_tokens": 64}})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "I should look it up."
    [call] = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert len(rec.prompts) == 1  # the reasoning stopped at the call: no forced-answer call
    # without a call, cot is budget forcing as before: reasoning, then the forced answer
    s2, rec2 = _server(start, lambda prompt, i: " 12" if prompt.rstrip().endswith("Answer:") else "Six and six.")
    r = s2.client().chat.completions.create(model="budgetlm/cot", messages=USER, tools=TOOLS,
                                            extra_body={"strategy_params": {"thinking_tokens": 64}})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "Answer: 12"
    assert len(rec2.prompts) == 2


def test_cot_forced_call_is_one_constrained_call(start: Start) -> None:
    schemas: list[Any] = []

    def reply(prompt: str, i: int, sampling: SamplingParams) -> str:
        schemas.append(sampling.json_schema)
        return '{"name": "get_weather", "arguments": {"city": "Rome"}}'

    s = start(backends={"default": ConstrainedScripted(reply)})
    r = s.client().chat.completions.create(model="budgetlm/cot", messages=USER, tools=TOOLS, tool_choice="required")
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and schemas and schemas[0] is not None and len(schemas) == 1


@pytest.mark.parametrize("model, params", [
    ("budgetlm/cascade", {"stages": [{"strategy": "sample"}, {"strategy": "majority", "params": {"n": 3}}]}),
    ("budgetlm/route", {"router": "always_large"}),
])
def test_cascade_and_route_strategies_return_calls(start: Start, model: str, params: dict[str, Any]) -> None:
    s, _ = _server(start, CALL)
    r = s.client().chat.completions.create(model=model, messages=USER, tools=TOOLS,
                                           extra_body={"strategy_params": params})
    assert r.choices[0].finish_reason == "tool_calls", r.model_extra["budgetlm"]
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.model_extra["budgetlm"]["ledger"]["units"]["tool_calls"]["spent"] == 1


def test_an_answer_outvotes_a_call(start: Start) -> None:
    s, _ = _server(start, _votes(1))
    r = s.client().chat.completions.create(model="budgetlm/majority", messages=USER, tools=TOOLS,
                                           extra_body={"strategy_params": {"n": 3}})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == "Answer: 12"


def test_vote_keys_normalise_arguments() -> None:
    a = action_key('<tool_call>{"name": "f", "arguments": {"a": 1, "b": [2, 3]}}</tool_call>')
    b = action_key('ok <tool_call>{"name": "f", "arguments": {"b": [2, 3], "a": 1}}')  # no closing tag
    assert a == b == ToolCall("f", {"a": 1, "b": [2, 3]}).key
    assert action_key("The answer is 12. Answer: 12") == "12"
    assert action_key("<tool_call>not json at all</tool_call> Answer: 3") == "3"  # no parsable call: the answer


# ------------------------------------------------------------------------------------------- choices


def test_tool_choice_none_hides_the_tools_and_returns_no_call(echo: tuple[Server, Recorder]) -> None:
    s, rec = echo
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert "You can call functions" not in rec.prompts[-1]
    assert r.model_extra["budgetlm"]["tools"]["offered"] is False
    # `none` works with every strategy (there is nothing to parse)
    r = s.client().chat.completions.create(model="budgetlm/cot", messages=USER, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None


def test_tool_choice_required_starts_the_call(start: Start) -> None:
    s, rec = _server(start, '{"name": "get_time", "arguments": {"city": "Rome"}}</tool_call>')
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS, tool_choice="required")
    assert rec.prompts[-1].endswith("<|assistant|> <tool_call>")
    assert "You must call at least one function" in rec.prompts[-1]
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"city": "Rome"}
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None


def test_a_named_tool_choice_starts_that_call(start: Start) -> None:
    s, rec = _server(start, '{"city": "Rome"}}</tool_call>')
    named = {"type": "function", "function": {"name": "get_weather"}}
    for model in ("budgetlm/sample", "budgetlm/majority"):
        r = s.client().chat.completions.create(model=model, messages=USER, tools=TOOLS, tool_choice=named,
                                               extra_body={"strategy_params": {"n": 3}} if "majority" in model else None)
        assert rec.prompts[-1].endswith('<|assistant|> <tool_call>{"name": "get_weather", "arguments": ')
        [call] = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
        assert r.model_extra["budgetlm"]["tools"]["choice"] == "get_weather"


# --------------------------------------------------------------------------------------------- input


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tools": {"type": "function"}}, "tools", ["tools"]),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", ['must be "function"', "retrieval"]),
    ({"tools": [{"type": "function"}]}, "tools[0].function", ["`tools[0].function` must be an object"]),
    ({"tools": [{"type": "function", "function": {"name": "get weather!"}}]}, "tools[0].function.name",
     ["identifier-like", "get weather!"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters",
     ["JSON schema object"]),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", ["unique", "get_weather"]),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", ["auto, none, required", "always"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", ["get_weather, get_time", "'nope'"]),
    ({"tool_choice": "required"}, "tool_choice", ["needs `tools`"]),
    ({"tools": TOOLS, "model": "budgetlm/pdr"}, "tools", ["sample, cot, best_of_n, majority", "'pdr'"]),
    ({"messages": [*USER, {"role": "tool", "content": "18C"}]}, "messages[1].tool_call_id", ["tool_call_id"]),
    ({"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {}}]}]},
     "messages[1].tool_calls[0].function.name", ["must be a string"]),
])
def test_bad_tools_are_400_naming_the_field(echo: tuple[Server, Recorder], body: dict[str, Any], param: str,
                                             words: list[str]) -> None:
    s, _ = echo
    r = s.post({"model": "budgetlm/sample", "messages": USER, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    for w in words:
        assert w in err["message"]


# -------------------------------------------------------------------------------------------- budget


def test_calls_beyond_the_tool_call_budget_are_dropped_with_a_warning(start: Start) -> None:
    s, _ = _server(start, CALL + '<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>')
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS,
                                           extra_body={"budget": {"output_tokens": 200, "tool_calls": 1}})
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    extra = r.model_extra["budgetlm"]
    assert extra["ledger"]["units"]["tool_calls"]["spent"] == 1
    assert any("allowed 1 of the 2 tool call(s)" in w for w in extra["warnings"])
    row = next(x for x in s.state.store.requests() if x["id"] == r.id)  # the key is charged the call
    assert row["ledger"]["units"]["tool_calls"]["spent"] == 1


class ConstrainedScripted(ScriptedBackend):
    """A scripted backend that claims constrained decoding (the script plays the constrained model)."""

    constrained_decoding = True


WEATHER_CALL_SCHEMA = {"type": "object", "properties": {"name": {"enum": ["get_weather"]},
                                                        "arguments": WEATHER["function"]["parameters"]},
                       "required": ["name", "arguments"]}


def test_call_schema_of_named_and_required_choices() -> None:
    named = tool_config(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named is not None and named.call_schema() == WEATHER_CALL_SCHEMA
    required = tool_config(TOOLS, "required")
    assert required is not None
    assert required.call_schema() == {"anyOf": [WEATHER_CALL_SCHEMA, {
        "type": "object", "properties": {"name": {"enum": ["get_time"]}, "arguments": TIME["function"]["parameters"]},
        "required": ["name", "arguments"]}]}
    bare = tool_config([{"type": "function", "function": {"name": "ping"}}], "required")
    assert bare is not None and bare.call_schema() == {
        "type": "object", "properties": {"name": {"enum": ["ping"]}, "arguments": {"type": "object"}},
        "required": ["name", "arguments"]}
    for choice in ("auto", "none"):
        cfg = tool_config(TOOLS, choice)
        assert cfg is not None and cfg.call_schema() is None


def test_a_turn_is_constrained_only_on_a_backend_with_constrained_decoding() -> None:
    cfg = tool_config(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert cfg is not None
    plain = ToolTurn.plan(cfg, Meter(Budget(output_tokens=100)))
    assert plain.json_schema is None and plain.prefix == cfg.prefix and plain.ledger()["constrained"] is False
    turn = ToolTurn.plan(cfg, Meter(Budget(output_tokens=100)), constrained=True)
    assert turn.prefix == "<tool_call>" and turn.json_schema == WEATHER_CALL_SCHEMA
    meter = Meter(Budget(output_tokens=100))
    res = turn.finish(Result("p", '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}', None,
                             Usage.zero()), meter)  # the schema ends the reply without the closing tag
    assert turn.reply is not None and turn.reply.calls == [ToolCall("get_weather", {"city": "Oslo"})]
    assert turn.ledger()["constrained"] is True and res.text.startswith("<tool_call>")
    auto = ToolTurn.plan(tool_config(TOOLS, "auto"), Meter(Budget(output_tokens=100)), constrained=True)
    assert auto.json_schema is None and auto.prefix is None and auto.ledger()["constrained"] is False


def test_json_schema_is_refused_by_backends_without_constrained_decoding() -> None:
    from budgetlm.backends.base import GenerationRequest
    from budgetlm.errors import ConfigError

    req = GenerationRequest(messages=USER, sampling=SamplingParams(json_schema=WEATHER_CALL_SCHEMA))
    with pytest.raises(ConfigError, match=r"`json_schema` needs a backend with constrained decoding \(vLLM\), got "
                                          r"ScriptedBackend"):
        ScriptedBackend(lambda p, i, sp: "x").generate([req])


@pytest.mark.parametrize("model", ["budgetlm/sample", "budgetlm/majority", "budgetlm/adaptive"])
def test_forced_calls_carry_the_schema_on_a_constrained_backend(start: Start, model: str) -> None:
    schemas: list[Any] = []

    def reply(prompt: str, i: int, sampling: SamplingParams) -> str:
        schemas.append(sampling.json_schema)
        return '{"name": "get_weather", "arguments": {"city": "Rome"}}'

    s = start(backends={"default": ConstrainedScripted(reply)})
    named = {"type": "function", "function": {"name": "get_weather"}}
    extra = {"strategy_params": {"n": 3}} if "majority" in model else None
    r = s.client().chat.completions.create(model=model, messages=USER, tools=TOOLS, tool_choice=named,
                                           extra_body=extra)
    assert schemas and all(sc == WEATHER_CALL_SCHEMA for sc in schemas)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    assert r.model_extra["budgetlm"]["tools"] == {"choice": "get_weather", "offered": True, "constrained": True,
                                                  "calls": 1, "parser": "budgetlm"}
    schemas.clear()
    s.client().chat.completions.create(model=model, messages=USER, tools=TOOLS, extra_body=extra)
    assert schemas and all(sc is None for sc in schemas)  # auto: unconstrained


def test_a_budget_without_tool_calls_answers_without_tools() -> None:
    cfg = tool_config(TOOLS, "required")
    assert cfg is not None
    meter = Meter(Budget(tool_calls=1, output_tokens=100))
    meter.record_tool_call(1)
    turn = ToolTurn.plan(cfg, meter)
    assert not turn.active and turn.prefix is None and "no tool_calls left" in turn.warnings[0]
    assert "You can call functions" not in str(render_messages(USER, cfg if turn.active else None))
    res = Result("p", CALL, None, Usage.zero())
    assert turn.finish(res, meter) is res and turn.reply is None and res.text == CALL  # nothing parsed or charged
    assert meter.spent("tool_calls") == 1


# ------------------------------------------------------------------------------------------ streaming


def _collect(stream: Any) -> tuple[str, dict[int, dict[str, str]], list[str], Any]:
    content, calls, finish, last = "", {}, [], None
    for ch in stream:
        for c in ch.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                acc = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] += d.id or ""
                acc["name"] += (d.function.name or "") if d.function else ""
                acc["arguments"] += (d.function.arguments or "") if d.function else ""
            if c.finish_reason:
                finish.append(c.finish_reason)
                last = ch
    return content, calls, finish, last


def test_a_streamed_call_arrives_as_tool_call_deltas(echo: tuple[Server, Recorder]) -> None:
    s, _ = echo
    with s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS,
                                            stream=True) as stream:
        assert stream.response.headers["x-budgetlm-stream"] == "tokens"  # the text before the call streams
        content, calls, finish, last = _collect(stream)
    assert content == "Let me check." and "<tool_call>" not in content
    assert finish == ["tool_calls"] and list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert last.model_extra["budgetlm"]["ledger"]["units"]["tool_calls"]["spent"] == 1


@pytest.mark.parametrize(("model", "choice", "reply"), [
    ("budgetlm/majority", "auto", CALL),  # buffered: a vote
    ("budgetlm/sample", "required", '{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),  # forced
])
def test_buffered_streams_send_the_call_as_deltas(start: Start, model: str, choice: str, reply: str) -> None:
    s, _ = _server(start, reply)
    with s.client().chat.completions.create(model=model, messages=USER, tools=TOOLS, tool_choice=choice, stream=True,
                                            extra_body={"strategy_params": {"n": 3}} if "majority" in model else None
                                            ) as stream:
        assert stream.response.headers["x-budgetlm-stream"] == "buffered"
        content, calls, finish, _ = _collect(stream)
    assert content == "" and finish == ["tool_calls"]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}


def test_a_streamed_text_answer_with_tools_streams_as_before(start: Start) -> None:
    s, _ = _server(start, "No tool needed. Answer: 12")
    stream = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS, stream=True)
    content, calls, finish, _ = _collect(stream)
    assert content == "No tool needed. Answer: 12" and calls == {} and finish == ["stop"]


# ------------------------------------------------------------------------------------------ helpers


def test_parse_tool_calls() -> None:
    text = 'Plan. <tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call> <tool_call>{"name": "b"}</tool_call> junk'
    assert parse_tool_calls(text) == ("Plan.", [ToolCall("a", {"x": 1}), ToolCall("b", {})])
    assert parse_tool_calls("no calls") == ("no calls", [])
    assert parse_tool_calls("<tool_call>{broken") == ("<tool_call>{broken", [])


def test_holdback_never_streams_a_call() -> None:
    h = ToolCallHoldback()
    out = [h.feed(t) for t in ["Hi ", "there <tool", "_call>{", '"name": "f"}']]
    assert "".join(out) == "Hi there" and h.sent == "Hi there"
    h = ToolCallHoldback()
    assert [h.feed(t) for t in ["a ", "<b> ", "c"]] == ["a", " <b>", " c"]  # a tag-like prefix that was not one


def test_render_messages_appends_to_an_existing_system_message() -> None:
    cfg = tool_config([WEATHER], None)
    msgs = render_messages([{"role": "system", "content": "Be brief."}, *USER], cfg)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\nYou can call functions.")


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_vllm_named_tool_choice_emits_a_schema_valid_call(start: Start, vllm_backend: Any) -> None:
    import jsonschema  # the dev extra installs it

    s = start(backends={"default": vllm_backend})
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS, tool_choice=named,
                                           temperature=0, max_tokens=80)
    [call] = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    print("constrained call:", call.function.name, args)
    assert call.function.name == "get_weather"
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert r.model_extra["budgetlm"]["tools"]["constrained"] is True
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS,
                                           tool_choice="required", temperature=0, max_tokens=80)
    calls = r.choices[0].message.tool_calls
    print("required:", [(c.function.name, c.function.arguments) for c in calls])
    assert calls and calls[0].function.name in ("get_weather", "get_time")
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(calls[0].function.arguments), params[calls[0].function.name])


@pytest.mark.parametrize("reply, content", [
    ('Let me see. <tool_call>{"name": "get_weather", "arguments": {"city": "Par', "Let me see."),  # never closed
    ('<tool_call>{"name": "get_weather", "arguments": nonsense}</tool_call>', ""),  # does not parse
])
def test_a_call_that_does_not_parse_is_dropped_not_returned_as_content(start: Start, reply: str, content: str) -> None:
    s, _ = _server(start, reply)
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == content
    assert "<tool_call>" not in (r.choices[0].message.content or "")
    [w] = [w for w in r.model_extra["budgetlm"]["warnings"] if "started a tool call" in w]
    assert "raise strategy_params.max_tokens" in w


def test_tool_parsers_need_an_in_process_vllm_backend_and_a_known_backend_name() -> None:
    from budgetlm.server import ServerConfig
    from budgetlm.server.tool_parsers import EngineToolParser

    with pytest.raises(ConfigError, match=r"`tool_parsers.default` needs an in-process vLLM backend"):
        EngineToolParser.for_backend("hermes", ScriptedBackend(["x"]), "default")
    with pytest.raises(ConfigError, match=r"`tool_parsers` must name backends \(default\), got \['small'\]"):
        ServerConfig(tool_parsers={"small": "hermes"})


@pytest.mark.slow
def test_real_vllm_hermes_tool_parser_parses_the_calls(start: Start, vllm_backend: Any) -> None:
    """vLLM's own `hermes` parser on the engine's tokenizer: the same calls and content as budgetlm's parser, and
    a server configured with it answers forced calls through it."""
    from budgetlm.server.tool_parsers import EngineToolParser, parser_names

    assert "hermes" in parser_names()
    with pytest.raises(ConfigError, match=r"vLLM tool parsers \(.*hermes.*\), got 'nope'"):
        EngineToolParser.for_backend("nope", vllm_backend, "default")
    parser = EngineToolParser.for_backend("hermes", vllm_backend, "default")
    text = f"Checking both. {CALL}\n" + '<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call>'
    content, calls = parser.parse(text, TOOLS)
    assert (content, calls) == parse_tool_calls(text)
    assert [c.name for c in calls] == ["get_weather", "get_time"] and content == "Checking both."
    assert parser.parse("No call here.", TOOLS) == ("No call here.", [])
    s = start(backends={"default": vllm_backend}, tool_parsers={"default": "hermes"})
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, tools=TOOLS, tool_choice=named,
                                           temperature=0, max_tokens=80)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    assert r.model_extra["budgetlm"]["tools"]["parser"] == "vllm:hermes"
