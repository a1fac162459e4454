"""Speculative decoding (ALGORITHMS.md §6) and speculative cascades (§7) as strategies.

Both sample one reply per problem through a backend whose token loop drafts and verifies
(:class:`~budgetlm.backends.base.SpeculativeBackend`; the transformers backend implements it in
:mod:`budgetlm.backends.hf_speculative`).  The strategy only asks for it through that protocol:

* ``speculative`` — lossless: the output follows the target's distribution (greedy output is
  token-identical to target-only greedy decoding);
* ``speculative_cascade`` — lossy by design: verification targets ``π`` from a deferral ``rule``
  (chow, diff, opt, v1, v2, v3) with lenience ``alpha``; ``alpha`` trades quality for speed.

Drafters: ``"layerskip"`` (the target's first ``layers`` layers, self-speculative), ``"ngram"``
(prompt lookup, no model call) or a path to a smaller model with the same tokenizer.  The trace
records the rounds, drafted and accepted tokens, acceptance rate and tokens per round; FLOPs in the
usage include the drafter's compute and the target's work on rejected drafts.

Budgets: output tokens are clamped as for any call (the loop never emits more than ``max_tokens``).
FLOP and joule budgets are refused, because the drafting compute is not known before the call and
could overshoot them.  For vLLM, use the engine's own speculative decoding
(``VLLMBackend(..., speculative_config=...)``) with any strategy.
"""

from __future__ import annotations

from collections.abc import Sequence

from budgetlm.backends.base import Backend, GenerationRequest, SamplingParams, SpeculativeBackend
from budgetlm.errors import ConfigError
from budgetlm.meter import Meter
from budgetlm.specdec import RULES
from budgetlm.strategies.aggregate import answer_key
from budgetlm.strategies.base import STRATEGIES, Problem, Result, Strategy


class Speculative(Strategy):
    """One reply per problem, decoded speculatively; see the module docstring."""

    name = "speculative"

    def __init__(self, drafter: str = "layerskip", gamma: int = 4, adaptive: bool = False, layers: int | None = None,
                 ngram: int = 3, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None) -> None:
        self._check(gamma, max_tokens)
        self.drafter, self.gamma, self.adaptive, self.layers, self.ngram = drafter, gamma, adaptive, layers, ngram
        self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed = max_tokens, temperature, top_p, top_k, seed
        SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens)  # validates

    @staticmethod
    def _check(gamma: int, max_tokens: int) -> None:
        if gamma < 1:
            raise ConfigError(f"`gamma` must be >= 1 (draft tokens per round), got {gamma}")
        if max_tokens < 1:
            raise ConfigError(f"`max_tokens` must be >= 1, got {max_tokens}")

    def _rule(self) -> tuple[str | None, float]:
        return None, 0.0

    def run(self, problems: Sequence[Problem], meters: Sequence[Meter], backend: Backend) -> list[Result]:
        if not isinstance(backend, SpeculativeBackend):
            raise ConfigError(f"strategy {self.name!r} needs a backend with a speculative token loop (hf:PATH), got "
                              f"{type(backend).__name__}; for vLLM pass speculative_config to the engine instead")
        for m in meters:
            for unit in ("flops", "joules"):
                if m.remaining(unit) is not None:
                    raise ConfigError(f"strategy {self.name!r} cannot promise a `{unit}` budget (drafting compute is "
                                      "only known after the call); budget output tokens, time or dollars instead")
        rule, alpha = self._rule()
        sp = SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                            max_tokens=self.max_tokens, seed=self.seed)
        reqs = [GenerationRequest(messages=p.messages, sampling=sp, meter=m, id=p.id)
                for p, m in zip(problems, meters, strict=True)]
        with backend.speculative(self.drafter, self.gamma, adaptive=self.adaptive, rule=rule, alpha=alpha,
                                 layers=self.layers, ngram=self.ngram):
            gens = backend.generate(reqs, on_budget_exhausted="skip")
        out = []
        for p, m, g in zip(problems, meters, gens, strict=True):
            if g.skipped or not g.completions:
                out.append(Result(p.id, "", None, g.usage, stop_reason=m.exhausted_reason(),
                                  trace=[{"skipped": g.skipped}]))
                continue
            c = g.first
            spec = {k[5:]: v for k, v in g.usage.extra.items() if k.startswith("spec_")}
            drafted = spec.get("drafted", 0.0)
            spec["acceptance_rate"] = spec.get("accepted", 0.0) / drafted if drafted else 0.0
            spec["tokens_per_round"] = len(c.token_ids) / spec["rounds"] if spec.get("rounds") else 0.0
            out.append(Result(p.id, c.answer, answer_key(c.answer), g.usage, finish_reason=c.finish_reason,
                              truncated=c.truncated, sequential_tokens=len(c.token_ids),
                              trace=[{"output_tokens": len(c.token_ids), "max_tokens": g.max_tokens,
                                      "drafter": self.drafter, "rule": rule, "alpha": alpha, "speculative": spec}]))
        return out


class SpeculativeCascade(Speculative):
    """Speculative execution verified against a deferral rule's π (lossy; ``alpha`` is the lenience)."""

    name = "speculative_cascade"

    def __init__(self, rule: str = "opt", alpha: float = 0.1, drafter: str = "layerskip", gamma: int = 4,
                 adaptive: bool = False, layers: int | None = None, ngram: int = 3, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> None:
        if rule not in RULES:
            raise ConfigError(f"`rule` must be one of {', '.join(RULES)}, got {rule!r}")
        if not 0 <= alpha <= 1:
            raise ConfigError(f"`alpha` (lenience) must be in [0, 1], got {alpha}")
        super().__init__(drafter=drafter, gamma=gamma, adaptive=adaptive, layers=layers, ngram=ngram,
                         max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        self.rule, self.alpha = rule, alpha

    def _rule(self) -> tuple[str | None, float]:
        return self.rule, self.alpha


STRATEGIES.register("speculative", Speculative)
STRATEGIES.register("speculative_cascade", SpeculativeCascade)
