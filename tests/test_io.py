"""budgetlm.io: JSONL append/read with one torn-line rule, atomic JSON writes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from budgetlm import ConfigError
from budgetlm.io import (
    DamagedFileError,
    JsonlWriter,
    TornLine,
    append_jsonl,
    read_json,
    read_jsonl,
    repair_tail,
    write_json_atomic,
    write_jsonl_atomic,
)


def _lines(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------- the torn-line rule


def test_torn_last_line_is_cut_off_and_reported(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    p.write_text(_lines({"a": 1}, {"a": 2}) + '{"a": 3, "b')  # a crash mid-write
    torn: list[TornLine] = []
    assert read_jsonl(p, on_torn=torn.append) == [{"a": 1}, {"a": 2}]
    assert len(torn) == 1 and torn[0].line == 3 and torn[0].text == '{"a": 3, "b'
    assert torn[0].offset == len(_lines({"a": 1}, {"a": 2}).encode())
    assert "log.jsonl line 3" in str(torn[0]) and "left out" in str(torn[0]) and not torn[0].cut


def test_torn_last_line_is_a_warning_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "log.jsonl"
    p.write_text(_lines({"a": 1}) + '{"a"')
    with caplog.at_level(logging.WARNING, logger="budgetlm.io"):
        assert read_jsonl(p) == [{"a": 1}]
    assert "torn last line" in caplog.text and "line 2" in caplog.text


@pytest.mark.parametrize("middle", ['{"a": 2, "b', "not json", "\x00\x01"])
def test_bad_middle_line_is_an_error_naming_file_and_line(tmp_path: Path, middle: str) -> None:
    p = tmp_path / "log.jsonl"
    p.write_text(_lines({"a": 1}) + middle + "\n" + _lines({"a": 3}))
    with pytest.raises(DamagedFileError, match=r"log\.jsonl` line 2 is not valid JSON: .*damaged in the middle "
                                               r"\(not a torn last line\) — restore it or remove the line") as err:
        read_jsonl(p, on_torn=lambda t: pytest.fail("a middle line is not torn"))
    assert isinstance(err.value, ConfigError) and err.value.line == 2 and err.value.path == p


def test_bad_last_line_with_its_newline_is_not_torn(tmp_path: Path) -> None:
    """A crash cuts a line short (no newline); a complete line that does not parse is damage."""
    p = tmp_path / "log.jsonl"
    p.write_text(_lines({"a": 1}) + "garbage\n")
    with pytest.raises(DamagedFileError, match="line 2"):
        read_jsonl(p)


def test_parse_failures_follow_the_same_rule(tmp_path: Path) -> None:
    def parse(row: dict) -> int:
        return int(row["n"])

    p = tmp_path / "rows.jsonl"
    p.write_text(_lines({"n": 1}, {"n": 2}) + '{"x": 3}')  # parses as JSON but not as a row: last, no newline
    torn: list[TornLine] = []
    assert read_jsonl(p, parse, on_torn=torn.append) == [1, 2]
    assert torn and torn[0].line == 3
    p.write_text(_lines({"n": 1}, {"x": 2}, {"n": 3}))
    with pytest.raises(DamagedFileError, match=r"rows\.jsonl` line 2 is not a valid row: 'n'"):
        read_jsonl(p, parse)


def test_missing_blank_and_unterminated_but_complete(tmp_path: Path) -> None:
    assert read_jsonl(tmp_path / "none.jsonl") == []
    p = tmp_path / "x.jsonl"
    p.write_text("\n  \n" + _lines({"a": 1}) + "\n" + '{"a": 2}')  # blank lines; a whole last line without newline
    assert read_jsonl(p, on_torn=lambda t: pytest.fail("complete")) == [{"a": 1}, {"a": 2}]


# ---------------------------------------------------------------- appending


def test_repair_tail_cuts_a_torn_line_and_ends_a_complete_one(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    p.write_text(_lines({"a": 1}) + '{"a": 2')
    torn = repair_tail(p)
    assert torn is not None and torn.line == 2 and torn.cut and p.read_text() == _lines({"a": 1})
    assert repair_tail(p) is None and p.read_text() == _lines({"a": 1})  # a whole file is left alone
    p.write_text(_lines({"a": 1}) + '{"a": 2}')
    assert repair_tail(p) is None and p.read_text() == _lines({"a": 1}, {"a": 2})
    assert repair_tail(tmp_path / "new.jsonl") is None and not (tmp_path / "new.jsonl").exists()


def test_writer_repairs_then_appends_fsynced_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "records.jsonl"
    p.write_text(_lines({"a": 1}) + '{"a": 2, "tor')
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    torn: list[TornLine] = []
    with JsonlWriter(p, on_torn=torn.append) as w:
        n = len(synced)
        w.write({"a": 2})
        w.write('{"a": 3}')  # an already-encoded line
        assert len(synced) == n + 2  # every line fsynced as it is written
        assert read_jsonl(p) == [{"a": 1}, {"a": 2}, {"a": 3}]  # visible before close
    assert len(torn) == 1
    assert p.read_text() == _lines({"a": 1}, {"a": 2}, {"a": 3})
    synced.clear()
    append_jsonl(p, {"a": 4})
    assert synced and read_jsonl(p)[-1] == {"a": 4}


# ---------------------------------------------------------------- atomic writes


def test_write_json_atomic_leaves_no_tmp(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    write_json_atomic(p, {"a": 1, "p": Path("x")})  # default=str
    assert json.loads(p.read_text()) == {"a": 1, "p": "x"} and p.read_text().endswith("\n")
    write_json_atomic(p, {"a": 2})
    assert read_json(p) == {"a": 2}
    assert [f.name for f in tmp_path.iterdir()] == ["run.json"]


def test_write_json_atomic_survives_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "run.json"
    write_json_atomic(p, {"v": "old"})

    def crash(src: object, dst: object) -> None:
        raise KeyboardInterrupt  # killed between writing the temporary file and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(p, {"v": "new"})
    monkeypatch.undo()
    assert read_json(p) == {"v": "old"} and [f.name for f in tmp_path.iterdir()] == ["run.json"]
    with pytest.raises(ValueError):  # unencodable: nothing is written at all
        write_json_atomic(p, {"v": float("nan")}, allow_nan=False)
    with pytest.raises(TypeError):
        write_json_atomic(p, {"v": object()}, default=None)
    assert read_json(p) == {"v": "old"} and [f.name for f in tmp_path.iterdir()] == ["run.json"]


def test_write_jsonl_atomic_and_read_json(tmp_path: Path) -> None:
    p = write_jsonl_atomic(tmp_path / "d.jsonl", [{"a": 1}, '{"b": 2}'])
    assert p.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert read_json(tmp_path / "none.json", missing={}) == {}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DamagedFileError, match=r"bad\.json is not valid JSON .*fix or delete it"):
        read_json(tmp_path / "bad.json")
