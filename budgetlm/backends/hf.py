"""HF transformers backend: real batched generation with a KV cache, scoring and next-token logprobs.

:class:`HFBackend` loads a causal LM checkpoint with ``AutoModelForCausalLM`` and runs
``model.generate`` (KV cache, left padding).  Design:

* **Grouping.**  ``generate`` takes one set of sampling settings per call, but a budgetlm batch may
  mix settings (the meter clamps ``max_tokens`` per request).  Requests with identical
  ``(temperature, top_p, top_k, max_tokens, stop, logprobs, seed, n)`` form a group; each group runs
  as one ``generate`` call per chunk of at most ``max_batch_size`` rows, ``n`` samples per prompt
  through ``num_return_sequences``.  Greedy requests (temperature 0) ignore ``top_p``, ``top_k``
  and ``seed`` when grouped; their ``n`` samples are identical, so the prompt runs once and the
  sample is copied ``n`` times (each copy is still charged, as on vLLM).
* **Sampling settings are exactly the request's.**  A fresh ``GenerationConfig`` is built per group
  (only the end-of-sequence, padding and start token ids come from the checkpoint), so a model's own
  ``generation_config.json`` defaults (repetition penalty, its favourite temperature) never apply.
* **Raw logprobs.**  Logprobs are the ``log_softmax`` of the model's *raw* logits, not of the
  processed scores after temperature, top-k and top-p, as vLLM reports them by default, so
  :meth:`~budgetlm.backends.base.Backend.score` of a generated continuation gives the same numbers.
  ``logprobs=k > 0`` adds the ``k`` most likely tokens per position.  They are captured by a logits
  processor that runs ahead of the sampling warpers and keeps one step's distribution at a time,
  rather than with ``output_logits=True``, which holds every step's full-vocabulary logits until
  ``generate`` returns (steps x rows x vocab floats: gigabytes for long samples).
* **Seeds.**  A seeded group runs deterministically: the global torch RNG is forked, seeded with the
  request's ``seed`` right before the group's first chunk, and restored afterwards, so the global
  random stream of unseeded requests is left untouched.  The same requests with the same seed in
  the same batch composition give the same samples; a seeded request that is alone in its group
  (the usual case: one seeded request per call) is reproducible on its own.  Unseeded requests use
  the global RNG.
* **Stop strings.**  A ``StopStringCriteria`` (inside the per-row stopping criterion below) stops a
  row as soon as a token completes a stop string.  As on vLLM, the token ids keep every generated
  token up to and including the token that completed the stop string, while the text is cut before
  the stop string.
  The sample ends at the first end-of-sequence token, which is kept in ``token_ids`` (it was
  generated and is paid for, and vLLM counts it too) but adds no text; padding after a finished row
  is dropped.  ``finish_reason`` is ``"stop"`` for end of sequence or a stop string,
  ``"length"`` for the token or context limit, ``"deadline"`` and ``"abort"`` as below.
* **Deadlines and aborts.**  One stopping criterion, evaluated after every generated token, ends each
  row at end of sequence, a stop string, its token limit, its request's ``deadline`` (on the
  backend's :attr:`~budgetlm.backends.base.Backend.clock`; ``finish_reason="deadline"``, as
  :meth:`~budgetlm.backends.base.Backend.agenerate_one` reports deadlines on every backend) or when
  its request's ``abort`` event is set (``finish_reason="abort"``), so cancellation and deadlines
  stop generation within one token.  A ``generate`` call whose requests were all given up before it
  started does not run; otherwise at least one token is generated per row.
* **Streaming** (:meth:`HFBackend._agenerate_request`, used by ``agenerate_one``/``astream``): the
  same criterion pushes each row's new token into the request's
  :class:`~budgetlm.backends.streaming.Sink` as soon as it is sampled, with its text detokenised
  incrementally (text that might still turn out to be part of a stop string is held back until the
  sample ends).  Logprobs arrive with a sample's last delta.  The deltas of a sample concatenate to
  its final text and token ids.  Cancelling the awaiting task sets the request's abort event and
  waits (at most one token) for the generation thread; the sink then holds exactly the tokens
  generated, which is what is charged.
* **No continuous batching.**  Requests that arrive while a ``generate`` call runs wait for it (the
  model is serialised by a lock); each async request is its own ``generate`` call.  Concurrency on
  this backend therefore overlaps waiting, not decoding; use vLLM for a shared running batch.
* **Scoring and next-token logprobs** run one batched forward pass per chunk, left-padded with
  position ids from the attention mask (as ``generate`` does), computing logits only for the last
  positions that are needed (``logits_to_keep``).  :meth:`HFBackend.next_token_logprobs` makes this
  backend a :class:`~budgetlm.backends.base.TokenLevelBackend`.

Engine calls are serialised by a lock (the model and the RNG are shared), so the backend is safe to
use from several threads, e.g. through :meth:`~budgetlm.backends.base.Backend.agenerate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from budgetlm.backends.base import (
    Backend,
    Message,
    PreparedRequest,
    RawCompletion,
    RawResult,
    SamplingParams,
    SpeculativeDecoding,
)
from budgetlm.backends.streaming import Sink
from budgetlm.costs import ModelInfo
from budgetlm.errors import ConfigError, invalid, missing
from budgetlm.models import DEFAULT_MODEL_NAME, resolve_model_path
from budgetlm.thinking import ThinkingFormat

if TYPE_CHECKING:
    from budgetlm.backends.hf_speculative import Drafter, SpeculativeDecoder

_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "float32": (torch.float32, 4.0),
    "bfloat16": (torch.bfloat16, 2.0),
    "float16": (torch.float16, 2.0),
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}

GroupKey = tuple[float, float, int, int, tuple[str, ...], int | None, int | None, int]


class _RowStream:
    """Streams one generated row into its request's sink(s): token ids at once, text incrementally.

    ``targets`` are ``(sink, sample index)`` pairs (a greedy row fans out to the ``n`` identical
    samples).  Text is detokenised with a sliding window (as vLLM does: the new text is the decode of
    the last few tokens minus the decode of the window before the new token), never emitting an
    incomplete UTF-8 character.  With ``stop`` strings, the last ``len(longest stop) - 1``
    characters, which may still turn out to start a stop string, are held back until the next token
    or :meth:`finish`, and a completed stop string is never sent.
    """

    def __init__(self, targets: list[tuple[Sink, int]], decode: Callable[[Sequence[int]], str], stop: list[str]) -> None:
        self.targets = targets
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        """The text of ``ids`` decoded so far."""
        self.sent = ""
        """The text already pushed."""
        self._prefix = 0
        self._read = 0

    def token(self, tok: int) -> None:
        self.ids.append(tok)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        upto = max(len(self.sent), len(self.text) - self._hold)
        if self._stop:  # a completed stop string: never send it (the sample ends before it)
            start = max(0, len(self.sent) - self._hold)
            cuts = [c for s in self._stop if (c := self.text.find(s, start)) >= 0]
            if cuts:
                upto = max(len(self.sent), min(cuts))
        new = self.text[len(self.sent):upto]
        self.sent += new
        for sink, i in self.targets:
            sink.push(i, [tok], new)

    def finish(self, ids: list[int], text: str, finish: str, matched: str | None,
               logprobs: list[float] | None, top_logprobs: list[dict[int, float]] | None) -> None:
        """The row's final output: push what was not streamed yet and end the samples.

        An aborted row's samples are left open: the engine layer ends them (``abort``, or
        ``deadline`` when its deadline cancelled the request).
        """
        extra = ids[len(self.ids):] if ids[: len(self.ids)] == self.ids else []
        rest = text[len(self.sent):] if text.startswith(self.sent) else ""
        end = None if finish == "abort" else finish
        for sink, i in self.targets:
            sink.push(i, extra, rest, logprobs=logprobs, top_logprobs=top_logprobs, finish_reason=end,
                      stop_string=matched if end else None)


class _RowStops(StoppingCriteria):
    """Ends each row of a ``generate`` call for every reason budgetlm knows, one token at a time.

    Called by ``generate`` after every sampled token with the sequences so far.  A row still running
    ends at an end-of-sequence token, a stop string (``StopStringCriteria``), its token limit
    (``max_new``), its ``deadline`` (on ``clock``) or when its ``abort`` event is set.  Because every
    reason is known here, the rows' streams see exactly the tokens each row generated (no padding
    after a row ended).  ``stopped_at`` records the sequence length (padded prompt included) at which
    a row ended and ``reason`` why (``"done"`` for end of sequence, stop string or token limit).
    """

    def __init__(self, *, clock: Callable[[], float], deadlines: list[float | None], aborts: list[threading.Event | None],
                 eos: set[int], width: int, max_new: int, stop: StoppingCriteria | None,
                 streams: list[_RowStream] | None) -> None:
        self.clock = clock
        self.deadlines = deadlines
        self.aborts = aborts
        self.eos = eos
        self.width = width
        self.max_new = max_new
        self.stop = stop
        self.streams = streams
        self.stopped_at: dict[int, int] = {}
        self.reason: dict[int, str] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        length = int(input_ids.shape[1])
        last = input_ids[:, -1].tolist()
        hits = self.stop(input_ids, scores).tolist() if self.stop is not None else None
        now = self.clock() if any(d is not None for d in self.deadlines) else 0.0
        done = []
        for r, tok in enumerate(last):
            if r in self.stopped_at:
                done.append(True)
                continue
            if self.streams is not None:
                self.streams[r].token(int(tok))
            why = None
            if tok in self.eos or (hits is not None and hits[r]) or length - self.width >= self.max_new:
                why = "done"
            elif (deadline := self.deadlines[r]) is not None and now >= deadline:
                why = "deadline"
            elif (ev := self.aborts[r]) is not None and ev.is_set():
                why = "abort"
            if why is not None:
                self.stopped_at[r], self.reason[r] = length, why
            done.append(why is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _RawLogprobs(LogitsProcessor):
    """Records raw log-probabilities of the sampled tokens (and the top ``k``) step by step.

    ``generate`` applies user logits processors before its temperature, top-k and top-p warpers,
    with no other processor ahead of them under the fresh ``GenerationConfig`` used here, so this
    processor sees the raw float32 logits.  The token sampled at step ``t`` is known at step
    ``t + 1`` (the last column of ``input_ids``) or from the final sequences, so only one step's
    distribution is held at a time: memory ``O(rows x vocab)`` instead of the
    ``O(steps x rows x vocab)`` of ``output_logits=True``.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self._pending: torch.Tensor | None = None
        self._chosen: list[torch.Tensor] = []
        self._top: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _settle(self, tokens: torch.Tensor) -> None:
        if self._pending is not None:
            self._chosen.append(self._pending.gather(1, tokens.to(self._pending.device)[:, None]).squeeze(1))
            self._pending = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._settle(input_ids[:, -1])
        ls = torch.log_softmax(scores.float(), dim=-1)
        self._pending = ls
        if self.k > 0:
            vals, idx = ls.topk(min(self.k, ls.shape[-1]), dim=-1)
            self._top.append((vals, idx))
        return scores

    def result(
        self, generated: torch.Tensor, lengths: list[int]
    ) -> tuple[list[list[float] | None], list[list[dict[int, float]] | None]]:
        """Per row, the logprobs (and top-``k`` dicts) of its first ``lengths[row]`` generated tokens."""
        if len(self._chosen) < generated.shape[1]:  # the last step's token is only in the final sequences
            self._settle(generated[:, len(self._chosen)])
        steps = min(len(self._chosen), generated.shape[1])
        rows = generated.shape[0]
        chosen = torch.stack(self._chosen[:steps], dim=1).tolist() if steps else [[] for _ in range(rows)]
        lps: list[list[float] | None] = [[float(x) for x in chosen[r][: lengths[r]]] for r in range(rows)]
        if self.k == 0:
            return lps, [None] * rows
        vals = torch.stack([v for v, _ in self._top[:steps]], dim=1).tolist() if steps else [[] for _ in range(rows)]
        idx = torch.stack([i for _, i in self._top[:steps]], dim=1).tolist() if steps else [[] for _ in range(rows)]
        tops: list[list[dict[int, float]] | None] = [
            [dict(zip(idx[r][t], vals[r][t])) for t in range(min(steps, lengths[r]))] for r in range(rows)
        ]
        return lps, tops


