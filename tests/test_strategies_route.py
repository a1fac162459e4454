"""The ``route`` strategy (ALGORITHMS.md §8): arms, bands, budgets and downgrades, reuse of the cheap
answer, calibration files, online learning, config errors, and a real vLLM run through the eval runner."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from budgetlm import ConfigError
from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.routing import EmbeddingClassifierRouter, LinUCB, PolicyRouter, RandomRouter, RouteQuery, decide
from budgetlm.strategies import Problem, get
from budgetlm.strategies.route import Route

SMALL = {"label": "small", "strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 8}}
LARGE = {"label": "large", "strategy": "majority", "params": {"n": 4, "temperature": 0.7, "max_tokens": 8}}
ARMS = [SMALL, LARGE]
"""The large arm's worst case is 4 × 8 = 32 output tokens."""


def problems(k: int = 3, **metadata: Any) -> list[Problem]:
    return [Problem(id=f"p{i}", messages=[{"role": "user", "content": f"question {i}"}], metadata=dict(metadata))
            for i in range(k)]


def spent(r: Any) -> int:
    """Output tokens charged to the problem's meter (the ledger ``solve`` records)."""
    return r.ledger["units"]["output_tokens"]["spent"]


# ------------------------------------------------------------------ boundary routers
@pytest.mark.parametrize(("router", "budget", "arm", "downgraded", "tokens"), [
    ("always_small", 100, 0, False, 2),  # everything to the cheap arm: one 2-token sample
    ("always_small", 1, 0, False, 1),  # the cheap arm clamps to the budget
    ("always_large", 100, 1, False, 8),  # the large arm: 4 samples of 2 tokens
    ("always_large", 32, 1, False, 8),  # exactly n × max_tokens is affordable
    ("always_large", 31, 0, True, 2),  # one token short of the worst case: downgraded to the cheap arm
    ("always_large", 8, 0, True, 2),
    ("always_large", 1, 0, True, 1),  # downgraded, and the cheap arm clamps
])
def test_boundary_routers_route_and_record(router: str, budget: int, arm: int, downgraded: bool, tokens: int) -> None:
    be = ScriptedBackend(["Answer: 42"])
    strat = get("route", router=router, arms=ARMS)
    results = strat.solve(problems(), backend=be, budget={"output_tokens": budget})
    for r in results:
        route = r.details["route"]
        assert route["arm"] == arm and route["label"] == ARMS[arm]["label"]
        assert route["chosen_by_router"] == (1 if router == "always_large" else 0)
        assert route["downgraded"] is downgraded
        assert route["reused_cheap"] is False and route["signal_output_tokens"] == 0
        assert r.details["expensive_calls"] == arm
        assert r.usage.output_tokens == tokens == spent(r) <= budget
        assert r.trace[0] == {"route": route}
    # every problem went to the same arm: one request per problem on it, no batched call, no signal call
    assert be.calls == be.requests == 3 and be.batches == []
    assert results[0].answer == ("42" if tokens == 2 or tokens == 8 else None)


def test_mixed_budgets_in_one_batch_downgrade_only_the_poor_problems() -> None:
    be = ScriptedBackend(["Answer: 42"])
    strat = get("route", router="always_large", arms=ARMS)
    probs = problems(2)
    from budgetlm.meter import Meter

    meters = [Meter({"output_tokens": 40}), Meter({"output_tokens": 20})]
    rich, poor = strat.run(probs, meters, be)
    assert rich.details["route"]["arm"] == 1 and not rich.details["route"]["downgraded"]
    assert poor.details["route"]["arm"] == 0 and poor.details["route"]["downgraded"]
    assert [m.spent("output_tokens") for m in meters] == [8, 2]
    assert be.calls == be.requests == 2 and be.batches == []  # each problem's own request, on its own arm


# ------------------------------------------------------------------ signal routers, reuse and spend
LOGPROB = {"name": "logprob", "params": {"max_tokens": 8}}


