"""Real GRPO steps on the default model on the CPU through TRL's GRPOTrainer (slow), plus resume and bad input.

Each recipe trains for two steps of 4 completions × 24 tokens; the metrics TRL logs (total reward,
each reward function's mean, mean completion length) must come back in ``train_log.jsonl`` and the
outcome, the trained model must load, and a later run with more steps must resume from the last
checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trl  # noqa: F401  (installed by the test command; an import error must fail, not skip)

from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.training import TrainConfig, run, train

SUITE = ("reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=12&seed=1"
         "&split=calibration&test_size=12")


def cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(recipe="effort", recipe_params={"mode": "exact", "target_range": [8, 24]},
                                   suite=SUITE, max_steps=2, max_completion_length=24, save_steps=1, seed=0,
                                   device="cpu", eval={"enabled": False})
    base.update(kw)
    return TrainConfig(**base)


def metrics(entries: list[dict]) -> list[dict]:
    return [e for e in entries if "reward" in e]



@pytest.fixture(autouse=True)
def _free_disk(tmp_path: Path) -> Iterator[None]:
    """Each run leaves checkpoints of the 135M model with optimizer state (about 1.6 GB each): delete them."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "params", "reward_names"), [
    ("effort", {"mode": "exact", "target_range": [8, 24]}, ["lcpo_exact"]),  # L1 LCPO-Exact
    ("effort", {"mode": "max", "targets": [8, 16]}, ["lcpo_max"]),  # L1 LCPO-Max, targets from a list
    ("effort", {"mode": "effort", "efforts": [0.5, 1.0]}, ["effort"]),  # e1 effort fraction, completion length
    ("compress", {"method": "lcr1"}, ["correctness", "lcr1_length", "lcr1_compress"]),  # LC-R1 (3 weighted terms)
    ("compress", {"method": "thinkprune", "limit": 12}, ["think_prune"]),  # ThinkPrune with a limit
    ("compress", {"method": "kimi"}, ["correctness", "kimi_length"]),  # Kimi 1.5 length penalty
])
def test_each_recipe_runs_real_grpo_steps(tmp_path: Path, recipe: str, params: dict, reward_names: list[str]) -> None:
    out = train(cfg(recipe=recipe, recipe_params=params), tmp_path, progress=False)
    assert out.steps == 2 and not out.skipped
    logged = metrics(out.log_history)
    assert [e["step"] for e in logged] == [1, 2]
    for e in logged:
        assert math.isfinite(e["reward"])
        assert 0 < e["completions/mean_length"] <= 24
        for name in reward_names:
            assert math.isfinite(e[f"rewards/{name}/mean"]), name
    on_disk = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert {e["step"] for e in on_disk if "reward" in e} == {1, 2}
    state = json.loads((tmp_path / "train.json").read_text())
    assert state["status"] == "done" and state["steps"] == 2 and state["recipe"]["name"] == recipe
    assert state["grpo_config"]["use_cpu"] is True and state["grpo_config"]["bf16"] is False
    assert "trl" in state["versions"] and state["seed"] == 0
    rows = [json.loads(line) for line in (tmp_path / "dataset.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt_id"] for r in rows)
    assert (out.model_dir / "config.json").exists() and (out.model_dir / "tokenizer.json").exists()


@pytest.mark.slow
def test_checkpoint_and_resume(tmp_path: Path) -> None:
    first = train(cfg(max_steps=2), tmp_path, progress=False)
    assert first.resumed_from is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # the same config again: nothing to do
    again = train(cfg(max_steps=2), tmp_path, progress=False)
    assert again.skipped and again.steps == 2
    # more steps: resumes from the newest checkpoint and only runs the new step
    more = train(cfg(max_steps=3), tmp_path, progress=False)
    assert more.resumed_from is not None and more.resumed_from.endswith("checkpoint-2")
    assert more.steps == 3
    logged = metrics(more.log_history)
    assert [e["step"] for e in logged] == [1, 2, 3]  # one entry per step, the resumed run added step 3 only
    # a different config may not reuse the directory
    with pytest.raises(ConfigError, match="different config"):
        train(cfg(max_steps=3, learning_rate=5e-5), tmp_path, progress=False)
    # --no-resume starts over
    fresh = train(cfg(max_steps=1), tmp_path, resume=False, progress=False)
    assert fresh.resumed_from is None and fresh.steps == 1


