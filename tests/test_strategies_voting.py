"""Voting strategies (best-of-N, majority, weighted majority) and adaptive majority."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import budgetlm.strategies.adaptive  # noqa: F401  (registers "adaptive")
import budgetlm.strategies.voting  # noqa: F401  (registers the voting family)
from budgetlm import ConfigError
from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.strategies import Problem, get
from budgetlm.strategies.adaptive import leader_probability, stay_probability
from budgetlm.strategies.aggregate import answer_key, vote

ALL = ["best_of_n", "majority", "weighted_majority", "adaptive"]


def per_problem(texts: dict[str, list[str]]) -> Callable[[str, int, SamplingParams], str]:
    """A script giving problem ``q``'s texts in turn (cycling), whatever the batching."""
    seen: dict[str, int] = defaultdict(int)

    def script(prompt: str, i: int, sampling: SamplingParams) -> str:
        q = re.search(r"<\|user\|> (\S+)", prompt).group(1)  # type: ignore[union-attr]
        lst = texts[q]
        t = lst[seen[q] % len(lst)]
        seen[q] += 1
        return t

    return script


def sample_texts(r) -> list[tuple[str | None, float | None, int]]:
    return [(e["answer"], e["score"], e["tokens"]) for e in r.trace if "sample" in e]


def mean_lp(backend: ScriptedBackend, question: str, text: str) -> float:
    """Recompute a sample's mean token logprob by scoring its text after the problem."""
    return backend.score([{"role": "user", "content": question}], text).mean


