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

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypedDict

from pydantic import ConfigDict

from budgetlm.aio import run_sync
from budgetlm.backends.base import Backend, GenerationRequest, GenerationResult, Message, SamplingParams, ScoreResult
from budgetlm.backends.streaming import DeltaCallback
from budgetlm.budget import Budget
from budgetlm.config import Config
from budgetlm.errors import ConfigError
from budgetlm.io import JsonObject
from budgetlm.meter import LedgerSummary, Meter
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
    metadata: dict[str, object] = field(default_factory=dict)
    """Anything the caller wants echoed back."""
    tools: list[Tool] = field(default_factory=list)
    """Tools the model may call (tool-using strategies run them; see :mod:`budgetlm.tools`)."""
    assistant_prefix: str | None = None
    """Text the reply starts with (the server forces a tool call with it); ``sample`` and the voting strategies
    continue it and put it back in front of the answer text, other strategies ignore it."""
    json_schema: JsonObject | None = None
    """Constrain the reply (after :attr:`assistant_prefix`) to this JSON schema; the server sets it for forced tool
    calls on backends with constrained decoding.  ``sample``, the voting strategies and ``adaptive`` honour it
    (:meth:`constrain`), other strategies ignore it."""

    calls_tools: bool = False
    """The reply may be a tool call (the server's requests with tools): strategies that rewrite the reply (``cot``
    forces an answer after its reasoning) stop at a ``</tool_call>`` and return the call as the reply."""

    def constrain(self, sp: SamplingParams) -> SamplingParams:
        """``sp`` with this problem's :attr:`json_schema` (unchanged when there is none)."""
        return sp if self.json_schema is None else sp.model_copy(update={"json_schema": self.json_schema})

    @classmethod
    def from_text(cls, text: str, id: str | None = None) -> Problem:
        """A problem with one user message; without `id`, a stable id from the text (sha256: the same in every process)."""
        if not text or not text.strip():
            raise ConfigError("`problem` must be a non-empty question, got ''")
        return cls(id=id or hashlib.sha256(text.encode()).hexdigest()[:16], messages=[{"role": "user", "content": text}])


LIMIT_STOPS = ("max rounds", "max depth", "max_steps reached")
"""Stop reasons of strategies that reached their own limit (tree rounds or depth, agent steps) within budget."""


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
    """``"done"``; ``"deadline"`` (the wall-clock budget ended the answer's generation); ``"budget exhausted:
    <unit>"``; or one of :data:`LIMIT_STOPS` (the strategy reached its own search limit within budget)."""
    finish_reason: str | None = None
    """Finish reason of the sample the answer came from, one of :data:`~budgetlm.usage.FinishReason` (``forced``
    for a tree search's forced answer)."""
    truncated: bool = False
    """The answer's sample was cut by its token limit."""
    thinking_truncated: bool = False
    """The answer's sample ended inside thinking (no answer may be extracted)."""
    sequential_tokens: int = 0
    """Output tokens on the critical path (calls that had to run one after another)."""
    trace: list[JsonObject] = field(default_factory=list)
    """One entry per call/round/node, JSON-ready."""
    ledger: LedgerSummary = field(default_factory=LedgerSummary)
    """The problem meter's summary (spend, limit, remaining by unit)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific figures copied into the eval record (route taken, expensive calls, agent steps)."""

    @property
    def model_calls(self) -> int:
        """Model calls made for this problem."""
        return self.usage.calls


