"""The ``route`` recipe: train a chat model to route an agent's steps between a small and a large model.

Budget-Aware Agentic Routing / BoPO (arXiv 2602.21227): at every step of a tool-using agent under a
per-task budget, a policy picks the small or the large model; training is guided by the two
*boundary policies*, always-small and always-large, whose outcomes on a task set its class (easy:
small succeeds; hard: only large does; intractable: neither) and the reward's cost scale
(ALGORITHMS.md §8, :class:`~budgetlm.rewards.BoundaryRoutingReward`).

What the recipe does:

1. :meth:`RouteRecipe.boundary_outcomes` runs the ``agent`` strategy with the ``always_small`` and
   ``always_large`` routers on the suite (the offline multi-hop ``kb_agent`` benchmark of
   :mod:`budgetlm.evals.suites.kb_agent`, or any suite with tools) through the resumable evaluation
   runner, into ``OUTPUT/boundary``; re-running reuses the records on disk.
2. :meth:`RouteRecipe.build_rows` writes, per task, one row per step ``k`` (up to
   ``max_rows_per_task`` and the always-large run's model steps): the prompt is
   :func:`~budgetlm.routing.lm_policy.route_prompt` of the task at step ``k`` (``k`` tool calls so
   far), and the columns carry both boundary outcomes and the task's ``boundary_class``.
3. The reward is :class:`~budgetlm.rewards.RouteChoiceReward`: the word the policy answers
   (``small``/``large``) is credited with the outcome of the boundary policy that always takes it.
4. The final evaluation runs the agent on ``agent_model`` with both boundary routers and with the
   ``lm_policy`` router on the base and on the trained policy.

**Deviations (our choices).**  BoPO trains on whole rollouts of mixed trajectories; this recipe is a
*one-step (bandit) approximation*: a choice at a step is credited with the outcome of the boundary
policy that always takes that arm on the task, which ignores what the other steps would choose and
needs only the two boundary runs (no rollouts inside the trainer).  Costs are **output tokens**
(``EvalRecord.output_tokens`` of each boundary run).  Under the plain boundary-relative reward a
successful ``large`` earns 0 (its cost is ``C_large``), as much as a failure, so hard tasks would give
no signal; ``success_floor`` (default 0.5) pays a successful choice at least that much.  Training
prompts hold the task, the step and the tool calls, not the agent's transcript or the budget share
left, which the router's prompt also shows at inference.  All rows of a task share its
``prompt_id`` (the item id).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, cast

from pydantic import Field, ValidationInfo, field_validator

from budgetlm.backends import BackendSpec
from budgetlm.budget import check_limits
from budgetlm.errors import ConfigError
from budgetlm.evals.config import EvalConfig, StrategySpec, config_id
from budgetlm.evals.records import EvalRecord
from budgetlm.evals.rundir import RunDir
from budgetlm.evals.runner import run_eval
from budgetlm.evals.suites import get as get_suite
from budgetlm.evals.suites.base import EvalItem
from budgetlm.io import JsonObject
from budgetlm.rewards import RewardFunction, RouteChoiceReward, boundary_class
from budgetlm.routing.lm_policy import route_prompt
from budgetlm.strategies import get as get_strategy
from budgetlm.strategies.agent import Agent
from budgetlm.training.base import RECIPES, Recipe, RecipeContext, RecipeParams, base_row

__all__ = ["BOUNDARY_DIR", "RouteParams", "RouteRecipe"]

BOUNDARY_DIR = "boundary"
"""Folder under the run's directory that holds the boundary runs (an evaluation run folder)."""
ARMS: tuple[str, str] = ("small", "large")
"""The two arms, cheapest first, as the policy names them."""


