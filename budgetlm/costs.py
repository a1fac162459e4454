"""Cost models: FLOPs, dollars and energy of a model call.

FLOPs
-----
* **Plain** (Kaplan et al. 2001.08361): ``2 · P · tokens`` for a forward pass over ``tokens``
  tokens of a model with ``P`` parameters (embeddings excluded).
* **Kinetics eFLOPs** (Sadhukhan et al., arXiv 2506.05333, Eq. 1-3): compute FLOPs *plus* the
  hardware arithmetic intensity ``I`` (FLOPs per byte the accelerator can do while moving one byte)
  times the memory traffic.  Compute adds the attention term ``2 · 2 · L · d_kv_total · ctx`` per
  token that grows with the context ``ctx``; memory traffic per generated token is the KV cache
  read (``2 · L · n_kv · d_head · ctx · bytes``) plus the parameter read amortised over the decode
  batch.  Long generations are dominated by KV reads, which plain ``2·P·tokens`` misses.
  Deviation: we use the closed-form sums over the generated positions instead of a per-layer
  roofline, and a default intensity of an H100 (989 TFLOP/s / 3.35 TB/s ≈ 295 FLOP/byte).

Dollars
-------
:class:`PriceTable` maps model names (exact or ``fnmatch`` patterns) to input, cached-input and
output prices per million tokens; users can override or extend it.  Local models cost 0 unless
priced.

Energy
------
:class:`EnergyMeter` reads NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
millijoules since driver load) before and after a call.  Without ``pynvml`` or a GPU it reports
``None`` (not measured), never zero.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field

from budgetlm.config import Config

if TYPE_CHECKING:
    from types import ModuleType

    from transformers import PretrainedConfig

CHARS_PER_TOKEN = 3
"""Characters of letters and spaces per token in :func:`estimate_tokens` (BPE tokenizers average about 4 on
English text; 3 over-counts on purpose)."""

MESSAGE_OVERHEAD_TOKENS = 8
"""Tokens :func:`estimate_tokens` adds per chat message for its role markers and template."""


def estimate_tokens(text: str | Sequence[Mapping[str, Any]]) -> int:
    """A conservative token count without a tokenizer: the one estimate budgetlm reserves with.

    Used wherever no local tokenizer can count (OpenAI-compatible servers without one, tree searches
    estimating a forced answer, the agent client's prompt estimate, the server's context check) so that a
    reservation never under-counts where it can help it.  For text: every digit and every character that
    is neither a letter nor a space counts as a token (tokenizers split digits and most punctuation into
    single tokens), plus ``ceil(rest / CHARS_PER_TOKEN)`` for letters and spaces; at least 1.  For chat
    messages: the estimate of each message's content (text parts of a list content; tool calls'
    arguments) plus :data:`MESSAGE_OVERHEAD_TOKENS`.

    It is monotone (appending text never lowers it) and, on budgetlm's suites and chat prompts, at least
    the SmolLM2 tokenizer's count (tested); non-Latin scripts are over-counted less reliably.

    >>> estimate_tokens("What is 12 + 30?")
    10
    >>> estimate_tokens([{"role": "user", "content": "hi"}])
    9
    """
    if isinstance(text, str):
        other = sum(1 for ch in text if not (ch.isalpha() or ch.isspace()))
        rest = len(text) - other
        return max(1, other + -(-rest // CHARS_PER_TOKEN))
    total = 0
    for m in text:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
        parts = [str(content or "")]
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {}) if isinstance(call, Mapping) else {}
            parts.append(f"{fn.get('name', '')}{fn.get('arguments', '')}")
        total += sum(estimate_tokens(p) for p in parts if p) + MESSAGE_OVERHEAD_TOKENS
    return max(1, total)


@dataclass(frozen=True)
class ModelInfo:
    """What cost models need to know about a model."""

    name: str
    """Model name or path."""
    n_params: int
    """Total parameters."""
    n_layers: int = 0
    """Transformer layers."""
    hidden_size: int = 0
    """Model width."""
    n_heads: int = 0
    """Attention heads."""
    n_kv_heads: int = 0
    """Key/value heads (GQA)."""
    head_dim: int = 0
    """Width of one head."""
    vocab_size: int = 0
    """Vocabulary size."""
    max_context: int = 0
    """Longest context the model takes."""
    n_embedding_params: int = 0
    """Parameters in the input embedding (not used per token)."""
    bytes_per_param: float = 2.0
    """Weight precision in bytes (2 for bf16/fp16)."""

    @property
    def n_nonembedding_params(self) -> int:
        """Parameters touched per token (tied or not, the input embedding lookup is free)."""
        return max(1, self.n_params - self.n_embedding_params)

    @classmethod
    def from_hf_config(cls, name: str, config: PretrainedConfig, n_params: int | None = None) -> ModelInfo:
        """Derive the info from a transformers ``PretrainedConfig`` (parameters counted if absent)."""
        def get(*keys: str, default: int = 0) -> int:
            """The first of ``keys`` the config sets (truthy), as an int; else ``default``."""
            return int(next((getattr(config, k) for k in keys if getattr(config, k, None)), default))

        hidden = get("hidden_size", "d_model", "n_embd")
        layers = get("num_hidden_layers", "n_layer", "num_layers")
        heads = get("num_attention_heads", "n_head")
        kv = get("num_key_value_heads", default=heads)
        head_dim = get("head_dim", default=hidden // heads if heads else 0)
        vocab = get("vocab_size")
        inter = get("intermediate_size", "n_inner", default=4 * hidden)
        if n_params is None:
            attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
            mlp = 3 * hidden * inter
            n_params = layers * (attn + mlp + 2 * hidden) + hidden + vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        return cls(
            name=name,
            n_params=int(n_params),
            n_layers=layers,
            hidden_size=hidden,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            vocab_size=vocab,
            max_context=get("max_position_embeddings", "n_positions", default=0),
            n_embedding_params=vocab * hidden,
        )


def plain_flops(info: ModelInfo, prompt_tokens: int, output_tokens: int) -> float:
    """``2 · P · (prompt + output)``: forward FLOPs without the attention-context term."""
    return 2.0 * info.n_nonembedding_params * (prompt_tokens + output_tokens)


def _attn_sum(prompt: int, out: int) -> float:
    """Σ_{t=0}^{out-1} (prompt + t): total context seen over ``out`` decode steps."""
    return out * prompt + out * (out - 1) / 2


@dataclass(frozen=True)
class CostModel:
    """FLOPs of a call for one model, plain or Kinetics eFLOPs."""

    info: ModelInfo
    """The model."""
    kind: Literal["plain", "kinetics"] = "kinetics"
    """Which FLOPs the meter charges."""
    intensity: float = 295.0
    """Hardware arithmetic intensity (FLOP per byte), default an H100's."""
    kv_bytes: float = 2.0
    """Bytes per KV-cache element."""
    decode_batch: int = 64
    """Sequences sharing one parameter read while decoding."""

    def compute_flops(self, prompt_tokens: int, output_tokens: int, n: int = 1) -> float:
        """Matmul FLOPs plus the attention score/value FLOPs that grow with context."""
        i = self.info
        d_attn = i.n_heads * i.head_dim
        prefill = 2.0 * i.n_nonembedding_params * prompt_tokens + 4.0 * i.n_layers * d_attn * prompt_tokens * (prompt_tokens + 1) / 2
        decode = 2.0 * i.n_nonembedding_params * output_tokens + 4.0 * i.n_layers * d_attn * _attn_sum(prompt_tokens, output_tokens)
        return prefill + n * decode

    def memory_bytes(self, prompt_tokens: int, output_tokens: int, n: int = 1) -> float:
        """Bytes moved while decoding: KV-cache reads plus amortised parameter reads."""
        i = self.info
        kv_per_pos = 2.0 * i.n_layers * i.n_kv_heads * i.head_dim * self.kv_bytes
        kv = kv_per_pos * _attn_sum(prompt_tokens, output_tokens)
        params = i.n_params * i.bytes_per_param * output_tokens / max(1, self.decode_batch)
        return n * (kv + params)

    def flops(self, prompt_tokens: int, output_tokens: int, n: int = 1) -> float:
        """FLOPs charged for a call with ``n`` samples of ``output_tokens`` each on average.

        For ``n`` samples pass the *per-sample* output length; the prompt is processed once.
        """
        if self.kind == "plain":
            return plain_flops(self.info, prompt_tokens, 0) + n * 2.0 * self.info.n_nonembedding_params * output_tokens
        return self.compute_flops(prompt_tokens, output_tokens, n) + self.intensity * self.memory_bytes(prompt_tokens, output_tokens, n)

    def flops_for_outputs(self, prompt_tokens: int, output_lengths: list[int]) -> float:
        """FLOPs of a call whose samples generated ``output_lengths`` tokens each."""
        if not output_lengths:
            return self.flops(prompt_tokens, 0, 1)
        base = self.flops(prompt_tokens, 0, 1)
        return base + sum(self.flops(prompt_tokens, k, 1) - base for k in output_lengths)


