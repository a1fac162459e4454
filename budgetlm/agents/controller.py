"""An embeddable budget controller for agent loops (Budget-Aware Agentic Routing, arXiv 2602.21227).

An agent task runs many steps, each a model call or a tool call.  A :class:`BudgetController`
owns the task's :class:`~budgetlm.meter.Meter` and, before every step, :meth:`~BudgetController.plan`
says which model takes it (a router chooses among ``models``, cheapest first), how many tokens it
may use, and whether the agent should keep going, answer now, or stop:

- **step allowance** (``policy``): ``fixed`` gives every step ``step_tokens``; ``proportional``
  splits what is left (after holding ``answer_tokens`` back for the final answer) evenly over the
  steps left; ``value`` scales the proportional share by ``0.5 + w`` with ``w`` the router's score
  (harder steps get more).  Always capped by ``step_tokens`` and by what the meter can pay.
- **routing**: the router's arm is used only if its worst case (``n × allowance``) is affordable;
  otherwise the next cheaper arm; if even the cheapest cannot take a useful step
  (``min_step_tokens``), the plan is ``answer`` (a forced final answer in what is left), and
  ``stop`` when not even one token fits.  ``answer`` is also forced on the last allowed step and
  when tool calls run out (§8: never exceed the task budget; if the large call cannot be afforded,
  use small or finish).
- **charging**: model calls go through ``Backend.generate`` with the controller's meter (clamped
  and charged there); :meth:`~BudgetController.record` books spend made elsewhere (another client,
  a tool); :meth:`~BudgetController.tool` wraps a tool function so each call is charged first.

The meter enforces every unit, so the task can never overspend even if a caller ignores the plan.
The controller is a context manager (its summary is final on exit), has async twins of the calling
methods (``aplan``, ``astep``), and :meth:`~BudgetController.wrap_openai` puts any OpenAI-compatible
client under the same budget.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar, cast, overload

from budgetlm.backends.base import Backend, GenerationRequest, GenerationResult, Message, SamplingParams
from budgetlm.budget import Budget
from budgetlm.errors import BudgetExceeded, ConfigError, invalid
from budgetlm.io import JsonObject
from budgetlm.meter import Meter, ledger_json
from budgetlm.routing import RouteQuery, Router, check_thresholds
from budgetlm.routing import get as get_router
from budgetlm.tools import Tool, ToolCall, ToolOutcome, as_tools, call_tool
from budgetlm.usage import Usage

if TYPE_CHECKING:
    from budgetlm.agents.openai_client import BudgetedClient

Policy = Literal["fixed", "proportional", "value"]
Action = Literal["step", "answer", "stop"]
P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class ModelArm:
    """A model an agent step may call (arms are listed cheapest first)."""

    name: str
    """Label in plans and records (for :meth:`BudgetController.wrap_openai`: the model id sent)."""
    backend: Backend | None = None
    """The backend that runs it (``None`` when calls go through a wrapped OpenAI client)."""
    n: int = 1
    """Samples per step; with ``n > 1`` the step's action is the most common one (a stronger step)."""
    temperature: float | None = None
    """Sampling temperature (default 0 for ``n = 1``, 0.7 for ``n > 1``)."""

    def __post_init__(self) -> None:
        if not self.name:
            raise invalid("name", "a non-empty model label", self.name)
        if not isinstance(self.n, int) or self.n < 1:
            raise invalid("n", "a positive number of samples per step", self.n)
        if self.temperature is None:
            self.temperature = 0.0 if self.n == 1 else 0.7


@dataclass
class StepPlan:
    """What the controller allows for the next step."""

    action: Action
    """``step`` (call the model, may use tools), ``answer`` (write the final answer now) or ``stop``."""
    step: int
    """Index of the step (0-based)."""
    arm: int = 0
    """Index of the chosen model in ``models``."""
    model: str = ""
    """The chosen model's label."""
    max_tokens: int = 0
    """Per-sample token allowance of the step."""
    n: int = 1
    """Samples of the step."""
    score: float | None = None
    """The router's score (``None`` when the router was not asked)."""
    reason: str = ""
    """Why this plan (e.g. ``"routed"``, ``"large unaffordable"``, ``"last step"``, ``"budget exhausted: output_tokens"``)."""

    @property
    def done(self) -> bool:
        """True when the agent must not call the model again."""
        return self.action == "stop"


@dataclass
class StepRecord:
    """One step as it ran (also the per-step record of evaluations)."""

    step: int
    """Index of the step."""
    kind: Literal["model", "tool"]
    """A model call or a tool call."""
    model: str = ""
    """Model label (model steps) or tool name (tool steps)."""
    action: str = ""
    """The plan's action (model steps)."""
    prompt_tokens: int = 0
    """Input tokens of the call."""
    output_tokens: int = 0
    """Output tokens over all samples."""
    thinking_tokens: int = 0
    """Of the output tokens, thinking."""
    tool_calls: int = 0
    """Tool calls charged."""
    latency_s: float = 0.0
    """Seconds the call took."""
    error: str | None = None
    """Tool error or skip reason, if any."""


