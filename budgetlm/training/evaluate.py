"""After training: the trained model against the base model through ``budgetlm eval``, curves, a report.

:func:`evaluate` runs the recipe's evaluation grid (:meth:`~budgetlm.training.base.Recipe.eval_grid`:
by default both models × the recipe's strategies, e.g. ``controlled`` at three token targets for
``effort``) on the evaluation suite (default: the training suite's ``test`` split, disjoint from the
``calibration`` split it trains on) with the evaluation runner, so it is resumable and every record
has the usual schema.  :func:`compare` reduces the records to one row per (model, strategy):
accuracy, mean output tokens, and for token targets the mean absolute error between requested and
used tokens (``details.length_error``) and its share of the target.

:func:`write_train_report` writes ``OUT/report/train_report.html``: the training curves (reward per
function, mean completion length, loss; from ``train_log.jsonl``), the comparison table, and a link
to the evaluation report (accuracy against tokens) in the same folder.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from budgetlm.errors import ConfigError, MissingDependency
from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import EvalRecord
from budgetlm.evals.rundir import RunDir
from budgetlm.evals.suites import parse_spec
from budgetlm.io import JsonObject, JsonValue, write_json_atomic
from budgetlm.training.base import Recipe
from budgetlm.training.config import TrainConfig
from budgetlm.training.grpo import finite, model_path

EVAL_DIR = "eval"
"""The evaluation's run folder under the training output (:class:`~budgetlm.evals.rundir.RunDir` layout)."""

__all__ = ["Comparison", "ComparisonRow", "compare", "eval_config", "eval_suite", "evaluate", "plot_curves", "write_train_report"]

CURVES = "training_curves.png"


class ComparisonRow(TypedDict):
    """One (model, strategy) row of :func:`compare`."""

    model: str
    """``base``, ``trained``, or the model spec when it has no role."""
    strategy: str
    """The grid entry's label."""
    n: int
    accuracy: float
    mean_output_tokens: float
    truncated: float
    """Share of truncated outputs."""
    target_tokens: NotRequired[int | None]
    """The token target when every record of the row had the same one (None: several)."""
    length_error: NotRequired[float]
    """Mean ``|used − target|`` tokens (rows with token targets only)."""
    relative_length_error: NotRequired[float]
    """Mean length error as a share of the target."""


class Comparison(TypedDict):
    """What :func:`evaluate` returns and writes to ``comparison.json``."""

    rows: list[ComparisonRow]
    overall: dict[str, dict[str, float]]
    """Per model: :func:`overall`."""
    roles: dict[str, str]
    """Model spec → ``base``/``trained``."""
    errors: list[str]
    """Items whose evaluation failed."""
    suite: JsonValue
    """The evaluation suite (spec or config block)."""
    budget: dict[str, float]
    eval_report: str | None
    """The evaluation run's report page."""


def eval_suite(cfg: TrainConfig) -> str | dict[str, Any]:
    """The evaluation suite: ``cfg.eval.suite``, else the training suite (a reasoning_gym ``calibration``
    split) with ``split=test``, at most ``test_size`` items (the test problems its calibration split avoids)."""
    if cfg.eval.suite is not None:
        return cfg.eval.suite
    if isinstance(cfg.suite, dict):
        block = dict(cfg.suite)
        kind = block.get("kind")
    else:
        kind, params = parse_spec(cfg.suite)
        block = {"kind": kind, **params}
    if kind not in ("reasoning_gym",):
        raise ConfigError(f"`eval.suite` must be set for a {kind!r} training suite (only reasoning_gym suites have a "
                          f"test split to fall back on), got null; name a held-out suite")
    split = block.get("split", "test")
    if split != "calibration":
        raise ConfigError(f"`eval.suite` must be set when the training suite is not split=calibration (it trains on "
                          f"split={split!r}, so its test split would be the training data), got null; train on "
                          f"split=calibration or name a held-out suite")
    block["split"] = "test"
    # the calibration split avoids only the first `test_size` test problems: evaluate on no more than those
    test_size = block.pop("test_size", None)
    if test_size is not None:
        if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
            raise ConfigError(f"`eval.suite` must be set when the training suite has test_size={test_size!r} (no "
                              f"test problems are held out of its calibration split), got null; name a held-out suite")
        block["size"] = min(block.get("size", 100), test_size)  # 100: ReasoningGymSuite's default size
    return block