@pytest.mark.parametrize(("threshold", "reuse", "arm_requests", "arm", "tokens", "reused"), [
    (5.0, True, 0, 0, 2, True),  # routed small: the router's cheap answer is the result, no second call
    (5.0, False, 3, 0, 4, False),  # reuse off: the small arm runs again
    (-1.0, True, 3, 1, 10, False),  # routed large: signal 2 tokens + 4 samples × 2 tokens
    (-1.0, False, 3, 1, 10, False),
])
def test_logprob_router_reuses_the_cheap_answer(threshold: float, reuse: bool, arm_requests: int, arm: int,
                                                tokens: int, reused: bool) -> None:
    be = ScriptedBackend(["Answer: 42"])
    strat = get("route", router=LOGPROB, arms=ARMS, threshold=threshold, reuse_cheap=reuse)
    results = strat.solve(problems(), backend=be, budget={"output_tokens": 100})
    # the signal: one call per problem (each query is its own program); then one request per problem that runs an arm
    assert be.batches == [1, 1, 1] and be.requests == arm_requests and be.calls == 3 + arm_requests
    for r in results:
        route = r.details["route"]
        assert route["arm"] == arm and route["reused_cheap"] is reused
        assert route["signal_output_tokens"] == 2
        assert 0 < route["score"] < 1 and route["thresholds"] == [threshold]
        assert r.usage.output_tokens == tokens == spent(r)  # the router's signal tokens are in the usage
        assert r.sequential_tokens >= 2 + (2 if not reused else 0)
        assert r.answer == "42"
        assert r.details["expensive_calls"] == arm


@pytest.mark.parametrize(("budget", "arm", "downgraded"), [
    (34, 1, False),  # signal 2 tokens, then 32 left: the large arm's worst case fits exactly
    (33, 0, True),  # 31 left after the signal: downgraded (the cheap answer is reused, nothing more is spent)
    (2, 0, True),  # the signal takes everything
    (1, 0, True),  # the signal itself is clamped to 1 token
])
def test_affordability_is_checked_after_the_signal_is_paid(budget: int, arm: int, downgraded: bool) -> None:
    be = ScriptedBackend(["Answer: 42"])
    strat = get("route", router=LOGPROB, arms=ARMS, threshold=-10.0)  # the router always wants the large arm
    for r in strat.solve(problems(), backend=be, budget={"output_tokens": budget}):
        assert r.details["route"]["chosen_by_router"] == 1
        assert r.details["route"]["arm"] == arm and r.details["route"]["downgraded"] is downgraded
        assert r.usage.output_tokens == spent(r) <= budget


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 9, 10, 17, 33, 34, 40])
@pytest.mark.parametrize("router", [
    LOGPROB,  # signal, then either arm
    {"name": "consistency", "params": {"k": 2, "max_tokens": 8}},  # a 2-sample signal
    "always_large",  # no signal
    {"name": "random", "params": {"seed": 1}},  # a mix of arms
])
def test_spend_never_exceeds_the_budget(budget: int, router: Any) -> None:
    be = ScriptedBackend(["one two three four five six seven eight nine ten Answer: 42"])  # always truncated at 8
    strat = get("route", router=router, arms=ARMS, threshold=0.3)
    for r in strat.solve(problems(4), backend=be, budget={"output_tokens": budget}):
        assert r.usage.output_tokens == spent(r) <= budget
        assert r.details["route"]["signal_output_tokens"] <= budget


# ------------------------------------------------------------------ N > 2 arms
TEMPS = (0.0, 0.5, 1.0)


def by_temperature(prompt: str, i: int, sampling: SamplingParams) -> str:
    """Arm k samples at temperature TEMPS[k] and answers 10·(k + 1)."""
    return f"Answer: {10 * (TEMPS.index(sampling.temperature) + 1)}"


@pytest.mark.parametrize(("score", "arm"), [
    (0.1, 0),  # below the first threshold
    (0.3, 1),  # on the first threshold: w >= t goes up
    (0.45, 1),  # the middle band
    (0.6, 2),  # on the second threshold
    (0.95, 2),  # the top band
])
def test_three_arms_route_by_band(score: float, arm: int) -> None:
    arms = [{"label": f"t{k}", "strategy": "sample", "params": {"temperature": t, "max_tokens": 4}}
            for k, t in enumerate(TEMPS)]
    router = PolicyRouter(lambda q: float(q.messages[-1]["content"].split("=")[1]))
    strat = get("route", router=router, arms=arms, threshold=[0.3, 0.6])
    assert strat.thresholds == [0.3, 0.6]
    prob = Problem(id="p", messages=[{"role": "user", "content": f"score={score}"}])
    (r,) = strat.solve([prob], backend=ScriptedBackend(by_temperature), budget={"output_tokens": 50})
    assert r.details["route"]["arm"] == arm and r.details["route"]["label"] == f"t{arm}"
    assert r.details["route"]["score"] == score
    assert r.answer == str(10 * (arm + 1))  # the arm's strategy actually ran
    assert r.details["expensive_calls"] == int(arm > 0)


