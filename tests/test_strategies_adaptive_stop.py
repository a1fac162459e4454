"""Adaptive majority's default sample cap and the reason each problem stopped (``details["stopped"]``)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

import budgetlm.strategies.adaptive  # noqa: F401  (registers "adaptive")
from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import read_records
from budgetlm.evals.runner import run_eval
from budgetlm.strategies import get
from budgetlm.strategies.adaptive import DEFAULT_MAX_SAMPLES, STOPPED, AdaptiveParams


def per_problem(texts: dict[str, list[str]]) -> Callable[[str, int, SamplingParams], str]:
    """A script giving problem ``q``'s texts in turn (cycling), whatever the batching."""
    seen: dict[str, int] = defaultdict(int)

    def script(prompt: str, i: int, sampling: SamplingParams) -> str:
        q = re.search(r"<\|user\|> (\S+)", prompt).group(1)  # type: ignore[union-attr]
        t = texts[q][seen[q] % len(texts[q])]
        seen[q] += 1
        return t

    return script


def sample_texts(r) -> list[tuple[str | None, float | None, int]]:
    return [(e["answer"], e["score"], e["tokens"]) for e in r.trace if "sample" in e]

SPLIT = ["Answer: 1", "Answer: 2"]
"""Two-token samples whose answers alternate: the vote never settles."""


def test_default_cap_is_16_samples() -> None:
    assert DEFAULT_MAX_SAMPLES == 16 and AdaptiveParams().max_samples == 16
    assert get("adaptive").params()["max_samples"] == 16
    # a split vote with a budget that affords far more: the cap stops it, not the budget
    backend = ScriptedBackend(per_problem({"q1": SPLIT}))
    [r] = get("adaptive", max_tokens=2).solve(["q1"], backend=backend, budget={"output_tokens": 1000})
    assert len(sample_texts(r)) == 16 and r.usage.output_tokens == 32
    assert (r.stop_reason, r.details["stopped"], r.details["max_samples"]) == ("done", "max_samples", 16)


def test_no_cap_is_explicit_and_spends_the_budget() -> None:
    backend = ScriptedBackend(per_problem({"q1": SPLIT}))
    [r] = get("adaptive", max_tokens=2, max_samples=None).solve(["q1"], backend=backend, budget={"output_tokens": 100})
    assert len(sample_texts(r)) == 50 and r.usage.output_tokens == 100  # the old default: the whole budget
    assert r.details["stopped"] == "budget" and r.details["max_samples"] is None
    assert r.stop_reason == "budget exhausted: output_tokens"


@pytest.mark.parametrize(("texts", "kw", "budget", "stopped", "stop_reason", "samples"), [
    # unanimous: the posterior rule settles after min_samples (2) ... 4 agreeing votes (P = 0.97)
    (["Answer: 7"], {}, None, "settled", "done", 4),
    (["Answer: 7"], {"rule": "predictive", "max_samples": 8}, None, "settled", "done", 4),
    # split: never settles; the cap stops it
    (SPLIT, {"max_samples": 6}, None, "max_samples", "done", 6),
    (SPLIT, {}, None, "max_samples", "done", 16),  # the default cap without a budget
    # split: the budget stops it first (2-token samples, worst case 5: 2+1+1+1 samples fit 13 tokens)
    (SPLIT, {"max_tokens": 5}, {"output_tokens": 13}, "budget", "budget exhausted: output_tokens", 5),
    (SPLIT, {"max_tokens": 5, "max_samples": 3}, {"output_tokens": 13}, "max_samples", "done", 3),
    # a sample that generates nothing: more samples would not progress
    ([""], {}, None, "no_progress", "done", 2),
])
def test_stop_reason_per_problem(texts: list[str], kw: dict, budget: dict | None, stopped: str, stop_reason: str,
                                 samples: int) -> None:
    backend = ScriptedBackend(per_problem({"q1": texts}))
    [r] = get("adaptive", **kw).solve(["q1"], backend=backend, budget=budget)
    assert stopped in STOPPED
    assert (r.details["stopped"], r.stop_reason, r.details["samples"]) == (stopped, stop_reason, samples)
    assert len(sample_texts(r)) == samples
    if stopped == "settled":
        assert r.details["stop_rule"] == kw.get("rule", "posterior")
        assert r.details["p_leader"] >= 1 - 0.05
    else:
        assert "stop_rule" not in r.details


def test_stop_reason_reaches_the_eval_records(tmp_path: Path) -> None:
    cfg = EvalConfig(name="t", suites=["reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"
                                       "&size=3&seed=1"],
                     models=["scripted"], budgets=[{"output_tokens": 64}], batch_size=3,
                     strategies=[{"name": "adaptive", "params": {"max_tokens": 4}}])
    run_eval(cfg, tmp_path / "run", progress=False, report=False, backends={"scripted": ScriptedBackend()})
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert len(recs) == 3
    for rec in recs:  # "Answer: 42" every time: settled after 4 votes
        assert (rec.stop_reason, rec.details["stopped"], rec.details["samples"]) == ("done", "settled", 4)
        assert rec.details["stop_rule"] == "posterior" and rec.params["max_samples"] == 16
