"""Correctness and format rewards (ALGORITHMS.md §9, "Correctness").

:class:`Correctness` pays 1.0 for a correct final answer and 0.0 otherwise.  The answer is taken
from the text after thinking (thinking cut off by the length limit has no answer) and graded against
the dataset's gold column with one of budgetlm's graders (:mod:`budgetlm.evals.graders`):

- ``math``: math-verify ``verify(parse(gold), parse(pred))``, gold first, safe off the main thread
  (:func:`~budgetlm.evals.graders.math_equal`);
- ``reasoning_gym``: the data set's own ``score_answer(answer, entry)``; the entry is the row's
  ``entry`` column when there is one, else the row itself (its ``answer`` and ``metadata`` columns,
  JSON strings decoded);
- ``exact``, ``normalized``, ``numeric``: string, normalised-string and numeric equality.

The length, effort and compression rewards take a :class:`Correctness` to decide ``1[correct]``.
:class:`ThinkFormat` pays 1.0 for exactly one well-formed thinking block followed by an answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from budgetlm.errors import ConfigError, invalid, missing
from budgetlm.evals.graders import GRADERS, Grader, get_grader
from budgetlm.rewards.base import RewardBatch, RewardFunction

__all__ = ["GRADER_NAMES", "Correctness", "GradedReward", "ThinkFormat"]

GRADER_NAMES = ("math", "reasoning_gym", "exact", "normalized", "numeric")
"""Graders a :class:`Correctness` reward can use."""


@dataclass(eq=False)
class Correctness(RewardFunction):
    """1.0 when the answer after thinking matches the gold column, else 0.0.

    >>> Correctness("exact")(completions=["<think>2+2</think>4", "<think>hm</think>5"], answer=["4", "4"])
    [1.0, 0.0]
    """

    default_name: ClassVar[str] = "correctness"

    grader: str = "math"
    """Grader name: ``math``, ``reasoning_gym``, ``exact``, ``normalized`` or ``numeric``."""
    answer_column: str = "answer"
    """Dataset column with the gold answer (a final answer, or a solution ending in ``\\boxed{}``/``####``)."""
    grader_params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the grader (``rel_tol`` for ``numeric``, ``timeout_s`` for ``math``, ...)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grader not in GRADER_NAMES or self.grader not in GRADERS:
            raise invalid("grader", f"one of {', '.join(GRADER_NAMES)}", self.grader)
        if not isinstance(self.answer_column, str) or not self.answer_column:
            raise invalid("answer_column", "a column name", self.answer_column)
        self._grader: Grader | None = None
        self.get_grader()  # fail at construction (bad params, math-verify missing)

    def get_grader(self) -> Grader:
        """The grader, built on first use (not pickled: rebuilt after unpickling)."""
        if self._grader is None:
            try:
                self._grader = get_grader(self.grader, **self.grader_params)
            except TypeError as exc:
                raise invalid("grader_params", f"keyword arguments of the {self.grader!r} grader",
                              self.grader_params, str(exc)) from None
        return self._grader

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_grader"] = None  # graders may cache unpicklable scoring functions
        return state

    def correct(self, batch: RewardBatch) -> list[bool]:
        """Whether each completion's answer is correct (truncated thinking: not correct)."""
        texts = batch.require_texts()
        golds = batch.column(self.answer_column, f"add the gold answers as a `{self.answer_column}` column "
                                                 f"or set answer_column")
        grader = self.get_grader()
        out = []
        for i, (text, gold) in enumerate(zip(texts, golds)):
            if gold is None:
                raise ConfigError(f"`{self.answer_column}` must hold a gold answer, got None at row {i}; "
                                  f"drop rows without answers from the dataset")
            sp = self.split(text)
            if sp.truncated:
                out.append(False)
                continue
            meta = batch.row(i) if self.grader == "reasoning_gym" else {}
            out.append(bool(grader.grade(sp.answer, gold, meta).correct))
        return out

    def score(self, batch: RewardBatch) -> list[float | None]:
        return [1.0 if ok else 0.0 for ok in self.correct(batch)]


@dataclass(eq=False)
class ThinkFormat(RewardFunction):
    """1.0 for exactly one well-formed thinking block followed by a non-empty answer, else 0.0.

    Well-formed: the text starts with the start tag (or, when the template opens thinking, has no
    start tag or one at the very beginning), both tags occur exactly once, in order.

    >>> ThinkFormat()(completions=["<think>2+2</think>4", "no thinking", "<think>2+2</think>"])
    [1.0, 0.0, 0.0]
    """

    default_name: ClassVar[str] = "think_format"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.thinking.enabled:
            raise invalid("thinking", "a ThinkingFormat with tags (enabled=True)", self.thinking,
                          "a format reward needs thinking tags to check")

    def well_formed(self, text: str) -> bool:
        """Whether ``text`` has one thinking block and a non-empty answer after it."""
        fmt = self.thinking
        body = text.lstrip()
        n_start, n_end = body.count(fmt.start), body.count(fmt.end)
        if n_end != 1 or n_start > 1:
            return False
        if body.startswith(fmt.start):
            body = body[len(fmt.start):]
        elif n_start == 1 or not fmt.starts_in_thinking:
            return False
        _, _, answer = body.partition(fmt.end)
        return bool(answer.strip())

    def score(self, batch: RewardBatch) -> list[float | None]:
        return [1.0 if self.well_formed(t) else 0.0 for t in batch.require_texts()]


@dataclass(eq=False, kw_only=True)
class GradedReward(RewardFunction):
    """A reward that needs ``1[correct]``: holds a :class:`Correctness` (default: math grader on ``answer``)."""

    correctness: Correctness | None = None
    """Decides correctness; None: ``Correctness("math", "answer")`` with this reward's thinking format."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.correctness is None:
            self.correctness = Correctness(thinking=self.thinking)
        elif not isinstance(self.correctness, Correctness):
            raise invalid("correctness", "a Correctness reward (or None for the math grader)", self.correctness)

    @property
    def judge(self) -> Correctness:
        """The :class:`Correctness` in use."""
        if self.correctness is None:
            raise missing('self.correctness')
        return self.correctness

    def correct(self, batch: RewardBatch) -> list[bool]:
        """Whether each completion is correct, by :attr:`correctness`."""
        return self.judge.correct(batch)