def _specs(cfg: TrainConfig, trained: Path) -> tuple[str, str]:
    kind = cfg.eval.backend
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    base = f"{kind}:default" if cfg.model in ("default", "hf:default", "vllm:default") else f"{kind}:{model_path(cfg.model)}"
    return base, f"{kind}:{trained}"


def eval_config(cfg: TrainConfig, recipe: Recipe, trained: Path) -> tuple[EvalConfig, dict[str, str]]:
    """The evaluation config and the role (``base``/``trained``) of each model spec in it."""
    base, tuned = _specs(cfg, trained)
    max_tokens = cfg.eval.max_tokens or 2 * cfg.max_completion_length
    models, strategies = recipe.eval_grid(base, tuned, max_tokens)
    ecfg = EvalConfig(name=f"{cfg.name}-eval", suites=[eval_suite(cfg)], models=models, strategies=strategies,
                      budgets=[{"output_tokens": max_tokens}], seed=cfg.seed, batch_size=cfg.eval.batch_size,
                      limit=cfg.eval.limit)
    return ecfg, {base: "base", tuned: "trained"}


def compare(records: list[EvalRecord], roles: dict[str, str]) -> list[ComparisonRow]:
    """One row per (model, strategy label): n, accuracy, tokens, length error (when targets were set)."""
    groups: dict[tuple[str, str], list[EvalRecord]] = defaultdict(list)
    for r in records:
        label = r.strategy  # the grid entry's label (the strategy name when unlabelled)
        groups[(roles.get(r.model, r.model), label)].append(r)
    rows = []
    for (model, label), recs in sorted(groups.items()):
        n = len(recs)
        row: ComparisonRow = {
            "model": model, "strategy": label, "n": n,
            "accuracy": sum(r.correct for r in recs) / n,
            "mean_output_tokens": sum(r.output_tokens for r in recs) / n,
            "truncated": sum(r.truncated for r in recs) / n,
        }
        pairs = [(r.details.get("length_error"), r.details.get("target_tokens")) for r in recs]
        errs = [(float(e), t) for e, t in pairs if e is not None and t]
        if errs:
            row["target_tokens"] = errs[0][1] if len({t for _, t in errs}) == 1 else None
            row["length_error"] = sum(e for e, _ in errs) / len(errs)
            row["relative_length_error"] = sum(e / t for e, t in errs) / len(errs)
        rows.append(row)
    return rows


def overall(rows: list[ComparisonRow]) -> dict[str, dict[str, float]]:
    """Per model: accuracy, tokens and (mean over targets) length error, weighting rows by n."""
    out: dict[str, dict[str, float]] = {}
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        n = sum(r["n"] for r in rs)
        agg = {"n": n, "accuracy": sum(r["accuracy"] * r["n"] for r in rs) / n,
               "mean_output_tokens": sum(r["mean_output_tokens"] * r["n"] for r in rs) / n}
        le = [r for r in rs if "length_error" in r]
        if le:
            m = sum(r["n"] for r in le)
            agg["length_error"] = sum(r["length_error"] * r["n"] for r in le) / m
            agg["relative_length_error"] = sum(r["relative_length_error"] * r["n"] for r in le) / m
        out[model] = agg
    return out


