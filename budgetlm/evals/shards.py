"""Sharded evaluation: one grid split over N processes or hosts, and the checked merge of their folders.

Partition: a grid's cells are its (suite, item id, configuration id) keys — the same keys records
are resumed by (:attr:`~budgetlm.evals.records.EvalRecord.key`).  Shard ``I/N`` (1-based, ``1 <= I
<= N``) owns the cells whose key hashes to it: the first 8 bytes of the SHA-256 of the key's JSON,
as a big-endian integer, mod ``N``, plus one (:func:`shard_of`).  The partition depends on nothing
but the key and ``N`` — not on the machine, the Python version, ``PYTHONHASHSEED`` or the order the
items are listed in — so N processes started with ``--shard 1/N`` … ``--shard N/N`` on any hosts
share one grid with no coordination: every cell is owned by exactly one shard.

Each shard's ``run.json`` records ``shard: {index, count, cells, grid_cells}``
(:class:`ShardInfo`: its index, the shard count, how many cells it owns and how many the whole grid
has) next to the config and its digest; a full (unsharded) run records ``shard: null``.  Resuming
a shard folder needs the same ``--shard`` (the runner refuses another spec).

Merge (:func:`merge_shards`, ``budgetlm merge DIR... --out MERGED``; ``budgetlm report`` does the
same in memory when given several shard folders, :func:`merge_in_memory`) refuses, with a
:class:`~budgetlm.errors.ConfigError` naming the folders and the fix:

* a folder that is not a shard (a full run, or no ``run.json``) among shards — a mixture;
* shards of different config digests, or of different shard counts;
* the same shard index twice;
* overlap: a cell recorded in two folders, or a record of a cell another shard owns;
* a gap: a shard index with no folder (unless ``allow_partial``);
* an incomplete shard: a cell of its partition without a successful record (unless
  ``allow_partial``) — resume it with the same command;
* shards that saw different grids (their cell counts do not add up to the grid size: a suite's data
  differs between machines).

The merged folder holds every shard's records (the last of each cell) in ``records.jsonl``, their
traces in ``traces.jsonl``, and a ``run.json`` with the config, its digest, ``shard: null`` and
``merged_from`` (each shard folder's path, shard and sessions); it then reads like a full run —
``budgetlm report`` compares it with other runs, and ``budgetlm eval`` with the same config and
``--out`` finds nothing left to run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from budgetlm.errors import ConfigError, invalid, missing
from budgetlm.evals.records import EvalRecord
from budgetlm.evals.rundir import RunDir
from budgetlm.io import JsonObject, read_jsonl, write_json_atomic, write_jsonl_atomic
from budgetlm.versions import library_versions

CellKey = tuple[str, str, str]
"""(suite, item id, configuration id): one cell of a grid."""

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_SPEC_FIX = "pass e.g. --shard 1/3"


def shard_of(key: CellKey, count: int) -> int:
    """The 1-based index of the shard owning ``key`` among ``count`` shards (a stable hash, not :func:`hash`)."""
    digest = hashlib.sha256(json.dumps(list(key), ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): the cells :func:`shard_of` assigns to ``index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.index, self.count))
        if not ok or not 1 <= self.index <= self.count:
            raise invalid("--shard", "I/N with 1 <= I <= N", f"{self.index}/{self.count}", _SPEC_FIX)

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"2/3"`` → ``Shard(2, 3)``; anything else is refused with the expected form."""
        m = _SPEC.match(text) if isinstance(text, str) else None
        if m is None:
            raise invalid("--shard", "I/N with 1 <= I <= N", text, _SPEC_FIX)
        index, count = int(m.group(1)), int(m.group(2))
        if not 1 <= index <= count:
            raise invalid("--shard", "I/N with 1 <= I <= N", text, _SPEC_FIX)
        return cls(index, count)

    @classmethod
    def coerce(cls, value: Shard | tuple[int, int] | str | None) -> Shard | None:
        """A :class:`Shard` from itself, an ``(index, count)`` pair or an ``"I/N"`` string; None stays None."""
        if value is None or isinstance(value, Shard):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        raise invalid("shard", "a Shard, an (index, count) pair or an 'I/N' string", value, _SPEC_FIX)

    @property
    def label(self) -> str:
        """``"2/3"``."""
        return f"{self.index}/{self.count}"

    def owns(self, key: CellKey) -> bool:
        """Whether this shard runs the cell ``key``."""
        return self.count == 1 or shard_of(key, self.count) == self.index


