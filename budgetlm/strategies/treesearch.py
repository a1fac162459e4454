"""The base class of the tree searches (``bavt``, ``beam``, ``rebase``): shared parameters, the per-problem program.

Each problem's search is its own async program (:meth:`TreeSearch.solve_one`): it builds the
problem's :class:`~budgetlm.strategies.tree.Tree`, holds the forced answer's worst case on the
problem's meter for the whole search (``async with`` the reservation, released on the way out,
also when the problem is cancelled), runs the subclass's rounds (:meth:`TreeSearch.search`) on the
shared engine — concurrently with, and never waiting for, the other problems' rounds — and then
forces an answer where no node is terminal.  ``Result.usage`` is the problem meter's total (set by
the strategy base).

Parameters are typed (:class:`TreeParams` and one subclass per search); the fields every search
shares are the ``Annotated`` types below, so each search's parameter model lists its own
parameters first (``unknown parameter`` errors list them in that order).
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from budgetlm.io import JsonObject
from budgetlm.strategies.base import Context, Problem, Result, Strategy, StrategyParams
from budgetlm.strategies.tree import StepConfig, Tree, finish, force_answer, forced_prompt_tokens, hold
from budgetlm.strategies.values import VALUE_SCORERS, ValueScorer, get_scorer


def _scorer(v: object) -> object:
    if isinstance(v, str | ValueScorer):
        return v
    raise ValueError(f"`scorer` must be a value scorer name ({', '.join(VALUE_SCORERS.names())}) or a ValueScorer "
                     f"instance, got {v!r}; e.g. scorer='logprob'")


def _delimiter(v: str) -> str:
    if not v:
        raise ValueError(f"`delimiter` must be a non-empty string, got {v!r}; use '\\n\\n' for paragraph steps "
                         "or '\\n' for line steps")
    return v


StepTokens = Annotated[int, Field(ge=1, description="Most tokens per step.")]
Delimiter = Annotated[str, AfterValidator(_delimiter), Field(description="String that ends a step (kept in the path).")]
MaxDepth = Annotated[int, Field(ge=1, description="Steps after which a node is not expanded further.")]
Scorer = Annotated[str | ValueScorer, BeforeValidator(_scorer), Field(description="Value scorer: residual, logprob, prm, or a ValueScorer.")]
ScorerParams = Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v),
                         Field(description="Parameters of the value scorer (e.g. {'path': ...} for prm); None: {}.")]
AnswerTokens = Annotated[int, Field(ge=1, description="Length of the forced answer (reserved up front).")]
Final = Annotated[Literal["vote", "best"], Field(description="vote: value-weighted vote over terminal nodes; "
                                                             "best: the terminal node with the highest value.")]
Temperature = Annotated[float, Field(ge=0, description="Sampling temperature of expansions.")]
TopP = Annotated[float, Field(gt=0, le=1, description="Nucleus mass of expansions.")]
Seed = Annotated[int | None, Field(description="Base seed (round r samples with seed + r; None: unseeded).")]


class TreeParams(StrategyParams):
    """Base of the tree searches' parameters.

    Each subclass declares its own fields first, then the shared ones with the types above
    (``step_tokens``, ``delimiter``, ``max_depth``, ``scorer``, ``scorer_params``, ``answer_tokens``,
    ``final``, ``temperature``, ``top_p``, ``seed``); declaring them here would list them first.
    """


class TreeSearch(Strategy):
    """Shared machinery of the tree searches; see the module docstring."""

    Params: ClassVar[type[StrategyParams]] = TreeParams
    unfinished: ClassVar[str] = "max depth"
    """The stop reason when the search ran out of rounds without a terminal node."""
    step_tokens: int
    delimiter: str
    max_depth: int
    scorer: str | ValueScorer
    scorer_params: dict[str, Any]
    answer_tokens: int
    final: Literal["vote", "best"]
    temperature: float
    top_p: float
    seed: int | None
    _cfg: StepConfig
    _scorer: ValueScorer

    def setup(self) -> None:
        self._cfg = StepConfig(delimiter=self.delimiter, step_tokens=self.step_tokens, temperature=self.temperature,
                               top_p=self.top_p, seed=self.seed, max_depth=self.max_depth)
        self._scorer = get_scorer(self.scorer, **self.scorer_params)

    def _root_value(self) -> float | None:
        """The root's value (``None``: 0.5 under residual scorers, else its rated children's mean)."""
        return None

    async def search(self, tree: Tree, ctx: Context, trace: list[JsonObject]) -> None:
        """Run the search's rounds on ``tree`` (set ``tree.done`` when it stops for a reason of its own)."""
        raise NotImplementedError

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        tree = Tree(problem, ctx.meter, root_value=self._root_value(), backend=ctx.backend)
        trace: list[JsonObject] = []
        held = hold(ctx.meter, forced_prompt_tokens(tree, self._cfg), self.answer_tokens, ctx.backend)
        async with held if held is not None else contextlib.nullcontext():  # released on the way out
            await self.search(tree, ctx, trace)
        if not tree.done:
            tree.done = self.unfinished if not tree.has_terminal() else "done"
        if not tree.has_terminal():  # no await since the hold was released: nothing else can take it
            await force_answer(tree, ctx, self.answer_tokens)
        return finish(tree, self.final, sequential_tokens=tree.sequential_tokens(), trace=trace)
