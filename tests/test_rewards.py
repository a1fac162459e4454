"""GRPO rewards, common machinery (ALGORITHMS.md §9): TRL's calling convention, text and length helpers,
correctness and format rewards, picklability, the registry, and input errors."""

from __future__ import annotations

import json
import pickle
import warnings
from types import SimpleNamespace
from typing import Any

import pytest

from budgetlm import ConfigError, ThinkingFormat
from budgetlm.errors import UnknownNameError
from budgetlm.rewards import (
    REWARDS,
    BoundaryRoutingReward,
    Correctness,
    CosineLength,
    DAPOOverlong,
    DualEfficiency,
    EffortReward,
    KimiLength,
    LCPOExact,
    LCPOMax,
    LCR1Compress,
    LCR1Length,
    RewardBatch,
    RewardFunction,
    ThinkFormat,
    ThinkPrune,
    completion_text,
    count_tokens,
    get,
    names,
)

# One instance per registered reward, with the parameters it requires.
REQUIRED = {"dapo_overlong": {"max_length": 100, "cache_length": 20}, "think_prune": {"limit": 50},
            "cosine_length": {"max_length": 100}, "dual_efficiency": {"max_steps": 10, "max_step_tokens": 100}}

# A batch every registered reward can score: two prompts, two completions each.
BATCH: dict[str, Any] = {
    "prompts": ["p0", "p0", "p1", "p1"],
    "completions": ["<think>so 4</think> \\boxed{4}", "<think>hmm maybe 5 or 4</think> 5",
                    "<think>7</think> Answer: 7", "<think>it is</think> \\boxed{7.0}"],
    "completion_ids": [[0] * 10, [0] * 30, [0] * 20, [0] * 40],
    "answer": ["4", "4", "7", "7"], "prompt_id": [0, 0, 1, 1], "target_tokens": [20, 20, 30, 30],
    "effort": [1.0, 1.0, 0.5, 0.5], "success": [True, False, 1, 0], "cost": [1.0, 2.0, 3.0, 1.0],
    "cost_small": [1.0, 1.0, 1.0, 1.0], "cost_large": [5.0, 5.0, 5.0, 5.0], "steps": [2, 3, 4, 5],
    "tokens": [100, 100, 100, 100],
    "success_small": [True, False, 1, 0], "success_large": [True, True, 0, 1],
}


def make(name: str) -> RewardFunction:
    return get(name, **REQUIRED.get(name, {}))


# ---------------------------------------------------------------- calling convention, names, pickling


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_every_reward_scores_a_batch_and_pickles(name: str) -> None:
    r = make(name)
    out = r(**BATCH)
    assert len(out) == 4 and all(isinstance(v, float) for v in out)
    assert r.__name__ == name == r.name
    clone = pickle.loads(pickle.dumps(r))
    assert clone.__name__ == name
    assert clone(**BATCH) == r(**BATCH)  # same behaviour after the round trip (EMA state included)


def test_name_override_and_unknown_kwargs_ignored() -> None:
    r = Correctness(grader="exact", name="acc_exact")
    assert r.__name__ == "acc_exact"
    # TRL also passes trainer_state, log_extra, log_metric, environments: all ignored
    out = r(prompts=["q"], completions=["4"], completion_ids=[[1]], answer=["4"], trainer_state=object(),
            log_extra=print, log_metric=print, environments=None, something_else=[1])
    assert out == [1.0]


def test_ema_state_survives_pickling() -> None:
    r = EffortReward(mode="ema", correctness=Correctness("exact"))
    r(completions=["<think>a b c d</think> 4"], answer=["4"], effort=[1.0], prompt_id=["x"])
    clone = pickle.loads(pickle.dumps(r))
    assert clone.ema == r.ema == {"x": 4.0}


