"""A small name registry, the library's extension point (backends, strategies, suites, rewards).

``Registry("strategy")`` maps names to factories; :meth:`Registry.get` raises
:class:`~budgetlm.errors.UnknownNameError` listing the registered names, as vLLM's
reasoning-parser registry and reasoning-gym's ``factory`` do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.io import JsonScalar

T = TypeVar("T")
U = TypeVar("U")


class Registry(Generic[T]):
    """Names → factories of one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, name: str, obj: None = None, *, overwrite: bool = False) -> Callable[[U], U]: ...

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        if not name or not isinstance(name, str):
            raise ConfigError(f"`name` must be a non-empty string, got {name!r}")

        def deco(o: T) -> T:
            if name in self._items and not overwrite:
                raise ConfigError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
            self._items[name] = o
            return o

        return deco if obj is None else deco(obj)

    def get(self, name: str) -> T:
        """The component registered as ``name``; unknown names list the available ones."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def coerce_option(value: str) -> JsonScalar:
    """A spec option's string value as bool, None, int or float when it reads as one (else the string).

    Used for the ``?key=value`` options of backend and suite specs.
    """
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
