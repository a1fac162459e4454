"""Tree searches as per-problem async programs: independence, budgets, cancellation, typed parameters.

Helpers come from ``test_strategies_tree``."""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

import pytest
from test_strategies_tree import (
    TREES,
    FnScorer,
    RatingBackend,
    assistant,
    check_tree_shape,
    default_ratings,
    make_script,
    nodes,
    problems,
    question,
    tree,
)

from budgetlm import ConfigError, Meter, UnknownNameError
from budgetlm.backends.base import PreparedRequest, RawResult, SamplingParams
from budgetlm.backends.scripted import VirtualClock
from budgetlm.backends.streaming import Sink
from budgetlm.strategies import STRATEGIES, get
from budgetlm.strategies.bavt import BAVT
from budgetlm.strategies.beam import BeamSearch
from budgetlm.strategies.rebase import Rebase
from budgetlm.strategies.values import ResidualSelfEval, get_scorer


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(("name", "kw", "error", "match"), [
    # scorers
    ("bavt", {"scorer": "magic"}, UnknownNameError, "unknown value scorer 'magic'; available: logprob, prm, residual"),
    ("beam", {"scorer": "magic"}, UnknownNameError, "available: logprob, prm, residual"),
    ("rebase", {"scorer": "magic"}, UnknownNameError, "available: logprob, prm, residual"),
    ("bavt", {"scorer_params": {"foo": 1}}, ConfigError,
     "unknown parameter\\(s\\) 'foo' for value scorer 'residual'; valid: top_logprobs, prompt"),
    ("bavt", {"scorer_params": {"top_logprobs": 3}}, ConfigError, "`top_logprobs` must be >= 5"),
    ("bavt", {"scorer_params": {"prompt": "rate {step}"}}, ConfigError, "`prompt` must contain {question}"),
    ("beam", {"scorer": "prm", "scorer_params": {"path": ""}}, ConfigError, "`path` must be a local directory"),
    # widths
    ("bavt", {"width": 0}, ConfigError, "`width` must be >= 1"),
    ("rebase", {"width": 0}, ConfigError, "`width` must be >= 1"),
    ("beam", {"beams": 0}, ConfigError, "`beams` must be >= 1"),
    ("bavt", {"select": 0}, ConfigError, "`select` must be >= 1"),
    # BAVT's budget parameters
    ("bavt", {"commit": 1.5}, ConfigError, "`commit` must be in \\[0, 1\\]"),
    ("bavt", {"commit": -0.1}, ConfigError, "`commit` must be in \\[0, 1\\]"),
    ("bavt", {"rho_min": 0}, ConfigError, "`rho_min` must be in \\(0, 1\\]"),
    ("bavt", {"rho_min": 1.5}, ConfigError, "`rho_min` must be in \\(0, 1\\]"),
    ("bavt", {"root_value": 0}, ConfigError, "`root_value` must be in \\(0, 1\\]"),
    ("bavt", {"max_rounds": 0}, ConfigError, "`max_rounds` must be >= 1"),
    ("rebase", {"reward_temperature": 0}, ConfigError, "`reward_temperature` must be > 0"),
    # shared
    ("bavt", {"final": "foo"}, ConfigError, "`final` must be 'vote' or 'best', got 'foo'"),
    ("beam", {"final": "foo"}, ConfigError, "`final` must be 'vote' or 'best', got 'foo'"),
    ("rebase", {"final": "foo"}, ConfigError, "`final` must be 'vote' or 'best', got 'foo'"),
    ("bavt", {"delimiter": ""}, ConfigError, "`delimiter` must be a non-empty string"),
    ("beam", {"delimiter": ""}, ConfigError, "`delimiter` must be a non-empty string"),
    ("rebase", {"delimiter": ""}, ConfigError, "`delimiter` must be a non-empty string"),
    ("bavt", {"step_tokens": 0}, ConfigError, "`step_tokens` must be >= 1"),
    ("rebase", {"step_tokens": 0}, ConfigError, "`step_tokens` must be >= 1"),
    ("bavt", {"max_depth": 0}, ConfigError, "`max_depth` must be >= 1"),
    ("bavt", {"answer_tokens": 0}, ConfigError, "`answer_tokens` must be >= 1"),
    ("beam", {"answer_tokens": 0}, ConfigError, "`answer_tokens` must be >= 1"),
    # unknown parameters list the valid ones
    ("bavt", {"foo": 1}, ConfigError, "unknown parameter\\(s\\) 'foo' for strategy 'bavt'; valid: width, select"),
    ("beam", {"width": 3}, ConfigError, "unknown parameter\\(s\\) 'width' for strategy 'beam'; valid: beams, expand"),
    ("rebase", {"beams": 3}, ConfigError, "unknown parameter\\(s\\) 'beams' for strategy 'rebase'"),
    # names the strategy does not have
    ("beam", {"expand": 0}, ConfigError, "`expand`"),  # beam's own parameter names, not the shared helper's
    ("beam", {"max_depth": 0}, ConfigError, "`max_depth`"),
    ("rebase", {"max_depth": 0}, ConfigError, "`max_depth`"),
    ("bavt", {"scorer": "prm"}, ConfigError, "`path`"),  # a required scorer parameter is missing
])
def test_bad_parameters(name: str, kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        get(name, **kw)


def test_get_scorer_lists_names_and_passes_instances_through() -> None:
    with pytest.raises(UnknownNameError) as e:
        get_scorer("magic")
    assert set(e.value.available) >= {"residual", "logprob", "prm"}
    s = FnScorer(lambda x: 0.0)
    assert get_scorer(s) is s
    assert isinstance(get_scorer("residual", top_logprobs=5), ResidualSelfEval)


def test_tree_strategies_are_registered() -> None:
    assert {"bavt", "beam", "rebase"} <= set(STRATEGIES.names())
    assert isinstance(get("bavt"), BAVT) and isinstance(get("beam"), BeamSearch) and isinstance(get("rebase"), Rebase)
    assert get("bavt", width=2).params()["width"] == 2


# ------------------------------------------------------------------ per-problem async programs
@pytest.mark.parametrize("name", TREES)
def test_tree_searches_are_per_problem_programs(name: str) -> None:
    from budgetlm.strategies.base import Strategy

    s = get(name)
    assert type(s).solve_one is not Strategy.solve_one
    assert type(s).run is Strategy.run  # no batched ``run`` of their own: the base runs one program per problem


def other_script(p: str, i: int, sp: SamplingParams) -> str:
    """``q`` as in :func:`make_script` (answers at depth 2); ``slowpoke`` writes long steps and never answers."""
    if p.endswith("Final answer:"):
        return " 7"
    if question(p) == "slowpoke":
        return "z " * 20 + "\n\n"
    return make_script(answer_at=2)(p, i, sp)


@pytest.mark.parametrize("name", TREES)
def test_a_problems_search_does_not_depend_on_its_batch(name: str) -> None:
    """The same problem grows the same tree (steps, values, prune decisions, answer) alone and beside
    another problem: nothing of one problem's program depends on another's rounds."""
    kw = {"bavt": {"scorer": "residual", "max_rounds": 6}, "beam": {"scorer": "residual"},
          "rebase": {"scorer": "residual", "width": 4}}[name]
    shapes = []
    for qs in (("q",), ("slowpoke", "q"), ("q", "slowpoke")):
        be = RatingBackend(other_script, default_ratings, token_time=1.0, clock=VirtualClock())
        res = get(name, seed=4, **kw).solve(problems(*qs), backend=be, budget={"output_tokens": 300})
        [r] = [r for r in res if r.problem_id == "q"]
        shapes.append(([(n["step"], n["parent"], n["value"], n["pruned"], n["terminal"]) for n in nodes(r)],
                       r.answer, r.stop_reason, r.usage.output_tokens))
    assert shapes[0] == shapes[1] == shapes[2]
    assert shapes[0][1] == "7"


# ------------------------------------------------------------------ budgets: a parameter table
PRICED = {"output_tokens": 120, "usd": 0.05}
"""A dollar budget that binds (prices below: $0.0001 per prompt token, $0.0004 per output token)."""


@pytest.mark.parametrize("name", TREES)
@pytest.mark.parametrize(("budget", "batch"), [
    ({"output_tokens": 3}, None),  # less than the forced answer's hold
    ({"output_tokens": 30}, {"output_tokens": 40}),  # the batch budget binds before the problems' own
    ({"output_tokens": 200}, {"output_tokens": 250}),
    ({"total_tokens": 90}, None),  # prompts count: the hold's worst-case prompt is large
    ({"output_tokens": 150, "input_tokens": 200}, {"input_tokens": 300}),
    ({"output_tokens": 80, "tool_calls": 0}, None),
    (PRICED, {"usd": 0.06}),
    ({"output_tokens": 500, "flops": 2e9}, None),  # FLOPs of the scripted 1M-parameter model
])
def test_budget_table_is_never_exceeded(name: str, budget: dict[str, float], batch: dict[str, float] | None) -> None:
    from budgetlm.costs import Price, PriceTable

    prices = PriceTable(prices={}, default=Price(input=100.0, output=400.0))
    be = RatingBackend(make_script(answer_at=3, bad_first=True), default_ratings, prices=prices)
    strat = get(name, seed=0, scorer="residual", step_tokens=8, answer_tokens=4)
    res = strat.solve(problems("q1", "q2", "q3"), backend=be, budget=budget, batch_budget=batch)
    for r in res:
        for unit, limit in budget.items():
            assert r.ledger["units"][unit]["spent"] <= limit * (1 + 1e-9), (r.problem_id, unit, r.ledger["units"][unit])
        if budget != {"output_tokens": 3}:  # the forced answer's hold (FLOPs and dollars too) keeps an answer
            assert r.answer == "7", (r.problem_id, tree(r)["forced"])
        assert r.stop_reason in ("done", "max rounds", "max depth") or r.stop_reason.startswith("budget exhausted")
        assert tree(r)["output_tokens"] == r.usage.output_tokens == r.ledger["units"]["output_tokens"]["spent"]
        check_tree_shape(r)
    for unit, limit in (batch or {}).items():
        assert sum(r.ledger["units"][unit]["spent"] for r in res) <= limit * (1 + 1e-9), unit
    assert any(r.usage.output_tokens > 0 for r in res) or budget.get("output_tokens", 1) < 4


# ------------------------------------------------------------------ cancellation settles spend
class Counting(RatingBackend):
    """Counts every output token it emits, so charged spend can be compared with generated tokens."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.emitted = 0

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        push = sink.push

        def counted(index: int, token_ids: list[int], text: str, **kw: Any) -> None:
            self.emitted += len(token_ids)
            push(index, token_ids, text, **kw)

        sink.push = counted  # type: ignore[method-assign]
        return await super()._agenerate_request(p, sink)


UNITS_HELD = ("output_tokens", "input_tokens", "thinking_tokens", "total_tokens")


@pytest.mark.parametrize("name", TREES)
@pytest.mark.parametrize("ticks", [0, 1, 3, 8, 20, 45, 90])
def test_cancellation_at_any_moment_settles_spend(name: str, ticks: int) -> None:
    """Cancelled after ``ticks`` event-loop turns (expansions or rating calls in flight): every request is
    aborted and charged exactly the tokens it generated, and no reservation (the forced answer's hold
    included) is left behind."""
    clock = VirtualClock()
    be = Counting(lambda p, i, sp: "w " * 6 + "\n\n", default_ratings, token_time=1.0, clock=clock)
    root = Meter({"output_tokens": 400}, clock=clock)
    meters = [root.child({"output_tokens": 250}, name=q) for q in ("q1", "q2")]
    strat = get(name, scorer="residual", seed=0, max_depth=5)

    async def main() -> bool:
        task = asyncio.ensure_future(strat.arun(problems("q1", "q2"), meters, be))
        for _ in range(ticks):
            await asyncio.sleep(0)
        if task.done():
            return False
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return True

    cancelled = asyncio.run(main())
    assert cancelled or ticks == 90
    assert root.spent("output_tokens") == be.emitted == sum(m.spent("output_tokens") for m in meters)
    for m in (root, *meters):
        assert all(m.reserved(u) == 0 for u in UNITS_HELD), m.summary()
        assert m.spent("output_tokens") <= (m.budget.output_tokens or math.inf)
    if cancelled:
        assert not any(i.endswith("force") for i in be.ids if i)  # a cancelled search forces no answer


@pytest.mark.parametrize("name", TREES)
def test_a_failing_request_cancels_and_settles_its_siblings(name: str) -> None:
    """When one request of a round fails, its siblings in flight are aborted and charged before the error
    leaves the problem's program (nothing keeps generating behind the result)."""
    from budgetlm.errors import BackendError

    def script(p: str, i: int, sp: SamplingParams) -> str:
        if p.endswith("Rating: "):
            return "4"
        return f"step {i}\n\n" if assistant(p) == "" else "w " * 30 + "\n\n"

    # round 0 expands the root; round 1's requests run concurrently and the one below node 2 fails
    value = FnScorer(lambda s: 0.9 if s.startswith(("step 0", "step 1")) else 0.1, "value")
    kw = {"bavt": {"select": 2, "width": 2, "root_value": 1e-3}, "beam": {"beams": 2, "expand": 1},
          "rebase": {"width": 2, "reward_temperature": 100.0}}[name]
    clock = VirtualClock()
    be = Counting(script, default_ratings, token_time=1.0, clock=clock,
                  fail=lambda p: assistant(p).startswith("step 1\n\n") if "<|assistant|> " in p else False)
    root = Meter(clock=clock)
    m = root.child({"output_tokens": 1000}, name="q")
    strat = get(name, scorer=value, seed=0, **kw)

    async def main() -> None:
        with pytest.raises(BackendError):
            await strat.arun(problems("q"), [m], be)
        # checked before asyncio.run tears the loop down (which would cancel any task left behind)
        assert all(m.reserved(u) == 0 and root.reserved(u) == 0 for u in UNITS_HELD), m.summary()
        assert m.spent("output_tokens") == be.emitted
        assert be.emitted > 2  # the root's children, and part of the sibling request that was aborted
        assert len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()]) == 0

    asyncio.run(main())


