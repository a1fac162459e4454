"""The OpenAI-compatible server end to end: uvicorn in a thread, the official ``openai`` client, httpx.

Every server runs on the scripted backend.  The scripted answer ``The sum is 12. Answer: 12`` is 6
tokens and the prompt ``5+7?`` is 3 (the scripted chat template splits on whitespace).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from budgetlm.backends.scripted import ScriptedBackend
from budgetlm.server import ServerConfig, create_app

ANSWER = "The sum is 12. Answer: 12"
ANSWER_TOKENS = 6
PROMPT_TOKENS = 3
USER = [{"role": "user", "content": "5+7?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server: its URL, app state and backends."""

    url: str
    app: Any
    uv: uvicorn.Server
    thread: threading.Thread
    backends: dict[str, ScriptedBackend]

    @property
    def state(self) -> Any:
        return self.app.state.budgetlm

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, body: Any, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kw.setdefault("timeout", 60)
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, **kw)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.uv.should_exit = True
            self.thread.join(timeout=60)


Start = Callable[..., Server]


def _start(db: Path, script: Any = None, backends: dict[str, ScriptedBackend] | None = None, **cfg: Any) -> Server:
    port = _free_port()
    cfg.setdefault("backends", {name: "scripted" for name in backends} if backends else {"default": "scripted"})
    config = ServerConfig(port=port, db_path=str(db), **cfg)
    bes = backends or {name: ScriptedBackend([ANSWER] if script is None else script) for name in config.backends}
    app = create_app(config, backends=bes)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return Server(f"http://127.0.0.1:{port}", app, uv, thread, bes)


@pytest.fixture()
def start(tmp_path: Path) -> Iterator[Start]:
    """Starts servers (default db: tmp_path/server.sqlite) and stops them at the end."""
    servers: list[Server] = []

    def go(**kw: Any) -> Server:
        kw.setdefault("db", tmp_path / "server.sqlite")
        s = _start(**kw)
        servers.append(s)
        return s

    yield go
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One keyless, allowance-free server for tests that only read (two backends: default, small)."""
    backends = {"default": ScriptedBackend([ANSWER]), "small": ScriptedBackend(["Small says. Answer: 2"])}
    s = _start(tmp_path_factory.mktemp("shared") / "server.sqlite", backends=backends)
    yield s
    s.stop()


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics:\n{text}")


# ---------------------------------------------------------------------------------------------- answers


def test_plain_request_usage_equals_ledger(shared: Server) -> None:
    r = shared.client().chat.completions.create(model="budgetlm/sample", messages=USER)
    assert r.choices[0].message.content == ANSWER and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == "budgetlm/sample"
    assert r.id.startswith("chatcmpl-")
    extra = r.model_extra["budgetlm"]
    units = extra["ledger"]["units"]
    assert r.usage.completion_tokens == units["output_tokens"]["spent"] == ANSWER_TOKENS
    assert r.usage.prompt_tokens == units["input_tokens"]["spent"] == PROMPT_TOKENS
    assert r.usage.total_tokens == ANSWER_TOKENS + PROMPT_TOKENS
    assert extra["strategy"] == "sample" and extra["answer"] == "12" and extra["stop_reason"] == "done"
    assert extra["budget"] == {"output_tokens": 1024}  # the default budget
    assert extra["allowance_remaining"] is None  # no allowance: unlimited
    row = next(x for x in shared.state.store.requests() if x["id"] == r.id)
    assert row["usage"]["completion_tokens"] == ANSWER_TOKENS and row["status"] == "ok" and row["key"] == "anonymous"
    assert row["ledger"]["units"]["output_tokens"]["spent"] == ANSWER_TOKENS


@pytest.mark.parametrize(("kwargs", "budget"), [
    ({"max_completion_tokens": 8}, {"output_tokens": 8}),  # caps the default budget
    ({"max_tokens": 5}, {"output_tokens": 5}),  # the older name
    ({"max_completion_tokens": 8, "max_tokens": 5}, {"output_tokens": 5}),  # both: the smaller wins
    ({"reasoning_effort": "low"}, {"output_tokens": 512}),  # the effort table
    ({"reasoning_effort": "minimal", "max_completion_tokens": 100}, {"output_tokens": 100}),  # smallest of the two
    ({"reasoning_effort": "high", "extra_body": {"budget": {"output_tokens": 40}}}, {"output_tokens": 40}),  # budget wins
    ({"max_completion_tokens": 20, "extra_body": {"budget": {"output_tokens": 50}}}, {"output_tokens": 20}),  # cap wins
    ({"extra_body": {"budget": {"output_tokens": 40, "usd": 0.5}}}, {"output_tokens": 40, "usd": 0.5}),  # usd too
    ({"extra_body": {"budget": "output_tokens=30,usd=0.25"}}, {"output_tokens": 30, "usd": 0.25}),  # string form
    ({"extra_body": {"budget": {"usd": 0.5}}}, {"usd": 0.5}),  # a budget replaces the default entirely
    ({"extra_body": {"budget": {"usd": 0.5}}, "max_tokens": 9}, {"usd": 0.5, "output_tokens": 9}),  # cap adds a unit
])
def test_standard_fields_map_onto_the_budget(shared: Server, kwargs: dict[str, Any], budget: dict[str, float]) -> None:
    r = shared.client().chat.completions.create(model="budgetlm/sample", messages=USER, **kwargs)
    extra = r.model_extra["budgetlm"]
    assert extra["budget"] == budget
    limits = {u: v["limit"] for u, v in extra["ledger"]["units"].items() if v["limit"] is not None}
    assert limits == budget  # the meter enforced exactly that budget
    assert isinstance(extra["usd"], float)
    # one server-wide per-call cap (so different budgets share a batch); the meter clamps to the budget
    assert extra["params"]["max_tokens"] == shared.app.state.budgetlm.call_cap() >= budget.get("output_tokens", 0)
    assert r.usage.completion_tokens <= budget.get("output_tokens", r.usage.completion_tokens)


def test_small_budget_truncates(shared: Server) -> None:
    r = shared.client().chat.completions.create(model="budgetlm/sample", messages=USER, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "The sum is "
    assert r.usage.completion_tokens == 3 == r.model_extra["budgetlm"]["ledger"]["units"]["output_tokens"]["spent"]


@pytest.mark.parametrize(("model", "content", "tokens"), [
    ("budgetlm/sample", ANSWER, ANSWER_TOKENS),  # the first backend
    ("default/sample", ANSWER, ANSWER_TOKENS),  # the first backend by name
    ("budgetlm", ANSWER, ANSWER_TOKENS),  # a bare 'budgetlm': sample on the first backend
    ("small/sample", "Small says. Answer: 2", 4),  # the second backend
    ("small", "Small says. Answer: 2", 4),  # a bare backend name: sample
])
def test_model_names_pick_backend_and_strategy(shared: Server, model: str, content: str, tokens: int) -> None:
    r = shared.client().chat.completions.create(model=model, messages=USER)
    assert r.choices[0].message.content == content and r.usage.completion_tokens == tokens
    assert r.model_extra["budgetlm"]["strategy"] == "sample" and r.model == model


def test_voting_strategy_with_params_counts_every_sample(shared: Server) -> None:
    r = shared.client().chat.completions.create(model="budgetlm/majority", messages=USER,
                                                 extra_body={"strategy_params": {"n": 3}, "budget": {"output_tokens": 30}})
    extra = r.model_extra["budgetlm"]
    assert r.choices[0].message.content == ANSWER and extra["answer"] == "12" and extra["params"]["n"] == 3
    assert r.usage.completion_tokens == 3 * ANSWER_TOKENS == extra["ledger"]["units"]["output_tokens"]["spent"]


def test_majority_without_n_samples_what_the_budget_affords(shared: Server) -> None:
    """n unset: the sample count is the budget over the strategy's per-sample max_tokens (not one huge sample)."""
    r = shared.client().chat.completions.create(model="budgetlm/majority", messages=USER,
                                                 extra_body={"budget": {"output_tokens": 1024}})
    extra = r.model_extra["budgetlm"]
    assert extra["params"].get("n") is None and extra["params"].get("max_tokens", 256) == 256  # its own default
    assert r.usage.completion_tokens == 4 * ANSWER_TOKENS  # 1024 // 256 samples


