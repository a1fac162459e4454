"""Parallel-Distill-Refine (PDR) and Sequential Refinement (SR), ALGORITHMS.md §3 (arXiv 2510.01123).

For rounds ``r = 1..R``:

1. **Draft.**  ``M`` drafts per problem, conditioned on the workspace ``W_{r-1}`` (no workspace at
   ``r = 1``).  All problems of the round go to the backend in *one* call (``n=M`` per request).
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
     each, less the ``"Attempt i: "`` header); each summary is cut to ``w // M`` tokens with its
     header, and the concatenation is bounded by ``w`` again.

   The model-written variants make one more batched backend call for all problems.  The final
   round is not distilled (its workspace would never be read).
3. The next round refines, conditioned on ``W_r``.

The answer is the last round's majority (:func:`~budgetlm.strategies.aggregate.vote`, ties by
summed score) or, with ``final="best"``, its best-scored draft.  SR is PDR with ``M = 1``.

**Budget planning.**  Before each round the problem's remaining output-token budget is split
evenly over the rounds still to run (the final round gets all that is left, and whatever an
earlier round leaves unspent carries over), so that the final round can still run when the budget
allows it.  In a round that is distilled by the model, up to half of that round's share (at most
what the distillation can use) is held for the distillation call; the rest is split over the
``M`` drafts (``max_tokens`` per draft is the smaller of this share and ``max_tokens``).  If a
model-written distillation cannot be afforded, the round falls back to the ``topk`` workspace,
which costs nothing.  Other units (input/total tokens, FLOPs, dollars, time) are not planned but
are enforced by the meter, which clamps or refuses every call, so spend never exceeds the budget.
When the budget runs out the strategy stops and answers with the latest round that produced an
answer, with ``stop_reason = "budget exhausted: <unit>"``.

**Reporting.**  ``Result.usage`` is the total spend; ``Result.sequential_tokens`` is the
critical path: per round the longest draft plus the distillation's output (for ``per_draft`` the
longest per-draft summary, since those run in parallel), summed over rounds.  ``Result.trace`` has
one entry per round with the drafts (answer keys, tokens, scores), the workspace text, its token
count and the distillation call's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from budgetlm.answers import extract_answer
from budgetlm.backends.base import Backend, Completion, GenerationRequest, GenerationResult, Message, SamplingParams
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.strategies.aggregate import answer_key, vote
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy
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

_DISTILLS = ("summary", "topk", "per_draft")
_FINALS = ("majority", "best")


def _int_param(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"`{name}` must be an integer >= {low}, got {value!r}")
    return value


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
    meter: Meter
    question: str
    workspace: str | None = None
    drafts: list[_Draft] = field(default_factory=list)
    answered: list[_Draft] = field(default_factory=list)
    """The latest round's drafts that gave an answer (the best answer so far comes from them)."""
    usage: Usage = field(default_factory=Usage.zero)
    sequential: int = 0
    trace: list[dict[str, Any]] = field(default_factory=list)
    active: bool = True
    stop_reason: str = "done"
    distill_share: int | None = None

    def charge(self, g: GenerationResult) -> None:
        if not g.skipped:
            self.usage = self.usage + g.usage

    def stop(self, why: str | None) -> None:
        self.active = False
        self.stop_reason = self.meter.stop_reason or why or "budget exhausted"


