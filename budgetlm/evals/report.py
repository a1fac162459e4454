"""Reports of evaluation runs: ``summary.json``, ``summary.md``, PNG charts and one ``report.html``.

:func:`write_report` reads ``records.jsonl`` (and ``run.json`` when present) of one or more run
directories, computes the metrics of :mod:`budgetlm.evals.metrics` and writes into the output
directory (default: the first run directory):

* ``summary.json`` — every :class:`~budgetlm.evals.metrics.ConfigSummary` field with its per-suite
  breakdown and Pareto flags, the Pareto frontiers, frontier cost-of-pass, token complexity per
  model with its oracle-accuracy curve, and the runs' metadata.  Strict JSON: infinite or
  undefined numbers (cost-of-pass at zero accuracy, τ of never-solved questions) are ``null``;
  question keys are ``"suite/item_id"``.  Token complexity counts ``n_infinite_tau`` (τ = ∞: no token
  threshold beats "always wrong") apart from ``n_never_solved`` (no configuration of the model solved
  it — the frontier cost-of-pass's unsolved count on that model's records); the first includes the second.
* The tables and the notes (prose) are rendered from the ``summary.json`` document alone, so every
  figure in them is one of its fields; parameter values are shown by :func:`format_value`
  (``delimiter='\\n\\n'``, never a blank).
* ``summary.md`` — one Markdown table row per configuration, then a per-suite table.
* ``accuracy_vs_tokens.png`` — accuracy (95% CI bars) vs mean output tokens, one line per
  (run, model, strategy, params) across budgets, the Pareto frontier as a thick dashed step line
  through ringed points (its own legend entry).
* ``accuracy_vs_cost.png`` — the same vs mean USD when any configuration cost money, else vs mean
  FLOPs (else vs output tokens), log x when every cost is positive.  Log axes carry a few plain-number
  tick labels (``20 30 40``, ``10 100 1,000``; :func:`tick_label`) and unlabelled minor ticks.
* ``per_suite.png`` — per-suite accuracy bars for each configuration, suites labelled by
  :func:`short_suite_labels` (``chain_sum difficulty=2``) with the full specs in a key below; ★ marks
  the configurations on the Pareto frontier (tokens).
* Every chart colours a curve (strategy, with run, model and parameters when they tell curves apart)
  by :func:`label_colors`, so a strategy has one colour across the report; per-suite bars of cheaper
  budgets are lighter shades of it.  Legends sit outside the axes (right of them) and the figure
  grows with the number of entries, so 10+ configurations fit.
* ``tree_<strategy>.png`` — for tree searches (runs with ``traces.jsonl``), the search tree of one
  representative problem with node values, spend and prune decisions
  (:mod:`budgetlm.evals.treeplot`).
* Charts are drawn on the Agg canvas through ``matplotlib.figure.Figure`` (no pyplot, so the global
  backend of an interactive session is left alone).
* ``report.html`` — self-contained: the PNGs as base64 data URIs, the table, the runs' metadata.

Several runs are compared on the same charts; labels carry the run name (``run.json``'s ``name``,
else the directory name; repeated names get ``#2``, ``#3``…).

Shards (:mod:`budgetlm.evals.shards`): one shard folder on its own is reported as it is, marked
partial — its name carries ``[shard I/N]`` and a note says how many of the grid's cells it holds.
Several shard folders are merged in memory first (:func:`~budgetlm.evals.shards.merge_in_memory`:
same config digest and shard count, each index once, no overlap, no gap, every shard complete
unless ``allow_partial``) and reported as one run; the report needs an explicit ``out_dir`` then.
Shard folders mixed with full runs are refused: merge the shards (``budgetlm merge``) and compare
the merged folder.

Errored records: only the last record of each (suite, item, configuration) is read, so a successful
retry supersedes an error.  Records still errored are left out of accuracy, costs and rates (an
error is not a wrong answer at zero tokens; ``n`` counts the graded records) and counted in
``n_errors``; a configuration with any is flagged — an "errored" column in the tables, ``errored:
true`` in ``summary.json``, a red ✗ on the charts, a note — and is never a Pareto point.  The
frontier cost-of-pass uses graded records only.
"""

from __future__ import annotations

import base64
import colorsys
import html
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from budgetlm.errors import ConfigError, MissingDependency, invalid, missing
from budgetlm.evals.metrics import (
    ConfigSummary,
    CostKind,
    FrontierCostOfPass,
    accuracy_vs_cost_curves,
    finite_json,
    format_value,
    frontier_cost_of_pass,
    frontier_summaries,
    oracle_curve,
    summarize,
    token_complexity,
)
from budgetlm.evals.records import EvalRecord
from budgetlm.evals.rundir import PLOTS, RunDir
from budgetlm.evals.shards import is_shard_folder, merge_in_memory, shard_info
from budgetlm.io import JsonObject, JsonValue, read_json, write_json_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.ticker import Locator

