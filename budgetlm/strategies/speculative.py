"""Speculative decoding (ALGORITHMS.md §6) and speculative cascades (§7) as strategies.

Both sample one reply per problem through a backend whose token loop drafts and verifies
(:attr:`~budgetlm.backends.base.Backend.speculative_decoding`; the transformers backend implements it in
:mod:`budgetlm.backends.hf_speculative`).  The strategy only asks for it through that protocol:

* ``speculative`` — lossless: the output follows the target's distribution (greedy output is
  token-identical to target-only greedy decoding);
* ``speculative_cascade`` — lossy by design: verification targets ``π`` from a deferral ``rule``
  (chow, diff, opt, v1, v2, v3) with lenience ``alpha``; ``alpha`` trades quality for speed.

Drafters: ``"layerskip"`` (the target's first ``layers`` layers, self-speculative), ``"ngram"``
(prompt lookup, no model call) or a path to a smaller model with the same tokenizer.  The trace
records the rounds, drafted and accepted tokens, acceptance rate and tokens per round; FLOPs in the
usage include the drafter's compute and the target's work on rejected drafts.

Each problem is one request on the shared engine carrying its own
:class:`~budgetlm.backends.base.SpeculativeDecoding` setting, so problems (and other requests) run
side by side without switching the backend's mode.  The output arrives at the end of the call (the
draft-and-verify loop does not stream).

Budgets: output tokens are clamped as for any call (the loop never emits more than ``max_tokens``).
FLOP and joule budgets are refused, because the drafting compute is not known before the call and
could overshoot them.  For vLLM, use the engine's own speculative decoding
(``VLLMBackend(..., speculative_config=...)``) with any strategy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from budgetlm.backends.base import GenerationRequest, SamplingParams, SpeculativeDecoding
from budgetlm.errors import BudgetExceeded, ConfigError
from budgetlm.strategies.aggregate import answer_key
from budgetlm.strategies.base import STRATEGIES, Context, Problem, Result, Strategy, StrategyParams
from budgetlm.usage import Usage


class SpeculativeParams(StrategyParams):
    """Parameters of :class:`Speculative`."""

    drafter: str = Field(default="layerskip", min_length=1, description=(
        "'layerskip' (the target's first `layers` layers), 'ngram' (prompt lookup) or a path to a smaller model "
        "with the same tokenizer."))
    gamma: int = Field(default=4, ge=1, description="Draft tokens per round.")
    adaptive: bool = Field(default=False, description="Adapt gamma to the acceptance rate.")
    layers: int | None = Field(default=None, ge=1, description="Layers of the layerskip drafter (None: half).")
    ngram: int = Field(default=3, ge=1, description="n-gram length of the ngram drafter.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens of the reply (the budget may clamp it).")
    temperature: float = Field(default=0.0, ge=0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling (0: off).")
    seed: int | None = Field(default=None, description="Sampling seed (None: unseeded).")


class SpeculativeCascadeParams(SpeculativeParams):
    """Parameters of :class:`SpeculativeCascade`."""

    rule: Literal["chow", "diff", "opt", "v1", "v2", "v3"] = Field(default="opt", description=(
        "Deferral rule whose target distribution π the drafts are verified against."))
    alpha: float = Field(default=0.1, ge=0, le=1, description="Lenience of the deferral rule (higher: faster, lossier).")


class Speculative(Strategy):
    """One reply per problem, decoded speculatively; see the module docstring."""

    name = "speculative"
    Params = SpeculativeParams
    p: SpeculativeParams
    drafter: str
    gamma: int
    adaptive: bool
    layers: int | None
    ngram: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None

    def setup(self) -> None:
        rule, alpha = self._rule()
        self._spec = SpeculativeDecoding(drafter=self.drafter, gamma=self.gamma, adaptive=self.adaptive,
                                         layers=self.layers, ngram=self.ngram, rule=rule, alpha=alpha)
        self._sampling = SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                        max_tokens=self.max_tokens, seed=self.seed)

    def _rule(self) -> tuple[str | None, float]:
        return None, 0.0

    async def solve_one(self, problem: Problem, ctx: Context) -> Result:
        if not getattr(ctx.backend, "speculative_decoding", False):
            raise ConfigError(f"strategy {self.name!r} needs a backend with a speculative token loop (hf:PATH), got "
                              f"{type(ctx.backend).__name__}; for vLLM pass speculative_config to the engine instead")
        for unit in ("flops", "joules"):
            if ctx.meter.remaining(unit) is not None:
                raise ConfigError(f"strategy {self.name!r} cannot promise a `{unit}` budget (drafting compute is "
                                  "only known after the call); budget output tokens, time or dollars instead")
        rule, alpha = self._rule()
        req = GenerationRequest(messages=problem.messages, sampling=self._sampling, id=problem.id,
                                speculative=self._spec)
        try:
            g = await ctx.generate(req)
        except BudgetExceeded as exc:
            return Result(problem.id, "", None, Usage.zero(), stop_reason=ctx.meter.stop_reason or "budget exhausted",
                          trace=[{"skipped": str(exc)}])
        c = g.first
        spec = {k[5:]: v for k, v in g.usage.extra.items() if k.startswith("spec_")}
        drafted = spec.get("drafted", 0.0)
        spec["acceptance_rate"] = spec.get("accepted", 0.0) / drafted if drafted else 0.0
        spec["tokens_per_round"] = len(c.token_ids) / spec["rounds"] if spec.get("rounds") else 0.0
        return Result(problem.id, c.answer, answer_key(c.answer), g.usage, finish_reason=c.finish_reason,
                      stop_reason="deadline" if c.finish_reason == "deadline" else "done",
                      truncated=c.truncated, sequential_tokens=len(c.token_ids),
                      trace=[{"output_tokens": len(c.token_ids), "max_tokens": g.max_tokens,
                              "drafter": self.drafter, "rule": rule, "alpha": alpha, "speculative": spec}])


class SpeculativeCascade(Speculative):
    """Speculative execution verified against a deferral rule's π (lossy; ``alpha`` is the lenience)."""

    name = "speculative_cascade"
    Params = SpeculativeCascadeParams
    p: SpeculativeCascadeParams
    rule: str
    alpha: float

    def _rule(self) -> tuple[str | None, float]:
        return self.rule, self.alpha


STRATEGIES.register("speculative", Speculative)
STRATEGIES.register("speculative_cascade", SpeculativeCascade)
