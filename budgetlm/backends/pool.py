"""A pool of OpenAI-compatible servers: health, least-outstanding-requests selection, failover, metrics.

:class:`~budgetlm.backends.openai.OpenAIBackend` sends every HTTP attempt through one
:class:`ServerPool` over its base URLs (one URL is a pool of one).  The pool decides *where* an attempt
goes; the backend decides *whether* to retry and how to charge.

Selection (:meth:`ServerPool.pick`): among the servers that are up and not already tried by this request,
the one with the fewest requests outstanding (in flight from this process); ties go to the one that
has served fewer requests, then to the first listed.  This is least-outstanding-requests, not
round-robin: a slow or saturated server gets less, and a request never lands on a server it just
failed on while another is up.  When every server is down, the one whose next probe is due first is
used anyway (the request is then the probe), so a pool never refuses work outright.

Health: a server is marked *down* at once when a connection to it fails (refused, reset, or a stream
cut by the peer: the process is gone) and after ``fail_threshold`` consecutive failed answers (HTTP 5xx,
408, 429, timeouts: it may only be overloaded).  A down server is probed in the background —
``GET /health`` at the server's root (vLLM), else ``GET /v1/models`` — every ``probe_interval``
seconds, doubling up to ``max_probe_interval``, from the event loop of the next request that looks at
the pool; the first probe that answers marks it up again and it takes new requests at once.
:meth:`ServerPool.check` probes every server synchronously (startup, tests).  Transitions are logged
on the ``budgetlm.backends.pool`` logger (warning down, info up).

Metrics (:meth:`ServerPool.snapshot`, one :class:`ServerStats` per server): up, outstanding, requests,
failures, retries and failovers away from it, tokens received, summed latency, last error, times
marked down.  ``budgetlm serve`` exports them on ``/metrics`` as ``budgetlm_upstream_*{backend,url}``;
the eval runner writes each record's servers (:func:`track_servers`) and each session's snapshot.

Charging is not the pool's business (the meter owns spend): the backend charges a failed attempt
nothing when nothing arrived, and what arrived when a stream broke; see the OpenAI backend's docstring
for how a broken stream continues on another server without charging any token twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from budgetlm.errors import invalid

__all__ = ["ServerPool", "ServerStats", "ServerUse", "track_servers"]

log = logging.getLogger("budgetlm.backends.pool")


@dataclass(frozen=True)
class ServerStats:
    """One server's state and counters (a snapshot)."""

    url: str
    """The base URL (ending in ``/v1``)."""
    up: bool
    """Whether new requests may go to it."""
    outstanding: int
    """Requests in flight to it from this process."""
    requests: int
    """HTTP attempts sent to it (retries and continuations included)."""
    failures: int
    """Attempts that failed (connection, 5xx/408/429, timeout, broken stream)."""
    retries: int
    """Requests that failed here before any token and were retried elsewhere."""
    failovers: int
    """Streams that broke here after tokens arrived and continued elsewhere."""
    tokens: int
    """Completion tokens received from it."""
    latency_s: float
    """Summed seconds of its successful attempts."""
    times_down: int
    """How many times it was marked down."""
    last_error: str | None
    """The last failure, as ``Type: message``."""


@dataclass
class ServerUse:
    """Which servers one unit of work (an eval item) used; filled by the pool through :func:`track_servers`."""

    calls: Counter[str] = field(default_factory=Counter)
    """Attempts per base URL."""
    retries: int = 0
    """Attempts that failed before any token and were retried."""
    failovers: int = 0
    """Streams that broke after tokens and continued on another attempt."""

    def as_dict(self) -> dict[str, object]:
        return {"calls": dict(self.calls), "retries": self.retries, "failovers": self.failovers}


_USE: contextvars.ContextVar[ServerUse | None] = contextvars.ContextVar("budgetlm_server_use", default=None)


@contextlib.contextmanager
def track_servers() -> Iterator[ServerUse]:
    """Record the pool attempts made in this context (and the tasks it starts) into a :class:`ServerUse`."""
    use = ServerUse()
    token = _USE.set(use)
    try:
        yield use
    finally:
        _USE.reset(token)


