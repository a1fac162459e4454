"""Agent frameworks against ``budgetlm serve``, changing only ``base_url``: a multi-step tool task end to end.

One real server (uvicorn on 127.0.0.1, the default model on the shared in-process vLLM engine) answers
every framework of the module:

- the OpenAI Agents SDK through its chat-completions model (``OpenAIChatCompletionsModel`` on an
  ``AsyncOpenAI(base_url=...)`` client; the server has no ``/v1/responses``), tracing disabled, with
  ``Runner.run`` and streamed with ``Runner.run_streamed``;
- LangChain's ``ChatOpenAI`` with ``bind_tools`` (a hand-written loop) and LangGraph's prebuilt ReAct agent;
- the raw ``openai`` client.

The default model (SmolLM2-135M) rarely calls a tool on its own, so the first turn forces the call
(``tool_choice`` ``required`` or the named function: on vLLM the server decodes the call under the tool's JSON
schema, so it parses); the next turn answers with the tool's result in the conversation.  Every test records the
HTTP traffic the framework sent (httpx event hooks on the client it was given) and checks: the tool ran with the
arguments the model produced, the assistant's ``tool_calls`` and the ``tool`` result went back in the follow-up
request (and the server counted them in its prompt), the final answer is non-empty text, and every response
carries the server's ``budgetlm`` ledger with positive spend.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool as lc_tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent
from test_server_app import Server, _start

pytestmark = pytest.mark.slow

MODEL = "budgetlm/sample"
QUESTION = "What is the population of Paris? Use the lookup tool, then answer in one sentence."
FACT = "Paris has 2,102,650 inhabitants (2023 census)."
MAX_TOKENS = 48
"""Output tokens per request (the whole request's cap on the server): a forced call is about 22 tokens."""


class Traffic:
    """The chat-completions requests a client sent and the responses it got (httpx event hooks)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []

    def _request(self, request: httpx.Request) -> None:
        if request.url.path.endswith("/chat/completions"):
            self.requests.append(json.loads(request.content))

    def _response(self, response: httpx.Response) -> None:
        if response.request.url.path.endswith("/chat/completions"):
            response.read()
            self.responses.append(_body(response))

    async def _aresponse(self, response: httpx.Response) -> None:
        if response.request.url.path.endswith("/chat/completions"):
            await response.aread()  # a stream is buffered here, then read by the client as usual
            self.responses.append(_body(response))

    async def _arequest(self, request: httpx.Request) -> None:
        self._request(request)

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=120, event_hooks={"request": [self._request], "response": [self._response]})

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=120, event_hooks={"request": [self._arequest],
                                                           "response": [self._aresponse]})


def _body(response: httpx.Response) -> dict[str, Any]:
    """A response's JSON; a stream's chunks folded into one ``chat.completion`` (content, calls, usage, ledger)."""
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return response.json()
    chunks = [json.loads(line[5:]) for line in response.text.splitlines()
              if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    content, calls, finish, out = "", {}, None, {"stream": True, "chunks": chunks}
    for ch in chunks:
        for c in ch.get("choices", []):
            content += c["delta"].get("content") or ""
            for d in c["delta"].get("tool_calls") or []:
                acc = calls.setdefault(d["index"], {"id": "", "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
                acc["id"] += d.get("id") or ""
                acc["function"]["name"] += d.get("function", {}).get("name") or ""
                acc["function"]["arguments"] += d.get("function", {}).get("arguments") or ""
            finish = c.get("finish_reason") or finish
        if "budgetlm" in ch:
            out["budgetlm"] = ch["budgetlm"]
        if ch.get("usage"):
            out["usage"] = ch["usage"]
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    out["choices"] = [{"index": 0, "message": message, "finish_reason": finish}]
    return out


class Lookup:
    """The tool: a fixed fact, whatever the city; records the arguments it was called with."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, city: str) -> str:
        self.calls.append(city)
        return FACT


LOOKUP_TOOL = {"type": "function", "function": {
    "name": "lookup", "description": "Look up facts about a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, vllm_backend: Any) -> Iterator[Server]:
    """One real server for the module: the default model on the session's vLLM engine."""
    s = _start(tmp_path_factory.mktemp("frameworks") / "server.sqlite", backends={"default": vllm_backend})
    yield s
    s.stop()


def _spent(body: dict[str, Any], unit: str) -> float:
    return body["budgetlm"]["ledger"]["units"][unit]["spent"] or 0


def check_exchange(traffic: Traffic, lookup: Lookup) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checks every framework must pass; returns the first (tool call) and last (answer) responses."""
    assert len(traffic.requests) == len(traffic.responses) >= 2, traffic.requests
    first_req, first = traffic.requests[0], traffic.responses[0]
    assert first_req["model"] == MODEL and first_req["tools"][0]["function"]["name"] == "lookup"
    assert first_req.get("tool_choice") in ("required", {"type": "function", "function": {"name": "lookup"}})
    # the model's call, decoded under the tool's schema on vLLM
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls", first
    [call] = choice["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "lookup" and isinstance(args.get("city"), str), call
    assert first["budgetlm"]["tools"]["constrained"] is True and _spent(first, "tool_calls") == 1
    # the framework ran the tool with the arguments the model produced (once per call)
    assert lookup.calls and lookup.calls[0] == args["city"], (lookup.calls, args)
    # the follow-up request carries the assistant's call and the tool's result
    follow = traffic.requests[1]["messages"]
    sent = [m for m in follow if m["role"] == "assistant" and m.get("tool_calls")]
    assert sent and sent[0]["tool_calls"][0]["id"] == call["id"], follow
    assert sent[0]["tool_calls"][0]["function"]["name"] == "lookup"
    assert json.loads(sent[0]["tool_calls"][0]["function"]["arguments"]) == args
    results = [m for m in follow if m["role"] == "tool"]
    assert results and results[0]["tool_call_id"] == call["id"] and FACT in _text(results[0]["content"]), follow
    # ... and the server rendered them (nothing dropped): the follow-up prompt holds the call and the result
    assert traffic.responses[1]["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 10
    # every response carries the server's ledger with real spend
    for body in traffic.responses:
        assert body["usage"]["completion_tokens"] > 0 and body["usage"]["prompt_tokens"] > 0
        assert _spent(body, "output_tokens") == body["usage"]["completion_tokens"] > 0
        assert body["budgetlm"]["strategy"] == "sample"
    last = traffic.responses[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length"), last
    assert isinstance(last["choices"][0]["message"]["content"], str) and last["choices"][0]["message"]["content"].strip()
    return first, last


def _text(content: Any) -> str:
    """A message's content as text (frameworks may send content parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


# ------------------------------------------------------------------------------------------ raw openai


def test_raw_openai_client_tool_loop(server: Server) -> None:
    traffic, lookup = Traffic(), Lookup()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, http_client=traffic.client())
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[LOOKUP_TOOL], tool_choice="required",
                                       temperature=0, max_tokens=MAX_TOKENS)
    msg = r.choices[0].message
    messages.append(msg.model_dump(exclude_none=True))
    for call in msg.tool_calls or []:
        messages.append({"role": "tool", "tool_call_id": call.id,
                         "content": lookup(**json.loads(call.function.arguments))})
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[LOOKUP_TOOL], temperature=0,
                                       max_tokens=MAX_TOKENS)
    print("raw openai:", lookup.calls, repr(r.choices[0].message.content), r.choices[0].message.tool_calls)
    check_exchange(traffic, lookup)
    assert len(traffic.requests) == 2 and r.choices[0].message.content


