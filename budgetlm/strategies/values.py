"""Value scorers for tree search: residual self-evaluation, mean-logprob confidence, an external PRM.

A scorer rates the new steps of one problem's round (:meth:`ValueScorer.score` is ``async`` and gets
the problem's :class:`~budgetlm.strategies.base.Context`; calls to the model go to the shared engine
through ``await ctx.generate(...)``, concurrently with every other request in flight, and are
charged to the step's meter, the problem's).  It is a small ABC (:class:`ValueScorer`, one method)
plus the registry :data:`VALUE_SCORERS` (``get_scorer(name, **params)`` lists the available names
and parameters).  Each scorer says what its number means (``kind``):

* ``"residual"`` — the progress the step adds over its parent, in ``[-1, 1]`` (BAVT,
  ALGORITHMS.md §4 step 3): the search sets ``v = clip(v_parent + r, ε, 1)`` and prunes ``r ≤ 0``;
* ``"value"`` — the quality of the path up to and including the step, in ``(0, 1]``; searches that
  need a residual use ``r = v - v_parent``.

Registered scorers:

``residual`` (:class:`ResidualSelfEval`)
    The *same* backend is asked how much closer the new step gets to the answer than the steps
    before it, on a 1–5 scale (1 = wrong or useless, 3 = no progress, 5 = clear progress).  One
    greedy token with the top-20 log-probabilities is generated per step (one request per step, all
    of a round's steps concurrently); the rating is the expectation over the digits 1–5
    renormalised among themselves, mapped to ``r = (E[d] - 3) / 2``.  Reading the distribution
    instead of the sampled digit gives a graded, deterministic score even for small models.  When
    no digit is among the top tokens the score is ``NaN`` (unscored), as it is when the budget
    cannot afford the rating call.  The calls are charged to the problem's meter.
``logprob`` (:class:`LogprobScorer`)
    ``exp(mean token logprob)`` of the step (the geometric-mean token probability): free, no call.
``prm`` (:class:`PRMScorer`)
    A transformers process reward model loaded from a local ``path``: a sequence-classification
    model (``num_labels == 1``: sigmoid of the logit; ``>= 2``: softmax probability of
    ``positive_label``) or a token-classification model (the same, read at the last token).  The
    input is the question, a newline and the path so far.  Each step's forward pass is held on the
    problem's meter before it runs (``async with meter.reserve(...)``, input tokens and FLOPs
    ``2 · params · tokens``) and settled with its usage; a step the budget cannot afford is
    unscored.  Forward passes run in a worker thread (one at a time per scorer), so the event loop
    keeps serving the other problems.

A scorer may return ``NaN`` (or raise nothing at all for a step it could not rate): searches treat
non-finite scores as *unscored*; the node keeps its parent's value, is not pruned, and the trace
records it (:func:`~budgetlm.strategies.tree.nan_safe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from budgetlm.aio import gather_settled
from budgetlm.backends.base import Backend, GenerationRequest, GenerationResult, SamplingParams
from budgetlm.errors import BudgetExceeded, ConfigError
from budgetlm.meter import Meter, Reservation
from budgetlm.registry import Registry
from budgetlm.strategies.base import Context, Problem
from budgetlm.usage import Usage

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RESIDUAL_PROMPT = (
    "Rate how much closer the new step gets to the correct final answer than the previous steps, from 1 to 5 "
    "(1 = wrong or useless, 3 = no progress, 5 = clear progress). Reply with one digit.\n\n"
    "Problem:\n{question}\n\nPrevious steps:\n{previous}\n\nNew step:\n{step}"
)
"""The instruction comes first and the new step last, so scoring prompts share their prefix (the
instruction across problems, the problem and path across siblings) and hit vLLM's prefix cache."""
RESIDUAL_PREFIX = "Rating: "


@dataclass
class StepView:
    """What a scorer sees of one new step."""

    problem: Problem
    """The problem."""
    previous: str
    """The path before the step (empty at the root)."""
    step: str
    """The new step."""
    logprob: float | None
    """Mean token logprob of the step, when known."""
    meter: Meter
    """The problem's meter (scoring calls are charged to it)."""

    @property
    def question(self) -> str:
        return str(self.problem.messages[-1].get("content", ""))


