"""The evaluation config: a grid of models × strategies × budgets over one or more suites.

A 15-line YAML is enough::

    name: chain-sum-budgets
    suites:
      - reasoning_gym:chain_sum?min_digits=1&max_digits=1&size=50&seed=1
    models: [default]
    strategies:
      - name: sample
        params: {temperature: 0.0}
    budgets:
      - {output_tokens: 32}
      - {output_tokens: 128}
    seed: 1
    batch_size: 64
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, cast

from pydantic import ConfigDict, Field, field_validator

from budgetlm.budget import check_limits
from budgetlm.config import Config
from budgetlm.errors import ConfigError


def check_budgets(v: list[dict[str, float]]) -> list[dict[str, float]]:
    """Every budget of a grid must be a valid :class:`Budget` with positive limits."""
    for i, b in enumerate(v):
        check_limits(b, f"budgets[{i}]")
    return v


class StrategySpec(Config):
    """One strategy of the grid with its parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Registered strategy name (see `budgetlm.strategies.names()`).")
    params: dict[str, Any] = Field(default_factory=dict, description="Constructor parameters of the strategy.")
    budgets: list[dict[str, float]] | None = Field(
        default=None, min_length=1, description="Budgets for this strategy only (default: the config's `budgets`)."
    )
    label: str | None = Field(default=None, description="Display name in reports (default: the strategy name).")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[dict[str, float]] | None) -> list[dict[str, float]] | None:
        return v if v is None else check_budgets(v)


class EvalConfig(Config):
    """What ``budgetlm eval`` runs; validated at construction."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="eval", description="Run name, used in reports.")
    suites: list[str | dict[str, Any]] = Field(description="Suite specs or config blocks (see `budgetlm.evals.suites.get`).")
    models: list[str] = Field(default_factory=lambda: ["default"], description="Backend specs.")
    strategies: list[StrategySpec] = Field(
        default_factory=lambda: [StrategySpec(name="sample")], description="Strategies with parameters."
    )
    budgets: list[dict[str, float]] = Field(default_factory=lambda: cast(list[dict[str, float]], [{"output_tokens": 256}]),
                                            description="Per-item budgets; every limit must be positive.")
    seed: int = Field(default=0, description="Seed for engines and strategies that sample.")
    batch_size: int = Field(default=64, ge=1, description="Problems in flight at once per configuration (each record is written as its problem finishes).")
    limit: int | None = Field(default=None, ge=1, description="Use only the first `limit` items of each suite.")

    @field_validator("strategies", mode="before")
    @classmethod
    def _strategies(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": s} if isinstance(s, str) else s for s in v]
        return v

    @field_validator("suites", "models", "strategies", "budgets")
    @classmethod
    def _non_empty(cls, v: list[Any], info: Any) -> list[Any]:
        if not v:
            raise ValueError(f"`{info.field_name}` must list at least one entry, got []")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[dict[str, float]]) -> list[dict[str, float]]:
        return check_budgets(v)

    @classmethod
    def load(cls, path: str | Path) -> EvalConfig:
        """Read a YAML or JSON config file."""
        import yaml

        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a YAML eval config")
        try:
            data = yaml.safe_load(p.read_text()) if p.suffix in (".yaml", ".yml") else json.loads(p.read_text())
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{p}: cannot parse the config: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the config must be a mapping of fields, got {type(data).__name__}")
        return cls(**data)

    def digest(self) -> str:
        """A hash of everything that changes results (not the name)."""
        d = self.model_dump(exclude={"name"})
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_id(model: str, strategy: StrategySpec, budget: dict[str, float], seed: int) -> str:
    """Stable id of one grid cell (model, strategy, parameters, budget, seed)."""
    key = json.dumps({"model": model, "strategy": strategy.name, "params": strategy.params, "budget": budget,
                      "seed": seed, **({"label": strategy.label} if strategy.label else {})}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]