@pytest.mark.parametrize("content", [
    [{"type": "text", "text": "5+7?"}],  # content parts: text kept
    [{"type": "text", "text": "5+"}, {"type": "text", "text": "7?"}],  # text parts joined
])
def test_content_parts_are_joined(shared: Server, content: list[dict[str, Any]]) -> None:
    r = shared.client().chat.completions.create(model="budgetlm/sample", messages=[{"role": "user", "content": content}])
    assert r.usage.prompt_tokens == PROMPT_TOKENS and r.choices[0].message.content == ANSWER


def test_developer_role_and_history(shared: Server) -> None:
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None}, {"role": "user", "content": "5+7?"}]
    r = shared.client().chat.completions.create(model="budgetlm/sample", messages=msgs)
    assert r.choices[0].message.content == ANSWER
    assert r.usage.prompt_tokens == 9  # '<|system|> ', 'be ', 'brief\n', '<|user|> ', 'hi\n', '<|assistant|> ', ...


# -------------------------------------------------------------------------------------------- streaming


def test_streamed_answer_equals_the_plain_one(shared: Server) -> None:
    c = shared.client()
    plain = c.chat.completions.create(model="budgetlm/sample", messages=USER)
    chunks = list(c.chat.completions.create(model="budgetlm/sample", messages=USER, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id != plain.id
    assert all(ch.object == "chat.completion.chunk" and ch.model == "budgetlm/sample" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content == ANSWER
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # more than one piece
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    ledger = finish[0].model_extra["budgetlm"]["ledger"]
    assert ledger["units"]["output_tokens"]["spent"] == ANSWER_TOKENS
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == plain.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_without_usage_and_truncated(shared: Server) -> None:
    chunks = list(shared.client().chat.completions.create(model="budgetlm/sample", messages=USER, stream=True,
                                                          max_completion_tokens=2))
    assert all(ch.usage is None and ch.choices for ch in chunks)  # no usage chunk without include_usage
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "The sum "
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_records_the_request(start: Start) -> None:
    s = start(allowance={"output_tokens": 100})
    chunks = list(s.client().chat.completions.create(model="budgetlm/sample", messages=USER, stream=True))
    rows = s.state.store.requests()
    assert [r["id"] for r in rows] == [chunks[0].id] and rows[0]["usage"]["completion_tokens"] == ANSWER_TOKENS
    assert s.state.store.spent("anonymous")["output_tokens"] == ANSWER_TOKENS
    assert s.state.store.remaining("anonymous", {"output_tokens": 100}) == {"output_tokens": 94.0}


# ------------------------------------------------------------------------------------ other endpoints


def test_models_lists_every_backend_and_allowed_strategy(start: Start) -> None:
    s = start(backends={"default": ScriptedBackend(), "small": ScriptedBackend()}, strategies=["sample", "majority"])
    ids = [m.id for m in s.client().models.list().data]
    assert ids == ["budgetlm/sample", "budgetlm/majority", "default/sample", "default/majority",
                   "small/sample", "small/majority"]
    with pytest.raises(openai.BadRequestError) as ei:  # a registered but not allowed strategy
        s.client().chat.completions.create(model="budgetlm/cot", messages=USER)
    assert "available strategies: sample, majority" in ei.value.message


def test_models_lists_every_registered_strategy_by_default(shared: Server) -> None:
    from budgetlm.strategies import names

    ids = {m.id for m in shared.client().models.list().data}
    assert ids == {f"{b}/{s}" for b in ("budgetlm", "default", "small") for s in names()}


def test_health(shared: Server) -> None:
    h = httpx.get(f"{shared.url}/health", timeout=30).json()
    assert h["status"] == "ok" and h["backends"] == {"default": "scripted", "small": "scripted"}
    assert h["running"] == {"default": 0, "small": 0} and h["uptime_s"] >= 0 and h["in_flight"] >= 0
    assert h["engines"] == {}  # scripted backends have no engine loop (vLLM's report steps and max_running)


def test_metrics_after_requests(start: Start) -> None:
    s = start()
    c = s.client()
    for _ in range(2):
        c.chat.completions.create(model="budgetlm/sample", messages=USER)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="budgetlm/nope", messages=USER)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="made-up-model-xyz", messages=USER)
    text = httpx.get(f"{s.url}/metrics", timeout=30).text
    assert _metric(text, 'budgetlm_requests_total{model="budgetlm/sample",status="ok"}') == 2
    assert _metric(text, 'budgetlm_tokens_total{kind="completion"}') == 2 * ANSWER_TOKENS
    assert _metric(text, 'budgetlm_tokens_total{kind="prompt"}') == 2 * PROMPT_TOKENS
    assert _metric(text, 'budgetlm_request_latency_seconds_count{strategy="sample"}') == 2
    assert _metric(text, 'budgetlm_request_latency_seconds_bucket{strategy="sample",le="+Inf"}') == 2
    assert _metric(text, "budgetlm_requests_in_flight") == 0
    assert sum(_metric(text, line.rsplit(" ", 1)[0]) for line in text.splitlines()
               if line.startswith("budgetlm_requests_total{") and ('status="400"' in line or 'status="404"' in line)) == 2
    assert "made-up-model-xyz" not in text  # client-chosen names never become label values


def test_allowance_endpoint(start: Start) -> None:
    s = start(api_keys=["sk-team-a"], allowance={"output_tokens": 50})
    s.client("sk-team-a").chat.completions.create(model="budgetlm/sample", messages=USER)
    got = httpx.get(f"{s.url}/v1/allowance", headers={"Authorization": "Bearer sk-team-a"}, timeout=30).json()
    assert got["key"] == "sk-t…" and got["allowance"] == {"output_tokens": 50}
    assert got["spent_today"]["output_tokens"] == ANSWER_TOKENS and got["remaining"] == {"output_tokens": 44}
    assert httpx.get(f"{s.url}/v1/allowance", timeout=30).status_code == 401


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"model": "budgetlm/nope"}, openai.BadRequestError, ["unknown strategy 'nope'", "majority", "sample"]),  # lists names
    ({"model": "nosuch/sample"}, openai.NotFoundError, ["unknown backend 'nosuch'", "default", "small"]),  # unknown backend
    ({"model": "nosuch"}, openai.NotFoundError, ["budgetlm/<strategy>", "default, small"]),  # bare unknown name
    ({"extra_body": {"budget": {"output_tokens": -1}}}, openai.BadRequestError, ["`budget`", ">= 0"]),  # negative
    ({"extra_body": {"budget": {"output_tokens": 0}}}, openai.BadRequestError, ["`budget.output_tokens` must be > 0"]),
    ({"extra_body": {"budget": {"tokens": 5}}}, openai.BadRequestError, ["unknown budget unit `tokens`"]),  # bad unit
    ({"extra_body": {"budget": "output_tokens=abc"}}, openai.BadRequestError, ["must be a number", "'abc'"]),  # string
    ({"extra_body": {"budget": "lots"}}, openai.BadRequestError, ["unit=value"]),  # not pairs
    ({"extra_body": {"budget": {"output_tokens": 2.5}}}, openai.BadRequestError, ["whole number"]),  # fractional
    ({"max_completion_tokens": 0}, openai.BadRequestError, ["`max_completion_tokens` must be >= 1"]),  # no tokens
    ({"reasoning_effort": "extreme"}, openai.BadRequestError, ["minimal, low, medium, high", "'extreme'"]),  # bad effort
    ({"n": 2}, openai.BadRequestError, ["`n` must be 1", "budgetlm/majority"]),  # several choices
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "model": "budgetlm/beam"},
     openai.BadRequestError, ["`tools` are supported by the strategies", "'beam'"]),  # not yet every strategy
    ({"messages": []}, openai.BadRequestError, ["at least one message"]),  # empty conversation
    ({"messages": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError, ["messages[0].role", "'robot'"]),
    ({"messages": [{"role": "user", "content": 5}]}, openai.BadRequestError, ["messages[0].content", "int"]),
    ({"extra_body": {"strategy_params": {"bogus": 1}}}, openai.BadRequestError,
     ["unknown parameter(s) 'bogus'", "temperature", "max_tokens"]),  # lists the valid parameters
    ({"model": "budgetlm/majority", "extra_body": {"strategy_params": {"n": 0}}}, openai.BadRequestError,
     ["`n` must be >= 1"]),  # the strategy's own validation
    ({"model": "budgetlm/majority", "extra_body": {"strategy_params": {"n": "three"}}}, openai.BadRequestError,
     ["strategy 'majority'", "`n` must be an integer, got 'three'"]),  # a wrong type is the client's error, not a 500
    ({"model": "budgetlm/cascade"}, openai.BadRequestError, ["`stages`"]),  # a strategy that needs parameters
])
def test_bad_input(shared: Server, kwargs: dict[str, Any], error: type[Exception], words: list[str]) -> None:
    call = {"model": "budgetlm/sample", "messages": USER, **kwargs}
    with pytest.raises(error) as ei:
        shared.client().chat.completions.create(**call)
    for w in words:
        assert w in ei.value.message, ei.value.message
    assert isinstance(ei.value.body, dict) and ei.value.body["message"]  # the OpenAI error shape


