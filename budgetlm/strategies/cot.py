"""Budget forcing: a capped (and optionally extended) chain of thought, then a forced answer.

Implements s1's *budget forcing* (Muennighoff et al., "s1: Simple test-time scaling",
arXiv 2501.19393; ALGORITHMS.md §1) as a per-problem program: every problem runs its own phases
on the shared engine, one request at a time, independently of the other problems in flight.

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

**Tool calls** (the server's requests with ``tools``, :attr:`Problem.calls_tools`; our addition): the
thinking calls also stop at ``</tool_call>``; a reasoning that ends in a tool call is returned as the
reply (reasoning and call, no forced answer), so the server returns the call.  A forced call (the
problem's ``assistant_prefix``, ``tool_choice`` required or named) has no reasoning to cap: it is one
call continuing the prefix under the problem's JSON schema.

Every call is charged to the problem's meter, so nothing can overspend; ``Result.usage`` is the
meter's total.  Continuations re-render the reply so far as text (``assistant_prefix``), not as
the prompt's token ids plus the generated ids: engines keep the tokens of a matched stop string
(the end tag, ``"Answer:"``) in ``token_ids`` while cutting them from the text, and the backend
decides from the assistant prefix whether a continuation starts inside thinking (which its
thinking-token accounting and the thinking budget rely on).

Streaming (``streams = True``).  The answer is the forced-answer call: its tokens stream to the
caller as they are generated, preceded by one text-only delta holding ``answer_lead`` (leading
whitespace removed) once that call has started, so the streamed text is ``Result.text``.  The
thinking calls are not streamed: for tag models their text is thinking, and for models without
tags the reasoning is not the answer (``Result.text`` leaves it out).  The one exception is the
fallback above (a forced answer without an extractable answer, models without tags): the stream
then carried the lead and the forced answer, while ``Result.text`` (the non-streamed reply and the
records) is the whole reply.

Caps.  A problem's thinking cap is the smallest of ``thinking_tokens``, the per-problem
``thinking_tokens`` budget and — re-read before every thinking call — the problem's output-token
room minus ``answer_tokens`` (reserved for the answer).  The room is the problem's own remaining
output tokens and, when a batch budget limits output tokens, at most an equal share of the batch's
remaining output tokens among the problems still running
(:func:`~budgetlm.strategies.voting.room_of`), so the first problems of a batch cannot take the
answers' tokens of the last.  With no output limit and no ``thinking_tokens`` the cap is 1024
tokens.  If the room is smaller than ``answer_tokens`` there is no thinking at all and the answer
gets what the meter allows, so an answer is produced whenever the budget allows one output token.
When the budget ends earlier the result has an empty text and ``stop_reason`` says which unit ran
out (the meter's reason); the strategy never raises for budget exhaustion.  A thinking call cut by
the wall-clock deadline (``finish_reason="deadline"``) ends the thinking like its cap; an answer
cut by it gives ``stop_reason="deadline"``.

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
:meth:`~budgetlm.backends.vllm.VLLMBackend.thinking_token_budgets`, a block around that call keyed
on its request object), so the engine itself forces the end tag once the cap is reached; the
budget given is the room minus one (the end tag is a generated thinking token too) plus the
thinking tokens already in the prefix (vLLM counts those).
``max_tokens`` stays the room, so the cap and the budget hold even if the engine ignored the
pass-through.  After every such call the strategy *verifies* it: it counts the generated tokens
before the end tag; the trace entry gets ``thinking_token_budget``, ``passthrough_thinking`` (that
count) and ``passthrough_verified``: True when the end tag came within the budget, False when the
output went past the budget without the engine closing thinking (the pass-through was not applied;
the problem then falls back to plain budget forcing, i.e. ``max_tokens`` alone, for its later calls),
None when the call ended or was clamped before the budget could take effect.  The pass-through
needs a model with thinking tags and a backend that supports it (a vLLM engine started with a
reasoning parser, e.g. ``VLLMBackend(..., engine_kwargs={"reasoning_parser": "deepseek_r1"})``);
otherwise solving raises :class:`~budgetlm.errors.ConfigError` before any call, naming the fix
(chosen over a silent fallback: asking for the pass-through and not getting it is a setup error).

Certainty-probe early exit (``early_exit=True``; Dynasor-CoT, Fu et al., "Efficiently Serving LLM Reasoning
Programs with Certaindex", arXiv 2412.20993).  The thinking runs in chunks: each thinking call stops after at
most ``probe_every`` more thinking tokens (``max_tokens`` = the distance to the next probe point, never more
than the cap's room), and at each probe point the strategy sends one *probe*: a forked continuation of the
same prompt with the thinking so far plus a probe text as its ``assistant_prefix`` (the same prefix as the
thinking, so an engine with prefix caching reuses it), decoded greedily for at most ``probe_tokens`` tokens
(stopping at a blank line, and at the end tag for tag models).  The probe text is ``probe_text``, else for
tag models Dynasor's ``"... Oh, I suddenly got the answer to the whole problem, **Final Answer**: \\boxed{"``
inside the thinking, and for models without tags ``answer_lead`` (``"\\nAnswer:"``): the probe is then a
short forced answer at that point, extracted the same way as the final one.  A probe's answer is extracted
from the probe text plus its output only (never from the reasoning); it counts as no answer when the output
hesitates ("wait", "hmm", as in Dynasor) or, with ``min_confidence``, when its mean token probability (from
the sampled tokens' logprobs; always recorded as ``confidence``) is below it.  When the last ``window``
probes give the same non-empty (normalised) answer the thinking stops and the result is that answer:
``Result.text`` is ``answer_lead`` (stripped) plus the last probe's answer, with no forced-answer call
(when streaming, that text is sent as one delta).  Otherwise the thinking goes on, and ends as without
early exit (by itself, by the cap, or by "Wait" extensions ending) with the forced answer.
Probing pauses the reasoning (the chunks and probes of one problem are sequential; other problems keep the
engine busy); we chose this over probing a running stream because it is exact about the cap and
deterministic, at the price of one more prompt per chunk (prefix-cache hits on vLLM) and the probe's
latency on the critical path.  Probes are real output tokens: charged to the problem's meter like every
call (so the budget includes them, and they reduce the room left for thinking), listed in the trace
(``phase="probe"`` with ``at`` = thinking tokens so far, ``probe_answer``, ``confidence``, ``hesitant``,
``agreed``) and reported separately in ``Result.details`` (``probes``, ``probe_tokens``, ``exited_at``,
``thinking_tokens_used``, ``thinking_saved`` = thinking tokens the cap still allowed at the exit), which
the eval runner copies into the record's ``probe_tokens``.  For tag models the probe's output is inside
the thinking, so the backend also counts it in ``Usage.thinking_tokens``.  A probe is only sent while the
budget has room for it and still for the answer (``probe_tokens + answer_tokens`` output tokens), so early
exit never costs the answer; the thinking cap is never exceeded (probes are not thinking-cap tokens: no probe
is sent at the cap itself, where the forced answer follows).  ``probe_every`` must be smaller than an
explicit ``thinking_tokens`` cap (a :class:`~budgetlm.errors.ConfigError` otherwise); a cap derived from
the budget that is too small for a probe simply makes no probe (``probes: 0``).  Works with budget forcing's
cap, its "Wait" extensions and the engine pass-through (the engine budget is the cap's room, not the chunk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field, ValidationInfo, field_validator, model_validator

from budgetlm.answers import extract_answer, normalize_answer
from budgetlm.backends.base import Backend, GenerationRequest, GenerationResult, SamplingParams, ThinkingBudgetBackend
from budgetlm.backends.streaming import Delta, DeltaCallback
from budgetlm.errors import BudgetExceeded, ConfigError
from budgetlm.io import JsonObject
from budgetlm.meter import Meter
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.strategies.voting import room_of
from budgetlm.tools import TOOL_CALL_CLOSE
from budgetlm.usage import Usage

_UNBOUNDED_THINKING = 1024
"""Thinking cap when neither ``thinking_tokens`` nor an output-token budget limits it."""
_ANSWER_STOP = ["\n\n"]
"""The forced answer ends at a blank line."""
DYNASOR_PROBE = "... Oh, I suddenly got the answer to the whole problem, **Final Answer**: \\boxed{"
"""Dynasor-CoT's certainty probe, appended inside the thinking of models with thinking tags."""
_HESITATION = re.compile(r"\b(?:wait|hmm+)\b", re.IGNORECASE)
"""A probe whose output hesitates ("wait", "hmm") gives no answer (Dynasor discards such probes)."""
_INTS = {"thinking_tokens": (0, True), "answer_tokens": (1, False), "min_thinking_tokens": (0, False),
         "max_waits": (0, False), "seed": (0, True), "probe_every": (1, False), "probe_tokens": (1, False),
         "window": (1, False)}