def test_three_arms_each_arm_runs_only_its_problems() -> None:
    arms = [{"label": f"t{k}", "strategy": "sample", "params": {"temperature": t, "max_tokens": 4}}
            for k, t in enumerate(TEMPS)]
    router = PolicyRouter(lambda q: float(q.messages[-1]["content"].split("=")[1]))
    strat = get("route", router=router, arms=arms, threshold=[0.3, 0.6])
    scores = [0.9, 0.1, 0.5, 0.0, 0.7]
    probs = [Problem(id=f"p{i}", messages=[{"role": "user", "content": f"score={s}"}]) for i, s in enumerate(scores)]
    log: list[tuple[str, float]] = []

    def script(prompt: str, i: int, sampling: SamplingParams) -> str:
        log.append((prompt.split("score=")[1].split()[0], sampling.temperature))
        return by_temperature(prompt, i, sampling)

    be = ScriptedBackend(script)
    results = strat.solve(probs, backend=be, budget={"output_tokens": 50})
    assert [r.problem_id for r in results] == [p.id for p in probs]  # original order kept
    assert [r.details["route"]["arm"] for r in results] == [2, 0, 1, 0, 2]
    assert [r.answer for r in results] == ["30", "10", "20", "10", "30"]
    # one request per problem, each at its own arm's temperature only (no batched call)
    assert be.calls == be.requests == len(probs) and be.batches == []
    assert sorted(log) == sorted((str(s), TEMPS[a]) for s, a in zip(scores, [2, 0, 1, 0, 2], strict=True))


# ------------------------------------------------------------------ calibration files
def test_calibration_file_sets_router_and_thresholds(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"thresholds": [0.7], "router": "random", "share": 0.3}))
    strat = get("route", calibration=str(path), arms=ARMS)
    assert isinstance(strat._router, RandomRouter)  # the calibration names the router it calibrated
    assert strat.thresholds == [0.7] and strat.params()["thresholds"] == [0.7]
    probs = problems(12)
    expected = [decide(w, [0.7]) for w in RandomRouter(seed=0).score([RouteQuery(p.messages) for p in probs])]
    assert 0 < sum(expected) < 12  # a real mix of arms
    results = strat.solve(probs, backend=ScriptedBackend(["Answer: 1"]), budget={"output_tokens": 100})
    assert [r.details["route"]["arm"] for r in results] == expected


def test_calibration_file_restores_a_learned_router_state(tmp_path: Path) -> None:
    clf = EmbeddingClassifierRouter(features="hashing", dim=64)
    train = [RouteQuery([{"role": "user", "content": f"{'hard' if i % 2 else 'easy'} question {i}"}]) for i in range(20)]
    clf.fit(train, [i % 2 for i in range(20)])
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"thresholds": [0.5], "router": {"name": "embedding",
                                                                 "params": {"features": "hashing", "dim": 64}},
                                "state": clf.state()}))
    strat = get("route", calibration=str(path), arms=ARMS)
    probs = [Problem(id=f"p{i}", messages=[{"role": "user", "content": f"{w} question {i}"}])
             for i, w in enumerate(["hard", "easy", "hard", "easy"])]
    results = strat.solve(probs, backend=ScriptedBackend(["Answer: 1"]), budget={"output_tokens": 100})
    expected = clf.score([RouteQuery(p.messages) for p in probs])
    assert [r.details["route"]["score"] for r in results] == pytest.approx(expected)
    assert [r.details["route"]["arm"] for r in results] == [1, 0, 1, 0]


def test_linucb_learns_online_from_gold_answers() -> None:
    router = LinUCB(n_arms=2, dim=8)
    strat = get("route", router=router, arms=ARMS)
    strat.solve(problems(3, gold="42"), backend=ScriptedBackend(["Answer: 42"]), budget={"output_tokens": 100})
    assert router.pulls.sum() == 3  # one update per problem
    assert (router.b != 0).any()
    before = router.pulls.copy()
    strat.solve(problems(3), backend=ScriptedBackend(["Answer: 42"]), budget={"output_tokens": 100})
    assert (router.pulls == before).all()  # no gold, no learning