@pytest.mark.parametrize(("content", "status", "words"), [
    (b"{not json", 400, "must be JSON"),  # unparsable
    (b"[1, 2]", 400, "must be a JSON object"),  # not an object
    (b'{"messages": []}', 400, "`model` is required"),  # no model
    (b'{"model": "budgetlm/sample", "messages": "hi"}', 400, "`messages` must be a list, got 'hi'"),  # not a list
])
def test_bad_bodies(shared: Server, content: bytes, status: int, words: str) -> None:
    r = httpx.post(f"{shared.url}/v1/chat/completions", content=content, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status and words in r.json()["error"]["message"]


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize(("body", "param", "words"), [
    # booleans are never integers (pydantic's lax mode read true as 1)
    ({"max_completion_tokens": True}, "max_completion_tokens", ["`max_completion_tokens` must be an integer, got true"]),
    ({"max_tokens": False}, "max_tokens", ["`max_tokens` must be an integer, got false", "whole number"]),
    ({"n": True}, "n", ["`n` must be an integer, got true"]),
    ({"seed": True}, "seed", ["`seed` must be an integer, got true"]),
    ({"top_logprobs": True}, "top_logprobs", ["`top_logprobs` must be an integer, got true"]),
    ({"temperature": True}, "temperature", ["`temperature` must be a number, got true"]),
    ({"budget": {"output_tokens": True}}, "budget.output_tokens", ["`budget.output_tokens` must be a number, got true"]),
    ({"budget": {"output_tokens": "lots"}}, "budget.output_tokens", ["must be a number, got \"lots\""]),
    ({"budget": [100]}, "budget", ["`budget` must be a mapping", "output_tokens"]),
    ({"max_tokens": "many"}, "max_tokens", ["`max_tokens` must be an integer, got 'many'"]),
    # strategy parameters: named, with the expected type and the fix
    ({"model": "budgetlm/majority", "strategy_params": {"n": "four"}}, "strategy_params.n",
     ["strategy 'majority'", "`n` must be an integer, got 'four'", "the parameters of 'majority': n, max_tokens"]),
    ({"model": "budgetlm/majority", "strategy_params": {"n": True}}, "strategy_params.n",
     ["`strategy_params.n` must be an integer, got true", "whole number"]),
    ({"model": "budgetlm/majority", "strategy_params": {"max_tokens": False}}, "strategy_params.max_tokens",
     ["`strategy_params.max_tokens` must be an integer, got false"]),
    ({"model": "budgetlm/majority", "strategy_params": {"temperature": True}}, "strategy_params.temperature",
     ["`strategy_params.temperature` must be a number, got true"]),
    ({"model": "budgetlm/majority", "strategy_params": {"n": 0}}, "strategy_params.n", ["`n` must be >= 1, got 0"]),
    ({"strategy_params": {"bogus": 1}}, "strategy_params", ["unknown parameter(s) 'bogus'"]),
    # content parts: text only; nothing is dropped silently
    ({"messages": [{"role": "user", "content": [IMAGE]}]}, "messages[0].content",
     ["`messages[0].content` must hold at least one text part", "image_url"]),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                                 {"type": "file", "file": {}}]}]}, "messages[0].content",
     ["file, input_audio"]),
    ({"messages": [USER[0], {"role": "user", "content": [{"type": "text", "text": "see"}, IMAGE]}]},
     "messages[1].content[1]", ["`messages[1].content[1]` must be a text part", "'image_url'", "remove the image_url part"]),
    ({"messages": [{"role": "user", "content": ["5+7?"]}]}, "messages[0].content[0]",
     ["`messages[0].content[0]` must be a content part object", '"type": "text"']),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text",
     ["`messages[0].content[0].text` must be a string, got 5"]),
])
def test_bad_inputs_name_the_param(shared: Server, body: dict[str, Any], param: str, words: list[str]) -> None:
    r = shared.post({"model": "budgetlm/sample", "messages": USER, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]
    assert "not supported between" not in err["message"]  # never a Python comparison error


def test_image_only_message_via_the_client(shared: Server) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        shared.client().chat.completions.create(model="budgetlm/sample",
                                                messages=[{"role": "user", "content": [IMAGE]}])  # type: ignore[list-item]
    assert ei.value.status_code == 400 and "image_url" in ei.value.message
    assert isinstance(ei.value.body, dict) and ei.value.body["param"] == "messages[0].content"


# --------------------------------------------------------------------- the cap shared by every sample


@pytest.mark.parametrize(("body", "warning"), [
    ({"max_tokens": 96, "strategy_params": {"n": 8}},  # the proxy trap: 96 for the whole request, 12 per sample
     ["max_tokens=96 caps the whole request", "each of n=8 samples gets about 12 tokens",
      "the strategy's max_tokens is 256", "raise max_tokens to 2048"]),
    ({"max_completion_tokens": 300, "strategy_params": {"n": 3, "max_tokens": 200}},
     ["max_completion_tokens=300", "about 100 tokens", "strategy_params max_tokens is 200", "to 600"]),
    ({"budget": {"output_tokens": 200}, "strategy_params": {"n": 4}}, ["budget output_tokens=200", "about 50 tokens"]),
    ({"strategy_params": {"n": 8}}, ["the server's default budget (output_tokens=1024)", "about 128 tokens"]),
    ({"reasoning_effort": "minimal", "strategy_params": {"n": 3}}, ["reasoning_effort='minimal'", "about 42 tokens"]),
    ({"max_tokens": 96, "strategy_params": {"n": 8, "max_tokens": 12}}, None),  # 12 each: what was asked
    ({"max_tokens": 2048, "budget": {"output_tokens": 4096}, "strategy_params": {"n": 8}}, None),  # room for all
    ({"strategy_params": {"n": 2}}, None),  # 512 each under the default budget
    ({"max_tokens": 96}, None),  # n=None: the budget decides how many samples fit
])
def test_a_cap_below_the_per_sample_max_tokens_warns(shared: Server, body: dict[str, Any],
                                                      warning: list[str] | None) -> None:
    r = shared.post({"model": "budgetlm/majority", "messages": USER, **body})
    assert r.status_code == 200, r.text
    extra = r.json()["budgetlm"]
    if warning is None:
        assert extra["warnings"] == []
        return
    assert len(extra["warnings"]) == 1
    for w in warning:
        assert w in extra["warnings"][0], extra["warnings"][0]
    assert extra["budget"]["output_tokens"] < 1024 or "default budget" in extra["warnings"][0]


def test_single_sample_caps_do_not_warn(shared: Server) -> None:
    r = shared.client().chat.completions.create(model="budgetlm/sample", messages=USER, max_tokens=3)
    assert r.model_extra["budgetlm"]["warnings"] == [] and r.choices[0].finish_reason == "length"


def test_an_allowance_that_clamps_the_cap_warns(start: Start) -> None:
    s = start(allowance={"output_tokens": 100})
    r = s.post({"model": "budgetlm/majority", "messages": USER, "strategy_params": {"n": 4}})
    (warning,) = r.json()["budgetlm"]["warnings"]
    assert warning.startswith("the key's allowance left today (output_tokens=100) caps the whole request: each of n=4 "
                              "samples gets about 25 tokens")


def test_cap_warning_via_the_client_and_in_the_stream(shared: Server) -> None:
    c = shared.client()
    kw: dict[str, Any] = {"model": "budgetlm/majority", "messages": USER, "max_tokens": 96,
                          "extra_body": {"strategy_params": {"n": 8}}}
    r = c.chat.completions.create(**kw)
    (warning,) = r.model_extra["budgetlm"]["warnings"]
    assert warning.startswith("max_tokens=96 caps the whole request: each of n=8 samples gets about 12 tokens")
    assert r.model_extra["budgetlm"]["budget"] == {"output_tokens": 96}  # the documented semantics are unchanged
    chunks = list(c.chat.completions.create(stream=True, **kw))
    finals = [ch.model_extra["budgetlm"] for ch in chunks if (ch.model_extra or {}).get("budgetlm")]
    assert len(finals) == 1 and finals[0]["warnings"] == [warning]


def test_oversized_body_is_413(start: Start) -> None:
    s = start(max_request_bytes=300)
    c = s.client()
    c.chat.completions.create(model="budgetlm/sample", messages=USER)  # small bodies pass
    with pytest.raises(openai.APIStatusError) as ei:
        c.chat.completions.create(model="budgetlm/sample", messages=[{"role": "user", "content": "x" * 1000}])
    assert ei.value.status_code == 413 and "at most 300 bytes" in ei.value.message

    def chunked() -> Iterator[bytes]:  # no Content-Length: the body itself is measured
        yield b'{"model": "budgetlm/sample", "messages": [{"role": "user", "content": "'
        yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(f"{s.url}/v1/chat/completions", content=chunked(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "missing_api_key"),  # no header
    ({"Authorization": "Basic sk-a"}, "missing_api_key"),  # not a bearer token
    ({"Authorization": "Bearer sk-wrong"}, "invalid_api_key"),  # an unknown key
    ({"Authorization": "Bearer SK-A"}, "invalid_api_key"),  # keys are case-sensitive
])
def test_keys_are_required(start: Start, headers: dict[str, str], code: str) -> None:
    s = start(api_keys=["sk-a"])
    r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": "budgetlm/sample", "messages": USER},
                   headers=headers, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == code
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{s.url}/v1/models", headers=headers, timeout=30).status_code == 401
    assert httpx.get(f"{s.url}/health", timeout=30).status_code == 200  # health and metrics stay open
    assert httpx.get(f"{s.url}/metrics", timeout=30).status_code == 200
    assert s.state.store.requests() == []


