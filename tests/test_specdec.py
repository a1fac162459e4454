"""Speculative decoding verification math (ALGORITHMS.md §6) and speculative-cascade targets (§7)."""

from __future__ import annotations

import math

import pytest
import torch

from budgetlm.errors import ConfigError
from budgetlm.specdec import (
    RULES,
    acceptance_rate,
    cascade_target,
    expected_tokens,
    ideal_speedup,
    processed_probs,
    verify,
)

V, GAMMA, ROUNDS = 6, 3, 12_000


def _dists(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(GAMMA, V, generator=g) * 1.5, -1)
    p = torch.softmax(torch.randn(GAMMA + 1, V, generator=g) * 1.5, -1)
    return q, p


def _rounds(q: torch.Tensor, t: torch.Tensor, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(ROUNDS):
        draft = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(GAMMA)]
        out.append(verify(draft, q, t, generator=g).tokens)
    return out


def _chi2_p(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=V).double()
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # never a token the target gives probability 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    # chi-square survival function: the regularised upper incomplete gamma Q(dof/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("seed", [0, 1])  # two random (q, p) pairs with little overlap
def test_lossless_output_follows_the_target_position_by_position(seed: int) -> None:
    q, p = _dists(seed)
    rounds = _rounds(q, p, seed + 100)
    # position 0 always follows p_0; position i (reached after i acceptances) follows p_i
    for i in range(GAMMA + 1):
        at_i = [r[i] for r in rounds if len(r) > i]
        assert len(at_i) > 200
        assert _chi2_p(at_i, p[i]) > 1e-3, f"position {i} does not follow p_{i}"
    # and the drafter's distribution is rejected where it differs (the test can fail)
    assert _chi2_p([r[0] for r in rounds], q[0]) < 1e-6


def test_each_round_emits_one_to_gamma_plus_one_tokens_and_acceptance_matches_alpha() -> None:
    q, p = _dists(3)
    rounds = _rounds(q, p, 7)
    assert all(1 <= len(r) <= GAMMA + 1 for r in rounds)
    # P(first draft accepted) = α_0 = Σ min(p_0, q_0)
    first_accepted = sum(len(r) >= 2 for r in rounds) / ROUNDS
    assert first_accepted == pytest.approx(float(acceptance_rate(p[0], q[0])), abs=0.02)


def test_q_equal_p_accepts_everything() -> None:
    _, p = _dists(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        draft = [int(torch.multinomial(p[i], 1, generator=g)) for i in range(GAMMA)]
        res = verify(draft, p[:GAMMA], p, generator=g)
        assert res.accepted == GAMMA and len(res.tokens) == GAMMA + 1 and res.tokens[:GAMMA] == draft


@pytest.mark.parametrize(("draft", "expected", "accepted"), [
    ([2, 1, 0], [2, 1, 0, 5], 3),  # all drafts are the argmax: accepted, plus the bonus argmax
    ([2, 3, 0], [2, 1], 1),        # second draft is not the argmax: the argmax replaces it
    ([4, 1, 0], [2], 0),           # first draft wrong
])
def test_greedy_accepts_iff_draft_is_the_argmax(draft: list[int], expected: list[int], accepted: int) -> None:
    p = torch.full((GAMMA + 1, V), 0.01)
    for i, best in enumerate([2, 1, 0, 5]):
        p[i, best] = 1.0
    q = torch.full((GAMMA, V), 1.0 / V)
    res = verify(draft, q, p, greedy=True)
    assert (res.tokens, res.accepted) == (expected, accepted)


def test_verify_shapes_are_checked() -> None:
    q, p = _dists(0)
    with pytest.raises(ConfigError, match="`q` must have 3 rows and `t` 4"):
        verify([1, 2, 3], q, p[:3])


# ------------------------------------------------------------------ speculative cascades
def _raw_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.softmax(torch.randn(GAMMA + 1, V, generator=g) * 2, -1),
            torch.softmax(torch.randn(GAMMA + 1, V, generator=g) * 2, -1))


@pytest.mark.parametrize("rule", RULES)
def test_pi_is_a_distribution_and_extremes_reproduce_drafter_or_target(rule: str) -> None:
    q, p = _raw_pair(1)
    pi, d = cascade_target(q, p, q, p, rule, 0.3)
    assert torch.allclose(pi.sum(-1), torch.ones(GAMMA + 1)) and (pi >= 0).all() and ((d >= 0) & (d <= 1)).all()
    if rule == "chow":
        pi1, d1 = cascade_target(q, p, q, p, rule, 1.0)  # never defers: π = q (δ ≡ 0)
        assert torch.allclose(pi1, q) and (d1 == 0).all()
        pi0, d0 = cascade_target(q, p, q, p, rule, 0.0)  # max q < 1 always: π = p (δ ≡ 1)
        assert torch.allclose(pi0, p) and (d0 == 1).all()


