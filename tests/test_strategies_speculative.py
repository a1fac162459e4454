"""Speculative decoding and speculative cascades: the transformers token loop and the strategies (§6, §7)."""

from __future__ import annotations

import pytest
import torch

from budgetlm.backends.hf_speculative import LayerSkipDrafter, ModelDrafter, NGramDrafter, SpeculativeDecoder
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import ConfigError
from budgetlm.strategies import get

VOCAB = 8


def _tiny(seed: int, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=7, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper distributions than the default init, so the test has power
        model.lm_head.weight.mul_(40.0)
    return model


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 1e-9
    assert counts[~keep].sum() == 0
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return float(torch.special.gammaincc(torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.slow
def test_lossless_on_a_tiny_pair_follows_the_target_distribution() -> None:
    target, draft = _tiny(0, layers=2), _tiny(1)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p0 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].float(), -1)
        # marginal of the 2nd token: Σ_x p(x) p(· | x)
        nxt = torch.stack([torch.softmax(target(torch.tensor([prompt + [x]])).logits[0, -1].float(), -1)
                           for x in range(VOCAB)])
        p1 = (p0[:, None] * nxt).sum(0)
        q0 = torch.softmax(draft(torch.tensor([prompt])).logits[0, -1].float(), -1)
    assert float(torch.minimum(p0, q0).sum()) < 0.9  # the drafter really differs from the target
    dec = SpeculativeDecoder(target, ModelDrafter(draft), gamma=3)
    first, second = torch.zeros(VOCAB, dtype=torch.float64), torch.zeros(VOCAB, dtype=torch.float64)
    n, accepted, drafted = 10_000, 0, 0
    for s in range(n):
        out, st = dec.generate(prompt, 2, temperature=1.0, seed=s)
        first[out[0]] += 1
        second[out[1]] += 1
        accepted, drafted = accepted + st.accepted, drafted + st.drafted
    assert _chi2_p(first, p0) > 1e-3 and _chi2_p(second, p1) > 1e-3
    assert _chi2_p(first, q0) < 1e-6  # the drafter's distribution is told apart: the test can fail
    assert 0 < accepted < drafted


@pytest.mark.parametrize("drafter", ["layerskip", "ngram"])
@pytest.mark.slow
def test_greedy_speculative_is_token_identical_to_target_greedy(hf_backend, drafter: str) -> None:
    qs = ["List the numbers from 1 to 15 separated by commas.", "What is 3 + 4? Answer briefly."]
    ref = get("sample", temperature=0.0, max_tokens=40).solve(qs, backend=hf_backend, budget={"output_tokens": 40})
    res = get("speculative", drafter=drafter, layers=20, gamma=4, max_tokens=40).solve(
        qs, backend=hf_backend, budget={"output_tokens": 40})
    for r, f in zip(res, ref, strict=True):
        assert r.text == f.text and r.usage.output_tokens == f.usage.output_tokens <= 40
        spec = r.trace[0]["speculative"]
        assert spec["rounds"] >= 1 and 0 <= spec["accepted"] <= spec["drafted"]
        assert r.usage.flops >= f.usage.flops  # the drafting and rejected verification work is charged
    assert any(r.trace[0]["speculative"]["accepted"] > 0 for r in res)


@pytest.mark.slow
def test_speculative_cascade_extremes_reproduce_drafter_and_target(hf_backend) -> None:
    qs = ["Name three colours."]
    target = get("sample", temperature=0.0, max_tokens=24).solve(qs, backend=hf_backend)[0]
    lossless = get("speculative_cascade", rule="chow", alpha=0.0, layers=20, max_tokens=24).solve(qs, backend=hf_backend)[0]
    assert lossless.text == target.text  # chow with α = 0 always defers: π = p
    # chow with α = 1 never defers: π = q, so the output is the drafter's own greedy decoding
    drafter_only = get("speculative_cascade", rule="chow", alpha=1.0, layers=20, max_tokens=24).solve(qs, backend=hf_backend)[0]
    dec_model = LayerSkipDrafter(hf_backend.model, 20).model
    prompt = hf_backend.render(__import__("budgetlm").backends.base.GenerationRequest(messages=[{"role": "user", "content": qs[0]}]))[1]
    with torch.no_grad():
        ids = dec_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    eos = set(hf_backend.eos_token_ids)
    assert drafter_only.text == hf_backend.decode([t for t in ids if t not in eos][: drafter_only.usage.output_tokens])
    assert drafter_only.trace[0]["speculative"]["deferred"] == 0


def test_ngram_drafter_proposes_the_continuation_of_the_last_match() -> None:
    d = NGramDrafter(n=2, vocab_size=10)
    draft, q, q_raw = d.propose([1, 2, 3, 4, 1, 2], 3, None, None)  # "1 2" was followed by "3 4 1"
    assert draft == [3, 4, 1] and q is not None and torch.equal(q.argmax(-1), torch.tensor([3, 4, 1]))
    assert d.propose([5, 6, 7], 3, None, None) == ([], None, None)  # no earlier occurrence: nothing drafted


@pytest.mark.parametrize(("kw", "match"), [
    ({"gamma": 0}, "`gamma`"),            # no draft tokens per round
    ({"max_tokens": 0}, "`max_tokens`"),
    ({"temperature": -1.0}, "temperature"),
])
def test_bad_parameters(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get("speculative", **kw)


@pytest.mark.parametrize(("kw", "match"), [
    ({"rule": "nope"}, "`rule` must be"),
    ({"alpha": 2.0}, "`alpha`"),
])
def test_bad_cascade_parameters(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get("speculative_cascade", **kw)


def test_backend_without_a_speculative_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a backend with a speculative token loop"):
        get("speculative").solve(["q"], backend=ScriptedBackend())


@pytest.mark.slow
def test_flops_budget_is_refused_and_token_budget_clamps(hf_backend) -> None:
    with pytest.raises(ConfigError, match="cannot promise a `flops` budget"):
        get("speculative", drafter="ngram").solve(["q"], backend=hf_backend, budget={"flops": 1e15})
    [r] = get("speculative", drafter="ngram", max_tokens=64).solve(
        ["Count from 1 to 30."], backend=hf_backend, budget={"output_tokens": 9})
    assert r.usage.output_tokens <= 9 and r.ledger["units"]["output_tokens"]["spent"] <= 9


@pytest.mark.slow
def test_layerskip_bounds_and_foreign_tokenizer_are_refused(hf_backend, tmp_path) -> None:
    from transformers import AutoTokenizer

    with pytest.raises(ConfigError, match="`layers` must be in"):
        LayerSkipDrafter(hf_backend.model, 0)
    tok = AutoTokenizer.from_pretrained(hf_backend.path if hasattr(hf_backend, "path") else str(hf_backend.model.name_or_path))
    tok.add_tokens(["<budgetlm-extra>"])
    tok.save_pretrained(tmp_path)
    hf_backend.model.config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="must share the target's tokenizer"):
        with hf_backend.speculative(str(tmp_path)):
            pass


@pytest.mark.slow
@pytest.mark.parametrize(("alpha", "follows"), [
    (0.0, "target"),   # chow, α = 0: δ ≡ 1, π = p: lossless decoding
    (1.0, "drafter"),  # chow, α = 1: δ ≡ 0, π = q: the drafter's own distribution
])
def test_speculative_cascade_extremes_on_a_tiny_pair(alpha: float, follows: str) -> None:
    target, draft = _tiny(0, layers=2), _tiny(1)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p0 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].float(), -1)
        q0 = torch.softmax(draft(torch.tensor([prompt])).logits[0, -1].float(), -1)
    dec = SpeculativeDecoder(target, ModelDrafter(draft), gamma=3, rule="chow", alpha=alpha)
    first = torch.zeros(VOCAB, dtype=torch.float64)
    for s in range(10_000):
        out, _ = dec.generate(prompt, 2, temperature=1.0, seed=s)
        first[out[0]] += 1
    want, other = (p0, q0) if follows == "target" else (q0, p0)
    assert _chi2_p(first, want) > 1e-3 and _chi2_p(first, other) < 1e-6