class ValueScorer(ABC):
    """Rates new steps; see the module docstring."""

    name: ClassVar[str] = "scorer"
    kind: ClassVar[Literal["residual", "value"]] = "value"

    @abstractmethod
    async def score(self, views: Sequence[StepView], ctx: Context) -> list[tuple[float, int]]:
        """``(score, output tokens spent)`` per view (``NaN`` score: unscored).

        ``views`` are the new steps of one problem's round; model calls go through ``ctx`` (the
        engine) and are charged to each view's meter (the problem's).
        """


VALUE_SCORERS: Registry[type[ValueScorer]] = Registry("value scorer")


def get_scorer(name: str | ValueScorer, **params: Any) -> ValueScorer:
    """The scorer ``name`` configured with ``params`` (an instance is returned as is)."""
    if isinstance(name, ValueScorer):
        return name
    cls = VALUE_SCORERS.get(name)
    sig = inspect.signature(cls.__init__).parameters
    valid = [k for k, prm in sig.items() if k != "self" and prm.kind not in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD)]
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for value scorer {name!r}; "
                          f"valid: {', '.join(valid) or '(none)'}")
    missing = [k for k in valid if sig[k].default is inspect.Parameter.empty and k not in params]
    if missing:
        raise ConfigError(f"value scorer {name!r} needs {', '.join(f'`{k}`' for k in missing)}; pass them in "
                          f"scorer_params, e.g. scorer_params={{{missing[0]!r}: ...}}")
    return cls(**params)


@VALUE_SCORERS.register("logprob")
class LogprobScorer(ValueScorer):
    """``exp(mean token logprob)`` of the step; free."""

    name = "logprob"
    kind = "value"

    async def score(self, views: Sequence[StepView], ctx: Context) -> list[tuple[float, int]]:
        return [(math.exp(v.logprob) if v.logprob is not None else math.nan, 0) for v in views]


@VALUE_SCORERS.register("residual")
class ResidualSelfEval(ValueScorer):
    """BAVT's residual self-evaluation by the backbone model (expected 1–5 rating → ``[-1, 1]``)."""

    name = "residual"
    kind = "residual"

    def __init__(self, top_logprobs: int = 20, prompt: str = RESIDUAL_PROMPT) -> None:
        if top_logprobs < 5:
            raise ConfigError(f"`top_logprobs` must be >= 5 so the five rating digits can appear, got {top_logprobs}")
        for key in ("{question}", "{previous}", "{step}"):
            if key not in prompt:
                raise ConfigError(f"`prompt` must contain {key}, got {prompt[:60]!r}...")
        self.top_logprobs = top_logprobs
        self.prompt = prompt
        self._digits: dict[int, int] | None = None

    def _digit_ids(self, backend: Backend) -> dict[int, int]:
        if self._digits is None:
            ids: dict[int, int] = {}
            for d in range(1, 6):
                for text in (str(d), " " + str(d)):
                    toks = backend.encode(text)
                    if len(toks) == 1:
                        ids[toks[0]] = d
            self._digits = ids
        return self._digits

    async def score(self, views: Sequence[StepView], ctx: Context) -> list[tuple[float, int]]:
        if not views:
            return []
        digits = self._digit_ids(ctx.backend)
        sp = SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=self.top_logprobs)
        reqs = [GenerationRequest(
            messages=[{"role": "user", "content": self.prompt.format(
                question=v.question, previous=v.previous.strip() or "(none)", step=v.step.strip() or "(empty)")}],
            assistant_prefix=RESIDUAL_PREFIX, sampling=sp, meter=v.meter, may_think=False) for v in views]

        async def rate(req: GenerationRequest) -> GenerationResult | None:
            try:
                return await ctx.generate(req)
            except BudgetExceeded:
                return None  # the budget cannot afford the rating: unscored

        out = []
        for g in await gather_settled(rate(r) for r in reqs):
            if g is None or not g.completions:
                out.append((math.nan, 0))
                continue
            c = g.first
            tops = (c.top_logprobs or [{}])[0]
            mass = {d: 0.0 for d in range(1, 6)}
            for tok, lp in tops.items():
                if tok in digits:
                    mass[digits[tok]] += math.exp(lp)
            z = sum(mass.values())
            if z <= 0:
                out.append((math.nan, len(c.token_ids)))
                continue
            expect = sum(d * m for d, m in mass.items()) / z
            out.append(((expect - 3.0) / 2.0, len(c.token_ids)))
        return out