class Price(Config):
    """Dollars per million tokens (negative prices are refused)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(default=0.0, ge=0, description="USD per million uncached prompt tokens.")
    output: float = Field(default=0.0, ge=0, description="USD per million generated tokens.")
    cached_input: float | None = Field(default=None, ge=0, description="USD per million prompt tokens served from "
                                                                       "the provider's cache (None: ``input``).")

    def cost(self, prompt_tokens: int, cached_prompt_tokens: int, output_tokens: int) -> float:
        cached = self.input if self.cached_input is None else self.cached_input
        uncached = max(0, prompt_tokens - cached_prompt_tokens)
        return (uncached * self.input + cached_prompt_tokens * cached + output_tokens * self.output) / 1e6


DEFAULT_PRICES: dict[str, Price] = {
    # USD per 1M tokens, list prices as published by the providers (2025); override for your contract.
    "gpt-4o": Price(input=2.50, cached_input=1.25, output=10.00),
    "gpt-4o-mini": Price(input=0.15, cached_input=0.075, output=0.60),
    "o3-mini": Price(input=1.10, cached_input=0.55, output=4.40),
    "o4-mini": Price(input=1.10, cached_input=0.275, output=4.40),
    "gpt-4.1": Price(input=2.00, cached_input=0.50, output=8.00),
    "gpt-4.1-mini": Price(input=0.40, cached_input=0.10, output=1.60),
    "gpt-4.1-nano": Price(input=0.10, cached_input=0.025, output=0.40),
}


@dataclass
class PriceTable:
    """Model name (exact, then ``fnmatch`` pattern) → :class:`Price`; unknown models cost ``default``."""

    prices: dict[str, Price] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    """The table; later entries of patterns win over earlier ones only when no exact match exists."""
    default: Price = field(default_factory=Price)
    """Price of models not in the table (free: local inference)."""

    def set(self, model: str, price: Price | dict[str, float]) -> None:
        """Add or override a model's price."""
        self.prices[model] = price if isinstance(price, Price) else Price.of(price)

    def lookup(self, model: str) -> Price:
        if model in self.prices:
            return self.prices[model]
        base = model.rsplit("/", 1)[-1]
        if base in self.prices:
            return self.prices[base]
        for pattern, price in self.prices.items():
            if fnmatch.fnmatch(model, pattern) or fnmatch.fnmatch(base, pattern):
                return price
        return self.default

    def cost(self, model: str, prompt_tokens: int, cached_prompt_tokens: int, output_tokens: int) -> float:
        return self.lookup(model).cost(prompt_tokens, cached_prompt_tokens, output_tokens)


