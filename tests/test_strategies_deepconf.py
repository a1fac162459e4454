"""DeepConf (ALGORITHMS.md §11): confidence measures, offline filtering and voting, online in-flight stops and
consensus, the ``confidence`` scorer of the voting strategies and ``adaptive``, and parameter errors."""

from __future__ import annotations

import math
from typing import Any

import pytest

from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import ConfigError
from budgetlm.strategies import get
from budgetlm.strategies.confidence import (
    RunningConfidence,
    group_confidences,
    log_score,
    mode,
    token_confidence,
    token_confidences,
    trace_confidence,
)
from budgetlm.strategies.deepconf import consensus, keep_top, threshold
from budgetlm.strategies.voting import Sampled

LOW = -4.0
HIGH = -0.1


def lp(_ctx: str, tok: str) -> float:
    """Tokens starting with ``uh`` are unconfident; every other token is confident."""
    return LOW if tok.startswith("uh") else HIGH


def by_seed(texts: list[str]):
    """A script whose trace ``i`` (seed ``i``, or sample ``i`` of a seed-0 request) is ``texts[i]``."""
    return lambda _p, i, s: texts[(s.seed or 0) + i]


# ---------------------------------------------------------------------------------------------- confidence
def test_token_confidence_is_minus_mean_of_top_k_and_falls_back_to_sampled_logprob() -> None:
    top = {1: -0.2, 2: -1.0, 3: -2.0, 4: -9.0}
    assert token_confidence(-0.2, top, 3) == (pytest.approx(3.2 / 3), "topk")
    assert token_confidence(-0.2, top, 10)[0] == pytest.approx(12.2 / 4)  # fewer alternatives than k: all of them
    assert token_confidence(-0.2, {1: -0.2}, 5) == (-0.2, "sampled")  # one alternative: no distribution to read
    assert token_confidence(-0.2, top, 0) == (-0.2, "sampled")
    with pytest.raises(ValueError, match="`logprob` must be a float"):
        token_confidence(None, None, 5)
    # peaked beats flat with top-k; the sampled fallback keeps the same order
    peaked, flat = {1: -0.01, 2: -6.0}, {1: -0.6, 2: -0.8}
    assert token_confidence(-0.01, peaked, 2)[0] > token_confidence(-0.6, flat, 2)[0]
    assert token_confidence(-0.01, None, 2)[0] > token_confidence(-0.6, None, 2)[0]


def test_trace_measures_on_a_hand_made_table() -> None:
    tops = [{1: -0.1, 2: -3.9}, {1: -0.1, 2: -3.9}, {1: -1.0, 2: -1.0}, {1: -1.0, 2: -1.0}, {1: -0.1, 2: -3.9},
            {1: -0.1, 2: -3.9}]
    lps = [-0.1, -0.1, -1.0, -1.0, -0.1, -0.1]
    assert mode(lps, tops, 2) == "topk" and mode(lps, None, 2) == "sampled" and mode(lps, tops, 1) == "sampled"
    c = token_confidences(lps, tops, k=2)
    assert c == pytest.approx([2.0, 2.0, 1.0, 1.0, 2.0, 2.0])
    assert group_confidences(c, 2) == pytest.approx([2.0, 1.5, 1.0, 1.5, 2.0])
    assert trace_confidence(c, "mean", 2) == pytest.approx(10 / 6)
    assert trace_confidence(c, "lowest", 2) == pytest.approx(1.0)
    assert trace_confidence(c, "tail", 2) == pytest.approx(2.0)
    assert trace_confidence(c, "bottom10", 2) == pytest.approx(1.0)  # 10 % of 5 groups: the lowest one
    assert trace_confidence(c, "lowest", 100) == pytest.approx(10 / 6)  # shorter than the window: one group
    assert trace_confidence([], "lowest") is None
    twenty = [float(i) for i in range(21)]  # 20 groups of 2: bottom 10 % = the 2 lowest groups
    assert trace_confidence(twenty, "bottom10", 2) == pytest.approx((0.5 + 1.5) / 2)
    with pytest.raises(ValueError, match="`measure` must be one of"):
        trace_confidence(c, "median")
    with pytest.raises(ValueError, match="`window` must be >= 1"):
        group_confidences(c, 0)
    assert log_score(2.0, "topk") == pytest.approx(math.log(2.0)) and log_score(-0.3, "sampled") == -0.3