def test_wrong_key_via_the_client(start: Start) -> None:
    s = start(api_keys=["sk-a"])
    with pytest.raises(openai.AuthenticationError) as ei:
        s.client("sk-b").chat.completions.create(model="budgetlm/sample", messages=USER)
    assert "invalid API key" in ei.value.message
    assert s.client("sk-a").chat.completions.create(model="budgetlm/sample", messages=USER).usage.completion_tokens == 6


@pytest.mark.parametrize(("budget", "ok"), [
    ({"output_tokens": 101}, False),  # above the cap
    ({"output_tokens": 100}, True),  # at the cap
    ({"usd": 2.0}, False),  # the usd cap
])
def test_max_budget_cap(start: Start, budget: dict[str, float], ok: bool) -> None:
    s = start(max_budget={"output_tokens": 100, "usd": 1.0})
    call = {"model": "budgetlm/sample", "messages": USER, "extra_body": {"budget": budget}}
    if ok:
        r = s.client().chat.completions.create(**call)
        assert r.model_extra["budgetlm"]["budget"] == {"output_tokens": 100, "usd": 1.0}  # uncapped units get the cap
    else:
        with pytest.raises(openai.BadRequestError) as ei:
            s.client().chat.completions.create(**call)
        assert "at most" in ei.value.message and ei.value.code == "budget_too_large"


