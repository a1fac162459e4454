"""DeepConf: confidence-filtered voting with online early stopping (ALGORITHMS.md §11).

Fu, Wang, Tian, Zhao: "Deep Think with Confidence", arXiv 2508.15260 (facebookresearch/deepconf).  Token and
trace confidences are those of :mod:`budgetlm.strategies.confidence`:

* token confidence ``C_i = -(1/k) Σ_{j≤k} log P_i(j)`` over the top-``k`` logprobs (eq. 2);
* group confidence ``C_G = mean of C_i`` over a sliding window of ``window`` tokens (eq. 3);
* trace measures: lowest group (``"lowest"``, eq. 5), bottom-10 % groups (eq. 4), tail, mean.

**Offline** (``mode="offline"``): ``n`` traces in one request; keep the top-``eta`` % of the traces with an answer
by ``measure`` (at least one), then a confidence-weighted majority vote, ``V(a) = Σ_{t: answer(t)=a} C_t``
(eq. 6-7).  ``eta=100`` is plain confidence-weighted majority (``weighted_majority`` with
``scorer="confidence"``).

**Online** (``mode="online"``, the default; Algorithm 2): ``warmup`` traces (``N_init``) run to completion and
vote; the stop threshold is ``s = percentile_{100-eta}`` of their lowest group confidences (``eta=90``: keep
almost every trace; ``eta=10``: aggressive).  Then up to ``n - warmup`` further traces run, ``batch_size`` at a
time, each streamed with its logprobs: as soon as the confidence of its last ``window`` tokens drops below
``s``, the trace is *stopped* — its task is cancelled, the engine aborts the generation and the meter charges
exactly the tokens generated; a stopped trace does not vote.  After every finished trace the problem stops when
the leading answer's weighted share ``β = V(â) / Σ_a V(a) >= tau`` (traces without an answer count in the
denominator); the traces still running are then cancelled the same way.  The answer is the weighted vote of the
finished traces.

``Result.details`` records ``mode``, ``threshold``, ``traces`` (started), ``voted``, ``stopped_traces`` (aborted
for low confidence) and ``tokens_saved_by_stop`` (their ``max_tokens`` minus the tokens they generated before
the stop, an estimate of what running them to the limit would have cost), ``cancelled_traces`` /
``tokens_saved_by_cancel`` (in flight at consensus), ``beta`` and ``stopped`` (``"consensus"``,
``"max_traces"``, ``"budget"`` or ``"no_progress"``).

Deviations from the paper (its traces are ~10k tokens, 512 traces per problem; ours are 10-100 tokens, 8):

* ``window`` is a parameter (default 8 tokens, paper 2048); a trace is checked only once it has ``window``
  tokens (as in the reference implementation);
* without top-k logprobs from the backend, ``C_i`` is the sampled token's logprob (see
  :mod:`budgetlm.strategies.confidence`); threshold and weights then live on that scale;
* the paper keeps 512 traces in flight and checks consensus in batches; we keep ``batch_size`` traces in
  flight and check after every finished trace; trace ``i`` uses seed ``seed + i``;
* with a budget, traces run only while the problem's output-token room affords a full ``max_tokens`` trace
  (the warm-up request is shrunk to fit, as in the voting strategies).
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
from pydantic import Field, field_validator, model_validator

from budgetlm.backends.base import GenerationRequest, GenerationResult, SamplingParams
from budgetlm.backends.streaming import Delta
from budgetlm.errors import BudgetExceeded
from budgetlm.io import JsonObject
from budgetlm.strategies.aggregate import vote
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.strategies.confidence import (
    DEFAULT_K,
    DEFAULT_WINDOW,
    RunningConfidence,
    TopK,
    Window,
    check_measure,
    completion_confidence,
    log_score,
)
from budgetlm.strategies.voting import Sampled, empty_result, make_sampled, plan, room_of, sample_entry, voted_result
from budgetlm.usage import Usage

MODES = ("online", "offline")
"""Valid values of ``mode``."""
STOPPED = ("consensus", "max_traces", "budget", "no_progress")
"""Values of ``Result.details["stopped"]`` (online)."""


class DeepConfParams(StrategyParams):
    """Parameters of :class:`DeepConf`."""

    mode: str = Field(default="online", description="online (warm-up, threshold, early stop) or offline "
                                                    "(n traces, filter, weighted vote).")
    n: int = Field(default=8, ge=1, description="Traces per problem (online: the cap, warm-up included).")
    warmup: int = Field(default=2, ge=1, description="Online warm-up traces N_init that calibrate the threshold.")
    eta: float = Field(default=90.0, gt=0, le=100, description=(
        "Keep-percentage: offline keeps the top eta % traces; online threshold = percentile (100 - eta) of the "
        "warm-up traces' lowest group confidences (90: lenient, 10: aggressive)."))
    tau: float = Field(default=0.95, gt=0, le=1, description="Online consensus: stop when the leading answer's "
                                                              "weighted vote share reaches tau.")
    measure: str = Field(default="lowest", description="Trace confidence for filtering and vote weights: lowest, "
                                                       "bottom10, tail or mean.")
    window: Window = DEFAULT_WINDOW
    k: TopK = DEFAULT_K
    batch_size: int = Field(default=2, ge=1, description="Online traces in flight at once after the warm-up.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens per trace.")
    temperature: float = Field(default=0.7, ge=0, description="Softmax temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed; trace i uses seed + i (None: unseeded).")

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"`mode` must be one of {', '.join(MODES)}, got {v!r}")
        return v

    @field_validator("measure")
    @classmethod
    def _measure(cls, v: str) -> str:
        return check_measure(v, "measure")

    @model_validator(mode="after")
    def _warmup(self) -> DeepConfParams:
        if self.mode == "online" and self.warmup > self.n:
            raise ValueError(f"`warmup` must be <= n ({self.n}) in online mode, got {self.warmup}; lower warmup "
                             "or raise n")
        return self


def threshold(lowest: list[float], eta: float) -> float | None:
    """The online stop threshold: percentile ``100 - eta`` of the warm-up traces' lowest group confidences
    (``None`` without any).

    >>> threshold([1.0, 2.0, 3.0], 50)
    2.0
    """
    return float(np.percentile(lowest, 100 - eta)) if lowest else None


def keep_top(samples: list[Sampled], eta: float) -> list[Sampled]:
    """The top ``eta`` % of the samples with an answer and a score (at least one; ties keep the earlier),
    else every sample."""
    pool = [s for s in samples if s.key is not None and s.score is not None]
    if not pool:
        return samples
    m = max(1, math.ceil(eta / 100 * len(pool) - 1e-9))
    order = sorted(range(len(pool)), key=lambda j: (-(pool[j].score or 0.0), j))[:m]
    return [pool[j] for j in sorted(order)]


def consensus(samples: list[Sampled]) -> tuple[str | None, float]:
    """``(leader, β)``: the answer with the most summed weight and its share of all voters' weight."""
    total = sum(s.weight for s in samples)
    v = vote([s.key for s in samples], [s.weight for s in samples], weighted=True)
    if v.winner is None or total <= 0:
        return None, 0.0
    return v.winner, v.weights[v.winner] / total


