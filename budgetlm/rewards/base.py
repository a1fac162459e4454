"""The base of budgetlm's GRPO rewards: TRL's reward-function form (ALGORITHMS.md §9).

TRL 1.16's ``GRPOTrainer`` calls every reward function as
``f(prompts=..., completions=..., completion_ids=..., **columns)`` where ``columns`` are the
dataset's other columns (one value per completion), plus ``trainer_state``, ``log_extra``,
``log_metric`` and sometimes ``environments``; it expects ``list[float | None]`` back and logs the
function under its ``__name__``.  :class:`RewardFunction` is that callable: a picklable dataclass
(no lambdas or closures stored) whose ``__name__`` is the instance's :attr:`~RewardFunction.name`,
and which ignores keyword arguments it does not use.

Completions are plain strings or conversational message lists
(``[{"role": "assistant", "content": ...}]``); :func:`completion_text` turns both into text, putting
a parsed ``reasoning_content`` (or ``thinking``) field back between the thinking tags.

Lengths (:meth:`RewardFunction.lengths`) are ``len(completion_ids[i])``, the generated tokens as TRL
counts them.  Outside training the callable also works with ``completion_ids=None``: lengths then
come from :attr:`~RewardFunction.tokenizer` when one is given, else from a whitespace word count, a
tokenizer-free stand-in that is only roughly proportional to tokens.

Group-wise rewards (Kimi, e1, LC-R1; :attr:`RewardFunction.group_wise`) group completions by a
prompt-id column, never by their position in the batch.

**Several processes.**  TRL calls reward functions on each process's share of the generation batch:
its ``RepeatSampler`` lays out each prompt's ``num_generations`` completions next to each other and
every process takes the next ``per_device_train_batch_size × steps_per_generation`` of them, so a group
is split over two processes whenever that share is not a multiple of ``num_generations`` (TRL only
requires the whole generation batch to be one).  A group-wise reward then saw only part of a group.
So under an initialised ``torch.distributed`` group of more than one process, a group-wise reward
gathers every process's completion texts, token ids, prompts and columns
(:func:`budgetlm.distributed.all_gather`, in rank order — the order of TRL's generation batch),
scores the whole batch, and returns this process's slice.  Every process computes the same values
as one process would on the whole batch (the e1 EMA state too, updated identically everywhere); the
price is that each process scores the whole batch.  The gather is a collective: every process must
call the reward together, as TRL does; with one process nothing is gathered.
"""

from __future__ import annotations

import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypedDict, TypeGuard, TypeVar, runtime_checkable

from budgetlm import distributed
from budgetlm.errors import ConfigError, invalid
from budgetlm.thinking import ThinkingFormat, ThinkingSplit, split_thinking

__all__ = [
    "RewardBatch", "RewardFunction", "completion_text", "count_tokens", "flag", "group_indices", "number_column",
    "positive", "positive_int",
]


T = TypeVar("T")


@runtime_checkable
class Encoder(Protocol):
    """A tokenizer with ``encode`` (transformers' tokenizers): ``encode(text, add_special_tokens=False)`` gives ids."""

    def encode(self, text: str, /, add_special_tokens: bool = ...) -> Sized: ...


Tokenizer = Encoder | Callable[[str], Sized]
"""What counts tokens: an :class:`Encoder`, or a callable giving the ids of a text."""


