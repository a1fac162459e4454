"""Budget-Aware Value Tree search, BAVT (arXiv 2603.12634; ALGORITHMS.md §4).

Training-free: one backbone model expands the tree and (with the default ``residual`` scorer)
evaluates it.  Each problem's search is its own async program on the shared engine and runs its
own rounds (it never waits for another problem's round); every round:

1. **Commit check.**  ρ is the remaining fraction of the problem's search budget (the meter's ρ
   over its tightest unit, relative to the ρ it had when the search started, after the forced
   answer's reservation).  When a terminal node exists and ``ρ < commit`` the problem stops.
2. **Budget-conditioned selection.**  ``select`` distinct nodes are drawn without replacement among
   the expandable nodes (not terminal, not pruned, above ``max_depth``) with probability
   ``∝ v^(1/ρ)`` (ρ clipped to ``>= rho_min``; :func:`selection_probs`).  At ρ = 1 this is
   proportional to value (explore); as ρ → 0 it becomes argmax (exploit).  A node may be selected
   again in a later round (its new children join the old ones as siblings).
3. **Expansion.**  ``width`` children per selected node, as one request with ``n = width`` per
   selected node, continuing the path from its token ids (:func:`budgetlm.strategies.tree.expand`);
   a round's requests run concurrently.  (ALGORITHMS.md §4 batches all problems' expansions in one
   backend call; here every problem's requests join the one running engine batch as they come,
   which the engine batches continuously.)  Steps that call a tool run it
   (charged to the ``tool_calls`` budget; a refused call prunes its node, and a node whose children
   were all refused tool calls is *closed*: never selected again).
4. **Residual values.**  The scorer rates the round's new steps (concurrent rating requests).  With a
   residual scorer, ``v = clip(v_parent + r, ε, 1)`` and steps with ``r <= 0`` are pruned
   (redundant or uninformative steps, including useless tool calls) and never expanded.  With a
   value scorer (``logprob``, ``prm``) ``v`` is the score itself and nothing is pruned by value
   (the residual ``v - v_parent`` is recorded only) — a deviation, since the paper's rule needs
   residuals.  Non-finite scores leave the node unscored (parent's value, not pruned).
5. **Stop.**  A problem stops at commit, when its budget cannot afford another expansion, when no
   expandable node is left, or after ``max_rounds``.  The answer is the value-weighted vote over
   terminal nodes (``final="vote"``, the default; ``"best"`` takes the terminal node with the highest
   value).  Without a terminal node the best path (highest value, then deepest) is continued with a
   forced short answer, whose worst case was reserved at the start, so an answer is always returned.

The root's value is ``root_value`` when given; by default 0.5 under residual scorers (the
neutral point residuals move from) and, under value scorers, the mean value of its rated children.

Selection draws from ``numpy.random.default_rng([seed or 0, crc32(problem id)])``, so a problem's
draws do not depend on which other problems share its batch.

Deviations: the paper selects one node per step; ``select > 1`` batches several (default 1).  The
residual rating is read from the model's distribution over the digits 1–5 rather than parsed from a
generated number (see :mod:`budgetlm.strategies.values`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from pydantic import Field, field_validator

from budgetlm.io import JsonObject
from budgetlm.strategies.base import STRATEGIES, Context
from budgetlm.strategies.tree import Node, Tree, expand, score_nodes
from budgetlm.strategies.treesearch import (
    AnswerTokens,
    Delimiter,
    Final,
    MaxDepth,
    Scorer,
    ScorerParams,
    Seed,
    StepTokens,
    Temperature,
    TopP,
    TreeParams,
    TreeSearch,
)


def selection_probs(values: Sequence[float], rho: float, rho_min: float = 0.05) -> np.ndarray:
    """Selection probabilities ``∝ v^(1/ρ)`` (ρ clipped to ``[rho_min, 1]``), computed in log space."""
    if not values:
        return np.zeros(0)
    r = min(1.0, max(rho_min, float(rho)))
    logw = np.log(np.clip(np.asarray(values, dtype=float), 1e-12, None)) / r
    logw -= logw.max()
    w = np.exp(logw)
    probs: np.ndarray = w / w.sum()
    return probs


class BAVTParams(TreeParams):
    """Parameters of :class:`BAVT`."""

    width: int = Field(default=3, ge=1, description="Children per selected node.")
    select: int = Field(default=1, ge=1, description="Nodes selected per round.")
    step_tokens: StepTokens = 64
    delimiter: Delimiter = "\n\n"
    max_depth: MaxDepth = 8
    scorer: Scorer = "residual"
    scorer_params: ScorerParams = Field(default_factory=dict)
    commit: float = Field(default=0.5, description="Stop once an answer exists and ρ < commit.")
    rho_min: float = Field(default=0.05, description="Floor of ρ in the selection exponent 1/ρ.")
    answer_tokens: AnswerTokens = 16
    final: Final = "vote"
    temperature: Temperature = 0.7
    top_p: TopP = 1.0
    root_value: float | None = Field(default=None, description="The root's value (None: 0.5 under residual "
                                                               "scorers, else its rated children's mean).")
    max_rounds: int = Field(default=32, ge=1, description="Most rounds per problem.")
    seed: Seed = None

    @field_validator("commit")
    @classmethod
    def _commit(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"`commit` must be in [0, 1] (the ρ below which a found answer is kept), got {v}")
        return v

    @field_validator("rho_min")
    @classmethod
    def _rho_min(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"`rho_min` must be in (0, 1], got {v}")
        return v

    @field_validator("root_value")
    @classmethod
    def _root_value(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"`root_value` must be in (0, 1], got {v}")
        return v


@STRATEGIES.register("bavt")
class BAVT(TreeSearch):
    """Budget-aware value tree search; see the module docstring."""

    name = "bavt"
    Params = BAVTParams
    p: BAVTParams
    unfinished = "max rounds"
    width: int
    select: int
    commit: float
    rho_min: float
    max_rounds: int

    root_value: float | None

    def _root_value(self) -> float | None:
        return self.root_value

    def expandable(self, tree: Tree) -> list[Node]:
        """Nodes that may be selected: not terminal, not pruned, not closed, above the depth limit."""
        return [n for n in tree.nodes
                if not n.terminal and n.pruned is None and n.closed is None and n.depth < self.max_depth]

    async def search(self, tree: Tree, ctx: Context, trace: list[JsonObject]) -> None:
        meter = ctx.meter
        rho0 = meter.rho()  # after the forced answer's hold
        rng = np.random.default_rng([self.seed or 0, zlib.crc32(tree.problem.id.encode())])
        for rnd in range(self.max_rounds):
            rho = meter.rho() / rho0 if rho0 > 0 else 0.0
            if tree.has_terminal() and rho < self.commit:
                tree.done = "done"
                trace.append({"round": rnd, "rho": rho, "commit": True})
                return
            if meter.exhausted():
                tree.done = meter.exhausted_reason()
                return
            cand = self.expandable(tree)
            if not cand:
                tree.done = "done"
                return
            p = selection_probs([n.value for n in cand], rho, self.rho_min)
            k = min(self.select, len(cand), int(np.count_nonzero(p)))
            picks = rng.choice(len(cand), size=k, replace=False, p=p)
            chosen = [cand[j] for j in picks]
            trace.append({"round": rnd, "rho": rho, "selected": [n.id for n in chosen],
                          "p_selected": [float(p[j]) for j in picks]})
            kids = await expand(tree, [(n, self.width) for n in chosen], self._cfg, rnd, ctx)
            for node, cs in zip(chosen, kids, strict=True):
                if cs and all(c.tool is not None and c.tool["skipped"] for c in cs):
                    node.closed = "budget exhausted: tool_calls"  # it only leads to refused tool calls
            await score_nodes(tree, [c for cs in kids for c in cs], self._scorer, ctx, prune=True, round=rnd)
            if tree.done:  # the budget refused an expansion
                return
        tree.done = "max rounds"
