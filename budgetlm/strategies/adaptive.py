"""Adaptive majority voting (ALGORITHMS.md §2; Adaptive-Consistency style, Aggarwal et al. 2023).

Each problem keeps up to ``batch_size`` single samples in flight on the shared engine (each its own
request, so each can be cancelled).  Every time a sample finishes, the problem *settles* when the
posterior probability that its current leader (the majority-vote winner, same tie-break as
``majority``) stays the leader reaches ``1 - delta``; it then cancels the samples still running
(the engine aborts them; their partial output is charged, and ``Result.details`` records
``cancelled_samples`` and ``tokens_saved_by_cancel``, the reserved tokens never generated).

Scores: each sample's score is its mean token logprob (``scorer="logprob"``) or, with ``scorer="confidence"``,
the log of its DeepConf trace confidence (:mod:`budgetlm.strategies.confidence`; ``confidence_measure`` over
windows of ``confidence_window`` tokens, ``confidence_k`` logprobs per token).  Scores break ties of the vote;
with ``weighted=True`` the answer is the one with the highest summed weight ``exp(score)`` (confidence-weighted
majority) while the stop rule still counts votes.
Otherwise it keeps sampling until ``max_samples`` or its budget share is spent (or a sample
generates nothing).  The answer is the plain majority vote over the finished samples.
Deviation from the lockstep original: the check runs after each sample, not after each round of
``batch_size`` samples (but not before ``min_samples`` samples, default ``batch_size``, have finished:
checking after a single sample settled most problems on one draw and cost 0.17 accuracy on the
arithmetic benchmark), and sample ``i`` uses seed ``seed + i``.

Stop rules (``rule``), both on a Dirichlet posterior over the answer distribution:

* ``"posterior"`` (default) — Adaptive-Consistency's rule (Aggarwal et al. 2023): P(the leader's category has
  the largest share of the answer distribution), with one "other" category (unseen answers and
  unanswered samples, ``prior + unanswered``).  With ``prior=1`` a unanimous first batch of ``b``
  samples gives ``P = 1 - 2**-(b+1)``: ``b >= 4`` settles at ``delta=0.05``.
* ``"predictive"`` — P(the current leader is still the leader of the vote over the
  *horizon*), the number of samples the problem would draw without stopping (``max_samples``, or
  what its output-token room still affords).  Categories: each observed answer (``count + prior``),
  one not-yet-seen answer (``prior``) and "no extractable answer" (``prior + unanswered``, which can
  never win).  Monte Carlo: draw answer distributions from the posterior, draw the remaining
  samples from each (Dirichlet-multinomial), and count the draws where no other answer (seen, or
  the new one) ends with more votes than the leader; a tie counts as half a win (the tie-break by summed
  score may go either way).  When the
  leader's lead exceeds the samples left the outcome is *decided* and P = 1 exactly, so even
  ``delta → 0`` stops decided problems early — losslessly: the answer equals plain majority over
  the horizon.  Measured on 400 arithmetic items with the default model (``docs/benchmarks.md``),
  the two rules trace the same accuracy-vs-tokens curve (predictive δ=0.1: 0.390 at 154 tokens;
  posterior δ=0.25: 0.395 at 158), so the cited rule stays the default.

Monte Carlo uses ``draws`` draws from ``numpy.random.default_rng(seed)`` (``seed`` or 0, re-seeded
at every check, so the rule is deterministic given the counts), and the estimate is the
rule-of-succession ``(wins + 1) / (draws + 2)``: finite draws cannot certify more than that, so
``delta < 1 / (draws + 2)`` settles only decided problems (predictive) or none (posterior); the
result then equals plain majority over ``max_samples`` samples.

Budget and reallocation (Snell et al. 2408.03314: spend where the problem is still uncertain).
Each problem's meter keeps its per-problem budget as a hard cap.  Before each sample the *room*
of each unsettled problem is its own remaining output tokens and, when the batch budget limits
output tokens, at most an equal share of the batch's remaining output tokens among the
*unsettled* problems: budget left by settled problems (and by samples shorter than
``max_tokens``) is thus redistributed to the unsettled ones at every round.  A problem takes
``min(batch_size, samples left, room // max_tokens)`` samples of ``max_tokens`` (worst case
fits, so nothing is clamped); only its first round may take one shorter sample when not even
one full sample fits.  It stops with ``stop_reason="budget exhausted: output_tokens"`` when its
room affords no further full sample (or the meter refuses a call), and with ``"done"`` when it
settles or reaches ``max_samples``.

Sample cap (``max_samples``, default :data:`DEFAULT_MAX_SAMPLES` = 16).  Adaptive voting is meant
to spend *less* than fixed-``n`` majority on easy problems and somewhat more on hard ones, so a
user expects it to cost about as much as majority voting, not the whole budget.  Uncapped
(``max_samples=None``, "what the budget affords"), it did not: on the arithmetic benchmark with a
budget, problems whose answers never agree (the hard ones, where more votes help least) kept
sampling until their budget ran out — 29.6 samples on average, up to 63, 3.2x majority@8's tokens
for no significant accuracy gain.  16 is twice :data:`~budgetlm.strategies.voting.DEFAULT_N` (8,
majority's default): an unsettled problem may take twice majority@8's samples, so the worst case
costs at most 2x majority@8 while settled problems stop after ``min_samples``.  The published
"82 % of majority@8's tokens" figure used ``max_samples=8``; pass ``max_samples=None`` explicitly
to get the old behaviour (the cap is then the budget, or 16 when nothing limits output tokens).

Why each problem stopped is recorded in ``Result.details`` (and so in the eval records):
``stopped`` is ``"settled"`` (the stop rule ``stop_rule`` reached ``1 - delta`` after ``samples``
samples; ``p_leader`` is the last probability), ``"max_samples"`` (the cap), ``"budget"`` (no
further sample fits the budget, or the meter refused a call) or ``"no_progress"`` (a sample
generated nothing); ``samples`` is the number of finished samples that voted and
``max_samples`` the cap that applied (``None``: the budget).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Self

import numpy as np
from pydantic import Field, field_validator, model_validator

from budgetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams
from budgetlm.errors import BudgetExceeded
from budgetlm.io import JsonObject
from budgetlm.meter import Meter
from budgetlm.strategies.aggregate import vote
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.strategies.confidence import ConfidenceParams, ConfidenceScoring
from budgetlm.strategies.voting import (
    Sampled,
    empty_result,
    make_sampled,
    room_of,
    sample_entry,
    score_confidence,
    voted_result,
)
from budgetlm.usage import Usage

DEFAULT_MAX_SAMPLES = 16
"""Default sample cap per problem (``max_samples``), and the cap when ``max_samples=None`` and no output-token
limit applies: twice majority's default ``n`` (see the module docstring for why)."""