# ----------------------------------------------------------------------------------- OpenAI Agents SDK


def _agent(server: Server, traffic: Traffic, lookup: Lookup, **settings: Any) -> Agent:
    """An Agent with one function tool on the SDK's chat-completions model (the server has no /v1/responses)."""
    set_tracing_disabled(True)  # no trace export (no internet, no OpenAI key)

    @function_tool(name_override="lookup")
    def lookup_tool(city: str) -> str:
        """Look up facts about a city.

        Args:
            city: The city.
        """
        return lookup(city)

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                http_client=traffic.async_client())
    # the SDK resets tool_choice after a tool call (Agent.reset_tool_choice), so the next turn may answer
    return Agent(name="assistant", instructions="You answer questions about cities.", tools=[lookup_tool],
                 model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
                 model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=MAX_TOKENS,
                                              **settings))


def test_openai_agents_sdk_chat_completions_model(server: Server) -> None:
    traffic, lookup = Traffic(), Lookup()
    result = asyncio.run(Runner.run(_agent(server, traffic, lookup), QUESTION, max_turns=4))
    print("agents sdk:", lookup.calls, repr(result.final_output), len(traffic.requests), "requests")
    check_exchange(traffic, lookup)
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert traffic.requests[1].get("tool_choice") is None  # reset after the call: auto
    usage = result.context_wrapper.usage  # the SDK summed the server's usage over the run
    assert usage.requests == len(traffic.responses)
    assert usage.output_tokens == sum(b["usage"]["completion_tokens"] for b in traffic.responses) > 0


