"""The ``dpo`` recipe: step-level DPO on the pairs of a tree search, iterated on-policy (MCTS-DPO).

One iteration, in ``OUT/iter-K`` (K = 1, 2, ...):

1. **search** — the recipe's tree strategy (``bavt`` by default; ``beam``, ``rebase``, ``hyper``) runs
   on the training suite with the current policy through the resumable evaluation runner, into
   ``iter-K/search`` (iteration 1 may instead read an existing run folder, ``search_run``);
2. **pairs** — :mod:`budgetlm.training.preferences` turns its trees into step-level (chosen,
   rejected) pairs with the recipe's filters, rendered with the policy's chat template, in
   ``iter-K/pairs.jsonl`` (kept: a resumed iteration reuses it);
3. **DPO** — TRL's ``DPOTrainer`` trains the policy on them for ``max_steps`` steps (checkpoints in
   ``iter-K/checkpoints``, resumable), the reference model being the iteration's starting policy;
   the result is saved to ``iter-K/model``, which the next iteration searches with.

``OUT/model`` links to the last iteration's model; ``budgetlm train`` then evaluates it against
the base model (greedy decoding, on the evaluation suite: by default the training suite's ``test``
split, which the pairs never came from).  Every metric goes to ``OUT/train_log.jsonl`` with its
``iteration`` and a global step; ``OUT/train.json`` records each iteration's search, pair counts
and steps.

**CPU and GPU.**  As for the GRPO recipes (:func:`~budgetlm.training.grpo.resolve_device`): on the
CPU fp32 with ``use_cpu``; on a GPU fp16 by default (``fp16: false`` for fp32).  The search uses the
evaluation backends (``search_backend``: vLLM when installed, else transformers).  Under
``accelerate launch`` the main process runs the search and writes the pairs, the others receive
them (:func:`budgetlm.distributed.share`), and only the main process writes files.

**Our choices.**  Intermediate steps are trained without an end-of-sequence token (TRL's standard
format would append one to every completion): only a step that ended the reply keeps it
(:class:`StepDPOTrainer`).  ``TrainConfig.beta`` (GRPO's KL coefficient) is not used: DPO's β is
``recipe_params.beta``.  Resuming after raising ``max_steps`` continues the last iteration only.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from pydantic import Field, field_validator, model_validator

from budgetlm import distributed
from budgetlm.budget import check_limits
from budgetlm.errors import ConfigError, MissingDependency
from budgetlm.evals.config import EvalConfig, StrategySpec
from budgetlm.evals.rundir import RunDir
from budgetlm.evals.suites.base import EvalItem
from budgetlm.io import JsonObject
from budgetlm.rewards import RewardFunction
from budgetlm.training.base import RECIPES, Recipe, RecipeContext, RecipeParams
from budgetlm.training.config import TrainConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import (
        PreTrainedTokenizerBase,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from trl import DPOConfig

    from budgetlm.training.grpo import TrainDevice, TrainOutcome

from budgetlm.training.preferences import TREE_STRATEGIES, load_tokenizer, pair_rows, read_pairs, run_pairs, write_pairs

__all__ = ["DpoParams", "DpoRecipe", "build_dpo_config", "train"]

log = logging.getLogger("budgetlm.training")


class DpoParams(RecipeParams):
    """Parameters of the ``dpo`` recipe."""

    strategy: dict[str, Any] = Field(
        default_factory=lambda: {"name": "bavt", "params": {"width": 3, "step_tokens": 64, "temperature": 0.8, "scorer": "logprob"}},
        description="The tree search that makes the pairs: {name: bavt|beam|rebase|hyper, params: {...}} (default: bavt with logprob values, cheaper and better than the 135M model rating its own steps).")
    budget: dict[str, float] = Field(default_factory=lambda: {"output_tokens": 384.0},
                                     description="Per-problem budget of the search.")
    search_run: str | None = Field(default=None, description="An existing tree-search run folder to take iteration 1's pairs from (no search).")
    search_limit: int | None = Field(default=None, ge=1, description="Search the first `search_limit` items of the training suite (None: all).")
    search_backend: Literal["auto", "vllm", "hf"] = Field(default="auto", description="Backend of the search (auto: vLLM when installed).")
    batch_size: int = Field(default=16, ge=1, description="Problems searched at once.")
    value: Literal["outcome", "search"] = Field(default="outcome", description="Step value: mean graded outcome of the answers under a node, or the search's own value.")
    min_margin: float = Field(default=0.1, ge=0, le=1, description="Least value margin of a kept pair (pairs of equal value are never kept).")
    max_pairs_per_node: int | None = Field(default=1, ge=1, description="Most pairs per parent node, largest margin first (None: all).")
    dedup: bool = Field(default=True, description="Drop pairs repeating an earlier pair's texts, and pairs of identical steps.")
    beta: float = Field(default=0.1, gt=0, description="DPO's β (strength of the reference-model constraint); 0.1 is the usual value.")
    loss_type: str = Field(default="sigmoid", description="TRL DPO loss (sigmoid: the DPO paper's).")
    max_length: int | None = Field(default=1024, ge=1, description="Truncate prompt + step to this many tokens (None: no limit).")
    iterations: int = Field(default=1, ge=1, description="search → pairs → DPO rounds, each on the previous round's policy.")
    dpo: dict[str, object] = Field(default_factory=dict, description="Further trl.DPOConfig fields (override the derived ones).")

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: dict[str, Any]) -> dict[str, Any]:
        from budgetlm.strategies import get as get_strategy

        name = v.get("name")
        unknown = sorted(set(v) - {"name", "params"})
        if name not in TREE_STRATEGIES or unknown:
            raise ValueError(f"`strategy` must be {{name: one of {', '.join(TREE_STRATEGIES)}, params: {{...}}}}, got "
                             f"{v!r}; the pairs come from a tree search's nodes")
        get_strategy(name, **(v.get("params") or {}))  # unknown or invalid strategy parameters fail here
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("`budget` must set at least one limit, e.g. {output_tokens: 384}, got {}")
        return check_limits(v, "budget")

    @model_validator(mode="after")
    def _run(self) -> DpoParams:
        if self.search_run is not None and not RunDir(self.search_run).traces.exists():
            raise ValueError(f"`search_run` must be an evaluation run folder with traces.jsonl, got {self.search_run!r}; "
                             f"run `budgetlm eval` with a tree strategy ({', '.join(TREE_STRATEGIES)}) into it, or "
                             f"leave it null to search with the recipe's strategy")
        return self


class DpoRecipe(Recipe):
    """Step-level preference pairs from tree searches of the policy, trained with DPO."""

    name = "dpo"
    trainer = "dpo"
    """Which trainer runs the recipe (the pipeline dispatches on it; GRPO recipes have none)."""
    Params = DpoParams
    params: DpoParams

    def search_spec(self) -> StrategySpec:
        s = self.params.strategy
        return StrategySpec(name=s["name"], label=s["name"], params=dict(s.get("params") or {}),
                            budgets=[dict(self.params.budget)])

    def search_config(self, suite: str | dict[str, Any], model: str, seed: int) -> EvalConfig:
        """The search of one iteration: the tree strategy on ``suite`` with ``model``."""
        return EvalConfig(name="dpo-search", suites=[suite], models=[model], strategies=[self.search_spec()],
                          budgets=[dict(self.params.budget)], seed=seed, batch_size=self.params.batch_size,
                          limit=self.params.search_limit)

    def search_model(self, policy: str) -> str:
        """The backend spec that searches with ``policy`` (``default`` or a checkpoint directory)."""
        kind = self.params.search_backend
        if kind == "auto":
            kind = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
        if policy in ("default", "hf:default", "vllm:default"):
            return f"{kind}:default"
        from budgetlm.training.grpo import model_path

        return f"{kind}:{model_path(policy)}"

    def pairs(self, run_dir: Path, policy: str) -> tuple[list[JsonObject], JsonObject]:
        """DPO rows of a search run, rendered with ``policy``'s chat template, and the extraction's counts."""
        p = self.params
        pairs, stats = run_pairs(run_dir, min_margin=p.min_margin, max_pairs_per_node=p.max_pairs_per_node,
                                 dedup=p.dedup, value=p.value)
        if not pairs:
            raise ConfigError(
                f"no preference pairs left after filtering {run_dir}: {stats.describe()}; lower `min_margin` (now "
                f"{p.min_margin}), raise `max_pairs_per_node`, use `value: search`, or search wider (more items via "
                f"`search_limit`, more children per node, a higher temperature) so that sibling steps differ in value")
        from dataclasses import asdict

        return pair_rows(pairs, load_tokenizer(policy)), asdict(stats)

    def build_rows(self, items: Sequence[EvalItem], rng: random.Random, ctx: RecipeContext) -> list[JsonObject]:
        """The pairs of one search of ``ctx.model`` on ``ctx.extra['suite']`` (in ``ctx.output_dir/search``)."""
        from budgetlm.evals.runner import run_eval

        suite = ctx.extra.get("suite")
        if not isinstance(suite, str | dict):
            raise ConfigError(f"recipe 'dpo' needs the suite spec in `ctx.extra['suite']`, got {suite!r}; the search "
                              "runs on it")
        run = Path(self.params.search_run) if self.params.search_run else Path(ctx.output_dir) / "search"
        if self.params.search_run is None:
            run_eval(self.search_config(suite, self.search_model(ctx.model), ctx.seed), run, report=False, progress=False)
        return self.pairs(run, ctx.model)[0]

    def rewards(self, rows: Sequence[JsonObject], ctx: RecipeContext) -> list[RewardFunction]:
        return []  # DPO learns from the pairs, no reward function

    def eval_strategies(self, max_tokens: int) -> list[StrategySpec]:
        return [StrategySpec(name="sample", label="greedy", params={"temperature": 0.0, "max_tokens": max_tokens})]


RECIPES.register("dpo", DpoRecipe)


# ----------------------------------------------------------------------------- training
def build_dpo_config(cfg: TrainConfig, params: DpoParams, checkpoints: Path, device: TrainDevice) -> DPOConfig:
    """The :class:`trl.DPOConfig` of one iteration (``recipe_params.dpo`` entries override the derived values)."""
    from trl import DPOConfig

    from budgetlm.training.grpo import trl_config_overrides

    trl_config_overrides("dpo", params.dpo, "DPOConfig")
    kw: dict[str, object] = {
        "output_dir": str(checkpoints), "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "learning_rate": cfg.learning_rate,
        "beta": params.beta, "loss_type": [params.loss_type], "max_length": params.max_length,
        "logging_steps": cfg.logging_steps, "save_strategy": "steps", "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit, "report_to": "none", "seed": cfg.seed, "data_seed": cfg.seed,
        "use_cpu": device["device"] == "cpu", "bf16": False, "fp16": device["fp16"],
        "model_init_kwargs": {"dtype": "float32"},
    }
    kw.update(params.dpo)
    try:
        return DPOConfig(**kw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"trl.DPOConfig rejected the training settings: {exc}; fix the matching field of the "
                          f"training config (or recipe_params.dpo)") from None


class _StepPair(TypedDict):
    """The columns of a pairs row that :class:`StepDPOTrainer` tokenizes."""

    prompt: str
    chosen: str
    rejected: str
    chosen_terminal: bool
    rejected_terminal: bool


class IterationInfo(TypedDict):
    """One iteration's entry in ``train.json`` (``iterations``)."""

    iteration: int
    policy: str
    """The model the iteration started from (and searched with)."""
    pairs: int
    pair_stats: JsonObject
    """The pair extraction's counts (:class:`~budgetlm.training.preferences.PairStats`) and the search run."""
    steps: int
    resumed_from: str | None
    stopped_by_time: bool


