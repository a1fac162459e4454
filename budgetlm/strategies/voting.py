"""The voting family (ALGORITHMS.md §2): best-of-N, majority and weighted majority.

All three draw ``n`` samples per problem as one request with ``n`` samples on the shared engine
(charged to the problem's meter) and differ only in how they pick the answer:

* ``best_of_n`` — the sample with the highest score (ties: first sample); samples without an
  extractable answer only win when no sample has one;
* ``majority`` — the mode of the normalised answers (:func:`~budgetlm.strategies.aggregate.vote`:
  ties go to the highest summed weight, then to the answer seen first);
* ``weighted_majority`` — the answer with the highest summed weight.

Scores (``scorer``), all log-probabilities, and computed per sample:

* ``"logprob"`` — the sample's mean token log-probability (free: generation asks for logprobs);
* ``"verifier"`` — the mean log-probability of the sample's answer text as the reply to the
  problem under a separate ``verifier`` backend (a reward model; a spec string is loaded with
  :func:`budgetlm.backends.load`);
* ``"self_eval"`` — the log-probability that the *same* backend answers ``"Yes"`` to "Is this
  answer correct? Answer Yes or No." after the problem and the sample;
* ``"confidence"`` — DeepConf's local trace confidence (:mod:`budgetlm.strategies.confidence`):
  ``confidence_measure`` (lowest / bottom-10 % group, tail or mean) of the token confidences
  ``-mean(top-k logprobs)`` over windows of ``confidence_window`` tokens (free: generation asks for
  ``confidence_k`` logprobs per token); the score is its log, so the vote weight is the confidence.

Verifier and self-eval scoring calls are charged to the problem's meter (as prompt tokens); when
the budget cannot afford them, the sample falls back to its mean token logprob (noted in the
trace).  Votes are weighted by ``exp(score)`` (the geometric-mean token probability, or the
probability of "Yes"), so weights are positive and more votes never lower an answer's weight;
mean logprobs themselves are negative and could not be summed as weights.

Budget: with ``n=None`` each problem takes as many samples of ``max_tokens`` as its output-token
room affords (at least one; :data:`DEFAULT_N` when nothing limits output tokens).  The room is
the problem's own remaining output tokens and, when the batch budget limits output tokens, at
most an equal share of the batch's remaining output tokens among the problems still running, so
the first problems of a batch cannot starve the last.  With a fixed ``n`` that does not fit, ``max_tokens`` shrinks to
``room // n`` (and ``n`` to ``room`` when even one token per sample does not fit).  A problem
whose budget affords no call gets a :class:`~budgetlm.strategies.base.Result` with an empty
answer and ``stop_reason`` set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Self

from pydantic import Field, field_validator, model_validator

from budgetlm.backends.base import Backend, Completion, GenerationRequest, Message, SamplingParams
from budgetlm.errors import BudgetExceeded, ConfigError
from budgetlm.io import JsonObject
from budgetlm.meter import Meter
from budgetlm.strategies.aggregate import Vote, action_key, vote
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.strategies.confidence import ConfidenceParams, ConfidenceScoring, completion_confidence, log_score
from budgetlm.usage import Usage

SCORERS = ("logprob", "verifier", "self_eval", "confidence")
"""Valid values of ``scorer``."""
DEFAULT_N = 8
"""Samples per problem when ``n=None`` and no output-token limit applies."""
SELF_EVAL_QUESTION = "Is this answer correct? Answer Yes or No."
SELF_EVAL_YES = "Yes"
"""Continuation scored for self-evaluation (the reply starts right after the assistant header)."""


# ---------------------------------------------------------------------------------------------
# helpers shared with the adaptive strategy
@dataclass
class Sampled:
    """One sample with its extracted answer and score."""

    completion: Completion
    text: str
    """The answer text (thinking removed; empty when thinking was cut off)."""
    key: str | None
    """The normalised answer (``None`` when there is none)."""
    score: float | None = None
    """The scorer's log-score (``None`` when unavailable)."""
    round: int = 0

    @property
    def weight(self) -> float:
        """``exp(score)``: the vote weight (0 without a score)."""
        return 0.0 if self.score is None else math.exp(self.score)

    @property
    def tokens(self) -> int:
        return len(self.completion.token_ids)


def make_sampled(c: Completion, round: int = 0, prefix: str | None = None) -> Sampled:
    """A sample of ``c``; ``prefix`` (the request's ``assistant_prefix``) is put back in front of its text."""
    text = "" if c.thinking_truncated else (prefix or "") + c.answer
    return Sampled(c, text, action_key(text), c.mean_logprob, round)


def own_room(meter: Meter) -> float | None:
    """Output tokens left under the meter's *own* limit (ancestors ignored; ``None``: no limit)."""
    lim = meter.budget.output_tokens
    return None if lim is None else lim - meter.spent("output_tokens") - meter.reserved("output_tokens")


