"""Sharded evaluation: the partition, shard runs, and the checked merge (``budgetlm merge`` / ``report``).

Three real ``budgetlm eval --shard k/3`` processes of one greedy grid merge into exactly the records of
a one-process run; overlapping, gapped, duplicated, incomplete, mixed-config and shard+full-run folder
sets are refused with messages naming the folders and the fix; resuming a shard with another spec is
refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from budgetlm import ConfigError
from budgetlm.cli import app
from budgetlm.evals.config import EvalConfig
from budgetlm.evals.records import EvalRecord, read_records
from budgetlm.evals.report import load_runs, summary_doc, write_report
from budgetlm.evals.runner import Runner, run_eval
from budgetlm.evals.shards import Shard, merge_in_memory, merge_shards, shard_of

REPO = Path(__file__).resolve().parents[1]
SUITES = ["reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=12&seed=1",
          "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=6&seed=2"]
GRID = 36  # (12 + 6) items x 2 budgets
cli = CliRunner()


def config(**kw: object) -> EvalConfig:
    base: dict[str, object] = dict(name="sharded", suites=SUITES, models=["scripted"],
                                   strategies=[{"name": "sample", "params": {"temperature": 0.0}}],
                                   budgets=[{"output_tokens": 1}, {"output_tokens": 8}], batch_size=4)
    base.update(kw)
    return EvalConfig(**base)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _fingerprint(path: Path) -> set[tuple[object, ...]]:
    """What must agree between a merged and a one-process run: key, answer, verdict, tokens, truncation."""
    return {(r.key, r.answer, r.correct, r.output_tokens, r.truncated, r.error) for r in read_records(path)}


# ---------------------------------------------------------------------------------------------- the partition
KEYS = [(f"suite{s}", f"item-{i}", f"cfg{c:012d}") for s in range(3) for i in range(50) for c in range(4)]


@pytest.mark.parametrize("n", range(1, 13))
def test_the_partition_is_disjoint_covers_the_grid_and_is_balanced(n: int) -> None:
    owners = {key: [i for i in range(1, n + 1) if Shard(i, n).owns(key)] for key in KEYS}
    assert all(len(o) == 1 for o in owners.values())  # each cell in exactly one shard: no overlap, no gap
    sizes = [sum(o == [i] for o in owners.values()) for i in range(1, n + 1)]
    assert sum(sizes) == len(KEYS)
    assert min(sizes) > 0.5 * len(KEYS) / n and max(sizes) < 1.5 * len(KEYS) / n  # a hash, not a skew


def test_the_partition_is_a_stable_hash_not_python_hash() -> None:
    """Pinned values: the assignment must not change across versions, machines or PYTHONHASHSEED."""
    assert [shard_of(("suite", f"q{i}", "cfg"), 5) for i in range(12)] == [5, 4, 4, 1, 2, 5, 4, 2, 2, 4, 4, 2]
    assert [shard_of(("jsonl:data/x.jsonl", "é-7", "abcdef012345"), n) for n in (2, 3, 7, 10)] == [2, 1, 2, 10]
    code = ("from budgetlm.evals.shards import shard_of;"
            "print([shard_of(('s', f'q{i}', 'c'), 7) for i in range(40)])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**_env(), "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and json.loads(outs.pop()) == [shard_of(("s", f"q{i}", "c"), 7) for i in range(40)]


@pytest.mark.parametrize("spec", ["4/3", "0/3", "3", "a/b", "1/0", "-1/3", "1/3/3", ""])
def test_bad_shard_specs_are_refused_with_the_expected_form(spec: str) -> None:
    with pytest.raises(ConfigError) as err:
        Shard.parse(spec)
    assert str(err.value) == f"`--shard` must be I/N with 1 <= I <= N, got {spec!r}; pass e.g. --shard 1/3"


def test_shard_specs_parse_and_coerce() -> None:
    assert Shard.parse(" 2 / 3 ") == Shard(2, 3) == Shard.coerce((2, 3)) == Shard.coerce("2/3")
    assert Shard.coerce(None) is None and Shard(1, 1).owns(("a", "b", "c"))
    with pytest.raises(ConfigError, match="got '4/3'"):
        Runner(config(), "unused", shard=(4, 3))
    with pytest.raises(ConfigError, match="`--shard` must be I/N"):
        Shard(True, 3)  # type: ignore[arg-type]


def test_the_cli_refuses_a_bad_shard_before_running(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config().model_dump()))
    res = cli.invoke(app, ["eval", str(cfg), "--out", str(tmp_path / "x"), "--shard", "4/3", "--no-progress"])
    assert res.exit_code == 2
    assert "`--shard` must be I/N with 1 <= I <= N, got '4/3'; pass e.g. --shard 1/3" in " ".join(res.output.split())
    assert not (tmp_path / "x" / "records.jsonl").exists()


# ---------------------------------------------------------------------------------------------- real processes
def test_three_shard_processes_merge_into_exactly_the_one_process_run(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config().model_dump()))
    base = [sys.executable, "-m", "budgetlm.cli", "eval", str(cfg), "--no-progress", "--no-report"]
    procs = [subprocess.Popen([*base, "--out", str(tmp_path / f"shard-{k}"), "--shard", f"{k}/3"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 2, 3)]
    subprocess.run([*base, "--out", str(tmp_path / "full")], check=True, capture_output=True, env=_env(), timeout=300)
    for k, p in enumerate(procs, 1):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert f"shard {k}/3" in err  # the shard is named in the log and the closing line
    shards = [tmp_path / f"shard-{k}" for k in (1, 2, 3)]
    keys = [{r.key for r in read_records(s / "records.jsonl")} for s in shards]
    assert all(keys) and sum(map(len, keys)) == GRID and len(set.union(*keys)) == GRID  # disjoint, covering
    for k, s in enumerate(shards, 1):
        meta = json.loads((s / "run.json").read_text())
        assert meta["shard"] == {"index": k, "count": 3, "cells": len(keys[k - 1]), "grid_cells": GRID}
        assert meta["config_digest"] == config().digest()
    assert json.loads((tmp_path / "full" / "run.json").read_text())["shard"] is None

    res = subprocess.run([sys.executable, "-m", "budgetlm.cli", "merge", *map(str, shards), "--out",
                          str(tmp_path / "merged"), "--json"], capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    merged = tmp_path / "merged"
    assert len(read_records(merged / "records.jsonl", latest=False)) == GRID  # one line per cell
    assert _fingerprint(merged / "records.jsonl") == _fingerprint(tmp_path / "full" / "records.jsonl")
    assert {r.answer for r in read_records(merged / "records.jsonl")} == {None, "42"}  # both budgets present
    trace_keys = {(t["suite"], t["item_id"], t["config_id"]) for t in map(json.loads, (merged / "traces.jsonl").open())}
    assert trace_keys == {r.key for r in read_records(tmp_path / "full" / "records.jsonl")}
    meta = json.loads((merged / "run.json").read_text())
    assert meta["config_digest"] == config().digest() and meta["shard"] is None
    assert [m["shard"]["index"] for m in meta["merged_from"]] == [1, 2, 3]
    assert all(m["sessions"] and m["path"].endswith(f"shard-{m['shard']['index']}") for m in meta["merged_from"])
    summary = json.loads(res.stdout)
    full = summary_doc([tmp_path / "full"])
    assert [(c["config_id"], c["n"], c["accuracy"]) for c in summary["configs"]] == [
        (c["config_id"], c["n"], c["accuracy"]) for c in full["configs"]]
    # `budgetlm report` merges the shard folders in memory to the same table
    rep = cli.invoke(app, ["report", *map(str, shards), "--format", "json"])
    assert rep.exit_code == 0, rep.output
    assert [(c["config_id"], c["n"]) for c in json.loads(rep.stdout)["configs"]] == [
        (c["config_id"], c["n"]) for c in full["configs"]]
    # the merged folder reads as a finished full run: resuming it runs nothing
    again = run_eval(config(), merged, progress=False, report=False)
    assert (again.written, again.skipped) == (0, GRID)


@pytest.mark.slow
def test_real_model_shards_give_the_greedy_answers_of_one_process(tmp_path: Path) -> None:
    """The embedded model, greedy: the merged shards' answers equal a one-process run's, cell by cell."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config(suites=SUITES[:1], models=["hf:default"], limit=3,
                                     budgets=[{"output_tokens": 24}], batch_size=3).model_dump()))
    base = [sys.executable, "-m", "budgetlm.cli", "eval", str(cfg), "--no-progress", "--no-report"]
    for out, extra in [("full", []), ("s1", ["--shard", "1/2"]), ("s2", ["--shard", "2/2"])]:
        subprocess.run([*base, "--out", str(tmp_path / out), *extra], check=True, capture_output=True, env=_env(),
                       timeout=600)
    merge_shards([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged", report=False)
    merged = {r.key: (r.text, r.answer) for r in read_records(tmp_path / "merged" / "records.jsonl")}
    full = {r.key: (r.text, r.answer) for r in read_records(tmp_path / "full" / "records.jsonl")}
    assert len(full) == 3 and merged == full


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards 1..3 of the grid, a full run, shard 3 of another config and shard 1/2 of the same config."""
    root = tmp_path_factory.mktemp("shards")
    for k in (1, 2, 3):
        run_eval(config(), root / f"s{k}", progress=False, report=False, shard=(k, 3))
    run_eval(config(), root / "full", progress=False, report=False)
    run_eval(config(seed=5), root / "other3", progress=False, report=False, shard=(3, 3))
    run_eval(config(), root / "half1", progress=False, report=False, shard=(1, 2))
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _copy_record(src: str, dst: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / dst / "records.jsonl").open("a").write(_lines(root / src / "records.jsonl")[0])
    return edit


def _move_record(src: str, dst: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        lines = _lines(root / src / "records.jsonl")
        (root / src / "records.jsonl").write_text("".join(lines[1:]))
        (root / dst / "records.jsonl").open("a").write(lines[0])
    return edit


def _drop_record(dst: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / dst / "records.jsonl").write_text("".join(_lines(root / dst / "records.jsonl")[:-1]))
    return edit


def _error_record(dst: str) -> Callable[[Path], None]:
    """The cell's last record is an error (appended after its success, as a failed retry would be)."""
    def edit(root: Path) -> None:
        rec = EvalRecord.model_validate_json(_lines(root / dst / "records.jsonl")[0])
        (root / dst / "records.jsonl").open("a").write(rec.model_copy(update={"error": "boom"}).model_dump_json() + "\n")
    return edit


def _set_grid(dst: str, grid: int) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        meta = json.loads((root / dst / "run.json").read_text())
        meta["shard"]["grid_cells"] = grid
        (root / dst / "run.json").write_text(json.dumps(meta))
    return edit


def _no_edit(root: Path) -> None:
    return None


def _copy_dir(src: str, dst: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        shutil.copytree(root / src, root / dst)
    return edit


def _bare_dir(dst: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / dst).mkdir()
        shutil.copy(root / "s1" / "records.jsonl", root / dst / "records.jsonl")
    return edit


REFUSALS = [  # (case, edit of a copy of the shard set, folders passed, message fragments)
    ("overlap", _copy_record("s1", "s2"), ["s1", "s2", "s3"],
     ["must be disjoint (no cell recorded in two shards), got 1 cell(s) recorded in both", "/s1' (shard 1/3)",
      "/s2' (shard 2/3)", "e.g. (suite 'reasoning_gym:chain_sum"]),
    ("foreign cell", _move_record("s1", "s2"), ["s1", "s2", "s3"],
     ["must be only cells of shard 2/3", "which belongs to shard 1/3", "re-run the shard into a new --out"]),
    ("gap", _no_edit, ["s1", "s3"], ["must be every shard 1/3 … 3/3, got 2 folder(s), none for shard(s) 2/3",
                                     "--shard 2/3`) and pass their folders too"]),
    ("two gaps", _no_edit, ["s2"], ["none for shard(s) 1/3, 3/3"]),
    ("duplicate index", _copy_dir("s1", "s1-copy"), ["s1", "s1-copy", "s2", "s3"],
     ["must be one folder per shard index, got shard 1/3 twice:", "s1-copy", "pass each shard's folder once"]),
    ("mixed digest", _no_edit, ["s1", "s2", "other3"],
     ["must be shards of one config (one config digest), got digest", config().digest(), config(seed=5).digest(),
      "other3", "run every shard with the same config file"]),
    ("mixed shard count", _no_edit, ["s1", "s2", "half1"], ["must be shards of one split (the same N in --shard I/N)",
                                                          "(shard 1/2)"]),
    ("shard with a full run", _no_edit, ["s1", "s2", "s3", "full"],
     ["must be shards of one grid (each written with --shard I/N), got", "full', a full run (run.json has no shard)",
      "merge the shards on their own"]),
    ("no run.json", _bare_dir("bare"), ["s1", "s2", "bare"], ["run.json does not exist"]),
    ("incomplete", _drop_record("s2"), ["s1", "s2", "s3"],
     ["`shard 2/3` must be complete, got 1 of its", "cell(s) with no successful record",
      "resume it with the same command (`budgetlm eval CONFIG --out", "--shard 2/3`)"]),
    ("errored cell", _error_record("s3"), ["s1", "s2", "s3"], ["`shard 3/3` must be complete, got 1 of its"]),
    ("different grids", _set_grid("s2", GRID + 6), ["s1", "s2", "s3"],
     ["must be shards of one grid (their cells add up to the grid)", "a suite's items differ between the machines"]),
]


@pytest.mark.parametrize(("case", "edit", "folders", "fragments"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_shard_sets_are_refused_by_merge_and_report(shard_set: Path, tmp_path: Path, case: str,
                                                        edit: Callable[[Path], None], folders: list[str],
                                                        fragments: list[str]) -> None:
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    edit(root)
    dirs = [root / f for f in folders]
    with pytest.raises(ConfigError) as err:
        merge_shards(dirs, tmp_path / "merged")
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert not (tmp_path / "merged").exists()  # nothing written
    if len(dirs) > 1:  # one shard folder alone is reported as a partial run
        with pytest.raises(ConfigError) as rep:
            load_runs(dirs)
        assert fragments[0] in str(rep.value)
    res = cli.invoke(app, ["merge", *map(str, dirs), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 2 and fragments[0] in " ".join(res.output.split())


def test_the_set_unedited_merges(shard_set: Path, tmp_path: Path) -> None:
    """The control of the refusal table: the same set without an edit is accepted."""
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    out = merge_shards([root / "s3", root / "s1", root / "s2"], tmp_path / "merged", report=False)  # any order
    assert (out.records, out.shards) == (GRID, 3)
    assert _fingerprint(tmp_path / "merged" / "records.jsonl") == _fingerprint(root / "full" / "records.jsonl")


def test_allow_partial_reports_gaps_and_incomplete_shards_but_never_overlaps(shard_set: Path, tmp_path: Path) -> None:
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    _drop_record("s3")(root)
    doc = summary_doc([root / "s1", root / "s3"], allow_partial=True)
    n1, n3 = (len(read_records(root / s / "records.jsonl")) for s in ("s1", "s3"))
    assert sum(c["n"] for c in doc["configs"]) == n1 + n3
    res = cli.invoke(app, ["report", str(root / "s1"), str(root / "s3"), "--allow-partial", "--format", "md"])
    assert res.exit_code == 0, res.output
    assert "Partial merge: sharded lacks shard(s) 2; incomplete shards (cells missing): {'3': 1}" in res.stdout
    res = cli.invoke(app, ["report", str(root / "s1"), str(root / "s3"), "--format", "md"])
    assert res.exit_code == 2 and "or pass --allow-partial to report what is there" in " ".join(res.output.split())
    _copy_record("s1", "s3")(root)
    with pytest.raises(ConfigError, match="must be disjoint"):
        merge_in_memory([root / "s1", root / "s3"], allow_partial=True)
    with pytest.raises(ConfigError, match="a full run"):
        summary_doc([root / "s1", root / "full"], allow_partial=True)


def test_a_lone_shard_report_is_marked_partial(shard_set: Path, tmp_path: Path) -> None:
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    html = write_report([root / "s2"])
    summary = json.loads((html.parent / "summary.json").read_text())
    assert summary["runs"][0]["name"] == "sharded [shard 2/3]"
    cells = json.loads((root / "s2" / "run.json").read_text())["shard"]["cells"]
    assert f"Partial results: sharded [shard 2/3] is shard 2/3 of its grid ({cells} of {GRID} cells)" in (
        html.parent / "summary.md").read_text()
    assert "Partial results" not in write_report([root / "full"]).with_name("summary.md").read_text()


def test_reporting_several_shards_needs_an_out_folder(shard_set: Path, tmp_path: Path) -> None:
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    dirs = [root / f"s{k}" for k in (1, 2, 3)]
    with pytest.raises(ConfigError, match="`--out` must be a folder for the merged report of shard folders"):
        write_report(dirs)
    html = write_report(dirs, tmp_path / "report")
    summary = json.loads(html.with_name("summary.json").read_text())
    assert sum(c["n"] for c in summary["configs"]) == GRID
    assert len(summary["runs"]) == 1 and len(summary["runs"][0]["meta"]["merged_from"]) == 3


def test_merge_refuses_an_out_folder_that_is_a_shard_or_holds_other_files(shard_set: Path, tmp_path: Path) -> None:
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    dirs = [root / f"s{k}" for k in (1, 2, 3)]
    with pytest.raises(ConfigError, match="`--out` must be a folder other than the shards'"):
        merge_shards(dirs, root / "s1", report=False)
    with pytest.raises(ConfigError, match="`--out` must be a new or empty folder"):
        merge_shards(dirs, root / "full", report=False)
    merge_shards(dirs, tmp_path / "m", report=False)
    assert merge_shards(dirs, tmp_path / "m", report=False).records == GRID  # a previous merge is replaced
    assert len(read_records(tmp_path / "m" / "records.jsonl", latest=False)) == GRID


# ---------------------------------------------------------------------------------------------- resuming a shard
@pytest.mark.parametrize(("first", "second", "match"), [
    ((1, 3), (2, 3), "`--shard` must be 1/3 to resume `--out` .* got '2/3'; pass --shard 1/3 to resume it"),
    ((1, 3), (1, 2), "`--shard` must be 1/3 to resume .* got '1/2'"),
    ((1, 3), None, "`--shard` must be 1/3 to resume .* got no --shard"),
    (None, (1, 3), "`--shard` must be left out to resume .* a full \\(unsharded\\) run, got '1/3'"),
])
def test_resuming_with_another_shard_spec_is_refused(tmp_path: Path, first: tuple[int, int] | None,
                                                     second: tuple[int, int] | None, match: str) -> None:
    out = tmp_path / "run"
    done = run_eval(config(), out, progress=False, report=False, shard=first)
    before = (out / "records.jsonl").read_text()
    with pytest.raises(ConfigError, match=match):
        run_eval(config(), out, progress=False, report=False, shard=second)
    assert (out / "records.jsonl").read_text() == before
    again = run_eval(config(), out, progress=False, report=False, shard=first)  # the same spec resumes
    assert (again.written, again.skipped, again.total) == (0, done.total, done.total)


def test_a_killed_shard_resumes_and_then_merges(shard_set: Path, tmp_path: Path) -> None:
    root = tmp_path / "set"
    shutil.copytree(shard_set, root)
    lines = _lines(root / "s2" / "records.jsonl")
    (root / "s2" / "records.jsonl").write_text("".join(lines[:2]) + lines[2][:10])  # killed mid-write
    with pytest.raises(ConfigError, match="`shard 2/3` must be complete"):
        merge_shards([root / f"s{k}" for k in (1, 2, 3)], tmp_path / "m")
    res = run_eval(config(), root / "s2", progress=False, report=False, shard=(2, 3))
    assert res.written == len(lines) - 2
    assert merge_shards([root / f"s{k}" for k in (1, 2, 3)], tmp_path / "m", report=False).records == GRID


def test_progress_lines_name_the_shard(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="budgetlm.evals"):
        out = Runner(config(), tmp_path / "s", progress=False, report=False, log_interval=0, shard="2/3").run()
    lines = [r.getMessage() for r in caplog.records if getattr(r, "progress", False)]
    assert f"pairs to run (shard 2/3: {out.total} of the grid's {GRID})" in lines[0]
    assert len(lines) == out.total + 1 and all(line.endswith("(shard 2/3)") for line in lines[1:])
