"""Budget forcing (s1) on the scripted backend, with and without thinking tags, plus one real-model run."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend, VirtualClock
from budgetlm.backends.streaming import Delta
from budgetlm.budget import Budget
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.strategies.base import STRATEGIES, Problem, run_sync
from budgetlm.strategies.cot import BudgetForcing
from budgetlm.thinking import ThinkingFormat

NATURAL = 10
"""Reasoning tokens the scripted model writes before it would answer."""


def script(prompt: str, i: int, sp: SamplingParams, tags: bool | None = None) -> str:
    """Answer "7" after an answer lead; otherwise reason for NATURAL tokens, then close/answer."""
    if prompt.rstrip().endswith("Answer:"):
        return "7\nbecause 3 + 4 = 7.\n\nmore text"
    body = "".join(f"s{j} " for j in range(NATURAL))
    tags = "<think>" in prompt if tags is None else tags
    return body + "</think>\nAnswer: 7" if tags else body + "Answer: 7"


def backend(tags: bool, starts_in_thinking: bool = False) -> ScriptedBackend:
    fmt = ThinkingFormat(starts_in_thinking=starts_in_thinking) if tags else None
    return ScriptedBackend(lambda p, i, sp: script(p, i, sp, tags), thinking=fmt)


def prompts(b: ScriptedBackend) -> list[str]:
    """Prompts the scripted model saw (recorded by wrapping the script)."""
    return b.seen  # type: ignore[attr-defined]


def recording(tags: bool) -> ScriptedBackend:
    seen: list[str] = []

    def rec(prompt: str, i: int, sp: SamplingParams) -> str:
        seen.append(prompt)
        return script(prompt, i, sp)

    b = ScriptedBackend(rec, thinking=ThinkingFormat() if tags else None)
    b.seen = seen  # type: ignore[attr-defined]
    return b


def reasoning_tokens(r) -> int:  # noqa: ANN001
    return sum(t["reasoning_tokens"] for t in r.trace)


@pytest.mark.parametrize("tags", [False, True])
@pytest.mark.parametrize("cap", [0, 1, 3, NATURAL - 1, NATURAL, NATURAL + 5, 100])
def test_thinking_never_exceeds_cap_and_an_answer_is_produced(tags: bool, cap: int) -> None:
    b = backend(tags)
    rs = BudgetForcing(thinking_tokens=cap).solve(["q1", "q2"], backend=b, budget={"output_tokens": 200})
    for r in rs:
        assert reasoning_tokens(r) <= cap and r.usage.thinking_tokens <= cap
        assert reasoning_tokens(r) == min(cap, NATURAL)
        if tags:
            assert r.usage.thinking_tokens == reasoning_tokens(r)  # the backend counts the tagged thinking
        else:
            assert r.usage.thinking_tokens == 0  # no tags: the backend sees no thinking; the trace has it
        assert (r.answer, r.text, r.stop_reason) == ("7", "Answer:7\nbecause 3 + 4 = 7.", "done")
        assert r.trace[-1]["phase"] == "answer" and r.finish_reason == "stop" and not r.thinking_truncated
        assert r.usage.output_tokens == r.sequential_tokens == sum(t["output_tokens"] for t in r.trace)
        assert r.ledger["units"]["output_tokens"]["spent"] == r.usage.output_tokens


@pytest.mark.parametrize("tags", [False, True])
def test_default_cap_is_the_budget_left_after_the_answer_reserve(tags: bool) -> None:
    [r] = BudgetForcing(answer_tokens=4).solve(["q"], backend=backend(tags), budget={"output_tokens": 9})
    assert reasoning_tokens(r) == 5  # 9 - 4 reserved for the answer
    assert r.trace[0]["finish_reason"] == "length" and r.answer == "7" and r.usage.output_tokens == 9
    assert r.truncated and r.stop_reason == "done"  # answer_tokens cut the answer, not the budget


def test_thinking_budget_caps_reasoning_of_models_without_tags() -> None:
    [r] = BudgetForcing().solve(["q"], backend=backend(False), budget={"output_tokens": 100, "thinking_tokens": 4})
    assert reasoning_tokens(r) == 4 and r.answer == "7"


@pytest.mark.parametrize("tags", [False, True])
def test_empty_forced_answer_falls_back_to_the_reply_only_without_tags(tags: bool) -> None:
    def scr(prompt: str, i: int, sp: SamplingParams) -> str:
        if prompt.rstrip().endswith("Answer:"):
            return ""  # the model ends its turn right after the lead
        return "4 - 1 = 3" + ("</think>" if tags else "")

    [r] = BudgetForcing().solve(["q"], backend=ScriptedBackend(scr, thinking=ThinkingFormat() if tags else None))
    if tags:
        assert (r.text, r.answer, r.trace[-1]["answer_from"]) == ("Answer:", None, "answer")
    else:
        assert (r.text, r.answer, r.trace[-1]["answer_from"]) == ("4 - 1 = 3\nAnswer:", "3", "reply")


@pytest.mark.parametrize("waits", [0, 2])
def test_template_that_opens_thinking_counts_only_thinking(waits: int) -> None:
    # the chat template opens <think>: the answer after the forced </think> is not thinking
    b = backend(True, starts_in_thinking=True)
    [r] = BudgetForcing(thinking_tokens=25, min_thinking_tokens=100, max_waits=waits).solve(
        ["q"], backend=b, budget={"output_tokens": 100, "thinking_tokens": 25})
    assert r.usage.thinking_tokens == reasoning_tokens(r) == min(25, NATURAL * (waits + 1))
    assert r.trace[-1]["thinking_tokens"] == 0 and r.answer == "7"
    assert r.ledger["units"]["thinking_tokens"]["remaining"] >= 0


@pytest.mark.parametrize("tags", [False, True])
def test_k0_never_waits(tags: bool) -> None:
    b = recording(tags)
    rs = BudgetForcing(min_thinking_tokens=1000, max_waits=0).solve(["q1", "q2"], backend=b)
    assert not any("Wait" in p for p in prompts(b))
    assert all(r.answer == "7" for r in rs)
    assert b.requests == 4  # per problem: one thinking call, one answer call
    assert all([t["phase"] for t in r.trace] == ["think", "answer"] for r in rs)


@pytest.mark.parametrize("tags", [False, True])
def test_min_thinking_extends_exactly_k_times(tags: bool) -> None:
    b = recording(tags)
    rs = BudgetForcing(min_thinking_tokens=5 * NATURAL, max_waits=2).solve(["q1", "q2", "q3"], backend=b)
    assert b.requests == 3 * 4  # per problem: think, wait, wait, answer, each its own request
    for r in rs:
        assert [t["phase"] for t in r.trace] == ["think", "think", "think", "answer"]
        assert [t["waits"] for t in r.trace] == [0, 1, 2, 2]
        assert reasoning_tokens(r) == 3 * NATURAL and r.answer == "7"
    answer_prompts = [p for p in prompts(b) if p.rstrip().endswith("Answer:")]
    assert len(answer_prompts) == 3 and all(p.count("Wait") == 2 for p in answer_prompts)
    end = "</think>" if tags else ""
    assert all(p.rstrip().endswith(f"s{NATURAL - 1}\n{end}\nAnswer:".replace("\n\n", "\n")) for p in answer_prompts)


def test_no_wait_when_natural_length_reaches_the_minimum() -> None:
    b = recording(False)
    BudgetForcing(min_thinking_tokens=NATURAL, max_waits=3).solve(["q"], backend=b)
    assert not any("Wait" in p for p in prompts(b))


def test_extension_stops_at_the_cap() -> None:
    b = recording(False)
    [r] = BudgetForcing(thinking_tokens=15, min_thinking_tokens=100, max_waits=5).solve(["q"], backend=b)
    assert reasoning_tokens(r) == 15 and r.answer == "7"
    assert [t["phase"] for t in r.trace] == ["think", "think", "answer"]  # 10, then 5 (cut), then answer


def test_one_request_per_phase_for_every_problem() -> None:
    b = backend(False)
    rs = BudgetForcing(thinking_tokens=4).solve([f"q{i}" for i in range(5)], backend=b, budget={"output_tokens": 50})
    assert b.requests == 2 * 5 and b.batches == []  # think and answer per problem, none through the batch path
    assert all(r.answer == "7" and r.problem_id == str(i) for i, r in enumerate(rs))


def test_problems_with_different_budgets_run_their_own_phases() -> None:
    b = backend(False)
    root = Meter()
    meters = [root.child({"output_tokens": 40}), root.child({"output_tokens": 1})]
    rs = BudgetForcing().run([Problem.from_text("a", id="a"), Problem.from_text("b", id="b")], meters, b)
    assert b.requests == 3  # the second problem has no room to think: it only answers
    assert [[t["phase"] for t in r.trace] for r in rs] == [["think", "answer"], ["answer"]]
    assert [r.answer for r in rs] == ["7", "7"] and rs[1].usage.output_tokens == 1
    assert rs[1].stop_reason == "budget exhausted: output_tokens" and rs[1].truncated


@pytest.mark.parametrize("tags", [False, True])
def test_only_the_forced_answer_streams_and_the_stream_is_the_text(tags: bool) -> None:
    strat = BudgetForcing(min_thinking_tokens=2 * NATURAL, max_waits=1)
    deltas: list[Delta] = []
    [r] = run_sync(strat.arun([Problem.from_text("q", id="q")], [Meter()], backend(tags), on_delta=deltas.append))
    assert strat.streams and [t["phase"] for t in r.trace] == ["think", "think", "answer"]
    assert "".join(d.text for d in deltas) == r.text == "Answer:7\nbecause 3 + 4 = 7."
    assert deltas[0].text == "Answer:" and deltas[0].token_ids == []  # the lead, then the answer's tokens
    assert sum(len(d.token_ids) for d in deltas) == r.trace[-1]["output_tokens"]  # no thinking token streamed
    assert deltas[-1].finish_reason == "stop"


def test_a_refused_answer_streams_nothing() -> None:
    deltas: list[Delta] = []
    [r] = run_sync(BudgetForcing().arun([Problem.from_text("q", id="q")], [Meter({"output_tokens": 0})],
                                        backend(False), on_delta=deltas.append))
    assert deltas == [] and r.text == "" and r.stop_reason == "budget exhausted: output_tokens"


def test_problems_advance_independently() -> None:
    clock = VirtualClock()
    seen: list[tuple[float, str, str]] = []

    def scr(prompt: str, i: int, sp: SamplingParams) -> str:
        answer = prompt.rstrip().endswith("Answer:")
        seen.append((clock(), "short" if "short" in prompt else "long", "answer" if answer else "think"))
        if answer:
            return "7"
        return "".join(f"s{j} " for j in range(2 if "short" in prompt else 30)) + "Answer: 7"

    b = ScriptedBackend(scr, token_time=0.01, clock=clock)
    rs = BudgetForcing().solve(["short", "long"], backend=b)
    assert [(who, phase) for _, who, phase in seen] == [
        ("short", "think"), ("long", "think"), ("short", "answer"), ("long", "answer")]
    start = {(who, phase): t for t, who, phase in seen}
    # the short problem answers while the long one is still thinking (lockstep phases would start both together)
    assert start[("short", "answer")] * 4 < start[("long", "answer")]
    assert [reasoning_tokens(r) for r in rs] == [2, 30] and all(r.answer == "7" for r in rs)


@pytest.mark.parametrize("tags", [False, True])
def test_one_token_budget_answers_with_a_stop_reason(tags: bool) -> None:
    [r] = BudgetForcing().solve(["q"], backend=backend(tags), budget={"output_tokens": 1})
    assert r.usage.output_tokens == 1 and r.answer == "7" and r.text == "Answer:7"
    assert r.stop_reason == "budget exhausted: output_tokens"


@pytest.mark.parametrize("budget", [{"output_tokens": 0}, {"input_tokens": 1}])
def test_exhausted_budget_returns_a_result_instead_of_raising(budget: dict) -> None:
    [r] = BudgetForcing(thinking_tokens=5).solve(["q"], backend=backend(False), budget=budget)
    unit = next(iter(budget))
    assert r.text == "" and r.answer is None and r.stop_reason == f"budget exhausted: {unit}"
    assert r.usage.output_tokens == 0 and r.trace[-1]["skipped"]


def test_batch_budget_is_never_exceeded() -> None:
    b = backend(True)
    rs = BudgetForcing().solve(["a", "b", "c"], backend=b, budget={"output_tokens": 30},
                               batch_budget={"output_tokens": 40})
    assert sum(r.usage.output_tokens for r in rs) <= 40


@pytest.mark.parametrize("tags", [False, True])
def test_a_batch_budget_leaves_every_concurrent_problem_room_to_think(tags: bool) -> None:
    # both problems start thinking at once: the first may not take the batch's tokens for itself
    rs = BudgetForcing(answer_tokens=8).solve(["a", "b"], backend=backend(tags), batch_budget={"output_tokens": 40})
    assert all(reasoning_tokens(r) > 0 and r.answer == "7" and r.stop_reason == "done" for r in rs)
    assert reasoning_tokens(rs[0]) <= 40 // 2 - 8  # its equal share less the answer's reserve
    assert sum(r.usage.output_tokens for r in rs) <= 40


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tags=st.booleans(),
    out=st.integers(0, 60),
    cap=st.one_of(st.none(), st.integers(0, 40)),
    answer=st.integers(1, 12),
    m=st.integers(0, 40),
    k=st.integers(0, 3),
    natural=st.integers(0, 15),
)
def test_property_budget_and_cap_hold(tags: bool, out: int, cap: int | None, answer: int, m: int, k: int,
                                      natural: int) -> None:
    def scr(prompt: str, i: int, sp: SamplingParams) -> str:
        if prompt.rstrip().endswith("Answer:"):
            return "7\nand then some words\n\nx"
        body = "".join(f"w{j} " for j in range(natural))
        return body + ("</think> Answer: 7" if tags else "Answer: 7")

    b = ScriptedBackend(scr, thinking=ThinkingFormat() if tags else None)
    strat = BudgetForcing(thinking_tokens=cap, answer_tokens=answer, min_thinking_tokens=m, max_waits=k)
    rs = strat.solve(["q1", "q2"], backend=b, budget=Budget(output_tokens=out))
    for r in rs:
        assert r.usage.output_tokens <= out
        assert r.ledger["units"]["output_tokens"]["spent"] == r.usage.output_tokens
        if cap is not None:
            assert reasoning_tokens(r) <= cap and r.usage.thinking_tokens <= cap
        assert sum(t["phase"] == "think" for t in r.trace) <= k + 1
        if out >= 1:
            assert r.answer == "7"  # an answer whenever one output token fits
        else:
            assert r.answer is None and r.stop_reason.startswith("budget exhausted")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"thinking_tokens": -1}, "`thinking_tokens` must be an integer >= 0 or None, got -1"),
        ({"answer_tokens": 0}, "`answer_tokens` must be an integer >= 1, got 0"),
        ({"min_thinking_tokens": -2}, "`min_thinking_tokens` must be"),
        ({"max_waits": 1.5}, "`max_waits` must be an integer >= 0, got 1.5"),
        ({"max_waits": True}, "`max_waits` must be"),
        ({"wait_text": " "}, "`wait_text` must be a non-empty string"),
        ({"answer_lead": ""}, "`answer_lead` must be a non-empty string"),
        ({"temperature": -0.1}, "`temperature` must be a number >= 0"),
        ({"seed": "x"}, "`seed` must be"),
        ({"thinking_budget_passthrough": 1}, "`thinking_budget_passthrough` must be True or False"),
    ],
)
def test_invalid_parameters(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BudgetForcing(**kw)


def test_registered_as_cot() -> None:
    assert STRATEGIES.get("cot") is BudgetForcing
    assert BudgetForcing(max_waits=2).params()["max_waits"] == 2


@pytest.mark.slow
def test_real_model_chain_sum(vllm_backend) -> None:  # noqa: ANN001
    from budgetlm.evals import suites

    items = suites.get(
        "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=3&seed=1"
    ).items()
    problems = [Problem(id=it.id, messages=it.messages) for it in items]
    assert len(problems) == 3
    rs = BudgetForcing(thinking_tokens=48).solve(problems, backend=vllm_backend, budget=Budget(output_tokens=96))
    for r in rs:
        assert r.usage.output_tokens <= 96
        assert r.text.strip(), r.trace
        assert reasoning_tokens(r) <= 48
        assert r.ledger["units"]["output_tokens"]["spent"] == r.usage.output_tokens
        assert sum(t["output_tokens"] for t in r.trace) == r.usage.output_tokens
        assert r.trace[-1]["phase"] == "answer"