def test_running_confidence_matches_the_offline_groups() -> None:
    c = [-0.1, -0.1, -4.0, -4.0, -0.1, -0.2, -0.3]
    rc = RunningConfidence(window=3, k=5)
    assert rc.push(c[:2]) is None and rc.current is None  # fewer tokens than the window: nothing to judge yet
    for x in c[2:]:
        rc.push([x])
    assert rc.mode == "sampled" and rc.tokens == len(c) and rc.confidences == c
    assert rc.lowest == pytest.approx(min(group_confidences(c, 3)))
    assert rc.current == pytest.approx(sum(c[-3:]) / 3)


# ---------------------------------------------------------------------------------------------- offline
def _s(key: str | None, score: float | None) -> Sampled:
    return Sampled(completion=None, text=key or "", key=key, score=score)  # type: ignore[arg-type]


def test_keep_top_threshold_and_consensus_rules() -> None:
    ss = [_s("4", 1.0), _s("5", 3.0), _s(None, 9.0), _s("4", 2.0), _s("6", None)]
    assert [s.score for s in keep_top(ss, 50)] == [3.0, 2.0]  # ceil(50 % of 3 answered+scored) = 2, in order
    assert [s.score for s in keep_top(ss, 10)] == [3.0]  # at least one
    assert len(keep_top(ss, 100)) == 3
    assert threshold([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(1.4)  # the 10th percentile
    assert threshold([1.0, 2.0, 3.0, 4.0, 5.0], 10) == pytest.approx(4.6)  # the 90th
    assert threshold([], 90) is None
    leader, beta = consensus([_s("4", math.log(3.0)), _s("5", math.log(1.0))])
    assert leader == "4" and beta == pytest.approx(0.75)
    assert consensus([_s(None, 0.0)]) == (None, 0.0)


OFFLINE = ["a b c Answer: 4", "a b c Answer: 4", "uh uh uh Answer: 5", "uh uh uh Answer: 5", "uh uh uh Answer: 5"]


def test_offline_filtering_overturns_an_unconfident_majority() -> None:
    b = ScriptedBackend(by_seed(OFFLINE), logprob=lp)
    maj = get("majority", n=5, max_tokens=16, seed=0).solve(["q?"], backend=b)[0]
    assert maj.answer == "5"
    r = get("deepconf", mode="offline", n=5, eta=40, window=2, max_tokens=16, seed=0).solve(["q?"], backend=b)[0]
    assert r.answer == "4" and r.details == {"mode": "offline", "traces": 5, "voted": 2}
    assert r.trace[-1]["vote"]["counts"] == {"4": 2}


def test_offline_eta_100_is_confidence_weighted_majority() -> None:
    texts = ["a Answer: 4", "uh uh Answer: 5", "uh Answer: 5", "a b Answer: 6"]
    b = ScriptedBackend(by_seed(texts), logprob=lp)
    for measure in ("lowest", "mean", "tail", "bottom10"):
        dc = get("deepconf", mode="offline", n=4, eta=100, measure=measure, window=2, max_tokens=16, seed=0)
        wm = get("weighted_majority", n=4, scorer="confidence", confidence_measure=measure, confidence_window=2,
                 max_tokens=16, seed=0)
        r1, r2 = dc.solve(["q?"], backend=b)[0], wm.solve(["q?"], backend=b)[0]
        assert r1.answer == r2.answer
        assert r1.trace[-1]["vote"]["weights"] == pytest.approx(r2.trace[-1]["vote"]["weights"])


# ---------------------------------------------------------------------------------------------- online
ONLINE = ["a b c d Answer: 4",                        # warm-up 0
          "a b c d Answer: 5",                        # warm-up 1: no consensus (β = 0.5)
          "a b uh uh uh uh uh uh uh uh uh uh Answer: 5",  # dips below the threshold at its 3rd token
          "a b c d Answer: 4",                        # β = 2/3
          "a b c d Answer: 4"]                        # β = 3/4


def test_online_aborts_a_low_confidence_trace_in_flight_and_charges_only_what_it_generated() -> None:
    b = ScriptedBackend(by_seed(ONLINE), logprob=lp)
    s = get("deepconf", n=5, warmup=2, window=2, tau=0.7, batch_size=1, max_tokens=30, seed=0)
    r = s.solve(["q?"], backend=b, budget={"output_tokens": 400})[0]
    stopped = [t for t in r.trace if t.get("stopped") == "low confidence"]
    assert len(stopped) == 1 and stopped[0]["call"] == 2
    assert stopped[0]["tokens"] == 3 and stopped[0]["group_confidence"] == pytest.approx((HIGH + LOW) / 2)
    assert r.details["threshold"] == pytest.approx(HIGH)
    assert r.details["stopped_traces"] == 1 and r.details["tokens_saved_by_stop"] == 30 - 3
    # warm-up 6 + 6, the stopped trace's 3 tokens, then two full traces; the stopped trace never votes
    assert r.usage.output_tokens == 6 + 6 + 3 + 6 + 6 == r.ledger["units"]["output_tokens"]["spent"]
    assert r.details["voted"] == 4 and r.details["traces"] == 5 and r.answer == "4"
    assert r.trace[-1]["vote"]["counts"] == {"4": 3, "5": 1}
    assert r.details["stopped"] == "consensus" and r.details["beta"] == pytest.approx(0.75)


def test_online_consensus_fires_exactly_when_beta_reaches_tau() -> None:
    b = ScriptedBackend(by_seed(ONLINE), logprob=lp)
    run = lambda tau: get("deepconf", n=5, warmup=2, window=2, tau=tau, batch_size=1, max_tokens=30,  # noqa: E731
                          seed=0).solve(["q?"], backend=b)[0]
    at = run(2 / 3)  # β = 2/3 after trace 3: stops there
    assert at.details["stopped"] == "consensus" and at.details["traces"] == 4 and at.details["voted"] == 3
    above = run(0.67)  # needs β = 3/4 after trace 4
    assert above.details["traces"] == 5 and above.details["voted"] == 4 and above.details["stopped"] == "consensus"
    never = run(0.9)
    assert never.details["stopped"] == "max_traces" and never.details["traces"] == 5
    warm = run(0.5)  # the warm-up alone reaches β = 0.5: no further trace starts
    assert warm.details["traces"] == 2 and warm.usage.output_tokens == 12


def test_online_cancels_traces_in_flight_at_consensus() -> None:
    texts = ["a Answer: 4", "a Answer: 4"] + ["a b c d e f g h i j k l Answer: 4", "a Answer: 4"] * 3
    b = ScriptedBackend(by_seed(texts), logprob=lp)
    # warm-up disagrees with nothing but tau=1 needs ... unanimity: reached after the warm-up already
    r = get("deepconf", n=8, warmup=1, window=2, tau=1.0, max_tokens=40, seed=0).solve(["q?"], backend=b)[0]
    assert r.details["traces"] == 1  # one warm-up trace is unanimous
    texts2 = ["a Answer: 4", "a Answer: 5", "a b c d e f g h i j k l Answer: 4", "a Answer: 4", "a Answer: 4"]
    b2 = ScriptedBackend(by_seed(texts2), logprob=lp)
    r2 = get("deepconf", n=5, warmup=2, window=2, tau=0.6, batch_size=2, max_tokens=40,
             seed=0).solve(["q?"], backend=b2, budget={"output_tokens": 400})[0]
    # traces 2 (long) and 3 (short) run together; 3 finishes first: β = 2/3 >= 0.6 → trace 2 is cancelled
    assert r2.details["cancelled_traces"] == 1 and r2.details["stopped"] == "consensus"
    gen = r2.usage.output_tokens - (3 + 3 + 3)
    assert 0 < gen < 14 and r2.details["tokens_saved_by_cancel"] == 40 - gen
    assert r2.usage.output_tokens == r2.ledger["units"]["output_tokens"]["spent"]


def test_online_respects_the_budget_and_the_warmup_shrinks_to_fit() -> None:
    b = ScriptedBackend(by_seed(ONLINE), logprob=lp)
    s = get("deepconf", n=5, warmup=2, window=2, tau=0.99, batch_size=1, max_tokens=30, seed=0)
    r = s.solve(["q?"], backend=b, budget={"output_tokens": 40})[0]
    assert r.usage.output_tokens <= 40 and r.details["stopped"] == "budget"
    assert r.stop_reason.startswith("budget exhausted")
    none = s.solve(["q?"], backend=b, budget={"output_tokens": 1})[0]
    assert none.usage.output_tokens <= 1


# ---------------------------------------------------------------------------------------------- scorer
def test_confidence_scorer_in_best_of_n_weighted_majority_and_adaptive() -> None:
    texts = ["uh uh uh Answer: 5", "a b c Answer: 4", "uh uh uh Answer: 5"]
    b = ScriptedBackend(by_seed(texts), logprob=lp)
    kw: dict[str, Any] = {"scorer": "confidence", "confidence_window": 2, "max_tokens": 16, "seed": 0}
    best = get("best_of_n", n=3, **kw).solve(["q?"], backend=b)[0]
    assert best.answer == "4" and best.trace[1]["score"] == "confidence" and best.trace[1]["modes"] == {"sampled": 3}
    # two unconfident "5" (weight e^-4 each) lose to one confident "4" (e^-0.1)
    wm = get("weighted_majority", n=3, **kw).solve(["q?"], backend=b)[0]
    assert wm.answer == "4"
    assert get("majority", n=3, max_tokens=16, seed=0).solve(["q?"], backend=b)[0].answer == "5"
    ad = get("adaptive", max_samples=3, batch_size=1, delta=0.001, weighted=True, **kw).solve(["q?"], backend=b)[0]
    assert ad.answer == "4" and ad.details["samples"] == 3
    ad_count = get("adaptive", max_samples=3, batch_size=1, delta=0.001, **kw).solve(["q?"], backend=b)[0]
    assert ad_count.answer == "5"  # scores only break ties when not weighted
    seen: list[int | None] = []
    b2 = ScriptedBackend(lambda p, i, s: (seen.append(s.logprobs), "Answer: 1")[1])
    get("best_of_n", n=2, scorer="confidence", confidence_k=7).solve(["q?"], backend=b2)
    get("best_of_n", n=2).solve(["q?"], backend=b2)
    assert seen == [7, 7, 0, 0]  # the confidence scorer asks for top-k logprobs


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("name", "params", "match"), [
    ("deepconf", {"mode": "streaming"}, "`mode` must be one of online, offline, got 'streaming'"),
    ("deepconf", {"measure": "median"}, "`measure` must be one of mean, lowest, bottom10, tail"),
    ("deepconf", {"n": 2, "warmup": 3}, r"`warmup` must be <= n \(2\) in online mode, got 3"),
    ("deepconf", {"eta": 0}, "eta"),
    ("deepconf", {"eta": 101}, "eta"),
    ("deepconf", {"tau": 0}, "tau"),
    ("deepconf", {"window": 0}, "window"),
    ("deepconf", {"k": 21}, "k"),
    ("deepconf", {"temperatur": 0.7}, "unknown parameter"),
    ("best_of_n", {"scorer": "confidence", "confidence_measure": "max"}, "`confidence_measure` must be one of"),
    ("weighted_majority", {"confidence_window": 0}, "confidence_window"),
    ("adaptive", {"scorer": "verifier"}, "`scorer` must be one of logprob, confidence, got 'verifier'"),
])
def test_bad_parameters_fail_clearly(name: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=match):
        get(name, **params)


def test_offline_mode_accepts_warmup_above_n() -> None:
    assert get("deepconf", mode="offline", n=2, warmup=3).n == 2
    assert SamplingParams(logprobs=5).logprobs == 5


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_deepconf_runs_through_budgetlm_eval_on_vllm(tmp_path) -> None:
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.records import read_records
    from budgetlm.evals.runner import run_eval

    suite = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=6&seed=1"
    budget = 160
    cfg = EvalConfig(name="deepconf", suites=[suite], models=["default"], budgets=[{"output_tokens": budget}],
                     strategies=[{"name": "deepconf", "params": {"n": 6, "warmup": 2, "window": 4, "eta": 10,
                                                                 "tau": 0.95, "max_tokens": 32, "seed": 0}},
                                 {"name": "deepconf", "params": {"mode": "offline", "n": 4, "window": 4,
                                                                 "max_tokens": 32, "seed": 0}},
                                 {"name": "weighted_majority", "params": {"n": 3, "scorer": "confidence",
                                                                          "max_tokens": 32, "seed": 0}}])
    out = run_eval(cfg, tmp_path / "run", progress=False, report=False)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert out.written == 18 and not out.errors
    assert all(r.output_tokens <= budget and not r.over_budget for r in recs)
    online = [r for r in recs if r.details.get("mode") == "online"]
    assert len(online) == 6 and all(r.details["threshold"] is not None for r in online)
    assert all(r.details["threshold"] > 0 for r in online)  # vLLM returns top-k: the paper's positive scale
    assert all(r.details["traces"] >= 2 and r.details["voted"] >= 1 for r in online)
