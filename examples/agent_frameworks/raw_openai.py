"""A tool-using loop with the raw ``openai`` client against ``budgetlm serve`` (only ``base_url`` changes).

Start the server, then run the example (``--help`` for the options)::

    budgetlm serve --backend vllm:default          # http://127.0.0.1:8000/v1
    python examples/agent_frameworks/raw_openai.py
    python examples/agent_frameworks/raw_openai.py --session demo-1 \\
        --session-budget '{"output_tokens": 400, "tool_calls": 3, "steps": 4}'

The loop: call the model with the tools, run each tool call it makes, send the results back as
``tool`` messages (after the assistant message that holds the calls), until it answers.  The first
call forces a tool call (``tool_choice="required"``): the small default model (SmolLM2-135M) rarely
calls a tool on its own, and on vLLM the server decodes a forced call under the tool's JSON schema,
so it always parses.  Later calls use ``auto``.

Sessions (``--session ID``): every request carries the HTTP header ``X-Budgetlm-Session: ID``
(``OpenAI(default_headers=...)``; the extra body field ``session`` says the same), and the first one
carries the session's budget in the extra body field ``session_budget``
(``create(..., extra_body=...)``).  Each response's ``budgetlm`` block then reports ``session``
(the session's ledger) and ``forced_final`` (the server made this the final answer because the
session's budget is nearly spent).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from openai import OpenAI

FACTS = {"paris": "Paris has 2,102,650 inhabitants (2023 census).",
         "tokyo": "Tokyo has 14,094,034 inhabitants (2023 estimate)."}


def lookup(city: str) -> str:
    """Look up facts about a city."""
    return FACTS.get(city.strip().lower(), f"No facts about {city!r}.")


TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look up facts about a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}]
FUNCTIONS = {"lookup": lookup}


def _brief(session: Any) -> Any:
    """The session's id, steps and what is left (the whole block is the response's ``budgetlm.session``)."""
    if not isinstance(session, dict):
        return session
    return {k: session[k] for k in ("id", "steps", "steps_left", "remaining") if k in session}


def show(step: int, r: Any) -> None:
    """One line per call: what the server charged (its ``budgetlm`` block)."""
    extra = (r.model_extra or {}).get("budgetlm") or {}
    spent = {u: v["spent"] for u, v in (extra.get("ledger") or {}).get("units", {}).items() if v.get("spent")}
    print(f"[call {step}] finish={r.choices[0].finish_reason} usage={r.usage.completion_tokens} out / "
          f"{r.usage.prompt_tokens} in, spent={spent}, tools={extra.get('tools')}")
    if extra.get("session") is not None or extra.get("forced_final"):
        print(f"          session={_brief(extra.get('session'))} forced_final={extra.get('forced_final')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="budgetlm/sample", help="budgetlm/sample or a voting strategy")
    ap.add_argument("--api-key", default="none", help="a key when the server was started with --api-key")
    ap.add_argument("--question", default="What is the population of Paris? Use the lookup tool, then answer.")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96, help="output-token cap of each call")
    ap.add_argument("--session", help="a session id: sent as the X-Budgetlm-Session header on every call")
    ap.add_argument("--session-budget", type=json.loads,
                    help='the session\'s budget as JSON, sent on the first call, e.g. {"output_tokens": 400, '
                         '"tool_calls": 3, "steps": 4}')
    args = ap.parse_args()

    headers = {"X-Budgetlm-Session": args.session} if args.session else None
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, default_headers=headers)
    messages: list[Any] = [{"role": "user", "content": args.question}]
    for step in range(1, args.max_steps + 1):
        extra_body = {"session_budget": args.session_budget} if step == 1 and args.session_budget else None
        r = client.chat.completions.create(
            model=args.model, messages=messages, tools=TOOLS, tool_choice="required" if step == 1 else "auto",
            temperature=0, max_tokens=args.max_tokens, extra_body=extra_body)
        show(step, r)
        msg = r.choices[0].message
        if not msg.tool_calls:
            print("answer:", msg.content)
            return
        messages.append(msg.model_dump(exclude_none=True))  # the assistant turn with its tool_calls
        for call in msg.tool_calls:
            result = FUNCTIONS[call.function.name](**json.loads(call.function.arguments))
            print(f"  {call.function.name}({call.function.arguments}) -> {result}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    print(f"no answer after {args.max_steps} steps")


if __name__ == "__main__":
    main()
