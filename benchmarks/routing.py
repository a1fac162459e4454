"""Issue-7 benchmark: routers between a cheap and an expensive policy, per query and per agent step.

Part A — per-query routing on an easy reasoning-gym suite (chain_sum, two 1-digit terms), the
default model as both "models": cheap = one greedy sample, expensive = majority over 8 samples.

1. Both arms run on a calibration split (seed 1) and a test split (seed 2) through the evaluation
   runner (resumable records under ``OUT/arms``): per-item success and output tokens.
2. Every router scores both splits: ``random``, ``logprob`` (greedy answer's mean logprob; the
   cheap answer is reused, so routed-up items pay both arms), ``consistency`` (4 cheap samples;
   signal tokens are paid on every item), ``self_rated`` (a 1–9 rating call), ``embedding`` on the
   model's mean hidden state (transformers backend) and on hashed words, both trained on the
   calibration split's "strong needed" labels, and ``linucb`` learning online over the test split
   from the recorded outcomes (reward = clip(0.7·success + 0.3·(1 − cost_norm))).
3. On the test split: the cost–success curve of each router (every threshold), APGR, CPT(50 %),
   CPT(80 %) against always-small / always-large (RouteLLM, arXiv 2406.18665), and the operating
   point at the threshold calibrated on the calibration split for 50 % strong calls (honest:
   the target share is set on other items).  Target: a router recovering >= 80 % of the quality gap
   with <= 50 % expensive calls.
4. End to end: the best router by APGR is calibrated with ``budgetlm route calibrate``'s function
   and run as the ``route`` strategy through ``budgetlm eval`` on the test split (accuracy, share of
   expensive calls, tokens, budget violations).

Part B — per-step routing in the offline multi-hop agent benchmark (``kb_agent``, mixed 2–4 hops,
``search`` and ``calculator`` tools), ``agent`` strategy: always-small steps (one greedy sample),
always-large steps (the most common action of 5 samples), random per-step routing and the
budget-aware wrapper around it; success, tokens, tool calls, share of expensive steps and budget
violations.  The default model rarely calls tools from the plain prompt, so Part B uses a one-shot
prompt (``AGENT_PROMPT``) that shows a tool call.

Usage::

    .venv/bin/python benchmarks/routing.py [--out runs/routing] [--cal-size 100] [--test-size 200] [--agent-size 60]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
SUITE = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size={size}&seed={seed}"
CHEAP = {"label": "small", "strategy": "sample", "params": {"temperature": 0.0, "max_tokens": 96}}
STRONG = {"label": "large", "strategy": "majority", "params": {"n": 8, "temperature": 0.7, "max_tokens": 96}}
BUDGET = {"output_tokens": 2048}
E2E_ROUTERS: dict[str, dict[str, Any]] = {
    "logprob": {"name": "logprob", "params": {"max_tokens": 96}},
    "consistency": {"name": "consistency", "params": {"k": 4, "max_tokens": 96}},
    "self_rated": {"name": "self_rated"}, "random": {"name": "random"},
    "embedding (hashed words)": {"name": "embedding", "params": {"features": "hashing"}},
}
"""Routers the end-to-end run can use on the vLLM backend (hidden-state features need transformers)."""
AGENT_PROMPT = (
    'You answer questions by looking facts up. To look up a name, write <tool_call>{"name": "search", "arguments": '
    '{"query": "NAME"}}</tool_call> and read the <tool_response>. For arithmetic write <tool_call>{"name": '
    '"calculator", "arguments": {"expression": "1 + 2"}}</tool_call>.\n\n'
    "Example:\nQuestion: In which city was the CEO of Zanto Corp born?\n"
    '<tool_call>{"name": "search", "arguments": {"query": "Zanto Corp"}}</tool_call>\n'
    "<tool_response>Zanto Corp (company): ceo = Mira Oda; headquartered in = Pelu; founded = 1990</tool_response>\n"
    '<tool_call>{"name": "search", "arguments": {"query": "Mira Oda"}}</tool_call>\n'
    "<tool_response>Mira Oda (person): born in = Kesti; works for = Zanto Corp; age = 40</tool_response>\n"
    "Answer: Kesti\n\nQuestion: {question}"
)
"""One-shot agent prompt of Part B (the plain prompt gets almost no tool calls from a 135M model)."""


def _arm_outcomes(out: Path, cal: str, test: str, seed: int) -> dict[str, dict[str, list[Any]]]:
    """Run both arms on both splits (resumable); per split: item ids, weak/strong success and tokens."""
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.rundir import RunDir
    from budgetlm.evals.runner import run_eval

    strategies = [{"name": a["strategy"], "label": a["label"], "params": a["params"]} for a in (CHEAP, STRONG)]
    cfg = EvalConfig(name="routing-arms", suites=[cal, test], models=["default"], strategies=strategies,
                     budgets=[BUDGET], seed=seed, batch_size=256)
    run_eval(cfg, out / "arms", report=False)
    recs = RunDir(out / "arms").read_records()
    res: dict[str, dict[str, list[Any]]] = {}
    for split, spec in (("cal", cal), ("test", test)):
        by = {(r.strategy, r.item_id): r for r in recs if r.suite == spec}
        ids = sorted({i for (_, i) in by}, key=lambda s: int(s.rsplit("-", 1)[-1]) if s.rsplit("-", 1)[-1].isdigit() else s)
        res[split] = {
            "ids": ids,
            "weak": [float(by[("small", i)].correct) for i in ids],
            "strong": [float(by[("large", i)].correct) for i in ids],
            "weak_tokens": [by[("small", i)].output_tokens for i in ids],
            "strong_tokens": [by[("large", i)].output_tokens for i in ids],
            "over_budget": [by[(s, i)].over_budget for s in ("small", "large") for i in ids],
        }
    return res


def _queries(spec: str, ids: list[str]) -> list[Any]:
    from budgetlm.evals.suites import get as get_suite
    from budgetlm.routing import RouteQuery

    items = {it.id: it for it in get_suite(spec).items()}
    return [RouteQuery(messages=list(items[i].messages), id=i) for i in ids]


def _signal_scores(cal: str, test: str, arms: dict[str, Any], seed: int) -> dict[str, dict[str, Any]]:
    """Scores (and signal output tokens per item) of every router on both splits."""
    import numpy as np

    from budgetlm.backends import load
    from budgetlm.meter import Meter
    from budgetlm.routing import get as get_router
    from budgetlm.routing import strong_needed_labels

    qs = {s: _queries(spec, arms[s]["ids"]) for s, spec in (("cal", cal), ("test", test))}
    out: dict[str, dict[str, Any]] = {}
    vllm = load("default", seed=seed)
    try:
        for name, router, reuse in (("random", get_router("random", seed=seed), False),
                                    ("logprob", get_router("logprob", max_tokens=96), True),
                                    ("consistency", get_router("consistency", k=4, max_tokens=96), False),
                                    ("self_rated", get_router("self_rated"), False)):
            entry: dict[str, Any] = {"reuses_cheap_answer": reuse}
            for split in ("cal", "test"):
                fresh = _queries(cal if split == "cal" else test, arms[split]["ids"])
                meters = [Meter(BUDGET, name=q.id) for q in fresh]
                entry[split] = router.score(fresh, vllm, meters)
                entry[f"{split}_signal_tokens"] = [m.spent("output_tokens") for m in meters]
            out[name] = entry
    finally:
        vllm.close()
    labels = strong_needed_labels([bool(x) for x in arms["cal"]["weak"]], [bool(x) for x in arms["cal"]["strong"]])
    hf = load("hf:default")
    try:
        for name, params in (("embedding (hidden state)", {"features": "model", "l2": 10.0}),
                             ("embedding (hashed words)", {"features": "hashing", "l2": 1.0})):
            r = get_router("embedding", **params)
            r.fit(qs["cal"], labels, hf)
            out[name] = {"reuses_cheap_answer": False, "cal": r.score(qs["cal"], hf), "test": r.score(qs["test"], hf),
                         "cal_signal_tokens": [0] * len(qs["cal"]), "test_signal_tokens": [0] * len(qs["test"])}
    finally:
        hf.close()
    # LinUCB: online over the test split in order, learning from the outcome of the arm it chose.
    bandit = get_router("linucb", alpha=0.5, dim=32, cost_weight=0.3, use_context=False)
    scores, chosen = [], []
    for k, q in enumerate(qs["test"]):
        arm, w = bandit.choose([q], [0.0])
        scores.append(w[0])
        chosen.append(arm[0])
        success = arms["test"]["strong" if arm[0] else "weak"][k]
        bandit.update(q, arm[0], bandit.reward(success, float(arm[0])))
    out["linucb (online)"] = {"reuses_cheap_answer": False, "test": scores, "online_choices": chosen,
                              "test_signal_tokens": [0] * len(scores), "pulls": np.asarray(bandit.pulls).tolist()}
    return out


def _evaluate(routers: dict[str, dict[str, Any]], arms: dict[str, Any], share: float) -> list[dict[str, Any]]:
    import numpy as np

    from budgetlm.evals.routing_metrics import apgr, cpt, pgr, routing_curve
    from budgetlm.routing import calibrate_threshold, strong_share

    t = arms["test"]
    weak, strong = np.asarray(t["weak"]), np.asarray(t["strong"])
    wq, sq = float(weak.mean()), float(strong.mean())
    rows = []
    for name, r in routers.items():
        sig = np.asarray(r["test_signal_tokens"], dtype=float)
        wc = np.asarray(t["weak_tokens"], dtype=float)
        sc = np.asarray(t["strong_tokens"], dtype=float)
        if r["reuses_cheap_answer"]:  # the signal *is* the cheap answer: routed-up items pay both
            weak_cost, strong_cost = wc, sc + wc
        else:
            weak_cost, strong_cost = wc + sig, sc + sig
        curve = routing_curve(r["test"], weak, strong, weak_cost, strong_cost)
        row: dict[str, Any] = {"router": name, "apgr": apgr(curve, wq, sq), "cpt50": cpt(curve, wq, sq, 50.0),
                               "cpt80": cpt(curve, wq, sq, 80.0),
                               "signal_tokens": float(sig.mean())}
        if "cal" in r:
            thr = calibrate_threshold(r["cal"], share)
            row["threshold_source"] = f"calibrated on the calibration split for share {share}"
        else:
            thr = 0.0
            row["threshold_source"] = "online choices (UCB, threshold 0)"
        routed = np.asarray(r["test"]) >= thr
        quality = float(np.where(routed, strong, weak).mean())
        row |= {"threshold": thr, "share": strong_share(r["test"], thr), "accuracy": quality,
                "pgr": pgr(quality, wq, sq), "mean_output_tokens": float(np.where(routed, strong_cost, weak_cost).mean())}
        best = max((q for s, q in zip(curve.shares, curve.quality, strict=True) if s <= share + 1e-9), default=wq)
        row["best_pgr_at_share"] = pgr(best, wq, sq)
        rows.append(row)
    return rows


def _end_to_end(out: Path, router: str, cal: str, test: str, cal_size: int, share: float, seed: int) -> dict[str, Any]:
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.route_calibration import RouteConfig, calibrate_route_config
    from budgetlm.evals.rundir import RunDir
    from budgetlm.evals.runner import run_eval

    block = E2E_ROUTERS[router] | ({"params": {"seed": seed}} if router == "random" else {})
    path = out / "route_calibration.json"  # reused when present, so resumed e2e records match their thresholds
    if path.exists():
        doc = json.loads(path.read_text())
    else:
        cfg = RouteConfig(router=block, arms=[CHEAP, STRONG], suite=cal, calibration_items=cal_size, budget=BUDGET,
                          seed=seed)
        doc = calibrate_route_config(cfg, share, path)
    ecfg = EvalConfig(name="routing-e2e", suites=[test], models=["default"], seed=seed, budgets=[BUDGET], batch_size=256,
                      strategies=[{"name": "route", "label": f"route:{router}", "params": {"calibration": str(path)}}])
    run_eval(ecfg, out / "e2e", report=False)
    recs = RunDir(out / "e2e").read_records()
    n = len(recs)
    return {"router": router, "thresholds": doc["thresholds"], "calibration": doc["on_split"], "n_items": n,
            "accuracy": sum(r.correct for r in recs) / n,
            "share_expensive": sum(r.details.get("expensive_calls", 0) for r in recs) / n,
            "mean_output_tokens": sum(r.output_tokens for r in recs) / n,
            "budget_violations": sum(r.over_budget for r in recs)}


def _agents(out: Path, size: int, seed: int) -> list[dict[str, Any]]:
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.rundir import RunDir
    from budgetlm.evals.runner import run_eval

    common = {"max_steps": 6, "step_tokens": 96, "answer_tokens": 24,
              "models": [{"label": "small", "n": 1}, {"label": "large", "n": 5, "temperature": 0.7}]}
    policies = {"always-small": {"router": "always_small"}, "always-large": {"router": "always_large"},
                "random@0.5": {"router": {"name": "random", "params": {"seed": seed}}, "threshold": 0.5},
                "budget-aware random@0.5": {"router": {"name": "budget_aware", "params": {
                    "inner": {"name": "random", "params": {"seed": seed}}}}, "threshold": 0.5}}
    suite = {"kind": "kb_agent", "size": size, "seed": seed, "difficulty": "mixed", "prompt": AGENT_PROMPT}
    cfg = EvalConfig(name="routing-agents", suites=[suite], models=["default"], seed=seed, batch_size=256,
                     budgets=[{"output_tokens": 1024, "tool_calls": 6}],
                     strategies=[{"name": "agent", "label": k, "params": {**common, **v}} for k, v in policies.items()])
    run_eval(cfg, out / "agents", report=False)
    recs = RunDir(out / "agents").read_records()
    rows = []
    for label in policies:
        rs = [r for r in recs if r.strategy == label]
        steps = sum(r.details.get("model_steps", 0) for r in rs)
        rows.append({"policy": label, "n_items": len(rs), "accuracy": sum(r.correct for r in rs) / len(rs),
                     "mean_output_tokens": sum(r.output_tokens for r in rs) / len(rs),
                     "mean_tool_calls": sum(r.details.get("tool_calls", 0) for r in rs) / len(rs),
                     "items_with_tool_calls": sum(1 for r in rs if r.details.get("tool_calls", 0) > 0),
                     "expensive_step_share": sum(r.details.get("expensive_calls", 0) for r in rs) / max(steps, 1),
                     "budget_violations": sum(r.over_budget for r in rs)})
    small = next(r for r in rows if r["policy"] == "always-small")["accuracy"]
    large = next(r for r in rows if r["policy"] == "always-large")["accuracy"]
    for r in rows:
        gap = large - small
        r["pgr"] = (r["accuracy"] - small) / gap if abs(gap) > 1e-12 else math.nan
    return rows


def _print_agents(agents: list[dict[str, Any]], size: int) -> None:
    print(f"\nPart B: kb_agent ({size} items, mixed 2–4 hops), per-step routing")
    print(f"{'policy':26} {'acc':>6} {'tokens':>7} {'tools':>6} {'items w/ tools':>15} {'exp. steps':>10} "
          f"{'PGR':>6} {'violations':>10}")
    for a in agents:
        print(f"{a['policy']:26} {a['accuracy']:6.3f} {a['mean_output_tokens']:7.1f} {a['mean_tool_calls']:6.2f} "
              f"{a['items_with_tool_calls']:15d} {a['expensive_step_share']:10.2f} {_fmt(a['pgr'], '.2f'):>6} "
              f"{a['budget_violations']:10d}")


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/routing")
    ap.add_argument("--cal-size", type=int, default=100)
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--agent-size", type=int, default=60)
    ap.add_argument("--share", type=float, default=0.5, help="target share of expensive calls")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=str(HERE / "results" / "routing_summary.json"))
    ap.add_argument("--parts", default="ab", choices=["a", "b", "ab"],
                    help="run part A, part B or both (a single part keeps the other's figures in --json)")
    args = ap.parse_args()

    from budgetlm.versions import library_versions

    out = Path(args.out)
    cal = SUITE.format(size=args.cal_size, seed=1)
    test = SUITE.format(size=args.test_size, seed=2)
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    if args.parts == "b":
        agents = _agents(out, args.agent_size, args.seed)
        _print_agents(agents, args.agent_size)
        previous.update(part_b=agents, versions=library_versions())
        Path(args.json).write_text(json.dumps(previous, indent=2, default=str).replace("NaN", "null") + "\n")
        return
    arms = _arm_outcomes(out, cal, test, args.seed)
    cache = out / "router_scores.json"  # scoring is the slow part: resumed runs reuse it
    if cache.exists():
        routers = json.loads(cache.read_text())
    else:
        routers = _signal_scores(cal, test, arms, args.seed)
        cache.write_text(json.dumps(routers, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    rows = _evaluate(routers, arms, args.share)
    t = arms["test"]
    wq, sq = sum(t["weak"]) / len(t["weak"]), sum(t["strong"]) / len(t["strong"])
    wt, st = sum(t["weak_tokens"]) / len(t["weak"]), sum(t["strong_tokens"]) / len(t["strong"])
    print(f"Part A: chain_sum test split ({len(t['weak'])} items): always-small {wq:.3f} at {wt:.1f} tokens, "
          f"always-large {sq:.3f} at {st:.1f} tokens; budget violations {sum(t['over_budget'])}")
    print(f"{'router':26} {'APGR':>6} {'CPT50':>6} {'CPT80':>6} | at calibrated t: {'share':>6} {'acc':>6} {'PGR':>6} "
          f"{'tokens':>7} | best PGR at share<={args.share}")
    for r in rows:
        print(f"{r['router']:26} {_fmt(r['apgr']):>6} {_fmt(r['cpt50'], '.2f'):>6} {_fmt(r['cpt80'], '.2f'):>6} | "
              f"{'':16} {r['share']:6.2f} {r['accuracy']:6.3f} {_fmt(r['pgr'], '.2f'):>6} {r['mean_output_tokens']:7.1f} | "
              f"{_fmt(r['best_pgr_at_share'], '.2f')}")
    candidates = [r for r in rows if r["router"] in E2E_ROUTERS and r["router"] != "random" and not math.isnan(r["apgr"])]
    best = max(candidates, key=lambda r: r["apgr"]) if candidates else None
    met = [r["router"] for r in rows if r["share"] <= args.share + 1e-9 and (r["pgr"] or 0) >= 0.8]
    checks = [f"target offline (recorded arm outcomes on the test split): a router recovering >= 80% of the quality "
              f"gap with <= {args.share:.0%} expensive calls at its calibrated threshold: "
              f"{'met by ' + ', '.join(met) if met else 'NOT met'}"]
    e2e = _end_to_end(out, best["router"], cal, test, args.cal_size, args.share, args.seed) if best else {}
    if e2e and "accuracy" in e2e:
        e2e["pgr"] = (e2e["accuracy"] - wq) / (sq - wq) if abs(sq - wq) > 1e-12 else math.nan
        ok = e2e["share_expensive"] <= args.share + 1e-9 and e2e["pgr"] >= 0.8
        checks.append(f"target end to end (route strategy, {e2e['router']}, threshold calibrated on the calibration "
                      f"split by `budgetlm route calibrate`, strong arm re-sampled): PGR {e2e['pgr']:.2f} with "
                      f"{e2e['share_expensive']:.0%} expensive calls: {'met' if ok else 'NOT met'}")
        print(f"\nend to end (route strategy through budgetlm eval, router {e2e['router']}, thresholds "
              f"{[round(x, 4) for x in e2e['thresholds']]}): accuracy {e2e['accuracy']:.3f}, expensive share "
              f"{e2e['share_expensive']:.2f}, {e2e['mean_output_tokens']:.1f} output tokens, budget violations "
              f"{e2e['budget_violations']}")
    agents = _agents(out, args.agent_size, args.seed) if args.agent_size and "b" in args.parts else previous.get("part_b", [])
    if agents and "b" in args.parts:
        _print_agents(agents, args.agent_size)
    print()
    for c in checks:
        print(c)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    doc = {"part_a": {"suite_calibration": cal, "suite_test": test, "arms": [CHEAP, STRONG], "budget": BUDGET,
                      "always_small": {"accuracy": wq, "mean_output_tokens": wt},
                      "always_large": {"accuracy": sq, "mean_output_tokens": st},
                      "arm_budget_violations": sum(t["over_budget"]), "routers": rows, "end_to_end": e2e},
           "part_b": agents, "checks": checks, "seed": args.seed, "versions": library_versions()}
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str).replace("NaN", "null") + "\n")


if __name__ == "__main__":
    main()