class ShardInfo(BaseModel):
    """The ``shard`` block of a shard folder's ``run.json``."""

    index: int = Field(description="This shard's index, 1-based.")
    count: int = Field(description="How many shards the grid is split into.")
    cells: int | None = Field(default=None, description="Cells of the grid this shard owns (None before the "
                                                        "first session has loaded the suites).")
    grid_cells: int | None = Field(default=None, description="Cells of the whole grid, as this shard saw it.")

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class RunFolder:
    """A run folder's ``run.json`` and its records (the last record of each cell)."""

    path: Path
    meta: dict[str, Any]
    shard: ShardInfo | None
    records: list[EvalRecord] = field(default_factory=list)

    @property
    def digest(self) -> str | None:
        return self.meta.get("config_digest")

    @property
    def what(self) -> str:
        """``'runs/x-2' (shard 2/3)`` for messages."""
        return f"{str(self.path)!r} (shard {self.shard.label})" if self.shard else f"{str(self.path)!r}"


def read_meta(path: Path) -> dict[str, Any] | None:
    """A folder's ``run.json`` as a dict, None when there is none (:meth:`RunDir.read_meta`)."""
    return RunDir(path).read_meta()


def shard_info(meta: Mapping[str, object] | None) -> ShardInfo | None:
    """The ``shard`` block of a ``run.json`` dict; None for a full run (or no ``run.json``)."""
    block = (meta or {}).get("shard")
    return ShardInfo.model_validate(block) if isinstance(block, dict) else None


def is_shard_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a shard of a grid (its ``run.json`` has a ``shard`` block)."""
    return shard_info(read_meta(Path(path))) is not None


def read_folder(path: str | Path) -> RunFolder:
    """A run folder with its ``run.json`` (required) and the last record of each cell."""
    rd = RunDir(path)
    meta = rd.read_meta()
    if meta is None:
        raise invalid("shard folder", "a folder written by `budgetlm eval CONFIG --out DIR --shard I/N`",
                      str(rd.path), f"{rd.run_json} does not exist; pass the --out folders of the shard runs")
    return RunFolder(rd.path, meta, shard_info(meta), rd.read_records())


@dataclass
class ShardCheck:
    """What :func:`check_shards` found: the shards present, those missing and the cells left to run."""

    count: int
    digest: str
    missing_shards: list[int] = field(default_factory=list)
    """Shard indices with no folder (a gap; only with ``allow_partial``)."""
    missing_cells: dict[int, int | None] = field(default_factory=dict)
    """Shard index → cells of its partition without a successful record, None when the shard has not
    started (only with ``allow_partial``)."""

    @property
    def complete(self) -> bool:
        return not self.missing_shards and not self.missing_cells


def _refuse(param: str, must: str, got: str, fix: str) -> ConfigError:
    """:func:`~budgetlm.errors.invalid`'s message pattern with ``got`` already written out (folders quoted inside)."""
    return ConfigError(f"`{param}` must be {must}, got {got}; {fix}")


def _cell(key: CellKey) -> str:
    return f"(suite {key[0]!r}, item {key[1]!r}, config {key[2]!r})"


