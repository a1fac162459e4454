"""The ``lm_policy`` router: the step prompt, the small/large parser, scores from a scripted and a real policy."""

from __future__ import annotations

from typing import Any

import pytest

from budgetlm import routing
from budgetlm.backends.base import SamplingParams
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.errors import ConfigError
from budgetlm.evals.suites import get as get_suite
from budgetlm.meter import Meter
from budgetlm.routing import LMPolicyRouter, RouteQuery, parse_choice, route_prompt
from budgetlm.routing.lm_policy import LAST_OUTPUT_CHARS, QUESTION_CHARS
from budgetlm.strategies import get as get_strategy
from budgetlm.strategies.base import Problem

ENDING = "Answer with one word: small or large."


def test_route_prompt_content() -> None:
    msgs = [{"role": "system", "content": "SYSTEM TOOLS"}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "I will search. <tool_call>{...}</tool_call> obs"}]
    out = route_prompt(msgs, {"step": 2, "max_steps": 8, "tool_calls": 1.0, "rho": 0.25})
    assert len(out) == 1 and out[0]["role"] == "user"
    text = out[0]["content"]
    assert "What is 2+2?" in text and "SYSTEM TOOLS" not in text  # the task is the first user message
    assert "Next step: 3 of 8" in text  # step is 0-based in the context
    assert "Tool calls so far: 1" in text and "Budget left: 25%" in text
    assert "I will search." in text  # the agent's latest output
    assert "NEXT step" in text and text.endswith(ENDING)


def test_route_prompt_leaves_out_missing_fields() -> None:
    text = route_prompt([{"role": "user", "content": "Q?"}], {})[0]["content"]
    for absent in ("Next step", "Tool calls", "Budget left", "latest output"):
        assert absent not in text
    assert text.endswith(ENDING)
    assert "Steps allowed: 4" in route_prompt([{"role": "user", "content": "Q?"}], {"max_steps": 4})[0]["content"]
    assert "Next step: 1\n" in route_prompt([{"role": "user", "content": "Q?"}], {"step": 0})[0]["content"]


def test_route_prompt_truncates_long_texts() -> None:
    task = "HEAD " + "x" * 2000 + " QUESTION: how old is Bob?"
    last = "OLD " + "y" * 2000 + " LATEST"
    text = route_prompt([{"role": "user", "content": task}, {"role": "assistant", "content": last}])[0]["content"]
    assert "HEAD" in text and "QUESTION: how old is Bob?" in text  # both ends of the task are kept
    assert "LATEST" in text and "OLD" not in text  # the end of the latest output is kept
    assert len(text) < QUESTION_CHARS + LAST_OUTPUT_CHARS + 600


def test_route_prompt_keeps_the_kb_agent_question() -> None:
    item = get_suite("kb_agent?size=1&seed=1").items()[0]
    assert len(item.messages[0]["content"]) > QUESTION_CHARS  # the tool list comes first
    assert item.question in route_prompt(item.messages, {"step": 0})[0]["content"]


@pytest.mark.parametrize("text, expected", [
    ("small", "small"),  # the plain answer
    ("large", "large"),  # the plain answer
    ("Large.", "large"),  # capitalised, with punctuation
    ("  SMALL\n", "small"),  # upper case and whitespace
    ("The large model.", "large"),  # a word inside a sentence
    ("small or large", "small"),  # the first of both words wins
    ("smaller", None),  # not a whole word
    ("enlarge", None),  # not a whole word
    ("medium", None),  # neither word
    ("", None),  # nothing generated
    (None, None),  # no text at all
])
def test_parse_choice(text: str | None, expected: str | None) -> None:
    assert parse_choice(text) == expected


def policy_backend() -> ScriptedBackend:
    """Answers 'large' for tasks mentioning LARGE, 'Small.' for SMALL, something else otherwise."""
    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        assert sp.temperature == 0.0 and sp.n == 1
        if "LARGE" in prompt:
            return "large"
        return "Small." if "SMALL" in prompt else "I am not sure"
    return ScriptedBackend(script, name="policy")


def q(text: str, **context: Any) -> RouteQuery:
    return RouteQuery(messages=[{"role": "user", "content": text}], id=text, context=dict(context))


