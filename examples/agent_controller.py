"""A small tool-using agent loop under a BudgetController (issue 7's example).

The loop is ordinary agent code — ask the model, run the tool it calls, append the observation —
with four controller lines added: ``plan`` before each step (which model, how many tokens, or
"answer now"), ``step`` to run it (charged), ``ctl.tool`` around the tools (each call charged), and
the budget given once.  The task never exceeds ``Budget(output_tokens=400, tool_calls=3)``; when it
is nearly spent the controller forces the final answer.

Run (after ``make demo`` or ``make test`` installed everything)::

    .venv/bin/python examples/agent_controller.py [--backend default] [--question-seed 3]
"""

from __future__ import annotations

import argparse

from budgetlm import Budget
from budgetlm.agents import BudgetController, ModelArm
from budgetlm.backends import load
from budgetlm.evals.suites.kb_agent import KnowledgeBase, calculator, kb_tools, make_question
from budgetlm.tools import OBSERVATION_TEMPLATE, TOOL_CALL_CLOSE, describe_tools, parse_tool_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="default")
    ap.add_argument("--question-seed", type=int, default=3)
    args = ap.parse_args()

    import random

    kb = KnowledgeBase.generate(seed=1)
    q = make_question(kb, random.Random(args.question_seed), hops=2)
    backend = load(args.backend)

    # Two "models": the same backend greedy (cheap) or voting over 4 samples per step (expensive).
    ctl = BudgetController(Budget(output_tokens=400, tool_calls=3),
                           [ModelArm("small", backend), ModelArm("large", backend, n=4)],
                           router={"name": "budget_aware", "params": {"inner": "random"}}, threshold=0.7,
                           max_steps=5, step_tokens=80)
    search = ctl.tool(kb.search, name="search")          # every call charged to tool_calls first
    calc = ctl.tool(calculator, name="calculator")
    tools = {"search": search, "calculator": calc}

    messages = [{"role": "system", "content": describe_tools({t.name: t for t in kb_tools(kb)})},
                {"role": "user", "content": q.question + "\nFinish with 'Answer: <answer>'."}]
    transcript = ""
    with ctl:
        while True:
            plan = ctl.plan(messages)
            if plan.done:
                break
            prefix = transcript + ("\nAnswer:" if plan.action == "answer" else "")
            plan, res = ctl.step(messages, plan, prefix=prefix or None, stop=[TOOL_CALL_CLOSE])
            if not res.completions:
                break
            c = res.first
            print(f"step {plan.step} [{plan.action} on {plan.model}, ≤{plan.max_tokens} tok]: {c.text.strip()[:100]!r}")
            if plan.action == "answer":
                transcript += "\nAnswer:" + c.text
                break
            transcript += c.text
            call = parse_tool_call(c.text + TOOL_CALL_CLOSE) if c.stop_string == TOOL_CALL_CLOSE else None
            if call is None:
                if "Answer:" in c.text or c.finish_reason == "stop":
                    break
                continue
            try:
                obs = str(tools[call.name](**call.arguments)) if call.name in tools else f"error: unknown tool {call.name!r}"
            except Exception as exc:  # noqa: BLE001 -- a failing tool is an observation; budget errors included
                obs = f"error: {exc}"
            transcript += TOOL_CALL_CLOSE + OBSERVATION_TEMPLATE.format(observation=obs)
    s = ctl.summary()
    print(f"\nquestion: {q.question}\ngold: {q.answer}\nfinal: {transcript.strip().splitlines()[-1] if transcript.strip() else ''}")
    print(f"spent: {s['ledger']['units']['output_tokens']['spent']} output tokens of 400, {s['tool_calls']} tool "
          f"calls of 3, {s['expensive_calls']} expensive steps; stop: {s['stop_reason']}")


if __name__ == "__main__":
    main()