class _Server:
    __slots__ = ("url", "up", "outstanding", "requests", "failures", "consecutive", "retries", "failovers",
                 "tokens", "latency_s", "times_down", "last_error", "next_probe", "probe_wait", "probing")

    def __init__(self, url: str) -> None:
        self.url = url
        self.up = True
        self.outstanding = self.requests = self.failures = self.consecutive = 0
        self.retries = self.failovers = self.tokens = self.times_down = 0
        self.latency_s = 0.0
        self.last_error: str | None = None
        self.next_probe = 0.0
        self.probe_wait = 0.0
        self.probing = False


def _root(url: str) -> str:
    """The server root of a base URL (``http://h:p/v1`` -> ``http://h:p``)."""
    return url[:-3] if url.endswith("/v1") else url


class ServerPool:
    """Several OpenAI-compatible base URLs behind one selection rule; thread-safe (see the module docstring)."""

    def __init__(self, urls: Sequence[str], *, api_key: str = "EMPTY", fail_threshold: int = 3,
                 probe_interval: float = 1.0, max_probe_interval: float = 30.0, health_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not urls:
            raise invalid("base_urls", "one or more URLs", list(urls), "pass e.g. ['http://127.0.0.1:8000/v1']")
        for pname, val, ok, must in (
            ("fail_threshold", fail_threshold, isinstance(fail_threshold, int) and fail_threshold >= 1,
             "an integer >= 1"),
            ("probe_interval", probe_interval, isinstance(probe_interval, (int, float)) and probe_interval > 0,
             "a positive number of seconds"),
            ("max_probe_interval", max_probe_interval,
             isinstance(max_probe_interval, (int, float)) and max_probe_interval >= probe_interval,
             f"a number of seconds >= probe_interval ({probe_interval})"),
            ("health_timeout", health_timeout, isinstance(health_timeout, (int, float)) and health_timeout > 0,
             "a positive number of seconds"),
        ):
            if not ok:
                raise invalid(pname, must, val)
        self.urls = [u.rstrip("/") for u in urls]
        if len(set(self.urls)) != len(self.urls):
            raise invalid("base_urls", "distinct URLs", self.urls, "list each server once")
        self.api_key = api_key
        self.fail_threshold = fail_threshold
        self.probe_interval = float(probe_interval)
        self.max_probe_interval = float(max_probe_interval)
        self.health_timeout = float(health_timeout)
        self.clock = clock
        self._servers = {u: _Server(u) for u in self.urls}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ selection
    def pick(self, exclude: Sequence[str] = ()) -> str:
        """The server for the next attempt (and count it as outstanding); see the module docstring.

        The caller must pair it with :meth:`done`.  Due probes of down servers start on the running
        event loop, if there is one.
        """
        now = self.clock()
        with self._lock:
            due = [s for s in self._servers.values() if not s.up and not s.probing and s.next_probe <= now]
            up = [s for s in self._servers.values() if s.up]
            pool = [s for s in up if s.url not in exclude] or up
            if pool:
                order = {u: i for i, u in enumerate(self.urls)}
                best = min(pool, key=lambda s: (s.outstanding, s.requests, order[s.url]))
            else:  # everything is down: the request itself probes the server due first
                best = min(self._servers.values(), key=lambda s: s.next_probe)
            best.outstanding += 1
            best.requests += 1
            use = _USE.get()
            if use is not None:
                use.calls[best.url] += 1
            started = []
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                for s in due:
                    if s is not best:
                        s.probing = True
                        started.append(s.url)
        for url in started:
            asyncio.ensure_future(self._probe_task(url))
        return best.url

    def done(self, url: str, *, ok: bool, error: BaseException | None = None, dead: bool = False,
             tokens: int = 0, latency_s: float = 0.0, moved: str | None = None) -> None:
        """An attempt on ``url`` ended.

        ``ok``: it answered (a 4xx counts as an answer: the server is alive).  ``dead``: the failure says the
        server is gone (connection refused or cut), which marks it down at once.  ``moved``: ``"retry"`` or
        ``"failover"`` when the request goes on elsewhere.
        """
        with self._lock:
            s = self._servers[url]
            s.outstanding = max(0, s.outstanding - 1)
            s.tokens += tokens
            use = _USE.get()
            if moved == "retry":
                s.retries += 1
                if use is not None:
                    use.retries += 1
            elif moved == "failover":
                s.failovers += 1
                if use is not None:
                    use.failovers += 1
            if ok:
                s.consecutive = 0
                s.latency_s += latency_s
                if not s.up:
                    self._mark_up(s, "a request succeeded")
                return
            s.failures += 1
            s.consecutive += 1
            s.last_error = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
            if s.up and (dead or s.consecutive >= self.fail_threshold):
                self._mark_down(s)
            elif not s.up:
                self._schedule_probe(s)

    def _mark_down(self, s: _Server) -> None:
        s.up = False
        s.times_down += 1
        s.probe_wait = self.probe_interval
        s.next_probe = self.clock() + s.probe_wait
        log.warning("server %s marked down after %d failure(s) (last: %s); probing it every %.1f s (doubling)",
                    s.url, s.consecutive, s.last_error, s.probe_wait)

    def _schedule_probe(self, s: _Server) -> None:
        s.probe_wait = min(self.max_probe_interval, max(self.probe_interval, s.probe_wait * 2))
        s.next_probe = self.clock() + s.probe_wait

    def _mark_up(self, s: _Server, why: str) -> None:
        s.up = True
        s.consecutive = 0
        s.probe_wait = 0.0
        log.info("server %s is up again (%s)", s.url, why)

    # ------------------------------------------------------------------ probing
    async def _probe_task(self, url: str) -> None:
        try:
            ok = await self.aprobe(url)
        except Exception:  # noqa: BLE001 - a probe that fails in any way leaves the server down
            ok = False
        self._probed(url, ok)

    def _probed(self, url: str, ok: bool) -> None:
        with self._lock:
            s = self._servers[url]
            s.probing = False
            if ok and not s.up:
                self._mark_up(s, "its health check answered")
            elif not ok and not s.up:
                self._schedule_probe(s)

    async def aprobe(self, url: str) -> bool:
        """Whether ``url`` answers its health check (``/health`` at the root, else ``/v1/models``)."""
        import httpx  # a dependency of openai

        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with httpx.AsyncClient(timeout=self.health_timeout, headers=headers) as client:
            try:
                r = await client.get(_root(url) + "/health")
                if r.status_code == 200:
                    return True
                r = await client.get(url + "/models")
                return r.status_code == 200
            except httpx.HTTPError:
                return False

    def check(self) -> list[ServerStats]:
        """Probe every server now (from sync code) and mark each up or down; returns the snapshot."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"}
        with httpx.Client(timeout=self.health_timeout, headers=headers) as client:
            for url in self.urls:
                try:
                    ok = client.get(_root(url) + "/health").status_code == 200 or \
                        client.get(url + "/models").status_code == 200
                except httpx.HTTPError as exc:
                    ok = False
                    with self._lock:
                        self._servers[url].last_error = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    s = self._servers[url]
                    if ok and not s.up:
                        self._mark_up(s, "its health check answered")
                    elif not ok and s.up:
                        s.consecutive = max(s.consecutive, self.fail_threshold)
                        self._mark_down(s)
        return self.snapshot()

    # ------------------------------------------------------------------ metrics
    def snapshot(self) -> list[ServerStats]:
        """Every server's state and counters, in the order the URLs were given."""
        with self._lock:
            return [ServerStats(s.url, s.up, s.outstanding, s.requests, s.failures, s.retries, s.failovers,
                                s.tokens, round(s.latency_s, 6), s.times_down, s.last_error)
                    for s in (self._servers[u] for u in self.urls)]

    @property
    def requests(self) -> Counter[str]:
        """Attempts sent per URL."""
        with self._lock:
            return Counter({u: s.requests for u, s in self._servers.items()})

    def __repr__(self) -> str:
        return f"ServerPool({self.urls!r})"
