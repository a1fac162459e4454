"""The ``budgetlm`` command line.

* ``budgetlm run "QUESTION" --backend SPEC --max-tokens N`` — answer with plain sampling under a
  budget and print the answer and the spend (``--json`` for machine output).
* ``budgetlm demo`` — the README's main job: easy reasoning-gym arithmetic on the default model,
  printing answers, accuracy and spend.
* ``budgetlm eval CONFIG.yaml --out DIR [--shard I/N]`` — run (or resume) an evaluation grid; with
  ``--shard I/N`` (1-based) only the cells of shard I of N (a stable hash of (suite, item,
  configuration)), so N processes or hosts share one grid (:mod:`budgetlm.evals.shards`).
* ``budgetlm merge SHARD_DIR... --out MERGED`` — check that shard folders are one grid's shards (same
  config digest and shard count, each index once, no overlap, no gap, each complete) and merge them
  into one run folder with its report.
* ``budgetlm regrade RUN_DIR --grader NAME`` — re-grade a finished eval run without generating
  anything (:mod:`budgetlm.evals.regrade`): prints how many verdicts changed.
* ``budgetlm train CONFIG.yaml --out DIR`` — GRPO training with a recipe, then trained-vs-base evaluation.
* ``budgetlm serve --backend SPEC`` — the OpenAI-compatible server (:mod:`budgetlm.server`).
* ``budgetlm cascade calibrate CONFIG --epsilon E --out cal.json`` — calibrate a confidence cascade's
  thresholds on a suite (:mod:`budgetlm.evals.calibration`).
* ``budgetlm route calibrate CONFIG --share S --out route.json`` — calibrate a router's threshold for a
  target share of expensive calls (:mod:`budgetlm.evals.route_calibration`).
* ``budgetlm strategies [NAME]`` — the registered strategies, or one strategy's typed parameters.
* ``budgetlm model`` — prepare the embedded default model and print its path.
* ``budgetlm version`` — the library versions recorded with every result.
* ``budgetlm report RUN_DIR... [--format md|json|html]`` — write the report and print its table (default),
  or print the Markdown tables and notes (``md``) or ``summary.json`` (``json``), or write it and print
  ``report.html``'s path (``html``).  Several shard folders are merged in memory first (checked as by
  ``merge``; ``--allow-partial`` accepts missing or incomplete shards); one alone is reported as partial.

Result tables go to stdout as a compact rich table on a terminal; when stdout is not a terminal (a pipe,
a log file) they are a plain Markdown table, one unwrapped line per row, parameters shown with escapes.

stdout carries only the commands' output (the answer, ``--json`` documents, the eval table); every
log line — budgetlm's, vLLM's and transformers' — goes to stderr, quiet by default (warnings; vLLM
errors only).  ``budgetlm -v COMMAND`` shows INFO lines, ``-vv`` DEBUG (:mod:`budgetlm.logs`).  The
engines' logging is set up through environment variables before any engine is imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from budgetlm.budget import Budget
from budgetlm.errors import BudgetLMError, missing
from budgetlm.logs import configure_logging, engine_env, log_to_file, stdout_to_stderr
from budgetlm.versions import library_versions

if TYPE_CHECKING:
    from collections.abc import Sequence

    from budgetlm.evals.rundir import RunDir

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make LLM reasoning spend compute deliberately.")
console = Console(stderr=True)
out = Console()

_verbosity = 0
"""The global ``-v`` count of this invocation."""


@app.callback()
def _global_options(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More log lines on stderr: -v INFO, -vv DEBUG (default: warnings, "
                                              "vLLM errors only). stdout only ever holds the command's output.")] = 0,
) -> None:
    """Make LLM reasoning spend compute deliberately."""
    global _verbosity
    _verbosity = verbose
    configure_logging(verbose)  # before any command imports vLLM or transformers


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def _parse_params(pairs: list[str]) -> dict[str, object]:
    """``key=value`` pairs; values read as JSON objects/lists when they start with ``{``/``[``, dotted
    keys nest (``scorer_params.path=/m`` → ``{"scorer_params": {"path": "/m"}}``)."""
    from budgetlm.registry import coerce_option

    params: dict[str, object] = {}
    for item in pairs:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise BudgetLMError(f"`--param` must look like key=value, got {item!r}")
        val = val.strip()
        if val[:1] in ("{", "["):
            try:
                value: object = json.loads(val)
            except json.JSONDecodeError as e:
                raise BudgetLMError(f"`--param {key.strip()}` must be valid JSON when it starts with {val[0]!r}, "
                                    f"got {val!r} ({e.msg})") from None
        else:
            value = coerce_option(val)
        *parents, leaf = key.strip().split(".")
        node = params
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BudgetLMError(f"`--param {key.strip()}` nests under {part!r}, which already has a value")
            node = child
        node[leaf] = value
    return params


@app.command()
def run(
    question: Annotated[str, typer.Argument(help="The question to answer.")],
    backend: Annotated[str, typer.Option("--backend", "-b", help="Backend spec: default, vllm:PATH, hf:PATH, openai:URL#MODEL.")] = "default",
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="Strategy name (sample, cot, majority, adaptive, pdr, ...).")] = "sample",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Strategy parameter key=value (repeatable).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m", help="Output-token budget for the whole answer.")] = 256,
    budget: Annotated[str | None, typer.Option(help="Extra limits, e.g. 'usd=0.01,wall_seconds=30'.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature for `sample` (default 0 = greedy).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Answer QUESTION with a strategy under a budget; print the answer and the spend."""
    from budgetlm.backends import load
    from budgetlm.meter import ledger_json
    from budgetlm.strategies import get as get_strategy

    try:
        if max_tokens < 1:
            raise BudgetLMError(f"`--max-tokens` must be >= 1, got {max_tokens}")
        limits = Budget.parse(budget).merged(Budget(output_tokens=max_tokens))
        params = _parse_params(param or [])
        if strategy == "sample":
            params.setdefault("max_tokens", max_tokens)
            params.setdefault("temperature", 0.0 if temperature is None else temperature)
        elif temperature is not None:
            params.setdefault("temperature", temperature)
        strat = get_strategy(strategy, **params)
        if "seed" in strat.params() and strat.params()["seed"] is None:
            strat = get_strategy(strategy, **params, seed=seed)
        with stdout_to_stderr():  # engines print while loading; stdout is the answer's alone
            with console.status(f"loading {backend} ..."):
                be = load(backend)
            [res] = strat.solve([question], backend=be, budget=limits)
    except BudgetLMError as exc:
        _fail(exc)
        return
    record: dict[str, object] = {  # written with default=str: parameters may hold a Backend or Router
        "question": question,
        "strategy": strategy,
        "params": strat.params(),
        "text": res.text,
        "answer": res.answer,
        "stop_reason": res.stop_reason,
        "finish_reason": res.finish_reason,
        "truncated": res.truncated,
        "sequential_tokens": res.sequential_tokens,
        "usage": res.usage.to_dict(),
        "ledger": ledger_json(res.ledger),
        "trace": res.trace,
        "backend": backend,
        "seed": seed,
        "versions": library_versions(),
    }
    if as_json:
        out.print_json(json.dumps(record, default=str))
        return
    out.print(res.text.strip())
    u = res.usage
    console.print(
        f"[dim]{strategy}: answer {res.answer!r} · {u.calls} call(s) · {u.prompt_tokens} in / {u.output_tokens} out "
        f"tokens (budget {max_tokens}) · {u.flops:.3g} FLOPs · ${u.usd:.6f} · stop: {res.stop_reason}[/]"
    )


@app.command()
def demo(
    backend: Annotated[str, typer.Option("--backend", "-b", help="Backend spec.")] = "default",
    problems: Annotated[int, typer.Option(help="Number of chain_sum problems.")] = 40,
    budgets: Annotated[str, typer.Option(help="Comma-separated output-token budgets per problem (greedy).")] = "4,8,48",
    vote: Annotated[int, typer.Option(help="Also run majority voting with this many samples (0 = off).")] = 4,
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Run folder (re-running resumes).")] = "runs/demo",
    seed: Annotated[int, typer.Option(help="Dataset and engine seed.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json instead of the table.")] = False,
) -> None:
    """Easy reasoning-gym arithmetic on the default model: greedy at several budgets and majority voting,
    with accuracy against tokens, the Pareto frontier and an HTML report."""
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.runner import run_eval

    try:
        if problems < 1:
            raise BudgetLMError(f"`--problems` must be >= 1, got {problems}")
        try:
            grid = [int(b) for b in budgets.split(",") if b.strip()]
        except ValueError:
            raise BudgetLMError(f"`--budgets` must be comma-separated integers, got {budgets!r}") from None
        cfg = EvalConfig.of(dict(
            name="demo",
            suites=[f"reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size={problems}&seed={seed}"],
            models=[backend],
            strategies=[{"name": "sample", "label": "greedy", "params": {"temperature": 0.0}}] + (
                [{"name": "majority", "label": f"majority@{vote}", "params": {"n": vote, "max_tokens": 48,
                  "temperature": 0.7}, "budgets": [{"output_tokens": 48 * vote}]}] if vote > 0 else []),
            budgets=[{"output_tokens": b} for b in grid],
            seed=seed,
        ))
        configure_logging(_verbosity, show_progress=not as_json and not console.is_terminal)
        with log_to_file(_rundir(out_dir).eval_log, _verbosity), stdout_to_stderr():
            res = run_eval(cfg, out_dir, progress=not as_json)
    except BudgetLMError as exc:
        _fail(exc)
        return
    if res.report is None:
        raise missing('res.report')
    _print_errors(res.errors)
    if as_json:
        out.print_json(_rundir(res.report).summary_json.read_text())
        return
    _print_summary(res.report)
    out_console_path(res.report)


@app.command("eval")
def eval_cmd(
    config: Annotated[str, typer.Argument(help="YAML eval config (suites, models, strategies, budgets).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder; re-run the same command to resume.")],
    report: Annotated[bool, typer.Option(help="Write the report at the end.")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress: a bar on a terminal, else a line on stderr "
                                                "every --log-interval seconds.")] = True,
    log_interval: Annotated[float, typer.Option(help="Seconds between progress lines (stderr when not a terminal, "
                                                     "and OUT/eval.log).")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json on stdout instead of the table.")] = False,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="Run only shard I of N of the grid's (item, configuration) cells, e.g. 1/3 (1-based); "
                        "run every I into its own --out, then `budgetlm merge`.")] = None,
) -> None:
    """Run an evaluation grid into OUT (records.jsonl, run.json, report), resuming if OUT exists.

    Errored records are retried by re-running the same command; progress lines are appended to
    OUT/eval.log.  With --shard I/N only that shard's cells are run (merge the N folders with
    `budgetlm merge`)."""
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.runner import run_eval
    from budgetlm.evals.shards import Shard

    try:
        part = Shard.parse(shard) if shard is not None else None
        if log_interval < 0:
            raise BudgetLMError(f"`--log-interval` must be >= 0 seconds, got {log_interval}")
        if as_json and not report:
            raise BudgetLMError("`--json` prints the report's summary.json; drop `--no-report`")
        cfg = EvalConfig.load(config)
        configure_logging(_verbosity, show_progress=progress and not console.is_terminal)
        with log_to_file(_rundir(out).eval_log, _verbosity), stdout_to_stderr():
            res = run_eval(cfg, out, progress=progress, report=report, log_interval=log_interval, shard=part)
    except BudgetLMError as exc:
        _fail(exc)
        return
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished records are kept in {_rundir(out).records}; "
                      "re-run the same command to resume")
        raise typer.Exit(code=130) from None
    console.print((f"shard {res.shard.label} ({res.total} cells of the grid): " if res.shard else "")
                  + f"{res.written} records written, {res.skipped} already done"
                  + (f", retrying {res.retried} errored records" if res.retried else "")
                  + ("" if res.errors else ", 0 errors"), soft_wrap=True)
    _print_errors(res.errors)
    if res.shard is not None:
        console.print(f"partial results: this folder holds shard {res.shard.label}; when every shard has run, "
                      "merge them with `budgetlm merge SHARD_DIR... --out MERGED`", soft_wrap=True)
    if res.report is not None:
        _show_report(res.report, as_json)


