"""The training config (validation, digest, YAML), device resolution on this CPU machine and (patched)
on a GPU, the TRL ``GRPOConfig`` it builds, and the fp16 checkpoint view for colocated vLLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import budgetlm.training.grpo as grpo
from budgetlm.errors import ConfigError
from budgetlm.training import RECIPES, LoraSpec, TrainConfig, TrainEvalSpec, build_grpo_config, resolve_device
from budgetlm.training.grpo import _fp16_view

SUITE = "reasoning_gym:chain_sum?size=20&split=calibration"
BASE: dict[str, Any] = {"recipe": "effort", "suite": SUITE}


def cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


# ---------------------------------------------------------------- TrainConfig validation


@pytest.mark.parametrize("data, needle", [
    ({"suite": SUITE}, "recipe"),  # no recipe
    ({"recipe": "effort"}, "suite"),  # no suite
    ({**BASE, "num_generations": 1}, "num_generations"),  # GRPO needs a group of >= 2
    ({**BASE, "num_generations": 0}, "num_generations"),  # not even one completion
    ({**BASE, "learning_rate": -1e-5}, "learning_rate"),  # negative lr
    ({**BASE, "learning_rate": 0}, "learning_rate"),  # zero lr
    ({**BASE, "temperature": 0}, "temperature"),  # greedy rollouts give GRPO no variance
    ({**BASE, "max_minutes": 0}, "max_minutes"),  # zero time limit
    ({**BASE, "max_minutes": -3}, "max_minutes"),  # negative time limit
    ({**BASE, "max_steps": 0}, "max_steps"),  # no steps
    ({**BASE, "beta": -0.1}, "beta"),  # negative KL weight
    ({**BASE, "vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization"),  # over the whole GPU
    ({**BASE, "vllm_mode": "server", "use_vllm": False}, "vllm_mode: server"),  # server mode without vLLM
    ({**BASE, "device": "tpu"}, "device"),  # unknown device
    ({**BASE, "learning_rat": 1e-4}, "learning_rat"),  # unknown field (typo)
    ({**BASE, "lora": {"r": 0}}, "lora.r"),  # nested LoRA error
    ({**BASE, "eval": {"limit": 0}}, "eval.limit"),  # nested eval error
])
def test_train_config_rejects(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig(**data)
    assert needle in str(err.value)


def test_train_config_defaults_are_a_small_cpu_run() -> None:
    c = cfg()
    assert (c.num_generations, c.per_device_train_batch_size, c.max_completion_length) == (4, 4, 128)
    assert (c.device, c.use_vllm, c.fp16, c.lora) == ("auto", None, None, None)
    assert c.eval.enabled and c.eval.limit == 100 and c.grpo == {}


def test_vllm_server_mode_is_fine_with_use_vllm_unset_or_true() -> None:
    assert cfg(vllm_mode="server").vllm_mode == "server"  # use_vllm null: decided by the device
    assert cfg(vllm_mode="server", use_vllm=True).use_vllm is True


@pytest.mark.parametrize("kw, needle", [
    ({"r": 0}, "lora.r"),  # rank 0
    ({"alpha": 0}, "lora.alpha"),  # alpha 0
    ({"rank": 8}, "rank"),  # unknown field
])
def test_lora_spec_rejects(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        LoraSpec(**kw)
    assert needle in str(err.value)


@pytest.mark.parametrize("kw, needle", [
    ({"limit": 0}, "eval.limit"),  # no items
    ({"max_tokens": 0}, "eval.max_tokens"),  # no tokens
    ({"backend": "openai"}, "backend"),  # not a local backend
])
def test_train_eval_spec_rejects(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainEvalSpec(**kw)
    assert needle in str(err.value)


def test_train_eval_spec_allows_null_limits() -> None:
    e = TrainEvalSpec(limit=None, max_tokens=None)
    assert e.limit is None and e.max_tokens is None


# ---------------------------------------------------------------- digest


@pytest.mark.parametrize("change, same", [
    ({"name": "other"}, True),  # a run name is not the model
    ({"max_steps": 500}, True),  # more steps continue the same run
    ({"max_minutes": 5.0}, True),  # a time limit does not change what is trained
    ({"eval": {"limit": 3, "enabled": False}}, True),  # evaluation settings
    ({"save_steps": 3, "logging_steps": 2}, True),  # checkpoint/log cadence
    ({"learning_rate": 2e-5}, False),  # the optimizer changes the model
    ({"seed": 1}, False),  # other data and sampling
    ({"recipe_params": {"mode": "max"}}, False),  # another reward
    ({"grpo": {"warmup_steps": 2}}, False),  # any further GRPOConfig field
    ({"lora": {"r": 8}}, False),  # LoRA instead of full fine-tuning
])
def test_digest_tracks_only_what_changes_the_model(change: dict[str, Any], same: bool) -> None:
    assert (cfg(**change).digest() == cfg().digest()) is same


def test_digest_is_a_stable_short_hex() -> None:
    d = cfg().digest()
    assert d == cfg().digest() and len(d) == 16 and int(d, 16) >= 0


# ---------------------------------------------------------------- YAML


def test_from_yaml(tmp_path: Path) -> None:
    p = tmp_path / "train.yaml"
    p.write_text("recipe: effort\nrecipe_params: {mode: max, target_range: [8, 32]}\n"
                 f"suite: '{SUITE}'\nmax_steps: 3\nlora: {{r: 4}}\neval: {{limit: 5}}\n")
    c = TrainConfig.from_yaml(p)
    assert (c.recipe, c.max_steps, c.suite) == ("effort", 3, SUITE)
    assert c.recipe_params == {"mode": "max", "target_range": [8, 32]}
    assert isinstance(c.lora, LoraSpec) and c.lora.r == 4 and c.lora.alpha == 32
    assert c.eval.limit == 5


@pytest.mark.parametrize("text, needle", [
    ("recipe: effort\nsuite: x\nnum_generations: 1\n", "num_generations"),  # validation error from a file
    ("recipe: effort\nsuite: [unclosed\n", "not valid YAML"),  # syntax error
    ("- a\n- b\n", "mapping"),  # a list, not a mapping
])
def test_from_yaml_errors(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "train.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(p, what="training config")
    assert needle in str(err.value)


def test_from_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="training config .* does not exist"):
        TrainConfig.from_yaml(tmp_path / "nope.yaml", what="training config")


# ---------------------------------------------------------------- device on this CPU machine


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend there is no CUDA (true on this machine, made explicit so the test holds anywhere)."""
    monkeypatch.setattr(grpo, "_cuda", lambda: False)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend CUDA and vLLM are available."""
    monkeypatch.setattr(grpo, "_cuda", lambda: True)
    monkeypatch.setattr(grpo, "_vllm_installed", lambda: True)


@pytest.mark.parametrize("kw", [
    {},  # auto
    {"device": "cpu"},  # explicit
    {"device": "cpu", "use_vllm": False, "fp16": False},  # explicit everything
])
def test_resolve_device_on_cpu(cpu_only: None, kw: dict[str, Any]) -> None:
    assert resolve_device(cfg(**kw)) == {"device": "cpu", "use_vllm": False, "fp16": False}


def test_real_machine_resolves_to_cpu() -> None:
    import torch

    assert not torch.cuda.is_available()  # this suite runs on CPU-only torch
    assert resolve_device(cfg()) == {"device": "cpu", "use_vllm": False, "fp16": False}


@pytest.mark.parametrize("kw, needle", [
    ({"device": "gpu"}, "`device`"),  # no CUDA here
    ({"use_vllm": True}, "`use_vllm`"),  # vLLM generation needs CUDA
    ({"device": "cpu", "use_vllm": True}, "`use_vllm`"),  # the same, explicit cpu
    ({"fp16": True}, "`fp16`"),  # fp16 training on the CPU
])
def test_resolve_device_cpu_errors(cpu_only: None, kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_device(cfg(**kw))
    assert needle in str(err.value)


@pytest.mark.parametrize("kw, expected", [
    ({}, {"device": "gpu", "use_vllm": True, "fp16": True}),  # auto finds the GPU: vLLM + fp16
    ({"device": "gpu"}, {"device": "gpu", "use_vllm": True, "fp16": True}),  # explicit gpu
    ({"use_vllm": False}, {"device": "gpu", "use_vllm": False, "fp16": True}),  # transformers generation on GPU
    ({"fp16": False}, {"device": "gpu", "use_vllm": True, "fp16": False}),  # fp32 on GPU
    ({"device": "cpu"}, {"device": "cpu", "use_vllm": False, "fp16": False}),  # cpu forced despite the GPU
])
def test_resolve_device_gpu_branch(gpu: None, kw: dict[str, Any], expected: dict[str, Any]) -> None:
    assert resolve_device(cfg(**kw)) == expected


def test_gpu_without_vllm_generates_with_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpo, "_cuda", lambda: True)
    monkeypatch.setattr(grpo, "_vllm_installed", lambda: False)
    assert resolve_device(cfg()) == {"device": "gpu", "use_vllm": False, "fp16": True}


# ---------------------------------------------------------------- GRPOConfig


def recipe(params: dict[str, Any] | None = None, name: str = "effort") -> Any:
    return RECIPES.get(name)(params or {})


CPU = {"device": "cpu", "use_vllm": False, "fp16": False}


def test_grpo_config_carries_the_fields_over(tmp_path: Path) -> None:
    c = cfg(num_generations=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_completion_length=64,
            learning_rate=3e-5, temperature=0.7, beta=0.01, max_steps=7, save_steps=3, save_total_limit=1, seed=5)
    g = build_grpo_config(c, recipe(), tmp_path / "ck", CPU)
    assert g.output_dir == str(tmp_path / "ck")
    assert (g.use_cpu, g.bf16, g.fp16, g.use_vllm) == (True, False, False, False)
    assert (g.num_generations, g.per_device_train_batch_size, g.gradient_accumulation_steps) == (2, 4, 2)
    assert (g.max_completion_length, g.max_steps, g.save_steps, g.save_total_limit) == (64, 7, 3, 1)
    assert g.learning_rate == pytest.approx(3e-5) and g.temperature == pytest.approx(0.7)
    assert g.beta == pytest.approx(0.01) and (g.seed, g.data_seed) == (5, 5)
    assert g.report_to in ("none", [], ["none"])  # TRL normalises "none" to no integrations
    assert g.reward_weights is None  # the effort recipe has a single reward
    assert g.model_init_kwargs == {"dtype": "float32"}


@pytest.mark.parametrize("kw", [
    {"num_generations": 4, "per_device_train_batch_size": 6},  # 6 completions: one and a half groups
    {"num_generations": 3, "per_device_train_batch_size": 4},  # 4 % 3
])
def test_grpo_config_needs_whole_groups_per_generation_batch(tmp_path: Path, kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"`per_device_train_batch_size` × processes × steps_per_generation must be "
                                          r"a multiple of `num_generations`"):
        build_grpo_config(cfg(**kw), recipe(), tmp_path / "ck", CPU)


@pytest.mark.parametrize(("kw", "processes", "size", "error"), [
    ({"per_device_train_batch_size": 2}, 2, 4, None),  # half a group per process: two processes make one group
    ({"per_device_train_batch_size": 2}, 1, None, r"2 × 1 × 1 = 2.*a multiple of 4,"),  # one process: half a group
    ({"per_device_train_batch_size": 6}, 2, 12, None),  # a group spans the two processes
    ({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}, 1, 4, None),  # two micro-batches
    ({"per_device_train_batch_size": 2, "steps_per_generation": 3}, 1, None, r"2 × 1 × 3 = 6"),  # grpo override
    ({"per_device_train_batch_size": 2, "generation_batch_size": 6}, 1, None, "grpo.generation_batch_size"),
])
def test_check_batch_counts_processes(kw: dict[str, Any], processes: int, size: int | None, error: str | None) -> None:
    full = {"num_generations": 4, "gradient_accumulation_steps": 1, **kw}
    if error is None:
        assert grpo.check_batch(full, processes) == size
    else:
        with pytest.raises(ConfigError, match=error):
            grpo.check_batch(full, processes)


@pytest.mark.parametrize("method, weights", [
    ("lcr1", [1.0, 0.5, 2.0]),  # correctness, length, compress
    ("kimi", [1.0, 0.5]),  # correctness, length
    ("thinkprune", None),  # one reward
])
def test_grpo_config_takes_the_recipe_reward_weights(tmp_path: Path, method: str, weights: list[float] | None) -> None:
    r = recipe({"method": method, "length_weight": 0.5, "compress_weight": 2.0}, "compress")
    g = build_grpo_config(cfg(recipe="compress"), r, tmp_path, CPU)
    assert g.reward_weights == weights


def test_grpo_block_overrides_the_derived_values(tmp_path: Path) -> None:
    c = cfg(grpo={"warmup_steps": 3, "max_completion_length": 32, "logging_steps": 5})
    g = build_grpo_config(c, recipe(), tmp_path, CPU)
    assert (g.warmup_steps, g.max_completion_length, g.logging_steps) == (3, 32, 5)


@pytest.mark.parametrize("key, suggestion", [
    ("num_generation", "num_generations"),  # a missing letter
    ("learning_rat", "learning_rate"),  # a truncated name
])
def test_unknown_grpo_key_suggests_the_closest(tmp_path: Path, key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_grpo_config(cfg(grpo={key: 1}), recipe(), tmp_path, CPU)
    msg = str(err.value)
    assert "`grpo`" in msg and repr(key) in msg and "did you mean" in msg and suggestion in msg


def test_grpo_config_rejections_become_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trl.GRPOConfig rejected"):
        build_grpo_config(cfg(grpo={"lr_scheduler_type": "no-such-schedule"}), recipe(), tmp_path, CPU)


def test_grpo_config_gpu_branch(gpu: None, tmp_path: Path) -> None:
    c = cfg(vllm_gpu_memory_utilization=0.4)
    dev = resolve_device(c)
    g = build_grpo_config(c, recipe(), tmp_path, dev)
    assert (g.use_vllm, g.vllm_mode, g.fp16, g.use_cpu, g.bf16) == (True, "colocate", True, False, False)
    assert g.vllm_gpu_memory_utilization == pytest.approx(0.4)


def test_grpo_config_server_mode(gpu: None, tmp_path: Path) -> None:
    c = cfg(vllm_mode="server", vllm_server_base_url="http://127.0.0.1:8123")
    g = build_grpo_config(c, recipe(), tmp_path, resolve_device(c))
    assert (g.use_vllm, g.vllm_mode, g.vllm_server_base_url) == (True, "server", "http://127.0.0.1:8123")


# ---------------------------------------------------------------- fp16 view for colocated vLLM


def test_fp16_view_links_the_checkpoint_with_a_float16_config(tmp_path: Path) -> None:
    from budgetlm.models import tiny_model_dir

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir(), src)
    original = (src / "config.json").read_text()
    assert json.loads(original).get("dtype", json.loads(original).get("torch_dtype")) == "float32"
    dst = _fp16_view(src, tmp_path / "fp16")
    assert dst == tmp_path / "fp16"
    conf = json.loads((dst / "config.json").read_text())
    assert conf["dtype"] == conf["torch_dtype"] == "float16"
    assert not (dst / "config.json").is_symlink()
    assert (src / "config.json").read_text() == original  # the checkpoint's own config is unchanged
    others = [f.name for f in src.iterdir() if f.name != "config.json"]
    assert others and any(n.endswith(".safetensors") for n in others)
    for name in others:
        link = dst / name
        assert link.is_symlink() and link.resolve() == (src / name).resolve()
    # running it again (a resumed run) is fine and keeps the same view
    assert _fp16_view(src, tmp_path / "fp16") == dst
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"


# The shipped training configs stay valid (a renamed field must not break them silently).
@pytest.mark.parametrize("path", [
    "examples/train_effort.yaml",  # short LCPO run
    "examples/train_compress.yaml",  # LC-R1 compression
    "examples/train_route.yaml",  # kb_agent step policy
    "benchmarks/train_effort.yaml",  # the issue-8 benchmark
])
def test_shipped_configs_validate(path: str) -> None:
    from budgetlm.training import RECIPES

    root = Path(__file__).resolve().parents[1]
    cfg = TrainConfig.from_yaml(root / path)
    RECIPES.get(cfg.recipe)(cfg.recipe_params)  # the recipe block validates too