@dataclass
class Context:
    """What a strategy program gets for one problem: the engine, the problem's meter, and streaming.

    ``generate``/``stream``/``score`` go to the shared engine (concurrently with every other problem
    and request in flight) and are charged to :attr:`meter`; cancelling the awaiting task aborts the
    generation in the engine and charges what was generated.
    """

    backend: Backend
    """The backend all calls go to."""
    meter: Meter
    """The problem's meter (every call is charged to it)."""
    on_delta: DeltaCallback | None = None
    """Where a streaming caller (the server) wants the answer's token deltas; ``None``: not streamed."""

    async def generate(self, request: GenerationRequest | str | list[Message], *,
                       sampling: SamplingParams | None = None, stream: bool = False,
                       backend: Backend | None = None, share: int | None = None) -> GenerationResult:
        """One request on the engine, charged to the problem's meter.

        ``stream=True`` marks the call whose output *is* the answer: its deltas go to :attr:`on_delta`.
        ``share`` caps its per-sample tokens (several concurrent requests of one problem: see
        :meth:`Meter.fair_share <budgetlm.meter.Meter.fair_share>`).
        """
        b = backend or self.backend
        return await b.agenerate_one(request, self.meter, sampling=sampling,
                                     on_delta=self.on_delta if stream else None, share=share)

    async def score_batch(self, pairs: Sequence[tuple[str | list[int] | list[Message], str | list[int]]], *, backend: Backend | None = None,
                          on_budget_exhausted: Literal["raise", "skip"] = "raise") -> list[ScoreResult]:
        """Log-probabilities of continuations, charged to the problem's meter as prompt tokens."""
        b = backend or self.backend
        fut = asyncio.ensure_future(asyncio.to_thread(b.score_batch, pairs, self.meter,
                                                      on_budget_exhausted=on_budget_exhausted))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            while not fut.done():  # a scoring pass cannot be aborted: let it settle its charge, then give up
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.shield(fut)
            raise


class StrategyParams(Config):
    """Base of every strategy's typed parameters (like vLLM's ``SamplingParams``): one pydantic model per
    strategy, a docstring and ``Field`` constraints per field, validated once when the strategy is built."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Strategy:
    """Base class of strategies: typed :attr:`Params`; a strategy is a per-problem async program.

    Build one with ``Strategy(params)`` or ``Strategy(**fields)`` (validated by :attr:`Params`; each
    field is also readable as an attribute); derived state goes in :meth:`setup`.

    Subclasses implement :meth:`solve_one` (``async def solve_one(problem, ctx) -> Result``).
    :meth:`solve` / :meth:`asolve` run every problem's program concurrently on one engine (each
    problem under its own meter) and are the batch API for users.  ``streams`` says whether the
    answer can be streamed token by token (single-sample strategies); strategies whose answer needs
    all samples (votes) cannot.
    """

    name: ClassVar[str] = "strategy"
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    """The strategy's typed parameters."""

    @property
    def streams(self) -> bool:
        """True when :meth:`solve_one` marks the call that produces the answer (``ctx.generate(stream=True)``);
        a subclass sets ``streams = True`` or overrides this property."""
        return False

    def __init__(self, params: StrategyParams | None = None, /, **fields: object) -> None:
        if params is None:
            unknown = [k for k in fields if k not in self.Params.model_fields]
            if unknown:
                raise ConfigError(
                    f"unknown parameter(s) {', '.join(map(repr, unknown))} for strategy {self.name!r}; "
                    f"valid: {', '.join(self.Params.model_fields) or '(none)'}"
                )
            params = self.Params(**fields)
        elif fields or not isinstance(params, self.Params):
            raise ConfigError(f"`params` must be a {self.Params.__name__} (and no other arguments), "
                              f"got {type(params).__name__} and {sorted(fields)}")
        self.p = params
        """The validated parameters."""
        for k in type(params).model_fields:
            setattr(self, k, getattr(params, k))
        self.setup()

    def setup(self) -> None:
        """Derived state, after the parameters were validated (override as needed)."""

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        """Solve one problem, charging every call to ``ctx.meter``."""
        raise NotImplementedError(f"strategy {self.name!r} implements no per-problem program")

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        """Solve ``problems``, charging problem ``i``'s calls to ``meters[i]`` (all concurrently)."""
        return run_sync(self.arun(problems, meters, backend))

    async def arun(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend,
                   on_delta: DeltaCallback | None = None) -> list[Result]:
        """Run every problem's :meth:`solve_one` concurrently; each result's usage is its meter's total."""

        async def one(p: Problem, m: Meter) -> Result:
            try:
                return await self.solve_one(p, Context(backend, m, on_delta))
            finally:
                m.active = False  # siblings may now share what it left

        results = list(await asyncio.gather(*(one(p, m) for p, m in zip(problems, meters, strict=True))))
        for r, m in zip(results, meters, strict=True):
            r.usage = m.total()
        return results

    def _setup(self, problems: Sequence[Problem | str], budget: Budget | dict[str, Any] | str | None,
               batch_budget: Budget | dict[str, Any] | str | None) -> tuple[list[Problem], list[Meter]]:
        probs = [p if isinstance(p, Problem) else Problem.from_text(p, id=str(i)) for i, p in enumerate(problems)]
        root = Meter(batch_budget, name="batch")
        per = Budget.parse(budget)
        return probs, [root.child(per, name=p.id) for p in probs]

    async def asolve(
        self,
        problems: Sequence[Problem | str],
        *,
        backend: Backend,
        budget: Budget | dict[str, Any] | str | None = None,
        batch_budget: Budget | dict[str, Any] | str | None = None,
    ) -> list[Result]:
        """Async :meth:`solve`."""
        probs, meters = self._setup(problems, budget, batch_budget)
        results = await self.arun(probs, meters, backend)
        for r, m in zip(results, meters, strict=True):
            r.ledger = m.summary()
        return results

    def solve(
        self,
        problems: Sequence[Problem | str],
        *,
        backend: Backend,
        budget: Budget | dict[str, Any] | str | None = None,
        batch_budget: Budget | dict[str, Any] | str | None = None,
    ) -> list[Result]:
        """One :class:`Result` per problem; ``budget`` applies per problem, ``batch_budget`` to all.

        Works from plain scripts and from code that already runs an event loop (Jupyter).
        """
        return run_sync(self.asolve(problems, backend=backend, budget=budget, batch_budget=batch_budget))

    def params(self) -> dict[str, object]:
        """The strategy's parameters (recorded with every result)."""
        return {k: getattr(self.p, k) for k in type(self.p).model_fields}


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
"""Strategy name → class."""


