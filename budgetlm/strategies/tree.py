"""The tree core shared by ``bavt``, ``beam`` and ``rebase``: nodes, expansion, scoring, forced answers.

Every function here works on ONE problem's tree inside that problem's async program
(:meth:`budgetlm.strategies.treesearch.TreeSearch.solve_one`): each problem's search runs its own
rounds on the shared engine, concurrently with the other problems, and never waits for another
problem's round.

A **node** is a partial trajectory: the root is the bare problem and every other node adds one
*step* to its parent's path.  A step is what the model writes until the step delimiter (a blank
line by default), the end of a tool call (``</tool_call>``, after which the tool runs and its
observation joins the step), its end of sequence (the node is then *terminal* and carries the
extracted answer), or ``step_tokens`` tokens.

**Expansion** (:func:`expand`): the children of a round's selected nodes are sampled as one request
per selected node asking ``k`` samples of its path (siblings share their whole prompt), all of the
round's requests concurrently.  Paths continue **from token ids**: a request's prompt is the root
prompt's token ids (the rendered problem) plus the token ids the model generated along the path
(plus the tokens of stop strings the engine left out and of tool observations), sent as
``GenerationRequest(prompt_token_ids=...)``, so a child's prompt extends its parent's exactly and the
engine's prefix cache is reused token for token.  Backends that do not tokenise locally (the OpenAI
backend without a tokenizer: :meth:`~budgetlm.backends.base.Backend.render` gives no ids) fall back
to re-rendered text: the problem's messages with the path as the assistant reply's prefix.  When a
problem has several requests in flight in one round, each sample's ``max_tokens`` is capped by its
fair share of the problem's meter (:meth:`~budgetlm.meter.Meter.fair_share`) and by the problem's
output-token room (:func:`~budgetlm.strategies.voting.room_of`: an equal share of the batch
budget among the problems still running), so one request cannot take what the others need.  A
request the meter cannot afford gets no children and the problem's search ends with
``stop_reason="budget exhausted: <unit>"``.

A round's requests are awaited together (:func:`~budgetlm.aio.gather_settled`): when
one fails, its siblings are aborted and charged before the error leaves the problem's program, and
cancelling the program aborts every request in flight (each is charged exactly what it generated).

**Forced answer** (:func:`force_answer`): when a search ends without a terminal node, the best
path is continued after ``FORCE_ANSWER`` with a short greedy call.  Searches hold that call's worst
case (the problem plus ``max_depth`` full steps and delimiters as prompt, ``answer_tokens`` output,
and the FLOPs and dollars the backend prices that at) in a reservation from the start (:func:`hold`, an ``async with`` block around the search), so a
search that spends its whole budget can still afford its answer; the hold is released and the
forced call reserved with no ``await`` in between, so no other problem can take it.  When not even
that fits (tiny budgets, or tool observations that make the path longer than ``max_depth`` steps
under an input-token budget), the answer is extracted from the best path's text and the trace says
so.

:meth:`Tree.to_json` exports the tree with values, spend and prune decisions (the evaluation
report draws it); token sums over the nodes plus scoring and forced-answer calls equal the ledger.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict, Field

from budgetlm.aio import gather_settled
from budgetlm.backends.base import Backend, Completion, GenerationRequest, GenerationResult, SamplingParams
from budgetlm.config import Config
from budgetlm.costs import estimate_tokens
from budgetlm.errors import BudgetExceeded, ConfigError, missing
from budgetlm.io import JsonObject
from budgetlm.meter import Meter, Reservation
from budgetlm.strategies.aggregate import answer_key, vote
from budgetlm.strategies.base import Context, Problem, Result
from budgetlm.strategies.values import StepView, ValueScorer
from budgetlm.strategies.voting import room_of
from budgetlm.tools import OBSERVATION_TEMPLATE, TOOL_CALL_CLOSE, Tool, ToolOutcome, as_tools, call_tool, describe_tools
from budgetlm.usage import Usage

FORCE_ANSWER = "\nFinal answer:"
"""Appended to the best path to force an answer when no node is terminal."""
VALUE_EPS = 1e-3
"""Values live in ``(0, 1]``; this is the floor a node's value is clipped to."""


