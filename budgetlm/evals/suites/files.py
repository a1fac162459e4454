"""Suites from your own data: JSONL and CSV files, and Hugging Face datasets (or any rows of dicts).

Each row gives one item: the question (``question_field``, rendered through the ``prompt``
template, where ``{question}`` and any other ``{field}`` of the row are filled in) or ready-made
chat messages (``messages_field``), the gold answer (``answer_field``) and optionally an id
(``id_field``; default ``f"{stem}-{row index}"``).  Answers are graded by a named grader
(:mod:`budgetlm.evals.graders`, default ``math``).  The whole row is kept as the item's metadata.

``jsonl:data/math.jsonl?question_field=problem&answer_field=solution&grader=math`` builds a
:class:`JsonlSuite` from a spec string; errors name the file and line of a bad row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from budgetlm.errors import ConfigError, invalid
from budgetlm.evals import graders as _graders  # module import: graders imports suites.base (a cycle)
from budgetlm.evals.suites.base import DEFAULT_PROMPT, EvalItem, Grade, Suite, render_prompt

__all__ = ["CsvSuite", "DatasetSuite", "JsonlSuite", "RowsSuite"]


class RowsSuite(Suite):
    """Items from rows of dicts; each row comes with a location ("file.jsonl:3", "row 3") for error messages."""

    def __init__(
        self,
        rows: Iterable[tuple[str, object]],
        *,
        source: str,
        stem: str,
        question_field: str = "question",
        answer_field: str = "answer",
        id_field: str | None = None,
        messages_field: str | None = None,
        grader: str | _graders.Grader = "math",
        prompt: str = DEFAULT_PROMPT,
        limit: int | None = None,
    ) -> None:
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise invalid("limit", "a positive integer or None", limit)
        if not isinstance(prompt, str):
            raise invalid("prompt", "a template string containing {question}", prompt)
        self.source = source
        self.question_field = question_field
        self.answer_field = answer_field
        self.id_field = id_field
        self.messages_field = messages_field
        self.prompt = prompt
        self.limit = limit
        self.grader = _graders.get_grader(grader)
        self._items: list[EvalItem] = []
        seen: dict[str, str] = {}
        for index, (where, row) in enumerate(rows):
            if limit is not None and len(self._items) >= limit:
                break
            item = self._item(index, where, row, stem)
            if item.id in seen:
                raise ConfigError(
                    f"{where}: duplicate id {item.id!r} (also at {seen[item.id]}); ids in `{id_field}` must be unique"
                )
            seen[item.id] = where
            self._items.append(item)
        if not self._items:
            raise ConfigError(f"suite is empty: {source} has no rows; add rows or point the suite at another file")

    def _field(self, row: Mapping[str, object], name: str, where: str) -> object:
        if name not in row or row[name] is None:
            available = ", ".join(map(str, row)) or "(none)"
            raise ConfigError(
                f"{where}: the row has no field {name!r}; available fields: {available}; "
                "pass question_field=/answer_field= (or fix the row)"
            )
        return row[name]

    def _messages(self, value: object, where: str) -> list[dict[str, str]]:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not (isinstance(value, list) and value and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )):
            raise ConfigError(
                f"{where}: field {self.messages_field!r} must be a non-empty list of {{role, content}} messages, "
                f"got {str(value)[:80]!r}"
            )
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def _item(self, index: int, where: str, row: object, stem: str) -> EvalItem:
        if not isinstance(row, Mapping):
            raise ConfigError(f"{where}: each row must be an object with named fields, got {type(row).__name__}")
        gold = self._field(row, self.answer_field, where)
        if self.messages_field is not None:
            messages = self._messages(self._field(row, self.messages_field, where), where)
            users = [m["content"] for m in messages if m["role"] == "user"]
            question = str(row.get(self.question_field) or (users[-1] if users else messages[-1]["content"]))
        else:
            question = str(self._field(row, self.question_field, where))
            fields = {str(k): v for k, v in row.items()} | {"question": question}
            messages = [{"role": "user", "content": render_prompt(self.prompt, fields)}]
        item_id = f"{stem}-{index}" if self.id_field is None else str(self._field(row, self.id_field, where))
        return EvalItem(id=item_id, messages=messages, gold=gold, question=question, metadata=dict(row))

    def items(self) -> list[EvalItem]:
        return list(self._items)

    def grade(self, item: EvalItem, text: str | None) -> Grade:
        return self.grader.grade(text, item.gold, item.metadata)


def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(f"suite file {str(p)!r} {what}; check the path (relative paths start at {Path.cwd()})")
    return p


class JsonlSuite(RowsSuite):
    """One item per JSON object line of ``path`` (blank lines are skipped)."""

    def __init__(
        self,
        path: str | Path,
        question_field: str = "question",
        answer_field: str = "answer",
        id_field: str | None = None,
        messages_field: str | None = None,
        grader: str | _graders.Grader = "math",
        prompt: str = DEFAULT_PROMPT,
        limit: int | None = None,
    ) -> None:
        self.path = _existing(path)
        self.name = f"jsonl:{self.path}"
        super().__init__(
            self._rows(), source=str(self.path), stem=self.path.stem, question_field=question_field,
            answer_field=answer_field, id_field=id_field, messages_field=messages_field, grader=grader,
            prompt=prompt, limit=limit,
        )

    def _rows(self) -> Iterable[tuple[str, object]]:
        with self.path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    msg = f"{where}: malformed JSON line ({exc.msg} at column {exc.colno}); fix that line"
                    raise ConfigError(msg) from None


class CsvSuite(RowsSuite):
    """One item per row of a CSV file with a header line (``messages_field`` cells hold JSON)."""

    def __init__(
        self,
        path: str | Path,
        question_field: str = "question",
        answer_field: str = "answer",
        id_field: str | None = None,
        messages_field: str | None = None,
        grader: str | _graders.Grader = "math",
        prompt: str = DEFAULT_PROMPT,
        limit: int | None = None,
        delimiter: str = ",",
    ) -> None:
        self.path = _existing(path)
        self.name = f"csv:{self.path}"
        self.delimiter = delimiter
        super().__init__(
            self._rows(), source=str(self.path), stem=self.path.stem, question_field=question_field,
            answer_field=answer_field, id_field=id_field, messages_field=messages_field, grader=grader,
            prompt=prompt, limit=limit,
        )

    def _rows(self) -> Iterable[tuple[str, object]]:
        with self.path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=self.delimiter)
            try:
                for row in reader:
                    if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                        continue
                    yield f"{self.path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
            except csv.Error as exc:
                raise ConfigError(f"{self.path}:{reader.line_num}: malformed CSV ({exc}); fix that line") from None


class DatasetSuite(RowsSuite):
    """Items from a Hugging Face ``datasets.Dataset`` or any sequence of dicts passed from Python."""

    def __init__(
        self,
        dataset: Iterable[Mapping[str, object]],
        question_field: str = "question",
        answer_field: str = "answer",
        id_field: str | None = None,
        messages_field: str | None = None,
        grader: str | _graders.Grader = "math",
        prompt: str = DEFAULT_PROMPT,
        limit: int | None = None,
        name: str = "dataset",
    ) -> None:
        if isinstance(dataset, str | bytes | Mapping) or not isinstance(dataset, Iterable):
            raise invalid(
                "dataset", "a datasets.Dataset or a sequence of dicts", type(dataset).__name__,
                "for a file use JsonlSuite/CsvSuite; for a DatasetDict pick a split, e.g. ds['test']",
            )
        self.dataset = dataset
        self.name = name
        rows = ((f"{name} row {i}", row) for i, row in enumerate(dataset))
        super().__init__(
            rows, source=name, stem=name, question_field=question_field, answer_field=answer_field,
            id_field=id_field, messages_field=messages_field, grader=grader, prompt=prompt, limit=limit,
        )
