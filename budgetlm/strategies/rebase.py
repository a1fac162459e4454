"""REBASE: reward-balanced tree search (Wu et al., "Inference Scaling Laws", arXiv 2408.00724; ALGORITHMS.md §4).

Each problem has a sampling width ``width`` (trajectories it will complete).  The first round
samples ``width`` children of the root.  Every later round takes the non-terminal nodes created in
the previous round (the frontier) and gives each ``n_i`` children with
``n_i ≈ W · softmax(v_i / T)_i``, where ``W`` is ``width`` minus the trajectories already completed
and ``T`` is ``reward_temperature``; the shares are rounded by largest remainder so they sum to
exactly ``W`` (:func:`allocate`).  High-reward nodes get more children, low-reward ones may get
none (they are recorded as pruned: "rebase: no children allotted").  All problems' expansions go in
one batched backend call per round; new steps are scored in one batched scorer call.  A problem
stops when ``W`` reaches 0, the frontier is empty, after ``max_depth`` steps, or when its budget is
spent (calls are clamped to what is left).  The answer is the value-weighted vote over completed
trajectories (the paper's weighted majority; ``final="best"`` takes the best one); without any, the
best node is continued with a forced answer reserved up front.

Scorer: the paper uses a PRM (``scorer="prm"`` with ``scorer_params={"path": ...}``); the default
``logprob`` needs no extra model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from budgetlm.backends.base import Backend
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.strategies.base import STRATEGIES, Problem, Result
from budgetlm.strategies.tree import Node, Tree, expand, score_nodes
from budgetlm.strategies.treesearch import TreeSearch


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


@STRATEGIES.register("rebase")
class Rebase(TreeSearch):
    """Reward-balanced expansion; see the module docstring."""

    name = "rebase"

    def __init__(
        self,
        width: int = 8,
        reward_temperature: float = 0.2,
        step_tokens: int = 64,
        delimiter: str = "\n\n",
        max_depth: int = 8,
        scorer: str = "logprob",
        scorer_params: dict[str, Any] | None = None,
        answer_tokens: int = 16,
        final: Literal["vote", "best"] = "vote",
        temperature: float = 0.7,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self._configure(step_tokens=step_tokens, delimiter=delimiter, max_depth=max_depth, scorer=scorer,
                        scorer_params=scorer_params, answer_tokens=answer_tokens, final=final, temperature=temperature,
                        top_p=top_p, seed=seed, width=width)
        if reward_temperature <= 0:
            raise ConfigError(f"`reward_temperature` must be > 0, got {reward_temperature}")
        self.width, self.reward_temperature = width, reward_temperature

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        trees, tools, holds = self._start(problems, meters, backend)
        frontier: list[list[Node]] = [[t.root] for t in trees]
        completed = [0] * len(trees)
        traces: list[list[dict[str, Any]]] = [[] for _ in trees]
        for rnd in range(self.max_depth):
            jobs: list[tuple[Tree, Node, int]] = []
            for i, t in enumerate(trees):
                if t.done:
                    continue
                left = self.width - completed[i]
                if left <= 0 or not frontier[i]:
                    t.done = "done"
                    continue
                if meters[i].exhausted():
                    t.done = meters[i].exhausted_reason()
                    continue
                alloc = [left] if rnd == 0 else allocate([n.value for n in frontier[i]], left, self.reward_temperature)
                for n, k in zip(frontier[i], alloc, strict=True):
                    if k > 0:
                        jobs.append((t, n, k))
                    else:
                        n.pruned = "rebase: no children allotted"
                traces[i].append({"round": rnd, "frontier": [n.id for n in frontier[i]], "children": alloc})
            if not jobs:
                break
            kids = expand(backend, jobs, self._cfg, rnd, tools)
            score_nodes([(t, c) for (t, _, _), cs in zip(jobs, kids, strict=True) for c in cs], self._scorer,
                        backend, prune=False, round=rnd)
            for i in range(len(trees)):
                frontier[i] = []
            index = {id(t): i for i, t in enumerate(trees)}
            for (t, _, _), cs in zip(jobs, kids, strict=True):
                i = index[id(t)]
                completed[i] += sum(1 for c in cs if c.terminal)
                frontier[i] += [c for c in cs if not c.terminal and c.pruned is None]
        return self._end(trees, holds, traces, backend, "max depth")
