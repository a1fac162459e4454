"""Metrics for accuracy-vs-cost evaluation (ALGORITHMS.md §10).

Every function here is pure: it takes a list of :class:`~budgetlm.evals.records.EvalRecord` (or
plain numbers) and returns numbers or small dataclasses, so the runner, the CLI and the report can
share them and tests can check them by hand.

Vocabulary
----------
* A **configuration** is (model, strategy, params, budget); its records share ``config_id``.  When
  records of several runs are mixed, a configuration is keyed by ``(run, config_id)`` where ``run``
  is an optional extra field of the record (``""`` when absent) — see :func:`config_key`.
* A **question** is keyed by ``(suite, item_id)`` — see :func:`question_key`.
* ``cost`` names one cost unit of a record: ``"output_tokens"``, ``"total_tokens"`` (prompt +
  output), ``"usd"`` or ``"flops"``.
* Records with ``error`` set count as **wrong answers** (accuracy, cost-of-pass, ξ_O), with
  whatever cost they recorded; only :func:`token_complexity` leaves them out.  The report instead
  summarises with ``summarize(..., exclude_errors=True)``: errored records are left out of every
  rate and mean (an error is not a wrong answer at zero tokens) and only counted in ``n_errors``.
* A configuration with errored records (``n_errors > 0``) is **never on the Pareto frontier**
  (:func:`frontier_summaries` leaves it out): its figures describe a different item set.

Metrics and sources
-------------------
* **Bootstrap CI** — percentile bootstrap (Efron & Tibshirani 1993) of the mean, seeded numpy.
* **Cost-of-pass** (Erol et al., arXiv 2504.13359, Eq. 2): ``v = E[cost] / E[accuracy]``, ∞ at
  zero accuracy.  Over a set of records (several problems) we use the pooled means, i.e. the
  expected cost of one correct answer on a problem drawn from the set.
* **Frontier cost-of-pass** (same paper, Eq. 3-4): per problem the minimum over configurations of
  that configuration's cost-of-pass *on that problem*, then averaged over problems.  Deviation:
  problems that no configuration solves have an infinite frontier cost; the paper's average would
  be ∞, so we return the mean over the *solved* problems plus the count of unsolved ones
  (:class:`FrontierCostOfPass`); when none is solved the mean is ∞.
* **Token complexity** (Lee et al., arXiv 2503.01141, §3): per question, the threshold τ that best
  separates correct responses (``output_tokens ≥ τ``) from wrong ones (``< τ``) over all its
  responses (configurations / compression levels).  Candidates are the observed token counts plus
  ∞ (every response predicted wrong); the candidate with the most correctly classified responses
  wins and **ties go to the smallest τ**.  So all right → min tokens, all wrong → ∞.
  **Oracle accuracy** at mean budget ``b``: add questions in ascending τ while the mean τ of the
  chosen set stays ≤ b (∞-τ questions are never chosen); accuracy = chosen / all questions.
* **Outcome efficiency** ξ_O (Chen et al., "Do NOT think that much for 2+3=?", arXiv 2412.21187,
  Eq. 1): mean over responses of ``σ_i · T̂_i / T_i`` with σ correctness, T̂ the tokens up to the
  first correct answer and T the response's output tokens.  T̂ is read from the optional record
  field ``tokens_to_first_correct``; without it we *estimate* it (deviation): the gold answer's
  first whole-token occurrence in ``text`` (case-insensitive, not as part of a longer number or
  word) ends at character ``p`` of ``len(text)``, and ``T̂ = thinking_tokens + (output_tokens -
  thinking_tokens) · p / len(text)`` — ``text`` has thinking removed, so the hidden thinking is
  assumed to precede the first correct answer (this under-states overthinking).  When the gold
  answer is not found verbatim (e.g. ``1/2`` vs ``0.5``) T̂ = T.  The ratio is clipped to [0, 1];
  with ``T = 0`` a correct response counts 1.  For multi-sample strategies T sums all samples, so
  ξ_O is mainly meaningful for single-response strategies.
* **Pareto frontier**: configurations not dominated in (mean cost ↓, accuracy ↑).  ``a`` dominates
  ``b`` when ``cost_a ≤ cost_b`` and ``acc_a ≥ acc_b`` with at least one strict.  Ties: points with
  identical (cost, accuracy) do not dominate each other, so **all copies are kept**; the frontier
  is returned sorted by (cost ↑, accuracy ↓, ``str(id)``).  Points with a NaN coordinate are
  dropped; an infinite cost is allowed (dominated by any finite point at least as accurate).
* **Intelligence per joule** (Saad-Falcon et al., arXiv 2511.07885): accuracy / mean energy per
  query in joules.  Energy is NVML's counter delta and may be missing (``joules is None``); the
  mean is over the records that measured it, and the metric is ``None`` when none did (never 0).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar, get_args

import numpy as np

from budgetlm.errors import invalid
from budgetlm.evals.records import EvalRecord
from budgetlm.io import JsonObject, JsonValue

CostKind = Literal["output_tokens", "total_tokens", "usd", "flops"]
COST_KINDS: tuple[CostKind, ...] = get_args(CostKind)
QuestionKey = tuple[str, str]
"""``(suite, item_id)``."""
ConfigKey = tuple[str, str]
"""``(run, config_id)``."""

K = TypeVar("K", bound=Hashable)

_SUMMARY_COST_ATTR = {
    "output_tokens": "mean_output_tokens",
    "total_tokens": "mean_total_tokens",
    "usd": "mean_usd",
    "flops": "mean_flops",
}

# ------------------------------------------------------------------------------------------------
# keys and small helpers


def question_key(record: EvalRecord) -> QuestionKey:
    """The question a record answers: ``(suite, item_id)``.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> question_key(rec("q1", True, 100))
    ('s', 'q1')
    """
    return (record.suite, record.item_id)


def run_of(record: EvalRecord) -> str:
    """The record's optional extra ``run`` field, ``""`` when absent.

    >>> from budgetlm.evals.records import EvalRecord
    >>> r = EvalRecord(item_id="q1", suite="s", config_id="c", model="m", strategy="sample", correct=True)
    >>> run_of(r), run_of(r.model_copy(update={"run": "greedy-grid"}))
    ('', 'greedy-grid')
    """
    run = getattr(record, "run", None)
    return "" if run is None else str(run)


def config_key(record: EvalRecord) -> ConfigKey:
    """The configuration a record belongs to: ``(run, config_id)``.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> config_key(rec("q1", True, 100))  # no run name
    ('', 'c')
    """
    return (run_of(record), record.config_id)


def _check_cost(cost: str) -> str:
    if cost not in COST_KINDS:
        raise invalid("cost", f"one of {', '.join(COST_KINDS)}", cost, "pick a cost unit a record carries")
    return cost


def record_cost(record: EvalRecord, cost: CostKind = "output_tokens") -> float:
    """One record's cost in the unit ``cost``.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> record_cost(rec("q1", True, 100)), record_cost(rec("q1", True, 100, usd=0.02), "usd")
    (100.0, 0.02)
    """
    _check_cost(cost)
    if cost == "total_tokens":
        return float(record.total_tokens)
    return float(getattr(record, cost))


def _nonempty(records: Iterable[EvalRecord], param: str = "records") -> list[EvalRecord]:
    recs = list(records)
    if not recs:
        raise invalid(param, "a non-empty list of EvalRecord", recs, "pass the records of at least one item")
    return recs


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=float))) if len(values) else 0.0


def _json_key(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _budget_sort_key(budget: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((str(k), float(v)) for k, v in budget.items()))


# ------------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap ``(1 - alpha)`` confidence interval of the mean of ``values``.

    Draws ``n_resamples`` resamples with replacement using ``numpy.random.default_rng(seed)``, so
    the interval is deterministic for a seed.  Empty input gives ``(nan, nan)``; a single value or
    constant values give ``(v, v)``.

    >>> bootstrap_ci([1, 0, 1, 1], seed=0)
    (0.25, 1.0)
    """
    if not isinstance(n_resamples, int) or isinstance(n_resamples, bool) or n_resamples < 1:
        raise invalid("n_resamples", "a positive integer", n_resamples, "pass e.g. n_resamples=1000")
    if not 0.0 < float(alpha) < 1.0:
        raise invalid("alpha", "in (0, 1)", alpha, "pass e.g. alpha=0.05 for a 95% interval")
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high))


