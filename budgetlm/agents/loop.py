"""A ReAct-style tool-using agent loop driven by :class:`~budgetlm.agents.controller.BudgetController` s.

Each task keeps one assistant transcript.  Every step continues it (``assistant_prefix``) on the
model the controller planned, stopping at a tool call's closing tag::

    ...reasoning...<tool_call>{"name": "search", "arguments": {"query": "Tralix Corp"}}</tool_call>
    <tool_response>Tralix Corp (company): ceo = ...</tool_response>
    ...next step...

A step that ends in a tool call runs the tool through the controller (charged first; a failing
or unknown tool is an ``error: ...`` observation and the agent goes on).  A step that writes
``Answer: ...`` ends the task.  A step cut by its token allowance simply continues next step; a
step that ends without a tool call or an answer gets one more step that must answer.  When the
controller plans ``answer`` (last step, tool calls spent, budget nearly spent) the transcript is
continued after ``\\nAnswer:`` with the answer allowance, so the task always ends with its best
answer, and ``stop`` ends it with what it has.

With ``n > 1`` samples (a stronger step), the step's action is the most common one among the
samples (the same tool call, or the same final answer), self-consistency over actions.

:func:`arun_agent` runs one task as an async program: each step is one request on the shared engine
(:meth:`~budgetlm.backends.base.Backend.agenerate`), tools and model-backed routers run in worker
threads, so many tasks advance independently, each at its own pace (:func:`arun_agents`,
:func:`run_agents` from synchronous code).  Cancelling a task aborts its step in the engine and its
meter is charged what was generated.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from budgetlm.agents.controller import BudgetController, StepPlan
from budgetlm.aio import run_sync
from budgetlm.answers import extract_answer, normalize_answer
from budgetlm.backends.base import Completion, GenerationRequest, Message
from budgetlm.io import JsonObject
from budgetlm.routing import RouteQuery
from budgetlm.tools import (
    OBSERVATION_TEMPLATE,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    Tool,
    as_tools,
    describe_tools,
    parse_tool_call,
)

ANSWER_CUE = "\nAnswer:"
"""Appended to the transcript when the controller forces the final answer."""


@dataclass
class AgentTask:
    """One agent task: its messages, tools, controller, and the state of its transcript."""

    id: str
    """Task id (records)."""
    messages: list[Message]
    """The chat messages (the question last)."""
    controller: BudgetController
    """Plans, routes and charges this task's steps."""
    tools: Mapping[str, Tool] = field(default_factory=dict)
    """Tools the agent may call."""
    transcript: str = ""
    """The assistant's text so far (steps, tool calls and observations)."""
    done: bool = False
    """True once the task has its answer (or must stop)."""
    text: str = ""
    """The final answer text."""
    finish_reason: str | None = None
    """Finish reason of the last model sample."""
    must_answer: bool = False
    """The last step ended without an action: the next one must answer."""
    trace: list[JsonObject] = field(default_factory=list)
    """One entry per step (plan, text, tool outcome)."""

    @classmethod
    def create(cls, id: str, messages: Sequence[Message], controller: BudgetController,
               tools: Sequence[Tool] | Mapping[str, Tool] | None = None) -> AgentTask:
        """A task whose messages get the tool list as a system message when it has tools and none is given."""
        table = dict(tools) if isinstance(tools, Mapping) else as_tools(tools)
        msgs = list(messages)
        if table and not any(m.get("role") == "system" for m in msgs) and TOOL_CALL_OPEN not in str(msgs[-1].get("content", "")):
            msgs = [{"role": "system", "content": describe_tools(table)}] + msgs
        return cls(id=id, messages=msgs, controller=controller, tools=table)

    def query(self) -> RouteQuery:
        """The state as a routing query (the transcript as an assistant message)."""
        view = self.messages + ([{"role": "assistant", "content": self.transcript}] if self.transcript else [])
        return RouteQuery(messages=view, id=self.id)

    def finish(self, text: str, reason: str | None = None) -> None:
        """End the task with ``text``; a budget or step-limit ``reason`` becomes the stop reason."""
        self.done = True
        self.text = text.strip()
        if reason and self.controller.stop_reason is None:
            if reason.startswith("budget"):
                self.controller.stop_reason = reason
            elif reason == "last step":
                self.controller.stop_reason = "max_steps reached"


def _action_key(c: Completion) -> str:
    if c.stop_string == TOOL_CALL_CLOSE:
        call = parse_tool_call(c.text + TOOL_CALL_CLOSE)
        return call.key if call else "tool:?"
    return "answer:" + str(normalize_answer(extract_answer(c.answer).text))


def pick(completions: Sequence[Completion]) -> Completion:
    """The first completion whose action (tool call or final answer) is the most common one."""
    keys = [_action_key(c) for c in completions]
    top = Counter(keys).most_common(1)[0][0]
    return completions[keys.index(top)]


