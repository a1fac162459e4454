"""The server's config: validation naming the field, ``--backend`` parsing, per-key allowances."""

from __future__ import annotations

from typing import Any

import pytest

from budgetlm.errors import ConfigError
from budgetlm.server.config import EFFORT_BUDGETS, ServerConfig, parse_backend_args


def test_defaults_are_valid() -> None:
    cfg = ServerConfig()
    assert cfg.backends == {"default": "default"}
    assert cfg.host == "127.0.0.1" and cfg.port == 8000
    assert cfg.api_keys is None and cfg.allowance is None
    assert cfg.effort_budgets == EFFORT_BUDGETS and cfg.effort_budgets is not EFFORT_BUDGETS


@pytest.mark.parametrize(("fields", "named"), [
    ({"backends": {}}, "`backends` must name at least one backend"),  # nothing to serve
    ({"backends": {"budgetlm": "scripted"}}, "not 'budgetlm'"),  # reserved: budgetlm/<strategy> means the first backend
    ({"backends": {"a b": "scripted"}}, "`backends` names"),  # a space cannot appear in a model id
    ({"backends": {"a/b": "scripted"}}, "`backends` names"),  # '/' separates backend and strategy
    ({"backends": {"": "scripted"}}, "`backends` names"),  # empty name
    ({"allowance": {"wall_seconds": 60}}, "charged per request"),  # a daily wall-clock allowance is not tracked
    ({"api_keys": ["k"], "key_allowances": {"k": {"joules": 5}}}, "charged per request"),  # nor energy per key
    ({"port": 70000}, "`port` must be in 0..65535"),  # above the TCP range
    ({"port": -1}, "`port` must be in 0..65535"),  # negative
    ({"api_keys": [""]}, "`api_keys` must list non-empty keys"),  # an empty key would accept "Bearer "
    ({"api_keys": ["  "]}, "`api_keys` must list non-empty keys"),  # whitespace only
    ({"api_keys": []}, "`api_keys` must list non-empty keys"),  # no key could ever be accepted
    ({"allowance": {"output_tokens": 0}}, "`allowance.output_tokens` must be > 0"),  # zero allowance
    ({"allowance": {"usd": -1.0}}, "`allowance"),  # negative (Budget refuses it first)
    ({"allowance": {"tokens": 10}}, "unknown budget unit `tokens`"),  # unknown unit
    ({"allowance": {"output_tokens": 1.5}}, "whole number"),  # fractional token allowance
    ({"api_keys": ["k1"], "key_allowances": {"k2": {"output_tokens": 5}}}, "`key_allowances` names keys"),  # not a key
    ({"key_allowances": {"k1": {"output_tokens": 0}}}, "`key_allowances.k1.output_tokens` must be > 0"),  # zero override
    ({"strategies": ["sample", "nope"]}, "`strategies` must be registered strategy names"),  # unknown strategy
    ({"max_request_bytes": 0}, "`max_request_bytes` must be >= 1"),  # no body fits
    ({"max_batch": 0}, "`max_batch` must be >= 1"),  # no batch fits
    ({"batch_window_ms": -1}, "`batch_window_ms` must be >= 0"),  # negative wait
    ({"effort_budgets": {"low": 0}}, "`effort_budgets.low` must be >= 1"),  # an effort with no tokens
    ({"default_budget": {"output_tokens": 0}}, "`default_budget.output_tokens` must be > 0"),  # default spends nothing
    ({"max_budget": {"usd": 0}}, "`max_budget.usd` must be > 0"),  # a cap nothing fits under
    ({"bogus": 1}, "unknown field `bogus`"),  # typo in a YAML key
])
def test_invalid_config_names_the_field(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as ei:
        ServerConfig(**fields)
    assert named in str(ei.value)


def test_unknown_strategy_message_lists_registered_names() -> None:
    with pytest.raises(ConfigError) as ei:
        ServerConfig(strategies=["nope"])
    msg = str(ei.value)
    assert "'nope'" in msg and "majority" in msg and "sample" in msg


def test_valid_full_config() -> None:
    cfg = ServerConfig(backends={"default": "scripted", "small.v-2_x": "scripted"}, port=0, api_keys=["k1", "k2"],
                       allowance={"output_tokens": 100, "usd": 1.0}, key_allowances={"k2": {"output_tokens": 5}},
                       strategies=["sample", "majority"], max_request_bytes=1, batch_window_ms=0)
    assert list(cfg.backends) == ["default", "small.v-2_x"] and cfg.port == 0


@pytest.mark.parametrize(("args", "expected"), [
    (["vllm:default"], {"default": "vllm:default"}),  # one bare spec is the default backend
    (["scripted"], {"default": "scripted"}),  # a bare kind without ':'
    (["small=hf:default"], {"small": "hf:default"}),  # NAME=SPEC
    (["vllm:a", "hf:b"], {"default": "vllm:a", "b1": "hf:b"}),  # two unnamed: default, then b<index>
    (["vllm:a", "hf:b", "hf:c"], {"default": "vllm:a", "b1": "hf:b", "b2": "hf:c"}),  # three unnamed
    (["hf:default?dtype=float32"], {"default": "hf:default?dtype=float32"}),  # '=' in the query: still unnamed
    (["scripted?script=none"], {"default": "scripted?script=none"}),  # '=' in the query of a bare kind
    (["small=hf:default?dtype=float32"], {"small": "hf:default?dtype=float32"}),  # named, '=' in the query
    (["openai:http://h:8000/v1#m"], {"default": "openai:http://h:8000/v1#m"}),  # URL spec with ':' in it
    (["x=scripted", "vllm:a"], {"x": "scripted", "default": "vllm:a"}),  # named first: the unnamed is default
    (["default=hf:x", "vllm:y"], {"default": "hf:x", "b1": "vllm:y"}),  # explicit default: the unnamed gets b1
    ([], {}),  # nothing given
])
def test_parse_backend_args(args: list[str], expected: dict[str, str]) -> None:
    got = parse_backend_args(args)
    assert got == expected
    assert list(got) == list(expected)  # order kept: the first serves budgetlm/<strategy>


@pytest.mark.parametrize("args", [
    ["a=vllm:x", "a=hf:y"],  # the same name twice
    ["vllm:a", "default=hf:b"],  # an unnamed spec took `default` already
])
def test_parse_backend_args_duplicate_names(args: list[str]) -> None:
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_backend_args(args)


@pytest.mark.parametrize(("cfg", "key", "expected"), [
    ({}, "anything", None),  # no allowance: unlimited
    ({"allowance": {"output_tokens": 10}}, "k1", {"output_tokens": 10}),  # the common allowance
    ({"api_keys": ["k1", "k2"], "allowance": {"output_tokens": 10}, "key_allowances": {"k2": {"usd": 1.0}}},
     "k2", {"usd": 1.0}),  # the override replaces (not merges with) the common one
    ({"api_keys": ["k1", "k2"], "allowance": {"output_tokens": 10}, "key_allowances": {"k2": {"usd": 1.0}}},
     "k1", {"output_tokens": 10}),  # other keys keep the common one
    ({"api_keys": ["k1", "k2"], "key_allowances": {"k2": {"output_tokens": 3}}},
     "k1", None),  # only the overridden key is limited
])
def test_allowance_for(cfg: dict[str, Any], key: str, expected: dict[str, float] | None) -> None:
    assert ServerConfig(**cfg).allowance_for(key) == expected


def test_from_yaml_reads_every_section(tmp_path: Any) -> None:
    p = tmp_path / "server.yaml"
    p.write_text("backends: {default: scripted}\nport: 9000\napi_keys: [k1]\nallowance: {output_tokens: 5}\n"
                 "key_allowances: {k1: {output_tokens: 2}}\n", encoding="utf-8")
    cfg = ServerConfig.from_yaml(p, what="server config")
    assert cfg.port == 9000 and cfg.allowance_for("k1") == {"output_tokens": 2}
    p.write_text("backends: {default: scripted}\nport: 99999\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="`port`"):
        ServerConfig.from_yaml(p)