class Confident(ScriptedBackend):
    """Scripted backend whose logprobs are high on the token 'sure' and low elsewhere."""

    def _logprob(self, context: str, token: int) -> float:  # type: ignore[override]
        return -0.01 if self._inv[token].strip() == "sure" else -3.0


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("name", ["best_of_n", "majority", "weighted_majority"])
@pytest.mark.parametrize(("kw", "match"), [
    ({"n": 0}, "`n` must be >= 1"),
    ({"n": -2}, "`n` must be >= 1"),
    ({"scorer": "magic"}, "unknown scorer 'magic'; valid: logprob, verifier, self_eval"),
    ({"scorer": "verifier"}, "needs `verifier`"),
    ({"max_tokens": 0}, "`max_tokens` must be >= 1"),
])
def test_bad_parameters(name: str, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get(name, **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({"batch_size": 0}, "`batch_size`"), ({"max_samples": 0}, "`max_samples`"), ({"delta": 0}, "`delta`"),
    ({"delta": 1.5}, "`delta`"), ({"prior": 0}, "`prior`"), ({"rule": "bayes"}, "`rule`"), ({"max_tokens": 0}, "`max_tokens`"),
])
def test_adaptive_bad_parameters(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get("adaptive", **kw)


# ------------------------------------------------------------------ voting mechanics
def test_majority_is_the_mode_of_one_n_sample_request() -> None:
    backend = ScriptedBackend(per_problem({
        "q1": ["so Answer: 3", "Answer: 5", "hmm Answer: 3.0", "Answer: 5", "Answer: \\boxed{3}"],
        "q2": ["Answer: 8", "Answer: 9", "Answer: 9"],
    }))
    r1, r2 = get("majority", n=5, max_tokens=20).solve(["q1", "q2"], backend=backend)
    assert backend.requests == 2 and [r.trace[0]["n"] for r in (r1, r2)] == [5, 5]
    assert (r1.answer, r1.text, r1.stop_reason) == ("3", "so Answer: 3", "done")
    assert r1.trace[-1]["vote"]["counts"] == {"3": 3, "5": 2}
    assert r2.answer == "9" and r2.trace[-1]["vote"]["counts"] == {"8": 2, "9": 3}  # q2 cycles: 8 9 9 8 9
    # the trace adds up to the ledger
    for r in (r1, r2):
        cancelled = sum(e["cancelled"]["generated_before_cancel"] for e in r.trace if "cancelled" in e)
        assert sum(t for _, _, t in sample_texts(r)) + cancelled == r.usage.output_tokens
        assert r.usage.output_tokens == r.ledger["units"]["output_tokens"]["spent"]
        assert r.sequential_tokens == max(t for _, _, t in sample_texts(r))


def test_majority_tie_break_is_summed_weight_then_first() -> None:
    texts = ["one Answer: 1", "two Answer: 2"]
    backend = ScriptedBackend(per_problem({"q": texts}))
    [r] = get("majority", n=2).solve(["q"], backend=backend)
    w = [math.exp(mean_lp(backend, "q", t)) for t in texts]
    assert [s for _, s, _ in sample_texts(r)] == pytest.approx([math.log(x) for x in w])
    expected = "1" if w[0] >= w[1] else "2"
    assert r.answer == expected and r.answer == vote(["1", "2"], w).winner
    # equal weights: the first seen wins
    assert vote(["2", "1"], [0.5, 0.5]).winner == "2"


def test_weighted_majority_uses_scores() -> None:
    texts = ["Answer: 7", "Answer: 7", "sure sure sure sure Answer: 9"]
    backend = Confident(per_problem({"q": texts}))
    [maj] = get("majority", n=3).solve(["q"], backend=backend)
    backend = Confident(per_problem({"q": texts}))
    [wm] = get("weighted_majority", n=3).solve(["q"], backend=backend)
    assert maj.answer == "7"
    assert wm.answer == "9" and wm.text == texts[2]
    weights = wm.trace[-1]["vote"]["weights"]
    assert weights["9"] > weights["7"] and weights["7"] == pytest.approx(2 * math.exp(-3.0))


def test_best_of_n_picks_the_highest_mean_logprob() -> None:
    texts = ["first Answer: 1", "a second try Answer: 2", "third Answer: 3", "fourth and last Answer: 4"]
    backend = ScriptedBackend(per_problem({"q": texts}))
    [r] = get("best_of_n", n=4).solve(["q"], backend=backend)
    scores = [mean_lp(backend, "q", t) for t in texts]
    best = max(range(4), key=lambda j: (scores[j], -j))
    assert r.text == texts[best] and r.answer == answer_key(texts[best])
    assert [s for _, s, _ in sample_texts(r)] == pytest.approx(scores)


def test_best_of_n_prefers_samples_with_an_answer() -> None:
    backend = Confident(per_problem({"q": ["sure sure sure", "Answer: 4"]}))
    [r] = get("best_of_n", n=2).solve(["q"], backend=backend)
    assert r.answer == "4"


def test_verifier_and_self_eval_scores_are_charged() -> None:
    texts = ["Answer: 1", "so Answer: 2"]
    verifier = ScriptedBackend(name="rm")
    backend = ScriptedBackend(per_problem({"q": texts}))
    [r] = get("best_of_n", n=2, scorer="verifier", verifier=verifier).solve(["q"], backend=backend)
    scores = [verifier.score([{"role": "user", "content": "q"}], t).mean for t in texts]
    assert [s for _, s, _ in sample_texts(r)] == pytest.approx(scores)
    assert r.model_calls == 3  # one generation + two scored pairs
    assert r.usage.prompt_tokens == r.ledger["units"]["input_tokens"]["spent"]

    backend = ScriptedBackend(per_problem({"q": texts}))
    [r] = get("weighted_majority", n=2, scorer="self_eval").solve(["q"], backend=backend)
    msgs = [{"role": "user", "content": "q"}]
    expected = [backend.score(msgs + [{"role": "assistant", "content": t},
                                      {"role": "user", "content": "Is this answer correct? Answer Yes or No."}],
                              "Yes").total for t in texts]
    assert [s for _, s, _ in sample_texts(r)] == pytest.approx(expected)
    assert backend.calls == 1 + 1 + len(texts)  # generation, scoring, and our recomputation
    assert r.usage.prompt_tokens == r.ledger["units"]["input_tokens"]["spent"] > 0


def test_scorer_falls_back_to_logprob_when_budget_is_spent() -> None:
    backend = ScriptedBackend(per_problem({"q": ["Answer: 1"]}))
    [r] = get("best_of_n", n=1, scorer="self_eval").solve(["q"], backend=backend, budget={"input_tokens": 10})
    assert r.answer == "1" and any(e.get("fallback") == "logprob" for e in r.trace)
    assert r.ledger["units"]["input_tokens"]["spent"] <= 10


def test_n_follows_from_the_budget() -> None:
    backend = ScriptedBackend(per_problem({"q": ["Answer: 2"]}))
    [r] = get("majority", max_tokens=25).solve(["q"], backend=backend, budget={"output_tokens": 100})
    assert r.trace[0]["n"] == 4 and r.trace[0]["max_tokens"] == 25 and r.trace[-1]["vote"]["counts"] == {"2": 4}
    [r] = get("majority", max_tokens=25).solve(["q"], backend=backend, budget={"output_tokens": 10})
    assert r.trace[0]["n"] == 1 and r.trace[0]["max_tokens"] == 10  # at least one, clamped
    # a batch budget is shared equally: 3 problems, 90 tokens -> 30 each -> one sample of 25
    results = get("majority", max_tokens=25).solve(["q", "q", "q"], backend=backend, batch_budget={"output_tokens": 90})
    assert [r.trace[0]["n"] for r in results] == [1, 1, 1]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("budget", "reason"), [
    ({"input_tokens": 1}, "budget exhausted: input_tokens"),
    ({"output_tokens": 0}, "budget exhausted: output_tokens"),
])
def test_budget_too_small_for_one_call(name: str, budget: dict, reason: str) -> None:
    backend = ScriptedBackend(["Answer: 1"])
    [r] = get(name, max_tokens=10).solve(["q"], backend=backend, budget=budget)
    assert (r.answer, r.text, r.stop_reason) == (None, "", reason)
    assert r.usage.output_tokens == 0


