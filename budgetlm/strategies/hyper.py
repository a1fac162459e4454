"""HyPER: online expand/reduce control of a pool of reasoning paths (ALGORITHMS.md §13).

After "HyPER: Hypothesis Path Expansion and Reduction" (test-time scaling as an online control problem
over a pool of reasoning paths under a fixed budget: explore early by expanding the pool, exploit late by
reducing it, refine at token level instead of resampling whole paths, aggregate answers by length and
confidence).  The paper's abstract leaves the exact rules open; every rule below marked **(ours)** is
this library's choice.

**Paths and steps.**  Each problem keeps a pool of paths, each decoded *step by step*: a step is the next
``step_tokens`` tokens of the path (**ours**: fixed token chunks rather than delimiter steps, so every path
is controllable at the same granularity), requested as its own engine request that continues the path from
token ids (``prompt_token_ids`` = rendered problem + the path's kept tokens; backends without a local
tokenizer continue from text as the assistant prefix).  Every path of every problem is a separate request on
the shared continuous batch, and each path has at most one step in flight.  A path *finishes* when the model
ends its reply (end of sequence) or its kept length reaches ``max_tokens``.

**Statistics** after each step, per path: mean token logprob of the step (``step_conf``) and of the whole
kept path (``conf``); the entropy proxy ``nll = -conf`` (**ours**: engines return the sampled tokens'
logprobs, not full distributions); kept length; the partial answer extracted from the text so far; and
its *agreement*, the share of the other paths with an answer that give the same answer.  The path's
**score** is ``conf + agree_weight * agreement`` (**ours**).

**Controller** (runs after every finished step; ρ is the problem meter's share of budget left,
:meth:`Meter.rho <budgetlm.meter.Meter.rho>`; when the meter limits nothing, ρ is
``1 - spent output tokens / (max_pool * max_tokens)``, **ours**; ρ counts the reservations of steps in flight
as spent, so the controller uses its running minimum and the target never grows back when a step settles below
its reservation, **ours**).  The pool is every path not dropped
(running or finished).  Its target size is (**ours**, the schedule of ALGORITHMS.md §13)::

    k(ρ) = max_pool                                  if ρ >= expand_rho   (explore)
    k(ρ) = max(1, ceil(max_pool * ρ / expand_rho))   otherwise            (exploit: shrinks to 1)

* **Expand** while ``|pool| < k(ρ)`` and the pool is *uncertain*: branch the highest-scoring path
  (one branch per event, at most ``expand_width`` per event, **ours**).  A running path is branched at its
  current end (the branch then samples a different continuation); a finished path at its first
  low-confidence token (logprob below ``refine_threshold``; the path's last token when it has none), so a
  branch never re-generates a prefix.  *Uncertain* (**ours**): the finished paths' answers disagree, or a
  finished path has no answer, and the pool is not *settled* (at least ``settle`` finished paths, all giving
  the same answer).  Partial answers of running paths enter the score (agreement) but not this gate: on the
  benchmark, numbers in unfinished reasoning "disagreed" on almost every problem and grew every pool to
  ``max_pool`` at once.  An agreeing pool is exploited, not
  explored further: easy problems cost about ``k`` paths, hard ones grow towards ``max_pool``.
* **Reduce** while ``|pool| > k(ρ)``: drop the lowest-scoring *running* path (ties: the newest).  Its step
  in flight is cancelled, which aborts it in the engine at once (the tokens it generated are charged, the
  rest of its reservation is released to the other paths).  Finished paths are never dropped: their tokens
  are spent and they still vote (**ours**).  A dropped path is never extended again.
* **Refine** (token level): when a step's mean logprob is below ``refine_threshold`` and the path has
  refined fewer than ``max_refines`` times, the step is cut at its first token whose logprob is below
  ``refine_threshold`` and the path resamples from there: the next request's prompt holds the kept prefix
  (path + the step's tokens before that token), never the whole path from scratch.  Backends without a
  local tokenizer cut at the start of the step (**ours**).
* **Stop** when no path runs and the controller does not expand (the pool is settled or at its target),
  or when the budget affords no further step (``stop_reason="budget exhausted: <unit>"``).

**Answer** (**ours** for the exact weights): a vote over the finished paths (all paths when none finished)
with weight ``exp(conf) * (mean_len / len) ** length_alpha`` per path, i.e. confidence (the geometric-mean
token probability) normalised for length (``length_alpha=0``: confidence only; ``> 0`` favours paths
shorter than the pool's mean).  The winner has the highest summed weight (ties: more votes, then first
seen); the result's text is the winner's highest-weighted path.

``Result.details``: ``pool_trace`` (pool size after every controller event), ``paths`` (paths created),
``expansions``, ``drops``, ``refinements``, ``aborted_steps`` (steps cancelled in flight) and
``tokens_saved_by_abort`` (output tokens reserved for those steps and never generated), plus the largest
pool.  The trace has one entry per finished step with the decisions and every path's statistics.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from budgetlm.backends.base import Backend, GenerationRequest, GenerationResult, SamplingParams
from budgetlm.errors import BudgetExceeded
from budgetlm.io import JsonObject
from budgetlm.meter import Meter
from budgetlm.strategies.aggregate import answer_key, vote
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.strategies.voting import room_of
from budgetlm.usage import Usage


class HyperParams(StrategyParams):
    """Parameters of :class:`Hyper`."""

    k: int = Field(default=4, ge=1, description="Paths the pool starts with.")
    max_pool: int = Field(default=8, ge=1, description="Largest pool (k(ρ) while ρ >= expand_rho).")
    step_tokens: int = Field(default=16, ge=1, description="Tokens per step (the controller acts after each step).")
    max_tokens: int = Field(default=256, ge=1, description="Most kept tokens per path.")
    expand_rho: float = Field(default=0.5, gt=0, le=1, description=(
        "ρ at and above which the pool may grow to max_pool; below it the target shrinks linearly to 1."))
    expand_width: int = Field(default=2, ge=1, description="Most branches per controller event.")
    settle: int = Field(default=3, ge=1, description=(
        "Finished paths that must agree (all of them) before the pool counts as settled and stops expanding."))
    refine_threshold: float = Field(default=-2.0, le=0, description=(
        "Step mean logprob below which a step is refined from its first token below this logprob."))
    max_refines: int = Field(default=1, ge=0, description="Refinements per path (0: never refine).")
    agree_weight: float = Field(default=1.0, ge=0, description="Weight of answer agreement in a path's score.")
    length_alpha: float = Field(default=0.5, ge=0, description=(
        "Length normalisation of the vote: weight exp(conf) * (mean_len / len) ** length_alpha."))
    temperature: float = Field(default=0.7, ge=0, description="Softmax temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed; step j of path i uses seed + 1000 * i + j.")

    @model_validator(mode="after")
    def _pool(self) -> HyperParams:
        if self.k > self.max_pool:
            raise ValueError(f"`k` must be <= max_pool ({self.max_pool}), got {self.k}; "
                             "raise max_pool or start with fewer paths")
        if self.step_tokens > self.max_tokens:
            raise ValueError(f"`step_tokens` must be <= max_tokens ({self.max_tokens}), got {self.step_tokens}; "
                             "lower step_tokens or raise max_tokens")
        return self


@dataclass
class Path:
    """One hypothesis path of the pool."""

    id: int
    ids: list[int] = field(default_factory=list)
    """Kept generated token ids (token-id mode)."""
    text: str = ""
    """Kept generated text."""
    lps: list[float] = field(default_factory=list)
    """Logprob of each kept token."""
    parent: int | None = None
    """The path it was branched from (``None``: an initial path)."""
    branched_at: int = 0
    """Kept tokens it shared with its parent."""
    steps: int = 0
    spent: int = 0
    """Output tokens generated for this path (kept or not)."""
    step_conf: float | None = None
    refines: int = 0
    finished: bool = False
    finish_reason: str | None = None
    dropped: str | None = None
    answer: str | None = None
    agreement: float = 0.0

    @property
    def tokens(self) -> int:
        return len(self.lps)

    @property
    def conf(self) -> float:
        """Mean token logprob of the kept path (0 before any token)."""
        return sum(self.lps) / len(self.lps) if self.lps else 0.0

    @property
    def running(self) -> bool:
        return not self.finished and self.dropped is None

    def score(self, agree_weight: float) -> float:
        return self.conf + agree_weight * self.agreement

    def stats(self) -> JsonObject:
        return {"path": self.id, "tokens": self.tokens, "spent": self.spent, "conf": round(self.conf, 4),
                "step_conf": None if self.step_conf is None else round(self.step_conf, 4),
                "nll": round(-self.conf, 4), "answer": self.answer, "agreement": round(self.agreement, 3),
                "finished": self.finished, "dropped": self.dropped, "refines": self.refines}


def target_size(rho: float, max_pool: int, expand_rho: float) -> int:
    """k(ρ): ``max_pool`` while ρ >= ``expand_rho``, then ``ceil(max_pool * ρ / expand_rho)`` down to 1."""
    if rho >= expand_rho:
        return max_pool
    return max(1, math.ceil(max_pool * max(0.0, rho) / expand_rho))


def first_low(lps: list[float], threshold: float) -> int | None:
    """Index of the first logprob below ``threshold`` (``None``: none)."""
    return next((i for i, lp in enumerate(lps) if lp < threshold), None)


def path_weights(paths: list[Path], length_alpha: float) -> list[float]:
    """Vote weights: ``exp(conf) * (mean_len / len) ** length_alpha`` (confidence normalised for length)."""
    lens = [max(1, p.tokens) for p in paths]
    mean = sum(lens) / len(lens) if lens else 1.0
    return [math.exp(p.conf) * (mean / n) ** length_alpha for p, n in zip(paths, lens, strict=True)]


def aggregate(paths: list[Path], length_alpha: float) -> tuple[str | None, Path | None, JsonObject]:
    """The answer of the pool: weighted vote over finished paths (all paths when none finished).

    Returns ``(answer, the path whose text answers, vote record)``.
    """
    voters = [p for p in paths if p.finished] or list(paths)
    if not voters:
        return None, None, {"voters": 0}
    w = path_weights(voters, length_alpha)
    v = vote([p.answer for p in voters], w, weighted=True)
    if v.winner is None:
        best = max(range(len(voters)), key=lambda i: (w[i], -i))
        return None, voters[best], {"voters": len(voters), "winner": None}
    cands = [i for i, p in enumerate(voters) if p.answer == v.winner]
    best = max(cands, key=lambda i: (w[i], -i))
    return v.winner, voters[best], {"voters": len(voters), "winner": v.winner, "counts": dict(v.counts),
                                    "weights": {a: round(x, 6) for a, x in v.weights.items()}}


class Hyper(Strategy):
    """A pool of step-wise paths that expands while ρ is high and reduces as ρ falls (HyPER)."""

    name = "hyper"
    Params = HyperParams
    p: HyperParams
    k: int
    max_pool: int
    step_tokens: int
    max_tokens: int
    expand_rho: float
    expand_width: int
    settle: int
    refine_threshold: float
    max_refines: int
    agree_weight: float
    length_alpha: float
    temperature: float
    top_p: float
    seed: int | None

    # -------------------------------------------------------------- control
    def rho(self, meter: Meter, limited: bool) -> float:
        """ρ of the controller: the meter's share left, or the nominal pool budget's when nothing is limited."""
        if limited:
            return meter.rho()
        return max(0.0, 1.0 - meter.spent("output_tokens") / (self.max_pool * self.max_tokens))

    def settled(self, paths: list[Path]) -> bool:
        """At least ``settle`` finished paths, all with the same answer."""
        done = [p.answer for p in paths if p.finished and p.dropped is None]
        return len(done) >= self.settle and None not in done and len(set(done)) == 1

    def uncertain(self, paths: list[Path]) -> bool:
        """The pool is worth exploring: not settled, and its finished paths disagree or one has no answer."""
        done = [p for p in paths if p.dropped is None and p.finished]
        if self.settled(done):
            return False
        return len({p.answer for p in done if p.answer is not None}) >= 2 or any(p.answer is None for p in done)

    def _agreement(self, paths: list[Path]) -> None:
        live = [p for p in paths if p.dropped is None]
        for p in live:
            others = [q.answer for q in live if q is not p and q.answer is not None]
            p.agreement = (sum(1 for a in others if a == p.answer) / len(others)) if others and p.answer else 0.0

    # -------------------------------------------------------------- requests
    def _request(self, problem: Problem, root_ids: list[int] | None, path: Path, max_tokens: int) -> GenerationRequest:
        seed = None if self.seed is None else self.seed + 1000 * path.id + path.steps
        sp = SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=max_tokens,
                            seed=seed, logprobs=0)
        rid = f"{problem.id}/hyper{path.id}.{path.steps}"
        if root_ids is not None:
            return GenerationRequest(prompt_token_ids=root_ids + path.ids, sampling=sp, id=rid)
        return GenerationRequest(messages=problem.messages, assistant_prefix=path.text or None, sampling=sp, id=rid)

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        meter = ctx.meter
        backend = ctx.backend
        _, ids = backend.render(GenerationRequest(messages=problem.messages))
        root_ids = list(ids) if ids else None
        limited = any(m.budget.limits() for m in _chain(meter))
        paths: list[Path] = [Path(i) for i in range(self.k)]
        inflight: dict[asyncio.Task[GenerationResult | BudgetExceeded], tuple[Path, int]] = {}
        trace: list[JsonObject] = []
        pool_trace: list[int] = []
        counts = {"expansions": 0, "drops": 0, "refinements": 0, "aborted_steps": 0, "tokens_saved_by_abort": 0}
        seq: dict[int, int] = {}  # path id -> output tokens on its own chain (branches inherit the parent's)
        stop: str | None = None
        events = 0
        rho_min = 1.0  # ρ as a running minimum: settling a step below its reservation never regrows the target

        async def abort(path: Path) -> None:
            for t, (q, mt) in list(inflight.items()):
                if q is path:
                    before = meter.spent("output_tokens")
                    t.cancel()
                    out = (await asyncio.gather(t, return_exceptions=True))[0]
                    del inflight[t]
                    gen = int(meter.spent("output_tokens") - before)
                    if isinstance(out, GenerationResult):
                        self._apply(path, out, root_ids is not None, backend)
                        continue
                    path.spent += gen
                    counts["aborted_steps"] += 1
                    counts["tokens_saved_by_abort"] += max(0, mt - gen)

        def launch() -> bool:
            """Start a step for every running path without one; False when the budget refused all of them."""
            todo = [p for p in paths if p.running and all(q is not p for q, _ in inflight.values())]
            if not todo:
                return True
            room = room_of(meter)
            if room is not None:
                if room < 1:
                    return False
                todo.sort(key=lambda p: -p.score(self.agree_weight))
                todo = todo[: max(1, room)]
            cap = self.step_tokens if room is None else min(self.step_tokens, max(1, room // len(todo)))
            share = None
            if len(todo) >= 2:
                prompt = sum(len(root_ids or []) + p.tokens for p in todo)
                share = meter.fair_share(len(todo), prompt, may_think=backend.thinking.enabled)
            launched = False
            for p in todo:
                mt = max(1, min(cap, self.max_tokens - p.tokens))
                req = self._request(problem, root_ids, p, mt)
                inflight[asyncio.ensure_future(_generate(ctx, req, share))] = (p, mt)
                launched = True
            return launched

        try:
            launch()
            while inflight:
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                decisions: list[JsonObject] = []
                refused = None
                for t in sorted(done, key=lambda t: inflight[t][0].id):
                    path, _ = inflight.pop(t)
                    g = t.result()
                    if isinstance(g, BudgetExceeded):
                        refused = meter.stop_reason or str(g)
                        decisions.append({"refused": path.id, "why": str(g)})
                        continue
                    n_before = path.tokens
                    cut = self._apply(path, g, root_ids is not None, backend)
                    base = seq.get(path.parent, 0) if path.id not in seq and path.parent is not None else seq.get(path.id, 0)
                    seq[path.id] = base + len(g.first.token_ids)
                    if cut is not None:
                        counts["refinements"] += 1
                        decisions.append({"refine": path.id, "kept": cut, "from": n_before,
                                          "step_conf": path.step_conf})
                self._agreement(paths)
                rho = rho_min = min(rho_min, self.rho(meter, limited))
                target = target_size(rho, self.max_pool, self.expand_rho)
                pool = [p for p in paths if p.dropped is None]
                # reduce: drop the lowest-scoring running paths (aborting their steps in flight)
                while len(pool) > target:
                    running = [p for p in pool if p.running]
                    if not running:
                        break
                    worst = min(running, key=lambda p: (p.score(self.agree_weight), -p.id))
                    worst.dropped = f"reduced (rho={rho:.3f}, target {target})"
                    counts["drops"] += 1
                    await abort(worst)
                    decisions.append({"drop": worst.id, "score": round(worst.score(self.agree_weight), 4)})
                    pool.remove(worst)
                # expand: branch the highest-scoring paths while below target and not settled
                added, used = 0, set()  # one branch per source path per event, never of a fresh branch
                while len(pool) < target and added < self.expand_width and self.uncertain(paths) \
                        and refused is None and ((room := room_of(meter)) is None or room >= 1):
                    srcs = [p for p in pool if p.id not in used]
                    if not srcs:
                        break
                    src = max(srcs, key=lambda p: (p.score(self.agree_weight), -p.id))
                    used.add(src.id)
                    new = self._branch(src, len(paths), backend, root_ids is not None)
                    if new is None:
                        break
                    seq[new.id] = seq.get(src.id, 0)
                    paths.append(new)
                    pool.append(new)
                    used.add(new.id)
                    added += 1
                    counts["expansions"] += 1
                    decisions.append({"expand": src.id, "new": new.id, "at": new.branched_at})
                pool_trace.append(len(pool))
                events += 1
                trace.append({"event": events, "rho": round(rho, 4), "target": target, "pool": len(pool),
                              "running": sum(1 for p in pool if p.running), "decisions": decisions,
                              "paths": [p.stats() for p in paths if p.dropped is None]})
                if refused is not None and not inflight:
                    stop = refused
                    break
                if not launch() and not inflight:
                    if any(p.running for p in paths):
                        stop = meter.stop_reason or "budget exhausted: output_tokens"
                    break
        finally:
            if inflight:  # the problem was cancelled (or failed): abort every step still in flight
                for p in {q.id: q for q, _ in inflight.values()}.values():
                    await abort(p)
        answer, pick, record = aggregate([p for p in paths if p.dropped is None] or paths, self.length_alpha)
        trace.append({"final": record, "path": None if pick is None else pick.id})
        return Result(problem_id=problem.id, text="" if pick is None else pick.text, answer=answer,
                      usage=Usage.zero(), stop_reason=stop or "done",
                      finish_reason=None if pick is None else pick.finish_reason,
                      truncated=bool(pick and pick.finish_reason == "length"),
                      sequential_tokens=max(seq.values(), default=0), trace=trace,
                      details={"pool_trace": pool_trace, "paths": len(paths), "max_pool": max(pool_trace, default=0),
                               **counts})

    # -------------------------------------------------------------- path updates
    def _apply(self, path: Path, g: GenerationResult, from_ids: bool, backend: Backend) -> int | None:
        """Add a finished step to ``path`` (refining it when unconfident); returns the kept length after a cut."""
        c = g.first
        toks = list(c.token_ids)
        lps = list(c.logprobs or [0.0] * len(toks))
        path.spent += len(toks)
        path.steps += 1
        path.step_conf = (sum(lps) / len(lps)) if lps else None
        if from_ids and any(t < 0 for t in toks):
            from_ids = False
        cut: int | None = None
        if (path.step_conf is not None and path.step_conf < self.refine_threshold
                and path.refines < self.max_refines):
            j = first_low(lps, self.refine_threshold) if from_ids else 0
            j = 0 if j is None else j
            path.refines += 1
            if from_ids:
                path.ids += toks[:j]
                path.text = backend.decode(path.ids)
            path.lps += lps[:j]
            cut = path.tokens
        else:
            if from_ids:
                path.ids += toks
                path.text = backend.decode(path.ids)
            else:
                path.text += c.text
            path.lps += lps
            if c.finish_reason != "length" or path.tokens >= self.max_tokens:
                path.finished = True
                path.finish_reason = c.finish_reason
        path.answer = answer_key(path.text)
        return cut

    def _branch(self, src: Path, new_id: int, backend: Backend, from_ids: bool) -> Path | None:
        """A new path sharing ``src``'s prefix: its end when running, before its first low-confidence token
        when finished (its last token when it has none); ``None`` when there is nothing to branch from."""
        if src.running:
            n = src.tokens
        else:
            j = first_low(src.lps, self.refine_threshold)
            n = (src.tokens - 1) if j is None else j
            n = max(0, n)
        if not from_ids:
            n = 0 if not src.running else n  # text mode: a finished path can only be branched from the start
        new = Path(new_id, parent=src.id, branched_at=n, lps=src.lps[:n])
        if from_ids:
            new.ids = src.ids[:n]
            new.text = backend.decode(new.ids)
        elif n:
            new.text = src.text
        new.answer = answer_key(new.text) if new.text else None
        return new


def _chain(meter: Meter) -> list[Meter]:
    out: list[Meter] = []
    m: Meter | None = meter
    while m is not None:
        out.append(m)
        m = m.parent
    return out


async def _generate(ctx: Context, req: GenerationRequest, share: int | None) -> GenerationResult | BudgetExceeded:
    try:
        return await ctx.generate(req, share=share)
    except BudgetExceeded as exc:
        return exc


STRATEGIES.register("hyper", Hyper)
