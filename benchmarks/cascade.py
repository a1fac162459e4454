"""Issue-6 benchmark (cascades): accuracy and cost of a calibrated cascade against its stages alone.

Calibrates ``benchmarks/cascade.yaml`` (greedy → majority@8 on the default model) on a calibration
split for each ε in ``--epsilons`` (``budgetlm cascade calibrate``), then runs, through the
evaluation runner on a separate test split (same generator, another seed), each stage alone and the
calibrated cascades.  Prints accuracy, mean output tokens and the target check: the cascade saves
>= 30 % of the last stage's output tokens while losing at most ε accuracy against it.

Usage::

    .venv/bin/python benchmarks/cascade.py [--out runs/cascade] [--test-size 200] [--epsilons 0.01 0.05]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "cascade.yaml"))
    ap.add_argument("--out", default="runs/cascade")
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--test-seed", type=int, default=2)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--json", default=str(HERE / "results" / "cascade_summary.json"))
    args = ap.parse_args()

    from budgetlm.evals.calibration import CascadeConfig, calibrate_config
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.rundir import RunDir
    from budgetlm.evals.runner import run_eval
    from budgetlm.io import read_json
    from budgetlm.versions import library_versions

    cfg = CascadeConfig.load(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cals = {}
    for eps in args.epsilons:
        path = out / f"calibration_eps{eps}.json"
        if not path.exists():
            calibrate_config(cfg, eps, path)
        cals[eps] = json.loads(path.read_text())
    base = str(cfg.suite)
    test_suite = base.replace("size=", "size_=").split("size_=")[0] + f"size={args.test_size}&seed={args.test_seed}"
    stages = cfg.stages
    strategies = [{"name": s["strategy"], "label": f"stage {k}: {s['strategy']}", "params": s.get("params", {})}
                  for k, s in enumerate(stages)]
    for eps in args.epsilons:
        strategies.append({"name": "cascade", "label": f"cascade eps={eps}",
                           "params": {"stages": stages, "calibration": str(out / f"calibration_eps{eps}.json")}})
    ecfg = EvalConfig(name="cascade", suites=[test_suite], models=[cfg.model], strategies=strategies,
                      budgets=[cfg.budget], seed=cfg.seed, batch_size=args.test_size)
    run_eval(ecfg, out / "test", report=True)
    summary = read_json(RunDir(out / "test").summary_json)
    rows = {c["strategy"]: c for c in summary["configs"]}
    last = rows[f"stage {len(stages) - 1}: {stages[-1]['strategy']}"]
    print(f"{'configuration':24} {'accuracy':>8} {'95% CI':>13} {'out tok':>8}")
    for name, c in rows.items():
        print(f"{name:24} {c['accuracy']:8.3f} {c['accuracy_ci_low']:6.3f}-{c['accuracy_ci_high']:6.3f} "
              f"{c['mean_output_tokens']:8.1f}")
    checks = []
    for eps in args.epsilons:
        c = rows[f"cascade eps={eps}"]
        saved = 1 - c["mean_output_tokens"] / last["mean_output_tokens"]
        loss = last["accuracy"] - c["accuracy"]
        ok = saved >= 0.30 and loss <= eps
        rates = cals[eps]["cascade_on_split"]["answered_per_stage"]
        checks.append(f"target: cascade eps={eps} (thresholds {cals[eps]['thresholds']}, calibration answer rates "
                      f"{[round(r, 2) for r in rates]}) saves {saved:.0%} of the last stage's tokens with accuracy "
                      f"{c['accuracy']:.3f} vs {last['accuracy']:.3f} (loss {loss:+.3f}; target >= 30 % saved at "
                      f"loss <= {eps}): {'met' if ok else 'NOT met'}")
    print()
    for line in checks:
        print(line)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"configs": list(rows.values()), "calibrations": cals, "checks": checks,
                                           "versions": library_versions()}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
