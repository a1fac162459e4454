"""REBASE: reward-balanced tree search (Wu et al., "Inference Scaling Laws", arXiv 2408.00724; ALGORITHMS.md §4).

Each problem has a sampling width ``width`` (trajectories it will complete).  The first round
samples ``width`` children of the root.  Every later round takes the non-terminal nodes created in
the previous round (the frontier) and gives each ``n_i`` children with
``n_i ≈ W · softmax(v_i / T)_i``, where ``W`` is ``width`` minus the trajectories already completed
and ``T`` is ``reward_temperature``; the shares are rounded by largest remainder so they sum to
exactly ``W`` (:func:`allocate`).  High-reward nodes get more children, low-reward ones may get
none (they are recorded as pruned: "rebase: no children allotted").  Each problem's search is its own
async program on the shared engine and runs its own rounds (it never waits for another problem's
round): a round's expansions are one request with ``n = n_i`` per allotted node, continuing the
node's token ids, all concurrently; new steps are scored in one scorer call.  A problem
stops when ``W`` reaches 0, the frontier is empty, after ``max_depth`` steps, or when its budget is
spent (calls are clamped to what is left).  The answer is the value-weighted vote over completed
trajectories (the paper's weighted majority; ``final="best"`` takes the best one); without any, the
best node is continued with a forced answer reserved up front.

Scorer: the paper uses a PRM (``scorer="prm"`` with ``scorer_params={"path": ...}``); the default
``logprob`` needs no extra model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

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


def allocate(values: Sequence[float], total: int, temperature: float) -> list[int]:
    """``total`` children split ∝ ``softmax(values / temperature)``, largest-remainder rounding (sums to ``total``)."""
    if total <= 0 or not values:
        return [0] * len(values)
    z = np.asarray(values, dtype=float) / temperature
    z -= z.max()
    w = np.exp(z)
    share = total * w / w.sum()
    base = np.floor(share).astype(int)
    rest = total - int(base.sum())
    order = sorted(range(len(values)), key=lambda i: (-(share[i] - base[i]), -values[i], i))
    for i in order[:rest]:
        base[i] += 1
    return [int(x) for x in base]


class RebaseParams(TreeParams):
    """Parameters of :class:`Rebase`."""

    width: int = Field(default=8, ge=1, description="Trajectories to complete (children per round in all).")
    reward_temperature: float = Field(default=0.2, gt=0, description="T of the softmax(value / T) allotment.")
    step_tokens: StepTokens = 64
    delimiter: Delimiter = "\n\n"
    max_depth: MaxDepth = 8
    scorer: Scorer = "logprob"
    scorer_params: ScorerParams = Field(default_factory=dict)
    answer_tokens: AnswerTokens = 16
    final: Final = "vote"
    temperature: Temperature = 0.7
    top_p: TopP = 1.0
    seed: Seed = None


@STRATEGIES.register("rebase")
class Rebase(TreeSearch):
    """Reward-balanced expansion; see the module docstring."""

    name = "rebase"
    Params = RebaseParams
    p: RebaseParams
    width: int
    reward_temperature: float

    async def search(self, tree: Tree, ctx: Context, trace: list[JsonObject]) -> None:
        meter = ctx.meter
        frontier: list[Node] = [tree.root]
        completed = 0
        for rnd in range(self.max_depth):
            left = self.width - completed
            if left <= 0 or not frontier:
                tree.done = "done"
                return
            if meter.exhausted():
                tree.done = meter.exhausted_reason()
                return
            alloc = [left] if rnd == 0 else allocate([n.value for n in frontier], left, self.reward_temperature)
            jobs: list[tuple[Node, int]] = []
            for n, k in zip(frontier, alloc, strict=True):
                if k > 0:
                    jobs.append((n, k))
                else:
                    n.pruned = "rebase: no children allotted"
            trace.append({"round": rnd, "frontier": [n.id for n in frontier], "children": alloc})
            kids = await expand(tree, jobs, self._cfg, rnd, ctx)
            cs = [c for group in kids for c in group]
            await score_nodes(tree, cs, self._scorer, ctx, prune=False, round=rnd)
            completed += sum(1 for c in cs if c.terminal)
            frontier = [c for c in cs if not c.terminal and c.pruned is None]
            if tree.done:  # the budget refused an expansion
                return
