"""Cost models: FLOPs (plain and Kinetics), prices, energy."""

from __future__ import annotations

import pytest

from budgetlm import ConfigError, CostModel, EnergyMeter, ModelInfo, Price, PriceTable
from budgetlm.costs import MESSAGE_OVERHEAD_TOKENS, estimate_tokens, plain_flops

INFO = ModelInfo(name="m", n_params=1_000_000, n_layers=4, hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=16,
                 vocab_size=1000, n_embedding_params=64_000)


def test_plain_flops_is_two_p_tokens() -> None:
    assert plain_flops(INFO, 10, 20) == 2 * 936_000 * 30
    assert CostModel(INFO, kind="plain").flops(10, 20, n=1) == 2 * 936_000 * 30


def test_kinetics_exceeds_plain_and_grows_superlinearly_with_length() -> None:
    kin = CostModel(INFO, kind="kinetics")
    plain = CostModel(INFO, kind="plain")
    assert kin.flops(100, 100) > plain.flops(100, 100)
    # doubling the generation more than doubles the decode cost (attention/KV term grows with context)
    d1 = kin.flops(100, 1000) - kin.flops(100, 0)
    d2 = kin.flops(100, 2000) - kin.flops(100, 0)
    assert d2 > 2 * d1


def test_flops_monotone_in_tokens_and_samples() -> None:
    kin = CostModel(INFO)
    vals = [kin.flops(50, k, 2) for k in range(0, 300, 10)]
    assert vals == sorted(vals)
    assert kin.flops(50, 10, 3) > kin.flops(50, 10, 2)


def test_flops_for_outputs_matches_per_sample_sum() -> None:
    kin = CostModel(INFO)
    base = kin.flops(30, 0)
    assert kin.flops_for_outputs(30, [10, 20]) == pytest.approx(base + (kin.flops(30, 10) - base) + (kin.flops(30, 20) - base))
    assert kin.flops_for_outputs(30, [10, 10]) == pytest.approx(kin.flops(30, 10, 2))


def test_from_hf_config_counts_parameters() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    info = ModelInfo.from_hf_config("tiny", cfg)
    from transformers import LlamaForCausalLM

    real = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert info.n_params == real  # the closed-form count is exact for Llama
    assert (info.n_layers, info.n_kv_heads, info.head_dim) == (2, 2, 8)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-mini", (0.15 * 1000 + 0.60 * 500) / 1e6),  # exact name
        ("openai/gpt-4o-mini", (0.15 * 1000 + 0.60 * 500) / 1e6),  # provider prefix stripped
        ("my-local-model", 0.0),  # unknown local model is free
    ],
)
def test_price_lookup(model: str, expected: float) -> None:
    assert PriceTable().cost(model, 1000, 0, 500) == pytest.approx(expected)


def test_cached_prices_and_overrides() -> None:
    t = PriceTable()
    t.set("mine-*", {"input": 1.0, "output": 2.0, "cached_input": 0.5})
    assert t.cost("mine-7b", 1000, 400, 100) == pytest.approx((600 * 1.0 + 400 * 0.5 + 100 * 2.0) / 1e6)
    with pytest.raises(ConfigError, match="input"):
        Price(input=-1)


def test_energy_meter_absent_without_gpu() -> None:
    e = EnergyMeter()
    if e.available:  # a machine with a GPU and NVML
        assert e.read_mj() is not None
    else:
        assert e.read_mj() is None
        assert e.joules_since(0.0) is None
        assert e.reason


# ---------------------------------------------------------------------------------------------- estimate_tokens
@pytest.mark.parametrize(("text", "expected"), [
    ("", 1), ("a", 1), ("abc", 1), ("abcd", 2), ("12345", 5), ("What is 12 + 30?", 10), ("  ", 1), ("a,b", 2),
])
def test_estimate_tokens_of_text(text: str, expected: int) -> None:
    assert estimate_tokens(text) == expected


def test_estimate_tokens_of_messages_counts_parts_tool_calls_and_overhead() -> None:
    assert estimate_tokens([{"role": "user", "content": "abc"}]) == 1 + MESSAGE_OVERHEAD_TOKENS
    parts = [{"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "text", "text": "def"}]}]
    assert estimate_tokens(parts) == 2 + MESSAGE_OVERHEAD_TOKENS
    call = [{"role": "assistant", "content": None,
             "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    assert estimate_tokens(call) == estimate_tokens('f{"x": 1}') + MESSAGE_OVERHEAD_TOKENS


def test_estimate_tokens_is_monotone() -> None:
    import random

    rng = random.Random(0)
    alphabet = "abc XYZ 0123,.;:!?\n\t(){}é"
    for _ in range(300):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert estimate_tokens(a + b) >= estimate_tokens(a)
        assert estimate_tokens(a + b) >= estimate_tokens(b)


def test_estimate_tokens_is_conservative_against_the_real_tokenizer(default_model_path) -> None:
    """On the suites' prompts and chat-rendered prompts it never counts fewer tokens than SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from budgetlm.evals.suites import get

    tok = AutoTokenizer.from_pretrained(str(default_model_path))
    texts: list[str] = []
    for spec in ("reasoning_gym:chain_sum?size=40&seed=1", "reasoning_gym:basic_arithmetic?size=40&seed=2",
                 "humaneval", "kb_agent?size=10"):
        for it in get(spec).items()[:40]:
            texts += [m["content"] for m in it.messages if isinstance(m.get("content"), str)]
    texts += [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts[:40]]
    assert len(texts) > 150
    counts = [(len(tok.encode(t, add_special_tokens=False)), estimate_tokens(t)) for t in texts]
    assert all(est >= real for real, est in counts), [c for c in counts if c[1] < c[0]][:5]
    assert sum(e for _, e in counts) / sum(r for r, _ in counts) < 2.5  # conservative, not absurd