# ------------------------------------------------------------------ config errors
def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


Build = Callable[[Path], dict[str, Any]]
BAD: list[tuple[Build, str]] = [
    # one arm: nothing to route between
    (lambda d: {"arms": [SMALL]}, r"`arms` must be at least two arms"),
    # no arms at all
    (lambda d: {"arms": []}, r"`arms` must be at least two arms"),
    # two arms with one label
    (lambda d: {"arms": [SMALL, {**LARGE, "label": "small"}]}, r"`arms` must be arms with distinct labels"),
    # an arm without a strategy
    (lambda d: {"arms": [SMALL, {"params": {"n": 2}}]}, r"`arms\[1\]` must be a dict with a `strategy`"),
    # an arm that is not a dict
    (lambda d: {"arms": ["sample", LARGE]}, r"`arms\[0\]`"),
    # a misspelt arm key
    (lambda d: {"arms": [{**SMALL, "parmas": {}}, LARGE]}, r"`arms\[0\]` must be keys among.*parmas"),
    # an unknown arm strategy lists the strategies
    (lambda d: {"arms": [SMALL, {"strategy": "nosuch"}]}, r"unknown strategy 'nosuch'.*majority"),
    # a bad parameter of an arm's strategy
    (lambda d: {"arms": [SMALL, {"strategy": "majority", "params": {"k": 3}}]}, r"unknown parameter.*'k'"),
    # an unknown router lists the routers
    (lambda d: {"router": "nosuch"}, r"unknown router 'nosuch'.*logprob"),
    # threshold and calibration together
    (lambda d: {"threshold": 0.5, "calibration": write(d, "c.json", '{"thresholds": [0.4]}')},
     r"either `threshold` or `calibration`"),
    # a calibration file that does not exist
    (lambda d: {"calibration": str(d / "missing.json")}, r"`calibration`.*not found"),
    # a calibration file that is not JSON
    (lambda d: {"calibration": write(d, "bad.json", "{thresholds: ")}, r"`calibration`.*not valid JSON"),
    # a calibration file without thresholds
    (lambda d: {"calibration": write(d, "nothr.json", '{"router": "random"}')}, r"`calibration`.*no `thresholds`"),
    # a calibration that is a JSON list
    (lambda d: {"calibration": write(d, "list.json", "[0.5]")}, r"`calibration`.*no `thresholds`"),
    # thresholds for the wrong number of arms
    (lambda d: {"threshold": [0.2, 0.5]}, r"`thresholds` must be 1 number"),
    # descending thresholds for three arms
    (lambda d: {"arms": [SMALL, LARGE, {**LARGE, "label": "xl"}], "threshold": [0.6, 0.2]}, r"`thresholds`.*ascending"),
    # a NaN threshold
    (lambda d: {"threshold": math.nan}, r"`thresholds`.*ascending"),
    # a calibration for three arms used with two
    (lambda d: {"calibration": write(d, "three.json", '{"thresholds": [0.2, 0.5]}')}, r"`thresholds` must be 1 number"),
    # a misspelt strategy parameter lists the valid ones
    (lambda d: {"treshold": 0.5}, r"unknown parameter.*'treshold'.*threshold"),
]


@pytest.mark.parametrize(("build", "match"), BAD)
def test_bad_inputs_raise_config_errors_naming_the_parameter(tmp_path: Path, build: Build, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get("route", **build(tmp_path))


@pytest.mark.parametrize(("kw", "match"), [
    ({"cost_weight": 1.5}, r"`cost_weight` must be <= 1(\.0)?, got 1.5"),  # checked up front, not at the first update
    ({"cost_weight": -0.1}, r"`cost_weight` must be >= 0"),
    ({"threshold": "high"}, r"`threshold` must be a number or a list of ascending numbers, got 'high'"),
    ({"arms": "sample"}, r"`arms` must be a list"),
    ({"reuse_cheap": "maybe"}, r"`reuse_cheap` must be true or false"),
])
def test_typed_parameters_name_the_parameter(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get("route", **kw)


def test_params_object_and_path_calibration(tmp_path: Path) -> None:
    from budgetlm.strategies.route import RouteParams

    assert all(f.description for f in RouteParams.model_fields.values())
    strat = Route(RouteParams(arms=ARMS, threshold=0.25, cache=True, cost_weight=0.5))
    assert strat.cache and strat.cost_weight == 0.5 and strat.thresholds == [0.25]
    assert strat.params() == get("route", arms=ARMS, threshold=0.25).params()
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"thresholds": [0.7], "router": "random"}))
    p = get("route", calibration=path, arms=ARMS).params()  # a Path is recorded as a string
    assert p["calibration"] == str(path) and p["router"] == "random" and json.loads(json.dumps(p)) == p


