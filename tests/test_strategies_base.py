"""The strategy layer and plain sampling, on the scripted backend."""

from __future__ import annotations

import pytest

from budgetlm import ConfigError, UnknownNameError
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.strategies import Problem, get, names


def test_registry_lists_names_and_parameters() -> None:
    assert "sample" in names()
    with pytest.raises(UnknownNameError, match="available: .*sample"):
        get("no-such-strategy")
    with pytest.raises(ConfigError, match="valid: temperature, max_tokens, n, top_p, seed"):
        get("sample", temprature=0.5)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n": 0}, "`n` must be >= 1"),  # no samples
        ({"max_tokens": 0}, "`max_tokens` must be >= 1"),  # nothing to generate
    ],
)
def test_sample_bad_parameters(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get("sample", **kw)


def test_one_request_per_problem_on_the_engine_and_per_problem_budgets() -> None:
    backend = ScriptedBackend(["one two three Answer: 7"])
    results = get("sample", max_tokens=100).solve(["q1", "q2", "q3"], backend=backend, budget={"output_tokens": 3})
    assert backend.requests == 3 and backend.batches == []  # each problem is its own request, run concurrently
    for r in results:
        assert r.usage.output_tokens == 3 and r.truncated and r.answer is None  # "Answer:" was cut off
        assert r.ledger["units"]["output_tokens"] == {"spent": 3, "limit": 3, "remaining": 0}


def test_answer_and_trace() -> None:
    backend = ScriptedBackend(["so Answer: 7"])
    [r] = get("sample").solve([Problem.from_text("What is 3+4?", id="p1")], backend=backend)
    assert (r.problem_id, r.answer, r.stop_reason, r.finish_reason) == ("p1", "7", "done", "stop")
    assert r.trace[0]["output_tokens"] == r.usage.output_tokens == r.sequential_tokens == 3
    assert r.model_calls == 1


def test_batch_budget_applies_to_all_problems() -> None:
    backend = ScriptedBackend(["a b c d e f g h i j"])
    results = get("sample", max_tokens=10).solve(["q1", "q2", "q3"], backend=backend, batch_budget={"output_tokens": 12})
    assert sum(r.usage.output_tokens for r in results) <= 12


def test_exhausted_budget_gives_an_empty_answer_with_a_reason() -> None:
    backend = ScriptedBackend(["Answer: 1"])
    [r] = get("sample").solve(["q"], backend=backend, budget={"input_tokens": 1})
    assert r.answer is None and r.text == "" and r.stop_reason == "budget exhausted: input_tokens"
    assert r.usage.output_tokens == 0


def test_empty_problem_text() -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        get("sample").solve([""], backend=ScriptedBackend())


# ---------------------------------------------------------------- aggregation
from budgetlm.strategies.aggregate import answer_key, vote  # noqa: E402


@pytest.mark.parametrize(
    ("answers", "scores", "weighted", "winner"),
    [
        (["7", "7", "3"], None, False, "7"),  # plain mode
        (["3", "7"], [0.1, 0.9], False, "7"),  # tie: highest summed score wins
        (["3", "7"], None, False, "3"),  # tie, equal scores: first seen wins
        (["3", "7", "7"], [5.0, 1.0, 1.0], True, "3"),  # weighted: score sum beats count
        ([None, None, "4"], None, False, "4"),  # samples without an answer never win
        ([None, None], None, False, None),  # nobody answered
    ],
)
def test_vote(answers: list, scores: list | None, weighted: bool, winner: str | None) -> None:
    assert vote(answers, scores, weighted=weighted).winner == winner


def test_answer_key_groups_equivalent_forms() -> None:
    assert answer_key("Answer: 7") == answer_key("\\boxed{7.0}") == answer_key("so 7")
    assert answer_key(None) is None


def test_from_text_id_is_stable_across_processes() -> None:
    import subprocess
    import sys

    code = "from budgetlm.strategies import Problem; print(Problem.from_text('What is 2 + 2?').id)"
    ids = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
           for seed in (1, 2)}
    assert len(ids) == 1 and ids == {Problem.from_text("What is 2 + 2?").id}
