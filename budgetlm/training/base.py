"""What a GRPO recipe is: a dataset builder, its rewards, and how to evaluate what it trained.

A :class:`Recipe` turns the items of a budgetlm suite (:mod:`budgetlm.evals.suites`) into a TRL
dataset (a conversational ``prompt`` column plus the columns its rewards read), names the reward
functions of :mod:`budgetlm.rewards` with their weights, and says which strategies evaluate the
trained model against the base model (``budgetlm eval`` grid entries).  Recipes are registered by
name (:data:`RECIPES`); their parameters are a validated :class:`~budgetlm.config.Config` model
(:attr:`Recipe.Params`), so a typo in a YAML recipe block fails before any model is loaded.

Every row carries a ``prompt_id`` (the suite item's id), which group-wise rewards group by.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pydantic import ConfigDict

from budgetlm.config import Config
from budgetlm.errors import ConfigError
from budgetlm.evals.config import StrategySpec
from budgetlm.evals.suites.base import EvalItem
from budgetlm.io import JsonObject
from budgetlm.registry import Registry
from budgetlm.rewards import Correctness, RewardFunction

__all__ = ["RECIPES", "Recipe", "RecipeContext", "RecipeParams", "base_row", "correctness_for"]


class RecipeParams(Config):
    """Base of recipe parameter models: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class RecipeContext:
    """What a recipe may need besides the items: the model, the run directory, the seed."""

    model: str
    """Model spec or path being trained (``default`` for the embedded model)."""
    output_dir: Path
    """The training run's directory (recipes may cache data under it)."""
    seed: int = 0
    """Seed for sampling per-example targets and building data."""
    max_completion_length: int = 256
    """TRL's generation limit, for recipes whose rewards depend on it."""
    extra: dict[str, object] = field(default_factory=dict)
    """Anything else (the route recipe's eval settings, for example)."""


def base_row(item: EvalItem) -> JsonObject:
    """The columns every recipe row has: the chat ``prompt``, ``answer``, ``prompt_id`` and ``entry``.

    ``entry`` is the reasoning-gym entry as JSON when the item has one (the ``reasoning_gym`` grader
    reads it), else an empty string (datasets columns need one type).
    """
    if item.gold is None:
        raise ConfigError(f"suite item {item.id!r} has no gold answer; training needs suites with answers")
    entry = item.metadata.get("entry")
    return {
        "prompt": [dict(m) for m in item.messages],
        "answer": str(item.gold),
        "prompt_id": item.id,
        "entry": json.dumps(entry, default=list) if entry is not None else "",
    }


def correctness_for(rows: Sequence[JsonObject], grader: str = "auto") -> Correctness:
    """A :class:`Correctness` reward for ``rows``: ``auto`` picks ``reasoning_gym`` when every row has
    an ``entry``, else ``math`` (math-verify)."""
    if grader == "auto":
        grader = "reasoning_gym" if rows and all(r.get("entry") for r in rows) else "math"
    return Correctness(grader=grader)


class Recipe(ABC):
    """A GRPO recipe: rows from suite items, rewards, and evaluation strategies."""

    name: ClassVar[str] = "recipe"
    Params: ClassVar[type[RecipeParams]] = RecipeParams

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        try:
            self.params = self.Params(**(params or {}))
        except ConfigError as exc:
            raise ConfigError(f"recipe {self.name!r}: {exc}") from None
        self.rows: list[JsonObject] = []

    @abstractmethod
    def build_rows(self, items: Sequence[EvalItem], rng: random.Random, ctx: RecipeContext) -> list[JsonObject]:
        """The training rows (one per prompt; TRL samples ``num_generations`` completions of each)."""

    @abstractmethod
    def rewards(self, rows: Sequence[JsonObject], ctx: RecipeContext) -> list[RewardFunction]:
        """The reward functions, built for ``rows`` (for example to pick the grader)."""

    def reward_weights(self) -> list[float] | None:
        """Weights of :meth:`rewards` in TRL's sum (None: all 1)."""
        return None

    @abstractmethod
    def eval_strategies(self, max_tokens: int) -> list[StrategySpec]:
        """``budgetlm eval`` grid entries that compare the trained model with the base model."""

    def eval_grid(self, base_model: str, trained_model: str, max_tokens: int) -> tuple[list[str], list[StrategySpec]]:
        """Models and strategies of the final evaluation: by default both models × :meth:`eval_strategies`."""
        return [base_model, trained_model], self.eval_strategies(max_tokens)

    def describe(self) -> JsonObject:
        """The recipe's name and validated parameters (recorded with the run)."""
        return {"name": self.name, "params": self.params.model_dump()}


RECIPES: Registry[type[Recipe]] = Registry("recipe")
"""Recipe name → class."""
