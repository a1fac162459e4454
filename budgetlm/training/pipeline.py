"""``budgetlm train``: train a recipe, evaluate trained vs base, write the report — each step resumable.

:func:`run` is what the CLI calls: :func:`~budgetlm.training.grpo.train` (resuming from the newest
checkpoint), then :func:`~budgetlm.training.evaluate.evaluate` (the evaluation runner resumes its own
records), then :func:`~budgetlm.training.evaluate.write_train_report`.  Re-running a finished run
only rewrites the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budgetlm.training.base import RECIPES
from budgetlm.training.config import TrainConfig
from budgetlm.training.evaluate import evaluate, write_train_report
from budgetlm.training.grpo import TrainOutcome, read_log, train

__all__ = ["RunResult", "run"]


@dataclass
class RunResult:
    """What :func:`run` produced."""

    train: TrainOutcome
    """The training outcome (model directory, steps, logged metrics)."""
    comparison: dict[str, Any] | None
    """Trained vs base rows and per-model totals (None when the evaluation is disabled)."""
    report: Path
    """``train_report.html``."""


def run(cfg: TrainConfig | str | Path, output_dir: str | Path, *, resume: bool = True, progress: bool = True) -> RunResult:
    """Train, evaluate against the base model (``cfg.eval``), and write the training report."""
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_yaml(cfg, what="training config")
    out = Path(output_dir)
    outcome = train(cfg, out, resume=resume, progress=progress)
    comparison = None
    eval_report = None
    if cfg.eval.enabled:
        recipe = RECIPES.get(cfg.recipe)(cfg.recipe_params)
        comparison = evaluate(cfg, recipe, outcome.model_dir, out, progress=progress)
        eval_report = Path(comparison["eval_report"]) if comparison.get("eval_report") else None
    report = write_train_report(out, cfg, read_log(out / "train_log.jsonl"), comparison, eval_report)
    return RunResult(outcome, comparison, report)
