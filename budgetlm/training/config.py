"""The training config: what ``budgetlm train CONFIG.yaml`` runs, validated at construction.

A minimal YAML::

    recipe: effort
    recipe_params: {mode: exact, target_range: [16, 96]}
    suite: reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=200&split=calibration
    max_steps: 100

Everything else has defaults for a small model on a CPU (fp32, transformers generation, 4
completions per prompt).  On a GPU (``device: auto`` finds one) generation defaults to vLLM in
colocate mode and training to fp16 (ALGORITHMS.md §9, arXiv 2510.26788).  Any other
:class:`trl.GRPOConfig` field goes into ``grpo:``; unknown names there are an error listing the
closest valid ones.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from budgetlm.config import Config

__all__ = ["LoraSpec", "TrainConfig", "TrainEvalSpec"]


class LoraSpec(Config):
    """LoRA adapters (peft) instead of full fine-tuning; merged into the saved model at the end."""

    model_config = ConfigDict(extra="forbid")
    _prefix: ClassVar[str] = "lora"

    r: int = Field(default=16, ge=1, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(default=0.0, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(default="all-linear", description="Modules to adapt (peft's names or 'all-linear').")


class TrainEvalSpec(Config):
    """The evaluation after training: trained vs base model through ``budgetlm eval``."""

    model_config = ConfigDict(extra="forbid")

    _prefix: ClassVar[str] = "eval"

    enabled: bool = Field(default=True, description="Run the evaluation after training.")
    suite: str | dict[str, Any] | None = Field(default=None, description="Suite to evaluate on; None: the training suite with split=test.")
    limit: int | None = Field(default=100, ge=1, description="Evaluate on the first `limit` items (None: all).")
    max_tokens: int | None = Field(default=None, ge=1, description="Output-token budget per item; None: 2 × max_completion_length.")
    backend: Literal["auto", "vllm", "hf"] = Field(default="auto", description="Backend that loads both checkpoints (auto: vLLM when installed).")
    batch_size: int = Field(default=64, description="Items per evaluation batch.")


class TrainConfig(Config):
    """What ``budgetlm train`` runs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="train", description="Run name (reports).")
    recipe: str = Field(description="Recipe name: effort, compress, route or dpo (see `budgetlm.training.RECIPES`).")
    recipe_params: dict[str, object] = Field(default_factory=dict, description="The recipe's parameters (validated by the recipe).")
    model: str = Field(default="default", description="Model to train: 'default', a checkpoint directory, or hf:/vllm:PATH.")
    suite: str | dict[str, Any] = Field(description="Suite whose items become training prompts (use a split disjoint from the evaluation).")
    seed: int = Field(default=0, description="Seed of data sampling, targets and training.")
    max_steps: int = Field(default=50, ge=1, description="Optimizer steps.")
    num_generations: int = Field(default=4, ge=1, description="Completions per prompt (GRPO's group size).")
    per_device_train_batch_size: int = Field(default=4, ge=1, description="Completions per process and micro-batch; × processes × gradient_accumulation_steps must be a multiple of num_generations.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_completion_length: int = Field(default=128, ge=1, description="Generation limit in tokens.")
    learning_rate: float = Field(default=1e-5, gt=0, description="AdamW learning rate.")
    temperature: float = Field(default=1.0, gt=0, description="Rollout sampling temperature.")
    beta: float = Field(default=0.0, ge=0, description="KL coefficient (0: no reference model, TRL's default).")
    max_minutes: float | None = Field(default=None, gt=0, description="Stop (and checkpoint) after this much training time; resuming continues.")
    save_steps: int = Field(default=25, ge=1, description="Checkpoint every this many steps.")
    save_total_limit: int | None = Field(default=2, description="Keep at most this many checkpoints (None: all).")
    logging_steps: int = Field(default=1, ge=1, description="Log metrics every this many steps.")
    device: Literal["auto", "cpu", "gpu"] = Field(default="auto", description="cpu: fp32 + transformers generation; gpu: CUDA.")
    use_vllm: bool | None = Field(default=None, description="Generate with vLLM (None: on GPU when vLLM is installed).")
    vllm_mode: Literal["colocate", "server"] = Field(default="colocate", description="vLLM in the trainer's process or a `trl vllm-serve` server.")
    vllm_server_base_url: str | None = Field(default=None, description="URL of the `trl vllm-serve` server (server mode).")
    vllm_gpu_memory_utilization: float = Field(default=0.3, gt=0, le=1, description="GPU memory share of the colocated vLLM engine.")
    fp16: bool | None = Field(default=None, description="fp16 training and fp16 rollouts (None: on GPU).")
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters instead of all weights.")
    grpo: dict[str, object] = Field(default_factory=dict, description="Further trl.GRPOConfig fields (override the above).")
    eval: TrainEvalSpec = Field(default_factory=TrainEvalSpec, description="The evaluation after training.")

    @model_validator(mode="after")
    def _groups(self) -> TrainConfig:
        if self.num_generations < 2:
            raise ValueError(f"`num_generations` must be >= 2 (GRPO compares completions of one prompt), "
                             f"got {self.num_generations}")
        # per_device_train_batch_size × processes × steps must hold whole groups: checked when training starts
        # (budgetlm.training.grpo.check_batch), where the number of processes is known
        if self.vllm_mode == "server" and self.use_vllm is False:
            raise ValueError("`vllm_mode: server` needs `use_vllm: true` (or null), got use_vllm=false")
        return self

    def digest(self) -> str:
        """A hash of everything that changes the trained model (not the name, steps or evaluation).

        ``max_steps`` is left out so that a finished run can be continued for more steps.
        """
        d = self.model_dump(exclude={"name", "max_steps", "max_minutes", "eval", "save_steps", "save_total_limit", "logging_steps"})
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