class Column(Protocol):
    """A list-like of per-completion values (a list, tuple or numpy array)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> object: ...
    def __iter__(self) -> Iterator[object]: ...


class SharedBatch(TypedDict):
    """What :meth:`RewardBatch.share` sends to the other processes."""

    n: int
    texts: list[str] | None
    completion_ids: list[list[int]] | None
    prompts: list[object] | None
    columns: dict[str, object]


def _content_text(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(str(p.get("text", "")) if isinstance(p, Mapping) else str(p) for p in content)
    return str(content)


def _message_text(msg: Mapping[str, object], fmt: ThinkingFormat) -> str:
    text = _content_text(msg.get("content"))
    reasoning = msg.get("reasoning_content") or msg.get("thinking")
    if reasoning and fmt.enabled:
        text = f"{fmt.start}{_content_text(reasoning)}{fmt.end}{text}"
    return text


def completion_text(completion: object, fmt: ThinkingFormat = ThinkingFormat()) -> str:
    """The text of one completion: a string as is; of messages, the assistant messages joined by newlines.

    A message's ``reasoning_content`` or ``thinking`` field (what transformers' response parsers
    fill) is put back as ``{start}reasoning{end}`` before its content, so thinking splits the same
    way for plain and parsed completions.  Messages without a role count as assistant messages.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _message_text(completion, fmt)
    if isinstance(completion, Sequence):
        parts = [_message_text(m, fmt) for m in completion
                 if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant"]
        return "\n".join(parts)
    raise invalid("completions", "strings or lists of chat messages", type(completion).__name__)


def count_tokens(text: str, tokenizer: Tokenizer | None = None) -> int:
    """Tokens in ``text``: with ``tokenizer`` (``encode`` without special tokens, or a callable giving ids);
    without one, whitespace-separated words.

    Words, not :func:`budgetlm.costs.estimate_tokens`: this is a *length measure* that reward values are
    defined on (and reproducible with), not a reservation, so it need not over-count; the recipes always pass
    the policy's tokenizer or TRL's completion ids.
    """
    if tokenizer is None:
        return len(text.split())
    if isinstance(tokenizer, Encoder):
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return len(tokenizer.encode(text))
    return len(tokenizer(text))


def group_indices(ids: Sequence[object], column: str = "prompt_id") -> dict[Hashable, list[int]]:
    """Row indices per prompt id, in first-seen order (``column`` names the ids in errors)."""
    groups: dict[Hashable, list[int]] = {}
    for i, pid in enumerate(ids):
        try:
            groups.setdefault(pid, []).append(i)
        except TypeError:
            raise ConfigError(f"`{column}` must hold hashable ids (str or int), got {pid!r} at row {i}; "
                              f"store one string or integer id per prompt") from None
    return groups


def _maybe_json(value: object) -> object:
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _is_column(values: object) -> TypeGuard[Column]:
    """A list-like of per-completion values (lists, tuples, numpy arrays), not a string or mapping."""
    return (hasattr(values, "__len__") and hasattr(values, "__getitem__")
            and not isinstance(values, str | bytes | Mapping))


def _column(values: object, name: str) -> Column:
    """``values`` when they are a column (:func:`_is_column`); an error naming column ``name`` otherwise."""
    if not _is_column(values):
        raise invalid(name, "a column (one value per completion)", values)
    return values


_NOT_COLUMNS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})


