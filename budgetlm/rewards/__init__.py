"""Length, effort, compression and routing rewards in TRL's reward-function form (ALGORITHMS.md §9).

Each reward is a picklable callable ``reward(prompts=, completions=, completion_ids=, **columns)``
returning one float per completion, named (``__name__``) for TRL's logs::

    from budgetlm import rewards
    from trl import GRPOTrainer

    funcs = [rewards.Correctness(), rewards.get("lcpo_exact", alpha=0.0003)]
    trainer = GRPOTrainer(model=..., reward_funcs=funcs, train_dataset=ds)  # ds: answer, target_tokens

Registered names (:data:`REWARDS`): ``correctness``, ``think_format`` (:mod:`.correctness`);
``lcpo_exact``, ``lcpo_max``, ``kimi_length``, ``dapo_overlong``, ``think_prune``,
``cosine_length`` (:mod:`.length`); ``effort`` (:mod:`.effort`); ``lcr1_length``,
``lcr1_compress`` (:mod:`.compress`); ``boundary_routing``, ``dual_efficiency``, ``route_choice`` (:mod:`.routing`).
Group-wise rewards (Kimi, e1, LC-R1) need a ``prompt_id`` column; with several training processes they
gather the whole batch so every group is whole (see :mod:`.base`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from budgetlm.errors import ConfigError
from budgetlm.registry import Registry
from budgetlm.rewards.base import RewardBatch, RewardFunction, completion_text, count_tokens, group_indices
from budgetlm.rewards.compress import LCR1Compress, LCR1Length, answer_end
from budgetlm.rewards.correctness import GRADER_NAMES, Correctness, GradedReward, ThinkFormat
from budgetlm.rewards.effort import EffortReward
from budgetlm.rewards.length import CosineLength, DAPOOverlong, KimiLength, LCPOExact, LCPOMax, ThinkPrune
from budgetlm.rewards.routing import BoundaryRoutingReward, DualEfficiency, RouteChoiceReward, boundary_class

__all__ = [
    "GRADER_NAMES", "REWARDS", "BoundaryRoutingReward", "CosineLength", "Correctness", "DAPOOverlong",
    "DualEfficiency", "EffortReward", "GradedReward", "KimiLength", "LCPOExact", "LCPOMax", "LCR1Compress",
    "LCR1Length", "RewardBatch", "RewardFunction", "RouteChoiceReward", "ThinkFormat", "ThinkPrune", "answer_end",
    "boundary_class", "completion_text", "count_tokens", "get", "group_indices", "names",
]

REWARDS: Registry[type[RewardFunction]] = Registry("reward")
"""Reward name → class."""
for _cls in (Correctness, ThinkFormat, LCPOExact, LCPOMax, KimiLength, DAPOOverlong, ThinkPrune, CosineLength,
             EffortReward, LCR1Length, LCR1Compress, BoundaryRoutingReward, DualEfficiency, RouteChoiceReward):
    REWARDS.register(_cls.default_name, _cls)


def get(name: str | RewardFunction | Mapping[str, Any], **params: Any) -> RewardFunction:
    """The reward ``name`` built with ``params`` (or a ``{"name": ..., "params": {...}}`` block).

    Unknown names list the registered ones; unknown or missing parameters list the valid ones.
    """
    if isinstance(name, RewardFunction):
        return name
    if isinstance(name, Mapping):
        block = dict(name)
        if not isinstance(block.get("name"), str):
            raise ConfigError(f"a reward block needs a `name` ({', '.join(REWARDS.names())}), got {block!r}")
        params = {**dict(block.get("params") or {}), **params}
        name = block["name"]
    cls = REWARDS.get(str(name))
    sig = inspect.signature(cls)
    valid = [k for k, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for reward {name!r}; "
                          f"valid: {', '.join(valid)}")
    missing = [k for k, p in sig.parameters.items() if p.default is p.empty and k not in params]
    if missing:
        raise ConfigError(f"reward {name!r} needs parameter(s) {', '.join(map(repr, missing))}; "
                          f"valid: {', '.join(valid)}")
    return cls(**params)


def names() -> list[str]:
    """Registered reward names."""
    return REWARDS.names()