# ------------------------------------------------------------------ adaptive
def test_leader_probability() -> None:
    assert leader_probability([]) == 0.0 and leader_probability([None, None]) == 0.0
    # Dirichlet(b+1, 1): P(leader) = 1 - 2**-(b+1)
    for b in (2, 4, 6):
        assert leader_probability(["7"] * b) == pytest.approx(1 - 2 ** -(b + 1), abs=0.02)
    assert leader_probability(["1", "2"]) < 0.6
    assert leader_probability(["7"] * 50) < 1  # Monte Carlo never certifies 1


@pytest.mark.parametrize(("answers", "horizon", "expected"), [
    (["7"] * 5, 8, 1.0),                # lead 5 > 3 samples left: decided, exactly 1
    (["7", "7", "3"], 3, 1.0),          # horizon reached: nothing can change
    ([None, None], 8, 0.0),             # no answer yet: never settled
    ([], 8, 0.0),                       # no sample at all
])
def test_stay_probability_exact_cases(answers: list, horizon: int, expected: float) -> None:
    assert stay_probability(answers, horizon) == expected


def test_stay_probability_is_predictive() -> None:
    # the same counts are more settled the closer the horizon: fewer samples can overturn the lead
    near, far = stay_probability(["7", "7", "3"], 5), stay_probability(["7", "7", "3"], 40)
    assert 0.5 < far < near < 1
    assert stay_probability(["1", "2"], 8) < 0.5  # a tie is anyone's
    assert stay_probability(["7"] * 4, 8) > 0.95 > stay_probability(["7"] * 2, 8)
    # "no answer" samples never win: they do not make the leader less safe than fresh answers would
    assert stay_probability(["7", "7", None, None], 8) >= stay_probability(["7", "7", "4", "5"], 8)


def test_predictive_rule_with_tiny_delta_stops_only_decided_problems() -> None:
    texts = {"q1": ["Answer: 7"], "q2": ["Answer: 1", "Answer: 2", "Answer: 1"]}
    ada = get("adaptive", rule="predictive", delta=1e-9, max_samples=8, batch_size=2).solve(
        ["q1", "q2"], backend=ScriptedBackend(per_problem(texts)))
    maj = get("majority", n=8).solve(["q1", "q2"], backend=ScriptedBackend(per_problem(texts)))
    assert [a.answer for a in ada] == [m.answer for m in maj] == ["7", "1"]
    # checked after every sample: q1's lead (5) exceeds the 3 left after 5 unanimous samples (the 6th,
    # in flight beside it, finished in the same engine step and still votes); q2 stays open to 8
    assert [len(sample_texts(a)) for a in ada] == [6, 8]
    assert ada[0].trace[-1]["vote"]["counts"] == {"7": 6}
    assert any(e.get("stop") == "settled" for e in ada[0].trace)


