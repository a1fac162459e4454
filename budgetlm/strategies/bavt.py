"""Budget-Aware Value Tree search, BAVT (arXiv 2603.12634; ALGORITHMS.md §4).

Training-free: one backbone model expands the tree and (with the default ``residual`` scorer)
evaluates it.  Every round, for every unfinished problem:

1. **Commit check.**  ρ is the remaining fraction of the problem's search budget (the meter's ρ
   over its tightest unit, relative to the ρ it had when the search started, after the forced
   answer's reservation).  When a terminal node exists and ``ρ < commit`` the problem stops.
2. **Budget-conditioned selection.**  ``select`` distinct nodes are drawn without replacement among
   the expandable nodes (not terminal, not pruned, above ``max_depth``) with probability
   ``∝ v^(1/ρ)`` (ρ clipped to ``>= rho_min``; :func:`selection_probs`).  At ρ = 1 this is
   proportional to value (explore); as ρ → 0 it becomes argmax (exploit).  A node may be selected
   again in a later round (its new children join the old ones as siblings).
3. **Expansion.**  ``width`` children per selected node; all problems' expansions go to the backend
   in one batched call (:func:`budgetlm.strategies.tree.expand`).  Steps that call a tool run it
   (charged to the ``tool_calls`` budget; a refused call prunes its node, and a node whose children
   were all refused tool calls is *closed*: never selected again).
4. **Residual values.**  The scorer rates the new steps of all problems in one batched call.  With a
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

Deviations: the paper selects one node per step; ``select > 1`` batches several (default 1).  The
residual rating is read from the model's distribution over the digits 1–5 rather than parsed from a
generated number (see :mod:`budgetlm.strategies.values`).
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


def selection_probs(values: Sequence[float], rho: float, rho_min: float = 0.05) -> np.ndarray:
    """Selection probabilities ``∝ v^(1/ρ)`` (ρ clipped to ``[rho_min, 1]``), computed in log space."""
    if not values:
        return np.zeros(0)
    r = min(1.0, max(rho_min, float(rho)))
    logw = np.log(np.clip(np.asarray(values, dtype=float), 1e-12, None)) / r
    logw -= logw.max()
    w = np.exp(logw)
    return w / w.sum()


@STRATEGIES.register("bavt")
class BAVT(TreeSearch):
    """Budget-aware value tree search; see the module docstring."""

    name = "bavt"

    def __init__(
        self,
        width: int = 3,
        select: int = 1,
        step_tokens: int = 64,
        delimiter: str = "\n\n",
        max_depth: int = 8,
        scorer: str = "residual",
        scorer_params: dict[str, Any] | None = None,
        commit: float = 0.5,
        rho_min: float = 0.05,
        answer_tokens: int = 16,
        final: Literal["vote", "best"] = "vote",
        temperature: float = 0.7,
        top_p: float = 1.0,
        root_value: float | None = None,
        max_rounds: int = 32,
        seed: int | None = None,
    ) -> None:
        self._configure(step_tokens=step_tokens, delimiter=delimiter, max_depth=max_depth, scorer=scorer,
                        scorer_params=scorer_params, answer_tokens=answer_tokens, final=final, temperature=temperature,
                        top_p=top_p, seed=seed, width=width, select=select, max_rounds=max_rounds)
        if not 0 <= commit <= 1:
            raise ConfigError(f"`commit` must be in [0, 1] (the ρ below which a found answer is kept), got {commit}")
        if not 0 < rho_min <= 1:
            raise ConfigError(f"`rho_min` must be in (0, 1], got {rho_min}")
        if root_value is not None and not 0 < root_value <= 1:
            raise ConfigError(f"`root_value` must be in (0, 1], got {root_value}")
        self.width, self.select, self.commit, self.rho_min = width, select, commit, rho_min
        self.max_rounds, self.root_value = max_rounds, root_value

    def expandable(self, tree: Tree) -> list[Node]:
        """Nodes that may be selected: not terminal, not pruned, not closed, above the depth limit."""
        return [n for n in tree.nodes
                if not n.terminal and n.pruned is None and n.closed is None and n.depth < self.max_depth]

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        trees, tools, holds = self._start(problems, meters, backend, root_value=self.root_value)
        rho0 = [m.rho() for m in meters]
        rngs = [np.random.default_rng([self.seed or 0, i]) for i in range(len(trees))]
        traces: list[list[dict[str, Any]]] = [[] for _ in trees]
        for rnd in range(self.max_rounds):
            jobs: list[tuple[Tree, Node, int]] = []
            for i, t in enumerate(trees):
                if t.done:
                    continue
                rho = meters[i].rho() / rho0[i] if rho0[i] > 0 else 0.0
                has_answer = any(n.terminal for n in t.nodes)
                if has_answer and rho < self.commit:
                    t.done = "done"
                    traces[i].append({"round": rnd, "rho": rho, "commit": True})
                    continue
                if meters[i].exhausted():
                    t.done = meters[i].exhausted_reason()
                    continue
                cand = self.expandable(t)
                if not cand:
                    t.done = "done"
                    continue
                p = selection_probs([n.value for n in cand], rho, self.rho_min)
                k = min(self.select, len(cand), int(np.count_nonzero(p)))
                picks = rngs[i].choice(len(cand), size=k, replace=False, p=p)
                chosen = [cand[j] for j in picks]
                jobs += [(t, n, self.width) for n in chosen]
                traces[i].append({"round": rnd, "rho": rho, "selected": [n.id for n in chosen],
                                  "p_selected": [float(p[j]) for j in picks]})
            if not jobs:
                break
            kids = expand(backend, jobs, self._cfg, rnd, tools)
            for (_, node, _), cs in zip(jobs, kids, strict=True):
                if cs and all(c.tool is not None and c.tool["skipped"] for c in cs):
                    node.closed = "budget exhausted: tool_calls"  # it only leads to refused tool calls
            score_nodes([(t, c) for (t, _, _), cs in zip(jobs, kids, strict=True) for c in cs], self._scorer,
                        backend, prune=True, round=rnd)
        for t in trees:
            if not t.done:
                t.done = "max rounds"
        return self._end(trees, holds, traces, backend, "max rounds")