class ParallelDistillRefine(Strategy):
    """PDR: rounds of ``drafts`` parallel drafts distilled into a bounded workspace (see module doc)."""

    name = "pdr"

    def __init__(
        self,
        rounds: int = 2,
        drafts: int = 4,
        workspace_tokens: int = 256,
        distill: Literal["summary", "topk", "per_draft"] = "topk",
        topk: int = 2,
        max_tokens: int = 256,
        temperature: float = 0.7,
        seed: int | None = None,
        final: Literal["majority", "best"] = "majority",
    ) -> None:
        self.rounds = _int_param("rounds", rounds)
        self.drafts = _int_param("drafts", drafts)
        self.workspace_tokens = _int_param("workspace_tokens", workspace_tokens)
        self.topk = _int_param("topk", topk)
        self.max_tokens = _int_param("max_tokens", max_tokens)
        if distill not in _DISTILLS:
            raise ConfigError(f"`distill` must be one of {', '.join(map(repr, _DISTILLS))}, got {distill!r}")
        if final not in _FINALS:
            raise ConfigError(f"`final` must be one of {', '.join(map(repr, _FINALS))}, got {final!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ConfigError(f"`temperature` must be a number >= 0, got {temperature!r}; use 0 for greedy decoding")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"`seed` must be an integer or None, got {seed!r}")
        self.distill = distill
        self.temperature = float(temperature)
        self.seed = seed
        self.final = final

    # ------------------------------------------------------------------ planning
    def _distill_need(self) -> int:
        """Output tokens a model-written distillation may use for one problem."""
        w, m = self.workspace_tokens, self.drafts
        if self.distill == "summary":
            return w
        if self.distill == "per_draft":
            return m * max(1, w // m)
        return 0

    def _plan(self, st: _State, rnd: int) -> int:
        """Per-draft ``max_tokens`` of round ``rnd``; sets ``st.distill_share`` for the distillation."""
        last = rnd == self.rounds
        need = 0 if last else self._distill_need()
        rem = st.meter.remaining("output_tokens")
        if rem is None:
            st.distill_share = None if need else 0
            return self.max_tokens
        rem = max(0, math.floor(rem))
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

    def _distill(self, backend: Backend, states: list[_State], rnd: int) -> None:
        """Set each active state's workspace from its drafts (one backend call when model-written)."""
        w = self.workspace_tokens
        jobs: list[tuple[_State, int]] = []  # (state, number of requests)
        reqs: list[GenerationRequest] = []
        for st in states:
            if not st.active:
                continue
            entry = st.trace[-1]
            entry.update(distill=self.distill, distill_output_tokens=0, distill_prompt_tokens=0)
            share = st.distill_share
            if self.distill == "summary" and (share is None or share >= 1):
                mt = w if share is None else min(w, share)
                drafts = "\n\n".join(f"Candidate {i}:\n{d.content.strip()}" for i, d in enumerate(st.drafts, 1))
                content = SUMMARY_PROMPT.format(question=st.question, m=len(st.drafts), drafts=drafts, w=w)
                reqs.append(GenerationRequest(messages=self._with_question(st.problem, content),
                                              sampling=self._sampling(1, mt, rnd, salt=1), meter=st.meter,
                                              id=f"{st.problem.id}/r{rnd}/summary"))
                jobs.append((st, 1))
                continue
            k = len(st.drafts)
            # each "Attempt i: <summary>" part gets an equal share of w, header included
            per = max(1, w // max(1, k) - backend.count_tokens(f"Attempt {k}: "))
            if self.distill == "per_draft" and k and (share is None or share // k >= 1):
                mt = per if share is None else min(per, share // k)
                for i, d in enumerate(st.drafts):
                    content = PER_DRAFT_PROMPT.format(question=st.question, draft=d.content.strip(), w=mt)
                    reqs.append(GenerationRequest(messages=self._with_question(st.problem, content),
                                                  sampling=self._sampling(1, mt, rnd, salt=2 + i), meter=st.meter,
                                                  id=f"{st.problem.id}/r{rnd}/draft{i}"))
                jobs.append((st, k))
                continue
            if self.distill != "topk":
                entry["distill_fallback"] = "topk (no budget for a model-written distillation)"
            self._set_workspace(backend, st, self._topk_workspace(backend, st.drafts))
        if not reqs:
            return
        gens = backend.generate(reqs, on_budget_exhausted="skip")
        pos = 0
        for st, k in jobs:
            mine = gens[pos: pos + k]
            pos += k
            entry = st.trace[-1]
            for g in mine:
                st.charge(g)
            ran = [g for g in mine if not g.skipped and g.completions]
            entry["distill_output_tokens"] = sum(g.usage.output_tokens for g in ran)
            entry["distill_prompt_tokens"] = sum(g.usage.prompt_tokens for g in ran)
            entry["distill_calls"] = len(ran)
            st.sequential += max((len(g.first.token_ids) for g in ran), default=0)
            if not ran:
                entry["distill_fallback"] = "topk (the distillation call was refused by the budget)"
                self._set_workspace(backend, st, self._topk_workspace(backend, st.drafts))
                continue
            if self.distill == "summary":
                text = ran[0].first.answer.strip()
            else:
                each = max(1, w // k)
                text = "\n".join(truncate_to_tokens(backend, f"Attempt {i}: {g.first.answer.strip()}", each)
                                  for i, g in enumerate(mine, 1) if not g.skipped and g.completions)
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
        base = dict(problem_id=st.problem.id, usage=st.usage, stop_reason=st.stop_reason,
                    sequential_tokens=st.sequential, trace=st.trace)
        if d is None:
            return Result(text="", answer=None, **base)
        return Result(text=d.text, answer=extract_answer(d.text).text if d.text else None,
                      finish_reason=d.completion.finish_reason, truncated=d.completion.truncated,
                      thinking_truncated=d.completion.thinking_truncated, **base)

    # ------------------------------------------------------------------ main loop
    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        if len(problems) != len(meters):
            raise ConfigError(f"`meters` must have one meter per problem ({len(problems)}), got {len(meters)}")
        states = []
        for p, m in zip(problems, meters, strict=True):
            users = [x for x in p.messages if x.get("role") == "user"]
            states.append(_State(p, m, users[-1]["content"] if users else ""))
        for rnd in range(1, self.rounds + 1):
            active = [st for st in states if st.active]
            if not active:
                break
            reqs = [GenerationRequest(messages=self._draft_messages(st),
                                      sampling=self._sampling(self.drafts, self._plan(st, rnd), rnd),
                                      meter=st.meter, id=f"{st.problem.id}/r{rnd}")
                    for st in active]
            gens = backend.generate(reqs, on_budget_exhausted="skip")
            for st, g in zip(active, gens, strict=True):
                st.charge(g)
                entry: dict[str, Any] = {"round": rnd, "workspace_in_tokens": (
                    backend.count_tokens(st.workspace) if st.workspace else 0)}
                st.trace.append(entry)
                if g.skipped or not g.completions:
                    entry.update(skipped=g.skipped or "no completions", drafts=[])
                    st.stop(g.skipped)
                    continue
                drafts = []
                for c in g.completions:
                    text = "" if c.thinking_truncated else c.answer
                    drafts.append(_Draft(c, text, answer_key(text), c.mean_logprob))
                st.drafts = drafts
                if any(d.key is not None for d in drafts):
                    st.answered = drafts
                st.sequential += max(d.tokens for d in drafts)
                entry.update(
                    max_tokens=g.max_tokens, clamped_by=g.clamped_by,
                    output_tokens=g.usage.output_tokens, prompt_tokens=g.usage.prompt_tokens,
                    drafts=[{"answer": d.key, "tokens": d.tokens, "score": d.score,
                             "finish_reason": d.completion.finish_reason} for d in drafts],
                )
            if rnd < self.rounds:
                self._distill(backend, states, rnd)
        return [self._result(st) for st in states]


class SequentialRefinement(ParallelDistillRefine):
    """SR: PDR with one draft per round (iteratively improve one candidate)."""

    name = "sr"

    def __init__(
        self,
        rounds: int = 2,
        workspace_tokens: int = 256,
        distill: Literal["summary", "topk", "per_draft"] = "topk",
        topk: int = 2,
        max_tokens: int = 256,
        temperature: float = 0.7,
        seed: int | None = None,
        final: Literal["majority", "best"] = "majority",
    ) -> None:
        super().__init__(rounds=rounds, drafts=1, workspace_tokens=workspace_tokens, distill=distill, topk=topk,
                         max_tokens=max_tokens, temperature=temperature, seed=seed, final=final)


STRATEGIES.register("pdr", ParallelDistillRefine)
STRATEGIES.register("sr", SequentialRefinement)
