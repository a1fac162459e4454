"""Step-level preference pairs from search trees, for DPO (MCTS-DPO).

MCTS-DPO ("Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning", Xie et al.
2024, arXiv 2405.00451) breaks an outcome reward into step-level signals with a tree search: at
every expanded node, two sibling steps whose values differ become a (chosen, rejected) pair that
shares the path so far as its prompt, DPO trains on the pairs, and search → pairs → DPO repeats on
the updated policy.  budgetlm's tree strategies (``bavt``, ``beam``, ``rebase``, ``hyper``) already
record every tree in ``traces.jsonl`` (:meth:`budgetlm.strategies.tree.Tree.to_json`: nodes with
parent ids, step text, values, terminal answers, prune decisions), so this module only reads them.

**The step value (our rule).**  ``value="outcome"`` (the default): a node's value is the mean graded
outcome (1 correct, 0 wrong) of the answers found under it — every terminal node of its subtree and
the forced answer when the search forced one from a node of the subtree; a node with no answer under
it has no value and joins no pair.  This is the Monte Carlo estimate of the outcome reward that
MCTS-DPO's Q-values converge to, without its self-evaluation term (a 135M model's self-rating is
noise).  ``value="search"``: the value the search itself recorded (``node.value``: the strategy's
scorer — a self-evaluation, a log-probability or a process reward model — propagated as the
strategy does), which gives pairs in every expanded node, pruned siblings included.

**Pairs (our choices).**  For every node with two or more valued children, each unordered pair of
children is *considered*; it is kept when the value margin ``|v(a) − v(b)|`` is positive and at least
``min_margin``, the higher-valued step chosen.  ``dedup`` drops a pair whose (item, prefix, chosen,
rejected) texts repeat an earlier pair (the same tree found by two configurations, or two samples of
an identical step) and pairs of two identical step texts.  Then at most ``max_pairs_per_node`` pairs
per node are kept, largest margin first (ties: lower node ids).  MCTS-DPO takes one pair per depth
(the highest and lowest Q); ``max_pairs_per_node: 1`` is that rule per node.

**Format.**  Rows are TRL's *standard* (text) preference format: ``prompt`` is the problem's chat
messages rendered by the policy's chat template with the generation prompt, followed by the steps so
far — exactly what the tree continued from — and ``chosen``/``rejected`` are the two step texts.
``chosen_terminal``/``rejected_terminal`` say whether a step ended the reply: only such a step gets
the end-of-sequence token in training (:mod:`budgetlm.training.dpo`), an intermediate step does not.
Further columns (``margin``, values, node ids, item) are metadata.

Read a finished tree-search run with :func:`export_pairs` (``budgetlm pairs RUN_DIR --out
pairs.jsonl``), or build pairs from trace lines in memory with :func:`extract_pairs`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from budgetlm.answers import extract_answer, normalize_answer
from budgetlm.errors import ConfigError
from budgetlm.io import JsonObject, JsonValue

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from budgetlm.evals.records import EvalRecord
    from budgetlm.evals.suites.base import EvalItem, Suite

__all__ = ["TREE_STRATEGIES", "Pair", "PairStats", "collect_pairs", "export_pairs", "extract_pairs", "pair_rows",
           "read_pairs", "render_prompt", "run_pairs", "write_pairs"]

TREE_STRATEGIES = ("bavt", "beam", "rebase", "hyper")
"""Strategies whose traces hold a tree (any trace line with a ``tree`` entry is read)."""

ValueSource = Literal["outcome", "search"]
Grader = Callable[[dict[str, object], str], bool]
"""``grade(trace_line, reply_text) -> correct``: the outcome of an answer found in a tree."""


@dataclass(frozen=True)
class Pair:
    """One step-level preference pair: two sibling steps after a shared path."""

    messages: tuple[dict[str, str], ...]
    """The problem's chat messages (the prompt before the reply); empty when unknown."""
    prefix: str
    """The reply so far: the steps from the root to the shared parent, concatenated."""
    chosen: str
    """The higher-valued step."""
    rejected: str
    """The lower-valued step."""
    margin: float
    """``chosen_value − rejected_value`` (> 0)."""
    chosen_value: float
    rejected_value: float
    parent_id: int
    """The shared parent's node id."""
    chosen_id: int
    rejected_id: int
    chosen_terminal: bool
    """The chosen step ended the reply."""
    rejected_terminal: bool
    key: tuple[str, str, str]
    """The record the tree came from: (suite, item id, config id)."""
    strategy: str = ""
    depth: int = 0
    """Depth of the two steps (the parent's depth + 1)."""

    def texts(self) -> tuple[str, str, str, str]:
        """What dedup compares: item, prefix, chosen and rejected texts."""
        return (self.key[1], self.prefix, self.chosen, self.rejected)


