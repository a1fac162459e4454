"""Strategies IV benchmark: DeepConf online/offline vs majority@8 and adaptive at equal output-token budgets.

Runs ``benchmarks/deepconf.yaml`` through the evaluation runner (resumable: re-running continues), writes the
report, prints one row per configuration (accuracy with its 95 % bootstrap interval, mean output tokens), the
target check (DeepConf online reaches majority@8's accuracy, inside majority@8's interval, with at most 50 % of
its mean output tokens) and DeepConf's in-flight savings (traces stopped for low confidence, traces cancelled
at consensus, and the tokens those stops saved), and writes ``benchmarks/results/deepconf_summary.json``/``.md``.

Usage::

    .venv/bin/python benchmarks/deepconf.py [--out runs/deepconf] [--limit 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "deepconf.yaml"))
    ap.add_argument("--out", default="runs/deepconf")
    ap.add_argument("--limit", type=int, default=20, help="items per suite")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()

    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.report import write_report
    from budgetlm.evals.rundir import RunDir
    from budgetlm.evals.runner import run_eval
    from budgetlm.io import read_json
    from budgetlm.versions import library_versions

    cfg = EvalConfig.load(args.config).model_copy(update={"limit": args.limit})
    t0 = time.time()
    run_eval(cfg, args.out, report=False)
    wall = time.time() - t0
    report = write_report([Path(args.out)], Path(args.out) / "report").parent
    summary = read_json(RunDir(report).summary_json)
    rows = {c["strategy"]: {"n": c["n"], "accuracy": c["accuracy"], "ci": [c["accuracy_ci_low"], c["accuracy_ci_high"]],
                            "mean_output_tokens": c["mean_output_tokens"],
                            "mean_sequential_tokens": c["mean_sequential_tokens"],
                            "over_budget_rate": c["over_budget_rate"]} for c in summary["configs"]}
    print(f"{'strategy':18} {'n':>4} {'accuracy':>8} {'95% CI':>13} {'out tok':>8} {'seq tok':>8}")
    for s, r in sorted(rows.items()):
        print(f"{s:18} {r['n']:>4} {r['accuracy']:8.3f} {r['ci'][0]:6.3f}-{r['ci'][1]:6.3f} "
              f"{r['mean_output_tokens']:8.1f} {r['mean_sequential_tokens']:8.1f}")
    checks = []
    m = rows.get("majority@8")
    for s, r in sorted(rows.items()):
        if m is None or s == "majority@8":
            continue
        share = r["mean_output_tokens"] / m["mean_output_tokens"]
        ok = r["accuracy"] >= m["ci"][0] and share <= 0.5
        checks.append({"strategy": s, "accuracy": r["accuracy"], "token_share_of_majority8": share, "met": ok})
        print(f"target check: {s} accuracy {r['accuracy']:.3f} vs majority@8 {m['accuracy']:.3f} "
              f"[CI {m['ci'][0]:.3f}-{m['ci'][1]:.3f}] with {share:.0%} of its tokens (target: within CI at <= 50%): "
              f"{'met' if ok else 'NOT met'}")
    savings: dict[str, dict[str, float]] = {}
    for r in RunDir(Path(args.out)).read_records():
        d = r.details
        if d.get("mode") != "online":
            continue
        a = savings.setdefault(r.strategy, {"items": 0, "traces": 0, "voted": 0, "stopped_traces": 0,
                                            "tokens_saved_by_stop": 0, "cancelled_traces": 0,
                                            "tokens_saved_by_cancel": 0, "consensus": 0, "output_tokens": 0})
        a["items"] += 1
        a["consensus"] += d.get("stopped") == "consensus"
        a["output_tokens"] += r.output_tokens
        for k in ("traces", "voted", "stopped_traces", "tokens_saved_by_stop", "cancelled_traces",
                  "tokens_saved_by_cancel"):
            a[k] += d.get(k, 0)
    per_item = {s: {k: (v / a["items"] if k != "items" else v) for k, v in a.items()} for s, a in savings.items()}
    for s, a in per_item.items():
        print(f"savings: {s}: per item {a['traces']:.2f} traces started, {a['voted']:.2f} voted, "
              f"{a['stopped_traces']:.2f} stopped for low confidence ({a['tokens_saved_by_stop']:.1f} tokens saved), "
              f"{a['cancelled_traces']:.2f} cancelled at consensus ({a['tokens_saved_by_cancel']:.1f} saved); "
              f"consensus stop on {a['consensus']:.0%} of items")
    over = sum(1 for r in RunDir(Path(args.out)).read_records() if r.over_budget)
    out = {"config": str(Path(args.config).name), "limit_per_suite": args.limit, "model": cfg.models,
           "suites": cfg.suites, "seed": cfg.seed, "sampling_seed": None, "budget": {"output_tokens": 768},
           "configs": rows, "target_checks": checks, "deepconf_online_per_item": per_item,
           "records_over_budget": over, "wall_seconds": round(wall, 1), "versions": library_versions(),
           "report": str(report)}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "deepconf_summary.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (res / "deepconf_summary.md").write_text((report / "summary.md").read_text())
    print(f"wrote {res / 'deepconf_summary.json'}; report: {report}")


if __name__ == "__main__":
    main()