def _step_trainer() -> type:
    """:class:`trl.DPOTrainer` that appends the end-of-sequence token only to steps that ended the reply."""
    from trl import DPOTrainer

    class StepDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Dataset, processing_class: PreTrainedTokenizerBase, args: DPOConfig,
                             dataset_name: str) -> Dataset:
            tok = getattr(processing_class, "tokenizer", processing_class)
            eos = tok.eos_token or ""

            def ids(text: str) -> list[int]:
                return list(processing_class(text=text)["input_ids"])

            def tokenize(ex: _StepPair) -> dict[str, list[int]]:
                prompt = ids(ex["prompt"])
                chosen = ids(ex["prompt"] + ex["chosen"] + (eos if ex["chosen_terminal"] else ""))
                rejected = ids(ex["prompt"] + ex["rejected"] + (eos if ex["rejected_terminal"] else ""))
                n = 0  # where prompt and prompt+step diverge (tokens may merge across the boundary)
                while n < len(prompt) and n < len(chosen) and n < len(rejected) and prompt[n] == chosen[n] == rejected[n]:
                    n += 1
                return {"prompt_ids": prompt[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]}

            dataset = dataset.map(tokenize, remove_columns=dataset.column_names, desc=f"Tokenizing {dataset_name} steps")
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
            return dataset

    return StepDPOTrainer


