"""Agent sessions and per-step routes: the session store directly, then the server end to end.

Every server runs scripted backends (no model).  The default backend's model always answers
``Let me check. <tool_call>get_weather(Paris)</tool_call>`` (8 tokens by the scripted tokenizer), so
whether the tools were offered shows in the response (``tool_calls``) and in the prompt it saw
(recorded); the ``small`` backend answers ``Cheap says. Answer: 2`` (4 tokens), so the content tells
which backend of a route ran.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_app import Server, _start

from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import ConfigError
from budgetlm.server import ServerConfig
from budgetlm.server.sessions import (
    FINAL_INSTRUCTION,
    SESSION_HEADER,
    SessionBudget,
    SessionExhausted,
    SessionStore,
    parse_session_budget,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CALLER = f"Let me check. {CALL}"
CALLER_TOKENS = 8
CHEAP = "Cheap says. Answer: 2"
CHEAP_TOKENS = 4


class Recorder:
    """A script that always gives one reply and records every prompt."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, prompt: str, i: int, sampling: SamplingParams) -> str:
        with self._lock:
            self.prompts.append(prompt)
        return self.reply

    def seen(self, tag: str) -> list[str]:
        """The prompts of the conversations tagged ``tag``."""
        with self._lock:
            return [p for p in self.prompts if tag in p]