@dataclass
class PairStats:
    """Counts of one extraction (reported when nothing is left)."""

    records: int = 0
    """Trace lines read."""
    trees: int = 0
    """Trace lines with a tree."""
    nodes: int = 0
    """Nodes over all trees."""
    valued_nodes: int = 0
    """Nodes with a value under the chosen rule."""
    considered: int = 0
    """Sibling pairs of valued children."""
    dropped_margin: int = 0
    """Pairs whose margin was zero or below ``min_margin``."""
    dropped_dedup: int = 0
    """Pairs repeating an earlier pair's texts, or of two identical steps."""
    dropped_cap: int = 0
    """Pairs over ``max_pairs_per_node``."""
    kept: int = 0
    strategies: dict[str, int] = field(default_factory=dict)
    """Trace lines per strategy."""

    def describe(self) -> str:
        return (f"{self.records} records ({', '.join(f'{k}: {v}' for k, v in sorted(self.strategies.items())) or 'none'}), "
                f"{self.trees} trees, {self.nodes} nodes ({self.valued_nodes} with a value), {self.considered} sibling "
                f"pairs considered, {self.dropped_margin} dropped by margin, {self.dropped_dedup} dropped by dedup, "
                f"{self.dropped_cap} dropped by max_pairs_per_node, {self.kept} kept")


