"""Several training processes: group-wise rewards see whole groups, and ``budgetlm train`` under ``accelerate launch``.

* The group-reward equality: two gloo processes each hold the share of a batch that TRL's
  ``RepeatSampler`` and accelerate's dataloader give them, with one prompt's group split between
  them; every group-wise reward (Kimi, LC-R1 length, e1 group and EMA) must give exactly the values
  one process gives on the whole batch, over two steps (the EMA state must agree too), while scoring
  only the local share gives different values (so the test fails without the gathering).
* ``accelerate launch --multi_gpu --num_processes 2`` (torchrun; the config's ``device: cpu`` makes it
  gloo on the CPU) of ``budgetlm train`` with the ``effort`` recipe on the tiny model: two steps,
  checkpoints, then a resumed run for a third step (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import multiprocess_rewards as mp
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def trl_split(n_prompts: int, world: int) -> list[list[int]]:
    """The row indices each process gets: TRL's RepeatSampler order, batched and sharded as accelerate does."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler
    from trl.trainer.utils import RepeatSampler

    order = list(RepeatSampler(list(range(n_prompts)), mini_repeat_count=mp.NUM_GENERATIONS,
                               batch_size=n_prompts, repeat_count=1, shuffle=False))
    seen: dict[int, int] = {}
    row_ids = []  # the k-th completion of prompt p is row p * NUM_GENERATIONS + k of mp.rows()
    for p in order:
        row_ids.append(p * mp.NUM_GENERATIONS + seen.get(p, 0))
        seen[p] = seen.get(p, 0) + 1
    out = []
    for rank in range(world):
        batches = list(BatchSamplerShard(BatchSampler(row_ids, mp.PER_DEVICE, drop_last=False),
                                         num_processes=world, process_index=rank))
        assert len(batches) == 1
        out.append(batches[0])
    return out


def test_group_rewards_with_two_processes_equal_one_process(tmp_path: Path) -> None:
    split = trl_split(len(mp.PROMPTS), 2)
    # TRL's split gives process 0 rows 0..5 and process 1 rows 6..11: the second prompt's group is cut in two
    assert split == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]], split
    (tmp_path / "split.json").write_text(json.dumps(split))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(Path(mp.__file__)), str(r), "2", str(port), str(tmp_path / "split.json"),
                               str(tmp_path / f"rank{r}.json")], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    single = mp.build()  # one process, the whole batch, the same two steps
    differs: set[str] = set()
    for step in (1, 2):
        batch = mp.rows(step)
        for label in mp.SPECS:
            key = f"{label}@{step}"
            want = mp.call(single[label], batch)
            got = results[0]["gathered"][key] + results[1]["gathered"][key]
            assert got == want, (key, got, want)  # exactly equal, not approximately
            if results[0]["local"][key] + results[1]["local"][key] != want:
                differs.add(label)
    # without the gathering every group-wise reward gets other values; per-completion rewards do not
    assert differs == set(mp.GROUP_WISE), differs
    # the e1 EMA state is the same on both processes and equals the single process's
    want_ema = {str(k): v for k, v in single["effort_ema"].ema.items()}
    assert results[0]["ema"] == results[1]["ema"] == want_ema
    assert results[0]["local_ema"] != want_ema
