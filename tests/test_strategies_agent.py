"""The ``agent`` strategy: kb_agent through the evaluation runner (scripted and real vLLM), per-step records, params."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import ConfigError
from budgetlm.evals import suites
from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import read_records
from budgetlm.evals.runner import TRACES_FILE, Runner, run_eval
from budgetlm.evals.suites.base import EvalItem
from budgetlm.strategies import get as get_strategy
from budgetlm.strategies.base import Problem

SUITE = "kb_agent?size=4&seed=1&difficulty=1"
STEP_FIELDS = {"step", "kind", "model", "action", "prompt_tokens", "output_tokens", "thinking_tokens", "tool_calls",
               "latency_s", "error"}


def _fact(observation: str, relation: str) -> str:
    m = re.search(re.escape(relation.replace("_", " ")) + r" = ([^;\n]+)", observation.strip().splitlines()[0])
    assert m, (observation, relation)
    return m.group(1).strip()


def _call(name: str, **arguments: str) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def tool_count(item: EvalItem) -> int:
    """Tool calls :func:`kb_solver` makes on a (one-branch) item: one search per hop, one calculator call."""
    return len(item.metadata["chain"]) + (1 if item.metadata["calculation"] else 0)


def kb_solver(items: Sequence[EvalItem]) -> Callable[[str, int, SamplingParams], str]:
    """A scripted 'model' for one-chain kb_agent items that reads its own tool observations.

    It searches the chain's first entity, then the value it read from each observation, runs the
    item's calculation (if any) on the value it read with the calculator, and answers what it read.
    """
    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        item = next(it for it in items if it.question in prompt)
        chain, calc = item.metadata["chain"], item.metadata["calculation"]
        obs = re.findall(r"<tool_response>(.*?)</tool_response>", prompt, re.DOTALL)
        k = len(obs)
        read = (lambda: _fact(obs[-1], chain[k - 1]["relation"])) if 0 < k <= len(chain) else (lambda: obs[-1])
        if prompt.endswith("Answer:"):
            return " " + (read() if obs else "unknown")
        if k < len(chain):
            return _call("search", query=chain[0]["entity"] if k == 0 else read())
        if calc and k == len(chain):
            return _call("calculator", expression=calc.format(read()))
        return "Answer: " + read()
    return script


def _config(strategies: list[dict[str, Any]], budgets: list[dict[str, float]], **kw: Any) -> EvalConfig:
    base: dict[str, Any] = dict(name="agent", suites=[SUITE], models=["scripted"], strategies=strategies,
                                budgets=budgets, batch_size=4)
    base.update(kw)
    return EvalConfig(**base)


def _traces(run: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out = {}
    for line in (run / TRACES_FILE).read_text().splitlines():
        rec = json.loads(line)
        out[(rec["item_id"], rec["strategy"])] = rec["trace"]
    return out


@pytest.mark.parametrize(("router", "n_large", "expensive"), [
    ("always_small", 5, False),  # every step on the greedy arm
    ("always_large", 5, True),  # every step votes over 5 samples (the scripted samples agree)
    ("always_large", 3, True),  # a smaller vote
])
def test_agent_through_runner_with_scripted_model(tmp_path: Path, router: str, n_large: int, expensive: bool) -> None:
    items = suites.get(SUITE).items()
    backend = ScriptedBackend(kb_solver(items))
    models = [{"label": "small", "n": 1}, {"label": "large", "n": n_large, "temperature": 0.7}]
    budget = {"output_tokens": 2000, "tool_calls": 4}  # room for 5 x 128-token votes
    cfg = _config([{"name": "agent", "params": {"router": router, "models": models, "max_steps": 6}}], [budget])
    out = Runner(cfg, tmp_path / "run", backends={"scripted": backend}, progress=False, report=False).run()
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert out.written == len(recs) == 4 and not out.errors
    traces = _traces(tmp_path / "run")
    for r in recs:
        assert r.correct and r.answer == r.gold and not r.error, (r.question, r.gold, r.text)
        assert not r.over_budget and r.output_tokens <= 2000 and r.stop_reason == "done"
        steps = r.details["steps"]
        assert all(STEP_FIELDS <= set(s) for s in steps)
        item = next(it for it in items if it.id == r.item_id)
        k = tool_count(item)
        assert [s["kind"] for s in steps] == ["model", "tool"] * k + ["model"]
        model_steps = [s for s in steps if s["kind"] == "model"]
        assert {s["model"] for s in model_steps} == ({"large"} if expensive else {"small"})
        assert [s["model"] for s in steps if s["kind"] == "tool"] == ["search"] * len(item.metadata["chain"]) + (
            ["calculator"] if item.metadata["calculation"] else [])
        assert sum(s["tool_calls"] for s in steps) == r.details["tool_calls"] == k
        assert sum(s["output_tokens"] for s in model_steps) == r.output_tokens
        assert r.details["model_steps"] == k + 1 == r.model_calls
        assert r.details["expensive_calls"] == (k + 1 if expensive else 0)
        trace = traces[(r.item_id, "agent")]
        assert [e["n"] for e in trace] == [n_large if expensive else 1] * (k + 1)
        searched = trace[0]["tool"]["arguments"]["query"]
        assert trace[0]["tool"]["observation"].startswith(searched + " (")  # a KB fact line for the searched name


@pytest.mark.parametrize(("budget", "stop", "why"), [
    # one search, then the forced answer
    ({"output_tokens": 400, "tool_calls": 1}, "budget exhausted: tool_calls", "budget exhausted: tool_calls"),
    # answer at once: (30 - 24) / 7 < 16 tokens for a step
    ({"output_tokens": 30}, "budget exhausted: output_tokens", "budget nearly spent"),
])
def test_agent_runner_tight_budgets_force_answers(tmp_path: Path, budget: dict, stop: str, why: str) -> None:
    items = suites.get(SUITE).items()
    cfg = _config([{"name": "agent", "params": {"max_steps": 6}}], [budget])
    Runner(cfg, tmp_path / "run", backends={"scripted": ScriptedBackend(kb_solver(items))}, progress=False,
           report=False).run()
    recs = read_records(tmp_path / "run" / "records.jsonl")
    traces = _traces(tmp_path / "run")
    assert len(recs) == 4
    for r in recs:
        assert not r.over_budget and not r.error and r.stop_reason == stop
        assert r.output_tokens <= budget["output_tokens"]
        assert r.details["tool_calls"] <= budget.get("tool_calls", 99)
        trace = traces[(r.item_id, "agent")]
        assert trace[-1]["action"] == "answer" and trace[-1]["reason"] == why and r.text.startswith("Answer:")


def test_agent_arm_on_its_own_backend(tmp_path: Path) -> None:
    """A model block with ``model`` runs that arm on its own backend (here a second scripted backend)."""
    items = suites.get(SUITE).items()
    small = ScriptedBackend(kb_solver(items))
    models = [{"label": "small"}, {"label": "big", "model": "scripted", "n": 1}]  # 'scripted' answers "Answer: 42"
    cfg = _config([{"name": "agent", "params": {"router": "always_large", "models": models}}],
                  [{"output_tokens": 400, "tool_calls": 4}])
    Runner(cfg, tmp_path / "run", backends={"scripted": small}, progress=False, report=False).run()
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert small.calls == 0  # every step went to the other backend
    for r in recs:
        assert r.text == "Answer: 42" and r.details["expensive_calls"] == 1 and not r.over_budget
        assert [s["model"] for s in r.details["steps"]] == ["big"]


def test_agent_loads_each_model_block_backend_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (budgetlm/strategies/agent.py ``Agent._arms``): ``self._backends.setdefault(spec, load_backend(spec))``
    evaluates ``load_backend`` on every ``run`` (every eval batch) before ``setdefault`` looks at the cache, so a
    model block with ``model: vllm:...`` builds (and leaks, never closed) a new engine per batch."""
    import budgetlm.strategies.agent as agent_mod

    loaded: list[str] = []
    real = agent_mod.load_backend

    def counting(spec: Any, **kw: Any) -> Any:
        loaded.append(spec)
        return real(spec, **kw)

    monkeypatch.setattr(agent_mod, "load_backend", counting)
    agent = get_strategy("agent", models=[{"label": "s"}, {"label": "b", "model": "scripted"}], router="always_large")
    default = ScriptedBackend(["Answer: 1"])
    for _ in range(3):
        res = agent.solve([Problem.from_text("q?", id="a")], backend=default, budget={"output_tokens": 1000})
        assert res[0].text == "Answer: 42"
    assert loaded == ["scripted"], loaded


