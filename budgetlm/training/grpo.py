"""Run a recipe on TRL's ``GRPOTrainer``: data, rewards, ``GRPOConfig``, checkpoints and resume.

:func:`train` does, in ``OUT``:

1. builds the recipe's rows from the suite (``OUT/dataset.jsonl``, the exact training data);
2. builds a :class:`trl.GRPOConfig` from the :class:`~budgetlm.training.config.TrainConfig`
   (CPU: ``use_cpu``, fp32, transformers generation; GPU: vLLM generation in colocate or server
   mode and fp16, ALGORITHMS.md §9) and runs :class:`trl.GRPOTrainer` with the recipe's rewards,
   checkpointing to ``OUT/checkpoints`` every ``save_steps``;
3. resumes from the newest checkpoint when ``OUT`` already holds one of the same config (a run of a
   different config is refused, so checkpoints are never mixed), and skips training that already
   finished (``max_steps`` reached, or stopped by the same ``max_minutes``: raise either to go on);
4. saves the trained model (LoRA adapters merged) with its tokenizer to ``OUT/model`` and every
   logged metric to ``OUT/train_log.jsonl``; ``OUT/train.json`` records the config, the recipe,
   the GRPOConfig, library versions and seeds.

**Several processes** (``accelerate launch --multi_gpu --num_processes N``, or a DeepSpeed config; see
``docs/scale-out.md``).  Every process runs :func:`train`; building the ``GRPOConfig``
initialises the process group, then the main process alone builds the rows (a recipe may run an
evaluation for them, as ``route`` does), writes ``dataset.jsonl``, ``train.json`` and
``train_log.jsonl``, deletes checkpoints for ``resume=False`` and saves the final model; the others
get the rows (or the error) from it (:func:`budgetlm.distributed.share`), so no file is written twice
and a failure on the main process fails every process instead of leaving them at a barrier.
Checkpoints are TRL's (the model and optimizer from the main process, one RNG state per process) and
resume with the same number of processes.  The time limit is the main process's clock, shared at
each step, so all processes stop at the same step.  ``per_device_train_batch_size × processes ×
steps_per_generation`` (TRL's generation batch) must be a multiple of ``num_generations``; a group
may then span two processes, and group-wise rewards gather the batch so they see it whole
(:mod:`budgetlm.rewards.base`).

**fp16 rollouts.**  TRL's colocated vLLM engine takes its dtype from the checkpoint's config, so
for ``fp16`` with ``vllm_mode: colocate`` the trainer reads the model through ``OUT/fp16_model``, a
directory of links to the checkpoint whose config says float16, while the trainer itself loads fp32
master weights (AMP fp16).  In server mode start the server with ``trl vllm-serve --dtype float16``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from budgetlm import distributed
from budgetlm.errors import ConfigError, MissingDependency
from budgetlm.evals import suites as suite_registry
from budgetlm.io import (
    JsonObject,
    JsonValue,
    append_jsonl,
    read_jsonl,
    repair_tail,
    write_json_atomic,
    write_jsonl_atomic,
)
from budgetlm.models import resolve_model_path
from budgetlm.training.base import RECIPES, Recipe, RecipeContext
from budgetlm.training.config import TrainConfig
from budgetlm.versions import library_versions

if TYPE_CHECKING:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from trl import GRPOConfig

__all__ = ["TrainDevice", "TrainOutcome", "build_dataset", "build_grpo_config", "check_batch", "model_path", "resolve_device",
           "train"]

log = logging.getLogger("budgetlm.training")


@dataclass
class TrainOutcome:
    """What :func:`train` produced."""

    output_dir: Path
    """The run directory."""
    model_dir: Path
    """The trained model (full weights and tokenizer)."""
    steps: int
    """Optimizer steps done in total (over resumes)."""
    resumed_from: str | None
    """The checkpoint training resumed from, if any."""
    log_history: list[JsonObject] = field(default_factory=list)
    """Every metric TRL logged (step, reward, completion length, loss, ...)."""
    skipped: bool = False
    """Training had already finished in ``output_dir``; nothing was trained."""
    stopped_by_time: bool = False
    """Training stopped at ``max_minutes`` before ``max_steps`` (re-run to continue)."""


def model_path(spec: str) -> Path:
    """The checkpoint directory of a model spec: ``default``, a path, ``hf:PATH`` or ``vllm:PATH``."""
    for prefix in ("hf:", "vllm:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix):]
    return resolve_model_path(spec)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class TrainDevice(TypedDict):
    """Where and how training runs, after the ``auto``/None defaults of :class:`TrainConfig` are applied."""

    device: Literal["cpu", "gpu"]
    use_vllm: bool
    """TRL generates with vLLM (GPU only)."""
    fp16: bool
    """Mixed precision (GPU only)."""


def resolve_device(cfg: TrainConfig) -> TrainDevice:
    """The :class:`TrainDevice` of ``cfg`` after applying the ``auto``/None defaults; errors for impossible mixes."""
    gpu = cfg.device == "gpu" or (cfg.device == "auto" and _cuda())
    if cfg.device == "gpu" and not _cuda():
        raise ConfigError("`device` must be 'cpu' or 'auto' on a machine without CUDA, got 'gpu'; "
                          "set device: cpu (fp32, transformers generation)")
    use_vllm = cfg.use_vllm if cfg.use_vllm is not None else (gpu and _vllm_installed())
    fp16 = cfg.fp16 if cfg.fp16 is not None else gpu
    if not gpu and use_vllm:
        raise ConfigError("`use_vllm` must be false on the CPU, got true: TRL's vLLM generation needs CUDA; "
                          "leave it null (transformers generation on CPU)")
    if not gpu and fp16:
        raise ConfigError("`fp16` must be false on the CPU, got true: train in fp32 there (ALGORITHMS.md §9)")
    return TrainDevice(device="gpu" if gpu else "cpu", use_vllm=bool(use_vllm), fp16=bool(fp16))


def trl_config_overrides(section: str, given: Mapping[str, object], config_cls: str) -> None:
    """Refuse entries of ``section`` (``grpo``, ``dpo``) that are not fields of ``trl.<config_cls>``, naming the
    closest field names."""
    import dataclasses

    try:
        import trl
    except ImportError as exc:
        raise MissingDependency("trl", f"{config_cls} training", extra="train") from exc
    fields = [f.name for f in dataclasses.fields(getattr(trl, config_cls))]
    unknown = [k for k in given if k not in fields]
    if unknown:
        hints = [f"{k!r} (did you mean {', '.join(difflib.get_close_matches(k, fields, 3)) or 'nothing close'}?)"
                 for k in unknown]
        raise ConfigError(f"`{section}` must hold trl.{config_cls} fields, got unknown {'; '.join(hints)}")


def launched_processes() -> int:
    """Processes this run was launched with: ``WORLD_SIZE`` (set by ``accelerate launch``/torchrun), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_batch(kw: dict[str, Any], processes: int) -> int:
    """TRL's generation batch (completions per generation round) for the GRPOConfig keywords ``kw`` and
    ``processes``; an error naming the parameters unless it holds whole groups of ``num_generations``."""
    groups = kw["num_generations"]
    per_device = kw["per_device_train_batch_size"]
    if kw.get("generation_batch_size") is not None:
        given = kw["generation_batch_size"]
        if given % groups:
            raise ConfigError(f"`grpo.generation_batch_size` must be a multiple of `num_generations` ({groups}), got "
                              f"{given}; TRL generates whole groups of num_generations completions per prompt")
        return int(given)
    steps = kw.get("steps_per_generation") or kw["gradient_accumulation_steps"]
    size: int = per_device * processes * steps
    if size % groups:
        raise ConfigError(
            f"`per_device_train_batch_size` × processes × steps_per_generation must be a multiple of "
            f"`num_generations` ({groups}), got {per_device} × {processes} × {steps} = {size}; TRL generates whole "
            f"groups of num_generations completions per prompt: set per_device_train_batch_size to a multiple of "
            f"{groups // math.gcd(groups, processes * steps)}, launch another number of processes, or change "
            f"num_generations")
    return size