def room_of(meter: Meter) -> int | None:
    """Output-token room of a problem's meter now: its own remaining output tokens, capped by an equal
    share of its parent's remaining output tokens among the parent's active children (``None``:
    unlimited), so the first problems of a batch cannot starve the last."""
    cands = []
    own = own_room(meter)
    if own is not None:
        cands.append(own)
    parent = meter.parent
    if parent is not None:
        br = parent.remaining("output_tokens")
        if br is not None:
            k = sum(1 for c in parent.children if c.active) or 1
            cands.append(br / k)
    return None if not cands else max(0, math.floor(min(cands)))


def plan(room: int | None, n: int | None, max_tokens: int, default_n: int = DEFAULT_N) -> tuple[int, int]:
    """``(samples, max_tokens)`` for one request within ``room`` output tokens; ``(0, 0)``: none fit."""
    if room is None:
        return (n or default_n), max_tokens
    if room < 1:
        return 0, 0
    k = max(1, room // max_tokens) if n is None else min(n, room)
    return k, min(max_tokens, room // k)


def sample_entry(s: Sampled, index: int) -> JsonObject:
    """The trace entry of one sample: its answer text (``text``, what the vote and the grader read; empty when
    thinking was cut off), normalised answer, score, output tokens (thinking included) and finish reason, so a
    run can be audited and re-graded (``budgetlm regrade``) without generating anything."""
    e: JsonObject = {"sample": index, "round": s.round, "answer": s.key, "score": s.score, "weight": s.weight,
         "tokens": s.tokens, "finish_reason": s.completion.finish_reason, "text": s.text}
    if s.completion.thinking_tokens:
        e["thinking_tokens"] = s.completion.thinking_tokens
    if s.completion.thinking_truncated:
        e["thinking_truncated"] = True
    return e


def score_confidence(samples: list[Sampled], measure: str, window: int, k: int) -> JsonObject:
    """Set each sample's score to the log of its trace confidence ``measure`` (free: from its logprobs); samples
    without logprobs keep their score.  Returns the trace entry (which token-confidence mode was used)."""
    modes: dict[str, int] = {}
    for s in samples:
        value, m = completion_confidence(s.completion, measure, window, k)
        if value is not None:
            s.score = log_score(value, m)
            modes[m] = modes.get(m, 0) + 1
    return {"score": "confidence", "measure": measure, "window": window, "k": k, "modes": modes}


def empty_result(p: Problem, usage: Usage, reason: str, trace: list[JsonObject]) -> Result:
    return Result(p.id, "", None, usage, stop_reason=reason, trace=trace)


def voted_result(p: Problem, samples: list[Sampled], v: Vote, idx: int | None, usage: Usage, *, stop_reason: str,
                 sequential_tokens: int, trace: list[JsonObject]) -> Result:
    """The result of a vote: the text of sample ``idx`` (first sample when ``None``), answer = winner."""
    s = samples[idx if idx is not None else 0]
    trace = trace + [{"vote": {"winner": v.winner, "index": idx, "counts": dict(v.counts),
                               "weights": dict(v.weights), "samples": len(samples)}}]
    return Result(
        problem_id=p.id, text=s.text, answer=v.winner, usage=usage, stop_reason=stop_reason,
        finish_reason=s.completion.finish_reason, truncated=s.completion.truncated,
        thinking_truncated=s.completion.thinking_truncated, sequential_tokens=sequential_tokens, trace=trace,
    )


# ---------------------------------------------------------------------------------------------
class _VotingFields(StrategyParams):
    """The voting strategies' own parameters (:class:`VotingParams` adds the trace-confidence ones)."""

    n: int | None = Field(default=None, ge=1, description="Samples per problem; None: what the budget affords.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens per sample.")
    temperature: float = Field(default=0.7, ge=0, description="Softmax temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed (None: unseeded).")
    scorer: str = Field(default="logprob", description="How samples are scored: logprob, verifier, self_eval or "
                                                       "confidence (DeepConf trace confidence).")
    verifier: Backend | str | None = Field(default=None, description="The verifier backend (a Backend or a spec "
                                                                     "string) for scorer='verifier'.")

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        if v not in SCORERS:
            raise ValueError(f"unknown scorer {v!r}; valid: {', '.join(SCORERS)}")
        return v

    @model_validator(mode="after")
    def _needs_verifier(self) -> Self:
        if self.scorer == "verifier" and self.verifier is None:
            raise ValueError("scorer='verifier' needs `verifier`: a Backend or a backend spec string")
        return self


class VotingParams(ConfidenceParams, _VotingFields):
    """Parameters of the voting strategies (``best_of_n``, ``majority``, ``weighted_majority``)."""


class _Voting(ConfidenceScoring, Strategy):
    """N samples per problem in one request; subclasses pick the winner."""

    weighted: ClassVar[bool] = False
    Params = VotingParams
    p: VotingParams
    n: int | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    scorer: str
    verifier: Backend | str | None

    def setup(self) -> None:
        self._verifier: Backend | None = None

    # -------------------------------------------------------------- scoring
    def _verifier_backend(self) -> Backend:
        if self._verifier is None:
            from budgetlm.backends import load

            if self.verifier is None:
                raise ConfigError("scorer='verifier' needs `verifier`: a Backend or a backend spec string")
            self._verifier = load(self.verifier)
        return self._verifier

    async def score(self, p: Problem, samples: list[Sampled], ctx: Context) -> list[JsonObject]:
        """Set each sample's score with ``self.scorer`` (charged to the problem's meter); returns trace entries."""
        if self.scorer == "logprob":
            return []
        if self.scorer == "confidence":
            return [score_confidence(samples, self.confidence_measure, self.confidence_window, self.confidence_k)]
        todo = [s for s in samples if s.text.strip()]
        if not todo:
            return []
        if self.scorer == "verifier":
            scorer = self._verifier_backend()
            pairs: list[tuple[list[Message], str]] = [(p.messages, s.text) for s in todo]
        else:
            scorer = ctx.backend
            pairs = [(p.messages + [{"role": "assistant", "content": s.text},
                                    {"role": "user", "content": SELF_EVAL_QUESTION}], SELF_EVAL_YES) for s in todo]
        try:
            scored = await ctx.score_batch(pairs, backend=scorer)
        except BudgetExceeded as exc:
            return [{"score": self.scorer, "fallback": "logprob", "reason": str(exc)}]
        for s, r in zip(todo, scored, strict=True):
            s.score = r.mean if self.scorer == "verifier" else r.total
        return [{"score": self.scorer, "pairs": len(todo), "prompt_tokens": sum(r.usage.prompt_tokens for r in scored),
                 "calls": sum(r.usage.calls for r in scored)}]

    # -------------------------------------------------------------- picking
    def pick(self, samples: list[Sampled]) -> tuple[Vote, int | None]:
        """The vote and the index of the sample whose text answers."""
        v = vote([s.key for s in samples], [s.weight for s in samples], weighted=self.weighted)
        return v, v.index

    # -------------------------------------------------------------- running
    def sampling(self, n: int, max_tokens: int, round: int = 0) -> SamplingParams:
        seed = None if self.seed is None else self.seed + round
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                              seed=seed, logprobs=self.confidence_k if self.scorer == "confidence" else 0)

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        room = room_of(ctx.meter)
        k, mt = plan(room, self.n, self.max_tokens)
        if k == 0:
            return empty_result(problem, Usage.zero(), ctx.meter.stop_reason or "budget exhausted: output_tokens",
                                [{"call": 0, "skipped": "no output tokens left", "room": room}])
        req = GenerationRequest(messages=problem.messages, sampling=problem.constrain(self.sampling(k, mt)), id=problem.id,
                                assistant_prefix=problem.assistant_prefix)
        try:
            g = await ctx.generate(req)
        except BudgetExceeded as exc:
            return empty_result(problem, Usage.zero(), ctx.meter.stop_reason or "budget exhausted",
                                [{"call": 0, "n": k, "skipped": str(exc)}])
        call: JsonObject = {"call": 0, "n": g.request.sampling.n, "max_tokens": g.max_tokens,
                            "clamped_by": g.clamped_by, "output_tokens": g.usage.output_tokens,
                            "prompt_tokens": g.usage.prompt_tokens}
        samples = [make_sampled(c, prefix=problem.assistant_prefix) for c in g.completions]
        s_trace = await self.score(problem, samples, ctx)
        v, idx = self.pick(samples)
        trace = [call, *s_trace, *(sample_entry(s, j) for j, s in enumerate(samples))]
        return voted_result(problem, samples, v, idx, g.usage, stop_reason="done",
                            sequential_tokens=max(s.tokens for s in samples), trace=trace)


class BestOfN(_Voting):
    """``n`` samples; the answer of the highest-scoring one."""

    name = "best_of_n"

    def pick(self, samples: list[Sampled]) -> tuple[Vote, int | None]:
        v = vote([s.key for s in samples], [s.weight for s in samples])
        pool = [j for j, s in enumerate(samples) if s.key is not None] or list(range(len(samples)))
        best = max(pool, key=lambda j: (-math.inf if samples[j].score is None else samples[j].score, -j))
        return Vote(samples[best].key, best, v.counts, v.weights), best


class Majority(_Voting):
    """``n`` samples; the most frequent answer (ties: highest summed weight, then first seen)."""

    name = "majority"


class WeightedMajority(_Voting):
    """``n`` samples; the answer with the highest summed weight ``exp(score)``."""

    name = "weighted_majority"
    weighted = True


STRATEGIES.register("best_of_n", BestOfN)
STRATEGIES.register("majority", Majority)
STRATEGIES.register("weighted_majority", WeightedMajority)