# ------------------------------------------------------------------------------------------------
# cost-of-pass


def _cop(costs: Sequence[float], correct: Sequence[float]) -> float:
    acc = _mean(correct)
    return math.inf if acc == 0.0 else _mean(costs) / acc


def cost_of_pass(records: Iterable[EvalRecord], cost: CostKind = "output_tokens") -> float:
    """Cost-of-pass ``v = E[cost] / E[accuracy]`` over ``records``; ``inf`` when none is correct.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> cost_of_pass([rec("q1", True, 100), rec("q2", False, 300)])  # 200 tokens / accuracy 0.5
    400.0
    """
    _check_cost(cost)
    recs = _nonempty(records)
    return _cop([record_cost(r, cost) for r in recs], [float(r.correct) for r in recs])


@dataclass
class FrontierCostOfPass:
    """Frontier cost-of-pass of a set of configurations over a set of problems."""

    mean: float
    """Mean frontier cost-of-pass over the solved problems; ``inf`` when no problem is solved."""
    n_problems: int
    """Problems seen."""
    n_unsolved: int
    """Problems that no configuration solved (their frontier cost is infinite)."""
    per_problem: dict[QuestionKey, float] = field(default_factory=dict)
    """Frontier cost-of-pass of each problem (``inf`` when unsolved)."""
    best_config: dict[QuestionKey, ConfigKey | None] = field(default_factory=dict)
    """Configuration reaching the minimum per problem (ties: smallest key); ``None`` when unsolved."""


