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
* **Stop strings.**  ``stop_strings`` (with the tokenizer) make ``generate`` stop a row as soon as a
  token completes a stop string.  As on vLLM, the token ids keep every generated token up to and
  including the token that completed the stop string, while the text is cut before the stop string.
  The sample ends at the first end-of-sequence token, which is kept in ``token_ids`` (it was
  generated and is paid for, and vLLM counts it too) but adds no text; padding after a finished row
  is dropped.  ``finish_reason`` is ``"stop"`` for end of sequence or a stop string,
  ``"length"`` otherwise (token limit, context limit or deadline).
* **Deadlines.**  When the meter has a wall-seconds budget, a stopping criterion ends each row at its
  request's ``deadline`` (``finish_reason="length"``); at least one token is always generated.
* **Scoring and next-token logprobs** run one batched forward pass per chunk, left-padded with
  position ids from the attention mask (as ``generate`` does), computing logits only for the last
  positions that are needed (``logits_to_keep``).  :meth:`HFBackend.next_token_logprobs` makes this
  backend a :class:`~budgetlm.backends.base.TokenLevelBackend`.

Engine calls are serialised by a lock (the model and the RNG are shared), so the backend is safe to
use from several threads, e.g. through :meth:`~budgetlm.backends.base.Backend.agenerate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from budgetlm.backends.base import Backend, Message, PreparedRequest, RawCompletion, RawResult, SamplingParams
from budgetlm.costs import ModelInfo
from budgetlm.errors import ConfigError, invalid
from budgetlm.models import DEFAULT_MODEL_NAME, resolve_model_path
from budgetlm.thinking import ThinkingFormat

_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "float32": (torch.float32, 4.0),
    "bfloat16": (torch.bfloat16, 2.0),
    "float16": (torch.float16, 2.0),
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}

GroupKey = tuple[float, float, int, int, tuple[str, ...], int | None, int | None, int]


class _Deadlines(StoppingCriteria):
    """Ends each row at its own ``time.monotonic()`` deadline and records where it was ended."""

    def __init__(self, deadlines: list[float | None]) -> None:
        self.deadlines = deadlines
        self.stopped_at: dict[int, int] = {}
        """Row → sequence length (padded prompt included) when the deadline ended it."""

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        now = time.monotonic()
        done = [d is not None and now >= d for d in self.deadlines]
        for row, d in enumerate(done):
            if d and row not in self.stopped_at:
                self.stopped_at[row] = int(input_ids.shape[1])
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
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"`messages` need a chat template, but the tokenizer of {self.name!r} has none; "
                "pass a raw `prompt` instead, or use an instruction-tuned checkpoint"
            )
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

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
                    ngram: int = 3) -> Iterator[Any]:
        """Within the block, :meth:`generate` drafts and verifies (:mod:`budgetlm.backends.hf_speculative`).

        ``drafter``: ``"layerskip"`` (the target's first ``layers`` layers, default half), ``"ngram"``
        (prompt lookup of ``ngram``-grams), or a path to a smaller model with the same tokenizer.
        ``rule``/``alpha``: a speculative-cascade deferral rule (lossy) instead of lossless verification.
        """
        from budgetlm.backends.hf_speculative import SpeculativeDecoder

        dec = SpeculativeDecoder(self.model, self._drafter(drafter, layers, ngram), gamma=gamma, adaptive=adaptive,
                                 rule=rule, alpha=alpha)
        drafter_model = getattr(dec.drafter, "model", None)
        params = (sum(p.numel() for p in self.model.parameters()),
                  sum(p.numel() for p in drafter_model.parameters()) if drafter_model is not None else 0)
        prev = (getattr(self, "_spec", None), getattr(self, "_spec_params", (0, 0)))
        self._spec, self._spec_params = dec, params
        try:
            yield dec
        finally:
            self._spec, self._spec_params = prev

    def _drafter(self, spec: str, layers: int | None, ngram: int) -> Any:
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
        dec = self._spec
        eos = set(self.eos_token_ids)
        n_target, n_draft = self._spec_params
        out = []
        for p, prompt in zip(batch, prompts, strict=True):
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
        prompts = [self._prompt_ids(p) for p in batch]
        if getattr(self, "_spec", None) is not None:
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
                    self._run_group(key, members, batch, prompts, comps)
                    continue
                devices = []
                if self.device.type == "cuda":
                    devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    self._run_group(key, members, batch, prompts, comps)
        return [RawResult(c) for c in comps]

    def _run_group(
        self,
        key: GroupKey,
        members: list[int],
        batch: list[PreparedRequest],
        prompts: list[list[int]],
        comps: list[list[RawCompletion]],
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
            for piece in pieces:
                got = self._generate_chunk(
                    [prompts[i] for i in chunk], [batch[i].deadline for i in chunk], piece,
                    temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                    stop=list(stop), logprobs=logprobs,
                )
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
    ) -> list[list[RawCompletion]]:
        """One ``generate`` call: ``rows_per_prompt`` samples for each prompt."""
        greedy = temperature == 0
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
        kw: dict[str, Any] = {}
        if stop:
            cfg.stop_strings = stop
            kw["tokenizer"] = self.tokenizer
        criteria = StoppingCriteriaList()
        timer = None
        if any(d is not None for d in deadlines):
            timer = _Deadlines([d for d in deadlines for _ in range(rows_per_prompt)])
            criteria.append(timer)
        capture = _RawLogprobs(logprobs) if logprobs is not None else None
        sequences = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=criteria,
            logits_processor=LogitsProcessorList([capture] if capture else []), **kw,
        )
        generated = sequences[:, width:]
        rows = []
        for r, gen in enumerate(generated.tolist()):
            if timer is not None and r in timer.stopped_at:
                gen = gen[: timer.stopped_at[r] - width]
            rows.append(self._finish_row(gen, stop))
        lengths = [len(row[0]) for row in rows]
        lps, tops = capture.result(generated, lengths) if capture else ([None] * len(rows), [None] * len(rows))
        samples: list[list[RawCompletion]] = [[] for _ in prompts]
        for r, (token_ids, text, finish, matched) in enumerate(rows):
            samples[r // rows_per_prompt].append(RawCompletion(token_ids, text, finish, lps[r], tops[r], matched))
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