STOPPED = ("settled", "max_samples", "budget", "no_progress")
"""Values of ``Result.details["stopped"]``: why a problem stopped sampling."""


def leader_probability(answers: Sequence[str | None], weights: Sequence[float] | None = None, *, prior: float = 1.0,
                       draws: int = 2000, seed: int = 0) -> float:
    """Posterior probability that the majority leader of ``answers`` has the largest share.

    Dirichlet(counts + prior, with an "other" category of ``prior`` + unanswered samples);
    Monte-Carlo estimate ``(wins + 1) / (draws + 2)``; 0 when no sample has an answer.
    """
    v = vote(list(answers), list(weights) if weights is not None else None)
    if v.winner is None:
        return 0.0
    keys = list(v.counts)
    lead = keys.index(v.winner)
    unanswered = sum(1 for a in answers if a is None)
    alpha = np.array([v.counts[k] for k in keys] + [unanswered], dtype=float) + prior
    x = np.random.default_rng(seed).dirichlet(alpha, size=draws)
    others = np.delete(x, lead, axis=1).max(axis=1)
    wins = int(np.sum(x[:, lead] > others))
    return (wins + 1) / (draws + 2)


def stay_probability(answers: Sequence[str | None], horizon: int, weights: Sequence[float] | None = None, *,
                     prior: float = 1.0, draws: int = 2000, seed: int = 0) -> float:
    """Posterior predictive probability that the leader of ``answers`` still leads after ``horizon`` samples.

    1.0 when no sample is left or the lead exceeds the samples left (decided); 0 when no sample has
    an answer; else the Dirichlet-multinomial Monte-Carlo estimate ``(wins + 1) / (draws + 2)``.
    """
    v = vote(list(answers), list(weights) if weights is not None else None)
    if v.winner is None:
        return 0.0
    left = horizon - len(answers)
    if left <= 0:
        return 1.0
    keys = list(v.counts)
    lead = keys.index(v.winner)
    counts = np.array([v.counts[k] for k in keys], dtype=float)
    runner_up = np.delete(counts, lead).max() if len(keys) > 1 else 0.0
    if counts[lead] - runner_up > left:
        return 1.0
    unanswered = sum(1 for a in answers if a is None)
    alpha = np.concatenate([counts + prior, [prior, prior + unanswered]])
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(alpha, size=draws)
    future = rng.multinomial(left, x)
    total = np.concatenate([counts, [0.0, 0.0]]) + future
    rivals = np.delete(total[:, :-1], lead, axis=1)  # seen answers and the new one; "no answer" never wins
    best_rival = rivals.max(axis=1)
    wins = float(np.sum(total[:, lead] > best_rival)) + 0.5 * float(np.sum(total[:, lead] == best_rival))
    return (wins + 1) / (draws + 2)