class RouteParams(RecipeParams):
    """Parameters of the ``route`` recipe."""

    agent_model: str = Field(default="default", description="Backend spec of the agent's models (the policy trained is the run's model).")
    agent: dict[str, Any] = Field(default_factory=dict, description="Extra params of the `agent` strategy (max_steps, step_tokens, models, ...); not router or threshold.")
    budget: dict[str, float] = Field(default_factory=lambda: cast(dict[str, float], {"output_tokens": 1024}), description="Per-task budget of the boundary runs and of the final evaluation.")
    max_rows_per_task: int = Field(default=4, description="Most rows (steps 0, 1, ...) per task; also capped by the always-large run's model steps.")
    invalid_reward: float = Field(default=0.0, allow_inf_nan=False, description="Reward of a completion that names neither small nor large.")
    success_floor: float = Field(default=0.5, description="Least reward of a successful choice (0: the plain boundary-relative reward).")
    batch_size: int = Field(default=16, description="Tasks sent to the agent at once in the boundary runs.")

    @field_validator("agent_model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(f"`agent_model` must be a backend spec (default, hf:PATH, vllm:PATH, ...), got {v!r}")
        return v

    @field_validator("agent")
    @classmethod
    def _agent(cls, v: dict[str, Any]) -> dict[str, Any]:
        fixed = sorted(set(v) & {"router", "threshold"})
        if fixed:
            raise ValueError(f"`agent` must not set {', '.join(fixed)}, got {v!r}; the recipe sets the router of "
                             "each boundary run and of the evaluation")
        get_strategy("agent", **v, router="always_small")  # unknown or invalid agent parameters fail here
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("`budget` must set at least one limit, e.g. {output_tokens: 1024}, got {}")
        return check_limits(v, "budget")

    @field_validator("max_rows_per_task", "batch_size")
    @classmethod
    def _positive(cls, v: int, info: ValidationInfo) -> int:
        if v < 1:
            raise ValueError(f"`{info.field_name}` must be >= 1, got {v}")
        return v

    @field_validator("success_floor")
    @classmethod
    def _floor(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"`success_floor` must be in [0, 1], got {v}; 0 gives the plain boundary-relative reward")
        return v


def _hf(spec: str) -> str:
    """``spec`` as a transformers backend spec (``vllm:P`` → ``hf:P``; ``default`` → ``hf:default``)."""
    if spec == "default":
        return "hf:default"
    parsed = BackendSpec.parse(spec)
    return f"hf:{parsed.spec.partition(':')[2]}" if parsed.kind in ("vllm", "hf") else spec


class BoundaryOutcome(TypedDict):
    """A task's outcomes under the two boundary policies (:meth:`RouteRecipe.boundary_outcomes`)."""

    success_small: bool
    cost_small: int
    """Output tokens of the always-small run."""
    model_steps_small: int
    success_large: bool
    cost_large: int
    model_steps_large: int


class RouteRecipe(Recipe):
    """Rows of agent states labelled by the boundary policies' outcomes; the policy answers small or large."""

    name = "route"
    Params = RouteParams
    params: RouteParams

    # ------------------------------------------------------------------ strategies
    def max_steps(self) -> int:
        """The agent's step limit (its ``max_steps``, default 8)."""
        return int(self.params.agent.get("max_steps", Agent.Params.model_fields["max_steps"].default))

    def agent_spec(self, label: str, router: str | dict[str, object], threshold: float | None = None) -> StrategySpec:
        """An ``agent`` grid entry with the recipe's agent parameters, ``router`` and its budget."""
        params: dict[str, object] = {**self.params.agent, "router": router}
        if threshold is not None:
            params["threshold"] = threshold
        return StrategySpec(name="agent", label=label, params=params, budgets=[dict(self.params.budget)])

    def boundary_strategies(self) -> list[StrategySpec]:
        """The always-small and always-large agents, cheapest first."""
        return [self.agent_spec(f"always_{arm}", f"always_{arm}") for arm in ARMS]

    def eval_strategies(self, max_tokens: int) -> list[StrategySpec]:
        """The two boundary agents (the per-task budget is ``budget``; ``max_tokens`` is not used)."""
        return self.boundary_strategies()

    def eval_grid(self, base_model: str, trained_model: str, max_tokens: int) -> tuple[list[str], list[StrategySpec]]:
        """The agent on ``agent_model`` with the boundary routers and the ``lm_policy`` router on each policy."""
        # the policy runs next to the agent's own engine: load it with transformers, not a second vLLM engine
        policies = [self.agent_spec(f"policy={which}", {"name": "lm_policy", "params": {"model": _hf(spec)}}, 0.5)
                    for which, spec in (("base", base_model), ("trained", trained_model))]
        return [self.params.agent_model], [*self.eval_strategies(max_tokens), *policies]

    # ------------------------------------------------------------------ boundary runs
    def boundary_config(self, suite: str | dict[str, Any], seed: int, limit: int | None = None) -> EvalConfig:
        """The evaluation config of the boundary runs on ``suite``."""
        return EvalConfig(name="route-boundary", suites=[suite], models=[self.params.agent_model],
                          strategies=self.boundary_strategies(), budgets=[dict(self.params.budget)], seed=seed,
                          batch_size=self.params.batch_size, limit=limit)

    def boundary_outcomes(self, items: Sequence[EvalItem], ctx: RecipeContext) -> dict[str, BoundaryOutcome]:
        """Per item id: ``success_small/large`` (``correct``), ``cost_small/large`` (output tokens) and
        ``model_steps_small/large`` of the two boundary runs (run, or resumed, under ``OUTPUT/boundary``).

        The suite spec comes from ``ctx.extra["suite"]``.  Only the suite's items up to the last one in
        ``items`` are run; items whose run failed (a recorded error) are left out.
        """
        suite = ctx.extra.get("suite")
        if not isinstance(suite, str | dict):
            raise ConfigError("recipe 'route' needs the suite spec in `ctx.extra['suite']` (e.g. "
                              f"'kb_agent?size=100&seed=1'), got {suite!r}; the boundary runs evaluate that suite with the "
                              "agent, so pass the training suite there")
        wanted = {it.id for it in items}
        if not wanted:
            raise ConfigError("recipe 'route' got no items; pass the suite items to train on")
        pos = {k: i for i, k in enumerate(it.id for it in get_suite(suite).items())}
        absent = sorted(wanted - set(pos))
        if absent:
            raise ConfigError(f"items {absent[:5]} are not in suite {suite!r} (`ctx.extra['suite']`); pass the suite "
                              "the items came from")
        limit = 1 + max(pos[k] for k in wanted)  # the runner takes a prefix of the suite: stop at the last item
        cfg = self.boundary_config(suite, ctx.seed, limit if limit < len(pos) else None)
        outcome = run_eval(cfg, Path(ctx.output_dir) / BOUNDARY_DIR, report=False)
        records = RunDir(outcome.out_dir).read_records()
        by_arm: dict[str, dict[str, EvalRecord]] = {}
        for arm, spec in zip(ARMS, cfg.strategies, strict=True):
            cid = config_id(self.params.agent_model, spec, dict(self.params.budget), ctx.seed)
            by_arm[arm] = {r.item_id: r for r in records if r.config_id == cid and r.item_id in wanted}
        out: dict[str, BoundaryOutcome] = {}
        for item_id in sorted(wanted, key=pos.__getitem__):
            small, large = by_arm["small"].get(item_id), by_arm["large"].get(item_id)
            if small is None or small.error or large is None or large.error:
                continue
            out[item_id] = BoundaryOutcome(
                success_small=bool(small.correct), cost_small=int(small.output_tokens), model_steps_small=_model_steps(small),
                success_large=bool(large.correct), cost_large=int(large.output_tokens), model_steps_large=_model_steps(large))
        return out

    # ------------------------------------------------------------------ rows and rewards
    def build_rows(self, items: Sequence[EvalItem], rng: random.Random, ctx: RecipeContext) -> list[JsonObject]:
        outcomes = self.boundary_outcomes(items, ctx)
        max_steps = self.max_steps()
        rows: list[JsonObject] = []
        lost = [it.id for it in items if it.id not in outcomes]
        if lost:
            warnings.warn(f"recipe 'route': {len(lost)} task(s) have no usable boundary run (a recorded error or no "
                          f"record), e.g. {lost[:3]}; they get no rows (see {Path(ctx.output_dir) / BOUNDARY_DIR})",
                          stacklevel=2)
        for item in items:
            o = outcomes.get(item.id)
            if o is None:
                continue
            row = base_row(item)
            extra: JsonObject = {"success_small": o["success_small"], "success_large": o["success_large"],
                                 "cost_small": o["cost_small"], "cost_large": o["cost_large"],
                                 "boundary_class": boundary_class(o["success_small"], o["success_large"])}
            n = min(self.params.max_rows_per_task, max(1, int(o.get("model_steps_large", 1))))
            for k in range(n):
                prompt = route_prompt(item.messages, {"step": k, "max_steps": max_steps, "tool_calls": k})
                rows.append({**row, "prompt": prompt, "step": k, **extra})
        if not rows:
            raise ConfigError(f"recipe 'route' built no rows from {len(items)} item(s): no task has a usable boundary "
                              f"run; check the records under {Path(ctx.output_dir) / BOUNDARY_DIR}")
        return rows

    def rewards(self, rows: Sequence[JsonObject], ctx: RecipeContext) -> list[RewardFunction]:
        return [RouteChoiceReward(invalid_reward=self.params.invalid_reward, success_floor=self.params.success_floor)]


def _model_steps(record: EvalRecord) -> int:
    """Model steps of an agent record (``details.model_steps``, else its ``model`` step entries)."""
    d = record.details or {}
    steps = d.get("model_steps")
    if isinstance(steps, int):
        return steps
    return sum(1 for s in d.get("steps") or [] if isinstance(s, dict) and s.get("kind") == "model")


RECIPES.register("route", RouteRecipe)
