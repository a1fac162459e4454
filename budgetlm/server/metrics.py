"""Server metrics in the Prometheus text format (``GET /metrics``), kept in process.

Counters: ``budgetlm_requests_total{model,status}``, ``budgetlm_tokens_total{kind}`` (prompt,
completion, thinking, cached), ``budgetlm_spend_usd_total``, ``budgetlm_flops_total``,
``budgetlm_allowance_refusals_total``; a gauge ``budgetlm_requests_in_flight``; a histogram
``budgetlm_request_latency_seconds{strategy}``.  For every backend over OpenAI-compatible servers (a
:class:`~budgetlm.backends.pool.ServerPool`), per server: gauges ``budgetlm_upstream_up`` and
``budgetlm_upstream_outstanding``, counters ``budgetlm_upstream_requests_total``,
``budgetlm_upstream_failures_total``, ``budgetlm_upstream_retries_total``,
``budgetlm_upstream_failovers_total``, ``budgetlm_upstream_tokens_total`` and
``budgetlm_upstream_marked_down_total``, labelled ``{backend,url}``.  Written by hand (a few lines) rather than pulling in
``prometheus_client`` for six series.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from budgetlm.backends.pool import ServerStats

__all__ = ["BUCKETS", "Metrics"]

BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Latency histogram bucket bounds in seconds."""


def _escape(value: object) -> str:
    """A label value escaped as the text format requires (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kw: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in kw.items())
    return "{" + inner + "}" if inner else ""


class Metrics:
    """Thread-safe counters, a gauge and a latency histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.usd = 0.0
        self.flops = 0.0
        self.refusals = 0
        self.in_flight = 0
        self._lat: dict[str, list[int]] = {}
        self._lat_sum: dict[str, float] = defaultdict(float)
        self._lat_count: dict[str, int] = defaultdict(int)

    def started(self) -> None:
        """A request entered the server."""
        with self._lock:
            self.in_flight += 1

    def finished(self, model: str, status: str, strategy: str | None = None, latency_s: float | None = None,
                 prompt: int = 0, completion: int = 0, thinking: int = 0, cached: int = 0, usd: float = 0.0,
                 flops: float = 0.0) -> None:
        """A request ended with ``status`` (``ok`` or an HTTP error code)."""
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            self.requests[(model, status)] += 1
            for kind, n in (("prompt", prompt), ("completion", completion), ("thinking", thinking), ("cached", cached)):
                self.tokens[kind] += n
            self.usd += usd
            self.flops += flops
            if status == "429":
                self.refusals += 1
            if strategy is not None and latency_s is not None:
                buckets = self._lat.setdefault(strategy, [0] * len(BUCKETS))
                for i, b in enumerate(BUCKETS):
                    if latency_s <= b:
                        buckets[i] += 1
                self._lat_sum[strategy] += latency_s
                self._lat_count[strategy] += 1

    def render(self, upstreams: Mapping[str, Sequence[ServerStats]] | None = None) -> str:
        """The Prometheus text exposition; ``upstreams``: each pooled backend's per-server snapshot."""
        with self._lock:
            out = ["# HELP budgetlm_requests_total Chat-completion requests by model and status.",
                   "# TYPE budgetlm_requests_total counter"]
            out += [f"budgetlm_requests_total{_labels(model=m, status=s)} {n}" for (m, s), n in sorted(self.requests.items())]
            out += ["# HELP budgetlm_tokens_total Tokens spent by kind.", "# TYPE budgetlm_tokens_total counter"]
            out += [f"budgetlm_tokens_total{_labels(kind=k)} {n}" for k, n in sorted(self.tokens.items())]
            out += ["# HELP budgetlm_spend_usd_total Dollars spent (price table).", "# TYPE budgetlm_spend_usd_total counter",
                    f"budgetlm_spend_usd_total {self.usd!r}",
                    "# HELP budgetlm_flops_total FLOPs spent (cost model).", "# TYPE budgetlm_flops_total counter",
                    f"budgetlm_flops_total {self.flops!r}",
                    "# HELP budgetlm_allowance_refusals_total Requests refused for a spent allowance.",
                    "# TYPE budgetlm_allowance_refusals_total counter",
                    f"budgetlm_allowance_refusals_total {self.refusals}",
                    "# HELP budgetlm_requests_in_flight Requests being served.", "# TYPE budgetlm_requests_in_flight gauge",
                    f"budgetlm_requests_in_flight {self.in_flight}",
                    "# HELP budgetlm_request_latency_seconds Strategy latency per request.",
                    "# TYPE budgetlm_request_latency_seconds histogram"]
            for strategy, buckets in sorted(self._lat.items()):
                for b, n in zip(BUCKETS, buckets):
                    out.append(f"budgetlm_request_latency_seconds_bucket{_labels(strategy=strategy, le=repr(b))} {n}")
                count = self._lat_count[strategy]
                out.append(f"budgetlm_request_latency_seconds_bucket{_labels(strategy=strategy, le='+Inf')} {count}")
                out.append(f"budgetlm_request_latency_seconds_sum{_labels(strategy=strategy)} {self._lat_sum[strategy]!r}")
                out.append(f"budgetlm_request_latency_seconds_count{_labels(strategy=strategy)} {count}")
        out += _upstream_lines(upstreams or {})
        return "\n".join(out) + "\n"


_UPSTREAM = (
    ("up", "gauge", "1 when the server takes requests, 0 while it is marked down.", lambda s: int(s.up)),
    ("outstanding", "gauge", "Requests in flight to the server.", lambda s: s.outstanding),
    ("requests_total", "counter", "HTTP attempts sent to the server.", lambda s: s.requests),
    ("failures_total", "counter", "Attempts that failed (connection, 5xx, timeout, broken stream).", lambda s: s.failures),
    ("retries_total", "counter", "Requests retried elsewhere before their first token.", lambda s: s.retries),
    ("failovers_total", "counter", "Streams that broke after tokens and continued elsewhere.", lambda s: s.failovers),
    ("tokens_total", "counter", "Completion tokens received from the server.", lambda s: s.tokens),
    ("marked_down_total", "counter", "Times the server was marked down.", lambda s: s.times_down),
)


def _upstream_lines(upstreams: Mapping[str, Sequence[ServerStats]]) -> list[str]:
    if not upstreams:
        return []
    out = []
    for suffix, kind, help_, get in _UPSTREAM:
        out += [f"# HELP budgetlm_upstream_{suffix} {help_}", f"# TYPE budgetlm_upstream_{suffix} {kind}"]
        for backend, stats in sorted(upstreams.items()):
            out += [f"budgetlm_upstream_{suffix}{_labels(backend=backend, url=st.url)} {get(st)}" for st in stats]
    return out
