"""Drawing one search tree (``bavt``, ``beam``, ``rebase``) from its exported JSON.

:func:`draw_tree` lays the tree out by depth (top to bottom) with leaves spread evenly left to right
(each parent centred over its children), colours nodes by value, draws pruned nodes hollow with a
cross, closed nodes hollow, terminal nodes as squares labelled with their answer, and marks the
node the final answer came from.  Edge labels give the step's output tokens.
:func:`pick_tree` chooses a representative tree from ``traces.jsonl`` for the report.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from budgetlm.evals.records import read_traces as _read


def tree_of(trace: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(tree, final)`` from a strategy trace, or ``None`` when the trace holds no tree."""
    for entry in reversed(trace):
        if isinstance(entry, dict) and "tree" in entry:
            return entry["tree"], entry.get("final") or {}
    return None


def pick_tree(lines: Iterable[dict[str, Any]], strategy: str, *, max_nodes: int = 40) -> dict[str, Any] | None:
    """A representative trace line of ``strategy``: the one whose tree size is the median among trees of
    at most ``max_nodes`` nodes (ties: first)."""
    cands: list[tuple[int, int, dict[str, Any]]] = []
    for line in lines:
        if line.get("strategy") != strategy:
            continue
        t = tree_of(line.get("trace") or [])
        if t is not None and 1 < len(t[0]["nodes"]) <= max_nodes:
            cands.append((len(t[0]["nodes"]), len(cands), line))
    if not cands:
        return None
    cands.sort(key=lambda c: (c[0], c[1]))
    return cands[len(cands) // 2][2]


def read_traces(path: Path) -> list[dict[str, Any]]:
    """The lines of a ``traces.jsonl``, decoded (:func:`budgetlm.evals.records.read_traces`)."""
    return _read(path)


def _layout(nodes: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    kids = {n["id"]: [c for c in n["children"]] for n in nodes}
    pos: dict[int, tuple[float, float]] = {}
    next_x = [0.0]

    def place(i: int, depth: int) -> float:
        ch = kids.get(i, [])
        if not ch:
            x = next_x[0]
            next_x[0] += 1.0
        else:
            xs = [place(c, depth + 1) for c in ch]
            x = (min(xs) + max(xs)) / 2
        pos[i] = (x, -float(depth))
        return x

    place(0, 0)
    return pos


def draw_tree(tree: dict[str, Any], path: Path | str, *, title: str = "", final_node: int | None = None) -> Path:
    """Draw ``tree`` (as exported by :meth:`budgetlm.strategies.tree.Tree.to_json`) to a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm

    nodes = tree["nodes"]
    pos = _layout(nodes)
    width = max(4.0, 0.55 * (max(x for x, _ in pos.values()) + 2))
    depth = max(-y for _, y in pos.values())
    fig, ax = plt.subplots(figsize=(min(width, 16.0), 1.1 * depth + 2.2))
    cmap = matplotlib.colormaps["viridis"]
    for n in nodes:
        if n["parent"] is None:
            continue
        (x0, y0), (x1, y1) = pos[n["parent"]], pos[n["id"]]
        ax.plot([x0, x1], [y0, y1], color="#bbbbbb", lw=1, zorder=1)
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, str(n["tokens"]), fontsize=6, color="#777777", ha="center", va="center")
    for n in nodes:
        x, y = pos[n["id"]]
        color = cmap(max(0.0, min(1.0, float(n["value"]))))
        marker = "s" if n["terminal"] else "o"
        hollow = n.get("pruned") is not None or n.get("closed") is not None
        ax.scatter([x], [y], s=90, marker=marker, zorder=3, edgecolors=color if hollow else "black",
                   facecolors="white" if hollow else color, linewidths=1.2)
        if n.get("pruned") is not None:
            ax.scatter([x], [y], s=40, marker="x", color="#d62728", zorder=4)
        if n["terminal"]:
            label = str(n.get("answer"))
            ax.text(x, y - 0.12, label if len(label) <= 8 else label[:7] + "…", fontsize=7, ha="center", va="top")
        if final_node is not None and n["id"] == final_node:
            ax.scatter([x], [y], s=260, marker="o", facecolors="none", edgecolors="#d62728", linewidths=1.5, zorder=2)
    sm = cm.ScalarMappable(cmap=cmap)
    sm.set_clim(0, 1)
    fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.01, label="node value")
    ax.set_axis_off()
    pruned = sum(1 for n in nodes if n.get("pruned") is not None)
    ax.set_title((title + "\n" if title else "") + f"{len(nodes)} nodes, {pruned} pruned (x), "
                 f"{tree.get('output_tokens', 0)} output tokens; squares: terminal, ring: final answer",
                 fontsize=8)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