RULES = ("predictive", "posterior")
"""Valid values of ``rule``."""
SCORERS = ("logprob", "confidence")
"""Valid values of ``scorer``."""


class _AdaptiveFields(StrategyParams):
    """``adaptive``'s own parameters (:class:`AdaptiveParams` adds the trace-confidence ones)."""

    batch_size: int = Field(default=2, ge=1, description="Samples of a problem in flight at once.")
    max_samples: int | None = Field(default=DEFAULT_MAX_SAMPLES, ge=1, description=(
        "Sample cap per problem (default 16, twice majority's default n: unsettled problems cost at most 2x "
        "majority@8 instead of the whole budget); None: what the budget affords (16 without an output-token limit)."))
    min_samples: int | None = Field(default=None, ge=1, description=(
        "Samples that must finish before the stop rule may settle a problem (None: batch_size)."))
    delta: float = Field(default=0.05, gt=0, lt=1, description="Stop when P(leader stays) >= 1 - delta.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens per sample.")
    temperature: float = Field(default=0.7, ge=0, description="Softmax temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed; sample i uses seed + i.")
    prior: float = Field(default=1.0, gt=0, description="Dirichlet concentration of the posterior.")
    draws: int = Field(default=2000, ge=1, description="Monte Carlo draws per check.")
    rule: str = Field(default="posterior", description="Stop rule: posterior or predictive.")
    scorer: str = Field(default="logprob", description="Sample scores: logprob (mean token logprob) or confidence "
                                                       "(DeepConf trace confidence).")
    weighted: bool = Field(default=False, description="Answer by summed weight exp(score) instead of by count.")

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        if v not in SCORERS:
            raise ValueError(f"`scorer` must be one of {', '.join(SCORERS)}, got {v!r}")
        return v

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str) -> str:
        if v not in RULES:
            raise ValueError(f"`rule` must be one of {', '.join(RULES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _samples(self) -> Self:
        if self.min_samples is not None and self.max_samples is not None and self.min_samples > self.max_samples:
            raise ValueError(f"`min_samples` must be <= max_samples ({self.max_samples}), got {self.min_samples}; "
                             "lower min_samples or raise max_samples (None: what the budget affords)")
        return self


class AdaptiveParams(ConfidenceParams, _AdaptiveFields):
    """Parameters of :class:`AdaptiveMajority`."""


class AdaptiveMajority(ConfidenceScoring, Strategy):
    """Majority voting that samples until each problem's leader is settled, cancelling what is left."""

    name = "adaptive"
    Params = AdaptiveParams
    p: AdaptiveParams
    batch_size: int
    max_samples: int | None
    min_samples: int | None
    delta: float
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    prior: float
    draws: int
    rule: str
    scorer: str
    weighted: bool

    def _sampling(self, n: int, max_tokens: int, index: int) -> SamplingParams:
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                              seed=seed, logprobs=self.confidence_k if self.scorer == "confidence" else 0)

    def _horizon(self, taken: int, meter: Meter) -> int:
        """Samples the problem would draw without stopping: ``max_samples`` or what its room affords."""
        room = room_of(meter)
        afford = None if room is None else taken + room // self.max_tokens
        if self.max_samples is not None:
            return self.max_samples if afford is None else min(self.max_samples, afford)
        return DEFAULT_MAX_SAMPLES if afford is None else afford

    def _next(self, taken: int, meter: Meter) -> tuple[int, str | None]:
        """``(max_tokens, None)`` for the next sample, or ``(0, why)`` when none may start now."""
        room = room_of(meter)
        cap = self.max_samples or (DEFAULT_MAX_SAMPLES if room is None else None)
        if cap is not None and taken >= cap:
            return 0, "max_samples"
        if room is None or room >= self.max_tokens:
            return self.max_tokens, None
        if taken == 0 and room >= 1:
            return room, None
        return 0, "budget"

    def _p_leader(self, samples: list[Sampled], meter: Meter) -> tuple[float, int | None]:
        """``(P(leader stays), horizon)``; the horizon (samples it would draw) only for the predictive rule."""
        keys, weights = [s.key for s in samples], [s.weight for s in samples]
        if self.rule == "posterior":
            return leader_probability(keys, weights, prior=self.prior, draws=self.draws, seed=self.seed or 0), None
        horizon = self._horizon(len(keys), meter)
        return stay_probability(keys, horizon, weights, prior=self.prior, draws=self.draws,
                                seed=self.seed or 0), horizon

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        meter = ctx.meter
        samples: list[Sampled] = []
        trace: list[JsonObject] = []
        inflight: dict[asyncio.Task[GenerationResult], tuple[int, int]] = {}  # task -> (sample index, max_tokens)
        started = 0
        stop: str | None = None
        stopped: JsonObject = {}  # why it stopped: Result.details["stopped"] and friends
        saved: dict[str, int] = {"cancelled_samples": 0, "generated_before_cancel": 0, "tokens_not_generated": 0}
        try:
            while True:
                while stop is None and len(inflight) < self.batch_size:
                    mt, why = self._next(started, meter)
                    if why is not None:
                        if not inflight:
                            stop = "done" if why == "max_samples" else (
                                meter.stop_reason or "budget exhausted: output_tokens")
                            stopped.setdefault("stopped", why)
                            trace.append({"call": started, "stop": why, "room": room_of(meter)})
                        break
                    req = GenerationRequest(messages=problem.messages, sampling=problem.constrain(self._sampling(1, mt, started)),
                                            id=f"{problem.id}#{started}", assistant_prefix=problem.assistant_prefix)
                    inflight[asyncio.ensure_future(ctx.generate(req))] = (started, mt)
                    started += 1
                if not inflight:
                    break
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for t in sorted(done, key=lambda t: inflight[t][0]):
                    idx, mt = inflight.pop(t)
                    try:
                        g = t.result()
                    except BudgetExceeded as exc:
                        trace.append({"call": idx, "skipped": str(exc), "stop": "budget"})
                        if stop is None and not inflight:
                            stop = meter.stop_reason or "budget exhausted"
                            stopped.setdefault("stopped", "budget")
                        started -= 1 if idx == started - 1 else 0
                        continue
                    new = make_sampled(g.first, idx, prefix=problem.assistant_prefix)
                    if self.scorer == "confidence":
                        score_confidence([new], self.confidence_measure, self.confidence_window, self.confidence_k)
                    samples.append(new)
                    entry: JsonObject = {"call": idx, "max_tokens": g.max_tokens, "clamped_by": g.clamped_by,
                                             "output_tokens": g.usage.output_tokens,
                                             "prompt_tokens": g.usage.prompt_tokens}
                    if stop is not None:  # finished beside the sample that settled it: it still votes
                        trace.append(entry)
                        trace.append(sample_entry(new, len(samples) - 1))
                        continue
                    p, horizon = self._p_leader(samples, meter)
                    if horizon is not None:
                        entry["horizon"] = horizon
                    entry["p_leader"] = p
                    trace.append(entry)
                    trace.append(sample_entry(new, len(samples) - 1))
                    if horizon is not None and len(samples) >= horizon:
                        pass  # horizon reached: max_samples or the budget stops it, as without the rule
                    elif len(samples) >= (self.min_samples or self.batch_size) and p >= 1 - self.delta:
                        stop = "done"
                        stopped.update(stopped="settled", stop_rule=self.rule, p_leader=p)
                        trace.append({"samples": len(samples), "stop": "settled", "p_leader": p})
                    elif g.usage.output_tokens == 0:  # nothing generated: more samples would not progress
                        stop = "done"
                        stopped.update(stopped="no_progress")
                        trace.append({"samples": len(samples), "stop": "no_progress"})
                if stop is not None and inflight:
                    await self._cancel(inflight, meter, saved)
        finally:
            if inflight:  # the problem itself was cancelled: abort its samples too
                await self._cancel(inflight, meter, saved)
        if saved["cancelled_samples"]:
            trace.append({"cancelled": saved})
        reason = stop or "done"
        waves: dict[int, int] = {}
        for s in samples:
            waves[s.round // self.batch_size] = max(waves.get(s.round // self.batch_size, 0), s.tokens)
        stopped = {"stopped": stopped.get("stopped", "budget" if reason != "done" else "max_samples"), **stopped,
                   "samples": len(samples), "max_samples": self.max_samples}
        if not samples:
            r = empty_result(problem, Usage.zero(), reason, trace)
            r.details.update(stopped)
            return r
        v = vote([s.key for s in samples], [s.weight for s in samples], weighted=self.weighted)
        r = voted_result(problem, samples, v, v.index, Usage.zero(), stop_reason=reason,
                         sequential_tokens=sum(waves.values()), trace=trace)
        r.details.update(stopped)
        r.details["cancelled_samples"] = saved["cancelled_samples"]
        r.details["tokens_saved_by_cancel"] = saved["tokens_not_generated"]
        return r

    @staticmethod
    async def _cancel(inflight: dict[asyncio.Task[GenerationResult], tuple[int, int]], meter: Meter,
                      saved: dict[str, int]) -> None:
        """Cancel the samples still running (the engine aborts them; their partial output is charged)."""
        before = meter.spent("output_tokens")
        tasks = list(inflight)
        budgeted = sum(mt for _, mt in inflight.values())
        for t in tasks:
            t.cancel()
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        finished = [o for o in outs if isinstance(o, GenerationResult)]
        generated = int(meter.spent("output_tokens") - before) - sum(o.usage.output_tokens for o in finished)
        n_cancelled = sum(1 for o in outs if isinstance(o, asyncio.CancelledError))
        saved["cancelled_samples"] += n_cancelled
        saved["generated_before_cancel"] += max(0, generated)
        saved["tokens_not_generated"] += max(0, budgeted - sum(
            mt for t, (_, mt) in inflight.items() if isinstance(outs[tasks.index(t)], GenerationResult)) - generated)
        inflight.clear()


STRATEGIES.register("adaptive", AdaptiveMajority)
