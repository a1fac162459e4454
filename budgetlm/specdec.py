"""The verification math of speculative decoding and speculative cascades (ALGORITHMS.md §6, §7).

Pure torch on probability vectors, shared by every token loop that drafts and verifies (the
transformers backend's loop; any drafter: a smaller model, the target with layers skipped, or an
n-gram lookup whose proposal is one-hot):

* :func:`processed_probs` — the distribution actually sampled from (temperature, top-k, top-p),
  used for both ``q`` (drafter) and ``p`` (target), as the lossless rule requires;
* :func:`verify` — one round of Leviathan et al. (2211.17192) / Chen et al. (2302.01318): accept
  draft ``x_i`` when ``u <= t_i(x_i) / q_i(x_i)``; at the first rejection sample from
  ``norm(max(0, t_i - q_i))``; when all are accepted sample a bonus token from ``t_{γ+1}``.  With
  ``t = p`` the output is distributed exactly as the target's (lossless); greedy mode accepts iff
  ``x_i = argmax p_i`` and emits ``argmax p_i`` otherwise;
* :func:`cascade_target` — speculative cascades (Narasimhan et al. 2405.19261): the target ``π`` of
  the same loop per position, from a deferral rule with lenience ``α`` — ``chow``, ``diff``, ``opt``
  (``π = (1 - δ) q + δ p``), or the token-specific ``v1``/``v2``/``v3`` (``π(v) = q(v) 1[v ∈ A] +
  q(V \\ A) p(v)``).  Rules read the *untempered* probabilities; ``π`` is built from the tempered ones;
* :func:`acceptance_rate`, :func:`expected_tokens`, :func:`ideal_speedup` — α = Σ min(p, q),
  ``(1 - α^{γ+1}) / (1 - α)`` tokens per round and ``(1 - α^{γ+1}) / ((1 - α)(γ c + 1))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from budgetlm.errors import ConfigError

Rule = Literal["chow", "diff", "opt", "v1", "v2", "v3"]
RULES: tuple[str, ...] = ("chow", "diff", "opt", "v1", "v2", "v3")
"""Deferral rules of speculative cascades."""


def processed_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (last dimension = vocabulary); greedy → one-hot."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if temperature < 0:
        raise ConfigError(f"`temperature` must be >= 0, got {temperature}")
    z = logits / temperature
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest prefix reaching top_p (first token always kept)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, keep)
        probs = probs * mask
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@dataclass
class Verified:
    """What one verification round emits."""

    tokens: list[int]
    """Emitted tokens: the accepted drafts, then one corrected or bonus token (1..γ+1 tokens)."""
    accepted: int
    """Drafts accepted (0..γ)."""


def verify(draft: list[int], q: torch.Tensor, t: torch.Tensor, *, greedy: bool = False,
           generator: torch.Generator | None = None) -> Verified:
    """One round of draft verification against target distributions ``t`` (``p``, or ``π`` for cascades).

    ``q`` is ``[γ, V]`` (the drafter's processed distributions at the drafted positions), ``t`` is
    ``[γ + 1, V]`` (the target's at the same positions plus the bonus position).
    """
    g = len(draft)
    if q.shape[0] != g or t.shape[0] != g + 1:
        raise ConfigError(f"`q` must have {g} rows and `t` {g + 1}, got {q.shape[0]} and {t.shape[0]}")
    out: list[int] = []
    for i, x in enumerate(draft):
        if greedy:
            best = int(t[i].argmax())
            if x == best:
                out.append(x)
                continue
            return Verified(out + [best], i)
        qx, tx = float(q[i, x]), float(t[i, x])
        u = float(torch.rand((), generator=generator))
        if qx > 0 and u <= tx / qx:
            out.append(x)
            continue
        residual = torch.clamp(t[i] - q[i], min=0)
        if float(residual.sum()) <= 0:  # t == q: rejection has probability 0; guard rounding
            residual = t[i]
        nxt = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return Verified(out + [nxt], i)
    last = t[g]
    bonus = int(last.argmax()) if greedy else int(torch.multinomial(last / last.sum(), 1, generator=generator))
    return Verified(out + [bonus], g)


def cascade_target(q: torch.Tensor, p: torch.Tensor, q_raw: torch.Tensor, p_raw: torch.Tensor, rule: str,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(π, deferred)`` per position (rows): π from the tempered ``q``/``p``, the rule on the raw ones.

    ``deferred`` is 1 where the position defers to the target (for token-specific rules: the share
    of π's mass that comes from ``p``, i.e. ``q(V \\ A)``).
    """
    if rule not in RULES:
        raise ConfigError(f"`rule` must be one of {', '.join(RULES)}, got {rule!r}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"`alpha` (lenience) must be in [0, 1], got {alpha}")
    max_q = q_raw.max(-1, keepdim=True).values
    max_p = p_raw.max(-1, keepdim=True).values
    if rule in ("chow", "diff", "opt"):
        if rule == "chow":
            d = max_q < 1 - alpha
        elif rule == "diff":
            d = max_q < max_p - alpha
        else:
            tv = torch.clamp(q_raw - p_raw, min=0).sum(-1, keepdim=True)
            d = max_q < max_p - alpha * tv
        df = d.to(q.dtype)
        return (1 - df) * q + df * p, df.squeeze(-1)
    if rule == "v1":
        accept = q_raw >= max_p - alpha
    elif rule == "v2":
        accept = p_raw >= max_p - alpha
    else:
        accept = p_raw >= (1 - alpha) * max_p
    kept = q * accept
    rest = (q * ~accept).sum(-1, keepdim=True)
    return kept + rest * p, rest.squeeze(-1)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """α = Σ_v min(p(v), q(v)) per row."""
    return torch.minimum(p, q).sum(-1)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens per round, ``(1 - α^{γ+1}) / (1 - α)`` (``γ + 1`` at α = 1)."""
    if gamma < 1:
        raise ConfigError(f"`gamma` must be >= 1, got {gamma}")
    return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def ideal_speedup(alpha: float, gamma: int, c: float) -> float:
    """Ideal wall-clock speed-up ``(1 - α^{γ+1}) / ((1 - α)(γ c + 1))`` for draft/target cost ratio ``c``."""
    if c < 0:
        raise ConfigError(f"`c` (draft/target cost ratio) must be >= 0, got {c}")
    return expected_tokens(alpha, gamma) / (gamma * c + 1)