def test_openai_agents_sdk_streamed_run(server: Server) -> None:
    """``Runner.run_streamed`` (``stream=True``): the forced call arrives as ``tool_calls`` deltas, then the answer."""
    traffic, lookup = Traffic(), Lookup()
    # include_usage: stream_options.include_usage, so the stream ends with the usage chunk
    agent = _agent(server, traffic, lookup, include_usage=True)

    async def run() -> tuple[Any, list[str]]:
        result = Runner.run_streamed(agent, QUESTION, max_turns=4)
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds

    result, kinds = asyncio.run(run())
    print("agents sdk streamed:", lookup.calls, repr(result.final_output), len(traffic.requests), "requests")
    assert all(req.get("stream") is True for req in traffic.requests)
    check_exchange(traffic, lookup)
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    assert isinstance(result.final_output, str) and result.final_output.strip()
    assert result.final_output == traffic.responses[-1]["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------------- LangChain / LangGraph


def _chat_openai(server: Server, traffic: Traffic) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="none", temperature=0,
                      max_tokens=MAX_TOKENS, max_retries=0, http_client=traffic.client(),
                      http_async_client=traffic.async_client())


def _lc_lookup(lookup: Lookup) -> Any:
    @lc_tool("lookup")
    def lookup_city(city: str) -> str:
        """Look up facts about a city."""
        return lookup(city)

    return lookup_city


def test_langchain_chat_openai_bind_tools(server: Server) -> None:
    traffic, lookup = Traffic(), Lookup()
    llm = _chat_openai(server, traffic)
    tool = _lc_lookup(lookup)
    messages: list[Any] = [HumanMessage(QUESTION)]
    ai = llm.bind_tools([tool], tool_choice="lookup").invoke(messages)  # named: {"type": "function", ...}
    assert isinstance(ai, AIMessage) and ai.tool_calls, ai
    messages.append(ai)
    for call in ai.tool_calls:
        messages.append(tool.invoke(call))  # a ToolMessage with the call's id
    answer = llm.bind_tools([tool]).invoke(messages)
    print("langchain:", lookup.calls, repr(answer.content), answer.response_metadata.get("finish_reason"))
    check_exchange(traffic, lookup)
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.usage_metadata and answer.usage_metadata["output_tokens"] > 0


def test_langgraph_prebuilt_react_agent(server: Server) -> None:
    traffic, lookup = Traffic(), Lookup()
    llm = _chat_openai(server, traffic)
    tool = _lc_lookup(lookup)

    def model(state: Any, runtime: Any) -> Any:
        """The first turn must call a tool; once a result is in, the model may answer."""
        called = any(isinstance(m, ToolMessage) for m in state["messages"])
        return llm.bind_tools([tool]) if called else llm.bind_tools([tool], tool_choice="required")

    agent = create_react_agent(model, [tool])
    out = agent.invoke({"messages": [HumanMessage(QUESTION)]}, {"recursion_limit": 8})
    final = out["messages"][-1]
    print("langgraph:", lookup.calls, repr(final.content), [type(m).__name__ for m in out["messages"]])
    check_exchange(traffic, lookup)
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content.strip()
    assert any(isinstance(m, ToolMessage) and m.content == FACT for m in out["messages"])


# ------------------------------------------------------------------------------------ agent sessions

SESSION_BUDGET = {"output_tokens": 400, "tool_calls": 2, "steps": 4}
"""A tight session: two tool calls, then the server forces the final answer (tools withheld)."""