def _log_callback(log_path: Path, iteration: int, offset: int) -> TrainerCallback:
    from transformers import TrainerCallback

    class MetricsLog(TrainerCallback):
        """Appends every log entry to ``train_log.jsonl`` with its iteration and a step counted over iterations."""

        def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   logs: dict[str, float] | None = None, **kw: object) -> None:
            if logs and state.is_world_process_zero:
                entry = {"step": offset + state.global_step, "iteration": iteration, "iteration_step": state.global_step,
                         "epoch": state.epoch, **logs}
                with log_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry, default=float) + "\n")

    return MetricsLog()


def _link_model(out: Path, target: Path) -> Path:
    link = out / "model"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target.relative_to(out), target_is_directory=True)
    return link


def _iteration_pairs(recipe: DpoRecipe, cfg: TrainConfig, it_dir: Path, k: int, policy: str, resume: bool
                     ) -> tuple[list[JsonObject], JsonObject]:
    """Iteration ``k``'s pairs (main process): reused from ``pairs.jsonl``, else searched and extracted."""
    from budgetlm.evals.runner import run_eval

    path = it_dir / "pairs.jsonl"
    stats_path = it_dir / "pairs_stats.json"
    if resume and path.exists() and stats_path.exists():
        return read_pairs(path), json.loads(stats_path.read_text())
    if k == 1 and recipe.params.search_run:
        run = Path(recipe.params.search_run)
    else:
        run = it_dir / "search"
        ecfg = recipe.search_config(cfg.suite, recipe.search_model(policy), cfg.seed + k - 1)
        log.info("dpo iteration %d: searching %s with %s", k, cfg.suite, ecfg.models[0])
        run_eval(ecfg, run, report=False, progress=False)
    rows, stats = recipe.pairs(run, policy)
    stats["search_run"] = str(run)
    write_pairs(rows, path)
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    return rows, stats