def _sid() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def _user(tag: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Weather in Paris? (task {tag})"}]


def _routes() -> dict[str, Any]:
    return {
        "up": {"cheap": "small", "expensive": "default", "router": "random", "threshold": 0.0},  # first: budgetlm/route
        "down": {"cheap": "small", "expensive": "default", "router": "random", "threshold": 1.5},
        "coin": {"cheap": "small", "expensive": "default", "router": "random", "threshold": 0.5},
        "ba": {"cheap": "small", "expensive": "default", "threshold": 0.5,
               "router": {"name": "budget_aware", "params": {"inner": "random"}}},
    }


def _backends() -> dict[str, ScriptedBackend]:
    return {"default": ScriptedBackend(Recorder(CALLER)), "small": ScriptedBackend(Recorder(CHEAP))}


def _rec(s: Server, name: str = "default") -> Recorder:
    return s.backends[name]._script  # type: ignore[return-value]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One keyless server (backends default and small, the routes of :func:`_routes`); each test uses its own
    session ids."""
    s = _start(tmp_path_factory.mktemp("sessions") / "server.sqlite", backends=_backends(), routes=_routes())
    yield s
    s.stop()


@pytest.fixture()
def start(tmp_path: Path) -> Iterator[Any]:
    """Starts servers (default: a new db under tmp_path each) and stops them at the end."""
    servers: list[Server] = []

    def go(db: Path | None = None, **kw: Any) -> Server:
        kw.setdefault("backends", _backends())
        s = _start(db or tmp_path / f"server{len(servers)}.sqlite", **kw)
        servers.append(s)
        return s

    yield go
    for s in servers:
        s.stop()


def _post(s: Server, body: dict[str, Any], session: str | None = None, key: str | None = None) -> httpx.Response:
    headers = {}
    if session is not None:
        headers[SESSION_HEADER] = session
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": "budgetlm/sample", "messages": _user("x"), **body}
    return httpx.post(f"{s.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def _report(s: Server, sid: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{s.url}/v1/sessions/{sid}", headers=headers, timeout=60)


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI error object of ``r`` (checked: exactly message, type, param, code)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ============================================================================================ the store


def _store(tmp_path: Path, clock: Any = None, ttl_s: float = 3600.0, name: str = "s.sqlite") -> SessionStore:
    return SessionStore(tmp_path / name, ttl_s, **({"clock": clock} if clock is not None else {}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _commit(store: SessionStore, ticket: Any, spend: dict[str, float], forced: bool = False) -> None:
    store.commit(ticket, spend, model="m", backend="b", strategy="sample", status="ok", usage={}, forced_final=forced)


@pytest.mark.parametrize(("session", "request_budget", "clamped"), [
    ({"output_tokens": 100}, {"output_tokens": 1024}, {"output_tokens": 100}),
    ({"output_tokens": 100}, {"output_tokens": 30}, {"output_tokens": 30}),
    ({"output_tokens": 100}, {}, {"output_tokens": 100}),  # a unit the call did not limit is added
    ({"total_tokens": 50, "usd": 0.5}, {"output_tokens": 10, "usd": 1.0},
     {"output_tokens": 10, "total_tokens": 50, "usd": 0.5}),
    ({"tool_calls": 3, "steps": 4}, {"tool_calls": 5}, {"tool_calls": 3}),  # steps are not a budget unit
    ({}, {"output_tokens": 7}, {"output_tokens": 7}),  # an unlimited session changes nothing
])
def test_reserve_clamps_to_the_session(tmp_path: Path, session: dict[str, Any], request_budget: dict[str, float],
                                       clamped: dict[str, float]) -> None:
    store = _store(tmp_path)
    ticket, got = store.reserve("k", "s1", parse_session_budget(session), request_budget)
    assert got == clamped
    limited = {u for u in session if u != "steps"}
    assert ticket.held == {u: v for u, v in clamped.items() if u in limited}
    assert ticket.step == 0 and ticket.final is None and ticket.rho == 1.0


def test_holds_and_spend_clamp_later_calls(tmp_path: Path) -> None:
    store = _store(tmp_path)
    sb = SessionBudget({"output_tokens": 100})
    t1, c1 = store.reserve("k", "s", sb, {"output_tokens": 60})
    t2, c2 = store.reserve("k", "s", sb, {"output_tokens": 60})  # only what t1 does not hold
    assert (c1["output_tokens"], c2["output_tokens"]) == (60, 40) and (t1.step, t2.step) == (0, 1)
    with pytest.raises(SessionExhausted) as exc:  # everything is held by calls in flight
        store.reserve("k", "s", sb, {"output_tokens": 1})
    assert (exc.value.unit, exc.value.spent, exc.value.limit) == ("output_tokens", 100, 100)
    _commit(store, t1, {"output_tokens": 10})  # t1 used 10 of its 60: 100 - 10 - 40 (t2) left
    t3, c3 = store.reserve("k", "s", sb, {"output_tokens": 80})
    assert c3["output_tokens"] == 50 and t3.step == 2
    store.release(t2)  # a call that failed before it ran: nothing charged
    _commit(store, t3, {"output_tokens": 50})
    rep = store.report("k", "s")
    assert rep is not None
    assert rep["spent"]["output_tokens"] == 60 and rep["remaining"] == {"output_tokens": 40}
    assert rep["steps"] == 2 and rep["in_flight"] == 0 and [c["step"] for c in rep["calls"]] == [0, 2]


def test_steps_are_counted_and_the_last_one_is_final(tmp_path: Path) -> None:
    store = _store(tmp_path)
    sb = SessionBudget({}, steps=3)
    for step in range(3):
        ticket, _ = store.reserve("k", "s", sb, {})
        assert ticket.step == step
        assert ticket.final == (None if step < 2 else "the session's last step (3 steps)")
        assert ticket.rho == pytest.approx((3 - step) / 3)
        _commit(store, ticket, {"output_tokens": 1}, forced=ticket.final is not None)
    with pytest.raises(SessionExhausted) as exc:
        store.reserve("k", "s", sb, {})
    assert (exc.value.unit, exc.value.spent, exc.value.limit) == ("steps", 3, 3)
    rep = store.report("k", "s")
    assert rep is not None and rep["steps"] == 3 and rep["steps_left"] == 0 and rep["forced_final"] == 1


def test_steps_held_by_calls_in_flight_count(tmp_path: Path) -> None:
    store = _store(tmp_path)
    sb = SessionBudget({}, steps=2)
    a, _ = store.reserve("k", "s", sb, {})
    b, _ = store.reserve("k", "s", sb, {})
    assert (a.final, b.final) == (None, "the session's last step (2 steps)")
    with pytest.raises(SessionExhausted, match="steps 2 of 2"):
        store.reserve("k", "s", sb, {})
    store.release(b)  # its step is free again
    c, _ = store.reserve("k", "s", sb, {})
    assert c.final is not None and c.step == 2  # step numbers are never reused


@pytest.mark.parametrize(("budget", "spend", "final"), [
    ({"steps": 1}, None, "the session's last step (1 steps)"),  # the first call of a one-step session
    ({"output_tokens": 100}, {"output_tokens": 40}, "less than two steps' worth of output_tokens left (60;"),
    ({"output_tokens": 100}, {"output_tokens": 30}, None),  # 70 left >= 2 x 30
    ({"total_tokens": 100, "steps": 10}, {"total_tokens": 45}, "less than two steps' worth of total_tokens left (55;"),
    ({"usd": 1.0}, {"usd": 0.4}, "less than two steps' worth of usd left (0.6;"),
    ({"tool_calls": 5}, {"tool_calls": 5}, None),  # no tool calls left: not final here (the server withholds tools)
])
def test_final_reasons(tmp_path: Path, budget: dict[str, Any], spend: dict[str, float] | None,
                       final: str | None) -> None:
    store = _store(tmp_path)
    sb = parse_session_budget(budget)
    if spend is not None:
        t, _ = store.reserve("k", "s", sb, {})
        _commit(store, t, spend)
    ticket, _ = store.reserve("k", "s", sb, {})
    if final is None:
        assert ticket.final is None
    else:
        assert ticket.final is not None and ticket.final.startswith(final)


def test_an_explicit_different_session_budget_later_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    sb = parse_session_budget({"output_tokens": 50, "steps": 4})
    t, _ = store.reserve("k", "s", sb, {}, explicit=True)
    _commit(store, t, {"output_tokens": 5})
    # the same budget again (even written as a string) is accepted
    t, _ = store.reserve("k", "s", parse_session_budget("output_tokens=50,steps=4"), {}, explicit=True)
    _commit(store, t, {"output_tokens": 5})
    with pytest.raises(ConfigError, match="fixed at the session's first call"):
        store.reserve("k", "s", parse_session_budget({"output_tokens": 80, "steps": 4}), {}, explicit=True)
    # a default (not sent by the client) that differs is ignored: the session keeps its own
    t, clamped = store.reserve("k", "s", SessionBudget({"output_tokens": 1000}), {}, explicit=False)
    assert clamped == {"output_tokens": 40}
    store.release(t)
    rep = store.report("k", "s")
    assert rep is not None and rep["budget"] == {"output_tokens": 50, "steps": 4} and rep["steps"] == 2


@pytest.mark.parametrize(("unit", "limit", "spend"), [
    ("output_tokens", 10, 10),
    ("output_tokens", 10, 9.5),  # less than one whole token left
    ("input_tokens", 30, 30),
    ("total_tokens", 40, 40),
    ("thinking_tokens", 5, 5),
    ("usd", 0.01, 0.01),
    ("flops", 1e9, 1e9),
])
def test_session_exhausted_per_unit(tmp_path: Path, unit: str, limit: float, spend: float) -> None:
    store = _store(tmp_path)
    sb = parse_session_budget({unit: limit})
    t, _ = store.reserve("k", "s", sb, {})
    _commit(store, t, {unit: spend})
    with pytest.raises(SessionExhausted) as exc:
        store.reserve("k", "s", sb, {"output_tokens": 5})
    assert exc.value.unit == unit and exc.value.limit == limit and exc.value.session == "s"
    assert "start a new session" in str(exc.value)
    rep = store.report("k", "s")
    assert rep is not None and rep["in_flight"] == 0  # a refused call holds nothing


def test_no_tool_calls_left_does_not_refuse(tmp_path: Path) -> None:
    store = _store(tmp_path)
    sb = parse_session_budget({"tool_calls": 2, "output_tokens": 100})
    t, clamped = store.reserve("k", "s", sb, {"tool_calls": 5})
    assert clamped["tool_calls"] == 2 and t.tool_calls_left == 2
    _commit(store, t, {"tool_calls": 2, "output_tokens": 3})
    t, clamped = store.reserve("k", "s", sb, {})
    assert clamped == {"tool_calls": 0, "output_tokens": 97} and t.tool_calls_left == 0 and t.rho == 0.0
    assert t.final is None  # the server answers it without tools
    _commit(store, t, {"output_tokens": 3})
    rep = store.report("k", "s")
    assert rep is not None and rep["remaining"] == {"tool_calls": 0, "output_tokens": 94} and rep["steps"] == 2


def test_wall_seconds_count_from_the_first_call(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock)
    sb = parse_session_budget({"wall_seconds": 10})
    t, clamped = store.reserve("k", "s", sb, {"wall_seconds": 60})
    assert clamped == {"wall_seconds": 10} and t.held == {}  # time is not held: it passes for every call alike
    clock.now += 2
    _commit(store, t, {"wall_seconds": 2, "output_tokens": 1})
    clock.now += 1  # 3 s used, one step of 3 s so far: 7 s left is more than two steps' worth
    t, clamped = store.reserve("k", "s", sb, {"wall_seconds": 60})
    assert clamped["wall_seconds"] == pytest.approx(7) and t.final is None
    clock.now += 2
    _commit(store, t, {})
    clock.now += 2  # 7 s used in 2 steps: 3 s left < 2 x 3.5 s
    t, clamped = store.reserve("k", "s", sb, {"wall_seconds": 1})
    assert clamped["wall_seconds"] == 1 and t.final is not None and "wall_seconds" in t.final
    _commit(store, t, {})
    rep = store.report("k", "s")
    assert rep is not None and rep["spent"]["wall_seconds"] == pytest.approx(7)
    assert rep["remaining"]["wall_seconds"] == pytest.approx(3)
    clock.now += 3.5
    with pytest.raises(SessionExhausted) as exc:
        store.reserve("k", "s", sb, {})
    assert exc.value.unit == "wall_seconds" and exc.value.spent == pytest.approx(10)


def test_ttl_expiry_and_purge(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock, ttl_s=100)
    sb = parse_session_budget({"output_tokens": 50, "steps": 3})
    t, _ = store.reserve("k", "old", sb, {})
    _commit(store, t, {"output_tokens": 20})
    clock.now += 60
    t, _ = store.reserve("k", "young", sb, {})
    _commit(store, t, {"output_tokens": 5})
    clock.now += 60  # "old" idle 120 s > ttl, "young" 60 s
    assert store.report("k", "old") is None
    young = store.report("k", "young")
    assert young is not None and young["expires_at"] == pytest.approx(clock.now - 60 + 100)
    # a call with the expired id starts a new session: step 0, nothing spent, a new budget accepted
    t, clamped = store.reserve("k", "old", parse_session_budget({"output_tokens": 30}), {}, explicit=True)
    assert t.step == 0 and clamped == {"output_tokens": 30}
    _commit(store, t, {"output_tokens": 1})
    rep = store.report("k", "old")
    assert rep is not None and rep["steps"] == 1 and rep["budget"] == {"output_tokens": 30}
    assert [c["step"] for c in rep["calls"]] == [0]  # the old session's calls went with it
    clock.now += 101
    assert store.purge() == 2 and store.report("k", "young") is None and store.report("k", "old") is None
    assert store.purge() == 0


def test_a_call_in_flight_keeps_its_session_alive(tmp_path: Path) -> None:
    clock = Clock()
    store = _store(tmp_path, clock, ttl_s=10)
    t, _ = store.reserve("k", "s", SessionBudget({"output_tokens": 50}), {})
    clock.now += 1000  # a very long call
    assert store.purge() == 0 and store.report("k", "s") is not None
    _commit(store, t, {"output_tokens": 7})
    rep = store.report("k", "s")
    assert rep is not None and rep["spent"]["output_tokens"] == 7 and rep["steps"] == 1
    clock.now += 11
    assert store.purge() == 1


def test_sessions_are_per_key(tmp_path: Path) -> None:
    store = _store(tmp_path)
    t, _ = store.reserve("a", "s", SessionBudget({"output_tokens": 10}), {})
    _commit(store, t, {"output_tokens": 10})
    assert store.report("b", "s") is None
    _, clamped = store.reserve("b", "s", SessionBudget({"output_tokens": 10}), {})  # b's own session
    assert clamped == {"output_tokens": 10}
    with pytest.raises(SessionExhausted):
        store.reserve("a", "s", None, {})


def test_a_session_survives_a_restart_its_holds_do_not(tmp_path: Path) -> None:
    store = _store(tmp_path)
    sb = parse_session_budget({"output_tokens": 100, "steps": 5})
    for spent in (10, 15):
        t, _ = store.reserve("k", "s", sb, {}, request_id=f"r{spent}")
        _commit(store, t, {"output_tokens": spent, "input_tokens": 3})
    store.reserve("k", "s", sb, {"output_tokens": 50})  # in flight when the server dies
    store.close()
    again = _store(tmp_path)
    rep = again.report("k", "s")
    assert rep is not None and rep["steps"] == 2 and rep["in_flight"] == 0
    assert rep["spent"]["output_tokens"] == 25 and rep["spent"]["input_tokens"] == 6
    assert [c["request_id"] for c in rep["calls"]] == ["r10", "r15"] and rep["budget"] == sb.to_json()
    t, clamped = again.reserve("k", "s", None, {})
    assert clamped == {"output_tokens": 75} and t.step == 2  # the dead call's 50 are not held any more
    again.close()


_UNIT_LIMITS = {"output_tokens": st.integers(1, 60), "total_tokens": st.integers(1, 200),
                "tool_calls": st.integers(1, 5), "usd": st.floats(0.001, 1.0)}


@st.composite
def _session_budgets(draw: Any) -> dict[str, float]:
    units = draw(st.lists(st.sampled_from(sorted(_UNIT_LIMITS)), unique=True, max_size=4))
    out: dict[str, float] = {u: draw(_UNIT_LIMITS[u]) for u in units}
    if draw(st.booleans()):
        out["steps"] = draw(st.integers(1, 8))
    return out


_OPS = st.lists(st.tuples(st.sampled_from(["reserve", "reserve", "commit", "release"]), st.integers(0, 20),
                          st.floats(0, 1), st.dictionaries(st.sampled_from(sorted(_UNIT_LIMITS)),
                                                           st.integers(1, 80), max_size=3)),
                max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=_session_budgets(), ops=_OPS)
def test_store_never_overspends(budget: dict[str, float], ops: list[Any]) -> None:
    """Interleaved reserve / commit (spending at most the clamped amount) / release: what the session spent
    plus what its calls hold never exceeds its budget in any unit; refusals are justified."""
    sb = parse_session_budget(budget)
    limits = {u: v for u, v in budget.items() if u != "steps"}
    with tempfile.TemporaryDirectory() as d:
        store = SessionStore(Path(d) / "s.sqlite")
        flight: list[tuple[Any, dict[str, float]]] = []
        spent = dict.fromkeys(limits, 0.0)
        steps = 0
        for op, i, frac, want in ops:
            if op == "reserve":
                request = {u: float(v) for u, v in want.items()}
                try:
                    ticket, clamped = store.reserve("k", "s", sb, request)
                except SessionExhausted as exc:
                    held = sum(t.held.get(exc.unit, 0.0) for t, _ in flight) if exc.unit != "steps" else len(flight)
                    used = steps if exc.unit == "steps" else spent[exc.unit]
                    assert exc.limit - used - held < (1 if exc.unit != "usd" else 1e-12) + 1e-9, (exc, used, held)
                    continue
                for u, lim in limits.items():
                    assert clamped[u] <= lim
                    if u in request:
                        assert clamped[u] <= request[u]
                flight.append((ticket, clamped))
            elif flight:
                ticket, clamped = flight.pop(i % len(flight))
                if op == "release":
                    store.release(ticket)
                    continue
                spend = {u: (math.floor(frac * v) if u != "usd" else frac * v) for u, v in clamped.items()
                         if u in limits}
                spend["input_tokens"] = 3.0  # not limited: charged all the same
                _commit(store, ticket, spend)
                steps += 1
                for u in limits:
                    spent[u] += spend.get(u, 0.0)
            rep = store.report("k", "s")
            if rep is None:
                continue  # nothing reserved yet
            assert rep["steps"] == steps and rep["in_flight"] == len(flight)
            if sb.steps is not None:
                assert steps + len(flight) <= sb.steps
            for u, lim in limits.items():
                assert rep["spent"][u] == pytest.approx(spent[u])
                held = sum(t.held.get(u, 0.0) for t, _ in flight)
                assert spent[u] + held <= lim + 1e-9, (u, spent[u], held, lim)
        store.close()


# ============================================================================================ the server


def test_header_and_body_name_the_same_session(shared: Server) -> None:
    sid = _sid()
    c = shared.client()
    raw = c.chat.completions.with_raw_response.create(
        model="budgetlm/sample", messages=_user(sid), extra_headers={"X-Budgetlm-Session": sid},
        extra_body={"session_budget": {"output_tokens": 500, "steps": 5}})
    assert raw.headers[SESSION_HEADER] == sid
    first = raw.parse().model_extra["budgetlm"]
    assert first["session"]["id"] == sid and first["session"]["step"] == 0 and first["session"]["steps"] == 1
    r = c.chat.completions.create(model="budgetlm/sample", messages=_user(sid), extra_body={"session": sid})
    second = r.model_extra["budgetlm"]["session"]
    assert second["step"] == 1 and second["steps"] == 2 and second["budget"] == {"output_tokens": 500, "steps": 5}
    assert second["spent"]["output_tokens"] == 2 * CALLER_TOKENS and second["steps_left"] == 3
    # both at once, agreeing
    r = c.chat.completions.create(model="budgetlm/sample", messages=_user(sid), extra_body={"session": sid},
                                  extra_headers={SESSION_HEADER: sid})
    assert r.model_extra["budgetlm"]["session"]["steps"] == 3
    # without a session nothing is counted
    r = c.chat.completions.create(model="budgetlm/sample", messages=_user(sid))
    assert "session" not in r.model_extra["budgetlm"] and r.model_extra["budgetlm"]["forced_final"] is False
    assert _report(shared, sid).json()["steps"] == 3


@pytest.mark.parametrize(("body", "header", "param", "code", "says"), [
    ({"session": "a"}, "b", "session", "invalid_session", "must match the x-budgetlm-session header"),
    ({}, "bad id", SESSION_HEADER, "invalid_session", "must be 1-128 letters"),
    ({}, "x" * 129, SESSION_HEADER, "invalid_session", "must be 1-128 letters"),
    ({"session": "bad/id"}, None, "session", "invalid_session", "must be 1-128 letters"),
    ({"session": ""}, None, "session", "invalid_session", "must be 1-128 letters"),
    ({"session": 5}, None, "session", "invalid_session", "must be 1-128 letters"),
    ({"session": "ok", "session_budget": "output_tokens=x"}, None, "session_budget.output_tokens",
     "invalid_session_budget",
     "must be a number"),
    ({"session": "ok", "session_budget": {"steps": 0}}, None, "session_budget.steps", "invalid_session_budget", "whole number >= 1"),
    ({"session": "ok", "session_budget": {"steps": 2.5}}, None, "session_budget.steps", "invalid_session_budget", "whole number >= 1"),
    ({"session": "ok", "session_budget": {"joules": 1}}, None, "session_budget.joules", "invalid_session_budget", "not supported"),
    ({"session": "ok", "session_budget": {"output_tokens": -1}}, None, "session_budget.output_tokens", "invalid_session_budget", "> 0"),
    ({"session": "ok", "session_budget": {"parsecs": 1}}, None, "session_budget", "invalid_session_budget", "malformed"),
    ({"session": "ok", "session_budget": ["output_tokens"]}, None, "session_budget", "invalid_session_budget", None),
])
def test_invalid_session_fields_are_400_naming_the_field(shared: Server, body: dict[str, Any], header: str | None,
                                                         param: str, code: str | None, says: str | None) -> None:
    err = _error(_post(shared, body, header), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] == code
    if says is not None:
        assert says in err["message"]
    assert _report(shared, "ok").status_code == 404  # nothing was opened


def test_session_budget_as_a_string(shared: Server) -> None:
    sid = _sid()
    r = _post(shared, {"session": sid, "session_budget": "output_tokens=40, tool_calls=2, steps=3"})
    assert r.status_code == 200, r.text
    rep = _report(shared, sid).json()
    assert rep["budget"] == {"output_tokens": 40, "tool_calls": 2, "steps": 3}
    assert rep["remaining"] == {"output_tokens": 40 - CALLER_TOKENS, "tool_calls": 2}
    # the same budget again is fine; a different one is refused and changes nothing
    assert _post(shared, {"session": sid, "session_budget": {"output_tokens": 40, "tool_calls": 2, "steps": 3}}
                 ).status_code == 200
    err = _error(_post(shared, {"session": sid, "session_budget": "output_tokens=400,steps=3"}), 400)
    assert err["param"] == "session_budget" and err["code"] == "invalid_session_budget"
    assert "fixed at the session's first call" in err["message"]
    assert _report(shared, sid).json()["steps"] == 2


def test_the_call_budget_is_clamped_to_the_session(shared: Server) -> None:
    sid = _sid()
    r = _post(shared, {"session": sid, "session_budget": {"output_tokens": 5}, "max_tokens": 100})
    extra = r.json()["budgetlm"]
    assert extra["budget"]["output_tokens"] == 5 and r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["choices"][0]["finish_reason"] == "length"
    err = _error(_post(shared, {"session": sid}), 429)
    assert err["code"] == "session_budget_exhausted" and err["type"] == "rate_limit_error" and err["param"] == "session"
    assert "output_tokens 5 of 5" in err["message"]


def test_an_exhausted_session_is_429_not_retried(shared: Server) -> None:
    sid = _sid()
    assert _post(shared, {"session_budget": {"steps": 1}}, sid).status_code == 200
    r = _post(shared, {}, sid)
    err = _error(r, 429)
    assert err["code"] == "session_budget_exhausted" and "steps 1 of 1" in err["message"]
    assert r.headers["x-should-retry"] == "false" and r.headers[SESSION_HEADER] == sid
    # the official client, even with retries on, gives up at once
    c = openai.OpenAI(base_url=f"{shared.url}/v1", api_key="none", max_retries=3, timeout=60)
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(model="budgetlm/sample", messages=_user(sid), extra_headers={SESSION_HEADER: sid})
    assert exc.value.code == "session_budget_exhausted"
    rep = _report(shared, sid).json()
    assert rep["steps"] == 1 and rep["in_flight"] == 0 and len(rep["calls"]) == 1


def test_server_and_key_default_session_budgets(start: Any) -> None:
    s = start(api_keys=["key-a", "key-b"], session_budget={"steps": 2},
              key_session_budgets={"key-b": {"output_tokens": 20, "steps": 3}})
    sid = "shared-id"
    assert _post(s, {}, sid, key="key-a").status_code == 200
    assert _post(s, {}, sid, key="key-b").status_code == 200  # the same id under another key: its own session
    a, b = _report(s, sid, "key-a").json(), _report(s, sid, "key-b").json()
    assert a["budget"] == {"steps": 2} and b["budget"] == {"output_tokens": 20, "steps": 3}
    assert a["steps"] == b["steps"] == 1
    # key-a's second call is its last step; key-b's second has 12 of 20 tokens left (< 2 x 8): final too
    ra, rb = _post(s, {}, sid, key="key-a").json(), _post(s, {}, sid, key="key-b").json()
    assert ra["budgetlm"]["forced_final_reason"] == "the session's last step (2 steps)"
    assert rb["budgetlm"]["forced_final_reason"].startswith("less than two steps' worth of output_tokens left (12;")
    assert _error(_post(s, {}, sid, key="key-a"), 429)["code"] == "session_budget_exhausted"
    # the client's own budget wins over the default on a new session
    assert _post(s, {"session_budget": {"steps": 9}}, "own", key="key-a").status_code == 200
    assert _report(s, "own", "key-a").json()["budget"] == {"steps": 9}
    # another key's session is not found; so is one never used; and a key is needed to ask
    err = _error(_report(s, "own", "key-b"), 404)
    assert err["code"] == "session_not_found" and err["param"] == "session_id" and "'own'" in err["message"]
    assert _error(_report(s, "never"), 401)["code"] == "missing_api_key"


def test_no_session_budget_tracks_without_limits(shared: Server) -> None:
    sid = _sid()
    for _ in range(3):
        r = _post(shared, {}, sid).json()
        assert r["budgetlm"]["forced_final"] is False and r["budgetlm"]["budget"] == {"output_tokens": 1024}
    rep = _report(shared, sid).json()
    assert rep["budget"] == {} and rep["remaining"] == {} and rep["steps_left"] is None and rep["steps"] == 3
    assert rep["spent"]["output_tokens"] == 3 * CALLER_TOKENS


def test_wall_seconds_clamp_each_call_to_the_time_left(shared: Server) -> None:
    sid = _sid()
    budgets = [_post(shared, {"session_budget": {"wall_seconds": 60}} if i == 0 else {}, sid).json()["budgetlm"]["budget"]
               for i in range(3)]
    walls = [b["wall_seconds"] for b in budgets]
    assert walls[0] == 60 and walls[0] > walls[1] > walls[2] > 50  # counted from the session's first call
    rep = _report(shared, sid).json()
    assert rep["remaining"]["wall_seconds"] == pytest.approx(60 - rep["spent"]["wall_seconds"])


# ------------------------------------------------------------------------------------- forced final


@pytest.mark.parametrize(("session_budget", "reason"), [
    ({"steps": 2}, "the session's last step (2 steps)"),
    # 8 tokens spent by the first call: 12 of 20 left is less than two steps' worth
    ({"output_tokens": 20}, "less than two steps' worth of output_tokens left (12; about 8 per step so far)"),
    ({"tool_calls": 1}, "the session has no tool calls left"),
])
def test_the_forced_final_answer(shared: Server, session_budget: dict[str, Any], reason: str) -> None:
    sid = _sid()
    c = shared.client()
    kw: dict[str, Any] = {"model": "budgetlm/sample", "messages": _user(sid), "tools": [WEATHER],
                          "extra_headers": {SESSION_HEADER: sid}}
    r = c.chat.completions.create(**kw, extra_body={"session_budget": session_budget})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls
    assert r.model_extra["budgetlm"]["forced_final"] is False
    assert "forced_final_reason" not in r.model_extra["budgetlm"]
    first = _rec(shared).seen(sid)[-1]
    assert "<tools>" in first and FINAL_INSTRUCTION not in first
    r = c.chat.completions.create(**kw)  # the model tries to call the tool again
    extra = r.model_extra["budgetlm"]
    assert extra["forced_final"] is True and extra["forced_final_reason"] == reason
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert extra["tools"]["offered"] is False and extra["tools"]["calls"] == 0
    assert any("forced final answer" in w or "no tool_calls left" in w for w in extra["warnings"])
    prompt = _rec(shared).seen(sid)[-1]
    assert "<tools>" not in prompt and "You can call functions" not in prompt
    assert prompt.endswith(f"<|user|> {FINAL_INSTRUCTION}\n<|assistant|> ")
    assert prompt.index(f"(task {sid})") < prompt.index(FINAL_INSTRUCTION)
    rep = _report(shared, sid).json()
    assert rep["forced_final"] == 1 and [c["forced_final"] for c in rep["calls"]] == [False, True]
    assert rep["calls"][1]["reason"] == reason and rep["calls"][0]["reason"] is None


def test_no_tool_calls_left_without_tools_is_not_forced(shared: Server) -> None:
    sid = _sid()
    _post(shared, {"session_budget": {"tool_calls": 1}, "tools": [WEATHER]}, sid)
    r = _post(shared, {}, sid).json()  # no tools offered: an ordinary call
    assert r["budgetlm"]["forced_final"] is False and FINAL_INSTRUCTION not in _rec(shared).prompts[-1]


# ------------------------------------------------------------------------------------- the report


def test_the_session_report(shared: Server) -> None:
    sid = _sid()
    c = shared.client()
    usages = []
    for i in range(3):
        r = c.chat.completions.create(model="coin/route", messages=_user(sid), extra_headers={SESSION_HEADER: sid},
                                      extra_body={"session_budget": {"output_tokens": 100, "steps": 3}} if i == 0 else None)
        usages.append(r.usage)
        assert r.model_extra["budgetlm"]["session"]["step"] == i
    rep = _report(shared, sid).json()
    assert rep["id"] == sid and rep["object"] == "budgetlm.session"
    assert rep["budget"] == {"output_tokens": 100, "steps": 3} and rep["steps"] == 3 and rep["steps_left"] == 0
    assert rep["in_flight"] == 0 and rep["forced_final"] == 1
    out = sum(u.completion_tokens for u in usages)
    assert rep["spent"]["output_tokens"] == out and rep["remaining"] == {"output_tokens": 100 - out}
    assert rep["spent"]["input_tokens"] == sum(u.prompt_tokens for u in usages)
    assert rep["spent"]["total_tokens"] == sum(u.total_tokens for u in usages)
    assert rep["expires_at"] == pytest.approx(rep["last_active"] + 86400)
    assert rep["created"] <= rep["last_active"] and rep["spent"]["wall_seconds"] >= 0
    assert [x["step"] for x in rep["calls"]] == [0, 1, 2]
    for call, usage in zip(rep["calls"], usages):
        assert call["model"] == "coin/route" and call["strategy"] == "sample" and call["status"] == "ok"
        assert call["request_id"].startswith("chatcmpl-") and call["usage"]["completion_tokens"] == usage.completion_tokens
        route = call["route"]
        assert route["route"] == "coin" and call["backend"] == route["backend"]
        assert route["backend"] == {"cheap": "small", "expensive": "default"}[route["arm"]]
    assert [x["forced_final"] for x in rep["calls"]] == [False, False, True]
    assert rep["calls"][2]["route"]["reason"].startswith("forced final answer")
    assert rep["calls"][2]["route"]["score"] is None and rep["calls"][2]["backend"] == "small"
    # calls=False in the responses' block: the same figures without the calls
    err = _error(_report(shared, "no-such-session"), 404)
    assert err["code"] == "session_not_found" and err["type"] == "invalid_request_error"


def test_an_allowance_refusal_releases_the_session_hold(start: Any) -> None:
    s = start(allowance={"output_tokens": CALLER_TOKENS})
    sid = _sid()
    assert _post(s, {"session_budget": {"steps": 5}}, sid).status_code == 200
    assert _error(_post(s, {}, sid), 429)["code"] == "allowance_exceeded"
    rep = _report(s, sid).json()
    assert rep["steps"] == 1 and rep["in_flight"] == 0 and rep["steps_left"] == 4


def test_a_session_survives_a_server_restart(start: Any, tmp_path: Path) -> None:
    db = tmp_path / "restart.sqlite"
    sid = _sid()
    s1 = start(db=db)
    r = _post(s1, {"session_budget": {"output_tokens": 100, "steps": 3}}, sid).json()
    assert r["budgetlm"]["session"]["step"] == 0
    s1.stop()
    s2 = start(db=db)
    rep = _report(s2, sid).json()
    assert rep["steps"] == 1 and rep["spent"]["output_tokens"] == CALLER_TOKENS and len(rep["calls"]) == 1
    r = _post(s2, {}, sid).json()
    assert r["budgetlm"]["session"]["step"] == 1 and r["budgetlm"]["session"]["steps"] == 2
    assert r["budgetlm"]["forced_final"] is False
    r = _post(s2, {}, sid).json()  # the last of the 3 steps, counted across the restart
    assert r["budgetlm"]["forced_final_reason"] == "the session's last step (3 steps)"
    assert _error(_post(s2, {}, sid), 429)["code"] == "session_budget_exhausted"
    # a different explicit budget is still refused after the restart
    assert _error(_post(s2, {"session_budget": {"steps": 10}}, sid), 400)["code"] == "invalid_session_budget"
    rep = _report(s2, sid).json()
    assert rep["steps"] == 3 and rep["spent"]["output_tokens"] == 3 * CALLER_TOKENS and rep["forced_final"] == 1


def test_streaming_in_a_session(shared: Server) -> None:
    sid = _sid()
    c = shared.client()
    chunks = list(c.chat.completions.create(model="budgetlm/sample", messages=_user(sid), stream=True,
                                            extra_headers={SESSION_HEADER: sid},
                                            extra_body={"session_budget": {"steps": 2}}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == CALLER
    last = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    extra = last.model_extra["budgetlm"]
    assert extra["forced_final"] is False and extra["session"]["id"] == sid and extra["session"]["steps"] == 1
    assert extra["stream"] == "tokens"
    # the second (last) step streamed with tools: the forced final answer, headers and finish chunk
    body = {"model": "budgetlm/sample", "messages": _user(sid), "stream": True, "tools": [WEATHER],
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", f"{shared.url}/v1/chat/completions", json=body, headers={SESSION_HEADER: sid},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers[SESSION_HEADER] == sid
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    finish = next(e for e in events if e.get("choices") and e["choices"][0].get("finish_reason"))
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert not any(e["choices"][0]["delta"].get("tool_calls") for e in events if e.get("choices"))
    extra = finish["budgetlm"]
    assert extra["forced_final"] is True and extra["forced_final_reason"] == "the session's last step (2 steps)"
    assert extra["session"]["steps"] == 2 and extra["session"]["step"] == 1 and extra["session"]["steps_left"] == 0
    assert events[-1]["usage"]["completion_tokens"] == CALLER_TOKENS
    assert _rec(shared).seen(sid)[-1].endswith(f"{FINAL_INSTRUCTION}\n<|assistant|> ")
    # a refused streaming call is a plain 429 before any event
    with httpx.stream("POST", f"{shared.url}/v1/chat/completions", json=body, headers={SESSION_HEADER: sid},
                      timeout=60) as r:
        r.read()
        assert r.status_code == 429 and r.json()["error"]["code"] == "session_budget_exhausted"


# ------------------------------------------------------------------- concurrency (property, one session)


@st.composite
def _calls(draw: Any) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 8))
    out = []
    for _ in range(n):
        call: dict[str, Any] = {}
        if draw(st.booleans()):
            call["max_tokens"] = draw(st.integers(1, 30))
        if draw(st.booleans()):
            call["budget"] = {"output_tokens": draw(st.integers(1, 40))}
        if draw(st.booleans()):
            call["tools"] = [WEATHER]
        out.append(call)
    return out


@st.composite
def _server_session_budgets(draw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["output_tokens"] = draw(st.integers(1, 60))
    if draw(st.booleans()):
        out["total_tokens"] = draw(st.integers(20, 400))
    if draw(st.booleans()):
        out["tool_calls"] = draw(st.integers(1, 4))
    if draw(st.booleans()) or not out:
        out["steps"] = draw(st.integers(1, 6))
    return out


@pytest.fixture(scope="module")
def parallel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose model answers with two tool calls (so calls spend tool_calls too)."""
    twice = f"Checking twice. {CALL} {CALL}"
    s = _start(tmp_path_factory.mktemp("parallel") / "server.sqlite",
               backends={"default": ScriptedBackend([twice], token_time=0.002)})  # calls overlap
    yield s
    s.stop()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(session_budget=_server_session_budgets(), calls=_calls())
def test_concurrent_calls_of_one_session_never_overspend(parallel: Server, session_budget: dict[str, Any],
                                                         calls: list[dict[str, Any]]) -> None:
    sid = _sid()
    client = parallel.client()
    barrier = threading.Barrier(len(calls))

    def one(i: int, call: dict[str, Any]) -> Any:
        extra = {"session_budget": session_budget, **({"budget": call["budget"]} if "budget" in call else {})}
        kw = {k: v for k, v in call.items() if k in ("max_tokens", "tools")}
        barrier.wait(timeout=30)
        try:
            return client.chat.completions.create(model="budgetlm/sample", messages=_user(f"{sid}-{i}"),
                                                  extra_headers={SESSION_HEADER: sid}, extra_body=extra, **kw)
        except openai.RateLimitError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(one, range(len(calls)), calls))
    done = [r for r in results if not isinstance(r, Exception)]
    for r in results:
        if isinstance(r, Exception):
            # spent: not retryable; held by the session's other calls in flight: retryable once they finish
            assert (r.code, r.response.headers["x-should-retry"]) in (("session_budget_exhausted", "false"),
                                                                      ("session_budget_held", "true")), r
    out = sum(r.usage.completion_tokens for r in done)
    total = sum(r.usage.total_tokens for r in done)
    tools = sum(len(r.choices[0].message.tool_calls or []) for r in done)
    limits = {"output_tokens": out, "total_tokens": total, "tool_calls": tools, "steps": len(done)}
    for unit, used in limits.items():
        assert used <= session_budget.get(unit, math.inf), (unit, used, session_budget, calls)
    rep = _report(parallel, sid).json()
    assert rep["steps"] == len(done) and rep["in_flight"] == 0
    assert rep["spent"]["output_tokens"] == out and rep["spent"]["total_tokens"] == total
    assert rep["spent"]["tool_calls"] == tools
    for unit, left in rep["remaining"].items():
        assert left == session_budget[unit] - limits[unit]
    assert done  # the first call to reserve a fresh session always runs