class BudgetController:
    """Keeps an agent task inside ``budget``: plans each step, routes it, charges everything."""

    def __init__(
        self,
        budget: Budget | Mapping[str, object] | str | None,
        models: Sequence[ModelArm | Backend] | Backend,
        *,
        router: str | Router | Mapping[str, object] = "always_small",
        threshold: float | list[float] | None = None,
        max_steps: int = 8,
        policy: Policy = "proportional",
        step_tokens: int = 256,
        answer_tokens: int = 32,
        min_step_tokens: int = 16,
        meter: Meter | None = None,
        name: str = "task",
    ) -> None:
        arms = [models] if isinstance(models, Backend) else list(models)
        if not arms:
            raise invalid("models", "at least one model (a Backend or ModelArm), cheapest first", [])
        self.models = [a if isinstance(a, ModelArm) else ModelArm(getattr(a, "name", f"model{i}"), a)
                       for i, a in enumerate(arms)]
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise invalid("max_steps", "a positive integer", max_steps)
        if policy not in ("fixed", "proportional", "value"):
            raise invalid("policy", "'fixed', 'proportional' or 'value'", policy)
        for k, v in (("step_tokens", step_tokens), ("answer_tokens", answer_tokens), ("min_step_tokens", min_step_tokens)):
            if not isinstance(v, int) or v < 1:
                raise invalid(k, "a positive number of tokens", v)
        self.router = get_router(router)
        n = len(self.models)
        self.thresholds = (check_thresholds(threshold, n) if threshold is not None
                           else [self.router.default_threshold] * (n - 1))
        self.max_steps = max_steps
        self.policy: Policy = policy
        self.step_tokens = step_tokens
        self.answer_tokens = answer_tokens
        self.min_step_tokens = min_step_tokens
        limits = budget if budget is None or isinstance(budget, (Budget, str)) else dict(budget)
        self.meter = meter.child(limits, name=name) if meter is not None else Meter(limits, name=name)
        """The task's meter (every call of every step is charged here)."""
        self.steps: list[StepRecord] = []
        """Every model and tool step so far."""
        self.model_steps = 0
        """Model steps taken (plans with action ``step`` or ``answer`` that ran)."""
        self.stop_reason: str | None = None
        """Why the task ended early (set by plans that force an answer or stop)."""
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------------------ planning
    def _binding(self, prompt_tokens: int) -> tuple[float, str]:
        """Output tokens left for this step and the answer, and the unit that binds them.

        Total tokens also pay this step's prompt and the answer call's prompt (about as long).
        """
        out = self.meter.remaining("output_tokens")
        tot = self.meter.remaining("total_tokens")
        cands = [(float("inf"), "output_tokens")]
        if out is not None:
            cands.append((out, "output_tokens"))
        if tot is not None:
            cands.append((tot - 2 * prompt_tokens, "total_tokens"))
        return min(cands, key=lambda c: c[0])

    def _allowance(self, score: float | None, steps_left: int, prompt_tokens: int = 0) -> int:
        left = self._binding(prompt_tokens)[0]
        if left == float("inf"):
            return self.step_tokens
        share = (left - self.answer_tokens) if self.policy == "fixed" else (left - self.answer_tokens) / max(steps_left, 1)
        if self.policy == "value" and score is not None:
            share *= 0.5 + min(max(score, 0.0), 1.0)
        return int(max(0, min(self.step_tokens, share)))

    def plan(self, state: RouteQuery | Sequence[Message] | None = None, *, prompt_tokens: int = 0) -> StepPlan:
        """The next step: model, token allowance, and whether to go on, answer now, or stop."""
        step = self.model_steps
        try:  # not even one token fits: stop
            self.meter.reserve(prompt_tokens=prompt_tokens, max_tokens=1).release()
        except BudgetExceeded as exc:
            self.stop_reason = f"budget exhausted: {exc.unit}" if exc.unit else "budget exhausted"
            return StepPlan("stop", step, reason=self.stop_reason)
        answer_now = None
        if step >= self.max_steps - 1:
            answer_now = "last step"
        elif self.meter.remaining("tool_calls") is not None and (self.meter.remaining("tool_calls") or 0) < 1:
            answer_now = "budget exhausted: tool_calls"
        elif (self.meter.remaining("input_tokens") or float("inf")) < 2 * prompt_tokens:
            answer_now = "budget exhausted: input_tokens"  # room for one more prompt only: the answer's
        if answer_now is None:
            q = state if isinstance(state, RouteQuery) else RouteQuery(messages=list(state or [{"role": "user", "content": ""}]))
            q.context.update(step=step, max_steps=self.max_steps, rho=self.meter.rho(),
                             tool_calls=self.meter.spent("tool_calls"))
            ranked, scores = ([0], [None]) if len(self.models) == 1 else self.router.choose(
                [q], self.thresholds, self.models[0].backend, [self.meter])
            arm, score = ranked[0], scores[0]
            allow = self._allowance(score, self.max_steps - step - 1, prompt_tokens)
            reason = "routed"
            while arm > 0 and not self.meter.can_afford(prompt_tokens=prompt_tokens, tokens=max(allow, 1),
                                                         n=self.models[arm].n):
                arm -= 1
                reason = "larger model unaffordable"
            if allow >= self.min_step_tokens and self.meter.can_afford(prompt_tokens=prompt_tokens, tokens=allow,
                                                                        n=self.models[arm].n):
                m = self.models[arm]
                return StepPlan("step", step, arm, m.name, allow, m.n, score, reason)
            answer_now = "budget nearly spent"
        if self.stop_reason is None and answer_now.startswith("budget"):
            unit = self._binding(prompt_tokens)[1]
            self.stop_reason = answer_now if answer_now.startswith("budget exhausted") else f"budget exhausted: {unit}"
        m = self.models[0]
        return StepPlan("answer", step, 0, m.name, self.answer_tokens, 1, None, answer_now)

    # ------------------------------------------------------------------------------ running steps
    def request(self, plan: StepPlan, messages: list[Message], *, prefix: str | None = None,
                stop: Sequence[str] = ()) -> GenerationRequest:
        """The generation request of a planned step, charged to the task meter."""
        if plan.action == "stop":
            raise BudgetExceeded(self.stop_reason or "budget exhausted", unit=self.meter.exhausted_unit())
        m = self.models[plan.arm]
        sp = SamplingParams(n=plan.n, temperature=m.temperature or 0.0, max_tokens=max(1, plan.max_tokens),
                            stop=list(stop), logprobs=0)
        return GenerationRequest(messages=messages, assistant_prefix=prefix, sampling=sp, meter=self.meter,
                                 may_think=plan.action != "answer")

    def record_generation(self, plan: StepPlan, result: GenerationResult) -> StepRecord:
        """Book a step's generation result (already charged by the backend) in the step log."""
        u = result.usage
        rec = StepRecord(plan.step, "model", plan.model, plan.action, u.prompt_tokens, u.output_tokens,
                         u.thinking_tokens, 0, u.latency_s, result.skipped)
        self.steps.append(rec)
        self.model_steps += 1
        return rec

    def step(self, messages: list[Message], plan: StepPlan | None = None, *, prefix: str | None = None,
             stop: Sequence[str] = ()) -> tuple[StepPlan, GenerationResult]:
        """Plan (unless given), run and record one model step on the chosen backend."""
        plan = plan or self.plan(messages)
        backend = self.models[plan.arm].backend
        if backend is None:
            raise ConfigError(f"model {plan.model!r} has no backend; pass ModelArm(name, backend) or use wrap_openai")
        res = backend.generate([self.request(plan, messages, prefix=prefix, stop=stop)], on_budget_exhausted="skip")[0]
        self.record_generation(plan, res)
        return plan, res

    def call_tool(self, text_or_call: str | ToolCall,
                  tools: Mapping[str, Tool | Callable[..., object]] | Sequence[Tool | Callable[..., object]]) -> ToolOutcome:
        """Parse and run a tool call, charging one tool call first; failures become observations."""
        table = ({k: v if isinstance(v, Tool) else Tool(k, v) for k, v in tools.items()} if isinstance(tools, Mapping)
                 else as_tools(tools))
        out = call_tool(text_or_call, table, self.meter)
        name = out.call.name if out.call else "?"
        self.steps.append(StepRecord(self.model_steps, "tool", name, "tool", tool_calls=int(_charged(out)),
                                     latency_s=out.latency_s, error=out.skipped or out.error))
        return out

    def record(self, usage: Usage | GenerationResult | None = None, *, tool: str | None = None,
               latency_s: float = 0.0) -> StepRecord:
        """Book spend made outside the controller: a model call's ``usage`` or one call of ``tool``.

        Model usage is charged as it is (it already happened); a tool call is refused with
        :class:`~budgetlm.errors.BudgetExceeded` when no tool calls are left.
        """
        if tool is not None:
            self.meter.record_tool_call(1, latency_s=latency_s, name=tool)
            rec = StepRecord(self.model_steps, "tool", tool, "tool", tool_calls=1, latency_s=latency_s)
        else:
            u = usage.usage if isinstance(usage, GenerationResult) else usage
            if not isinstance(u, Usage):
                raise invalid("usage", "a Usage or GenerationResult (or pass tool=NAME)", type(usage).__name__)
            self.meter.charge(u)
            rec = StepRecord(self.model_steps, "model", u.model, "step", u.prompt_tokens, u.output_tokens,
                             u.thinking_tokens, 0, u.latency_s)
            self.model_steps += 1
        self.steps.append(rec)
        return rec

    @overload
    def tool(self, fn: Callable[P, R], *, name: str | None = None) -> Callable[P, R]: ...

    @overload
    def tool(self, fn: None = None, *, name: str | None = None) -> Callable[[Callable[P, R]], Callable[P, R]]: ...

    def tool(self, fn: Callable[P, R] | None = None, *,
             name: str | None = None) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorator: each call of the tool is charged first (raises BudgetExceeded when none are left)."""
        def wrap(f: Callable[P, R]) -> Callable[P, R]:
            label: str = name or str(getattr(f, "__name__", "tool"))
            if inspect.iscoroutinefunction(f):
                af = cast(Callable[P, Awaitable[object]], f)  # checked just above: calling it gives a coroutine

                @functools.wraps(f)
                async def awrapped(*a: P.args, **k: P.kwargs) -> object:
                    t0 = time.perf_counter()
                    self.meter.record_tool_call(1, name=label)
                    try:
                        return await af(*a, **k)
                    finally:
                        self.steps.append(StepRecord(self.model_steps, "tool", label, "tool", tool_calls=1,
                                                     latency_s=time.perf_counter() - t0))
                return cast(Callable[P, R], awrapped)  # a coroutine function like f, awaiting to f's result

            @functools.wraps(f)
            def wrapped(*a: P.args, **k: P.kwargs) -> R:
                t0 = time.perf_counter()
                self.meter.record_tool_call(1, name=label)
                try:
                    return f(*a, **k)
                finally:
                    self.steps.append(StepRecord(self.model_steps, "tool", label, "tool", tool_calls=1,
                                                 latency_s=time.perf_counter() - t0))
            return wrapped
        return wrap(fn) if fn is not None else wrap

    # ------------------------------------------------------------------------------ async twins
    async def aplan(self, state: RouteQuery | Sequence[Message] | None = None, *, prompt_tokens: int = 0) -> StepPlan:
        """Async :meth:`plan` (router calls run in a worker thread)."""
        return await asyncio.to_thread(self.plan, state, prompt_tokens=prompt_tokens)

    async def astep(self, messages: list[Message], plan: StepPlan | None = None, *, prefix: str | None = None,
                    stop: Sequence[str] = ()) -> tuple[StepPlan, GenerationResult]:
        """Async :meth:`step`: the call runs on the shared engine (cancelling it aborts the generation there and
        charges what was generated); the meter's reservations keep concurrent steps inside the budget."""
        plan = plan or await self.aplan(messages)
        backend = self.models[plan.arm].backend
        if backend is None:
            raise ConfigError(f"model {plan.model!r} has no backend; pass ModelArm(name, backend) or use wrap_openai")
        [res] = await backend.agenerate([self.request(plan, messages, prefix=prefix, stop=stop)],
                                        on_budget_exhausted="skip")
        self.record_generation(plan, res)
        return plan, res

    # ------------------------------------------------------------------------------ wrapping clients
    def wrap_openai(self, client: Any) -> BudgetedClient:
        """An OpenAI(-compatible) client whose ``chat.completions.create`` runs under this budget."""
        from budgetlm.agents.openai_client import BudgetedClient

        return BudgetedClient(client, self)

    # ------------------------------------------------------------------------------ lifecycle
    def summary(self) -> JsonObject:
        """JSON-ready: spend by unit, steps, model and tool calls, expensive calls, stop reason."""
        return {"ledger": ledger_json(self.meter.summary()), "steps": [asdict(s) for s in self.steps],
                "model_steps": self.model_steps, "tool_calls": int(self.meter.spent("tool_calls")),
                "expensive_calls": sum(1 for s in self.steps if s.kind == "model" and s.model != self.models[0].name),
                "stop_reason": self.stop_reason or "done", "wall_seconds": time.perf_counter() - self._t0}

    def __enter__(self) -> BudgetController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.meter.stop_reason = self.meter.stop_reason or self.stop_reason

    async def __aenter__(self) -> BudgetController:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)

    def __repr__(self) -> str:
        return (f"BudgetController(models={[m.name for m in self.models]}, router={self.router.name!r}, "
                f"steps={self.model_steps}/{self.max_steps}, meter={self.meter!r})")


def _charged(out: ToolOutcome) -> bool:
    """Whether :func:`~budgetlm.tools.call_tool` charged the call (it refuses unparsable, unknown and
    badly-argued calls for free, and skips calls the budget cannot pay)."""
    refused = out.call is None or out.skipped is not None or out.error == "unknown tool"
    return not refused and not (out.error or "").startswith("bad arguments")
