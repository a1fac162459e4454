"""``budgetlm train``: a real run of the effort recipe through the CLI, resume, and bad input (exit code 2)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from budgetlm.cli import app

runner = CliRunner()

CONFIG = """\
recipe: effort
recipe_params: {mode: exact, target_range: [8, 16]}
suite: reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=8&seed=1&split=calibration&test_size=8
max_steps: 1
max_completion_length: 16
device: cpu
eval: {limit: 2, backend: hf, max_tokens: 24}
"""


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines



@pytest.fixture(autouse=True)
def _free_disk(tmp_path: Path) -> Iterator[None]:
    """Each run leaves checkpoints of the 135M model with optimizer state (about 1.6 GB each): delete them."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_train_command_trains_evaluates_and_resumes(tmp_path: Path) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    text = _flat(res.output)
    assert "trained: 1 steps" in text and "trained vs base" in text and "report:" in text
    assert (out / "report" / "train_report.html").exists()
    assert json.loads((out / "train.json").read_text())["steps"] == 1
    assert {r["model"] for r in json.loads((out / "comparison.json").read_text())["rows"]} == {"base", "trained"}
    # the same command again: nothing to train, the report is rewritten
    again = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0 and "already trained: 1 steps" in _flat(again.output)
    # --max-steps continues from the last checkpoint
    more = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--no-progress", "--max-steps", "2"])
    assert more.exit_code == 0 and "trained: 2 steps (resumed from" in _flat(more.output)


@pytest.mark.parametrize(("config", "message"), [
    (None, "does not exist"),  # no such file
    ("recipe: nope\nsuite: reasoning_gym:chain_sum\n", "nope"),  # unknown recipe, names listed
    ("recipe: effort\n", "suite"),  # the suite is required
    ("recipe: effort\nsuite: reasoning_gym:chain_sum\nrecipe_params: {target_range: [0, 4]}\n", "target_range"),  # target <= 0
    ("recipe: effort\nsuite: reasoning_gym:chain_sum\nmax_steps: 0\n", "max_steps"),  # no steps
    ("recipe: [effort\n", "not valid YAML"),  # broken YAML
])
def test_bad_input_exits_with_2(tmp_path: Path, config: str | None, message: str) -> None:
    path = tmp_path / "train.yaml"
    if config is not None:
        path.write_text(config)
    res = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and message in _flat(res.output), res.output
