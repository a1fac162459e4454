"""``budgetlm serve`` against vLLM's own OpenAI server on the same model, with the official client.

Two servers run side by side on 127.0.0.1, both on the default model (SmolLM2-135M-Instruct,
``--max-model-len 2048``, eager mode, ``VLLM_CPU_KVCACHE_SPACE=1``, ``--dtype float32`` by default
because CPUs without AVX-512 emulate bfloat16 several times slower):

* **vllm**: ``python -m vllm.entrypoints.openai.api_server --served-model-name smollm2 ...``;
* **budgetlm**: ``budgetlm serve --backend vllm:default`` (model ``budgetlm/sample``).

Every measurement alternates the two servers round by round (the first one swaps each round), so
the ratios (budgetlm / vllm) are taken side by side under the same machine conditions:

1. **throughput and latency** at 8 and 32 concurrent clients (``AsyncOpenAI``): the same chat
   requests to both (greedy, ``max_tokens`` fixed); completion tokens/s over the wall time, and the
   p50 request latency;
2. **short requests beside a long one**: 8 short greedy requests sent while one long request runs
   (budgetlm: ``budgetlm/majority`` with n=8 samples; vllm: the same as one request with ``n=8``),
   against the same 8 short requests alone; the ratio is the short requests' p50 latency beside the
   long one over alone (each server's own ratio);
3. **time to first token** of streamed requests, one at a time: from sending to the first chunk
   with content.

Targets from the issue: throughput >= 0.95x vllm, p50 latency <= 1.1x, short-beside-long <= 1.3x,
TTFT <= 1.5x.  Results (with library versions and the configuration) go to
``benchmarks/results/serve_vs_vllm.json``.

Usage::

    .venv/bin/python benchmarks/serve_vs_vllm.py [--rounds 2 --requests 16 --max-tokens 64 --threads 1]

The defaults finish in about 8 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

MODEL_DIR = Path.home() / ".cache" / "budgetlm" / "models" / "SmolLM2-135M-Instruct"
TOPICS = ["rivers", "volcanoes", "bees", "glaciers", "trains", "tides", "clouds", "owls", "deserts", "comets",
          "forests", "bridges", "whales", "storms", "gardens", "mountains"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, seed: int) -> list[list[dict[str, str]]]:
    """``n`` distinct chat requests (a topic and two numbers), the same for both servers."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        topic = TOPICS[i % len(TOPICS)]
        out.append([{"role": "user", "content": f"Write a few sentences about {topic}, then compute {a} + {b}."}])
    return out


class Server:
    """A server subprocess with its log."""

    def __init__(self, name: str, cmd: list[str], port: int, model: str, env: dict[str, str], log: Path) -> None:
        self.name, self.port, self.model, self.log = name, port, model, log
        self.url = f"http://127.0.0.1:{port}"
        self._fh = open(log, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> float:
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{self.name} did not answer /health in {timeout} s:\n{self.log.read_text()[-4000:]}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._fh.close()


def client(srv: Server) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)


