"""Suites: reasoning-gym splits and grading, JSONL/CSV/dataset suites and their errors, spec parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import reasoning_gym  # noqa: F401,E402

from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.evals import suites
from budgetlm.evals.suites import CsvSuite, DatasetSuite, JsonlSuite, ReasoningGymSuite, from_dataset, parse_spec

EASY = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)


def _rg(**kw: object) -> ReasoningGymSuite:
    return ReasoningGymSuite("chain_sum", **{"size": 20, "seed": 1, **EASY, **kw})  # type: ignore[arg-type]


# ---------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_is_deterministic() -> None:
    a, b = _rg().items(), _rg().items()
    assert [(i.id, i.question, i.gold, i.messages) for i in a] == [(i.id, i.question, i.gold, i.messages) for i in b]
    assert len(a) == 20
    assert a[0].id == "chain_sum-test-1-0" and a[19].id == "chain_sum-test-1-19"
    assert a[0].messages[-1]["content"].startswith(a[0].question)
    assert "Answer:" in a[0].messages[-1]["content"]
    assert [i.question for i in _rg(seed=2).items()] != [i.question for i in a]  # the seed matters


def test_reasoning_gym_test_split_matches_reasoning_gym_seed() -> None:

    ds = reasoning_gym.create_dataset("chain_sum", size=20, seed=1, **EASY)
    assert [i.question for i in _rg().items()] == [ds[k]["question"] for k in range(20)]


def test_reasoning_gym_splits_are_disjoint() -> None:
    test = _rg(size=60).items()
    cal = _rg(size=30, split="calibration", test_size=60).items()
    assert len(cal) == 30
    assert not {i.question for i in test} & {i.question for i in cal}
    assert not {i.id for i in test} & {i.id for i in cal}
    assert all(i.id.startswith("chain_sum-calibration-1-") for i in cal)
    assert len({i.question for i in cal}) == len(cal)  # no duplicates inside the split either


def test_reasoning_gym_grades_with_the_task_verifier() -> None:
    suite = _rg(size=5)
    for item in suite.items():
        good = suite.grade(item, f"Let me add.\nAnswer: {item.gold}")
        assert good.correct and good.score == 1.0 and good.answer == item.gold
        bad = suite.grade(item, f"Answer: {int(item.gold) + 1}")
        assert not bad.correct and bad.score == 0.0
        assert suite.grade(item, None).answer is None  # truncated thinking: no answer


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"task": "chain_sums"}, "unknown reasoning-gym task 'chain_sums'.*chain_sum.*tasks\\(\\)"),  # close names
        ({"task": "chain_sum", "bogus": 1}, "'bogus'.*valid options: .*min_digits"),  # unknown config key
        ({"task": "chain_sum", "min_digits": 3, "max_digits": 1}, "max_digits must be >= min_digits"),  # invalid
        ({"task": "chain_sum", "split": "train"}, "`split` must be one of test, calibration"),  # bad split
        ({"task": "chain_sum", "size": 0}, "`size` must be a positive integer"),  # bad size
    ],
)
def test_reasoning_gym_bad_config(kw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ReasoningGymSuite(**kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- files


_ROWS_WITHOUT_ANSWER = [{"question": "q", "answer": 1}, {"question": "q", "sol": 2}]


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_with_custom_fields(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "math.jsonl", [
        {"uid": "a", "problem": "What is 1/2 as a decimal?", "solution": "It is \\boxed{0.5}."},
        {"uid": "b", "problem": "What is 2+2?", "solution": "\\boxed{4}"},
    ])
    suite = JsonlSuite(p, question_field="problem", answer_field="solution", id_field="uid",
                       prompt="Solve: {problem}\nPut the answer in \\boxed{}.")
    items = suite.items()
    assert [i.id for i in items] == ["a", "b"]
    content = "Solve: What is 1/2 as a decimal?\nPut the answer in \\boxed{}."
    assert items[0].messages == [{"role": "user", "content": content}]
    assert items[0].metadata["uid"] == "a"
    assert suite.grade(items[0], "so \\boxed{\\frac{1}{2}}").correct  # math grader on the boxed gold
    assert not suite.grade(items[1], "so \\boxed{5}").correct
    assert JsonlSuite(p, question_field="problem", answer_field="solution", limit=1).items()[0].id == "math-0"


def test_jsonl_messages_field(tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    p = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs, "answer": "5"}])
    item = JsonlSuite(p, messages_field="messages", grader="numeric").items()[0]
    assert item.messages == msgs and item.question == "2+3?"


def test_csv_with_custom_fields(tmp_path: Path) -> None:
    p = tmp_path / "qa.csv"
    p.write_text('id,q,a\nx1,"Capital of France, please?",Paris\nx2,What is 6*7?,42\n', encoding="utf-8")
    suite = CsvSuite(p, question_field="q", answer_field="a", id_field="id", grader="normalized")
    items = suite.items()
    assert [i.id for i in items] == ["x1", "x2"]
    assert items[0].question == "Capital of France, please?"
    assert suite.grade(items[0], "Answer: paris").correct
    assert suite.grade(items[1], "6*7 = 42").correct
    assert not suite.grade(items[1], "Answer: 41").correct


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    p = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "1"}, "", '{"question": "q2", "answer": '])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: malformed JSON"):
        JsonlSuite(p)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        # JSONL row without the answer field: names the field, file:line and the available fields
        (lambda d: JsonlSuite(_write_jsonl(d / "f.jsonl", _ROWS_WITHOUT_ANSWER)),
         r"f\.jsonl:2: the row has no field 'answer'; available fields: question, sol"),
        # CSV header without the question field
        (lambda d: CsvSuite(_csv(d / "f.csv", "prompt,answer\nhi,1\n")),
         r"f\.csv:2: the row has no field 'question'; available fields: prompt, answer"),
        # dataset rows name the row
        (lambda d: DatasetSuite([{"question": "q"}], name="mine"), r"mine row 0: the row has no field 'answer'"),
    ],
)
def test_missing_field(tmp_path: Path, make: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(tmp_path)  # type: ignore[operator]


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: JsonlSuite(_write_jsonl(d / "empty.jsonl", ["", "  "])), "suite is empty"),  # blank JSONL
        (lambda d: CsvSuite(_csv(d / "empty.csv", "question,answer\n")), "suite is empty"),  # header only
        (lambda d: DatasetSuite([]), "suite is empty"),  # no rows
        (lambda d: JsonlSuite(d / "nope.jsonl"), r"nope\.jsonl' does not exist"),  # missing file
        (lambda d: CsvSuite(d), "is a directory"),  # a directory
    ],
)
def test_empty_and_missing(tmp_path: Path, make: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(tmp_path)  # type: ignore[operator]


def test_duplicate_ids(tmp_path: Path) -> None:
    rows = [{"id": 1, "question": "a", "answer": "1"}, {"id": 1, "question": "b", "answer": "2"}]
    p = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ConfigError, match="duplicate id '1'"):
        JsonlSuite(p, id_field="id")


def test_dataset_suite_from_hf_dataset() -> None:
    import datasets
    ds = datasets.Dataset.from_list([{"problem": "1+1?", "ans": "2"}, {"problem": "2+2?", "ans": "4"}])
    suite = from_dataset(ds, question_field="problem", answer_field="ans", grader="numeric", name="tiny")
    assert isinstance(suite, DatasetSuite)
    items = suite.items()
    assert [i.id for i in items] == ["tiny-0", "tiny-1"] and items[1].gold == "4"
    assert suite.grade(items[1], "Answer: 4.0").correct
    with pytest.raises(ConfigError, match="pick a split"):
        DatasetSuite(datasets.DatasetDict({"test": ds}))


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "kind", "params"),
    [
        ("reasoning_gym:chain_sum?min_digits=1&size=200&seed=1", "reasoning_gym",
         {"task": "chain_sum", "min_digits": 1, "size": 200, "seed": 1}),  # ints
        ("reasoning_gym:chain_sum?allow_negation=true&x=0.5&y=none", "reasoning_gym",
         {"task": "chain_sum", "allow_negation": True, "x": 0.5, "y": None}),  # bool, float, None
        ("jsonl:data/m.jsonl?question_field=problem&answer_field=solution&grader=math", "jsonl",
         {"path": "data/m.jsonl", "question_field": "problem", "answer_field": "solution", "grader": "math"}),  # str
        ("humaneval?limit=20", "humaneval", {"limit": 20}),  # no target
        ("humaneval", "humaneval", {}),  # bare kind
    ],
)
def test_parse_spec(spec: str, kind: str, params: dict[str, object]) -> None:
    assert parse_spec(spec) == (kind, params)


def test_get_from_spec_dict_and_overrides(tmp_path: Path) -> None:
    spec = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=5&seed=1"
    a = suites.get(spec)
    b = suites.get({"kind": "reasoning_gym", "task": "chain_sum", **EASY, "size": 5, "seed": 1})
    assert isinstance(a, ReasoningGymSuite)
    assert [i.question for i in a.items()] == [i.question for i in b.items()]
    assert len(suites.get(spec, size=3).items()) == 3  # overrides win
    p = _write_jsonl(tmp_path / "x.jsonl", [{"problem": "1+1?", "solution": "2"}])
    j = suites.get(f"jsonl:{p}?question_field=problem&answer_field=solution&grader=numeric")
    assert isinstance(j, JsonlSuite) and j.grade(j.items()[0], "Answer: 2").correct
    c = _csv(tmp_path / "x.csv", "q,a\n1+1?,2\n")
    assert suites.get(f"csv:{c}?question_field=q&answer_field=a").items()[0].gold == "2"
    assert set(suites.names()) == {"reasoning_gym", "jsonl", "csv", "humaneval", "kb_agent", "reasoning_gym_agent"}


@pytest.mark.parametrize(
    ("spec", "err", "match"),
    [
        ("nosuchkind:x", UnknownNameError, "unknown suite kind 'nosuchkind'; available: csv, humaneval"),  # kind
        ({"kind": "nope"}, UnknownNameError, "available: .*reasoning_gym"),  # dict with unknown kind
        ({"task": "chain_sum"}, ConfigError, "needs a `kind`"),  # dict without kind
        ({"kind": "reasoning_gym"}, ConfigError, "needs 'task'"),  # missing target
        ("humaneval?limit=2&colour=red", ConfigError, "unknown option.*'colour'.*valid options: limit"),  # bad option
        ("humaneval:foo", ConfigError, "takes no ':' part"),  # target on a kind without one
        ("jsonl:", ConfigError, "give the path"),  # empty target
        ("reasoning_gym:chain_sum?size=1&size=2", ConfigError, "given twice"),  # duplicate option
        ("", ConfigError, "spec string"),  # empty
    ],
)
def test_bad_specs(spec: object, err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        suites.get(spec)  # type: ignore[arg-type]
