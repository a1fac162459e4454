"""Cost models: FLOPs (plain and Kinetics), prices, energy."""

from __future__ import annotations

import pytest

from budgetlm import ConfigError, CostModel, EnergyMeter, ModelInfo, Price, PriceTable
from budgetlm.costs import plain_flops

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