# ------------------------------------------------------------------ parameter errors name the parameter and the value
@pytest.mark.parametrize(("name", "kw", "message"), [
    ("bavt", {"width": 0}, "`width` must be >= 1, got 0"),
    ("bavt", {"width": "three"}, "`width` must be an integer, got 'three'"),
    ("bavt", {"select": -1}, "`select` must be >= 1, got -1"),
    ("bavt", {"commit": 2}, "`commit` must be in [0, 1] (the ρ below which a found answer is kept), got 2"),
    ("bavt", {"rho_min": 0}, "`rho_min` must be in (0, 1], got 0"),
    ("bavt", {"root_value": 1.5}, "`root_value` must be in (0, 1], got 1.5"),
    ("bavt", {"max_rounds": 0}, "`max_rounds` must be >= 1, got 0"),
    ("bavt", {"temperature": -0.5}, "`temperature` must be >= 0"),
    ("bavt", {"scorer": 3}, "`scorer` must be a value scorer name (logprob, prm, residual) or a ValueScorer "
                            "instance, got 3; e.g. scorer='logprob'"),
    ("beam", {"beams": 0}, "`beams` must be >= 1, got 0"),
    ("beam", {"expand": 0}, "`expand` must be >= 1, got 0"),
    ("beam", {"top_p": 0}, "`top_p` must be > 0"),
    ("beam", {"top_p": 1.5}, "`top_p` must be <= 1"),
    ("beam", {"final": "max"}, "`final` must be 'vote' or 'best', got 'max'"),
    ("beam", {"scorer_params": [1]}, "`scorer_params` must be a mapping, got [1]"),
    ("rebase", {"reward_temperature": -1}, "`reward_temperature` must be > 0"),
    ("rebase", {"step_tokens": 0}, "`step_tokens` must be >= 1, got 0"),
    ("rebase", {"max_depth": 0}, "`max_depth` must be >= 1, got 0"),
    ("rebase", {"answer_tokens": 0}, "`answer_tokens` must be >= 1, got 0"),
    ("rebase", {"delimiter": ""}, "`delimiter` must be a non-empty string, got ''; use '\\n\\n' for paragraph steps"),
    ("rebase", {"seed": "x"}, "`seed` must be an integer, got 'x'"),
])
def test_params_errors_name_the_parameter_and_the_value(name: str, kw: dict[str, Any], message: str) -> None:
    """Validated by the strategy's typed ``Params`` through the registry: "`x` must be ..., got ..."."""
    cls = STRATEGIES.get(name)
    with pytest.raises(ConfigError) as e:
        get(name, **kw)
    assert f"invalid {cls.Params.__name__}: " in str(e.value) and message in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match=re.escape(message)):  # the same through the Params model directly
        cls.Params(**kw)
