"""Per-key allowances across requests, persisted in SQLite, and every request's ledger.

The server promises that a key never spends more than its daily allowance, even with many
requests in flight.  Before a request runs, :meth:`AllowanceStore.reserve` clamps the request's
budget to what the key has left (``allowance − spent today − reserved by requests in flight``) in
every unit of the allowance and reserves that much; the request's :class:`~budgetlm.meter.Meter`
then enforces the clamped budget, so its actual spend can never exceed the reservation.
:meth:`AllowanceStore.commit` writes the actual spend and the request's record in one transaction
and releases the reservation.  Days are UTC dates; the tables:

- ``spend(key, day, unit, amount)`` — what each key spent per day and unit;
- ``requests(id, key, day, created, model, strategy, status, usage, ledger)`` — one row per finished
  request with its usage and full meter ledger (JSON), so nothing computed is lost on a restart.

Reservations live in memory: after a crash, requests that were in flight never committed, and
nothing they reserved stays held.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from budgetlm.budget import INTEGER_UNITS, UNITS
from budgetlm.errors import BudgetLMError
from budgetlm.io import JsonObject, JsonValue

__all__ = ["AllowanceExceeded", "AllowanceStore", "Reservation", "open_database", "today", "transaction"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (key TEXT NOT NULL, day TEXT NOT NULL, unit TEXT NOT NULL,
                                  amount REAL NOT NULL, PRIMARY KEY (key, day, unit));
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, key TEXT NOT NULL, day TEXT NOT NULL,
                                     created REAL NOT NULL, model TEXT, strategy TEXT, status TEXT,
                                     usage TEXT, ledger TEXT);
"""


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """A connection to the server's SQLite file (created with its folder), WAL-journaled, with ``schema`` applied.

    Autocommit mode: writes go through :func:`transaction`.  WAL with ``synchronous=NORMAL`` is durable
    across process crashes and commits fast.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back if the block raises)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def today() -> str:
    """The current UTC date (``YYYY-MM-DD``), the allowance period."""
    return dt.datetime.now(dt.UTC).date().isoformat()


class AllowanceExceeded(BudgetLMError):
    """The key has no allowance left in some unit today (HTTP 429)."""

    def __init__(self, key: str, unit: str, spent: float, limit: float) -> None:
        self.key, self.unit, self.spent, self.limit = key, unit, spent, limit
        super().__init__(
            f"the daily allowance of this API key is spent: {unit} {spent:g} of {limit:g} used (or reserved by "
            f"requests in flight); it resets at 00:00 UTC, or ask the server's operator for a larger allowance")


@dataclass
class Reservation:
    """What one request reserved."""

    id: str
    """The request id (also the ``requests`` row id)."""
    key: str
    """The API key (``anonymous`` without keys)."""
    day: str
    """The UTC day charged."""
    amounts: dict[str, float]
    """Reserved amount per allowance unit."""


class AllowanceStore:
    """SQLite-backed daily spend per key, with in-memory reservations for requests in flight."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._reserved: dict[str, Reservation] = {}
        self._conn = open_database(self.path, _SCHEMA)

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self._conn)

    def spent(self, key: str, day: str | None = None) -> dict[str, float]:
        """What ``key`` spent on ``day`` (default today), by unit."""
        with self._lock:
            return self._spent(key, day or today())

    def _spent(self, key: str, day: str) -> dict[str, float]:
        rows = self._conn.execute("SELECT unit, amount FROM spend WHERE key = ? AND day = ?", (key, day)).fetchall()
        return {u: a for u, a in rows}

    def _in_flight(self, key: str, day: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self._reserved.values():
            if r.key == key and r.day == day:
                for u, a in r.amounts.items():
                    out[u] = out.get(u, 0.0) + a
        return out

    def remaining(self, key: str, allowance: dict[str, float] | None) -> dict[str, float]:
        """Left today per allowance unit, after spend and reservations in flight (empty: unlimited)."""
        if not allowance:
            return {}
        day = today()
        with self._lock:
            spent, held = self._spent(key, day), self._in_flight(key, day)
        return {u: max(0.0, lim - spent.get(u, 0.0) - held.get(u, 0.0)) for u, lim in allowance.items()}

    def reserve(self, key: str, allowance: dict[str, float] | None, budget: dict[str, float],
                request_id: str | None = None) -> tuple[Reservation, dict[str, float]]:
        """Clamp ``budget`` to ``key``'s remaining allowance, reserve it, and return it.

        Raises :class:`AllowanceExceeded` when a unit has nothing left (integer units: less than 1).
        """
        day = today()
        rid = request_id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        with self._lock:
            clamped = dict(budget)
            amounts: dict[str, float] = {}
            if allowance:
                spent, held = self._spent(key, day), self._in_flight(key, day)
                for unit, lim in allowance.items():
                    left = lim - spent.get(unit, 0.0) - held.get(unit, 0.0)
                    if unit in INTEGER_UNITS:
                        left = float(int(left))
                    if left <= 0 or (unit in INTEGER_UNITS and left < 1):
                        raise AllowanceExceeded(key, unit, spent.get(unit, 0.0) + held.get(unit, 0.0), lim)
                    want = clamped.get(unit)
                    clamped[unit] = left if want is None else min(want, left)
                    amounts[unit] = clamped[unit]
            res = Reservation(rid, key, day, amounts)
            self._reserved[rid] = res
        return res, clamped

    def release(self, res: Reservation) -> None:
        """Drop a reservation without charging (the request failed before spending anything)."""
        with self._lock:
            self._reserved.pop(res.id, None)

    def commit(self, res: Reservation, spend: dict[str, float], *, model: str, strategy: str, status: str,
               usage: Mapping[str, JsonValue], ledger: Mapping[str, object]) -> None:
        """Charge ``spend`` (every budget unit) to the key's day and store the request row; releases the reservation."""
        import time

        with self._lock:
            try:
                with self._tx() as c:
                    for unit, amount in spend.items():
                        if unit not in UNITS or not amount:
                            continue
                        c.execute("INSERT INTO spend (key, day, unit, amount) VALUES (?, ?, ?, ?) "
                                  "ON CONFLICT (key, day, unit) DO UPDATE SET amount = amount + excluded.amount",
                                  (res.key, res.day, unit, float(amount)))
                    c.execute("INSERT INTO requests (id, key, day, created, model, strategy, status, usage, ledger) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (res.id, res.key, res.day, time.time(), model, strategy, status,
                               json.dumps(usage, default=str), json.dumps(ledger, default=str)))
            finally:
                self._reserved.pop(res.id, None)

    def requests(self, key: str | None = None) -> list[JsonObject]:
        """Stored request rows (usage and ledger decoded), oldest first."""
        q = "SELECT id, key, day, created, model, strategy, status, usage, ledger FROM requests"
        args: tuple[str, ...] = ()
        if key is not None:
            q += " WHERE key = ?"
            args = (key,)
        with self._lock:
            rows = self._conn.execute(q + " ORDER BY created", args).fetchall()
        return [{"id": rid, "key": k, "day": day, "created": created, "model": model, "strategy": strategy,
                 "status": status, "usage": json.loads(usage or "{}"), "ledger": json.loads(ledger or "{}")}
                for rid, k, day, created, model, strategy, status, usage, ledger in rows]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()
