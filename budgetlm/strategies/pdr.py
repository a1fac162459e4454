"""Parallel-Distill-Refine (PDR) and Sequential Refinement (SR), ALGORITHMS.md §3 (arXiv 2510.01123).

Each problem runs its own rounds on the shared engine, independently of the other problems in
flight.  For rounds ``r = 1..R``:

1. **Draft.**  ``M`` drafts conditioned on the workspace ``W_{r-1}`` (no workspace at ``r = 1``),
   drawn in parallel as one request with ``n=M`` samples (the prompt is charged once).
   From round 2 on the prompt is the original question followed by
   ``"Here are notes from previous attempts:\\n{W}\\nUse them to write an improved solution..."``.
2. **Distill** the round's drafts into a new textual workspace ``W_r`` of *at most*
   ``workspace_tokens`` (``w``) tokens, counted with :meth:`Backend.count_tokens`; anything longer
   is cut by tokens (``encode``/``decode``), re-checked until it fits, so the bound always holds.
   Variants (``distill``):

   * ``"topk"``: the ``topk`` drafts with the best score (mean token logprob), each introduced by
     its extracted answer and cut to an equal share of ``w`` (no model call);
   * ``"summary"``: the model writes one summary of all drafts (``max_tokens <= w``);
   * ``"per_draft"``: the model summarises each draft separately (``max_tokens`` about ``w // M``
     each, less the ``"Attempt i: "`` header), the ``M`` summaries running concurrently; each
     summary is cut to ``w // M`` tokens with its header, and the concatenation is bounded by ``w``
     again.

   The final round is not distilled (its workspace would never be read).
3. The next round refines, conditioned on ``W_r``.

The answer is the last round's majority (:func:`~budgetlm.strategies.aggregate.vote`, ties by
summed score) or, with ``final="best"``, its best-scored draft.  SR is PDR with ``M = 1``.

**Budget planning.**  Before each round the problem's output-token room is split evenly over the
rounds still to run (the final round gets all that is left, and whatever an earlier round leaves
unspent carries over), so that the final round can still run when the budget allows it.  The room
is the problem's own remaining output tokens and, when a batch budget limits output tokens, at
most an equal share of the batch's remaining output tokens among the problems still running
(:func:`~budgetlm.strategies.voting.room_of`).  In a round that is distilled by the model, up to
half of that round's share (at most what the distillation can use) is held for the distillation
call; the rest is split over the ``M`` drafts (``max_tokens`` per draft is the smaller of this
share and ``max_tokens``).  If a model-written distillation cannot be afforded, the round falls
back to the ``topk`` workspace, which costs nothing.  Other units (input/total tokens, FLOPs,
dollars, time) are not planned but are enforced by the meter, which clamps or refuses every call,
so spend never exceeds the budget.  When the budget runs out the strategy stops and answers with
the latest round that produced an answer, with ``stop_reason = "budget exhausted: <unit>"``.

**Reporting.**  ``Result.usage`` is the total spend (the problem meter's total);
``Result.sequential_tokens`` is the critical path: per round the longest draft plus the
distillation's output (for ``per_draft`` the longest per-draft summary, since those run in
parallel), summed over rounds.  ``Result.trace`` has one entry per round with the drafts (answer
keys, tokens, scores), the workspace text, its token count and the distillation call's tokens.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

from pydantic import Field

from budgetlm.answers import extract_answer
from budgetlm.backends.base import Backend, Completion, GenerationRequest, GenerationResult, Message, SamplingParams
from budgetlm.errors import BudgetExceeded
from budgetlm.io import JsonObject
from budgetlm.strategies.aggregate import answer_key, vote
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.strategies.voting import room_of
from budgetlm.usage import Usage

REFINE_PROMPT = (
    "{question}\n\nHere are notes from previous attempts:\n{workspace}\n"
    "Use them to write an improved solution. Check the notes for mistakes, then solve the problem "
    "and state the final answer."
)
"""Draft prompt of rounds ``r >= 2`` (``{question}`` is the problem's last user message)."""

SUMMARY_PROMPT = (
    "{question}\n\nHere are {m} candidate solutions to the problem above:\n\n{drafts}\n\n"
    "Summarize the candidate solutions in at most {w} tokens: the key steps, the answers they reach, "
    "and any mistakes. Do not solve the problem again."
)
"""Distillation prompt of ``distill="summary"``."""

PER_DRAFT_PROMPT = (
    "{question}\n\nHere is one attempt at the problem above:\n\n{draft}\n\n"
    "Summarize this attempt in at most {w} tokens: its key steps and its final answer."
)
"""Distillation prompt of ``distill="per_draft"`` (one per draft)."""


def truncate_to_tokens(backend: Backend, text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` tokens of ``backend`` (re-checked after decoding)."""
    if limit <= 0 or not text:
        return ""
    if backend.count_tokens(text) <= limit:
        return text
    ids = backend.encode(text)
    cut = min(len(ids), limit)
    while cut > 0:
        out = backend.decode(ids[:cut])
        excess = backend.count_tokens(out) - limit
        if excess <= 0:
            return out
        cut -= max(1, excess)
    return ""


class SequentialRefinementParams(StrategyParams):
    """Parameters of :class:`SequentialRefinement` (PDR with one draft per round)."""

    rounds: int = Field(default=2, ge=1, strict=True, description="Draft-distill-refine rounds R.")
    workspace_tokens: int = Field(default=256, ge=1, strict=True, description="Workspace bound w in tokens.")
    distill: Literal["summary", "topk", "per_draft"] = Field(default="topk", description=(
        "How drafts become the workspace: topk (no call), summary (one model summary), per_draft (one per draft)."))
    topk: int = Field(default=2, ge=1, strict=True, description="Drafts kept by distill='topk'.")
    max_tokens: int = Field(default=256, ge=1, strict=True, description="Most tokens per draft.")
    temperature: float = Field(default=0.7, ge=0, strict=True, description="Softmax temperature; 0 is greedy.")
    seed: int | None = Field(default=None, strict=True, description="Sampling seed (None: unseeded).")
    final: Literal["majority", "best"] = Field(default="majority", description=(
        "The answer: the last round's majority or its best-scored draft."))


class ParallelDistillRefineParams(SequentialRefinementParams):
    """Parameters of :class:`ParallelDistillRefine`."""

    drafts: int = Field(default=4, ge=1, strict=True, description="Parallel drafts M per round.")


@dataclass
class _Draft:
    completion: Completion
    text: str
    key: str | None
    score: float | None

    @property
    def tokens(self) -> int:
        return len(self.completion.token_ids)

    @property
    def content(self) -> str:
        """What later prompts see of the draft (the answer part, else the thinking)."""
        c = self.completion
        return c.answer if c.answer.strip() else c.thinking


@dataclass
class _State:
    problem: Problem
    question: str
    workspace: str | None = None
    drafts: list[_Draft] = field(default_factory=list)
    answered: list[_Draft] = field(default_factory=list)
    """The latest round's drafts that gave an answer (the best answer so far comes from them)."""
    sequential: int = 0
    trace: list[JsonObject] = field(default_factory=list)
    stop_reason: str = "done"
    distill_share: int | None = None


class ParallelDistillRefine(Strategy):
    """PDR: rounds of ``drafts`` parallel drafts distilled into a bounded workspace (see module doc)."""

    name = "pdr"
    Params: ClassVar[type[SequentialRefinementParams]] = ParallelDistillRefineParams
    p: SequentialRefinementParams
    rounds: int
    drafts: int
    workspace_tokens: int
    distill: Literal["summary", "topk", "per_draft"]
    topk: int
    max_tokens: int
    temperature: float
    seed: int | None
    final: Literal["majority", "best"]

    # ------------------------------------------------------------------ planning
    def _distill_need(self) -> int:
        """Output tokens a model-written distillation may use for one problem."""
        w, m = self.workspace_tokens, self.drafts
        if self.distill == "summary":
            return w
        if self.distill == "per_draft":
            return m * max(1, w // m)
        return 0

    def _plan(self, st: _State, ctx: Context, rnd: int) -> int:
        """Per-draft ``max_tokens`` of round ``rnd``; sets ``st.distill_share`` for the distillation."""
        last = rnd == self.rounds
        need = 0 if last else self._distill_need()
        rem = room_of(ctx.meter)
        if rem is None:
            st.distill_share = None if need else 0
            return self.max_tokens
        share = rem if last else rem // (self.rounds - rnd + 1)
        st.distill_share = min(need, share // 2)
        per = (share - st.distill_share) // self.drafts
        return max(1, min(self.max_tokens, per))

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def _with_question(problem: Problem, content: str) -> list[Message]:
        """The problem's messages with the last user message replaced by ``content``."""
        msgs = [dict(m) for m in problem.messages]
        for i in range(len(msgs) - 1, -1, -1):
            if msgs[i].get("role") == "user":
                msgs[i] = {**msgs[i], "content": content}
                return msgs
        return msgs + [{"role": "user", "content": content}]

    def _draft_messages(self, st: _State) -> list[Message]:
        if st.workspace is None:
            return list(st.problem.messages)
        return self._with_question(st.problem, REFINE_PROMPT.format(question=st.question, workspace=st.workspace))

    def _sampling(self, n: int, max_tokens: int, rnd: int, salt: int = 0) -> SamplingParams:
        seed = None if self.seed is None else self.seed + 1000 * salt + rnd
        return SamplingParams(n=n, temperature=self.temperature, max_tokens=max_tokens, logprobs=0, seed=seed)

    @staticmethod
    async def _try(ctx: Context, req: GenerationRequest) -> GenerationResult | None:
        """One call on the problem's meter; ``None`` when the budget refuses it."""
        try:
            return await ctx.generate(req)
        except BudgetExceeded:
            return None

    # ------------------------------------------------------------------ distillation
    def _topk_workspace(self, backend: Backend, drafts: list[_Draft]) -> str:
        w = self.workspace_tokens
        ranked = sorted(drafts, key=lambda d: -math.inf if d.score is None else d.score, reverse=True)
        chosen = ranked[: min(self.topk, len(ranked))]
        if not chosen:
            return ""
        each = max(1, w // len(chosen))
        parts = []
        for i, d in enumerate(chosen, 1):
            head = f"Attempt {i} (answer: {d.key if d.key is not None else 'none'}):\n"
            parts.append(truncate_to_tokens(backend, head + d.content.strip(), each))
        return truncate_to_tokens(backend, "\n\n".join(p for p in parts if p), w)

    async def _distill(self, ctx: Context, st: _State, rnd: int) -> None:
        """Set the problem's workspace from its drafts (model-written: one call, or one per draft, concurrent)."""
        backend, w = ctx.backend, self.workspace_tokens
        entry = st.trace[-1]
        entry.update(distill=self.distill, distill_output_tokens=0, distill_prompt_tokens=0)
        share = st.distill_share
        k = len(st.drafts)
        reqs: list[GenerationRequest] = []
        if self.distill == "summary" and (share is None or share >= 1):
            mt = w if share is None else min(w, share)
            drafts = "\n\n".join(f"Candidate {i}:\n{d.content.strip()}" for i, d in enumerate(st.drafts, 1))
            content = SUMMARY_PROMPT.format(question=st.question, m=k, drafts=drafts, w=w)
            reqs.append(GenerationRequest(messages=self._with_question(st.problem, content),
                                          sampling=self._sampling(1, mt, rnd, salt=1),
                                          id=f"{st.problem.id}/r{rnd}/summary"))
        elif self.distill == "per_draft" and k:
            # each "Attempt i: <summary>" part gets an equal share of w, header included
            per = max(1, w // k - backend.count_tokens(f"Attempt {k}: "))
            if share is None or share // k >= 1:
                mt = per if share is None else min(per, share // k)
                for i, d in enumerate(st.drafts):
                    content = PER_DRAFT_PROMPT.format(question=st.question, draft=d.content.strip(), w=mt)
                    reqs.append(GenerationRequest(messages=self._with_question(st.problem, content),
                                                  sampling=self._sampling(1, mt, rnd, salt=2 + i),
                                                  id=f"{st.problem.id}/r{rnd}/draft{i}"))
        if not reqs:
            if self.distill != "topk":
                entry["distill_fallback"] = "topk (no budget for a model-written distillation)"
            self._set_workspace(backend, st, self._topk_workspace(backend, st.drafts))
            return
        gens = await asyncio.gather(*(self._try(ctx, r) for r in reqs))
        ran = [g for g in gens if g is not None and g.completions]
        entry["distill_output_tokens"] = sum(g.usage.output_tokens for g in ran)
        entry["distill_prompt_tokens"] = sum(g.usage.prompt_tokens for g in ran)
        entry["distill_calls"] = len(ran)
        st.sequential += max((len(g.first.token_ids) for g in ran), default=0)  # per-draft summaries run in parallel
        if not ran:
            entry["distill_fallback"] = "topk (the distillation call was refused by the budget)"
            self._set_workspace(backend, st, self._topk_workspace(backend, st.drafts))
            return
        if self.distill == "summary":
            text = ran[0].first.answer.strip()
        else:
            each = max(1, w // k)
            text = "\n".join(truncate_to_tokens(backend, f"Attempt {i}: {g.first.answer.strip()}", each)
                             for i, g in enumerate(gens, 1) if g is not None and g.completions)
        self._set_workspace(backend, st, truncate_to_tokens(backend, text, w))

    def _set_workspace(self, backend: Backend, st: _State, text: str) -> None:
        n = backend.count_tokens(text) if text else 0
        if n > self.workspace_tokens:  # defensive: the bound must hold whatever the tokenizer does
            text = ""
            n = 0
        st.workspace = text
        st.trace[-1].update(workspace=text, workspace_tokens=n)

    # ------------------------------------------------------------------ answering
    def _pick(self, drafts: list[_Draft]) -> _Draft | None:
        if not drafts:
            return None
        if self.final == "best":
            pool = [d for d in drafts if d.key is not None] or drafts
            return max(pool, key=lambda d: -math.inf if d.score is None else d.score)
        v = vote([d.key for d in drafts], [0.0 if d.score is None else d.score for d in drafts])
        return drafts[v.index] if v.index is not None else drafts[0]

    def _result(self, st: _State) -> Result:
        d = self._pick(st.answered or st.drafts)
        empty = Result(problem_id=st.problem.id, text="", answer=None, usage=Usage.zero(), stop_reason=st.stop_reason,
                       sequential_tokens=st.sequential, trace=st.trace)  # usage: the base sets the meter's total
        if d is None:
            return empty
        return replace(empty, text=d.text, answer=extract_answer(d.text).text if d.text else None,
                       finish_reason=d.completion.finish_reason, truncated=d.completion.truncated,
                       thinking_truncated=d.completion.thinking_truncated)

    # ------------------------------------------------------------------ one problem
    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        users = [x for x in problem.messages if x.get("role") == "user"]
        st = _State(problem, users[-1]["content"] if users else "")
        for rnd in range(1, self.rounds + 1):
            req = GenerationRequest(messages=self._draft_messages(st),
                                    sampling=self._sampling(self.drafts, self._plan(st, ctx, rnd), rnd),
                                    id=f"{problem.id}/r{rnd}")
            entry: JsonObject = {"round": rnd, "workspace_in_tokens": (
                ctx.backend.count_tokens(st.workspace) if st.workspace else 0)}
            st.trace.append(entry)
            try:
                g = await ctx.generate(req)
            except BudgetExceeded as exc:
                entry.update(skipped=str(exc), drafts=[])
                st.stop_reason = ctx.meter.stop_reason or str(exc) or "budget exhausted"
                break
            if not g.completions:
                entry.update(skipped="no completions", drafts=[])
                st.stop_reason = ctx.meter.stop_reason or "budget exhausted"
                break
            drafts = []
            for c in g.completions:
                text = "" if c.thinking_truncated else c.answer
                drafts.append(_Draft(c, text, answer_key(text), c.mean_logprob))
            st.drafts = drafts
            if any(d.key is not None for d in drafts):
                st.answered = drafts
            st.sequential += max(d.tokens for d in drafts)  # the M drafts run in parallel
            entry.update(
                max_tokens=g.max_tokens, clamped_by=g.clamped_by,
                output_tokens=g.usage.output_tokens, prompt_tokens=g.usage.prompt_tokens,
                drafts=[{"answer": d.key, "tokens": d.tokens, "score": d.score,
                         "finish_reason": d.completion.finish_reason} for d in drafts],
            )
            if rnd < self.rounds:
                await self._distill(ctx, st, rnd)
        return self._result(st)


class SequentialRefinement(ParallelDistillRefine):
    """SR: PDR with one draft per round (iteratively improve one candidate)."""

    name = "sr"
    Params = SequentialRefinementParams

    def setup(self) -> None:
        self.drafts = 1


STRATEGIES.register("pdr", ParallelDistillRefine)
STRATEGIES.register("sr", SequentialRefinement)
