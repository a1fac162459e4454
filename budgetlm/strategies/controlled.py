"""Length- and effort-controlled prompting: the inference side of the ``effort`` training recipe.

Models trained with L1's LCPO (arXiv 2503.04697) or e1's Adaptive Effort Control (arXiv 2510.27042)
read their target from the prompt.  :func:`control_instruction` writes it exactly as the recipes of
:mod:`budgetlm.training` do, and the ``controlled`` strategy appends it to the question and samples
once, so a controller can set the effort of every call::

    strategy = budgetlm.strategies.get("controlled", mode="exact", target_tokens=64)
    strategy = budgetlm.strategies.get("controlled", mode="effort", effort=0.5)

Modes (the instruction appended to the last user message, after a blank line):

- ``exact`` — LCPO-Exact: ``"Think for {N} tokens."``;
- ``max`` — LCPO-Max: ``"Think for maximum {N} tokens."``;
- ``effort`` — e1: ``"Use {E}% of your usual reasoning effort."`` (**our wording**: e1 states the
  fraction in the prompt; its exact template is not published in the text we follow).

Each problem is one request on the shared engine; the answer is that single sample, so it streams
token by token (``streams = True``).  The output-token budget still clamps the call: the target is
a request to the model, the budget a promise of the library.  Records get ``details = {"control":
mode, "target_tokens" | "effort": ..., "length_error": |used − N|}`` (``length_error`` for the token
modes only), which the training evaluation averages into the length-vs-target error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from budgetlm.answers import extract_answer
from budgetlm.backends.base import GenerationRequest, Message, SamplingParams
from budgetlm.errors import BudgetExceeded, invalid
from budgetlm.io import JsonObject
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.usage import Usage

__all__ = ["CONTROL_MODES", "Controlled", "ControlledParams", "control_instruction", "with_control"]

ControlMode = Literal["exact", "max", "effort"]
CONTROL_MODES: tuple[str, ...] = ("exact", "max", "effort")
"""The control modes: LCPO-Exact, LCPO-Max and e1 effort."""


def _check(mode: str, value: float) -> None:
    if mode not in CONTROL_MODES:
        raise invalid("mode", f"one of {', '.join(CONTROL_MODES)}", mode)
    if mode == "effort":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise invalid("effort", "a fraction in (0, 1]", value, "e.g. effort=0.5 for half the usual length")
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid("target_tokens", "a positive integer (tokens)", value, "e.g. target_tokens=64")


def control_instruction(mode: str, value: float) -> str:
    """The instruction line for ``mode`` with a token target (``exact``, ``max``) or effort fraction."""
    _check(mode, value)
    if mode == "exact":
        return f"Think for {int(value)} tokens."
    if mode == "max":
        return f"Think for maximum {int(value)} tokens."
    return f"Use {round(100 * float(value))}% of your usual reasoning effort."


def with_control(messages: Sequence[Message], mode: str, value: float) -> list[Message]:
    """A copy of ``messages`` with the instruction appended to the last user message."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") == "user":
            m["content"] = f"{m.get('content') or ''}\n\n{control_instruction(mode, value)}"
            return out
    raise invalid("messages", "chat messages with a user message", [m.get("role") for m in out])


class ControlledParams(StrategyParams):
    """Parameters of :class:`Controlled`."""

    mode: ControlMode = Field(default="exact", description="exact (LCPO-Exact), max (LCPO-Max) or effort (e1).")
    target_tokens: int | None = Field(default=None, ge=1, strict=True,
                                      description="Token target written into the prompt (modes exact and max).")
    effort: float | None = Field(default=None, gt=0, le=1, strict=True,
                                 description="Fraction of the usual reasoning effort (mode effort).")
    temperature: float = Field(default=0.0, ge=0, strict=True, description="Softmax temperature; 0 is greedy.")
    max_tokens: int = Field(default=1024, ge=1, strict=True, description="Most tokens of the sample (the budget "
                                                                         "may clamp it).")
    seed: int | None = Field(default=None, description="Sampling seed (None: unseeded).")

    @model_validator(mode="after")
    def _value_for_mode(self) -> ControlledParams:
        value = self.effort if self.mode == "effort" else self.target_tokens
        if value is None:
            need = "effort" if self.mode == "effort" else "target_tokens"
            raise invalid(need, f"set for mode={self.mode!r}", None,
                          "pass effort=0..1 for mode='effort', target_tokens=N for 'exact'/'max'")
        return self


class Controlled(Strategy):
    """Sample once with the token target or effort fraction written into the prompt."""

    name = "controlled"
    streams = True
    Params = ControlledParams
    p: ControlledParams
    mode: ControlMode
    target_tokens: int | None
    effort: float | None
    temperature: float
    max_tokens: int
    seed: int | None

    def setup(self) -> None:
        value = self.effort if self.mode == "effort" else self.target_tokens
        if value is None:  # ControlledParams._value_for_mode rejects this already
            raise invalid("effort" if self.mode == "effort" else "target_tokens", f"set for mode={self.mode!r}", None)
        self._value: float = value
        self._sampling = SamplingParams(n=1, temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed)

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        control: JsonObject = {"control": self.mode}
        control["effort" if self.mode == "effort" else "target_tokens"] = self._value
        req = GenerationRequest(messages=with_control(problem.messages, self.mode, self._value),
                                sampling=self._sampling, id=problem.id)
        try:
            g = await ctx.generate(req, stream=True)
        except BudgetExceeded as exc:
            return Result(problem.id, "", None, Usage.zero(), stop_reason=ctx.meter.stop_reason or "budget exhausted",
                          trace=[{"call": 0, "skipped": str(exc)}], details=control)
        c = g.first
        text = "" if c.thinking_truncated else c.answer
        used = len(c.token_ids)
        details = dict(control, used_tokens=used)
        if self.mode != "effort":
            details["length_error"] = abs(used - int(self._value))
        return Result(
            problem_id=problem.id, text=text, answer=extract_answer(text).text if text else None, usage=Usage.zero(),
            stop_reason="deadline" if c.finish_reason == "deadline" else "done", finish_reason=c.finish_reason,
            truncated=c.truncated, thinking_truncated=c.thinking_truncated, sequential_tokens=used,
            trace=[{"call": 0, "max_tokens": g.max_tokens, "clamped_by": g.clamped_by, "output_tokens": used}],
            details=details,
        )


STRATEGIES.register("controlled", Controlled)
