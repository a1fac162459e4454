"""Base class for validated configs: pydantic models that raise the library's ``ConfigError``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ValidationError

from budgetlm.errors import ConfigError


def validation_message(exc: ValidationError, owner: str, unknown: str = "unknown field `{field}` in {owner}") -> str:
    """One readable line per field error: "`field` must be …, got …"."""
    msgs = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or owner
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msgs.append(unknown.format(field=loc, owner=owner))
        elif msg.startswith("`"):
            msgs.append(msg)
        else:
            msgs.append(f"`{loc}`: {msg}, got {err.get('input')!r}")
    return f"invalid {owner}: " + "; ".join(msgs)


class Config(BaseModel):
    """A pydantic model whose validation errors are :class:`~budgetlm.errors.ConfigError`."""

    _unknown_field: ClassVar[str] = "unknown field `{field}` in {owner}"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, type(self).__name__, self._unknown_field)) from None

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
