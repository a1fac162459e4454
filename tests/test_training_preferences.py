"""Step-level preference pairs from tree traces: a hand-built tree gives the exact expected pairs, the
filters, the DPO rows, the ``dpo`` recipe's parameters, and bad input (trees without values, nothing left)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from budgetlm.errors import ConfigError
from budgetlm.training import RECIPES, TrainConfig
from budgetlm.training.dpo import DpoRecipe, build_dpo_config
from budgetlm.training.preferences import (
    collect_pairs,
    extract_pairs,
    pair_rows,
    read_pairs,
    render_prompt,
    write_pairs,
)

MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]


def node(i: int, parent: int | None, step: str, value: float, *, terminal: bool = False, pruned: str | None = None,
         children: tuple[int, ...] = ()) -> dict[str, Any]:
    return {"id": i, "parent": parent, "depth": 0, "step": step, "tokens": 3, "value": value, "terminal": terminal,
            "answer": None, "pruned": pruned, "children": list(children)}


def tree_nodes() -> list[dict[str, Any]]:
    """root ─┬─ 1 "3 + 4 is" ─┬─ 4 " 7. Final answer: 7"  (correct)
             │                └─ 5 " 8. Final answer: 8"  (wrong)
             ├─ 2 "Let me add"  ── 6 " 34. Final answer: 34" (wrong)
             └─ 3 "Hmm"  (pruned: no answer under it)"""
    nodes = [node(0, None, "", 0.5, children=(1, 2, 3)), node(1, 0, "3 + 4 is", 0.8, children=(4, 5)),
             node(2, 0, "Let me add", 0.6, children=(6,)), node(3, 0, "Hmm", 0.2, pruned="low value"),
             node(4, 1, " 7. Final answer: 7", 0.9, terminal=True), node(5, 1, " 8. Final answer: 8", 0.3, terminal=True),
             node(6, 2, " 34. Final answer: 34", 0.5, terminal=True)]
    for n in nodes[1:]:
        n["depth"] = 1 if n["parent"] == 0 else 2
    return nodes


def line(nodes: list[dict[str, Any]] | None = None, *, config_id: str = "c1", item_id: str = "q1", forced: Any = None,
         strategy: str = "bavt", gold: str = "7") -> dict[str, Any]:
    tree = {"nodes": tree_nodes() if nodes is None else nodes, "forced": forced}
    return {"suite": "s", "item_id": item_id, "config_id": config_id, "strategy": strategy, "gold": gold,
            "trace": [{"round": 1}, {"tree": tree, "final": {"node": 4}}]}


def summary(pairs: list[Any]) -> set[tuple[int, int, int, float]]:
    return {(p.parent_id, p.chosen_id, p.rejected_id, round(p.margin, 6)) for p in pairs}


def test_hand_built_tree_gives_the_expected_pairs() -> None:
    pairs = extract_pairs([line()], min_margin=0.0, max_pairs_per_node=None, messages={"q1": MESSAGES})
    # outcome values: 4 → 1, 5 → 0, 1 → 0.5, 6 → 0, 2 → 0; node 3 has no answer under it (no value)
    assert summary(pairs) == {(0, 1, 2, 0.5), (1, 4, 5, 1.0)}
    by_parent = {p.parent_id: p for p in pairs}
    root, inner = by_parent[0], by_parent[1]
    assert (root.prefix, root.chosen, root.rejected) == ("", "3 + 4 is", "Let me add")
    assert (root.chosen_value, root.rejected_value, root.chosen_terminal, root.depth) == (0.5, 0.0, False, 1)
    assert (inner.prefix, inner.chosen, inner.rejected) == ("3 + 4 is", " 7. Final answer: 7", " 8. Final answer: 8")
    assert inner.chosen_terminal and inner.rejected_terminal and inner.depth == 2
    assert inner.key == ("s", "q1", "c1") and inner.strategy == "bavt" and inner.messages == tuple(MESSAGES)


def test_search_values_pair_every_expanded_node() -> None:
    pairs = extract_pairs([line()], min_margin=0.0, max_pairs_per_node=None, value="search")
    assert summary(pairs) == {(0, 1, 3, 0.6), (0, 2, 3, 0.4), (0, 1, 2, 0.2), (1, 4, 5, 0.6)}
    # ordered by node, largest margin first
    assert [(p.parent_id, p.chosen_id, p.rejected_id) for p in pairs] == [(0, 1, 3), (0, 2, 3), (0, 1, 2), (1, 4, 5)]


def test_forced_answer_counts_as_an_outcome() -> None:
    nodes = [node(0, None, "", 0.5, children=(1, 2)), node(1, 0, "Adding", 0.5, children=()),
             node(2, 0, "So", 0.5, children=(3,)), node(3, 2, " 9. Final answer: 9", 0.5, terminal=True)]
    forced = {"node": 1, "text": "7", "answer": "7", "called": True, "tokens": 2}
    pairs = extract_pairs([line(nodes, forced=forced)], min_margin=0.0)
    assert summary(pairs) == {(0, 1, 2, 1.0)}


@pytest.mark.parametrize("kw, expected, dropped", [
    ({"min_margin": 0.0, "max_pairs_per_node": None}, {(0, 1, 3, 0.6), (0, 2, 3, 0.4), (0, 1, 2, 0.2), (1, 4, 5, 0.6)},
     {"margin": 0, "cap": 0}),
    ({"min_margin": 0.3, "max_pairs_per_node": None}, {(0, 1, 3, 0.6), (0, 2, 3, 0.4), (1, 4, 5, 0.6)},
     {"margin": 1, "cap": 0}),
    ({"min_margin": 0.5, "max_pairs_per_node": None}, {(0, 1, 3, 0.6), (1, 4, 5, 0.6)}, {"margin": 2, "cap": 0}),
    ({"min_margin": 0.0, "max_pairs_per_node": 1}, {(0, 1, 3, 0.6), (1, 4, 5, 0.6)}, {"margin": 0, "cap": 2}),
    ({"min_margin": 0.0, "max_pairs_per_node": 2}, {(0, 1, 3, 0.6), (0, 2, 3, 0.4), (1, 4, 5, 0.6)},
     {"margin": 0, "cap": 1}),
])
def test_filters(kw: dict[str, Any], expected: set[Any], dropped: dict[str, int]) -> None:
    pairs, stats = collect_pairs([line()], value="search", **kw)
    assert summary(pairs) == expected
    assert (stats.dropped_margin, stats.dropped_cap, stats.considered, stats.kept) == (
        dropped["margin"], dropped["cap"], 4, len(expected))


def test_dedup_drops_repeated_texts_and_identical_steps() -> None:
    twice = [line(config_id="c1"), line(config_id="c2")]  # the same tree under two configurations
    pairs, stats = collect_pairs(twice, min_margin=0.0, max_pairs_per_node=None, value="search")
    assert len(pairs) == 4 and stats.dropped_dedup == 4 and {p.key[2] for p in pairs} == {"c1"}
    pairs, stats = collect_pairs(twice, min_margin=0.0, max_pairs_per_node=None, value="search", dedup=False)
    assert len(pairs) == 8 and stats.dropped_dedup == 0
    same = tree_nodes()
    same[5]["step"] = same[4]["step"]  # two samples of an identical step with different values
    pairs, stats = collect_pairs([line(same)], min_margin=0.0, max_pairs_per_node=None, value="search")
    assert (1, 4, 5, 0.6) not in summary(pairs) and stats.dropped_dedup == 1
    # a capped pair does not block the same texts in a later tree
    pairs, _ = collect_pairs([line(item_id="q1"), line(item_id="q2")], max_pairs_per_node=1, value="search")
    assert len(pairs) == 4


def test_different_items_are_not_duplicates() -> None:
    pairs = extract_pairs([line(item_id="q1"), line(item_id="q2")], min_margin=0.0)
    assert len(pairs) == 4


def test_records_without_a_tree_and_errors_are_skipped() -> None:
    sample = {"suite": "s", "item_id": "q9", "config_id": "c9", "strategy": "majority", "trace": [{"samples": []}]}
    failed = {**line(item_id="q8"), "error": "boom"}
    pairs, stats = collect_pairs([sample, failed, line()], min_margin=0.0)
    assert stats.records == 3 and stats.trees == 1 and len(pairs) == 2


@pytest.mark.parametrize("traces, kw, message", [
    ([], {}, "got 0 records without a tree"),
    ([{"suite": "s", "item_id": f"q{i}", "config_id": "c", "strategy": "majority", "trace": [{"samples": []}]}
      for i in range(3)], {}, "got 3 records of strategy majority without a tree; run a tree strategy (bavt, beam, rebase, hyper)"),
    ([line([{k: v for k, v in n.items() if k != "value"} for n in tree_nodes()])], {},
     "`traces` must hold tree nodes with values"),
    ([line([])], {}, "`traces` must hold tree nodes with values"),
    ([line()], {"min_margin": 1.0, "value": "search"}, "4 sibling pairs considered, 4 dropped by margin"),
    ([line(gold="99")], {"min_margin": 0.1}, "2 sibling pairs considered, 2 dropped by margin"),  # every answer wrong
    ([line()], {"min_margin": -0.1}, "`min_margin` must be >= 0"),
    ([line()], {"max_pairs_per_node": 0}, "`max_pairs_per_node` must be >= 1"),
])
def test_bad_input(traces: list[dict[str, Any]], kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        extract_pairs(traces, **kw)
    assert message in str(err.value)
    if "dropped by margin" in message:
        assert "lower `min_margin`" in str(err.value) and "7 nodes" in str(err.value)


def test_rows_render_the_chat_prompt_and_round_trip(tmp_path: Path) -> None:
    from budgetlm.training.preferences import load_tokenizer

    tok = load_tokenizer("default")
    pairs = extract_pairs([line()], min_margin=0.0, messages={"q1": MESSAGES})
    rows = pair_rows(pairs, tok)
    head = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    inner = next(r for r in rows if r["parent_id"] == 1)
    assert inner["prompt"] == head + "3 + 4 is" and inner["chosen"] == " 7. Final answer: 7"
    assert inner["margin"] == 1.0 and inner["key"] == ["s", "q1", "c1"] and inner["messages"] == MESSAGES
    path = write_pairs(rows, tmp_path / "pairs.jsonl")
    assert read_pairs(path) == json.loads(json.dumps(rows))
    assert render_prompt(None, MESSAGES, "x").endswith("assistant: x")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p"}\n')
    with pytest.raises(ConfigError, match="`pairs` must hold rows with text prompt, chosen and rejected"):
        read_pairs(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("params, message", [
    ({"strategy": {"name": "majority"}}, "`strategy` must be {name: one of bavt, beam, rebase, hyper"),
    ({"strategy": {"name": "bavt", "params": {"widht": 3}}}, "widht"),
    ({"beta": 0}, "`beta` must be > 0"),
    ({"min_margin": 2}, "`min_margin` must be <= 1"),
    ({"iterations": 0}, "`iterations` must be >= 1"),
    ({"max_pairs_per_node": 0}, "`max_pairs_per_node` must be >= 1"),
    ({"budget": {}}, "`budget` must set at least one limit"),
    ({"search_run": "/nonexistent/run"}, "`search_run` must be an evaluation run folder with traces.jsonl"),
    ({"nope": 1}, "nope"),
])
def test_recipe_params_are_validated(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RECIPES.get("dpo")(params)
    assert message in " ".join(str(err.value).split())


def test_recipe_search_eval_and_dpo_config(tmp_path: Path) -> None:
    from budgetlm.training.evaluate import eval_config

    suite = "reasoning_gym:chain_sum?size=20&seed=1&split=calibration&test_size=10"
    recipe = DpoRecipe({"strategy": {"name": "beam", "params": {"beams": 2}}, "budget": {"output_tokens": 100},
                        "search_limit": 5, "beta": 0.2, "dpo": {"loss_type": ["ipo"]}})
    scfg = recipe.search_config(suite, "hf:default", 3)
    assert [s.name for s in scfg.strategies] == ["beam"] and scfg.limit == 5 and scfg.seed == 3
    assert recipe.search_model("default") in ("vllm:default", "hf:default")
    cfg = TrainConfig(recipe="dpo", suite=suite, max_steps=3, device="cpu", recipe_params=recipe.params.model_dump(),
                      eval={"backend": "hf", "limit": 4})
    ecfg, roles = eval_config(cfg, recipe, tmp_path / "model")
    assert ecfg.suites[0]["split"] == "test" and ecfg.suites[0]["size"] == 10  # a split the pairs never came from
    assert [s.label for s in ecfg.strategies] == ["greedy"] and set(roles.values()) == {"base", "trained"}
    args = build_dpo_config(cfg, recipe.params, tmp_path / "ckpt", {"device": "cpu", "fp16": False})
    assert (args.beta, args.loss_type, args.max_steps, args.use_cpu) == (0.2, ["ipo"], 3, True)
    bad = DpoRecipe({"dpo": {"betta": 1}})
    with pytest.raises(ConfigError, match=r"`dpo` must hold trl.DPOConfig fields, got unknown 'betta' \(did you mean beta"):
        build_dpo_config(cfg, bad.params, tmp_path / "ckpt", {"device": "cpu", "fp16": False})


def test_only_steps_that_end_the_reply_get_the_end_token() -> None:
    import datasets

    from budgetlm.training.dpo import _step_trainer
    from budgetlm.training.preferences import load_tokenizer

    tok = load_tokenizer("default")
    head = render_prompt(tok, MESSAGES, "3 + 4 is")
    ds = datasets.Dataset.from_list([
        {"prompt": head, "chosen": " 7.", "rejected": " 8.", "chosen_terminal": True, "rejected_terminal": False}])
    args = type("Args", (), {"max_length": None, "truncation_mode": "keep_start"})()
    [row] = _step_trainer()._prepare_dataset(None, ds, tok, args, "train")
    assert row["prompt_ids"] == tok(text=head)["input_ids"]
    assert row["chosen_ids"] == tok(text=" 7.")["input_ids"] + [tok.eos_token_id]
    assert row["rejected_ids"] == tok(text=" 8.")["input_ids"]
    short = type("Args", (), {"max_length": 4, "truncation_mode": "keep_start"})()  # the prompt alone fills it
    assert len(_step_trainer()._prepare_dataset(None, ds, tok, short, "train")) == 0
