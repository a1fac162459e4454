"""Strategies IV benchmark: ``hyper`` (HyPER) vs ``majority@8`` and ``adaptive`` at equal output-token budgets.

Runs ``benchmarks/hyper.yaml`` (the sampling-frontier suites) through the evaluation runner (resumable:
re-running continues), then writes ``benchmarks/results/hyper_summary.json`` and ``.md``: per configuration
accuracy with a 95% bootstrap interval, mean output / sequential tokens, records over budget, per-suite
figures, hyper's controller figures (pool sizes, expansions, drops, refinements, aborted steps and the
tokens their aborts saved), library versions and seeds, and the target check: hyper reaches majority@8's
accuracy with at most 75% of its mean output tokens (``met`` needs hyper's accuracy >= majority@8's;
``within CI`` relaxes that to majority@8's 95% interval).

Usage::

    .venv/bin/python benchmarks/hyper.py [--out runs/hyper] [--limit 30]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
TOKEN_SHARE = 0.75
"""The target: hyper's mean output tokens at most this share of majority@8's."""


def bootstrap(xs: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    import numpy as np

    if not xs:
        return 0.0, 0.0
    a = np.asarray(xs, dtype=float)
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(reps, len(a)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarise(recs: list[Any]) -> dict[str, Any]:
    acc = [float(r.correct) for r in recs]
    lo, hi = bootstrap(acc)
    n = len(recs) or 1
    return {"n": len(recs), "accuracy": sum(acc) / n, "accuracy_ci_low": lo, "accuracy_ci_high": hi,
            "mean_output_tokens": sum(r.output_tokens for r in recs) / n,
            "mean_sequential_tokens": sum(r.sequential_tokens for r in recs) / n,
            "mean_model_calls": sum(r.model_calls for r in recs) / n,
            "over_budget": sum(1 for r in recs if r.over_budget), "errors": sum(1 for r in recs if r.error)}


def controller(recs: list[Any]) -> dict[str, Any]:
    n = len(recs) or 1
    d = [r.details for r in recs]
    out = {k: sum(x.get(k, 0) for x in d) / n for k in
           ("paths", "expansions", "drops", "refinements", "aborted_steps", "tokens_saved_by_abort")}
    out["mean_max_pool"] = sum(x.get("max_pool", 0) for x in d) / n
    out["stop_reasons"] = dict(sorted(_count(r.stop_reason.split(":")[0] for r in recs).items()))
    return out


def _count(xs: Any) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for x in xs:
        c[x] += 1
    return dict(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "hyper.yaml"))
    ap.add_argument("--out", default="runs/hyper")
    ap.add_argument("--limit", type=int, default=30, help="items per suite (default 30: about 30 minutes on a loaded 2-core CPU)")
    ap.add_argument("--json", default=str(HERE / "results" / "hyper_summary.json"))
    args = ap.parse_args()

    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.rundir import RunDir
    from budgetlm.evals.runner import run_eval
    from budgetlm.versions import library_versions

    cfg = EvalConfig.load(args.config)
    if args.limit:
        cfg = cfg.model_copy(update={"limit": args.limit})
    t0 = time.perf_counter()
    run_eval(cfg, args.out, report=False)
    wall = time.perf_counter() - t0
    recs = RunDir(Path(args.out)).read_records()
    groups: dict[tuple[str, float], list[Any]] = defaultdict(list)
    for r in recs:
        groups[(r.strategy, r.budget.get("output_tokens", 0.0))].append(r)
    configs = []
    for (label, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        row: dict[str, Any] = {"label": label, "budget_output_tokens": budget, "params": rs[0].params,
                               **summarise(rs)}
        row["per_suite"] = {s.split("?")[0]: summarise([r for r in rs if r.suite == s])
                            for s in sorted({r.suite for r in rs})}
        if rs[0].details.get("pool_trace") is not None:
            row["controller"] = controller(rs)
        configs.append(row)
    maj = next((c for c in configs if c["label"] == "majority@8"), None)
    checks = []
    for c in configs:
        if not c["label"].startswith("hyper") or maj is None:
            continue
        share = c["mean_output_tokens"] / maj["mean_output_tokens"]
        checks.append({"config": f"{c['label']} @ {c['budget_output_tokens']:g}", "accuracy": c["accuracy"],
                       "majority8_accuracy": maj["accuracy"],
                       "majority8_ci": [maj["accuracy_ci_low"], maj["accuracy_ci_high"]], "token_share": share,
                       "met": c["accuracy"] >= maj["accuracy"] and share <= TOKEN_SHARE,
                       "within_ci": c["accuracy"] >= maj["accuracy_ci_low"] and share <= TOKEN_SHARE})
    summary = {"benchmark": "hyper", "config": cfg.model_dump(mode="json"), "limit_per_suite": args.limit,
               "items": len({(r.suite, r.item_id) for r in recs}), "engine_seed": cfg.seed,
               "sampling_seed": "unseeded (seed: null in every strategy; the engine seed is the run's seed)",
               "wall_seconds": round(wall, 1), "configs": configs, "target": {
                   "rule": f"hyper accuracy >= majority@8's with <= {TOKEN_SHARE:.0%} of its mean output tokens",
                   "checks": checks}, "versions": library_versions()}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(s: dict[str, Any]) -> str:
    lines = [f"# hyper vs majority@8 and adaptive ({s['items']} items, {s['limit_per_suite']} per suite)", "",
             "| config | budget | n | accuracy [95% CI] | mean output tokens | mean sequential tokens | over budget |",
             "|---|---|---|---|---|---|---|"]
    for c in s["configs"]:
        lines.append(f"| {c['label']} | {c['budget_output_tokens']:g} | {c['n']} | {c['accuracy']:.3f} "
                     f"[{c['accuracy_ci_low']:.3f}, {c['accuracy_ci_high']:.3f}] | {c['mean_output_tokens']:.1f} | "
                     f"{c['mean_sequential_tokens']:.1f} | {c['over_budget']} |")
    lines += ["", "Per suite (accuracy / mean output tokens):", "", "| config | budget | suite | n | accuracy | tokens |",
              "|---|---|---|---|---|---|"]
    for c in s["configs"]:
        for suite, x in c["per_suite"].items():
            lines.append(f"| {c['label']} | {c['budget_output_tokens']:g} | {suite} | {x['n']} | {x['accuracy']:.3f} | "
                         f"{x['mean_output_tokens']:.1f} |")
    lines += ["", "Controller (per problem, means):", "",
              "| config | budget | paths | max pool | expansions | drops | refinements | aborted steps | "
              "tokens saved by abort | stop reasons |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in s["configs"]:
        k = c.get("controller")
        if k:
            lines.append(f"| {c['label']} | {c['budget_output_tokens']:g} | {k['paths']:.2f} | {k['mean_max_pool']:.2f} | "
                         f"{k['expansions']:.2f} | {k['drops']:.2f} | {k['refinements']:.2f} | {k['aborted_steps']:.2f} | "
                         f"{k['tokens_saved_by_abort']:.1f} | {k['stop_reasons']} |")
    lines += ["", f"Target: {s['target']['rule']}", ""]
    for t in s["target"]["checks"]:
        lines.append(f"- {t['config']}: accuracy {t['accuracy']:.3f} vs majority@8 {t['majority8_accuracy']:.3f} "
                     f"[CI {t['majority8_ci'][0]:.3f}-{t['majority8_ci'][1]:.3f}] with {t['token_share']:.0%} of its "
                     f"tokens: {'met' if t['met'] else 'NOT met'} (within CI: {'yes' if t['within_ci'] else 'no'})")
    v = s["versions"]
    lines += ["", f"Wall time {s['wall_seconds']:.0f} s; engine seed {s['engine_seed']}; sampling {s['sampling_seed']}.",
              "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict) else str(v), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
