"""The OpenAI Agents SDK against ``budgetlm serve``: an ``Agent`` with one ``@function_tool``.

Start the server, then run the example (``--help`` for the options)::

    budgetlm serve --backend vllm:default          # http://127.0.0.1:8000/v1
    python examples/agent_frameworks/openai_agents_sdk.py
    python examples/agent_frameworks/openai_agents_sdk.py --session demo-1 \\
        --session-budget '{"output_tokens": 400, "tool_calls": 3, "steps": 4}'

**The supported path is the SDK's chat-completions model**: ``OpenAIChatCompletionsModel`` on an
``AsyncOpenAI(base_url=...)`` client.  budgetlm serves ``/v1/chat/completions`` only (no
``/v1/responses``), so the SDK's default Responses model (``OpenAIResponsesModel``, what a bare
``model="..."`` string gives) does not work against it.  (Equivalent global form:
``set_default_openai_client(client)`` plus ``set_default_openai_api("chat_completions")``, after which
``Agent(model="budgetlm/sample")`` uses chat completions.)  Tracing is disabled
(``set_tracing_disabled(True)``): traces are exported to OpenAI's servers, which need a real OpenAI key.

The small default model (SmolLM2-135M) rarely calls a tool on its own, so the agent's model settings
force the first call (``ModelSettings(tool_choice="required")``; on vLLM the server decodes it under the
tool's JSON schema).  The SDK resets ``tool_choice`` after a tool call (``Agent.reset_tool_choice``,
default ``True``), so the next turn may answer.

Sessions (``--session ID``):

- the header ``X-Budgetlm-Session: ID`` goes on every request through the client:
  ``AsyncOpenAI(default_headers={...})`` (``ModelSettings(extra_headers={...})`` works too, per agent or
  per run with ``RunConfig(model_settings=...)``);
- ``session_budget`` goes in the extra body: ``ModelSettings(extra_body={...})``.  Model settings are per
  agent (or per run), not per call, so the SDK sends the same ``session_budget`` on every call of the run.

Each response's ``budgetlm`` block (``session``, ``forced_final``, the ledger) is not exposed by the SDK
(it keeps ``usage`` only), so this example prints it from an httpx event hook on the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

FACTS = {"paris": "Paris has 2,102,650 inhabitants (2023 census).",
         "tokyo": "Tokyo has 14,094,034 inhabitants (2023 estimate)."}


@function_tool
def lookup(city: str) -> str:
    """Look up facts about a city.

    Args:
        city: The city.
    """
    return FACTS.get(city.strip().lower(), f"No facts about {city!r}.")


def _brief(session: Any) -> Any:
    """The session's id, steps and what is left (the whole block is the response's ``budgetlm.session``)."""
    if not isinstance(session, dict):
        return session
    return {k: session[k] for k in ("id", "steps", "steps_left", "remaining") if k in session}


async def show(response: httpx.Response) -> None:
    """One line per call: what the server charged (its ``budgetlm`` block)."""
    if not response.request.url.path.endswith("/chat/completions") or response.status_code != 200:
        return
    await response.aread()
    body = response.json()
    extra = body.get("budgetlm") or {}
    spent = {u: v["spent"] for u, v in (extra.get("ledger") or {}).get("units", {}).items() if v.get("spent")}
    line = f"[server] finish={body['choices'][0]['finish_reason']} spent={spent} tools={extra.get('tools')}"
    if extra.get("session") is not None or extra.get("forced_final"):
        line += f" session={_brief(extra.get('session'))} forced_final={extra.get('forced_final')}"
    print(line)


async def run(args: argparse.Namespace) -> Any:
    set_tracing_disabled(True)
    headers = {"X-Budgetlm-Session": args.session} if args.session else None
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key, default_headers=headers,
                         http_client=httpx.AsyncClient(timeout=300, event_hooks={"response": [show]}))
    settings = ModelSettings(
        tool_choice="required", temperature=0, max_tokens=args.max_tokens,
        extra_body={"session_budget": args.session_budget} if args.session_budget else None)
    agent = Agent(name="assistant", instructions="You answer questions about cities.", tools=[lookup],
                  model=OpenAIChatCompletionsModel(model=args.model, openai_client=client), model_settings=settings)
    result = await Runner.run(agent, args.question, max_turns=args.max_turns)
    usage = result.context_wrapper.usage
    print(f"answer: {result.final_output}")
    print(f"usage: {usage.requests} requests, {usage.input_tokens} in, {usage.output_tokens} out")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="budgetlm/sample", help="budgetlm/sample or a voting strategy")
    ap.add_argument("--api-key", default="none", help="a key when the server was started with --api-key")
    ap.add_argument("--question", default="What is the population of Paris? Use the lookup tool, then answer.")
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96, help="output-token cap of each call")
    ap.add_argument("--session", help="a session id: sent as the X-Budgetlm-Session header on every call")
    ap.add_argument("--session-budget", type=json.loads,
                    help='the session\'s budget as JSON (sent in the extra body of every call), e.g. '
                         '{"output_tokens": 400, "tool_calls": 3, "steps": 4}')
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