def test_adaptive_gamma_shrinks_after_rejections_and_never_exceeds_max_tokens() -> None:
    target, draft = _tiny(0, layers=2), _tiny(1)
    dec = SpeculativeDecoder(target, ModelDrafter(draft), gamma=4, adaptive=True)
    out, st = dec.generate([1, 2, 3], 12, temperature=1.0, seed=0)
    assert len(out) <= 12 and st.rounds == len(st.gammas)
    assert max(st.gammas) <= 4 and min(st.gammas) < 4  # the unlike drafter gets rejected: γ shrinks
    fixed = SpeculativeDecoder(target, ModelDrafter(draft), gamma=4)
    _, st2 = fixed.generate([1, 2, 3], 12, temperature=1.0, seed=0)
    # fixed γ: every round drafts 4 unless fewer tokens are left (then remaining - 1, never more)
    assert st2.gammas[0] == 4 and max(st2.gammas) == 4 and sum(g < 4 for g in st2.gammas) <= 4
    with pytest.raises(ConfigError, match="`gamma`"):
        SpeculativeDecoder(target, ModelDrafter(draft), gamma=0)


@pytest.mark.slow
def test_speculative_runs_through_budgetlm_eval(tmp_path) -> None:
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.records import read_records
    from budgetlm.evals.runner import run_eval

    suite = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=2&seed=1"
    cfg = EvalConfig(name="spec", suites=[suite], models=["hf:default"], budgets=[{"output_tokens": 24}],
                     strategies=[{"name": "speculative", "params": {"drafter": "ngram", "max_tokens": 24}},
                                 {"name": "speculative_cascade", "params": {"layers": 20, "max_tokens": 24}}])
    out = run_eval(cfg, tmp_path / "run", progress=False, report=False)
    recs = read_records(tmp_path / "run" / "records.jsonl")
    assert out.written == 4 and not out.errors and all(r.output_tokens <= 24 and not r.over_budget for r in recs)
    assert all(r.flops > 0 and r.model_calls == 1 for r in recs)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["chow", "diff", "opt", "v1", "v2", "v3"])