class HFBackend(Backend):
    """A causal LM on HF transformers; see the module docstring.

    ``model`` is ``"default"`` (the embedded SmolLM2-135M-Instruct) or a checkpoint directory.
    ``dtype="auto"`` is float32 on the CPU and bfloat16 on CUDA; ``device="auto"`` picks CUDA when
    available.  ``backend_kwargs`` go to :class:`~budgetlm.backends.base.Backend` (``prices``,
    ``flops``, ``measure_energy``).
    """

    kind = "hf"
    speculative_decoding = True

    def __init__(
        self,
        model: str = "default",
        *,
        dtype: str = "auto",
        device: str = "auto",
        thinking: ThinkingFormat | None = None,
        max_batch_size: int = 32,
        name: str | None = None,
        **backend_kwargs: Any,
    ) -> None:
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise invalid("max_batch_size", "an integer >= 1", max_batch_size, "pass e.g. max_batch_size=32")
        if not isinstance(model, (str, Path)) or not str(model).strip():
            raise invalid("model", "'default' or a checkpoint directory", model)
        self.device = self._resolve_device(device)
        dtype_name = self._resolve_dtype(dtype, self.device)
        self.dtype, self._bytes_per_param = _DTYPES[dtype_name]
        path = resolve_model_path(model)
        if not (path / "config.json").exists():
            raise invalid(
                "model", "a checkpoint directory with a config.json", str(model),
                "pass a directory saved with save_pretrained, or 'default'",
            )
        if name is None:
            name = DEFAULT_MODEL_NAME if str(model) == "default" else str(model)
        super().__init__(name=name, thinking=thinking, **backend_kwargs)
        self.path = path
        self.max_batch_size = max_batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"`model` must be a loadable transformers checkpoint, got {str(model)!r}; loading failed: {exc}"
            ) from exc
        self.model.to(self.device).eval()
        gc_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = gc_eos if gc_eos is not None else self.tokenizer.eos_token_id
        eos_list = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_token_ids: list[int] = [int(e) for e in eos_list if e is not None]
        if not self.eos_token_ids:
            raise ConfigError(
                f"`model` must define an end-of-sequence token, got none in {str(model)!r}; "
                "set eos_token_id in its config"
            )
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = int(pad) if pad is not None else self.eos_token_ids[0]
        self._special_ids = set(self.tokenizer.all_special_ids)
        self.bos_token_id = getattr(self.model.generation_config, "bos_token_id", None)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self._keep_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._lock = threading.RLock()
        self._info: ModelInfo | None = None

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _resolve_device(device: str) -> torch.device:
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise invalid("device", "'auto' or a torch device such as 'cpu' or 'cuda:0'", device) from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise invalid("device", "a device that exists here", device, "no CUDA GPU is visible; use device='cpu'")
        return dev

    @staticmethod
    def _resolve_dtype(dtype: str, device: torch.device) -> str:
        if dtype == "auto":
            return "bfloat16" if device.type == "cuda" else "float32"
        key = _DTYPE_ALIASES.get(str(dtype), str(dtype).removeprefix("torch."))
        if key not in _DTYPES:
            raise invalid(
                "dtype", f"'auto' or one of {sorted(_DTYPES)}", dtype, "use 'auto' (fp32 on CPU, bf16 on CUDA)"
            )
        return key

    # ------------------------------------------------------------------ Backend hooks
    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            n_params = sum(p.numel() for p in self.model.parameters())
            base = ModelInfo.from_hf_config(self.name, self.model.config, n_params=n_params)
            self._info = dataclasses.replace(base, bytes_per_param=self._bytes_per_param)
        return self._info

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"`messages` need a chat template, but the tokenizer of {self.name!r} has none; "
                "pass a raw `prompt` instead, or use an instruction-tuned checkpoint"
            )
        prompt: str = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                         tokenize=False)
        return prompt

    def _encode_prompt(self, text: str) -> list[int]:
        """Prompt ids: a prompt that already starts with the BOS token (chat templates) gets no special tokens.

        Other raw prompts get the tokenizer's usual special tokens (its BOS, if it adds one), as vLLM does.
        """
        bos = self.tokenizer.bos_token
        add = not (bos and text.startswith(bos))
        return list(self.tokenizer.encode(text, add_special_tokens=add))

    def close(self) -> None:
        model = self.__dict__.pop("model", None)
        if model is not None:
            del model
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _group_key(sp: SamplingParams) -> GroupKey:
        stop = tuple(s for s in sp.stop if s)
        if sp.greedy:  # top_p, top_k, seed and n do not change a greedy sample
            return (0.0, 1.0, 0, sp.max_tokens, stop, sp.logprobs, None, 1)
        return (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, stop, sp.logprobs, sp.seed, sp.n)

    def _prompt_ids(self, p: PreparedRequest) -> list[int]:
        ids = p.prompt_token_ids if p.prompt_token_ids is not None else self._encode_prompt(p.prompt_text or "")
        if not ids:
            raise ConfigError("`prompt` must render to at least one token, got an empty prompt; pass the question text")
        if self.max_context and len(ids) >= self.max_context:
            raise ConfigError(
                f"`prompt` must be shorter than the model's context of {self.max_context} tokens, "
                f"got {len(ids)} tokens; shorten the prompt"
            )
        return list(ids)

    # ------------------------------------------------------------------ speculative decoding
    @contextlib.contextmanager
    def speculative(self, drafter: str = "layerskip", gamma: int = 4, *, adaptive: bool = False,
                    rule: str | None = None, alpha: float = 0.0, layers: int | None = None,
                    ngram: int = 3) -> Iterator[SpeculativeDecoder]:
        """Within the block, requests without their own :attr:`~GenerationRequest.speculative` setting draft and
        verify (:mod:`budgetlm.backends.hf_speculative`).

        ``drafter``: ``"layerskip"`` (the target's first ``layers`` layers, default half), ``"ngram"``
        (prompt lookup of ``ngram``-grams), or a path to a smaller model with the same tokenizer.
        ``rule``/``alpha``: a speculative-cascade deferral rule (lossy) instead of lossless verification.
        The setting is the backend's default while the block runs; code that runs requests concurrently
        should set :class:`~budgetlm.backends.base.SpeculativeDecoding` on each request instead.
        """
        spec = SpeculativeDecoding(drafter=drafter, gamma=gamma, adaptive=adaptive, rule=rule, alpha=alpha,
                                   layers=layers, ngram=ngram)
        dec, _ = self._decoder(spec)
        prev: SpeculativeDecoding | None = getattr(self, "_spec", None)
        self._spec: SpeculativeDecoding | None = spec
        try:
            yield dec
        finally:
            self._spec = prev

    def _spec_of(self, p: PreparedRequest) -> SpeculativeDecoding | None:
        """The request's speculative setting, else the :meth:`speculative` block's default."""
        return p.request.speculative if p.request.speculative is not None else getattr(self, "_spec", None)

    def _decoder(self, spec: SpeculativeDecoding) -> tuple[SpeculativeDecoder, tuple[int, int]]:
        """The decoder for ``spec`` and the (target, drafter) parameter counts, built once per setting."""
        from budgetlm.backends.hf_speculative import SpeculativeDecoder

        cache: dict[SpeculativeDecoding, tuple[SpeculativeDecoder, tuple[int, int]]] = self.__dict__.setdefault("_decoders", {})
        if spec not in cache:
            dec = SpeculativeDecoder(self.model, self._drafter(spec.drafter, spec.layers, spec.ngram),
                                     gamma=spec.gamma, adaptive=spec.adaptive, rule=spec.rule, alpha=spec.alpha)
            drafter_model = getattr(dec.drafter, "model", None)
            cache[spec] = dec, (sum(p.numel() for p in self.model.parameters()),
                                sum(p.numel() for p in drafter_model.parameters()) if drafter_model is not None else 0)
        return cache[spec]

    def _drafter(self, spec: str, layers: int | None, ngram: int) -> Drafter:
        from budgetlm.backends.hf_speculative import LayerSkipDrafter, ModelDrafter, NGramDrafter

        if spec == "layerskip":
            total = int(self.model.config.num_hidden_layers)
            return LayerSkipDrafter(self.model, layers if layers is not None else max(1, total // 2))
        if spec == "ngram":
            return NGramDrafter(ngram, int(self.model.config.vocab_size))
        path = resolve_model_path(spec)
        tok = AutoTokenizer.from_pretrained(path)
        if tok.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(f"`drafter` must share the target's tokenizer, got {spec!r} whose vocabulary differs; "
                              "use 'layerskip', 'ngram' or a model of the same family")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        return ModelDrafter(model)

    def _generate_speculative(self, batch: list[PreparedRequest], prompts: list[list[int]]) -> list[RawResult]:
        eos = set(self.eos_token_ids)
        out = []
        for p, prompt in zip(batch, prompts, strict=True):
            spec = self._spec_of(p)
            if spec is None:
                raise missing('spec')
            dec, (n_target, n_draft) = self._decoder(spec)
            sp = p.sampling
            if sp.stop or sp.logprobs is not None:
                raise ConfigError("speculative decoding supports neither `stop` strings nor `logprobs` yet, got "
                                  f"stop={list(sp.stop)} logprobs={sp.logprobs}; drop them for this call")
            comps, extra = [], {"flops_extra": 0.0}
            for s in range(sp.n):
                seed = None if sp.seed is None else sp.seed + s
                toks, st = dec.generate(prompt, sp.max_tokens, temperature=sp.temperature, top_k=sp.top_k,
                                        top_p=sp.top_p, eos=eos, seed=seed)
                finish = "stop" if toks and toks[-1] in eos else "length"
                comps.append(RawCompletion(toks, self.decode([t for t in toks if t not in eos]), finish))
                wasted = max(0, st.target_tokens - len(prompt) - len(toks))  # verified but rejected positions
                extra["flops_extra"] += 2.0 * n_target * wasted + 2.0 * n_draft * st.drafter_tokens
                for k, v in st.to_dict().items():
                    if k in ("rounds", "drafted", "accepted", "target_forwards", "target_tokens", "drafter_tokens",
                             "deferred"):
                        extra[f"spec_{k}"] = extra.get(f"spec_{k}", 0.0) + float(v)
            out.append(RawResult(comps, extra=extra))
        return out

    def _generate(self, batch: list[PreparedRequest]) -> list[RawResult]:
        return self._generate_batch(batch)

    def _generate_batch(self, batch: list[PreparedRequest], sinks: list[Sink] | None = None) -> list[RawResult]:
        """The batch hook; with ``sinks`` (one per request) every row streams into its request's sink."""
        prompts = [self._prompt_ids(p) for p in batch]
        spec = [self._spec_of(p) is not None for p in batch]
        if any(spec):
            if not all(spec):  # plain and speculative requests in one call: each kind on its own
                plain = [i for i, s in enumerate(spec) if not s]
                drafted = [i for i, s in enumerate(spec) if s]
                got = dict(zip(plain, self._generate_batch([batch[i] for i in plain]), strict=True))
                got.update(zip(drafted, self._generate_batch([batch[i] for i in drafted]), strict=True))
                return [got[i] for i in range(len(batch))]
            with self._lock, torch.inference_mode():
                return self._generate_speculative(batch, prompts)
        groups: dict[GroupKey, list[int]] = {}
        for i, p in enumerate(batch):
            groups.setdefault(self._group_key(p.sampling), []).append(i)
        comps: list[list[RawCompletion]] = [[] for _ in batch]
        with self._lock, torch.inference_mode():
            for key, members in groups.items():
                seed = key[6]
                if seed is None:
                    self._run_group(key, members, batch, prompts, comps, sinks)
                    continue
                devices = []
                if self.device.type == "cuda":
                    devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    self._run_group(key, members, batch, prompts, comps, sinks)
        return [RawResult(c) for c in comps]

    async def _agenerate_request(self, p: PreparedRequest, sink: Sink) -> RawResult:
        """One request as its own ``generate`` call in its own thread, streaming every token into ``sink``.

        Cancelling sets ``sink.abort``: the generation stops after its next token, or gives up
        waiting for the model (another request holds it) without running, and this coroutine waits
        for the thread before re-raising, so ``sink`` holds exactly what was generated.  A thread per
        request (not the loop's default executor, whose few workers may all be waiting for the
        model) lets a queued request be cancelled at once.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[RawResult] = loop.create_future()

        def done(outcome: RawResult | BaseException) -> None:
            if fut.done():
                return
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

        def work() -> None:
            outcome: RawResult | BaseException
            try:
                outcome = self._generate_streamed(p, sink)
            except BaseException as e:  # noqa: BLE001 -- handed to the awaiting coroutine
                outcome = e
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(done, outcome)

        threading.Thread(target=work, name="budgetlm-hf-request", daemon=True).start()
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            sink.abort.set()
            while not fut.done():  # the thread stops within a token; further cancels must not cut this wait
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(fut)
            fut.exception()  # mark it retrieved: the request is given up, an error here is moot
            raise

    def _generate_streamed(self, p: PreparedRequest, sink: Sink) -> RawResult:
        q = dataclasses.replace(p, abort=sink.abort)
        while not self._lock.acquire(timeout=0.02):  # wait for the model, unless the request is given up
            if sink.abort.is_set():
                return RawResult([RawCompletion([], "", "abort") for _ in range(p.sampling.n)])
        try:
            if self._spec_of(q) is None:
                return self._generate_batch([q], [sink])[0]
            raw = self._generate_batch([q])[0]  # speculative decoding: output arrives at the end
            sink.admit()
            for i, c in enumerate(raw.completions):
                sink.push(i, c.token_ids, c.text, logprobs=c.logprobs, top_logprobs=c.top_logprobs,
                          finish_reason=c.finish_reason, stop_string=c.stop_string)
            return raw
        finally:
            self._lock.release()

    def _run_group(
        self,
        key: GroupKey,
        members: list[int],
        batch: list[PreparedRequest],
        prompts: list[list[int]],
        comps: list[list[RawCompletion]],
        sinks: list[Sink] | None = None,
    ) -> None:
        temperature, top_p, top_k, max_tokens, stop, logprobs, _, n = key
        greedy = temperature == 0
        rows = 1 if greedy else n
        if rows <= self.max_batch_size:
            per_chunk, pieces = self.max_batch_size // rows, [rows]
        else:  # more samples than rows: one prompt per call, its samples over several calls
            per_chunk = 1
            pieces = [min(self.max_batch_size, rows - s) for s in range(0, rows, self.max_batch_size)]
        order = sorted(members, key=lambda i: len(prompts[i]))  # similar lengths share a chunk: less padding
        for start in range(0, len(order), per_chunk):
            chunk = order[start:start + per_chunk]
            samples: list[list[RawCompletion]] = [[] for _ in chunk]
            offset = 0
            for piece in pieces:
                targets = None
                if sinks is not None:  # row (prompt j, sample k) -> the samples it stands for
                    targets = [
                        [(sinks[i], s) for s in range(batch[i].sampling.n)] if greedy else [(sinks[i], offset + k)]
                        for i in chunk for k in range(piece)
                    ]
                got = self._generate_chunk(
                    [prompts[i] for i in chunk], [batch[i].deadline for i in chunk], piece,
                    temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                    stop=list(stop), logprobs=logprobs, aborts=[batch[i].abort for i in chunk], targets=targets,
                )
                offset += piece
                for j, s in enumerate(got):
                    samples[j].extend(s)
            for j, i in enumerate(chunk):
                if greedy:  # n identical samples: copy the one that ran
                    c = samples[j][0]
                    comps[i] = [
                        dataclasses.replace(
                            c, token_ids=list(c.token_ids),
                            logprobs=None if c.logprobs is None else list(c.logprobs),
                            top_logprobs=None if c.top_logprobs is None else [dict(d) for d in c.top_logprobs],
                        )
                        for _ in range(batch[i].sampling.n)
                    ]
                else:
                    comps[i] = samples[j]

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate_chunk(
        self,
        prompts: list[list[int]],
        deadlines: list[float | None],
        rows_per_prompt: int,
        *,
        temperature: float,
        top_p: float,
        top_k: int,
        max_tokens: int,
        stop: list[str],
        logprobs: int | None,
        aborts: list[threading.Event | None] | None = None,
        targets: list[list[tuple[Sink, int]]] | None = None,
    ) -> list[list[RawCompletion]]:
        """One ``generate`` call: ``rows_per_prompt`` samples for each prompt.

        ``aborts`` (one per prompt) stop a prompt's rows at their next token; ``targets`` (one per
        row) stream each row into its request's sink (see :class:`_RowStream`).
        """
        greedy = temperature == 0
        aborts = aborts or [None] * len(prompts)
        if all(a is not None and a.is_set() for a in aborts):  # every request was given up before it ran
            return [[RawCompletion([], "", "abort") for _ in range(rows_per_prompt)] for _ in prompts]
        ids, mask = self._left_pad(prompts)
        width = ids.shape[1]
        max_new = max_tokens
        if self.max_context:
            max_new = max(1, min(max_new, self.max_context - max(len(p) for p in prompts)))
        cfg = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=not greedy,
            num_return_sequences=rows_per_prompt,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            use_cache=True,
        )
        if not greedy:
            cfg.temperature = temperature
            cfg.top_p = top_p
            cfg.top_k = top_k
        streams = None
        if targets is not None:
            streams = [_RowStream(t, self.decode, stop) for t in targets]
            for j, p in enumerate(prompts):
                for sink, _ in targets[j * rows_per_prompt]:
                    sink.admit(len(p))
        stops = _RowStops(
            clock=self.clock, deadlines=[d for d in deadlines for _ in range(rows_per_prompt)],
            aborts=[a for a in aborts for _ in range(rows_per_prompt)], eos=set(self.eos_token_ids), width=width,
            max_new=max_new, stop=StopStringCriteria(self.tokenizer, stop) if stop else None, streams=streams,
        )
        capture = _RawLogprobs(logprobs) if logprobs is not None else None
        sequences = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=StoppingCriteriaList([stops]),
            logits_processor=LogitsProcessorList([capture] if capture else []),
        )
        generated = sequences[:, width:]
        rows = []
        for r, gen in enumerate(generated.tolist()):
            if r in stops.stopped_at:
                gen = gen[: stops.stopped_at[r] - width]
            token_ids, text, finish, matched = self._finish_row(gen, stop)
            if finish == "length" and stops.reason.get(r) in ("deadline", "abort"):
                finish = stops.reason[r]
            rows.append((token_ids, text, finish, matched))
        lengths = [len(row[0]) for row in rows]
        lps, tops = capture.result(generated, lengths) if capture else ([None] * len(rows), [None] * len(rows))
        samples: list[list[RawCompletion]] = [[] for _ in prompts]
        for r, (token_ids, text, finish, matched) in enumerate(rows):
            samples[r // rows_per_prompt].append(RawCompletion(token_ids, text, finish, lps[r], tops[r], matched))
            if streams is not None:
                streams[r].finish(token_ids, text, finish, matched, lps[r], tops[r])
        return samples

    def _finish_row(self, gen: list[int], stop: list[str]) -> tuple[list[int], str, str, str | None]:
        """Token ids, text, finish reason and matched stop string of one generated row (see the module docstring)."""
        ended = False
        eos = set(self.eos_token_ids)
        pad_is_special = self.pad_token_id not in eos and self.pad_token_id in self._special_ids
        for t, tok in enumerate(gen):
            if tok in eos:  # the EOS token was generated and is paid for: kept, as vLLM does
                gen, ended = gen[: t + 1], True
                break
            if pad_is_special and tok == self.pad_token_id:  # padding after a finished row
                gen, ended = gen[:t], True
                break
        text = self.decode(gen)
        if stop and any(s in text for s in stop):
            # shortest prefix whose text contains a stop string: O(log n) decodes
            lo, hi = 1, len(gen)
            while lo < hi:
                mid = (lo + hi) // 2
                if any(s in self.decode(gen[:mid]) for s in stop):
                    hi = mid
                else:
                    lo = mid + 1
            gen = gen[:lo]
            text = self.decode(gen)
            cut, matched = min((text.find(s), s) for s in stop if s in text)
            return gen, text[:cut], "stop", matched
        return gen, text, "stop" if ended else "length", None

    # ------------------------------------------------------------------ scoring
    def _last_logits(self, seqs: list[list[int]], keep: int) -> torch.Tensor:
        """Raw logits at the last ``keep`` positions of the left-padded ``seqs``: ``[B, keep, V]``."""
        ids, mask = self._left_pad(seqs)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw: dict[str, Any] = {"logits_to_keep": keep} if self._keep_logits else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw)
        return out.logits[:, -keep:, :]

    def _score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
        res: list[list[float]] = []
        with self._lock, torch.inference_mode():
            for s in range(0, len(prompts), self.max_batch_size):
                ps, cs = prompts[s:s + self.max_batch_size], continuations[s:s + self.max_batch_size]
                keep = max(len(c) for c in cs) + 1
                logits = self._last_logits([p + c for p, c in zip(ps, cs)], keep)
                for r, c in enumerate(cs):
                    # kept position keep-1-len(c)+j predicts c[j]; log_softmax row by row keeps memory small
                    first = keep - 1 - len(c)
                    ls = torch.log_softmax(logits[r, first:first + len(c)].float(), dim=-1)
                    idx = torch.tensor(c, dtype=torch.long, device=ls.device)
                    res.append(ls.gather(1, idx[:, None]).squeeze(1).tolist())
        return res

    def next_token_logprobs(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Raw next-token log-probabilities after each sequence: a float32 CPU tensor ``[batch, vocab]``."""
        seqs = [[int(t) for t in s] for s in token_ids]
        if not seqs or any(not s for s in seqs):
            got = token_ids if not seqs else "a list with an empty sequence"
            raise invalid("token_ids", "a non-empty list of non-empty token id sequences", got)
        parts = []
        with self._lock, torch.inference_mode():
            for s in range(0, len(seqs), self.max_batch_size):
                logits = self._last_logits(seqs[s:s + self.max_batch_size], 1)[:, -1, :]
                parts.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return torch.cat(parts, dim=0)

    def embed(self, texts: Sequence[str], *, max_tokens: int = 512) -> torch.Tensor:
        """Mean last-layer hidden state of each text (its first ``max_tokens`` tokens): float32 ``[batch, hidden]``.

        Local features for learned routers; no generation, nothing charged (a forward pass over the
        prompt, like prefix caching would reuse).
        """
        if isinstance(texts, str) or not texts or any(not isinstance(t, str) or not t for t in texts):
            raise invalid("texts", "a non-empty list of non-empty strings", texts)
        seqs = [self.encode(t)[:max_tokens] or [self.bos_token_id or 0] for t in texts]
        parts = []
        with self._lock, torch.inference_mode():
            for s in range(0, len(seqs), self.max_batch_size):
                ids, mask = self._left_pad(seqs[s:s + self.max_batch_size])
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                 output_hidden_states=True)
                h = out.hidden_states[-1].float()
                m = mask[..., None].to(h.dtype)
                parts.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
        return torch.cat(parts, dim=0)

    def __repr__(self) -> str:
        return f"HFBackend(name={self.name!r}, device={str(self.device)!r}, dtype={str(self.dtype)!r})"
