"""Speculative decoding in a transformers token loop (ALGORITHMS.md §6, and §7 via ``rule``).

:class:`SpeculativeDecoder` drafts ``γ`` tokens with a drafter and verifies them with ONE forward
of the target, both keeping a KV cache (``DynamicCache``, cropped back to the accepted prefix after
each round).  Verification is :func:`budgetlm.specdec.verify` against the target's processed
distribution ``p`` (lossless) or, with a speculative-cascade ``rule`` and lenience ``alpha``,
against ``π`` from :func:`budgetlm.specdec.cascade_target`.

Drafters (:class:`Drafter`):

* :class:`ModelDrafter` — a smaller causal LM with the target's tokenizer;
* :class:`LayerSkipDrafter` — the target itself with only its first ``layers`` decoder layers
  (self-speculative; the weights are shared, not copied), so the default model drafts for itself;
* :class:`NGramDrafter` — prompt lookup: the tokens that followed the last earlier occurrence of
  the context's final ``n``-gram; its proposal is one-hot and costs no model call.

``adaptive=True`` adapts γ per round (grow by one after a fully accepted round, shrink by one
after a round that accepted nothing, within ``[1, gamma_max]``), as in Leviathan et al.'s
discussion of choosing γ.  Every round logs its drafted and accepted tokens; the decoder returns
the emitted tokens and :class:`SpecStats` (rounds, drafted, accepted, target forwards, drafter
forwards, acceptance rate, tokens per round).  Output never exceeds ``max_tokens``: the last round
drafts at most ``max_tokens - emitted - 1`` tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from budgetlm.errors import ConfigError, missing
from budgetlm.specdec import cascade_target, processed_probs, verify

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class SpecStats:
    """What a speculative generation did."""

    rounds: int = 0
    """Draft-verify rounds."""
    drafted: int = 0
    """Draft tokens proposed."""
    accepted: int = 0
    """Draft tokens accepted *and emitted* (drafts verified past an end-of-sequence token or the token limit are
    dropped from the output, so they are not counted)."""
    emitted: int = 0
    """Tokens emitted (accepted drafts plus each round's corrected or bonus token, when it was kept)."""
    target_forwards: int = 0
    """Forward passes of the target (prefill included)."""
    target_tokens: int = 0
    """Tokens the target processed (prefill and verification)."""
    drafter_forwards: int = 0
    """Forward passes of a model drafter (0 for n-gram)."""
    drafter_tokens: int = 0
    """Tokens a model drafter processed."""
    deferred: float = 0.0
    """Speculative cascades: summed deferral weight over verified positions."""
    gammas: list[int] = field(default_factory=list)
    """γ used in each round."""

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "target_forwards": self.target_forwards, "target_tokens": self.target_tokens,
                "drafter_forwards": self.drafter_forwards, "drafter_tokens": self.drafter_tokens,
                "acceptance_rate": self.acceptance_rate, "tokens_per_round": self.tokens_per_round,
                "deferred": self.deferred}


class _Cached:
    """A causal LM with a KV cache over a growing token sequence."""

    def __init__(self, model: PreTrainedModel) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        self.length = 0

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Run the tokens after the cached prefix of ``ids``; logits of those positions ``[n, V]``."""
        new = ids[self.length:]
        if not new:
            raise ConfigError("internal: nothing to feed (the cache already covers the sequence)")
        x = torch.tensor([new], device=self.model.device)
        with torch.no_grad():
            out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True)
        self.length = len(ids)
        return out.logits[0].float()

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # negative: drop that many tokens from the end
            self.length = length


Proposal = tuple[list[int], "torch.Tensor | None", "torch.Tensor | None"]
"""Draft tokens, their processed distributions ``q`` and untempered ones (``None`` when nothing is drafted)."""


class Drafter(ABC):
    """Proposes draft tokens and the distributions they were sampled from."""

    name = "drafter"

    @abstractmethod
    def reset(self) -> None:
        """Forget the previous sequence."""

    @abstractmethod
    def propose(self, ids: list[int], gamma: int, sample: _Sampler, stats: SpecStats, tail: bool = False) -> Proposal:
        """Up to ``gamma`` draft tokens after ``ids`` with their processed and untempered ``[k, V]`` distributions.

        ``tail=True`` (speculative cascades) asks for one more row: the drafter's distribution at the
        position after the last draft, where the bonus token is drawn from ``π``.  Drafters without
        distributions (n-gram) ignore it.
        """

    def sync(self, length: int) -> None:
        """The sequence's first ``length`` tokens are final (crop any cache beyond them)."""