def test_speculative_cascade_output_follows_pi_on_a_tiny_pair(rule: str) -> None:
    from budgetlm.specdec import cascade_target

    target, draft = _tiny(0, layers=2), _tiny(1)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p0 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].float(), -1)
        q0 = torch.softmax(draft(torch.tensor([prompt])).logits[0, -1].float(), -1)
    alpha = 0.3
    pi0, _ = cascade_target(q0[None], p0[None], q0[None], p0[None], rule, alpha)  # temperature 1: raw = tempered
    dec = SpeculativeDecoder(target, ModelDrafter(draft), gamma=2, rule=rule, alpha=alpha)
    first = torch.zeros(VOCAB, dtype=torch.float64)
    for s in range(2000):  # 2 tokens: the first round drafts one token and verifies it against π
        out, _ = dec.generate(prompt, 2, temperature=1.0, seed=s)
        first[out[0]] += 1
    assert _chi2_p(first, pi0[0]) > 1e-3


def test_accepted_counts_only_drafts_that_were_emitted() -> None:
    """Drafts verified past an end-of-sequence token are dropped from the output and not counted as accepted."""
    target = _tiny(0, layers=2)
    prompt = [1, 2, 3]
    free, _ = SpeculativeDecoder(target, ModelDrafter(_tiny(0, layers=2)), gamma=4).generate(
        prompt, 6, temperature=0.0)
    eos = {free[1]}  # the target's 2nd greedy token ends generation
    dec = SpeculativeDecoder(target, ModelDrafter(_tiny(0, layers=2)), gamma=4)  # drafter == target: all accepted
    out, st = dec.generate(prompt, 6, temperature=0.0, eos=eos)
    assert out == free[:2] and st.rounds == 1 and st.drafted == 4
    assert (st.accepted, st.emitted) == (2, 2)  # was 4 accepted (+1 round = 5 "tokens") for 2 emitted
    assert st.tokens_per_round == len(out) / st.rounds == 2.0
    assert st.to_dict()["emitted"] == len(out)
