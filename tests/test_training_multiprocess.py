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
import socket
import subprocess
import sys
from pathlib import Path

import multiprocess_rewards as mp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _config(tmp_path: Path, tiny_model_path: Path) -> Path:
    """The effort recipe (e1, a group-wise reward) on the tiny model: 2 completions per process, so each
    group of 4 spans both processes."""
    path = tmp_path / "train.yaml"
    path.write_text(f"""\
recipe: effort
recipe_params: {{mode: effort, efforts: [0.5, 1.0], count: completion}}
model: {tiny_model_path}
suite: reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=8&seed=1&split=calibration&test_size=8
max_steps: 2
save_steps: 1
num_generations: 4
per_device_train_batch_size: 2
max_completion_length: 8
device: cpu
eval: {{limit: 1, backend: hf, max_tokens: 8}}
""")
    return path


def _launch(config: Path, out: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           "-m", "budgetlm.cli", "train", str(config), "--out", str(out), "--no-progress", *extra]
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-6000:]
    return " ".join(output.split())


@pytest.mark.slow
def test_accelerate_launch_two_processes_trains_checkpoints_and_resumes(tmp_path: Path, tiny_model_path: Path) -> None:
    config, out = _config(tmp_path, tiny_model_path), tmp_path / "run"
    text = _launch(config, out)
    # two processes trained; only the main one reported, evaluated and wrote the run folder
    assert "process 1 of 2: training done" in text
    assert text.count("trained: 2 steps") == 1 and "trained vs base" in text
    state = json.loads((out / "train.json").read_text())
    assert (state["processes"], state["steps"], state["status"]) == (2, 2, "done")
    assert state["grpo_config"]["generation_batch_size"] == 4  # 2 per process × 2 processes: one group
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (ck / "checkpoint-2" / "rng_state_0.pth").exists() and (ck / "checkpoint-2" / "rng_state_1.pth").exists()
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "reward" in e] == [1, 2]  # one entry per step, not one per process
    assert all("rewards/effort/mean" in e for e in logged if "reward" in e)
    assert (out / "model" / "config.json").exists() and (out / "report" / "train_report.html").exists()
    assert {r["model"] for r in json.loads((out / "comparison.json").read_text())["rows"]} == {"base", "trained"}
    # one more step: both processes resume from the last checkpoint
    text = _launch(config, out, "--max-steps", "3")
    assert "trained: 3 steps (resumed from" in text
    state = json.loads((out / "train.json").read_text())
    assert state["steps"] == 3 and state["resumed_from"].endswith("checkpoint-2")
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "reward" in e] == [1, 2, 3]


@pytest.mark.parametrize(("name", "kind", "stage"), [
    ("cpu_2proc", "MULTI_GPU", None),  # torchrun's launcher; `device: cpu` makes it gloo
    ("multi_gpu", "MULTI_GPU", None),
    ("deepspeed_zero2", "DEEPSPEED", 2),
    ("deepspeed_zero3", "DEEPSPEED", 3),
])
def test_shipped_accelerate_configs_load(name: str, kind: str, stage: int | None) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(ROOT / "examples" / "accelerate" / f"{name}.yaml"))
    assert str(c.distributed_type).endswith(kind) and c.num_processes >= 2 and not c.use_cpu
    assert (c.deepspeed_config or {}).get("zero_stage") == stage