@app.command("regrade")
def regrade_cmd(
    run_dir: Annotated[str, typer.Argument(help="A finished run folder (the --out of `budgetlm eval`).")],
    grader: Annotated[str, typer.Option("--grader", "-g", help="Grader name (math, reasoning_gym, exact, normalized, "
                                                                "numeric), or 'suite' for each suite's own grader.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print regrade.json on stdout instead of the line.")] = False,
) -> None:
    """Re-grade a finished run without generating anything: writes RUN_DIR/records.regraded.jsonl and
    RUN_DIR/regrade.json, and prints how many verdicts changed (voting runs: votes are recomputed from
    the samples stored in traces.jsonl)."""
    from budgetlm.evals.regrade import regrade

    try:
        with stdout_to_stderr():
            res = regrade(run_dir, grader)
    except BudgetLMError as exc:
        _fail(exc)
        return
    if as_json:
        out_json((Path(run_dir) / "regrade.json").read_text())
        return
    out.print(res.line(), soft_wrap=True)
    for label, acc in res.accuracy.items():
        out.print(f"  {label}: accuracy {acc['before']:.3f} -> {acc['after']:.3f} (n={acc['n']:.0f})", soft_wrap=True)
    console.print(f"wrote {res.out} and {Path(run_dir) / 'regrade.json'}", soft_wrap=True)