_DPI = 110
_ERRORED_LABEL = "has errored records (not ranked)"
_FRONT_NOTE = "★ = on the Pareto frontier of (mean cost ↓, accuracy ↑) in mean output tokens"
_COST_LABEL = {
    "usd": "mean USD per item",
    "flops": "mean FLOPs per item",
    "output_tokens": "mean output tokens per item",
    "total_tokens": "mean total tokens per item",
}


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency("matplotlib", "the evaluation report's charts", extra="eval") from None


def _load_run(run_dir: Path) -> tuple[dict[str, Any], list[EvalRecord]]:
    rd = RunDir(run_dir)
    if not rd.has_records():
        raise ConfigError(f"{rd.records} does not exist; run `budgetlm eval` first to create the run's records")
    records = rd.read_records()
    if not records:
        raise ConfigError(f"{rd.records} holds no complete records; run `budgetlm eval` first to fill it")
    loaded = read_json(rd.run_json, missing={})
    meta = loaded if isinstance(loaded, dict) else {"value": loaded}
    return meta, records


def _cost_unit(summaries: Sequence[ConfigSummary]) -> CostKind:
    if any(s.mean_usd > 0 for s in summaries):
        return "usd"
    if any(s.mean_flops > 0 for s in summaries):
        return "flops"
    return "output_tokens"


def _fmt_acc(c: Mapping[str, object]) -> str:
    """``"0.750 [0.500, 1.000]"`` of a summary dict (a configuration or a suite); ``"—"`` when nothing was graded."""
    if not c.get("n") or c.get("accuracy") is None:
        return "—"
    return f"{c['accuracy']:.3f} [{c['accuracy_ci_low']:.3f}, {c['accuracy_ci_high']:.3f}]"


def _fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits}g}"
    return f"{x:,.{digits}f}".rstrip("0").rstrip(".") if isinstance(x, float) else f"{x:,}"


def _fmt_dict(d: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in sorted(d.items())) or "—"


_MEAN_FIELD = {"usd": "mean_usd", "flops": "mean_flops", "output_tokens": "mean_output_tokens",
               "total_tokens": "mean_total_tokens"}