@pytest.mark.parametrize(("kwargs", "budget"), [
    ({}, {"output_tokens": 100}),  # no budget asked: the default (1024) within the cap, not a 400
    ({"reasoning_effort": "low"}, {"output_tokens": 100}),  # 512 caps the capped default: 100
    ({"max_completion_tokens": 101}, {"output_tokens": 100}),  # an upper bound above the cap: the cap
    ({"max_completion_tokens": 20}, {"output_tokens": 20}),  # below the cap
])
def test_max_budget_caps_the_default_budget(start: Start, kwargs: dict[str, Any], budget: dict[str, float]) -> None:
    s = start(max_budget={"output_tokens": 100})
    r = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, **kwargs)
    assert r.model_extra["budgetlm"]["budget"] == budget


# --------------------------------------------------------------------------------------- allowances


def test_allowance_clamps_then_refuses_and_survives_a_restart(start: Start, tmp_path: Path) -> None:
    cfg = {"api_keys": ["k1", "k2", "k3"], "allowance": {"output_tokens": 10},
           "key_allowances": {"k3": {"output_tokens": 100}}, "db": tmp_path / "allowance.sqlite"}
    s = start(**cfg)
    c1 = s.client("k1")
    r1 = c1.chat.completions.create(model="budgetlm/sample", messages=USER)
    assert r1.usage.completion_tokens == 6 and r1.model_extra["budgetlm"]["allowance_remaining"] == {"output_tokens": 4}
    r2 = c1.chat.completions.create(model="budgetlm/sample", messages=USER)  # only 4 left: clamped, not refused
    assert r2.usage.completion_tokens == 4 and r2.choices[0].finish_reason == "length"
    assert r2.model_extra["budgetlm"]["budget"] == {"output_tokens": 4}
    with pytest.raises(openai.RateLimitError) as ei:
        c1.chat.completions.create(model="budgetlm/sample", messages=USER)
    msg = ei.value.message
    assert ei.value.status_code == 429 and ei.value.code == "allowance_exceeded"
    assert "daily allowance" in msg and "output_tokens 10 of 10" in msg and "00:00 UTC" in msg
    with pytest.raises(openai.RateLimitError):  # streamed requests are refused before streaming
        c1.chat.completions.create(model="budgetlm/sample", messages=USER, stream=True)
    assert s.client("k2").chat.completions.create(model="budgetlm/sample", messages=USER).usage.completion_tokens == 6
    for _ in range(3):  # k3's override is larger
        assert s.client("k3").chat.completions.create(model="budgetlm/sample", messages=USER).usage.completion_tokens == 6
    text = httpx.get(f"{s.url}/metrics", timeout=30).text
    assert _metric(text, "budgetlm_allowance_refusals_total") == 2
    assert len(s.state.store.requests("k1")) == 2  # refused requests leave no row
    s.stop()

    s2 = start(**cfg)  # a new process on the same database
    with pytest.raises(openai.RateLimitError):
        s2.client("k1").chat.completions.create(model="budgetlm/sample", messages=USER)
    r = s2.client("k2").chat.completions.create(model="budgetlm/sample", messages=USER)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"  # k2 had 4 left
    assert s2.state.store.spent("k3")["output_tokens"] == 18


