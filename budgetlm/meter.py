"""The meter: a ledger that charges every call and enforces a :class:`~budgetlm.budget.Budget`.

Enforcement works in two steps around every model call:

1. :meth:`Meter.reserve` is called *before* the call with the prompt size, the number of samples
   ``n`` and the requested ``max_tokens``.  It clamps ``max_tokens`` to the largest value whose
   worst case (every sample runs to ``max_tokens``) still fits every limited unit of this meter
   and of all its ancestors, after what is already spent *and already reserved by calls in
   flight*.  If not even one token fits, it raises :class:`~budgetlm.errors.BudgetExceeded`.
2. :meth:`Meter.charge` is called *after* the call with the actual :class:`~budgetlm.usage.Usage`;
   it releases the reservation and books the actual spend here and in every ancestor.

Because reservations count as spent until settled, concurrent calls (threads or asyncio tasks)
cannot jointly overshoot.  Token units, FLOPs and dollars are clamped exactly (FLOPs and dollars
through the backend's cost estimate, which is monotone in ``max_tokens``).  Wall seconds and
joules cannot be predicted per token: a call is refused once they are spent, and backends pass
the remaining wall time on as a deadline where the engine supports one.

Child meters (:meth:`Meter.child`, :meth:`Meter.split`) have their own budget; their spend rolls
up to the parent, and their remaining amount is the smaller of their own and their ancestors'.
All meters of one tree share one re-entrant lock, so the meter is safe under threads and asyncio.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypedDict

from budgetlm.budget import INTEGER_UNITS, UNITS, Budget, Unit
from budgetlm.errors import BudgetExceeded, ConfigError, missing
from budgetlm.io import JsonObject
from budgetlm.usage import Usage

CostEstimate = Callable[[int, int, int], tuple[float, float]]
"""``(prompt_tokens, max_tokens_per_sample, n) -> (flops, usd)`` worst-case cost of a call."""

_CLAMPED = ("output_tokens", "input_tokens", "thinking_tokens", "total_tokens", "flops", "usd")
_ids = itertools.count()


@dataclass
class Reservation:
    """Budget held for one call in flight; settle it with :meth:`Meter.charge`."""

    meter: Meter
    max_tokens: int
    """The clamped per-sample ``max_tokens`` the call may use."""
    requested_max_tokens: int
    """What the caller asked for."""
    amounts: dict[str, float] = field(default_factory=dict)
    """The worst-case amounts held, per unit."""
    binding_unit: str | None = None
    """The unit that clamped ``max_tokens`` (``None`` when nothing clamped it)."""
    id: int = field(default_factory=lambda: next(_ids))
    settled: bool = False
    partial: Usage | None = None
    """What the call has provably spent so far (prompt once admitted, tokens generated so far); set by
    the backend layer through :meth:`progress`, charged if the call ends without :meth:`settle`."""
    charged: Usage | None = None
    """The usage booked when the reservation was settled (``None``: released without charge)."""

    @property
    def clamped(self) -> bool:
        """True when ``max_tokens`` was reduced to fit the budget."""
        return self.max_tokens < self.requested_max_tokens

    def release(self) -> None:
        """Give the reservation back without charging (the call failed before anything was spent)."""
        self.meter._release(self)

    def progress(self, usage: Usage) -> None:
        """Record what the call has spent so far (charged instead of the reservation if it is cancelled)."""
        self.partial = usage

    def settle(self, usage: Usage) -> None:
        """Charge the call's actual ``usage`` and release the reservation (once; later calls raise)."""
        if self.settled:
            raise ConfigError(
                f"reservation {self.id} was already settled; a reservation is charged exactly once"
            )
        self.meter.charge(usage, self)
        self.charged = usage

    def _close(self) -> None:
        """End of the ``with`` block: charge what was spent, else give the reservation back."""
        if self.settled:
            return
        if self.partial is not None:
            self.settle(self.partial)
        else:
            self.release()

    # A reservation is a context: ``with meter.reserve(...) as r:`` or ``async with``.  Inside, the
    # caller runs the call and settles ``r`` with its usage; leaving the block in any other way (an
    # error, a cancellation, a deadline) charges ``r.partial`` (what was generated) or releases.
    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()


class UnitLedger(TypedDict):
    """One unit's line of a :meth:`Meter.summary` (``spent`` is ``None`` for joules not measured)."""

    spent: float | None
    limit: float | None
    remaining: float | None


class LedgerSummary(TypedDict, total=False):
    """What :meth:`Meter.summary` returns (a plain JSON-ready dict), and :attr:`Result.ledger
    <budgetlm.strategies.Result.ledger>` holds: every key is there once the meter's summary is
    taken; a result's ledger is empty (``{}``) until then."""

    name: str
    calls: int
    units: dict[str, UnitLedger]
    """By unit, in the order of :data:`~budgetlm.budget.UNITS`."""
    rho: float
    stop_reason: str | None


