"""Evaluation suites: items with gold answers and a grader.

A :class:`Suite` yields :class:`EvalItem` s (a question or chat messages, a gold answer, metadata)
and grades a model's answer text for an item (:meth:`Suite.grade`), extracting the answer first.
Suites are built from spec strings by :func:`budgetlm.evals.suites.get`, e.g.
``reasoning_gym:chain_sum?min_digits=1&max_digits=1&size=200&seed=1&split=test``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from budgetlm.backends.base import Message
from budgetlm.tools import Tool

DEFAULT_PROMPT = "{question}\nGive the final answer after 'Answer:'."
"""The default prompt template of question suites; ``{question}`` is replaced by the question."""

_FIELD = re.compile(r"\{(\w+)\}")


def render_prompt(template: str, fields: Mapping[str, object]) -> str:
    """Replace ``{name}`` in ``template`` by ``fields[name]``; other braces (LaTeX, JSON) stay as they are."""
    return _FIELD.sub(lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)


@dataclass
class EvalItem:
    """One evaluation item."""

    id: str
    """Stable id within the suite (resuming relies on it)."""
    messages: list[Message]
    """The chat messages to send (the suite's prompt template already applied)."""
    gold: object
    """The reference answer (text, number, or what the grader needs)."""
    question: str = ""
    """The raw question, for records and reports."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything the grader needs (reasoning-gym entry, HumanEval test code, ...)."""
    tools: list[Tool] = field(default_factory=list)
    """Tools an agent may call on this item (agent suites; see :mod:`budgetlm.tools`)."""


@dataclass(frozen=True)
class Grade:
    """The grader's verdict on one answer."""

    score: float
    """Score in [0, 1]."""
    correct: bool
    """Whether the answer counts as correct."""
    answer: str | None
    """The extracted answer (None when nothing was found or thinking was truncated)."""


class Suite(ABC):
    """A named list of items and a grader."""

    name: str = "suite"

    @abstractmethod
    def items(self) -> list[EvalItem]:
        """The items, in a fixed order."""

    @abstractmethod
    def grade(self, item: EvalItem, text: str | None) -> Grade:
        """Grade the answer text (thinking removed; ``None`` when there is no answer)."""

    def __len__(self) -> int:
        return len(self.items())