# ============================================================================================ routes


def test_budgetlm_route_is_the_first_route(shared: Server) -> None:
    r = shared.client().chat.completions.create(model="budgetlm/route", messages=_user("r1"))
    route = r.model_extra["budgetlm"]["route"]
    assert route["route"] == "up" and route["arm"] == "expensive" and route["backend"] == "default"
    assert r.choices[0].message.content == CALLER and route["reason"] == "routed" and 0 <= route["score"] < 1
    assert route["threshold"] == 0.0 and route["effective_threshold"] is None and route["rho"] == 1.0
    assert set(route) == {"route", "backend", "arm", "score", "threshold", "effective_threshold", "rho", "reason"}


@pytest.mark.parametrize(("model", "arm", "content"), [
    ("up/route", "expensive", CALLER),  # threshold 0: every score reaches it
    ("down/route", "cheap", CHEAP),  # threshold 1.5: no score in [0, 1) does
])
def test_fixed_threshold_routes(shared: Server, model: str, arm: str, content: str) -> None:
    c = shared.client()
    for _ in range(5):
        r = c.chat.completions.create(model=model, messages=_user("fixed"))
        route = r.model_extra["budgetlm"]["route"]
        assert route["arm"] == arm and r.choices[0].message.content == content
        assert route["backend"] == ("default" if arm == "expensive" else "small")