def test_trl_grpo_trainer_calls_the_rewards() -> None:
    """Run TRL 1.16's own GRPOTrainer._calculate_rewards on our rewards (a stand-in trainer object)."""
    import torch  # installed by the test command (train extra), like trl below: never skipped
    with warnings.catch_warnings():  # TRL warns about the installed vLLM version
        warnings.simplefilter("ignore")
        from transformers import TrainerState
        from trl import GRPOTrainer
        from trl.trainer.utils import get_callable_name, is_async_callable
    funcs = [Correctness(), KimiLength(), LCPOExact(), EffortReward()]
    logged: dict[str, list] = {}
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=SimpleNamespace(report_to=[]), state=TrainerState(), reward_funcs=funcs,
        reward_processing_classes=[None] * len(funcs), reward_func_names=[get_callable_name(f) for f in funcs],
        _log_completion_extra=lambda col, vals: logged.setdefault(col, []).extend(vals),
        _log_metric=lambda n, v: logged.setdefault(n, []).append(v), environments=None)
    assert fake.reward_func_names == ["correctness", "kimi_length", "lcpo_exact", "effort"]
    assert not any(is_async_callable(f) for f in funcs)
    prompt = [{"role": "user", "content": "2+2? Think for 10 tokens."}]
    inputs = [{"prompt": prompt, "answer": "4", "prompt_id": 7, "target_tokens": 10, "effort": 1.0}] * 2
    completions = [[{"role": "assistant", "content": "<think>2+2=4</think> \\boxed{4}"}],
                   [{"role": "assistant", "content": "<think>2+2 is 4, yes, 4</think> \\boxed{4}"}]]
    out = GRPOTrainer._calculate_rewards(fake, inputs, [prompt] * 2, completions, [[1] * 10, [1] * 20])
    assert out.shape == (2, 4)
    assert out[:, 0].tolist() == [1.0, 1.0]  # both correct
    assert out[:, 1].tolist() == [0.5, -0.5]  # Kimi: shortest correct 0.5, longest -0.5
    assert out[:, 2].tolist() == pytest.approx([1.0, 1.0 - 0.0003 * 10])  # LCPO-Exact
    assert out[:, 3].tolist() == [1.0, 0.0]  # e1 with e = 1: the longer thinking is above the mean


# ---------------------------------------------------------------- text and length helpers