def build_grpo_config(cfg: TrainConfig, recipe: Recipe, checkpoints: Path, device: TrainDevice) -> GRPOConfig:
    """The :class:`trl.GRPOConfig` for ``cfg`` (``cfg.grpo`` entries override the derived values)."""
    from trl import GRPOConfig

    trl_config_overrides("grpo", cfg.grpo, "GRPOConfig")
    kw: dict[str, Any] = {
        "output_dir": str(checkpoints),
        "max_steps": cfg.max_steps,
        "num_generations": cfg.num_generations,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_completion_length": cfg.max_completion_length,
        "learning_rate": cfg.learning_rate,
        "temperature": cfg.temperature,
        "beta": cfg.beta,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "report_to": "none",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "use_cpu": device["device"] == "cpu",
        "bf16": False,
        "fp16": device["fp16"],
        "use_vllm": device["use_vllm"],
        "reward_weights": recipe.reward_weights(),
        "model_init_kwargs": {"dtype": "float32"},
    }
    if device["use_vllm"]:
        kw["vllm_mode"] = cfg.vllm_mode
        if cfg.vllm_mode == "colocate":
            kw["vllm_gpu_memory_utilization"] = cfg.vllm_gpu_memory_utilization
        elif cfg.vllm_server_base_url:
            kw["vllm_server_base_url"] = cfg.vllm_server_base_url
    kw.update(cfg.grpo)
    check_batch(kw, launched_processes())
    try:
        return GRPOConfig(**kw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"trl.GRPOConfig rejected the training settings: {exc}; fix the matching field "
                          f"of the training config (or its `grpo:` block)") from None


