"""Graders: extraction + comparison for every registered grader, and math-verify off the main thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import math_verify  # noqa: F401,E402  (the eval extra is part of the test install)
import pytest

from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.evals.graders import GRADERS, MathGrader, get_grader, gold_answer, math_equal, names, parse_number


@pytest.mark.parametrize(
    ("grader", "text", "gold", "correct", "answer"),
    [
        # math
        ("math", "so \\boxed{4}", "4", True, "4"),  # correct, boxed
        ("math", "Answer: 5", "4", False, "5"),  # wrong
        ("math", "I am not sure.", "4", False, None),  # no answer
        ("math", None, "4", False, None),  # truncated thinking
        ("math", "\\boxed{\\frac{1}{2}}", "0.5", True, "\\frac{1}{2}"),  # equivalent forms
        ("math", "Answer: 2", "\\boxed{2}", True, "2"),  # boxed gold
        ("math", "Answer: $x^2+1$", "1+x^2", True, "$x^2+1$"),  # symbolic equality
        ("math", "\\boxed{2^{1/2}}", "\\sqrt{2}", True, "2^{1/2}"),  # bare LaTeX is parsed as LaTeX
        ("math", "\\boxed{72}", "She has 72 left.\n#### 72", True, "72"),  # GSM8K-style gold
        ("math", "\\boxed{\\frac{1}{3}}", "0.5", False, "\\frac{1}{3}"),  # inequivalent fraction
        # exact
        ("exact", "Answer: Paris", "Paris", True, "Paris"),  # correct
        ("exact", "Answer: paris", "Paris", False, "paris"),  # case matters
        ("exact", "", "Paris", False, None),  # no answer
        ("exact", None, "Paris", False, None),  # truncated thinking
        # normalized
        ("normalized", "Answer: 7.0", "7", True, "7.0"),  # float form
        ("normalized", "<answer> paris </answer>", "Paris", True, "paris"),  # tags, case
        ("normalized", "Answer: 8", "7", False, "8"),  # wrong
        ("normalized", "no idea", "7", False, None),  # no answer
        ("normalized", None, "7", False, None),  # truncated thinking
        # numeric
        ("numeric", "Answer: 1,234", "1234", True, "1,234"),  # thousands separator
        ("numeric", "Answer: 3/4", "0.75", True, "3/4"),  # fraction
        ("numeric", "Answer: -0.5", "-1/2", True, "-0.5"),  # negative
        ("numeric", "It costs $5", "5", True, "5"),  # dollar sign (last number)
        ("numeric", "Answer: $5", 5, True, "$5"),  # dollar sign on the line, numeric gold
        ("numeric", "Answer: 0.3333333", "1/3", True, "0.3333333"),  # within relative tolerance
        ("numeric", "Answer: 0.33", "1/3", False, "0.33"),  # outside tolerance
        ("numeric", "Answer: many", "3", False, "many"),  # not a number
        ("numeric", "nothing here", "3", False, None),  # no answer
        ("numeric", None, "3", False, None),  # truncated thinking
    ],
)
def test_graders(grader: str, text: str | None, gold: object, correct: bool, answer: str | None) -> None:
    g = get_grader(grader).grade(text, gold)
    assert (g.correct, g.answer) == (correct, answer)
    assert g.score == (1.0 if correct else 0.0)


def test_reasoning_gym_grader_uses_the_dataset_verifier() -> None:
    import reasoning_gym as rg
    entry = rg.create_dataset("chain_sum", size=1, seed=3, min_digits=1, max_digits=1)[0]
    grader = get_grader("reasoning_gym")  # finds the verifier through the entry's source_dataset
    ok = grader.grade(f"Answer: {entry['answer']}", entry["answer"], {"entry": entry})
    assert ok.correct and ok.score == 1.0
    wrong = grader.grade("Answer: 123456", entry["answer"], {"entry": entry})
    assert not wrong.correct and wrong.score < 1.0
    assert grader.grade(None, entry["answer"], {"entry": entry}).answer is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", 1234.0),  # separators
        ("3/4", 0.75),  # fraction
        ("-0.5", -0.5),  # negative decimal
        ("$5", 5.0),  # dollars
        ("\\$5", 5.0),  # escaped dollars
        ("\\frac{3}{4}", 0.75),  # LaTeX fraction
        ("50%", 0.5),  # percent
        ("1e3", 1000.0),  # exponent
        ("abc", None),  # not a number
        ("1/0", None),  # division by zero
    ],
)
def test_parse_number(text: str, value: float | None) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        ("The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # MATH solution
        ("6 * 12 = 72\n#### 72", "72"),  # GSM8K answer
        (" 42 ", "42"),  # plain
    ],
)
def test_gold_answer(gold: str, answer: str) -> None:
    assert gold_answer(gold) == answer


def test_math_grader_from_worker_threads() -> None:
    """math-verify's signal-based timeouts fail off the main thread; the grader switches them off there."""
    cases = [("\\boxed{\\frac{1}{2}}", "0.5", True), ("\\boxed{3}", "4", False), ("Answer: $x^2+1$", "1+x^2", True)]
    grader = MathGrader()

    def work(case: tuple[str, str, bool]) -> tuple[bool, bool]:
        assert threading.current_thread() is not threading.main_thread()
        return grader.grade(case[0], case[1]).correct, math_equal(case[1], "1/2")

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(work, cases * 3))
    assert [r[0] for r in results] == [c[2] for c in cases] * 3
    assert [r[1] for r in results] == [True, False, False] * 3


def test_unknown_grader_lists_available() -> None:
    with pytest.raises(UnknownNameError, match="available: .*math.*numeric"):
        get_grader("fuzzy")
    assert set(names()) == {"math", "reasoning_gym", "exact", "normalized", "numeric"} == set(GRADERS.names())


def test_grader_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="timeout_s"):
        get_grader("math", timeout_s=0)
    assert get_grader("numeric", rel_tol=0.1).grade("Answer: 0.33", "1/3").correct
