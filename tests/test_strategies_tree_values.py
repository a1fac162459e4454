"""Value scorers of the tree searches: residual self-evaluation, mean logprob, an external PRM.

Helpers (scripted backends that record requests and add rating logprobs) come from
``test_strategies_tree``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from test_strategies_tree import (
    RatingBackend,
    RecordingBackend,
    make_script,
    nodes,
    problems,
    score,
)

from budgetlm import Budget, ConfigError, Meter
from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.strategies import Problem
from budgetlm.strategies.beam import BeamSearch
from budgetlm.strategies.values import ResidualSelfEval, StepView, get_scorer


# ------------------------------------------------------------------ residual self-evaluation
def views(meter: Meter, steps: Sequence[str], previous: str = "") -> list[StepView]:
    p = Problem.from_text("What is 3 + 4?", id="p")
    return [StepView(p, previous, s, None, meter) for s in steps]


@pytest.mark.parametrize(("dist", "expected"), [
    ({"5": 1.0}, 1.0),  # clear progress
    ({"3": 1.0}, 0.0),  # no progress
    ({"1": 1.0}, -1.0),  # wrong
    ({"4": 1.0}, 0.5),
    ({"1": 0.5, "5": 0.5}, 0.0),  # split: the expectation, not the sampled digit
    ({"2": 0.25, "4": 0.75}, 0.25),  # E[d] = 3.5
    ({"5": 0.2, "x": 0.8}, 1.0),  # renormalised among the digits
    ({"4": 0.3, "2": 0.1, "the": 0.6}, 0.25),  # E[d] = (4*0.3 + 2*0.1) / 0.4 = 3.5
    ({"7": 0.9, "3": 0.1}, 0.0),  # digits outside 1-5 do not count
    ({"x": 0.6, "y": 0.4}, math.nan),  # no rating digit among the top tokens: unscored
    ({}, math.nan),  # no top logprobs at all
])
def test_residual_self_eval_math(dist: dict[str, float], expected: float) -> None:
    be = RatingBackend(lambda p, i, sp: "4", lambda s: dist)
    meter = Meter(Budget(output_tokens=10))
    [(score_, toks)] = score(ResidualSelfEval(), views(meter, ["3 + 4 = 7"]), be)
    if math.isnan(expected):
        assert math.isnan(score_)
    else:
        assert score_ == pytest.approx(expected)
    assert toks == 1 and meter.spent("output_tokens") == 1


def test_residual_self_eval_is_one_request_per_step_with_the_rating_prompt() -> None:
    log: list[str] = []
    be = RatingBackend(lambda p, i, sp: (log.append(p), "5")[1],
                       lambda s: {"5": 1.0} if "7" in s else {"2": 1.0})
    meter = Meter()
    out = score(ResidualSelfEval(), views(meter, ["so 3 + 4 = 7", "hmm"], previous="Let us add.\n\n"), be)
    assert [s for s, _ in out] == pytest.approx([1.0, -0.5])
    assert be.requests == 2 and all(p.sampling.n == 1 and p.sampling.max_tokens == 1 for p in be.prompts)
    assert meter.spent("output_tokens") == 2 and len(meter.records) == 2  # charged to the step's meter
    assert "Problem:\nWhat is 3 + 4?" in log[0] and "Previous steps:\nLet us add.\n\n" in log[0]
    assert "New step:\nso 3 + 4 = 7" in log[0] and log[0].endswith("Rating: ")
    assert score(ResidualSelfEval(), [], be) == [] and be.requests == 2  # nothing to rate: no call
    # at the root there are no previous steps
    score(ResidualSelfEval(), views(meter, ["x"]), be)
    assert "Previous steps:\n(none)" in log[-1]


def test_residual_self_eval_without_budget_is_unscored_and_free() -> None:
    be = RatingBackend(lambda p, i, sp: "5", lambda s: {"5": 1.0})
    poor, rich = Meter(Budget(output_tokens=0)), Meter(Budget(output_tokens=5))
    p = Problem.from_text("q", id="p")
    out = score(ResidualSelfEval(), [StepView(p, "", "a", None, poor), StepView(p, "", "b", None, rich)], be)
    assert math.isnan(out[0][0]) and out[0][1] == 0 and poor.spent("output_tokens") == 0
    assert out[1] == (1.0, 1) and rich.spent("output_tokens") == 1


def test_logprob_scorer_is_free_and_geometric_mean() -> None:
    p = Problem.from_text("q", id="p")
    m = Meter()
    be = ScriptedBackend()
    out = score(get_scorer("logprob"), [StepView(p, "", "a", -0.5, m), StepView(p, "", "b", None, m)], be)
    assert be.requests == 0 and m.total().calls == 0
    assert out[0] == (pytest.approx(math.exp(-0.5)), 0)
    assert math.isnan(out[1][0]) and out[1][1] == 0


# ------------------------------------------------------------------ external PRM (tiny random transformers models)
def _tiny_prm(path, head: str, num_labels: int):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, LlamaForTokenClassification

    from budgetlm.models import default_model_dir

    src = default_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    cls = LlamaForSequenceClassification if head == "seq" else LlamaForTokenClassification
    cls(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize(("head", "num_labels"), [
    ("seq", 1),    # sequence classification, one logit: sigmoid
    ("seq", 2),    # sequence classification, two labels: softmax of label 1
    ("token", 2),  # token classification: read at the last token
])
def test_prm_scorer_scores_paths_and_charges_input_tokens(tmp_path, head: str, num_labels: int) -> None:
    path = _tiny_prm(tmp_path / "prm", head, num_labels)
    be = RecordingBackend(make_script(answer_at=1))
    beam = BeamSearch(beams=2, expand=2, scorer="prm", scorer_params={"path": str(path)})
    [r] = beam.solve(problems("q"), backend=be, budget={"output_tokens": 500})
    scored = [n for n in nodes(r) if n["score"] is not None]
    assert scored and all(0.0 < n["score"] < 1.0 for n in scored)
    assert len({round(n["score"], 6) for n in scored}) > 1  # different paths, different scores
    # scoring directly: every view is charged its PRM input tokens (and FLOPs) before the forward pass
    from transformers import AutoTokenizer

    from budgetlm.strategies.values import get_scorer

    tok = AutoTokenizer.from_pretrained(path)
    meter = Meter(Budget(input_tokens=10_000))
    views = [StepView(Problem("p", [{"role": "user", "content": "What is 2+2?"}]), prev, step, None, meter)
             for prev, step in [("", "2+2 is 4."), ("First, 2+2.\n\n", "So 4.")]]
    out = score(get_scorer("prm", path=str(path)), views, be)
    expected = sum(len(tok(f"{v.question}\n{v.previous}{v.step}")["input_ids"]) for v in views)
    assert meter.spent("input_tokens") == expected and meter.spent("flops") > 0
    assert [t for _, t in out] == [0, 0] and all(0 < s < 1 for s, _ in out)
    # a budget that cannot afford a view leaves it unscored (NaN) instead of overspending
    poor = Meter(Budget(input_tokens=expected - 1))
    views = [StepView(v.problem, v.previous, v.step, None, poor) for v in views]
    scores = [s for s, _ in score(get_scorer("prm", path=str(path)), views, be)]
    assert poor.spent("input_tokens") <= expected - 1 and any(math.isnan(s) for s in scores)


def test_prm_scorer_bad_path_is_a_config_error(tmp_path) -> None:
    from budgetlm.strategies.values import get_scorer

    scorer = get_scorer("prm", path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="`path` must be a local transformers model directory"):
        score(scorer, [StepView(Problem("p", [{"role": "user", "content": "q"}]), "", "step", None, Meter())],
              RecordingBackend(make_script(answer_at=1)))