def test_allowance_without_keys_is_shared_by_all(start: Start) -> None:
    s = start(allowance={"output_tokens": 7})
    assert s.client("a").chat.completions.create(model="budgetlm/sample", messages=USER).usage.completion_tokens == 6
    r = s.client("b").chat.completions.create(model="budgetlm/sample", messages=USER)  # another key, same "anonymous"
    assert r.usage.completion_tokens == 1
    with pytest.raises(openai.RateLimitError):
        s.client("c").chat.completions.create(model="budgetlm/sample", messages=USER)


def test_concurrent_requests_are_all_charged(start: Start) -> None:
    def script(prompt: str, i: int, sampling: Any) -> str:
        k = int(prompt.split("<|user|> q", 1)[1].split("\n", 1)[0])
        return "word " * (k % 5) + f"Answer: {k}"

    s = start(script=script, allowance={"output_tokens": 100_000})
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        c = s.client()
        for j in range(8):
            k = t * 8 + j
            try:
                r = c.chat.completions.create(model="budgetlm/sample", messages=[{"role": "user", "content": f"q{k}"}])
            except BaseException as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                continue
            with lock:
                results.append((k, r))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 64
    for k, r in results:  # every answer belongs to its own question
        assert r.model_extra["budgetlm"]["answer"] == str(k) and r.usage.completion_tokens == k % 5 + 2
    rows = s.state.store.requests()
    assert len(rows) == 64 and {r["id"] for r in rows} == {r.id for _, r in results}
    total = sum(r.usage.completion_tokens for _, r in results)
    assert s.state.store.spent("anonymous")["output_tokens"] == total
    assert sum(row["usage"]["completion_tokens"] for row in rows) == total
    assert s.backends["default"].requests == 64 and s.backends["default"].batches == []  # one engine request each
    assert _metric(httpx.get(f"{s.url}/metrics", timeout=30).text, "budgetlm_requests_in_flight") == 0


# ------------------------------------------------------------------------------------------ failures


def _broken(prompt: str, i: int, sampling: Any) -> str:
    raise RuntimeError("engine on fire")


