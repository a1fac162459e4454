"""The resumable evaluation runner: models × strategies × budgets over suites.

For every grid cell (model, strategy with parameters, budget) the runner runs each pending item as
its own task — the strategy's per-problem program under the item's own meter — with ``batch_size``
problems in flight at once on the shared engine (a continuously batched vLLM engine runs all their
calls together), grades each result as it finishes, and appends one
:class:`~budgetlm.evals.records.EvalRecord` per (item, configuration) to ``OUT/records.jsonl`` —
written, flushed and fsynced right then.  A problem that fails (after the backend's retries) fails
alone: its record carries the error and what it spent before failing, and a re-run retries it.  Each result's trace (samples, rounds, search trees with values and prune decisions)
goes to ``OUT/traces.jsonl``, one line per record, written just before the record (voting strategies
keep every sample's text, tokens and extracted answer there, so ``budgetlm regrade`` can re-grade a
run; a trace over :data:`~budgetlm.evals.records.TRACE_GZIP_BYTES` is stored gzipped in ``trace_gz``).  ``OUT/run.json`` holds the config, its digest, library versions, seeds and the
history of sessions.

Resuming: re-running the same command reads the records already on disk, skips every
(suite, item, configuration) whose last record succeeded, and appends the rest; a torn last line
left by a crash mid-write is cut off first, so nothing is duplicated or lost.  A cell whose last
record has an ``error`` is not done: it is retried and the retry is appended, and readers use the
last record of each cell (:func:`~budgetlm.evals.records.read_records`), so a successful retry
supersedes the error.  :attr:`RunOutcome.retried` counts the errored records retried.  A config
that keeps every recorded cell and adds new ones (more strategies, budgets or suites) extends the
run; one that would orphan recorded cells is refused (use a new ``--out``).

Servers: with an OpenAI-compatible backend over several servers (a
:class:`~budgetlm.backends.pool.ServerPool`), each record's ``details["servers"]`` holds its attempts
per server, retries and failovers, and each session in ``run.json`` keeps every pool's per-server
metrics (``sessions[-1]["servers"]``).

Sharding: ``shard=(I, N)`` (CLI ``--shard I/N``, 1-based) runs only the cells
:mod:`budgetlm.evals.shards` assigns to shard ``I`` of ``N`` (a stable hash of (suite, item id,
configuration id)), so N processes or hosts share one grid; ``run.json`` records ``shard: {index,
count, cells, grid_cells}`` (``null`` for a full run), the progress lines name the shard, and resuming
a folder with another ``--shard`` (or none) is refused.  A shard's own report is marked partial;
``budgetlm merge`` joins the shards' folders.

Failures: each item runs alone, so only an item that fails gets an error record and its neighbours
are graded as usual.  Errors never stop the run.

Progress: a rich progress bar on stderr when stderr is a terminal, and — terminal or not — a
progress line (items done / total, errors, elapsed, rate, ETA) every ``log_interval`` seconds
through :mod:`logging` (logger ``budgetlm.evals``, level INFO, ``extra={"progress": True}``), plus a
line when the run starts and when it ends.  The CLI shows these lines on stderr when it is not a
terminal and appends them to ``OUT/eval.log``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict

from budgetlm.aio import run_sync
from budgetlm.backends import Backend, BackendSpec, load
from budgetlm.backends.pool import ServerPool, ServerUse, track_servers
from budgetlm.budget import Budget
from budgetlm.errors import BudgetLMError, ConfigError
from budgetlm.evals.config import EvalConfig, StrategySpec, config_id
from budgetlm.evals.metrics import finite_json
from budgetlm.evals.records import EvalRecord, trace_line
from budgetlm.evals.rundir import RunDir
from budgetlm.evals.shards import Shard, ShardInfo, shard_info
from budgetlm.evals.suites import get as get_suite
from budgetlm.evals.suites.base import EvalItem, Suite
from budgetlm.io import JsonlWriter, JsonValue
from budgetlm.meter import Meter
from budgetlm.strategies import Problem, Result, Strategy
from budgetlm.strategies import get as get_strategy
from budgetlm.versions import library_versions

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

TRACES_FILE = RunDir.TRACES
"""Per-record traces, next to ``records.jsonl`` (:class:`~budgetlm.evals.rundir.RunDir` owns the layout)."""

LOG_INTERVAL = 5.0
"""Default seconds between two progress lines in the log."""

log = logging.getLogger("budgetlm.evals")


def _suite_name(spec: str | Mapping[str, JsonValue]) -> str:
    return spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)


class RecordWriter(JsonlWriter):
    """Appends records durably: one line each, flushed and fsynced; a torn last line left by a
    crash is cut off (and reported) first (:class:`budgetlm.io.JsonlWriter`)."""

    def write(self, record: EvalRecord | Mapping[str, JsonValue]) -> None:
        super().write(record.model_dump_json() if isinstance(record, EvalRecord)
                      else json.dumps(finite_json(record), default=str))


@dataclass
class RunOutcome:
    """What one ``run`` did."""

    out_dir: Path
    """The run folder."""
    written: int = 0
    """Records written in this session."""
    skipped: int = 0
    """(item, configuration) pairs already done on disk (last record without error)."""
    retried: int = 0
    """(item, configuration) pairs whose last record on disk had an error, run again in this session."""
    total: int = 0
    """Grid size in (item, configuration) pairs (of this shard's partition when sharded)."""
    shard: Shard | None = None
    """The shard run, None for the whole grid."""
    report: Path | None = None
    """The folder holding ``report.html`` and ``summary.*``, when written."""
    errors: list[str] = field(default_factory=list)
    """Items that failed in this session, as ``"item_id: error"`` (recorded with their error)."""


def over_budget(result: Result, budget: Budget) -> bool:
    """Whether a result's spend exceeds its budget in any unit (must never happen)."""
    for unit, limit in budget.limits().items():
        if unit == "wall_seconds":
            line = result.ledger.get("units", {}).get(unit)
            spent = (line["spent"] if line is not None else None) or 0.0
        else:
            spent = result.usage.amount(unit) or 0.0
        if spent > limit + 1e-9:
            return True
    return False


@dataclass(frozen=True)
class Cell:
    """One configuration on one suite: what the runner plans and runs as a unit."""

    model: str
    """Backend spec."""
    strategy: StrategySpec
    """Strategy name, parameters and label."""
    budget: dict[str, float]
    """Per-item budget limits."""
    config_id: str
    """Hash of model, strategy, parameters, budget and seed (records are keyed by it)."""
    suite_name: str
    """The suite's spec as named in records."""
    suite: Suite
    """The suite (grading)."""
    items: list[EvalItem]
    """The items this run owns (its shard), or those still to run."""


class _Common(TypedDict):
    """The fields every record of one cell shares."""

    suite: str
    config_id: str
    model: str
    strategy: str
    params: dict[str, object]
    """The strategy's parameters as it holds them (a Backend or Router object is written with `str`)."""
    budget: dict[str, float]
    seed: int


@dataclass
class _Sinks:
    """Where a cell's results go: the records and traces files, the outcome counts, the progress display."""

    records: RecordWriter
    traces: RecordWriter
    outcome: RunOutcome
    progress: _Progress


class Runner:
    """Runs an :class:`EvalConfig` into a folder; see the module docstring."""

    def __init__(
        self,
        config: EvalConfig,
        out_dir: str | Path,
        *,
        backends: dict[str, Backend] | None = None,
        progress: bool = True,
        report: bool = True,
        on_batch: Callable[[int], None] | None = None,
        log_interval: float = LOG_INTERVAL,
        shard: Shard | tuple[int, int] | str | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.dir = RunDir(self.out_dir)
        """The run folder's files."""
        self._given = dict(backends or {})
        self.progress = progress
        """Draw a progress bar (only when stderr is a terminal; log lines are written either way)."""
        self.report = report
        self.on_batch = on_batch
        self.log_interval = log_interval
        """Seconds between progress lines in the log (0: one after every batch)."""
        self.shard = Shard.coerce(shard)
        """Run only this shard's cells (see :mod:`budgetlm.evals.shards`); None: the whole grid."""

    # ------------------------------------------------------------------ setup
    def _grid(self) -> set[tuple[str, str]]:
        """``(suite name, config id)`` of every cell of the configured grid."""
        return {
            (_suite_name(spec), config_id(model, strat, budget, self.config.seed))
            for spec in self.config.suites
            for model in self.config.models
            for strat in self.config.strategies
            for budget in (strat.budgets or self.config.budgets)
        }

    def _check_run_json(self) -> dict[str, Any]:
        """Create or check ``run.json``: resuming needs the same config, or a grid that keeps every recorded cell.

        A config that only adds cells (or drops cells with no records) extends the run: the records
        of unchanged cells stay valid because cells are keyed by a hash of model, strategy,
        parameters, budget and seed.  A config that would orphan existing records is refused.
        """
        meta: dict[str, Any] = {}
        if self.dir.run_json.exists():
            meta = self.dir.read_meta() or {}
            self._check_shard(shard_info(meta))
            if meta.get("config_digest") != self.config.digest():
                grid = self._grid()
                recorded = {(r.suite, r.config_id) for r in self.dir.read_records()}
                orphans = sorted(recorded - grid)
                if orphans or meta.get("seed", self.config.seed) != self.config.seed:
                    raise ConfigError(
                        f"`--out` {str(self.out_dir)!r} holds a run of a different config "
                        f"(digest {meta.get('config_digest')} != {self.config.digest()}) with "
                        f"{len(orphans)} recorded cell(s) the new config does not have; use a new --out folder, "
                        "the same config to resume, or a config that keeps every recorded cell (adding cells is fine)"
                    )
                meta.setdefault("extended", []).append({"from_digest": meta.get("config_digest"), "at": time.time()})
        meta.update({
            "name": self.config.name,
            "config": self.config.model_dump(),
            "config_digest": self.config.digest(),
            "seed": self.config.seed,
            "versions": library_versions(),
            "shard": None if self.shard is None else ShardInfo(index=self.shard.index, count=self.shard.count,
                                                               cells=None).model_dump(),
        })
        meta.setdefault("sessions", []).append({"started": time.time()})
        self.dir.write_meta(meta)
        return meta

    def _check_shard(self, recorded: ShardInfo | None) -> None:
        """Resuming needs the shard spec the folder was started with (or none for a full run)."""
        given = self.shard.label if self.shard else None
        have = recorded.label if recorded else None
        if given == have:
            return
        if recorded is None:
            raise ConfigError(
                f"`--shard` must be left out to resume `--out` {str(self.out_dir)!r}, which holds a full "
                f"(unsharded) run, got {given!r}; use a new --out folder for each shard")
        raise ConfigError(f"`--shard` must be {have} to resume `--out` {str(self.out_dir)!r} (a folder of shard "
                          f"{have}), got {repr(given) if given else 'no --shard'}; pass --shard {have} to resume it, "
                          "or use a new --out folder")

    @property
    def _tag(self) -> str:
        """``" (shard 2/3)"`` for log lines of a shard run, else empty."""
        return f" (shard {self.shard.label})" if self.shard else ""

    def _backend(self, spec: str) -> Backend:
        if spec in self._given:
            return self._given[spec]
        parsed = BackendSpec.parse(spec)
        return load(parsed, **({"seed": self.config.seed} if parsed.seeded else {}))

    def _strategy(self, spec: StrategySpec) -> Strategy:
        params = dict(spec.params)
        strat = get_strategy(spec.name, **params)
        if "seed" in strat.params() and strat.params()["seed"] is None and "seed" not in params:
            strat = get_strategy(spec.name, **params, seed=self.config.seed)
        return strat

    # ------------------------------------------------------------------ run
    def run(self) -> RunOutcome:
        """Run (or resume) the grid; returns counts and the report path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        meta = self._check_run_json()
        writer = RecordWriter(self.dir.records)
        trace_writer = RecordWriter(self.dir.traces)
        on_disk = self.dir.read_records()  # the last record of each cell
        done = {r.key for r in on_disk if r.error is None}
        errored = {r.key for r in on_disk if r.error is not None}
        suites: list[tuple[str, Suite, list[EvalItem]]] = []
        for spec in self.config.suites:
            suite = get_suite(spec)
            items = suite.items()
            if self.config.limit:
                items = items[: self.config.limit]
            if not items:
                raise ConfigError(f"suite {_suite_name(spec)!r} is empty; check its size/limit or data file")
            suites.append((_suite_name(spec), suite, items))
        cells = [
            (model, strat, budget)
            for model in self.config.models
            for strat in self.config.strategies
            for budget in (strat.budgets or self.config.budgets)
        ]
        grid_total = sum(len(items) for _, _, items in suites) * len(cells)
        owned: list[Cell] = []
        for model, strat, budget in cells:
            cid = config_id(model, strat, budget, self.config.seed)
            for sname, suite, items in suites:
                mine = [it for it in items if self.shard is None or self.shard.owns((sname, it.id, cid))]
                owned.append(Cell(model, strat, budget, cid, sname, suite, mine))
        total = sum(len(c.items) for c in owned)
        if self.shard is not None:
            meta["shard"].update(cells=total, grid_cells=grid_total)
            self.dir.write_meta(meta)
        outcome = RunOutcome(self.out_dir, total=total, shard=self.shard)
        pending_total = 0
        plan: list[Cell] = []
        for cell in owned:
            todo = [it for it in cell.items if (cell.suite_name, it.id, cell.config_id) not in done]
            outcome.skipped += len(cell.items) - len(todo)
            outcome.retried += sum((cell.suite_name, it.id, cell.config_id) in errored for it in todo)
            if todo:
                plan.append(dataclasses.replace(cell, items=todo))
                pending_total += len(todo)
        of_grid = f" (shard {self.shard.label}: {total} of the grid's {grid_total})" if self.shard else ""
        log.info("eval %s: %d of %d (item, configuration) pairs to run%s, %d already done, retrying %d errored "
                 "records; out: %s", self.config.name, pending_total, total, of_grid, outcome.skipped,
                 outcome.retried, self.out_dir, extra={"progress": True, "console": True})
        progress = _Progress(pending_total, enabled=self.progress, interval=self.log_interval, suffix=self._tag)
        try:
            with progress:
                by_model: dict[str, list[Cell]] = {}
                for cell in plan:
                    by_model.setdefault(cell.model, []).append(cell)
                sinks = _Sinks(writer, trace_writer, outcome, progress)
                for model, model_cells in by_model.items():
                    backend = self._backend(model)
                    try:
                        for cell in model_cells:
                            self._cell(backend, cell, sinks)
                    finally:
                        pool = getattr(backend, "pool", None)
                        if isinstance(pool, ServerPool):  # per-server metrics of this session
                            meta["sessions"][-1].setdefault("servers", {})[model] = [
                                dataclasses.asdict(st) for st in pool.snapshot()]
                        if model not in self._given:
                            backend.close()
        finally:
            writer.close()
            trace_writer.close()
            meta["sessions"][-1].update({"ended": time.time(), "written": outcome.written})
            self.dir.write_meta(meta)
        if self.report:
            from budgetlm.evals.report import write_report

            outcome.report = write_report([self.out_dir]).parent
        return outcome

    def _cell(self, backend: Backend, cell: Cell, sinks: _Sinks) -> None:
        """Run one configuration's pending items, ``batch_size`` problems in flight; close what the strategy loaded."""
        strategy = self._strategy(cell.strategy)
        try:
            run_sync(self._acell(backend, cell, strategy, sinks))
        finally:
            close = getattr(strategy, "close", None)
            if callable(close):
                close()

    async def _acell(self, backend: Backend, cell: Cell, strategy: Strategy, sinks: _Sinks) -> None:
        """Every pending item as its own task on the engine; each record is written (and fsynced) as it finishes.

        A problem that fails fails alone: its record carries the error and what it spent before failing.
        """
        model, spec, budget, cid, sname, suite, todo = (cell.model, cell.strategy, cell.budget, cell.config_id,
                                                        cell.suite_name, cell.suite, cell.items)
        writer, trace_writer, outcome, progress = sinks.records, sinks.traces, sinks.outcome, sinks.progress
        gate = asyncio.Semaphore(self.config.batch_size)
        b = Budget.of(budget)
        root = Meter(None, name=cid)
        common = _Common(suite=sname, config_id=cid, model=model, strategy=spec.label or spec.name,
                         params=strategy.params(), budget=dict(budget), seed=self.config.seed)

        async def one(it: EvalItem) -> None:
            async with gate:
                problem = Problem(id=it.id, messages=it.messages, metadata=it.metadata, tools=list(it.tools))
                meter = root.child(b, name=it.id)
                t0 = time.perf_counter()
                use = ServerUse()
                try:
                    with track_servers() as use:  # which servers of a pool the item's calls went to
                        [res] = await strategy.arun([problem], [meter], backend)
                    res.ledger = meter.summary()
                    if use.calls:
                        res.details["servers"] = use.as_dict()
                    rec, trace = self._record(it, res, b, suite, time.perf_counter() - t0, common), res.trace
                except Exception as exc:  # noqa: BLE001 - one problem's failure is recorded, the run goes on
                    log.debug("item %s failed", it.id, exc_info=True)
                    u = meter.total()  # what it generated before failing
                    rec = EvalRecord(item_id=it.id, question=it.question, gold=_text(it.gold), error=_error_text(exc),
                                     stop_reason="error", wall_seconds=time.perf_counter() - t0, timestamp=time.time(),
                                     prompt_tokens=u.prompt_tokens, output_tokens=u.output_tokens,
                                     model_calls=u.calls, flops=u.flops, usd=u.usd,
                                     details={"servers": use.as_dict()} if use.calls else {}, **common)
                    trace = None
                finally:
                    meter.active = False
            if trace is not None:  # before the record: a record always has its trace
                trace_writer.write(trace_line({"suite": rec.suite, "item_id": rec.item_id, "config_id": rec.config_id,
                                               "strategy": rec.strategy}, trace))
            writer.write(rec)
            if rec.error:
                outcome.errors.append(f"{rec.item_id}: {rec.error}")
                log.info("item %s of %s (%s, %s) failed%s: %s", rec.item_id, sname, rec.strategy, cid, self._tag,
                         rec.error)
            outcome.written += 1
            progress.advance(1, rec.output_tokens, 1 if rec.error else 0)
            if self.on_batch:
                self.on_batch(outcome.written)

        await asyncio.gather(*(one(it) for it in todo))

    @staticmethod
    def _record(it: EvalItem, res: Result, b: Budget, suite: Suite, wall: float,
                common: _Common) -> EvalRecord:
        text = None if res.thinking_truncated else res.text
        grade = suite.grade(it, text)
        u = res.usage
        return EvalRecord(
            item_id=it.id, question=it.question, text=res.text, answer=grade.answer, gold=_text(it.gold),
            correct=grade.correct, score=grade.score,
            prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_prompt_tokens, output_tokens=u.output_tokens,
            thinking_tokens=u.thinking_tokens, probe_tokens=int(res.details.get("probe_tokens", 0)),
            sequential_tokens=res.sequential_tokens, model_calls=u.calls,
            wall_seconds=wall, latency_s=u.latency_s, flops=u.flops, usd=u.usd, joules=u.joules,
            finish_reason=res.finish_reason, truncated=res.truncated, thinking_truncated=res.thinking_truncated,
            stop_reason=res.stop_reason, over_budget=over_budget(res, b), details=res.details, timestamp=time.time(),
            **common,
        )


def _error_text(exc: BaseException) -> str:
    """The library's own errors by their message; anything else with its type too."""
    msg = str(exc) or type(exc).__name__
    return msg if isinstance(exc, BudgetLMError) else f"{type(exc).__name__}: {msg}"


def _text(gold: object) -> str | None:
    if gold is None:
        return None
    return gold if isinstance(gold, str) else json.dumps(gold, default=str)


def _fmt_secs(sec: float) -> str:
    sec = max(0, int(round(sec)))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Progress:
    """Progress of a run: a rich bar (ETA, tokens/s) when enabled and stderr is a terminal, and a
    progress line through ``logging`` every ``interval`` seconds (terminal or not) and at the end."""

    def __init__(self, total: int, enabled: bool = True, interval: float = LOG_INTERVAL,
                 tty: bool | None = None, suffix: str = "") -> None:
        self.total = total
        self.suffix = suffix
        """Appended to every progress line (``" (shard 2/3)"`` for a shard run)."""
        is_tty = tty if tty is not None else bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.enabled = enabled and total > 0 and is_tty
        self.interval = interval
        self.done = 0
        self.errors = 0
        self._p: Progress | None = None
        self._task: TaskID | None = None
        self._tokens = 0
        self._t0 = time.perf_counter()
        self._last_log = self._t0

    def __enter__(self) -> _Progress:
        self._t0 = self._last_log = time.perf_counter()
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._p = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[tps]}"),
                               console=Console(stderr=True), transient=False)
            self._p.__enter__()
            self._task = self._p.add_task("eval", total=self.total, tps="")
        return self

    def line(self, final: bool = False) -> str:
        """``"progress 12/40 items (30%), 1 errors, elapsed 0:07, 1.71 items/s, 35 tok/s, eta 0:16"``."""
        elapsed = time.perf_counter() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _fmt_secs((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{'finished' if final and self.done >= self.total else 'stopped' if final else 'progress'} "
                f"{self.done}/{self.total} items ({pct:.0f}%), {self.errors} errors, elapsed {_fmt_secs(elapsed)}, "
                f"{rate:.2f} items/s, {self._tokens / max(elapsed, 1e-9):.0f} tok/s"
                + ("" if final else f", eta {eta}") + self.suffix)

    def advance(self, n: int, tokens: int, errors: int = 0) -> None:
        self.done += n
        self.errors += errors
        self._tokens += tokens
        now = time.perf_counter()
        if self._p is not None and self._task is not None:
            rate = self._tokens / max(1e-9, now - self._t0)
            self._p.update(self._task, advance=n, tps=f"{rate:.0f} tok/s")
        if now - self._last_log >= self.interval and self.done < self.total:
            self._last_log = now
            log.info("%s", self.line(), extra={"progress": True})

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._p is not None:
            self._p.__exit__(exc_type, exc, tb)
        if self.total > 0:
            log.info("%s", self.line(final=True), extra={"progress": True})


def run_eval(config: EvalConfig | str | Path, out_dir: str | Path, **kw: Any) -> RunOutcome:
    """Load ``config`` (a path or an :class:`EvalConfig`) and run it into ``out_dir``."""
    cfg = config if isinstance(config, EvalConfig) else EvalConfig.load(config)
    return Runner(cfg, out_dir, **kw).run()
