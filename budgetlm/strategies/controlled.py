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

The output-token budget still clamps the call: the target is a request to the model, the budget a
promise of the library.  Records get ``details = {"control": mode, "target_tokens" | "effort": ...,
"length_error": |used − N|}`` (``length_error`` for the token modes only), which the training
evaluation averages into the length-vs-target error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from budgetlm.answers import extract_answer
from budgetlm.backends.base import Backend, GenerationRequest, Message, SamplingParams
from budgetlm.errors import invalid
from budgetlm.meter import Meter
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy
from budgetlm.usage import Usage

__all__ = ["CONTROL_MODES", "Controlled", "control_instruction", "with_control"]

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
            return out  # type: ignore[return-value]
    raise invalid("messages", "chat messages with a user message", [m.get("role") for m in out])


class Controlled(Strategy):
    """Sample once with the token target or effort fraction written into the prompt."""

    name = "controlled"

    def __init__(self, mode: ControlMode = "exact", target_tokens: int | None = None, effort: float | None = None,
                 temperature: float = 0.0, max_tokens: int = 1024, seed: int | None = None) -> None:
        if mode not in CONTROL_MODES:  # before the value check, so the error names `mode`
            raise invalid("mode", f"one of {', '.join(CONTROL_MODES)}", mode)
        value = effort if mode == "effort" else target_tokens
        if value is None:
            need = "effort" if mode == "effort" else "target_tokens"
            raise invalid(need, f"set for mode={mode!r}", None,
                          "pass effort=0..1 for mode='effort', target_tokens=N for 'exact'/'max'")
        _check(mode, value)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid("max_tokens", "a positive integer", max_tokens)
        self.mode = mode
        self.target_tokens = target_tokens
        self.effort = effort
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self._value = value
        self._sampling = SamplingParams(n=1, temperature=temperature, max_tokens=max_tokens, seed=seed)

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        reqs = [GenerationRequest(messages=with_control(p.messages, self.mode, self._value), sampling=self._sampling,
                                  meter=m, id=p.id) for p, m in zip(problems, meters, strict=True)]
        gens = backend.generate(reqs, on_budget_exhausted="skip")
        control: dict[str, Any] = {"control": self.mode}
        control["effort" if self.mode == "effort" else "target_tokens"] = self._value
        out = []
        for p, g, m in zip(problems, gens, meters, strict=True):
            if g.skipped or not g.completions:
                out.append(Result(p.id, "", None, Usage.zero(), stop_reason=m.stop_reason or "budget exhausted",
                                  trace=[{"call": 0, "skipped": g.skipped}], details=dict(control)))
                continue
            c = g.first
            text = "" if c.thinking_truncated else c.answer
            used = len(c.token_ids)
            details = dict(control, used_tokens=used)
            if self.mode != "effort":
                details["length_error"] = abs(used - int(self._value))
            out.append(Result(
                problem_id=p.id, text=text, answer=extract_answer(text).text if text else None, usage=g.usage,
                stop_reason="done", finish_reason=c.finish_reason, truncated=c.truncated,
                thinking_truncated=c.thinking_truncated, sequential_tokens=used,
                trace=[{"call": 0, "max_tokens": g.max_tokens, "clamped_by": g.clamped_by, "output_tokens": used}],
                details=details,
            ))
        return out


STRATEGIES.register("controlled", Controlled)
