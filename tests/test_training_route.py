"""The ``route`` recipe: rows from boundary outcomes, the reward, the evaluation grid, parameters, and the
boundary runs through the real evaluation runner (scripted agent, and the real default model)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from budgetlm.errors import ConfigError
from budgetlm.evals.records import read_records
from budgetlm.evals.suites import get as get_suite
from budgetlm.evals.suites.base import EvalItem
from budgetlm.rewards import RouteChoiceReward
from budgetlm.routing import get as get_router
from budgetlm.strategies import get as get_strategy
from budgetlm.training.base import RECIPES, RecipeContext
from budgetlm.training.route import BOUNDARY_DIR, RouteRecipe

SUITE = "kb_agent?size=3&seed=1"
COLUMNS = {"prompt", "answer", "prompt_id", "entry", "step", "success_small", "success_large", "cost_small",
           "cost_large", "boundary_class"}


def items(spec: str = SUITE) -> list[EvalItem]:
    return get_suite(spec).items()


def ctx(tmp_path: Path, suite: Any = SUITE) -> RecipeContext:
    return RecipeContext(model="default", output_dir=tmp_path, seed=1, extra={} if suite is None else {"suite": suite})


def outcome(ok_s: bool, ok_l: bool, c_s: int, c_l: int, steps_l: int) -> dict[str, Any]:
    return {"success_small": ok_s, "success_large": ok_l, "cost_small": c_s, "cost_large": c_l,
            "model_steps_small": 1, "model_steps_large": steps_l}


def patched(monkeypatch: pytest.MonkeyPatch, outcomes: dict[str, dict[str, Any]]) -> None:
    monkeypatch.setattr(RouteRecipe, "boundary_outcomes", lambda self, its, c: outcomes)


def test_build_rows_from_boundary_outcomes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    its = items()
    patched(monkeypatch, {
        its[0].id: outcome(True, True, 40, 90, 6),  # easy, many large steps: capped at max_rows_per_task
        its[1].id: outcome(False, True, 70, 120, 2),  # hard, 2 large steps: 2 rows
        its[2].id: outcome(False, False, 80, 150, 0),  # intractable, no model step recorded: still 1 row
    })
    recipe = RouteRecipe({"max_rows_per_task": 3, "agent": {"max_steps": 5}})
    rows = recipe.build_rows(its, random.Random(0), ctx(tmp_path))
    assert [(r["prompt_id"], r["step"]) for r in rows] == [
        (its[0].id, 0), (its[0].id, 1), (its[0].id, 2), (its[1].id, 0), (its[1].id, 1), (its[2].id, 0)]
    for r in rows:
        assert set(r) == COLUMNS
        text = r["prompt"][0]["content"]
        assert f"Next step: {r['step'] + 1} of 5" in text and f"Tool calls so far: {r['step']}" in text
        assert text.endswith("Answer with one word: small or large.")
    assert [r["boundary_class"] for r in rows] == ["easy"] * 3 + ["hard"] * 2 + ["intractable"]
    assert (rows[3]["success_small"], rows[3]["success_large"], rows[3]["cost_small"], rows[3]["cost_large"]) == (
        False, True, 70, 120)
    assert rows[0]["answer"] == str(its[0].gold)


def test_rows_feed_the_reward(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    its = items()[:2]
    patched(monkeypatch, {its[0].id: outcome(True, True, 40, 90, 1), its[1].id: outcome(False, True, 70, 120, 1)})
    recipe = RouteRecipe({"invalid_reward": -0.25})
    rows = recipe.build_rows(its, random.Random(0), ctx(tmp_path))
    [reward] = recipe.rewards(rows, ctx(tmp_path))
    assert isinstance(reward, RouteChoiceReward) and reward.invalid_reward == -0.25 and reward.success_floor == 0.5
    columns = {k: [r[k] for r in rows] for k in COLUMNS - {"prompt"}}
    assert reward(prompts=[r["prompt"] for r in rows], completions=["small", "small"], **columns) == [1.0, 0.0]
    assert reward(completions=["large", "large"], **columns) == [0.5, 0.5]  # the success floor
    assert reward(completions=["?", "?"], **columns) == [-0.25, -0.25]
    plain = RouteRecipe({"success_floor": 0.0}).rewards(rows, ctx(tmp_path))[0]
    assert plain(completions=["large", "large"], **columns) == [0.0, 0.0]  # the plain boundary reward


def test_tasks_without_outcome_are_left_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    its = items()
    patched(monkeypatch, {its[1].id: outcome(True, False, 1, 2, 1)})
    with pytest.warns(UserWarning, match=r"2 task\(s\) have no usable boundary run"):
        rows = RouteRecipe().build_rows(its, random.Random(0), ctx(tmp_path))
    assert [r["prompt_id"] for r in rows] == [its[1].id]
    patched(monkeypatch, {})
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match=r"built no rows from 3 item"):
        RouteRecipe().build_rows(its, random.Random(0), ctx(tmp_path))


def test_eval_grid() -> None:
    recipe = RouteRecipe({"agent_model": "vllm:default", "agent": {"max_steps": 4}, "budget": {"output_tokens": 300}})
    models, strategies = recipe.eval_grid("default", "hf:/ckpt", max_tokens=64)
    assert models == ["vllm:default"]
    assert [s.label for s in strategies] == ["always_small", "always_large", "policy=base", "policy=trained"]
    assert all(s.name == "agent" and s.params["max_steps"] == 4 and s.budgets == [{"output_tokens": 300}]
               for s in strategies)
    assert [s.params["router"] for s in strategies[:2]] == ["always_small", "always_large"]
    assert strategies[2].params["router"] == {"name": "lm_policy", "params": {"model": "hf:default"}}
    assert strategies[3].params["router"] == {"name": "lm_policy", "params": {"model": "hf:/ckpt"}}
    assert strategies[3].params["threshold"] == 0.5
    assert recipe.eval_strategies(64) == strategies[:2]
    for s in strategies:  # every entry builds (the lm_policy router loads its model lazily)
        get_strategy(s.name, **s.params)
    assert get_router(strategies[3].params["router"]).model == "hf:/ckpt"


def test_registered_and_described() -> None:
    assert RECIPES.get("route") is RouteRecipe
    d = RouteRecipe().describe()
    assert d["name"] == "route" and d["params"]["agent_model"] == "default" and d["params"]["max_rows_per_task"] == 4
    assert RouteRecipe().max_steps() == 8 and RouteRecipe({"agent": {"max_steps": 3}}).max_steps() == 3


@pytest.mark.parametrize("params, match", [
    ({"nope": 1}, r"unknown field `nope` in RouteParams"),  # a typo in the recipe block
    ({"agent": {"router": "always_large"}}, r"`agent` must not set router"),  # the recipe sets the routers
    ({"agent": {"threshold": 0.3}}, r"`agent` must not set threshold"),  # ... and the thresholds
    ({"agent": {"max_step": 3}}, r"unknown parameter\(s\) 'max_step' for strategy 'agent'"),  # agent param typo
    ({"agent": {"models": []}}, r"`models` must have at least 1 item\(s\), got \[\]"),  # invalid agent param value
    ({"budget": {}}, r"`budget` must set at least one limit"),  # no limit at all
    ({"budget": {"output_tokens": 0}}, r"`budget.output_tokens` must be > 0"),  # a zero limit
    ({"budget": {"tokens": 5}}, r"unknown budget unit `tokens`"),  # a unit that does not exist
    ({"max_rows_per_task": 0}, r"`max_rows_per_task` must be >= 1"),  # no rows
    ({"batch_size": 0}, r"`batch_size` must be >= 1"),  # no batch
    ({"success_floor": 1.5}, r"`success_floor` must be in \[0, 1\]"),  # above the best reward
    ({"invalid_reward": float("nan")}, r"`invalid_reward`"),  # NaN would poison the advantages
    ({"agent_model": " "}, r"`agent_model` must be a backend spec"),  # an empty spec
])
def test_bad_params(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RouteRecipe(params)


def test_boundary_runs_need_the_suite(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs the suite spec in `ctx.extra\['suite'\]`"):
        RouteRecipe().boundary_outcomes(items(), ctx(tmp_path, suite=None))
    with pytest.raises(ConfigError, match=r"are not in suite"):
        RouteRecipe().boundary_outcomes(items(), ctx(tmp_path, suite="kb_agent?size=3&seed=2"))
    with pytest.raises(ConfigError, match=r"got no items"):
        RouteRecipe().boundary_outcomes([], ctx(tmp_path))


AGENT = {"max_steps": 2, "step_tokens": 32,
         "models": [{"label": "small", "n": 1}, {"label": "large", "n": 2, "temperature": 0.7}]}


def test_boundary_runs_through_the_runner_with_a_scripted_agent(tmp_path: Path) -> None:
    """The real runner on a scripted agent (it always answers 42): records, outcomes, the suite prefix, resuming."""
    its = items("kb_agent?size=4&seed=1")
    recipe = RouteRecipe({"agent_model": "scripted", "agent": AGENT, "budget": {"output_tokens": 64}, "batch_size": 2})
    c = ctx(tmp_path, "kb_agent?size=4&seed=1")
    out = recipe.boundary_outcomes(its[:2], c)
    recs = read_records(tmp_path / BOUNDARY_DIR / "records.jsonl")
    assert len(recs) == 4  # 2 items × 2 boundary policies: only the suite's prefix up to the last item ran
    assert {r.strategy for r in recs} == {"always_small", "always_large"}
    assert list(out) == [its[0].id, its[1].id]
    for o in out.values():
        assert o["success_small"] is False and o["success_large"] is False  # "42" is not a kb answer here
        assert o["cost_small"] == 2 and o["cost_large"] == 4  # "Answer: 42" is 2 tokens; large takes 2 samples
        assert o["model_steps_small"] == o["model_steps_large"] == 1
    rows = recipe.build_rows(its[1:3], random.Random(0), c)  # one item already run, one new
    assert len(read_records(tmp_path / BOUNDARY_DIR / "records.jsonl")) == 6  # only the new item ran
    assert [r["prompt_id"] for r in rows] == [its[1].id, its[2].id]
    recipe.build_rows(its[:3], random.Random(0), c)
    assert len(read_records(tmp_path / BOUNDARY_DIR / "records.jsonl")) == 6  # resumed: nothing re-ran


@pytest.mark.slow
def test_boundary_runs_on_the_real_default_model(tmp_path: Path) -> None:
    suite = "kb_agent?size=2&seed=1&difficulty=1"
    its = items(suite)
    recipe = RouteRecipe({"agent_model": "hf:default", "agent": AGENT, "budget": {"output_tokens": 160},
                          "max_rows_per_task": 2})
    c = ctx(tmp_path, suite)
    rows = recipe.build_rows(its, random.Random(0), c)
    path = tmp_path / BOUNDARY_DIR / "records.jsonl"
    recs = read_records(path)
    assert len(recs) == 4 and not any(r.error or r.over_budget for r in recs)
    assert {r.item_id for r in recs} == {it.id for it in its}
    by = {(r.item_id, r.strategy): r for r in recs}
    assert {r["prompt_id"] for r in rows} == {it.id for it in its}
    for r in rows:
        assert set(r) == COLUMNS and 1 <= len([x for x in rows if x["prompt_id"] == r["prompt_id"]]) <= 2
        small, large = by[(r["prompt_id"], "always_small")], by[(r["prompt_id"], "always_large")]
        assert (r["success_small"], r["cost_small"]) == (small.correct, small.output_tokens)
        assert (r["success_large"], r["cost_large"]) == (large.correct, large.output_tokens)
        assert 0 < r["cost_small"] <= 160 and 0 < r["cost_large"] <= 160  # real spend, within the budget
    before = path.read_text()
    again = recipe.build_rows(its, random.Random(0), c)
    assert path.read_text() == before and again == rows  # resumed from the records: nothing re-ran


@pytest.mark.parametrize("spec, expected", [
    ("vllm:default", "hf:default"),  # the policy never starts a second vLLM engine
    ("vllm:/ckpt/model", "hf:/ckpt/model"),  # a trained checkpoint
    ("hf:/ckpt/model", "hf:/ckpt/model"),  # already transformers
    ("default", "hf:default"),  # the bare default spec
])
def test_policy_specs_load_with_transformers(spec: str, expected: str) -> None:
    from budgetlm.training.route import _hf

    assert _hf(spec) == expected
    _, strategies = RouteRecipe({}).eval_grid(spec, spec, 64)
    assert [s.params["router"]["params"]["model"] for s in strategies if s.label.startswith("policy=")] == [expected] * 2


def test_agent_close_closes_a_model_backed_router() -> None:
    from budgetlm.routing import Router
    from budgetlm.strategies import get

    class Closing(Router):
        name = "closing"
        closed = 0

        def score(self, queries, backend=None, meters=None):  # type: ignore[no-untyped-def]
            return [0.0 for _ in queries]

        def close(self) -> None:
            Closing.closed += 1

    strategy = get("agent", router=Closing())
    strategy.close()
    assert Closing.closed == 1
