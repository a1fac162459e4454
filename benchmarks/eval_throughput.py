"""The evaluation runner's throughput against one raw ``vllm.LLM.generate`` call per budget.

One engine (built through :class:`~budgetlm.backends.vllm.VLLMBackend` on the default model) runs a
fixed grid — ``--items`` reasoning-gym ``chain_sum`` items × the budgets in ``--budgets`` with greedy
plain sampling — two ways, interleaved after a warm-up:

* **raw**: for each budget, one ``llm.generate`` over the pre-tokenised chat prompts with
  ``vllm.SamplingParams(temperature=0, max_tokens=budget)``;
* **runner**: ``budgetlm.evals.runner.Runner`` on the same grid into a fresh folder: suite building,
  strategy, metering, grading, and one fsynced record per (item, budget) included (no report).

Greedy decoding makes both generate the same tokens, so the ratio of generated tokens/s is the
runner's overhead.  It also reports the time spent writing records (write + flush + fsync).

Usage::

    .venv/bin/python benchmarks/eval_throughput.py [--items 128 --budgets 64,128 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="engine dtype (float32 is 3-4x faster than bf16 on CPUs without AVX-512)")
    ap.add_argument("--budgets", default="64,128")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = ap.parse_args()

    import vllm

    from budgetlm.backends.vllm import VLLMBackend
    from budgetlm.evals import runner as runner_mod
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.rundir import RunDir
    from budgetlm.evals.suites import get as get_suite
    from budgetlm.versions import library_versions

    budgets = [int(b) for b in args.budgets.split(",")]
    suite_spec = (f"reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1"
                  f"&size={args.items}&seed={args.seed}")
    backend = VLLMBackend(model="default", seed=args.seed, dtype=args.dtype)
    llm = backend.llm
    items = get_suite(suite_spec).items()
    prompts = [{"prompt_token_ids": backend.render(backend_request(it.messages))[1]} for it in items]

    def raw() -> tuple[float, int]:
        t0 = time.perf_counter()
        tokens = 0
        for b in budgets:
            outs = llm.generate(prompts, vllm.SamplingParams(temperature=0.0, max_tokens=b), use_tqdm=False)
            tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        return time.perf_counter() - t0, tokens

    write_time = [0.0]
    orig_write = runner_mod.RecordWriter.write

    def timed_write(self: Any, record: Any) -> None:
        t = time.perf_counter()
        orig_write(self, record)
        write_time[0] += time.perf_counter() - t

    runner_mod.RecordWriter.write = timed_write  # type: ignore[method-assign]
    cfg = EvalConfig(name="throughput", suites=[suite_spec], models=["default"],
                     strategies=[{"name": "sample", "params": {"temperature": 0.0}}],
                     budgets=[{"output_tokens": b} for b in budgets], seed=args.seed, batch_size=args.items)

    def run_grid() -> tuple[float, int, int, float]:
        write_time[0] = 0.0
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            runner_mod.Runner(cfg, Path(d) / "run", backends={"default": backend}, progress=False, report=False).run()
            wall = time.perf_counter() - t0
            recs = RunDir(Path(d) / "run").read_records()
        return wall, sum(r.output_tokens for r in recs), len(recs), write_time[0]

    raw()  # warm-up (prefix cache and allocator in the same state for both)
    run_grid()
    raws, grids = [], []
    for _ in range(args.repeats):
        raws.append(raw())
        grids.append(run_grid())
    raw_tps = [t / w for w, t in raws]
    grid_tps = [t / w for w, t, _, _ in grids]
    n_records = grids[0][2]
    write_s = statistics.mean(g[3] for g in grids)
    result = {
        "items": args.items, "budgets": budgets, "dtype": args.dtype, "repeats": args.repeats, "seed": args.seed,
        "raw_tokens": raws[-1][1], "runner_tokens": grids[-1][1],
        "raw_tokens_per_s": statistics.mean(raw_tps), "runner_tokens_per_s": statistics.mean(grid_tps),
        "throughput_ratio": statistics.mean(grid_tps) / statistics.mean(raw_tps),
        "records": n_records, "record_write_s": write_s, "record_write_ms_each": 1000 * write_s / n_records,
        "record_write_share": write_s / statistics.mean(g[0] for g in grids),
        "versions": library_versions(),
    }
    backend.close()
    print(f"grid: {args.items} chain_sum items x budgets {budgets}, greedy, default model, {args.repeats} repeats")
    print(f"raw vLLM generate : {result['raw_tokens_per_s']:8.1f} tok/s ({result['raw_tokens']} tokens)")
    print(f"budgetlm runner   : {result['runner_tokens_per_s']:8.1f} tok/s ({result['runner_tokens']} tokens)")
    print(f"throughput ratio runner/raw: {result['throughput_ratio']:.3f} (target >= 0.9)")
    print(f"record writing: {result['record_write_ms_each']:.2f} ms per record (fsync), "
          f"{100 * result['record_write_share']:.2f}% of the runner's time")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


def backend_request(messages: list[dict[str, str]]) -> Any:
    from budgetlm.backends import GenerationRequest

    return GenerationRequest(messages=messages)



if __name__ == "__main__":
    main()
