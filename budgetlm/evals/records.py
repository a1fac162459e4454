"""The typed schema of evaluation records (one JSON line per finished (item, configuration)).

``runs/NAME/records.jsonl`` holds one :class:`EvalRecord` per line; :func:`read_records` reads it
back, by the torn-line rule of :mod:`budgetlm.io` (a torn last line left by a crash is cut off and
reported; a bad line anywhere else is an error naming the file and line).  The run folder's layout
is :class:`budgetlm.evals.rundir.RunDir`'s.

A cell (suite, item, configuration) may have several records: a record with ``error`` set is
retried when the run is resumed, and the retry is appended.  The **last** record of a cell wins:
:func:`read_records` returns only the last record per :attr:`EvalRecord.key` unless asked for every
line (``latest=False``), and :func:`latest_records` does the same for a list in memory.

``runs/NAME/traces.jsonl`` holds one line per record with its trace (for voting strategies every
sample's text, tokens and extracted answer; for tree searches the tree).  A trace whose JSON
exceeds :data:`TRACE_GZIP_BYTES` is stored gzipped and base64-encoded in ``trace_gz`` instead of
``trace`` (:func:`trace_line`), so the file stays line-oriented and resumable;
:func:`read_traces` decodes both forms.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from budgetlm.io import JsonObject, JsonValue, read_jsonl


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
    probe_tokens: int = Field(default=0, description=(
        "Of the output tokens, those spent on certainty probes (cot with early_exit); 0 for other strategies."))
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


def latest_records(records: Iterable[EvalRecord]) -> list[EvalRecord]:
    """The last record of each (suite, item id, configuration id), in the order the cells first appear.

    A retried cell (an errored record followed by its retry) is represented by the retry.
    """
    last: dict[tuple[str, str, str], EvalRecord] = {}
    for r in records:
        last[r.key] = r  # a dict keeps the first insertion position, with the last value
    return list(last.values())


def read_records(path: str | Path, *, latest: bool = True) -> list[EvalRecord]:
    """The complete records of a ``records.jsonl`` file, by the torn-line rule of :mod:`budgetlm.io`:
    a torn last line is left out (and reported; the runner cuts it off before appending), a bad
    line anywhere else raises :class:`~budgetlm.io.DamagedFileError` naming the file and line.

    With ``latest=True`` (the default) only the last record of each (suite, item, configuration)
    is returned, so a successful retry supersedes the error it retried; ``latest=False`` returns
    every line.
    """
    out = read_jsonl(path, lambda row: EvalRecord(**row), what="a valid record")
    return latest_records(out) if latest else out


TRACE_GZIP_BYTES = 64 * 1024
"""A trace whose JSON is longer than this (in bytes) is stored gzipped, base64-encoded, in ``trace_gz``."""


def trace_line(key: Mapping[str, JsonValue], trace: Sequence[Mapping[str, JsonValue]], *,
               gzip_over: int | None = None) -> JsonObject:
    """One ``traces.jsonl`` line: ``key`` (suite, item id, config id, strategy) and the trace, gzipped into
    ``trace_gz`` when its JSON exceeds ``gzip_over`` bytes (default :data:`TRACE_GZIP_BYTES`)."""
    raw = json.dumps(trace, default=str)
    if len(raw.encode()) <= (TRACE_GZIP_BYTES if gzip_over is None else gzip_over):
        return {**key, "trace": trace}
    packed = base64.b64encode(gzip.compress(raw.encode(), mtime=0)).decode("ascii")
    return {**key, "trace_gz": packed}


def decode_trace_line(line: dict[str, Any]) -> dict[str, Any]:
    """A ``traces.jsonl`` line with ``trace_gz`` unpacked into ``trace`` (other lines unchanged)."""
    if "trace_gz" not in line:
        return line
    out = {k: v for k, v in line.items() if k != "trace_gz"}
    out["trace"] = json.loads(gzip.decompress(base64.b64decode(line["trace_gz"])).decode())
    return out


def read_traces(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a ``traces.jsonl`` with their traces decoded, by the torn-line rule of
    :mod:`budgetlm.io` (a torn last line is left out and reported, a bad line elsewhere is an error)."""
    return read_jsonl(path, decode_trace_line, what="a valid trace line")
