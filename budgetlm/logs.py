"""Where logs go: stderr, never stdout; quiet by default; optionally a log file too.

The command line keeps stdout for machine output (``--json``, the eval table), so every log line
— budgetlm's own (logger ``budgetlm``), vLLM's (logger ``vllm``, which installs its own stream
handler on *stdout* at import unless told otherwise) and transformers' — goes to stderr.

* :func:`engine_env` sets the environment variables that vLLM and transformers read **at import**
  (``VLLM_LOGGING_STREAM=ext://sys.stderr``, ``VLLM_LOGGING_LEVEL``, ``TRANSFORMERS_VERBOSITY``),
  so it must run before either is imported; vLLM's worker processes inherit them.
* :func:`configure_logging` calls it, then installs one stderr handler on the root logger with a
  per-family threshold (:data:`LEVELS`: ``budgetlm`` WARNING, ``vllm`` ERROR, ``transformers``
  WARNING by default; ``-v`` INFO, ``-vv`` DEBUG), and moves any handler vLLM already installed
  on stdout (when vLLM was imported first) to stderr.
* :func:`log_to_file` appends budgetlm's INFO lines (eval progress included) to a file.
* :func:`stdout_to_stderr` sends everything written to stdout — at the file-descriptor level, so
  output of C extensions and of child processes started meanwhile too — to stderr for a block.

Progress lines of long runs carry ``extra={"progress": True}``: they reach stderr only when the
console handler is told to show them (``show_progress``: the CLI does so when stderr is not a
terminal, where no progress bar is drawn), and always reach a log file.  Lines with
``extra={"console": True}`` (INFO and up) reach stderr at every verbosity once their logger lets
INFO through (as it does while :func:`log_to_file` is open).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import TextIO

FAMILIES = ("budgetlm", "vllm", "transformers")
"""Logger families whose level follows the verbosity."""

LEVELS: dict[int, dict[str, int]] = {
    0: {"budgetlm": logging.WARNING, "vllm": logging.ERROR, "transformers": logging.WARNING},
    1: {"budgetlm": logging.INFO, "vllm": logging.INFO, "transformers": logging.INFO},
    2: {"budgetlm": logging.DEBUG, "vllm": logging.DEBUG, "transformers": logging.DEBUG},
}
"""Console threshold of each logger family by verbosity (0: default, 1: ``-v``, 2: ``-vv``)."""

OTHER_LEVEL = logging.WARNING
"""Console threshold of every other logger."""

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_TAG = "_budgetlm_handler"


def levels(verbosity: int) -> dict[str, int]:
    """The console threshold of each family for a verbosity (clamped to 0..2)."""
    return dict(LEVELS[max(0, min(int(verbosity), 2))])


_set_by_us: dict[str, str] = {}
"""Values :func:`engine_env` wrote, to tell them from values the user exported."""


def _user_set(env: Mapping[str, str], key: str) -> bool:
    return key in env and env[key] != _set_by_us.get(key)


def engine_env(verbosity: int = 0, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the variables vLLM and transformers read at import: logs on stderr at the verbosity's level.

    The stream is always stderr.  A level the user exported (``VLLM_LOGGING_LEVEL``,
    ``TRANSFORMERS_VERBOSITY``) is kept at the default verbosity; ``-v``/``-vv`` override it.
    """
    env = os.environ if environ is None else environ
    lv = levels(verbosity)
    values = {"VLLM_LOGGING_STREAM": "ext://sys.stderr",
              "VLLM_LOGGING_LEVEL": logging.getLevelName(lv["vllm"]),
              "TRANSFORMERS_VERBOSITY": logging.getLevelName(lv["transformers"]).lower()}
    for key, value in values.items():
        if key == "VLLM_LOGGING_STREAM" or verbosity > 0 or not _user_set(env, key):
            env[key] = value
            if environ is None:
                _set_by_us[key] = value


def _family(name: str) -> str | None:
    for fam in FAMILIES:
        if name == fam or name.startswith(fam + "."):
            return fam
    return None