def test_a_random_router_uses_both_backends(shared: Server) -> None:
    c = shared.client()
    arms = set()
    for _ in range(24):
        r = c.chat.completions.create(model="coin/route", messages=_user("coin"))
        route = r.model_extra["budgetlm"]["route"]
        assert route["arm"] == ("expensive" if route["score"] >= 0.5 else "cheap")
        assert r.choices[0].message.content == (CALLER if route["arm"] == "expensive" else CHEAP)
        assert r.model == "coin/route"
        arms.add(route["arm"])
    assert arms == {"cheap", "expensive"}


def test_budget_aware_routing_tightens_as_the_session_is_spent(shared: Server) -> None:
    sid = _sid()
    c = shared.client()
    decisions = []
    for i in range(5):
        r = c.chat.completions.create(model="ba/route", messages=_user(sid), extra_headers={SESSION_HEADER: sid},
                                      extra_body={"session_budget": {"steps": 5}} if i == 0 else None)
        decisions.append(r.model_extra["budgetlm"]["route"])
        expected = CALLER if decisions[-1]["arm"] == "expensive" else CHEAP
        assert r.choices[0].message.content == expected
    assert [d["rho"] for d in decisions] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    # t_eff = t + (t_max - t)(1 - rho) with t = 0.5 and t_max = 1 + max(1, scores seen) = 2
    assert [d["effective_threshold"] for d in decisions] == pytest.approx([0.5, 0.8, 1.1, 1.4, 1.7])
    assert all(d["threshold"] == 0.5 for d in decisions)
    for d in decisions[:4]:
        assert d["reason"] == "routed" and d["arm"] == ("expensive" if d["score"] >= d["effective_threshold"] else "cheap")
    assert all(d["arm"] == "cheap" for d in decisions[2:])  # above 1 no random score reaches the threshold
    final = decisions[4]
    assert final["reason"] == "forced final answer: sent cheap without asking the router"
    assert final["score"] is None and final["backend"] == "small"


