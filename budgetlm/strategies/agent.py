"""A tool-using agent as a strategy: each problem runs under its own :class:`~budgetlm.agents.BudgetController`.

The problem's tools (``Problem.tools``, e.g. the ``search`` and ``calculator`` of the offline
``kb_agent`` suite) are offered to the model; each step is routed between ``models`` (cheapest
first; default one greedy ``small`` arm and a ``large`` arm that votes over 5 samples per step on
the same model) by ``router`` with ``threshold``, and the controller enforces the per-problem budget
(ALGORITHMS.md §8: never exceed the task budget; when the large step is unaffordable take the small
one or finish).  See :mod:`budgetlm.agents.loop` for the loop and :mod:`budgetlm.agents.controller`
for planning.

Records get ``details``: ``steps`` (one entry per model or tool step: model, tokens, tool calls),
``model_steps``, ``tool_calls`` and ``expensive_calls`` (steps not on the cheapest model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

from budgetlm.agents import AgentTask, BudgetController, ModelArm, run_agents
from budgetlm.answers import extract_answer
from budgetlm.backends import load as load_backend
from budgetlm.backends.base import Backend
from budgetlm.errors import invalid
from budgetlm.meter import Meter
from budgetlm.routing import Router, check_thresholds
from budgetlm.routing import get as get_router
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy

DEFAULT_MODELS: list[dict[str, Any]] = [{"label": "small", "n": 1}, {"label": "large", "n": 5, "temperature": 0.7}]
"""Cheap step = one greedy sample; expensive step = the most common action of 5 samples."""


class Agent(Strategy):
    """ReAct agent with tools, per-step routing and a per-problem budget controller."""

    name = "agent"

    def __init__(self, router: str | Mapping[str, Any] | Router = "always_small",
                 models: Sequence[Mapping[str, Any]] | None = None, threshold: float | list[float] | None = None,
                 max_steps: int = 8, step_tokens: int = 128, answer_tokens: int = 24, min_step_tokens: int = 16,
                 policy: Literal["fixed", "proportional", "value"] = "proportional") -> None:
        specs = list(models) if models is not None else DEFAULT_MODELS
        if not specs:
            raise invalid("models", "at least one model block {label, n, temperature, model}", specs)
        for i, s in enumerate(specs):
            if not isinstance(s, Mapping) or set(s) - {"label", "n", "temperature", "model"}:
                raise invalid(f"models[{i}]", "a dict with keys among label, n, temperature, model", s)
        self.models = [dict(s) for s in specs]
        self._router = get_router(router)
        self.router = router if isinstance(router, (str, dict)) else self._router.name
        self.threshold = threshold
        self._thresholds = (check_thresholds(threshold, len(specs)) if threshold is not None
                            else [self._router.default_threshold] * (len(specs) - 1))
        self.max_steps = max_steps
        self.step_tokens = step_tokens
        self.answer_tokens = answer_tokens
        self.min_step_tokens = min_step_tokens
        self.policy = policy
        self._backends: dict[str, Backend] = {}
        self._arms(None)  # validates the model blocks now

    def _arms(self, default: Backend | None) -> list[ModelArm]:
        arms = []
        for i, s in enumerate(self.models):
            be = default
            if s.get("model"):
                if default is None:
                    be = None
                else:
                    if s["model"] not in self._backends:
                        self._backends[s["model"]] = load_backend(s["model"])
                    be = self._backends[s["model"]]
            n = s.get("n", 1)
            if not isinstance(n, int) or isinstance(n, bool):
                raise invalid(f"models[{i}].n", "a positive integer (samples per step)", n)
            arms.append(ModelArm(s.get("label") or f"model{i}", be, n, s.get("temperature")))
        return arms

    def close(self) -> None:
        """Close the backends this strategy loaded itself (arms with their own ``model``, a model-backed router)."""
        for b in self._backends.values():
            b.close()
        self._backends.clear()
        close = getattr(self._router, "close", None)  # routers that load a model (lm_policy) release it
        if callable(close):
            close()

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        arms = self._arms(backend)
        tasks = []
        for p, m in zip(problems, meters, strict=True):
            ctl = BudgetController(None, arms, router=self._router, threshold=self._thresholds, max_steps=self.max_steps,
                                   policy=self.policy, step_tokens=self.step_tokens, answer_tokens=self.answer_tokens,
                                   min_step_tokens=self.min_step_tokens, meter=m, name="agent")
            tasks.append(AgentTask.create(p.id, p.messages, ctl, p.tools))
        run_agents(tasks)
        out = []
        for p, t in zip(problems, tasks, strict=True):
            s = t.controller.summary()
            steps = [asdict(x) for x in t.controller.steps]
            out.append(Result(
                problem_id=p.id, text=t.text, answer=extract_answer(t.text).text if t.text else None,
                usage=t.controller.meter.total(), stop_reason=t.controller.stop_reason or "done",
                finish_reason=t.finish_reason, truncated=t.finish_reason == "length",
                sequential_tokens=sum(x["output_tokens"] for x in steps if x["kind"] == "model"),
                trace=t.trace,
                details={"steps": steps, "model_steps": s["model_steps"], "tool_calls": s["tool_calls"],
                         "expensive_calls": s["expensive_calls"]},
            ))
        return out


STRATEGIES.register(Agent.name, Agent)
