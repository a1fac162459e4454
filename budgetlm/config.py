"""Base class for validated configs: pydantic models that raise the library's ``ConfigError``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ValidationError

from budgetlm.errors import ConfigError

_BOUNDS = {
    "greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"), "less_than": ("<", "lt"),
}
"""Pydantic constraint errors, phrased as "`x` must be >= 1, got 0"."""
_TYPES = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
}


def validation_message(exc: ValidationError, owner: str, unknown: str = "unknown field `{field}` in {owner}",
                       prefix: str = "") -> str:
    """One readable line per field error: "`field` must be …, got …" (``prefix`` goes before each field's name)."""
    msgs = []
    for err in exc.errors():
        loc = (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])).lstrip(".") or owner
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msgs.append(unknown.format(field=loc, owner=owner))
        elif msg.startswith("`"):
            msgs.append(msg)
        elif err["type"] in _BOUNDS:
            bound = (err.get("ctx") or {}).get(_BOUNDS[err["type"]][1])
            msgs.append(f"`{loc}` must be {_BOUNDS[err['type']][0]} {bound}, got {err.get('input')!r}")
        elif err["type"] in ("too_short", "too_long", "string_too_short", "string_too_long"):
            ctx = err.get("ctx") or {}
            short = err["type"].endswith("too_short")
            bound = ctx.get("min_length") if short else ctx.get("max_length")
            what = "character(s)" if err["type"].startswith("string") else "item(s)"
            msgs.append(f"`{loc}` must have {'at least' if short else 'at most'} {bound} {what}, got {err.get('input')!r}")
        elif err["type"] in _TYPES:
            msgs.append(f"`{loc}` must be {_TYPES[err['type']]}, got {err.get('input')!r}")
        elif err["type"] == "literal_error":
            msgs.append(f"`{loc}` must be {(err.get('ctx') or {}).get('expected')}, got {err.get('input')!r}")
        else:
            msgs.append(f"`{loc}`: {msg}, got {err.get('input')!r}")
    return f"invalid {owner}: " + "; ".join(msgs)


class Config(BaseModel):
    """A pydantic model whose validation errors are :class:`~budgetlm.errors.ConfigError`."""

    _unknown_field: ClassVar[str] = "unknown field `{field}` in {owner}"
    _prefix: ClassVar[str] = ""
    """Section a standalone model's field names are shown under in errors ("lora" gives "`lora.r` must be ...")."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, type(self).__name__, self._unknown_field, self._prefix)) from None

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Self:
        """``cls(**data)`` for a mapping built at run time (the model validates what is inside)."""
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | Path, what: str = "config") -> Self:
        """Read and validate a YAML file holding this config's fields (``what`` names it in errors)."""
        import yaml

        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{what} {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e}); fix the file's syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the config must be a mapping of fields, got {type(data).__name__}")
        return cls(**data)
