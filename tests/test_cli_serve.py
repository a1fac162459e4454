"""``budgetlm serve``: flags and config files become a validated ServerConfig; bad input exits with 2.

``budgetlm.server.serve`` is replaced by a recorder in every test, so no server ever starts here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import budgetlm.server
from budgetlm.cli import app
from budgetlm.server import ServerConfig

runner = CliRunner()


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[ServerConfig, str]]:
    calls: list[tuple[ServerConfig, str]] = []
    monkeypatch.setattr(budgetlm.server, "serve", lambda cfg, log_level="info": calls.append((cfg, log_level)))
    return calls


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "`port` must be in 0..65535, got 70000"),  # above the TCP range
    (["--port", "-5"], "`port` must be in 0..65535"),  # negative
    (["--port", "abc"], "Invalid value for '--port'"),  # not a number (typer's own usage error)
    (["--allowance", "output_tokens=abc"], "budget `output_tokens` must be a number, got 'abc'"),  # bad number
    (["--allowance", "lots"], "comma-separated unit=value pairs"),  # not pairs
    (["--allowance", "tokens=5"], "unknown budget unit `tokens`"),  # unknown unit
    (["--allowance", "output_tokens=0"], "`allowance.output_tokens` must be > 0"),  # zero allowance
    (["--allowance", "output_tokens=1.5"], "whole number"),  # fractional tokens
    (["--max-budget", "usd=-1"], "`usd` must be >= 0"),  # negative cap
    (["--backend", "a=scripted", "--backend", "a=scripted"], "names must be unique"),  # duplicate names
    (["--backend", "budgetlm=scripted"], "not 'budgetlm'"),  # the reserved name
    (["--api-key", ""], "`api_keys` must list non-empty keys"),  # an empty key
    (["--config", "no/such/server.yaml"], "does not exist"),  # missing config file
])
def test_bad_input_exits_2_with_the_message(served: list[Any], args: list[str], message: str) -> None:
    res = runner.invoke(app, ["serve", *args])
    assert res.exit_code == 2, res.output
    assert message in _flat(res.output)
    assert served == []  # nothing was started


def test_bad_config_file(served: list[Any], tmp_path: Path) -> None:
    p = tmp_path / "server.yaml"
    p.write_text("backends: {default: scripted}\nallowance: {output_tokens: 5}\nkey_allowances: {k9: {usd: 1}}\n"
                 "api_keys: [k1]\n", encoding="utf-8")
    res = runner.invoke(app, ["serve", "--config", str(p)])
    assert res.exit_code == 2 and "`key_allowances` names keys that are not in `api_keys`" in _flat(res.output)
    p.write_text("backends: {default: scripted}\nbogus: 1\n", encoding="utf-8")
    res = runner.invoke(app, ["serve", "--config", str(p)])
    assert res.exit_code == 2 and "unknown field `bogus`" in _flat(res.output)
    assert served == []


def test_flags_build_the_config(served: list[Any], tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite"
    res = runner.invoke(app, ["serve", "-b", "scripted", "-b", "small=hf:default?dtype=float32", "--host", "0.0.0.0",
                              "--port", "0", "--api-key", "k1", "--api-key", "k2", "--db", str(db),
                              "--allowance", "output_tokens=5,usd=1", "--max-budget", "output_tokens=100",
                              "--log-level", "warning"])
    assert res.exit_code == 0, res.output
    (cfg, level), = served
    assert cfg.backends == {"default": "scripted", "small": "hf:default?dtype=float32"}
    assert cfg.host == "0.0.0.0" and cfg.api_keys == ["k1", "k2"] and cfg.db_path == str(db)
    assert cfg.port == 0  # 0 (any free port) is a valid port and must not fall back to the default
    assert cfg.allowance == {"output_tokens": 5, "usd": 1.0} and cfg.max_budget == {"output_tokens": 100}
    assert level == "warning"


def test_flags_override_the_config_file(served: list[Any], tmp_path: Path) -> None:
    p = tmp_path / "server.yaml"
    p.write_text("backends: {default: scripted, small: scripted}\nport: 9000\napi_keys: [k1]\n"
                 "allowance: {output_tokens: 5}\nkey_allowances: {k1: {output_tokens: 2}}\nmax_batch: 4\n",
                 encoding="utf-8")
    res = runner.invoke(app, ["serve", "-c", str(p), "--port", "9001", "--allowance", "output_tokens=7"])
    assert res.exit_code == 0, res.output
    (cfg, _), = served
    assert cfg.port == 9001 and cfg.allowance == {"output_tokens": 7} and cfg.max_batch == 4
    assert cfg.backends == {"default": "scripted", "small": "scripted"}  # kept from the file
    assert cfg.allowance_for("k1") == {"output_tokens": 2}