class RewardBatch:
    """One call's completions, token ids and dataset columns, with checked column access."""

    def __init__(self, completions: Sequence[object] | None, completion_ids: Sequence[Sequence[int]] | None,
                 columns: Mapping[str, object], fmt: ThinkingFormat, prompts: Sequence[object] | None = None) -> None:
        self.texts: list[str] | None = None if completions is None else [completion_text(c, fmt) for c in completions]
        """Completion texts (``None`` when no completions were passed)."""
        self.completion_ids = completion_ids
        """Generated token ids per completion, or ``None``."""
        self.columns = {k: v for k, v in columns.items() if k not in _NOT_COLUMNS}
        """Dataset columns (TRL's extra kwargs removed)."""
        self.prompts = prompts
        """The prompts, unused by most rewards."""
        self.n: int | None = None if self.texts is None else len(self.texts)
        """Number of completions (set by the first column read when no completions were passed)."""
        if completion_ids is not None:
            self._check_len("completion_ids", len(completion_ids))

    def _check_len(self, name: str, n: int) -> None:
        if self.n is None:
            self.n = n
        elif n != self.n:
            raise ConfigError(f"`{name}` must have one value per completion ({self.n}), got {n} values; "
                              f"pass columns of the same length as `completions`")

    def require_texts(self) -> list[str]:
        """The completion texts; an error when none were passed."""
        if self.texts is None:
            raise invalid("completions", "a list of completions (strings or message lists)", None,
                          "pass completions=[...]")
        return self.texts

    def column(self, name: str, fix: str | None = None) -> list[object]:
        """Column ``name`` as a list of one value per completion; missing or mis-sized columns raise."""
        if name not in self.columns:
            have = ", ".join(sorted(self.columns)) or "(none)"
            raise ConfigError(f"`{name}` must be a dataset column passed to the reward, got no such column "
                              f"(columns: {have}); {fix or f'add a `{name}` column to the dataset or set the column name'}")
        values = self.columns[name]
        if not _is_column(values):
            raise invalid(name, "a column (one value per completion)", values)
        self._check_len(name, len(values))
        return list(values)

    def share(self) -> SharedBatch:
        """What another process needs to rebuild this batch (:meth:`join`): texts, ids, prompts, columns."""
        n = self.n or 0
        return {"n": n, "texts": self.texts,
                "completion_ids": None if self.completion_ids is None else [list(ids) for ids in self.completion_ids],
                "prompts": None if self.prompts is None else list(self.prompts),
                "columns": {k: list(v) if _is_column(v) else v for k, v in self.columns.items()}}

    @classmethod
    def join(cls, parts: Sequence[SharedBatch], fmt: ThinkingFormat) -> RewardBatch:
        """One batch of the :meth:`share` parts, in order; a column (or texts, ids, prompts) missing in any
        part is left out, and non-column values are taken from the first part."""
        def cat(vals: Sequence[Sequence[T] | None]) -> list[T] | None:
            return None if any(v is None for v in vals) else [x for v in vals if v is not None for x in v]

        columns: dict[str, object] = {}
        for k, v in parts[0]["columns"].items():
            if not all(k in p["columns"] for p in parts):
                continue
            columns[k] = [x for p in parts for x in _column(p["columns"][k], k)] if _is_column(v) else v
        return cls(cat([p["texts"] for p in parts]), cat([p["completion_ids"] for p in parts]), columns, fmt,
                   cat([p["prompts"] for p in parts]))

    def has(self, name: str) -> bool:
        """Whether column ``name`` was passed."""
        return name in self.columns

    def row(self, i: int) -> dict[str, object]:
        """Row ``i`` of every list-valued column, JSON strings of objects decoded (reasoning-gym entries)."""
        out: dict[str, object] = {}
        for k, v in self.columns.items():
            if _is_column(v) and len(v) == self.n:
                out[k] = _maybe_json(v[i])
        return out


