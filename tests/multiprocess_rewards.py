"""Helper of ``test_training_multiprocess.py``: a batch whose groups TRL splits over two processes, and a worker.

Run as ``python multiprocess_rewards.py RANK WORLD PORT SPLIT.json OUT.json``: joins a gloo process
group on 127.0.0.1:PORT, takes the rows ``SPLIT.json`` assigns to RANK (the split TRL's sampler and
accelerate's dataloader make), calls every reward of :data:`SPECS` on them the way TRL does — one
call per step, all processes together — and writes, per reward and step, the values it got
(``gathered``) and the values of scoring only its local rows (``local``, what a reward without the
gathering would give).
"""

from __future__ import annotations

import json
import sys
from typing import Any

NUM_GENERATIONS = 4
"""Completions per prompt."""
PER_DEVICE = 6
"""Completions per process and step: not a multiple of NUM_GENERATIONS, so the middle group is split."""

SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "kimi_length": ("kimi_length", {}),
    "lcr1_length": ("lcr1_length", {}),
    "effort_group": ("effort", {"length": "completion"}),
    "effort_group_thinking": ("effort", {"length": "thinking"}),
    "effort_ema": ("effort", {"mode": "ema", "length": "completion", "ema_decay": 0.5}),
    "lcr1_compress": ("lcr1_compress", {}),  # per completion: the same either way
    "lcpo_exact": ("lcpo_exact", {"alpha": 0.01}),
}
"""Reward label → (registered name, parameters)."""
GROUP_WISE = ("kimi_length", "lcr1_length", "effort_group", "effort_group_thinking", "effort_ema")
"""The labels whose values must change when a group is seen only in part."""

# per prompt: (answer, effort, target tokens, [(completion length in tokens, thinking words, correct?)] × 4)
PROMPTS: list[tuple[str, float, int, list[tuple[int, int, bool]]]] = [
    ("7", 0.5, 10, [(6, 3, True), (12, 8, True), (18, 12, False), (9, 5, True)]),
    ("12", 0.5, 10, [(5, 2, True), (9, 6, True), (20, 14, True), (30, 25, False)]),
    ("3", 1.0, 20, [(8, 4, True), (8, 4, False), (16, 10, True), (4, 1, True)]),
]


def rows(step: int) -> list[dict[str, Any]]:
    """Every completion of one step in TRL's layout (a prompt's completions next to each other).

    Step 2 has other lengths, so the e1 EMA moves between the steps.
    """
    out = []
    for p, (answer, effort, target, comps) in enumerate(PROMPTS):
        for length, words, correct in comps:
            length += 3 * (step - 1) * (p + 1)
            thinking = " ".join(answer if correct and w == words // 2 else f"x{w}" for w in range(words))
            reply = answer if correct else str(int(answer) + 1)
            out.append({"prompt_id": f"p{p}", "answer": answer, "effort": effort, "target_tokens": target,
                        "completion": f"<think>{thinking}</think>The answer is {reply}.",
                        "completion_ids": list(range(length))})
    return out


def call(reward: Any, batch: list[dict[str, Any]]) -> list[float | None]:
    """The reward called as TRL's GRPOTrainer calls it (columns as lists, plus TRL's extra keywords)."""
    columns = {k: [r[k] for r in batch] for k in ("prompt_id", "answer", "effort", "target_tokens")}
    return reward(prompts=[[{"role": "user", "content": "q"}]] * len(batch),
                  completions=[[{"role": "assistant", "content": r["completion"]}] for r in batch],
                  completion_ids=[r["completion_ids"] for r in batch], trainer_state=None,
                  log_extra=None, log_metric=None, **columns)


def build() -> dict[str, Any]:
    """A fresh instance of every reward of :data:`SPECS`."""
    from budgetlm import rewards

    return {label: rewards.get(name, **params) for label, (name, params) in SPECS.items()}


def main(rank: int, world: int, port: int, split_path: str, out_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    split: list[list[int]] = json.loads(open(split_path).read())[rank]
    gathered, local = build(), build()
    result: dict[str, dict[str, list[Any]]] = {"gathered": {}, "local": {}}
    for step in (1, 2):
        mine = [rows(step)[i] for i in split]
        for label in SPECS:
            result["gathered"][f"{label}@{step}"] = call(gathered[label], mine)
            from budgetlm.rewards import RewardBatch

            reward = local[label]
            batch = RewardBatch([r["completion"] for r in mine], [r["completion_ids"] for r in mine],
                                {k: [r[k] for r in mine] for k in ("prompt_id", "answer", "effort", "target_tokens")},
                                reward.thinking)
            result["local"][f"{label}@{step}"] = reward.score(batch)  # no gathering: the local share only
    result["ema"] = {str(k): v for k, v in gathered["effort_ema"].ema.items()}  # type: ignore[assignment]
    result["local_ema"] = {str(k): v for k, v in local["effort_ema"].ema.items()}  # type: ignore[assignment]
    with open(out_path, "w") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
