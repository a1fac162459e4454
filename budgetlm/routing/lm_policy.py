"""A language model as the step router of an agent: it reads the agent's state and answers ``small`` or ``large``.

Budget-Aware Agentic Routing / BoPO (arXiv 2602.21227) trains a policy that, at every step of a
tool-using agent under a per-task budget, chooses between a small and a large model.  Here the
policy is a chat model (``budgetlm train`` with the ``route`` recipe fine-tunes one with GRPO):
:func:`route_prompt` describes the state (the task, the step, the tool calls so far, the share of the
budget left, the agent's latest output) and asks for one word, :func:`parse_choice` reads it, and
:class:`LMPolicyRouter` (registered as ``lm_policy``) turns it into a router score:
``large`` → 1.0, ``small`` → 0.0, anything else → 0.5.  With the default threshold 0.5 and the
``w ≥ t`` rule of :func:`~budgetlm.routing.decide`, an unparseable answer goes to the large model;
pass a threshold above 0.5 to send it to the small one.

**Deviations and limitations.**  The policy runs on its own backend (loaded lazily from ``model``)
and its tokens are charged to a fresh unlimited :class:`~budgetlm.meter.Meter` per request: they are
routing overhead, **not charged to the task's budget** (our choice), so records under-count the
policy's cost.  The policy decodes greedily, at most ``max_tokens`` tokens (an untrained chat model
often spends those on a preamble such as ``The answer is "``, which parses as neither arm).  The
agent calls the router once per task per step, so the batched call usually holds one prompt.
Training prompts (:class:`~budgetlm.training.route.RouteRecipe`) describe the first steps of a task
without the agent's transcript; at inference the prompt also carries the latest output and the
budget share, so the trained policy sees those fields only at evaluation.  :meth:`LMPolicyRouter.close`
releases the policy's backend; a second vLLM engine in the agent's process needs a small
``gpu_memory_utilization`` (``vllm:PATH?gpu_memory_utilization=0.2``) or the ``hf:`` backend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from budgetlm.backends import load as load_backend
from budgetlm.backends.base import Backend, GenerationRequest, Message, SamplingParams
from budgetlm.errors import invalid
from budgetlm.meter import Meter
from budgetlm.routing.base import ROUTERS, RouteQuery, Router

__all__ = ["QUESTION_CHARS", "LAST_OUTPUT_CHARS", "LMPolicyRouter", "parse_choice", "route_prompt"]

QUESTION_CHARS = 600
"""The task text in the prompt is cut to about this many characters (head and tail kept)."""
LAST_OUTPUT_CHARS = 300
"""The agent's latest output in the prompt is cut to its last this many characters."""
CHOICE_SCORES: dict[str | None, float] = {"large": 1.0, "small": 0.0, None: 0.5}
"""Router score of each parsed choice (None: unparseable)."""

_CHOICE = re.compile(r"\b(small|large)\b", re.IGNORECASE)


