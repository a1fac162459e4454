"""Reasoning-gym tasks as agent tasks: ``reasoning_gym_agent:chain_sum?size=50&seed=1``.

:class:`ReasoningGymAgentSuite` is :class:`~budgetlm.evals.suites.reasoning_gym.ReasoningGymSuite`
(same items, ids, splits and difficulty options, graded by reasoning-gym's own ``score_answer``)
with two changes that turn each problem into a multi-step agent task: every item carries the
``calculator`` tool (:func:`~budgetlm.evals.suites.kb_agent.calculator`), and the prompt lists the
tools and the tool-call format and asks for the final answer after ``Answer:``.  Item metadata gets
``"agent": True``.
"""

from __future__ import annotations

from typing import Any

from budgetlm.evals.suites.base import EvalItem, render_prompt
from budgetlm.evals.suites.kb_agent import calculator
from budgetlm.evals.suites.reasoning_gym import ReasoningGymSuite, Split
from budgetlm.tools import Tool, as_tools, describe_tools

__all__ = ["DEFAULT_RG_AGENT_PROMPT", "ReasoningGymAgentSuite", "agent_tools"]

DEFAULT_RG_AGENT_PROMPT = (
    "{tools}\n\n"
    "Solve the problem below step by step. Use the calculator for arithmetic instead of computing in your head.\n\n"
    "{question}\n\n"
    "When you are done, finish with a line 'Answer: <answer>'."
)
"""The default prompt template; ``{tools}`` becomes the tool list and ``{question}`` the problem."""


def agent_tools() -> list[Tool]:
    """The tools every item gets: ``calculator``."""
    return [Tool("calculator", calculator, "calculator(expression): evaluate arithmetic with + - * / // % ** "
                 "and parentheses, e.g. {\"expression\": \"(41 - 29) * 2\"}")]


class ReasoningGymAgentSuite(ReasoningGymSuite):
    """A reasoning-gym task as an agent task: the calculator tool on every item and a tool-use prompt."""

    def __init__(
        self,
        task: str,
        size: int = 100,
        seed: int = 1,
        split: Split = "test",
        prompt: str = DEFAULT_RG_AGENT_PROMPT,
        test_size: int | None = None,
        **difficulty: Any,
    ) -> None:
        super().__init__(task, size=size, seed=seed, split=split, prompt=prompt, test_size=test_size, **difficulty)
        self.name = f"reasoning_gym_agent:{task}"
        self.tools = agent_tools()
        self._tools_text = describe_tools(as_tools(self.tools))

    def _item(self, index: int, entry: dict[str, Any]) -> EvalItem:
        item = super()._item(index, entry)
        item.messages = [{"role": "user", "content": render_prompt(
            self.prompt, {"question": item.question, "tools": self._tools_text})}]
        item.metadata["agent"] = True
        item.tools = list(self.tools)
        return item

    def __repr__(self) -> str:
        return "ReasoningGymAgentSuite" + super().__repr__().removeprefix("ReasoningGymSuite")