def test_defaults_and_params() -> None:
    strat = get("route")
    assert isinstance(strat, Route)
    assert [a.label for a in strat.arms] == ["small", "large"] and strat.thresholds == [0.5]
    assert [a.worst_tokens for a in strat.arms] == [(1, 256), (8, 256)]
    assert get("route", router="linucb").thresholds == [0.0]  # the router's default threshold
    p = get("route", router=LOGPROB, arms=ARMS, threshold=0.25).params()
    assert p["router"] == LOGPROB and p["thresholds"] == [0.25] and [a["label"] for a in p["arms"]] == ["small", "large"]
    assert json.loads(json.dumps(p)) == p  # JSON-ready for records


# ------------------------------------------------------------------ real model
SUITE = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=12&seed=3"
ROUTE_ARMS = [
    {"label": "small", "strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 32}},
    {"label": "large", "strategy": "majority", "params": {"n": 4, "temperature": 0.7, "max_tokens": 32, "seed": 0}},
]


@pytest.mark.slow
def test_route_on_vllm_with_a_calibrated_logprob_router(tmp_path: Path, vllm_backend: object) -> None:
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.records import read_records
    from budgetlm.evals.runner import run_eval
    from budgetlm.evals.suites import get as get_suite
    from budgetlm.routing import LogprobRouter, calibrate_threshold, strong_share

    items = get_suite(SUITE).items()[:6]  # calibrated on the questions it then routes: about half go up
    router = LogprobRouter(max_tokens=32)
    ws = router.score([RouteQuery(list(it.messages), id=it.id) for it in items], vllm_backend)  # type: ignore[arg-type]
    assert all(math.isfinite(w) for w in ws)
    t = calibrate_threshold(ws, 0.5)
    assert abs(strong_share(ws, t) - 0.5) <= 1 / 6

    strat = get("route", router={"name": "logprob", "params": {"max_tokens": 32}}, arms=ROUTE_ARMS, threshold=t)
    probs = [Problem(id=it.id, messages=list(it.messages)) for it in items]
    for budget in (200, 100):  # 100: after a ≤ 32-token signal, 4 × 32 is not affordable, so large is downgraded
        results = strat.solve(probs, backend=vllm_backend, budget={"output_tokens": budget})  # type: ignore[arg-type]
        assert 1 <= sum(r.details["route"]["chosen_by_router"] for r in results) <= 5  # both arms chosen
        for r in results:
            route = r.details["route"]
            assert r.usage.output_tokens == spent(r) <= budget
            assert r.details["expensive_calls"] == int(route["arm"] > 0)
            assert 0 < route["signal_output_tokens"] <= 32
            assert route["chosen_by_router"] == int(route["score"] >= t)
            if budget == 100:
                assert route["arm"] == 0 and route["downgraded"] == (route["chosen_by_router"] == 1)
            else:
                assert route["arm"] == route["chosen_by_router"] and not route["downgraded"]
            assert route["reused_cheap"] == (route["arm"] == 0)

    cfg = EvalConfig(
        name="route", suites=[SUITE.replace("size=12", "size=4")], models=["default"],
        strategies=[{"name": "route", "params": {"router": {"name": "logprob", "params": {"max_tokens": 32}},
                                                  "arms": ROUTE_ARMS, "threshold": t}}],
        budgets=[{"output_tokens": 200}], batch_size=4,
    )
    run_eval(cfg, tmp_path / "run", backends={"default": vllm_backend}, progress=False, report=False)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert len(recs) == 4
    for rec in recs:
        assert rec.error is None and rec.over_budget is False
        route = rec.details["route"]
        assert route["arm"] in (0, 1) and route["thresholds"] == [t]
        assert rec.details["expensive_calls"] == int(route["arm"] > 0)
        assert rec.output_tokens <= 200
