"""Durable files: JSONL append and read with one torn-line rule, and atomic JSON writes.

Every line-oriented file the library writes (``records.jsonl``, ``traces.jsonl``,
``train_log.jsonl``) is appended one complete line at a time — written, flushed and fsynced — so a
crash can damage at most the **last** line, leaving it cut short with no terminating newline.  One
rule covers every reader and writer:

* a **torn last line** (the final segment after the last newline that does not parse) is cut
  off and reported: :func:`read_jsonl` leaves it out and reports it (``on_torn`` callback, else a
  warning on the ``budgetlm.io`` logger); :func:`repair_tail` — run by :class:`JsonlWriter` before
  appending — truncates the file there, so new lines start on a clean line.  A final segment
  without its newline that does parse is a complete line: it is kept (and ended by
  :func:`repair_tail`).
* a bad line **anywhere else** is damage no crash of ours leaves behind: reading raises
  :class:`DamagedFileError` (a :class:`~budgetlm.errors.ConfigError`) naming the file and the line,
  never skipping it silently.

:func:`write_json_atomic` and :func:`write_jsonl_atomic` write a whole file to a temporary file
next to it, fsync it and rename it over the target, so readers see the old file or the new one,
never a half-written one (a failure leaves the old file and no temporary file behind).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeAlias, TypeVar

from budgetlm.errors import ConfigError

__all__ = ["DamagedFileError", "JsonObject", "JsonScalar", "JsonValue", "JsonlWriter", "TornLine", "append_jsonl", "read_json", "read_jsonl",
           "repair_tail", "write_json_atomic", "write_jsonl_atomic"]

log = logging.getLogger("budgetlm.io")

T = TypeVar("T")

JsonScalar: TypeAlias = str | int | float | bool | None
"""A JSON scalar."""
JsonValue: TypeAlias = JsonScalar | Sequence["JsonValue"] | Mapping[str, "JsonValue"]
"""A value :func:`json.dumps` writes as it is: scalars, sequences and string-keyed mappings of them.