def _clip_middle(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, keeping a third from its start and the rest from its end.

    Suite prompts often put instructions (tool lists) first and the question near the end, so both
    ends are kept.
    """
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head].rstrip() + " […] " + text[len(text) - (limit - head):].lstrip()


def _clip_tail(text: str, limit: int) -> str:
    """The last ``limit`` characters of ``text`` (prefixed with ``[…]`` when cut)."""
    return text if len(text) <= limit else "[…] " + text[len(text) - limit:].lstrip()


def _content(m: Mapping[str, object]) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, Sequence):  # content parts
        return "".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in c)
    return str(c)


def route_prompt(messages: Sequence[Message], context: Mapping[str, float] | None = None) -> list[Message]:
    """The policy's chat prompt for the agent's next step.

    ``messages`` are the agent's messages (the task as the first user message; the transcript as a
    later assistant or tool message); ``context`` is the router context the budget controller fills
    (``step``, 0-based; ``max_steps``; ``tool_calls``; ``rho``, the share of the budget left).
    Missing fields are left out.  The prompt ends with ``Answer with one word: small or large.``
    """
    ctx = dict(context or {})
    task = next((_content(m) for m in messages if m.get("role") == "user"), "")
    last = next((_content(m) for m in reversed(messages) if m.get("role") in ("assistant", "tool")), "")
    lines = [
        "You route the steps of a tool-using agent between a small, cheap model and a large, expensive one. "
        "Pick the large model only when the next step needs it.",
        "",
        "Task:",
        _clip_middle(task.strip(), QUESTION_CHARS),
        "",
    ]
    step = ctx.get("step")
    max_steps = ctx.get("max_steps")
    if step is not None:
        lines.append(f"Next step: {int(step) + 1}" + (f" of {int(max_steps)}" if max_steps is not None else ""))
    elif max_steps is not None:
        lines.append(f"Steps allowed: {int(max_steps)}")
    if ctx.get("tool_calls") is not None:
        lines.append(f"Tool calls so far: {int(ctx['tool_calls'])}")
    if ctx.get("rho") is not None:
        lines.append(f"Budget left: {round(100 * min(max(float(ctx['rho']), 0.0), 1.0))}%")
    if last.strip():
        lines += ["", "The agent's latest output:", _clip_tail(last.strip(), LAST_OUTPUT_CHARS)]
    lines += ["", "Does the agent's NEXT step need the small or the large model?",
              "Answer with one word: small or large."]
    return [{"role": "user", "content": "\n".join(lines)}]


def parse_choice(text: str | None) -> Literal["small", "large"] | None:
    """The first whole word ``small`` or ``large`` in ``text`` (case-insensitive), lower-cased; None if neither."""
    m = _CHOICE.search(text or "")
    if m is None:
        return None
    return "small" if m.group(1).lower() == "small" else "large"


class LMPolicyRouter(Router):
    """A chat model answers ``small`` or ``large`` for each step: score 0.0, 1.0, or 0.5 when unparseable."""

    name = "lm_policy"

    def __init__(self, model: str | Backend = "default", max_tokens: int = 8) -> None:
        if not isinstance(model, Backend) and (not isinstance(model, str) or not model.strip()):
            raise invalid("model", "a backend spec (default, hf:PATH, vllm:PATH, ...) or a Backend", model,
                          "pass the policy checkpoint, e.g. model='hf:/path/to/checkpoint'")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid("max_tokens", "a positive integer (tokens of the policy's answer)", max_tokens)
        self.model = model if isinstance(model, str) else getattr(model, "name", type(model).__name__)
        self.max_tokens = max_tokens
        self._given = model if isinstance(model, Backend) else None
        self._backend: Backend | None = self._given
        self.counts: dict[str, int] = {"small": 0, "large": 0, "unparseable": 0}
        """How often the policy chose each arm (or answered neither), over all :meth:`score` calls."""

    @property
    def backend(self) -> Backend:
        """The policy's backend, loaded on first use."""
        if self._backend is None:
            self._backend = load_backend(self.model)
        return self._backend

    def choices(self, queries: Sequence[RouteQuery]) -> list[Literal["small", "large"] | None]:
        """The policy's parsed answer per query, from one batched greedy call (thinking cut off → None)."""
        if not queries:
            return []
        sp = SamplingParams(n=1, temperature=0.0, max_tokens=self.max_tokens)
        reqs = [GenerationRequest(messages=route_prompt(q.messages, q.context), sampling=sp, meter=Meter(None),
                                  id=q.id or None) for q in queries]
        out = []
        for g in self.backend.generate(reqs):
            c = g.first if g.completions else None
            choice = None if c is None or c.thinking_truncated else parse_choice(c.answer)
            self.counts[choice or "unparseable"] += 1
            out.append(choice)
        return out

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        """1.0 for ``large``, 0.0 for ``small``, 0.5 otherwise; ``backend`` and ``meters`` are not used
        (the policy has its own backend and its tokens are not charged to the task)."""
        return [CHOICE_SCORES[c] for c in self.choices(queries)]

    def close(self) -> None:
        """Release the backend this router loaded (one passed in as a Backend is left open)."""
        if self._backend is not None and self._backend is not self._given:
            self._backend.close()
        self._backend = self._given


ROUTERS.register(LMPolicyRouter.name, LMPolicyRouter)
