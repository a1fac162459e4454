"""Agent sessions: one budget over every chat call of one agent task, persisted in SQLite.

An agent framework that only speaks the OpenAI API makes many chat calls per task.  A **session id**
(the ``X-Budgetlm-Session`` header, or the extra-body field ``session``) groups them; the first call
may set the **session budget** (extra-body ``session_budget``, in the forms of ``budget`` plus
``steps``: ``{"output_tokens": 2000, "tool_calls": 6, "steps": 8}`` or
``"output_tokens=2000,steps=8"``), else the server's default for the key applies.

**Guarantee** (the same reserve/settle scheme as the daily allowances of :mod:`.store`): before a
call runs, :meth:`SessionStore.reserve` clamps the call's budget, in every unit of the session budget,
to what the session has left (``limit − spent − held by the session's calls in flight``) and holds
that much, plus one step; the call's meter enforces the clamped budget, so however many calls of one
session run at once their spend together never exceeds the session budget.  :meth:`SessionStore.commit`
adds the call's actual spend and one step to the session and stores the call's row, in one
transaction, and drops the hold.  ``wall_seconds`` counts from the session's first call: each call's
budget is clamped to the seconds left.

**Forced final answer.**  When the session's budget leaves room for one more step only — the last of
``steps``, or (after at least one step) less than two average steps' worth left of a limited unit — the
call is *final*: the server withholds the tools and tells the model to answer now
(:data:`FINAL_INSTRUCTION`), and the response says ``budgetlm.forced_final = true`` with the reason.
A session with no ``tool_calls`` left is answered without tools too (the calls never fail for it).
A session with nothing left in another unit refuses further calls with 429
``session_budget_exhausted`` (and ``x-should-retry: false``: retrying cannot help).

**Persistence.**  Tables ``sessions`` (budget, spend, steps, times) and ``session_calls`` (one row per
finished call: request id, model, backend, strategy, route decision, usage, whether it was forced)
live in the server's database, so a session survives a restart.  Holds live in memory: after a crash
nothing a dead call held stays held.  Sessions idle longer than the TTL are deleted; a call with an
expired id starts a new session.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from budgetlm.budget import INTEGER_UNITS, UNITS, Budget
from budgetlm.errors import BudgetLMError, ConfigError
from budgetlm.io import JsonObject, JsonValue
from budgetlm.server.store import open_database, transaction

__all__ = [
    "FINAL_INSTRUCTION",
    "NO_TOOL_CALLS_LEFT",
    "SESSION_HEADER",
    "SessionBudget",
    "SessionExhausted",
    "SessionStore",
    "SessionTicket",
    "check_session_id",
    "parse_session_budget",
]

SESSION_HEADER = "x-budgetlm-session"
"""The request header naming the session (also echoed on the response)."""
FINAL_INSTRUCTION = ("The budget for this task is nearly spent: give your final answer now, in plain text, "
                     "without calling any tool.")
"""The message appended to a call forced to be the session's final answer."""
NO_TOOL_CALLS_LEFT = "the session has no tool calls left"
"""The forced-final reason of a call offered tools when the session has no ``tool_calls`` left."""
SESSION_UNITS = tuple(u for u in UNITS if u != "joules")
"""Units a session budget may limit (energy is not measured per call on most backends)."""
_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (key TEXT NOT NULL, id TEXT NOT NULL, created REAL NOT NULL,
                                     last_active REAL NOT NULL, budget TEXT NOT NULL, steps_limit INTEGER,
                                     spent TEXT NOT NULL, steps INTEGER NOT NULL, forced INTEGER NOT NULL,
                                     PRIMARY KEY (key, id));
CREATE TABLE IF NOT EXISTS session_calls (key TEXT NOT NULL, session TEXT NOT NULL, step INTEGER NOT NULL,
                                          request_id TEXT NOT NULL, created REAL NOT NULL, model TEXT,
                                          backend TEXT, strategy TEXT, status TEXT, forced_final INTEGER,
                                          reason TEXT, route TEXT, usage TEXT);
CREATE INDEX IF NOT EXISTS session_calls_by_session ON session_calls (key, session, step);
"""


@dataclass(frozen=True)
class SessionBudget:
    """A session's limits: budget units plus a number of steps (chat calls)."""

    limits: dict[str, float] = field(default_factory=dict)
    """Unit → limit (every unit of :data:`SESSION_UNITS`)."""
    steps: int | None = None
    """Most chat calls in the session (``None``: unlimited)."""

    def to_json(self) -> dict[str, float]:
        """``{unit: limit, ..., "steps": n}``."""
        out = dict(self.limits)
        if self.steps is not None:
            out["steps"] = self.steps
        return out


