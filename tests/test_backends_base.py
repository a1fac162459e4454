"""Shared backend mechanics on the scripted backend: rendering, clamping, charging, errors, specs."""

from __future__ import annotations

import pytest

from budgetlm import Budget, BudgetExceeded, ConfigError, Meter, ThinkingFormat
from budgetlm.backends import GenerationRequest, SamplingParams, load
from budgetlm.backends.scripted import ScriptedBackend


def test_one_engine_call_per_batch_with_per_request_meters() -> None:
    b = ScriptedBackend(["one two three four five"])
    m1, m2 = Meter(Budget(output_tokens=3)), Meter(Budget(output_tokens=100))
    reqs = [
        GenerationRequest(messages=[{"role": "user", "content": "q1"}], sampling=SamplingParams(max_tokens=10), meter=m1),
        GenerationRequest(messages=[{"role": "user", "content": "q2"}], sampling=SamplingParams(max_tokens=10), meter=m2),
    ]
    r1, r2 = b.generate(reqs)
    assert b.calls == 1 and b.batches == [2]
    assert len(r1.first.token_ids) == 3 and r1.first.finish_reason == "length" and r1.clamped_by == "output_tokens"
    assert len(r2.first.token_ids) == 5 and r2.first.finish_reason == "stop" and r2.clamped_by is None
    assert m1.spent("output_tokens") == 3 and m2.spent("output_tokens") == 5
    assert r1.usage.output_tokens == len(r1.first.token_ids)


def test_usage_counts_prompt_once_and_all_samples() -> None:
    b = ScriptedBackend(["a b", "c d e"])
    meter = Meter()
    [r] = b.generate(["hello"], meter, sampling=SamplingParams(n=2, max_tokens=10))
    assert [len(c.token_ids) for c in r.completions] == [2, 3]
    assert r.usage.output_tokens == 5
    assert r.usage.prompt_tokens == len(r.prompt_token_ids) > 0
    assert meter.total().output_tokens == 5 and meter.total().calls == 1


def test_skip_runs_the_rest_and_raise_runs_nothing() -> None:
    b = ScriptedBackend(["x y"])
    empty = Meter(Budget(output_tokens=0))
    ok = Meter()
    reqs = [GenerationRequest(prompt="p", meter=empty), GenerationRequest(prompt="q", meter=ok)]
    with pytest.raises(BudgetExceeded):
        b.generate(reqs)
    assert b.calls == 0 and ok.reserved("output_tokens") == 0  # reservation of the other request released
    skipped, ran = b.generate(reqs, on_budget_exhausted="skip")
    assert skipped.completions == [] and "output_tokens" in (skipped.skipped or "")
    assert ran.first.text == "x y"


def test_engine_failure_releases_reservations() -> None:
    def boom(prompt: str, i: int, sp: SamplingParams) -> str:
        raise RuntimeError("engine died")

    b = ScriptedBackend(boom)
    meter = Meter(Budget(output_tokens=50))
    with pytest.raises(RuntimeError):
        b.generate(["q"], meter)
    assert meter.remaining("output_tokens") == 50 and meter.spent("output_tokens") == 0


def test_stop_strings_and_thinking() -> None:
    b = ScriptedBackend(["<think>let me see</think> Answer: 4 END more"], thinking=ThinkingFormat())
    [r] = b.generate(["q"], sampling=SamplingParams(stop=["END"]))
    c = r.first
    assert c.text.endswith("Answer: 4 ") and c.thinking == "let me see" and c.answer == "Answer: 4"
    assert c.thinking_tokens == 3 and r.usage.thinking_tokens == 3
    [r] = b.generate(["q"], sampling=SamplingParams(max_tokens=2))
    assert r.first.thinking_truncated and r.first.answer == "" and r.first.truncated


def test_thinking_budget_clamps_only_calls_that_may_think() -> None:
    b = ScriptedBackend(["w " * 20], thinking=ThinkingFormat())
    meter = Meter(Budget(thinking_tokens=4))
    [r] = b.generate([GenerationRequest(prompt="p", sampling=SamplingParams(max_tokens=10))], meter)
    assert r.max_tokens == 4
    [r] = b.generate([GenerationRequest(prompt="p", sampling=SamplingParams(max_tokens=10), may_think=False)], meter)
    assert r.max_tokens == 10


