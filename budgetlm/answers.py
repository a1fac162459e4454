"""Answer extraction and normalisation shared by strategies and graders.

:func:`extract_answer` looks, in order, for ``\\boxed{…}`` (last one, nested braces allowed),
``<answer>…</answer>`` tags, an ``Answer:`` / ``Final answer:`` line (last one), and finally the
last number in the text.  :func:`normalize_answer` makes "7", "7.0", " 7 " and "\\boxed{7}" equal so
they vote together.  Text whose thinking was truncated has no answer (callers pass the answer part
of a :class:`~budgetlm.thinking.ThinkingSplit`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Source = Literal["boxed", "tag", "line", "last_number", "none"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_LINE = re.compile(r"(?:final\s+answer|answer)\s*(?:is)?\s*[:=]\s*(.+)", re.IGNORECASE)
_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Extracted:
    """An extracted answer and where it came from."""

    text: str | None
    """The answer text, or ``None`` when nothing was found."""
    source: Source
    """Which rule found it."""


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_answer(text: str | None) -> Extracted:
    """The final answer in ``text`` (see the module docstring for the rules)."""
    if not text or not text.strip():
        return Extracted(None, "none")
    boxed = _last_boxed(text)
    if boxed:
        return Extracted(boxed, "boxed")
    tags = _TAG.findall(text)
    if tags and tags[-1].strip():
        return Extracted(tags[-1].strip(), "tag")
    lines = _LINE.findall(text)
    if lines:
        ans = lines[-1].strip().rstrip(".").strip()
        ans = _last_boxed(ans) or ans
        if ans:
            return Extracted(ans, "line")
    nums = _NUMBER.findall(text)
    if nums:
        return Extracted(nums[-1], "last_number")
    return Extracted(None, "none")


def normalize_answer(ans: str | None) -> str | None:
    """A canonical form for voting and exact-match grading."""
    if ans is None:
        return None
    s = ans.strip()
    s = _last_boxed(s) or s
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.strip().rstrip(".").strip()
    num = s.replace(",", "")
    if re.fullmatch(r"-?\d+(?:\.\d+)?", num):
        f = float(num)
        return str(int(f)) if f == int(f) else repr(f)
    return re.sub(r"\s+", " ", s).lower()