def test_posterior_rule_is_adaptive_consistency() -> None:
    backend = ScriptedBackend(per_problem({"q1": ["Answer: 7"]}))
    [r] = get("adaptive", rule="posterior", max_samples=8).solve(["q1"], backend=backend)
    # Dirichlet(3, 1) after 2 votes: P = 0.875 < 0.95; after 3 0.94; after 4 votes 0.97: settled
    assert backend.requests == 4 and len(sample_texts(r)) == 4
    assert all("horizon" not in e for e in r.trace)


def test_adaptive_unanimous_stops_after_the_first_batch() -> None:
    backend = ScriptedBackend(per_problem({"q1": ["Answer: 7"], "q2": ["x Answer: 3"]}))
    results = get("adaptive", batch_size=4, max_samples=20).solve(["q1", "q2"], backend=backend)
    assert backend.requests == 8  # 4 single-sample requests in flight per problem
    assert [(r.answer, r.stop_reason, len(sample_texts(r))) for r in results] == [("7", "done", 4), ("3", "done", 4)]
    # defaults (batch_size=2, prior=1, delta=0.05): 2 agreeing votes give P=0.875, 4 give 0.97
    backend = ScriptedBackend(per_problem({"q1": ["Answer: 7"]}))
    [r] = get("adaptive").solve(["q1"], backend=backend)
    assert backend.requests == 4 and len(sample_texts(r)) == 4


def test_adaptive_with_tiny_delta_equals_majority() -> None:
    texts = {"q1": ["Answer: 1", "Answer: 2", "b Answer: 1", "Answer: 3", "Answer: 2", "c Answer: 1"],
             "q2": ["Answer: 5", "Answer: 6", "Answer: 6", "Answer: 6", "Answer: 5", "Answer: 4"]}
    backend = ScriptedBackend(per_problem(texts))
    ada = get("adaptive", delta=1e-9, max_samples=6, batch_size=2).solve(["q1", "q2"], backend=backend)
    assert backend.requests == 12  # never settles: 6 single-sample requests per problem
    maj = get("majority", n=6).solve(["q1", "q2"], backend=ScriptedBackend(per_problem(texts)))
    for a, m in zip(ada, maj, strict=True):
        assert (a.answer, a.text) == (m.answer, m.text)
        assert [k for k, _, _ in sample_texts(a)] == [k for k, _, _ in sample_texts(m)]
        assert a.trace[-1]["vote"]["counts"] == m.trace[-1]["vote"]["counts"]
        assert a.usage.output_tokens == m.usage.output_tokens
    assert [a.answer for a in ada] == ["1", "6"]


def test_adaptive_rounds_only_include_unsettled_problems() -> None:
    backend = ScriptedBackend(per_problem({"q1": ["Answer: 7"], "q2": ["Answer: 1", "Answer: 2"]}))
    r1, r2 = get("adaptive", batch_size=4, max_samples=12).solve(["q1", "q2"], backend=backend)
    assert len(sample_texts(r1)) == 4 and len(sample_texts(r2)) == 12
    assert backend.requests == 16  # q1 settled after its first 4 samples; q2 ran on to max_samples
    assert r2.stop_reason == "done" and any(e.get("stop") == "max_samples" for e in r2.trace)


def test_adaptive_reallocates_what_settled_problems_leave() -> None:
    # 2-token samples; 24 tokens for the batch: a static split gives each problem 6 samples
    backend = ScriptedBackend(per_problem({"q1": ["Answer: 7"], "q2": ["Answer: 1", "Answer: 2"]}))
    r1, r2 = get("adaptive", batch_size=4, max_tokens=2).solve(["q1", "q2"], backend=backend,
                                                                batch_budget={"output_tokens": 24})
    assert len(sample_texts(r1)) == 4 and r1.stop_reason == "done"
    assert len(sample_texts(r2)) == 8 and r2.stop_reason == "budget exhausted: output_tokens"
    assert r1.usage.output_tokens + r2.usage.output_tokens == 24


def test_adaptive_respects_per_problem_budget() -> None:
    backend = ScriptedBackend(per_problem({"q1": ["Answer: 1", "Answer: 2"]}))
    [r] = get("adaptive", max_tokens=5).solve(["q1"], backend=backend, budget={"output_tokens": 13})
    # 2-token samples, worst case 5: rooms 13, 9, 7, 5, 3 -> 2+1+1+1 samples, then no full sample fits
    assert r.usage.output_tokens == 10 and len(sample_texts(r)) == 5
    assert r.stop_reason == "budget exhausted: output_tokens"


