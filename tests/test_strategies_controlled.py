"""The ``controlled`` strategy (L1/e1 inference side): instruction wording, message editing, parameter
errors, and runs on the scripted backend (prompt, details, budget clamping, registry)."""

from __future__ import annotations

from typing import Any

import pytest

import budgetlm.strategies
from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend, VirtualClock
from budgetlm.backends.streaming import Delta
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.strategies.base import STRATEGIES, Problem, run_sync
from budgetlm.strategies.controlled import CONTROL_MODES, Controlled, control_instruction, with_control

WORDS = 30
"""Words (= scripted tokens) the scripted model writes before its answer."""


def recording(words: int = WORDS) -> ScriptedBackend:
    """A scripted model that writes ``words`` reasoning words then "Answer: 7", recording its prompts."""
    seen: list[str] = []

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        seen.append(prompt)
        return "".join(f"w{j} " for j in range(words)) + "Answer: 7"

    b = ScriptedBackend(script)
    b.seen = seen  # type: ignore[attr-defined]
    return b


# ---------------------------------------------------------------- wording


@pytest.mark.parametrize("mode, value, expected", [
    ("exact", 64, "Think for 64 tokens."),  # LCPO-Exact
    ("exact", 1, "Think for 1 tokens."),  # the smallest target
    ("max", 128, "Think for maximum 128 tokens."),  # LCPO-Max
    ("effort", 0.5, "Use 50% of your usual reasoning effort."),  # e1, half effort
    ("effort", 0.25, "Use 25% of your usual reasoning effort."),  # a quarter
    ("effort", 1.0, "Use 100% of your usual reasoning effort."),  # full effort (the upper bound)
    ("effort", 1, "Use 100% of your usual reasoning effort."),  # an int 1 is a valid fraction
    ("effort", 0.333, "Use 33% of your usual reasoning effort."),  # rounded to a whole percent
])
def test_control_instruction_wording(mode: str, value: float, expected: str) -> None:
    assert control_instruction(mode, value) == expected


def test_control_modes_are_the_three_documented_ones() -> None:
    assert CONTROL_MODES == ("exact", "max", "effort")


# ---------------------------------------------------------------- with_control


def test_with_control_appends_to_the_last_user_message_and_copies() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "What is 3+4?"}]
    before = [dict(m) for m in messages]
    out = with_control(messages, "exact", 32)
    assert out[-1]["content"] == "What is 3+4?\n\nThink for 32 tokens."
    assert out[:3] == before[:3]  # earlier messages, the earlier user message included, untouched
    assert messages == before  # the input is not mutated
    assert all(a is not b for a, b in zip(out, messages))  # new dicts


def test_with_control_picks_the_last_user_even_when_an_assistant_message_follows() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "partial"}]
    out = with_control(messages, "effort", 0.75)
    assert out[0]["content"] == "q\n\nUse 75% of your usual reasoning effort."
    assert out[1] == {"role": "assistant", "content": "partial"}


def test_with_control_without_a_user_message_is_an_error() -> None:
    with pytest.raises(ConfigError, match="`messages`"):
        with_control([{"role": "system", "content": "s"}], "exact", 10)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("kwargs, param", [
    ({"mode": "exactly", "target_tokens": 64}, "mode"),  # unknown mode
    ({"mode": "bogus"}, "mode"),  # unknown mode and no value: the mode is named, not the value
    ({"mode": "exact", "target_tokens": 0}, "target_tokens"),  # a zero target
    ({"mode": "max", "target_tokens": -5}, "target_tokens"),  # a negative target
    ({"mode": "exact", "target_tokens": 12.5}, "target_tokens"),  # not an integer
    ({"mode": "exact", "target_tokens": True}, "target_tokens"),  # bool is not a token count
    ({"mode": "exact"}, "target_tokens"),  # missing target
    ({"mode": "max", "effort": 0.5}, "target_tokens"),  # an effort does not stand in for a target
    ({"mode": "effort", "effort": 0}, "effort"),  # zero effort
    ({"mode": "effort", "effort": 1.5}, "effort"),  # above 1
    ({"mode": "effort", "effort": -0.1}, "effort"),  # negative
    ({"mode": "effort", "effort": True}, "effort"),  # bool is not a fraction
    ({"mode": "effort", "effort": "0.5"}, "effort"),  # a string is not a fraction
    ({"mode": "effort"}, "effort"),  # missing effort
    ({"mode": "effort", "target_tokens": 64}, "effort"),  # a target does not stand in for an effort
    ({"mode": "exact", "target_tokens": 8, "max_tokens": 0}, "max_tokens"),  # no room to generate
])
def test_bad_values_name_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ConfigError, match=f"`{param}`"):
        Controlled(**kwargs)


@pytest.mark.parametrize("mode, value, param", [
    ("nope", 5, "mode"),  # unknown mode
    ("exact", 0, "target_tokens"),  # zero target
    ("effort", 0, "effort"),  # zero effort
    ("effort", 1.01, "effort"),  # just above 1
])
def test_control_instruction_rejects_bad_values(mode: str, value: float, param: str) -> None:
    with pytest.raises(ConfigError, match=f"`{param}`"):
        control_instruction(mode, value)


# ---------------------------------------------------------------- runs on the scripted backend


