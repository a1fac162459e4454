"""Evaluation suites by spec: ``get("reasoning_gym:chain_sum?min_digits=1&size=200")``.

Spec strings are ``KIND[:TARGET][?key=value&...]``; values become int, float, bool or None where
they parse as such (``true``/``false``, ``none``/``null``) and stay strings otherwise.  Kinds:

- ``reasoning_gym:TASK?size=100&seed=1&split=test&<difficulty>=...`` (:class:`ReasoningGymSuite`)
- ``jsonl:PATH?question_field=problem&answer_field=solution&grader=math`` (:class:`JsonlSuite`)
- ``csv:PATH?...`` (:class:`CsvSuite`, same options)
- ``humaneval?limit=20&timeout=10`` (:class:`HumanEvalSuite`)
- ``kb_agent?size=100&seed=1&difficulty=mixed&kb_size=30`` (:class:`KBAgentSuite`: offline multi-hop QA
  agent environment with ``search`` and ``calculator`` tools)
- ``reasoning_gym_agent:TASK?size=100&seed=1&...`` (:class:`ReasoningGymAgentSuite`: a reasoning-gym
  task with the ``calculator`` tool and an agent prompt)

A dict config block works too: ``{"kind": "reasoning_gym", "task": "chain_sum", "min_digits": 1}``
(``path`` for file kinds).  :func:`from_dataset` wraps a Hugging Face dataset from Python.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from budgetlm.errors import ConfigError
from budgetlm.evals.suites.base import DEFAULT_PROMPT, EvalItem, Grade, Suite
from budgetlm.evals.suites.files import CsvSuite, DatasetSuite, JsonlSuite
from budgetlm.evals.suites.humaneval import HumanEvalSuite
from budgetlm.evals.suites.kb_agent import KBAgentSuite
from budgetlm.evals.suites.reasoning_gym import ReasoningGymSuite
from budgetlm.evals.suites.rg_agent import ReasoningGymAgentSuite
from budgetlm.io import JsonScalar
from budgetlm.registry import Registry, coerce_option

__all__ = [
    "DEFAULT_PROMPT", "SUITES", "CsvSuite", "DatasetSuite", "EvalItem", "Grade", "HumanEvalSuite", "JsonlSuite",
    "KBAgentSuite", "ReasoningGymAgentSuite", "ReasoningGymSuite", "Suite", "from_dataset", "get", "names", "parse_spec",
]

SUITES: Registry[Callable[..., Suite]] = Registry("suite kind")
SUITES.register("reasoning_gym", ReasoningGymSuite)
SUITES.register("jsonl", JsonlSuite)
SUITES.register("csv", CsvSuite)
SUITES.register("humaneval", HumanEvalSuite)
SUITES.register("kb_agent", KBAgentSuite)
SUITES.register("reasoning_gym_agent", ReasoningGymAgentSuite)

_TARGET = {"reasoning_gym": "task", "reasoning_gym_agent": "task", "jsonl": "path", "csv": "path"}
"""The constructor parameter that the ``:TARGET`` part of a spec fills, per kind."""




def parse_spec(spec: str) -> tuple[str, dict[str, JsonScalar]]:
    """Split a spec string into its kind and constructor keyword arguments."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"`suite` must be a spec string like 'reasoning_gym:chain_sum?size=50', got {spec!r}")
    head, _, query = spec.strip().partition("?")
    kind, sep, target = head.partition(":")
    kind = kind.strip()
    params: dict[str, JsonScalar] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"suite spec {spec!r}: the options after '?' must be key=value pairs joined by '&'") from None
    for key, value in pairs:
        if key in params:
            raise ConfigError(f"suite spec {spec!r}: option {key!r} is given twice; keep one")
        params[key] = coerce_option(value)
    if sep:
        if kind not in _TARGET:
            SUITES.get(kind)  # unknown kinds list the available ones
            raise ConfigError(f"suite spec {spec!r}: kind {kind!r} takes no ':' part; use '{kind}?key=value'")
        if not target:
            raise ConfigError(f"suite spec {spec!r}: give the {_TARGET[kind]} after '{kind}:'")
        params[_TARGET[kind]] = target
    return kind, params


def _build(kind: str, params: Mapping[str, object], where: str) -> Suite:
    factory = SUITES.get(kind)
    sig = inspect.signature(factory)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_any:
        unknown = [k for k in params if k not in sig.parameters]
        if unknown:
            valid = ", ".join(p for p in sig.parameters if p != "self")
            raise ConfigError(f"suite {where}: unknown option(s) {', '.join(map(repr, unknown))} for kind {kind!r}; "
                              f"valid options: {valid}")
    missing = [p.name for p in sig.parameters.values()
               if p.default is inspect.Parameter.empty and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
               and p.name not in params]
    if missing:
        raise ConfigError(f"suite {where}: kind {kind!r} needs {', '.join(map(repr, missing))}")
    return factory(**params)


def get(spec: str | Mapping[str, object], **overrides: object) -> Suite:
    """The suite a spec string or dict config block describes; ``overrides`` replace its options."""
    params: dict[str, object]
    if isinstance(spec, Mapping):
        params = dict(spec)
        kind = params.pop("kind", None)
        if not isinstance(kind, str):
            raise ConfigError(
                f"a suite config block needs a `kind` ({', '.join(SUITES.names())}), got {dict(spec)!r}"
            )
        where = repr(dict(spec))
    elif isinstance(spec, str):
        kind, parsed = parse_spec(spec)
        params = dict(parsed)
        where = repr(spec)
    else:
        raise ConfigError(f"`suite` must be a spec string or a dict config block, got {type(spec).__name__}")
    params.update(overrides)
    return _build(kind, params, where)


def from_dataset(dataset: Iterable[Mapping[str, object]], **fields: Any) -> DatasetSuite:
    """A suite over a Hugging Face ``datasets.Dataset`` (or any sequence of dicts); see :class:`DatasetSuite`."""
    return DatasetSuite(dataset, **fields)


def names() -> list[str]:
    """The registered suite kinds."""
    return SUITES.names()
