"""The strategy layer: a small protocol, typed results, and a name registry.

A :class:`Strategy` answers a batch of :class:`Problem` s under a :class:`~budgetlm.budget.Budget`
that applies *per problem* (each problem gets its own child :class:`~budgetlm.meter.Meter`), and
optionally also to the whole batch (``batch_budget``: the problems' meters are children of one
batch meter, so budget left unspent by finished problems stays available to unfinished ones).
Strategies send the calls of all problems of a round to the backend in one batched call and charge
everything to the problems' meters, so a strategy can never overspend.

Every :class:`Result` carries the final text and extracted answer, a trace of every call, the
spend, and ``stop_reason`` (``"done"`` or ``"budget exhausted: <unit>"``).  When the budget ends
early a strategy still returns its best answer so far.

Strategies are registered by name: ``budgetlm.strategies.get("sample", n=1)``; unknown names list
the available ones and unknown parameters list the valid ones.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from budgetlm.backends.base import Backend, Message
from budgetlm.budget import Budget
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.registry import Registry
from budgetlm.tools import Tool
from budgetlm.usage import Usage


@dataclass
class Problem:
    """One question for a strategy."""

    id: str
    """Stable id (used in records and traces)."""
    messages: list[Message]
    """Chat messages to answer (the last is the user's question)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything the caller wants echoed back."""
    tools: list[Tool] = field(default_factory=list)
    """Tools the model may call (tool-using strategies run them; see :mod:`budgetlm.tools`)."""

    @classmethod
    def from_text(cls, text: str, id: str | None = None) -> Problem:
        """A problem with one user message."""
        if not text or not text.strip():
            raise ConfigError("`problem` must be a non-empty question, got ''")
        return cls(id=id or str(abs(hash(text))), messages=[{"role": "user", "content": text}])


@dataclass
class Result:
    """What a strategy returns for one problem."""

    problem_id: str
    """The problem's id."""
    text: str
    """The final answer text (thinking removed); empty when no answer was produced."""
    answer: str | None
    """The extracted final answer, or ``None``."""
    usage: Usage
    """Everything spent on this problem (sum of its calls)."""
    stop_reason: str = "done"
    """``"done"`` or why the strategy stopped early (e.g. ``"budget exhausted: output_tokens"``)."""
    finish_reason: str | None = None
    """Finish reason of the sample the answer came from."""
    truncated: bool = False
    """The answer's sample was cut by its token limit."""
    thinking_truncated: bool = False
    """The answer's sample ended inside thinking (no answer may be extracted)."""
    sequential_tokens: int = 0
    """Output tokens on the critical path (calls that had to run one after another)."""
    trace: list[dict[str, Any]] = field(default_factory=list)
    """One entry per call/round/node, JSON-ready."""
    ledger: dict[str, Any] = field(default_factory=dict)
    """The problem meter's summary (spend, limit, remaining by unit)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific figures copied into the eval record (route taken, expensive calls, agent steps)."""

    @property
    def model_calls(self) -> int:
        """Model calls made for this problem."""
        return self.usage.calls


class Strategy(ABC):
    """Base class of strategies: configure in ``__init__``, run with :meth:`solve`."""

    name: ClassVar[str] = "strategy"

    @abstractmethod
    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        """Solve ``problems``, charging problem ``i``'s calls to ``meters[i]``."""

    def solve(
        self,
        problems: Sequence[Problem | str],
        *,
        backend: Backend,
        budget: Budget | dict[str, Any] | str | None = None,
        batch_budget: Budget | dict[str, Any] | str | None = None,
    ) -> list[Result]:
        """One :class:`Result` per problem; ``budget`` applies per problem, ``batch_budget`` to all."""
        probs = [p if isinstance(p, Problem) else Problem.from_text(p, id=str(i)) for i, p in enumerate(problems)]
        root = Meter(batch_budget, name="batch")
        per = Budget.parse(budget)
        meters = [root.child(per, name=p.id) for p in probs]
        results = self.run(probs, meters, backend)
        for r, m in zip(results, meters, strict=True):
            r.ledger = m.summary()
        return results

    def params(self) -> dict[str, Any]:
        """The strategy's parameters (recorded with every result)."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
"""Strategy name → class."""


def get(name: str, **params: Any) -> Strategy:
    """The strategy ``name`` configured with ``params``; errors list names and valid parameters."""
    cls = STRATEGIES.get(name)
    sig = inspect.signature(cls.__init__)
    valid = [k for k, p in sig.parameters.items() if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for strategy {name!r}; valid: {', '.join(valid) or '(none)'}"
        )
    return cls(**params)