"""Integer parameters: (lowest value, None allowed)."""


class BudgetForcingParams(StrategyParams):
    """Parameters of :class:`BudgetForcing` (see the module docstring)."""

    thinking_tokens: int | None = Field(default=None, ge=0, description=(
        "Thinking cap in generated tokens; None: the output-token room less answer_tokens (1024 without limits)."))
    answer_tokens: int = Field(default=32, ge=1, description="Most tokens of the forced answer.")
    min_thinking_tokens: int = Field(default=0, ge=0, description=(
        "Thinking that ends by itself before this many tokens is extended with wait_text."))
    max_waits: int = Field(default=0, ge=0, description="Most wait_text extensions per problem; 0 never waits.")
    wait_text: str = Field(default="Wait", description="Text appended to extend the thinking.")
    answer_lead: str = Field(default="\nAnswer:", description="Text that forces the answer after the thinking.")
    temperature: float = Field(default=0.0, ge=0, description="Softmax temperature; 0 is greedy.")
    seed: int | None = Field(default=None, ge=0, description="Sampling seed (None: unseeded).")
    thinking_budget_passthrough: bool = Field(default=False, description=(
        "Also pass each thinking call's cap to the engine (vLLM's thinking_token_budget, which needs a reasoning "
        "parser) and verify it was applied."))
    early_exit: bool = Field(default=False, description=(
        "Certainty-probe early exit (Dynasor-CoT): probe the answer every probe_every thinking tokens and stop "
        "thinking once the last `window` probes agree."))
    probe_every: int = Field(default=64, ge=1, description="Thinking tokens between two probes (early_exit).")
    probe_tokens: int = Field(default=16, ge=1, description="Most tokens one probe may generate (early_exit).")
    window: int = Field(default=3, ge=1, description=(
        "Exit when this many consecutive probes give the same non-empty answer (early_exit)."))
    min_confidence: float | None = Field(default=None, gt=0, le=1, description=(
        "Also require each agreeing probe's mean token probability to be at least this (early_exit); None: off."))
    probe_text: str | None = Field(default=None, description=(
        "Text appended to the thinking so far to probe the answer; None: Dynasor's '... Oh, I suddenly got the "
        "answer to the whole problem, **Final Answer**: \\boxed{' inside the thinking for models with tags, "
        "answer_lead for models without."))

    @field_validator(*_INTS, mode="before")
    @classmethod
    def _int(cls, v: object, info: ValidationInfo) -> object:
        lo, allow_none = _INTS[info.field_name or ""]
        if v is None and allow_none:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            what = f"an integer >= {lo}" + (" or None" if allow_none else "")
            raise ValueError(f"`{info.field_name}` must be {what}, got {v!r}")
        return v

    @field_validator("wait_text", mode="before")
    @classmethod
    def _wait_text(cls, v: object) -> object:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"`wait_text` must be a non-empty string, got {v!r}")
        return v

    @field_validator("answer_lead", mode="before")
    @classmethod
    def _answer_lead(cls, v: object) -> object:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"`answer_lead` must be a non-empty string like '\\nAnswer:', got {v!r}")
        return v

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, v: object) -> object:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"`temperature` must be a number >= 0 (0 = greedy), got {v!r}")
        return v

    @field_validator("thinking_budget_passthrough", "early_exit", mode="before")
    @classmethod
    def _bool(cls, v: object, info: ValidationInfo) -> object:
        if not isinstance(v, bool):
            raise ValueError(f"`{info.field_name}` must be True or False, got {v!r}")
        return v

    @field_validator("min_confidence", mode="before")
    @classmethod
    def _min_confidence(cls, v: object) -> object:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise ValueError(f"`min_confidence` must be a probability in (0, 1] (mean token probability of a probe) "
                             f"or None, got {v!r}")
        return v

    @field_validator("probe_text", mode="before")
    @classmethod
    def _probe_text(cls, v: object) -> object:
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"`probe_text` must be a non-empty string like '\\nSo the final answer is' or None "
                             f"(the default probe), got {v!r}")
        return v

    @model_validator(mode="after")
    def _probe_fits(self) -> BudgetForcingParams:
        if self.early_exit and self.thinking_tokens is not None and self.probe_every >= self.thinking_tokens:
            raise ValueError(
                f"`probe_every` must be smaller than the thinking cap (thinking_tokens={self.thinking_tokens}), "
                f"got {self.probe_every}; lower it or raise the cap (a probe never happens otherwise)")
        return self