def check_shards(folders: Sequence[RunFolder], *, allow_partial: bool = False,
                 partial_hint: str = "") -> ShardCheck:
    """Check that ``folders`` are the shards of one grid, disjoint and (unless ``allow_partial``) complete.

    Raises :class:`ConfigError` on a mixture, mixed digests or shard counts, a duplicate index, an
    overlap, a record outside its shard, a gap or an incomplete shard (the last two only without
    ``allow_partial``); see the module docstring.  ``partial_hint`` is appended to the gap and
    incomplete messages (``budgetlm report`` mentions ``--allow-partial``).
    """
    if not folders:
        raise invalid("shard folders", "a non-empty list", [], "pass the --out folders of the shard runs")
    full = [f for f in folders if f.shard is None]
    if full:
        shards = [f for f in folders if f.shard is not None]
        raise _refuse(
            "shard folders", "shards of one grid (each written with --shard I/N)",
            f"{str(full[0].path)!r}, a full run (run.json has no shard)"
            + (f", among shard folders {', '.join(repr(str(s.path)) for s in shards)}" if shards else ""),
            "merge the shards on their own (`budgetlm merge SHARD... --out MERGED`) and compare the merged "
            "folder with the full run in `budgetlm report`")
    first = folders[0]
    for f in folders[1:]:
        if f.digest != first.digest:
            raise _refuse("shard folders", "shards of one config (one config digest)",
                          f"digest {first.digest} in {first.what} and digest {f.digest} in {f.what}",
                          "run every shard with the same config file (only --shard and --out differ), "
                          "or merge each config's shards separately")
    if first.shard is None:
        raise missing('first.shard')
    count = first.shard.count
    for f in folders[1:]:
        if f.shard is None:
            raise missing('f.shard')
        if f.shard.count != count:
            raise _refuse("shard folders", "shards of one split (the same N in --shard I/N)",
                          f"{first.what} and {f.what}", "merge shards of one split only; re-run the others "
                          f"with --shard I/{count}")
    by_index: dict[int, RunFolder] = {}
    for f in folders:
        if f.shard is None:
            raise missing('f.shard')
        if f.shard.index in by_index:
            raise _refuse("shard folders", "one folder per shard index",
                          f"shard {f.shard.label} twice: {str(by_index[f.shard.index].path)!r} and "
                          f"{str(f.path)!r}", "pass each shard's folder once")
        by_index[f.shard.index] = f
    owner: dict[CellKey, RunFolder] = {}
    for f in folders:
        for r in f.records:
            if r.key in owner:
                n = sum(r2.key in owner for r2 in f.records)
                raise _refuse("shard folders", "disjoint (no cell recorded in two shards)",
                              f"{n} cell(s) recorded in both {owner[r.key].what} and {f.what}, e.g. {_cell(r.key)}",
                              "a folder holds records it was not sharded to run (copied records?); re-run the "
                              "affected shard into a new --out folder")
        for r in f.records:
            owner[r.key] = f
    for f in folders:
        if f.shard is None:
            raise missing('f.shard')
        for r in f.records:
            if shard_of(r.key, count) != f.shard.index:
                raise _refuse(f"shard folder {str(f.path)!r}", f"only cells of shard {f.shard.label}",
                              f"{_cell(r.key)}, which belongs to shard {shard_of(r.key, count)}/{count}",
                              "the folder holds records it was not sharded to run; re-run the shard into a new "
                              "--out folder")
    check = ShardCheck(count=count, digest=str(first.digest),
                       missing_shards=[i for i in range(1, count + 1) if i not in by_index])
    if check.missing_shards and not allow_partial:
        listed = ", ".join(f"{i}/{count}" for i in check.missing_shards)
        raise _refuse("shard folders", f"every shard 1/{count} … {count}/{count}",
                      f"{len(folders)} folder(s), none for shard(s) {listed}",
                      f"run the missing shard(s) (`budgetlm eval CONFIG --out DIR --shard "
                      f"{check.missing_shards[0]}/{count}`) and pass their folders too{partial_hint}")
    for index, f in sorted(by_index.items()):
        if f.shard is None:
            raise missing('f.shard')
        done = sum(r.error is None for r in f.records)
        cells = f.shard.cells
        left = (cells - done) if cells is not None else None
        if left is None or left > 0:
            check.missing_cells[index] = left
            if not allow_partial:
                got = (f"{left} of its {cells} cell(s) with no successful record" if left is not None
                       else "a run that has not started (no cell count in run.json)")
                raise _refuse(f"shard {f.shard.label}", "complete", f"{got} in {str(f.path)!r}",
                              "resume it with the same command (`budgetlm eval CONFIG --out "
                              f"{f.path} --shard {f.shard.label}`){partial_hint}")
    if not check.missing_shards:
        grids = {f.shard.grid_cells for f in folders if f.shard is not None}
        cells_sum = sum(f.shard.cells or 0 for f in folders if f.shard is not None)
        if len(grids) > 1 or (not check.missing_cells and grids != {cells_sum}):
            raise _refuse("shard folders", "shards of one grid (their cells add up to the grid)",
                          f"grid sizes {sorted(g or 0 for g in grids)} and {cells_sum} cells over the shards",
                          "a suite's items differ between the machines (a data file?); give every machine the "
                          "same data and re-run the shards into new --out folders")
    return check