async def one(c: Any, srv: Server, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = await c.chat.completions.create(model=srv.model, messages=messages, max_tokens=max_tokens, temperature=0.0)
    return time.perf_counter() - t0, r.usage.completion_tokens


async def load(srv: Server, reqs: list[list[dict[str, str]]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """All ``reqs`` through ``concurrency`` concurrent clients; tokens/s and latency percentiles."""
    clients = [client(srv) for _ in range(concurrency)]
    queue: asyncio.Queue[list[dict[str, str]]] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    lat: list[float] = []
    tokens = [0]

    async def worker(c: Any) -> None:
        while not queue.empty():
            m = queue.get_nowait()
            t, n = await one(c, srv, m, max_tokens)
            lat.append(t)
            tokens[0] += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    wall = time.perf_counter() - t0
    for c in clients:
        await c.close()
    lat.sort()
    return {"wall_s": wall, "completion_tokens": tokens[0], "tokens_per_s": tokens[0] / wall,
            "p50_s": statistics.median(lat), "p90_s": lat[int(0.9 * (len(lat) - 1))], "requests": len(lat)}


async def short_beside_long(srv: Server, shorts: list[list[dict[str, str]]], short_tokens: int, long_n: int,
                            long_tokens: int, with_long: bool) -> dict[str, Any]:
    """The short requests' latencies, sent together (after the long request started, when ``with_long``)."""
    c = client(srv)
    long_task = None
    long_info: dict[str, Any] = {}
    if with_long:
        msgs = [{"role": "user", "content": "Tell a long story about a lighthouse keeper and a storm."}]

        async def run_long() -> None:
            t0 = time.perf_counter()
            if srv.name == "budgetlm":
                r = await c.chat.completions.create(
                    model="budgetlm/majority", messages=msgs,
                    extra_body={"strategy_params": {"n": long_n, "temperature": 0.7, "max_tokens": long_tokens},
                                "budget": {"output_tokens": long_n * long_tokens}})
            else:
                r = await c.chat.completions.create(model=srv.model, messages=msgs, n=long_n, temperature=0.7,
                                                    max_tokens=long_tokens)
            long_info.update(latency_s=time.perf_counter() - t0, completion_tokens=r.usage.completion_tokens)

        long_task = asyncio.ensure_future(run_long())
        await asyncio.sleep(1.0)  # the long request is decoding
    res = await asyncio.gather(*(one(c, srv, m, short_tokens) for m in shorts))
    if long_task is not None:
        long_info["still_running_when_shorts_done"] = not long_task.done()
        await long_task
    await c.close()
    lat = sorted(t for t, _ in res)
    return {"p50_s": statistics.median(lat), "max_s": lat[-1], "long": long_info or None}


async def ttft(srv: Server, reqs: list[list[dict[str, str]]], max_tokens: int) -> dict[str, Any]:
    """Time to the first content chunk of streamed requests, one at a time."""
    c = client(srv)
    out = []
    for m in reqs:
        t0 = time.perf_counter()
        first = None
        stream = await c.chat.completions.create(model=srv.model, messages=m, max_tokens=max_tokens, temperature=0.0,
                                                 stream=True)
        async for ch in stream:
            if first is None and ch.choices and ch.choices[0].delta.content:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        out.append((first if first is not None else total, total))
    await c.close()
    return {"p50_ttft_s": statistics.median(f for f, _ in out), "p50_total_s": statistics.median(t for _, t in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16, help="requests per throughput run at concurrency 8 "
                                                             "(twice as many at 32)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--short-tokens", type=int, default=16)
    ap.add_argument("--long-n", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=128)
    ap.add_argument("--ttft-requests", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32",
                    help="both engines' dtype (float32: CPUs without AVX-512 emulate bfloat16 several times slower)")
    ap.add_argument("--threads", type=int, default=None,
                    help="give both engines this many unbound compute threads (VLLM_CPU_OMP_THREADS_BIND=nobind, "
                         "OMP_NUM_THREADS; budgetlm: cpu_threads); default: each server's own defaults")
    ap.add_argument("--out", default="benchmarks/results/serve_vs_vllm.json")
    args = ap.parse_args()

    from budgetlm.versions import library_versions

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: stop the servers on the way out

    venv_bin = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="serve_vs_vllm-"))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    pv, pb = free_port(), free_port()
    vllm_cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
                "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(pv), "--enforce-eager",
                "--max-model-len", "2048", "--gpu-memory-utilization", "0.3", "--dtype", args.dtype]
    spec = f"vllm:default?dtype={args.dtype}"
    if args.threads is not None:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(args.threads))
        spec += f"&cpu_threads={args.threads}"
    blm_cmd = [str(venv_bin / "budgetlm"), "serve", "--backend", spec, "--port", str(pb),
               "--db", str(tmp / "server.sqlite"), "--log-level", "warning"]
    t_start = time.monotonic()
    loads: list[float] = []  # 1-minute load average before warm-up and each round (other jobs on the machine)
    vllm_srv = Server("vllm", vllm_cmd, pv, "smollm2", env, tmp / "vllm.log")
    ready_v = vllm_srv.wait_ready()
    blm_srv = Server("budgetlm", blm_cmd, pb, "budgetlm/sample", env, tmp / "budgetlm.log")
    servers = [vllm_srv, blm_srv]
    try:
        ready_b = blm_srv.wait_ready()
        print(f"vllm ready in {ready_v:.0f} s, budgetlm in {ready_b:.0f} s", flush=True)
        reqs8, reqs32 = prompts(args.requests, args.seed), prompts(2 * args.requests, args.seed + 1)
        shorts = [[{"role": "user", "content": f"What is {a} + {a + 3}? Answer briefly."}] for a in range(11, 19)]
        ttft_reqs = prompts(args.ttft_requests, args.seed + 2)

        async def warm() -> None:
            for s in servers:
                await load(s, prompts(8, 99), 8, 16)

        asyncio.run(warm())
        runs: dict[str, dict[str, list[Any]]] = {s.name: {} for s in servers}
        loads.append(os.getloadavg()[0])

        def record(name: str, key: str, value: Any) -> None:
            runs[name].setdefault(key, []).append(value)

        for rnd in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = servers if rnd % 2 == 0 else servers[::-1]
            for conc, reqs in ((8, reqs8), (32, reqs32)):
                for s in order:
                    r = asyncio.run(load(s, reqs, conc, args.max_tokens))
                    record(s.name, f"load_c{conc}", r)
                    print(f"round {rnd} c={conc:2d} {s.name:8s} {r['tokens_per_s']:7.1f} tok/s  p50 {r['p50_s']:.2f} s"
                          f"  ({r['completion_tokens']} tokens, {r['wall_s']:.1f} s)", flush=True)
            for s in order:
                alone = asyncio.run(short_beside_long(s, shorts, args.short_tokens, args.long_n, args.long_tokens, False))
                beside = asyncio.run(short_beside_long(s, shorts, args.short_tokens, args.long_n, args.long_tokens, True))
                record(s.name, "short_alone", alone)
                record(s.name, "short_beside_long", beside)
                print(f"round {rnd} short {s.name:8s} alone p50 {alone['p50_s']:.2f} s, beside long p50 "
                      f"{beside['p50_s']:.2f} s (long: {beside['long']})", flush=True)
            for s in order:
                t = asyncio.run(ttft(s, ttft_reqs, args.max_tokens))
                record(s.name, "ttft", t)
                print(f"round {rnd} ttft  {s.name:8s} p50 {t['p50_ttft_s'] * 1000:.0f} ms (whole answer "
                      f"{t['p50_total_s']:.2f} s)", flush=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def agg(name: str, key: str, field: str, how: Any = statistics.median) -> float:
        return float(how([r[field] for r in runs[name][key]]))

    def tput(name: str, key: str) -> float:  # tokens over wall time, summed over rounds
        return sum(r["completion_tokens"] for r in runs[name][key]) / sum(r["wall_s"] for r in runs[name][key])

    summary: dict[str, Any] = {}
    rows = []
    for conc in (8, 32):
        k = f"load_c{conc}"
        tv, tb = tput("vllm", k), tput("budgetlm", k)
        lv, lb = agg("vllm", k, "p50_s"), agg("budgetlm", k, "p50_s")
        summary[f"c{conc}"] = {"vllm_tokens_per_s": tv, "budgetlm_tokens_per_s": tb, "throughput_ratio": tb / tv,
                               "vllm_p50_s": lv, "budgetlm_p50_s": lb, "p50_ratio": lb / lv}
        rows.append((f"throughput c={conc} (tok/s)", tv, tb, tb / tv, ">= 0.95"))
        rows.append((f"p50 latency c={conc} (s)", lv, lb, lb / lv, "<= 1.1"))
    sbl = {}
    for name in ("vllm", "budgetlm"):
        alone, beside = agg(name, "short_alone", "p50_s"), agg(name, "short_beside_long", "p50_s")
        sbl[name] = {"alone_p50_s": alone, "beside_long_p50_s": beside, "ratio": beside / alone}
    summary["short_beside_long"] = sbl
    rows.append(("short beside long / alone (own ratio)", sbl["vllm"]["ratio"], sbl["budgetlm"]["ratio"],
                 sbl["budgetlm"]["ratio"], "<= 1.3"))
    fv, fb = agg("vllm", "ttft", "p50_ttft_s"), agg("budgetlm", "ttft", "p50_ttft_s")
    summary["ttft"] = {"vllm_p50_s": fv, "budgetlm_p50_s": fb, "ratio": fb / fv}
    rows.append(("streamed TTFT p50 (ms)", fv * 1000, fb * 1000, fb / fv, "<= 1.5"))

    print()
    print(f"{'measure':40s} {'vllm':>10s} {'budgetlm':>10s} {'ratio':>7s}  target")
    for label, v, b, ratio, target in rows:
        print(f"{label:40s} {v:10.2f} {b:10.2f} {ratio:7.2f}  {target}")
    out = {
        "benchmark": "serve_vs_vllm",
        "versions": library_versions(),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform, "load_average_1m": loads + [os.getloadavg()[0]]},
        "config": {"model": str(MODEL_DIR), "rounds": args.rounds, "requests_c8": args.requests,
                   "requests_c32": 2 * args.requests, "max_tokens": args.max_tokens, "temperature": 0.0,
                   "short_requests": len(shorts), "short_max_tokens": args.short_tokens,
                   "long": {"budgetlm": "budgetlm/majority", "vllm": "one request with n", "n": args.long_n,
                            "max_tokens": args.long_tokens, "temperature": 0.7},
                   "ttft_requests": args.ttft_requests, "vllm_cmd": vllm_cmd[1:], "budgetlm_cmd": blm_cmd[1:],
                   "threads": args.threads, "dtype": args.dtype,
                   "env": {k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")
                           if k in env}},
        "seeds": {"prompts": args.seed, "sampling": "greedy (temperature 0) except the long vote (unseeded, "
                                                    "temperature 0.7)"},
        "summary": summary,
        "runs": runs,
        "wall_s": time.monotonic() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"machine load average (1 min) during the run: {', '.join(f'{x:.1f}' for x in out['machine']['load_average_1m'])} "
          f"on {os.cpu_count()} cores")
    print(f"\nwrote {args.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