def get(name: str, **params: object) -> Strategy:
    """The strategy ``name`` configured with ``params`` (validated by its typed Params); errors list names and
    valid parameters."""
    return STRATEGIES.get(name)(**params)


class ParamRow(TypedDict):
    """One row of :func:`param_table`."""

    type: str
    default: object
    constraints: str
    description: str


def param_table(cls: type[Strategy]) -> dict[str, ParamRow]:
    """Each typed parameter of strategy class ``cls``: its type, default, constraints and meaning."""
    from pydantic_core import PydanticUndefined

    table: dict[str, ParamRow] = {}
    for name, f in cls.Params.model_fields.items():
        if f.default_factory is not None:
            default = f.get_default(call_default_factory=True)
        else:
            default = None if f.default is PydanticUndefined else f.default
        if isinstance(default, list):
            default = [d.model_dump(exclude_none=True) if hasattr(d, "model_dump") else d for d in default]
        ann = f.annotation
        type_name = getattr(ann, "__name__", None) if not getattr(ann, "__args__", None) else None
        cons = []
        for m in f.metadata:
            for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length")):
                v = getattr(m, attr, None)
                if v is not None:
                    cons.append(f"{sym} {v}")
        table[name] = {"type": type_name or str(ann).replace("typing.", ""), "default": default,
                       "constraints": ", ".join(cons), "description": f.description or ""}
    return table


def param_names(name: str) -> list[str]:
    """The parameters strategy ``name`` accepts."""
    return list(STRATEGIES.get(name).Params.model_fields)