def test_lm_policy_scores_in_one_batched_call() -> None:
    be = policy_backend()
    router = LMPolicyRouter(be)
    meters = [Meter({"output_tokens": 5}) for _ in range(3)]
    scores = router.score([q("task LARGE"), q("task SMALL"), q("task other")], backend=None, meters=meters)
    assert scores == [1.0, 0.0, 0.5]
    assert be.calls == 1 and be.batches == [3]  # one batched greedy call
    assert all(m.spent("output_tokens") == 0 for m in meters)  # policy tokens are not charged to the task
    assert router.counts == {"small": 1, "large": 1, "unparseable": 1}
    assert router.score([]) == [] and be.calls == 1


def test_lm_policy_routes_with_the_default_threshold() -> None:
    router = LMPolicyRouter(policy_backend())
    arms, ws = router.choose([q("LARGE"), q("SMALL"), q("other")], [router.default_threshold])
    assert ws == [1.0, 0.0, 0.5] and arms == [1, 0, 1]  # unparseable (0.5) reaches w >= 0.5: large
    arms, _ = router.choose([q("other")], [0.75])
    assert arms == [0]  # a threshold above 0.5 sends unparseable answers to the small model


def test_lm_policy_max_tokens_limits_the_answer() -> None:
    be = ScriptedBackend(["the answer is large"])
    assert LMPolicyRouter(be, max_tokens=2).score([q("x")]) == [0.5]  # cut after "the answer"
    assert LMPolicyRouter(be, max_tokens=4).score([q("x")]) == [1.0]


def test_lm_policy_from_a_spec_loads_lazily_and_closes() -> None:
    router = routing.get({"name": "lm_policy", "params": {"model": "scripted", "max_tokens": 3}})
    assert isinstance(router, LMPolicyRouter) and router.params() == {"model": "scripted", "max_tokens": 3}
    assert router._backend is None  # nothing loaded before the first score
    assert router.score([q("x")]) == [0.5]  # the scripted default says "Answer: 42"
    router.close()
    assert router._backend is None
    assert router.score([q("x")]) == [0.5]  # reloads after close
    given = policy_backend()
    r2 = LMPolicyRouter(given)
    r2.close()
    assert r2.backend is given  # a backend passed in is not dropped


@pytest.mark.parametrize("params, match", [
    ({"model": ""}, r"`model` must be a backend spec"),  # empty spec
    ({"model": 3}, r"`model` must be a backend spec"),  # not a spec
    ({"max_tokens": 0}, r"`max_tokens` must be a positive integer"),  # nothing to answer with
    ({"max_tokens": True}, r"`max_tokens` must be a positive integer"),  # a bool is not a token count
])
def test_lm_policy_bad_params(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LMPolicyRouter(**params)


def test_agent_steps_follow_the_policy() -> None:
    """The agent strategy with an lm_policy router: every routed step goes to the arm the policy names."""
    prompts: list[str] = []

    def policy(prompt: str, i: int, sp: SamplingParams) -> str:
        prompts.append(prompt)
        return "large"

    agent_be = ScriptedBackend(["Let me think about it.", "Answer: 4"])
    strat = get_strategy("agent", router=LMPolicyRouter(ScriptedBackend(policy)), max_steps=3, step_tokens=16,
                         models=[{"label": "small", "n": 1}, {"label": "large", "n": 1}])
    res = strat.solve([Problem(id="p", messages=[{"role": "user", "content": "What is 2+2?"}])], backend=agent_be,
                      budget={"output_tokens": 200})[0]
    model_steps = [s for s in res.details["steps"] if s["kind"] == "model"]
    assert model_steps and model_steps[0]["model"] == "large" and res.details["expensive_calls"] >= 1
    assert prompts and "What is 2+2?" in prompts[0] and "Next step: 1 of 3" in prompts[0]


@pytest.mark.slow
def test_lm_policy_on_the_real_default_model() -> None:
    router = LMPolicyRouter("hf:default")
    try:
        item = get_suite("kb_agent?size=2&seed=1").items()
        qs = [RouteQuery(messages=it.messages, id=it.id, context={"step": k, "max_steps": 4, "tool_calls": k})
              for k, it in enumerate(item)]
        scores = router.score(qs)
        assert len(scores) == 2 and all(w in (0.0, 0.5, 1.0) for w in scores)
        assert sum(router.counts.values()) == 2
    finally:
        router.close()
