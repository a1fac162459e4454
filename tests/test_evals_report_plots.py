"""The report's charts are readable: short suite labels, one colour per curve, plain log ticks that do
not overlap, legends that fit the figure, and the Pareto frontier in the legend."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetlm.evals.records import EvalRecord
from budgetlm.evals.report import (
    PLOTS,
    _plot_accuracy_vs,
    _plot_per_suite,
    build_summary,
    label_colors,
    load_runs,
    short_suite_labels,
    tick_label,
    write_report,
)

pytest.importorskip("matplotlib")

RG = "reasoning_gym:chain_sum?size=100&seed=3"


@pytest.mark.parametrize(
    ("specs", "labels"),
    [
        pytest.param([f"{RG}&difficulty=1", f"{RG}&difficulty=2"], ["chain_sum difficulty=1", "chain_sum difficulty=2"],
                     id="same-task-different-params"),
        pytest.param(["reasoning_gym:chain_sum?size=100&seed=3", "reasoning_gym:basic_arithmetic?size=100&seed=3"],
                     ["chain_sum", "basic_arithmetic"], id="different-tasks"),
        pytest.param([f"{RG}&difficulty=2"], ["chain_sum"], id="one-suite"),
        pytest.param(["reasoning_gym:chain_sum?size=50&seed=1", "reasoning_gym:chain_sum?size=50&seed=2"],
                     ["chain_sum seed=1", "chain_sum seed=2"], id="identical-but-seed"),
        pytest.param(["humaneval", "kb_agent", "arith"], ["humaneval", "kb_agent", "arith"], id="no-params"),
        pytest.param(["reasoning_gym:chain_sum", "reasoning_gym:chain_sum?seed=2"], ["chain_sum", "chain_sum seed=2"],
                     id="params-on-one-only"),
        pytest.param([f"{RG}&difficulty=1", f"{RG}&difficulty=2", "reasoning_gym:leg_counting?size=100&seed=3"],
                     ["chain_sum difficulty=1", "chain_sum difficulty=2", "leg_counting"], id="mixed"),
        pytest.param(["reasoning_gym:chain_sum?size=10", "reasoning_gym_agent:chain_sum?size=10"],
                     ["reasoning_gym:chain_sum", "reasoning_gym_agent:chain_sum"], id="same-task-two-kinds"),
        pytest.param(["jsonl:data/gsm8k.jsonl?grader=math", "csv:/tmp/other.csv"], ["gsm8k.jsonl", "other.csv"],
                     id="files"),
        pytest.param(["jsonl:a/test.jsonl", "jsonl:b/test.jsonl"], ["jsonl:a/test.jsonl", "jsonl:b/test.jsonl"],
                     id="same-file-name"),
        pytest.param(['{"kind": "reasoning_gym", "size": 5, "task": "chain_sum"}',
                      '{"kind": "reasoning_gym", "size": 6, "task": "chain_sum"}'],
                     ["chain_sum size=5", "chain_sum size=6"], id="json-config-blocks"),
        pytest.param(["arith", "arith"], ["arith", "arith #2"], id="identical-specs"),
        pytest.param(["arith", "arith", "arith #2"], ["arith", "arith #3", "arith #2"], id="suffix-taken"),
        pytest.param([], [], id="none"),
    ],
)
def test_short_suite_labels(specs: list[str], labels: list[str]) -> None:
    assert short_suite_labels(specs) == labels


_SPEC = st.builds(
    lambda kind, task, params: f"{kind}{task}" + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""),
    st.sampled_from(["reasoning_gym:", "reasoning_gym_agent:", "jsonl:a/", "jsonl:b/", ""]),
    st.sampled_from(["chain_sum", "x.jsonl", "arith", "arith #2"]),
    st.dictionaries(st.sampled_from(["seed", "size", "difficulty"]), st.sampled_from(["1", "2", "", "a b"]), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_SPEC, max_size=8))
def test_short_suite_labels_are_unique_and_one_per_spec(specs: list[str]) -> None:
    labels = short_suite_labels(specs)
    assert len(labels) == len(specs) and len(set(labels)) == len(labels)
    assert all(lab.strip() for lab in labels)


def test_label_colors_are_deterministic_and_distinct() -> None:
    names = [f"strategy{i}" for i in range(7)]
    assert label_colors(names) == label_colors(reversed(names)) == label_colors(names + names[:2])
    for n in (3, 12, 25):
        colors = label_colors(f"s{i}" for i in range(n))
        assert len(set(colors.values())) == n and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors.values())


@pytest.mark.parametrize(("x", "text"), [(20, "20"), (2.5, "2.5"), (0.002, "0.002"), (1000, "1,000"),
                                          (100_000, "100,000"), (1e9, "1e9"), (2.5e-4, "2.5e-4")])
def test_tick_labels_are_plain_numbers(x: float, text: str) -> None:
    assert tick_label(x) == text


# ------------------------------------------------------------------------------------------------
# figures from scripted runs


def _write(run_dir: Path, configs: list[tuple[str, dict[str, Any], int, float]], suites: list[str],
           n_items: int = 4) -> Path:
    """One record per (configuration, suite, item): ``configs`` are ``(strategy, params, budget, mean tokens)``;
    accuracy grows with tokens."""
    run_dir.mkdir(parents=True, exist_ok=True)
    top = max(t for *_, t in configs)
    lines = []
    for k, (strategy, params, budget, tokens) in enumerate(configs):
        for suite in suites:
            for i in range(n_items):
                correct = (i + 1) / n_items <= 0.2 + 0.8 * tokens / top
                lines.append(EvalRecord(
                    item_id=f"q{i}", suite=suite, config_id=f"c{k}", model="hf:/models/tiny", strategy=strategy,
                    params=params, budget={"output_tokens": budget}, gold="1", answer="1" if correct else "x",
                    correct=correct, score=float(correct), output_tokens=round(tokens), seed=0,
                ).model_dump_json())
    (run_dir / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run_dir


def _summaries(run_dir: Path) -> list[Any]:
    return build_summary(load_runs([run_dir]))[1]


def _extents(fig: Any, texts: list[Any]) -> list[Any]:
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def _x_tick_labels(fig: Any, ax: Any) -> list[Any]:
    """The visible x tick labels (major and minor) inside the axes' horizontal span, with their extents."""
    fig.canvas.draw()
    x0, x1 = ax.get_window_extent().x0 - 1, ax.get_window_extent().x1 + 1
    labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
    boxes = _extents(fig, labels)
    return [(t.get_text(), b) for t, b in zip(labels, boxes) if x0 <= (b.x0 + b.x1) / 2 <= x1]


