"""Length, effort and compression rewards against the formulas of ALGORITHMS.md §9 (LCPO, Kimi, DAPO,
ThinkPrune, cosine, e1, LC-R1), with property tests for shape and batch-order invariance."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetlm.rewards import (
    Correctness,
    CosineLength,
    DAPOOverlong,
    EffortReward,
    KimiLength,
    LCPOExact,
    LCPOMax,
    LCR1Compress,
    LCR1Length,
    RewardFunction,
    ThinkPrune,
    answer_end,
)

EXACT = Correctness("exact")
RIGHT, WRONG = "<think>t</think> Answer: 4", "<think>t</think> Answer: 5"


def call(r: RewardFunction, lengths: list[int], correct: list[bool], **cols: Any) -> list[float | None]:
    """Score completions of the given token lengths, right ("4") or wrong ("5") against gold "4"."""
    texts = [RIGHT if c else WRONG for c in correct]
    return r(completions=texts, completion_ids=[[0] * n for n in lengths], answer=["4"] * len(texts), **cols)


# ---------------------------------------------------------------- LCPO (L1)


@pytest.mark.parametrize("n_used, target, correct, expected", [
    (100, 100, True, 1.0),  # at the target: no penalty
    (100, 100, False, 0.0),  # wrong at the target: 0
    (150, 100, True, 1.0 - 0.0003 * 50),  # 50 over
    (50, 100, True, 1.0 - 0.0003 * 50),  # 50 under: the same penalty
    (4100, 100, True, 1.0 - 0.0003 * 4000),  # far over: negative
    (3000, 100, False, -0.0003 * 2900),  # wrong and far off
])
def test_lcpo_exact(n_used: int, target: int, correct: bool, expected: float) -> None:
    assert call(LCPOExact(correctness=EXACT), [n_used], [correct], target_tokens=[target]) == [pytest.approx(expected)]


@settings(max_examples=50, deadline=None)
@given(target=st.integers(1, 5000), d=st.integers(1, 5000), alpha=st.floats(1e-5, 1e-2))
def test_lcpo_exact_is_maximal_at_the_target_and_symmetric(target: int, d: int, alpha: float) -> None:
    r = LCPOExact(alpha=alpha, correctness=EXACT)
    at, over, under = call(r, [target, target + d, max(target - d, 0)], [True] * 3, target_tokens=[target] * 3)
    assert at == 1.0 and over < at
    if target - d >= 0:
        assert under == pytest.approx(over)


@pytest.mark.parametrize("n_used, target, correct, expected", [
    (100, 100, True, 0.5),  # at the target: δ
    (100, 100, False, 0.0),  # wrong: 0
    (0, 100, True, 0.5 + 0.03),  # shorter than the target earns more
    (100 + 1000, 100, True, 0.5 - 0.3),  # 1000 over
    (100 + 5000, 100, True, 0.0),  # clipped at 0
    (0, 10000, True, 1.0),  # clipped at 1
])
def test_lcpo_max(n_used: int, target: int, correct: bool, expected: float) -> None:
    assert call(LCPOMax(correctness=EXACT), [n_used], [correct], target_tokens=[target]) == [pytest.approx(expected)]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 20000), target=st.integers(1, 20000), correct=st.booleans(),
       alpha=st.floats(1e-5, 1.0), delta=st.floats(0.01, 2.0))
def test_lcpo_max_in_unit_interval_and_zero_when_wrong(n: int, target: int, correct: bool, alpha: float,
                                                       delta: float) -> None:
    [v] = call(LCPOMax(alpha=alpha, delta=delta, correctness=EXACT), [n], [correct], target_tokens=[target])
    assert 0.0 <= v <= 1.0
    if not correct:
        assert v == 0.0


# ---------------------------------------------------------------- Kimi 1.5


@pytest.mark.parametrize("lengths, correct, expected", [
    ([10, 20, 30], [True, True, True], [0.5, 0.0, -0.5]),  # shortest 0.5, longest −0.5, linear between
    ([10, 20, 30], [False, False, False], [0.0, 0.0, -0.5]),  # wrong: min(0, λ)
    ([10, 30, 20], [False, True, True], [0.0, -0.5, 0.0]),  # wrong shortest gets min(0, 0.5) = 0
    ([7, 7, 7], [True, False, True], [0.0, 0.0, 0.0]),  # all equal lengths: 0
    ([5], [True], [0.0]),  # a lone completion: 0
])
def test_kimi(lengths: list[int], correct: list[bool], expected: list[float]) -> None:
    r = KimiLength(correctness=EXACT)
    assert call(r, lengths, correct, prompt_id=["q"] * len(lengths)) == pytest.approx(expected)


def test_kimi_groups_by_prompt_id_not_position() -> None:
    r = KimiLength(correctness=EXACT)
    # interleaved prompts a, b: a has lengths 10/30, b has 100/200
    out = call(r, [10, 100, 30, 200], [True] * 4, prompt_id=["a", "b", "a", "b"])
    assert out == [0.5, 0.5, -0.5, -0.5]


# ---------------------------------------------------------------- DAPO, ThinkPrune, cosine


@pytest.mark.parametrize("length, expected", [
    (0, 0.0),  # short: no punishment
    (80, 0.0),  # exactly Lmax − Lc: still 0
    (81, -1 / 20),  # one token into the soft interval
    (90, -0.5),  # half way
    (100, -1.0),  # exactly Lmax: −1 by the linear part
    (101, -1.0),  # beyond Lmax: −1
])
def test_dapo_overlong(length: int, expected: float) -> None:
    r = DAPOOverlong(max_length=100, cache_length=20)
    assert r(completions=["x"], completion_ids=[[0] * length]) == [pytest.approx(expected)]


@pytest.mark.parametrize("text, length, expected", [
    (RIGHT, 50, 1.0),  # correct and within the limit
    (RIGHT, 64, 1.0),  # exactly at the limit
    (RIGHT, 65, 0.0),  # over the limit
    (WRONG, 10, 0.0),  # wrong
    ("<think>4 4 4", 10, 0.0),  # thinking not closed: not finished
    ("<think>4</think>   ", 10, 0.0),  # no answer after thinking
    ("Answer: 4", 10, 1.0),  # no thinking at all, but a correct answer
])
def test_think_prune(text: str, length: int, expected: float) -> None:
    r = ThinkPrune(limit=64, correctness=EXACT)
    assert r(completions=[text], completion_ids=[[0] * length], answer=["4"]) == [expected]


@pytest.mark.parametrize("length, correct, expected", [
    (0, True, 2.0),  # correct at L = 0: r_0 = 2
    (0, False, -10.0),  # wrong at L = 0: r_0 = −10
    (500, True, 1.5),  # half way: the mean of r_0 and r_L
    (500, False, -5.0),  # half way, wrong
    (999, True, 1.0 + 0.5 * (1 + math.cos(math.pi * 0.999))),  # just under L_max: ≈ r_L = 1
    (999, False, -5.0 * (1 + math.cos(math.pi * 0.999))),  # ≈ r_L = 0
    (1000, True, -10.0),  # hit the cap: exceed penalty
    (1500, False, -10.0),  # beyond the cap
])
def test_cosine(length: int, correct: bool, expected: float) -> None:
    r = CosineLength(max_length=1000, correctness=EXACT)
    assert call(r, [length], [correct]) == [pytest.approx(expected)]


def test_cosine_near_endpoints_and_monotone() -> None:
    r = CosineLength(max_length=1000, correctness=EXACT)
    right = call(r, list(range(0, 1000, 50)), [True] * 20)
    wrong = call(r, list(range(0, 1000, 50)), [False] * 20)
    assert right == sorted(right, reverse=True) and wrong == sorted(wrong)  # shorter right, longer wrong
    assert r.value(999, True) == pytest.approx(1.0, abs=1e-4) and r.value(999, False) == pytest.approx(0.0, abs=1e-3)
    custom = CosineLength(max_length=10, correct_at_zero=1.0, correct_at_max=0.5, exceed_reward=-1.0)
    assert custom.value(0, True) == 1.0 and custom.value(10, True) == -1.0


# ---------------------------------------------------------------- e1 adaptive effort


def effort_call(r: EffortReward, thinking: list[int], correct: list[bool], effort: list[float],
                pids: list[Any]) -> list[float | None]:
    texts = [f"<think>{' '.join(['w'] * n)}</think> Answer: {4 if c else 5}" for n, c in zip(thinking, correct)]
    return r(completions=texts, answer=["4"] * len(texts), effort=effort, prompt_id=pids)


@pytest.mark.parametrize("thinking, correct, effort, expected", [
    ([10, 20, 30], [True] * 3, [1.0] * 3, [1.0, 1.0, 0.0]),  # T_avg = 20: 30 is over
    ([10, 20, 30], [True] * 3, [0.5] * 3, [1.0, 0.0, 0.0]),  # e·T_avg = 10: only the shortest
    ([10, 20, 30], [False, True, True], [1.0] * 3, [0.0, 1.0, 0.0]),  # wrong: 0 even when short
    ([10, 20, 30], [True] * 3, [0.2] * 3, [0.0, 0.0, 0.0]),  # e·T_avg = 4: none fits
    ([0, 0], [True, True], [0.5, 0.5], [1.0, 1.0]),  # no thinking at all fits any budget
])
def test_effort_group_mode(thinking: list[int], correct: list[bool], effort: list[float],
                           expected: list[float]) -> None:
    r = EffortReward(correctness=EXACT)
    assert effort_call(r, thinking, correct, effort, ["q"] * len(thinking)) == expected


@settings(max_examples=40, deadline=None)
@given(thinking=st.lists(st.integers(0, 60), min_size=1, max_size=8), e1=st.floats(0.01, 1.0),
       e2=st.floats(0.01, 1.0), data=st.data())
def test_effort_monotone_in_effort(thinking: list[int], e1: float, e2: float, data: Any) -> None:
    lo, hi = sorted((e1, e2))
    correct = data.draw(st.lists(st.booleans(), min_size=len(thinking), max_size=len(thinking)))
    r = EffortReward(correctness=EXACT)
    a = effort_call(r, thinking, correct, [lo] * len(thinking), ["q"] * len(thinking))
    b = effort_call(r, thinking, correct, [hi] * len(thinking), ["q"] * len(thinking))
    assert all(x <= y for x, y in zip(a, b))  # more effort never lowers a reward
    assert all(x == 0.0 for x, c in zip(b, correct) if not c)  # wrong: always 0


def test_effort_ema_state() -> None:
    r = EffortReward(mode="ema", ema_decay=0.75, correctness=EXACT)
    ok2 = [True, True]
    # first call: T_avg("a") starts at the group mean (10 + 30) / 2 = 20
    assert effort_call(r, [10, 30], ok2, [1.0, 1.0], ["a", "a"]) == [1.0, 0.0]
    assert r.ema == {"a": 20.0}
    # second call: group mean 40, EMA 0.75·20 + 0.25·40 = 25: 25 passes (≤), 55 does not
    assert effort_call(r, [25, 55], ok2, [1.0, 1.0], ["a", "a"]) == [1.0, 0.0]
    assert r.ema == {"a": 25.0}
    # third call: group mean 45, EMA 0.75·25 + 0.25·45 = 30, so 40 fails here but passes in group mode
    assert effort_call(r, [40, 50], ok2, [1.0, 1.0], ["a", "a"]) == [0.0, 0.0]
    assert effort_call(EffortReward(correctness=EXACT), [40, 50], ok2, [1.0, 1.0], ["a", "a"]) == [1.0, 0.0]
    assert r.ema == {"a": 30.0}
    # another prompt gets its own average
    effort_call(r, [4], [True], [1.0], ["b"])
    assert r.ema == {"a": 30.0, "b": 4.0}


def test_effort_column_errors() -> None:
    r = EffortReward(correctness=EXACT)
    with pytest.raises(Exception, match=r"`effort` must hold effort fractions in \(0, 1\], got 1.5 at row 1"):
        effort_call(r, [1, 2], [True, True], [1.0, 1.5], ["a", "a"])


# ---------------------------------------------------------------- LC-R1


@pytest.mark.parametrize("lengths, correct, expected", [
    ([10, 20, 40], [True, True, True], [0.75, 0.5, 0.0]),  # shortest correct gets the most
    ([10, 20, 40], [True, True, False], [0.5, 0.0, -1.0]),  # max over correct only; wrong can be negative
    ([10, 20], [False, False], [0.0, 0.0]),  # no correct sample: 0
])
def test_lcr1_length(lengths: list[int], correct: list[bool], expected: list[float]) -> None:
    r = LCR1Length(correctness=EXACT)
    assert call(r, lengths, correct, prompt_id=[1] * len(lengths)) == pytest.approx(expected)


@pytest.mark.parametrize("thinking, answer, gold, expected", [
    ("aaaa 4 bbbb", "Answer: 4", "4", 1 - len("aaaa 4") / len("aaaa 4 bbbb")),  # found midway
    ("the result is 4", "Answer: 4", "4", 0.0),  # found at the very end: nothing to cut
    ("no idea at all", "Answer: 4", "4", -1.0),  # correct but never in the thinking
    ("try 14 then 41 then 4 ok", "Answer: 4", "4", 1 - len("try 14 then 41 then 4") / len("try 14 then 41 then 4 ok")),  # whole numbers only
    ("it is 4 and 4 again", "Answer: 5", "4", 0.0),  # wrong: 0
    ("x = 1/2 so 0.5 yes", "\\boxed{\\frac{1}{2}}", "0.5", 1 - len("x = 1/2 so 0.5") / len("x = 1/2 so 0.5 yes")),  # gold form found
])
def test_lcr1_compress(thinking: str, answer: str, gold: str, expected: float) -> None:
    r = LCR1Compress()
    out = r(completions=[f"<think>{thinking}</think> {answer}"], answer=[gold])
    assert out == [pytest.approx(expected)]


def test_lcr1_compress_no_thinking_and_tokens() -> None:
    r = LCR1Compress(correctness=EXACT)
    assert r(completions=["Answer: 4"], answer=["4"]) == [-1.0]  # correct, no thinking: never found

    class Words:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
            return text.split()

    rt = LCR1Compress(correctness=EXACT, tokenizer=Words())
    assert rt(completions=["<think>a b 4 c d e</think> Answer: 4"], answer=["4"]) == [pytest.approx(0.5)]


@pytest.mark.parametrize("thinking, answers, expected", [
    ("so 72.", ["72"], len("so 72")),  # sentence dot after the answer is fine
    ("172 and 72", ["72"], len("172 and 72")),  # not inside 172
    ("7.5 then 7", ["7"], len("7.5 then 7")),  # not the integer part of 7.5
    ("x=-3", ["-3"], 4),  # answers starting with a sign
    ("none here", ["72"], None),  # absent
    ("b then a", ["a", "b"], 1),  # the earliest of several forms
])
def test_answer_end(thinking: str, answers: list[str], expected: int | None) -> None:
    assert answer_end(thinking, answers) == expected


# ---------------------------------------------------------------- batch-order invariance


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 50), st.booleans()), min_size=1, max_size=10),
       data=st.data())
def test_group_rewards_are_invariant_to_batch_order(rows: list[tuple[int, int, bool]], data: Any) -> None:
    perm = data.draw(st.permutations(range(len(rows))))
    for r in (KimiLength(correctness=EXACT), LCR1Length(correctness=EXACT), EffortReward(correctness=EXACT)):
        def run(rs: list[tuple[int, int, bool]], reward: RewardFunction = r) -> list[float | None]:
            texts = [f"<think>{' '.join(['w'] * n)}</think> Answer: {4 if c else 5}" for _, n, c in rs]
            return reward(completions=texts, completion_ids=[[0] * (2 * n + 3) for _, n, _ in rs],
                          answer=["4"] * len(rs), prompt_id=[p for p, _, _ in rs], effort=[0.7] * len(rs))

        base = run(rows)
        shuffled = run([rows[i] for i in perm])
        assert shuffled == pytest.approx([base[i] for i in perm])