class ModelDrafter(Drafter):
    """A (smaller) causal LM sharing the target's tokenizer."""

    name = "model"

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._lm: _Cached | None = None

    def reset(self) -> None:
        self._lm = _Cached(self.model)

    def propose(self, ids: list[int], gamma: int, sample: _Sampler, stats: SpecStats, tail: bool = False) -> Proposal:
        if self._lm is None:
            raise missing('self._lm')
        seq = list(ids)
        draft, rows, raws = [], [], []
        for j in range(gamma + (1 if tail and gamma else 0)):
            before = self._lm.length
            logits = self._lm.feed(seq)[-1]
            stats.drafter_forwards += 1
            stats.drafter_tokens += len(seq) - before
            q = sample(logits)
            rows.append(q)
            raws.append(torch.softmax(logits, -1))
            if j == gamma:  # the tail row: a distribution, no draft
                break
            x = int(torch.multinomial(q, 1, generator=sample.generator)) if not sample.greedy else int(q.argmax())
            draft.append(x)
            seq.append(x)
        return (draft, torch.stack(rows), torch.stack(raws)) if rows else ([], None, None)

    def sync(self, length: int) -> None:
        if self._lm is not None:
            self._lm.crop(length)


class LayerSkipDrafter(ModelDrafter):
    """The target with only its first ``layers`` decoder layers (weights shared): self-speculative."""

    name = "layerskip"

    def __init__(self, target: PreTrainedModel, layers: int) -> None:
        from transformers import AutoModelForCausalLM

        total = int(getattr(target.config, "num_hidden_layers", 0) or 0)
        if not 1 <= layers < total:
            raise ConfigError(f"`layers` must be in [1, {total - 1}] for a {total}-layer target, got {layers}")
        cfg = target.config.__class__.from_dict(target.config.to_dict())
        cfg.num_hidden_layers = layers
        for key in ("layer_types",):  # per-layer lists must match the new depth
            if isinstance(getattr(cfg, key, None), list):
                setattr(cfg, key, getattr(cfg, key)[:layers])
        with torch.device("meta"):
            shallow = AutoModelForCausalLM.from_config(cfg)
        state = {k: v for k, v in target.state_dict().items()
                 if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < layers}
        shallow.load_state_dict(state, assign=True, strict=False)
        if getattr(cfg, "tie_word_embeddings", False):
            shallow.tie_weights()
        for name, buf in target.named_buffers():  # rotary inv_freq and friends
            mod_name, _, attr = name.rpartition(".")
            try:
                mod = shallow.get_submodule(mod_name)
            except AttributeError:
                continue
            if hasattr(mod, attr):
                setattr(mod, attr, buf)
        super().__init__(shallow.eval())
        self.layers = layers


class NGramDrafter(Drafter):
    """Prompt lookup: continue the last earlier occurrence of the final ``n``-gram (one-hot proposals)."""

    name = "ngram"

    def __init__(self, n: int = 3, vocab_size: int = 0) -> None:
        if n < 1:
            raise ConfigError(f"`n` must be >= 1, got {n}")
        self.n = n
        self.vocab_size = vocab_size

    def reset(self) -> None:
        pass

    def propose(self, ids: list[int], gamma: int, sample: _Sampler, stats: SpecStats, tail: bool = False) -> Proposal:
        for n in range(min(self.n, len(ids) - 1), 0, -1):
            key = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == key:
                    draft = ids[start + n: start + n + gamma]
                    if draft:
                        q = torch.zeros(len(draft), self.vocab_size)
                        q[torch.arange(len(draft)), torch.tensor(draft)] = 1.0
                        return draft, q, q
        return [], None, None


