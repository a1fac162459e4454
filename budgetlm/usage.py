"""Usage records: what one model or tool call cost.

Backends return one :class:`Usage` per call (a call = one request, possibly with ``n``
samples); the :class:`~budgetlm.meter.Meter` sums them.  Fields that a backend cannot measure
are ``None`` (for example ``joules`` without a GPU), never a misleading zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from budgetlm.io import JsonObject

FinishReason = Literal["stop", "length", "abort", "deadline", "error", "tool", "forced"]
"""Why generation ended: ``stop`` (end of sequence or a stop string), ``length`` (the token limit), ``abort``
(cancelled), ``deadline`` (the wall-clock budget), ``error``, ``tool`` (a tool call's own usage record), or
``forced`` (a tree search's answer forced from its best path).  Every engine's reason is mapped onto these."""


def _add(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


@dataclass
class Usage:
    """Spend of one model call (or the sum of several, see :meth:`__add__`)."""

    prompt_tokens: int = 0
    """Prompt tokens sent (counted once per request, even with ``n`` samples)."""
    cached_prompt_tokens: int = 0
    """Of ``prompt_tokens``, those served from a prefix cache (when the engine reports it)."""
    output_tokens: int = 0
    """Generated tokens over all samples of the call."""
    thinking_tokens: int = 0
    """Of ``output_tokens``, those inside the thinking part."""
    latency_s: float = 0.0
    """Wall-clock seconds the call took."""
    flops: float = 0.0
    """Floating-point operations estimated by the cost model."""
    usd: float = 0.0
    """Dollars from the price table (0 for local models unless priced)."""
    joules: float | None = None
    """Energy measured by NVML during the call; ``None`` when not measured."""
    tool_calls: int = 0
    """Tool invocations (agents)."""
    calls: int = 1
    """Model calls summed into this record."""
    model: str = ""
    """Model name."""
    finish_reason: FinishReason | None = None
    """Finish reason of the call (of the last sample when there are several)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Extra counters (e.g. draft tokens of speculative decoding), summed key by key."""

    @property
    def total_tokens(self) -> int:
        """Prompt plus output tokens."""
        return self.prompt_tokens + self.output_tokens

    def amount(self, unit: str) -> float | None:
        """The amount of a budget unit in this record (``wall_seconds`` is the call latency)."""
        match unit:
            case "output_tokens":
                return self.output_tokens
            case "input_tokens":
                return self.prompt_tokens
            case "thinking_tokens":
                return self.thinking_tokens
            case "total_tokens":
                return self.total_tokens
            case "flops":
                return self.flops
            case "usd":
                return self.usd
            case "wall_seconds":
                return self.latency_s
            case "tool_calls":
                return self.tool_calls
            case "joules":
                return self.joules
        raise KeyError(unit)

    def __add__(self, other: Usage) -> Usage:
        extra = dict(self.extra)
        for k, v in other.extra.items():
            extra[k] = extra.get(k, 0.0) + v
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens + other.cached_prompt_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            thinking_tokens=self.thinking_tokens + other.thinking_tokens,
            latency_s=self.latency_s + other.latency_s,
            flops=self.flops + other.flops,
            usd=self.usd + other.usd,
            joules=_add(self.joules, other.joules),
            tool_calls=self.tool_calls + other.tool_calls,
            calls=self.calls + other.calls,
            model=self.model if self.model == other.model or not other.model else (self.model or other.model),
            finish_reason=other.finish_reason or self.finish_reason,
            extra=extra,
        )

    @classmethod
    def zero(cls) -> Usage:
        """An empty record (no calls)."""
        return cls(calls=0)

    def to_dict(self) -> JsonObject:
        """A JSON-ready dict (with ``total_tokens``)."""
        d = asdict(self)
        d["total_tokens"] = self.total_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Usage:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