@dataclass
class Node:
    """One node of a search tree."""

    id: int
    """Index in :attr:`Tree.nodes` (the root is 0)."""
    parent: int | None
    """The parent's id (``None`` for the root)."""
    depth: int
    """Steps from the root."""
    step: str = ""
    """This node's step, as appended to the path (delimiter and tool observation included)."""
    tokens: int = 0
    """Output tokens spent generating the step."""
    logprob: float | None = None
    """Mean token log-probability of the step, when known."""
    finish_reason: str | None = None
    """Why the step's sample ended (``stop`` or ``length``)."""
    value: float = 0.5
    """The node's value in ``(0, 1]``."""
    residual: float | None = None
    """The progress the step adds over its parent (residual scorers), or ``None``."""
    score: float | None = None
    """The scorer's raw output for this step, or ``None`` when unscored."""
    terminal: bool = False
    """The model ended its reply here."""
    answer: str | None = None
    """The normalised answer of a terminal node (or of a forced answer)."""
    pruned: str | None = None
    """Why the node was pruned (never expanded), or ``None``."""
    closed: str | None = None
    """Why an expanded node may not be expanded again (e.g. it only led to refused tool calls)."""
    expansions: int = 0
    """How many times the node was expanded."""
    round: int = 0
    """Search round that created the node."""
    tool: JsonObject | None = None
    """The tool call the step made and its observation, if any."""
    children: list[int] = field(default_factory=list)
    """Children ids."""
    ids: list[int] = field(default_factory=list, repr=False)
    """The token ids this node's step adds to the path (generated tokens, then the tokens of a stop
    string the engine left out and of a tool observation); empty when the tree continues from text."""

    def to_json(self) -> JsonObject:
        """A JSON-ready record."""
        return {
            "id": self.id, "parent": self.parent, "depth": self.depth, "step": self.step, "tokens": self.tokens,
            "logprob": self.logprob, "finish_reason": self.finish_reason, "value": self.value,
            "residual": self.residual, "score": self.score, "terminal": self.terminal, "answer": self.answer,
            "pruned": self.pruned, "closed": self.closed, "expansions": self.expansions, "round": self.round, "tool": self.tool,
            "children": list(self.children),
        }


@dataclass
class ForcedAnswer:
    """The answer forced from a tree's best path (:func:`force_answer`)."""

    node: int
    """The node whose path the answer continues."""
    text: str
    """The forced call's text (empty when no call was made)."""
    answer: str | None
    """The normalised answer."""
    called: bool
    """A forced-answer call was made (else the answer was extracted from the best path)."""
    tokens: int | None = None
    """Output tokens of the forced call (when called)."""
    note: str | None = None
    """Why no call was made (when not called)."""

    def to_json(self) -> JsonObject:
        """A JSON-ready record (``tokens`` or ``note`` only when set)."""
        out: JsonObject = {"node": self.node, "text": self.text, "answer": self.answer, "called": self.called}
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if self.note is not None:
            out["note"] = self.note
        return out


class Tree:
    """The search tree of one problem.

    With a ``backend`` that tokenises locally the tree continues from token ids (:attr:`root_ids` is
    the rendered problem's ids); otherwise (no backend, or no local tokenizer) from text.
    """

    def __init__(self, problem: Problem, meter: Meter, *, root_value: float | None = None,
                 backend: Backend | None = None) -> None:
        self.problem = problem
        self.meter = meter
        self.backend = backend
        self.auto_root = root_value is None
        """The root's value follows its children's under value scorers (see :func:`score_nodes`)."""
        self.nodes: list[Node] = [Node(0, None, 0, value=0.5 if root_value is None else root_value)]
        self.extra_tokens: dict[str, int] = {"scoring": 0, "forced": 0}
        """Output tokens spent outside node expansion, by purpose (summed in :meth:`to_json`)."""
        self.forced: ForcedAnswer | None = None
        self.round_scoring: dict[int, int] = {}
        """Longest scoring output per round (the critical path of scoring calls)."""
        self.unscored = 0
        """Steps the scorer could not rate (non-finite scores)."""
        self.tool_refused = 0
        """Tool calls the budget refused (their nodes were pruned)."""
        self.done: str | None = None
        """Why the search ended (``"done"`` or a budget reason), ``None`` while running."""
        self.tools: dict[str, Tool] = as_tools(problem.tools) if problem.tools else {}
        """The tools the problem may call."""
        self.root_text: str | None = None
        self.root_ids: list[int] | None = None
        """The rendered problem's token ids: paths continue from token ids; ``None``: from text."""
        if backend is not None:
            text, ids = backend.render(GenerationRequest(messages=problem_messages(problem)))
            self.root_text = text
            self.root_ids = list(ids) if ids else None

    @property
    def root(self) -> Node:
        return self.nodes[0]

    @property
    def from_ids(self) -> bool:
        """True when requests continue from token ids (the backend tokenises locally)."""
        return self.root_ids is not None

    def add(self, parent: Node, **kw: Any) -> Node:
        node = Node(len(self.nodes), parent.id, parent.depth + 1, **kw)
        self.nodes.append(node)
        parent.children.append(node.id)
        return node

    def path(self, node: Node) -> list[Node]:
        """Root-to-``node`` nodes."""
        out = [node]
        while out[-1].parent is not None:
            out.append(self.nodes[out[-1].parent])
        return out[::-1]

    def text(self, node: Node) -> str:
        """The reply so far at ``node`` (the concatenated steps of its path)."""
        return "".join(n.step for n in self.path(node))

    def path_ids(self, node: Node) -> list[int]:
        """The token ids of the reply so far at ``node`` (token-id mode)."""
        return [t for n in self.path(node) for t in n.ids]

    def request(self, node: Node, sampling: SamplingParams, *, id: str | None = None,
                suffix: str | None = None, may_think: bool = True) -> GenerationRequest:
        """The request continuing ``node``'s path (then ``suffix``, with the path's trailing whitespace
        removed): from token ids when the backend tokenises locally, else from re-rendered text."""
        if self.root_ids is not None:
            if self.backend is None:
                raise missing('self.backend')
            ids = self.path_ids(node)
            if suffix is not None:
                ids = _rstrip_ids(self.backend, ids) + self.backend.encode(suffix)
            return GenerationRequest(prompt_token_ids=self.root_ids + ids, sampling=sampling, id=id,
                                     may_think=may_think)
        prefix = self.text(node) if suffix is None else self.text(node).rstrip() + suffix
        return GenerationRequest(messages=problem_messages(self.problem), assistant_prefix=prefix or None,
                                 sampling=sampling, id=id, may_think=may_think)

    def prompt_size(self, req: GenerationRequest) -> int:
        """Tokens of ``req``'s prompt (the backend's count; an estimate without a local tokenizer)."""
        if req.prompt_token_ids is not None:
            return len(req.prompt_token_ids)
        if self.backend is None:
            raise missing('self.backend')
        text, ids = self.backend.render(req)
        return len(ids) if ids is not None else estimate_tokens(text or "")

    def terminals(self) -> list[Node]:
        """Terminal nodes that were not pruned (all terminal nodes when every one was pruned)."""
        t = [n for n in self.nodes if n.terminal and n.pruned is None]
        return t or [n for n in self.nodes if n.terminal]

    def has_terminal(self) -> bool:
        return any(n.terminal for n in self.nodes)

    def best(self) -> Node:
        """The best node to force an answer from: highest value, then deepest, then first (not pruned if possible)."""
        cand = [n for n in self.nodes[1:] if n.pruned is None] or self.nodes[1:] or [self.root]
        return max(cand, key=lambda n: (n.value, n.depth, -n.id))

    def sequential_tokens(self) -> int:
        """Output tokens on the critical path: per round the longest new step and scoring call, plus the forced answer."""
        per: dict[int, int] = {}
        for n in self.nodes[1:]:
            per[n.round] = max(per.get(n.round, 0), n.tokens)
        return sum(per.values()) + sum(self.round_scoring.values()) + self.extra_tokens["forced"]

    def output_tokens(self) -> int:
        return sum(n.tokens for n in self.nodes) + sum(self.extra_tokens.values())

    def to_json(self) -> JsonObject:
        """The whole tree, JSON-ready (nodes with values, spend and prune decisions)."""
        return {"nodes": [n.to_json() for n in self.nodes], "node_tokens": sum(n.tokens for n in self.nodes),
                "extra_tokens": dict(self.extra_tokens), "output_tokens": self.output_tokens(),
                "forced": None if self.forced is None else self.forced.to_json(), "stop_reason": self.done, "unscored": self.unscored,
                "tool_refused": self.tool_refused}


def _rstrip_ids(backend: Backend, ids: list[int]) -> list[int]:
    """``ids`` without trailing whitespace: whitespace-only tokens dropped, a last token ending in
    whitespace re-encoded without it (the token-id counterpart of ``str.rstrip``)."""
    out = list(ids)
    while out and not backend.decode([out[-1]]).strip():
        out.pop()
    if out:
        last = backend.decode([out[-1]])
        if last != last.rstrip():
            out[-1:] = backend.encode(last.rstrip())
    return out


# ----------------------------------------------------------------------------- expansion
class StepConfig(Config):
    """How steps are generated (shared by all tree searches)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    delimiter: str = Field(default="\n\n", min_length=1, description="String that ends a step (kept in the path); "
                                                                       "'\\n\\n' for paragraph steps, '\\n' for line steps.")
    step_tokens: int = Field(default=64, ge=1, description="Most tokens per step.")
    temperature: float = Field(default=0.7, ge=0, description="Sampling temperature of expansions.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus mass of expansions.")
    seed: int | None = Field(default=None, description="Base seed (each round uses ``seed + round``).")
    max_depth: int = Field(default=8, ge=1, description="Steps after which a non-terminal node is not expanded further.")


def _step_cap(tree: Tree, reqs: Sequence[GenerationRequest], cfg: StepConfig, ctx: Context) -> int:
    """Per-sample ``max_tokens`` of a round's expansion requests of one problem.

    Several requests in flight at once share the problem's meter fairly (each sample gets an equal
    share of what is left, as :meth:`Backend.agenerate` does for requests sharing a meter), and all
    samples together stay within the problem's output-token room (:func:`room_of`).  At least 1: the
    meter's reservation decides whether anything fits (and names the exhausted unit).
    """
    cap = cfg.step_tokens
    samples = sum(r.sampling.n for r in reqs)
    if len(reqs) >= 2:
        share = ctx.meter.fair_share(samples, sum(tree.prompt_size(r) for r in reqs),
                                     may_think=ctx.backend.thinking.enabled)
        if share is not None:
            cap = min(cap, share)
    room = room_of(ctx.meter)
    if room is not None:
        cap = min(cap, room // max(1, samples))
    return max(1, cap)


async def _generate(ctx: Context, req: GenerationRequest) -> GenerationResult | BudgetExceeded:
    """``ctx.generate(req)``, or the refusal when the budget cannot afford it."""
    try:
        return await ctx.generate(req)
    except BudgetExceeded as exc:
        return exc


async def expand(tree: Tree, jobs: Sequence[tuple[Node, int]], cfg: StepConfig, round: int,
                 ctx: Context) -> list[list[Node]]:
    """Sample ``k`` children for each ``(node, k)`` of one problem's round (its requests run concurrently).

    A request the meter cannot afford gets no children and the tree is marked done with the meter's reason.
    """
    if not jobs:
        return []
    stops = [cfg.delimiter] + ([TOOL_CALL_CLOSE] if tree.tools else [])

    def requests(max_tokens: int) -> list[GenerationRequest]:
        return [tree.request(node, SamplingParams(
            n=k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=max_tokens, stop=stops, logprobs=0,
            seed=None if cfg.seed is None else cfg.seed + round), id=f"{tree.problem.id}/{node.id}")
            for node, k in jobs]

    reqs = requests(cfg.step_tokens)
    cap = _step_cap(tree, reqs, cfg, ctx)
    if cap < cfg.step_tokens:
        reqs = requests(cap)
    gens = await gather_settled(_generate(ctx, r) for r in reqs)
    out: list[list[Node]] = []
    for (node, _), g in zip(jobs, gens, strict=True):
        if isinstance(g, BudgetExceeded):
            tree.done = tree.meter.stop_reason or str(g)
            out.append([])
            continue
        node.expansions += 1
        out.append([_child(tree, node, c, cfg, round) for c in g.completions])
    return out


def _child(tree: Tree, parent: Node, c: Completion, cfg: StepConfig, round: int) -> Node:
    text = c.text
    terminal = False
    tool: JsonObject | None = None
    skipped: str | None = None  # why the budget refused the step's tool call
    stop, in_ids = _stop_text(tree, c)
    if c.finish_reason == "stop" and c.stop_string == TOOL_CALL_CLOSE and tree.tools:
        outcome: ToolOutcome = call_tool(text, tree.tools, tree.meter)
        tool, skipped = outcome.to_json(), outcome.skipped
        text = text + stop + OBSERVATION_TEMPLATE.format(observation=outcome.observation)
    elif c.finish_reason == "stop" and c.stop_string is not None:
        text = text + stop
    elif c.finish_reason == "stop":
        terminal = True
    child = tree.add(parent, step=text, tokens=len(c.token_ids), logprob=c.mean_logprob,
                     finish_reason=c.finish_reason, terminal=terminal, round=round, tool=tool, value=parent.value)
    if tree.from_ids and not terminal:
        child.ids = _step_ids(tree, c, text, len(stop) if in_ids else 0)
    if terminal:
        child.answer = answer_key(tree.text(child))
    elif skipped:
        child.pruned = skipped
        tree.tool_refused += 1
    elif child.depth >= cfg.max_depth:
        child.pruned = "max depth"
    return child


def _stop_text(tree: Tree, c: Completion) -> tuple[str, bool]:
    """The text the stop string adds to the step, and whether the generated ids already hold it.

    vLLM's ids include the tokens that completed the stop string, and a token may run past it (a
    ``"\n\n"`` token for a ``"\n"`` delimiter): the step then keeps what the ids decode to, so the
    path's text is exactly what the model continues from.  Engines whose ids stop before the stop
    string (the scripted backend) get its tokens appended (:func:`_step_ids`).
    """
    stop = c.stop_string or ""
    if not stop or not tree.from_ids or c.finish_reason != "stop":
        return stop, False
    if tree.backend is None:
        raise missing('tree.backend')
    decoded = tree.backend.decode(c.token_ids)
    if decoded.startswith(c.text + stop):
        return decoded[len(c.text):], True
    return stop, stop in decoded


def _step_ids(tree: Tree, c: Completion, step: str, covered: int) -> list[int]:
    """The token ids a step adds to the path: the generated ids, then the tokens of what the step adds
    after the generated text and its first ``covered`` characters (a stop string the ids already hold):
    a stop string the engine left out, a tool observation."""
    if tree.backend is None:
        raise missing('tree.backend')
    ids = list(c.token_ids)
    if any(t < 0 for t in ids):  # placeholder ids (no tokenizer): continue this tree from text
        tree.root_ids = None
        return []
    rest = step[len(c.text) + covered:]
    return ids + (tree.backend.encode(rest) if rest else [])


def nan_safe(x: float | None) -> float | None:
    """``None`` for NaN/inf scores (a scorer failure is recorded, never propagated into values)."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


# ----------------------------------------------------------------------------- forced answers
def hold(meter: Meter, prompt_tokens: int, answer_tokens: int, backend: Backend | None = None) -> Reservation | None:
    """Reserve the worst case of a forced answer up front (``None`` when even that does not fit).

    With ``backend`` its FLOPs and dollars are held too, priced as the backend prices the forced call
    when it reserves it, so ``flops``/``usd`` budgets cannot starve the answer either.
    Use it as ``async with`` around the search: leaving the block releases it (it is never settled).
    """
    cost = None if backend is None else backend._estimate  # the estimate the backend reserves calls with
    try:
        return meter.reserve(prompt_tokens=prompt_tokens, max_tokens=answer_tokens, n=1, may_think=False,
                             min_tokens=answer_tokens, cost=cost)
    except BudgetExceeded:
        return None


def forced_prompt_tokens(tree: Tree, cfg: StepConfig) -> int:
    """Worst-case prompt of a forced answer: the rendered problem plus ``max_depth`` full steps (each
    with its delimiter) and ``FORCE_ANSWER``."""
    if tree.backend is None:
        raise missing('tree.backend')
    b = tree.backend
    if tree.root_ids is None:  # no local tokenizer: about 3 characters per token (as the backend estimates)
        return estimate_tokens(tree.root_text or "") + cfg.max_depth * cfg.step_tokens + estimate_tokens(FORCE_ANSWER)
    per_step = cfg.step_tokens + len(b.encode(cfg.delimiter))
    return len(tree.root_ids) + cfg.max_depth * per_step + len(b.encode(FORCE_ANSWER))


async def force_answer(tree: Tree, ctx: Context, answer_tokens: int) -> None:
    """Force an answer from the best path (one short greedy call); sets ``tree.forced``."""
    best = tree.best()
    req = tree.request(best, SamplingParams(n=1, temperature=0.0, max_tokens=answer_tokens, stop=["\n"]),
                       id=f"{tree.problem.id}/force", suffix=FORCE_ANSWER, may_think=False)
    g = await _generate(ctx, req)
    if isinstance(g, BudgetExceeded) or not g.completions:
        ans = answer_key(tree.text(best))
        why = str(g) if isinstance(g, BudgetExceeded) else "no sample"
        tree.forced = ForcedAnswer(best.id, "", ans, called=False,
                                   note=f"no forced-answer call ({why}); answer extracted from the best path")
        return
    c = g.first
    tree.extra_tokens["forced"] += len(c.token_ids)
    ans = answer_key(FORCE_ANSWER.strip() + " " + c.text) or answer_key(tree.text(best))
    tree.forced = ForcedAnswer(best.id, c.text, ans, called=True, tokens=len(c.token_ids))


def finish(tree: Tree, final: str, *, sequential_tokens: int, trace: list[JsonObject]) -> Result:
    """The :class:`Result` of a finished tree: vote or best over terminal nodes, else the forced answer.

    ``usage`` is left zero: the strategy base sets it to the problem meter's total.
    """
    terms = tree.terminals()
    reason = tree.done or "done"
    if not terms and tree.tool_refused and reason in ("done", "max rounds"):
        reason = "budget exhausted: tool_calls"
    if terms:
        if final == "vote":
            v = vote([n.answer for n in terms], [n.value for n in terms], weighted=True)
            pick = terms[v.index] if v.index is not None else max(terms, key=lambda n: n.value)
            answer = v.winner
        else:
            pick = max(terms, key=lambda n: (n.value, -n.id))
            answer = pick.answer
        text = tree.text(pick)
        node, finish_reason = pick, pick.finish_reason
    else:
        forced = tree.forced
        node = tree.nodes[forced.node] if forced is not None else tree.best()
        text = tree.text(node).rstrip() + (FORCE_ANSWER + " " + forced.text.lstrip() if forced and forced.called else "")
        answer = forced.answer if forced is not None else None
        finish_reason = "forced"
    trace = trace + [{"tree": tree.to_json(), "final": {"node": node.id, "answer": answer, "rule": final if terms else "forced"}}]
    return Result(problem_id=tree.problem.id, text=text, answer=answer, usage=Usage.zero(), stop_reason=reason,
                  finish_reason=finish_reason, truncated=False, sequential_tokens=sequential_tokens, trace=trace)


# ----------------------------------------------------------------------------- shared helpers
def problem_messages(problem: Problem) -> list[dict[str, str]]:
    """The problem's messages, with the tool list as a system message when it has tools and none is given."""
    msgs = list(problem.messages)
    if problem.tools and not any(m.get("role") == "system" for m in msgs):
        msgs = [{"role": "system", "content": describe_tools(as_tools(problem.tools))}] + msgs
    return msgs


async def score_nodes(tree: Tree, new: Sequence[Node], scorer: ValueScorer, ctx: Context, *, prune: bool,
                      round: int) -> None:
    """Score one problem's new nodes (one scorer call) and set ``value``/``residual``; prune ``r <= 0`` when asked.

    Residual scorers: ``v = clip(v_parent + r, ε, 1)``.  Value scorers: ``v = clip(s, ε, 1)`` and
    ``r = v - v_parent`` (recorded; pruning by residual applies to residual scorers only); a root
    whose value was not set (``Tree(auto_root=True)``), which no value scorer rates, takes the mean
    value of its scored children, so it competes with them on the scorer's own scale.
    Non-finite scores leave the node unscored (parent's value, never pruned for it).
    """
    todo = [n for n in new if n.pruned is None]
    if not todo:
        return
    views = [StepView(tree.problem, tree.text(tree.nodes[n.parent]) if n.parent is not None else "", n.step,
                      n.logprob, tree.meter) for n in todo]
    scored = await scorer.score(views, ctx)
    if len(scored) != len(views):
        raise ConfigError(f"scorer {scorer.name!r} must return one score per step ({len(views)}), got {len(scored)}")
    root_scored = False
    for n, (s, toks) in zip(todo, scored, strict=True):
        tree.extra_tokens["scoring"] += int(toks)
        tree.round_scoring[round] = max(tree.round_scoring.get(round, 0), int(toks))
        parent = tree.nodes[n.parent] if n.parent is not None else tree.root
        val = nan_safe(s)
        if val is None:
            n.score, n.value = None, parent.value
            tree.unscored += 1
            continue
        n.score = val
        if scorer.kind == "residual":
            n.residual = max(-1.0, min(1.0, val))
            n.value = min(1.0, max(VALUE_EPS, parent.value + n.residual))
            if prune and n.residual <= 0:
                n.pruned = "no progress (residual <= 0)"
        else:
            n.value = min(1.0, max(VALUE_EPS, val))
            n.residual = n.value - parent.value
            root_scored = root_scored or (n.parent == 0 and tree.auto_root)
    if root_scored:  # value scorers: an unset root value is what its children are worth on average
        vals = [tree.nodes[c].value for c in tree.root.children if tree.nodes[c].score is not None]
        tree.root.value = sum(vals) / len(vals)
