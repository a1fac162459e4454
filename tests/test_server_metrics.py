"""Prometheus text exposition of the server's counters, gauge and latency histogram."""

from __future__ import annotations

import re
import threading

import pytest

from budgetlm.server.metrics import BUCKETS, Metrics


def _series(text: str) -> dict[str, float]:
    """Sample lines (``name{labels} value``) as a dict; comments skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_render_counters_with_labels() -> None:
    m = Metrics()
    for _ in range(3):
        m.started()
    m.finished("budgetlm/sample", "ok", "sample", 0.2, prompt=3, completion=6, thinking=1, cached=2, usd=0.5, flops=10.0)
    m.finished("budgetlm/sample", "ok", "sample", 0.3, prompt=1, completion=4)
    m.finished("budgetlm/nope", "429")
    s = _series(m.render())
    assert s['budgetlm_requests_total{model="budgetlm/sample",status="ok"}'] == 2
    assert s['budgetlm_requests_total{model="budgetlm/nope",status="429"}'] == 1
    assert s['budgetlm_tokens_total{kind="prompt"}'] == 4
    assert s['budgetlm_tokens_total{kind="completion"}'] == 10
    assert s['budgetlm_tokens_total{kind="thinking"}'] == 1
    assert s['budgetlm_tokens_total{kind="cached"}'] == 2
    assert s["budgetlm_spend_usd_total"] == 0.5 and s["budgetlm_flops_total"] == 10.0
    assert s["budgetlm_allowance_refusals_total"] == 1  # only the 429 counts as a refusal
    assert s["budgetlm_requests_in_flight"] == 0
    text = m.render()
    for name, kind in [("budgetlm_requests_total", "counter"), ("budgetlm_requests_in_flight", "gauge"),
                       ("budgetlm_request_latency_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}" in text
    assert text.endswith("\n")


def test_histogram_buckets_are_cumulative() -> None:
    m = Metrics()
    latencies = [0.01, 0.05, 0.07, 0.3, 3.0, 500.0]  # 0.05 sits on a bound (le is inclusive); 500 beyond all
    for lat in latencies:
        m.started()
        m.finished("budgetlm/sample", "ok", "sample", lat)
    s = _series(m.render())
    counts = [s[f'budgetlm_request_latency_seconds_bucket{{strategy="sample",le="{b!r}"}}'] for b in BUCKETS]
    assert counts == [sum(lat <= b for lat in latencies) for b in BUCKETS]
    assert counts == sorted(counts)  # cumulative: never decreasing
    assert counts[0] == 2 and counts[-1] == 5
    inf = s['budgetlm_request_latency_seconds_bucket{strategy="sample",le="+Inf"}']
    assert inf == s['budgetlm_request_latency_seconds_count{strategy="sample"}'] == len(latencies)
    assert s['budgetlm_request_latency_seconds_sum{strategy="sample"}'] == pytest.approx(sum(latencies))


def test_histogram_per_strategy_and_only_with_latency() -> None:
    m = Metrics()
    m.finished("budgetlm/majority", "ok", "majority", 0.2)
    m.finished("budgetlm/sample", "400")  # errors before running have no strategy latency
    text = m.render()
    assert 'strategy="majority"' in text and 'strategy="sample"' not in text


@pytest.mark.parametrize(("model", "rendered"), [
    ('say "hi"', r'model="say \"hi\""'),  # quotes escaped
    ("back\\slash", r'model="back\\slash"'),  # backslashes escaped
    ("two\nlines", r'model="two\nlines"'),  # a newline must not break the line-based format
])
def test_label_values_are_escaped(model: str, rendered: str) -> None:
    m = Metrics()
    m.finished(model, "404")
    text = m.render()
    assert f"budgetlm_requests_total{{{rendered},status=\"404\"}} 1" in text
    for line in text.splitlines():  # every line is a comment or a well-formed sample
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{.*\})? \S+', line), line


def test_in_flight_gauge_goes_up_and_down() -> None:
    m = Metrics()
    m.started()
    m.started()
    assert _series(m.render())["budgetlm_requests_in_flight"] == 2
    m.finished("budgetlm/sample", "ok")
    assert _series(m.render())["budgetlm_requests_in_flight"] == 1
    m.finished("budgetlm/sample", "ok")
    m.finished("budgetlm/sample", "ok")  # an extra finish never drives the gauge negative
    assert _series(m.render())["budgetlm_requests_in_flight"] == 0


def test_thread_safe_counting() -> None:
    m = Metrics()

    def work() -> None:
        for _ in range(200):
            m.started()
            m.finished("budgetlm/sample", "ok", "sample", 0.01, completion=1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = _series(m.render())
    assert s['budgetlm_requests_total{model="budgetlm/sample",status="ok"}'] == 1600
    assert s['budgetlm_tokens_total{kind="completion"}'] == 1600
    assert s['budgetlm_request_latency_seconds_count{strategy="sample"}'] == 1600
    assert s["budgetlm_requests_in_flight"] == 0


def test_upstream_series_per_backend_and_server() -> None:
    from budgetlm.backends.pool import ServerPool

    pool = ServerPool(["http://a:1/v1", "http://b:2/v1"])
    url = pool.pick()
    pool.done(url, ok=False, error=ConnectionError("refused"), dead=True, moved="retry")
    pool.done(pool.pick(exclude=[url]), ok=True, tokens=7)
    text = Metrics().render({"pooled": pool.snapshot()})
    assert 'budgetlm_upstream_up{backend="pooled",url="http://a:1/v1"} 0' in text
    assert 'budgetlm_upstream_up{backend="pooled",url="http://b:2/v1"} 1' in text
    assert 'budgetlm_upstream_retries_total{backend="pooled",url="http://a:1/v1"} 1' in text
    assert 'budgetlm_upstream_tokens_total{backend="pooled",url="http://b:2/v1"} 7' in text
    assert 'budgetlm_upstream_marked_down_total{backend="pooled",url="http://a:1/v1"} 1' in text
    assert "# TYPE budgetlm_upstream_outstanding gauge" in text
    assert "budgetlm_upstream" not in Metrics().render()
