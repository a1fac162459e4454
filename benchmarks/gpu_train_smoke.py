"""GPU check of the training module's CUDA path: fp16 GRPO steps, resume, LoRA and the evaluation, on a GPU.

Run on a machine with a CUDA GPU:  python benchmarks/gpu_train_smoke.py --tokenizer DIR [--out FILE]

``DIR`` holds the default model's tokenizer (no weights: a random 4-layer Llama is built on it, so
nothing is downloaded).  With ``device: auto`` the training config must resolve to the GPU path
(CUDA, fp16 training; vLLM generation when vLLM is installed, else transformers generation), then:

1. the ``effort`` recipe (LCPO-Exact) runs 3 real GRPO steps on a JSONL arithmetic suite, and the
   logged reward and completion lengths come back from TRL;
2. a second call with ``max_steps: 4`` resumes from ``checkpoint-3``;
3. the trained model is evaluated against the base model through the evaluation runner on the GPU
   (transformers backend);
4. a LoRA run (``lora: {r: 8}``) takes 2 fp16 steps and saves a merged model;
5. the fp16 view for colocated vLLM rollouts is written (config says float16, weights linked).

Prints and writes a JSON summary with the GPU's name, peak memory and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def _suite(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            fh.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--work", default="/tmp/gpu_train_smoke")
    ap.add_argument("--out", default="gpu_train_smoke.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from budgetlm.training import TrainConfig, resolve_device, run, train
    from budgetlm.training.grpo import _fp16_view, read_log
    from budgetlm.versions import library_versions

    assert torch.cuda.is_available(), "no CUDA GPU"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model_dir = work / "tiny"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    _suite(work / "train.jsonl", 64, 0)
    _suite(work / "test.jsonl", 8, 1)

    base = dict(recipe="effort", recipe_params={"mode": "exact", "target_range": [8, 32], "grader": "numeric"},
                model=str(model_dir), suite=f"jsonl:{work / 'train.jsonl'}?grader=numeric", device="auto",
                max_completion_length=32, per_device_train_batch_size=8, save_steps=1, seed=0,
                eval={"suite": f"jsonl:{work / 'test.jsonl'}?grader=numeric", "limit": 8, "backend": "hf",
                      "max_tokens": 48})
    summary: dict = {"gpu": torch.cuda.get_device_name(0), "versions": library_versions()}
    device = resolve_device(TrainConfig(**base))
    summary["resolved_device"] = device
    assert device["device"] == "gpu" and device["fp16"], device

    out = work / "run"
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first = train(TrainConfig(**base, max_steps=3), out, progress=False)
    summary["train_3_steps_s"] = time.perf_counter() - t0
    state = json.loads((out / "train.json").read_text())
    summary["grpo_flags"] = {k: state["grpo_config"][k] for k in ("fp16", "bf16", "use_cpu", "use_vllm")}
    assert summary["grpo_flags"]["fp16"] and not summary["grpo_flags"]["use_cpu"]
    logged = [e for e in first.log_history if "reward" in e]
    assert [e["step"] for e in logged] == [1, 2, 3], logged
    summary["logged"] = [{k: e[k] for k in ("step", "reward", "completions/mean_length", "step_time")} for e in logged]

    res = run(TrainConfig(**base, max_steps=4), out, progress=False)
    summary["resumed_from"] = res.train.resumed_from
    assert res.train.resumed_from and res.train.resumed_from.endswith("checkpoint-3") and res.train.steps == 4
    summary["comparison"] = res.comparison["overall"]
    assert set(res.comparison["overall"]) == {"base", "trained"}
    summary["steps_logged_after_resume"] = [e["step"] for e in read_log(out / "train_log.jsonl") if "reward" in e]

    lora = train(TrainConfig(**base, max_steps=2, lora={"r": 8, "alpha": 16}), work / "lora", progress=False)
    merged = LlamaForCausalLM.from_pretrained(lora.model_dir)
    summary["lora_steps"] = lora.steps
    summary["lora_merged"] = not any("lora" in n for n, _ in merged.named_parameters())
    assert summary["lora_merged"]

    view = _fp16_view(model_dir, work / "fp16_view")
    summary["fp16_view_dtype"] = json.loads((view / "config.json").read_text())["dtype"]
    summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    print("OK")


if __name__ == "__main__":
    main()