@dataclass
class _Sampler:
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return processed_probs(logits, self.temperature, self.top_k, self.top_p)


class SpeculativeDecoder:
    """Draft-and-verify generation for one sequence at a time; see the module docstring."""

    def __init__(self, target: PreTrainedModel, drafter: Drafter, *, gamma: int = 4, adaptive: bool = False,
                 rule: str | None = None, alpha: float = 0.0) -> None:
        if gamma < 1:
            raise ConfigError(f"`gamma` must be >= 1, got {gamma}")
        self.target, self.drafter, self.gamma, self.adaptive = target, drafter, gamma, adaptive
        self.rule, self.alpha = rule, alpha
        if rule is not None:
            cascade_target(torch.ones(1, 2) / 2, torch.ones(1, 2) / 2, torch.ones(1, 2) / 2, torch.ones(1, 2) / 2,
                           rule, alpha)  # validates rule and alpha

    def generate(self, prompt: list[int], max_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos: set[int] | None = None, seed: int | None = None) -> tuple[list[int], SpecStats]:
        """Emitted tokens (at most ``max_tokens``; an EOS ends them and is kept) and the round statistics."""
        if not prompt:
            raise ConfigError("`prompt` must hold at least one token id, got []")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        sample = _Sampler(temperature, top_k, top_p, gen)
        vocab = int(self.target.config.vocab_size)
        if isinstance(self.drafter, NGramDrafter) and not self.drafter.vocab_size:
            self.drafter.vocab_size = vocab
        stats = SpecStats()
        target = _Cached(self.target)
        self.drafter.reset()
        ids = list(prompt)
        if len(ids) > 1:  # prefill all but the last token
            target.feed(ids[:-1])
            stats.target_forwards += 1
            stats.target_tokens += len(ids) - 1
        out: list[int] = []
        gamma = self.gamma
        eos = eos or set()
        while len(out) < max_tokens:
            g = max(0, min(gamma, max_tokens - len(out) - 1))
            draft, q, q_raw = (self.drafter.propose(ids, g, sample, stats, tail=self.rule is not None) if g
                               else ([], None, None))
            before = target.length
            logits = target.feed(ids + draft)[-(len(draft) + 1):]
            stats.target_forwards += 1
            stats.target_tokens += len(ids) + len(draft) - before
            p = sample(logits)
            if q is not None and q_raw is not None and self.rule is not None:  # rules read untempered probabilities
                k = q.shape[0]  # γ rows, or γ + 1 with the drafter's bonus-position row
                t_rows, deferred = cascade_target(q, p[:k], q_raw, torch.softmax(logits[:k], -1), self.rule, self.alpha)
                t = torch.cat([t_rows, p[k:]])
                stats.deferred += float(deferred[: len(draft)].sum())
                q = q[: len(draft)]
            else:
                t = p
            res = verify(draft, q if q is not None else torch.zeros(0, vocab), t, greedy=sample.greedy, generator=gen)
            stats.rounds += 1
            stats.drafted += len(draft)
            stats.gammas.append(len(draft))
            new = res.tokens[: max_tokens - len(out)]
            length_before = len(ids)
            for tok in new:
                out.append(tok)
                ids.append(tok)
                if tok in eos:
                    break
            kept = len(ids) - length_before
            stats.emitted += kept
            stats.accepted += min(res.accepted, kept)  # drafts verified past an EOS (or the limit) were dropped
            keep = length_before + res.accepted  # cache may hold the accepted drafts; the final token is fed next round
            target.crop(min(keep, len(ids) - 1))
            self.drafter.sync(min(keep, len(ids) - 1))
            if out and out[-1] in eos:
                break
            if self.adaptive and draft:
                gamma = min(self.gamma, gamma + 1) if res.accepted == len(draft) else (
                    max(1, gamma - 1) if res.accepted == 0 else gamma)
        return out, stats
