"""The recipe registry and the light import of ``budgetlm.training`` (no trl until training starts)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import budgetlm.training
from budgetlm.errors import ConfigError, UnknownNameError
from budgetlm.training import RECIPES, Recipe, names
from budgetlm.training.compress import CompressRecipe
from budgetlm.training.effort import EffortRecipe


@pytest.mark.parametrize("name, cls", [
    ("effort", EffortRecipe),  # L1 / e1
    ("compress", CompressRecipe),  # LC-R1 / ThinkPrune / Kimi
])
def test_recipes_are_registered(name: str, cls: type[Recipe]) -> None:
    assert name in names() and name in RECIPES
    assert RECIPES.get(name) is cls and cls.name == name
    assert issubclass(cls, Recipe)


def test_names_are_sorted_and_match_the_registry() -> None:
    assert names() == sorted(names()) == RECIPES.names() == budgetlm.training.names()


def test_unknown_recipe_lists_the_available_ones() -> None:
    with pytest.raises(UnknownNameError) as err:
        RECIPES.get("nope")
    assert isinstance(err.value, ConfigError)
    msg = str(err.value)
    assert "unknown recipe 'nope'" in msg
    for name in names():
        assert name in msg


def test_import_does_not_load_trl() -> None:
    code = ("import sys, budgetlm.training; assert 'trl' not in sys.modules, 'trl imported'; "
            "assert budgetlm.training.RECIPES.get('effort'); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