FORCED_CALL_TOKENS = 256
"""Most tokens of a forced tool call's JSON (at least ``answer_tokens``)."""


@dataclass
class _State:
    """One problem's progress."""

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
    trace: list[JsonObject] = field(default_factory=list)
    """One entry per call (:meth:`BudgetForcing._call`)."""
    call_tokens: int = 0
    """Output tokens of every call so far (they run one after another: the sequential tokens)."""
    last_finish: str | None = None
    """Finish reason of the last call (``None``: no completion)."""
    last_clamped_by: str | None = None
    """What clamped the last call's ``max_tokens`` (the unit a refused call ran out of)."""
    answer: GenerationResult | None = None
    skipped: str | None = None
    passthrough: bool = False
    """Thinking calls pass the cap to the engine (until a call shows it was not applied)."""
    tool_call: bool = False
    """The reasoning ended in a tool call (returned as the reply)."""
    probing: bool = False
    """Early exit: probes are still made (until the budget has no room for one)."""
    probe_answers: list[str | None] = field(default_factory=list)
    """Early exit: each probe's normalised answer (None: none, hesitant or not confident enough)."""
    probe_tokens: int = 0
    """Early exit: output tokens spent on probes."""
    exit_answer: str | None = None
    """Early exit: the agreed probe answer that ended the thinking."""
    exited_left: int = 0
    """Early exit: thinking tokens the cap still allowed when the probes agreed."""


