"""Thinking-aware output: split ``<think>…</think>`` into thinking and answer.

Reasoning models wrap their chain of thought in tags (DeepSeek-R1, Qwen3: ``<think>`` and
``</think>``; some templates open the tag in the prompt so the output starts inside thinking).
:class:`ThinkingFormat` describes a model's tags; :func:`split_thinking` splits a completion and
flags thinking that the token limit cut off, from which no answer may be extracted.
:func:`count_thinking_tokens` counts the generated tokens up to and including the end tag exactly,
by decoding token prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class ThinkingFormat(BaseModel):
    """How a model marks its thinking."""

    model_config = ConfigDict(frozen=True)

    start: str = Field(default="<think>", description="Tag that opens thinking.")
    end: str = Field(default="</think>", description="Tag that closes thinking.")
    starts_in_thinking: bool = Field(
        default=False, description="True when the chat template opens the tag, so output begins inside thinking."
    )
    enabled: bool = Field(default=True, description="False for models that never think in tags.")


NO_THINKING = ThinkingFormat(enabled=False)


@dataclass(frozen=True)
class ThinkingSplit:
    """A completion split into its parts."""

    thinking: str
    """The thinking text (without tags); empty when the model did not think."""
    answer: str
    """The text after thinking; empty when thinking was truncated."""
    has_thinking: bool
    """True when the completion contains a thinking part."""
    truncated: bool
    """True when thinking was cut off before its end tag (no answer may be extracted)."""


def split_thinking(text: str, fmt: ThinkingFormat = ThinkingFormat(), finish_reason: str | None = None) -> ThinkingSplit:
    """Split ``text`` into thinking and answer following ``fmt``.

    Thinking that never closes is *truncated* when ``finish_reason`` is ``"length"`` (the limit cut
    it) and also when the output simply ends inside thinking: either way there is no answer.
    """
    if not fmt.enabled:
        return ThinkingSplit("", text, False, False)
    inside = fmt.starts_in_thinking
    body = text
    s = text.find(fmt.start)
    if s != -1 and text[:s].strip() == "":
        inside, body = True, text[s + len(fmt.start):]
    if not inside:
        return ThinkingSplit("", text, False, False)
    e = body.find(fmt.end)
    if e == -1:
        return ThinkingSplit(body.strip(), "", True, True)
    return ThinkingSplit(body[:e].strip(), body[e + len(fmt.end):].strip(), True, False)


def count_thinking_tokens(
    token_ids: Sequence[int],
    decode: Callable[[Sequence[int]], str],
    fmt: ThinkingFormat = ThinkingFormat(),
) -> int:
    """Generated tokens that belong to thinking (tags included).

    Binary search for the shortest token prefix whose decoded text contains the end tag:
    ``O(log n)`` decodes.  All tokens count as thinking when the end tag never appears inside an
    opened thinking part; none when there is no thinking part.
    """
    if not fmt.enabled or not token_ids:
        return 0
    text = decode(token_ids)
    sp = split_thinking(text, fmt)
    if not sp.has_thinking:
        return 0
    if sp.truncated:
        return len(token_ids)
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if fmt.end in decode(token_ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo
