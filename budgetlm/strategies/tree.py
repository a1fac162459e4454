"""The tree core shared by ``bavt``, ``beam`` and ``rebase``: nodes, batched expansion, forced answers.

A **node** is a partial trajectory: the root is the bare problem and every other node adds one
*step* to its parent's path.  A step is what the model writes until the step delimiter (a blank
line by default), the end of a tool call (``</tool_call>``, after which the tool runs and its
observation joins the step), its end of sequence (the node is then *terminal* and carries the
extracted answer), or ``step_tokens`` tokens.

**Expansion** (:func:`expand`): the children of every selected node of every problem are sampled
in ONE backend call: one request per selected node, asking ``k`` samples of its path, so siblings
share their whole prompt and, across rounds, a child's prompt extends its parent's (prefix
caching).  The path is passed as the assistant reply's prefix, so the model continues its own
reply.  Each request is charged to its problem's meter; a request the meter cannot afford is
skipped and the problem's search ends with ``stop_reason="budget exhausted: <unit>"``.

**Forced answer** (:func:`force_answers`): when a search ends without a terminal node, the best
path is continued after ``FORCE_ANSWER`` with a short greedy call, also batched over problems.
Searches hold that call's worst case (the problem plus ``max_depth`` full steps as prompt,
``answer_tokens`` output) in a reservation from the start (:func:`hold`), so a search that spends
its whole budget can still afford its answer.  When not even that fits (tiny budgets, or tool
observations that make the path longer than ``max_depth`` steps under an input-token budget), the
answer is extracted from the best path's text and the trace says so.

:meth:`Tree.to_json` exports the tree with values, spend and prune decisions (the evaluation
report draws it); token sums over the nodes plus scoring and forced-answer calls equal the ledger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from budgetlm.backends.base import Backend, Completion, GenerationRequest, SamplingParams
from budgetlm.errors import BudgetExceeded, ConfigError
from budgetlm.meter import Meter, Reservation
from budgetlm.strategies.aggregate import answer_key, vote
from budgetlm.strategies.base import Problem, Result
from budgetlm.strategies.values import StepView, ValueScorer
from budgetlm.tools import OBSERVATION_TEMPLATE, TOOL_CALL_CLOSE, Tool, ToolOutcome, as_tools, call_tool, describe_tools

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
    tool: dict[str, Any] | None = None
    """The tool call the step made and its observation, if any."""
    children: list[int] = field(default_factory=list)
    """Children ids."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record."""
        return {
            "id": self.id, "parent": self.parent, "depth": self.depth, "step": self.step, "tokens": self.tokens,
            "logprob": self.logprob, "finish_reason": self.finish_reason, "value": self.value,
            "residual": self.residual, "score": self.score, "terminal": self.terminal, "answer": self.answer,
            "pruned": self.pruned, "closed": self.closed, "expansions": self.expansions, "round": self.round, "tool": self.tool,
            "children": list(self.children),
        }


class Tree:
    """The search tree of one problem."""

    def __init__(self, problem: Problem, meter: Meter, *, root_value: float | None = None) -> None:
        self.problem = problem
        self.meter = meter
        self.auto_root = root_value is None
        """The root's value follows its children's under value scorers (see :func:`score_nodes`)."""
        self.nodes: list[Node] = [Node(0, None, 0, value=0.5 if root_value is None else root_value)]
        self.extra_tokens: dict[str, int] = {"scoring": 0, "forced": 0}
        """Output tokens spent outside node expansion, by purpose (summed in :meth:`to_json`)."""
        self.forced: dict[str, Any] | None = None
        self.round_scoring: dict[int, int] = {}
        """Longest scoring output per round (the critical path of scoring calls)."""
        self.unscored = 0
        """Steps the scorer could not rate (non-finite scores)."""
        self.tool_refused = 0
        """Tool calls the budget refused (their nodes were pruned)."""
        self.done: str | None = None
        """Why the search ended (``"done"`` or a budget reason), ``None`` while running."""

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add(self, parent: Node, **kw: Any) -> Node:
        node = Node(len(self.nodes), parent.id, parent.depth + 1, **kw)
        self.nodes.append(node)
        parent.children.append(node.id)
        return node

    def path(self, node: Node) -> list[Node]:
        """Root-to-``node`` nodes."""
        out = [node]
        while out[-1].parent is not None:
            out.append(self.nodes[out[-1].parent])  # type: ignore[index]
        return out[::-1]

    def text(self, node: Node) -> str:
        """The reply so far at ``node`` (the concatenated steps of its path)."""
        return "".join(n.step for n in self.path(node))

    def terminals(self) -> list[Node]:
        """Terminal nodes that were not pruned (all terminal nodes when every one was pruned)."""
        t = [n for n in self.nodes if n.terminal and n.pruned is None]
        return t or [n for n in self.nodes if n.terminal]

    def live_children(self, node: Node) -> list[Node]:
        return [self.nodes[c] for c in node.children if self.nodes[c].pruned is None]

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

    def to_json(self) -> dict[str, Any]:
        """The whole tree, JSON-ready (nodes with values, spend and prune decisions)."""
        return {"nodes": [n.to_json() for n in self.nodes], "node_tokens": sum(n.tokens for n in self.nodes),
                "extra_tokens": dict(self.extra_tokens), "output_tokens": self.output_tokens(),
                "forced": self.forced, "stop_reason": self.done, "unscored": self.unscored,
                "tool_refused": self.tool_refused}


# ----------------------------------------------------------------------------- expansion
@dataclass(frozen=True)
class StepConfig:
    """How steps are generated (shared by all tree searches)."""

    delimiter: str = "\n\n"
    """String that ends a step (kept in the path)."""
    step_tokens: int = 64
    """Most tokens per step."""
    temperature: float = 0.7
    """Sampling temperature of expansions."""
    top_p: float = 1.0
    """Nucleus mass of expansions."""
    seed: int | None = None
    """Base seed (each round uses ``seed + round``)."""
    max_depth: int = 8
    """Steps after which a non-terminal node is not expanded further."""

    def __post_init__(self) -> None:
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise ConfigError(f"`delimiter` must be a non-empty string, got {self.delimiter!r}; use '\\n\\n' for "
                              "paragraph steps or '\\n' for line steps")
        if self.step_tokens < 1:
            raise ConfigError(f"`step_tokens` must be >= 1, got {self.step_tokens}")
        if self.max_depth < 1:
            raise ConfigError(f"`max_depth` must be >= 1, got {self.max_depth}")


def expand(
    backend: Backend, jobs: Sequence[tuple[Tree, Node, int]], cfg: StepConfig, round: int,
    tools: Mapping[int, Mapping[str, Tool]] | None = None,
) -> list[list[Node]]:
    """Sample ``k`` children for each ``(tree, node, k)`` in one backend call; new children per job.

    A job whose meter cannot afford the call gets no children and its tree is marked done with the
    meter's reason.  ``tools`` maps ``id(tree)`` to the tools its problem may call.
    """
    if not jobs:
        return []
    reqs = []
    for tree, node, k in jobs:
        stops = [cfg.delimiter] + ([TOOL_CALL_CLOSE] if tools and tools.get(id(tree)) else [])
        sp = SamplingParams(
            n=k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.step_tokens, stop=stops, logprobs=0,
            seed=None if cfg.seed is None else cfg.seed + round,
        )
        reqs.append(GenerationRequest(messages=problem_messages(tree.problem), assistant_prefix=tree.text(node) or None,
                                      sampling=sp, meter=tree.meter, id=f"{tree.problem.id}/{node.id}"))
    gens = backend.generate(reqs, on_budget_exhausted="skip")
    out: list[list[Node]] = []
    for (tree, node, _), g in zip(jobs, gens, strict=True):
        if g.skipped:
            tree.done = tree.meter.stop_reason or g.skipped
            out.append([])
            continue
        node.expansions += 1
        kids = []
        for c in g.completions:
            kids.append(_child(tree, node, c, cfg, round, (tools or {}).get(id(tree))))
        out.append(kids)
    return out


def _child(tree: Tree, parent: Node, c: Completion, cfg: StepConfig, round: int,
           tools: Mapping[str, Tool] | None) -> Node:
    text = c.text
    terminal = False
    tool: dict[str, Any] | None = None
    if c.finish_reason == "stop" and c.stop_string == TOOL_CALL_CLOSE and tools:
        outcome: ToolOutcome = call_tool(text, tools, tree.meter)
        tool = outcome.to_json()
        text = text + TOOL_CALL_CLOSE + OBSERVATION_TEMPLATE.format(observation=outcome.observation)
    elif c.finish_reason == "stop" and c.stop_string is not None:
        text = text + c.stop_string
    elif c.finish_reason == "stop":
        terminal = True
    child = tree.add(parent, step=text, tokens=len(c.token_ids), logprob=c.mean_logprob,
                     finish_reason=c.finish_reason, terminal=terminal, round=round, tool=tool, value=parent.value)
    if terminal:
        child.answer = answer_key(tree.text(child))
    elif tool is not None and tool["skipped"]:
        child.pruned = tool["skipped"]
        tree.tool_refused += 1
    elif child.depth >= cfg.max_depth:
        child.pruned = "max depth"
    return child


def nan_safe(x: float | None) -> float | None:
    """``None`` for NaN/inf scores (a scorer failure is recorded, never propagated into values)."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


# ----------------------------------------------------------------------------- forced answers
def hold(meter: Meter, prompt_tokens: int, answer_tokens: int) -> Reservation | None:
    """Reserve the worst case of a forced answer up front (``None`` when even that does not fit)."""
    try:
        return meter.reserve(prompt_tokens=prompt_tokens, max_tokens=answer_tokens, n=1, may_think=False,
                             min_tokens=answer_tokens)
    except BudgetExceeded:
        return None


def force_answers(backend: Backend, trees: Sequence[Tree], answer_tokens: int) -> None:
    """Force an answer from the best path of each tree (one batched greedy call); sets ``tree.forced``."""
    jobs, reqs = [], []
    for t in trees:
        best = t.best()
        prefix = t.text(best).rstrip() + FORCE_ANSWER
        reqs.append(GenerationRequest(
            messages=problem_messages(t.problem), assistant_prefix=prefix, meter=t.meter, may_think=False,
            sampling=SamplingParams(n=1, temperature=0.0, max_tokens=answer_tokens, stop=["\n"]),
            id=f"{t.problem.id}/force"))
        jobs.append((t, best))
    gens = backend.generate(reqs, on_budget_exhausted="skip") if reqs else []
    for (t, best), g in zip(jobs, gens, strict=True):
        if g.skipped or not g.completions:
            ans = answer_key(t.text(best))
            t.forced = {"node": best.id, "text": "", "answer": ans, "called": False,
                        "note": f"no forced-answer call ({g.skipped}); answer extracted from the best path"}
            continue
        c = g.first
        t.extra_tokens["forced"] += len(c.token_ids)
        ans = answer_key(FORCE_ANSWER.strip() + " " + c.text) or answer_key(t.text(best))
        t.forced = {"node": best.id, "text": c.text, "answer": ans, "called": True, "tokens": len(c.token_ids)}


def finish(tree: Tree, final: str, *, sequential_tokens: int, trace: list[dict[str, Any]]) -> Result:
    """The :class:`Result` of a finished tree: vote or best over terminal nodes, else the forced answer."""
    terms = tree.terminals()
    usage = tree.meter.total()
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
        forced = tree.forced or {}
        node = tree.nodes[forced.get("node", tree.best().id)]
        text = tree.text(node).rstrip() + (FORCE_ANSWER + " " + forced["text"].lstrip() if forced.get("called") else "")
        answer = forced.get("answer")
        finish_reason = "forced"
    trace = trace + [{"tree": tree.to_json(), "final": {"node": node.id, "answer": answer, "rule": final if terms else "forced"}}]
    return Result(problem_id=tree.problem.id, text=text, answer=answer, usage=usage, stop_reason=reason,
                  finish_reason=finish_reason, truncated=False, sequential_tokens=sequential_tokens, trace=trace)


# ----------------------------------------------------------------------------- shared helpers
def check_common(*, answer_tokens: int, final: str, **positive: int) -> None:
    """Validate the parameters every tree search shares; ``positive`` names integers that must be >= 1."""
    for name, v in positive.items():
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"`{name}` must be >= 1 (an integer), got {v!r}")
    if answer_tokens < 1:
        raise ConfigError(f"`answer_tokens` must be >= 1 (the forced answer's length), got {answer_tokens}")
    if final not in ("vote", "best"):
        raise ConfigError(f"`final` must be 'vote' or 'best', got {final!r}")


def prompt_tokens(backend: Backend, problem: Problem, cfg: StepConfig) -> int:
    """Worst-case prompt of a forced answer: the rendered problem plus ``max_depth`` full steps."""
    text, ids = backend.render(GenerationRequest(messages=problem_messages(problem)))
    base = len(ids) if ids is not None else max(1, len(text or "") // 3)
    return base + cfg.max_depth * cfg.step_tokens + len(backend.encode(FORCE_ANSWER))


def problem_messages(problem: Problem) -> list[dict[str, str]]:
    """The problem's messages, with the tool list as a system message when it has tools and none is given."""
    msgs = list(problem.messages)
    if problem.tools and not any(m.get("role") == "system" for m in msgs):
        msgs = [{"role": "system", "content": describe_tools(as_tools(problem.tools))}] + msgs
    return msgs


def tools_of(trees: Sequence[Tree]) -> dict[int, dict[str, Tool]]:
    """``id(tree)`` → the tools its problem may call (problems without tools are left out)."""
    return {id(t): as_tools(t.problem.tools) for t in trees if t.problem.tools}


def score_nodes(pairs: Sequence[tuple[Tree, Node]], scorer: ValueScorer, backend: Backend, *, prune: bool,
                round: int) -> None:
    """Score new nodes (one batched scorer call) and set ``value``/``residual``; prune ``r <= 0`` when asked.

    Residual scorers: ``v = clip(v_parent + r, ε, 1)``.  Value scorers: ``v = clip(s, ε, 1)`` and
    ``r = v - v_parent`` (recorded; pruning by residual applies to residual scorers only); a root
    whose value was not set (``Tree(auto_root=True)``), which no value scorer rates, takes the mean
    value of its scored children, so it competes with them on the scorer's own scale.
    Non-finite scores leave the node unscored (parent's value, never pruned for it).
    """
    todo = [(t, n) for t, n in pairs if n.pruned is None]
    if not todo:
        return
    views = [StepView(t.problem, t.text(t.nodes[n.parent]) if n.parent is not None else "", n.step, n.logprob, t.meter)
             for t, n in todo]
    scored = scorer.score(views, backend)
    if len(scored) != len(views):
        raise ConfigError(f"scorer {scorer.name!r} must return one score per step ({len(views)}), got {len(scored)}")
    roots: dict[int, Tree] = {}
    for (t, n), (s, toks) in zip(todo, scored, strict=True):
        t.extra_tokens["scoring"] += int(toks)
        t.round_scoring[round] = max(t.round_scoring.get(round, 0), int(toks))
        parent = t.nodes[n.parent] if n.parent is not None else t.root
        val = nan_safe(s)
        if val is None:
            n.score, n.value = None, parent.value
            t.unscored += 1
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
            if n.parent == 0 and t.auto_root:
                roots[id(t)] = t
    for t in roots.values():  # value scorers: an unset root value is what its children are worth on average
        vals = [t.nodes[c].value for c in t.root.children if t.nodes[c].score is not None]
        t.root.value = sum(vals) / len(vals)