class BudgetForcing(Strategy):
    """s1 budget forcing: cap (and optionally extend with "Wait") the thinking, then force an answer."""

    name = "cot"
    streams = True
    Params = BudgetForcingParams
    p: BudgetForcingParams
    thinking_tokens: int | None
    answer_tokens: int
    min_thinking_tokens: int
    max_waits: int
    wait_text: str
    answer_lead: str
    temperature: float
    seed: int | None
    thinking_budget_passthrough: bool
    early_exit: bool
    probe_every: int
    probe_tokens: int
    window: int
    min_confidence: float | None
    probe_text: str | None

    def setup(self) -> None:
        self._answer_sp = SamplingParams(temperature=self.temperature, seed=self.seed, stop=list(_ANSWER_STOP),
                                         max_tokens=self.answer_tokens)

    # ------------------------------------------------------------------ helpers
    def _room(self, st: _State, meter: Meter) -> int:
        """Thinking tokens the next thinking call may generate."""
        room = st.cap - st.used
        r_out = room_of(meter)
        if r_out is not None:
            room = min(room, r_out - self.answer_tokens)
        return max(0, room)

    def _answer_prefix(self, st: _State, backend: Backend) -> str:
        fmt = backend.thinking
        if fmt.enabled:
            return st.prefix.rstrip() + "\n" + fmt.end + self.answer_lead
        reasoning = st.prefix.rstrip()
        return reasoning + self.answer_lead if reasoning else self.answer_lead.lstrip()

    def _call(self, st: _State, g: GenerationResult, phase: str) -> None:
        """Book one call of a problem into its trace."""
        c = g.first if g.completions else None
        out = g.usage.output_tokens
        st.call_tokens += out
        st.last_finish, st.last_clamped_by = (c.finish_reason if c else None), g.clamped_by
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

    @staticmethod
    def _refused(req: GenerationRequest, exc: BudgetExceeded) -> GenerationResult:
        """The (empty) result of a call the meter refused."""
        return GenerationResult(req, [], Usage.zero(), [], 0, exc.unit, skipped=str(exc))

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

    def _answer_stream(self, ctx: Context) -> Context:
        """``ctx`` whose delta callback first sends ``answer_lead`` (once the answer call produces output), so
        the streamed text is ``Result.text``."""
        if ctx.on_delta is None:
            return ctx
        out: DeltaCallback = ctx.on_delta
        lead = self.answer_lead.lstrip()
        started = False

        def on_delta(d: Delta) -> None:
            nonlocal started
            if not started:
                started = True
                out(Delta(d.index, lead))
            out(d)

        return dataclasses.replace(ctx, on_delta=on_delta)

    # ------------------------------------------------------------------ run
    async def arun(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend,
                   on_delta: DeltaCallback | None = None) -> list[Result]:
        if self.thinking_budget_passthrough:
            self._check_passthrough(backend)  # a setup error: raise once, before any problem makes a call
        return await super().arun(problems, meters, backend, on_delta)

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        backend, meter = ctx.backend, ctx.meter
        if problem.calls_tools and problem.assistant_prefix is not None:
            return await self._forced_call(problem, ctx)
        fmt = backend.thinking
        boundary = fmt.end if fmt.enabled else self.answer_lead.strip()
        opening = fmt.start if fmt.enabled and not fmt.starts_in_thinking else ""
        end_ids = self._check_passthrough(backend) if self.thinking_budget_passthrough else []
        cap = self.thinking_tokens
        r_th = meter.remaining("thinking_tokens")
        if r_th is not None:
            cap = int(r_th) if cap is None else min(cap, int(r_th))
        if cap is None:
            cap = _UNBOUNDED_THINKING if meter.remaining("output_tokens") is None else 1 << 62
        st = _State(prefix=opening, cap=max(0, cap), passthrough=self.thinking_budget_passthrough,
                    probing=self.early_exit)
        next_probe = self.probe_every  # thinking tokens at which the next probe is due

        stops = [boundary, TOOL_CALL_CLOSE] if problem.calls_tools else [boundary]
        think_sp = SamplingParams(temperature=self.temperature, seed=self.seed, stop=stops, max_tokens=1)
        # ---- thinking: the first pass, then at most max_waits extensions
        while st.thinking:
            room = self._room(st, meter)
            if room < 1:
                st.thinking, st.cut = False, True
                break
            if st.probing and not self._probe_fits(meter):
                st.probing = False  # no room for a probe and the answer: plain budget forcing from here on
            chunk = min(room, max(1, next_probe - st.used)) if st.probing else room  # pause at the next probe
            req = GenerationRequest(messages=problem.messages, assistant_prefix=st.prefix or None, id=problem.id,
                                    sampling=think_sp.model_copy(update={"max_tokens": chunk}))
            limits: tuple[int, int] | None = None  # (engine budget, generated thinking allowed)
            held: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            if st.passthrough and isinstance(backend, ThinkingBudgetBackend):  # checked at setup
                body = st.prefix[len(opening):]
                pre = len(backend.encode(body)) if body else 0  # vLLM counts prompt thinking too
                limits = (pre + room - 1, room - 1)
                held = backend.thinking_token_budgets([(req, limits[0])])
            try:
                with held:  # the budget applies to this very request object only
                    g = await ctx.generate(req)
            except BudgetExceeded as exc:
                self._call(st, self._refused(req, exc), "think")
                st.thinking, st.cut = False, True
                break
            self._call(st, g, "think")
            if not g.completions:
                st.thinking, st.cut = False, True
                break
            c = g.first
            forced = False
            if limits is not None:
                budget, limit = limits
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
            if problem.calls_tools and c.stop_string == TOOL_CALL_CLOSE:  # the reasoning called a tool: the reply
                st.prefix += text + TOOL_CALL_CLOSE
                st.tool_call, st.thinking = True, False
                break
            if boundary in text:  # engines exclude stop strings; be safe
                text = text[: text.find(boundary)]
            st.prefix += text
            st.used += len(c.token_ids)
            paused = chunk < room and c.finish_reason == "length" and g.clamped_by is None and not forced
            ended = not paused and (c.finish_reason in ("length", "deadline") or forced)
            extend = (not paused and not ended and st.used < self.min_thinking_tokens
                      and st.waits < self.max_waits)
            if (paused or extend) and st.probing and st.used >= next_probe:  # the thinking goes on: probe first
                while next_probe <= st.used:
                    next_probe += self.probe_every
                if await self._probe(problem, st, ctx, boundary):
                    st.thinking = False
                    break
            if paused:
                continue
            if ended:
                st.thinking, st.cut = False, True
            elif extend and self._room(st, meter) >= 1:
                sep = "" if not st.prefix or st.prefix[-1].isspace() else " "
                st.prefix += sep + self.wait_text
                st.waits += 1
            else:
                st.thinking = False

        if st.exit_answer is not None:
            return self._exit_result(problem, st, ctx)
        if st.tool_call:
            return Result(problem.id, st.prefix[len(opening):].strip(), None, Usage.zero(), stop_reason="done",
                          finish_reason="stop", truncated=False, thinking_truncated=False,
                          sequential_tokens=st.call_tokens, trace=st.trace)
        # ---- forced answer (the call whose output is the answer: streamed)
        req = GenerationRequest(messages=problem.messages, assistant_prefix=self._answer_prefix(st, backend),
                                id=problem.id, sampling=self._answer_sp, may_think=False)
        try:
            g = await self._answer_stream(ctx).generate(req, stream=True)
        except BudgetExceeded as exc:
            self._call(st, self._refused(req, exc), "answer")
            st.skipped = str(exc)
        else:
            self._call(st, g, "answer")
            if g.completions:
                st.answer = g
            else:
                st.skipped = "no completion"
        res = self._result(problem, meter, st, fmt.enabled)
        if self.early_exit:
            res.details.update(self._probe_details(st))
        return res

    # ------------------------------------------------------------------ early exit (certainty probes)
    def _probe_fits(self, meter: Meter) -> bool:
        """Whether the budget has room for one more probe and still for the answer."""
        r_out = room_of(meter)
        return r_out is None or r_out >= self.probe_tokens + self.answer_tokens

    def _probe_text(self, fmt_enabled: bool) -> str:
        """The probe text: ``probe_text``, else Dynasor's probe (tag models) or ``answer_lead`` (no tags)."""
        return self.probe_text or (DYNASOR_PROBE if fmt_enabled else self.answer_lead)

    def _probe_prefix(self, st: _State, text: str, fmt_enabled: bool) -> str:
        """The thinking so far plus the probe text (inside the thinking for tag models)."""
        if fmt_enabled:
            return st.prefix + ("" if not st.prefix or st.prefix[-1].isspace() or text[0].isspace() else " ") + text
        reasoning = st.prefix.rstrip()
        return reasoning + text if reasoning else text.lstrip()

    async def _probe(self, problem: Problem, st: _State, ctx: Context, boundary: str) -> bool:
        """One certainty probe at the current thinking prefix; True when the last ``window`` probes agree."""
        fmt = ctx.backend.thinking
        probe = self._probe_text(fmt.enabled)
        prefix = self._probe_prefix(st, probe, fmt.enabled)
        stops = [*_ANSWER_STOP, boundary] if fmt.enabled else list(_ANSWER_STOP)
        req = GenerationRequest(messages=problem.messages, assistant_prefix=prefix, id=problem.id,
                                sampling=SamplingParams(temperature=0.0, stop=stops, max_tokens=self.probe_tokens,
                                                        logprobs=0))
        try:
            g = await ctx.generate(req)
        except BudgetExceeded as exc:
            self._call(st, self._refused(req, exc), "probe")
            st.probing = False
            return False
        self._call(st, g, "probe")
        st.probe_tokens += g.usage.output_tokens
        c = g.first if g.completions else None
        out = c.text if c else ""
        raw = extract_answer(probe + out).text  # from the probe only, never from the reasoning before it
        hesitant = bool(_HESITATION.search(out))
        conf = None
        if c is not None and c.logprobs:
            conf = sum(math.exp(lp) for lp in c.logprobs) / len(c.logprobs)
        confident = self.min_confidence is None or (conf is not None and conf >= self.min_confidence)
        norm = normalize_answer(raw) if raw and not hesitant and confident else None
        st.probe_answers.append(norm)
        last = st.probe_answers[-self.window:]
        agreed = len(last) == self.window and last[0] is not None and all(a == last[0] for a in last)
        st.trace[-1].update(at=st.used, probe_answer=raw, confidence=None if conf is None else round(conf, 4),
                            hesitant=hesitant, agreed=agreed)
        if agreed:
            st.exit_answer = raw
            st.exited_left = self._room(st, ctx.meter)
            st.trace[-1]["answer_from"] = "probe"
        return agreed

    def _probe_details(self, st: _State) -> JsonObject:
        return {"probes": sum(1 for t in st.trace if t["phase"] == "probe"), "probe_tokens": st.probe_tokens,
                "exited_at": st.used if st.exit_answer is not None else None,
                "thinking_tokens_used": st.used, "thinking_saved": st.exited_left}

    def _exit_result(self, problem: Problem, st: _State, ctx: Context) -> Result:
        """The result of an early exit: the agreed probe answer after ``answer_lead`` (no forced answer call)."""
        text = f"{self.answer_lead.strip()} {st.exit_answer}"
        if ctx.on_delta is not None:
            ctx.on_delta(Delta(0, text))
        return Result(problem.id, text, extract_answer(text).text, Usage.zero(), stop_reason="done",
                      finish_reason=st.last_finish, truncated=False, thinking_truncated=False,
                      sequential_tokens=st.call_tokens, trace=st.trace,
                      details=self._probe_details(st))

    async def _forced_call(self, problem: Problem, ctx: Context) -> Result:
        """A forced tool call: one call continuing the problem's prefix under its JSON schema."""
        sp = problem.constrain(SamplingParams(temperature=self.temperature, seed=self.seed,
                                              max_tokens=max(self.answer_tokens, FORCED_CALL_TOKENS)))
        req = GenerationRequest(messages=problem.messages, assistant_prefix=problem.assistant_prefix, id=problem.id,
                                sampling=sp, may_think=False)
        st = _State(prefix="", cap=0)
        try:
            g = await ctx.generate(req)
        except BudgetExceeded as exc:
            self._call(st, self._refused(req, exc), "call")
            return Result(problem.id, "", None, Usage.zero(), stop_reason=ctx.meter.exhausted_reason(), trace=st.trace)
        self._call(st, g, "call")
        if not g.completions:
            return Result(problem.id, "", None, Usage.zero(), stop_reason=ctx.meter.exhausted_reason(), trace=st.trace)
        c = g.first
        return Result(problem.id, (problem.assistant_prefix or "") + c.text, None, Usage.zero(), stop_reason="done",
                      finish_reason=c.finish_reason, truncated=c.truncated, sequential_tokens=len(c.token_ids),
                      trace=st.trace)

    def _result(self, p: Problem, m: Meter, st: _State, fmt_enabled: bool) -> Result:
        seq = st.call_tokens  # every call waits for the one before
        if st.answer is None:
            unit = st.last_clamped_by
            reason = m.stop_reason or (f"budget exhausted: {unit}" if unit else "budget exhausted")
            return Result(p.id, "", None, Usage.zero(), stop_reason=reason, finish_reason=None, truncated=False,
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
        if c.finish_reason == "deadline":
            stop = "deadline"
        elif c.finish_reason == "length" and g.clamped_by is not None:
            stop = m.stop_reason or f"budget exhausted: {g.clamped_by}"
        return Result(
            problem_id=p.id,
            text=text,
            answer=answer,
            usage=Usage.zero(),  # the base sets the meter's total
            stop_reason=stop,
            finish_reason=c.finish_reason,
            truncated=c.truncated,
            thinking_truncated=False,
            sequential_tokens=seq,
            trace=st.trace,
        )


STRATEGIES.register("cot", BudgetForcing)