def build_dataset(cfg: TrainConfig, recipe: Recipe, ctx: RecipeContext, prompts_per_step: int | None = None
                  ) -> list[JsonObject]:
    """The recipe's rows for the config's suite (seeded, so a resumed run trains on the same data).

    ``prompts_per_step``: prompts in one generation round (TRL's ``generation_batch_size /
    num_generations``); None: one process's ``per_device_train_batch_size × gradient_accumulation_steps
    / num_generations``.
    """
    suite = suite_registry.get(cfg.suite)
    items = suite.items()
    if not items:
        raise ConfigError(f"`suite` {cfg.suite!r} has no items; pick a suite with at least one problem")
    rows = recipe.build_rows(items, random.Random(cfg.seed), ctx)
    need = prompts_per_step or cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // cfg.num_generations
    if len(rows) < need:
        raise ConfigError(
            f"`suite` must give at least {need} training prompts (per_device_train_batch_size × processes × "
            f"gradient_accumulation_steps / num_generations), got {len(rows)} from {cfg.suite!r}; raise the suite's "
            f"size (a reasoning_gym calibration split drops problems shared with its test split: lower test_size "
            f"or widen the difficulty) or lower per_device_train_batch_size")
    return rows


def _fp16_view(src: Path, dst: Path) -> Path:
    """``dst``: links to ``src``'s files with a config that says float16 (what colocated vLLM loads)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if f.name == "config.json" or target.exists():
            continue
        target.symlink_to(f.resolve())
    conf = json.loads((src / "config.json").read_text())
    conf["dtype"] = conf["torch_dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(conf, indent=2))
    return dst


def _last_checkpoint(path: Path) -> str | None:
    if not path.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last: str | None = get_last_checkpoint(str(path))
    return last


class _State:
    """``train.json``: the run's identity and status."""

    def __init__(self, out: Path, cfg: TrainConfig) -> None:
        self.path = out / "train.json"
        self.cfg = cfg
        self.data: dict[str, Any] = {}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                self.data = {}
            old = self.data.get("digest")
            if old and old != cfg.digest():
                raise ConfigError(
                    f"{out} holds a training run of a different config (digest {old}, this config "
                    f"{cfg.digest()}); resuming would mix checkpoints. Use a new output directory or delete {out}")

    def write(self, **kw: object) -> None:
        self.data.update(kw)
        self.data["digest"] = self.cfg.digest()
        write_json_atomic(self.path, self.data)


TRAIN_LOG = "train_log.jsonl"
"""Every logged metric of a training run, one JSONL line each (the torn-line rule of :mod:`budgetlm.io`)."""


def _callback(log_path: Path) -> TrainerCallback:
    from transformers import TrainerCallback

    if distributed.is_main():
        repair_tail(log_path)  # a crash may have torn the last line: cut it off, so new entries start clean

    class MetricsLog(TrainerCallback):
        """Appends every log entry (with its step) to ``train_log.jsonl`` as training goes."""

        def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   logs: dict[str, float] | None = None, **kw: object) -> None:
            if logs and state.is_world_process_zero:
                append_jsonl(log_path, {"step": state.global_step, "epoch": state.epoch, **logs}, default=float)

    return MetricsLog()


def _time_limit(minutes: float) -> TrainerCallback:
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        """Checkpoints and stops once ``minutes`` of training have passed in this session."""

        def __init__(self) -> None:
            self.start = time.monotonic()
            self.hit = False

        def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: object) -> None:
            # the main process's clock decides for all, so every process stops at the same step
            if distributed.share(lambda: time.monotonic() - self.start >= 60 * minutes):
                self.hit = True
                control.should_save = True
                control.should_training_stop = True

    return TimeLimit()


def read_log(path: Path) -> list[JsonObject]:
    """The entries of ``train_log.jsonl``, the newest entry per (step, kind) kept after resumes.

    The torn-line rule of :mod:`budgetlm.io`: a torn last line (a crash mid-write) is left out, a
    bad line elsewhere raises :class:`~budgetlm.io.DamagedFileError` naming the file and line.
    """
    seen: dict[tuple[int, bool], JsonObject] = {}
    for e in read_jsonl(path, dict, what="a log entry"):
        seen[(int(e.get("step", 0)), "train_runtime" in e)] = e
    return [seen[k] for k in sorted(seen)]