def parse_session_budget(spec: object, param: str = "session_budget") -> SessionBudget:
    """A :class:`SessionBudget` from a mapping or a ``"unit=value,...,steps=n"`` string.

    Raises :class:`ConfigError` naming ``param.<unit>`` with the fix.
    """
    if isinstance(spec, SessionBudget):
        return spec
    if isinstance(spec, str):
        items: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"`{param}` must be 'unit=value,...', got {spec!r}; e.g. 'output_tokens=2000,steps=8'")
            try:
                items[name.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"`{param}.{name.strip()}` must be a number, got {value.strip()!r}") from None
        spec = items
    if not isinstance(spec, Mapping):
        raise ConfigError(f"`{param}` must be a mapping of unit to limit or a 'unit=value,...' string, got "
                          f"{json.dumps(spec, default=str)}; e.g. {{\"output_tokens\": 2000, \"steps\": 8}}")
    limits = dict(spec)
    steps = limits.pop("steps", None)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int | float) or steps < 1 or float(steps) != int(steps):
            raise ConfigError(f"`{param}.steps` must be a whole number >= 1, got {json.dumps(steps, default=str)}; "
                              f"it counts the chat calls of the session")
        steps = int(steps)
    for unit, lim in limits.items():
        if unit == "joules":
            raise ConfigError(f"`{param}.joules` is not supported: energy is not measured per call on most backends; "
                              f"limit usd or tokens instead")
        if isinstance(lim, bool) or not isinstance(lim, int | float):
            raise ConfigError(f"`{param}.{unit}` must be a number, got {json.dumps(lim, default=str)}")
        if unit in UNITS and lim <= 0:
            raise ConfigError(f"`{param}.{unit}` must be > 0, got {lim!r}; remove the entry for no limit")
    try:
        b = Budget.of(limits)
    except ConfigError as exc:
        raise ConfigError(f"`{param}` is malformed: {exc} (or `steps`)") from None
    return SessionBudget({str(u): v for u, v in b.limits().items()}, steps)


def check_session_id(sid: object, param: str = "session") -> str:
    """The session id, or a :class:`ConfigError` naming ``param``."""
    if not isinstance(sid, str) or not _ID.match(sid):
        raise ConfigError(f"`{param}` must be 1-128 letters, digits or '_.:@-', got {json.dumps(sid, default=str)[:80]}; "
                          f"e.g. a UUID per agent task")
    return sid


class SessionExhausted(BudgetLMError):
    """The session has nothing left in some unit (HTTP 429; not retryable unless ``held``)."""

    def __init__(self, sid: str, unit: str, spent: float, limit: float, held: bool = False) -> None:
        self.session, self.unit, self.spent, self.limit, self.held = sid, unit, spent, limit, held
        if held:
            msg = (f"the budget of session {sid!r} is held by its calls in flight: {unit} {spent:g} of {limit:g} spent "
                   f"or held; retry when they finish (or give each call a smaller budget)")
        else:
            msg = (f"the budget of session {sid!r} is spent: {unit} {spent:g} of {limit:g} used; end the agent task, "
                   f"or start a new session with a larger session_budget")
        super().__init__(msg)


@dataclass
class SessionTicket:
    """What one call of a session holds, and how the session stood when it started."""

    key: str
    """The API key the session belongs to."""
    session: str
    """The session id."""
    request_id: str
    """The call's request id."""
    step: int
    """The call's step number in the session (0-based; concurrent calls get distinct numbers)."""
    held: dict[str, float]
    """Units held for this call (the clamped budget's amounts in the session's limited units)."""
    final: str | None = None
    """Why this call must be the final answer (``None``: it may go on)."""
    rho: float = 1.0
    """The session's remaining share ρ (tightest limited unit, steps included) when the call started."""
    tool_calls_left: float | None = None
    """Tool calls the session had left for this call (``None``: unlimited)."""


@dataclass
class _Row:
    key: str
    id: str
    created: float
    last_active: float
    budget: SessionBudget
    spent: dict[str, float]
    steps: int
    forced: int