Read-only views (``Sequence``/``Mapping``) so that ``list[int]`` or ``dict[str, float]`` are
JsonValues; the type for documents the library *writes* (records, summaries, run.json).  What is
*read* back from JSON is narrowed where it is used (``isinstance``) or parsed into a typed model."""
JsonObject: TypeAlias = dict[str, JsonValue]
"""A JSON object the library builds and writes (a record, a summary, a response body)."""


class DamagedFileError(ConfigError):
    """A JSONL file has a bad line before its last one (or a JSON file does not parse)."""

    def __init__(self, path: Path, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        super().__init__(message)


@dataclass(frozen=True)
class TornLine:
    """A torn last line of a JSONL file: where it starts and what was left of it."""

    path: Path
    line: int
    """1-based line number of the torn line."""
    offset: int
    """Byte offset where it starts (the file's length once it is cut off)."""
    text: str
    """What was left of it (at most 80 characters)."""
    cut: bool = False
    """Whether it was cut off the file (:func:`repair_tail`), or only left out of what was read."""

    def __str__(self) -> str:
        return (f"{self.path} line {self.line}: torn last line {self.text!r} (a crash mid-write) "
                + ("cut off" if self.cut else "left out"))


def _report(torn: TornLine, on_torn: Callable[[TornLine], None] | None) -> None:
    if on_torn is not None:
        on_torn(torn)
    else:
        log.warning("%s", torn)


def _damaged(path: Path, line: int, what: str, exc: BaseException) -> DamagedFileError:
    return DamagedFileError(path, line, f"`{path}` line {line} is not {what}: {exc}; the file is damaged in the "
                                        "middle (not a torn last line) — restore it or remove the line")


def read_jsonl(path: str | Path, parse: Callable[[Any], T] | None = None, *,
               on_torn: Callable[[TornLine], None] | None = None, what: str = "a valid row") -> list[T]:
    """The rows of a JSONL file (``[]`` when it does not exist), each through ``parse`` when given.

    Blank lines are skipped.  A torn last line (see the module docstring: the final segment, with
    no newline after it, fails to parse as JSON or through ``parse``) is left out and reported to
    ``on_torn`` (default: a warning).  Any other line that fails raises :class:`DamagedFileError`
    naming the file and the line; ``what`` names the row kind in that message (``"a valid
    record"`` gives "... line 3 is not a valid record: ...").
    """
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    lines = data.split(b"\n")  # the last element is the unterminated tail ("" for a whole file)
    out: list[Any] = []
    offset = 0
    for i, raw in enumerate(lines, 1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        last = i == len(lines)
        try:
            obj = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            if last:
                _report(TornLine(p, i, start, raw[:80].decode("utf-8", "replace")), on_torn)
                break
            raise _damaged(p, i, "valid JSON", exc) from None
        if parse is not None:
            try:
                obj = parse(obj)
            except Exception as exc:  # noqa: BLE001 - whatever ``parse`` rejects (schema, base64, gzip)
                if last:
                    _report(TornLine(p, i, start, raw[:80].decode("utf-8", "replace")), on_torn)
                    break
                raise _damaged(p, i, what, exc) from None
        out.append(obj)
    return out


def repair_tail(path: str | Path, *, on_torn: Callable[[TornLine], None] | None = None) -> TornLine | None:
    """Make ``path`` end on a whole line before appending: a torn last line is cut off (and reported,
    and returned); a complete last line that only lacks its newline gets one.  A missing or empty
    file is left as it is (not created)."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return None
    with open(p, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return None
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        try:
            json.loads(tail)
        except ValueError:
            torn = TornLine(p, data.count(b"\n") + 1, cut, tail[:80].decode("utf-8", "replace"), cut=True)
            fh.truncate(cut)
            _fsync(fh)
            _report(torn, on_torn)
            return torn
        fh.seek(0, os.SEEK_END)
        fh.write(b"\n")  # a whole line whose newline was lost: keep it
        _fsync(fh)
        return None


def _fsync(fh: IO[bytes] | IO[str]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _line(row: object, default: Callable[[Any], Any] | None) -> str:
    """One JSONL line (no newline) of ``row``: a string is taken as already encoded."""
    return row if isinstance(row, str) else json.dumps(row, default=default)


class JsonlWriter:
    """Appends JSONL lines durably: each line written, flushed and fsynced (``fsync=False``: flushed
    only).  Opening repairs the tail first (:func:`repair_tail`).  ``write`` takes a dict (or any
    JSON value) or an already-encoded line."""

    def __init__(self, path: str | Path, *, fsync: bool = True, default: Callable[[Any], Any] | None = str,
                 on_torn: Callable[[TornLine], None] | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.default = default
        repair_tail(self.path, on_torn=on_torn)
        self._fh: IO[str] = open(self.path, "a", encoding="utf-8")

    def write(self, row: Any) -> None:
        self._fh.write(_line(row, self.default) + "\n")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def append_jsonl(path: str | Path, row: object, *, fsync: bool = True,
                 default: Callable[[Any], Any] | None = str) -> None:
    """Append one line to ``path`` (created if missing), flushed and fsynced; the tail is not
    repaired here (call :func:`repair_tail` once before a session of appends)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(_line(row, default) + "\n")
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            _fsync(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: object, *, default: Callable[[Any], Any] | None = str,
                      allow_nan: bool = True, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (indented, newline-terminated) to ``path`` atomically; returns ``path``.

    The JSON is encoded before anything is written, so an unencodable value leaves the old file as
    it was; the text goes to a temporary file in the same folder, fsynced, then renamed over
    ``path``.
    """
    p = Path(path)
    text = json.dumps(data, indent=indent, default=default, allow_nan=allow_nan) + "\n"
    _write_atomic(p, text)
    return p


def write_jsonl_atomic(path: str | Path, rows: Iterable[object], *, default: Callable[[Any], Any] | None = str) -> Path:
    """Write a whole JSONL file atomically (rows: dicts or already-encoded lines); returns ``path``."""
    p = Path(path)
    _write_atomic(p, "".join(_line(r, default) + "\n" for r in rows))
    return p


def read_json(path: str | Path, *, missing: Any = None) -> Any:
    """A JSON file's value (``missing`` when it does not exist); a file that does not parse raises
    :class:`DamagedFileError` naming it."""
    p = Path(path)
    if not p.is_file():
        return missing
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DamagedFileError(p, None, f"{p} is not valid JSON ({exc}); fix or delete it") from None