def test_budget_aware_routing_follows_the_tightest_unit(shared: Server) -> None:
    sid = _sid()
    c = shared.client()
    c.chat.completions.create(model="ba/route", messages=_user(sid), extra_headers={SESSION_HEADER: sid},
                              extra_body={"session_budget": {"output_tokens": 100, "steps": 50}})
    spent = _report(shared, sid).json()["spent"]["output_tokens"]
    r = c.chat.completions.create(model="ba/route", messages=_user(sid), extra_headers={SESSION_HEADER: sid})
    route = r.model_extra["budgetlm"]["route"]
    rho = (100 - spent) / 100  # tighter than 49/50 steps
    assert route["rho"] == pytest.approx(rho) and route["effective_threshold"] == pytest.approx(0.5 + 1.5 * (1 - rho))


def test_an_unknown_route_is_404_listing_the_routes(shared: Server) -> None:
    err = _error(_post(shared, {"model": "nope/route"}), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found"
    assert "routes (<name>/route): up, down, coin, ba" in err["message"]


@pytest.mark.parametrize(("cfg", "says"), [
    ({"routes": {"r": {"cheap": "a", "expensive": "zz"}}}, "`routes.r.expensive` must name a backend (a, b), got 'zz'"),
    ({"routes": {"r": {"cheap": "zz", "expensive": "a"}}}, "`routes.r.cheap` must name a backend"),
    ({"routes": {"a": {"cheap": "a", "expensive": "b"}}}, "not a backend name (a, b), got 'a'"),
    ({"routes": {"budgetlm": {"cheap": "a", "expensive": "b"}}}, "`routes` names must be"),
    ({"routes": {"r": {"cheap": "a", "expensive": "b", "router": "nope"}}}, "unknown router 'nope'"),
    ({"routes": {"r": {"cheap": "a", "expensive": "b", "router": {"name": "budget_aware", "params": {"gamma": 0}}}}},
     "gamma"),
    ({"routes": {"r": {"cheap": "a", "expensive": "b", "threshold": "high"}}}, "threshold"),
    ({"routes": {"r": {"cheap": "a", "expensive": "b", "strategy": "majority"}}, "strategies": ["sample"]},
     "`routes.r.strategy` must be one of the allowed strategies"),
    ({"routes": {"r": {"cheap": "a"}}}, "expensive"),
    ({"session_budget": {"joules": 1}}, "`session_budget.joules` is not supported"),
    ({"session_budget": {"steps": 0}}, "`session_budget.steps` must be a whole number"),
    ({"key_session_budgets": {"k": {"output_tokens": 0}}, "api_keys": ["k"]}, "`key_session_budgets.k.output_tokens`"),
    ({"key_session_budgets": {"x": {"steps": 2}}, "api_keys": ["k"]}, "`key_session_budgets` names keys that are not"),
    ({"session_ttl_s": 0}, "session_ttl_s"),
])
def test_config_errors_name_the_field(cfg: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ServerConfig(backends={"a": "scripted", "b": "scripted"}, **cfg)
    assert says in str(exc.value)


def test_a_valid_route_config() -> None:
    cfg = ServerConfig(backends={"a": "scripted", "b": "scripted"}, routes={"r": {"cheap": "a", "expensive": "b"}},
                       session_budget={"output_tokens": 10, "steps": 2})
    assert cfg.routes["r"].router == {"name": "budget_aware", "params": {"inner": "logprob"}}
    assert cfg.routes["r"].threshold is None and cfg.routes["r"].strategy == "sample"
    assert cfg.session_budget_for("anyone") == {"output_tokens": 10, "steps": 2}


@pytest.mark.parametrize(("session", "first", "spend", "held"), [
    ({"output_tokens": 100}, {}, {"output_tokens": 10}, True),        # the first call holds all 100: retry later
    ({"output_tokens": 100}, {}, {"output_tokens": 100}, True),       # held while in flight, spent afterwards
    ({"steps": 2}, {}, {}, True),                                     # the other step is held
])
def test_a_session_held_by_calls_in_flight_is_refused_as_held_not_spent(tmp_path: Path, session: dict[str, float],
                                                                       first: dict[str, float],
                                                                       spend: dict[str, float], held: bool) -> None:
    store = _store(tmp_path)
    budget = parse_session_budget(session)
    a, _ = store.reserve("k", "s", budget, first)
    if "steps" in session:
        b, _ = store.reserve("k", "s", None, {})  # the second step, in flight too
    with pytest.raises(SessionExhausted) as exc:
        store.reserve("k", "s", None, {})
    assert exc.value.held is held and "held by its calls in flight" in str(exc.value)
    _commit(store, a, spend)
    if "steps" in session:
        _commit(store, b, {})
    if spend.get("output_tokens", 0) >= session.get("output_tokens", math.inf) or "steps" in session:
        with pytest.raises(SessionExhausted) as exc:  # now truly spent: not retryable
            store.reserve("k", "s", None, {})
        assert exc.value.held is False and "is spent" in str(exc.value)
    else:
        _, clamped = store.reserve("k", "s", None, {})
        assert clamped["output_tokens"] == session["output_tokens"] - spend["output_tokens"]


def test_a_held_session_answers_a_retryable_429(shared: Server) -> None:
    sid = f"held-{uuid.uuid4().hex[:6]}"
    store = shared.state.sessions
    ticket, _ = store.reserve("anonymous", sid, parse_session_budget({"output_tokens": 50}), {})  # a call in flight
    try:
        r = _post(shared, {}, sid)
        err = _error(r, 429)
        assert err["code"] == "session_budget_held" and r.headers["x-should-retry"] == "true"
        assert r.headers["retry-after"] == "1"
    finally:
        store.release(ticket)
    assert _post(shared, {}, sid).status_code == 200  # released: the call runs


@pytest.mark.parametrize(("threshold", "arm"), [(0.5, "expensive"), (0.75, "cheap")])
def test_a_learned_step_policy_plugs_in_as_the_router(tmp_path: Path, threshold: float, arm: str) -> None:
    """BoPO's step policy (``lm_policy``: a chat model answering small/large, loaded from a backend spec) routes a
    server route from the config alone.  The scripted policy answers neither word: score 0.5 (unparseable)."""
    routes = {"bopo": {"cheap": "small", "expensive": "default", "threshold": threshold,
                       "router": {"name": "lm_policy", "params": {"model": "scripted"}}}}
    s = _start(tmp_path / "bopo.sqlite", backends=_backends(), routes=routes)
    try:
        r = s.client().chat.completions.create(model="bopo/route", messages=_user("bopo"))
        route = r.model_extra["budgetlm"]["route"]
        assert route["score"] == 0.5 and route["arm"] == arm and route["reason"] == "routed"
        assert r.choices[0].message.content == (CALLER if arm == "expensive" else CHEAP)
        assert s.state.routers["bopo"].router.counts == {"small": 0, "large": 0, "unparseable": 1}
    finally:
        s.stop()
