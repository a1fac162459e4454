"""The run folder (``budgetlm eval CONFIG --out DIR``): one owner for its layout.

::

    DIR/
      run.json                 config, its digest, seed, library versions, shard block, sessions
                               (rewritten atomically; a merge adds ``merged_from``)
      records.jsonl            one EvalRecord per finished (item, configuration), appended + fsynced;
                               the last record of each (suite, item, configuration) wins
      traces.jsonl             one trace line per record, written just before it
      eval.log                 progress lines of the CLI (appended)
      summary.json             the report's document (every number of the tables and notes)
      summary.md               the report's tables and notes as Markdown
      report.html              the self-contained report (charts inlined)
      accuracy_vs_tokens.png, accuracy_vs_cost.png, per_suite.png, tree_<strategy>.png   the charts
      records.regraded.jsonl   written by ``budgetlm regrade`` (with regrade.json)

``records.jsonl`` and ``traces.jsonl`` follow the torn-line rule of :mod:`budgetlm.io` (a torn
last line is cut off and reported; a bad line elsewhere is an error naming file and line).
The report's files go to the run folder unless another folder is given (:meth:`RunDir.report_dir`).
A training run (``budgetlm train``) evaluates into ``OUT/eval``, a run folder of this layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budgetlm.evals.records import EvalRecord, read_records, read_traces
from budgetlm.io import JsonValue, read_json, write_json_atomic

__all__ = ["PLOTS", "RunDir"]

PLOTS = ("accuracy_vs_tokens.png", "accuracy_vs_cost.png", "per_suite.png")
"""The report's charts, always written (``tree_<strategy>.png`` are added for tree searches)."""


@dataclass(frozen=True)
class RunDir:
    """The files of one evaluation run folder (see the module docstring); paths only, nothing is
    created until something writes."""

    path: Path

    RUN_JSON = "run.json"
    RECORDS = "records.jsonl"
    TRACES = "traces.jsonl"
    EVAL_LOG = "eval.log"
    SUMMARY_JSON = "summary.json"
    SUMMARY_MD = "summary.md"
    REPORT_HTML = "report.html"
    REGRADED = "records.regraded.jsonl"
    REGRADE_JSON = "regrade.json"

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    # ------------------------------------------------------------------ paths
    @property
    def run_json(self) -> Path:
        return self.path / self.RUN_JSON

    @property
    def records(self) -> Path:
        return self.path / self.RECORDS

    @property
    def traces(self) -> Path:
        return self.path / self.TRACES

    @property
    def eval_log(self) -> Path:
        return self.path / self.EVAL_LOG

    @property
    def summary_json(self) -> Path:
        return self.path / self.SUMMARY_JSON

    @property
    def summary_md(self) -> Path:
        return self.path / self.SUMMARY_MD

    @property
    def report_html(self) -> Path:
        return self.path / self.REPORT_HTML

    @property
    def regraded(self) -> Path:
        return self.path / self.REGRADED

    @property
    def regrade_json(self) -> Path:
        return self.path / self.REGRADE_JSON

    def plot(self, name: str) -> Path:
        """A chart of the report (one of :data:`PLOTS` or ``tree_<strategy>.png``)."""
        return self.path / name

    @classmethod
    def report_dir(cls, folder: str | Path) -> RunDir:
        """The folder a report is written to, as a RunDir (its summary/report paths)."""
        return cls(folder)

    def eval_files(self, *, report: bool = True, trees: tuple[str, ...] = ()) -> set[Path]:
        """The files a finished ``budgetlm eval`` leaves here (the report's when ``report``;
        ``trees``: the tree charts' names).  ``eval.log`` is the CLI's and is not included."""
        files = {self.run_json, self.records, self.traces}
        if report:
            files |= {self.summary_json, self.summary_md, self.report_html, *(self.plot(p) for p in PLOTS),
                      *(self.plot(t) for t in trees)}
        return files

    # ------------------------------------------------------------------ contents
    def has_records(self) -> bool:
        return self.records.is_file()

    def read_meta(self) -> dict[str, Any] | None:
        """``run.json`` as a dict (None when there is none, or it is not a JSON object); a
        ``run.json`` that does not parse raises :class:`~budgetlm.io.DamagedFileError`."""
        meta = read_json(self.run_json)
        return meta if isinstance(meta, dict) else None

    def write_meta(self, meta: Mapping[str, JsonValue]) -> None:
        """Rewrite ``run.json`` atomically."""
        write_json_atomic(self.run_json, meta)

    def read_records(self, *, latest: bool = True) -> list[EvalRecord]:
        """The records (the last of each cell unless ``latest=False``); see :func:`~budgetlm.evals.records.read_records`."""
        return read_records(self.records, latest=latest)

    def read_traces(self) -> list[dict[str, Any]]:
        """The trace lines, decoded; see :func:`~budgetlm.evals.records.read_traces`."""
        return read_traces(self.traces)
