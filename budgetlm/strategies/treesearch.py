"""The base class of the tree searches (``bavt``, ``beam``, ``rebase``): shared settings, setup, finish.

Subclasses keep their own explicit ``__init__`` signature (the registry lists parameters from it)
and call :meth:`TreeSearch._configure` for the settings every search shares; :meth:`TreeSearch._start`
builds the trees and reserves each problem's forced answer, :meth:`TreeSearch._end` releases the
reservations, forces answers where no node is terminal (one batched call) and builds the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from budgetlm.backends.base import Backend
from budgetlm.meter import Meter, Reservation
from budgetlm.strategies.base import Problem, Result, Strategy
from budgetlm.strategies.tree import (
    StepConfig,
    Tree,
    check_common,
    finish,
    force_answers,
    hold,
    prompt_tokens,
    tools_of,
)
from budgetlm.strategies.values import ValueScorer, get_scorer
from budgetlm.tools import Tool


class TreeSearch(Strategy):
    """Shared machinery of the tree searches; see the module docstring."""

    _cfg: StepConfig
    _scorer: ValueScorer

    def _configure(self, *, step_tokens: int, delimiter: str, max_depth: int, scorer: str,
                   scorer_params: dict[str, Any] | None, answer_tokens: int, final: str, temperature: float,
                   top_p: float, seed: int | None, **positive: int) -> None:
        check_common(answer_tokens=answer_tokens, final=final, max_depth=max_depth, **positive)
        self.step_tokens, self.delimiter, self.max_depth = step_tokens, delimiter, max_depth
        self.scorer, self.scorer_params = scorer, dict(scorer_params or {})
        self.answer_tokens, self.final = answer_tokens, final
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self._cfg = StepConfig(delimiter=delimiter, step_tokens=step_tokens, temperature=temperature, top_p=top_p,
                               seed=seed, max_depth=max_depth)
        self._scorer = get_scorer(scorer, **self.scorer_params)

    def _start(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend,
               root_value: float | None = None) -> tuple[list[Tree], dict[int, dict[str, Tool]], list[Reservation | None]]:
        """Trees, tools by tree, and each problem's forced-answer reservation."""
        trees = [Tree(p, m, root_value=root_value) for p, m in zip(problems, meters, strict=True)]
        holds = [hold(m, prompt_tokens(backend, p, self._cfg), self.answer_tokens)
                 for p, m in zip(problems, meters, strict=True)]
        return trees, tools_of(trees), holds

    def _end(self, trees: list[Tree], holds: list[Reservation | None], traces: list[list[dict[str, Any]]],
             backend: Backend, unfinished: str) -> list[Result]:
        """Mark unfinished trees (``unfinished`` when no node is terminal), force answers, build results."""
        for t in trees:
            if not t.done:
                t.done = unfinished if not any(n.terminal for n in t.nodes) else "done"
        for h in holds:
            if h is not None:
                h.release()
        force_answers(backend, [t for t in trees if not any(n.terminal for n in t.nodes)], self.answer_tokens)
        return [finish(t, self.final, sequential_tokens=t.sequential_tokens(), trace=tr)
                for t, tr in zip(trees, traces, strict=True)]
