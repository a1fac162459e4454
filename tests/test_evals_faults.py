"""Fault injection with real components: a server killed mid-run fails only the problems in flight on it.

Two real ``budgetlm serve`` processes (the scripted backend, streaming each answer token by token
``TOKEN_TIME`` seconds apart) sit behind one OpenAI backend (``openai:URL1,URL2#budgetlm/sample``,
round-robin).  An eval runs in a thread; once the first wave of ``BATCH`` problems is recorded and the
second wave is streaming, server 2 is killed with SIGKILL.  Only the problems whose streams were open
on server 2 may fail (a stream that broke after tokens arrived is not retried); every other problem,
including those started after the kill, must succeed on server 1 through the backend's retries.  A
re-run into the same folder retries exactly the errored records until none are left.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import read_records
from budgetlm.evals.runner import RunOutcome, run_eval

BUDGETLM = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "budgetlm")
TOKEN_TIME = 1.0
"""Seconds between streamed tokens: each answer ("Answer: " then "42") streams for about 2 s."""
BATCH = 8
SIZE = 24  # three waves of BATCH problems
SUITE = f"reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size={SIZE}&seed=1"
BUDGET = {"output_tokens": 64}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return r.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, tmp: Path, name: str) -> subprocess.Popen[bytes]:
    """Start a real ``budgetlm serve`` on 127.0.0.1:``port`` (its log: ``tmp/name.log``)."""
    cmd = [BUDGETLM, "serve", "--backend", f"scripted?token_time={TOKEN_TIME}", "--port", str(port),
           "--db", str(tmp / f"{name}.sqlite"), "--log-level", "warning"]
    with open(tmp / f"{name}.log", "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"budgetlm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            _get(f"http://127.0.0.1:{port}/health")
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"budgetlm serve did not answer /health in 90 s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_a_killed_server_fails_only_its_in_flight_problems_and_a_rerun_retries_them(tmp_path: Path) -> None:
    p1, p2 = _free_port(), _free_port()
    url1, url2 = f"http://127.0.0.1:{p1}/v1", f"http://127.0.0.1:{p2}/v1"
    # n_params: model facts for the cost model (the server has no local checkpoint to read them from)
    model = f"openai:{url1},{url2}#budgetlm/sample?n_params=1000000"
    cfg = EvalConfig(name="faults", suites=[SUITE], models=[model], strategies=["sample"], budgets=[BUDGET],
                     batch_size=BATCH)
    run_dir = tmp_path / "run"
    records = run_dir / "records.jsonl"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs += [_start(p1, tmp_path, "s1"), _start(p2, tmp_path, "s2")]
        for proc, port, name in zip(procs, (p1, p2), ("s1", "s2")):
            _wait_healthy(proc, port, tmp_path / f"{name}.log")
        assert b'"budgetlm/sample"' in _get(url1 + "/models") and b'"budgetlm/sample"' in _get(url2 + "/models")

        box: dict[str, Any] = {}

        def go() -> None:
            try:
                box["out"] = run_eval(cfg, run_dir, progress=False, report=False)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                box["exc"] = exc

        t = threading.Thread(target=go, daemon=True)
        t0 = time.monotonic()
        t.start()
        # the kill point: the first wave is recorded and the second is half-way through its streams
        deadline = time.monotonic() + 60
        while _lines(records) < BATCH:
            assert t.is_alive(), f"the run ended before the kill point: {box}"
            assert time.monotonic() < deadline, f"only {_lines(records)} records after 60 s"
            time.sleep(0.02)
        time.sleep(TOKEN_TIME / 2)
        at_kill = _lines(records)
        assert at_kill < SIZE, "the run finished before the kill"
        procs[1].kill()
        procs[1].wait(timeout=20)
        t.join(timeout=120)
        assert not t.is_alive(), "the run hung after a server was killed"
        first_s = time.monotonic() - t0
        if "exc" in box:
            raise box["exc"]
        first: RunOutcome = box["out"]

        lines = read_records(records, latest=False)
        assert len(lines) == SIZE > at_kill  # records were written after the kill: it happened mid-run
        assert first.written == first.total == SIZE and first.retried == 0 and first.skipped == 0
        assert len({r.key for r in lines}) == SIZE  # one record per item × configuration
        errored = [r for r in lines if r.error is not None]
        print(f"\nfirst run {first_s:.1f} s: {at_kill} records before the kill, {len(errored)} errored")
        # only the problems streaming on the killed server fail: at most one wave, never a whole batch of neighbours
        assert 1 <= len(errored) <= BATCH // 2 < BATCH
        assert len(first.errors) == len(errored)
        assert all(url2 in r.error and "broke after" in r.error for r in errored), [r.error for r in errored]
        assert all(r.stop_reason == "error" and r.output_tokens <= BUDGET["output_tokens"] for r in errored)
        assert not any(r.error for r in lines[:at_kill])  # nothing finished before the kill errored
        ok = [r for r in lines if r.error is None]
        assert len(ok) == SIZE - len(errored)
        assert all(0 < r.output_tokens <= BUDGET["output_tokens"] and not r.over_budget for r in ok)
        assert all(r.text == "Answer: 42" and r.answer == "42" for r in ok)

        # re-run with server 2 still down: only the errored records run again, on server 1
        t1 = time.monotonic()
        second = run_eval(cfg, run_dir, progress=False, report=False)
        print(f"re-run {time.monotonic() - t1:.1f} s: retried {second.retried}, errors {len(second.errors)}")
        assert (second.retried, second.written, second.skipped, second.errors) == (
            len(errored), len(errored), SIZE - len(errored), [])
        latest = read_records(records)
        assert len(latest) == SIZE and not any(r.error for r in latest)
        assert {r.item_id for r in errored} <= {r.item_id for r in read_records(records, latest=False)[SIZE:]}
        assert all(r.answer == "42" and not r.over_budget for r in latest)

        third = run_eval(cfg, run_dir, progress=False, report=False)
        assert (third.retried, third.written, third.skipped) == (0, 0, SIZE)  # nothing errored is left
    finally:
        for proc in procs:
            _stop(proc)