class DeepConf(Strategy):
    """Confidence-filtered voting; online, low-confidence traces are aborted in flight (see the module)."""

    name = "deepconf"
    Params = DeepConfParams
    p: DeepConfParams
    mode: str
    n: int
    warmup: int
    eta: float
    tau: float
    measure: str
    window: int
    k: int
    batch_size: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def _sampling(self, n: int, max_tokens: int, index: int) -> SamplingParams:
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                              seed=seed, logprobs=self.k)

    def _sampled(self, g: GenerationResult, problem: Problem, first: int = 0) -> list[tuple[Sampled, float | None]]:
        """Each completion as a sample scored by ``measure``, with its lowest group confidence (the threshold's)."""
        out = []
        for j, c in enumerate(g.completions):
            s = make_sampled(c, first + j, prefix=problem.assistant_prefix)
            value, m = completion_confidence(c, self.measure, self.window, self.k)
            s.score = log_score(value, m)
            out.append((s, completion_confidence(c, "lowest", self.window, self.k)[0]))
        return out

    def _request(self, problem: Problem, n: int, mt: int, index: int) -> GenerationRequest:
        return GenerationRequest(messages=problem.messages, sampling=problem.constrain(self._sampling(n, mt, index)),
                                 id=f"{problem.id}#{index}", assistant_prefix=problem.assistant_prefix)

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        k0 = self.n if self.mode == "offline" else self.warmup
        room = room_of(ctx.meter)
        k, mt = plan(room, k0, self.max_tokens)
        if k == 0:
            return empty_result(problem, Usage.zero(), ctx.meter.stop_reason or "budget exhausted: output_tokens",
                                [{"call": 0, "skipped": "no output tokens left", "room": room}])
        try:
            g = await ctx.generate(self._request(problem, k, mt, 0))
        except BudgetExceeded as exc:
            return empty_result(problem, Usage.zero(), ctx.meter.stop_reason or "budget exhausted",
                                [{"call": 0, "n": k, "skipped": str(exc)}])
        first = self._sampled(g, problem)
        samples = [s for s, _ in first]
        trace: list[JsonObject] = [{"call": 0, "n": k, "max_tokens": g.max_tokens, "clamped_by": g.clamped_by,
                                   "output_tokens": g.usage.output_tokens, "prompt_tokens": g.usage.prompt_tokens,
                                   "warmup": self.mode == "online"}]
        trace += [sample_entry(s, j) for j, s in enumerate(samples)]
        seq = max((s.tokens for s in samples), default=0)
        if self.mode == "offline":
            kept = keep_top(samples, self.eta)
            offline: JsonObject = {"mode": "offline", "traces": len(samples), "voted": len(kept)}
            return self._result(problem, kept, trace, "done", seq, offline)
        s_thr = threshold([lo for _, lo in first if lo is not None], self.eta)
        online: JsonObject = {"mode": "online", "threshold": s_thr, "warmup": len(samples)}
        return await self._online(problem, ctx, samples, trace, s_thr, seq, online)

    async def _online(self, problem: Problem, ctx: Context, samples: list[Sampled], trace: list[JsonObject],
                      s_thr: float | None, seq: int, details: JsonObject) -> Result:
        meter = ctx.meter
        warmup = started = len(samples)
        inflight: dict[asyncio.Task[GenerationResult], tuple[int, int, RunningConfidence]] = {}
        low: dict[int, float] = {}  # trace index -> the group confidence that stopped it
        saved = {"stopped_traces": 0, "tokens_saved_by_stop": 0, "cancelled_traces": 0, "tokens_saved_by_cancel": 0}
        stop: str | None = None
        why: str | None = None
        leader, beta = consensus(samples)
        if leader is not None and beta >= self.tau:
            stop, why = "done", "consensus"
        waves: dict[int, int] = {}
        try:
            while True:
                while stop is None and len(inflight) < self.batch_size:
                    if started >= self.n:
                        why = why or "max_traces"
                        break
                    rm = room_of(meter)
                    if rm is not None and rm < self.max_tokens:
                        why = why or "budget"
                        break
                    task, rc = self._launch(problem, ctx, started, s_thr, low)
                    inflight[task] = (started, self.max_tokens, rc)
                    started += 1
                if not inflight:
                    break
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for t in sorted(done, key=lambda t: inflight[t][0]):
                    idx, mt, rc = inflight.pop(t)
                    wave = (idx - warmup) // self.batch_size
                    if t.cancelled():  # stopped for low confidence
                        saved["stopped_traces"] += 1
                        saved["tokens_saved_by_stop"] += max(0, mt - rc.tokens)
                        waves[wave] = max(waves.get(wave, 0), rc.tokens)
                        trace.append({"call": idx, "stopped": "low confidence", "tokens": rc.tokens,
                                      "group_confidence": low.get(idx), "threshold": s_thr})
                        continue
                    try:
                        g = t.result()
                    except BudgetExceeded as exc:
                        trace.append({"call": idx, "skipped": str(exc), "stop": "budget"})
                        why = why or "budget"
                        if stop is None:
                            stop = meter.stop_reason or "budget exhausted: output_tokens"
                        continue
                    new = self._sampled(g, problem, idx)[0][0]
                    samples.append(new)
                    waves[wave] = max(waves.get(wave, 0), new.tokens)
                    trace.append({"call": idx, "max_tokens": g.max_tokens, "output_tokens": g.usage.output_tokens,
                                  "prompt_tokens": g.usage.prompt_tokens})
                    trace.append(sample_entry(new, len(samples) - 1))
                    if stop is not None:
                        continue
                    leader, beta = consensus(samples)
                    if leader is not None and beta >= self.tau:
                        stop, why = "done", "consensus"
                        trace.append({"samples": len(samples), "stop": "consensus", "beta": beta})
                    elif g.usage.output_tokens == 0:
                        stop, why = "done", "no_progress"
                if stop is not None and inflight:
                    await self._cancel(inflight, saved, low)
        finally:
            if inflight:  # the problem itself was cancelled: abort its traces too
                await self._cancel(inflight, saved, low)
        if why == "budget" and stop is None:
            stop = meter.stop_reason or "budget exhausted: output_tokens"
        leader, beta = consensus(samples)
        details.update(saved, traces=started, voted=len(samples), beta=beta, stopped=why or "max_traces")
        return self._result(problem, samples, trace, stop or "done", seq + sum(waves.values()), details)

    def _launch(self, problem: Problem, ctx: Context, index: int, s_thr: float | None,
                low: dict[int, float]) -> tuple[asyncio.Task[GenerationResult], RunningConfidence]:
        """Start trace ``index`` streamed with logprobs; it cancels itself when its group confidence < ``s_thr``."""
        rc = RunningConfidence(self.window, self.k)
        holder: list[asyncio.Task[GenerationResult]] = []

        def on_delta(d: Delta) -> None:
            g = rc.push(d.logprobs, d.top_logprobs) if (d.logprobs or d.top_logprobs) else None
            if g is not None and s_thr is not None and g < s_thr and holder and index not in low:
                low[index] = g
                holder[0].cancel()  # the engine aborts the generation; the meter charges what was generated

        req = self._request(problem, 1, self.max_tokens, index)
        task = asyncio.ensure_future(ctx.backend.agenerate_one(req, ctx.meter, on_delta=on_delta))
        holder.append(task)
        return task, rc

    @staticmethod
    async def _cancel(inflight: dict[asyncio.Task[GenerationResult], tuple[int, int, RunningConfidence]],
                      saved: dict[str, int], low: dict[int, float]) -> None:
        """Cancel the traces still running (consensus reached, or the problem was cancelled)."""
        tasks = list(inflight)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            idx, mt, rc = inflight[t]
            if t.cancelled():
                kind = "stop" if idx in low else "cancel"  # stopped for low confidence before the consensus
                saved["stopped_traces" if kind == "stop" else "cancelled_traces"] += 1
                saved[f"tokens_saved_by_{kind}"] += max(0, mt - rc.tokens)
        inflight.clear()

    def _result(self, problem: Problem, voters: list[Sampled], trace: list[JsonObject], stop: str, seq: int,
                details: JsonObject) -> Result:
        if not voters:
            r = empty_result(problem, Usage.zero(), stop, trace)
        else:
            v = vote([s.key for s in voters], [s.weight for s in voters], weighted=True)
            r = voted_result(problem, voters, v, v.index, Usage.zero(), stop_reason=stop, sequential_tokens=seq,
                             trace=trace)
        r.details.update(details)
        return r


STRATEGIES.register("deepconf", DeepConf)
