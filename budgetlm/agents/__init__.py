"""Agents under a budget: an embeddable :class:`BudgetController`, and a tool-using agent loop.

Drop the controller into any agent loop::

    ctl = BudgetController(Budget(output_tokens=2000, tool_calls=6), [ModelArm("small", small), ModelArm("large", large)],
                           router="budget_aware", threshold=0.5)
    with ctl:
        while not done:
            plan = ctl.plan(messages)           # model, token allowance, step / answer / stop
            if plan.done: break
            plan, res = ctl.step(messages, plan) # runs and charges the call
            ...
            search = ctl.tool(search)            # each call charged first

:func:`arun_agent` runs one ReAct-style task (:class:`AgentTask`) as an async program on the shared
engine (:func:`run_agents` runs many from synchronous code); the ``agent`` strategy wraps it for
``budgetlm eval``.
"""

from __future__ import annotations

from budgetlm.agents.controller import BudgetController, ModelArm, StepPlan, StepRecord
from budgetlm.agents.loop import ANSWER_CUE, AgentTask, arun_agent, arun_agents, run_agents

__all__ = [
    "ANSWER_CUE",
    "AgentTask",
    "BudgetController",
    "ModelArm",
    "StepPlan",
    "StepRecord",
    "arun_agent",
    "arun_agents",
    "run_agents",
]
