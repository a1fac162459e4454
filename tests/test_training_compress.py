"""The ``compress`` recipe (LC-R1, ThinkPrune, Kimi): parameters, rows, rewards and weights, evaluation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

import budgetlm.strategies
from budgetlm.errors import ConfigError
from budgetlm.evals.suites.base import EvalItem
from budgetlm.rewards import Correctness, KimiLength, LCR1Compress, LCR1Length, ThinkPrune
from budgetlm.training import RECIPES, RecipeContext
from budgetlm.training.base import base_row
from budgetlm.training.compress import CompressParams, CompressRecipe


def items(n: int = 4) -> list[EvalItem]:
    return [EvalItem(id=f"c{i}", messages=[{"role": "user", "content": f"{i} + {i} = ?"}], gold=str(2 * i))
            for i in range(n)]


def ctx(tmp_path: Path, max_completion_length: int = 256) -> RecipeContext:
    return RecipeContext(model="default", output_dir=tmp_path, max_completion_length=max_completion_length)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("params, needle", [
    ({"limit": 0}, "limit"),  # ThinkPrune limit of zero tokens
    ({"limit": -8}, "limit"),  # negative limit
    ({"length_weight": -1.0}, "length_weight"),  # a length bonus
    ({"compress_weight": -0.5}, "compress_weight"),  # a compress bonus
    ({"method": "l1"}, "method"),  # unknown method
    ({"methd": "kimi"}, "methd"),  # unknown field (typo)
])
def test_params_errors(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        CompressRecipe(params)
    msg = str(err.value)
    assert "recipe 'compress'" in msg and needle in msg


def test_defaults_and_registry() -> None:
    assert RECIPES.get("compress") is CompressRecipe
    p = CompressRecipe().params
    assert isinstance(p, CompressParams)
    assert (p.method, p.limit, p.length_weight, p.compress_weight, p.grader) == ("lcr1", None, 1.0, 1.0, "auto")
    assert CompressRecipe({"length_weight": 0, "compress_weight": 0}).params.length_weight == 0  # zero is allowed


# ---------------------------------------------------------------- rows


def test_rows_are_the_base_rows(tmp_path: Path) -> None:
    its = items()
    rows = CompressRecipe({"method": "kimi"}).build_rows(its, random.Random(0), ctx(tmp_path))
    assert rows == [base_row(it) for it in its]
    assert rows[1] == {"prompt": [{"role": "user", "content": "1 + 1 = ?"}], "answer": "2", "prompt_id": "c1", "entry": ""}
    assert all("target_tokens" not in r and "effort" not in r for r in rows)  # no control line, no target


def test_rows_do_not_depend_on_the_seed(tmp_path: Path) -> None:
    r = CompressRecipe()
    assert r.build_rows(items(), random.Random(0), ctx(tmp_path)) == r.build_rows(items(), random.Random(9), ctx(tmp_path))


# ---------------------------------------------------------------- rewards


@pytest.mark.parametrize("params, types, weights", [
    ({}, [Correctness, LCR1Length, LCR1Compress], [1.0, 1.0, 1.0]),  # LC-R1 by default
    ({"method": "lcr1", "length_weight": 0.5, "compress_weight": 2.0},
     [Correctness, LCR1Length, LCR1Compress], [1.0, 0.5, 2.0]),  # LC-R1 weights
    ({"method": "kimi"}, [Correctness, KimiLength], [1.0, 1.0]),  # Kimi length penalty
    ({"method": "kimi", "length_weight": 0.25}, [Correctness, KimiLength], [1.0, 0.25]),  # Kimi weight
    ({"method": "thinkprune"}, [ThinkPrune], None),  # one reward, no weights
])
def test_rewards_per_method(tmp_path: Path, params: dict[str, Any], types: list[type], weights: list[float] | None) -> None:
    r = CompressRecipe(params)
    c = ctx(tmp_path)
    rewards = r.rewards(r.build_rows(items(), random.Random(0), c), c)
    assert [type(x) for x in rewards] == types
    assert r.reward_weights() == weights
    if weights is not None:
        assert len(weights) == len(rewards)  # TRL needs one weight per reward
    # every graded reward judges with the same grader (math for rows without entries)
    judges = [x if isinstance(x, Correctness) else x.judge for x in rewards]
    assert {j.grader for j in judges} == {"math"}
    assert len({x.__name__ for x in rewards}) == len(rewards)  # distinct names in TRL's logs


@pytest.mark.parametrize("params, max_len, limit", [
    ({"method": "thinkprune"}, 256, 128),  # default: half of max_completion_length
    ({"method": "thinkprune"}, 101, 50),  # floor division
    ({"method": "thinkprune"}, 1, 1),  # never below one token
    ({"method": "thinkprune", "limit": 40}, 256, 40),  # an explicit limit wins
])
def test_thinkprune_limit(tmp_path: Path, params: dict[str, Any], max_len: int, limit: int) -> None:
    [reward] = CompressRecipe(params).rewards([], ctx(tmp_path, max_len))
    assert isinstance(reward, ThinkPrune) and reward.limit == limit


def test_thinkprune_end_to_end(tmp_path: Path) -> None:
    r = CompressRecipe({"method": "thinkprune", "grader": "exact"})
    [reward] = r.rewards([], ctx(tmp_path, 20))  # limit 10
    out = reward(completions=["Answer: 4", "Answer: 4", "Answer: 5"], completion_ids=[[0] * 10, [0] * 11, [0] * 3],
                 answer=["4", "4", "4"])
    assert out == [1.0, 0.0, 0.0]  # right within the limit; right but over it; wrong


def test_explicit_grader(tmp_path: Path) -> None:
    rewards = CompressRecipe({"method": "kimi", "grader": "numeric"}).rewards([], ctx(tmp_path))
    assert rewards[0].grader == "numeric" and rewards[1].judge.grader == "numeric"


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("method", ["lcr1", "thinkprune", "kimi"])
def test_eval_strategies_are_greedy_sample(method: str) -> None:
    [spec] = CompressRecipe({"method": method}).eval_strategies(max_tokens=300)
    assert (spec.name, spec.label) == ("sample", "greedy")
    assert spec.params == {"temperature": 0.0, "max_tokens": 300}
    s = budgetlm.strategies.get(spec.name, **spec.params)
    assert s.params()["temperature"] == 0.0