def evaluate(cfg: TrainConfig, recipe: Recipe, trained: Path, out: Path, *, progress: bool = True) -> Comparison:
    """Run the evaluation grid into ``out/eval`` (resumable) and write ``out/comparison.json``."""
    from budgetlm.evals.runner import Runner

    ecfg, roles = eval_config(cfg, recipe, trained)
    run = RunDir(out / EVAL_DIR)
    outcome = Runner(ecfg, run.path, progress=progress).run()
    records = run.read_records()
    rows = compare(records, roles)
    doc: Comparison = {"rows": rows, "overall": overall(rows), "roles": roles, "errors": outcome.errors,
           "suite": ecfg.suites[0], "budget": ecfg.budgets[0],
           "eval_report": str(RunDir.report_dir(outcome.report).report_html) if outcome.report else None}
    write_json_atomic(out / "comparison.json", doc)
    return doc


def plot_curves(log: list[JsonObject], path: Path, title: str = "") -> Path | None:
    """Reward (total and per function), mean completion length and loss against step; None without entries."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependency("matplotlib", "training curves", extra="eval")
    entries = [e for e in log if "reward" in e or "loss" in e]
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in entries]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    reward_keys = ["reward", *sorted({k for e in entries for k in e if k.startswith("rewards/") and k.endswith("/mean")})]
    for k in reward_keys:
        ys = [finite(e.get(k)) for e in entries]
        axes[0].plot(steps, [y if y is not None else float("nan") for y in ys], label=k.removesuffix("/mean"), lw=1)
    axes[0].set_title("reward")
    axes[0].legend(fontsize=7)
    for k, lab in (("completions/mean_length", "mean"), ("completions/mean_terminated_length", "terminated")):
        ys = [finite(e.get(k)) for e in entries]
        axes[1].plot(steps, [y if y is not None else float("nan") for y in ys], label=lab, lw=1)
    axes[1].set_title("completion length (tokens)")
    axes[1].legend(fontsize=7)
    ys = [finite(e.get("loss")) for e in entries]
    axes[2].plot(steps, [y if y is not None else float("nan") for y in ys], lw=1)
    axes[2].set_title("loss")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def write_train_report(out: Path, cfg: TrainConfig, log: list[JsonObject], comparison: Comparison | None,
                       eval_report: Path | None) -> Path:
    """``out/report/train_report.html`` (curves, comparison table, link to the eval report) and its Markdown twin."""
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(log, rep / CURVES, title=f"{cfg.name}: recipe {cfg.recipe}")
    cols = ["model", "strategy", "n", "accuracy", "mean_output_tokens", "truncated", "target_tokens", "length_error",
            "relative_length_error"]
    rows = comparison["rows"] if comparison else []
    md = [f"# Training report: {cfg.name}", "", f"Recipe `{cfg.recipe}` on `{cfg.model}`, suite `{cfg.suite}`.", ""]
    body = [f"<h1>Training report: {html.escape(cfg.name)}</h1>",
            f"<p>Recipe <code>{html.escape(cfg.recipe)}</code> on <code>{html.escape(cfg.model)}</code>, "
            f"suite <code>{html.escape(str(cfg.suite))}</code>.</p>"]
    if curves is not None:
        b64 = base64.b64encode(curves.read_bytes()).decode()
        body.append(f'<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{b64}" '
                    f'style="max-width:100%">')
        md += ["## Training curves", "", f"![training curves]({CURVES})", ""]
    if rows:
        head = "".join(f"<th>{c}</th>" for c in cols)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
        body.append(f"<h2>Trained vs base</h2><table><tr>{head}</tr>{trs}</table>")
        md += ["## Trained vs base", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
        md.append("")
    if eval_report is not None:
        rel = os.path.relpath(eval_report, rep)
        body.append(f'<p>Accuracy against tokens: <a href="{html.escape(rel)}">evaluation report</a>.</p>')
        md.append(f"Accuracy against tokens: [evaluation report]({rel}).")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    path = rep / "train_report.html"
    path.write_text(page, encoding="utf-8")
    (rep / "train_report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
