"""The typed schema of evaluation records (one JSON line per finished (item, configuration)).

``runs/NAME/records.jsonl`` holds one :class:`EvalRecord` per line; :func:`read_records` reads it
back, tolerating a torn last line left by a crash (it is ignored and later rewritten).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from budgetlm.errors import ConfigError


class EvalRecord(BaseModel):
    """One finished (item, configuration) of an evaluation run."""

    model_config = ConfigDict(extra="allow")

    item_id: str = Field(description="The item's id within its suite.")
    suite: str = Field(description="Suite spec the item came from.")
    config_id: str = Field(description="Hash of model, strategy, parameters and budget.")
    model: str = Field(description="Backend spec of the model.")
    strategy: str = Field(description="Strategy name.")
    params: dict[str, Any] = Field(default_factory=dict, description="Strategy parameters.")
    budget: dict[str, float] = Field(default_factory=dict, description="Per-item budget limits.")
    question: str = Field(default="", description="The question (last user message).")
    text: str = Field(default="", description="The final answer text (thinking removed).")
    answer: str | None = Field(default=None, description="The extracted answer, None when none was found.")
    gold: str | None = Field(default=None, description="The reference answer as text.")
    correct: bool = Field(default=False, description="Whether the grader accepted the answer.")
    score: float = Field(default=0.0, description="The grader's score in [0, 1].")
    prompt_tokens: int = Field(default=0, description="Input tokens over all calls.")
    cached_tokens: int = Field(default=0, description="Of the input tokens, prefix-cache hits.")
    output_tokens: int = Field(default=0, description="Output tokens over all calls.")
    thinking_tokens: int = Field(default=0, description="Of the output tokens, thinking tokens.")
    sequential_tokens: int = Field(default=0, description="Output tokens on the critical path.")
    model_calls: int = Field(default=0, description="Model calls made.")
    wall_seconds: float = Field(default=0.0, description="Wall time of the batch the item ran in, shared.")
    latency_s: float = Field(default=0.0, description="Sum of the item's call latencies.")
    flops: float = Field(default=0.0, description="FLOPs from the cost model.")
    usd: float = Field(default=0.0, description="Dollars from the price table.")
    joules: float | None = Field(default=None, description="Energy measured by NVML, None when not measured.")
    finish_reason: str | None = Field(default=None, description="Finish reason of the answer's sample.")
    truncated: bool = Field(default=False, description="The answer's sample hit its token limit.")
    thinking_truncated: bool = Field(default=False, description="Thinking was cut off: graded as no answer.")
    stop_reason: str = Field(default="done", description="Why the strategy stopped.")
    over_budget: bool = Field(default=False, description="Spend exceeded the budget in some unit (must never be true).")
    seed: int | None = Field(default=None, description="Seed of the configuration.")
    error: str | None = Field(default=None, description="Error text when the item could not be run.")
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="Strategy-specific figures: the route taken (arm, score, threshold), expensive calls, "
                    "and for agents one entry per step (model, tokens, tool calls).",
    )
    timestamp: float = Field(default=0.0, description="Unix time the record was written.")

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity of a record for resuming: (suite, item id, configuration id)."""
        return (self.suite, self.item_id, self.config_id)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def read_records(path: str | Path) -> list[EvalRecord]:
    """All complete records of a ``records.jsonl`` file (a torn last line is ignored)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    lines = p.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(EvalRecord(**json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            if i == len(lines):  # torn final line from a crash mid-write: not a complete record
                break
            raise ConfigError(f"{p}:{i}: malformed record ({exc}); fix or delete that line to resume") from None
    return out
