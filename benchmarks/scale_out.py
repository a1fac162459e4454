"""Scale-out: one eval grid over 1 vs 2 vLLM OpenAI servers, and failover when one is SIGKILLed mid-run.

Two real vLLM servers (``python -m vllm.entrypoints.openai.api_server``, the default model, float32,
``--threads`` compute threads each, default 1) run on 127.0.0.1.  budgetlm's OpenAI backend drives an
eval grid (``reasoning_gym:chain_sum``, ``sample`` greedy and ``majority`` n=3, ``--items`` items,
``batch_size`` 8) through :class:`~budgetlm.backends.pool.ServerPool`:

1. **records/s, 1 vs 2 servers**: the same grid over server A alone and over A and B, alternated
   round by round (the first arm swaps each round), each run into a fresh folder.  On a 2-core machine
   the two servers share the same two cores, so expect little gain: the ratio is published as measured.
2. **failover**: the grid over A and B with B killed (SIGKILL, its whole process group) after
   ``--kill-after`` records.  Counted from the run folder: records lost (expected minus present),
   duplicated (keys written twice), errored, charged twice (a majority record whose output tokens differ
   from the sum of its samples' tokens, or any record over its budget) — all must be 0 — the requests
   that moved (retried before their first token or continued after it), and the extra latency of the
   affected items (median item latency of items whose calls moved, minus that of the others).
3. **back up**: B restarted on its port; a short run on the same backend object shows B probed back
   and taking requests again.

Results (with library versions and the configuration) go to ``benchmarks/results/scale_out.json``.

Usage::

    .venv/bin/python benchmarks/scale_out.py [--rounds 2 --items 16 --threads 1]

The defaults finish in about 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from serve_vs_vllm import MODEL_DIR, Server, free_port  # noqa: E402

MODEL = "smollm2"


def start(name: str, port: int, args: argparse.Namespace, tmp: Path) -> Server:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR),
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--max-model-len", "2048", "--seed", "0", "--dtype", "float32"]
    return Server(name, cmd, port, MODEL, env, tmp / f"{name}-{int(time.time())}.log")


def config(urls: list[str], args: argparse.Namespace) -> Any:
    from budgetlm.evals.config import EvalConfig

    suite = (f"reasoning_gym:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2&size={args.items}"
             f"&seed={args.seed}")
    return EvalConfig(name="scale-out", suites=[suite], models=[spec(urls)], seed=args.seed, batch_size=8,
                      strategies=[{"name": "sample", "params": {"temperature": 0.0}},
                                  {"name": "majority", "params": {"n": 3, "temperature": 0.8}}],
                      budgets=[{"output_tokens": args.max_tokens}])


def spec(urls: list[str]) -> str:
    return f"openai:{','.join(urls)}#{MODEL}"


def backend(urls: list[str]) -> Any:
    from budgetlm.backends.openai import OpenAIBackend

    return OpenAIBackend(urls, MODEL, tokenizer="default", send_seed=False, timeout=120, max_retries=3,
                         backoff=0.2, probe_interval=0.5, max_probe_interval=2.0)


def run(urls: list[str], out: Path, args: argparse.Namespace, be: Any = None, on_record: Any = None,
        cfg: Any = None) -> tuple[float, Any]:
    from budgetlm.evals.runner import Runner

    cfg = cfg or config(urls, args)
    be = be or backend(urls)
    t0 = time.perf_counter()
    res = Runner(cfg, out, backends={spec(urls): be}, progress=False, report=False, on_batch=on_record).run()
    return time.perf_counter() - t0, res


def audit(out: Path, expected: int, max_tokens: int) -> dict[str, Any]:
    """Lost, duplicated, errored and double-charged records of a run folder, and the moved requests' latency."""
    from budgetlm.evals.rundir import RunDir

    every = RunDir(out).read_records(latest=False)
    keys = [r.key for r in every]
    traces = {(t["suite"], t["item_id"], t["config_id"]): t.get("trace") or [] for t in RunDir(out).read_traces()}
    twice = 0
    for r in every:
        if r.over_budget or r.output_tokens > max_tokens * (3 if r.strategy == "majority" else 1):
            twice += 1
        elif r.strategy == "majority" and r.error is None:
            if r.output_tokens != sum(s["tokens"] for s in traces.get(r.key, []) if "tokens" in s):
                twice += 1
    moved = [r for r in every if (s := r.details.get("servers", {})) and (s.get("retries") or s.get("failovers"))]
    others = [r for r in every if r not in moved and r.error is None]

    def med(rs: list[Any]) -> float | None:
        return round(statistics.median(r.wall_seconds for r in rs), 3) if rs else None

    extra = None
    if moved and others:
        extra = {strat: round(m - o, 3) for strat in ("sample", "majority")
                 if (m := med([r for r in moved if r.strategy == strat])) is not None
                 and (o := med([r for r in others if r.strategy == strat])) is not None}
    return {
        "records_expected": expected, "records_present": len(set(keys)),
        "records_lost": expected - len(set(keys)), "records_duplicated": len(keys) - len(set(keys)),
        "records_errored": sum(r.error is not None for r in every), "records_charged_twice": twice,
        "items_with_moved_requests": len(moved),
        "requests_retried": sum(r.details["servers"].get("retries", 0) for r in moved),
        "streams_continued": sum(r.details["servers"].get("failovers", 0) for r in moved),
        "median_item_latency_s": {"moved": med(moved), "others": med(others)},
        "extra_latency_of_moved_items_s": extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per vLLM server")
    ap.add_argument("--kill-after", type=int, default=6, help="records written before server B is killed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/scale_out.json")
    args = ap.parse_args()

    from budgetlm.versions import library_versions

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="scale_out-"))
    pa, pb = free_port(), free_port()
    a, b = start("A", pa, args, tmp), start("B", pb, args, tmp)
    servers = [a, b]
    try:
        ready = [round(s.wait_ready(), 1) for s in servers]
        print(f"servers ready in {ready} s", flush=True)
        ua, ub = a.url + "/v1", b.url + "/v1"
        expected = 2 * args.items
        run([ua, ub], tmp / "warm", args)  # warm both servers (and the prefix caches of the shared prompts)
        rates: dict[str, list[float]] = {"1 server": [], "2 servers": []}
        for rnd in range(args.rounds):
            arms = [("1 server", [ua]), ("2 servers", [ua, ub])]
            for name, urls in arms if rnd % 2 == 0 else arms[::-1]:
                wall, res = run(urls, tmp / f"r{rnd}-{len(urls)}", args)
                assert res.written == expected and not res.errors, res.errors
                rates[name].append(expected / wall)
                print(f"round {rnd}: {name}: {expected / wall:.2f} records/s", flush=True)
        mean = {k: statistics.mean(v) for k, v in rates.items()}

        # failover: B killed after --kill-after records
        killed: list[float] = []

        def on_record(written: int) -> None:
            if written >= args.kill_after and not killed:
                killed.append(time.monotonic())
                os.killpg(b.proc.pid, signal.SIGKILL)
                b.proc.wait(timeout=30)

        be = backend([ua, ub])
        wall, res = run([ua, ub], tmp / "failover", args, be=be, on_record=on_record)
        fail = audit(tmp / "failover", expected, args.max_tokens)
        fail["wall_s"] = round(wall, 2)
        fail["servers"] = [s.__dict__ for s in be.pool.snapshot()]
        print(json.dumps({k: v for k, v in fail.items() if k != "servers"}, indent=1), flush=True)

        # back up: B restarted on its port is probed back and used again
        b2 = start("B", pb, args, tmp)
        servers.append(b2)
        b2.wait_ready()
        before = be.pool.snapshot()[1].requests
        from budgetlm.backends.base import SamplingParams

        t0 = time.monotonic()
        while not be.pool.snapshot()[1].up and time.monotonic() - t0 < 30:
            be.generate(["ping"], sampling=SamplingParams(max_tokens=1))
            time.sleep(0.5)
        back_after = round(time.monotonic() - t0, 2)
        small = argparse.Namespace(**{**vars(args), "items": 8})
        run([ua, ub], tmp / "back", small, be=be)
        after = be.pool.snapshot()[1].requests
        back = {"probed_up_after_s": back_after, "requests_to_restarted_server": after - before,
                "requests_total_in_run": sum(s.requests for s in be.pool.snapshot()) - sum(
                    s.requests for s in fail_servers(fail))}
        print(f"back up: {back}", flush=True)
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception:  # noqa: BLE001 - a killed server has nothing left to stop
                pass

    result = {
        "benchmark": "scale_out", "config": vars(args), "versions": library_versions(),
        "machine": {"cpus": os.cpu_count()},
        "records_per_s": {k: [round(x, 3) for x in v] for k, v in rates.items()},
        "records_per_s_mean": {k: round(v, 3) for k, v in mean.items()},
        "ratio_2_over_1": round(mean["2 servers"] / mean["1 server"], 3),
        "failover": fail, "back_up": back,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nrecords/s: 1 server {mean['1 server']:.2f}, 2 servers {mean['2 servers']:.2f} "
          f"(ratio {result['ratio_2_over_1']:.2f}x)")
    print(f"failover: lost {fail['records_lost']}, duplicated {fail['records_duplicated']}, errored "
          f"{fail['records_errored']}, charged twice {fail['records_charged_twice']}; "
          f"{fail['requests_retried']} retried, {fail['streams_continued']} continued; extra latency of "
          f"moved items {fail['extra_latency_of_moved_items_s']} s")
    print(f"wrote {args.out}")


def fail_servers(fail: dict[str, Any]) -> list[Any]:
    from types import SimpleNamespace

    return [SimpleNamespace(**s) for s in fail["servers"]]


if __name__ == "__main__":
    main()