def _merged_meta(folders: Sequence[RunFolder], check: ShardCheck) -> JsonObject:
    """``run.json`` of the merge: the config and digest of the shards, ``merged_from`` each shard's sessions."""
    first = min(folders, key=lambda f: f.shard.index if f.shard else 0)
    meta: JsonObject = {k: first.meta.get(k) for k in ("name", "config", "config_digest", "seed")}
    meta.update({
        "shard": None,
        "versions": library_versions(),
        "merged_at": time.time(),
        "merged_from": [
            {"path": str(f.path.resolve()), "shard": f.shard.model_dump() if f.shard else None,
             "records": len(f.records), "sessions": f.meta.get("sessions", []), "versions": f.meta.get("versions")}
            for f in sorted(folders, key=lambda f: f.shard.index if f.shard else 0)
        ],
        "sessions": [],
    })
    if not check.complete:
        meta["partial"] = {"missing_shards": check.missing_shards,
                           "missing_cells": {str(k): v for k, v in check.missing_cells.items()}}
    return meta


def _sorted(folders: Sequence[RunFolder]) -> list[RunFolder]:
    return sorted(folders, key=lambda f: f.shard.index if f.shard else 0)


def merge_in_memory(paths: Sequence[str | Path], *, allow_partial: bool = False,
                    partial_hint: str = "") -> tuple[JsonObject, list[EvalRecord]]:
    """The merged ``run.json`` dict and records of shard folders, checked by :func:`check_shards`; nothing written."""
    folders = [read_folder(p) for p in paths]
    check = check_shards(folders, allow_partial=allow_partial, partial_hint=partial_hint)
    records = [r for f in _sorted(folders) for r in f.records]
    return _merged_meta(folders, check), records


@dataclass
class MergeOutcome:
    """What :func:`merge_shards` wrote."""

    out_dir: Path
    records: int
    shards: int
    report: Path | None = None
    """The folder holding ``report.html`` and ``summary.*``, when written."""


def _trace_lines(path: Path, keys: set[CellKey]) -> dict[CellKey, str]:
    """The last ``traces.jsonl`` line of each key in ``keys``, re-encoded as written (the torn-line
    rule of :mod:`budgetlm.io`: a torn last line is left out, a bad line elsewhere is an error)."""
    out: dict[CellKey, str] = {}
    for key, line in read_jsonl(path, lambda row: ((row["suite"], row["item_id"], row["config_id"]), row),
                                what="a valid trace line"):
        if key in keys:
            out[key] = json.dumps(line)
    return out


def merge_shards(paths: Sequence[str | Path], out_dir: str | Path, *, report: bool = True) -> MergeOutcome:
    """Check the shard folders ``paths`` (:func:`check_shards`, complete) and write their merge into ``out_dir``.

    ``out_dir`` must be new, empty, or a previous merge's folder (then replaced); it must not be one of
    the shards.  Writes ``records.jsonl``, ``traces.jsonl``, ``run.json`` and (``report``) the report.
    """
    out = Path(out_dir)
    folders = [read_folder(p) for p in paths]
    check = check_shards(folders)
    resolved = {f.path.resolve() for f in folders}
    if out.resolve() in resolved:
        raise invalid("--out", "a folder other than the shards'", str(out), "pass a new folder, e.g. --out runs/NAME")
    if out.exists() and any(out.iterdir()):
        prior = read_meta(out)
        if prior is None or "merged_from" not in prior:
            raise invalid("--out", "a new or empty folder (or a previous merge's)", str(out),
                          "it holds other files; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    ordered = _sorted(folders)
    records = [r for f in ordered for r in f.records]
    merged = RunDir(out)
    write_jsonl_atomic(merged.records, [r.model_dump_json() for r in records])
    traces: list[str] = []
    for f in ordered:
        lines = _trace_lines(RunDir(f.path).traces, {r.key for r in f.records})
        traces += [lines[r.key] for r in f.records if r.key in lines]
    write_jsonl_atomic(merged.traces, traces)
    write_json_atomic(merged.run_json, _merged_meta(folders, check))
    outcome = MergeOutcome(out, records=len(records), shards=len(folders))
    if report:
        from budgetlm.evals.report import write_report

        outcome.report = write_report([out]).parent
    return outcome

