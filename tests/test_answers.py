"""Answer extraction and normalisation."""

from __future__ import annotations

import pytest

from budgetlm.answers import extract_answer, normalize_answer


@pytest.mark.parametrize(
    ("text", "answer", "source"),
    [
        ("so \\boxed{42} done", "42", "boxed"),  # boxed wins
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),  # nested braces
        ("x <answer> 7 </answer>", "7", "tag"),  # answer tags
        ("steps...\nAnswer: 12.", "12", "line"),  # Answer: line, trailing period
        ("Final answer: -3\nmore text 9", "-3", "line"),  # explicit line beats last number
        ("3 + 4 = 7", "7", "last_number"),  # fallback
        ("1,234 apples", "1,234", "last_number"),  # thousands separator kept for normalisation
        ("no digits here", None, "none"),  # nothing
        ("", None, "none"),  # empty
        (None, None, "none"),  # truncated thinking gives no text
    ],
)
def test_extract(text: str | None, answer: str | None, source: str) -> None:
    e = extract_answer(text)
    assert (e.text, e.source) == (answer, source)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("7", "7.0"),  # float form
        ("7", "\\boxed{7}"),  # boxed
        ("1,234", "1234"),  # separators
        ("$5$", "5"),  # math delimiters
        ("Paris", " paris. "),  # case, whitespace, period
    ],
)
def test_normalize_makes_equal(a: str, b: str) -> None:
    assert normalize_answer(a) == normalize_answer(b)


def test_normalize_keeps_different_values_apart() -> None:
    assert normalize_answer("7") != normalize_answer("7.5")
    assert normalize_answer(None) is None
