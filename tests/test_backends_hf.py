"""HFBackend: mechanics on a tiny random Llama, behaviour on the real default model (slow)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from budgetlm import Budget, BudgetExceeded, ConfigError, Meter, ThinkingFormat
from budgetlm.backends import GenerationRequest, GenerationResult, SamplingParams, TokenLevelBackend
from budgetlm.backends.base import PreparedRequest
from budgetlm.backends.hf import HFBackend

MSGS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run this module's models on one intra-op thread.

    On a small shared CPU (2 cores, other jobs running) two OpenMP threads wait on each other at every
    matmul: the same generation was measured 30x slower with 2 threads than with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path) -> HFBackend:
    """The 2-layer random Llama: its text is gibberish, but it never hits EOS in a few tokens."""
    return HFBackend(model=str(tiny_model_path))


def _req(prompt: str = "Hello there", id: str | None = None, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(**sampling), id=id)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The tokenizer's own tokenised chat prompt (transformers 5 returns a BatchEncoding for tokenize=True)."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(enc, list):
        enc = enc["input_ids"]
    return list(enc)


def _assert_logprobs_match(backend: HFBackend, result: GenerationResult, tol: float = 1e-3) -> None:
    """score() of each generated continuation reproduces the generation logprobs."""
    for c in result.completions:
        assert c.logprobs is not None and c.token_ids
        s = backend.score(result.prompt_token_ids, c.token_ids)
        assert s.token_ids == c.token_ids
        assert max(abs(a - b) for a, b in zip(s.logprobs, c.logprobs)) < tol


# ---------------------------------------------------------------------------------------------- tiny model
def test_mixed_batch_one_call_and_accounting(tiny: HFBackend) -> None:
    reqs = [
        _req(temperature=0, max_tokens=4, id="greedy"),  # greedy
        _req("Once upon a time", temperature=1.0, max_tokens=6, n=3, id="sampled"),  # n samples in one generate
        GenerationRequest(messages=MSGS, sampling=SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=5)),
        GenerationRequest(prompt_token_ids=[1, 504, 3575], sampling=SamplingParams(temperature=0, max_tokens=3)),
        _req(temperature=0, max_tokens=4, n=2, id="greedy-n2"),  # same group as the first; n copies
    ]
    results = tiny.generate(reqs)
    assert [r.request for r in results] == reqs
    for req, r in zip(reqs, results):
        sp = req.sampling
        assert len(r.completions) == sp.n
        assert r.usage.output_tokens == sum(len(c.token_ids) for c in r.completions)
        assert r.usage.prompt_tokens == len(r.prompt_token_ids) > 0
        for c in r.completions:
            # a random model over 49k tokens essentially never emits EOS in a few steps
            assert len(c.token_ids) == sp.max_tokens and c.finish_reason == "length"
            assert c.text == tiny.decode(c.token_ids) and c.answer == c.text
            assert c.logprobs is None and c.top_logprobs is None
    g1, gn = results[0], results[4]
    assert gn.completions[0].token_ids == gn.completions[1].token_ids == g1.first.token_ids
    assert results[3].prompt_token_ids == [1, 504, 3575]


@pytest.mark.parametrize(
    ("sampling", "logprobs"),
    [
        (dict(temperature=0, max_tokens=5), 0),  # greedy, sampled-token logprobs only
        (dict(temperature=0, max_tokens=5), 3),  # greedy with top-3 alternatives
        (dict(temperature=1.0, max_tokens=6, n=2), 0),  # plain sampling, two samples
        (dict(temperature=0.8, top_k=50, top_p=0.95, max_tokens=4), 2),  # warped sampling: logprobs stay raw
    ],
)
def test_logprobs_and_score_agree(tiny: HFBackend, sampling: dict[str, Any], logprobs: int) -> None:
    [r] = tiny.generate([_req(logprobs=logprobs, **sampling)])
    for c in r.completions:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == sampling["max_tokens"]
        assert all(lp <= 0 for lp in c.logprobs)
        if logprobs == 0:
            assert c.top_logprobs is None
        else:
            assert c.top_logprobs is not None and len(c.top_logprobs) == len(c.token_ids)
            assert all(len(d) == logprobs for d in c.top_logprobs)
            for tok, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
                assert max(top.values()) >= lp - 1e-6
                if tok in top:
                    assert abs(top[tok] - lp) < 1e-5
            if sampling["temperature"] == 0:  # the greedy token is the most likely one
                assert all(max(top, key=top.__getitem__) == tok for tok, top in zip(c.token_ids, c.top_logprobs))
    _assert_logprobs_match(tiny, r)


def test_seeds_reproduce_and_leave_global_rng_alone(tiny: HFBackend) -> None:
    def sample(seed: int | None) -> list[list[int]]:
        [r] = tiny.generate([_req(temperature=1.0, max_tokens=8, n=2, seed=seed)])
        return [c.token_ids for c in r.completions]

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c  # 16 tokens from a ~uniform 49k vocabulary: a collision is practically impossible
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sample(7)  # a seeded call forks the RNG: the global stream continues as if it never ran
    assert torch.equal(torch.rand(3), expected)


def test_greedy_is_deterministic_and_ignores_seed(tiny: HFBackend) -> None:
    r1, r2 = tiny.generate([_req(temperature=0, max_tokens=6, seed=1), _req(temperature=0, max_tokens=6, seed=2)])
    assert r1.first.token_ids == r2.first.token_ids


def test_stop_string_cuts_text_and_keeps_completing_token(tiny: HFBackend) -> None:
    [free] = tiny.generate([_req(temperature=0, max_tokens=12)])
    text = free.first.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    [cut] = tiny.generate([_req(temperature=0, max_tokens=12, stop=[stop])])
    c = cut.first
    assert c.finish_reason == "stop"
    assert c.text == text[: text.find(stop)]
    assert stop in tiny.decode(c.token_ids)  # the token that completed the stop string is kept ...
    assert stop not in tiny.decode(c.token_ids[:-1])  # ... and nothing after it
    assert c.token_ids == free.first.token_ids[: len(c.token_ids)]
    assert cut.usage.output_tokens == len(c.token_ids)


def test_eos_ends_sample_and_is_counted(tiny: HFBackend) -> None:
    eos = tiny.eos_token_ids[0]
    ids, text, finish, _ = tiny._finish_row([504, 3575, eos, eos, eos], [])
    # the EOS token was generated (and paid for) as in vLLM; the padding after it was not
    assert (ids, finish) == ([504, 3575, eos], "stop") and text == tiny.decode([504, 3575])
    assert tiny._finish_row([504, 3575], [])[2] == "length"


def test_next_token_logprobs(tiny: HFBackend) -> None:
    seqs = [[1, 504, 3575, 282], [28120], [1, 504]]
    assert isinstance(tiny, TokenLevelBackend)
    lp = tiny.next_token_logprobs(seqs)
    assert lp.shape == (3, tiny.info.vocab_size) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3), atol=1e-4, rtol=0)
    # left padding does not change a sequence's distribution, and it agrees with score()
    torch.testing.assert_close(tiny.next_token_logprobs([seqs[1]])[0], lp[1], atol=1e-4, rtol=0)
    s = tiny.score(seqs[0], [4649])
    assert abs(s.logprobs[0] - lp[0, 4649].item()) < 1e-4
    with pytest.raises(ConfigError, match="token_ids"):
        tiny.next_token_logprobs([[1], []])


def test_score_batch_with_uneven_lengths(tiny: HFBackend) -> None:
    pairs: list[tuple[Any, Any]] = [([1, 504], [3575, 282, 4649]), ("Hello", " world"), (MSGS, [504])]
    batched = tiny.score_batch(pairs)
    for (p, c), b in zip(pairs, batched):
        alone = tiny.score(p, c)
        assert len(b.logprobs) == len(b.token_ids) and b.usage.output_tokens == 0
        assert max(abs(x - y) for x, y in zip(alone.logprobs, b.logprobs)) < 1e-4


def test_meter_clamps_max_tokens(tiny: HFBackend) -> None:
    meter = Meter(Budget(output_tokens=5))
    [r] = tiny.generate([_req(temperature=1.0, max_tokens=50, n=1)], meter)
    assert len(r.first.token_ids) <= 5 and r.max_tokens == 5 and r.clamped_by == "output_tokens"
    assert meter.spent("output_tokens") == len(r.first.token_ids) == r.usage.output_tokens
    with pytest.raises(BudgetExceeded):
        tiny.generate([_req(max_tokens=3)], meter)  # the 5 tokens are spent
    with pytest.raises(BudgetExceeded):
        tiny.generate([_req(max_tokens=3)], Meter(Budget(output_tokens=0)))


def test_chunks_respect_max_batch_size(tiny: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = tiny.model.generate

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(kw["input_ids"].shape[0] * kw["generation_config"].num_return_sequences)
        return real(*args, **kw)

    monkeypatch.setattr(tiny, "max_batch_size", 4)
    monkeypatch.setattr(tiny.model, "generate", spy)
    reqs = [_req(f"prompt {i}", temperature=1.0, max_tokens=2, n=2) for i in range(5)]
    reqs.append(_req(temperature=0, max_tokens=3))  # a second group
    reqs.append(_req(temperature=1.0, max_tokens=3, n=6, logprobs=1))  # more samples than rows: split 4 + 2
    results = tiny.generate(reqs)
    assert all(len(r.completions) == r.request.sampling.n for r in results)
    assert sorted(calls) == [1, 2, 2, 4, 4, 4]  # 5 prompts x 2 rows in chunks of 4 rows; 1 greedy row; 4 + 2
    many = results[-1]
    assert len({tuple(c.token_ids) for c in many.completions}) == 6
    assert all(c.logprobs is not None and len(c.logprobs) == 3 for c in many.completions)


def test_deadline_stops_generation(tiny: HFBackend) -> None:
    sp = SamplingParams(temperature=1.0, max_tokens=10, n=2)
    req = _req()
    ids = tiny.render(req)[1]
    late = PreparedRequest(req, None, ids, sp, deadline=time.monotonic() - 1)
    free = PreparedRequest(req, None, ids, sp, deadline=None)
    [r_late, r_free] = tiny._generate([late, free])  # one group, rows with and without a deadline
    assert [len(c.token_ids) for c in r_late.completions] == [1, 1]  # at least one token is generated
    assert all(c.finish_reason == "deadline" for c in r_late.completions)
    assert [len(c.token_ids) for c in r_free.completions] == [10, 10]
    assert all(c.finish_reason == "length" for c in r_free.completions)
    meter = Meter(Budget(wall_seconds=0.1))  # the meter's wall-seconds budget becomes the deadline
    [r] = tiny.generate([_req(temperature=1.0, max_tokens=1500)], meter)
    assert 1 <= len(r.first.token_ids) < 1500 and r.first.finish_reason == "deadline"
    assert meter.spent("output_tokens") == len(r.first.token_ids)


def test_abort_event_stops_rows_at_next_token(tiny: HFBackend) -> None:
    sp = SamplingParams(temperature=1.0, max_tokens=10, n=2)
    req = _req()
    ids = tiny.render(req)[1]
    gone, kept = threading.Event(), threading.Event()
    gone.set()
    [r_gone, r_kept] = tiny._generate([PreparedRequest(req, None, ids, sp, abort=gone),
                                       PreparedRequest(req, None, ids, sp, abort=kept)])
    assert [(len(c.token_ids), c.finish_reason) for c in r_gone.completions] == [(1, "abort")] * 2
    assert [(len(c.token_ids), c.finish_reason) for c in r_kept.completions] == [(10, "length")] * 2
    # alone in its call, a request given up before it started is not run at all
    [r_none] = tiny._generate([PreparedRequest(req, None, ids, sp, abort=gone)])
    assert [(c.token_ids, c.finish_reason) for c in r_none.completions] == [([], "abort")] * 2


def test_deadline_uses_backend_clock(tiny: HFBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]

    def clock() -> float:  # every reading moves 1 s on: the deadline 3.5 s ahead passes at the 4th token
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(tiny, "clock", clock)
    req = _req()
    p = PreparedRequest(req, None, tiny.render(req)[1], SamplingParams(temperature=0, max_tokens=50),
                        deadline=103.5)
    [r] = tiny._generate([p])
    assert (len(r.completions[0].token_ids), r.completions[0].finish_reason) == (4, "deadline")


def test_info_and_prompt_rendering(tiny: HFBackend) -> None:
    info = tiny.info
    assert info.n_params == sum(p.numel() for p in tiny.model.parameters())
    assert info.bytes_per_param == 4.0 and info.n_layers == 2 and info.vocab_size == 49152
    assert tiny.encode("hello world") == tiny.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tiny.decode(tiny.encode("hello world")) == "hello world"
    text, ids = tiny.render(GenerationRequest(messages=MSGS))
    assert text == tiny.tokenizer.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert ids == _chat_ids(tiny.tokenizer, MSGS)  # special tokens of the template are not duplicated


def test_bf16_info(tiny_model_path: Path) -> None:
    b = HFBackend(model=str(tiny_model_path), dtype="bfloat16", name="tiny-bf16")
    assert b.info.bytes_per_param == 2.0 and b.model.dtype == torch.bfloat16 and b.name == "tiny-bf16"
    [r] = b.generate([_req(temperature=0, max_tokens=2, logprobs=0)])
    assert len(r.first.logprobs or []) == 2
    b.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(model="/nonexistent/checkpoint"), "does not exist"),  # missing model path
        (dict(dtype="int3"), "`dtype` must be"),  # unknown dtype
        (dict(max_batch_size=0), "`max_batch_size` must be"),  # no room for a row
        (dict(device="not-a-device"), "`device` must be"),  # unparsable device
    ],
)
def test_config_errors(tiny_model_path: Path, kwargs: dict[str, Any], match: str) -> None:
    kw = {"model": str(tiny_model_path), **kwargs}
    with pytest.raises(ConfigError, match=match):
        HFBackend(**kw)


def test_not_a_checkpoint_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        HFBackend(model=str(tmp_path))


def test_request_errors(tiny: HFBackend) -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        tiny.generate([""])  # empty prompt
    too_long = GenerationRequest(prompt_token_ids=[504] * tiny.max_context)
    with pytest.raises(ConfigError, match="context"):
        tiny.generate([too_long])


# ---------------------------------------------------------------------------------------------- default model
@pytest.fixture(scope="module")
def greedy(hf_backend: HFBackend) -> GenerationResult:
    """One greedy answer of the real model with logprobs, shared by several tests."""
    [r] = hf_backend.generate([GenerationRequest(messages=MSGS, sampling=SamplingParams(
        temperature=0, max_tokens=16, logprobs=2))])
    return r


@pytest.mark.slow
def test_default_greedy_answer(hf_backend: HFBackend, greedy: GenerationResult) -> None:
    c = greedy.first
    assert c.text.strip() and c.answer == c.text
    assert len(c.token_ids) == greedy.usage.output_tokens <= 16
    if c.finish_reason == "stop":  # ended by <|im_end|>: counted as the last token, as vLLM does
        assert c.token_ids[-1] in hf_backend.eos_token_ids and c.token_ids.count(c.token_ids[-1]) == 1
    assert greedy.usage.prompt_tokens == len(_chat_ids(hf_backend.tokenizer, MSGS)) == len(greedy.prompt_token_ids)
    assert greedy.usage.flops > 0 and greedy.usage.latency_s > 0


@pytest.mark.slow
def test_default_chat_template_matches_tokenizer(hf_backend: HFBackend) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, *MSGS, {"role": "assistant", "content": "Paris."}]
    for gen_prompt in (True, False):
        ours = hf_backend.apply_chat_template(msgs, add_generation_prompt=gen_prompt)
        assert ours == hf_backend.tokenizer.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)


@pytest.mark.slow
def test_default_score_agrees_with_generation(hf_backend: HFBackend, greedy: GenerationResult) -> None:
    _assert_logprobs_match(hf_backend, greedy)
    c = greedy.first
    assert c.top_logprobs is not None
    assert all(max(top, key=top.__getitem__) == tok for tok, top in zip(c.token_ids, c.top_logprobs))


@pytest.mark.slow
def test_default_seed_reproducible(hf_backend: HFBackend) -> None:
    def sample() -> list[list[int]]:
        req = GenerationRequest(messages=MSGS, sampling=SamplingParams(temperature=1.0, max_tokens=8, n=2, seed=123))
        return [c.token_ids for c in hf_backend.generate([req])[0].completions]

    assert sample() == sample()


@pytest.mark.slow
def test_default_stop_string(hf_backend: HFBackend, greedy: GenerationResult) -> None:
    words = greedy.first.text.split()
    assert len(words) >= 3, greedy.first.text
    stop = " " + words[2]
    [r] = hf_backend.generate([GenerationRequest(messages=MSGS, sampling=SamplingParams(
        temperature=0, max_tokens=16, stop=[stop]))])
    c = r.first
    assert c.finish_reason == "stop" and c.text == greedy.first.text[: greedy.first.text.find(stop)]
    assert c.token_ids == greedy.first.token_ids[: len(c.token_ids)] and stop in hf_backend.decode(c.token_ids)


@pytest.mark.slow
def test_default_thinking_split(
    hf_backend: HFBackend, greedy: GenerationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the assistant prefix opens thinking, so the output starts inside it (detected from the prefix)
    monkeypatch.setattr(hf_backend, "thinking", ThinkingFormat())
    [r] = hf_backend.generate([GenerationRequest(messages=MSGS, assistant_prefix="<think>", sampling=SamplingParams(
        temperature=0, max_tokens=6))])
    c = r.first
    assert c.finish_reason == "length" and c.thinking_truncated and c.answer == ""
    assert c.thinking and c.thinking_tokens == len(c.token_ids) == r.usage.thinking_tokens == 6
    # closed thinking: take the greedy answer's second word as the end tag
    end = " " + greedy.first.text.split()[1]
    monkeypatch.setattr(hf_backend, "thinking", ThinkingFormat(end=end, starts_in_thinking=True))
    [r] = hf_backend.generate([GenerationRequest(messages=MSGS, sampling=SamplingParams(temperature=0, max_tokens=16))])
    c = r.first
    assert c.text == greedy.first.text and not c.thinking_truncated
    assert c.thinking == greedy.first.text.split()[0] and c.answer
    assert 0 < c.thinking_tokens < len(c.token_ids) and r.usage.thinking_tokens == c.thinking_tokens
    assert end in hf_backend.decode(c.token_ids[: c.thinking_tokens])
    assert end not in hf_backend.decode(c.token_ids[: c.thinking_tokens - 1])
