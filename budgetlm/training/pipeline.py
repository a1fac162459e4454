"""``budgetlm train``: train a recipe, evaluate trained vs base, write the report — each step resumable.

:func:`run` is what the CLI calls: :func:`~budgetlm.training.grpo.train` (resuming from the newest
checkpoint), then :func:`~budgetlm.training.evaluate.evaluate` (the evaluation runner resumes its own
records), then :func:`~budgetlm.training.evaluate.write_train_report`.  Re-running a finished run
only rewrites the report.

Under ``accelerate launch`` every process trains; afterwards only the main process evaluates and
writes the report (the evaluation loads both models on one device with the evaluation runner).  The
other processes log that they skip it and return at once with ``comparison=None``: nothing after
training is a collective, so the main process never waits for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from budgetlm import distributed
from budgetlm.training.base import RECIPES
from budgetlm.training.config import TrainConfig
from budgetlm.training.evaluate import Comparison, evaluate, write_train_report
from budgetlm.training.grpo import TRAIN_LOG, TrainOutcome, read_log, train

__all__ = ["RunResult", "run"]

log = logging.getLogger("budgetlm.training")


@dataclass
class RunResult:
    """What :func:`run` produced."""

    train: TrainOutcome
    """The training outcome (model directory, steps, logged metrics)."""
    comparison: Comparison | None
    """Trained vs base rows and per-model totals (None when the evaluation is disabled)."""
    report: Path
    """``train_report.html`` (written by the main process only)."""
    main_process: bool = True
    """False on the other processes of a multi-process run: they neither evaluate nor write the report."""


def run(cfg: TrainConfig | str | Path, output_dir: str | Path, *, resume: bool = True, progress: bool = True) -> RunResult:
    """Train, evaluate against the base model (``cfg.eval``), and write the training report."""
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_yaml(cfg, what="training config")
    out = Path(output_dir)
    if getattr(RECIPES.get(cfg.recipe), "trainer", "grpo") == "dpo":  # preference recipes train on TRL's DPOTrainer
        from budgetlm.training.dpo import train as train_dpo

        outcome = train_dpo(cfg, out, resume=resume, progress=progress)
    else:
        outcome = train(cfg, out, resume=resume, progress=progress)
    if not distributed.is_main():
        log.warning("process %d of %d: training done; the main process evaluates and writes the report, this one "
                    "skips them", distributed.rank(), distributed.world_size())
        return RunResult(outcome, None, out / "report" / "train_report.html", main_process=False)
    comparison = None
    eval_report = None
    if cfg.eval.enabled:
        recipe = RECIPES.get(cfg.recipe)(cfg.recipe_params)
        comparison = evaluate(cfg, recipe, outcome.model_dir, out, progress=progress)
        page = comparison.get("eval_report")
        eval_report = Path(page) if page else None
    report = write_train_report(out, cfg, read_log(out / TRAIN_LOG), comparison, eval_report)
    return RunResult(outcome, comparison, report)