def ledger_json(ledger: LedgerSummary) -> JsonObject:
    """``ledger`` as a :data:`~budgetlm.io.JsonObject` (same keys, order and values), for JSON documents
    that embed it: every field is a JSON value, but mypy takes a TypedDict for a ``Mapping[str, object]``
    only, never for a ``Mapping[str, JsonValue]``."""
    out: JsonObject = {}
    if "name" in ledger:
        out["name"] = ledger["name"]
    if "calls" in ledger:
        out["calls"] = ledger["calls"]
    if "units" in ledger:
        out["units"] = {u: {"spent": x["spent"], "limit": x["limit"], "remaining": x["remaining"]}
                        for u, x in ledger["units"].items()}
    if "rho" in ledger:
        out["rho"] = ledger["rho"]
    if "stop_reason" in ledger:
        out["stop_reason"] = ledger["stop_reason"]
    return out


class Meter:
    """Charges usage against a budget; see the module docstring for the enforcement rules."""

    def __init__(
        self,
        budget: Budget | dict[str, Any] | str | None = None,
        *,
        name: str = "root",
        parent: Meter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = Budget.parse(budget)
        self.name = name
        self.parent = parent
        self._clock = clock
        self._lock: threading.RLock = parent._lock if parent is not None else threading.RLock()
        self._spent: dict[str, float] = {u: 0 for u in UNITS if u != "wall_seconds"}
        self._reserved: dict[str, float] = {u: 0 for u in _CLAMPED}
        self._open: dict[int, Reservation] = {}
        self._start = clock()
        self.records: list[Usage] = []
        self.children: list[Meter] = []
        self.stop_reason: str | None = None
        self.active = True
        """False once the work this meter pays for has finished (siblings then share what is left)."""

    # ------------------------------------------------------------------ reading
    def spent(self, unit: Unit | str) -> float:
        """What this meter (with its children) has spent in ``unit``."""
        self._check_unit(unit)
        if unit == "wall_seconds":
            return self._clock() - self._start
        with self._lock:
            return self._spent[unit]

    def reserved(self, unit: str) -> float:
        """What calls in flight hold in ``unit``."""
        with self._lock:
            return self._reserved.get(unit, 0)

    def _own_remaining(self, unit: str) -> float | None:
        limit: float | None = getattr(self.budget, unit)
        if limit is None:
            return None
        return limit - self.spent(unit) - self._reserved.get(unit, 0)

    def remaining(self, unit: Unit | str) -> float | None:
        """What is left in ``unit`` here and in every ancestor (``None``: no limit anywhere)."""
        self._check_unit(unit)
        with self._lock:
            best: float | None = None
            m: Meter | None = self
            while m is not None:
                r = m._own_remaining(unit)
                if r is not None:
                    best = r if best is None else min(best, r)
                m = m.parent
            return best

    def rho(self) -> float:
        """The remaining fraction ρ = remaining / limit of the tightest limited unit, in [0, 1].

        Takes ancestors into account; 1.0 when nothing is limited.
        """
        with self._lock:
            rho = 1.0
            m: Meter | None = self
            while m is not None:
                for unit, limit in m.budget.limits().items():
                    r = m._own_remaining(unit)
                    if r is None:
                        raise missing('r')
                    frac = 0.0 if limit <= 0 else r / limit
                    rho = min(rho, frac)
                m = m.parent
            return max(0.0, min(1.0, rho))

    def exhausted(self) -> bool:
        """True when no further model call fits (no output token or no time/energy left)."""
        return self.exhausted_unit() is not None

    def exhausted_unit(self) -> str | None:
        """The first unit with nothing left for a model call, or ``None``."""
        for unit in ("output_tokens", "total_tokens", "wall_seconds", "joules", "flops", "usd"):
            r = self.remaining(unit)
            if r is not None and r <= (0 if unit not in INTEGER_UNITS else 0.5):
                return unit
        return None

    def exhausted_reason(self) -> str:
        """``"budget exhausted: <unit>"`` for the unit that stopped calls (the refused one, else the empty one)."""
        if self.stop_reason:
            return self.stop_reason
        unit = self.exhausted_unit()
        return f"budget exhausted: {unit}" if unit else "budget exhausted"

    def total(self) -> Usage:
        """The sum of every record charged here (children included)."""
        with self._lock:
            out = Usage.zero()
            for r in self.records:
                out = out + r
            return out

    def summary(self) -> LedgerSummary:
        """Spend, limits and remaining amounts by unit, JSON-ready (a plain dict)."""
        with self._lock:
            units: dict[str, UnitLedger] = {}
            for u in UNITS:
                units[u] = {
                    "spent": self.spent(u),
                    "limit": getattr(self.budget, u),
                    "remaining": self.remaining(u),
                }
            if self._spent["joules"] == 0 and all(r.joules is None for r in self.records):
                units["joules"]["spent"] = None  # not measured, not zero
            return {"name": self.name, "calls": len(self.records), "units": units,
                    "rho": self.rho(), "stop_reason": self.stop_reason}

    # ------------------------------------------------------------------ enforcing
    def reserve(
        self,
        *,
        prompt_tokens: int,
        max_tokens: int,
        n: int = 1,
        may_think: bool = True,
        cost: CostEstimate | None = None,
        min_tokens: int = 1,
    ) -> Reservation:
        """Hold budget for one call and clamp its per-sample ``max_tokens``.

        ``may_think=False`` declares that the call cannot produce thinking tokens (for example
        the answer after a forced end of thinking), so the thinking budget does not clamp it.
        Raises :class:`BudgetExceeded` when fewer than ``min_tokens`` tokens per sample fit.
        Scoring calls that generate nothing pass ``max_tokens=0, min_tokens=0``.
        """
        if n < 1:
            raise ConfigError(f"`n` must be >= 1, got {n!r}")
        if max_tokens < 0 or max_tokens < min_tokens:
            raise ConfigError(f"`max_tokens` must be >= {max(1, min_tokens)}, got {max_tokens!r}")
        if prompt_tokens < 0:
            raise ConfigError(f"`prompt_tokens` must be >= 0, got {prompt_tokens!r}")
        with self._lock:
            for unit in ("wall_seconds", "joules"):
                r = self.remaining(unit)
                if r is not None and r <= 0:
                    self._refuse(unit, r, "no time or energy is left for another call")
            r_in = self.remaining("input_tokens")
            if r_in is not None and prompt_tokens > r_in:
                self._refuse("input_tokens", r_in, f"the prompt has {prompt_tokens} tokens")
            r_tot0 = self.remaining("total_tokens")
            if r_tot0 is not None and prompt_tokens > r_tot0:
                self._refuse("total_tokens", r_tot0, f"the prompt has {prompt_tokens} tokens")
            m, binding = max_tokens, None

            def fit(unit: str, cap: float | None) -> None:
                nonlocal m, binding
                if cap is not None and cap < m:
                    m, binding = max(0, math.floor(cap)), unit

            r_out = self.remaining("output_tokens")
            fit("output_tokens", None if r_out is None else r_out / n)
            r_tot = self.remaining("total_tokens")
            fit("total_tokens", None if r_tot is None else (r_tot - prompt_tokens) / n)
            if may_think:
                r_th = self.remaining("thinking_tokens")
                fit("thinking_tokens", None if r_th is None else r_th / n)
            flops = usd = 0.0
            if cost is not None:
                for idx, unit in enumerate(("flops", "usd")):
                    r = self.remaining(unit)
                    if r is None:
                        continue
                    if cost(prompt_tokens, m, n)[idx] > r:
                        # largest m' <= m with cost(m') <= r; cost is monotone in m
                        lo, hi = 0, m
                        while lo < hi:
                            mid = (lo + hi + 1) // 2
                            if cost(prompt_tokens, mid, n)[idx] <= r:
                                lo = mid
                            else:
                                hi = mid - 1
                        m, binding = lo, unit
                        if cost(prompt_tokens, m, n)[idx] > r:
                            self._refuse(unit, r, "even the prompt alone costs more than what is left")
                flops, usd = cost(prompt_tokens, m, n)
            if m < min_tokens:
                unit = binding or "output_tokens"
                self._refuse(unit, self.remaining(unit), f"not even {min_tokens} token(s) per sample fit (n={n})")
            amounts = {
                "output_tokens": n * m,
                "input_tokens": prompt_tokens,
                "thinking_tokens": n * m if may_think else 0,
                "total_tokens": prompt_tokens + n * m,
                "flops": flops,
                "usd": usd,
            }
            res = Reservation(self, m, max_tokens, amounts, binding)
            for mm in self._chain():
                for u, a in amounts.items():
                    mm._reserved[u] += a
                mm._open[res.id] = res
            return res

    def fair_share(self, samples: int, prompt_tokens: int = 0, *, may_think: bool = True) -> int | None:
        """Per-sample tokens when ``samples`` samples (with ``prompt_tokens`` prompts in all) share this meter.

        Without it the first of several requests that share a meter could reserve its whole budget
        and leave nothing for the others; with it every sample gets an equal share of what is left
        in output, total and (when ``may_think``) thinking tokens.  ``None`` when nothing limits them.
        """
        caps = []
        with self._lock:
            for unit, extra in (("output_tokens", 0), ("total_tokens", prompt_tokens), ("thinking_tokens", 0)):
                if unit == "thinking_tokens" and not may_think:
                    continue
                r = self.remaining(unit)
                if r is not None:
                    caps.append(int((r - extra) // max(1, samples)))
        return min(caps) if caps else None

    def charge(self, usage: Usage, reservation: Reservation | None = None) -> None:
        """Book ``usage`` here and in every ancestor, settling ``reservation`` if given."""
        with self._lock:
            if reservation is not None:
                if reservation.settled:
                    raise ConfigError(
                        f"reservation {reservation.id} was already settled; a reservation is charged exactly once"
                    )
                self._release(reservation)
                reservation.charged = usage
            for mm in self._chain():
                for u in UNITS:
                    if u == "wall_seconds":
                        continue
                    a = usage.amount(u)
                    if a is not None:
                        mm._spent[u] += a
                mm.records.append(usage)

    def record_tool_call(self, n: int = 1, *, latency_s: float = 0.0, name: str = "tool") -> Usage:
        """Charge ``n`` tool calls; raises :class:`BudgetExceeded` if they do not fit."""
        with self._lock:
            r = self.remaining("tool_calls")
            if r is not None and r < n:
                self._refuse("tool_calls", r, f"{n} tool call(s) requested")
            for unit in ("wall_seconds",):
                rw = self.remaining(unit)
                if rw is not None and rw <= 0:
                    self._refuse(unit, rw, "no time is left for a tool call")
            usage = Usage(tool_calls=n, latency_s=latency_s, calls=0, model=name, finish_reason="tool")
            self.charge(usage)
            return usage

    def can_afford(self, *, prompt_tokens: int = 0, tokens: int = 1, n: int = 1, may_think: bool = True) -> bool:
        """Whether a call of ``n`` samples of ``tokens`` tokens would fit right now (a probe: sets no stop reason)."""
        before = self.stop_reason
        try:
            res = self.reserve(prompt_tokens=prompt_tokens, max_tokens=max(1, tokens), n=n, may_think=may_think,
                               min_tokens=max(1, tokens))
        except BudgetExceeded:
            self.stop_reason = before
            return False
        res.release()
        return True

    # ------------------------------------------------------------------ children
    def child(self, budget: Budget | dict[str, Any] | str | None = None, *, name: str | None = None) -> Meter:
        """A meter with its own ``budget`` whose spend rolls up to this one."""
        with self._lock:
            c = Meter(budget, name=name or f"{self.name}/{len(self.children)}", parent=self, clock=self._clock)
            self.children.append(c)
            return c

    def split(self, k: int, weights: list[float] | None = None, *, name: str = "part") -> list[Meter]:
        """``k`` children sharing what remains here in proportion to ``weights`` (default equal)."""
        if k < 1:
            raise ConfigError(f"`k` must be >= 1, got {k!r}")
        w = weights or [1.0] * k
        if len(w) != k or any(x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(f"`weights` must be {k} non-negative numbers with a positive sum, got {weights!r}")
        total = sum(w)
        with self._lock:
            parts = []
            for i, wi in enumerate(w):
                lim: dict[str, float] = {}
                for unit in UNITS:
                    r = self.remaining(unit)
                    if r is None:
                        continue
                    share = max(0.0, r) * wi / total
                    lim[unit] = math.floor(share) if unit in INTEGER_UNITS else share
                parts.append(self.child(Budget.of(lim), name=f"{self.name}/{name}{i}"))
            return parts

    # ------------------------------------------------------------------ internals
    def _chain(self) -> Iterator[Meter]:
        m: Meter | None = self
        while m is not None:
            yield m
            m = m.parent

    def _release(self, res: Reservation) -> None:
        with self._lock:
            if res.settled:
                return
            res.settled = True
            for mm in res.meter._chain():
                if mm._open.pop(res.id, None) is not None:
                    for u, a in res.amounts.items():
                        mm._reserved[u] -= a

    def _refuse(self, unit: str, remaining: float | None, why: str) -> None:
        self.stop_reason = f"budget exhausted: {unit}"
        raise BudgetExceeded(
            f"budget exhausted in `{unit}` (remaining {remaining if remaining is not None else 'n/a'}): {why}; "
            "raise the limit or stop and use the best answer so far",
            unit=unit,
            remaining=remaining,
        )

    @staticmethod
    def _check_unit(unit: str) -> None:
        if unit not in UNITS:
            raise ConfigError(f"`unit` must be one of {', '.join(UNITS)}, got {unit!r}")

    def __repr__(self) -> str:
        return f"Meter(name={self.name!r}, budget={self.budget}, rho={self.rho():.3f})"
