"""The agent budget controller (plans, routing, charging, tools, async, OpenAI wrapper) and the agent loop."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from budgetlm.agents import ANSWER_CUE, AgentTask, BudgetController, ModelArm, StepPlan, run_agents
from budgetlm.agents.loop import pick
from budgetlm.agents.openai_client import FINAL_ANSWER_NUDGE
from budgetlm.backends.base import Completion, SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.budget import Budget
from budgetlm.errors import BudgetExceeded, ConfigError
from budgetlm.evals import suites
from budgetlm.evals.suites.base import EvalItem
from budgetlm.meter import Meter
from budgetlm.routing import RouteQuery, Router
from budgetlm.tools import TOOL_CALL_CLOSE, Tool
from budgetlm.usage import Usage

KB_SPEC = "kb_agent?size=4&seed=3&difficulty=1"


class FixedScore(Router):
    """A router that gives every query the same score ``w`` (so allowances are computable by hand)."""

    name = "fixed_score"

    def __init__(self, w: float) -> None:
        self.w = w

    def score(self, queries: Sequence[RouteQuery], backend: object = None, meters: object = None) -> list[float]:
        return [self.w] * len(queries)


def _ctl(budget: Any, arms: Sequence[ModelArm] | None = None, **kw: Any) -> BudgetController:
    be = ScriptedBackend(["Answer: 1"])
    return BudgetController(budget, list(arms) if arms is not None else [ModelArm("small", be)], **kw)


def _tool_call(name: str, **arguments: Any) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + TOOL_CALL_CLOSE


def _over(meter: Meter, budget: Budget) -> dict[str, tuple[float, float]]:
    """Units whose spend exceeds the limit (must always be empty)."""
    return {u: (meter.spent(u), lim) for u, lim in budget.limits().items() if u != "wall_seconds" and meter.spent(u) > lim}


# ---------------------------------------------------------------- plan(): allowances

@pytest.mark.parametrize(("policy", "w", "budget", "expected"), [
    # fixed: min(step_tokens=256, left - answer_tokens) = min(256, 1000 - 32)
    ("fixed", 0.0, {"output_tokens": 1000}, 256),
    # fixed, small budget: 200 - 32 = 168 < 256
    ("fixed", 0.0, {"output_tokens": 200}, 168),
    # proportional: (1000 - 32) / (8 - 0 - 1) = 138.28 -> 138
    ("proportional", 0.0, {"output_tokens": 1000}, 138),
    # proportional takes the tighter of output and total tokens: (500 - 32) / 7 = 66.9 -> 66
    ("proportional", 0.0, {"output_tokens": 1000, "total_tokens": 500}, 66),
    # proportional, huge budget: capped by step_tokens
    ("proportional", 0.0, {"output_tokens": 100_000}, 256),
    # no token limit at all: step_tokens
    ("proportional", 0.0, {"tool_calls": 3}, 256),
    # value, w = 0: 138.28 * 0.5 = 69.1 -> 69
    ("value", 0.0, {"output_tokens": 1000}, 69),
    # value, w = 0.25: 138.28 * 0.75 = 103.7 -> 103
    ("value", 0.25, {"output_tokens": 1000}, 103),
    # value, w = 1: 138.28 * 1.5 = 207.4 -> 207
    ("value", 1.0, {"output_tokens": 1000}, 207),
    # value, w clipped to 1: same as w = 1
    ("value", 3.0, {"output_tokens": 1000}, 207),
    # value, huge budget: still capped by step_tokens
    ("value", 1.0, {"output_tokens": 100_000}, 256),
])
def test_plan_allowance_by_policy(policy: str, w: float, budget: dict, expected: int) -> None:
    be = ScriptedBackend(["Answer: 1"])
    ctl = BudgetController(budget, [ModelArm("small", be), ModelArm("large", be)], router=FixedScore(w), threshold=0.5,
                           policy=policy, step_tokens=256, answer_tokens=32, max_steps=8)  # type: ignore[arg-type]
    plan = ctl.plan()
    assert plan.action == "step" and plan.max_tokens == expected
    assert plan.arm == (1 if w >= 0.5 else 0) and plan.model == ("large" if w >= 0.5 else "small")
    assert plan.score == w and plan.reason == "routed" and not plan.done


def test_value_policy_with_one_model_is_proportional() -> None:
    ctl = _ctl({"output_tokens": 1000}, policy="value")  # one arm: the router is not asked, score None
    plan = ctl.plan()
    assert plan.score is None and plan.max_tokens == 138


def test_proportional_share_grows_as_steps_are_taken() -> None:
    ctl = _ctl({"output_tokens": 1000}, step_tokens=1000, max_steps=8)
    shares = []
    for _ in range(3):
        shares.append(ctl.plan().max_tokens)
        ctl.record(Usage(output_tokens=100, model="small"))
    # (1000-32)/7 = 138; (900-32)/6 = 144; (800-32)/5 = 153
    assert shares == [138, 144, 153]


# ---------------------------------------------------------------- plan(): answer / stop

@pytest.mark.parametrize(("policy", "left", "action"), [
    # fixed: allowance = left - 32 >= min_step_tokens (16) iff left >= 48
    ("fixed", 48, "step"),
    ("fixed", 47, "answer"),
    # proportional at step 0 of 8: (left - 32) / 7 >= 16 iff left >= 144
    ("proportional", 144, "step"),
    ("proportional", 143, "answer"),
])
def test_answer_forced_below_min_step_plus_answer_tokens(policy: str, left: int, action: str) -> None:
    ctl = _ctl({"output_tokens": left}, policy=policy, answer_tokens=32, min_step_tokens=16, max_steps=8)
    plan = ctl.plan()
    assert plan.action == action
    if action == "answer":
        assert plan.max_tokens == 32 and plan.reason == "budget nearly spent" and plan.arm == 0
        assert ctl.stop_reason == "budget exhausted: output_tokens"
    else:
        assert plan.max_tokens == 16 and ctl.stop_reason is None


def test_answer_forced_on_last_step() -> None:
    ctl = _ctl({"output_tokens": 10_000}, max_steps=3)
    assert [ctl.plan().action for _ in range(2)] == ["step", "step"]  # plan alone does not advance
    ctl.record(Usage(output_tokens=5))
    assert ctl.plan().action == "step"
    ctl.record(Usage(output_tokens=5))
    plan = ctl.plan()  # step 2 = max_steps - 1
    assert (plan.action, plan.step, plan.reason) == ("answer", 2, "last step")
    assert ctl.stop_reason is None  # the last step is not a budget stop
    one = _ctl(None, max_steps=1)
    assert one.plan().reason == "last step"


@pytest.mark.parametrize("spent_tools", [0, 2])
def test_answer_forced_when_tool_calls_run_out(spent_tools: int) -> None:
    ctl = _ctl({"output_tokens": 10_000, "tool_calls": spent_tools})
    for _ in range(spent_tools):
        assert ctl.plan().action == "step"
        ctl.record(tool="search")
    plan = ctl.plan()
    assert (plan.action, plan.reason) == ("answer", "budget exhausted: tool_calls")
    assert ctl.stop_reason == "budget exhausted: tool_calls"


@pytest.mark.parametrize(("budget", "spend", "prompt_tokens", "unit"), [
    # nothing to spend from the start
    ({"output_tokens": 0}, None, 0, "output_tokens"),
    # everything spent by earlier steps
    ({"output_tokens": 50}, Usage(output_tokens=50), 0, "output_tokens"),
    # the prompt alone is bigger than the total-token budget
    ({"total_tokens": 20}, None, 30, "total_tokens"),
    # the input-token budget cannot take the prompt
    ({"input_tokens": 5, "output_tokens": 1000}, None, 6, "input_tokens"),
    # no wall time left
    ({"wall_seconds": 0}, None, 0, "wall_seconds"),
])
def test_stop_when_nothing_is_left(budget: dict, spend: Usage | None, prompt_tokens: int, unit: str) -> None:
    ctl = _ctl(budget)
    if spend is not None:
        ctl.record(spend)
    plan = ctl.plan(prompt_tokens=prompt_tokens)
    assert plan.action == "stop" and plan.done
    assert plan.reason == ctl.stop_reason == f"budget exhausted: {unit}"
    with pytest.raises(BudgetExceeded):
        ctl.request(plan, [{"role": "user", "content": "q"}])


@pytest.mark.parametrize(("arms", "thresholds", "budget", "arm", "why"), [
    # the large arm (n=5) needs 5 x 256 = 1280 > 600: the small one takes the step
    ([1, 5], 0.5, 600, 0, "unaffordable"),
    # 5 x 256 = 1280 fits 2000: the large arm is kept
    ([1, 5], 0.5, 2000, 1, "routed"),
    # three arms: large (5 x 256) does not fit 600, medium (2 x 256 = 512) does
    ([1, 2, 5], [0.3, 0.6], 600, 1, "unaffordable"),
    # three arms, 500: medium needs 512 > 500 too, falls to small
    ([1, 2, 5], [0.3, 0.6], 500, 0, "unaffordable"),
])
def test_large_arm_replaced_when_unaffordable(arms: list[int], thresholds: Any, budget: int, arm: int,
                                              why: str) -> None:
    be = ScriptedBackend(["Answer: 1"])
    models = [ModelArm(f"m{n}", be, n=n) for n in arms]
    ctl = BudgetController({"output_tokens": budget}, models, router="always_large", threshold=thresholds,
                           policy="fixed", step_tokens=256)
    plan = ctl.plan()
    assert plan.action == "step" and plan.arm == arm and plan.n == arms[arm] and plan.max_tokens == 256
    assert why in plan.reason
    assert plan.n * plan.max_tokens <= budget


def test_affordability_probe_does_not_mark_the_meter_stopped() -> None:
    """Regression (budgetlm/meter.py Meter.can_afford): a refused probe sets ``meter.stop_reason``.

    ``plan()`` asks ``can_afford`` whether the large arm fits; the refused probe goes through
    ``Meter._refuse``, which sets ``stop_reason = "budget exhausted: output_tokens"`` although no
    call was refused and the task then finishes normally ("done").  The ledger then reports a budget
    stop that never happened.
    """
    be = ScriptedBackend(["Answer: 7"])
    with BudgetController({"output_tokens": 600}, [ModelArm("s", be), ModelArm("l", be, n=5)], router="always_large",
                          policy="fixed", step_tokens=256) as ctl:
        task = AgentTask.create("t", [{"role": "user", "content": "q"}], ctl)
        run_agents([task])
    assert task.text == "Answer: 7" and ctl.summary()["stop_reason"] == "done"
    assert ctl.meter.stop_reason is None, ctl.meter.stop_reason


# ---------------------------------------------------------------- invalid parameters

@pytest.mark.parametrize(("kw", "param"), [
    ({"max_steps": 0}, "max_steps"),  # no step at all
    ({"max_steps": 2.5}, "max_steps"),  # not an integer
    ({"policy": "x"}, "policy"),  # unknown allowance policy
    ({"step_tokens": 0}, "step_tokens"),  # a step must be allowed a token
    ({"answer_tokens": 0}, "answer_tokens"),  # the final answer needs room
    ({"min_step_tokens": -1}, "min_step_tokens"),  # negative
    ({"models": []}, "models"),  # no model
    ({"threshold": [0.2, 0.4]}, "thresholds"),  # 2 thresholds for 2 arms
    ({"router": "nosuch"}, "nosuch"),  # unknown router name
])
def test_invalid_controller_params(kw: dict, param: str) -> None:
    be = ScriptedBackend(["Answer: 1"])
    args: dict[str, Any] = {"models": [ModelArm("s", be), ModelArm("l", be)]} | kw
    models = args.pop("models")
    with pytest.raises(ConfigError, match=param):
        BudgetController({"output_tokens": 10}, models, **args)


@pytest.mark.parametrize(("kw", "param"), [
    ({"n": 0}, "`n`"),  # no samples
    ({"n": -2}, "`n`"),  # negative samples
    ({"n": 1.5}, "`n`"),  # fractional samples
    ({"name": ""}, "`name`"),  # no label
])
def test_invalid_model_arm(kw: dict, param: str) -> None:
    with pytest.raises(ConfigError, match=param):
        ModelArm(**({"name": "m"} | kw))


def test_model_arm_default_temperature_and_bare_backend() -> None:
    assert ModelArm("a").temperature == 0.0 and ModelArm("b", n=3).temperature == 0.7
    be = ScriptedBackend(["Answer: 1"], name="tiny")
    ctl = BudgetController(None, be)  # a bare Backend becomes one arm named after it
    assert [m.name for m in ctl.models] == ["tiny"] and ctl.models[0].backend is be


def test_step_without_backend_is_config_error() -> None:
    ctl = BudgetController({"output_tokens": 100}, [ModelArm("remote")])
    with pytest.raises(ConfigError, match="no backend"):
        ctl.step([{"role": "user", "content": "q"}])


# ---------------------------------------------------------------- step(), record(), tool()

def test_step_runs_and_charges_the_planned_call() -> None:
    be = ScriptedBackend(["one two three four five six seven eight nine ten"])
    ctl = BudgetController({"output_tokens": 100}, [ModelArm("s", be)], policy="fixed", step_tokens=4,
                           min_step_tokens=2)
    plan, res = ctl.step([{"role": "user", "content": "q"}])
    assert plan.max_tokens == 4 and res.usage.output_tokens == 4 and res.first.finish_reason == "length"
    assert ctl.meter.spent("output_tokens") == 4 and ctl.model_steps == 1
    rec = ctl.steps[-1]
    assert (rec.kind, rec.model, rec.action, rec.output_tokens) == ("model", "s", "step", 4)
    assert rec.prompt_tokens == res.usage.prompt_tokens > 0


def test_record_charges_external_usage_and_tool_calls() -> None:
    ctl = _ctl({"output_tokens": 100, "tool_calls": 1})
    rec = ctl.record(Usage(prompt_tokens=12, output_tokens=30, model="elsewhere"))
    assert (rec.kind, rec.model, rec.output_tokens, rec.prompt_tokens) == ("model", "elsewhere", 30, 12)
    assert ctl.meter.spent("output_tokens") == 30 and ctl.meter.spent("input_tokens") == 12 and ctl.model_steps == 1
    rec = ctl.record(tool="x")
    assert (rec.kind, rec.model, rec.tool_calls) == ("tool", "x", 1)
    assert ctl.meter.spent("tool_calls") == 1 and ctl.model_steps == 1  # a tool call is not a model step
    with pytest.raises(BudgetExceeded) as exc:
        ctl.record(tool="x")
    assert exc.value.unit == "tool_calls" and ctl.meter.spent("tool_calls") == 1 and len(ctl.steps) == 2
    with pytest.raises(ConfigError, match="usage"):
        ctl.record("not usage")  # type: ignore[arg-type]


def test_tool_decorator_charges_each_call_and_refuses_when_spent() -> None:
    ctl = _ctl({"tool_calls": 2})
    ran: list[int] = []

    @ctl.tool
    def lookup(x: int) -> int:
        ran.append(x)
        return x * 2

    @ctl.tool(name="renamed")
    def other() -> str:
        ran.append(-1)
        return "ok"

    assert lookup(3) == 6 and other() == "ok"
    assert ctl.meter.spent("tool_calls") == 2 and [s.model for s in ctl.steps] == ["lookup", "renamed"]
    assert lookup.__name__ == "lookup"  # functools.wraps
    with pytest.raises(BudgetExceeded) as exc:
        lookup(4)
    assert exc.value.unit == "tool_calls"
    assert ran == [3, -1] and ctl.meter.spent("tool_calls") == 2 and len(ctl.steps) == 2  # body never ran


def test_tool_decorator_charges_a_call_that_raises() -> None:
    ctl = _ctl({"tool_calls": 5})

    @ctl.tool
    def broken() -> None:
        raise RuntimeError("down")

    with pytest.raises(RuntimeError, match="down"):
        broken()
    assert ctl.meter.spent("tool_calls") == 1 and ctl.steps[-1].tool_calls == 1


def test_async_tool_decorator() -> None:
    ctl = _ctl({"tool_calls": 2})
    ran: list[str] = []

    @ctl.tool
    async def fetch(q: str) -> str:
        await asyncio.sleep(0)
        ran.append(q)
        return q.upper()

    async def main() -> list[Any]:
        out: list[Any] = list(await asyncio.gather(fetch("a"), fetch("b")))
        try:
            await fetch("c")
        except BudgetExceeded as e:
            out.append(e.unit)
        return out

    assert asyncio.run(main()) == ["A", "B", "tool_calls"]
    assert sorted(ran) == ["a", "b"] and ctl.meter.spent("tool_calls") == 2


@pytest.mark.parametrize(("text", "error", "charged"), [
    # unknown tool: error observation, not charged
    (_tool_call("nope", query="x"), "unknown tool", 0),
    # arguments that do not bind: refused for free
    (_tool_call("search", bogus="x"), "bad arguments", 0),
    # unparsable: error observation, not charged
    ("<tool_call>{not json</tool_call>", "unparsable tool call", 0),
    # the tool raises: charged, error observation
    (_tool_call("search", query="boom"), "RuntimeError: kaboom", 1),
    # a good call: charged, no error
    (_tool_call("search", query="ok"), None, 1),
])
def test_call_tool_failures_become_observations(text: str, error: str | None, charged: int) -> None:
    def search(query: str) -> str:
        if query == "boom":
            raise RuntimeError("kaboom")
        return f"found {query}"

    ctl = _ctl({"tool_calls": 3})
    out = ctl.call_tool(text, [search])
    assert ctl.meter.spent("tool_calls") == charged and ctl.steps[-1].tool_calls == charged
    if error is None:
        assert out.error is None and out.observation == "found ok" and ctl.steps[-1].error is None
    else:
        assert error in (out.error or "") and out.observation.startswith("error:")
        assert error in (ctl.steps[-1].error or "")


def test_call_tool_with_no_tool_calls_left_is_skipped() -> None:
    ctl = _ctl({"tool_calls": 0})
    ran: list[str] = []
    out = ctl.call_tool(_tool_call("search", query="x"), {"search": Tool("search", lambda query: ran.append(query))})
    assert out.skipped == "budget exhausted: tool_calls" and ran == [] and ctl.meter.spent("tool_calls") == 0
    assert ctl.steps[-1].tool_calls == 0 and ctl.steps[-1].error == "budget exhausted: tool_calls"


# ---------------------------------------------------------------- context manager and summary

def test_context_manager_and_summary() -> None:
    be = ScriptedBackend(["a b c d e f g h i j"])
    with BudgetController({"output_tokens": 10, "tool_calls": 1}, [ModelArm("s", be), ModelArm("l", be)],
                          router="always_large", policy="fixed", step_tokens=4, answer_tokens=2,
                          min_step_tokens=1) as ctl:
        assert isinstance(ctl, BudgetController)
        ctl.step([{"role": "user", "content": "q"}])  # 4 tokens on the large arm
        ctl.record(tool="search")  # tool calls now spent: the next plan must answer
        plan, _ = ctl.step([{"role": "user", "content": "q"}])
        assert plan.action == "answer" and plan.model == "s"
    s = ctl.summary()
    assert {"ledger", "steps", "model_steps", "tool_calls", "expensive_calls", "stop_reason"} <= set(s)
    assert s["model_steps"] == 2 and s["tool_calls"] == 1 and s["expensive_calls"] == 1
    assert s["stop_reason"] == "budget exhausted: tool_calls" == ctl.meter.stop_reason  # set on exit
    assert [x["kind"] for x in s["steps"]] == ["model", "tool", "model"]
    assert s["ledger"]["units"]["output_tokens"]["spent"] == 6 and s["ledger"]["units"]["tool_calls"]["spent"] == 1
    json.dumps(s)  # JSON-ready


def test_summary_of_an_untouched_controller_is_done() -> None:
    s = _ctl(None).summary()
    assert s["stop_reason"] == "done" and s["steps"] == [] and s["model_steps"] == s["tool_calls"] == 0


# ---------------------------------------------------------------- async: shared parent meter

@pytest.mark.parametrize(("limit", "k", "n"), [
    (100, 5, 1),  # five controllers, one sample per step
    (37, 4, 3),  # odd limit, three samples per step (large-ish worst case per call)
    (7, 6, 1),  # fewer tokens than a single step asks for
])
def test_async_controllers_sharing_a_parent_never_overspend(limit: int, k: int, n: int) -> None:
    parent = Meter(Budget(output_tokens=limit), name="parent")
    ctls = [BudgetController(None, [ModelArm("s", ScriptedBackend(["w " * 40], delay=0.005), n=n)], meter=parent,
                             policy="fixed", step_tokens=8, answer_tokens=2, min_step_tokens=1, max_steps=50,
                             name=f"agent{i}") for i in range(k)]
    msgs = [{"role": "user", "content": "go"}]

    async def agent(ctl: BudgetController) -> int:
        runs = 0
        while True:
            plan = await ctl.aplan(msgs)
            if plan.done:
                return runs
            await ctl.astep(msgs, plan)
            runs += 1

    async def main() -> list[int]:
        return list(await asyncio.gather(*(agent(c) for c in ctls)))

    runs = asyncio.run(main())
    spent = parent.spent("output_tokens")
    assert spent <= limit
    assert spent == sum(c.meter.spent("output_tokens") for c in ctls)
    assert spent >= limit - n  # the agents ran until (almost) nothing was left
    assert all(r >= 1 for r in runs[:1]) and all(c.stop_reason for c in ctls)
    assert parent.reserved("output_tokens") == 0  # every reservation settled


# ---------------------------------------------------------------- wrap_openai with a fake client

class FakeOpenAI:
    """Minimal OpenAI-like client: ``chat.completions.create`` returns usage and choices."""

    def __init__(self, out_tokens: int = 100, report_usage: bool = True, is_async: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.out_tokens = out_tokens
        self.report_usage = report_usage
        self.models = "passthrough"
        create: Callable[..., Any] = self._acreate if is_async else self._create
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=create, other="inner"))

    def _create(self, **kw: Any) -> Any:
        self.calls.append(kw)
        cap = kw.get("max_completion_tokens", kw.get("max_tokens"))
        n = int(kw.get("n", 1))
        k = min(self.out_tokens, cap)
        usage = SimpleNamespace(prompt_tokens=11, completion_tokens=k * n) if self.report_usage else None
        return SimpleNamespace(usage=usage, choices=[SimpleNamespace(message=SimpleNamespace(content="x"))] * n)

    async def _acreate(self, **kw: Any) -> Any:
        await asyncio.sleep(0)
        return self._create(**kw)


@pytest.mark.parametrize(("asked", "key", "sent"), [
    (500, "max_tokens", 50),  # asked above the allowance: clamped to it
    (10, "max_tokens", 10),  # asked below: kept
    (None, "max_tokens", 50),  # not asked: the allowance
    (500, "max_completion_tokens", 50),  # the newer parameter name is clamped too
])
def test_wrap_openai_clamps_and_charges(asked: int | None, key: str, sent: int) -> None:
    fake = FakeOpenAI(out_tokens=100)
    ctl = BudgetController({"output_tokens": 1000}, [ModelArm("small-id"), ModelArm("large-id")], router="always_large",
                           policy="fixed", step_tokens=50)
    client = ctl.wrap_openai(fake)
    kw: dict[str, Any] = {"model": "caller-model", "messages": [{"role": "user", "content": "hi"}]}
    if asked is not None:
        kw[key] = asked
    resp = client.chat.completions.create(**kw)
    call = fake.calls[-1]
    assert call[key] == sent and call["model"] == "large-id"  # routed arm's name is the model id
    assert ctl.meter.spent("output_tokens") == resp.usage.completion_tokens == sent
    assert ctl.meter.spent("input_tokens") == 11
    assert ctl.steps[-1].model == "large-id" and ctl.model_steps == 1 and ctl.meter.reserved("output_tokens") == 0
    assert client.models == "passthrough" and client.chat.completions.other == "inner"  # everything else passes


def test_wrap_openai_single_arm_keeps_callers_model() -> None:
    fake = FakeOpenAI()
    ctl = BudgetController({"output_tokens": 1000}, [ModelArm("arm")])
    client = ctl.wrap_openai(fake)
    client.chat.completions.create(model="mine", messages=[{"role": "user", "content": "hi"}])
    client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
    assert [c["model"] for c in fake.calls] == ["mine", "arm"]


def test_wrap_openai_answer_appends_nudge_and_stop_raises() -> None:
    fake = FakeOpenAI(out_tokens=100)
    ctl = BudgetController({"output_tokens": 50}, [ModelArm("m")], max_steps=1, answer_tokens=20)
    client = ctl.wrap_openai(fake)
    msgs = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="m", messages=msgs, max_tokens=500)
    assert fake.calls[-1]["messages"] == msgs + [{"role": "user", "content": FINAL_ANSWER_NUDGE}]
    assert fake.calls[-1]["max_tokens"] == 20 and msgs == [{"role": "user", "content": "hi"}]  # caller's list intact
    client.chat.completions.create(model="m", messages=msgs)
    client.chat.completions.create(model="m", messages=msgs)  # clamped to the 10 left
    assert [c["max_tokens"] for c in fake.calls] == [20, 20, 10]
    assert ctl.meter.spent("output_tokens") == 50
    with pytest.raises(BudgetExceeded) as exc:
        client.chat.completions.create(model="m", messages=msgs)
    assert exc.value.unit == "output_tokens" and len(fake.calls) == 3  # the client was not called
    assert ctl.meter.spent("output_tokens") == 50


def test_wrap_openai_zero_budget_never_calls_client() -> None:
    fake = FakeOpenAI()
    client = BudgetController({"output_tokens": 0}, [ModelArm("m")]).wrap_openai(fake)
    with pytest.raises(BudgetExceeded):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert fake.calls == []


def test_wrap_openai_without_usage_charges_worst_case() -> None:
    fake = FakeOpenAI(out_tokens=3, report_usage=False)
    ctl = BudgetController({"output_tokens": 1000}, [ModelArm("m")], policy="fixed", step_tokens=40)
    ctl.wrap_openai(fake).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2)
    assert ctl.meter.spent("output_tokens") == 80  # 2 samples x 40 held, none reported


def test_wrap_openai_client_error_releases_reservation() -> None:
    class Boom:
        chat = SimpleNamespace(completions=SimpleNamespace(create=lambda **kw: (_ for _ in ()).throw(OSError("down"))))

    ctl = BudgetController({"output_tokens": 100}, [ModelArm("m")])
    with pytest.raises(OSError, match="down"):
        ctl.wrap_openai(Boom()).chat.completions.create(model="m", messages=[])
    assert ctl.meter.reserved("output_tokens") == 0 and ctl.meter.spent("output_tokens") == 0 and ctl.steps == []


def test_wrap_async_openai_client() -> None:
    fake = FakeOpenAI(out_tokens=7, is_async=True)
    ctl = BudgetController({"output_tokens": 30}, [ModelArm("m")], policy="fixed", step_tokens=20, answer_tokens=2,
                           min_step_tokens=1)
    client = ctl.wrap_openai(fake)

    async def main() -> int:
        used = 0
        while True:
            try:
                resp = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            except BudgetExceeded:
                return used
            used += resp.usage.completion_tokens

    used = asyncio.run(main())
    assert used == ctl.meter.spent("output_tokens") == 30  # 7+7+7+7+2


# ---------------------------------------------------------------- pick(): majority action of n samples

def _c(text: str, tool: bool = False) -> Completion:
    return Completion(text=text, token_ids=[0] * 3, finish_reason="stop", answer=text,
                      stop_string=TOOL_CALL_CLOSE if tool else None)


SEARCH_A = '<tool_call>{"name": "search", "arguments": {"query": "A"}}'
SEARCH_A_SPACED = 'thinking... <tool_call>{"arguments": {"query": "A"}, "name": "search"}'
SEARCH_B = '<tool_call>{"name": "search", "arguments": {"query": "B"}}'


@pytest.mark.parametrize(("samples", "winner"), [
    # two answers of 5 beat one of 7: the first '5' is picked
    ([("Answer: 7", False), ("Answer: 5", False), ("So.\nAnswer: 5.", False)], 1),
    # the same tool call (keys in another order, text before it) twice beats an answer
    ([("Answer: 3", False), (SEARCH_A, True), (SEARCH_A_SPACED, True)], 1),
    # different tool arguments are different actions: the answers win 2 to 1 to 1
    ([(SEARCH_A, True), (SEARCH_B, True), ("Answer: x", False), ("Answer: X.", False)], 2),
    # answers are compared after normalisation (case, trailing dot)
    ([("Answer: Paris", False), ("Answer: Rome", False), ("Answer: paris.", False)], 0),
    # a tie goes to the action seen first
    ([(SEARCH_B, True), ("Answer: 9", False)], 0),
    # one sample: itself
    ([("Answer: 1", False)], 0),
])
def test_pick_most_common_action(samples: list[tuple[str, bool]], winner: int) -> None:
    comps = [_c(t, tool) for t, tool in samples]
    assert pick(comps) is comps[winner]


def test_n_samples_step_in_the_loop_takes_the_majority_action() -> None:
    """A large arm with n=3 whose samples disagree: the loop follows the majority (a search call)."""
    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        if "<tool_response>" in prompt:
            return "Answer: done"
        return ["Answer: guess", _tool_call("search", query="A"), _tool_call("search", query="A")][i]

    be = ScriptedBackend(script)
    seen: list[str] = []
    ctl = BudgetController({"output_tokens": 500}, [ModelArm("s", be), ModelArm("l", be, n=3)], router="always_large",
                           max_steps=4, step_tokens=32)
    task = AgentTask.create("t", [{"role": "user", "content": "q"}], ctl,
                            [Tool("search", lambda query: seen.append(query) or f"facts of {query}")])
    run_agents([task])
    assert seen == ["A"] and task.trace[0]["n"] == 3 and task.trace[0]["tool"]["observation"] == "facts of A"
    assert task.text == "Answer: done" and ctl.summary()["expensive_calls"] == 2


# ---------------------------------------------------------------- the agent loop on kb_agent

def _kb_items() -> list[EvalItem]:
    return suites.get(KB_SPEC).items()


def _fact(observation: str, relation: str) -> str:
    first = observation.strip().splitlines()[0]
    m = re.search(re.escape(relation.replace("_", " ")) + r" = ([^;\n]+)", first)
    assert m, (observation, relation)
    return m.group(1).strip()


def kb_solver(items: Sequence[EvalItem]) -> Callable[[str, int, SamplingParams], str]:
    """A scripted 'model' that solves 2-hop kb_agent items by reading its own tool observations."""
    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        item = next(it for it in items if it.question in prompt)
        chain = item.metadata["chain"]
        obs = re.findall(r"<tool_response>(.*?)</tool_response>", prompt, re.DOTALL)
        if prompt.endswith(ANSWER_CUE.strip()):  # forced answer: best guess from the last observation
            return " " + (_fact(obs[-1], chain[len(obs) - 1]["relation"]) if obs else "unknown")
        if len(obs) < len(chain):
            entity = chain[0]["entity"] if not obs else _fact(obs[-1], chain[len(obs) - 1]["relation"])
            return "I will look it up. " + _tool_call("search", query=entity) + " (ignored after the stop string)"
        return "Answer: " + _fact(obs[-1], chain[-1]["relation"])
    return script


def test_scripted_agent_loop_on_kb_agent_runs_real_tools() -> None:
    suite = suites.get(KB_SPEC)
    items = suite.items()
    be = ScriptedBackend(kb_solver(items))
    tasks = []
    for it in items:
        ctl = BudgetController({"output_tokens": 400, "tool_calls": 4}, [ModelArm("small", be)], max_steps=6,
                               step_tokens=64)
        tasks.append(AgentTask.create(it.id, it.messages, ctl, it.tools))
    run_agents(tasks)
    assert be.requests == sum(t.controller.model_steps for t in tasks) == 3 * len(items)  # one request per step
    kb = suite.kb  # type: ignore[attr-defined]
    for it, t in zip(items, tasks, strict=True):
        ctl = t.controller
        assert t.done and suite.grade(it, t.text).correct, (it.question, it.gold, t.text, t.trace)
        tool_entries = [e for e in t.trace if "tool" in e]
        assert [e["tool"]["name"] for e in tool_entries] == ["search", "search"]
        first = it.metadata["chain"][0]["entity"]
        assert tool_entries[0]["tool"]["observation"] == kb.describe(first)  # the real KB answered
        assert kb.describe(first) in t.transcript  # the observation went back into the transcript
        assert ctl.meter.spent("tool_calls") == 2 and ctl.summary()["tool_calls"] == 2
        assert [s.kind for s in ctl.steps] == ["model", "tool", "model", "tool", "model"]
        assert ctl.model_steps == 3 and ctl.stop_reason is None and ctl.summary()["stop_reason"] == "done"
        assert sum(s.output_tokens for s in ctl.steps) == ctl.meter.spent("output_tokens") > 0
        assert t.trace[-1]["action"] == "step" and t.text.startswith("Answer:")


def test_unknown_and_failing_tools_are_observations_and_the_agent_goes_on() -> None:
    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        n = prompt.count("<tool_response>")
        return [_tool_call("nosuch", query="x"), _tool_call("flaky", query="x"), _tool_call("good", query="y"),
                "Answer: 3"][n]

    def flaky(query: str) -> str:
        raise ValueError("service down")

    be = ScriptedBackend(script)
    ctl = BudgetController({"output_tokens": 500, "tool_calls": 5}, [ModelArm("s", be)], max_steps=8, step_tokens=32)
    task = AgentTask.create("t", [{"role": "user", "content": "q"}], ctl,
                            [Tool("flaky", flaky), Tool("good", lambda query: "fine")])
    assert task.messages[0]["role"] == "system" and "flaky" in task.messages[0]["content"]  # tool list added
    run_agents([task])
    tools = [e["tool"] for e in task.trace if "tool" in e]
    assert [t["name"] for t in tools] == ["nosuch", "flaky", "good"]
    assert tools[0]["error"] == "unknown tool" and tools[0]["observation"].startswith("error: unknown tool 'nosuch'")
    assert tools[1]["observation"] == "error: ValueError: service down" and tools[1]["error"]
    assert tools[2]["observation"] == "fine" and tools[2]["error"] is None
    assert "<tool_response>error: unknown tool" in task.transcript
    assert task.text == "Answer: 3" and ctl.model_steps == 4
    assert ctl.meter.spent("tool_calls") == 2  # the unknown tool was not charged, the failing one was
    assert [s.error is not None for s in ctl.steps if s.kind == "tool"] == [True, True, False]


def test_step_without_action_gets_one_forced_answer() -> None:
    be = ScriptedBackend(lambda p, i, sp: " 12" if p.endswith("Answer:") else "I am not sure what to do.")
    ctl = BudgetController({"output_tokens": 500}, [ModelArm("s", be)], max_steps=8, step_tokens=32)
    task = AgentTask.create("t", [{"role": "user", "content": "q"}], ctl, [Tool("good", lambda query: "fine")])
    run_agents([task])
    assert [e["action"] for e in task.trace] == ["step", "answer"]
    assert task.trace[-1]["reason"] == "no action in the last step" and task.text == "Answer: 12"


@pytest.mark.parametrize(("budget", "kind"), [
    ({"output_tokens": 0}, "stop"),  # cannot afford a token: stop before any model call
    ({"output_tokens": 500, "tool_calls": 0}, "answer"),  # no tool calls: answer at once
    ({"output_tokens": 1}, "answer"),  # one token: a (one-token) forced answer
])
def test_zero_budgets_in_the_loop(budget: dict, kind: str) -> None:
    be = ScriptedBackend(lambda p, i, sp: " 5" if p.endswith("Answer:") else _tool_call("search", query="a"))
    ran: list[str] = []
    ctl = BudgetController(budget, [ModelArm("s", be)])
    task = AgentTask.create("t", [{"role": "user", "content": "q"}], ctl,
                            [Tool("search", lambda query: ran.append(query) or "x")])
    run_agents([task])
    assert [e["action"] for e in task.trace] == [kind] and ran == []
    assert not _over(ctl.meter, Budget(**budget)) and task.done
    assert ctl.stop_reason and ctl.stop_reason.startswith("budget exhausted")
    if kind == "stop":
        assert task.text == "" and be.calls == 0
    else:
        assert task.text.startswith("Answer:") and task.trace[-1]["reason"].startswith("budget")


RAMBLE = "Let me think about this some more, then search again. "


def _rambler(prompt: str, i: int, sp: SamplingParams) -> str:
    """Keeps calling tools and rambling; answers only when the loop forces it."""
    if prompt.endswith(ANSWER_CUE.strip()):
        return " 42 because of reasons and a long tail of words"
    k = prompt.count("<tool_response>")
    return RAMBLE * (1 + k % 3) + _tool_call("search", query="Refodrel") + " trailing"


@pytest.mark.parametrize("budget", [
    {"output_tokens": 1},  # one token
    {"output_tokens": 5},  # a handful: forced answer at once
    {"output_tokens": 60},  # a few steps then a forced answer
    {"output_tokens": 333},  # enough to reach the last step
    {"output_tokens": 200, "tool_calls": 2},  # tool calls run out first
    {"tool_calls": 1},  # only tool calls limited
    {"total_tokens": 50},  # smaller than the prompt: nothing runs
    {"total_tokens": 400},  # prompts eat the total budget
    {"total_tokens": 900, "output_tokens": 80},  # both
    {"input_tokens": 500},  # the growing transcript eats the input budget
    {"input_tokens": 2000, "output_tokens": 100, "tool_calls": 3},  # everything limited
    {"input_tokens": 150, "total_tokens": 170, "tool_calls": 9},  # tiny input and total
])
@pytest.mark.parametrize("large_n", [1, 3])
def test_budget_never_exceeded_in_any_unit(budget: dict, large_n: int) -> None:
    items = _kb_items()[:3]
    be = ScriptedBackend(_rambler)
    tasks = []
    for it in items:
        ctl = BudgetController(budget, [ModelArm("small", be), ModelArm("large", be, n=large_n)], router="random",
                               threshold=0.5, max_steps=6, step_tokens=24, answer_tokens=8, min_step_tokens=4)
        tasks.append(AgentTask.create(it.id, it.messages, ctl, it.tools))
    run_agents(tasks)
    b = Budget(**budget)
    token_limited = {"input_tokens", "total_tokens"} & set(budget)
    for t in tasks:
        ctl = t.controller
        assert t.done and not _over(ctl.meter, b), (_over(ctl.meter, b), t.trace)
        assert ctl.meter.reserved("output_tokens") == 0 and ctl.meter.reserved("input_tokens") == 0
        assert ctl.model_steps <= 6
        assert sum(s.output_tokens for s in ctl.steps) == ctl.meter.spent("output_tokens")
        assert sum(s.tool_calls for s in ctl.steps) == ctl.meter.spent("tool_calls")
        last = t.trace[-1]
        answers = [e for e in t.trace if e["action"] == "answer"]
        assert len(answers) <= 1 and (not answers or answers[0] is last)  # an answer ends the task
        answers = [e for e in answers if "skipped" not in e]  # answers that ran
        if last["action"] == "stop" or "skipped" in last:
            # refused before an answer ran: only token budgets the plan cannot see (prompt sizes) get here
            assert token_limited, t.trace
            assert ctl.stop_reason and ctl.stop_reason.startswith("budget exhausted")
        else:
            assert last["action"] == "answer" and t.text.startswith("Answer:") and last["reason"], t.trace
            assert last["reason"] in ("last step", "no action in the last step") or last["reason"].startswith("budget")
        if not t.text:
            assert not answers  # empty text only when stopped before any answer
        if not token_limited:  # output/tool-call budgets: the plan always forces the final answer
            assert last["action"] == "answer" and "skipped" not in last, t.trace


def test_skipped_step_stop_reason_names_the_unit() -> None:
    """Regression (budgetlm/agents/loop.py run_agents): a step refused by the meter ended the task with the
    whole BudgetExceeded message as its stop reason (``"budget exhausted in `total_tokens` (remaining
    65): the prompt has 166 tokens; raise the limit ..."``) instead of the documented
    ``"budget exhausted: <unit>"`` (strategies.base: ``stop_reason`` is ``"done"`` or
    ``"budget exhausted: <unit>"``; the meter already holds that string in ``stop_reason``)."""
    items = _kb_items()[:1]
    be = ScriptedBackend(_rambler)
    ctl = BudgetController({"total_tokens": 400}, [ModelArm("small", be)], max_steps=6, step_tokens=24,
                           answer_tokens=8, min_step_tokens=4)
    task = AgentTask.create(items[0].id, items[0].messages, ctl, items[0].tools)
    run_agents([task])
    # the growing prompt no longer fits the total budget: the plan (which counts the prompt) forces the
    # answer, or the meter skips the step; either way the reason names the unit
    assert task.trace[-1].get("skipped") or task.trace[-1]["action"] == "answer"
    assert ctl.stop_reason == "budget exhausted: total_tokens"


def test_stop_plan_in_loop_keeps_best_effort_text() -> None:
    """When the meter runs dry after a few steps the task ends with the best answer in its transcript."""
    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        return "The value is 17 so far and I keep going on and on and on"

    be = ScriptedBackend(script)
    ctl = BudgetController({"output_tokens": 30}, [ModelArm("s", be)], policy="fixed", step_tokens=10,
                           answer_tokens=1, min_step_tokens=1, max_steps=20)
    task = AgentTask.create("t", [{"role": "user", "content": "q"}], ctl, [Tool("good", lambda query: "fine")])
    run_agents([task])
    assert ctl.meter.spent("output_tokens") <= 30 and task.done
    assert task.trace[-1]["action"] in ("answer", "stop")
    if task.trace[-1]["action"] == "stop":
        assert task.text == "Answer: 17"


def test_plan_is_a_stepplan_and_request_uses_it() -> None:
    ctl = _ctl({"output_tokens": 100}, policy="fixed", step_tokens=20, answer_tokens=4)
    plan = ctl.plan()
    assert isinstance(plan, StepPlan)
    req = ctl.request(plan, [{"role": "user", "content": "q"}], prefix="abc", stop=["</x>"])
    assert req.sampling.max_tokens == 20 and req.sampling.stop == ["</x>"] and req.meter is ctl.meter
    assert req.assistant_prefix == "abc" and req.may_think
    ans = StepPlan("answer", 0, 0, "small", 4)
    assert not ctl.request(ans, [{"role": "user", "content": "q"}]).may_think


# ---------------------------------------------------------------- real model: OpenAI server and vLLM

@pytest.mark.slow
def test_wrap_real_openai_client_never_overspends(vllm_server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=vllm_server, api_key="x", timeout=120)
    ctl = BudgetController(Budget(output_tokens=60), [ModelArm("smollm2")], step_tokens=16, answer_tokens=8,
                           min_step_tokens=4, max_steps=4)
    wrapped = ctl.wrap_openai(client)
    reported, sent = [], []
    with pytest.raises(BudgetExceeded):
        for _ in range(60):
            resp = wrapped.chat.completions.create(
                model="smollm2", temperature=0.0, max_tokens=50,
                messages=[{"role": "user", "content": "Count from one to one hundred in words."}])
            reported.append(resp.usage.completion_tokens)
            sent.append(ctl.steps[-1].output_tokens)
    assert ctl.meter.spent("output_tokens") == sum(reported) <= 60
    assert sum(reported) >= 50  # it really ran until the budget was (nearly) spent
    assert sent == reported and ctl.model_steps == len(reported) >= 4
    assert ctl.meter.spent("input_tokens") > 0 and ctl.meter.reserved("output_tokens") == 0


TOOL_PROMPT = (
    'You answer questions by looking facts up. To look up a name, write <tool_call>{"name": "search", "arguments": '
    '{"query": "NAME"}}</tool_call> and read the <tool_response>.\n\nExample:\nQuestion: In which city was the CEO of '
    'Zanto Corp born?\n<tool_call>{"name": "search", "arguments": {"query": "Zanto Corp"}}</tool_call>\n'
    "<tool_response>Zanto Corp (company): ceo = Mira Oda; headquartered in = Pelu; founded = 1990</tool_response>\n"
    '<tool_call>{"name": "search", "arguments": {"query": "Mira Oda"}}</tool_call>\n'
    "<tool_response>Mira Oda (person): born in = Kesti; works for = Zanto Corp; age = 40</tool_response>\n"
    "Answer: Kesti\n\nQuestion: {question}"
)


@pytest.mark.slow
def test_real_vllm_agent_calls_tools_within_budget(vllm_backend: Any) -> None:
    from budgetlm.strategies import get as get_strategy
    from budgetlm.strategies.base import Problem

    suite = suites.get("kb_agent?size=8&seed=3&difficulty=1", prompt=TOOL_PROMPT)
    items = suite.items()
    assert '{"name": "search"' in items[0].messages[0]["content"]  # JSON braces survive the template
    problems = [Problem(id=it.id, messages=it.messages, tools=list(it.tools)) for it in items]
    greedy = get_strategy("agent", router="random", threshold=0.5, max_steps=6, step_tokens=64,
                          models=[{"label": "small", "n": 1, "temperature": 0.0}, {"label": "large", "n": 1, "temperature": 0.0}])
    sampled = get_strategy("agent", router="random", threshold=0.5, max_steps=6, step_tokens=64)
    # Whether the 135M model writes a tool call is chance when steps are sampled (the default arms: 2 of 6 runs
    # of the 8 tasks called a tool here, so three sampled runs in a row can all miss). Greedy steps called tools
    # on every run here; the sampled default arms follow, up to three runs, in case other numerics change the
    # greedy path. The budget invariants below are checked on every run, and one run must call a tool.
    kb = suite.kb  # type: ignore[attr-defined]
    runs = []
    for agent in (greedy, sampled, sampled, sampled):
        results = agent.solve(problems, backend=vllm_backend, budget={"output_tokens": 400, "tool_calls": 3})
        runs.append(results)
        calls = [e["tool"] for r in results for e in r.trace if "tool" in e]
        searches = [c for c in calls if c["name"] == "search" and c["error"] is None and not c["skipped"]]
        if sum(r.usage.tool_calls for r in results) > 0 and searches:
            break
    assert sum(r.usage.tool_calls for r in results) > 0 and searches, [r.trace for r in results]
    for c in searches:  # the observation is what the real KB returned for the model's own query
        assert c["observation"] == kb.search(**c["arguments"]), c
    for r in (r for rs in runs for r in rs):
        assert r.usage.output_tokens <= 400 and r.usage.tool_calls <= 3, r
        assert r.stop_reason == "done" or "budget exhausted" in r.stop_reason or "step" in r.stop_reason, r.stop_reason
        assert r.details["tool_calls"] == r.usage.tool_calls
        assert sum(s["output_tokens"] for s in r.details["steps"] if s["kind"] == "model") == r.usage.output_tokens
    tight = greedy.solve(problems[:3], backend=vllm_backend, budget={"output_tokens": 60, "tool_calls": 3})
    for r in tight:
        assert r.usage.output_tokens <= 60
        assert r.trace[-1]["action"] == "answer" and r.trace[-1]["reason"], r.trace
        assert r.text.startswith("Answer:")


def test_agent_tasks_advance_independently_and_a_cancelled_task_is_charged_what_it_generated() -> None:
    """A task of three short steps finishes while a neighbour's one long step still runs (no lockstep rounds);
    cancelling the long task aborts its step and its meter keeps exactly the tokens generated."""
    from budgetlm.agents import arun_agent

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        if "slow question" in prompt:
            return "thinking " * 200 + "Answer: 1"
        if prompt.count("<tool_response>") < 2:
            return 'Look. <tool_call>{"name": "echo", "arguments": {"x": "a"}}</tool_call>'
        return "Answer: 2"

    echo = Tool("echo", lambda x: x, "Echo x.")
    be = ScriptedBackend(script, token_time=0.002)

    def task(q: str) -> AgentTask:
        ctl = BudgetController({"output_tokens": 2000, "tool_calls": 4}, [ModelArm("small", be)], max_steps=6,
                               step_tokens=400)
        return AgentTask.create(q, [{"role": "user", "content": q}], ctl, [echo])

    async def main() -> tuple[AgentTask, AgentTask, list[str]]:
        slow, fast = task("slow question"), task("fast question")
        order: list[str] = []

        async def run(t: AgentTask) -> None:
            await arun_agent(t)
            order.append(t.id)

        ts, tf = asyncio.create_task(run(slow)), asyncio.create_task(run(fast))
        await tf
        assert not slow.done  # the slow task's single step is still generating
        ts.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ts
        return slow, fast, order

    slow, fast, order = asyncio.run(main())
    assert order == ["fast question"] and fast.text == "Answer: 2" and fast.controller.model_steps == 3
    spent = slow.controller.meter.spent("output_tokens")
    assert 0 < spent < 201  # charged what was generated before the cancel, not the reservation of 400
    assert slow.controller.meter.total().output_tokens == spent