def test_agent_solve_details_and_usage() -> None:
    items = suites.get(SUITE).items()
    agent = get_strategy("agent", models=[{"label": "only"}], max_steps=5, step_tokens=32)
    problems = [Problem(id=it.id, messages=it.messages, tools=list(it.tools)) for it in items]
    results = agent.solve(problems, backend=ScriptedBackend(kb_solver(items)), budget={"tool_calls": 4})
    for it, r in zip(items, results, strict=True):
        k = tool_count(it)
        assert r.answer == str(it.gold) and r.usage.tool_calls == k and r.stop_reason == "done"
        assert r.ledger["units"]["tool_calls"]["spent"] == k and r.ledger["units"]["tool_calls"]["limit"] == 4
        assert r.details["expensive_calls"] == 0 and r.finish_reason == "stop" and not r.truncated


@pytest.mark.parametrize(("params", "match"), [
    ({"models": []}, "models"),  # no model
    ({"models": [{"bogus": 1}]}, r"models\[0\]"),  # unknown key in a model block
    ({"models": [{"label": "a"}, "b"]}, r"models\[1\]"),  # a block that is not a dict
    ({"models": [{"label": "a", "n": 0}]}, r"`models\[0\]\.n` must be >= 1"),  # no samples
    ({"threshold": [0.1, 0.2]}, "thresholds"),  # two thresholds for the two default arms
    ({"threshold": 0.5, "models": [{"label": "a"}, {"label": "b"}, {"label": "c"}]}, "thresholds"),  # 3 arms, 1 cut
    ({"router": "nosuch"}, "nosuch"),  # unknown router
    ({"bogus_param": 1}, "bogus_param"),  # unknown strategy parameter
])
def test_bad_agent_params(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_strategy("agent", **params)


def test_bad_agent_params_through_run_eval(tmp_path: Path) -> None:
    cfg = _config([{"name": "agent", "params": {"models": [{"bogus": 1}]}}], [{"output_tokens": 50}])
    with pytest.raises(ConfigError, match=r"models\[0\]"):
        run_eval(cfg, tmp_path / "run", progress=False, report=False)


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
def test_agent_through_runner_on_real_vllm(tmp_path: Path, vllm_backend: Any) -> None:
    # greedy steps only (the small arm): deterministic; item 2 of seed 3 makes the model call `search`
    suite = {"kind": "kb_agent", "size": 3, "seed": 3, "difficulty": 1, "prompt": TOOL_PROMPT}
    budget = {"output_tokens": 200, "tool_calls": 3}
    cfg = EvalConfig(name="agent-real", suites=[suite], models=["default"], batch_size=3, budgets=[budget],
                     strategies=[{"name": "agent", "params": {"router": "always_small", "max_steps": 5,
                                                             "step_tokens": 48}}])
    Runner(cfg, tmp_path / "run", backends={"default": vllm_backend}, progress=False, report=False).run()
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert len(recs) == 3
    for r in recs:
        assert not r.over_budget and not r.error and r.output_tokens <= 200
        steps = r.details["steps"]
        assert steps and all(STEP_FIELDS <= set(s) for s in steps)
        model_steps = [s for s in steps if s["kind"] == "model"]
        assert model_steps and sum(s["output_tokens"] for s in model_steps) == r.output_tokens
        assert {s["model"] for s in model_steps} == {"small"} and r.details["expensive_calls"] == 0
        assert sum(s["tool_calls"] for s in steps) == r.details["tool_calls"] <= 3
        assert r.details["model_steps"] == len(model_steps) <= 5
    assert sum(r.details["tool_calls"] for r in recs) > 0  # the model really called the KB


def test_agent_on_a_reasoning_gym_task_through_the_runner(tmp_path: Path) -> None:
    """The reasoning-gym adapter: a chain_sum item becomes a tool task (calculator, then the answer)."""
    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        if "<tool_response>" in prompt:  # the calculator answered: report its result
            return "Answer: " + prompt.rsplit("<tool_response>", 1)[1].split("</tool_response>", 1)[0]
        expr = re.findall(r"(-?\d+(?:\s*[-+]\s*\d+)+)\s*=", prompt)[-1]
        return _call("calculator", expression=expr)

    spec = "reasoning_gym_agent:chain_sum?size=4&seed=1"
    cfg = _config([{"name": "agent", "params": {"max_steps": 4}}], [{"output_tokens": 400, "tool_calls": 2}],
                  suites=[spec])
    out = Runner(cfg, tmp_path / "run", backends={"scripted": ScriptedBackend(script)}, progress=False,
                 report=False).run()
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert out.written == 4 and not out.errors
    for r in recs:
        assert r.correct and not r.over_budget, (r.question, r.gold, r.text)  # graded by reasoning-gym's scorer
        assert [s["kind"] for s in r.details["steps"]] == ["model", "tool", "model"]
        assert r.details["tool_calls"] == 1