def train(cfg: TrainConfig | str | Path, output_dir: str | Path, *, resume: bool = True, progress: bool = True) -> TrainOutcome:
    """Run the ``dpo`` recipe's iterations into ``output_dir`` (resuming what it holds); a
    :class:`~budgetlm.training.grpo.TrainOutcome` whose ``model_dir`` is the last iteration's model."""
    from budgetlm.training.grpo import (
        TrainOutcome,
        _last_checkpoint,
        _save_final,
        _State,
        _time_limit,
        model_path,
        read_log,
        resolve_device,
    )
    from budgetlm.versions import library_versions

    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.from_yaml(cfg, what="training config")
    recipe = RECIPES.get(cfg.recipe)(cfg.recipe_params)
    if not isinstance(recipe, DpoRecipe):
        raise ConfigError(f"`recipe` must be 'dpo' for the DPO trainer, got {cfg.recipe!r}")
    p = recipe.params
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.model_copy(update={"use_vllm": False}))  # DPO generates nothing in the trainer
    # validates the DPOConfig fields before any search, and under accelerate launch joins the process group,
    # so that is_main() below tells the processes apart
    build_dpo_config(cfg, p, out / "iter-1" / "checkpoints", device)
    state = _State(out, cfg)
    main = distributed.is_main()
    if not resume and main:
        for d in out.glob("iter-*"):
            shutil.rmtree(d)
        (out / "train_log.jsonl").unlink(missing_ok=True)
        state.data = {}
    done = state.data.get("status") == "done" and (out / "model" / "config.json").exists()
    if resume and done and state.data.get("steps_per_iteration", 0) >= cfg.max_steps and (
            state.data.get("iterations_done", 0) >= p.iterations):
        return TrainOutcome(out, out / "model", int(state.data.get("steps", 0)), None, read_log(out / "train_log.jsonl"),
                            skipped=True)
    if main:
        state.write(name=cfg.name, status="running", config=cfg.model_dump(), recipe=recipe.describe(), device=device,
                    model_path=str(model_path(cfg.model)), seed=cfg.seed, versions=library_versions(),
                    started=state.data.get("started", time.time()), processes=distributed.world_size())
    iters: list[IterationInfo] = list(state.data.get("iterations", []))
    policy = cfg.model
    total, first_resume, timed_out, final = 0, None, False, out / "model"
    for k in range(1, p.iterations + 1):
        it_dir = out / f"iter-{k}"
        frozen = (out / f"iter-{k + 1}").exists() and (it_dir / "model" / "config.json").exists()
        if frozen:  # a later iteration started from this model: never train it further
            policy, final = str(it_dir / "model"), it_dir / "model"
            total += int(next((i["steps"] for i in iters if i["iteration"] == k), cfg.max_steps))
            continue
        if main:
            it_dir.mkdir(parents=True, exist_ok=True)
        def pairs_of(k: int = k, d: Path = it_dir, pol: str = policy) -> tuple[list[JsonObject], JsonObject]:
            return _iteration_pairs(recipe, cfg, d, k, pol, resume)

        rows, stats = distributed.share(pairs_of)
        if main:
            log.info("dpo iteration %d: %d pairs (%s)", k, len(rows), stats)
        checkpoints = it_dir / "checkpoints"
        last = _last_checkpoint(checkpoints) if resume else None
        args = build_dpo_config(cfg, p, checkpoints, device)
        args.disable_tqdm = not progress
        steps_before = int(last.rsplit("-", 1)[-1]) if last else 0
        if resume and (it_dir / "model" / "config.json").exists() and steps_before >= cfg.max_steps:
            policy, final = str(it_dir / "model"), it_dir / "model"
            total += steps_before
            continue
        first_resume = first_resume or last
        import datasets

        cols = ["prompt", "chosen", "rejected", "chosen_terminal", "rejected_terminal"]
        ds = datasets.Dataset.from_list([{c: r[c] for c in cols} for r in rows])
        peft_config = None
        if cfg.lora is not None:
            try:
                from peft import LoraConfig
            except ImportError as exc:
                raise MissingDependency("peft", "LoRA training", extra="train") from exc
            peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                     target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
        callbacks = [_log_callback(out / "train_log.jsonl", k, (k - 1) * cfg.max_steps)]
        if cfg.max_minutes is not None:
            callbacks.append(_time_limit(cfg.max_minutes))
        src = model_path(policy)
        trainer = _step_trainer()(model=str(src), args=args, train_dataset=ds, peft_config=peft_config,
                                  callbacks=callbacks)
        trainer.train(resume_from_checkpoint=last)
        final = _save_final(trainer, cfg, it_dir)
        steps = int(trainer.state.global_step)
        total += steps
        timed_out = cfg.max_minutes is not None and callbacks[-1].hit
        iters = [i for i in iters if i["iteration"] != k] + [
            {"iteration": k, "policy": str(policy), "pairs": len(rows), "pair_stats": stats, "steps": steps,
             "resumed_from": last, "stopped_by_time": timed_out}]
        if main:
            state.write(iterations=iters)
        del trainer
        policy = str(final)
        if timed_out:
            break
    if main:
        _link_model(out, final)
        n_done = sum(1 for i in iters if i["steps"] >= cfg.max_steps)
        state.write(status="done", steps=total, steps_per_iteration=cfg.max_steps, iterations_done=n_done,
                    iterations=iters, finished=time.time(), max_minutes=cfg.max_minutes,
                    stop_reason=f"time limit ({cfg.max_minutes} min)" if timed_out else "max_steps")
    distributed.barrier()
    return TrainOutcome(out, out / "model", total, first_resume, read_log(out / "train_log.jsonl"),
                        stopped_by_time=timed_out)