@VALUE_SCORERS.register("prm")
class PRMScorer(ValueScorer):
    """An external transformers process reward model (sequence or token classification)."""

    name = "prm"
    kind = "value"

    def __init__(self, path: str, positive_label: int = 1, device: str | None = None, batch_size: int = 16,
                 max_length: int = 2048) -> None:
        if not path:
            raise ConfigError("`path` must be a local directory with a transformers PRM, got ''; "
                              "e.g. prm?path=/models/my-prm")
        if batch_size < 1:
            raise ConfigError(f"`batch_size` must be >= 1, got {batch_size}")
        self.path = str(path)
        self.positive_label = positive_label
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._model: PreTrainedModel | None = None
        self._tok: PreTrainedTokenizerBase | None = None
        self._token_level = False
        self._params = 0
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
            AutoTokenizer,
        )

        try:
            cfg = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"`path` must be a local transformers model directory, got {self.path!r} ({e})") from e
        archs = " ".join(cfg.architectures or [])
        self._token_level = "TokenClassification" in archs
        cls = AutoModelForTokenClassification if self._token_level else AutoModelForSequenceClassification
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = cls.from_pretrained(self.path).to(device).eval()
        self._tok = AutoTokenizer.from_pretrained(self.path)
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token or self._tok.unk_token
        self._tok.padding_side = "right"
        nl = int(self._model.config.num_labels)
        if nl >= 2 and not 0 <= self.positive_label < nl:
            raise ConfigError(f"`positive_label` must be in [0, {nl}) for this PRM, got {self.positive_label}")
        if self._model.config.pad_token_id is None:
            self._model.config.pad_token_id = self._tok.pad_token_id
        self._params = sum(p.numel() for p in self._model.parameters())

    async def score(self, views: Sequence[StepView], ctx: Context) -> list[tuple[float, int]]:
        if not views:
            return []
        await asyncio.to_thread(self._locked_load)
        texts = [f"{v.question}\n{v.previous}{v.step}" for v in views]
        out: list[tuple[float, int]] = [(math.nan, 0)] * len(views)
        _, tok = self._loaded()
        lengths = [len(tok(t, truncation=True, max_length=self.max_length)["input_ids"]) for t in texts]
        async with contextlib.AsyncExitStack() as held:  # every hold is settled, or released on an error
            keep: list[tuple[int, Reservation, Usage]] = []
            for i, (v, n) in enumerate(zip(views, lengths, strict=True)):  # hold before running: never overspend
                try:
                    r = await held.enter_async_context(v.meter.reserve(prompt_tokens=n, max_tokens=0, min_tokens=0))
                except BudgetExceeded:
                    continue  # unscored
                usage = Usage(prompt_tokens=n, flops=2.0 * self._params * n, model=f"prm:{self.path}",
                              finish_reason="stop")
                r.progress(usage)  # the forward pass reads the whole input: charged even if it is cancelled
                keep.append((i, r, usage))
            scores = await asyncio.to_thread(self._forward, [texts[i] for i, _, _ in keep]) if keep else []
            for (i, r, usage), val in zip(keep, scores, strict=True):
                r.settle(usage)
                out[i] = (float(val), 0)
        return out

    def _locked_load(self) -> None:
        with self._lock:
            self._load()

    def _loaded(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The model and its tokenizer, once :meth:`_load` has run."""
        if self._model is None or self._tok is None:
            raise RuntimeError("the PRM is used before it was loaded")
        return self._model, self._tok

    def _forward(self, texts: list[str]) -> list[float]:
        """The PRM's probability of a correct path for each text (one forward pass at a time)."""
        import torch

        out: list[float] = []
        with self._lock:
            model, tok = self._loaded()
            for s in range(0, len(texts), self.batch_size):
                enc = tok(texts[s:s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=self.max_length).to(model.device)
                with torch.no_grad():
                    logits = model(**enc).logits.float()
                if self._token_level:
                    last = enc["attention_mask"].sum(-1) - 1
                    logits = logits[torch.arange(logits.shape[0]), last]
                if logits.shape[-1] == 1:
                    p = torch.sigmoid(logits[:, 0])
                else:
                    p = torch.softmax(logits, dim=-1)[:, self.positive_label]
                out.extend(float(x) for x in p.tolist())
        return out
