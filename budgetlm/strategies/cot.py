"""Budget forcing: a capped (and optionally extended) chain of thought, then a forced answer.

Implements s1's *budget forcing* (Muennighoff et al., "s1: Simple test-time scaling",
arXiv 2501.19393; ALGORITHMS.md §1) for every problem of a batch at once:

1. **Think** with ``max_tokens`` = what is left of the thinking cap.  For models with thinking
   tags (``backend.thinking.enabled``) the reply is opened with the start tag (unless the chat
   template already opens it) and the thinking stops at the end tag.  For models *without* tags
   (the default SmolLM2) the "thinking" is the reasoning before the final answer line: the call
   stops at ``answer_lead.strip()`` (``"Answer:"``), where the model would start its answer.
2. **Extend** (``min_thinking_tokens`` = m, ``max_waits`` = k): when the thinking ended by itself
   before m generated thinking tokens, the end marker / answer line (never part of the output,
   since it is a stop string) is left out, ``wait_text`` is appended and thinking continues from
   there (``assistant_prefix``), at most k times; ``k = 0`` never appends it.
3. **Force the answer**: the reasoning so far (plus the end tag for tag models) plus
   ``answer_lead`` becomes the ``assistant_prefix`` of one more call with
   ``max_tokens = answer_tokens`` and ``may_think=False`` (so a thinking budget does not clamp
   it), stopping at a blank line.  This happens whether the thinking hit its cap or ended by itself.
   ``Result.text`` is ``answer_lead`` plus the forced answer (e.g. ``"Answer: 7"``).  For models
   without tags the reasoning is part of the visible reply, so when the forced answer has no
   extractable answer (small models often end their turn right after the lead) the text falls
   back to the whole reply (reasoning, lead, answer); the answer call's trace entry says which
   (``answer_from``: ``"answer"`` or ``"reply"``).  Tag models never answer from their thinking.

All problems of a phase go to the backend in one batched call; each call is charged to the
problem's meter, so nothing can overspend.

Caps.  A problem's thinking cap is the smallest of ``thinking_tokens``, the per-problem
``thinking_tokens`` budget and — re-read before every thinking call — the remaining
output-token budget minus ``answer_tokens`` (reserved for the answer).  With no output limit
and no ``thinking_tokens`` the cap is 1024 tokens.  If the budget is smaller than
``answer_tokens`` there is no thinking at all and the answer gets what is left, so an answer
is produced whenever the budget allows one output token.  When the budget ends earlier the
result has an empty text and ``stop_reason`` says which unit ran out (the meter's reason); the
strategy never raises for budget exhaustion.

Thinking-token accounting.  Thinking tokens are *generated* tokens of the thinking calls
(``wait_text``, the tags we add and ``answer_lead`` are prompt text, not output).  For tag models
the backend counts them in ``Usage.thinking_tokens`` (and a ``thinking_tokens`` budget clamps
those calls).  For models without tags the backend counts 0 thinking tokens; the reasoning
tokens are reported per call in the trace (``reasoning_tokens``; their sum over ``Result.trace``
is the problem's total) and are capped by this strategy, including by a ``thinking_tokens``
budget.

Deviations from s1.  s1 appends the end-of-thinking delimiter and "Final Answer:" and decodes the
answer without a limit; here the answer has an explicit small budget (``answer_tokens``) and
stops at a blank line.  s1 suppresses the end-of-thinking token while extending; here the
thinking call stops at it and a new call continues the prefix with "Wait" (same text, one more
prompt per extension).  For models without thinking tags the "thinking" is the reasoning before
the ``answer_lead`` line, which s1 does not cover.  Token budgets are reserved in output tokens; a binding ``total_tokens``, FLOP or dollar limit is still enforced
by the meter but may leave no room for the answer (the stop reason then says so).

Engine pass-through (``thinking_budget_passthrough=True``).  Each thinking call also passes its
thinking room to the engine as vLLM's ``SamplingParams.thinking_token_budget`` (through
:meth:`~budgetlm.backends.vllm.VLLMBackend.thinking_token_budgets`), so the engine itself forces
the end tag once the cap is reached; the budget given is the room minus one (the end tag is a
generated thinking token too) plus the thinking tokens already in the prefix (vLLM counts those).
``max_tokens`` stays the room, so the cap and the budget hold even if the engine ignored the
pass-through.  After every such call the strategy *verifies* it: it counts the generated tokens
before the end tag; the trace entry gets ``thinking_token_budget``, ``passthrough_thinking`` (that
count) and ``passthrough_verified``: True when the end tag came within the budget, False when the
output went past the budget without the engine closing thinking (the pass-through was not applied;
the problem then falls back to plain budget forcing, i.e. ``max_tokens`` alone, for its later calls),
None when the call ended or was clamped before the budget could take effect.  The pass-through
needs a model with thinking tags and a backend that supports it (a vLLM engine started with a
reasoning parser, e.g. ``VLLMBackend(..., engine_kwargs={"reasoning_parser": "deepseek_r1"})``);
otherwise :meth:`run` raises :class:`~budgetlm.errors.ConfigError` before any call, naming the fix
(chosen over a silent fallback: asking for the pass-through and not getting it is a setup error).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from budgetlm.answers import extract_answer
from budgetlm.backends.base import Backend, GenerationRequest, GenerationResult, SamplingParams, ThinkingBudgetBackend
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy
from budgetlm.usage import Usage

_UNBOUNDED_THINKING = 1024
"""Thinking cap when neither ``thinking_tokens`` nor an output-token budget limits it."""
_ANSWER_STOP = ["\n\n"]
"""The forced answer ends at a blank line."""


def _int(name: str, value: Any, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        what = f"an integer >= {lo}" + (" or None" if allow_none else "")
        raise ConfigError(f"`{name}` must be {what}, got {value!r}")


@dataclass
class _State:
    """Per-problem progress."""

    prefix: str
    """The assistant reply so far (opening tag, reasoning, appended waits)."""
    cap: int
    """Thinking cap from the parameter and the thinking budget (output room is re-read per call)."""
    used: int = 0
    """Generated thinking tokens so far."""
    waits: int = 0
    """``wait_text`` extensions so far."""
    thinking: bool = True
    """Still in the thinking phase."""
    cut: bool = False
    """Thinking was stopped by its cap or the budget (not by the model)."""
    usage: Usage = field(default_factory=Usage.zero)
    trace: list[dict[str, Any]] = field(default_factory=list)
    answer: GenerationResult | None = None
    skipped: str | None = None
    passthrough: bool = False
    """Thinking calls pass the cap to the engine (until a call shows it was not applied)."""


class BudgetForcing(Strategy):
    """s1 budget forcing: cap (and optionally extend with "Wait") the thinking, then force an answer."""

    name = "cot"

    def __init__(
        self,
        thinking_tokens: int | None = None,
        answer_tokens: int = 32,
        min_thinking_tokens: int = 0,
        max_waits: int = 0,
        wait_text: str = "Wait",
        answer_lead: str = "\nAnswer:",
        temperature: float = 0.0,
        seed: int | None = None,
        thinking_budget_passthrough: bool = False,
    ) -> None:
        """See the module docstring; ``thinking_budget_passthrough=True`` also passes each thinking call's cap to
        the engine (vLLM's ``thinking_token_budget``, which needs a reasoning parser) and verifies it was applied.
        """
        _int("thinking_tokens", thinking_tokens, 0, allow_none=True)
        _int("answer_tokens", answer_tokens, 1)
        _int("min_thinking_tokens", min_thinking_tokens, 0)
        _int("max_waits", max_waits, 0)
        _int("seed", seed, 0, allow_none=True)
        if not isinstance(wait_text, str) or not wait_text.strip():
            raise ConfigError(f"`wait_text` must be a non-empty string, got {wait_text!r}")
        if not isinstance(answer_lead, str) or not answer_lead.strip():
            raise ConfigError(f"`answer_lead` must be a non-empty string like '\\nAnswer:', got {answer_lead!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ConfigError(f"`temperature` must be a number >= 0 (0 = greedy), got {temperature!r}")
        if not isinstance(thinking_budget_passthrough, bool):
            raise ConfigError(f"`thinking_budget_passthrough` must be True or False, got {thinking_budget_passthrough!r}")
        self.thinking_tokens = thinking_tokens
        self.answer_tokens = answer_tokens
        self.min_thinking_tokens = min_thinking_tokens
        self.max_waits = max_waits
        self.wait_text = wait_text
        self.answer_lead = answer_lead
        self.temperature = float(temperature)
        self.seed = seed
        self.thinking_budget_passthrough = thinking_budget_passthrough

    # ------------------------------------------------------------------ helpers
    def _room(self, st: _State, meter: Meter) -> int:
        """Thinking tokens the next thinking call may generate."""
        room = st.cap - st.used
        r_out = meter.remaining("output_tokens")
        if r_out is not None:
            room = min(room, int(r_out) - self.answer_tokens)
        return max(0, room)

    def _answer_prefix(self, st: _State, backend: Backend) -> str:
        fmt = backend.thinking
        if fmt.enabled:
            return st.prefix.rstrip() + "\n" + fmt.end + self.answer_lead
        reasoning = st.prefix.rstrip()
        return reasoning + self.answer_lead if reasoning else self.answer_lead.lstrip()

    def _call(self, st: _State, g: GenerationResult, phase: str) -> None:
        """Book one call of a problem into its usage and trace."""
        st.usage = st.usage + g.usage
        c = g.first if g.completions else None
        out = g.usage.output_tokens
        st.trace.append({
            "call": len(st.trace),
            "phase": phase,
            "waits": st.waits,
            "max_tokens": g.max_tokens,
            "clamped_by": g.clamped_by,
            "prompt_tokens": g.usage.prompt_tokens,
            "output_tokens": out,
            "reasoning_tokens": out if phase == "think" else 0,
            "thinking_tokens": g.usage.thinking_tokens,
            "finish_reason": c.finish_reason if c else None,
            "skipped": g.skipped,
            "text": c.text if c else "",
        })

    def _check_passthrough(self, backend: Backend) -> list[int]:
        """The end tag's token ids; raises when the backend cannot pass a thinking budget to its engine."""
        if not backend.thinking.enabled:
            raise ConfigError(
                f"`thinking_budget_passthrough=True` needs a model with thinking tags, but backend {backend.name!r} "
                "has none; pass the backend a ThinkingFormat or set thinking_budget_passthrough=False"
            )
        if not (isinstance(backend, ThinkingBudgetBackend) and backend.supports_thinking_budget):
            raise ConfigError(
                f"`thinking_budget_passthrough=True` needs an engine that honours a thinking token budget, but backend "
                f"{backend.name!r} ({backend.kind}) does not; start a vLLM engine with a reasoning parser, e.g. "
                "VLLMBackend(..., engine_kwargs={'reasoning_parser': 'deepseek_r1'}), or set "
                "thinking_budget_passthrough=False (budget forcing alone enforces the same cap)"
            )
        end_ids = backend.encode(backend.thinking.end)
        if not end_ids:
            raise ConfigError(f"the end tag {backend.thinking.end!r} encodes to no tokens; cannot verify the pass-through")
        return end_ids

    @staticmethod
    def _find(ids: list[int], sub: list[int]) -> int:
        for j in range(len(ids) - len(sub) + 1):
            if ids[j:j + len(sub)] == sub:
                return j
        return -1

    # ------------------------------------------------------------------ run
    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        fmt = backend.thinking
        boundary = fmt.end if fmt.enabled else self.answer_lead.strip()
        opening = fmt.start if fmt.enabled and not fmt.starts_in_thinking else ""
        end_ids = self._check_passthrough(backend) if self.thinking_budget_passthrough else []
        states: list[_State] = []
        for m in meters:
            cap = self.thinking_tokens
            r_th = m.remaining("thinking_tokens")
            if r_th is not None:
                cap = int(r_th) if cap is None else min(cap, int(r_th))
            if cap is None:
                cap = _UNBOUNDED_THINKING if m.remaining("output_tokens") is None else 1 << 62
            states.append(_State(prefix=opening, cap=max(0, cap), passthrough=self.thinking_budget_passthrough))

        think_sp = SamplingParams(temperature=self.temperature, seed=self.seed, stop=[boundary], max_tokens=1)
        # ---- thinking rounds: the first pass, then at most max_waits extensions
        while True:
            idx, reqs = [], []
            budgets: list[tuple[GenerationRequest, int]] = []
            limits: dict[int, tuple[int, int]] = {}  # problem -> (engine budget, generated thinking allowed)
            for i, (p, m, st) in enumerate(zip(problems, meters, states, strict=True)):
                if not st.thinking:
                    continue
                room = self._room(st, m)
                if room < 1:
                    st.thinking, st.cut = False, True
                    continue
                idx.append(i)
                req = GenerationRequest(
                    messages=p.messages, assistant_prefix=st.prefix or None, meter=m, id=p.id,
                    sampling=think_sp.model_copy(update={"max_tokens": room}),
                )
                reqs.append(req)
                if st.passthrough:
                    body = st.prefix[len(opening):]
                    pre = len(backend.encode(body)) if body else 0  # vLLM counts prompt thinking too
                    budgets.append((req, pre + room - 1))
                    limits[i] = (pre + room - 1, room - 1)
            if not reqs:
                break
            ctx = backend.thinking_token_budgets(budgets) if budgets else contextlib.nullcontext()
            with ctx:
                gens = backend.generate(reqs, on_budget_exhausted="skip")
            for i, g in zip(idx, gens, strict=True):
                st, m = states[i], meters[i]
                self._call(st, g, "think")
                if g.skipped or not g.completions:
                    st.thinking, st.cut = False, True
                    continue
                c = g.first
                forced = False
                if i in limits:
                    budget, limit = limits[i]
                    ids = list(c.token_ids)
                    pos = self._find(ids, end_ids)
                    thought = pos if pos >= 0 else len(ids)
                    verified: bool | None
                    if pos >= 0:
                        verified = thought <= limit
                    else:
                        verified = False if len(ids) > limit else None
                    st.trace[-1].update(thinking_token_budget=budget, passthrough_thinking=thought,
                                        passthrough_verified=verified)
                    if verified is False:
                        st.passthrough = False  # not applied: plain budget forcing from here on
                    forced = bool(verified) and thought >= limit
                text = c.text
                if boundary in text:  # engines exclude stop strings; be safe
                    text = text[: text.find(boundary)]
                st.prefix += text
                st.used += len(c.token_ids)
                if c.finish_reason == "length" or forced:
                    st.thinking, st.cut = False, True
                elif st.used < self.min_thinking_tokens and st.waits < self.max_waits and self._room(st, m) >= 1:
                    sep = "" if not st.prefix or st.prefix[-1].isspace() else " "
                    st.prefix += sep + self.wait_text
                    st.waits += 1
                else:
                    st.thinking = False

        # ---- forced answer: one batched call for all problems
        idx, reqs = [], []
        answer_sp = SamplingParams(temperature=self.temperature, seed=self.seed, stop=list(_ANSWER_STOP),
                                   max_tokens=self.answer_tokens)
        for i, (p, m, st) in enumerate(zip(problems, meters, states, strict=True)):
            idx.append(i)
            reqs.append(GenerationRequest(messages=p.messages, assistant_prefix=self._answer_prefix(st, backend),
                                          meter=m, id=p.id, sampling=answer_sp, may_think=False))
        gens = backend.generate(reqs, on_budget_exhausted="skip") if reqs else []
        for i, g in zip(idx, gens, strict=True):
            st = states[i]
            self._call(st, g, "answer")
            if g.skipped or not g.completions:
                st.skipped = g.skipped or "no completion"
            else:
                st.answer = g

        return [self._result(p, m, st, fmt.enabled) for p, m, st in zip(problems, meters, states, strict=True)]

    def _result(self, p: Problem, m: Meter, st: _State, fmt_enabled: bool) -> Result:
        seq = sum(t["output_tokens"] for t in st.trace)
        if st.answer is None:
            unit = st.trace[-1]["clamped_by"] if st.trace else None
            reason = m.stop_reason or (f"budget exhausted: {unit}" if unit else "budget exhausted")
            return Result(p.id, "", None, st.usage, stop_reason=reason, finish_reason=None, truncated=False,
                          thinking_truncated=st.cut, sequential_tokens=seq, trace=st.trace)
        g = st.answer
        c = g.first
        # The answer call continues an assistant prefix that closed thinking, so its whole text is answer
        # (``c.text``, not ``c.answer``: see the report on formats whose template opens thinking).
        text = (self.answer_lead + c.text).strip()
        answer = extract_answer(text).text
        if answer is None and not fmt_enabled:
            # No tags: the reasoning is part of the visible reply.  A forced answer without one
            # (e.g. the model ends its turn right after the lead) falls back to the whole reply.
            text = (st.prefix.rstrip() + self.answer_lead + c.text).strip()
            answer = extract_answer(text).text
            st.trace[-1]["answer_from"] = "reply"
        else:
            st.trace[-1]["answer_from"] = "answer"
        stop = "done"
        if c.finish_reason == "length" and g.clamped_by is not None:
            stop = m.stop_reason or f"budget exhausted: {g.clamped_by}"
        return Result(
            problem_id=p.id,
            text=text,
            answer=answer,
            usage=st.usage,
            stop_reason=stop,
            finish_reason=c.finish_reason,
            truncated=c.truncated,
            thinking_truncated=False,
            sequential_tokens=seq,
            trace=st.trace,
        )


STRATEGIES.register("cot", BudgetForcing)
