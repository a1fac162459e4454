"""LangChain's ``ChatOpenAI`` (``bind_tools``) and LangGraph's prebuilt ReAct agent against ``budgetlm serve``.

Start the server, then run the example (``--help`` for the options)::

    budgetlm serve --backend vllm:default          # http://127.0.0.1:8000/v1
    python examples/agent_frameworks/langchain_tools.py                 # a bind_tools loop
    python examples/agent_frameworks/langchain_tools.py --langgraph     # langgraph.prebuilt.create_react_agent
    python examples/agent_frameworks/langchain_tools.py --session demo-1 \\
        --session-budget '{"output_tokens": 400, "tool_calls": 3, "steps": 4}'

Only ``base_url`` changes: ``ChatOpenAI(model="budgetlm/sample", base_url=..., api_key=...)`` speaks
chat completions (leave ``use_responses_api`` unset or ``False``: the server has no ``/v1/responses``).

The small default model (SmolLM2-135M) rarely calls a tool on its own, so the first call forces one:
``bind_tools(tools, tool_choice="required")`` (or the tool's name, ``tool_choice="lookup"``); on vLLM the
server decodes a forced call under the tool's JSON schema.  Later calls use ``auto``.  The LangGraph agent
takes a function as its model (``create_react_agent(pick_model, tools)``) that forces the call only
until a tool result is in the conversation.

Sessions (``--session ID``):

- the header ``X-Budgetlm-Session: ID`` goes on every request: ``ChatOpenAI(default_headers={...})``;
- ``session_budget`` goes in the extra body, on the first call only: ``invoke(messages,
  extra_body={...})`` in the loop, ``model.bind(extra_body={...})`` in the agent's model function.
  (``ChatOpenAI(extra_body={...})`` would send it on every call.  Not ``model_kwargs``: its keys become
  keyword arguments of ``openai``'s ``create()``, which refuses unknown ones.)

The server's ``budgetlm`` block (``session``, ``forced_final``, the ledger) is not in LangChain's
``response_metadata``, so this example prints it from an httpx event hook on the client.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx
from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

FACTS = {"paris": "Paris has 2,102,650 inhabitants (2023 census).",
         "tokyo": "Tokyo has 14,094,034 inhabitants (2023 estimate)."}


@tool
def lookup(city: str) -> str:
    """Look up facts about a city."""
    return FACTS.get(city.strip().lower(), f"No facts about {city!r}.")


TOOLS = [lookup]


def _brief(session: Any) -> Any:
    """The session's id, steps and what is left (the whole block is the response's ``budgetlm.session``)."""
    if not isinstance(session, dict):
        return session
    return {k: session[k] for k in ("id", "steps", "steps_left", "remaining") if k in session}


def show(response: httpx.Response) -> None:
    """One line per call: what the server charged (its ``budgetlm`` block)."""
    if not response.request.url.path.endswith("/chat/completions") or response.status_code != 200:
        return
    response.read()
    body = response.json()
    extra = body.get("budgetlm") or {}
    spent = {u: v["spent"] for u, v in (extra.get("ledger") or {}).get("units", {}).items() if v.get("spent")}
    line = f"[server] finish={body['choices'][0]['finish_reason']} spent={spent} tools={extra.get('tools')}"
    if extra.get("session") is not None or extra.get("forced_final"):
        line += f" session={_brief(extra.get('session'))} forced_final={extra.get('forced_final')}"
    print(line)


def tool_loop(llm: ChatOpenAI, question: str, first_body: dict[str, Any] | None, max_steps: int) -> str:
    """Call, run the tools the model called, send the ToolMessages back, until it answers."""
    messages: list[BaseMessage] = [HumanMessage(question)]
    for step in range(max_steps):
        model = llm.bind_tools(TOOLS, tool_choice="required" if step == 0 else None)
        ai = model.invoke(messages, **({"extra_body": first_body} if step == 0 and first_body else {}))
        messages.append(ai)
        if not ai.tool_calls:
            return str(ai.content)
        for call in ai.tool_calls:
            result: ToolMessage = lookup.invoke(call)  # a ToolMessage answering call["id"]
            print(f"  {call['name']}({json.dumps(call['args'])}) -> {result.content}")
            messages.append(result)
    return f"no answer after {max_steps} steps"


def react_agent(llm: ChatOpenAI, question: str, first_body: dict[str, Any] | None, max_steps: int) -> str:
    from langgraph.prebuilt import create_react_agent

    def pick_model(state: Any, runtime: Any) -> Any:
        """A call is forced until a tool result is in the conversation; the session budget goes on the first call."""
        if any(isinstance(m, ToolMessage) for m in state["messages"]):
            return llm.bind_tools(TOOLS)
        model = llm.bind_tools(TOOLS, tool_choice="required")
        first = len(state["messages"]) == 1
        return model.bind(extra_body=first_body) if first and first_body else model

    agent = create_react_agent(pick_model, TOOLS)
    out = agent.invoke({"messages": [HumanMessage(question)]}, {"recursion_limit": 2 * max_steps + 1})
    for m in out["messages"]:
        if isinstance(m, ToolMessage):
            print(f"  {m.name} -> {m.content}")
    return str(out["messages"][-1].content)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="budgetlm/sample", help="budgetlm/sample or a voting strategy")
    ap.add_argument("--api-key", default="none", help="a key when the server was started with --api-key")
    ap.add_argument("--question", default="What is the population of Paris? Use the lookup tool, then answer.")
    ap.add_argument("--langgraph", action="store_true", help="run LangGraph's prebuilt ReAct agent")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96, help="output-token cap of each call")
    ap.add_argument("--session", help="a session id: sent as the X-Budgetlm-Session header on every call")
    ap.add_argument("--session-budget", type=json.loads,
                    help='the session\'s budget as JSON, sent on the first call, e.g. {"output_tokens": 400, '
                         '"tool_calls": 3, "steps": 4}')
    args = ap.parse_args()

    llm = ChatOpenAI(model=args.model, base_url=args.base_url, api_key=args.api_key, temperature=0,
                     max_tokens=args.max_tokens,
                     default_headers={"X-Budgetlm-Session": args.session} if args.session else None,
                     http_client=httpx.Client(timeout=300, event_hooks={"response": [show]}))
    first_body = {"session_budget": args.session_budget} if args.session_budget else None
    run = react_agent if args.langgraph else tool_loop
    print("answer:", run(llm, args.question, first_body, args.max_steps))


if __name__ == "__main__":
    main()
