"""Thinking split and exact thinking-token counts."""

from __future__ import annotations

import pytest

from budgetlm.thinking import NO_THINKING, ThinkingFormat, count_thinking_tokens, split_thinking

R1 = ThinkingFormat()
OPEN_IN_PROMPT = ThinkingFormat(starts_in_thinking=True)


@pytest.mark.parametrize(
    ("text", "fmt", "thinking", "answer", "truncated"),
    [
        ("<think>a b</think> 42", R1, "a b", "42", False),  # ordinary
        ("<think>a b c", R1, "a b c", "", True),  # cut off: no answer
        ("plain answer 7", R1, "", "plain answer 7", False),  # model did not think
        ("reasoning</think>Answer: 3", OPEN_IN_PROMPT, "reasoning", "Answer: 3", False),  # template opened tag
        ("still reasoning", OPEN_IN_PROMPT, "still reasoning", "", True),  # opened in prompt, never closed
        ("<think>x</think>y", NO_THINKING, "", "<think>x</think>y", False),  # thinking disabled
        ("text then <think>late</think>", R1, "", "text then <think>late</think>", False),  # tag not at start
    ],
)
def test_split(text: str, fmt: ThinkingFormat, thinking: str, answer: str, truncated: bool) -> None:
    sp = split_thinking(text, fmt)
    assert (sp.thinking, sp.answer, sp.truncated) == (thinking, answer, truncated)


def test_custom_tags() -> None:
    fmt = ThinkingFormat(start="[T]", end="[/T]")
    assert split_thinking("[T]hm[/T]ok", fmt).answer == "ok"


VOCAB = ["<think>", "a ", "b ", "</think>", " 42", "c"]


def _decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([0, 1, 2, 3, 4], 4),  # tags included, answer excluded
        ([0, 1, 2], 3),  # truncated: everything is thinking
        ([4, 5], 0),  # no thinking part
        ([], 0),  # nothing generated
    ],
)
def test_count_thinking_tokens(ids: list[int], expected: int) -> None:
    assert count_thinking_tokens(ids, _decode, R1) == expected
