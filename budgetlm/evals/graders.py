"""Graders: turn a model's answer text and a gold answer into a :class:`~budgetlm.evals.suites.base.Grade`.

Every grader takes the answer *text* (thinking removed; ``None`` when thinking was truncated, which
grades as no answer), extracts the final answer with :func:`~budgetlm.answers.extract_answer`
(``\\boxed{…}``, ``<answer>`` tags, an ``Answer:`` line, else the last number) and compares it
with the gold answer:

- ``math``: symbolic equivalence with math-verify (``verify(parse(gold), parse(pred))``, gold
  first); ``\\frac{1}{2}`` equals ``0.5``.  math-verify's timeouts use ``signal.alarm``, which only
  works on the main thread, so off the main thread this grader runs math-verify without its timeouts
  and bounds the work by refusing over-long answers instead.
- ``reasoning_gym``: the reasoning-gym dataset's own ``score_answer(answer, entry)``.
- ``exact``: string equality after stripping whitespace.
- ``normalized``: :func:`~budgetlm.answers.normalize_answer` equality ("7.0" equals "7").
- ``numeric``: numbers within a relative tolerance; accepts "1,234", "3/4", "-0.5", "$5", "50%".

``get_grader("math")`` builds a grader by name; :data:`GRADERS` is the registry.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from budgetlm.answers import extract_answer, normalize_answer
from budgetlm.errors import ConfigError, MissingDependency, invalid
from budgetlm.evals.suites.base import Grade
from budgetlm.registry import Registry

if TYPE_CHECKING:
    from reasoning_gym.dataset import ProceduralDataset

__all__ = [
    "GRADERS", "ExactGrader", "Grader", "MathGrader", "NormalizedGrader", "NumericGrader", "ReasoningGymGrader",
    "get_grader", "gold_answer", "math_equal", "names", "parse_number",
]

NO_ANSWER = Grade(0.0, False, None)
"""The grade of a missing answer (nothing extracted, or thinking truncated)."""


def gold_answer(gold: object) -> str:
    """The final answer inside a gold field: the last ``\\boxed{…}``, the text after ``####``, else all of it.

    Gold fields of math data sets often hold a whole worked solution (MATH's ``solution``,
    GSM8K's ``answer`` ending in ``#### 72``).
    """
    s = str(gold).strip()
    if "\\boxed" in s:
        boxed = extract_answer(s)
        if boxed.source == "boxed" and boxed.text:
            return boxed.text
    if "####" in s:
        tail = s.rsplit("####", 1)[1].strip()
        if tail:
            return tail
    return s


class Grader(ABC):
    """Grades one answer text against a gold answer."""

    name: str = "grader"

    def grade(self, text: str | None, gold: object, metadata: Mapping[str, object] | None = None) -> Grade:
        """Extract the answer from ``text`` and compare it with ``gold`` (``None`` text: no answer)."""
        if text is None:
            return NO_ANSWER
        answer = extract_answer(text).text
        if answer is None:
            return NO_ANSWER
        return self.compare(answer, gold, metadata or {})

    @abstractmethod
    def compare(self, answer: str, gold: object, metadata: Mapping[str, object]) -> Grade:
        """Grade an extracted answer."""

    def __call__(self, text: str | None, gold: object, metadata: Mapping[str, object] | None = None) -> Grade:
        return self.grade(text, gold, metadata)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _verdict(answer: str, ok: bool) -> Grade:
    return Grade(1.0 if ok else 0.0, ok, answer)


class ExactGrader(Grader):
    """String equality after stripping surrounding whitespace."""

    name = "exact"

    def compare(self, answer: str, gold: object, metadata: Mapping[str, object]) -> Grade:
        return _verdict(answer, answer.strip() == str(gold).strip())


class NormalizedGrader(Grader):
    """Equality of :func:`~budgetlm.answers.normalize_answer` forms ("7.0" = "7", "Paris" = " paris.")."""

    name = "normalized"

    def compare(self, answer: str, gold: object, metadata: Mapping[str, object]) -> Grade:
        return _verdict(answer, normalize_answer(answer) == normalize_answer(gold_answer(gold)))


_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_NUM = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")


def parse_number(s: object) -> float | None:
    """A float from "1,234", "3/4", "-0.5", "$5", "50%", "\\frac{3}{4}", "\\$5" (``None`` if not a number)."""
    if isinstance(s, bool) or s is None:
        return None
    if isinstance(s, int | float):
        return float(s)
    t = str(s).strip()
    t = re.sub(r"^\$+|\$+$", "", t).strip()  # math delimiters
    t = re.sub(r"\\text\{[^}]*\}", "", t).replace("\\$", "").replace("\\!", "").replace("\\,", "").strip()
    t = t.lstrip("$").replace(",", "").replace(" ", "")
    percent = t.endswith("%") or t.endswith("\\%")
    t = t.removesuffix("\\%").removesuffix("%")
    if m := _FRAC.match(t):
        t = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            if not (_NUM.match(num) and _NUM.match(den)):
                return None
            value = float(num) / float(den)
        elif _NUM.match(t):
            value = float(t)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    if not math.isfinite(value):
        return None
    return value / 100 if percent else value


class NumericGrader(Grader):
    """Numbers equal within a relative tolerance ``rel_tol`` (and absolute ``abs_tol`` near zero)."""

    name = "numeric"

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> None:
        if not rel_tol >= 0 or not abs_tol >= 0:
            raise invalid("rel_tol/abs_tol", "non-negative numbers", (rel_tol, abs_tol))
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol

    def compare(self, answer: str, gold: object, metadata: Mapping[str, object]) -> Grade:
        a = parse_number(answer)
        g = parse_number(gold if isinstance(gold, int | float) else gold_answer(gold))
        ok = a is not None and g is not None and math.isclose(a, g, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        return _verdict(answer, ok)

    def __repr__(self) -> str:
        return f"NumericGrader(rel_tol={self.rel_tol}, abs_tol={self.abs_tol})"


def _import_math_verify() -> tuple[Callable[..., list[object]], Callable[..., bool]]:
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise MissingDependency("math-verify", "the `math` grader", extra="eval") from exc
    return parse, verify


def _for_math_verify(s: str) -> str:
    """Wrap bare answers in ``\\boxed{}`` so math-verify parses them as LaTeX ("2^{1/2}", "\\frac12")."""
    s = s.strip()
    if "$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s:
        return s
    return "\\boxed{" + s + "}"


def math_equal(gold: str, pred: str, *, timeout_s: int = 5, max_chars: int = 1000) -> bool:
    """Whether ``pred`` is mathematically equal to ``gold`` (math-verify; gold first, as it is asymmetric).

    On the main thread math-verify's signal-based timeouts (``timeout_s`` per parse and comparison)
    apply.  ``signal.alarm`` raises ``ValueError`` elsewhere, so on other threads the timeouts are
    switched off (``parsing_timeout=None``, ``timeout_seconds=None``) and answers longer than
    ``max_chars`` are compared as normalised text only.
    """
    if normalize_answer(gold) == normalize_answer(pred):
        return True
    if len(pred) > max_chars or len(gold) > max_chars:
        return False
    parse, verify = _import_math_verify()
    t: int | None = timeout_s if threading.current_thread() is threading.main_thread() else None
    g = parse(_for_math_verify(gold), parsing_timeout=t)
    p = parse(_for_math_verify(pred), parsing_timeout=t)
    if not g or not p:
        return False
    try:
        return bool(verify(g, p, timeout_seconds=t))
    except Exception:  # math-verify catches its own errors; be safe with exotic sympy failures
        return False


class _DropTimeoutDisabled(logging.Filter):
    """Drop math-verify's one-time "Timeout is disabled" warning: off the main thread we disable it on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in str(record.msg)


_FILTER = _DropTimeoutDisabled()
for _name in ("math_verify.parser", "math_verify.grader"):
    if _FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_FILTER)


