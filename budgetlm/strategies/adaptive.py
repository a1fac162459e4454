"""Adaptive majority voting (ALGORITHMS.md §2; Adaptive-Consistency style, Aggarwal et al. 2023).

Each round sends ONE batched backend call with a request of up to ``batch_size`` samples for every
unsettled problem.  After the round a problem *settles* when the posterior probability that its
current leader (the majority-vote winner, same tie-break as ``majority``) stays the leader reaches
``1 - delta``; otherwise it keeps sampling until ``max_samples`` or its budget share is spent (or a
round generates nothing).  The answer is the plain majority vote over all samples drawn.

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
Each problem's meter keeps its per-problem budget as a hard cap.  Before each round the *room*
of each unsettled problem is its own remaining output tokens and, when the batch budget limits
output tokens, at most an equal share of the batch's remaining output tokens among the
*unsettled* problems: budget left by settled problems (and by samples shorter than
``max_tokens``) is thus redistributed to the unsettled ones at every round.  A problem takes
``min(batch_size, samples left, room // max_tokens)`` samples of ``max_tokens`` (worst case
fits, so nothing is clamped); only its first round may take one shorter sample when not even
one full sample fits.  It stops with ``stop_reason="budget exhausted: output_tokens"`` when its
room affords no further full sample (or the meter refuses a call), and with ``"done"`` when it
settles or reaches ``max_samples``.  ``max_samples=None`` means "what the budget affords" (and
:data:`DEFAULT_MAX_SAMPLES` when nothing limits output tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from budgetlm.backends.base import Backend, GenerationRequest, SamplingParams
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.strategies.aggregate import vote
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy
from budgetlm.strategies.voting import Sampled, empty_result, make_sampled, rooms, sample_entry, voted_result
from budgetlm.usage import Usage

DEFAULT_MAX_SAMPLES = 16
"""Sample cap per problem when ``max_samples=None`` and no output-token limit applies."""


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


class AdaptiveMajority(Strategy):
    """Majority voting that samples in rounds and stops each problem once its leader is settled."""

    name = "adaptive"

    def __init__(
        self,
        batch_size: int = 2,
        max_samples: int | None = None,
        delta: float = 0.05,
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 1.0,
        seed: int | None = None,
        prior: float = 1.0,
        draws: int = 2000,
        rule: str = "posterior",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"`batch_size` must be >= 1, got {batch_size}")
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"`max_samples` must be >= 1 (or None to follow the budget), got {max_samples}")
        if not 0 < delta < 1:
            raise ConfigError(f"`delta` must be in (0, 1), got {delta}")
        if max_tokens < 1:
            raise ConfigError(f"`max_tokens` must be >= 1, got {max_tokens}")
        if not prior > 0:
            raise ConfigError(f"`prior` must be > 0 (Dirichlet concentration), got {prior}")
        if rule not in RULES:
            raise ConfigError(f"`rule` must be one of {', '.join(RULES)}, got {rule!r}")
        if draws < 1:
            raise ConfigError(f"`draws` must be >= 1, got {draws}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"`top_p` must be in (0, 1], got {top_p}")
        if temperature < 0:
            raise ConfigError(f"`temperature` must be >= 0, got {temperature}")
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.delta = delta
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.prior = prior
        self.draws = draws
        self.rule = rule

    def _sampling(self, n: int, max_tokens: int, round: int) -> SamplingParams:
        seed = None if self.seed is None else self.seed + round
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                              seed=seed, logprobs=0)

    def _horizon(self, taken: int, meter: Meter) -> int:
        """Samples the problem would draw without stopping: ``max_samples`` or what its room affords."""
        [room] = rooms([meter])
        afford = None if room is None else taken + room // self.max_tokens
        if self.max_samples is not None:
            return self.max_samples if afford is None else min(self.max_samples, afford)
        return DEFAULT_MAX_SAMPLES if afford is None else afford

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        k = len(problems)
        samples: list[list[Sampled]] = [[] for _ in range(k)]
        usage = [Usage.zero() for _ in range(k)]
        trace: list[list[dict[str, Any]]] = [[] for _ in range(k)]
        seq = [0] * k
        stop: list[str | None] = [None] * k
        active = list(range(k))
        rnd = 0
        while active:
            reqs: list[GenerationRequest] = []
            where: list[int] = []
            for i, room in zip(active, rooms([meters[j] for j in active]), strict=True):
                taken = len(samples[i])
                cap = self.max_samples or (DEFAULT_MAX_SAMPLES if room is None else None)
                left = None if cap is None else cap - taken
                if left is not None and left <= 0:
                    stop[i] = "done"
                    trace[i].append({"round": rnd, "stop": "max_samples"})
                    continue
                b, mt = min(self.batch_size, left or self.batch_size), self.max_tokens
                if room is not None:
                    full = room // self.max_tokens
                    if full >= 1:
                        b = min(b, full)
                    elif taken == 0 and room >= 1:
                        b, mt = 1, room
                    else:
                        stop[i] = meters[i].stop_reason or "budget exhausted: output_tokens"
                        trace[i].append({"round": rnd, "stop": "budget", "room": room})
                        continue
                reqs.append(GenerationRequest(messages=problems[i].messages, sampling=self._sampling(b, mt, rnd),
                                              meter=meters[i], id=problems[i].id))
                where.append(i)
            if not reqs:
                break
            gens = backend.generate(reqs, on_budget_exhausted="skip")
            for i, g in zip(where, gens, strict=True):
                entry: dict[str, Any] = {"round": rnd, "n": g.request.sampling.n, "max_tokens": g.max_tokens,
                                         "clamped_by": g.clamped_by, "output_tokens": g.usage.output_tokens,
                                         "prompt_tokens": g.usage.prompt_tokens}
                if g.skipped or not g.completions:
                    stop[i] = meters[i].stop_reason or "budget exhausted"
                    trace[i].append(entry | {"skipped": g.skipped, "stop": "budget"})
                    continue
                usage[i] = usage[i] + g.usage
                new = [make_sampled(c, rnd) for c in g.completions]
                seq[i] += max(s.tokens for s in new)
                first = len(samples[i])
                samples[i].extend(new)
                keys, weights = [s.key for s in samples[i]], [s.weight for s in samples[i]]
                if self.rule == "posterior":
                    p = leader_probability(keys, weights, prior=self.prior, draws=self.draws, seed=self.seed or 0)
                else:
                    horizon = self._horizon(len(keys), meters[i])
                    p = stay_probability(keys, horizon, weights, prior=self.prior, draws=self.draws,
                                         seed=self.seed or 0)
                    entry["horizon"] = horizon
                entry["p_leader"] = p
                trace[i].append(entry)
                trace[i].extend(sample_entry(s, first + j) for j, s in enumerate(new))
                if entry.get("horizon") is not None and len(keys) >= entry["horizon"]:
                    pass  # horizon reached: the next round stops it for max_samples or budget, as without the rule
                elif p >= 1 - self.delta:
                    stop[i] = "done"
                    trace[i].append({"round": rnd, "stop": "settled", "p_leader": p})
                elif g.usage.output_tokens == 0:  # nothing generated: more rounds would not progress
                    stop[i] = "done"
                    trace[i].append({"round": rnd, "stop": "no_progress"})
            active = [i for i in active if stop[i] is None]
            rnd += 1
        out = []
        for i, p in enumerate(problems):
            reason = stop[i] or "done"
            if not samples[i]:
                out.append(empty_result(p, usage[i], reason, trace[i]))
                continue
            v = vote([s.key for s in samples[i]], [s.weight for s in samples[i]])
            out.append(voted_result(p, samples[i], v, v.index, usage[i], stop_reason=reason,
                                    sequential_tokens=seq[i], trace=trace[i]))
        return out


STRATEGIES.register("adaptive", AdaptiveMajority)
