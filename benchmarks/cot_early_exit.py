"""Strategies IV, part 3: ``cot`` with certainty-probe early exit vs without, at output budgets 256 and 512.

Runs ``benchmarks/cot_early_exit.yaml`` through the evaluation runner (resumable) with ``--limit``
items per suite and prints, per budget, accuracy with a 95% bootstrap interval, mean output tokens
(probes included), mean probe tokens, the exit rate and the tokens saved by early exit; the target
(issue "Strategies IV") is >= 30% fewer output tokens at equal accuracy (early exit's accuracy inside
plain cot's interval).  Writes ``benchmarks/results/cot_early_exit_summary.json`` and ``.md``.

Usage::

    .venv/bin/python benchmarks/cot_early_exit.py [--out runs/cot_early_exit] [--limit 15]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

HERE = Path(__file__).parent
BOOT = 2000
BOOT_SEED = 0


def _ci(xs: list[float], seed: int = BOOT_SEED) -> tuple[float, float]:
    if not xs:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(sum(xs[rng.randrange(n)] for _ in range(n)) / n for _ in range(BOOT))
    return means[int(0.025 * BOOT)], means[int(0.975 * BOOT) - 1]


def _paired_diff_ci(a: list[float], b: list[float], seed: int = BOOT_SEED) -> tuple[float, float]:
    """95% bootstrap interval of mean(b - a) over paired items."""
    return _ci([y - x for x, y in zip(a, b, strict=True)], seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "cot_early_exit.yaml"))
    ap.add_argument("--out", default="runs/cot_early_exit")
    ap.add_argument("--limit", type=int, default=15, help="items per suite")
    ap.add_argument("--results", default=str(HERE / "results" / "cot_early_exit_summary"))
    ap.add_argument("--summarize-only", action="store_true", help="summarise the records in --out without running")
    ap.add_argument("--labels", default="", help="run only these strategy labels (comma-separated)")
    ap.add_argument("--include", action="append", default=[], help="also summarise the records of this run folder")
    args = ap.parse_args()

    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.rundir import RunDir
    from budgetlm.evals.runner import run_eval
    from budgetlm.versions import library_versions

    cfg = EvalConfig.load(args.config).model_copy(update={"limit": args.limit})
    if args.labels:
        keep = set(args.labels.split(","))
        cfg = cfg.model_copy(update={"strategies": [s for s in cfg.strategies if s.label in keep]})
    t0 = time.perf_counter()
    if not args.summarize_only:
        run_eval(cfg, args.out, report=False)
    wall = time.perf_counter() - t0
    recs = [r for d in (args.out, *args.include) for r in RunDir(Path(d)).read_records() if r.error is None]
    limits = {args.out: args.limit}
    for d in args.include:
        meta = RunDir(d).read_meta() or {}
        limits[d] = meta.get("config", {}).get("limit")
    by: dict[tuple[str, int], dict[tuple[str, str], object]] = {}
    for r in recs:
        by.setdefault((r.strategy, int(r.budget.get("output_tokens", 0))), {})[(r.suite, r.item_id)] = r
    rows = []
    for (strat, budget), cell in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rs = list(cell.values())
        acc = [float(r.correct) for r in rs]
        row = {
            "strategy": strat, "budget": budget, "n": len(rs),
            "accuracy": sum(acc) / len(rs), "accuracy_ci95": _ci(acc),
            "mean_output_tokens": sum(r.output_tokens for r in rs) / len(rs),
            "mean_probe_tokens": sum(r.probe_tokens for r in rs) / len(rs),
            "mean_reasoning_tokens": sum(r.details.get("thinking_tokens_used", 0) for r in rs) / len(rs)
            if strat.endswith("+exit") else None,
            "exit_rate": sum(r.details.get("exited_at") is not None for r in rs) / len(rs),
            "mean_probes": sum(r.details.get("probes", 0) for r in rs) / len(rs),
            "over_budget": sum(r.over_budget or r.output_tokens > budget for r in rs),
        }
        rows.append(row)
    checks = []
    for (label, budget) in sorted(by, key=lambda k: (k[1], k[0])):
        base, ee = by[(label, budget)], by.get((label + "+exit", budget))
        if not ee:
            continue
        keys = sorted(set(base) & set(ee))
        a = [float(base[k].correct) for k in keys]  # type: ignore[attr-defined]
        b = [float(ee[k].correct) for k in keys]  # type: ignore[attr-defined]
        out_a = sum(base[k].output_tokens for k in keys) / len(keys)  # type: ignore[attr-defined]
        out_b = sum(ee[k].output_tokens for k in keys) / len(keys)  # type: ignore[attr-defined]
        lo, hi = _ci(a)
        acc_b = sum(b) / len(b)
        saved = 1 - out_b / out_a if out_a else 0.0
        checks.append({
            "pair": f"{label} vs {label}+exit", "budget": budget, "n": len(keys), "cot_accuracy": sum(a) / len(a), "cot_accuracy_ci95": (lo, hi),
            "exit_accuracy": acc_b, "accuracy_diff_ci95": _paired_diff_ci(a, b),
            "cot_mean_output_tokens": out_a, "exit_mean_output_tokens": out_b, "tokens_saved": saved,
            "equal_accuracy": lo <= acc_b <= hi, "target_met": lo <= acc_b <= hi and saved >= 0.30,
        })
    summary = {"benchmark": "cot_early_exit", "config": cfg.model_dump(mode="json"), "limit": args.limit,
               "run_folders": limits,
               "seed": cfg.seed, "bootstrap": {"resamples": BOOT, "seed": BOOT_SEED}, "wall_seconds": wall,
               "versions": library_versions(), "rows": rows, "checks": checks}
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = ["| strategy | budget | n | accuracy (95% CI) | mean output tok | mean probe tok | exit rate | probes |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        lines.append(f"| {r['strategy']} | {r['budget']} | {r['n']} | {r['accuracy']:.3f} ({lo:.3f}–{hi:.3f}) | "
                     f"{r['mean_output_tokens']:.1f} | {r['mean_probe_tokens']:.1f} | {r['exit_rate']:.2f} | "
                     f"{r['mean_probes']:.2f} |")
    lines.append("")
    for c in checks:
        lo, hi = c["accuracy_diff_ci95"]
        lines.append(f"- {c['pair']}, budget {c['budget']}: tokens saved {c['tokens_saved']:.1%} "
                     f"({c['cot_mean_output_tokens']:.1f} → {c['exit_mean_output_tokens']:.1f}); accuracy "
                     f"{c['cot_accuracy']:.3f} → {c['exit_accuracy']:.3f} (paired difference 95% CI {lo:+.3f}..{hi:+.3f}); "
                     f"target (≥ 30% saved at equal accuracy): {'met' if c['target_met'] else 'NOT met'}")
    text = "\n".join(lines) + "\n"
    res.with_suffix(".md").write_text(f"# cot early exit (limit {args.limit} per suite, seed {cfg.seed})\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