def _save_final(trainer: Trainer, cfg: TrainConfig, out: Path) -> Path:
    """``OUT/model``, written by the main process (every process calls this; DeepSpeed gathers the weights)."""
    final = out / "model"
    tmp = out / "model.tmp"
    state_dict = None
    if getattr(trainer, "is_deepspeed_enabled", False) and cfg.lora is None:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective under ZeRO-3
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        model = trainer.model
        if cfg.lora is not None:
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        trainer.processing_class.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
    distributed.barrier()
    return final


def _write_rows(rows: list[JsonObject], path: Path) -> list[JsonObject]:
    write_jsonl_atomic(path, rows)
    return rows


def train(cfg: TrainConfig | str | Path, output_dir: str | Path, *, resume: bool = True,
          progress: bool = True) -> TrainOutcome:
    """Train ``cfg``'s recipe into ``output_dir`` (resuming when it holds a checkpoint of the same config).

    Under ``accelerate launch`` every process calls this; only the main process writes to ``output_dir``.
    """
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_yaml(cfg, what="training config")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = RECIPES.get(cfg.recipe)(cfg.recipe_params)
    device = resolve_device(cfg)
    state = _State(out, cfg)
    src = model_path(cfg.model)
    if not resume:
        state.data.pop("status", None)
    if resume and state.data.get("status") == "done" and (out / "model" / "config.json").exists() and (
            state.data.get("steps", 0) >= cfg.max_steps
            or (state.data.get("stop_reason", "").startswith("time") and state.data.get("max_minutes") == cfg.max_minutes)):
        return TrainOutcome(out, out / "model", int(state.data["steps"]), None, read_log(out / TRAIN_LOG),
                            skipped=True)

    checkpoints = out / "checkpoints"
    args = build_grpo_config(cfg, recipe, checkpoints, device)  # under accelerate launch: joins the process group
    args.disable_tqdm = not progress
    main = distributed.is_main()
    if distributed.world_size() > 1:
        log.info("process %d of %d (%s): %s", distributed.rank(), distributed.world_size(), args.device,
                 "writes the run folder" if main else "the main process writes the run folder")
    if not resume and main and checkpoints.exists():
        shutil.rmtree(checkpoints)
        (out / TRAIN_LOG).unlink(missing_ok=True)

    ctx = RecipeContext(model=cfg.model, output_dir=out, seed=cfg.seed, max_completion_length=cfg.max_completion_length,
                        extra={"suite": cfg.suite})
    per_step = args.generation_batch_size // args.num_generations
    # the main process builds the rows (and deletes old checkpoints first); the others wait and get them
    rows = distributed.share(lambda: _write_rows(build_dataset(cfg, recipe, ctx, per_step), out / "dataset.jsonl"))
    rewards = recipe.rewards(rows, ctx)  # lengths come from TRL's completion_ids

    import datasets
    from trl import GRPOTrainer

    model_id = str(src)
    if device["fp16"] and device["use_vllm"] and cfg.vllm_mode == "colocate":
        model_id = str(distributed.share(lambda: _fp16_view(src, out / "fp16_model")))
    peft_config = None
    if cfg.lora is not None:
        try:
            from peft import LoraConfig
        except ImportError as exc:
            raise MissingDependency("peft", "LoRA training", extra="train") from exc
        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    ds = datasets.Dataset.from_list(rows)
    last = _last_checkpoint(checkpoints) if resume else None
    if main:
        state.write(name=cfg.name, status="running", config=cfg.model_dump(), recipe=recipe.describe(), device=device,
                    model_path=str(src), rows=len(rows), seed=cfg.seed, versions=library_versions(),
                    grpo_config=args.to_dict(), started=state.data.get("started", time.time()), resumed_from=last,
                    processes=distributed.world_size())
    callbacks = [_callback(out / TRAIN_LOG)]
    if cfg.max_minutes is not None:
        callbacks.append(_time_limit(cfg.max_minutes))
    trainer = GRPOTrainer(model=model_id, reward_funcs=rewards, args=args, train_dataset=ds, peft_config=peft_config,
                          callbacks=callbacks)
    trainer.train(resume_from_checkpoint=last)
    final = _save_final(trainer, cfg, out)
    steps = int(trainer.state.global_step)
    timed_out = cfg.max_minutes is not None and callbacks[-1].hit
    if main:
        state.write(status="done", steps=steps, finished=time.time(), max_minutes=cfg.max_minutes,
                    stop_reason=f"time limit ({cfg.max_minutes} min)" if timed_out else "max_steps")
    distributed.barrier()  # train.json says done before any process moves on
    return TrainOutcome(out, final, steps, last, read_log(out / TRAIN_LOG), stopped_by_time=timed_out)


def finite(x: JsonValue) -> float | None:
    """``x`` as a float when it is a finite number, else None (for curves)."""
    if not isinstance(x, int | float | str):  # None, lists and objects: float() would raise TypeError
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