def check_session(server: Server, sid: str, traffic: Traffic, lookup: Lookup) -> dict[str, Any]:
    """A task that would call tools forever (``tool_choice`` required on every turn) ends with the session's
    forced final answer; the session's spend never exceeds its budget."""
    report = httpx.get(f"{server.url}/v1/sessions/{sid}", timeout=30).json()
    for unit, lim in SESSION_BUDGET.items():
        used = report["steps"] if unit == "steps" else report["spent"][unit]
        assert used <= lim, (unit, used, lim, report)
    assert all(req.get("tool_choice") in ("required", {"type": "function", "function": {"name": "lookup"}})
               for req in traffic.requests), "every turn forced a tool call"
    assert len(lookup.calls) == report["spent"]["tool_calls"] == 2, (lookup.calls, report["spent"])
    bodies = traffic.responses
    assert [b["budgetlm"]["forced_final"] for b in bodies] == [False, False, True], [b["budgetlm"] for b in bodies]
    last = bodies[-1]
    assert "tool calls" in last["budgetlm"]["forced_final_reason"]
    assert not last["choices"][0]["message"].get("tool_calls") and last["choices"][0]["message"]["content"].strip()
    assert last["budgetlm"]["session"]["steps"] == report["steps"] == 3
    assert [c["forced_final"] for c in report["calls"]] == [False, False, True]
    return report


def test_raw_openai_client_session_ends_with_the_forced_final_answer(server: Server) -> None:
    traffic, lookup = Traffic(), Lookup()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, http_client=traffic.client(),
                           default_headers={"X-Budgetlm-Session": "raw-tight"})
    messages: list[Any] = [{"role": "user", "content": QUESTION}]
    for turn in range(8):  # the loop itself has no limit that would stop it before the session does
        r = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, tools=[LOOKUP_TOOL], tool_choice="required", temperature=0,
            max_tokens=MAX_TOKENS, extra_body={"session_budget": SESSION_BUDGET} if turn == 0 else None)
        forced = r.headers["x-budgetlm-forced-final"]
        msg = r.parse().choices[0].message
        if not msg.tool_calls:
            assert forced == "true"
            break
        assert forced == "false"
        messages.append(msg.model_dump(exclude_none=True))
        for call in msg.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": lookup(**json.loads(call.function.arguments))})
    check_session(server, "raw-tight", traffic, lookup)


def test_openai_agents_sdk_session_ends_with_the_forced_final_answer(server: Server) -> None:
    traffic, lookup = Traffic(), Lookup()
    # session_budget in ModelSettings.extra_body goes out on every call: an unchanged repeat is accepted
    agent = _agent(server, traffic, lookup, extra_headers={"X-Budgetlm-Session": "sdk-tight"},
                   extra_body={"session_budget": SESSION_BUDGET})
    agent.reset_tool_choice = False  # tool_choice stays "required": without the session the run would not end
    result = asyncio.run(Runner.run(agent, QUESTION, max_turns=10))
    print("agents sdk session:", lookup.calls, repr(result.final_output))
    check_session(server, "sdk-tight", traffic, lookup)
    assert result.final_output == traffic.responses[-1]["choices"][0]["message"]["content"]


def test_langgraph_session_ends_with_the_forced_final_answer(server: Server) -> None:
    traffic, lookup = Traffic(), Lookup()
    llm = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="none", temperature=0, max_tokens=MAX_TOKENS,
                     max_retries=0, http_client=traffic.client(), default_headers={"X-Budgetlm-Session": "lg-tight"},
                     extra_body={"session_budget": SESSION_BUDGET})
    tool = _lc_lookup(lookup)
    # always `required`: the graph would loop to its recursion limit if the server did not force the answer
    agent = create_react_agent(llm.bind_tools([tool], tool_choice="required"), [tool])
    out = agent.invoke({"messages": [HumanMessage(QUESTION)]}, {"recursion_limit": 20})
    final = out["messages"][-1]
    print("langgraph session:", lookup.calls, repr(final.content))
    check_session(server, "lg-tight", traffic, lookup)
    assert isinstance(final, AIMessage) and not final.tool_calls and final.content.strip()
