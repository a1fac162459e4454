"""Issue-8 benchmark: LCPO-Exact training of the default model on this CPU, before/after length control.

Trains SmolLM2-135M-Instruct with the ``effort`` recipe (``mode: exact``, prompts ending "Think for
N tokens.", N uniform in 8..64, reward ``1[correct] − α·|N − n|``) on reasoning-gym ``chain_sum``
(two 1-digit terms, calibration split) for ``max_minutes`` of training (``benchmarks/train_effort.yaml``),
then evaluates the base and the trained model with the ``controlled`` strategy at N = 8, 32, 64 on
100 test-split problems through ``budgetlm eval`` (greedy, transformers backend).

Prints, per model, the mean absolute error between requested and used tokens and the accuracy, and
the target check: length error at least halved (trained/base <= 0.5) with accuracy within 2
points.  Writes ``benchmarks/results/train_effort_summary.json`` and the training curves to
``docs/img/train_effort_curves.png``.  Resumable: re-running reuses the finished training and the
evaluation records in ``--out``.

Usage::

    .venv/bin/python benchmarks/train_effort.py [--out runs/train_effort] [--minutes 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "train_effort.yaml"))
    ap.add_argument("--out", default="runs/train_effort")
    ap.add_argument("--minutes", type=float, default=None, help="Override max_minutes of the config.")
    ap.add_argument("--json", default=str(HERE / "results" / "train_effort_summary.json"))
    ap.add_argument("--curves", default=str(HERE.parent / "docs" / "img" / "train_effort_curves.png"))
    args = ap.parse_args()

    from budgetlm.training import TrainConfig, run
    from budgetlm.training.grpo import read_log
    from budgetlm.versions import library_versions

    cfg = TrainConfig.from_yaml(args.config, what="training config")
    if args.minutes is not None:
        cfg = TrainConfig(**{**cfg.model_dump(), "max_minutes": args.minutes})
    out = Path(args.out)
    res = run(cfg, out)
    state = json.loads((out / "train.json").read_text())
    overall = res.comparison["overall"] if res.comparison else {}
    base, tuned = overall.get("base", {}), overall.get("trained", {})
    ratio = tuned["length_error"] / base["length_error"] if base.get("length_error") else float("nan")
    acc_diff = tuned["accuracy"] - base["accuracy"]
    log = read_log(out / "train_log.jsonl")
    steps = [e for e in log if "reward" in e]
    first, last = steps[: max(1, len(steps) // 10)], steps[-max(1, len(steps) // 10):]

    def mean(es: list[dict], k: str) -> float:
        return sum(float(e[k]) for e in es) / len(es)

    print(f"\ntrained {res.train.steps} steps ({state.get('stop_reason')}), "
          f"{(state.get('finished', 0) - state.get('started', 0)) / 60:.1f} min wall incl. set-up")
    print(f"reward (first/last 10% of steps): {mean(first, 'reward'):.3f} -> {mean(last, 'reward'):.3f}; "
          f"mean completion length {mean(first, 'completions/mean_length'):.1f} -> "
          f"{mean(last, 'completions/mean_length'):.1f}")
    print(f"{'model':8} {'target':>6} {'n':>4} {'acc':>6} {'tokens':>7} {'|err|':>7}")
    for r in res.comparison["rows"]:
        print(f"{r['model']:8} {r.get('target_tokens') or '-':>6} {r['n']:>4} {r['accuracy']:6.3f} "
              f"{r['mean_output_tokens']:7.1f} {r.get('length_error', float('nan')):7.1f}")
    print(f"length error: base {base['length_error']:.1f} -> trained {tuned['length_error']:.1f} tokens "
          f"(ratio {ratio:.2f}; target <= 0.50: {'met' if ratio <= 0.5 else 'NOT met'})")
    print(f"accuracy: base {base['accuracy']:.3f} -> trained {tuned['accuracy']:.3f} "
          f"({100 * acc_diff:+.1f} points; target: no more than 2 points lost: {'met' if acc_diff >= -0.02 else 'NOT met'})")

    curves = out / "report" / "training_curves.png"
    if curves.exists():
        Path(args.curves).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(curves, args.curves)
    doc = {
        "config": cfg.model_dump(), "steps": res.train.steps, "stop_reason": state.get("stop_reason"),
        "train_minutes": (state.get("finished", 0) - state.get("started", 0)) / 60,
        "reward_first_last": [mean(first, "reward"), mean(last, "reward")],
        "mean_length_first_last": [mean(first, "completions/mean_length"), mean(last, "completions/mean_length")],
        "rows": res.comparison["rows"], "overall": overall, "length_error_ratio": ratio,
        "accuracy_diff_points": 100 * acc_diff, "versions": library_versions(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
