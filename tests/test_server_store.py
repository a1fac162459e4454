"""Per-key daily allowances in SQLite: clamping, reservations in flight, commits, persistence, threads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from budgetlm.server.store import AllowanceExceeded, AllowanceStore, today


@pytest.fixture()
def store(tmp_path: Path) -> Any:
    s = AllowanceStore(tmp_path / "db" / "spend.sqlite")  # the parent folder is created
    yield s
    s.close()


def _commit(store: AllowanceStore, res: Any, spend: dict[str, float], **kw: Any) -> None:
    store.commit(res, spend, model=kw.get("model", "budgetlm/sample"), strategy=kw.get("strategy", "sample"),
                 status=kw.get("status", "ok"), usage=kw.get("usage", {}), ledger=kw.get("ledger", {}))


@pytest.mark.parametrize(("allowance", "budget", "expected"), [
    ({"output_tokens": 50}, {"output_tokens": 30}, {"output_tokens": 30}),  # fits: unchanged
    ({"output_tokens": 50}, {"output_tokens": 80}, {"output_tokens": 50}),  # clamped to what is left
    ({"output_tokens": 50}, {}, {"output_tokens": 50}),  # no limit asked: the allowance becomes the limit
    ({"output_tokens": 50}, {"usd": 0.5}, {"usd": 0.5, "output_tokens": 50}),  # other units kept, allowance added
    ({"usd": 0.25}, {"output_tokens": 10, "usd": 1.0}, {"output_tokens": 10, "usd": 0.25}),  # float unit clamped
    ({"output_tokens": 50, "usd": 1.0}, {"output_tokens": 70, "usd": 0.1},
     {"output_tokens": 50, "usd": 0.1}),  # every unit clamped independently
    (None, {"output_tokens": 10**9}, {"output_tokens": 10**9}),  # unlimited: no clamping
    ({}, {"output_tokens": 7}, {"output_tokens": 7}),  # empty allowance: unlimited too
])
def test_reserve_clamps_budget_per_unit(store: AllowanceStore, allowance: Any, budget: dict[str, float],
                                        expected: dict[str, float]) -> None:
    res, clamped = store.reserve("k", allowance, budget)
    assert clamped == expected
    assert res.amounts == {u: expected[u] for u in (allowance or {})}  # only allowance units are held
    assert res.key == "k" and res.day == today() and res.id.startswith("chatcmpl-")


def test_reservations_in_flight_are_counted(store: AllowanceStore) -> None:
    allowance = {"output_tokens": 50}
    r1, c1 = store.reserve("k", allowance, {"output_tokens": 30})
    r2, c2 = store.reserve("k", allowance, {"output_tokens": 30})
    assert c1 == {"output_tokens": 30} and c2 == {"output_tokens": 20}  # the second gets what is left
    assert store.remaining("k", allowance) == {"output_tokens": 0.0}
    with pytest.raises(AllowanceExceeded) as ei:
        store.reserve("k", allowance, {"output_tokens": 30})
    exc = ei.value
    assert (exc.unit, exc.spent, exc.limit, exc.key) == ("output_tokens", 50, 50, "k")
    msg = str(exc)
    assert "output_tokens" in msg and "50 of 50" in msg and "00:00 UTC" in msg
    assert r1.id != r2.id
    assert store.reserve("other", allowance, {"output_tokens": 30})[1] == {"output_tokens": 30}  # per key


def test_commit_charges_actual_spend_and_releases(store: AllowanceStore) -> None:
    allowance = {"output_tokens": 50}
    res, clamped = store.reserve("k", allowance, {"output_tokens": 40})
    assert clamped == {"output_tokens": 40} and store.remaining("k", allowance) == {"output_tokens": 10.0}
    _commit(store, res, {"output_tokens": 12, "input_tokens": 5, "usd": 0.0, "bogus_unit": 3})
    assert store.spent("k") == {"output_tokens": 12.0, "input_tokens": 5.0}  # zero and unknown units skipped
    assert store.remaining("k", allowance) == {"output_tokens": 38.0}  # reservation released, spend charged
    res2, _ = store.reserve("k", allowance, {"output_tokens": 100})
    _commit(store, res2, {"output_tokens": 8})
    assert store.spent("k")["output_tokens"] == 20.0  # spend accumulates over the day
    assert store.spent("k", day="1999-01-01") == {}  # other days are separate


def test_release_frees_the_reservation(store: AllowanceStore) -> None:
    allowance = {"output_tokens": 50}
    res, _ = store.reserve("k", allowance, {"output_tokens": 50})
    with pytest.raises(AllowanceExceeded):
        store.reserve("k", allowance, {"output_tokens": 1})
    store.release(res)
    store.release(res)  # twice is harmless
    assert store.remaining("k", allowance) == {"output_tokens": 50.0}
    assert store.spent("k") == {} and store.requests() == []  # nothing charged, no row


def test_commit_releases_even_when_the_write_fails(store: AllowanceStore) -> None:
    allowance = {"output_tokens": 10}
    res, _ = store.reserve("k", allowance, {"output_tokens": 10})
    _commit(store, res, {"output_tokens": 1})
    res2, _ = store.reserve("k", allowance, {"output_tokens": 9})
    with pytest.raises(ValueError):  # a spend that is no number fails inside the transaction, which rolls back
        _commit(store, res2, {"input_tokens": 4, "output_tokens": "nine"})
    assert store.spent("k") == {"output_tokens": 1.0}  # rolled back: input_tokens was not charged either
    assert len(store.requests()) == 1  # and no request row was written
    assert store.remaining("k", allowance) == {"output_tokens": 9.0}  # and the reservation is gone


def test_persistence_across_stores(tmp_path: Path) -> None:
    path = tmp_path / "spend.sqlite"
    s1 = AllowanceStore(path)
    res, _ = s1.reserve("k", {"output_tokens": 20}, {"output_tokens": 20})
    _commit(s1, res, {"output_tokens": 15}, usage={"completion_tokens": 15},
            ledger={"units": {"output_tokens": {"spent": 15}}}, model="budgetlm/majority", strategy="majority")
    held, _ = s1.reserve("k", {"output_tokens": 20}, {"output_tokens": 5})  # in flight when the process "dies"
    s1.close()
    s2 = AllowanceStore(path)
    try:
        assert s2.spent("k") == {"output_tokens": 15.0}
        assert s2.remaining("k", {"output_tokens": 20}) == {"output_tokens": 5.0}  # in-memory holds are gone
        rows = s2.requests()
        assert len(rows) == 1 and rows[0]["id"] == res.id and rows[0]["model"] == "budgetlm/majority"
        assert rows[0]["ledger"]["units"]["output_tokens"]["spent"] == 15
        _, clamped = s2.reserve("k", {"output_tokens": 20}, {"output_tokens": 100})
        assert clamped == {"output_tokens": 5.0}
        assert held.id not in {r["id"] for r in rows}
    finally:
        s2.close()


@pytest.mark.parametrize(("allowance", "spent", "outcome"), [
    ({"output_tokens": 10}, {"output_tokens": 9.5}, AllowanceExceeded),  # 0.5 tokens left floors to 0: refused
    ({"output_tokens": 10}, {"output_tokens": 8.5}, {"output_tokens": 1.0}),  # 1.5 floors to 1
    ({"usd": 1.0}, {"usd": 0.75}, {"usd": 0.25}),  # float units do not floor
    ({"usd": 1.0}, {"usd": 1.0}, AllowanceExceeded),  # exactly spent
    ({"output_tokens": 10, "usd": 1.0}, {"usd": 1.0}, AllowanceExceeded),  # one spent unit refuses the request
])
def test_integer_units_floor(store: AllowanceStore, allowance: dict[str, float], spent: dict[str, float],
                             outcome: Any) -> None:
    res, _ = store.reserve("k", None, {})
    _commit(store, res, spent)  # fractional token spend can only come from here, but the floor must hold
    if outcome is AllowanceExceeded:
        with pytest.raises(AllowanceExceeded):
            store.reserve("k", allowance, {"output_tokens": 100, "usd": 100.0})
    else:
        _, clamped = store.reserve("k", allowance, {"output_tokens": 100, "usd": 100.0})
        for unit, amount in outcome.items():
            assert clamped[unit] == pytest.approx(amount)


def test_threads_never_overspend(store: AllowanceStore) -> None:
    allowance = {"output_tokens": 30}
    committed, refused = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(50)

    def worker() -> None:
        barrier.wait()
        try:
            res, clamped = store.reserve("k", allowance, {"output_tokens": 1})
        except AllowanceExceeded:
            with lock:
                refused.append(1)
            return
        assert clamped == {"output_tokens": 1}
        _commit(store, res, {"output_tokens": clamped["output_tokens"]})
        with lock:
            committed.append(res.id)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(committed) == 30 and len(refused) == 20
    assert store.spent("k") == {"output_tokens": 30.0}
    assert len(store.requests("k")) == 30 and len(set(committed)) == 30


def test_requests_decodes_rows_and_filters_by_key(store: AllowanceStore) -> None:
    ra, _ = store.reserve("a", None, {})
    _commit(store, ra, {"output_tokens": 2}, usage={"completion_tokens": 2, "prompt_tokens": 3},
            ledger={"units": {"output_tokens": {"spent": 2}}}, status="ok")
    rb, _ = store.reserve("b", None, {})
    _commit(store, rb, {}, usage={}, ledger={}, status="error: boom")
    rows = store.requests()
    assert [r["id"] for r in rows] == [ra.id, rb.id]  # oldest first
    assert rows[0]["usage"] == {"completion_tokens": 2, "prompt_tokens": 3}
    assert rows[0]["ledger"]["units"]["output_tokens"]["spent"] == 2
    assert rows[0]["key"] == "a" and rows[0]["day"] == today() and rows[0]["strategy"] == "sample"
    assert rows[1]["status"] == "error: boom" and rows[1]["usage"] == {}
    assert [r["id"] for r in store.requests("b")] == [rb.id]
    assert store.requests("nobody") == []