@pytest.mark.parametrize("completion, expected", [
    ("plain text", "plain text"),  # a string stays as it is
    ([{"role": "assistant", "content": "hi"}], "hi"),  # conversational
    ([{"role": "assistant", "content": "a"}, {"role": "tool", "content": "t"},
      {"role": "assistant", "content": "b"}], "a\nb"),  # tool messages left out
    ([{"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}],
     "xy"),  # content parts
    ([{"role": "assistant", "content": "4", "reasoning_content": "2+2"}], "<think>2+2</think>4"),  # parsed
    ([{"role": "assistant", "content": None}], ""),  # no content
])
def test_completion_text(completion: Any, expected: str) -> None:
    assert completion_text(completion) == expected


def test_conversational_and_plain_completions_score_alike() -> None:
    r = LCPOExact(correctness=Correctness("exact"))
    plain = ["<think>x</think> 4", "<think>y</think> 5"]
    conv = [[{"role": "assistant", "content": t}] for t in plain]
    parsed = [[{"role": "assistant", "content": " 4", "reasoning_content": "x"}],
              [{"role": "assistant", "content": " 5", "reasoning_content": "y"}]]
    kw = {"completion_ids": [[0] * 5, [0] * 5], "answer": ["4", "4"], "target_tokens": [5, 5]}
    assert r(completions=plain, **kw) == r(completions=conv, **kw) == r(completions=parsed, **kw) == [1.0, 0.0]


class _CharTokenizer:
    """One token per character (HF-like ``encode``)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_lengths_without_completion_ids_use_tokenizer_or_words() -> None:
    texts = ["<think>one two three</think> four five"]
    batch = RewardBatch(texts, None, {}, ThinkingFormat())
    assert DAPOOverlong(10, 5).lengths(batch) == [5]  # whitespace words (tags glued to words)
    assert DAPOOverlong(10, 5, tokenizer=_CharTokenizer()).lengths(batch) == [len(texts[0])]
    assert DAPOOverlong(10, 5, tokenizer=lambda s: s.split("e")).lengths(batch) == [len(texts[0].split("e"))]
    with_ids = RewardBatch(texts, [[0] * 7], {}, ThinkingFormat())
    assert DAPOOverlong(10, 5, tokenizer=_CharTokenizer()).lengths(with_ids) == [7]  # ids win
    # the callable works without completion_ids: 5 words ≤ Lmax − Lc = 5
    assert DAPOOverlong(10, 5)(completions=texts) == [0.0]
    assert DAPOOverlong(6, 2)(completions=texts) == [-0.5]  # 5 words: (4 − 5)/2


def test_count_tokens() -> None:
    assert count_tokens("a b  c\n d") == 4
    assert count_tokens("abc", _CharTokenizer()) == 3


@pytest.mark.parametrize("ids, tokenizer, expected", [
    (None, None, 3),  # whitespace words of the thinking
    (None, _CharTokenizer(), len("one two three")),  # exact with a tokenizer
    ([[0] * 40], None, round(40 * len("one two three") / len("<think>one two three</think>four"))),  # ratio
    ([[0] * 40], _CharTokenizer(), len("one two three")),  # a tokenizer wins over the ratio
])
def test_thinking_lengths(ids: Any, tokenizer: Any, expected: int) -> None:
    texts = ["<think>one two three</think>four"]
    r = DAPOOverlong(10, 5, tokenizer=tokenizer)
    assert r.thinking_lengths(RewardBatch(texts, ids, {}, ThinkingFormat())) == [expected]


def test_thinking_length_zero_without_thinking() -> None:
    r = DAPOOverlong(10, 5)
    assert r.thinking_lengths(RewardBatch(["just an answer 4"], [[0] * 9], {}, ThinkingFormat())) == [0]


# ---------------------------------------------------------------- correctness and format


@pytest.mark.parametrize("grader, text, gold, expected", [
    ("math", "<think>half</think> \\boxed{0.5}", "\\frac{1}{2}", 1.0),  # symbolic equality, gold first
    ("math", "<think>x</think> \\boxed{3}", "#### 4", 0.0),  # wrong against a GSM8K-style gold
    ("math", "<think>x</think> Answer: 4", "so it is \\boxed{4}", 1.0),  # gold solution with \boxed
    ("math", "<think>still thinking about 4", "4", 0.0),  # truncated thinking has no answer
    ("math", "no thinking at all, 4", "4", 1.0),  # no thinking part: the whole text is the answer
    ("exact", "<think>x</think> Answer: 7.0", "7", 0.0),  # exact: strings differ
    ("normalized", "<think>x</think> Answer: 7.0", "7", 1.0),  # normalized: "7.0" = "7"
    ("numeric", "<think>x</think> Answer: 1,234", "1234", 1.0),  # numeric tolerance
])
def test_correctness_graders(grader: str, text: str, gold: str, expected: float) -> None:
    assert Correctness(grader)(completions=[text], answer=[gold]) == [expected]


def test_correctness_reasoning_gym_uses_the_entry() -> None:
    import reasoning_gym as rg
    entry = rg.create_dataset("chain_sum", size=1, seed=1)[0]
    r = Correctness("reasoning_gym")
    good, bad = f"<think>sum</think> {entry['answer']}", "<think>sum</think> -99999"
    # the row itself is the entry (answer + metadata columns), metadata as a dict or a JSON string
    assert r(completions=[good, bad], answer=[entry["answer"]] * 2, metadata=[entry["metadata"]] * 2) == [1.0, 0.0]
    meta_json = json.dumps(entry["metadata"])
    assert r(completions=[good], answer=[entry["answer"]], metadata=[meta_json]) == [1.0]
    # or an `entry` column
    assert r(completions=[good, bad], answer=[entry["answer"]] * 2, entry=[entry] * 2) == [1.0, 0.0]
    clone = pickle.loads(pickle.dumps(r))  # after use: the grader's cached scorer is rebuilt, not pickled
    assert clone(completions=[good, bad], answer=[entry["answer"]] * 2, entry=[entry] * 2) == [1.0, 0.0]


def test_correctness_answer_column_and_errors() -> None:
    r = Correctness("exact", answer_column="gold")
    assert r(completions=["<think>a</think>Answer: x"], gold=["x"]) == [1.0]
    with pytest.raises(ConfigError, match=r"`gold` must be a dataset column.*got no such column"):
        r(completions=["x"], answer=["x"])
    with pytest.raises(ConfigError, match=r"`gold` must hold a gold answer, got None at row 1"):
        r(completions=["x", "y"], gold=["x", None])
    with pytest.raises(ConfigError, match=r"`grader` must be one of"):
        Correctness("telepathy")
    with pytest.raises(ConfigError, match=r"`grader_params` must be keyword arguments"):
        Correctness("exact", grader_params={"rel_tol": 0.1})


@pytest.mark.parametrize("text, expected", [
    ("<think>reason</think> 4", 1.0),  # one block, then an answer
    ("  <think>reason</think>\n\\boxed{4}", 1.0),  # leading whitespace is fine
    ("<think></think> 4", 1.0),  # an empty thinking block is still well formed
    ("<think>reason</think>   ", 0.0),  # no answer after thinking
    ("<think>reason", 0.0),  # thinking never closed
    ("4 <think>reason</think> 4", 0.0),  # text before the block
    ("<think>a</think><think>b</think> 4", 0.0),  # two blocks
    ("<think>a</think> 4 </think>", 0.0),  # a stray end tag
    ("reason</think> 4", 0.0),  # no start tag (template does not open thinking)
    ("just 4", 0.0),  # no thinking
])
def test_think_format(text: str, expected: float) -> None:
    assert ThinkFormat()(completions=[text]) == [expected]


def test_think_format_when_template_opens_thinking() -> None:
    r = ThinkFormat(thinking=ThinkingFormat(starts_in_thinking=True))
    assert r(completions=["reason</think> 4", "<think>reason</think> 4", "r <think> x</think> 4"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match=r"`thinking` must be a ThinkingFormat with tags"):
        ThinkFormat(thinking=ThinkingFormat(enabled=False))


# ---------------------------------------------------------------- registry and input errors


def test_registry_names_and_get() -> None:
    assert names() == sorted(REWARDS) and "lcpo_exact" in names() and len(names()) == 14
    assert isinstance(get("lcpo_max", delta=0.3), LCPOMax)
    assert get({"name": "think_prune", "params": {"limit": 5}}).limit == 5
    r = KimiLength()
    assert get(r) is r
    with pytest.raises(UnknownNameError, match=r"unknown reward 'lcpo'; available: .*lcpo_exact, lcpo_max"):
        get("lcpo")
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) 'beta' for reward 'lcpo_exact'; valid: alpha"):
        get("lcpo_exact", beta=1)
    with pytest.raises(ConfigError, match=r"reward 'dapo_overlong' needs parameter\(s\) 'max_length', 'cache_length'"):
        get("dapo_overlong")
    with pytest.raises(ConfigError, match=r"a reward block needs a `name`"):
        get({"params": {}})


@pytest.mark.parametrize("build, param", [
    (lambda: LCPOExact(alpha=0), "alpha"),  # α must be > 0
    (lambda: LCPOExact(alpha=-1e-3), "alpha"),  # negative α
    (lambda: LCPOMax(delta=0), "delta"),  # δ must be > 0
    (lambda: LCPOMax(alpha=float("nan")), "alpha"),  # NaN
    (lambda: DAPOOverlong(0, 1), "max_length"),  # Lmax ≤ 0
    (lambda: DAPOOverlong(100, 0), "cache_length"),  # Lc ≤ 0
    (lambda: DAPOOverlong(10, 20), "cache_length"),  # Lc > Lmax
    (lambda: ThinkPrune(0), "limit"),  # limit ≤ 0
    (lambda: ThinkPrune(2.5), "limit"),  # limit not an integer
    (lambda: CosineLength(-5), "max_length"),  # L_max ≤ 0
    (lambda: CosineLength(10, exceed_reward=float("inf")), "exceed_reward"),  # infinite value
    (lambda: EffortReward(mode="median"), "mode"),  # unknown mode
    (lambda: EffortReward(ema_decay=1.0), "ema_decay"),  # decay must be < 1
    (lambda: DualEfficiency(0, 10), "max_steps"),  # max steps ≤ 0
    (lambda: DualEfficiency(5, 10, step_weight=-1), "step_weight"),  # negative weight
    (lambda: DualEfficiency(5, 10, step_weight=0, token_weight=0), "step_weight/token_weight"),  # all zero
    (lambda: LCPOExact(correctness="math"), "correctness"),  # not a Correctness
])
def test_bad_parameters_name_the_parameter(build: Any, param: str) -> None:
    with pytest.raises(ConfigError, match=rf"^`{param}` must be .*, got "):
        build()


def test_bad_data_names_column_and_row() -> None:
    r = LCPOExact(correctness=Correctness("exact"))
    kw = {"completions": ["4", "4"], "answer": ["4", "4"]}
    with pytest.raises(ConfigError, match=r"`target_tokens` must hold positive finite numbers, got 0 at row 1"):
        r(**kw, target_tokens=[10, 0])
    with pytest.raises(ConfigError, match=r"`target_tokens` must hold positive .* got 'ten' at row 0"):
        r(**kw, target_tokens=["ten", 10])
    with pytest.raises(ConfigError, match=r"`target_tokens` must have one value per completion \(2\), got 3"):
        r(**kw, target_tokens=[10, 10, 10])
    with pytest.raises(ConfigError, match=r"`completion_ids` must have one value per completion \(2\), got 1"):
        r(**kw, target_tokens=[10, 10], completion_ids=[[1]])
    with pytest.raises(ConfigError, match=r"`completions` must be a list of completions"):
        r(answer=["4"], target_tokens=[1])


def test_missing_prompt_id_explains_the_fix() -> None:
    for r in (KimiLength(), LCR1Length(), EffortReward()):
        with pytest.raises(ConfigError, match=r"`prompt_id` must be a dataset column.*add a `prompt_id` column"):
            r(completions=["4"], answer=["4"], effort=[1.0])
    r = KimiLength(prompt_id_column="qid")
    with pytest.raises(ConfigError, match=r"`qid` must be a dataset column.*columns: answer, prompt_id"):
        r(completions=["4"], answer=["4"], prompt_id=[1])
    with pytest.raises(ConfigError, match=r"`qid` must hold hashable ids .* at row 0"):
        r(completions=["4"], answer=["4"], qid=[[1, 2]])


def test_routing_rewards_need_no_completions() -> None:
    r = BoundaryRoutingReward()
    assert r(success=[True], cost=[1.0], cost_small=[1.0], cost_large=[3.0]) == [1.0]
    assert LCR1Compress().__name__ == "lcr1_compress"


def test_numpy_columns_are_accepted() -> None:
    import numpy as np
    r = LCPOExact(correctness=Correctness("exact"))
    out = r(completions=["Answer: 4"], completion_ids=[[0] * 12], answer=np.array(["4"]),
            target_tokens=np.array([10], dtype=np.int64))
    assert out == [pytest.approx(1.0 - 0.0003 * 2)]
    with pytest.raises(ConfigError, match=r"`target_tokens` must be a column"):
        r(completions=["Answer: 4"], answer=["4"], target_tokens=10)