@pytest.mark.parametrize(("lo", "hi"), [(20, 60), (10, 100_000), (100, 900), (3, 250), (1_000, 1_300),
                                        (5, 5_000_000)])
def test_log_axis_tick_labels_do_not_overlap(tmp_path: Path, lo: int, hi: int) -> None:
    n = 7
    tokens = [lo * (hi / lo) ** (k / (n - 1)) for k in range(n)]
    run = _write(tmp_path / "run", [(f"s{k % 3}", {}, 2 ** (k + 4), t) for k, t in enumerate(tokens)], ["arith"])
    fig = _plot_accuracy_vs(_summaries(run), "output_tokens", tmp_path / "a.png", log_x=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and (tmp_path / "a.png").stat().st_size > 0
    ticks = _x_tick_labels(fig, ax)
    assert len(ticks) >= 2, ticks  # something to read the axis by
    for text, _ in ticks:
        assert re.fullmatch(r"[0-9][0-9,.]*(e-?[0-9]+)?", text), text  # plain numbers, no 3×10¹
    for (ta, a), (tb, b) in itertools.combinations(ticks, 2):
        assert not a.overlaps(b), (ta, tb)


def _legend_texts(fig: Any) -> list[Any]:
    return [t for leg in fig.legends for t in leg.get_texts()]


def _inside(fig: Any, box: Any) -> bool:
    f = fig.bbox
    return f.x0 - 0.5 <= box.x0 and box.x1 <= f.x1 + 0.5 and f.y0 - 0.5 <= box.y0 and box.y1 <= f.y1 + 0.5


SUITES3 = [f"{RG}&difficulty=1", f"{RG}&difficulty=2", "reasoning_gym:basic_arithmetic?size=100&seed=3"]


@pytest.mark.parametrize(
    ("configs", "n_curves"),
    [
        pytest.param([(f"strategy_{k}", {"n": k}, 64, 10 + 9 * k) for k in range(12)], 12, id="12-strategies"),
        pytest.param([(s, {}, b, b / 2 + 3 * i) for i, s in enumerate(["greedy", "cot", "vote", "bavt"])
                      for b in (16, 64, 256)], 4, id="4-strategies-x-3-budgets"),
        pytest.param([(f"s{k}", {"n": k}, 64, 5 + k) for k in range(40)], 40, id="40-strategies"),
    ],
)
def test_a_report_of_many_configurations_keeps_every_legend_entry_inside_the_figure(
        tmp_path: Path, configs: list[Any], n_curves: int) -> None:
    run = _write(tmp_path / "run", configs, SUITES3, n_items=3)
    write_report([run], tmp_path / "out")
    assert all((tmp_path / "out" / p).stat().st_size > 0 for p in PLOTS)
    summaries = _summaries(run)
    acc = _plot_accuracy_vs(summaries, "output_tokens", tmp_path / "a.png", log_x=None)
    bars = _plot_per_suite(summaries, tmp_path / "s.png")
    for fig, n_entries in ((acc, n_curves + 1), (bars, len(configs) + len(SUITES3))):
        fig.canvas.draw()
        texts = _legend_texts(fig)
        assert len(texts) == n_entries
        boxes = _extents(fig, texts)
        assert len(boxes) == n_entries and all(_inside(fig, b) for b in boxes)
        axes_box = fig.axes[0].get_window_extent()
        assert not any(axes_box.overlaps(b) for b in boxes)  # outside the axes: no bar or point hidden
    assert "Pareto frontier" in [t.get_text() for t in _legend_texts(acc)]
    # the suites are told apart by their short labels, and the key below gives each full spec
    suite_ticks = _x_tick_labels(bars, bars.axes[0])
    assert sorted(t for t, _ in suite_ticks) == ["basic_arithmetic", "chain_sum difficulty=1", "chain_sum difficulty=2"]
    assert not any(a.overlaps(b) for (_, a), (_, b) in itertools.combinations(suite_ticks, 2))
    key = [t.get_text() for t in _legend_texts(bars) if " = " in t.get_text()]
    assert key == [f"{short} = {spec}" for short, spec in zip(short_suite_labels(sorted(SUITES3)), sorted(SUITES3))]


def _line_colors(fig: Any) -> dict[str, str]:
    from matplotlib.colors import to_hex

    return {c.get_label(): to_hex(c.lines[0].get_color()) for c in fig.axes[0].containers}


def test_a_strategy_has_the_same_colour_on_every_chart_of_a_report(tmp_path: Path) -> None:
    from matplotlib.colors import to_hex

    configs = [(s, {}, b, b / 2 + 5 * i) for i, s in enumerate(["greedy", "vote", "bavt", "cot"]) for b in (16, 64)]
    run = _write(tmp_path / "run", configs, SUITES3[:2])
    summaries = _summaries(run)
    for s in summaries:
        s.mean_usd = 1e-6 * s.mean_output_tokens  # a priced model: the cost chart is in dollars
    tokens = _plot_accuracy_vs(summaries, "output_tokens", tmp_path / "t.png", log_x=None)
    usd = _plot_accuracy_vs(summaries, "usd", tmp_path / "u.png", log_x=True)
    bars = _plot_per_suite(summaries, tmp_path / "s.png")
    colors = _line_colors(tokens)
    assert set(colors) == {"greedy", "vote", "bavt", "cot"}
    assert _line_colors(usd) == colors
    assert colors == label_colors(colors)  # the documented map
    assert len(set(colors.values())) == 4
    # the most expensive budget of each strategy is drawn in the strategy's colour itself, cheaper ones lighter
    bar_colors = {c.get_label(): to_hex(c.patches[0].get_facecolor()) for c in bars.axes[0].containers
                  if hasattr(c, "patches")}
    for strategy, color in colors.items():
        assert bar_colors[next(k for k in bar_colors if k.startswith(f"{strategy} [output_tokens=64]"))] == color
        assert bar_colors[next(k for k in bar_colors if k.startswith(f"{strategy} [output_tokens=16]"))] != color