@app.command("pairs")
def pairs_cmd(
    run_dir: Annotated[str, typer.Argument(help="A finished tree-search run folder (bavt, beam, rebase, hyper; the --out of `budgetlm eval`).")],
    out_path: Annotated[str, typer.Option("--out", "-o", help="Pairs JSONL to write (TRL DPOTrainer's standard preference format).")],
    min_margin: Annotated[float, typer.Option(help="Least value margin of a kept pair.")] = 0.1,
    max_pairs_per_node: Annotated[int, typer.Option(help="Most pairs per parent node, largest margin first (0: no cap).")] = 1,
    dedup: Annotated[bool, typer.Option(help="Drop pairs with repeated texts and pairs of identical steps.")] = True,
    value: Annotated[str, typer.Option(help="Step value: 'outcome' (graded answers under a node) or 'search' (the search's values).")] = "outcome",
    model: Annotated[str | None, typer.Option(help="Model whose chat template renders the prompts (default: the run's model).")] = None,
) -> None:
    """Export step-level preference pairs (shared prefix, chosen step, rejected step, margin) from a tree
    search's traces for DPO (see docs/training.md, recipe dpo)."""
    from budgetlm.training.preferences import export_pairs, value_source

    try:
        with stdout_to_stderr():
            path, stats = export_pairs(run_dir, out_path, model=model, min_margin=min_margin,
                                       max_pairs_per_node=max_pairs_per_node or None, dedup=dedup,
                                       value=value_source(value))
    except BudgetLMError as exc:
        _fail(exc)
        return
    out.print(f"{stats.kept} pairs: {stats.describe()}", soft_wrap=True)
    console.print(f"wrote {path}", soft_wrap=True)


