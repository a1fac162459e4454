"""Plain sampling: one call per problem, the first sample's answer.

The baseline every other strategy is measured against.  Each problem is one request on the shared
engine; ``max_tokens`` is clamped by the problem's meter, so the output-token budget is the
sampling limit.  With ``n = 1`` the answer streams token by token.  With ``n > 1`` the answer is the first sample's (use ``majority`` for voting).
"""

from __future__ import annotations

from pydantic import Field

from budgetlm.answers import extract_answer
from budgetlm.backends.base import GenerationRequest, SamplingParams
from budgetlm.errors import BudgetExceeded
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.usage import Usage


class SampleParams(StrategyParams):
    """Parameters of :class:`Sample`."""

    temperature: float = Field(default=0.0, ge=0, description="Softmax temperature; 0 is greedy.")
    max_tokens: int = Field(default=512, ge=1, description="Most tokens per sample (the budget may clamp it).")
    n: int = Field(default=1, ge=1, description="Samples to draw; the answer is the first one's.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Sampling seed (None: unseeded).")


class Sample(Strategy):
    """Sample once (or ``n`` times) and answer with the first sample."""

    name = "sample"
    Params = SampleParams
    p: SampleParams
    temperature: float
    max_tokens: int
    n: int
    top_p: float
    seed: int | None

    def setup(self) -> None:
        self._sampling = SamplingParams(n=self.n, temperature=self.temperature, max_tokens=self.max_tokens,
                                        top_p=self.top_p, seed=self.seed)

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        req = GenerationRequest(messages=problem.messages, sampling=problem.constrain(self._sampling), id=problem.id,
                                assistant_prefix=problem.assistant_prefix)
        try:
            g = await ctx.generate(req, stream=self.n == 1)
        except BudgetExceeded as exc:
            return Result(problem.id, "", None, Usage.zero(),
                          stop_reason=ctx.meter.stop_reason or "budget exhausted", trace=[{"call": 0, "skipped": str(exc)}])
        c = g.first
        text = "" if c.thinking_truncated else (problem.assistant_prefix or "") + c.answer
        return Result(
            problem_id=problem.id,
            text=text,
            answer=extract_answer(text).text if text else None,
            usage=g.usage,
            stop_reason="deadline" if c.finish_reason == "deadline" else "done",
            finish_reason=c.finish_reason,
            truncated=c.truncated,
            thinking_truncated=c.thinking_truncated,
            sequential_tokens=max(len(x.token_ids) for x in g.completions),
            trace=[{"call": 0, "max_tokens": g.max_tokens, "clamped_by": g.clamped_by,
                    "output_tokens": g.usage.output_tokens, "prompt_tokens": g.usage.prompt_tokens,
                    "finish_reasons": [x.finish_reason for x in g.completions]}],
        )

    @property
    def streams(self) -> bool:
        """One sample streams token by token; with ``n > 1`` the answer is known only at the end."""
        return self.n == 1


STRATEGIES.register("sample", Sample)
