"""Any OpenAI-compatible client under a :class:`~budgetlm.agents.controller.BudgetController`.

``controller.wrap_openai(client)`` returns a proxy whose ``chat.completions.create(**kwargs)``:

1. asks the controller for a plan (the router picks the model id among the controller's
   ``ModelArm`` names; the step allowance caps ``max_tokens`` / ``max_completion_tokens``);
2. on ``answer`` appends a user message asking for the final answer now; on ``stop`` raises
   :class:`~budgetlm.errors.BudgetExceeded` without calling the server;
3. reserves the worst case on the meter, calls the server, and charges the usage the server
   reports (or the reservation's worst case when it reports none), so concurrent agents sharing a
   meter cannot overspend together.  The prompt's size is counted with the cheapest arm's
   tokenizer when it has a backend (exact for the same model), else estimated conservatively
   (one token per 3 characters plus 8 per message), unless the caller passes
   ``budgetlm_prompt_tokens``.  Output tokens are capped by the server through ``max_tokens``; an
   ``input_tokens`` or ``total_tokens`` limit can only be as exact as that prompt count.

Everything else on the client passes through unchanged.  Async clients (``AsyncOpenAI``) work
the same way: ``await proxy.chat.completions.create(...)``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from budgetlm.costs import estimate_tokens
from budgetlm.errors import BudgetExceeded
from budgetlm.usage import Usage

if TYPE_CHECKING:
    from budgetlm.agents.controller import BudgetController, StepPlan
    from budgetlm.meter import Reservation

T = TypeVar("T")

FINAL_ANSWER_NUDGE = "Budget nearly spent: give your final answer now, after 'Answer:'."
"""The user message appended when the controller forces a final answer."""


def _estimate_prompt(ctl: BudgetController, msgs: list[dict[str, Any]]) -> int:
    backend = ctl.models[0].backend
    if backend is not None and msgs:
        from budgetlm.backends.base import GenerationRequest

        try:
            text, ids = backend.render(GenerationRequest(messages=msgs))
            return len(ids) if ids is not None else backend.count_tokens(text or "")
        except Exception:  # noqa: BLE001 -- fall back to the estimate for messages the template rejects
            pass
    return estimate_tokens(msgs)


class BudgetedClient:
    """Proxy of an OpenAI client; see the module docstring."""

    def __init__(self, client: Any, controller: BudgetController) -> None:
        self._client = client
        self._controller = controller
        self.chat = _Chat(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Chat:
    def __init__(self, owner: BudgetedClient) -> None:
        self._owner = owner
        self.completions = _Completions(owner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner._client.chat, name)


class _Completions:
    def __init__(self, owner: BudgetedClient) -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner._client.chat.completions, name)

    def _prepare(self, kwargs: dict[str, Any]) -> tuple[StepPlan, dict[str, Any], Reservation]:
        ctl = self._owner._controller
        msgs = list(kwargs.get("messages") or [])
        prompt_tokens = int(kwargs.pop("budgetlm_prompt_tokens", 0) or _estimate_prompt(ctl, msgs))
        plan = ctl.plan(msgs, prompt_tokens=prompt_tokens)
        if plan.action == "stop":
            raise BudgetExceeded(f"the task budget is spent ({plan.reason}); no further model calls",
                                 unit=ctl.meter.exhausted_unit())
        if plan.action == "answer":
            msgs = msgs + [{"role": "user", "content": FINAL_ANSWER_NUDGE}]
        key = "max_completion_tokens" if "max_completion_tokens" in kwargs else "max_tokens"
        asked = kwargs.get(key)
        n = int(kwargs.get("n", 1) or 1)
        res = ctl.meter.reserve(prompt_tokens=prompt_tokens, max_tokens=min(int(asked or plan.max_tokens), plan.max_tokens),
                                n=n)
        out = dict(kwargs, messages=msgs, **{key: res.max_tokens})
        if len(ctl.models) > 1 or "model" not in kwargs:
            out["model"] = plan.model
        return plan, out, res

    def _settle(self, plan: StepPlan, response: T, res: Reservation, t0: float) -> T:
        ctl = self._owner._controller
        u = getattr(response, "usage", None)
        n = len(getattr(response, "choices", []) or []) or 1
        if u is not None and getattr(u, "completion_tokens", None) is not None:
            usage = Usage(prompt_tokens=int(u.prompt_tokens or 0), output_tokens=int(u.completion_tokens or 0),
                          latency_s=time.perf_counter() - t0, model=plan.model)
        else:  # the server did not report usage: charge the worst case held
            usage = Usage(prompt_tokens=0, output_tokens=res.max_tokens * n, latency_s=time.perf_counter() - t0,
                          model=plan.model)
        ctl.meter.charge(usage, res)
        from budgetlm.backends.base import GenerationRequest, GenerationResult

        ctl.record_generation(plan, GenerationResult(GenerationRequest(prompt="(openai client)"), [], usage))
        return response

    def create(self, **kwargs: Any) -> Any:
        plan, call, res = self._prepare(kwargs)
        t0 = time.perf_counter()
        try:
            response = self._owner._client.chat.completions.create(**call)
        except BaseException:
            res.release()
            raise
        if inspect.isawaitable(response):
            return self._finish_async(plan, response, res, t0)
        return self._settle(plan, response, res, t0)

    async def _finish_async(self, plan: StepPlan, pending: Awaitable[T], res: Reservation, t0: float) -> T:
        try:
            response = await pending
        except BaseException:
            res.release()
            raise
        return self._settle(plan, response, res, t0)
