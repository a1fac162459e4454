"""Step-level beam search scored by a process reward model (ALGORITHMS.md §4, baselines).

As in search-and-learn's PRM beam search (Snell et al. 2408.03314, §5): keep ``beams`` partial
trajectories; each round every kept beam is expanded with ``expand`` children (one batched backend
call over all beams of all problems, siblings sharing their prompt), the new steps are scored in
one batched scorer call, terminal children are set aside as completed, and the ``beams`` best
non-terminal children by value survive.  The first round expands the root with
``beams * expand`` children.  A problem stops when ``beams`` trajectories have completed, when no
beam survives, after ``max_depth`` steps, or when its budget is spent (a round's steps are clamped
to what is left, so the last round may hold shorter steps).  The answer is the value-weighted vote
over completed trajectories (``final="vote"``) or the best one (``"best"``); without any, the best
beam is continued with a forced answer whose worst case was reserved up front.

Scorer: ``prm`` (an external process reward model) is the anchor's choice; the default is
``logprob`` so the search runs with no extra model.  With a residual scorer the value is the
parent's value plus the residual; nothing is pruned by value (selection does the pruning).

Budget: unlike search-and-learn (which records no tokens), every expansion and scoring call is
charged to the problem's meter and ``max_tokens`` is clamped to what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from budgetlm.backends.base import Backend
from budgetlm.meter import Meter
from budgetlm.strategies.base import STRATEGIES, Problem, Result
from budgetlm.strategies.tree import Node, Tree, expand, score_nodes
from budgetlm.strategies.treesearch import TreeSearch


@STRATEGIES.register("beam")
class BeamSearch(TreeSearch):
    """PRM-scored step beam search; see the module docstring."""

    name = "beam"

    def __init__(
        self,
        beams: int = 4,
        expand: int = 2,
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
                        top_p=top_p, seed=seed, beams=beams, expand=expand)
        self.beams, self.expand = beams, expand

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        trees, tools, holds = self._start(problems, meters, backend)
        beams: list[list[Node]] = [[t.root] for t in trees]
        done_count = [0] * len(trees)
        traces: list[list[dict[str, Any]]] = [[] for _ in trees]
        for rnd in range(self.max_depth):
            jobs: list[tuple[Tree, Node, int]] = []
            for i, t in enumerate(trees):
                if t.done:
                    continue
                if not beams[i] or done_count[i] >= self.beams:
                    t.done = "done"
                    continue
                if meters[i].exhausted():
                    t.done = meters[i].exhausted_reason()
                    continue
                k = self.beams * self.expand if rnd == 0 else self.expand
                jobs += [(t, b, k) for b in beams[i]]
                traces[i].append({"round": rnd, "beams": [b.id for b in beams[i]]})
            if not jobs:
                break
            kids = expand(backend, jobs, self._cfg, rnd, tools)
            score_nodes([(t, c) for (t, _, _), cs in zip(jobs, kids, strict=True) for c in cs], self._scorer,
                        backend, prune=False, round=rnd)
            new: dict[int, list[Node]] = {}
            for (t, _, _), cs in zip(jobs, kids, strict=True):
                new.setdefault(id(t), []).extend(cs)
            for i, t in enumerate(trees):
                if id(t) not in new:
                    continue
                cs = new[id(t)]
                done_count[i] += sum(1 for c in cs if c.terminal)
                live = sorted((c for c in cs if not c.terminal and c.pruned is None),
                              key=lambda c: (-c.value, c.id))
                keep = live[: max(0, self.beams - done_count[i])]
                for c in live[len(keep):]:
                    c.pruned = "beam: below the top-k"
                beams[i] = keep
        return self._end(trees, holds, traces, backend, "max depth")
