"""The server's settings, validated at construction (``budgetlm serve --config server.yaml`` or flags).

A YAML with every section::

    backends: {default: "vllm:default", small: "hf:default"}   # name -> backend spec
    host: 127.0.0.1
    port: 8000
    api_keys: [sk-team-a, sk-team-b]        # omit: no key needed (all traffic is the "anonymous" key)
    allowance: {output_tokens: 200000, usd: 1.0}           # per key and UTC day
    key_allowances: {sk-team-b: {output_tokens: 50000}}    # per-key overrides
    db_path: budgetlm_server.sqlite
    default_budget: {output_tokens: 1024}
    max_budget: {output_tokens: 16384}
    session_budget: {output_tokens: 4000, tool_calls: 8, steps: 12}   # agent sessions without their own
    session_ttl_s: 86400
    routes: {agents: {cheap: small, expensive: default, threshold: 0.5}}  # model agents/route (and budgetlm/route)
"""

from __future__ import annotations

import re
from typing import Annotated, cast

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from budgetlm.budget import check_limits
from budgetlm.config import Config
from budgetlm.server.route import RouteSpec
from budgetlm.server.sessions import parse_session_budget

__all__ = ["EFFORT_BUDGETS", "ServerConfig", "parse_backend_args"]

EFFORT_BUDGETS: dict[str, int] = {"minimal": 128, "low": 512, "medium": 2048, "high": 8192}
"""Default output-token budgets of the standard ``reasoning_effort`` values."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_budget(v: dict[str, float] | None, field: str) -> dict[str, float] | None:
    return v if v is None else check_limits(v, field)


def _check_allowance_units(v: dict[str, float] | None, field: str) -> dict[str, float] | None:
    bad = [u for u in (v or {}) if u in ("wall_seconds", "joules")]
    if bad:
        raise ValueError(f"`{field}` must use units that are charged per request (tokens, flops, usd, tool_calls), "
                         f"got {bad}; a daily wall-clock or energy allowance is not tracked — use max_budget to cap "
                         f"each request instead")
    return v


def parse_backend_args(values: list[str]) -> dict[str, str]:
    """``--backend`` values (``SPEC`` or ``NAME=SPEC``) as name → spec; unnamed ones are ``default``,
    ``b1``, ``b2``, ... in order."""
    out: dict[str, str] = {}
    for i, v in enumerate(values):
        name, sep, spec = v.partition("=")
        if not sep or ":" in name or "?" in name:  # a bare spec (specs contain ':' before any '=')
            name, spec = ("default" if "default" not in out else f"b{i}"), v
        if name in out:
            from budgetlm.errors import ConfigError

            raise ConfigError(f"`--backend` names must be unique, got {name!r} twice; write NAME=SPEC")
        out[name] = spec
    return out


class ServerConfig(Config):
    """What ``budgetlm serve`` runs."""

    model_config = ConfigDict(extra="forbid")

    backends: dict[str, str] = Field(default_factory=lambda: {"default": "default"}, description="Backend name → spec; the first is used by `budgetlm/<strategy>` model names.")
    host: str = Field(default="127.0.0.1", description="Interface to bind (localhost by default; 0.0.0.0 exposes it).")
    port: int = Field(default=8000, description="TCP port.")
    api_keys: list[str] | None = Field(default=None, description="Accepted API keys (Authorization: Bearer KEY); None: no key needed.")
    allowance: dict[str, float] | None = Field(default=None, description="Spend allowed per key and UTC day, in budget units; None: unlimited.")
    key_allowances: dict[str, dict[str, float]] = Field(default_factory=dict, description="Per-key allowances replacing `allowance`.")
    db_path: str = Field(default="budgetlm_server.sqlite", description="SQLite file holding spend per key and day and every request's ledger.")
    default_budget: dict[str, float] = Field(default_factory=lambda: cast(dict[str, float], {"output_tokens": 1024}), description="Per-request budget when the request sets none.")
    max_budget: dict[str, float] | None = Field(default=None, description="Largest per-request budget accepted (400 above it); None: no cap.")
    effort_budgets: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: dict(EFFORT_BUDGETS), description="Output tokens (>= 1) for each `reasoning_effort` value.")
    strategies: list[str] | None = Field(default=None, description="Strategies clients may use; None: every registered one.")
    max_request_bytes: int = Field(default=1_000_000, ge=1, description="Largest request body accepted (413 above it).")
    batch_window_ms: float = Field(default=5.0, ge=0, description="Ignored (kept so older configs load): requests no longer wait in a batching window; each runs on the engine's continuous batch at once.")
    max_batch: int = Field(default=32, ge=1, description="Ignored (kept so older configs load): there is no strategy batch any more; the engine batches every request in flight.")
    seed: int = Field(default=0, description="Seed given to strategies that sample, unless the request sets `seed`.")
    session_budget: dict[str, float] | None = Field(
        default=None, description="Budget of a new agent session whose first call sets no `session_budget` (units of "
                                  "`budget` plus `steps`); None: such sessions are tracked, not limited.")
    key_session_budgets: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per-key session budgets replacing `session_budget`.")
    session_ttl_s: float = Field(default=86400.0, gt=0, description="Seconds an idle session is kept; a call with an "
                                                                    "expired id starts a new session.")
    tool_parsers: dict[str, str] = Field(
        default_factory=dict, description="Backend name → vLLM tool parser (hermes, qwen3_json, ...) that parses that "
                                          "backend's tool calls instead of budgetlm's <tool_call> parser (in-process "
                                          "vLLM backends only).")
    routes: dict[str, RouteSpec] = Field(
        default_factory=dict, description="Per-step routes between a cheap and an expensive backend: model "
                                          "`<name>/route` (and `budgetlm/route` for the first one).")

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("`backends` must name at least one backend, got {}; e.g. {default: 'vllm:default'}")
        for name in v:
            if name == "budgetlm" or not _NAME.match(name):
                raise ValueError(f"`backends` names must be letters, digits, '_', '.', '-' and not 'budgetlm', got {name!r}")
        return v

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 0 <= v <= 65535:
            raise ValueError(f"`port` must be in 0..65535, got {v}")
        return v

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not k or not k.strip() for k in v)):
            raise ValueError(f"`api_keys` must list non-empty keys or be omitted, got {v!r}")
        return v

    @field_validator("allowance", "max_budget")
    @classmethod
    def _budget_fields(cls, v: dict[str, float] | None, info: ValidationInfo) -> dict[str, float] | None:
        return _check_budget(v, str(info.field_name))  # always set for a field validator

    @field_validator("allowance")
    @classmethod
    def _charged_units(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return _check_allowance_units(v, "allowance")

    @field_validator("default_budget")
    @classmethod
    def _default_budget(cls, v: dict[str, float]) -> dict[str, float]:
        _check_budget(v, "default_budget")
        return v

    @field_validator("key_allowances")
    @classmethod
    def _key_allowances(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for key, allowance in v.items():
            _check_budget(allowance, f"key_allowances.{key}")
            _check_allowance_units(allowance, f"key_allowances.{key}")
        return v

    @field_validator("session_budget")
    @classmethod
    def _session_budget(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            parse_session_budget(v, "session_budget")
        return v

    @field_validator("key_session_budgets")
    @classmethod
    def _key_session_budgets(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for key, b in v.items():
            parse_session_budget(b, f"key_session_budgets.{key}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> ServerConfig:
        unknown_b = [b for b in self.tool_parsers if b not in self.backends]
        if unknown_b:
            raise ValueError(f"`tool_parsers` must name backends ({', '.join(self.backends)}), got {unknown_b}")
        for name, r in self.routes.items():
            if name == "budgetlm" or name in self.backends or not _NAME.match(name):
                raise ValueError(f"`routes` names must be letters, digits, '_', '.', '-', not 'budgetlm' and not a "
                                 f"backend name ({', '.join(self.backends)}), got {name!r}")
            for side in ("cheap", "expensive"):
                if getattr(r, side) not in self.backends:
                    raise ValueError(f"`routes.{name}.{side}` must name a backend ({', '.join(self.backends)}), got "
                                     f"{getattr(r, side)!r}")
            from budgetlm.strategies import STRATEGIES
            from budgetlm.strategies import get as get_strategy

            allowed = self.strategies or STRATEGIES.names()
            for field, value in (("strategy", r.strategy), ("expensive_strategy", r.expensive_strategy)):
                if value is not None and value not in allowed:
                    raise ValueError(f"`routes.{name}.{field}` must be one of the allowed strategies "
                                     f"({', '.join(allowed)}), got {value!r}")
            if r.expensive_strategy is not None:
                try:
                    get_strategy(r.expensive_strategy, **r.expensive_params)
                except Exception as exc:  # noqa: BLE001 -- any refusal of the parameters, named for the config
                    raise ValueError(f"`routes.{name}.expensive_params` are invalid for {r.expensive_strategy!r}: "
                                     f"{exc}") from None
        if self.api_keys is not None:
            unknown_s = [k for k in self.key_session_budgets if k not in self.api_keys]
            if unknown_s:
                raise ValueError(f"`key_session_budgets` names keys that are not in `api_keys`: {unknown_s}; add them to "
                                 f"api_keys or remove the entries")
        if self.api_keys is not None:
            unknown = [k for k in self.key_allowances if k not in self.api_keys]
            if unknown:
                raise ValueError(f"`key_allowances` names keys that are not in `api_keys`: {unknown}; add them to "
                                 f"api_keys or remove the entries")
        if self.strategies is not None:
            from budgetlm.strategies import STRATEGIES

            bad = [s for s in self.strategies if s not in STRATEGIES.names()]
            if bad:
                raise ValueError(f"`strategies` must be registered strategy names ({', '.join(STRATEGIES.names())}), "
                                 f"got {bad}")
        return self

    def session_budget_for(self, key: str) -> dict[str, float] | None:
        """The default session budget of ``key`` (its override, else the common one)."""
        return self.key_session_budgets.get(key, self.session_budget)

    def allowance_for(self, key: str) -> dict[str, float] | None:
        """The daily allowance of ``key`` (its override, else the common one)."""
        return self.key_allowances.get(key, self.allowance)