def test_strategy_failure_is_500_and_releases_the_reservation(start: Start) -> None:
    s = start(script=_broken, allowance={"output_tokens": 50})
    with pytest.raises(openai.InternalServerError) as ei:
        s.client().chat.completions.create(model="budgetlm/sample", messages=USER)
    assert "engine on fire" in ei.value.message and ei.value.code == "strategy_failed"
    with pytest.raises(openai.APIError, match="engine on fire"):  # streamed: an error event
        list(s.client().chat.completions.create(model="budgetlm/sample", messages=USER, stream=True))
    assert s.state.store.remaining("anonymous", {"output_tokens": 50}) == {"output_tokens": 50.0}
    rows = s.state.store.requests()
    assert len(rows) == 2 and all(r["status"].startswith("error: ") for r in rows)
    text = httpx.get(f"{s.url}/metrics", timeout=30).text
    assert _metric(text, 'budgetlm_requests_total{model="budgetlm/sample",status="500"}') == 2  # each counted once
    assert _metric(text, "budgetlm_requests_in_flight") == 0


def _wait(cond: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# ------------------------------------------------------------------------ token streaming, cancelling

LONG = " ".join(f"w{i}" for i in range(40)) + " Answer: 7"
LONG_TOKENS = 42


def _slow(token_time: float = 0.05, script: Any = None) -> ScriptedBackend:
    """A backend emitting one token every ``token_time`` seconds (LONG unless ``script`` says otherwise)."""
    return ScriptedBackend([LONG] if script is None else script, token_time=token_time)


def test_single_sample_strategies_stream_tokens_as_they_are_generated(start: Start) -> None:
    s = start(backends={"default": _slow()})
    t0 = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    with s.client().chat.completions.create(model="budgetlm/sample", messages=USER, stream=True,
                                            stream_options={"include_usage": True}) as stream:
        assert stream.response.headers["x-budgetlm-stream"] == "tokens"
        chunks = []
        for ch in stream:
            chunks.append(ch)
            if ch.choices and ch.choices[0].delta.content:
                arrivals.append((time.monotonic() - t0, ch.choices[0].delta.content))
    assert "".join(c for _, c in arrivals) == LONG and len(arrivals) == LONG_TOKENS  # one chunk per token
    assert arrivals[-1][0] - arrivals[0][0] > 1.0  # 42 tokens 0.05 s apart: the first came long before the end
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert finish[0].model_extra["budgetlm"]["stream"] == "tokens"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == LONG_TOKENS


def test_a_vote_streams_the_finished_answer_and_says_so(shared: Server) -> None:
    with shared.client().chat.completions.create(model="budgetlm/majority", messages=USER, stream=True,
                                                 extra_body={"strategy_params": {"n": 3}}) as stream:
        assert stream.response.headers["x-budgetlm-stream"] == "buffered"
        chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ANSWER
    finish = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    extra = finish.model_extra["budgetlm"]
    assert extra["stream"] == "buffered" and extra["ledger"]["units"]["output_tokens"]["spent"] == 3 * ANSWER_TOKENS
    assert "strategy 'majority' does not stream token by token" in extra["stream_note"]
    assert "budgetlm/sample" in extra["stream_note"]  # the alternative that does


def test_a_short_request_does_not_wait_for_a_long_one(start: Start) -> None:
    def script(prompt: str, i: int, sampling: Any) -> str:
        return LONG if "long" in prompt else "Answer: 1"

    s = start(backends={"default": _slow(0.1, script=script)})  # the long answer takes 4.2 s
    long: dict[str, Any] = {}
    t = threading.Thread(target=lambda: long.update(r=s.client().chat.completions.create(
        model="budgetlm/sample", messages=[{"role": "user", "content": "long"}])))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    short = s.client().chat.completions.create(model="budgetlm/sample", messages=USER)
    took = time.monotonic() - t0
    assert short.choices[0].message.content == "Answer: 1" and took < 2.0  # 2 tokens, not behind the long one
    assert t.is_alive()  # the long request was still running meanwhile
    t.join(timeout=30)
    assert long["r"].usage.completion_tokens == LONG_TOKENS


def test_client_leaving_a_stream_cancels_it_and_settles_once(start: Start) -> None:
    s = start(backends={"default": _slow()}, allowance={"output_tokens": 100})
    got = 0
    stream = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, stream=True)
    for ch in stream:
        got += bool(ch.choices and ch.choices[0].delta.content)
        if got == 3:
            break
    stream.close()  # the client hangs up three tokens into a 42-token answer
    store = s.state.store
    assert _wait(lambda: len(store.requests()) == 1), "the abandoned request was never recorded"
    assert _wait(lambda: s.state.metrics.in_flight == 0)
    row = store.requests()[0]
    spent = store.spent("anonymous")["output_tokens"]
    assert row["status"].startswith("cancelled") and 3 <= spent < LONG_TOKENS  # the engine stopped generating
    assert row["usage"]["completion_tokens"] == spent == row["ledger"]["units"]["output_tokens"]["spent"]
    assert row["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert store.remaining("anonymous", {"output_tokens": 100}) == {"output_tokens": 100 - spent}  # nothing held
    time.sleep(0.5)
    assert store.spent("anonymous")["output_tokens"] == spent and len(store.requests()) == 1  # settled once
    text = httpx.get(f"{s.url}/metrics", timeout=30).text
    assert _metric(text, 'budgetlm_requests_total{model="budgetlm/sample",status="499"}') == 1
    assert _metric(text, 'budgetlm_tokens_total{kind="completion"}') == spent
    assert s.state.running() == {"default": 0}


def test_client_timing_out_cancels_and_settles_once(start: Start) -> None:
    s = start(backends={"default": _slow()}, allowance={"output_tokens": 100})
    with pytest.raises(httpx.TimeoutException):
        s.post({"model": "budgetlm/sample", "messages": USER}, timeout=0.5)
    store = s.state.store
    assert _wait(lambda: len(store.requests()) == 1), "the abandoned request was never recorded"
    assert _wait(lambda: s.state.metrics.in_flight == 0)
    row = store.requests()[0]
    spent = store.spent("anonymous")["output_tokens"]
    assert row["status"].startswith("cancelled") and spent < LONG_TOKENS  # stopped after ~0.5 s of 2.1 s
    assert row["usage"]["completion_tokens"] == spent
    assert store.remaining("anonymous", {"output_tokens": 100}) == {"output_tokens": 100 - spent}
    r2 = s.client().chat.completions.create(model="budgetlm/sample", messages=USER, max_completion_tokens=2)
    assert r2.usage.completion_tokens == 2  # the server serves on


def test_client_leaving_before_the_stream_starts_is_settled(start: Start) -> None:
    s = start(backends={"default": _slow()}, allowance={"output_tokens": 100})
    body = {"model": "budgetlm/sample", "messages": USER, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{s.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200  # headers only: the client leaves before reading anything
    store = s.state.store
    assert _wait(lambda: len(store.requests()) == 1)
    spent = store.spent("anonymous").get("output_tokens", 0)
    assert spent < LONG_TOKENS and store.remaining("anonymous", {"output_tokens": 100}) == {"output_tokens": 100 - spent}
    assert _wait(lambda: s.state.metrics.in_flight == 0)


# ------------------------------------------------------------------------------ context and openapi


class SmallContext(ScriptedBackend):
    """A model whose context holds 8 tokens."""

    def _max_context(self) -> int:
        return 8


class OverflowsWhenRun(ScriptedBackend):
    """A backend that finds the overflow only when it runs the request (e.g. a remote server)."""

    async def _agenerate_request(self, p: Any, sink: Any) -> Any:
        from budgetlm.errors import ContextLengthExceeded

        raise ContextLengthExceeded(4096, 2048)


def test_a_prompt_longer_than_the_context_is_400_and_not_retried(start: Start) -> None:
    s = start(backends={"default": SmallContext([ANSWER])}, allowance={"output_tokens": 100})
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", timeout=30)  # default retries (2), as users have
    long = [{"role": "user", "content": "word " * 20}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as ei:
            client.chat.completions.create(model="budgetlm/sample", messages=long, stream=stream)
        assert ei.value.status_code == 400 and ei.value.code == "context_length_exceeded"
        assert ei.value.param == "messages" and "context of 8 tokens" in ei.value.message
    text = httpx.get(f"{s.url}/metrics", timeout=30).text
    assert _metric(text, 'budgetlm_requests_total{model="budgetlm/sample",status="400"}') == 2  # sent once each
    assert s.state.store.requests() == [] and s.state.store.remaining("anonymous", {"output_tokens": 100}) == {
        "output_tokens": 100}  # nothing reserved or charged
    assert client.chat.completions.create(model="budgetlm/sample", messages=USER).choices[0].message.content == ANSWER


def test_context_overflow_found_while_running_is_400_too(start: Start) -> None:
    s = start(backends={"default": OverflowsWhenRun()}, allowance={"output_tokens": 100})
    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", timeout=30)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="budgetlm/sample", messages=USER)
    assert ei.value.code == "context_length_exceeded" and "4096 tokens" in ei.value.message
    with pytest.raises(openai.APIError) as es:  # streamed: the 200 is already sent, so an error event
        list(client.chat.completions.create(model="budgetlm/sample", messages=USER, stream=True))
    assert es.value.code == "context_length_exceeded"
    text = httpx.get(f"{s.url}/metrics", timeout=30).text
    assert _metric(text, 'budgetlm_requests_total{model="budgetlm/sample",status="400"}') == 2
    rows = s.state.store.requests()
    assert len(rows) == 2 and all(r["status"].startswith("error: ") for r in rows)
    assert s.state.store.remaining("anonymous", {"output_tokens": 100}) == {"output_tokens": 100}


def test_openapi_documents_the_request_body(shared: Server) -> None:
    spec = httpx.get(f"{shared.url}/openapi.json", timeout=30).json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] is True and schema["required"] == ["model", "messages"]
    props = schema["properties"]
    assert {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "temperature",
            "top_p", "seed", "reasoning_effort", "budget", "strategy_params", "n", "tools"} <= set(props)
    assert props["messages"]["items"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant",
                                                                        "tool"]
    assert props["stream_options"]["properties"] == {"include_usage": {"type": "boolean"}}
    assert "budget" in props["budget"]["description"] and schema["additionalProperties"] is True


def test_thinking_streams_as_reasoning_and_the_answer_as_content(start: Start) -> None:
    from budgetlm.thinking import ThinkingFormat

    be = ScriptedBackend(["<think> let me add </think> The sum is 12. Answer: 12"], thinking=ThinkingFormat())
    s = start(backends={"default": be})
    plain = s.client().chat.completions.create(model="budgetlm/sample", messages=USER)
    chunks = list(s.client().chat.completions.create(model="budgetlm/sample", messages=USER, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert content == plain.choices[0].message.content == ANSWER
    assert reasoning == "let me add"


@pytest.mark.parametrize("pieces", [
    ["<think>", "abc", "</think>", "Answer: 1"],  # whole tags
    list("<think>abc</think>Answer: 1"),  # every tag split over deltas
    ["<th", "ink> a", "bc </th", "ink> Answer", ": 1"],
])
def test_answer_text_splits_thinking_across_deltas(pieces: list[str]) -> None:
    from budgetlm.server.app import _AnswerText
    from budgetlm.thinking import ThinkingFormat

    a = _AnswerText(ThinkingFormat())
    reasoning = content = ""
    for p in pieces:
        r, c = a.feed(p)
        assert "<" not in r and "<" not in c  # never a piece of a tag
        reasoning, content = reasoning + r, content + c
    content += a.rest("Answer: 1")
    assert reasoning == "abc" and content == "Answer: 1"
