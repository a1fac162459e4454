"""Plain sampling: one call per problem, the first sample's answer.

The baseline every other strategy is measured against.  All problems go to the backend in one
batched call; ``max_tokens`` is clamped by each problem's meter, so the output-token budget is
the sampling limit.  With ``n > 1`` the answer is the first sample's (use ``majority`` for voting).
"""

from __future__ import annotations

from collections.abc import Sequence

from budgetlm.answers import extract_answer
from budgetlm.backends.base import Backend, GenerationRequest, SamplingParams
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy
from budgetlm.usage import Usage


class Sample(Strategy):
    """Sample once (or ``n`` times) and answer with the first sample."""

    name = "sample"

    def __init__(self, temperature: float = 0.0, max_tokens: int = 512, n: int = 1, top_p: float = 1.0,
                 seed: int | None = None) -> None:
        if n < 1:
            raise ConfigError(f"`n` must be >= 1, got {n}; ask for at least one sample")
        if max_tokens < 1:
            raise ConfigError(f"`max_tokens` must be >= 1, got {max_tokens}")
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.n = n
        self.top_p = top_p
        self.seed = seed
        self._sampling = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, top_p=top_p, seed=seed)

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        reqs = [GenerationRequest(messages=p.messages, sampling=self._sampling, meter=m, id=p.id)
                for p, m in zip(problems, meters, strict=True)]
        gens = backend.generate(reqs, on_budget_exhausted="skip")
        out = []
        for p, g, m in zip(problems, gens, meters, strict=True):
            if g.skipped or not g.completions:
                out.append(Result(p.id, "", None, Usage.zero(), stop_reason=m.stop_reason or "budget exhausted",
                                  trace=[{"call": 0, "skipped": g.skipped}]))
                continue
            c = g.first
            text = "" if c.thinking_truncated else c.answer
            out.append(Result(
                problem_id=p.id,
                text=text,
                answer=extract_answer(text).text if text else None,
                usage=g.usage,
                stop_reason="done",
                finish_reason=c.finish_reason,
                truncated=c.truncated,
                thinking_truncated=c.thinking_truncated,
                sequential_tokens=max(len(x.token_ids) for x in g.completions),
                trace=[{"call": 0, "max_tokens": g.max_tokens, "clamped_by": g.clamped_by,
                        "output_tokens": g.usage.output_tokens, "prompt_tokens": g.usage.prompt_tokens,
                        "finish_reasons": [x.finish_reason for x in g.completions]}],
            ))
        return out


STRATEGIES.register("sample", Sample)