@pytest.mark.parametrize("mode, key, value, line", [
    ("exact", "target_tokens", 20, "Think for 20 tokens."),  # LCPO-Exact
    ("max", "target_tokens", 50, "Think for maximum 50 tokens."),  # LCPO-Max
])
def test_token_modes_send_the_instruction_and_record_the_length_error(mode: str, key: str, value: int, line: str) -> None:
    b = recording()
    [r] = Controlled(mode=mode, target_tokens=value, max_tokens=200).solve(["What is 3+4?"], backend=b)
    assert len(b.seen) == 1
    assert f"What is 3+4?\n\n{line}" in b.seen[0]
    used = WORDS + 2  # the reasoning words, "Answer: " and "7"
    assert r.details == {"control": mode, key: value, "used_tokens": used, "length_error": abs(used - value)}
    assert r.usage.output_tokens == used == r.sequential_tokens
    assert (r.answer, r.stop_reason, r.finish_reason, r.truncated) == ("7", "done", "stop", False)


def test_effort_mode_records_the_effort_and_no_length_error() -> None:
    b = recording()
    [r] = Controlled(mode="effort", effort=0.5).solve(["What is 3+4?"], backend=b)
    assert "What is 3+4?\n\nUse 50% of your usual reasoning effort." in b.seen[0]
    assert r.details == {"control": "effort", "effort": 0.5, "used_tokens": WORDS + 2}
    assert "length_error" not in r.details and "target_tokens" not in r.details


def test_every_problem_of_a_batch_gets_the_instruction_in_its_own_request() -> None:
    b = recording()
    probs = [Problem(id="a", messages=[{"role": "user", "content": "qa"}]),
             Problem(id="b", messages=[{"role": "user", "content": "qb"}])]
    rs = Controlled(mode="exact", target_tokens=7).solve(probs, backend=b)
    assert [r.problem_id for r in rs] == ["a", "b"]
    assert b.requests == 2 and b.batches == []  # one request per problem on the per-request path
    assert all("\n\nThink for 7 tokens." in p for p in b.seen)
    assert probs[0].messages == [{"role": "user", "content": "qa"}]  # the problem is not edited


@pytest.mark.parametrize("budget, max_tokens, expected_tokens", [
    (10, 100, 10),  # the budget is smaller than max_tokens: the budget wins
    (25, 100, 25),  # another budget below the natural length
    (100, 5, 5),  # max_tokens smaller than the budget: max_tokens wins
    (1000, 1000, WORDS + 2),  # both roomy: the natural length
])
def test_budget_clamps_the_call(budget: int, max_tokens: int, expected_tokens: int) -> None:
    target = 20
    [r] = Controlled(mode="exact", target_tokens=target, max_tokens=max_tokens).solve(
        ["q"], backend=recording(), budget={"output_tokens": budget})
    assert r.usage.output_tokens <= budget
    assert r.usage.output_tokens == expected_tokens == r.details["used_tokens"]
    assert r.details["length_error"] == abs(expected_tokens - target)
    assert r.trace[0]["max_tokens"] == min(budget, max_tokens)
    assert r.trace[0]["clamped_by"] == ("output_tokens" if budget < max_tokens else None)
    assert r.truncated == (expected_tokens < WORDS + 2)
    assert r.ledger["units"]["output_tokens"]["spent"] == r.usage.output_tokens


def test_an_exhausted_budget_skips_the_call_and_keeps_the_control_details() -> None:
    b = recording()
    [r] = Controlled(mode="exact", target_tokens=20).solve(["q"], backend=b, budget={"output_tokens": 0})
    assert b.seen == []  # nothing was generated
    assert r.stop_reason.startswith("budget exhausted") and r.answer is None and r.usage.output_tokens == 0
    assert r.details == {"control": "exact", "target_tokens": 20}  # no used_tokens / length_error to average


def test_the_answer_streams_token_by_token() -> None:
    b = recording()
    strat = Controlled(mode="max", target_tokens=16)
    deltas: list[Delta] = []
    [r] = run_sync(strat.arun([Problem.from_text("q", id="q")], [Meter()], b, on_delta=deltas.append))
    assert strat.streams and r.answer == "7"
    assert len(deltas) == WORDS + 2  # one delta per token
    assert "".join(d.text for d in deltas) == r.text and deltas[-1].finish_reason == "stop"
    assert sum(len(d.token_ids) for d in deltas) == r.usage.output_tokens


def test_problems_finish_independently() -> None:
    clock = VirtualClock()

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        words = 2 if "short" in prompt else 40
        return "".join(f"w{j} " for j in range(words)) + "Answer: 7"

    b = ScriptedBackend(script, token_time=0.01, clock=clock)
    probs = [Problem.from_text("short", id="s"), Problem.from_text("long", id="l")]
    root = Meter()
    ends: list[float] = []
    rs = run_sync(Controlled(mode="exact", target_tokens=8).arun(
        probs, [root.child(name=p.id) for p in probs], b,
        on_delta=lambda d: ends.append(clock()) if d.finish_reason else None))
    assert b.requests == 2 and [r.usage.output_tokens for r in rs] == [4, 42]
    # the short problem's sample ended after its 4 tokens, long before the long one's 42
    assert len(ends) == 2 and ends[0] * 4 < ends[1]
    assert [r.answer for r in rs] == ["7", "7"]


# ---------------------------------------------------------------- registry


def test_registry_builds_the_strategy() -> None:
    assert STRATEGIES.get("controlled") is Controlled
    s = budgetlm.strategies.get("controlled", mode="max", target_tokens=64, temperature=0.0, max_tokens=128)
    assert isinstance(s, Controlled)
    assert (s.mode, s.target_tokens, s.effort, s.max_tokens) == ("max", 64, None, 128)
    assert s.params()["mode"] == "max" and s.params()["target_tokens"] == 64


def test_registry_lists_valid_parameters_for_an_unknown_one() -> None:
    with pytest.raises(ConfigError) as err:
        budgetlm.strategies.get("controlled", mode="exact", target_tokens=5, budget=3)
    msg = str(err.value)
    assert "'budget'" in msg
    for p in ("mode", "target_tokens", "effort", "temperature", "max_tokens", "seed"):
        assert p in msg
