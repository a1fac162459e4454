"""GPU smoke check: the HF backend's CUDA path and NVML energy accounting, in one short run.

Run on a machine with a CUDA GPU:  python benchmarks/gpu_smoke.py --model DIR [--out FILE]

``DIR`` is any Llama-style checkpoint, or a folder holding only a tokenizer (``--tiny``: a random
2-layer model is built on it), so the check needs no download.  It verifies on the GPU that:
generation runs in bf16 with logprobs; ``score`` agrees with generation logprobs; a seed reproduces
the output; every call's ``Usage`` carries NVML-measured joules and the meter charges them against a
``joules`` budget; a ``wall_seconds`` budget stops generation at its deadline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tiny", action="store_true", help="build a random 2-layer Llama on the tokenizer in --model")
    ap.add_argument("--out", default="gpu_smoke.json")
    args = ap.parse_args()

    import torch

    import budgetlm
    from budgetlm.backends import GenerationRequest, SamplingParams
    from budgetlm.backends.hf import HFBackend

    assert torch.cuda.is_available(), "no CUDA GPU"
    model_dir = Path(args.model)
    if args.tiny:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(model_dir)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        torch.manual_seed(0)
        out_dir = Path("/tmp/tiny-gpu-model")
        LlamaForCausalLM(cfg).save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        model_dir = out_dir
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    be = HFBackend(model=str(model_dir))
    report["device"] = str(be.model.device)
    report["dtype"] = str(be.model.dtype)
    report["energy_available"] = be._energy.available if be._energy else False
    report["energy_reason"] = be._energy.reason if be._energy else None

    meter = budgetlm.Meter(budgetlm.Budget(output_tokens=4000, joules=5000.0))
    msgs = [{"role": "user", "content": "Count from one to ten."}]
    t0 = time.perf_counter()
    [r] = be.generate([GenerationRequest(messages=msgs, sampling=SamplingParams(
        n=8, temperature=0.8, max_tokens=256, logprobs=3, seed=7))], meter)
    report["generate_s"] = time.perf_counter() - t0
    report["output_tokens"] = r.usage.output_tokens
    report["joules_call"] = r.usage.joules
    report["joules_meter"] = meter.spent("joules")
    c = r.completions[0]
    s = be.score(r.prompt_token_ids, c.token_ids)
    report["score_max_abs_diff"] = max(abs(a - b) for a, b in zip(s.logprobs, c.logprobs, strict=True))
    [r2] = be.generate([GenerationRequest(messages=msgs, sampling=SamplingParams(
        n=8, temperature=0.8, max_tokens=256, logprobs=3, seed=7))])
    report["seed_reproducible"] = [x.token_ids for x in r.completions] == [x.token_ids for x in r2.completions]
    report["tokens_equal_usage"] = sum(len(x.token_ids) for x in r.completions) == r.usage.output_tokens

    wall = budgetlm.Meter(budgetlm.Budget(wall_seconds=0.05))
    t0 = time.perf_counter()
    [r3] = be.generate([GenerationRequest(messages=msgs, sampling=SamplingParams(max_tokens=4000, temperature=1.0))], wall)
    report["deadline_call_s"] = time.perf_counter() - t0
    report["deadline_finish_reason"] = r3.first.finish_reason
    report["deadline_tokens"] = len(r3.first.token_ids)
    report["ok"] = bool(
        report["tokens_equal_usage"] and report["seed_reproducible"] and report["score_max_abs_diff"] < 0.1
        and (not report["energy_available"] or (report["joules_call"] or 0) > 0)
    )
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