def _table_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The configurations table of a ``summary.json`` document (summary.md, report.html and the CLI)."""
    cost: CostKind = doc["cost_unit"]
    extra = cost != "output_tokens"  # a second cost column only when the cost unit is not tokens
    header = ["run", "model", "strategy", "params", "budget", "n", "accuracy [95% CI]", "mean output tokens",
              *([f"mean {'USD' if cost == 'usd' else 'FLOPs' if cost == 'flops' else cost.replace('_', ' ')}"]
                if extra else []),
              "truncation", "errored", "frontier"]
    rows = []
    for c in doc["configs"]:
        units = ("output_tokens", cost) if extra else ("output_tokens",)
        marks = [("tokens" if u == "output_tokens" else "cost") for u in units if c["on_frontier"].get(u)]
        n_err = c["n_errors"]
        rows.append([
            c["run"] or "—", c["model"], c["strategy"], _fmt_dict(c["params"]), _fmt_dict(c["budget"]), str(c["n"]),
            _fmt_acc(c), _fmt_num(c["mean_output_tokens"], 1), *([_fmt_num(c[_MEAN_FIELD[cost]], 4)] if extra else []),
            "—" if c["truncation_rate"] is None else f"{c['truncation_rate']:.1%}",
            f"⚠ {n_err} errored" if n_err else "",
            ("★ " + "+".join(marks)) if marks else ("✗ not ranked (errored)" if n_err else ""),
        ])
    return header, rows


def _suite_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "strategy", "params", "budget", "suite", "n", "accuracy [95% CI]", "mean output tokens"]
    rows = []
    for c in doc["configs"]:
        for suite, ss in c["per_suite"].items():
            rows.append([c["run"] or "—", c["strategy"], _fmt_dict(c["params"]), _fmt_dict(c["budget"]), suite,
                         str(ss["n"]), _fmt_acc(ss), _fmt_num(ss["mean_output_tokens"], 1)])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(x: str) -> str:
        return x.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------------
# chart helpers: suite labels, colours, tick labels (pure: no matplotlib)

_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
_TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd",
          "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d",
          "#17becf", "#9edae5")


def label_colors(labels: Iterable[str]) -> dict[str, str]:
    """One colour (``"#rrggbb"``) per distinct label, the same for the same set of labels in any order.

    The labels, sorted, take the tab10 colours in turn (tab20 when there are 11 to 20 of them; more take
    evenly spaced hues, alternately dark and light).  Every chart of a report colours a curve label
    (strategy, with run, model and the telling parameters when needed) by this map.
    """
    uniq = sorted(set(labels))
    if len(uniq) <= len(_TAB10):
        return dict(zip(uniq, _TAB10))
    if len(uniq) <= len(_TAB20):
        return dict(zip(uniq, _TAB20))
    out = {}
    for i, label in enumerate(uniq):
        r, g, b = colorsys.hls_to_rgb(i / len(uniq), 0.38 if i % 2 else 0.58, 0.75)
        out[label] = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
    return out


def _suite_parts(spec: str) -> tuple[str, str, dict[str, str]]:
    """``(kind, target, params)`` of a suite name as records carry it (a spec string or a JSON config
    block), read leniently: any string gives an answer."""
    text = spec.strip()
    if text.startswith("{"):
        try:
            block = json.loads(text)
        except ValueError:
            block = None
        if isinstance(block, dict):
            params = {str(k): format_value(v) for k, v in block.items()}
            kind = params.pop("kind", "")
            target = params.pop("task", None) or params.pop("path", None) or ""
            return kind, target, params
    head, _, query = text.partition("?")
    kind, _, target = head.partition(":")
    params = dict(parse_qsl(query, keep_blank_values=True))
    return kind, target, params


def short_suite_labels(specs: Sequence[str]) -> list[str]:
    """Short, unique chart labels of suite specs: the task name plus the parameters that tell it apart.

    ``reasoning_gym:chain_sum?size=100&seed=3&difficulty=2`` next to the same spec with
    ``difficulty=1`` gives ``chain_sum difficulty=2``; a task that appears once is its name alone
    (``chain_sum``); a file suite is its file name (``jsonl:data/gsm8k.jsonl`` → ``gsm8k.jsonl``).
    Parameters shown are those whose values differ between the suites of the same name, in the spec's
    order.  Names that still collide get the suite kind (``reasoning_gym_agent:chain_sum``), then the
    whole target (a file's path); identical specs get ``#2``, ``#3``…  The result has one label per
    spec, in order, all different.
    """
    parts = [_suite_parts(s) for s in specs]

    def base(i: int, level: int) -> str:
        kind, target, _ = parts[i]
        name = target.rstrip("/").rsplit("/", 1)[-1] if target else kind
        if level == 0 or not kind or not target:
            return name or specs[i].strip() or "?"
        return f"{kind}:{name}" if level == 1 else f"{kind}:{target}"

    def labels_at(levels: list[int]) -> list[str]:
        bases = [base(i, lv) for i, lv in enumerate(levels)]
        groups: dict[str, list[int]] = defaultdict(list)
        for i, b in enumerate(bases):
            groups[b].append(i)
        out = []
        for i, b in enumerate(bases):
            siblings = [parts[j][2] for j in groups[b]]
            own = parts[i][2]
            shown = [f"{k}={v}" for k, v in own.items() if any(o.get(k) != v for o in siblings)]
            out.append(" ".join([b, *shown]))
        return out

    levels = [0] * len(specs)
    labels = labels_at(levels)
    while True:
        counts = Counter(labels)
        bump = [i for i, lab in enumerate(labels) if counts[lab] > 1 and levels[i] < 2]
        if not bump:
            break
        for i in bump:
            levels[i] += 1
        labels = labels_at(levels)
    taken = set(labels)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for lab in labels:
        seen[lab] += 1
        if seen[lab] == 1:
            out.append(lab)
            continue
        k = seen[lab]
        while f"{lab} #{k}" in taken:
            k += 1
        taken.add(f"{lab} #{k}")
        out.append(f"{lab} #{k}")
    return out


def tick_label(x: float, _pos: int | None = None) -> str:
    """A cost axis tick as a plain number: ``20``, ``0.002``, ``1,000``, ``100,000``; ``2.5e-4`` and
    ``1e9`` outside [0.001, 10⁶)."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    a = abs(x)
    if 1e-3 <= a < 1e6:
        return f"{x:,.0f}" if a >= 100 else f"{x:.3g}"
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


# ------------------------------------------------------------------------------------------------
# plots

_LEGEND_FONT = 7
_ENTRY_IN = 0.2
"""Height of one legend entry at ``_LEGEND_FONT`` points, in inches (with its spacing)."""
_CHAR_IN = 0.06
"""Width of one legend character at ``_LEGEND_FONT`` points, in inches (a generous average)."""


def _legend_width(labels: Sequence[str]) -> float:
    """Inches a one-column legend of ``labels`` takes (handle, padding and the longest label)."""
    return 0.9 + _CHAR_IN * max((len(x) for x in labels), default=0)


def _log_ticks(ax: Axes, axis: str = "x") -> None:
    """Readable ticks on a log axis: a few plain-number major labels (:func:`tick_label`), minor ticks
    unlabelled.

    Under one decade the majors are round linear steps (``20 30 40 50 60``), thinned so that no two are
    closer than a ninth of the axis; up to 2.3 decades 1-2-5 steps; wider, whole decades, at most 7.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    decades = math.log10(hi / lo) if lo > 0 and hi > 0 else 0.0
    if decades < 1.0:
        target.set_major_locator(_spaced_locator())
        target.set_minor_locator(NullLocator())
    else:
        subs = (1.0, 2.0, 5.0) if decades < 2.3 else (1.0,)
        target.set_major_locator(LogLocator(base=10, subs=subs, numticks=7))
        target.set_minor_locator(LogLocator(base=10, subs="auto", numticks=12))
    target.set_major_formatter(FuncFormatter(tick_label))
    target.set_minor_formatter(NullFormatter())


def _spaced_locator() -> Locator:
    """A major locator for a log axis spanning under a decade: round linear steps, none closer than a
    ninth of the axis in log space."""
    from matplotlib.ticker import Locator, MaxNLocator

    class SpacedLocator(Locator):
        def __call__(self) -> Sequence[float]:
            assert self.axis is not None, "a locator is called once set on an axis"
            vmin, vmax = self.axis.get_view_interval()
            return self.tick_values(vmin, vmax)

        def tick_values(self, vmin: float, vmax: float) -> list[float]:
            vmin, vmax = sorted((vmin, vmax))
            if vmin <= 0:
                return []
            gap = math.log10(vmax / vmin) / 9
            kept: list[float] = []
            for t in MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]).tick_values(vmin, vmax):
                if vmin <= t <= vmax and (not kept or math.log10(t / kept[-1]) >= gap):
                    kept.append(float(t))
            return kept

    return SpacedLocator()


def _plot_accuracy_vs(summaries: Sequence[ConfigSummary], cost: CostKind, path: Path, log_x: bool | None) -> Figure:
    """Accuracy (95% CI bars) vs mean ``cost``: one line per curve, the Pareto frontier, errored points.

    The figure grows with the legend (outside the axes, on the right), so every entry is inside it.
    Returns the saved figure.
    """
    summaries = _graded(summaries)
    curves = accuracy_vs_cost_curves(summaries, cost)
    colors = label_colors(c.label for c in curves)  # the labels do not depend on the cost unit
    runs = list(dict.fromkeys(s.run for s in summaries))
    markers = "osD^vP*X"
    errored = [s for s in summaries if s.n_errors and math.isfinite(s.mean_cost(cost))]
    front = [s for s in frontier_summaries(summaries, cost) if math.isfinite(s.mean_cost(cost))]
    labels = [c.label for c in curves] + ["Pareto frontier"] * bool(front) + [_ERRORED_LABEL] * bool(errored)
    ncols = 1 if len(labels) <= 30 else 2
    rows = math.ceil(len(labels) / ncols)
    fig = _agg_figure(figsize=(min(5.8 + ncols * _legend_width(labels), 16.0), max(4.6, 1.0 + _ENTRY_IN * rows)))
    ax = fig.subplots()
    for c in curves:
        xs = [p.cost for p in c.points]
        ys = [p.accuracy for p in c.points]
        yerr = [[max(p.accuracy - p.ci_low, 0.0) for p in c.points], [max(p.ci_high - p.accuracy, 0.0) for p in c.points]]
        ax.errorbar(xs, ys, yerr=yerr, marker=markers[runs.index(c.run) % len(markers)], ms=5, capsize=3, lw=1.4,
                    color=colors.get(c.label, "#444444"), label=c.label)
    if front:  # a thick dashed black step through ringed points, drawn over the curves
        ax.plot([s.mean_cost(cost) for s in front], [s.accuracy for s in front], drawstyle="steps-post",
                color="black", ls="--", lw=1.8, marker="o", ms=13, mfc="none", mec="black", mew=1.6, zorder=5,
                label="Pareto frontier")
    if errored:  # flagged, never ringed as frontier points
        ax.scatter([s.mean_cost(cost) for s in errored], [s.accuracy for s in errored], s=90, marker="x",
                   color="red", linewidths=2.0, zorder=6, label=_ERRORED_LABEL)
    xs_all = [s.mean_cost(cost) for s in summaries if math.isfinite(s.mean_cost(cost))]
    if log_x is None:  # auto: log when every cost is positive and they span > 20x
        log_x = bool(xs_all) and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20
    elif log_x and not (xs_all and min(xs_all) > 0):
        log_x = False  # a zero cost cannot be drawn on a log axis
    if log_x:
        ax.set_xscale("log")
        _log_ticks(ax, "x")
    ax.set_xlabel(_COST_LABEL[cost] + (" (log)" if log_x else ""))
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Accuracy vs {_COST_LABEL[cost].removeprefix('mean ').removesuffix(' per item')}")
    if labels:
        fig.legend(loc="outside right upper", fontsize=_LEGEND_FONT, ncols=ncols, frameon=False)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return fig


def _plot_per_suite(summaries: Sequence[ConfigSummary], path: Path) -> Figure:
    """Per-suite accuracy bars, one per configuration: its curve's colour, lighter for cheaper budgets.

    Suites are labelled by :func:`short_suite_labels` with the full specs in a key below the axes;
    configurations on the Pareto frontier (tokens) get a ★ in the legend.  Returns the saved figure.
    """
    import numpy as np
    from matplotlib.lines import Line2D

    summaries = _graded(summaries)
    suites = sorted({suite for s in summaries for suite in s.per_suite})
    short = short_suite_labels(suites)
    n_cfg = max(len(summaries), 1)
    curves = accuracy_vs_cost_curves(summaries)
    colors = label_colors(c.label for c in curves)
    shade: dict[tuple[str, str], tuple[float, ...]] = {}
    curve_of: dict[tuple[str, str], str] = {}
    for c in curves:
        base = np.array(_rgb(colors[c.label]))
        for j, p in enumerate(c.points):
            mix = 0.55 * (len(c.points) - 1 - j) / max(len(c.points) - 1, 1)
            shade[(c.run, p.config_id)] = tuple(base * (1 - mix) + mix)
            curve_of[(c.run, p.config_id)] = c.label
    on_front = {s.key for s in frontier_summaries(summaries)}
    labels = []
    for s in summaries:
        labels.append(f"{curve_of[s.key]} [{_fmt_dict(s.budget)}]" + (" ★" if s.key in on_front else "")
                      + (f" ⚠ {s.n_errors} errored" if s.n_errors else ""))
    key = [f"{a} = {b}" for a, b in zip(short, suites) if a != b]
    ncols = 1 if len(labels) <= 30 else 2
    rows = math.ceil(len(labels) / ncols)
    axes_w = min(max(4.0, len(suites) * (0.16 * n_cfg + 0.5)), 14.0)
    group_w = axes_w / max(len(suites), 1)
    rotate = max((len(x) for x in short), default=0) * 0.075 > 0.9 * group_w
    key_h = (0.25 + _ENTRY_IN * len(key)) if key else 0.0
    fig = _agg_figure(figsize=(axes_w + 0.8 + ncols * _legend_width(labels),
                               max(4.2, 1.0 + _ENTRY_IN * rows) + key_h + (0.6 if rotate else 0.0)))
    ax = fig.subplots()
    width = 0.8 / n_cfg
    x = np.arange(len(suites))
    for i, (s, label) in enumerate(zip(summaries, labels)):
        acc = [s.per_suite[q].accuracy if q in s.per_suite else np.nan for q in suites]
        lo = [s.per_suite[q].accuracy - s.per_suite[q].accuracy_ci_low if q in s.per_suite else 0.0 for q in suites]
        hi = [s.per_suite[q].accuracy_ci_high - s.per_suite[q].accuracy if q in s.per_suite else 0.0 for q in suites]
        ax.bar(x - 0.4 + width * (i + 0.5), acc, width, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=2,
               color=shade[s.key], label=label, error_kw={"lw": 0.8})
    if rotate:
        ax.set_xticks(x, short, rotation=25, ha="right", rotation_mode="anchor", fontsize=8)
    else:
        ax.set_xticks(x, short, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Accuracy per suite")
    ax.grid(True, axis="y", alpha=0.3)
    if labels:
        fig.legend(loc="outside right upper", fontsize=_LEGEND_FONT, ncols=ncols, frameon=False)
    if key:
        blank = [Line2D([], [], ls="none") for _ in key]
        fig.legend(blank, key, loc="outside lower left", fontsize=_LEGEND_FONT, frameon=False, title="suites",
                   title_fontsize=_LEGEND_FONT, alignment="left", handlelength=0, handletextpad=0)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return fig


def _agg_figure(**kw: Any) -> Figure:
    """A constrained-layout figure on its own Agg canvas (no pyplot): it draws, measures and saves alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _rgb(color: str) -> tuple[float, float, float]:
    """``"#rrggbb"`` → RGB floats in [0, 1]."""
    return (int(color[1:3], 16) / 255, int(color[3:5], 16) / 255, int(color[5:7], 16) / 255)


def _graded(summaries: Sequence[ConfigSummary]) -> list[ConfigSummary]:
    """The configurations with at least one graded record (the others have nothing to draw)."""
    return [s for s in summaries if s.n > 0]


# ------------------------------------------------------------------------------------------------
# report


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = defaultdict(int)
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def _fcop_json(fc: FrontierCostOfPass) -> JsonObject:
    doc: JsonObject = finite_json({
        "mean_over_solved": fc.mean,
        "n_problems": fc.n_problems,
        "n_unsolved": fc.n_unsolved,
        "per_problem": fc.per_problem,
        "best_config": {k: (list(v) if v else None) for k, v in fc.best_config.items()},
    })
    return doc


def _token_complexity_json(recs: list[EvalRecord], summaries: Sequence[ConfigSummary], model: str) -> JsonObject:
    """``summary.json``'s token complexity of one model.

    τ = ∞ is *not* "never solved": a question solved by one configuration of seven still gets τ = ∞
    when no token threshold classifies its responses better than "always wrong".  So the questions no
    configuration of the model solved (``n_never_solved``) are counted by :func:`frontier_cost_of_pass`
    — the function behind the frontier cost-of-pass line — on the model's graded records, and the
    questions with τ = ∞ separately (``n_infinite_tau`` ≥ ``n_never_solved``).
    """
    taus = token_complexity(recs)
    finite = sorted(v for v in taus.values() if math.isfinite(v))
    graded = [r for r in recs if r.error is None]
    never = frontier_cost_of_pass(graded).n_unsolved if graded else 0
    budgets = sorted({s.mean_output_tokens for s in summaries if s.model == model and s.n > 0})
    doc: JsonObject = finite_json({
        "n_questions": len(taus),
        "n_finite_tau": len(finite),
        "n_infinite_tau": sum(1 for v in taus.values() if math.isinf(v)),
        "n_never_solved": never,
        "mean_finite_tau": sum(finite) / len(finite) if finite else None,
        "median_finite_tau": statistics.median(finite) if finite else None,
        "per_question": taus,
        "oracle_curve": [{"mean_budget": b, "oracle_accuracy": a} for b, a in oracle_curve(taus, budgets)]
        if taus else [],
    })
    return doc


def build_summary(
    runs: list[tuple[str, Path, dict[str, Any], list[EvalRecord]]],
) -> tuple[JsonObject, list[ConfigSummary]]:
    """The ``summary.json`` document of ``(name, dir, run.json dict, records)`` runs, and the summaries."""
    summaries: list[ConfigSummary] = []
    tagged: list[EvalRecord] = []
    for name, _, _, recs in runs:
        summaries += summarize(recs, run=name, exclude_errors=True)
        tagged += [r.model_copy(update={"run": name}) for r in recs]
    graded = [r for r in tagged if r.error is None]  # an error is not a wrong answer at zero cost
    cost = _cost_unit(summaries)
    units: list[CostKind] = ["output_tokens"] if cost == "output_tokens" else ["output_tokens", cost]
    fronts = {u: [s.key for s in frontier_summaries(summaries, u)] for u in units}
    by_model: dict[str, list[EvalRecord]] = defaultdict(list)
    for r in tagged:
        by_model[r.model].append(r)
    tc: dict[str, JsonValue] = {}
    for model, recs in sorted(by_model.items()):
        tc[model] = _token_complexity_json(recs, summaries, model)
    configs = []
    for s in summaries:
        d = s.to_dict()
        d["on_frontier"] = {u: s.key in fronts[u] for u in units}
        d["errored"] = bool(s.n_errors)
        configs.append(d)
    doc: JsonObject = {
        "runs": [{"name": n, "path": str(p), "meta": finite_json(m)} for n, p, m, _ in runs],
        "cost_unit": cost,
        "n_configs": len(summaries),
        "n_over_budget_records": sum(round(s.over_budget_rate * s.n) for s in summaries),
        "n_errored_records": sum(s.n_errors for s in summaries),
        "errored_configs": [list(s.key) for s in summaries if s.n_errors],
        "configs": configs,
        "pareto_frontier": {u: [list(k) for k in fronts[u]] for u in units},
        "frontier_cost_of_pass": {
            u: _fcop_json(frontier_cost_of_pass(graded, u) if graded else FrontierCostOfPass(math.inf, 0, 0))
            for u in units},
        "token_complexity": tc,
        "notes": "null numbers are infinite or undefined (cost-of-pass at zero accuracy, tau of never-solved "
                 "questions, figures of a configuration with no graded record); keys (run, config_id) are "
                 "[run, config_id] lists; question keys are suite/item_id; errored records are left out of every "
                 "figure, counted in n_errors, and a configuration with any (errored: true) is never on the "
                 "Pareto frontier.",
    }
    return doc, summaries


_PARTIAL_HINT = ", or pass --allow-partial to report what is there"


def load_runs(run_dirs: Sequence[Path | str], *,
              allow_partial: bool = False) -> list[tuple[str, Path, dict[str, Any], list[EvalRecord]]]:
    """``(name, dir, run.json dict, records)`` of each run directory, names made unique.

    Several shard folders become one run merged in memory (its ``run.json`` dict has ``merged_from``
    and ``merged_in_memory``; its dir is the first shard's); a lone shard folder is named
    ``NAME [shard I/N]``.  Raises :class:`ConfigError` when the list is empty, a run directory has no
    ``records.jsonl`` (or no complete record in it), or shard folders do not merge (see
    :func:`~budgetlm.evals.shards.check_shards`; ``allow_partial`` accepts gaps and incomplete shards).
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise invalid("run_dirs", "a non-empty list of run directories", list(run_dirs),
                      "pass the run directories written by `budgetlm eval`")
    if len(dirs) > 1 and any(is_shard_folder(d) for d in dirs):
        for d in dirs:  # a missing records.jsonl gets the usual message first
            _load_run(d)
        meta, recs = merge_in_memory(dirs, allow_partial=allow_partial, partial_hint=_PARTIAL_HINT)
        meta["merged_in_memory"] = True
        return [(str(meta.get("name") or dirs[0].name), dirs[0], meta, recs)]
    loaded = [_load_run(d) for d in dirs]
    names = []
    for d, (meta, _) in zip(dirs, loaded):
        info = shard_info(meta)
        names.append(str(meta.get("name") or d.name) + (f" [shard {info.label}]" if info else ""))
    names = _unique_names(names)
    return [(n, d, meta, recs) for n, d, (meta, recs) in zip(names, dirs, loaded)]


def summary_doc(run_dirs: Sequence[Path | str], *, allow_partial: bool = False) -> JsonObject:
    """The ``summary.json`` document of run directories, computed from their records (nothing written)."""
    return build_summary(load_runs(run_dirs, allow_partial=allow_partial))[0]


def _front_note(doc: dict[str, Any]) -> str:
    cost = doc["cost_unit"]
    return _FRONT_NOTE + ("" if cost == "output_tokens" else f" (tokens) and/or mean {cost} (cost)") + "."


def markdown_table(doc: dict[str, Any]) -> str:
    """The configurations table of a ``summary.json`` document as Markdown, with the frontier legend.

    One line per row however wide (what ``budgetlm eval``/``report`` print when stdout is not a terminal).
    """
    return _md_table(*_table_rows(doc)) + "\n\n" + _front_note(doc)


def markdown_summary(doc: dict[str, Any], *, per_suite: bool = True) -> str:
    """The report's Markdown body from a ``summary.json`` document: the configurations table, the
    frontier legend, the notes and (``per_suite``) the per-suite table.

    Every figure comes from ``doc``, so what ``summary.md``, ``budgetlm report --format md`` and a
    redirected ``budgetlm eval`` print agrees with ``summary.json``.  Full width: a cell never wraps.
    """
    header, rows = _table_rows(doc)
    md = [_md_table(header, rows), "", _front_note(doc), "", *[f"- {n}" for n in _notes(doc)]]
    if per_suite:
        md += ["", "## Per suite", "", _md_table(*_suite_rows(doc))]
    return "\n".join(md)


def write_report(run_dirs: Sequence[Path | str], out_dir: Path | str | None = None, *,
                 allow_partial: bool = False) -> Path:
    """Write ``summary.json``, ``summary.md``, the PNGs and ``report.html``; return the HTML's path.

    ``out_dir`` defaults to the first run directory (several shard folders, merged in memory, need
    one).  Raises :class:`ConfigError` when a run directory has no ``records.jsonl`` (or no complete
    record in it), or shard folders do not merge.
    """
    _require_matplotlib()
    runs = load_runs(run_dirs, allow_partial=allow_partial)
    names = [n for n, *_ in runs]
    dirs = [d for _, d, *_ in runs]
    if out_dir is None and any(m.get("merged_in_memory") for _, _, m, _ in runs):
        raise invalid("--out", "a folder for the merged report of shard folders", None,
                      "pass --out runs/NAME-merged, or merge them first: budgetlm merge SHARD... --out MERGED")
    trace_dirs = [Path(s["path"]) for _, d, m, _ in runs for s in m["merged_from"]] if any(
        m.get("merged_in_memory") for _, _, m, _ in runs) else dirs
    out = Path(out_dir) if out_dir is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    rd = RunDir.report_dir(out)

    doc, summaries = build_summary(runs)
    write_json_atomic(rd.summary_json, doc, default=None, allow_nan=False)

    cost = _cost_unit(summaries)  # what build_summary wrote as doc["cost_unit"]
    header, rows = _table_rows(doc)
    s_header, s_rows = _suite_rows(doc)

    _plot_accuracy_vs(summaries, "output_tokens", rd.plot(PLOTS[0]), log_x=None)
    _plot_accuracy_vs(summaries, cost, rd.plot(PLOTS[1]), log_x=True)
    _plot_per_suite(summaries, rd.plot(PLOTS[2]))
    trees = _tree_figures(trace_dirs, summaries, out)
    plots = [*PLOTS, *trees]

    notes = _notes(doc)
    md = ["# budgetlm evaluation report", "", "Runs: " + ", ".join(f"`{n}`" for n in names), "",
          markdown_summary(doc), "", *[f"![{p}]({p})" for p in plots], ""]
    rd.summary_md.write_text("\n".join(md), encoding="utf-8")

    html_path = rd.report_html
    html_path.write_text(_html(names, runs, header, rows, s_header, s_rows, notes, _front_note(doc), out, plots),
                         encoding="utf-8")
    return html_path


def _tree_figures(dirs: Sequence[Path], summaries: Sequence[ConfigSummary], out: Path) -> list[str]:
    """One ``tree_<strategy>.png`` per strategy whose traces hold search trees (a representative problem)."""
    from budgetlm.evals.treeplot import draw_tree, pick_tree, tree_of

    lines = [line for d in dirs for line in RunDir(d).read_traces()]
    if not lines:
        return []
    names: list[str] = []
    for strategy in dict.fromkeys(s.strategy for s in summaries):
        line = pick_tree(lines, strategy)
        if line is None:
            continue
        found = tree_of(line["trace"])
        if found is None:
            raise missing('found')
        tree, final = found
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in strategy)
        name = f"tree_{slug}.png"
        draw_tree(tree, out / name, title=f"{strategy} · {line['item_id']}", final_node=final.get("node"))
        names.append(name)
    return names


def _notes(doc: dict[str, Any]) -> list[str]:
    """The report's notes, every figure read from the ``summary.json`` document ``doc``.

    The counts are the fields the tables and ``summary.json`` hold (tests parse them back out):
    the never-solved count of the token-complexity note is the frontier cost-of-pass's unsolved
    count on the model's records, not the number of questions with τ = ∞.
    """
    notes = []
    for run in doc["runs"]:
        meta = run.get("meta") or {}
        info, partial = meta.get("shard"), meta.get("partial")
        if isinstance(info, dict):
            notes.append(f"⚠ Partial results: {run['name']} is shard {info.get('index')}/{info.get('count')} of "
                         f"its grid ({info.get('cells')} of {info.get('grid_cells')} cells); merge every shard "
                         "folder (`budgetlm merge SHARD... --out MERGED`) for the full results")
        if isinstance(partial, dict):
            absent = ", ".join(str(i) for i in partial.get("missing_shards", [])) or "none"
            notes.append(f"⚠ Partial merge: {run['name']} lacks shard(s) {absent}; incomplete shards (cells "
                         f"missing): {partial.get('missing_cells') or 'none'}")
    n_over = doc["n_over_budget_records"]
    notes.append(f"Budget adherence: {n_over} record(s) over budget" + (" — BUDGET VIOLATED" if n_over else " (ok)"))
    for u, fc in doc["frontier_cost_of_pass"].items():
        mean = fc["mean_over_solved"]
        solved = fc["n_problems"] - fc["n_unsolved"]
        notes.append(f"Frontier cost-of-pass ({u.replace('_', ' ')}): "
                     + (f"{_fmt_num(mean, 4)} per correct answer over {solved} solved problem(s)" if solved else
                        "∞ (no problem solved by any configuration)")
                     + f" of {fc['n_problems']}; {fc['n_unsolved']} never solved by any configuration")
    for model, tc in doc["token_complexity"].items():
        n_inf, never = tc["n_infinite_tau"], tc["n_never_solved"]
        rare = n_inf - never
        notes.append(f"Token complexity ({model}): {tc['n_questions']} question(s); finite τ for {tc['n_finite_tau']} "
                     f"(mean {_fmt_num(tc['mean_finite_tau'], 1)}, median {_fmt_num(tc['median_finite_tau'], 1)} "
                     f"output tokens); τ = ∞ for {n_inf}: {never} never solved by any configuration"
                     + (f", {rare} solved too rarely for a token threshold to beat 'always wrong'" if rare else ""))
    n_err = doc["n_errored_records"]
    if n_err:
        notes.append(f"⚠ {n_err} errored record(s) in {len(doc['errored_configs'])} configuration(s): left out of "
                     "accuracy and costs, and those configurations are not ranked on the Pareto frontier; re-run "
                     "`budgetlm eval` with the same config and --out to retry them")
    short = [f"{c['run']} · {c['strategy']} [{_fmt_dict(c['budget'])}]" for c in doc["configs"]]
    for c, label in zip(doc["configs"], short):
        if short.count(label) > 1:  # configurations told apart by their parameters alone
            label = f"{c['run']} · {c['strategy']} {_fmt_dict(c['params'])} [{_fmt_dict(c['budget'])}]"
        xi = _fmt_num(c["overthinking_efficiency"], 3)
        ipj = "" if c["intelligence_per_joule"] is None else f", accuracy/J {_fmt_num(c['intelligence_per_joule'], 4)}"
        cop_v = c["cost_of_pass"].get("output_tokens")
        cop = "—" if not c["n"] else "∞" if cop_v is None else _fmt_num(cop_v, 1)  # null: zero accuracy
        notes.append(f"{label}: cost-of-pass {cop} output tokens, "
                     f"ξ_O {xi}{ipj}, errors {c['n_errors']}" + (" ⚠ ERRORED: not ranked" if c["n_errors"] else ""))
    return notes


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;
font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f2f2f2}
img{max-width:100%;display:block;margin:1em 0}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:12px}"""


def _html(names: list[str], runs: list[tuple[str, Path, dict[str, Any], list[EvalRecord]]], header: list[str],
          rows: list[list[str]], s_header: list[str], s_rows: list[list[str]], notes: list[str], front_note: str,
          out: Path, plots: Sequence[str] = PLOTS) -> str:
    esc = html.escape
    imgs = []
    for p in plots:
        data = base64.b64encode((out / p).read_bytes()).decode("ascii")
        imgs.append(f'<img alt="{esc(p)}" src="data:image/png;base64,{data}">')
    meta = "".join(
        f"<h3>{esc(n)}</h3><p><code>{esc(str(d))}</code> — {len(recs)} record(s)</p>"
        f"<pre>{esc(json.dumps(finite_json(m), indent=2, sort_keys=True, default=str))}</pre>"
        for n, d, m, recs in runs
    )
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>budgetlm report: {esc(', '.join(names))}</title><style>{_CSS}</style></head><body>"
        f"<h1>budgetlm evaluation report</h1><p>Runs: {esc(', '.join(names))}</p>"
        f"<h2>Configurations</h2>{_html_table(header, rows)}"
        f"<p>{esc(front_note)}</p>"
        f"<ul>{items}</ul><h2>Charts</h2>{''.join(imgs)}"
        f"<h2>Per suite</h2>{_html_table(s_header, s_rows)}<h2>Run metadata</h2>{meta}</body></html>\n"
    )