class SessionStore:
    """Sessions in SQLite with in-memory holds for calls in flight (see the module docstring)."""

    def __init__(self, path: str | Path, ttl_s: float = 86400.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, SessionTicket] = {}
        self._next_step: dict[tuple[str, str], int] = {}
        self._conn = open_database(self.path, _SCHEMA)  # the allowances' file and settings

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self._conn)

    # ------------------------------------------------------------------ rows
    def _load(self, key: str, sid: str) -> _Row | None:
        r = self._conn.execute("SELECT key, id, created, last_active, budget, steps_limit, spent, steps, forced "
                               "FROM sessions WHERE key = ? AND id = ?", (key, sid)).fetchone()
        if r is None:
            return None
        return _Row(r[0], r[1], r[2], r[3], SessionBudget(json.loads(r[4]), r[5]), json.loads(r[6]), r[7], r[8])

    def _expired(self, row: _Row, now: float) -> bool:
        return now - row.last_active > self.ttl_s and not self._holds(row.key, row.id)

    def _holds(self, key: str, sid: str) -> list[SessionTicket]:
        return [t for t in self._held.values() if t.key == key and t.session == sid]

    def _delete(self, key: str, sid: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM sessions WHERE key = ? AND id = ?", (key, sid))
            c.execute("DELETE FROM session_calls WHERE key = ? AND session = ?", (key, sid))
        self._next_step.pop((key, sid), None)

    def purge(self) -> int:
        """Delete sessions idle longer than the TTL (none with calls in flight); returns how many."""
        now = self._clock()
        with self._lock:
            rows = self._conn.execute("SELECT key, id FROM sessions WHERE last_active < ?", (now - self.ttl_s,)).fetchall()
            gone = [(k, s) for k, s in rows if not self._holds(k, s)]
            for k, s in gone:
                self._delete(k, s)
        return len(gone)

    # ------------------------------------------------------------------ reserve / commit
    def reserve(self, key: str, sid: str, budget: SessionBudget | None, request_budget: Mapping[str, float],
                request_id: str | None = None, *, explicit: bool = False) -> tuple[SessionTicket, dict[str, float]]:
        """Open (or continue) session ``sid`` of ``key`` and hold this call's share; returns the ticket and the
        call's budget clamped to what the session has left.

        ``budget`` is the session budget of a new session (ignored for an existing one, whose budget is
        fixed at its first call: with ``explicit`` (the client sent it) a different one is a :class:`ConfigError`).
        Raises :class:`SessionExhausted` when a unit
        (steps included; ``tool_calls`` excepted: the call then runs without tools) has nothing left.
        """
        now = self._clock()
        rid = request_id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        with self._lock:
            row = self._load(key, sid)
            if row is not None and self._expired(row, now):
                self._delete(key, sid)
                row = None
            if row is not None and explicit and budget is not None and budget != row.budget:
                raise ConfigError(f"`session_budget` is fixed at the session's first call ({row.budget.to_json()}), "
                                  f"got {budget.to_json()}; leave it out of later calls, or start a new session id")
            if row is None:
                row = _Row(key, sid, now, now, budget or SessionBudget(), {}, 0, 0)
                with self._tx() as c:
                    c.execute("INSERT INTO sessions (key, id, created, last_active, budget, steps_limit, spent, steps, "
                              "forced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (key, sid, now, now, json.dumps(row.budget.limits), row.budget.steps, "{}", 0, 0))
            holds = self._holds(key, sid)
            held_steps = len(holds)
            clamped = dict(request_budget)
            amounts: dict[str, float] = {}
            rho = 1.0
            final: str | None = None
            tool_left: float | None = None
            b = row.budget
            if b.steps is not None:
                left_steps = b.steps - row.steps - held_steps
                if left_steps < 1:
                    raise SessionExhausted(sid, "steps", row.steps + held_steps, b.steps, held=row.steps < b.steps)
                rho = min(rho, left_steps / b.steps)
                if left_steps == 1:
                    final = f"the session's last step ({b.steps} steps)"
            for unit, lim in b.limits.items():
                if unit == "wall_seconds":
                    left = lim - (now - row.created)
                else:
                    left = lim - row.spent.get(unit, 0.0) - sum(t.held.get(unit, 0.0) for t in holds)
                if unit in INTEGER_UNITS:
                    left = float(int(left))
                if unit == "tool_calls":
                    left = max(left, 0.0)
                    tool_left = left
                elif left <= 0 or (unit in INTEGER_UNITS and left < 1):
                    spent = row.spent.get(unit, 0.0)
                    used = lim - max(left, 0.0) if unit == "wall_seconds" else \
                        spent + sum(t.held.get(unit, 0.0) for t in holds)
                    room = lim - spent  # what the session would have if its calls in flight held nothing
                    held = unit != "wall_seconds" and bool(holds) and room > 0 and \
                        not (unit in INTEGER_UNITS and room < 1)
                    raise SessionExhausted(sid, unit, used, lim, held=held)
                rho = min(rho, max(left, 0.0) / lim)
                want = clamped.get(unit)
                clamped[unit] = left if want is None else min(want, left)
                if unit != "wall_seconds":
                    amounts[unit] = clamped[unit]
                if final is None and unit not in ("tool_calls",) and row.steps > 0:
                    per_step = (now - row.created if unit == "wall_seconds" else row.spent.get(unit, 0.0)) / row.steps
                    if per_step > 0 and left < 2 * per_step:
                        final = (f"less than two steps' worth of {unit} left ({left:g}; about {per_step:.4g} per "
                                 f"step so far)")
            step = max(self._next_step.get((key, sid), 0), row.steps + held_steps)
            self._next_step[(key, sid)] = step + 1
            ticket = SessionTicket(key, sid, rid, step, amounts, final, rho, tool_left)
            self._held[rid] = ticket
            self._conn.execute("UPDATE sessions SET last_active = ? WHERE key = ? AND id = ?", (now, key, sid))
        return ticket, clamped

    def release(self, ticket: SessionTicket) -> None:
        """Drop a hold without charging (the call failed before anything ran)."""
        with self._lock:
            self._held.pop(ticket.request_id, None)

    def commit(self, ticket: SessionTicket, spend: Mapping[str, float], *, model: str, backend: str, strategy: str,
               status: str, usage: Mapping[str, JsonValue], forced_final: bool, route: Mapping[str, JsonValue] | None = None,
               reason: str | None = None) -> None:
        """Add the call's actual ``spend`` and one step to the session and store the call's row; drops the hold.

        ``reason``: why the call was forced final when the server decided it (e.g. :data:`NO_TOOL_CALLS_LEFT`);
        default: the ticket's own reason."""
        now = self._clock()
        reason = reason or ticket.final
        with self._lock:
            try:
                row = self._load(ticket.key, ticket.session)
                if row is None:  # deleted while the call ran (cannot happen: holds keep a session alive)
                    return
                spent = dict(row.spent)
                for unit, amount in spend.items():
                    if unit in UNITS and unit != "wall_seconds" and amount:
                        spent[unit] = spent.get(unit, 0.0) + float(amount)
                with self._tx() as c:
                    c.execute("UPDATE sessions SET spent = ?, steps = steps + 1, forced = forced + ?, last_active = ? "
                              "WHERE key = ? AND id = ?", (json.dumps(spent), int(forced_final), now, ticket.key,
                                                           ticket.session))
                    c.execute("INSERT INTO session_calls (key, session, step, request_id, created, model, backend, "
                              "strategy, status, forced_final, reason, route, usage) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (ticket.key, ticket.session, ticket.step, ticket.request_id, now, model, backend,
                               strategy, status, int(forced_final), reason,
                               json.dumps(dict(route), default=str) if route else None,
                               json.dumps(dict(usage), default=str)))
            finally:
                self._held.pop(ticket.request_id, None)

    # ------------------------------------------------------------------ reports
    def report(self, key: str, sid: str, *, calls: bool = True) -> JsonObject | None:
        """The session's budget, spend, steps, what is left and (``calls``) each finished call; ``None`` if unknown."""
        now = self._clock()
        with self._lock:
            row = self._load(key, sid)
            if row is None or self._expired(row, now):
                return None
            holds = self._holds(key, sid)
            rows = self._conn.execute(
                "SELECT step, request_id, created, model, backend, strategy, status, forced_final, reason, route, "
                "usage FROM session_calls WHERE key = ? AND session = ? ORDER BY step", (key, sid)).fetchall() \
                if calls else []
        b = row.budget
        remaining: dict[str, float] = {}
        for unit, lim in b.limits.items():
            used = (now - row.created) if unit == "wall_seconds" else row.spent.get(unit, 0.0)
            remaining[unit] = max(0.0, lim - used)
        out: JsonObject = {
            "id": sid, "object": "budgetlm.session", "created": row.created, "last_active": row.last_active,
            "expires_at": row.last_active + self.ttl_s, "budget": b.to_json(),
            "spent": {u: row.spent.get(u, 0.0) for u in SESSION_UNITS if u != "wall_seconds"} |
                     {"wall_seconds": now - row.created},
            "remaining": remaining, "steps": row.steps,
            "steps_left": None if b.steps is None else max(0, b.steps - row.steps),
            "in_flight": len(holds), "forced_final": row.forced,
        }
        if calls:
            done: list[JsonObject] = []
            out["calls"] = done
            for step, request_id, created, model, backend, strategy, status, forced, reason, route, usage in rows:
                done.append({"step": step, "request_id": request_id, "created": created, "model": model,
                             "backend": backend, "strategy": strategy, "status": status, "forced_final": bool(forced),
                             "reason": reason, "route": json.loads(route) if route else None,
                             "usage": json.loads(usage or "{}")})
        return out

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()