def _request(t: AgentTask, plan: StepPlan) -> GenerationRequest:
    if plan.action == "answer":  # the answer is one line; a blank line ends it
        return t.controller.request(plan, t.messages, prefix=t.transcript + ANSWER_CUE, stop=["\n\n"])
    stop = [TOOL_CALL_CLOSE] if t.tools else []
    return t.controller.request(plan, t.messages, prefix=t.transcript or None, stop=stop)


def _advance(t: AgentTask, plan: StepPlan, c: Completion) -> None:
    entry: JsonObject = {"step": plan.step, "action": plan.action, "model": plan.model, "max_tokens": plan.max_tokens,
                             "n": plan.n, "score": plan.score, "reason": plan.reason, "text": c.text,
                             "finish_reason": c.finish_reason}
    t.trace.append(entry)
    t.finish_reason = c.finish_reason
    if plan.action == "answer":
        t.finish(_answer_text(c.answer), plan.reason)
        return
    t.transcript += c.text
    if c.stop_string == TOOL_CALL_CLOSE and t.tools:
        t.transcript += TOOL_CALL_CLOSE
        out = t.controller.call_tool(c.text + TOOL_CALL_CLOSE, t.tools)
        entry["tool"] = out.to_json()
        t.transcript += OBSERVATION_TEMPLATE.format(observation=out.observation)
        t.must_answer = False
        return
    found = extract_answer(c.answer)
    if found.source in ("line", "boxed", "tag"):
        t.finish(c.answer[c.answer.rfind("Answer:"):] if "Answer:" in c.answer else c.answer)
        return
    if c.finish_reason == "length":
        return  # cut by the step allowance: the next step continues the transcript
    if t.must_answer:
        t.finish(c.answer)
        return
    t.must_answer = True


def _plan(t: AgentTask) -> StepPlan:
    """The task's next step: the controller's plan, forced to an answer after a step without an action."""
    plan = t.controller.plan(t.query(), prompt_tokens=_prompt_tokens(t))
    if plan.action == "step" and t.must_answer:
        plan = StepPlan("answer", plan.step, 0, t.controller.models[0].name, t.controller.answer_tokens, 1,
                        plan.score, "no action in the last step")
    return plan


async def arun_agent(t: AgentTask) -> AgentTask:
    """Run ``t`` to its answer (or its budget's end), one step at a time on the shared engine."""
    while not t.done:
        plan = await asyncio.to_thread(_plan, t)  # a model-backed router scores off the event loop
        if plan.action == "stop":
            t.trace.append({"step": plan.step, "action": "stop", "reason": plan.reason})
            t.finish(t.text or _best_effort(t), plan.reason)
            break
        backend = t.controller.models[plan.arm].backend
        if backend is None:
            raise ValueError(f"model {plan.model!r} of task {t.id!r} has no backend")
        [g] = await backend.agenerate([_request(t, plan)], on_budget_exhausted="skip")
        t.controller.record_generation(plan, g)
        if g.skipped or not g.completions:
            t.trace.append({"step": plan.step, "action": plan.action, "skipped": g.skipped})
            t.finish(_best_effort(t), t.controller.meter.stop_reason or "budget exhausted")
            break
        c = pick(g.completions) if len(g.completions) > 1 else g.first
        if plan.action != "answer" and c.stop_string == TOOL_CALL_CLOSE and t.tools:
            await asyncio.to_thread(_advance, t, plan, c)  # runs the tool
        else:
            _advance(t, plan, c)
    return t


async def arun_agents(tasks: Sequence[AgentTask]) -> None:
    """Run ``tasks`` concurrently, each at its own pace (:func:`arun_agent`)."""
    await asyncio.gather(*(arun_agent(t) for t in tasks))


def run_agents(tasks: Sequence[AgentTask]) -> None:
    """:func:`arun_agents` from synchronous code (also inside a running event loop)."""
    run_sync(arun_agents(tasks))


def _prompt_tokens(t: AgentTask) -> int:
    """Tokens of the next step's prompt (messages and transcript) on the cheapest model's tokenizer."""
    backend = t.controller.models[0].backend
    if backend is None:
        return 0
    text, ids = backend.render(GenerationRequest(messages=t.messages, assistant_prefix=t.transcript or None))
    return len(ids) if ids is not None else backend.count_tokens(text or "")


def _answer_text(continuation: str) -> str:
    """``Answer: X`` from the continuation of a forced answer (first non-empty line, no repeated cue)."""
    body = continuation.strip()
    while body.lower().startswith("answer:"):
        body = body[len("answer:"):].strip()
    first = next((ln.strip() for ln in body.splitlines() if ln.strip()), "")
    return f"Answer: {first}".strip()  # "Answer:" alone when the allowance ran out before any answer


def _best_effort(t: AgentTask) -> str:
    """The best answer in the transcript so far (an ``Answer:`` line or the last number), or ''."""
    found = extract_answer(t.transcript)
    return f"Answer: {found.text}" if found.text else ""
