"""LC-R1 length and compression rewards (arXiv 2506.14755; ALGORITHMS.md §9).

- :class:`LCR1Length`, group-wise by prompt id: ``r_len,i = 1 − L_i / max_{j correct} L_j`` for every
  sample ``i`` of the group, correct or not (so a wrong sample longer than the longest correct one
  gets a negative value), and 0 for the whole group when no sample is correct.  ``L`` is the
  completion length in tokens.
- :class:`LCR1Compress`: ``1 − |valid thinking| / |thinking|`` when the answer is correct and the
  correct answer appears inside the thinking, −1 when it is correct but never appears there (also
  when there is no thinking), 0 when wrong.  *Valid thinking* is the prefix of the thinking up to and
  including the first occurrence of the correct answer, so the reward is the share of thinking spent
  after the answer was first reached.  Sizes are tokens with a tokenizer, else characters.

The correct answer is looked for as the gold answer (the final answer of the gold column) and as the
model's own extracted answer (equal to the gold one when correct), each also in normalised form
("7.0" → "7"), matched so that "72" is not found inside "172"; the earliest match counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from budgetlm.answers import extract_answer, normalize_answer
from budgetlm.evals.graders import gold_answer
from budgetlm.rewards.base import RewardBatch, count_tokens
from budgetlm.rewards.correctness import GradedReward

__all__ = ["LCR1Compress", "LCR1Length", "answer_end"]


def _pattern(candidate: str) -> re.Pattern[str]:
    head = r"(?<![\w.])" if re.match(r"\w", candidate) else ""
    tail = r"(?!\w|\.\d)" if re.search(r"\w$", candidate) else ""
    return re.compile(head + re.escape(candidate) + tail)


def answer_end(thinking: str, answers: list[str]) -> int | None:
    """End offset of the earliest occurrence in ``thinking`` of any of ``answers`` (whole-token match), or None."""
    best: tuple[int, int] | None = None
    for cand in {a.strip() for a in answers if a and a.strip()}:
        m = _pattern(cand).search(thinking)
        if m and (best is None or (m.start(), m.end()) < best):
            best = (m.start(), m.end())
    return None if best is None else best[1]


@dataclass(eq=False)
class LCR1Length(GradedReward):
    """LC-R1's length reward: ``1 − L_i / max_{j correct} L_j`` over the prompt's group (0 if none correct).

    >>> from budgetlm.rewards import Correctness
    >>> r = LCR1Length(correctness=Correctness("exact"))
    >>> r(completions=["<think>a</think>4", "<think>b</think>4", "<think>c</think>5"],
    ...   completion_ids=[[0] * 10, [0] * 40, [0] * 5], answer=["4"] * 3, prompt_id=["p"] * 3)  # 1 − L/40
    [0.75, 0.0, 0.875]
    """

    default_name: ClassVar[str] = "lcr1_length"
    group_wise: ClassVar[bool] = True

    prompt_id_column: str = "prompt_id"
    """Column whose value groups a prompt's completions."""

    def score(self, batch: RewardBatch) -> list[float | None]:
        groups = self.groups(batch, self.prompt_id_column)
        lengths = self.lengths(batch)
        correct = self.correct(batch)
        out: list[float | None] = [0.0] * len(lengths)
        for rows in groups.values():
            longest = max((lengths[i] for i in rows if correct[i]), default=0)
            if longest <= 0:
                continue  # no correct sample (or only empty ones): 0
            for i in rows:
                out[i] = 1.0 - lengths[i] / longest
        return out


@dataclass(eq=False)
class LCR1Compress(GradedReward):
    """LC-R1's compress reward: the share of thinking after the correct answer first appears (−1 if never).

    >>> from budgetlm.rewards import Correctness
    >>> r = LCR1Compress(correctness=Correctness("exact"))
    >>> r(completions=["<think>2+2 is 4, check: yes</think>4", "<think>2+2 is 4</think>4", "<think>hm</think>5"],
    ...   answer=["4"] * 3)
    [0.6, 0.0, 0.0]
    """

    default_name: ClassVar[str] = "lcr1_compress"

    def _size(self, text: str) -> int:
        return count_tokens(text, self.tokenizer) if self.tokenizer is not None else len(text)

    def answers(self, gold: object, answer_text: str) -> list[str]:
        """The strings that count as the correct answer inside the thinking."""
        out = [gold_answer(gold)]
        pred = extract_answer(answer_text).text
        if pred:
            out.append(pred)
        out += [n for n in (normalize_answer(a) for a in list(out)) if n]
        return out

    def value(self, thinking: str, answers: list[str], correct: bool) -> float:
        """The reward of one completion given its thinking text."""
        if not correct:
            return 0.0
        end = answer_end(thinking, answers) if thinking else None
        if end is None:
            return -1.0
        total = self._size(thinking)
        return 1.0 - self._size(thinking[:end]) / total if total else -1.0

    def score(self, batch: RewardBatch) -> list[float | None]:
        texts = batch.require_texts()
        correct = self.correct(batch)
        golds = batch.column(self.judge.answer_column)
        out: list[float | None] = []
        for text, gold, ok in zip(texts, golds, correct):
            sp = self.split(text)
            out.append(self.value(sp.thinking, self.answers(gold, sp.answer), ok))
        return out