def number_column(batch: RewardBatch, name: str, *, positive: bool = False, fix: str | None = None) -> list[float]:
    """Column ``name`` as floats; non-numbers (and, with ``positive``, values ≤ 0) raise naming the row."""
    out = []
    for i, v in enumerate(batch.column(name, fix)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or (positive and v <= 0):
            raise ConfigError(f"`{name}` must hold {'positive ' if positive else ''}finite numbers, got {v!r} at "
                              f"row {i}; {fix or f'fix the `{name}` column of the dataset'}")
        out.append(float(v))
    return out


@dataclass(eq=False, kw_only=True)
class RewardFunction(ABC):
    """A reward in TRL's form: ``reward(prompts=, completions=, completion_ids=, **columns) -> list[float | None]``."""

    default_name: ClassVar[str] = "reward"
    group_wise: ClassVar[bool] = False
    """Scores depend on the other completions of the same prompt: with several processes the batch is gathered."""

    thinking: ThinkingFormat = field(default_factory=ThinkingFormat)
    """How thinking is marked (default ``<think>``/``</think>``)."""
    tokenizer: Tokenizer | None = field(default=None, repr=False)
    """Counts tokens when ``completion_ids`` is None (and thinking tokens exactly); None: whitespace words."""
    name: str = ""
    """Name TRL logs the reward under (``__name__``); empty: the class's registry name."""

    def __post_init__(self) -> None:
        if not isinstance(self.thinking, ThinkingFormat):
            raise invalid("thinking", "a ThinkingFormat", self.thinking)
        if not self.name:
            self.name = self.default_name
        self.__name__ = self.name

    def __call__(self, prompts: Sequence[object] | None = None, completions: Sequence[object] | None = None,
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: object) -> list[float | None]:
        batch = RewardBatch(completions, completion_ids, kwargs, self.thinking, prompts)
        if self.group_wise and distributed.world_size() > 1:
            return self._score_whole_groups(batch)
        return self.score(batch)

    def _score_whole_groups(self, batch: RewardBatch) -> list[float | None]:
        """Score the batch of every process (gathered in rank order) and return this process's slice."""
        parts = distributed.all_gather(batch.share())
        start = sum(p["n"] for p in parts[:distributed.rank()])
        scores = self.score(RewardBatch.join(parts, self.thinking))
        return scores[start:start + (batch.n or 0)]

    @abstractmethod
    def score(self, batch: RewardBatch) -> list[float | None]:
        """One reward per completion of ``batch``."""

    # -- helpers shared by the reward families ------------------------------------------------

    def split(self, text: str) -> ThinkingSplit:
        """``text`` split into thinking and answer with :attr:`thinking`."""
        return split_thinking(text, self.thinking)

    def lengths(self, batch: RewardBatch) -> list[int]:
        """Generated tokens per completion: ``len(completion_ids[i])``; without ids, counted on the text
        with :attr:`tokenizer`, else whitespace words."""
        if batch.completion_ids is not None:
            return [len(ids) for ids in batch.completion_ids]
        return [count_tokens(t, self.tokenizer) for t in batch.require_texts()]

    def thinking_lengths(self, batch: RewardBatch) -> list[int]:
        """Tokens inside thinking (tags excluded) per completion; 0 without a thinking part.

        With :attr:`tokenizer` the thinking text is tokenized (exact up to tokenization at the tag
        boundaries).  Without one but with ``completion_ids``, an approximation:
        ``round(len(completion_ids[i]) · chars(thinking) / chars(completion))``.  With neither,
        whitespace words of the thinking.
        """
        out = []
        texts = batch.require_texts()
        for i, text in enumerate(texts):
            sp = self.split(text)
            if not sp.has_thinking or not sp.thinking:
                out.append(0)
            elif self.tokenizer is not None or batch.completion_ids is None:
                out.append(count_tokens(sp.thinking, self.tokenizer))
            else:
                out.append(round(len(batch.completion_ids[i]) * len(sp.thinking) / max(len(text), 1)))
        return out

    def groups(self, batch: RewardBatch, column: str) -> dict[Hashable, list[int]]:
        """Row indices per prompt id from ``column``; a missing column says how to add one."""
        fix = (f"add a `{column}` column to the dataset (one id per prompt, shared by its completions, e.g. "
               f"`dataset.map(lambda r, i: {{'{column}': i}}, with_indices=True)`) or set prompt_id_column")
        return group_indices(batch.column(column, fix), column)


def positive(param: str, value: object, what: str = "a positive number") -> float:
    """``value`` as a float; an error naming ``param`` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise invalid(param, what, value)
    return float(value)


def positive_int(param: str, value: object, what: str = "a positive integer (tokens)") -> int:
    """``value`` unless it is not an integer ≥ 1 (an error naming ``param``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(param, what, value)
    return value


def flag(column: str, value: object, row: int) -> bool:
    """A success flag: a bool or 0/1; anything else raises naming the column and row."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"`{column}` must hold booleans (or 0/1), got {value!r} at row {row}; "
                      f"store whether each trajectory succeeded")
