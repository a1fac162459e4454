"""Sample several answers per question under one shared budget, then look at the ledger.

Run: .venv/bin/python examples/budgeted_generation.py [--backend hf:default]
"""

from __future__ import annotations

import argparse
from collections import Counter

import budgetlm
from budgetlm.answers import extract_answer, normalize_answer
from budgetlm.backends import GenerationRequest, SamplingParams, load

QUESTIONS = ["What is 3 + 4?", "What is 9 - 5?", "What is 6 + 2?"]
SUFFIX = " Give the final answer after 'Answer:'."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="default")
    ap.add_argument("--tokens", type=int, default=600, help="output-token budget for all questions together")
    args = ap.parse_args()

    backend = load(args.backend)
    batch = budgetlm.Meter(budgetlm.Budget(output_tokens=args.tokens), name="batch")
    per_question = batch.split(len(QUESTIONS))  # equal shares; their spend rolls up to `batch`
    requests = [
        GenerationRequest(
            messages=[{"role": "user", "content": q + SUFFIX}],
            sampling=SamplingParams(n=4, temperature=0.7, max_tokens=128),
            meter=m,
        )
        for q, m in zip(QUESTIONS, per_question)
    ]
    for q, r in zip(QUESTIONS, backend.generate(requests)):
        votes = Counter(normalize_answer(extract_answer(c.answer).text) for c in r.completions)
        print(f"{q:18} majority={votes.most_common(1)[0][0]!s:6} votes={dict(votes)} "
              f"max_tokens={r.max_tokens} (clamped by {r.clamped_by}) spent={r.usage.output_tokens}")
    print(batch.summary()["units"]["output_tokens"])


if __name__ == "__main__":  # vLLM starts worker processes with spawn
    main()
