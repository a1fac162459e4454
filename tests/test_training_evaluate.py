"""Trained-vs-base evaluation helpers: the evaluation suite and config, the comparison table and totals,
training curves, the training report, and the training log reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from budgetlm.errors import ConfigError
from budgetlm.evals import suites
from budgetlm.evals.records import EvalRecord
from budgetlm.training import RECIPES, TrainConfig
from budgetlm.training.evaluate import compare, eval_config, eval_suite, overall, plot_curves, write_train_report
from budgetlm.training.grpo import read_log

RG = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=5&seed=1&split=calibration"


def cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"recipe": "effort", "suite": RG, **kw})


# ---------------------------------------------------------------- evaluation suite


RG_TEST = {"kind": "reasoning_gym", "task": "chain_sum", "min_terms": 2, "max_terms": 2, "min_digits": 1,
           "max_digits": 1, "size": 5, "seed": 1, "split": "test"}


@pytest.mark.parametrize("suite, expected", [
    (RG, RG_TEST),  # a spec string: its options as a block, split=test
    (RG + "&test_size=3", {**RG_TEST, "size": 3}),  # only the test problems the calibration split avoids
    (RG + "&test_size=50", RG_TEST),  # test_size above size: size stays
    ({"kind": "reasoning_gym", "task": "chain_sum", "size": 7, "split": "calibration"},
     {"kind": "reasoning_gym", "task": "chain_sum", "size": 7, "split": "test"}),  # a dict block
    ({"kind": "reasoning_gym", "task": "chain_sum", "split": "calibration", "test_size": 20},
     {"kind": "reasoning_gym", "task": "chain_sum", "split": "test", "size": 20}),  # default size 100 capped at 20
])
def test_eval_suite_falls_back_to_the_test_split(suite: str | dict[str, Any], expected: dict[str, Any]) -> None:
    c = cfg(suite=suite)
    before = c.suite if isinstance(c.suite, str) else dict(c.suite)
    assert eval_suite(c) == expected
    assert c.suite == before  # the training config is not edited


def test_eval_suite_fallback_is_disjoint_from_the_training_items() -> None:
    c = cfg(suite=RG.replace("size=5", "size=30") + "&test_size=10")
    train_qs = {it.question for it in suites.get(c.suite).items()}
    test_items = suites.get(eval_suite(c)).items()
    assert len(test_items) == 10 and not train_qs & {it.question for it in test_items}


def test_explicit_eval_suite_wins() -> None:
    spec = "jsonl:/data/held_out.jsonl"
    assert eval_suite(cfg(suite="jsonl:/data/train.jsonl", eval={"suite": spec})) == spec
    block = {"kind": "reasoning_gym", "task": "chain_sum", "size": 3}
    assert eval_suite(cfg(eval={"suite": block})) == block


@pytest.mark.parametrize("suite, needle", [
    ("jsonl:/data/train.jsonl", "'jsonl'"),  # no test split to fall back on
    ({"kind": "csv", "path": "/data/train.csv"}, "'csv'"),  # the same as a block
    ("reasoning_gym:chain_sum?size=5", "split=calibration"),  # trains on the test split (the default split)
    ("reasoning_gym:chain_sum?size=5&split=test", "split=calibration"),  # trains on the test split explicitly
    (RG + "&test_size=0", "test_size=0"),  # nothing held out of the calibration split
])
def test_eval_suite_errors(suite: str | dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        eval_suite(cfg(suite=suite))
    msg = str(err.value)
    assert "`eval.suite`" in msg and needle in msg


def test_eval_config_grid(tmp_path: Path) -> None:
    c = cfg(max_completion_length=50, eval={"backend": "hf", "limit": 3, "batch_size": 8}, seed=4)
    trained = tmp_path / "model"
    ecfg, roles = eval_config(c, RECIPES.get("effort")({"target_range": [8, 32]}), trained)
    assert ecfg.models == ["hf:default", f"hf:{trained}"]
    assert roles == {"hf:default": "base", f"hf:{trained}": "trained"}
    assert [s.label for s in ecfg.strategies] == ["exact=8", "exact=20", "exact=32"]
    assert all(s.params["max_tokens"] == 100 for s in ecfg.strategies)  # 2 × max_completion_length
    assert ecfg.budgets == [{"output_tokens": 100}]
    assert (ecfg.limit, ecfg.batch_size, ecfg.seed, ecfg.suites) == (3, 8, 4, [RG_TEST])


def test_eval_config_max_tokens_override(tmp_path: Path) -> None:
    ecfg, _ = eval_config(cfg(eval={"backend": "hf", "max_tokens": 40}), RECIPES.get("compress")({}), tmp_path)
    assert ecfg.budgets == [{"output_tokens": 40}] and ecfg.strategies[0].params["max_tokens"] == 40


# ---------------------------------------------------------------- comparison


def rec(model: str, label: str, correct: bool, out: int, error: int | None = None, target: int | None = None,
        truncated: bool = False, i: int = 0) -> EvalRecord:
    details: dict[str, Any] = {"control": "exact"}
    if target is not None:
        details["target_tokens"] = target
    if error is not None:
        details["length_error"] = error
    return EvalRecord(item_id=f"i{i}", suite="s", config_id=f"{model}/{label}", model=model, strategy=label,
                      correct=correct, output_tokens=out, truncated=truncated, details=details)


ROLES = {"hf:default": "base", "hf:/run/model": "trained"}


def records() -> list[EvalRecord]:
    return [
        # base at target 16: errors 14 and 34 (relative 0.875, 2.125)
        rec("hf:default", "exact=16", True, 30, 14, 16, i=0),
        rec("hf:default", "exact=16", False, 50, 34, 16, truncated=True, i=1),
        # trained at target 16: errors 2 and 0
        rec("hf:/run/model", "exact=16", True, 18, 2, 16, i=0),
        rec("hf:/run/model", "exact=16", True, 16, 0, 16, i=1),
        # trained at target 64: one item, error 8
        rec("hf:/run/model", "exact=64", False, 56, 8, 64, i=0),
        # a model not in roles keeps its spec; records without details give no length columns
        EvalRecord(item_id="i0", suite="s", config_id="x", model="hf:other", strategy="greedy", correct=True,
                   output_tokens=10),
    ]


def test_compare_rows_per_role_and_label() -> None:
    rows = {(r["model"], r["strategy"]): r for r in compare(records(), ROLES)}
    assert set(rows) == {("base", "exact=16"), ("trained", "exact=16"), ("trained", "exact=64"), ("hf:other", "greedy")}
    b = rows["base", "exact=16"]
    assert (b["n"], b["accuracy"], b["mean_output_tokens"], b["truncated"]) == (2, 0.5, 40.0, 0.5)
    assert (b["target_tokens"], b["length_error"]) == (16, 24.0)
    assert b["relative_length_error"] == pytest.approx((14 / 16 + 34 / 16) / 2)
    t = rows["trained", "exact=16"]
    assert (t["n"], t["accuracy"], t["mean_output_tokens"], t["length_error"]) == (2, 1.0, 17.0, 1.0)
    assert t["relative_length_error"] == pytest.approx(1 / 16)
    t64 = rows["trained", "exact=64"]
    assert (t64["n"], t64["accuracy"], t64["length_error"], t64["target_tokens"]) == (1, 0.0, 8.0, 64)
    assert t64["relative_length_error"] == pytest.approx(8 / 64)
    o = rows["hf:other", "greedy"]
    assert "length_error" not in o and "target_tokens" not in o and o["accuracy"] == 1.0


def test_compare_is_sorted_and_handles_mixed_targets_and_skips() -> None:
    recs = [rec("hf:/run/model", "mixed", True, 10, 6, 4, i=0), rec("hf:/run/model", "mixed", True, 10, 2, 8, i=1),
            rec("hf:/run/model", "mixed", False, 0, None, 8, i=2),  # skipped: no length_error, not averaged
            rec("hf:default", "mixed", True, 5, 0, 5, i=0)]  # a zero error still counts
    rows = compare(recs, ROLES)
    assert [(r["model"], r["strategy"]) for r in rows] == [("base", "mixed"), ("trained", "mixed")]
    base, trained = rows
    assert (base["length_error"], base["relative_length_error"], base["target_tokens"]) == (0.0, 0.0, 5)
    assert trained["n"] == 3 and trained["target_tokens"] is None  # targets differ
    assert trained["length_error"] == 4.0 and trained["relative_length_error"] == pytest.approx((6 / 4 + 2 / 8) / 2)


def test_compare_of_nothing() -> None:
    assert compare([], ROLES) == []


def test_overall_weights_rows_by_n() -> None:
    tot = overall(compare(records(), ROLES))
    assert set(tot) == {"base", "trained", "hf:other"}
    t = tot["trained"]
    assert t["n"] == 3
    assert t["accuracy"] == pytest.approx(2 / 3)  # (1.0·2 + 0.0·1) / 3, not the mean of rows (0.5)
    assert t["mean_output_tokens"] == pytest.approx((18 + 16 + 56) / 3)
    assert t["length_error"] == pytest.approx((2 + 0 + 8) / 3)
    assert t["relative_length_error"] == pytest.approx((2 / 16 + 0 / 16 + 8 / 64) / 3)
    assert tot["base"]["length_error"] == pytest.approx(24.0)
    assert "length_error" not in tot["hf:other"] and tot["hf:other"]["n"] == 1


# ---------------------------------------------------------------- curves and report


LOG = [
    {"step": 1, "epoch": 0.1, "loss": 0.02, "reward": 0.1, "rewards/lcpo_exact/mean": 0.1,
     "completions/mean_length": 60.0, "completions/mean_terminated_length": 55.0},
    {"step": 2, "epoch": 0.2, "loss": float("nan"), "reward": 0.4, "rewards/lcpo_exact/mean": 0.4,
     "completions/mean_length": 40.0},  # a nan loss and a missing key plot as gaps
    {"step": 3, "epoch": 0.3, "loss": 0.01, "reward": 0.6, "rewards/lcpo_exact/mean": 0.6,
     "completions/mean_length": 30.0, "completions/mean_terminated_length": 28.0},
    {"step": 3, "train_runtime": 12.0, "train_loss": 0.015},  # TRL's final summary: not a curve point
]


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    path = plot_curves(LOG, tmp_path / "sub" / "curves.png", title="run")
    assert path == tmp_path / "sub" / "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.mark.parametrize("log", [
    [],  # nothing logged yet
    [{"step": 3, "train_runtime": 1.0}],  # only the summary entry
])
def test_plot_curves_without_points(tmp_path: Path, log: list[dict[str, Any]]) -> None:
    assert plot_curves(log, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_write_train_report(tmp_path: Path) -> None:
    c = cfg(name="effort-run")
    rows = compare(records(), ROLES)
    eval_report = tmp_path / "eval" / "report" / "report.html"
    page = write_train_report(tmp_path, c, LOG, {"rows": rows}, eval_report)
    assert page == tmp_path / "report" / "train_report.html"
    html = page.read_text()
    md = (tmp_path / "report" / "train_report.md").read_text()
    assert "Training report: effort-run" in html and "# Training report: effort-run" in md
    assert "data:image/png;base64," in html and "![training curves](training_curves.png)" in md
    assert (tmp_path / "report" / "training_curves.png").exists()
    # one table row per comparison row, with the formatted figures
    assert html.count("<tr>") == len(rows) + 1  # header + rows
    assert "<td>trained</td><td>exact=16</td><td>2</td><td>1.000</td><td>17.000</td>" in html
    assert "| base | exact=16 | 2 | 0.500 | 40.000 | 0.500 | 16 | 24.000 | 1.500 |" in md
    assert "| hf:other | greedy | 1 | 1.000 | 10.000 | 0.000 |  |  |  |" in md
    assert 'href="../eval/report/report.html"' in html and "(../eval/report/report.html)" in md


def test_write_train_report_without_log_or_comparison(tmp_path: Path) -> None:
    page = write_train_report(tmp_path, cfg(), [], None, None)
    html = page.read_text()
    md = (tmp_path / "report" / "train_report.md").read_text()
    assert "<table>" not in html and "<img" not in html and "evaluation report" not in html
    assert "| model |" not in md and "training curves" not in md
    assert not (tmp_path / "report" / "training_curves.png").exists()


# ---------------------------------------------------------------- training log


def test_read_log_keeps_the_newest_entry_per_step(tmp_path: Path) -> None:
    p = tmp_path / "train_log.jsonl"
    lines = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 3.0},  # logged, then lost to a crash before the checkpoint
        {"step": 2, "loss": 2.5},  # resumed from step 1's checkpoint: step 2 again
        {"step": 3, "loss": 3.5},
        {"step": 3, "train_runtime": 9.0},  # the summary shares the last step but is kept apart
    ]
    p.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"step": 4, "lo')  # a torn last line
    log = read_log(p)
    assert log == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 3.5},
                   {"step": 3, "train_runtime": 9.0}]


def test_read_log_missing_or_empty(tmp_path: Path) -> None:
    assert read_log(tmp_path / "none.jsonl") == []
    (tmp_path / "empty.jsonl").write_text("")
    assert read_log(tmp_path / "empty.jsonl") == []


def test_metrics_log_after_a_torn_line_keeps_the_new_entries(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from budgetlm.training.grpo import _callback

    p = tmp_path / "train_log.jsonl"
    p.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # a crash tore the last line
    cb = _callback(p)  # resuming: the callback is built again on the same log
    state = SimpleNamespace(global_step=2, epoch=0.5, is_world_process_zero=True)
    cb.on_log(None, state, None, logs={"loss": 2.5})
    cb.on_log(None, state, None, logs=None)  # nothing to log: nothing written
    cb.on_log(None, SimpleNamespace(global_step=3, epoch=0.7, is_world_process_zero=False), None, logs={"loss": 9.0})
    assert read_log(p) == [{"step": 1, "loss": 1.0}, {"step": 2, "epoch": 0.5, "loss": 2.5}]


def test_metrics_log_leaves_a_whole_log_alone(tmp_path: Path) -> None:
    from budgetlm.training.grpo import _callback

    p = tmp_path / "train_log.jsonl"
    p.write_text('{"step": 1, "loss": 1.0}\n')
    _callback(p)
    assert p.read_text() == '{"step": 1, "loss": 1.0}\n'
    _callback(tmp_path / "new.jsonl")  # no log yet: none is created
    assert not (tmp_path / "new.jsonl").exists()
