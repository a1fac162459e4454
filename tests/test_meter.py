"""The meter: enforcement, clamping, children, concurrency (property tests with hypothesis)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetlm import Budget, BudgetExceeded, ConfigError, Meter, Usage
from budgetlm.meter import ledger_json


def cost(p: int, k: int, n: int) -> tuple[float, float]:
    """A monotone toy cost model: FLOPs and dollars grow with prompt and output."""
    return 10.0 * p + 7.0 * n * k, 1e-6 * p + 3e-6 * n * k


def simulate_call(meter: Meter, prompt: int, max_tokens: int, n: int, frac: list[float], think: float) -> Usage | None:
    """Reserve, 'generate' a fraction of the clamped max per sample, charge. None when refused."""
    try:
        res = meter.reserve(prompt_tokens=prompt, max_tokens=max_tokens, n=n, cost=cost)
    except BudgetExceeded:
        return None
    outs = [int(res.max_tokens * f) for f in (frac * n)[:n]]
    out = sum(outs)
    flops, usd = cost(prompt, 0, 1)
    flops += 7.0 * out
    usd += 3e-6 * out
    u = Usage(prompt_tokens=prompt, output_tokens=out, thinking_tokens=int(out * think), flops=flops, usd=usd)
    meter.charge(u, res)
    return u


budgets = st.builds(
    Budget,
    output_tokens=st.one_of(st.none(), st.integers(0, 500)),
    input_tokens=st.one_of(st.none(), st.integers(0, 800)),
    thinking_tokens=st.one_of(st.none(), st.integers(0, 300)),
    total_tokens=st.one_of(st.none(), st.integers(0, 1000)),
    flops=st.one_of(st.none(), st.floats(0, 20000)),
    usd=st.one_of(st.none(), st.floats(0, 0.003)),
)
calls = st.lists(
    st.tuples(
        st.integers(0, 120),  # prompt tokens
        st.integers(1, 200),  # requested max_tokens
        st.integers(1, 6),  # n samples
        st.lists(st.floats(0, 1), min_size=1, max_size=6),  # fraction of max used per sample
        st.floats(0, 1),  # share of output that is thinking
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(budget=budgets, seq=calls)
def test_random_call_sequences_never_exceed_any_limit(budget: Budget, seq: list) -> None:
    meter = Meter(budget)
    for prompt, mt, n, frac, think in seq:
        simulate_call(meter, prompt, mt, n, frac, think)
        for unit, limit in budget.limits().items():
            assert meter.spent(unit) <= limit + 1e-9, unit
    assert all(meter.reserved(u) == 0 for u in ("output_tokens", "flops"))


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 1000), prompt=st.integers(0, 50), mt=st.integers(1, 400), n=st.integers(1, 8))
def test_clamping_is_exact(limit: int, prompt: int, mt: int, n: int) -> None:
    """max_tokens is clamped to exactly floor(remaining / n), never lower, when the budget binds."""
    meter = Meter(Budget(output_tokens=limit))
    expected = min(mt, limit // n)
    if expected < 1:
        with pytest.raises(BudgetExceeded):
            meter.reserve(prompt_tokens=prompt, max_tokens=mt, n=n)
        return
    res = meter.reserve(prompt_tokens=prompt, max_tokens=mt, n=n)
    assert res.max_tokens == expected
    assert res.clamped == (expected < mt)
    assert res.binding_unit == ("output_tokens" if expected < mt else None)


@settings(max_examples=100, deadline=None)
@given(limit=st.floats(100, 1e5), prompt=st.integers(0, 50), mt=st.integers(1, 5000), n=st.integers(1, 4))
def test_flops_clamp_is_the_largest_fitting_value(limit: float, prompt: int, mt: int, n: int) -> None:
    meter = Meter(Budget(flops=limit))
    try:
        res = meter.reserve(prompt_tokens=prompt, max_tokens=mt, n=n, cost=cost)
    except BudgetExceeded:
        assert cost(prompt, 1, n)[0] > limit
        return
    assert cost(prompt, res.max_tokens, n)[0] <= limit
    if res.max_tokens < mt:
        assert cost(prompt, res.max_tokens + 1, n)[0] > limit


def test_total_and_thinking_limits_clamp() -> None:
    m = Meter(Budget(total_tokens=100))
    assert m.reserve(prompt_tokens=40, max_tokens=500, n=2).max_tokens == 30  # (100-40)/2
    m = Meter(Budget(thinking_tokens=10))
    assert m.reserve(prompt_tokens=0, max_tokens=50).max_tokens == 10
    assert m.reserve(prompt_tokens=0, max_tokens=50, may_think=False).max_tokens == 50  # answer-only call


@pytest.mark.parametrize(
    ("budget", "prompt", "unit"),
    [
        (Budget(input_tokens=10), 11, "input_tokens"),  # prompt too long for the input budget
        (Budget(total_tokens=10), 10, "total_tokens"),  # prompt fits, no output token does
        (Budget(output_tokens=0), 1, "output_tokens"),  # zero output budget
        (Budget(wall_seconds=0), 1, "wall_seconds"),  # time already up
    ],
)
def test_refusals_name_the_binding_unit(budget: Budget, prompt: int, unit: str) -> None:
    meter = Meter(budget)
    with pytest.raises(BudgetExceeded) as exc:
        meter.reserve(prompt_tokens=prompt, max_tokens=5)
    assert exc.value.unit == unit
    assert unit in str(exc.value)
    assert meter.stop_reason == f"budget exhausted: {unit}"


def test_wall_seconds_with_a_fake_clock() -> None:
    now = [0.0]
    meter = Meter(Budget(wall_seconds=10), clock=lambda: now[0])
    meter.reserve(prompt_tokens=1, max_tokens=1).release()
    now[0] = 10.5
    assert meter.remaining("wall_seconds") == pytest.approx(-0.5)
    assert meter.rho() == 0.0
    with pytest.raises(BudgetExceeded):
        meter.reserve(prompt_tokens=1, max_tokens=1)


def test_reservations_count_until_settled() -> None:
    meter = Meter(Budget(output_tokens=100))
    r1 = meter.reserve(prompt_tokens=0, max_tokens=60)
    assert meter.remaining("output_tokens") == 40
    r2 = meter.reserve(prompt_tokens=0, max_tokens=60)
    assert r2.max_tokens == 40  # the first call in flight holds 60
    meter.charge(Usage(output_tokens=10), r1)
    r2.release()
    assert meter.remaining("output_tokens") == 90
    r2.release()  # releasing twice is harmless
    assert meter.remaining("output_tokens") == 90


def test_rho() -> None:
    meter = Meter(Budget(output_tokens=100, usd=1.0))
    assert meter.rho() == 1.0
    meter.charge(Usage(output_tokens=25, usd=0.5))
    assert meter.rho() == pytest.approx(0.5)  # the tighter unit wins
    assert Meter().rho() == 1.0


@settings(max_examples=100, deadline=None)
@given(
    parent_limit=st.integers(0, 400),
    child_limits=st.lists(st.one_of(st.none(), st.integers(0, 300)), min_size=1, max_size=4),
    seq=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 80), st.integers(1, 3)), max_size=30),
)
def test_children_roll_up_and_respect_both_limits(parent_limit: int, child_limits: list, seq: list) -> None:
    parent = Meter(Budget(output_tokens=parent_limit))
    children = [parent.child(Budget(output_tokens=lim)) for lim in child_limits]
    for idx, mt, n in seq:
        c = children[idx % len(children)]
        simulate_call(c, 0, mt, n, [1.0], 0.0)
        for c2, lim in zip(children, child_limits):
            assert lim is None or c2.spent("output_tokens") <= lim
        assert parent.spent("output_tokens") <= parent_limit
    assert parent.spent("output_tokens") == sum(c.spent("output_tokens") for c in children)
    assert len(parent.records) == sum(len(c.records) for c in children)


def test_split_shares_what_remains() -> None:
    parent = Meter(Budget(output_tokens=100, usd=1.0))
    parent.charge(Usage(output_tokens=10))
    a, b, c = parent.split(3, weights=[1, 1, 2])
    assert (a.budget.output_tokens, b.budget.output_tokens, c.budget.output_tokens) == (22, 22, 45)
    assert c.budget.usd == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        parent.split(0)
    with pytest.raises(ConfigError):
        parent.split(2, weights=[1, -1])


def test_concurrent_threads_lose_nothing_and_never_overshoot() -> None:
    meter = Meter(Budget(output_tokens=5000))
    charged: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            u = simulate_call(meter, 3, 7, 2, [1.0], 0.0)
            if u is not None:
                with lock:
                    charged.append(u.output_tokens)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.spent("output_tokens") == sum(charged) <= 5000
    assert len(meter.records) == len(charged)
    assert meter.spent("input_tokens") == 3 * len(charged)
    assert meter.reserved("output_tokens") == 0


def test_concurrent_asyncio_tasks_lose_nothing() -> None:
    meter = Meter(Budget(output_tokens=3000))

    async def task() -> int:
        total = 0
        for _ in range(50):
            try:
                res = meter.reserve(prompt_tokens=1, max_tokens=9)
            except BudgetExceeded:
                break
            await asyncio.sleep(0)  # the call is "in flight" while other tasks reserve
            meter.charge(Usage(prompt_tokens=1, output_tokens=res.max_tokens), res)
            total += res.max_tokens
        return total

    async def main() -> list[int]:
        return await asyncio.gather(*(task() for _ in range(20)))

    totals = asyncio.run(main())
    assert meter.spent("output_tokens") == sum(totals) <= 3000
    assert sum(totals) == 3000  # 20 tasks x 50 x 9 = 9000 requested, so the budget is used up exactly


def test_tool_calls() -> None:
    meter = Meter(Budget(tool_calls=2))
    meter.record_tool_call()
    meter.record_tool_call()
    with pytest.raises(BudgetExceeded, match="tool_calls"):
        meter.record_tool_call()
    assert meter.spent("tool_calls") == 2


def test_summary_reports_joules_as_unmeasured() -> None:
    meter = Meter(Budget(output_tokens=10))
    meter.charge(Usage(output_tokens=3))
    s = meter.summary()
    assert s["units"]["output_tokens"] == {"spent": 3, "limit": 10, "remaining": 7}
    assert s["units"]["joules"]["spent"] is None
    assert meter.total().output_tokens == 3


def test_ledger_json_is_the_summary_unchanged() -> None:
    meter = Meter(Budget(output_tokens=10))
    meter.charge(Usage(output_tokens=3))
    s = meter.summary()
    j = ledger_json(s)
    assert j == s and list(j) == list(s) and json.dumps(j) == json.dumps(s)
    assert ledger_json({}) == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_tokens": 1, "max_tokens": 0}, "max_tokens"),  # zero tokens for a generation call
        ({"prompt_tokens": 1, "max_tokens": 5, "n": 0}, "`n`"),  # no samples
        ({"prompt_tokens": -1, "max_tokens": 5}, "prompt_tokens"),  # negative prompt
    ],
)
def test_reserve_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Meter().reserve(**kwargs)


def test_unknown_unit() -> None:
    with pytest.raises(ConfigError, match="unit"):
        Meter().remaining("tokens")