# ------------------------------------------------------------------ no overspend (property)
words = st.lists(st.sampled_from(["a", "bb", "so", "then"]), max_size=30).map(" ".join)
texts_st = st.lists(st.tuples(words, st.sampled_from(["1", "2", "3", "x"])), min_size=1, max_size=5).map(
    lambda xs: [f"{w} Answer: {a}" for w, a in xs]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(ALL),
    per=st.one_of(st.none(), st.integers(1, 400)),
    batch=st.one_of(st.none(), st.integers(1, 400)),
    n=st.one_of(st.none(), st.integers(1, 6)),
    max_tokens=st.integers(1, 60),
    mixes=st.lists(texts_st, min_size=1, max_size=4),
)
def test_no_overspend(name, per, batch, n, max_tokens, mixes) -> None:
    if per is None and batch is None:
        per = 50
    qs = [f"q{i}" for i in range(len(mixes))]
    backend = ScriptedBackend(per_problem(dict(zip(qs, mixes, strict=True))))
    kw = {"max_tokens": max_tokens} | ({"max_samples": n, "batch_size": 2} if name == "adaptive" else {"n": n})
    results = get(name, **kw).solve(qs, backend=backend, budget=None if per is None else {"output_tokens": per},
                                    batch_budget=None if batch is None else {"output_tokens": batch})
    assert len(results) == len(qs)
    for r in results:
        assert r.usage.output_tokens == r.ledger["units"]["output_tokens"]["spent"]
        cancelled = sum(e["cancelled"]["generated_before_cancel"] for e in r.trace if "cancelled" in e)
        assert sum(t for _, _, t in sample_texts(r)) + cancelled == r.usage.output_tokens
        if per is not None:
            assert r.usage.output_tokens <= per
        assert r.stop_reason == "done" or r.stop_reason.startswith("budget exhausted")
    if batch is not None:
        assert sum(r.usage.output_tokens for r in results) <= batch


# ------------------------------------------------------------------ real model
@pytest.mark.slow
def test_majority_and_adaptive_on_a_real_model(vllm_backend) -> None:
    from budgetlm.budget import Budget
    from budgetlm.evals import suites

    spec = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=3&seed=1"
    items = suites.get(spec).items()
    problems = [Problem(id=str(i), messages=it.messages) for i, it in enumerate(items)]
    budget = Budget(output_tokens=256)
    for strategy in (get("majority", max_tokens=64, seed=0), get("adaptive", max_tokens=64, seed=0)):
        results = strategy.solve(problems, backend=vllm_backend, budget=budget)
        assert len(results) == 3
        for r in results:
            for unit, limit in budget.limits().items():
                assert r.ledger["units"][unit]["spent"] <= limit
            assert r.usage.output_tokens == r.ledger["units"]["output_tokens"]["spent"]
            cancelled = sum(e["cancelled"]["generated_before_cancel"] for e in r.trace if "cancelled" in e)
            assert sum(t for _, _, t in sample_texts(r)) + cancelled == r.usage.output_tokens
            assert len(sample_texts(r)) >= 1


@pytest.mark.parametrize(("min_samples", "finished"), [(None, 3), (1, 1), (2, 2)])
def test_adaptive_settles_no_earlier_than_min_samples(min_samples: int | None, finished: int) -> None:
    """The first sample to finish cannot settle a problem alone (default min_samples = batch_size); the later
    ones are then cancelled.  Sample k is k + 1 times longer than the first, so they finish in order."""
    calls = [0]

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        calls[0] += 1
        return "x " * (4 * (calls[0] - 1)) + "Answer: 7"

    be = ScriptedBackend(script, token_time=0.01)
    s = get("adaptive", batch_size=3, max_samples=3, delta=0.45, rule="posterior", max_tokens=32,
            min_samples=min_samples)
    [r] = s.solve([Problem(id="p", messages=[{"role": "user", "content": "q"}])], backend=be,
                  budget={"output_tokens": 96})
    voted = [e for e in r.trace if "sample" in e]
    assert r.answer == "7" and len(voted) == finished
    assert r.details["cancelled_samples"] == 3 - finished


def test_adaptive_min_samples_above_max_samples_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"`min_samples` must be <= max_samples \(2\), got 3"):
        get("adaptive", min_samples=3, max_samples=2)