def tree_of(line: Mapping[str, object]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(tree, final)`` of a trace line, or None when its trace holds no tree."""
    trace = line.get("trace") or []
    if not isinstance(trace, Sequence):
        return None
    for entry in reversed(trace):
        if isinstance(entry, dict) and isinstance(entry.get("tree"), dict):
            return entry["tree"], entry.get("final") or {}
    return None


def answer_grader(line: Mapping[str, object], text: str) -> bool:
    """The default outcome: the reply's extracted answer equals the line's ``gold`` (normalised)."""
    gold = line.get("gold")
    got = normalize_answer(extract_answer(text).text)
    return gold is not None and got is not None and got == normalize_answer(str(gold))


def _check_nodes(nodes: object, line: Mapping[str, object]) -> list[dict[str, Any]]:
    if not isinstance(nodes, list) or not nodes or not all(
            isinstance(n, dict) and isinstance(n.get("value"), int | float) and "id" in n and "parent" in n for n in nodes):
        raise ConfigError(
            f"`traces` must hold tree nodes with values (id, parent, step, value), got a tree without them in record "
            f"{line.get('item_id')!r} of strategy {line.get('strategy')!r}; export the traces of a budgetlm tree "
            f"strategy ({', '.join(TREE_STRATEGIES)}) run")
    return nodes


def _tree_pairs(line: Mapping[str, object], tree: dict[str, Any], final: dict[str, Any], value: ValueSource,
                grade: Grader, messages: tuple[dict[str, str], ...], stats: PairStats) -> list[list[Pair]]:
    nodes = {n["id"]: n for n in _check_nodes(tree.get("nodes"), line)}
    kids: dict[int, list[int]] = {i: [] for i in nodes}
    for n in nodes.values():
        if n["parent"] is not None and n["parent"] in kids:
            kids[n["parent"]].append(n["id"])
    stats.nodes += len(nodes)

    text: dict[int, str] = {}

    def path_text(i: int) -> str:
        if i not in text:
            p = nodes[i]["parent"]
            text[i] = (path_text(p) if p is not None and p in nodes else "") + (nodes[i].get("step") or "")
        return text[i]

    vals: dict[int, float] = {}
    if value == "search":
        vals = {i: float(n["value"]) for i, n in nodes.items()}
    else:
        found: dict[int, list[float]] = {}  # node → outcomes of the answers at the node itself
        for i, n in nodes.items():
            if n.get("terminal"):
                found.setdefault(i, []).append(1.0 if grade(dict(line), path_text(i)) else 0.0)
        forced = tree.get("forced") or {}
        if forced.get("called") and forced.get("node") in nodes:
            i = forced["node"]
            reply = path_text(i).rstrip() + "\nFinal answer: " + str(forced.get("text") or "").lstrip()
            found.setdefault(i, []).append(1.0 if grade(dict(line), reply) else 0.0)
        sums: dict[int, tuple[float, int]] = {}

        def subtree(i: int) -> tuple[float, int]:
            if i not in sums:
                s, c = sum(found.get(i, [])), len(found.get(i, []))
                for k in kids[i]:
                    ks, kc = subtree(k)
                    s, c = s + ks, c + kc
                sums[i] = (s, c)
            return sums[i]

        for i in nodes:
            s, c = subtree(i)
            if c:
                vals[i] = s / c
    stats.valued_nodes += len(vals)

    key = (str(line.get("suite", "")), str(line.get("item_id", "")), str(line.get("config_id", "")))
    out: list[list[Pair]] = []
    for p, ch in kids.items():
        valued = [c for c in sorted(ch) if c in vals]
        group = []
        for a, b in combinations(valued, 2):
            stats.considered += 1
            hi, lo = (a, b) if vals[a] >= vals[b] else (b, a)
            group.append(Pair(messages=messages, prefix=path_text(p), chosen=nodes[hi].get("step") or "",
                              rejected=nodes[lo].get("step") or "", margin=vals[hi] - vals[lo],
                              chosen_value=vals[hi], rejected_value=vals[lo], parent_id=p, chosen_id=hi,
                              rejected_id=lo, chosen_terminal=bool(nodes[hi].get("terminal")),
                              rejected_terminal=bool(nodes[lo].get("terminal")), key=key,
                              strategy=str(line.get("strategy", "")), depth=int(nodes[p].get("depth", 0)) + 1))
        if group:
            out.append(group)
    return out


def value_source(value: object) -> ValueSource:
    """``value`` as a :data:`ValueSource`, or a :class:`~budgetlm.errors.ConfigError` naming the choices.

    >>> value_source("search")
    'search'
    """
    if value == "outcome" or value == "search":
        return value
    raise ConfigError(f"`value` must be 'outcome' or 'search', got {value!r}")


def collect_pairs(traces: Iterable[Mapping[str, object]], *, min_margin: float = 0.1, max_pairs_per_node: int | None = 1,
                  dedup: bool = True, value: ValueSource = "outcome", grade: Grader | None = None,
                  messages: Mapping[str, Sequence[Mapping[str, str]]] | None = None) -> tuple[list[Pair], PairStats]:
    """The pairs of every tree in ``traces`` (decoded ``traces.jsonl`` lines) and the extraction's counts.

    ``grade(line, text)`` decides an answer's outcome (default :func:`answer_grader`: the extracted
    answer against the line's ``gold``); ``messages`` maps item ids to their chat messages.  Raises
    :class:`~budgetlm.errors.ConfigError` when no line holds a tree with values.
    """
    if min_margin < 0:
        raise ConfigError(f"`min_margin` must be >= 0, got {min_margin}")
    if max_pairs_per_node is not None and max_pairs_per_node < 1:
        raise ConfigError(f"`max_pairs_per_node` must be >= 1 or null (no cap), got {max_pairs_per_node}")
    value = value_source(value)
    grade = grade or answer_grader
    stats = PairStats()
    groups: list[list[Pair]] = []
    for line in traces:
        stats.records += 1
        strategy = str(line.get("strategy", "?"))
        stats.strategies[strategy] = stats.strategies.get(strategy, 0) + 1
        if line.get("error"):
            continue
        t = tree_of(line)
        if t is None:
            continue
        stats.trees += 1
        msgs = tuple(dict(m) for m in (messages or {}).get(str(line.get("item_id")), ()))
        groups += _tree_pairs(line, t[0], t[1], value, grade, msgs, stats)
    if not stats.trees:
        which = ", ".join(f"{v} records of strategy {k}" for k, v in sorted(stats.strategies.items())) or "0 records"
        raise ConfigError(f"`traces` must hold tree nodes with values (a `tree` entry in each trace), got {which} "
                          f"without a tree; run a tree strategy ({', '.join(TREE_STRATEGIES)}) and export its traces.jsonl")
    seen: set[tuple[str, str, str, str]] = set()
    pairs: list[Pair] = []
    for group in groups:
        left = []
        for pair in group:
            if pair.margin <= 0 or pair.margin < min_margin:
                stats.dropped_margin += 1
            elif dedup and (pair.chosen == pair.rejected or pair.texts() in seen):
                stats.dropped_dedup += 1
            else:
                seen.add(pair.texts())
                left.append(pair)
        left.sort(key=lambda q: (-q.margin, q.chosen_id, q.rejected_id))
        cap = len(left) if max_pairs_per_node is None else max_pairs_per_node
        stats.dropped_cap += max(0, len(left) - cap)
        if dedup:  # a capped pair was never used: let a later tree keep the same texts
            for q in left[cap:]:
                seen.discard(q.texts())
        pairs += left[:cap]
    stats.kept = len(pairs)
    return pairs, stats


def extract_pairs(traces: Iterable[Mapping[str, object]], min_margin: float = 0.1, max_pairs_per_node: int | None = 1,
                  dedup: bool = True, *, value: ValueSource = "outcome", grade: Grader | None = None,
                  messages: Mapping[str, Sequence[Mapping[str, str]]] | None = None) -> list[Pair]:
    """The step-level pairs of ``traces`` after the filters (see :func:`collect_pairs`); an error with the
    counts when none is left."""
    pairs, stats = collect_pairs(traces, min_margin=min_margin, max_pairs_per_node=max_pairs_per_node, dedup=dedup,
                                 value=value, grade=grade, messages=messages)
    if not pairs:
        raise ConfigError(
            f"no preference pairs left after filtering: {stats.describe()}; lower `min_margin` (now {min_margin}), "
            f"raise `max_pairs_per_node`, use `value: search` (every expanded node's search values) or run a wider "
            f"search (more children per node, more items, higher temperature) so that sibling steps differ in value")
    return pairs


# ----------------------------------------------------------------------------- rows and files
def render_prompt(tokenizer: PreTrainedTokenizerBase | None, messages: Sequence[Mapping[str, str]], prefix: str) -> str:
    """The text the tree continued from: the chat template of ``messages`` with the generation prompt, then ``prefix``."""
    msgs = [dict(m) for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        head: str = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        head = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "
    return head + prefix


def pair_rows(pairs: Sequence[Pair], tokenizer: PreTrainedTokenizerBase | None = None) -> list[JsonObject]:
    """DPO rows (TRL's standard format) of ``pairs``; without a tokenizer ``prompt`` is left empty."""
    rows: list[JsonObject] = []
    for p in pairs:
        row: JsonObject = {"prompt": render_prompt(tokenizer, p.messages, p.prefix) if tokenizer is not None else "",
               "chosen": p.chosen, "rejected": p.rejected, **asdict(p)}
        row["messages"] = [dict(m) for m in p.messages]
        row["key"] = list(p.key)
        rows.append(row)
    return rows


def write_pairs(rows: Sequence[Mapping[str, JsonValue]], path: str | Path) -> Path:
    """``rows`` as JSONL at ``path`` (written whole, then moved into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, default=str) + "\n")
    tmp.replace(path)
    return path


def read_pairs(path: str | Path) -> list[JsonObject]:
    """The rows of a pairs JSONL (as :func:`export_pairs` writes it)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"`pairs` must be a pairs JSONL file, got {str(p)!r}, which does not exist; write one with "
                          "`budgetlm pairs RUN_DIR --out pairs.jsonl`")
    rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [i for i, r in enumerate(rows, 1)
           if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected"))]
    if bad or not rows:
        raise ConfigError(f"`pairs` must hold rows with text prompt, chosen and rejected, got {len(rows)} rows "
                          f"({len(bad)} without them, e.g. line {bad[0] if bad else '-'}) in {p}; re-export it")
    return rows


def _suite_context(records: Sequence[EvalRecord]) -> tuple[dict[str, Suite], dict[str, dict[str, EvalItem]]]:
    """Per suite spec: the suite and its items by id (for messages and grading)."""
    from budgetlm.evals.suites import get as get_suite

    suites: dict[str, Suite] = {}
    items: dict[str, dict[str, EvalItem]] = {}
    for spec in sorted({r.suite for r in records}):
        try:
            s = get_suite(spec)
        except Exception:  # noqa: BLE001  (a suite that cannot be rebuilt: grade against the record's gold)
            continue
        suites[spec] = s
        items[spec] = {it.id: it for it in s.items()}
    return suites, items


def run_pairs(run_dir: str | Path, *, min_margin: float = 0.1, max_pairs_per_node: int | None = 1, dedup: bool = True,
              value: ValueSource = "outcome") -> tuple[list[Pair], PairStats]:
    """The pairs of an evaluation run folder (``records.jsonl`` + ``traces.jsonl``), graded by each suite's grader."""
    from budgetlm.evals.rundir import RunDir

    run = RunDir(run_dir)
    if not run.traces.exists():
        raise ConfigError(f"`run_dir` must be an evaluation run folder with traces.jsonl, got {str(run.path)!r} without "
                          f"one; run `budgetlm eval` with a tree strategy ({', '.join(TREE_STRATEGIES)}) into it")
    records = {r.key: r for r in run.read_records()}
    lines = []
    for line in run.read_traces():
        rec = records.get((str(line.get("suite")), str(line.get("item_id")), str(line.get("config_id"))))
        if rec is not None:  # the trace of the latest record of each cell only (a retry supersedes an error)
            lines.append({**line, "gold": rec.gold, "error": rec.error})
    suites, items = _suite_context(list(records.values()))

    def grade(line: dict[str, object], text: str) -> bool:
        suite = suites.get(str(line.get("suite")))
        item = items.get(str(line.get("suite")), {}).get(str(line.get("item_id")))
        if suite is None or item is None:
            return answer_grader(line, text)
        return bool(suite.grade(item, text).correct)

    messages: dict[str, list[dict[str, str]]] = {}
    for by_id in items.values():
        for item_id, it in by_id.items():
            messages.setdefault(item_id, [dict(m) for m in it.messages])
    for rec in records.values():  # a suite that could not be rebuilt: the question as one user message
        if rec.item_id not in messages and rec.question:
            messages[rec.item_id] = [{"role": "user", "content": rec.question}]
    return collect_pairs(lines, min_margin=min_margin, max_pairs_per_node=max_pairs_per_node, dedup=dedup,
                         value=value, grade=grade, messages=messages)


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec (``default``, a path, ``hf:PATH``, ``vllm:PATH``)."""
    from transformers import AutoTokenizer

    from budgetlm.training.grpo import model_path

    return AutoTokenizer.from_pretrained(str(model_path(model)))


def export_pairs(run_dir: str | Path, out_path: str | Path, *, model: str | None = None, min_margin: float = 0.1,
                 max_pairs_per_node: int | None = 1, dedup: bool = True, value: ValueSource = "outcome"
                 ) -> tuple[Path, PairStats]:
    """Write the DPO pairs of a tree-search run to ``out_path`` (JSONL, TRL's standard preference format).

    ``model``: whose chat template renders the prompts (default: the run's model — every record must
    then name the same one).  Raises :class:`~budgetlm.errors.ConfigError` with the counts when the
    filters leave no pair.
    """
    from budgetlm.evals.rundir import RunDir

    pairs, stats = run_pairs(run_dir, min_margin=min_margin, max_pairs_per_node=max_pairs_per_node, dedup=dedup,
                             value=value)
    if not pairs:
        raise ConfigError(
            f"no preference pairs left after filtering {run_dir}: {stats.describe()}; lower `min_margin` (now "
            f"{min_margin}), raise `max_pairs_per_node`, use `value: search`, or run a wider search (more children per "
            f"node, more items, higher temperature) so that sibling steps differ in value")
    if model is None:
        models = sorted({r.model for r in RunDir(run_dir).read_records()})
        if len(models) != 1:
            raise ConfigError(f"`model` must be given when the run holds several models, got {models}; name the policy "
                              "whose chat template renders the prompts")
        model = models[0]
    rows = pair_rows(pairs, load_tokenizer(model))
    return write_pairs(rows, out_path), stats
