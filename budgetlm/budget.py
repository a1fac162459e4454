"""Budgets: limits on compute in several units at once.

A :class:`Budget` holds optional limits; ``None`` means "no limit in this unit".  Every unit is
measured by the :class:`~budgetlm.meter.Meter` from the :class:`~budgetlm.usage.Usage` records
that backends produce:

========================  ===========================================================
unit                      what is counted
========================  ===========================================================
``output_tokens``         generated tokens (all samples of a call)
``input_tokens``          prompt tokens sent to the model (cached ones included)
``thinking_tokens``       generated tokens inside the thinking part (``<think>``...)
``total_tokens``          input + output tokens
``flops``                 floating-point operations from the cost model
``usd``                   dollars from the price table
``wall_seconds``          elapsed wall-clock time since the meter started
``tool_calls``            tool invocations recorded by agents
``joules``                energy measured by NVML (GPU only)
========================  ===========================================================
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, get_args

from pydantic import ConfigDict, Field, field_validator

from budgetlm.config import Config
from budgetlm.errors import ConfigError, invalid

Unit = Literal[
    "output_tokens",
    "input_tokens",
    "thinking_tokens",
    "total_tokens",
    "flops",
    "usd",
    "wall_seconds",
    "tool_calls",
    "joules",
]
"""The budget units, in the order they are reported."""

UNITS: tuple[Unit, ...] = get_args(Unit)
INTEGER_UNITS: frozenset[str] = frozenset(
    {"output_tokens", "input_tokens", "thinking_tokens", "total_tokens", "tool_calls"}
)


class Budget(Config):
    """Optional limits in several units; a call must fit every limit that is set."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    _unknown_field: ClassVar[str] = "unknown budget unit `{field}`; valid units: " + ", ".join(UNITS)

    output_tokens: int | None = Field(default=None, description="Most generated tokens, all samples together.")
    input_tokens: int | None = Field(default=None, description="Most prompt tokens sent to models.")
    thinking_tokens: int | None = Field(default=None, description="Most tokens generated inside thinking.")
    total_tokens: int | None = Field(default=None, description="Most input plus output tokens.")
    flops: float | None = Field(default=None, description="Most floating-point operations (cost model).")
    usd: float | None = Field(default=None, description="Most US dollars (price table).")
    wall_seconds: float | None = Field(default=None, description="Most elapsed seconds since the meter started.")
    tool_calls: int | None = Field(default=None, description="Most tool invocations.")
    joules: float | None = Field(default=None, description="Most energy in joules (NVML, GPU only).")

    @field_validator("*", mode="before")
    @classmethod
    def _check_limit(cls, value: Any, info: Any) -> Any:
        name = info.field_name
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"`{name}` must be a non-negative number or None, got {value!r}")
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"`{name}` must be a number, got NaN; use None for no limit")
        if value < 0:
            raise ValueError(f"`{name}` must be >= 0, got {value!r}; use None for no limit")
        if name in INTEGER_UNITS:
            if math.isinf(value):
                raise ValueError(f"`{name}` must be a finite integer, got {value!r}; use None for no limit")
            if float(value) != int(value):
                raise ValueError(f"`{name}` must be a whole number of tokens/calls, got {value!r}")
            return int(value)
        return float(value)

    def limits(self) -> dict[str, float]:
        """The units that have a limit, with their limits."""
        return {u: getattr(self, u) for u in UNITS if getattr(self, u) is not None}

    def is_unlimited(self) -> bool:
        """True when no unit has a limit."""
        return not self.limits()

    def scaled(self, fraction: float) -> Budget:
        """A budget with every limit multiplied by ``fraction`` (integers rounded down)."""
        if not 0 <= fraction:
            raise ConfigError(f"`fraction` must be >= 0, got {fraction!r}")
        out: dict[str, float] = {}
        for u, v in self.limits().items():
            out[u] = int(v * fraction) if u in INTEGER_UNITS else v * fraction
        return Budget.of(out)

    def merged(self, other: Budget) -> Budget:
        """The tighter of two budgets in every unit."""
        out: dict[str, float] = {str(u): v for u, v in self.limits().items()}
        for u, v in other.limits().items():
            out[u] = min(out[u], v) if u in out else v
        return Budget.of(out)

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | Budget | None) -> Budget:
        """Build a budget from a dict, another budget, ``None`` (unlimited) or a string.

        Strings are comma-separated ``unit=value`` pairs, e.g. ``"output_tokens=2000,usd=0.01"``.
        """
        if spec is None:
            return cls()
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if isinstance(spec, str):
            data: dict[str, float] = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                key, sep, val = part.partition("=")
                if not sep:
                    raise ConfigError(
                        f"`budget` must be comma-separated unit=value pairs, got {spec!r}; "
                        "e.g. 'output_tokens=2000,usd=0.01'"
                    )
                try:
                    data[key.strip()] = float(val)
                except ValueError:
                    raise ConfigError(f"budget `{key.strip()}` must be a number, got {val.strip()!r}") from None
            return cls.of(data)
        raise ConfigError(f"`budget` must be a Budget, dict, string or None, got {type(spec).__name__}")

    def __str__(self) -> str:
        lim = self.limits()
        return "Budget(" + ", ".join(f"{k}={v:g}" for k, v in lim.items()) + ")" if lim else "Budget(unlimited)"


def check_limits(limits: dict[str, float], name: str) -> dict[str, float]:
    """``limits`` (unit → limit) must form a valid :class:`Budget` with every limit > 0.

    Raises :class:`~budgetlm.errors.ConfigError` (a ``ValueError``, so pydantic validators report it as theirs)
    naming ``name.unit``, or for an unknown unit (from :class:`Budget`).
    """
    Budget.of(limits)  # unit names and types
    for unit, lim in limits.items():
        if lim is None or lim <= 0:
            raise invalid(f"{name}.{unit}", "> 0", lim, "remove the entry or use a positive limit")
    return limits