def test_score_is_charged_as_prompt_tokens() -> None:
    b = ScriptedBackend(["a b c"])
    meter = Meter()
    [r] = b.generate(["q"], sampling=SamplingParams(logprobs=0))
    s = b.score(r.prompt_token_ids, r.first.token_ids, meter)
    assert s.logprobs == pytest.approx(r.first.logprobs)
    assert meter.spent("input_tokens") == len(r.prompt_token_ids) + len(r.first.token_ids)
    assert meter.spent("output_tokens") == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ""}, "non-empty"),  # empty prompt
        ({"messages": []}, "non-empty"),  # empty message list
        ({"messages": [{"content": "hi"}]}, "role"),  # malformed message
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one"),  # two prompts
        ({}, "exactly one"),  # no prompt
        ({"prompt_token_ids": []}, "non-empty"),  # empty ids
    ],
)
def test_bad_requests(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GenerationRequest(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "`n` must be >= 1"),  # no samples
        ({"temperature": -0.1}, "temperature"),  # negative temperature
        ({"top_p": 0}, "top_p"),  # empty nucleus
        ({"max_tokens": 0}, "max_tokens"),  # nothing to generate
        ({"logprobs": -1}, "logprobs"),  # negative top-k
        ({"bogus": 1}, "bogus"),  # unknown field
    ],
)
def test_bad_sampling(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kwargs)


def test_empty_string_prompt() -> None:
    with pytest.raises(ConfigError, match="non-empty"):
        ScriptedBackend().generate(["   "])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "backend spec"),  # empty
        ("llama:foo", "unknown backend kind"),  # unknown kind
        ("vllm", "must look like"),  # no target
        ("hf:/no/such/model/dir", "does not exist"),  # missing model path
        ("openai:http://127.0.0.1:1/v1", "openai:URL#MODEL"),  # no model name
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(spec)


def test_spec_options_are_parsed() -> None:
    b = load("scripted?name=foo&n_params=5")
    assert b.name == "foo" and b.info.n_params == 5


def test_agenerate() -> None:
    import asyncio

    b = ScriptedBackend(["ok"])
    meter = Meter()
    [r] = asyncio.run(b.agenerate(["q"], meter))
    assert r.first.text == "ok" and meter.spent("output_tokens") == 1


def test_requests_sharing_a_meter_get_equal_shares() -> None:
    """Without fair shares the first request of a batch could take a shared budget whole."""
    b = ScriptedBackend(["w " * 300])
    meter = Meter(Budget(output_tokens=600))
    results = b.generate(["q1", "q2"], meter, sampling=SamplingParams(n=4, max_tokens=256))
    assert [r.max_tokens for r in results] == [75, 75]
    assert all(r.clamped_by == "output_tokens" for r in results)
    assert meter.spent("output_tokens") == 600


def test_single_request_meters_are_not_shared() -> None:
    b = ScriptedBackend(["w " * 300])
    m1, m2 = Meter(Budget(output_tokens=100)), Meter(Budget(output_tokens=100))
    reqs = [GenerationRequest(prompt="a", sampling=SamplingParams(max_tokens=500), meter=m) for m in (m1, m2)]
    assert [r.max_tokens for r in b.generate(reqs)] == [100, 100]


@pytest.mark.parametrize(("spec", "kind", "target", "options"), [
    ("vllm:default?max_model_len=2048", "vllm", "default", {"max_model_len": 2048}),
    ("hf:/models/x", "hf", "/models/x", {}),
    ("openai:http://a:1/v1,http://b:2/v1#m?concurrency=4", "openai", "http://a:1/v1,http://b:2/v1#m", {"concurrency": 4}),
    ("scripted", "scripted", "", {}),
])
def test_backend_spec_is_parsed_once(spec: str, kind: str, target: str, options: dict) -> None:
    from budgetlm.backends import BackendSpec

    parsed = BackendSpec.parse(spec)
    assert (parsed.kind, parsed.target, parsed.options) == (kind, target, options)
    assert parsed.seeded == (kind == "vllm")


@pytest.mark.parametrize(("spec", "match"), [("", "must be a backend spec"), ("nope:x", "unknown backend kind"),
                                             ("vllm", "must look like one of")])
def test_bad_backend_spec(spec: str, match: str) -> None:
    from budgetlm.backends import BackendSpec

    with pytest.raises(ConfigError, match=match):
        BackendSpec.parse(spec)