class MathGrader(Grader):
    """Symbolic equality with math-verify; safe to call from worker threads (see :func:`math_equal`)."""

    name = "math"

    def __init__(self, timeout_s: int = 5, max_chars: int = 1000) -> None:
        if not isinstance(timeout_s, int) or timeout_s < 1:
            raise invalid("timeout_s", "a positive integer (seconds)", timeout_s)
        if not isinstance(max_chars, int) or max_chars < 1:
            raise invalid("max_chars", "a positive integer", max_chars)
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        _import_math_verify()  # fail at construction, not at the first grade

    def compare(self, answer: str, gold: object, metadata: Mapping[str, object]) -> Grade:
        ok = math_equal(gold_answer(gold), answer, timeout_s=self.timeout_s, max_chars=self.max_chars)
        return _verdict(answer, ok)


class ReasoningGymGrader(Grader):
    """The reasoning-gym dataset's ``score_answer(answer, entry)``; correct when the score is ≥ ``threshold``.

    The entry comes from ``metadata["entry"]`` (what :class:`~budgetlm.evals.suites.reasoning_gym.ReasoningGymSuite`
    stores), else ``metadata`` itself when it is a whole entry.  The scoring function is the one of
    ``dataset`` when given, else that of the entry's ``metadata.source_dataset``.
    """

    name = "reasoning_gym"

    def __init__(self, dataset: ProceduralDataset | None = None, threshold: float = 1.0) -> None:
        self.dataset = dataset
        self.threshold = threshold
        self._fns: dict[str, Callable[..., float]] = {}

    def _score_fn(self, entry: Mapping[str, object]) -> Callable[..., float]:
        if self.dataset is not None:
            score: Callable[..., float] = self.dataset.score_answer
            return score
        meta = entry.get("metadata")
        name = meta.get("source_dataset") if isinstance(meta, Mapping) else None
        if not name or not isinstance(name, str):
            raise ConfigError("the reasoning_gym grader needs the entry's metadata.source_dataset, or a `dataset`")
        if name not in self._fns:
            try:
                from reasoning_gym import get_score_answer_fn
            except ImportError as exc:
                raise MissingDependency("reasoning-gym", "the `reasoning_gym` grader", extra="eval") from exc
            self._fns[name] = get_score_answer_fn(name)
        return self._fns[name]

    def compare(self, answer: str, gold: object, metadata: Mapping[str, object]) -> Grade:
        given = metadata.get("entry", metadata)
        entry: Mapping[str, object] = given if isinstance(given, Mapping) else metadata
        if "answer" not in entry:
            entry = {**entry, "answer": gold}
        try:
            score = float(self._score_fn(entry)(answer, entry))
        except ConfigError:
            raise
        except Exception:  # a verifier that chokes on odd model output: the answer is wrong
            score = 0.0
        score = min(max(score, 0.0), 1.0)
        return Grade(score, score >= self.threshold, answer)


GRADERS: Registry[Callable[..., Grader]] = Registry("grader")
for _cls in (MathGrader, ReasoningGymGrader, ExactGrader, NormalizedGrader, NumericGrader):
    GRADERS.register(_cls.name, _cls)


def get_grader(name: str | Grader, **kwargs: Any) -> Grader:
    """The grader registered as ``name``, built with ``kwargs``; a :class:`Grader` passes through."""
    if isinstance(name, Grader):
        return name
    return GRADERS.get(name)(**kwargs)


def names() -> list[str]:
    """Registered grader names."""
    return GRADERS.names()
