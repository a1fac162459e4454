"""The ``effort`` recipe (L1 LCPO-Exact/Max, e1 effort): parameter validation, training rows, rewards,
evaluation strategies, a full reward call in TRL's convention, and EffortReward's ``length`` field."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import budgetlm.strategies
from budgetlm.errors import ConfigError
from budgetlm.evals import suites
from budgetlm.evals.suites.base import EvalItem
from budgetlm.rewards import Correctness, EffortReward, LCPOExact, LCPOMax
from budgetlm.strategies.controlled import control_instruction
from budgetlm.training import RECIPES, RecipeContext
from budgetlm.training.effort import EffortParams, EffortRecipe

RG_SUITE = ("reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=5&seed=1"
            "&split=calibration&test_size=5")


def items(n: int = 6) -> list[EvalItem]:
    """Hand-made items "What is i+1?" with gold i+1 (no reasoning-gym entry)."""
    return [EvalItem(id=f"q{i}", messages=[{"role": "user", "content": f"What is {i}+1?"}], gold=str(i + 1),
                     question=f"What is {i}+1?") for i in range(n)]


@pytest.fixture
def ctx(tmp_path: Path) -> RecipeContext:
    return RecipeContext(model="default", output_dir=tmp_path, seed=0, max_completion_length=64)


@pytest.fixture(scope="module")
def rg_items() -> list[EvalItem]:
    return suites.get(RG_SUITE).items()


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("params, needle", [
    ({"target_range": (0, 10)}, "target_range"),  # a zero target
    ({"target_range": (10, 5)}, "target_range"),  # low above high
    ({"target_range": (-5, 10)}, "target_range"),  # negative low
    ({"targets": [0]}, "targets"),  # a zero target in the list
    ({"targets": []}, "targets"),  # an empty list
    ({"targets": [10, -1]}, "targets"),  # one negative among valid ones
    ({"efforts": [0]}, "efforts"),  # zero effort
    ({"efforts": [1.2]}, "efforts"),  # above 1
    ({"efforts": []}, "efforts"),  # nothing to draw
    ({"alpha": 0}, "alpha"),  # no length penalty
    ({"alpha": -0.01}, "alpha"),  # a length bonus
    ({"mode": "exact", "count": "thinking"}, "count"),  # L1 counts every token
    ({"mode": "max", "count": "thinking"}, "count"),  # the same for LCPO-Max
    ({"mode": "lcpo"}, "mode"),  # unknown mode
    ({"average": "median"}, "average"),  # unknown T_avg estimate
    ({"eval_targets": [0, 16]}, "eval_targets"),  # a zero evaluation target
    ({"mode": "effort", "eval_targets": [50, 150]}, "eval_targets"),  # an effort of 150% cannot be evaluated
    ({"target_rnage": (1, 2)}, "target_rnage"),  # unknown field (typo)
])
def test_params_errors_name_the_recipe_and_field(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        EffortRecipe(params)
    msg = str(err.value)
    assert "recipe 'effort'" in msg and needle in msg


def test_registered_and_defaults() -> None:
    assert RECIPES.get("effort") is EffortRecipe
    p = EffortRecipe().params
    assert isinstance(p, EffortParams)
    assert (p.mode, p.target_range, p.targets, p.count, p.grader) == ("exact", (16, 128), None, "completion", "auto")
    assert p.max_target() == 128 and EffortRecipe({"targets": [5, 90, 40]}).params.max_target() == 90
    assert EffortRecipe({"mode": "effort", "count": "thinking"}).params.count == "thinking"  # fine for e1


def test_describe_records_the_validated_params() -> None:
    d = EffortRecipe({"mode": "max", "target_range": [8, 32]}).describe()
    assert d["name"] == "effort" and d["params"]["mode"] == "max" and tuple(d["params"]["target_range"]) == (8, 32)


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize("params, key, allowed", [
    ({}, "target_tokens", set(range(16, 129))),  # the default range
    ({"target_range": (5, 7)}, "target_tokens", {5, 6, 7}),  # a closed range
    ({"target_range": (9, 9)}, "target_tokens", {9}),  # a single value
    ({"targets": [10, 50, 90]}, "target_tokens", {10, 50, 90}),  # a list
    ({"mode": "max", "targets": [33]}, "target_tokens", {33}),  # LCPO-Max
    ({"mode": "effort"}, "effort", {0.25, 0.5, 0.75, 1.0}),  # e1's default efforts
    ({"mode": "effort", "efforts": [0.3]}, "effort", {0.3}),  # one effort
])
def test_rows_end_with_the_control_instruction(ctx: RecipeContext, params: dict[str, Any], key: str,
                                               allowed: set[float]) -> None:
    r = EffortRecipe(params)
    its = items()
    before = [dict(m) for it in its for m in it.messages]
    rows = r.build_rows(its, random.Random(0), ctx)
    assert len(rows) == len(its)
    other = "effort" if key == "target_tokens" else "target_tokens"
    for row, it in zip(rows, its):
        value = row[key]
        assert value in allowed and other not in row
        assert row["prompt"] == [{"role": "user", "content": f"{it.messages[0]['content']}\n\n"
                                  f"{control_instruction(r.params.mode, value)}"}]
        assert (row["prompt_id"], row["answer"], row["entry"]) == (it.id, it.gold, "")
    assert [dict(m) for it in its for m in it.messages] == before  # items are not edited


def test_rows_are_reproducible_with_the_same_seed(ctx: RecipeContext) -> None:
    r = EffortRecipe()
    a = r.build_rows(items(10), random.Random(0), ctx)
    b = r.build_rows(items(10), random.Random(0), ctx)
    c = r.build_rows(items(10), random.Random(1), ctx)
    assert a == b
    assert [x["target_tokens"] for x in a] != [x["target_tokens"] for x in c]  # another seed, other targets
    assert len({x["target_tokens"] for x in a}) > 1  # drawn per example, not once


def test_rows_from_a_reasoning_gym_suite_carry_the_entry(ctx: RecipeContext, rg_items: list[EvalItem]) -> None:
    assert len(rg_items) == 5
    rows = EffortRecipe({"target_range": (8, 24)}).build_rows(rg_items, random.Random(0), ctx)
    for row, it in zip(rows, rg_items):
        assert row["prompt_id"] == it.id and row["answer"] == str(it.gold)
        assert 8 <= row["target_tokens"] <= 24
        assert row["prompt"][-1]["content"].endswith(f"\n\nThink for {row['target_tokens']} tokens.")
        entry = json.loads(row["entry"])
        assert entry["answer"] == str(it.gold) and entry["metadata"]["source_dataset"] == "chain_sum"
        json.dumps(row)  # a JSON-ready row (dataset.jsonl, datasets.Dataset)


def test_an_item_without_gold_is_an_error(ctx: RecipeContext) -> None:
    bad = EvalItem(id="x", messages=[{"role": "user", "content": "q"}], gold=None)
    with pytest.raises(ConfigError, match="no gold answer"):
        EffortRecipe().build_rows([bad], random.Random(0), ctx)


# ---------------------------------------------------------------- rewards


@pytest.mark.parametrize("params, cls, alpha", [
    ({}, LCPOExact, 1.2 / 128),  # α = 1.2 / the top of the default range
    ({"target_range": (4, 40)}, LCPOExact, 1.2 / 40),  # the top of another range
    ({"targets": [10, 60, 30]}, LCPOExact, 1.2 / 60),  # the largest listed target
    ({"alpha": 0.01}, LCPOExact, 0.01),  # an explicit α wins
    ({"alpha": 0.01, "targets": [5]}, LCPOExact, 0.01),  # ... also over a targets list
    ({"mode": "max"}, LCPOMax, 1.2 / 128),  # LCPO-Max, automatic α
    ({"mode": "max", "alpha": 0.002}, LCPOMax, 0.002),  # LCPO-Max, explicit α
])
def test_lcpo_rewards(ctx: RecipeContext, params: dict[str, Any], cls: type, alpha: float) -> None:
    r = EffortRecipe(params)
    [reward] = r.rewards(r.build_rows(items(3), random.Random(0), ctx), ctx)
    assert type(reward) is cls
    assert reward.alpha == pytest.approx(alpha) == r.alpha()
    assert r.reward_weights() is None


def test_lcpo_max_takes_delta(ctx: RecipeContext) -> None:
    [reward] = EffortRecipe({"mode": "max", "delta": 0.3}).rewards([], ctx)
    assert isinstance(reward, LCPOMax) and reward.delta == pytest.approx(0.3)


@pytest.mark.parametrize("params, mode, length", [
    ({"mode": "effort"}, "group", "completion"),  # defaults: group mean, every token
    ({"mode": "effort", "average": "ema"}, "ema", "completion"),  # per-prompt moving average
    ({"mode": "effort", "count": "thinking"}, "group", "thinking"),  # e1's thinking tokens
])
def test_effort_reward(ctx: RecipeContext, params: dict[str, Any], mode: str, length: str) -> None:
    [reward] = EffortRecipe(params).rewards(EffortRecipe(params).build_rows(items(2), random.Random(0), ctx), ctx)
    assert type(reward) is EffortReward
    assert (reward.mode, reward.length) == (mode, length)


@pytest.mark.parametrize("rg, grader, expected", [
    (True, "auto", "reasoning_gym"),  # every row has an entry
    (False, "auto", "math"),  # hand-made items: math-verify
    (True, "exact", "exact"),  # an explicit grader wins
    (False, "numeric", "numeric"),  # ... on any rows
])
def test_grader_choice(ctx: RecipeContext, rg_items: list[EvalItem], rg: bool, grader: str, expected: str) -> None:
    r = EffortRecipe({"grader": grader})
    rows = r.build_rows(rg_items if rg else items(), random.Random(0), ctx)
    [reward] = r.rewards(rows, ctx)
    assert reward.judge.grader == expected


def test_auto_grader_needs_an_entry_on_every_row(ctx: RecipeContext, rg_items: list[EvalItem]) -> None:
    r = EffortRecipe()
    rows = r.build_rows([*rg_items, *items(1)], random.Random(0), ctx)  # one row without an entry
    assert r.rewards(rows, ctx)[0].judge.grader == "math"
    assert r.rewards([], ctx)[0].judge.grader == "math"  # no rows at all


# ---------------------------------------------------------------- evaluation strategies


@pytest.mark.parametrize("params, labels, key, values", [
    ({}, ["exact=16", "exact=72", "exact=128"], "target_tokens", [16, 72, 128]),  # low, middle, high of the range
    ({"mode": "max", "target_range": (10, 20)}, ["max=10", "max=15", "max=20"], "target_tokens", [10, 15, 20]),  # LCPO-Max
    ({"target_range": (32, 32)}, ["exact=32"], "target_tokens", [32]),  # a one-value range: one entry
    ({"targets": [40, 8, 40]}, ["exact=8", "exact=40"], "target_tokens", [8, 40]),  # listed targets, sorted, unique
    ({"eval_targets": [20, 50]}, ["exact=20", "exact=50"], "target_tokens", [20, 50]),  # eval_targets win
    ({"mode": "effort"}, ["effort=0.25", "effort=0.5", "effort=0.75", "effort=1.0"], "effort",
     [0.25, 0.5, 0.75, 1.0]),  # the training efforts
    ({"mode": "effort", "efforts": [1.0, 0.5, 0.5]}, ["effort=0.5", "effort=1.0"], "effort", [0.5, 1.0]),  # sorted
    ({"mode": "effort", "eval_targets": [50, 100]}, ["effort=0.5", "effort=1.0"], "effort", [0.5, 1.0]),  # percent
])
def test_eval_strategies(params: dict[str, Any], labels: list[str], key: str, values: list[float]) -> None:
    r = EffortRecipe(params)
    specs = r.eval_strategies(max_tokens=256)
    assert [s.label for s in specs] == labels
    assert [s.params[key] for s in specs] == pytest.approx(values)
    for s in specs:
        assert s.name == "controlled"
        assert s.params["mode"] == r.params.mode and s.params["temperature"] == 0.0 and s.params["max_tokens"] == 256
        strategy = budgetlm.strategies.get(s.name, **s.params)  # every entry builds
        assert strategy.max_tokens == 256


def test_eval_grid_is_both_models_times_the_strategies() -> None:
    models, specs = EffortRecipe().eval_grid("hf:default", "hf:/runs/x/model", 64)
    assert models == ["hf:default", "hf:/runs/x/model"]
    assert [s.params["target_tokens"] for s in specs] == [16, 72, 128]


# ---------------------------------------------------------------- full reward call (TRL's convention)


def trl_call(reward: Any, rows: list[dict[str, Any]], texts: list[list[str]], lengths: list[list[int]]) -> list[float]:
    """Call ``reward`` the way GRPOTrainer does: each row repeated per completion, columns as keywords."""
    flat = [(row, t, n) for row, ts, ns in zip(rows, texts, lengths) for t, n in zip(ts, ns, strict=True)]
    columns = {k: [row[k] for row, _, _ in flat] for k in rows[0] if k != "prompt"}
    return reward(prompts=[row["prompt"] for row, _, _ in flat],
                  completions=[[{"role": "assistant", "content": t}] for _, t, _ in flat],
                  completion_ids=[[7] * n for _, _, n in flat], **columns)


def test_lcpo_exact_end_to_end(ctx: RecipeContext) -> None:
    r = EffortRecipe()
    rows = r.build_rows(items(3), random.Random(0), ctx)
    [reward] = r.rewards(rows, ctx)
    texts = [[f"Answer: {row['answer']}", "Answer: -3"] for row in rows]  # right, wrong per prompt
    lengths = [[10, 100], [64, 5], [128, 16]]
    out = trl_call(reward, rows, texts, lengths)
    alpha = 1.2 / 128
    expected = [float(ok) - alpha * abs(row["target_tokens"] - n)
                for row, ns in zip(rows, lengths) for ok, n in zip((True, False), ns)]
    assert out == pytest.approx(expected)
    # a correct completion exactly at its target earns the full 1.0
    t = rows[0]["target_tokens"]
    assert trl_call(reward, rows[:1], [[f"Answer: {rows[0]['answer']}"]], [[t]]) == [pytest.approx(1.0)]


def test_lcpo_max_end_to_end(ctx: RecipeContext) -> None:
    r = EffortRecipe({"mode": "max", "targets": [40], "alpha": 0.01})
    rows = r.build_rows(items(1), random.Random(0), ctx)
    [reward] = r.rewards(rows, ctx)
    ok = f"Answer: {rows[0]['answer']}"
    out = trl_call(reward, rows, [[ok, ok, ok, "Answer: -3"]], [[40, 10, 200, 10]])
    assert out == pytest.approx([0.5, 0.8, 0.0, 0.0])  # clip(0.01·(40 − n) + 0.5, 0, 1); wrong: 0


def test_reasoning_gym_rows_end_to_end(ctx: RecipeContext, rg_items: list[EvalItem]) -> None:
    r = EffortRecipe({"target_range": (20, 20), "alpha": 0.01})
    rows = r.build_rows(rg_items[:2], random.Random(0), ctx)
    [reward] = r.rewards(rows, ctx)
    assert reward.judge.grader == "reasoning_gym"
    texts = [[f"Answer: {row['answer']}", "Answer: 999"] for row in rows]
    out = trl_call(reward, rows, texts, [[20, 20], [30, 10]])
    assert out == pytest.approx([1.0, 0.0, 1.0 - 0.1, -0.1])


def test_effort_end_to_end(ctx: RecipeContext) -> None:
    r = EffortRecipe({"mode": "effort", "efforts": [0.5]})
    rows = r.build_rows(items(1), random.Random(0), ctx)
    [reward] = r.rewards(rows, ctx)
    ok = f"Answer: {rows[0]['answer']}"
    # completion lengths 10, 20, 30 (mean 20, bound 0.5·20 = 10) and a wrong short one (length 20)
    out = trl_call(reward, rows, [[ok, ok, ok, "Answer: -3"]], [[10, 20, 30, 20]])
    assert out == [1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------- EffortReward.length


def split_words(text: str) -> list[str]:
    """A tokenizer: whitespace words."""
    return text.split()


SHORT_THINK = "<think>a</think> Answer: 4"  # 1 thinking word
LONG_THINK = "<think>a b c d e f g</think> Answer: 4"  # 7 thinking words


@pytest.mark.parametrize("length, ids, expected", [
    # thinking: ℓ = 1 and 7, T_avg = 4, bound 0.5·4 = 2 → the short thinker passes
    ("thinking", [10, 2], [1.0, 0.0]),
    # completion: ℓ = 10 and 2 (the ids), T_avg = 6, bound 3 → the short completion passes
    ("completion", [10, 2], [0.0, 1.0]),
    # completion with equal ids: ℓ = 4 = T_avg, bound 2 → neither passes
    ("completion", [4, 4], [0.0, 0.0]),
    # thinking ignores the completion lengths entirely
    ("thinking", [4, 4], [1.0, 0.0]),
])
def test_effort_reward_length_counts(length: str, ids: list[int], expected: list[float]) -> None:
    r = EffortReward(length=length, correctness=Correctness("exact"), tokenizer=split_words)
    out = r(completions=[SHORT_THINK, LONG_THINK], completion_ids=[[0] * n for n in ids], answer=["4", "4"],
            effort=[0.5, 0.5], prompt_id=[0, 0])
    assert out == expected


@pytest.mark.parametrize("length", ["tokens", "", "Thinking"])
def test_effort_reward_bad_length(length: str) -> None:
    with pytest.raises(ConfigError, match="`length`"):
        EffortReward(length=length)


def test_effort_reward_default_length_is_thinking() -> None:
    assert EffortReward().length == "thinking"