@pytest.mark.parametrize("rule", RULES)
def test_deferral_is_non_increasing_in_lenience(rule: str) -> None:
    q, p = _raw_pair(2)
    rates = [float(cascade_target(q, p, q, p, rule, a)[1].mean()) for a in (0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)]
    assert all(b <= a + 1e-9 for a, b in zip(rates, rates[1:], strict=False)), rates
    assert rates[0] > rates[-1]  # the lenience actually matters on this pair


@pytest.mark.parametrize("rule", ["diff", "v1", "v3"])
def test_cascade_output_follows_pi(rule: str) -> None:
    q, p = _raw_pair(5)
    pi, _ = cascade_target(q, p, q, p, rule, 0.2)
    rounds = _rounds(q[:GAMMA], pi, 11)
    for i in range(2):
        assert _chi2_p([r[i] for r in rounds if len(r) > i], pi[i]) > 1e-3


def test_rules_read_raw_probabilities_but_build_pi_from_tempered_ones() -> None:
    q_raw = torch.tensor([[0.9, 0.1]])
    p_raw = torch.tensor([[0.2, 0.8]])
    q_t, p_t = torch.tensor([[0.6, 0.4]]), torch.tensor([[0.4, 0.6]])
    pi, d = cascade_target(q_t, p_t, q_raw, p_raw, "chow", 0.05)  # raw max q 0.9 < 0.95: defer
    assert float(d) == 1 and torch.allclose(pi, p_t)
    pi, d = cascade_target(q_t, p_t, q_raw, p_raw, "chow", 0.2)   # 0.9 >= 0.8: keep the drafter
    assert float(d) == 0 and torch.allclose(pi, q_t)


@pytest.mark.parametrize(("rule", "alpha", "match"), [
    ("nope", 0.1, "`rule` must be one of"),  # unknown rule lists the valid ones
    ("chow", 1.5, "`alpha`"),                # lenience outside [0, 1]
    ("diff", -0.1, "`alpha`"),
])
def test_bad_cascade_parameters(rule: str, alpha: float, match: str) -> None:
    q, p = _raw_pair(0)
    with pytest.raises(ConfigError, match=match):
        cascade_target(q, p, q, p, rule, alpha)


# ------------------------------------------------------------------ processing and speed-up formulas
def test_processed_probs() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert torch.equal(processed_probs(logits, 0.0), torch.tensor([1.0, 0.0, 0.0, 0.0]))  # greedy: one-hot
    assert torch.allclose(processed_probs(logits, 1.0), torch.softmax(logits, -1))
    top2 = processed_probs(logits, 1.0, top_k=2)
    assert (top2[2:] == 0).all() and torch.allclose(top2[:2], torch.softmax(logits[:2], -1))
    nucleus = processed_probs(logits, 1.0, top_p=0.7)  # softmax = .64, .24, .09, .03: the first two reach 0.7
    assert (nucleus[2:] == 0).all() and float(nucleus.sum()) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="`temperature`"):
        processed_probs(logits, -1.0)


@pytest.mark.parametrize(("alpha", "gamma", "c", "tokens", "speedup"), [
    (0.0, 4, 0.1, 1.0, 1 / 1.4),     # nothing accepted: one token per round, draft cost wasted
    (1.0, 4, 0.0, 5.0, 5.0),         # everything accepted with free drafts: γ + 1 tokens per round
    (0.8, 4, 0.05, (1 - 0.8 ** 5) / 0.2, (1 - 0.8 ** 5) / 0.2 / 1.2),  # the paper's formula
])
def test_speedup_formulas(alpha: float, gamma: int, c: float, tokens: float, speedup: float) -> None:
    assert expected_tokens(alpha, gamma) == pytest.approx(tokens)
    assert ideal_speedup(alpha, gamma, c) == pytest.approx(speedup)
    assert math.isfinite(ideal_speedup(alpha, gamma, c))


def test_bad_gamma_and_cost_ratio() -> None:
    with pytest.raises(ConfigError, match="`gamma`"):
        expected_tokens(0.5, 0)
    with pytest.raises(ConfigError, match="`c`"):
        ideal_speedup(0.5, 2, -1)