class _StderrHandler(logging.StreamHandler[TextIO]):
    """A stream handler on whatever ``sys.stderr`` is when a line is written (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # the stream is always the current sys.stderr
        pass


class ThresholdFilter(logging.Filter):
    """Passes a record at or above its family's threshold; progress lines when ``show_progress``."""

    def __init__(self, thresholds: Mapping[str, int], show_progress: bool = False, other: int = OTHER_LEVEL) -> None:
        super().__init__()
        self.thresholds = dict(thresholds)
        self.show_progress = show_progress
        self.other = other

    def threshold(self, name: str) -> int:
        fam = _family(name)
        return self.thresholds[fam] if fam is not None else self.other

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", False) and record.levelno >= logging.INFO:
            return True  # a line meant for the user at every verbosity (e.g. what a run is about to do)
        if self.show_progress and getattr(record, "progress", False):
            return True
        return record.levelno >= self.threshold(record.name)


def _tagged(kind: str) -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, _TAG, None) == kind]


def _sync_logger_levels() -> None:
    """Set each family's logger level to the lowest threshold any of our handlers wants."""
    wanted: dict[str, int] = {}
    for h in logging.getLogger().handlers:
        if getattr(h, _TAG, None) is None:
            continue
        for f in h.filters:
            if isinstance(f, ThresholdFilter):
                for fam, lvl in f.thresholds.items():
                    wanted[fam] = min(wanted.get(fam, logging.CRITICAL), lvl)
    for fam, lvl in wanted.items():
        logging.getLogger(fam).setLevel(lvl)


class _CurrentStderr:
    """A file-like object writing to whatever ``sys.stderr`` is at the time of the write."""

    name = "<stderr>"

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _engine_handlers_to_stderr(vllm_level: int) -> None:
    """When vLLM was imported before :func:`engine_env`, its handler writes to stdout: move it."""
    for h in logging.getLogger("vllm").handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            stream = h.stream
            if stream is sys.stdout or stream is sys.__stdout__ or getattr(stream, "name", None) == "<stdout>":
                h.setStream(_CurrentStderr())
            h.setLevel(vllm_level)


def configure_logging(verbosity: int = 0, *, show_progress: bool = False) -> logging.Handler:
    """Send logs to stderr at the verbosity's thresholds (see the module docstring); idempotent.

    Returns the console handler.  Call it before vLLM or transformers is imported, so that their
    import-time configuration reads :func:`engine_env`'s variables.
    """
    engine_env(verbosity)
    root = logging.getLogger()
    for h in _tagged("console"):
        root.removeHandler(h)
    th = levels(verbosity)
    env_vllm = logging.getLevelName(os.environ.get("VLLM_LOGGING_LEVEL", "").upper())
    if isinstance(env_vllm, int):  # a level the user exported wins at the default verbosity
        th["vllm"] = env_vllm
    env_hf = logging.getLevelName(os.environ.get("TRANSFORMERS_VERBOSITY", "").upper())
    if isinstance(env_hf, int):
        th["transformers"] = env_hf
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(ThresholdFilter(th, show_progress=show_progress))
    setattr(handler, _TAG, "console")
    root.addHandler(handler)
    _sync_logger_levels()
    _engine_handlers_to_stderr(th["vllm"])
    if "transformers" in sys.modules:  # imported already: its own handler has the import-time level
        with contextlib.suppress(Exception):
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(th["transformers"])
    return handler


@contextlib.contextmanager
def log_to_file(path: str | Path, verbosity: int = 0) -> Iterator[logging.Handler]:
    """Append budgetlm's log lines (INFO and up, DEBUG with ``-vv``; progress included) to ``path``.

    Other families are written at their console threshold.  The handler is removed on exit.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    th = levels(verbosity)
    th["budgetlm"] = min(th["budgetlm"], logging.INFO)
    handler = logging.FileHandler(p, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(ThresholdFilter(th, show_progress=True))
    setattr(handler, _TAG, "file")
    root = logging.getLogger()
    root.addHandler(handler)
    _sync_logger_levels()
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()
        _sync_logger_levels()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout inside the block goes to stderr instead.

    Python-level writes (``print``) go through ``sys.stdout``, which is swapped; writes to file
    descriptor 1 (C extensions, child processes started inside the block, which keep the
    redirection for their lifetime) are redirected with ``dup2``.  Where descriptors cannot be
    duplicated the Python-level swap still applies.
    """
    _flush_stdout()
    saved: int | None = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no descriptor 1 or 2 (a daemon, an embedded interpreter)
        if saved is not None:
            os.close(saved)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush_stdout()  # what was buffered inside goes to stderr too
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _flush_stdout() -> None:
    for stream in (sys.stdout, sys.__stdout__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
