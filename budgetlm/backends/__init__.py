"""Backends: one protocol over vLLM in-process, HF transformers and OpenAI-compatible servers.

:func:`load` builds a backend from a spec string:

==================================  ===========================================================
spec                                backend
==================================  ===========================================================
``default``                         the embedded default model on vLLM (on transformers if vLLM
                                    is not installed)
``vllm:PATH`` / ``vllm:default``    :class:`~budgetlm.backends.vllm.VLLMBackend`
``hf:PATH`` / ``hf:default``        :class:`~budgetlm.backends.hf.HFBackend`
``openai:URL#MODEL``                :class:`~budgetlm.backends.openai.OpenAIBackend`; several
                                    base URLs separated by ``,`` are used round-robin
==================================  ===========================================================

Options follow a ``?``: ``vllm:default?max_model_len=2048&gpu_memory_utilization=0.3``.
Backend classes are imported lazily, so ``import budgetlm`` never imports vLLM.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from budgetlm.backends.base import (
    Backend,
    Completion,
    EmbeddingBackend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreResult,
    TokenLevelBackend,
    make_request,
)
from budgetlm.errors import ConfigError
from budgetlm.io import JsonScalar
from budgetlm.registry import Registry, coerce_option

__all__ = [
    "Backend",
    "BackendSpec",
    "Completion",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "ScoreResult",
    "TokenLevelBackend",
    "EmbeddingBackend",
    "load",
    "make_request",
    "BACKENDS",
]

BACKENDS: Registry[str] = Registry("backend kind")
"""Backend kind → ``module:Class`` (imported on first use)."""
BACKENDS.register("vllm", "budgetlm.backends.vllm:VLLMBackend")
BACKENDS.register("hf", "budgetlm.backends.hf:HFBackend")
BACKENDS.register("openai", "budgetlm.backends.openai:OpenAIBackend")
BACKENDS.register("scripted", "budgetlm.backends.scripted:ScriptedBackend")

SPEC_FORMS = "default, vllm:PATH, hf:PATH, openai:URL#MODEL (PATH may be 'default'; options after '?', e.g. vllm:default?max_model_len=2048)"




def backend_class(kind: str) -> type[Backend]:
    """The backend class registered for ``kind`` (imports it)."""
    target = BACKENDS.get(kind)
    mod, _, cls = target.partition(":")
    backend: type[Backend] = getattr(importlib.import_module(mod), cls)
    return backend


def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class BackendSpec:
    """A backend spec string parsed once: ``kind:target?options`` (see the module docstring)."""

    spec: str
    """The string as given (stripped)."""
    kind: str
    """``vllm``, ``hf``, ``openai``, ``scripted`` (``default`` resolves to ``vllm`` or ``hf``)."""
    target: str
    """The model path (``default`` for the embedded model), or ``URLS#MODEL`` for ``openai``."""
    options: dict[str, JsonScalar] = field(default_factory=dict)
    """Options after ``?``, coerced (numbers, booleans)."""

    @classmethod
    def parse(cls, spec: str) -> BackendSpec:
        """Parse ``spec``; errors name the valid forms."""
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"`spec` must be a backend spec string, got {spec!r}; valid forms: {SPEC_FORMS}")
        spec = spec.strip()
        base, _, query = spec.partition("?")
        opts: dict[str, JsonScalar] = {k: coerce_option(v) for k, v in parse_qsl(query, keep_blank_values=True)}
        if base == "default":
            base = "vllm:default" if _vllm_available() else "hf:default"
        kind, sep, target = base.partition(":")
        if not sep and kind != "scripted":
            raise ConfigError(f"`spec` must look like one of: {SPEC_FORMS}; got {spec!r}")
        if kind not in BACKENDS:
            raise ConfigError(f"unknown backend kind {kind!r} in spec {spec!r}; valid forms: {SPEC_FORMS}")
        return cls(spec, kind, target, opts)

    @property
    def seeded(self) -> bool:
        """Whether the backend runs its own engine, which takes a ``seed`` (vLLM in process)."""
        return self.kind == "vllm"


def load(spec: str | BackendSpec | Backend, **kwargs: Any) -> Backend:
    """Build a backend from ``spec`` (see the module docstring); ``kwargs`` override options."""
    if isinstance(spec, Backend):
        return spec
    parsed = spec if isinstance(spec, BackendSpec) else BackendSpec.parse(spec)
    kind, target, opts = parsed.kind, parsed.target, {**parsed.options, **kwargs}
    # the kind's class: its keyword parameters differ by kind (``base_urls`` for openai, ``model`` for the others)
    make: Callable[..., Backend] = backend_class(kind)
    if kind == "openai":
        urls, hsh, model = target.partition("#")
        if not hsh or not model or not urls:
            raise ConfigError(f"`spec` for an OpenAI-compatible server must be openai:URL#MODEL, got {parsed.spec!r}")
        return make(base_urls=urls.split(","), model=model, **opts)
    if kind == "scripted":
        return make(**opts)
    if not target:
        raise ConfigError(f"`spec` {parsed.spec!r} names no model; use {kind}:PATH or {kind}:default")
    if target != "default" and not os.path.exists(os.path.expanduser(target)):
        raise ConfigError(
            f"model path {target!r} in spec {parsed.spec!r} does not exist; pass a local checkpoint directory "
            f"or '{kind}:default' for the embedded SmolLM2-135M-Instruct"
        )
    return make(model=target, **opts)