@pytest.mark.slow
def test_time_limit_stops_and_checkpoints(tmp_path: Path) -> None:
    out = train(cfg(max_steps=50, max_minutes=0.001, save_steps=100), tmp_path, progress=False)
    assert out.stopped_by_time and out.steps == 1
    assert (tmp_path / "checkpoints" / "checkpoint-1").exists()
    assert json.loads((tmp_path / "train.json").read_text())["stop_reason"].startswith("time limit")


@pytest.mark.slow
def test_lora_adapters_are_merged_into_the_saved_model(tmp_path: Path) -> None:
    out = train(cfg(max_steps=1, lora={"r": 4, "alpha": 8}), tmp_path, progress=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out.model_dir)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert metrics(out.log_history)


@pytest.mark.slow
def test_run_evaluates_trained_against_base_and_writes_the_report(tmp_path: Path) -> None:
    res = run(cfg(max_steps=1, eval={"limit": 3, "backend": "hf", "max_tokens": 32}), tmp_path, progress=False)
    rows = res.comparison["rows"]
    assert {r["model"] for r in rows} == {"base", "trained"}
    assert {r["strategy"] for r in rows} == {"exact=8", "exact=16", "exact=24"}
    for r in rows:
        assert r["n"] == 3 and 0 <= r["accuracy"] <= 1 and r["mean_output_tokens"] <= 32
        assert r["length_error"] >= 0 and r["target_tokens"] in (8, 16, 24)
    assert set(res.comparison["overall"]) == {"base", "trained"}
    html = res.report.read_text()
    assert "Training curves" in html and "data:image/png;base64," in html and "trained" in html
    assert (tmp_path / "report" / "training_curves.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "eval" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 * 3 and all(not r["over_budget"] for r in records)
    # the evaluation suite is the test split, disjoint from the training prompts
    train_ids = {json.loads(line)["prompt_id"] for line in (tmp_path / "dataset.jsonl").read_text().splitlines()}
    assert not train_ids & {r["item_id"] for r in records}
    # re-running only rewrites the report
    again = run(cfg(max_steps=1, eval={"limit": 3, "backend": "hf", "max_tokens": 32}), tmp_path, progress=False)
    assert again.train.skipped and again.comparison["rows"] == rows


# Bad input is rejected before any model is loaded.
@pytest.mark.parametrize(("kw", "match"), [
    ({"recipe": "nope"}, "nope"),  # unknown recipe: the error lists the registered ones
    ({"recipe_params": {"target_range": [0, 10]}}, "target_range"),  # target lengths <= 0
    ({"recipe_params": {"targets": [16, -1]}}, "targets"),  # a negative target in the list
    ({"recipe_params": {"mode": "exact", "colour": 1}}, "colour"),  # unknown recipe parameter
    ({"grpo": {"num_generation": 4}}, "did you mean"),  # a misspelt GRPOConfig field
    ({"suite": "reasoning_gym:chain_sum?size=1&split=calibration&test_size=0",
      "per_device_train_batch_size": 8}, "training prompts"),  # 1 prompt, but a step needs 2
    ({"use_vllm": True}, "use_vllm"),  # vLLM generation needs CUDA
    ({"model": "/no/such/model"}, "does not exist"),  # missing checkpoint
])
def test_bad_input_is_rejected(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        train(cfg(**kw), tmp_path, progress=False)


def test_unknown_recipe_lists_the_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError) as e:
        train(cfg(recipe="efort"), tmp_path, progress=False)
    assert "effort" in str(e.value) and "compress" in str(e.value)


@pytest.mark.slow
def test_route_recipe_runs_real_grpo_steps(tmp_path: Path) -> None:
    """The route recipe end to end: real boundary runs of the agent on the offline kb_agent tasks, then GRPO."""
    agent = {"max_steps": 2, "step_tokens": 32,
             "models": [{"label": "small", "n": 1}, {"label": "large", "n": 2, "temperature": 0.7}]}
    c = cfg(recipe="route", suite="kb_agent?size=2&seed=1&difficulty=1", max_completion_length=8,
            recipe_params={"agent_model": "hf:default", "agent": agent, "budget": {"output_tokens": 160},
                           "max_rows_per_task": 2})
    out = train(c, tmp_path, progress=False)
    logged = metrics(out.log_history)
    assert [e["step"] for e in logged] == [1, 2]
    for e in logged:
        assert 0 <= e["rewards/route_choice/mean"] <= 1 and 0 < e["completions/mean_length"] <= 8
    rows = [json.loads(line) for line in (tmp_path / "dataset.jsonl").read_text().splitlines()]
    assert rows and all("small or large" in r["prompt"][-1]["content"] for r in rows)
    assert (tmp_path / "boundary" / "records.jsonl").exists()
