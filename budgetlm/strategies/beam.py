"""Step-level beam search scored by a process reward model (ALGORITHMS.md §4, baselines).

As in search-and-learn's PRM beam search (Snell et al. 2408.03314, §5): keep ``beams`` partial
trajectories; each round every kept beam is expanded with ``expand`` children (one request with
``n = expand`` per beam, continuing the beam's token ids, siblings sharing their prompt; a round's
requests run concurrently), the new steps are scored in one scorer call, terminal children are set aside as completed, and the ``beams`` best
non-terminal children by value survive.  The first round expands the root with
``beams * expand`` children.  Each problem's search is its own async program: it runs its own rounds on the shared engine and
never waits for another problem's round.  A problem stops when ``beams`` trajectories have completed, when no
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


class BeamParams(TreeParams):
    """Parameters of :class:`BeamSearch`."""

    beams: int = Field(default=4, ge=1, description="Partial trajectories kept per round.")
    expand: int = Field(default=2, ge=1, description="Children per kept beam (the root gets beams * expand).")
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


@STRATEGIES.register("beam")
class BeamSearch(TreeSearch):
    """PRM-scored step beam search; see the module docstring."""

    name = "beam"
    Params = BeamParams
    p: BeamParams
    beams: int
    expand: int

    async def search(self, tree: Tree, ctx: Context, trace: list[JsonObject]) -> None:
        meter = ctx.meter
        beams: list[Node] = [tree.root]
        done_count = 0
        for rnd in range(self.max_depth):
            if not beams or done_count >= self.beams:
                tree.done = "done"
                return
            if meter.exhausted():
                tree.done = meter.exhausted_reason()
                return
            k = self.beams * self.expand if rnd == 0 else self.expand
            trace.append({"round": rnd, "beams": [b.id for b in beams]})
            kids = await expand(tree, [(b, k) for b in beams], self._cfg, rnd, ctx)
            cs = [c for group in kids for c in group]
            await score_nodes(tree, cs, self._scorer, ctx, prune=False, round=rnd)
            done_count += sum(1 for c in cs if c.terminal)
            live = sorted((c for c in cs if not c.terminal and c.pruned is None), key=lambda c: (-c.value, c.id))
            keep = live[: max(0, self.beams - done_count)]
            for c in live[len(keep):]:
                c.pruned = "beam: below the top-k"
            beams = keep
            if tree.done:  # the budget refused an expansion
                return
