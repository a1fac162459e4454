"""A tool-using agent as a strategy: each problem runs under its own :class:`~budgetlm.agents.BudgetController`.

The problem's tools (``Problem.tools``, e.g. the ``search`` and ``calculator`` of the offline
``kb_agent`` suite) are offered to the model; each step is routed between ``models`` (cheapest
first; default one greedy ``small`` arm and a ``large`` arm that votes over 5 samples per step on
the same model) by ``router`` with ``threshold``, and the controller enforces the per-problem budget
(ALGORITHMS.md §8: never exceed the task budget; when the large step is unaffordable take the small
one or finish).  See :mod:`budgetlm.agents.loop` for the loop and :mod:`budgetlm.agents.controller`
for planning.

Each problem is an async program (:func:`~budgetlm.agents.loop.arun_agent`): its steps go to the shared
engine one at a time, independently of the other problems in flight.

Records get ``details``: ``steps`` (one entry per model or tool step: model, tokens, tool calls),
``model_steps``, ``tool_calls`` and ``expensive_calls`` (steps not on the cheapest model).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from budgetlm.agents import AgentTask, BudgetController, ModelArm, arun_agent
from budgetlm.answers import extract_answer
from budgetlm.backends import load as load_backend
from budgetlm.backends.base import Backend
from budgetlm.io import JsonObject
from budgetlm.routing import Router, check_thresholds
from budgetlm.routing import get as get_router
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams


class AgentModel(BaseModel):
    """One model arm of the agent (cheapest first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str | None = Field(default=None, description="Name in records and plans (default model<i>).")
    n: int = Field(default=1, ge=1, strict=True, description="Samples per step (n > 1: the most common action).")
    temperature: float | None = Field(default=None, ge=0, description="Sampling temperature (None: greedy).")
    model: str | None = Field(default=None, description="A backend spec of its own (default: the run's backend).")


DEFAULT_MODELS: list[JsonObject] = [{"label": "small", "n": 1}, {"label": "large", "n": 5, "temperature": 0.7}]
"""Cheap step = one greedy sample; expensive step = the most common action of 5 samples."""


class AgentParams(StrategyParams):
    """Parameters of :class:`Agent`."""

    router: str | dict[str, Any] | Router = Field(default="always_small", description=(
        "Per-step router: a registered name, a {name, ...} block, or a Router object."))
    models: list[AgentModel] = Field(default_factory=lambda: [AgentModel.model_validate(m) for m in DEFAULT_MODELS], min_length=1,
                                     description="Model arms, cheapest first.")
    threshold: float | list[float] | None = Field(default=None, description=(
        "Router cut(s) between neighbouring arms, ascending (None: the router's default)."))
    max_steps: int = Field(default=8, ge=1, strict=True, description="Most model steps per problem.")
    step_tokens: int = Field(default=128, ge=1, strict=True, description="Most tokens per step.")
    answer_tokens: int = Field(default=24, ge=1, strict=True, description="Tokens reserved for the forced answer.")
    min_step_tokens: int = Field(default=16, ge=1, strict=True, description="Fewest tokens a step is planned with.")
    policy: Literal["fixed", "proportional", "value"] = Field(default="proportional", description=(
        "How the controller splits the remaining budget over steps."))

    @field_validator("models", mode="before")
    @classmethod
    def _blocks(cls, v: object) -> object:
        if isinstance(v, list):
            for i, m in enumerate(v):
                if not isinstance(m, dict | AgentModel):
                    raise ValueError(f"`models[{i}]` must be a dict with keys among label, n, temperature, model, "
                                     f"got {m!r}")
        return v


class Agent(Strategy):
    """ReAct agent with tools, per-step routing and a per-problem budget controller."""

    name = "agent"
    Params = AgentParams
    p: AgentParams
    models: list[AgentModel]
    threshold: float | list[float] | None
    max_steps: int
    step_tokens: int
    answer_tokens: int
    min_step_tokens: int
    policy: Literal["fixed", "proportional", "value"]

    def setup(self) -> None:
        self._router = get_router(self.p.router)
        self.router = self.p.router if isinstance(self.p.router, str | dict) else self._router.name
        n = len(self.models)
        self._thresholds = (check_thresholds(self.threshold, n) if self.threshold is not None
                            else [self._router.default_threshold] * (n - 1))
        self._backends: dict[str, Backend] = {}

    def params(self) -> dict[str, object]:
        return {"router": self.router, "models": [m.model_dump(exclude_none=True) for m in self.models],
                "threshold": self.threshold, "max_steps": self.max_steps, "step_tokens": self.step_tokens,
                "answer_tokens": self.answer_tokens, "min_step_tokens": self.min_step_tokens, "policy": self.policy}

    def _arms(self, default: Backend) -> list[ModelArm]:
        arms = []
        for i, s in enumerate(self.models):
            be = default
            if s.model:
                if s.model not in self._backends:
                    self._backends[s.model] = load_backend(s.model)
                be = self._backends[s.model]
            arms.append(ModelArm(s.label or f"model{i}", be, s.n, s.temperature))
        return arms

    def close(self) -> None:
        """Close the backends this strategy loaded itself (arms with their own ``model``, a model-backed router)."""
        for b in self._backends.values():
            b.close()
        self._backends.clear()
        close = getattr(self._router, "close", None)  # routers that load a model (lm_policy) release it
        if callable(close):
            close()

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        ctl = BudgetController(None, self._arms(ctx.backend), router=self._router, threshold=self._thresholds,
                               max_steps=self.max_steps, policy=self.policy, step_tokens=self.step_tokens,
                               answer_tokens=self.answer_tokens, min_step_tokens=self.min_step_tokens,
                               meter=ctx.meter, name="agent")
        t = await arun_agent(AgentTask.create(problem.id, problem.messages, ctl, problem.tools))
        s = ctl.summary()
        steps = [asdict(x) for x in ctl.steps]
        return Result(
            problem_id=problem.id, text=t.text, answer=extract_answer(t.text).text if t.text else None,
            usage=ctl.meter.total(), stop_reason=ctl.stop_reason or "done",
            finish_reason=t.finish_reason, truncated=t.finish_reason == "length",
            sequential_tokens=sum(x["output_tokens"] for x in steps if x["kind"] == "model"),
            trace=t.trace,
            details={"steps": steps, "model_steps": s["model_steps"], "tool_calls": s["tool_calls"],
                     "expensive_calls": s["expensive_calls"]},
        )


STRATEGIES.register(Agent.name, Agent)
