"""Parallel-Distill-Refine and Sequential Refinement: mechanics on the scripted backend, one real model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetlm.backends.scripted import ScriptedBackend, VirtualClock
from budgetlm.budget import Budget
from budgetlm.errors import ConfigError
from budgetlm.strategies.base import STRATEGIES, get
from budgetlm.strategies.pdr import ParallelDistillRefine, SequentialRefinement, truncate_to_tokens

REFINE = "notes from previous attempts"


def make_script(log: list | None = None, answers=None):
    """Drafts: some reasoning and "Answer: X"; summaries: long texts (to exercise truncation)."""

    def script(prompt: str, i: int, sp) -> str:
        if "Summarize the candidate" in prompt:
            return "summary " * 300
        if "Summarize this attempt" in prompt:
            return "note " * 100
        if log is not None:
            log.append((prompt, i, sp.n))
        ans = answers(prompt, i) if answers else "7"
        return "step " * 6 + f"Answer: {ans}"

    return script


def workspaces(results):
    return [e for r in results for e in r.trace if "workspace" in e]


@pytest.mark.parametrize("distill", ["summary", "topk", "per_draft"])
@pytest.mark.parametrize("w", [1, 5, 16, 64])
def test_every_workspace_within_w(distill: str, w: int) -> None:
    log: list = []
    be = ScriptedBackend(make_script(log))
    pdr = ParallelDistillRefine(rounds=3, drafts=3, workspace_tokens=w, distill=distill, topk=2, max_tokens=32)
    res = pdr.solve(["What is 3+4?", "What is 2+5?"], backend=be)
    ws = workspaces(res)
    assert len(ws) == 2 * 2  # rounds 1 and 2 of both problems (the final round is not distilled)
    for e in ws:
        assert e["workspace_tokens"] <= w
        assert be.count_tokens(e["workspace"]) <= w
        assert e["workspace_tokens"] == be.count_tokens(e["workspace"])
        assert e["workspace"]  # non-empty at these sizes
        assert "distill_fallback" not in e
    # later rounds are conditioned on the workspace
    refines = [p for p, _, _ in log if REFINE in p]
    assert len(refines) == 2 * 2 * 3  # 2 problems x rounds 2,3 x 3 drafts
    assert all(r.answer == "7" and r.stop_reason == "done" for r in res)


def test_truncate_to_tokens() -> None:
    be = ScriptedBackend()
    text = "a b c d e f g"
    assert truncate_to_tokens(be, text, 3) == "a b c "
    assert truncate_to_tokens(be, text, 100) == text
    assert truncate_to_tokens(be, text, 0) == ""


@pytest.mark.parametrize("distill", ["summary", "topk", "per_draft"])
def test_sr_one_draft_per_round(distill: str) -> None:
    log: list = []
    be = ScriptedBackend(make_script(log))
    sr = SequentialRefinement(rounds=4, workspace_tokens=20, distill=distill)
    assert sr.drafts == 1 and "drafts" not in sr.params()
    res = sr.solve(["q1", "q2"], backend=be)
    assert len(log) == 2 * 4 and all(n == 1 and i == 0 for _, i, n in log)
    for r in res:
        assert [len(e["drafts"]) for e in r.trace] == [1, 1, 1, 1]
    # per problem: 4 draft requests, and one distillation request in each of the 3 distilled rounds
    assert be.requests == 2 * 4 + (0 if distill == "topk" else 2 * 3)


@pytest.mark.parametrize(("distill", "distill_requests"), [
    ("topk", 0),  # no model call
    ("summary", 1),  # one summary of all drafts
    ("per_draft", 4),  # one summary per draft, run concurrently
])
def test_one_draft_request_per_round(distill: str, distill_requests: int) -> None:
    log: list = []
    be = ScriptedBackend(make_script(log))
    ParallelDistillRefine(rounds=3, drafts=4, workspace_tokens=16, distill=distill).solve(["a", "b", "c"], backend=be)
    # per problem: 3 draft requests of n=4 samples, distillation requests in rounds 1 and 2
    assert be.requests == 3 * (3 + 2 * distill_requests) and be.batches == []
    assert len(log) == 3 * 3 * 4 and all(n == 4 for _, _, n in log)


def test_problems_advance_independently() -> None:
    clock = VirtualClock()
    starts: dict[str, list[float]] = {"short": [], "long": []}

    def script(prompt: str, i: int, sp) -> str:
        who = "short" if "short" in prompt else "long"
        if i == 0:
            starts[who].append(clock())
        return "step " * (1 if who == "short" else 30) + "Answer: 7"

    be = ScriptedBackend(script, token_time=0.01, clock=clock)
    res = ParallelDistillRefine(rounds=3, drafts=2, workspace_tokens=16, max_tokens=64).solve(
        ["short", "long"], backend=be)
    assert [len(v) for v in starts.values()] == [3, 3]
    # the short problem ran its third round before the long one started its second (lockstep rounds could not)
    assert starts["short"][2] < starts["long"][1]
    for r in res:
        assert r.answer == "7" and r.stop_reason == "done" and len(r.trace) == 3
        assert r.sequential_tokens == sum(max(d["tokens"] for d in e["drafts"]) for e in r.trace)


@given(
    budget=st.integers(0, 300),
    rounds=st.integers(1, 4),
    drafts=st.integers(1, 4),
    w=st.integers(1, 40),
    distill=st.sampled_from(["summary", "topk", "per_draft"]),
    n_problems=st.integers(1, 3),
    batch=st.one_of(st.none(), st.integers(0, 500)),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_total_spend_within_budget(budget, rounds, drafts, w, distill, n_problems, batch) -> None:
    be = ScriptedBackend(make_script())
    pdr = ParallelDistillRefine(rounds=rounds, drafts=drafts, workspace_tokens=w, distill=distill, max_tokens=24)
    res = pdr.solve([f"q{i}" for i in range(n_problems)], backend=be, budget=Budget(output_tokens=budget),
                    batch_budget=None if batch is None else Budget(output_tokens=batch))
    total = 0
    for r in res:
        assert r.usage.output_tokens <= budget
        assert r.usage.output_tokens == r.ledger["units"]["output_tokens"]["spent"]
        assert r.sequential_tokens <= r.usage.output_tokens
        assert r.stop_reason == "done" or r.stop_reason.startswith("budget exhausted")
        total += r.usage.output_tokens
    if batch is not None:
        assert total <= batch
    for e in workspaces(res):
        assert e["workspace_tokens"] <= w and be.count_tokens(e["workspace"]) <= w


@pytest.mark.parametrize("distill", ["summary", "topk", "per_draft"])
def test_sequential_tokens(distill: str) -> None:
    be = ScriptedBackend(make_script())
    r = ParallelDistillRefine(rounds=3, drafts=3, workspace_tokens=10, distill=distill).solve(["q"], backend=be)[0]
    assert 0 < r.sequential_tokens <= r.usage.output_tokens
    per_round = [max(d["tokens"] for d in e["drafts"]) for e in r.trace]
    distilled = sum(e.get("distill_output_tokens", 0) for e in r.trace)
    if distill == "topk":
        assert r.sequential_tokens == sum(per_round) < r.usage.output_tokens
    elif distill == "summary":
        assert r.sequential_tokens == sum(per_round) + distilled
    else:
        assert sum(per_round) < r.sequential_tokens < sum(per_round) + distilled


def test_sr_sequential_equals_total_with_topk() -> None:
    be = ScriptedBackend(make_script())
    for r in SequentialRefinement(rounds=3, distill="topk").solve(["q1", "q2"], backend=be):
        assert r.sequential_tokens == r.usage.output_tokens > 0


def test_final_is_majority_of_last_round() -> None:
    last = ["5", "3", "5", "4"]
    be = ScriptedBackend(make_script(answers=lambda p, i: last[i] if REFINE in p else "9"))
    r = ParallelDistillRefine(rounds=2, drafts=4, workspace_tokens=30).solve(["q"], backend=be)[0]
    assert r.answer == "5" and r.stop_reason == "done"
    assert [d["answer"] for d in r.trace[-1]["drafts"]] == last
    assert [d["answer"] for d in r.trace[0]["drafts"]] == ["9"] * 4


def test_final_best_picks_highest_score() -> None:
    be = ScriptedBackend(make_script(answers=lambda p, i: str(i)))
    r = ParallelDistillRefine(rounds=2, drafts=4, final="best", temperature=0).solve(["q"], backend=be)[0]
    drafts = r.trace[-1]["drafts"]
    assert r.answer == max(drafts, key=lambda d: d["score"])["answer"]


def test_budget_exhausted_midway_returns_best_so_far() -> None:
    # one-token drafts: round 1 answers "3", later rounds "7"; 5 tokens afford rounds 1-2 only
    be = ScriptedBackend(lambda p, i, sp: "7" if REFINE in p else "3")
    pdr = ParallelDistillRefine(rounds=3, drafts=2, workspace_tokens=8, max_tokens=4)
    r = pdr.solve(["q"], backend=be, budget=Budget(output_tokens=5))[0]
    assert r.stop_reason == "budget exhausted: output_tokens"
    assert r.answer == "7"
    assert [e.get("skipped") is not None for e in r.trace] == [False, False, True]
    assert r.usage.output_tokens == 4


def test_budget_exhausted_before_anything_runs() -> None:
    be = ScriptedBackend(make_script())
    r = ParallelDistillRefine(drafts=4).solve(["q"], backend=be, budget=Budget(output_tokens=3))[0]
    assert r.answer is None and r.text == "" and r.stop_reason == "budget exhausted: output_tokens"
    assert r.usage.output_tokens == 0 and be.calls == 0


def test_planning_keeps_budget_for_final_round() -> None:
    # drafts would use 50 tokens each; 60 tokens over 3 rounds of 2 drafts: ~10 per draft per round
    be = ScriptedBackend(lambda p, i, sp: "x " * 50)
    r = ParallelDistillRefine(rounds=3, drafts=2, max_tokens=50, workspace_tokens=8).solve(
        ["q"], backend=be, budget=Budget(output_tokens=60))[0]
    assert r.stop_reason == "done"
    assert len(r.trace) == 3 and all(e["drafts"] for e in r.trace)
    assert r.usage.output_tokens <= 60


def test_batch_budget_lets_every_concurrent_problem_reach_its_final_round() -> None:
    # three problems plan their rounds at once: each plans with its equal share of the batch's tokens
    be = ScriptedBackend(lambda p, i, sp: "x " * 50)
    rs = ParallelDistillRefine(rounds=3, drafts=2, max_tokens=50, workspace_tokens=8).solve(
        ["a", "b", "c"], backend=be, batch_budget=Budget(output_tokens=90))
    for r in rs:
        assert r.stop_reason == "done" and [len(e["drafts"]) for e in r.trace] == [2, 2, 2]
    assert sum(r.usage.output_tokens for r in rs) <= 90


def test_model_distill_falls_back_to_topk_when_unaffordable() -> None:
    be = ScriptedBackend(make_script(answers=lambda p, i: "1"))
    r = ParallelDistillRefine(rounds=2, drafts=2, distill="summary", max_tokens=2, workspace_tokens=8).solve(
        ["q"], backend=be, budget=Budget(output_tokens=3))[0]
    assert r.usage.output_tokens <= 3
    assert r.trace[0]["distill_fallback"].startswith("topk")
    assert r.trace[0]["distill_output_tokens"] == 0
    assert r.stop_reason == "budget exhausted: output_tokens"
    assert all(e["workspace_tokens"] <= 8 for e in workspaces([r]))


@pytest.mark.parametrize("kw", [
    {"rounds": 0}, {"rounds": True}, {"rounds": 1.5}, {"drafts": 0}, {"workspace_tokens": 0},
    {"distill": "nope"}, {"topk": 0}, {"max_tokens": 0}, {"temperature": -1}, {"temperature": "hot"},
    {"seed": "x"}, {"final": "median"},
])
def test_invalid_params(kw: dict) -> None:
    with pytest.raises(ConfigError, match=f"`{next(iter(kw))}` must be"):
        ParallelDistillRefine(**kw)


def test_registry() -> None:
    assert STRATEGIES.get("pdr") is ParallelDistillRefine
    assert STRATEGIES.get("sr") is SequentialRefinement
    assert get("pdr", drafts=2).drafts == 2
    with pytest.raises(ConfigError, match="drafts"):
        get("sr", drafts=2)
    with pytest.raises(ConfigError, match="`rounds` must be"):
        get("sr", rounds=0)


@pytest.mark.slow
def test_real_model_chain_sum(vllm_backend) -> None:
    from budgetlm.evals import suites
    from budgetlm.strategies.base import Problem

    items = suites.get("reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=2&seed=1").items()
    problems = [Problem(id=str(i), messages=it.messages) for i, it in enumerate(items)]
    budget = Budget(output_tokens=400)
    for strat, w in [(ParallelDistillRefine(rounds=2, drafts=2, max_tokens=48, workspace_tokens=64, seed=0), 64),
                     (SequentialRefinement(rounds=2, max_tokens=48, workspace_tokens=64, seed=0), 64)]:
        res = strat.solve(problems, backend=vllm_backend, budget=budget)
        assert len(res) == 2
        for r in res:
            assert r.usage.output_tokens <= 400
            assert r.usage.output_tokens == r.ledger["units"]["output_tokens"]["spent"]
            assert 0 < r.sequential_tokens <= r.usage.output_tokens
            assert len(r.trace) == 2
        for e in workspaces(res):
            assert e["workspace_tokens"] <= w
            assert vllm_backend.count_tokens(e["workspace"]) <= w
