"""Evaluation: suites, graders, the resumable runner, metrics and reports.

* :mod:`budgetlm.evals.suites` — reasoning-gym tasks, JSONL/CSV files, HF datasets, HumanEval;
* :mod:`budgetlm.evals.graders` — math-verify, reasoning-gym, exact, normalised and numeric;
* :mod:`budgetlm.evals.runner` — ``budgetlm eval CONFIG.yaml --out runs/NAME`` (resumable);
* :mod:`budgetlm.evals.metrics` — accuracy with CIs, Pareto frontier, cost-of-pass, token
  complexity, overthinking efficiency, budget adherence;
* :mod:`budgetlm.evals.report` — summary.json, summary.md, PNG plots and report.html.
"""

from budgetlm.evals.config import EvalConfig, StrategySpec
from budgetlm.evals.records import EvalRecord, read_records

__all__ = ["EvalConfig", "EvalRecord", "StrategySpec", "read_records"]
