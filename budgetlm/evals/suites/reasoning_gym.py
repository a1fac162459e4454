"""Procedural reasoning-gym tasks as suites: ``reasoning_gym:chain_sum?min_digits=1&max_digits=1&size=200``.

:class:`ReasoningGymSuite` draws ``size`` items of one reasoning-gym task (``create_dataset(task,
size=, seed=, **difficulty)``) and grades with the task's own verifier (``score_answer(answer,
entry)``) on the extracted answer.  Items are a pure function of (task, size, seed, split,
difficulty).  Two splits:

- ``test`` uses ``seed`` itself, so ``seed=1`` gives the same problems as reasoning-gym's
  ``create_dataset(task, seed=1)``;
- ``calibration`` (for tuning strategies) uses a seed derived far away from ``seed`` (reasoning-gym
  seeds item ``i`` with ``seed + i``, so nearby seeds would share items) and drops any problem whose
  question also appears among the first ``test_size`` test problems (default: ``size``), so tuning
  never sees test items.  Tasks with few distinct problems may then give fewer than ``size`` items.

Item ids are ``f"{task}-{split}-{seed}-{index}"`` with ``index`` the item's index in its split's
reasoning-gym dataset.  List the tasks with :func:`tasks`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Literal

from budgetlm.errors import ConfigError, MissingDependency, invalid
from budgetlm.evals import graders as _graders  # module import: graders imports suites.base (a cycle)
from budgetlm.evals.suites.base import DEFAULT_PROMPT, EvalItem, Grade, Suite, render_prompt

if TYPE_CHECKING:
    from reasoning_gym.dataset import ProceduralDataset

__all__ = ["CALIBRATION_SEED_OFFSET", "DEFAULT_PROMPT", "ReasoningGymSuite", "tasks"]

Split = Literal["test", "calibration"]
SPLITS: tuple[str, ...] = ("test", "calibration")

CALIBRATION_SEED_OFFSET = 1_000_000_007
"""The calibration split's seed is ``(seed + CALIBRATION_SEED_OFFSET) % 2**31``."""

_RESERVED = ("seed", "size")


def _registry() -> dict[str, tuple[type, type]]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:
        raise MissingDependency("reasoning-gym", "reasoning_gym suites", extra="eval") from exc
    registry: dict[str, tuple[type, type]] = DATASETS
    return registry


def tasks() -> list[str]:
    """The names of all reasoning-gym tasks installed."""
    return sorted(_registry())


def _config_fields(config_cls: type) -> list[str]:
    if dataclasses.is_dataclass(config_cls):
        return [f.name for f in dataclasses.fields(config_cls)]
    import inspect

    return [p for p in inspect.signature(config_cls).parameters if p not in ("self", "args", "kwargs")]


class ReasoningGymSuite(Suite):
    """``size`` problems of the reasoning-gym task ``task`` at the given difficulty (config keyword arguments)."""

    def __init__(
        self,
        task: str,
        size: int = 100,
        seed: int = 1,
        split: Split = "test",
        prompt: str = DEFAULT_PROMPT,
        test_size: int | None = None,
        **difficulty: Any,
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise invalid("size", "a positive integer", size)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise invalid("seed", "a non-negative integer", seed)
        if split not in SPLITS:
            raise invalid("split", f"one of {', '.join(SPLITS)}", split)
        if test_size is not None and (not isinstance(test_size, int) or test_size < 0):
            raise invalid("test_size", "a non-negative integer (test items the calibration split avoids)", test_size)
        if not isinstance(prompt, str) or "{question}" not in prompt:
            raise invalid("prompt", "a template containing {question}", prompt)
        registry = _registry()
        if task not in registry:
            close = difflib.get_close_matches(str(task), list(registry), n=5, cutoff=0.5)
            hint = f"did you mean: {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"unknown reasoning-gym task {task!r}; {hint}list all {len(registry)} tasks with "
                "`budgetlm.evals.suites.reasoning_gym.tasks()`"
            )
        fields = _config_fields(registry[task][1])
        bad = [k for k in difficulty if k not in fields or k in _RESERVED]
        if bad:
            valid = ", ".join(f for f in fields if f not in _RESERVED)
            raise ConfigError(
                f"unknown difficulty option(s) {', '.join(map(repr, bad))} for reasoning-gym task {task!r}; "
                f"valid options: {valid}"
            )
        self.task = task
        self.size = size
        self.seed = seed
        self.split: Split = split
        self.prompt = prompt
        self.test_size = size if test_size is None else test_size
        self.difficulty = dict(difficulty)
        self.name = f"reasoning_gym:{task}"
        self._items: list[EvalItem] | None = None
        split_seed = seed if split == "test" else (seed + CALIBRATION_SEED_OFFSET) % 2**31
        n = size if split == "test" else size + max(size, 64)  # spare candidates replace dropped duplicates
        self._dataset = self._make(split_seed, n)
        self._grader = _graders.ReasoningGymGrader(dataset=self._dataset)

    def _make(self, seed: int, size: int) -> ProceduralDataset:
        from reasoning_gym import create_dataset

        try:
            return create_dataset(self.task, seed=seed, size=size, **self.difficulty)
        except (AssertionError, ValueError, TypeError) as exc:
            msg = str(exc) or type(exc).__name__
            raise ConfigError(
                f"invalid difficulty {self.difficulty!r} for reasoning-gym task {self.task!r}: {msg}; "
                "fix the options (see the task's config class in reasoning_gym)"
            ) from None

    def _entry(self, dataset: ProceduralDataset, index: int) -> dict[str, object]:
        try:
            entry: dict[str, object] = dataset[index]
            return entry
        except (AssertionError, ValueError) as exc:  # some generators validate lazily
            raise ConfigError(
                f"reasoning-gym task {self.task!r} could not generate item {index} with {self.difficulty!r}: {exc}"
            ) from None

    def _build(self) -> list[EvalItem]:
        if self.split == "test":
            picks = [(i, self._entry(self._dataset, i)) for i in range(self.size)]
        else:
            test = self._make(self.seed, max(self.test_size, 1))
            seen = {self._entry(test, i)["question"] for i in range(self.test_size)}
            picks = []
            for i in range(len(self._dataset)):
                entry = self._entry(self._dataset, i)
                if entry["question"] in seen:
                    continue
                seen.add(entry["question"])  # no duplicates within the split either
                picks.append((i, entry))
                if len(picks) == self.size:
                    break
            if not picks:
                raise ConfigError(
                    f"the calibration split of {self.task!r} is empty: every candidate question is a test question; "
                    "lower `test_size` or raise the difficulty"
                )
        return [self._item(i, entry) for i, entry in picks]

    def _item(self, index: int, entry: dict[str, object]) -> EvalItem:
        question = str(entry["question"])
        content = render_prompt(self.prompt, {"question": question})
        return EvalItem(
            id=f"{self.task}-{self.split}-{self.seed}-{index}",
            messages=[{"role": "user", "content": content}],
            gold=entry.get("answer"),
            question=question,
            metadata={"entry": entry, "task": self.task, "split": self.split, "index": index},
        )

    def items(self) -> list[EvalItem]:
        if self._items is None:
            self._items = self._build()
        return list(self._items)

    def grade(self, item: EvalItem, text: str | None) -> Grade:
        return self._grader.grade(text, item.gold, item.metadata)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.difficulty.items())
        return f"ReasoningGymSuite({self.task!r}, size={self.size}, seed={self.seed}, split={self.split!r}{extra})"
