"""The budgetlm exception hierarchy.

Every error the library raises on purpose derives from :class:`BudgetLMError`, so callers can
catch the library's errors in one place.  Messages follow one pattern: which parameter, what it
must be, what it got, and how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable


class BudgetLMError(Exception):
    """Base class of every error raised by budgetlm."""


class InternalError(BudgetLMError, RuntimeError):
    """An invariant of budgetlm's own code does not hold (a bug: please report it with the traceback)."""


def missing(what: str) -> InternalError:
    """The error for an internal value that must be set at this point but is not."""
    return InternalError(f"internal error: {what} is unset here; this is a bug in budgetlm, please report it "
                         "with the traceback")


class ConfigError(BudgetLMError, ValueError):
    """A parameter, config value or input has an invalid value."""


def invalid(param: str, must: str, got: object, fix: str | None = None) -> ConfigError:
    """Build a :class:`ConfigError` with the library's message pattern.

    ``invalid("n", "a positive integer", 0, "pass n >= 1")`` gives
    "`n` must be a positive integer, got 0; pass n >= 1".
    """
    msg = f"`{param}` must be {must}, got {got!r}"
    if fix:
        msg += f"; {fix}"
    return ConfigError(msg)


class UnknownNameError(ConfigError, KeyError):
    """A name looked up in a registry is not registered; the message lists the valid names."""

    def __init__(self, kind: str, name: str, available: Iterable[str], hint: str | None = None):
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        msg = f"unknown {kind} {name!r}; available: {', '.join(self.available) or '(none)'}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0])


class BudgetExceeded(BudgetLMError):
    """A model or tool call cannot be made at all without overshooting the budget.

    Raised only when not even the smallest call fits (for example, one output token).  Calls
    that fit partly are clamped instead.  ``unit`` names the binding budget unit.
    """

    def __init__(self, message: str, unit: str | None = None, remaining: float | None = None):
        super().__init__(message)
        self.unit = unit
        self.remaining = remaining


class BackendError(BudgetLMError):
    """A backend failed to produce a result (bad model output, server error after retries)."""


class BackendUnavailable(BackendError, ConnectionError):
    """A backend cannot be reached or started (server down, missing package, missing model)."""


class MissingDependency(BudgetLMError, ImportError):
    """An optional dependency (vllm, trl, pynvml, ...) is needed for this feature."""

    def __init__(self, package: str, feature: str, extra: str | None = None):
        fix = f"pip install 'budgetlm[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the `{package}` package, which is not installed; run: {fix}")
        self.package = package


class ContextLengthExceeded(ConfigError):
    """A prompt leaves no room to generate within the model's context (HTTP 400 ``context_length_exceeded``)."""

    def __init__(self, prompt_tokens: int, max_context: int):
        super().__init__(
            f"the prompt has {prompt_tokens} tokens, which leaves no room to generate within the model's "
            f"context of {max_context} tokens; shorten the prompt or use a backend with a larger context "
            "(e.g. max_model_len)"
        )
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context


class StreamingUnsupported(ConfigError):
    """A strategy whose answer needs all its samples was asked to stream token by token."""
