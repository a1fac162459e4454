"""The name registry."""

from __future__ import annotations

import pytest

from budgetlm import ConfigError, UnknownNameError
from budgetlm.registry import Registry


def test_register_get_and_list() -> None:
    r: Registry[int] = Registry("widget")
    r.register("a", 1)

    @r.register("b")
    def b() -> int:
        return 2

    assert r.get("a") == 1 and r.get("b")() == 2
    assert r.names() == ["a", "b"] and "a" in r


def test_unknown_name_lists_available() -> None:
    r: Registry[int] = Registry("widget")
    r.register("alpha", 1)
    with pytest.raises(UnknownNameError, match="unknown widget 'beta'; available: alpha"):
        r.get("beta")


def test_duplicate_and_bad_names() -> None:
    r: Registry[int] = Registry("widget")
    r.register("a", 1)
    with pytest.raises(ConfigError, match="already registered"):
        r.register("a", 2)
    r.register("a", 3, overwrite=True)
    assert r.get("a") == 3
    with pytest.raises(ConfigError):
        r.register("", 1)