@app.command("train")
def train_cmd(
    config: Annotated[str, typer.Argument(help="YAML training config (recipe, recipe_params, model, suite, steps, eval).")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="Run folder; re-run the same command to resume from the last checkpoint.")],
    max_steps: Annotated[int | None, typer.Option(help="Override the config's max_steps (continue a finished run for more steps).")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the newest checkpoint in OUT (--no-resume starts over).")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a recipe (GRPO or dpo) into OUT, then evaluate it against the base model and write the training report."""
    from budgetlm.training import TrainConfig
    from budgetlm.training import run as run_training

    try:
        cfg = TrainConfig.from_yaml(config, what="training config")
        if max_steps is not None:
            cfg = TrainConfig(**{**cfg.model_dump(), "max_steps": max_steps})
        res = run_training(cfg, out_dir, resume=resume, progress=progress)
    except BudgetLMError as exc:
        _fail(exc)
        return
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: checkpoints are kept in {out_dir}/checkpoints; re-run the same command "
                      "to resume")
        raise typer.Exit(code=130) from None
    t = res.train
    if not res.main_process:  # another process of `accelerate launch`: the main process reports
        return
    console.print(f"{'already trained' if t.skipped else 'trained'}: {t.steps} steps"
                  f"{f' (resumed from {t.resumed_from})' if t.resumed_from else ''}; model in {t.model_dir}")
    if res.comparison:
        table = Table(title="trained vs base")
        cols = ["model", "strategy", "n", "accuracy", "mean_output_tokens", "length_error"]
        for c in cols:
            table.add_column(c)
        for r in res.comparison["rows"]:
            table.add_row(*[f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
        out.print(table)
    out.print(f"report: {res.report}")


@app.command("serve")
def serve_cmd(
    backend: Annotated[list[str] | None, typer.Option("--backend", "-b", help="Backend SPEC or NAME=SPEC (repeatable); the first serves budgetlm/<strategy>.")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to bind (default 127.0.0.1: this machine only).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000).")] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML server config (flags override it).")] = None,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="Accepted API key (repeatable); none: no key needed.")] = None,
    allowance: Annotated[str | None, typer.Option(help="Daily allowance per key, e.g. 'output_tokens=200000,usd=1'.")] = None,
    db: Annotated[str | None, typer.Option(help="SQLite file of spend and request ledgers (default budgetlm_server.sqlite).")] = None,
    max_budget: Annotated[str | None, typer.Option(help="Largest per-request budget, e.g. 'output_tokens=16384'.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve budgetlm strategies behind an OpenAI-compatible API (/v1/chat/completions, /v1/models, /metrics)."""
    from budgetlm.server import ServerConfig, parse_backend_args, serve

    try:
        data: dict[str, Any] = ServerConfig.from_yaml(config, what="server config").model_dump() if config else {}
        if backend:
            data["backends"] = parse_backend_args(backend)
        for k, v in (("host", host), ("port", port), ("api_keys", api_key), ("db_path", db)):
            if v is not None:  # not `if v`: --port 0 (any free port) is a valid choice
                data[k] = v
        if allowance:
            data["allowance"] = Budget.parse(allowance).limits()
        if max_budget:
            data["max_budget"] = Budget.parse(max_budget).limits()
        cfg = ServerConfig(**data)
        console.print(f"budgetlm serve: backends {cfg.backends} on http://{cfg.host}:{cfg.port}/v1 "
                      f"(keys: {'required' if cfg.api_keys else 'none'}; allowance: {cfg.allowance or 'unlimited'}; "
                      f"ledger: {cfg.db_path})")
        serve(cfg, log_level=log_level)
    except BudgetLMError as exc:
        _fail(exc)


cascade_app = typer.Typer(no_args_is_help=True, help="Confidence cascades: calibrate thresholds from a tolerance.")
app.add_typer(cascade_app, name="cascade")


@cascade_app.command("calibrate")
def cascade_calibrate(
    config: Annotated[str, typer.Argument(help="YAML cascade config (stages, suite, calibration_items, model, budget).")],
    epsilon: Annotated[float, typer.Option("--epsilon", "-e", help="Accuracy each stage may lose against its best threshold.")] = 0.01,
    out: Annotated[str, typer.Option("--out", "-o", help="Calibration JSON to write.")] = "cascade_calibration.json",
) -> None:
    """Calibrate a cascade's thresholds on the first items of a suite and write them to OUT."""
    from budgetlm.evals.calibration import CascadeConfig, calibrate_config

    try:
        doc = calibrate_config(CascadeConfig.load(config), epsilon, out)
    except BudgetLMError as exc:
        _fail(exc)
        return
    table = Table(title=f"cascade calibration (ε = {epsilon}, {doc['n_items']} items)")
    for col in ("stage", "threshold", "answer rate", "accuracy (answered)", "accuracy (all)", "mean out tokens"):
        table.add_column(col)
    for st in doc["stats"]:
        table.add_row(st["stage"], f"{st['threshold']:.4g}" if "threshold" in st else "—",
                      f"{st['answer_rate']:.2f}" if "answer_rate" in st else "1.00",
                      f"{st['accuracy_answered']:.3f}" if "accuracy_answered" in st else f"{st['accuracy']:.3f}",
                      f"{st['accuracy']:.3f}", f"{st['mean_output_tokens']:.1f}")
    console.print(table)
    c = doc["cascade_on_split"]
    console.print(f"cascade on the split: accuracy {c['accuracy']:.3f} (last stage {c['last_stage_accuracy']:.3f}), "
                  f"{c['mean_output_tokens']:.1f} tokens vs {c['last_stage_mean_output_tokens']:.1f} "
                  f"({c['tokens_saved']:.0%} saved)")
    console.print(f"written: {out}  (use it as strategies.get('cascade', stages=..., calibration={out!r}))")


route_app = typer.Typer(no_args_is_help=True, help="Routing between cheap and expensive models: calibrate a router.")
app.add_typer(route_app, name="route")


@route_app.command("calibrate")
def route_calibrate(
    config: Annotated[str, typer.Argument(help="YAML route config (router, arms, suite, calibration_items, model, budget).")],
    share: Annotated[list[float], typer.Option("--share", "-s", help="Share of queries for the strong arm (one per "
                                                                    "threshold for 3+ arms, descending).")] = [0.5],  # noqa: B006
    out: Annotated[str, typer.Option("--out", "-o", help="Calibration JSON to write.")] = "route_calibration.json",
) -> None:
    """Calibrate a router's threshold to a share of strong calls on the first items of a suite; write OUT."""
    from budgetlm.evals.route_calibration import RouteConfig, calibrate_route_config

    try:
        doc = calibrate_route_config(RouteConfig.load(config), share[0] if len(share) == 1 else share, out)
    except BudgetLMError as exc:
        _fail(exc)
        return
    s = doc["on_split"]
    table = Table(title=f"route calibration: {doc['router']['name']} ({s['n_items']} items)")
    for col in ("thresholds", "target share", "realised share", "weak acc", "strong acc", "routed acc", "signal tokens"):
        table.add_column(col)
    table.add_row(", ".join(f"{t:.4g}" for t in doc["thresholds"]), str(doc["share"]), f"{doc['realised_share']:.2f}",
                  f"{s['weak_accuracy']:.3f}", f"{s['strong_accuracy']:.3f}", f"{s['routed_accuracy']:.3f}",
                  f"{s['signal_mean_output_tokens']:.1f}")
    console.print(table)
    console.print(f"written: {out}  (use it as strategies.get('route', calibration={out!r}))")


def out_console_path(path: str | Path) -> None:
    out.print(f"report: {path}/report.html", soft_wrap=True, highlight=False, markup=False)


def out_json(text: str) -> None:
    """A JSON document on stdout."""
    out.print_json(text)


def _print_errors(errors: Sequence[str]) -> None:
    """The errored records of a run, on stderr: count and the first error's text (the run still exits 0)."""
    if not errors:
        return
    from rich.markup import escape

    console.print(f"[bold red]{len(errors)} errors[/]; first: {escape(errors[0])}", highlight=False,
                  soft_wrap=True)
    console.print("[yellow]errored records are left out of accuracy and the Pareto frontier; re-run the same "
                  "command to retry them[/]", soft_wrap=True)


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def _write_stdout(text: str) -> None:
    """Plain text on stdout, exactly as given (no rich wrapping, markup or colour)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _rundir(path: str | Path) -> RunDir:
    """The :class:`~budgetlm.evals.rundir.RunDir` of a run (or report) folder (imported lazily)."""
    from budgetlm.evals.rundir import RunDir

    return RunDir(path)


def _show_report(report: Path, as_json: bool) -> None:
    """A finished run's report: its ``summary.json`` on stdout (``--json``), else the table and the report's path."""
    if as_json:
        out_json(_rundir(report).summary_json.read_text())
        return
    _print_summary(report)
    out_console_path(report)


def _print_summary(report_dir: str | Path) -> None:
    """A report's configurations table on stdout: on a terminal a compact rich table (the full table is in
    summary.md); otherwise (a pipe, a log file) the full Markdown table, one unwrapped line per row."""
    path = _rundir(report_dir).summary_json
    if not path.exists():
        return
    summary = json.loads(path.read_text())
    table = Table(title="accuracy vs tokens (★ = Pareto frontier; ⚠ = errored records, not ranked)")
    for col in ("model", "strategy", "budget", "n", "acc", "95% CI", "out tok", "trunc", "err", "★"):
        table.add_column(col, overflow="fold")
    for c in summary["configs"]:
        budget = ",".join(f"{k.replace('output_tokens', 'out')}={v:g}" for k, v in c["budget"].items())
        frontier = "★" if any(bool(v) for v in (c.get("on_frontier") or {}).values()) else ""
        model = c["model"] if len(c["model"]) <= 16 else "…" + c["model"][-15:]
        n_err = c.get("n_errors") or 0
        ci = ("—" if c["accuracy_ci_low"] is None else
              f"{c['accuracy_ci_low']:.2f}–{c['accuracy_ci_high']:.2f}")
        table.add_row(
            model, c["strategy"], budget, str(c["n"]), _fmt(c["accuracy"], ".3f"), ci,
            _fmt(c["mean_output_tokens"], ".1f"), _fmt(c["truncation_rate"], ".0%"),
            f"⚠ {n_err}" if n_err else "", frontier,
        )
        if c["over_budget_rate"]:
            console.print(f"[red]budget violated[/] in {c['over_budget_rate']:.0%} of records of {c['config_id']}")
        if n_err:
            from rich.markup import escape

            console.print(f"[yellow]{n_err} errored records[/] in {escape(c['strategy'])} {escape(f'[{budget}]')} "
                          f"({c['config_id']}): left out of its accuracy, not ranked on the Pareto frontier",
                          highlight=False, soft_wrap=True)
    if _stdout_is_terminal():
        out.print(table)
        return
    from budgetlm.evals.report import markdown_table

    _write_stdout(markdown_table(summary))


REPORT_FORMATS = ("md", "json", "html")


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="Run folders to report on (compared on one chart).")],
    out_dir: Annotated[str | None, typer.Option("--out", "-o", help="Where to write (default: the first run).")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", "-f", help="md: the Markdown tables and notes on stdout; json: summary.json's content on "
                               "stdout (md and json write nothing); html: write the report and print report.html's "
                               "path. Default: write the report, print the table and the path.")] = None,
    allow_partial: Annotated[bool, typer.Option(
        "--allow-partial", help="Shard folders: report them even when shards are missing or incomplete "
                                "(never when they overlap or mix configs).")] = False,
) -> None:
    """Write summary.json, summary.md, PNG plots and report.html for one or more runs (or print one format)."""
    from budgetlm.evals.report import markdown_summary, summary_doc, write_report

    try:
        if fmt is not None and fmt not in REPORT_FORMATS:
            raise BudgetLMError(f"`--format` must be one of {', '.join(REPORT_FORMATS)}, got {fmt!r}; "
                                "or leave it out to write the report and print its table")
        if fmt in ("md", "json"):
            if out_dir is not None:
                raise BudgetLMError(f"`--out` must be left out with `--format {fmt}`, got {out_dir!r}: md and json "
                                    "print to stdout and write nothing; use --format html or no --format to write")
            doc = summary_doc([Path(r) for r in runs], allow_partial=allow_partial)
            _write_stdout(markdown_summary(doc) if fmt == "md" else json.dumps(doc, indent=2, allow_nan=False))
            return
        html_path = write_report([Path(r) for r in runs], Path(out_dir) if out_dir else None,
                                 allow_partial=allow_partial)
    except BudgetLMError as exc:
        _fail(exc)
        return
    if fmt == "html":
        _write_stdout(str(html_path))
        return
    _print_summary(html_path.parent)
    out_console_path(html_path.parent)


@app.command("merge")
def merge_cmd(
    shards: Annotated[list[str], typer.Argument(help="The --out folders of `budgetlm eval --shard I/N`, one per shard.")],
    out_dir: Annotated[str, typer.Option("--out", "-o", help="The merged run folder (new, empty or a previous merge).")],
    report: Annotated[bool, typer.Option(help="Write the merged report.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json on stdout instead of the table.")] = False,
) -> None:
    """Merge the shard folders of one grid into OUT after checking them: one config digest and shard count,
    each shard once, no cell in two shards, no shard missing, every shard complete."""
    from budgetlm.evals.shards import merge_shards

    try:
        if as_json and not report:
            raise BudgetLMError("`--json` prints the report's summary.json; drop `--no-report`")
        with stdout_to_stderr():
            res = merge_shards([Path(s) for s in shards], Path(out_dir), report=report)
    except BudgetLMError as exc:
        _fail(exc)
        return
    console.print(f"merged {res.shards} shards: {res.records} records into {res.out_dir}", soft_wrap=True)
    if res.report is not None:
        _show_report(res.report, as_json)


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


@app.command("strategies")
def strategies_cmd(
    name: Annotated[str | None, typer.Argument(help="A strategy; none: list them all.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the parameters as JSON.")] = False,
) -> None:
    """List the strategies, or one strategy's typed parameters (name, type, default, constraints, meaning)."""
    from budgetlm.strategies import STRATEGIES, param_table

    try:
        names = [name] if name else STRATEGIES.names()
        tables = {n: param_table(STRATEGIES.get(n)) for n in names}
    except BudgetLMError as exc:
        _fail(exc)
        return
    if as_json:
        out.print_json(json.dumps(tables, default=str))
        return
    if not name:
        t = Table("strategy", "what it does", "parameters", box=None)
        for n in names:
            doc = (STRATEGIES.get(n).__doc__ or "").strip().splitlines()[0]
            t.add_row(n, doc, ", ".join(tables[n]))
        out.print(t)
        out.print("[dim]budgetlm strategies NAME shows a strategy's parameters.[/]")
        return
    t = Table("parameter", "type", "default", "constraints", "meaning", box=None)
    for field, row in tables[name].items():
        t.add_row(field, row["type"], repr(row["default"]), row["constraints"], row["description"])
    out.print(t)


@app.command()
def version() -> None:
    """Print budgetlm's and its main dependencies' versions."""
    out.print_json(json.dumps(library_versions()))


def main() -> None:
    """Console-script entry point."""
    engine_env()  # before anything imports vLLM: its log handler on stdout would corrupt machine output
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
