"""ServerPool (selection, health, probing, metrics) and OpenAIBackend failover over two stub servers.

The real-server failover (two vLLM servers, one killed mid-run) is in ``test_scale_out.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from budgetlm.backends.base import SamplingParams
from budgetlm.backends.openai import OpenAIBackend
from budgetlm.backends.pool import ServerPool, track_servers
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter

MODEL = "stub"
WORDS = [(f" w{j}", 1000 + j) for j in range(100)]


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _pool(n: int = 2, **kw: object) -> tuple[ServerPool, _Clock]:
    clock = _Clock()
    return ServerPool([f"http://127.0.0.1:{9000 + i}/v1" for i in range(n)], clock=clock, **kw), clock  # type: ignore[arg-type]


A, B, C = (f"http://127.0.0.1:{9000 + i}/v1" for i in range(3))


# ---------------------------------------------------------------------------------------------- selection
def test_least_outstanding_then_fewest_requests_then_order() -> None:
    pool, _ = _pool(3)
    assert [pool.pick() for _ in range(3)] == [A, B, C]  # all idle: fewest requests, then listed order
    pool.done(B, ok=True)
    assert pool.pick() == B  # B has nothing outstanding now
    pool.done(A, ok=True)
    pool.done(C, ok=True)
    assert pool.pick() == A  # A and C idle with 1 request each: listed order
    assert [s.outstanding for s in pool.snapshot()] == [1, 1, 0]


def test_slow_server_gets_less() -> None:
    pool, _ = _pool(2)
    sent = {A: 0, B: 0}
    held = []  # B never answers in this test: its requests stay outstanding
    for _ in range(10):
        url = pool.pick()
        sent[url] += 1
        if url == A:
            pool.done(A, ok=True)
        else:
            held.append(url)
    assert sent[B] == 1 and sent[A] == 9


@pytest.mark.parametrize(("exclude", "expected"), [([A], B), ([B], A), ([A, B], A)])
def test_retry_avoids_servers_already_tried(exclude: list[str], expected: str) -> None:
    pool, _ = _pool(2)
    assert pool.pick(exclude=exclude) == expected


# ---------------------------------------------------------------------------------------------- health
def test_dead_server_is_down_at_once_and_skipped() -> None:
    pool, _ = _pool(2)
    url = pool.pick()
    pool.done(url, ok=False, error=ConnectionRefusedError("refused"), dead=True)
    assert [s.up for s in pool.snapshot()] == [False, True]
    assert {pool.pick() for _ in range(5)} == {B}
    assert pool.snapshot()[0].times_down == 1 and "refused" in (pool.snapshot()[0].last_error or "")


@pytest.mark.parametrize("threshold", [1, 2, 4])
def test_busy_server_is_down_after_threshold_consecutive_failures(threshold: int) -> None:
    pool, _ = _pool(2, fail_threshold=threshold)
    for k in range(threshold):
        assert pool.snapshot()[0].up, k
        pool.pick(exclude=[B])
        pool.done(A, ok=False, error=RuntimeError("HTTP 503"))
    assert not pool.snapshot()[0].up


def test_a_success_resets_the_failure_count() -> None:
    pool, _ = _pool(2, fail_threshold=2)
    for ok in (False, True, False, True, False):
        pool.pick(exclude=[B])
        pool.done(A, ok=ok, error=None if ok else RuntimeError("503"))
    assert pool.snapshot()[0].up and pool.snapshot()[0].failures == 3


def test_all_down_uses_the_server_due_first_and_a_success_brings_it_back() -> None:
    pool, clock = _pool(2, probe_interval=5.0)
    pool.pick(exclude=[B])
    pool.done(A, ok=False, dead=True)
    clock.t += 1
    pool.pick(exclude=[A])
    pool.done(B, ok=False, dead=True)
    assert not any(s.up for s in pool.snapshot())
    url = pool.pick()
    assert url == A  # A's probe is due first
    pool.done(A, ok=True)
    assert [s.up for s in pool.snapshot()] == [True, False]


def test_failed_probes_back_off_up_to_the_maximum() -> None:
    pool, clock = _pool(1, probe_interval=1.0, max_probe_interval=4.0)
    pool.pick()
    pool.done(A, ok=False, dead=True)
    waits = []
    for _ in range(4):
        pool._probed(A, False)  # noqa: SLF001 - drive the probe outcome directly
        waits.append(pool._servers[A].next_probe - clock.t)  # noqa: SLF001
    assert waits == [2.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize(("kw", "param"), [
    ({"fail_threshold": 0}, "fail_threshold"), ({"probe_interval": 0}, "probe_interval"),
    ({"probe_interval": 5.0, "max_probe_interval": 1.0}, "max_probe_interval"), ({"health_timeout": -1}, "health_timeout"),
])
def test_invalid_pool_settings(kw: dict, param: str) -> None:
    with pytest.raises(ConfigError, match=f"`{param}` must be"):
        ServerPool([A], **kw)


def test_duplicate_urls_are_refused() -> None:
    with pytest.raises(ConfigError, match="`base_urls` must be distinct"):
        ServerPool([A, A + "/"])


# ---------------------------------------------------------------------------------------------- stub servers
class _Stub(BaseHTTPRequestHandler):
    """``GET /health`` answers 200; ``POST`` streams ``WORDS`` (continuations go on after what they hold);
    ``cut`` > 0 closes the connection after that many tokens on the next POST."""

    protocol_version = "HTTP/1.1"
    hits: list[dict] = []
    cut = 0

    def do_GET(self) -> None:  # noqa: N802
        data = b'{"object": "list", "data": []}'
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.hits.append(body)
        cut, type(self).cut = type(self).cut, 0
        start = 0
        if body.get("continue_final_message"):
            start = len(body["messages"][-1]["content"].split())
        words = WORDS[start: start + body["max_tokens"]]
        if not body.get("stream"):
            data = json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
                "choices": [{"index": 0, "finish_reason": "length", "token_ids": [t for _, t in words],
                             "message": {"role": "assistant", "content": "".join(w for w, _ in words)}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)},
            }).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for j, (text, tok) in enumerate(words):
                if cut and j == cut:
                    self.close_connection = True
                    return
                choice = {"index": 0, "delta": {"content": text}, "token_ids": [tok],
                          "finish_reason": "length" if j == len(words) - 1 else None}
                self._send({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                            "choices": [choice]})
            self._send({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [],
                        "usage": {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}})
            self._raw(b"data: [DONE]\n\n")
            self._raw(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, obj: dict) -> None:
        self._raw(f"data: {json.dumps(obj)}\n\n".encode())

    def _raw(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, *a: object) -> None:
        pass


class _Server:
    def __init__(self) -> None:
        self.handler = type("H", (_Stub,), {"hits": [], "cut": 0})
        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/v1"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def kill(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def two() -> Iterator[tuple[_Server, _Server]]:
    a, b = _Server(), _Server()
    yield a, b
    for s in (a, b):
        try:
            s.kill()
        except OSError:
            pass


def _backend(urls: list[str], **kw: object) -> OpenAIBackend:
    kw.setdefault("continue_streams", True)  # the stubs continue a partial reply as vLLM does
    return OpenAIBackend(urls, MODEL, tokenizer=None, n_params=1000, backoff=0.01, **kw)  # type: ignore[arg-type]


def test_batch_over_two_servers_with_one_dead_loses_nothing(two: tuple[_Server, _Server]) -> None:
    a, b = two
    a.kill()
    be = _backend([a.url, b.url], max_retries=2)
    meter = Meter()
    results = be.generate([f"q{i}" for i in range(12)], meter, sampling=SamplingParams(max_tokens=5))
    assert [len(r.completions[0].token_ids) for r in results] == [5] * 12
    stats = {s.url: s for s in be.pool.snapshot()}
    assert not stats[a.url].up and stats[b.url].up
    assert stats[b.url].requests == 12 and len(b.handler.hits) == 12
    # the dead server got only the requests in flight when it was found dead, each retried on the live one
    assert stats[a.url].requests == stats[a.url].retries <= be.concurrency
    assert meter.spent("output_tokens") == 60 and meter.total().calls == 12


def test_stream_cut_on_one_server_continues_on_the_other(two: tuple[_Server, _Server]) -> None:
    a, b = two
    a.handler.cut = 4
    be = _backend([a.url, b.url], max_retries=2)
    meter = Meter()
    with track_servers() as use:
        res = asyncio.run(be.agenerate_one("hi", meter, sampling=SamplingParams(max_tokens=20)))
    c = res.completions[0]
    assert c.token_ids == [t for _, t in WORDS[:20]] and c.text == "".join(w for w, _ in WORDS[:20])
    assert len(a.handler.hits) == 1 and len(b.handler.hits) == 1  # the continuation went to the other server
    assert b.handler.hits[0]["messages"][-1]["content"] == "".join(w for w, _ in WORDS[:4])
    assert meter.spent("output_tokens") == 20
    assert use.calls == {a.url: 1, b.url: 1} and use.failovers == 1
    stats = {s.url: s for s in be.pool.snapshot()}
    assert (stats[a.url].failovers, stats[a.url].tokens, stats[b.url].tokens) == (1, 4, 16)
    assert not stats[a.url].up  # a stream cut by the peer marks the server down


def test_killed_server_is_probed_back_and_used_again(two: tuple[_Server, _Server]) -> None:
    a, b = two
    be = _backend([a.url, b.url], max_retries=2, probe_interval=0.05)
    port = a.srv.server_address[1]
    a.kill()
    be.generate(["x", "y"], sampling=SamplingParams(max_tokens=2))
    assert not be.pool.snapshot()[0].up
    a2 = type(a).__new__(type(a))
    a2.handler = type("H", (_Stub,), {"hits": [], "cut": 0})
    a2.srv = ThreadingHTTPServer(("127.0.0.1", port), a2.handler)
    a2.srv.daemon_threads = True
    threading.Thread(target=a2.srv.serve_forever, daemon=True).start()
    try:
        async def main() -> None:
            for _ in range(100):  # each request looks at the pool and starts the probe that is due
                await be.agenerate_one("z", Meter(), sampling=SamplingParams(max_tokens=2))
                if be.pool.snapshot()[0].up:
                    return
                await asyncio.sleep(0.05)

        asyncio.run(main())
        assert be.pool.snapshot()[0].up
        be.generate([f"q{i}" for i in range(6)], sampling=SamplingParams(max_tokens=2))
        assert len(a2.handler.hits) >= 2  # it takes its share again
    finally:
        a2.srv.shutdown()
        a2.srv.server_close()


def test_check_probes_every_server(two: tuple[_Server, _Server]) -> None:
    a, b = two
    a.kill()
    pool = ServerPool([a.url, b.url])
    stats = pool.check()
    assert [s.up for s in stats] == [False, True]
    assert stats[0].last_error is not None


def test_run_sync_closes_the_loop_clients_before_the_loop_closes(two: tuple[_Server, _Server]) -> None:
    from budgetlm.aio import run_sync

    a, b = two
    be = _backend([a.url, b.url])
    seen: list = []

    async def main() -> None:
        await be.agenerate_one("hi", Meter(), sampling=SamplingParams(max_tokens=3))
        seen.extend(be._loop_state().clients.values())  # noqa: SLF001

    run_sync(main())
    assert seen and all(c.is_closed() for c in seen)
    assert len(be._loops) == 0  # noqa: SLF001