class EnergyMeter:
    """Reads NVML's cumulative energy counter; ``None`` everywhere when NVML is unavailable."""

    def __init__(self, device_indices: list[int] | None = None) -> None:
        self._handles: list[object] = []
        self._nvml: ModuleType | None = None
        self.reason: str | None = None
        try:
            import pynvml  # lazy: optional dependency

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            idx = device_indices if device_indices is not None else list(range(count))
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx]
            for h in self._handles:  # raises NVMLError_NotSupported on GPUs without the counter
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
            self._nvml = pynvml
            if not self._handles:
                self.reason = "no GPU found by NVML"
        except ImportError:
            self.reason = "pynvml is not installed"
        except Exception as exc:  # NVML errors: no driver, no GPU, counter unsupported
            self.reason = f"NVML unavailable: {exc}"
            self._handles = []

    @property
    def available(self) -> bool:
        """True when the counter can be read."""
        return bool(self._handles) and self._nvml is not None

    def read_mj(self) -> float | None:
        """Total energy in millijoules over the selected GPUs, or ``None``."""
        nvml = self._nvml
        if nvml is None or not self._handles:  # not :attr:`available`
            return None
        return float(sum(nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles))

    def joules_since(self, start_mj: float | None) -> float | None:
        """Joules spent since ``start_mj`` (from :meth:`read_mj`), or ``None``."""
        now = self.read_mj()
        if now is None or start_mj is None:
            return None
        return (now - start_mj) / 1000.0