def frontier_cost_of_pass(records: Iterable[EvalRecord], cost: CostKind = "output_tokens") -> FrontierCostOfPass:
    """Per problem, the minimum over configurations of their cost-of-pass on it; then averaged.

    Configurations are keyed by :func:`config_key`.  See the module docstring for how unsolved
    problems are reported.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> f = frontier_cost_of_pass([rec("q1", True, 100), rec("q2", False, 300)])
    >>> f.mean, f.n_unsolved
    (100.0, 1)
    """
    _check_cost(cost)
    recs = _nonempty(records)
    groups: dict[QuestionKey, dict[ConfigKey, list[EvalRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        groups[question_key(r)][config_key(r)].append(r)
    per_problem: dict[QuestionKey, float] = {}
    best: dict[QuestionKey, ConfigKey | None] = {}
    for q in sorted(groups):
        cands = sorted((cost_of_pass(rs, cost), ck) for ck, rs in groups[q].items())
        v, ck = cands[0]
        per_problem[q] = v
        best[q] = ck if math.isfinite(v) else None
    finite = [v for v in per_problem.values() if math.isfinite(v)]
    return FrontierCostOfPass(
        mean=_mean(finite) if finite else math.inf,
        n_problems=len(per_problem),
        n_unsolved=len(per_problem) - len(finite),
        per_problem=per_problem,
        best_config=best,
    )


# ------------------------------------------------------------------------------------------------
# token complexity and oracle accuracy


def token_threshold(tokens: Sequence[float], correct: Sequence[bool]) -> float:
    """The τ that best separates correct (``tokens ≥ τ``) from wrong (``< τ``) responses.

    Candidates are the observed token counts and ``inf``; most correctly classified responses
    wins, ties go to the smallest τ.  Empty input gives ``nan``.

    >>> token_threshold([50, 100, 200], [False, True, True])
    100.0
    """
    t = np.asarray(tokens, dtype=float)
    c = np.asarray(correct, dtype=bool)
    if t.shape != c.shape:
        raise invalid("correct", f"as long as tokens ({t.size})", int(c.size), "pass one flag per response")
    if t.size == 0:
        return math.nan
    best_tau, best_hits = math.nan, -1
    for tau in [*sorted(set(t.tolist())), math.inf]:
        hits = int(np.sum((t >= tau) == c))
        if hits > best_hits:  # strict: the first (smallest) τ keeps a tie
            best_tau, best_hits = float(tau), hits
    return best_tau


def token_complexity(records: Iterable[EvalRecord]) -> dict[QuestionKey, float]:
    """Token complexity τ of each question over all its records (errored records left out).

    Pass the records of one model (token complexity is a property of a question *for a model*);
    they may span several configurations / compression levels.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> token_complexity([rec("q1", False, 50), rec("q1", True, 100), rec("q2", True, 30)])
    {('s', 'q1'): 100.0, ('s', 'q2'): 30.0}
    """
    by_q: dict[QuestionKey, list[EvalRecord]] = defaultdict(list)
    for r in records:
        if r.error is None:
            by_q[question_key(r)].append(r)
    return {
        q: token_threshold([r.output_tokens for r in rs], [r.correct for r in rs]) for q, rs in sorted(by_q.items())
    }


def oracle_accuracy(taus: Mapping[QuestionKey, float] | Iterable[float], budget_b: float) -> float:
    """Share of questions an oracle solves at mean token budget ``budget_b``.

    Questions are added in ascending τ while the mean τ of the chosen set stays ≤ ``budget_b``;
    infinite τ is never chosen.  ``taus`` is a mapping (its values are used) or a list of τ.

    >>> round(oracle_accuracy([40, 120, 500], 200), 3)  # two of three questions fit in 200 tokens
    0.667
    """
    vals = list(taus.values()) if isinstance(taus, Mapping) else list(taus)
    if not vals:
        raise invalid("taus", "a non-empty collection of token complexities", vals, "compute token_complexity first")
    if math.isnan(float(budget_b)) or float(budget_b) < 0:
        raise invalid("budget_b", "a non-negative number", budget_b, "pass a mean token budget")
    chosen, total = 0, 0.0
    for tau in sorted(float(v) for v in vals if not math.isnan(float(v))):
        if not math.isfinite(tau) or (total + tau) / (chosen + 1) > budget_b:
            break  # τ ascending: the running mean only grows, so no later question fits either
        chosen, total = chosen + 1, total + tau
    return chosen / len(vals)


def oracle_curve(taus: Mapping[QuestionKey, float] | Iterable[float], budgets: Iterable[float]) -> list[tuple[float, float]]:
    """``(b, oracle_accuracy(taus, b))`` for each budget, sorted by budget.

    >>> [(b, round(a, 3)) for b, a in oracle_curve([40, 120, 500], [100, 1000])]
    [(100.0, 0.667), (1000.0, 1.0)]
    """
    vals = list(taus.values()) if isinstance(taus, Mapping) else list(taus)
    return [(float(b), oracle_accuracy(vals, b)) for b in sorted(budgets)]


# ------------------------------------------------------------------------------------------------
# overthinking outcome efficiency


def _gold_end(text: str, gold: str) -> int | None:
    """End offset of the first standalone occurrence of ``gold`` in ``text`` (case-insensitive)."""
    gold = gold.strip()
    if not gold or not text:
        return None
    m = re.search(r"(?<![\w.])" + re.escape(gold) + r"(?!\w|\.\d)", text, flags=re.IGNORECASE)
    return m.end() if m else None


def first_correct_fraction(record: EvalRecord) -> float:
    """``T̂ / T`` of one correct response (see the module docstring for the estimate).

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> first_correct_fraction(rec("q1", True, 100, gold="4", text="The answer is 4. Let me double-check that again."))
    0.3125
    """
    total = float(record.output_tokens)
    if total <= 0:
        return 1.0
    explicit = getattr(record, "tokens_to_first_correct", None)
    if explicit is not None:
        t_hat = float(explicit)
    else:
        end = _gold_end(record.text, record.gold or "")
        if end is None:
            return 1.0
        thinking = float(min(max(record.thinking_tokens, 0), record.output_tokens))
        t_hat = thinking + (total - thinking) * end / len(record.text)
    return float(min(max(t_hat / total, 0.0), 1.0))


def overthinking_efficiency(records: Iterable[EvalRecord]) -> float:
    """Outcome efficiency ξ_O = mean over responses of ``σ_i · T̂_i / T_i`` (1 = no overthinking).

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> r = rec("q1", True, 100, gold="4", text="The answer is 4. Let me double-check that again.")
    >>> overthinking_efficiency([r, rec("q2", False, 100)])  # (0.3125 + 0) / 2
    0.15625
    """
    recs = _nonempty(records)
    return _mean([first_correct_fraction(r) if r.correct else 0.0 for r in recs])


# ------------------------------------------------------------------------------------------------
# energy


def intelligence_per_joule(records: Iterable[EvalRecord]) -> float | None:
    """Accuracy / mean joules per query; ``None`` when no record measured energy.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> intelligence_per_joule([rec("q1", True, 10, joules=50.0), rec("q2", False, 10, joules=150.0)])  # 0.5 / 100 J
    0.005
    """
    recs = _nonempty(records)
    joules = [float(r.joules) for r in recs if r.joules is not None]
    if not joules or _mean(joules) <= 0:
        return None
    return _mean([float(r.correct) for r in recs]) / _mean(joules)


# ------------------------------------------------------------------------------------------------
# summaries


@dataclass
class SuiteSummary:
    """One configuration's results on one suite."""

    suite: str
    """Suite spec."""
    n: int
    """Records (items) in the suite."""
    accuracy: float
    """Share of correct records."""
    accuracy_ci_low: float
    """Lower end of the 95% bootstrap interval of the accuracy."""
    accuracy_ci_high: float
    """Upper end of the 95% bootstrap interval of the accuracy."""
    mean_output_tokens: float
    """Mean output tokens per item."""
    mean_usd: float
    """Mean dollars per item."""
    truncation_rate: float
    """Share of records whose answer sample hit its token limit."""
    cost_of_pass: float
    """Output tokens per correct answer (``inf`` at zero accuracy)."""


@dataclass
class ConfigSummary:
    """Aggregate results of one configuration (model, strategy, params, budget) of one run."""

    run: str
    """Run name (``""`` when unknown)."""
    config_id: str
    """Configuration hash shared by the records."""
    model: str
    """Backend spec of the model."""
    strategy: str
    """Strategy name."""
    params: dict[str, JsonValue]
    """Strategy parameters."""
    budget: dict[str, float]
    """Per-item budget limits."""
    n: int
    """Records (items) of the configuration; with ``exclude_errors`` only the graded (non-errored) ones."""
    accuracy: float
    """Share of correct records (errored records count as wrong, or are left out with ``exclude_errors``;
    NaN when no record is left)."""
    accuracy_ci_low: float
    """Lower end of the 95% percentile-bootstrap interval of the accuracy."""
    accuracy_ci_high: float
    """Upper end of the 95% percentile-bootstrap interval of the accuracy."""
    mean_score: float
    """Mean grader score."""
    mean_output_tokens: float
    """Mean output tokens per item."""
    median_output_tokens: float
    """Median output tokens per item."""
    mean_prompt_tokens: float
    """Mean input tokens per item."""
    mean_thinking_tokens: float
    """Mean thinking tokens per item."""
    mean_total_tokens: float
    """Mean input + output tokens per item."""
    mean_sequential_tokens: float
    """Mean output tokens on the critical path per item."""
    mean_model_calls: float
    """Mean model calls per item."""
    expensive_call_share: float | None
    """Routing: expensive calls (route to a stronger arm, or agent steps off the cheapest model) per
    model call, from the records' ``details``; ``None`` when no record routes."""
    mean_flops: float
    """Mean FLOPs per item."""
    mean_usd: float
    """Mean dollars per item."""
    mean_joules: float | None
    """Mean measured energy per item over the records that measured it; ``None`` when none did."""
    mean_latency_s: float
    """Mean summed call latency per item."""
    truncation_rate: float
    """Share of records whose answer sample hit its token limit."""
    thinking_truncation_rate: float
    """Share of records whose thinking was cut off."""
    over_budget_rate: float
    """Budget adherence: share of records that spent over budget (must be 0)."""
    n_errors: int
    """Records that could not be run (a configuration with any is kept off the Pareto frontier)."""
    cost_of_pass: dict[str, float]
    """Cost-of-pass in each cost unit (``output_tokens``, ``total_tokens``, ``usd``, ``flops``)."""
    overthinking_efficiency: float
    """Outcome efficiency ξ_O in [0, 1]."""
    intelligence_per_joule: float | None
    """Accuracy per mean joule, ``None`` when energy was not measured."""
    per_suite: dict[str, SuiteSummary] = field(default_factory=dict)
    """Breakdown by suite."""

    @property
    def key(self) -> ConfigKey:
        """``(run, config_id)``."""
        return (self.run, self.config_id)

    def mean_cost(self, cost: CostKind = "output_tokens") -> float:
        """Mean cost per item in the unit ``cost``."""
        return float(getattr(self, _SUMMARY_COST_ATTR[_check_cost(cost)]))

    def to_dict(self) -> JsonObject:
        """Plain-JSON form; infinite or NaN numbers become ``None``."""
        doc: JsonObject = finite_json(asdict(self))
        return doc


def finite_json(obj: Any) -> Any:
    """Replace non-finite floats by ``None`` and tuple keys by ``"a/b"`` so ``json.dumps`` is strict.

    >>> finite_json({"a": float("nan"), "b": [1.0, float("inf")]})
    {'a': None, 'b': [1.0, None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {("/".join(map(str, k)) if isinstance(k, tuple) else k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def _suite_summary(suite: str, recs: list[EvalRecord], n_resamples: int, seed: int) -> SuiteSummary:
    correct = [float(r.correct) for r in recs]
    low, high = bootstrap_ci(correct, n_resamples=n_resamples, seed=seed)
    return SuiteSummary(
        suite=suite,
        n=len(recs),
        accuracy=_mean(correct),
        accuracy_ci_low=low,
        accuracy_ci_high=high,
        mean_output_tokens=_mean([r.output_tokens for r in recs]),
        mean_usd=_mean([r.usd for r in recs]),
        truncation_rate=_mean([float(r.truncated) for r in recs]),
        cost_of_pass=cost_of_pass(recs, "output_tokens"),
    )


def _expensive_share(recs: list[EvalRecord]) -> float | None:
    """Expensive calls over routing decisions (queries routed, or agent model steps)."""
    routed = [r for r in recs if "expensive_calls" in (r.details or {})]
    if not routed:
        return None
    decisions = sum(int(r.details.get("model_steps", 1)) for r in routed)
    return sum(int(r.details["expensive_calls"]) for r in routed) / max(decisions, 1)


def _no_graded_summary(run: str, cid: str, first: EvalRecord, n_errors: int) -> ConfigSummary:
    """A configuration whose every record errored: counts only, NaN figures (never 0 accuracy)."""
    nan = math.nan
    return ConfigSummary(
        run=run, config_id=cid, model=first.model, strategy=first.strategy, params=dict(first.params),
        budget=dict(first.budget), n=0, accuracy=nan, accuracy_ci_low=nan, accuracy_ci_high=nan, mean_score=nan,
        mean_output_tokens=nan, median_output_tokens=nan, mean_prompt_tokens=nan, mean_thinking_tokens=nan,
        mean_total_tokens=nan, mean_sequential_tokens=nan, mean_model_calls=nan, expensive_call_share=None,
        mean_flops=nan, mean_usd=nan, mean_joules=None, mean_latency_s=nan, truncation_rate=nan,
        thinking_truncation_rate=nan, over_budget_rate=0.0, n_errors=n_errors,
        cost_of_pass={c: nan for c in COST_KINDS}, overthinking_efficiency=nan, intelligence_per_joule=None,
    )


def summarize(
    records: Iterable[EvalRecord], run: str | None = None, n_resamples: int = 1000, seed: int = 0,
    *, exclude_errors: bool = False,
) -> list[ConfigSummary]:
    """One :class:`ConfigSummary` per configuration of ``records``.

    Records are grouped by ``(run, config_id)``; ``run`` overrides the records' optional extra
    ``run`` field.  Model, strategy, params and budget come from the group's first record.  The
    result is sorted by (run, model, strategy, params, budget, config_id).

    With ``exclude_errors`` errored records are left out of every figure (``n`` counts the graded
    records, ``n_errors`` the errored ones); a configuration with no graded record gets NaN figures.
    Without it they count as wrong answers with their recorded cost.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(item, ok, tokens, **kw):
    ...     return EvalRecord(item_id=item, suite="s", config_id="c", model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, **kw)
    >>> s = summarize([rec("q1", True, 100), rec("q2", False, 300)])[0]
    >>> s.n, s.accuracy, s.mean_output_tokens
    (2, 0.5, 200.0)
    """
    groups: dict[ConfigKey, list[EvalRecord]] = defaultdict(list)
    for r in records:
        groups[(run if run is not None else run_of(r), r.config_id)].append(r)
    out = []
    for (run_name, cid), all_recs in groups.items():
        n_errors = sum(r.error is not None for r in all_recs)
        recs = [r for r in all_recs if r.error is None] if exclude_errors else all_recs
        if not recs:
            out.append(_no_graded_summary(run_name, cid, all_recs[0], n_errors))
            continue
        first = recs[0]
        correct = [float(r.correct) for r in recs]
        low, high = bootstrap_ci(correct, n_resamples=n_resamples, seed=seed)
        joules = [float(r.joules) for r in recs if r.joules is not None]
        by_suite: dict[str, list[EvalRecord]] = defaultdict(list)
        for r in recs:
            by_suite[r.suite].append(r)
        out.append(
            ConfigSummary(
                run=run_name,
                config_id=cid,
                model=first.model,
                strategy=first.strategy,
                params=dict(first.params),
                budget=dict(first.budget),
                n=len(recs),
                accuracy=_mean(correct),
                accuracy_ci_low=low,
                accuracy_ci_high=high,
                mean_score=_mean([r.score for r in recs]),
                mean_output_tokens=_mean([r.output_tokens for r in recs]),
                median_output_tokens=float(np.median([r.output_tokens for r in recs])),
                mean_prompt_tokens=_mean([r.prompt_tokens for r in recs]),
                mean_thinking_tokens=_mean([r.thinking_tokens for r in recs]),
                mean_total_tokens=_mean([r.total_tokens for r in recs]),
                mean_sequential_tokens=_mean([r.sequential_tokens for r in recs]),
                mean_model_calls=_mean([r.model_calls for r in recs]),
                expensive_call_share=_expensive_share(recs),
                mean_flops=_mean([r.flops for r in recs]),
                mean_usd=_mean([r.usd for r in recs]),
                mean_joules=_mean(joules) if joules else None,
                mean_latency_s=_mean([r.latency_s for r in recs]),
                truncation_rate=_mean([float(r.truncated) for r in recs]),
                thinking_truncation_rate=_mean([float(r.thinking_truncated) for r in recs]),
                over_budget_rate=_mean([float(r.over_budget) for r in recs]),
                n_errors=n_errors,
                cost_of_pass={c: cost_of_pass(recs, c) for c in COST_KINDS},
                overthinking_efficiency=overthinking_efficiency(recs),
                intelligence_per_joule=intelligence_per_joule(recs),
                per_suite={s: _suite_summary(s, rs, n_resamples, seed) for s, rs in sorted(by_suite.items())},
            )
        )
    out.sort(key=lambda s: (s.run, s.model, s.strategy, _json_key(s.params), _budget_sort_key(s.budget), s.config_id))
    return out


# ------------------------------------------------------------------------------------------------
# Pareto frontier and curves


def pareto_frontier(points: Iterable[tuple[K, float, float]]) -> list[K]:
    """Ids of the points ``(id, mean_cost, accuracy)`` not dominated in (cost ↓, accuracy ↑).

    Identical points are all kept; the result is sorted by (cost ↑, accuracy ↓, ``str(id)``).
    Points with a NaN coordinate are ignored.

    >>> pareto_frontier([("a", 100, 0.5), ("b", 200, 0.4), ("c", 300, 0.7)])  # b costs more than a, scores less
    ['a', 'c']
    """
    pts = [(k, float(c), float(a)) for k, c, a in points if not (math.isnan(float(c)) or math.isnan(float(a)))]
    keep = []
    for k, c, a in pts:
        dominated = any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for _, c2, a2 in pts)
        if not dominated:
            keep.append(((c, -a, str(k)), k))
    keep.sort(key=lambda t: t[0])
    return [k for _, k in keep]


def frontier_summaries(summaries: Iterable[ConfigSummary], cost: CostKind = "output_tokens") -> list[ConfigSummary]:
    """The summaries on the Pareto frontier of (mean ``cost`` ↓, accuracy ↑), cheapest first.

    Configurations with errored records (``n_errors > 0``) are never on the frontier.

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(cid, item, ok, tokens):
    ...     return EvalRecord(item_id=item, suite="s", config_id=cid, model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens)
    >>> runs = [rec("cheap", "q1", True, 50), rec("cheap", "q2", False, 50),     # 0.5 at 50 tokens
    ...         rec("costly", "q1", True, 400), rec("costly", "q2", True, 400),  # 1.0 at 400
    ...         rec("wasteful", "q1", True, 500), rec("wasteful", "q2", False, 500)]  # 0.5 at 500: dominated
    >>> [(s.config_id, s.accuracy) for s in frontier_summaries(summarize(runs))]
    [('cheap', 0.5), ('costly', 1.0)]
    """
    by_key = {s.key: s for s in summaries if not s.n_errors}
    return [by_key[k] for k in pareto_frontier((k, s.mean_cost(cost), s.accuracy) for k, s in by_key.items())]


@dataclass
class CurvePoint:
    """One configuration on an accuracy-vs-cost curve."""

    cost: float
    """Mean cost per item."""
    accuracy: float
    """Accuracy."""
    ci_low: float
    """Lower end of the accuracy's 95% interval."""
    ci_high: float
    """Upper end of the accuracy's 95% interval."""
    config_id: str
    """Configuration hash."""
    budget: dict[str, float]
    """The configuration's budget."""


@dataclass
class Curve:
    """Configurations that differ only in budget, ordered by cost."""

    label: str
    """Legend label: run, model, strategy and params."""
    run: str
    """Run name."""
    model: str
    """Backend spec of the model."""
    strategy: str
    """Strategy name."""
    params: dict[str, JsonValue]
    """Strategy parameters."""
    points: list[CurvePoint]
    """Points sorted by (cost, accuracy, config_id)."""


def short_model(model: str) -> str:
    """``"hf:/a/b/model"`` → ``"hf:model"``: a model spec shortened for labels.

    >>> short_model("vllm:Qwen/Qwen3-8B")
    'vllm:Qwen3-8B'
    """
    prefix, sep, rest = model.rpartition(":") if "://" not in model else ("", "", model)
    if "/" in rest:
        rest = rest.rstrip("/").rsplit("/", 1)[-1]
    return f"{prefix}{sep}{rest}"


_PLAIN_PUNCT = frozenset("'\"\\,=[]{}:")
"""Characters that make a string ambiguous in a ``k=v, k=v`` cell, so it is shown quoted."""


def format_value(value: object, *, nested: bool = False) -> str:
    """One parameter value as a table shows it: readable, unambiguous and on one line.

    Numbers as written (``2.0`` → ``2``), ``None``/booleans as Python spells them, plain strings bare
    (``greedy``, ``café``), and strings that are empty or hold whitespace, control characters, quotes or
    separators repr-style with escapes (``'\\n\\n'``, ``'a b'``), so ``delimiter='\\n\\n'`` never renders as
    blank.  Lists and dicts recurse, their strings always quoted (``['a', 'b']``, ``{'k': 1}``).

    >>> format_value(0.5), format_value({"n": 8})
    ('0.5', "{'n': 8}")
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        plain = value and all(c.isprintable() and not c.isspace() and c not in _PLAIN_PUNCT for c in value)
        return value if plain and not nested else repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{format_value(k, nested=True)}: {format_value(v, nested=True)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        inner = ", ".join(format_value(v, nested=True) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    return repr(value) if isinstance(value, bool | None) else str(value)


def curve_label(run: str, model: str, strategy: str, params: Mapping[str, object]) -> str:
    """Human label of a (run, model, strategy, params) group.

    >>> curve_label("run1", "vllm:Qwen/Qwen3-8B", "majority", {"n": 8})
    'run1 · vllm:Qwen3-8B · majority n=8'
    """
    parts = [p for p in (run, short_model(model), strategy) if p]
    label = " · ".join(parts)
    if params:
        label += " " + ",".join(f"{k}={format_value(v)}" for k, v in sorted(params.items()))
    return label


def accuracy_vs_cost_curves(summaries: Iterable[ConfigSummary], cost: CostKind = "output_tokens") -> list[Curve]:
    """Group summaries by (run, model, strategy, params) — all but the budget — ordered by cost.

    Curves are sorted by (run, model, strategy, params).

    >>> from budgetlm.evals.records import EvalRecord
    >>> def rec(cid, out, ok, tokens):
    ...     return EvalRecord(item_id="q1", suite="s", config_id=cid, model="m", strategy="sample", correct=ok,
    ...                       output_tokens=tokens, budget={"output_tokens": out})
    >>> (curve,) = accuracy_vs_cost_curves(summarize([rec("b256", 256, True, 180), rec("b64", 64, False, 64)]))
    >>> curve.label, [(p.cost, p.accuracy, p.budget["output_tokens"]) for p in curve.points]
    ('sample', [(64.0, 0.0, 64.0), (180.0, 1.0, 256.0)])
    """
    _check_cost(cost)
    groups: dict[tuple[str, str, str, str], list[ConfigSummary]] = defaultdict(list)
    for s in summaries:
        groups[(s.run, s.model, s.strategy, _json_key(s.params))].append(s)
    # Labels stay short: the run and model only when several appear, and only the parameters that
    # tell apart curves of the same strategy.
    runs = {k[0] for k in groups}
    models = {k[1] for k in groups}
    by_strategy: dict[str, list[dict[str, JsonValue]]] = defaultdict(list)
    for (_, _, strategy, _), ss in groups.items():
        by_strategy[strategy].append(dict(ss[0].params))
    curves = []
    for (run, model, strategy, _), ss in sorted(groups.items()):
        pts = [
            CurvePoint(s.mean_cost(cost), s.accuracy, s.accuracy_ci_low, s.accuracy_ci_high, s.config_id, dict(s.budget))
            for s in ss
        ]
        pts.sort(key=lambda p: (p.cost, p.accuracy, p.config_id))
        siblings = by_strategy[strategy]
        differing = {k: v for k, v in ss[0].params.items() if any(o.get(k) != v for o in siblings)}
        label = curve_label(run if len(runs) > 1 else "", model if len(models) > 1 else "", strategy, differing)
        curves.append(Curve(label, run, model, strategy, dict(ss[0].params), pts))
    return curves
