"""The engine loop's scheduling, on a stand-in engine (no vLLM): seeded groups run alone, in order."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from budgetlm.backends.vllm_engine import SERIAL_GROUPS_WARNING, EngineLoop, EngineRequest


class FakeEngine:
    """Finishes every request one step after it was added; records which requests ran together."""

    def __init__(self) -> None:
        self.live: list[str] = []
        self.steps: list[list[str]] = []

    def add_request(self, request_id: str, prompt: Any, params: Any) -> None:
        self.live.append(request_id)

    def abort_request(self, ids: list[str]) -> None:
        self.live = [r for r in self.live if r not in ids]

    def step(self) -> list[Any]:
        ran, self.live = self.live, []
        self.steps.append(ran)
        return [SimpleNamespace(request_id=r, finished=True) for r in ran]


def _req(seed: int | None) -> EngineRequest:
    return EngineRequest(prompt_token_ids=[1, 2], params=SimpleNamespace(output_kind=None), seed=seed)


def test_seeded_groups_run_alone_and_the_loop_warns_once_when_seeds_serialise(caplog: pytest.LogCaptureFixture) -> None:
    eng = FakeEngine()
    loop = EngineLoop(eng)
    n = SERIAL_GROUPS_WARNING + 8
    reqs = [_req(seed) for seed in range(n) for _ in range(2)]  # two requests per seed
    with caplog.at_level(logging.WARNING, logger="budgetlm.backends.vllm"):
        loop.submit(reqs)
        for r in reqs:
            r.future.result(timeout=30)
        loop.close()
    seeds = {r.id: r.seed for r in reqs}
    assert all(len({seeds[i] for i in step}) <= 1 for step in eng.steps)  # never two seeds in one step
    assert sum(len(s) for s in eng.steps) == len(reqs) and max(len(s) for s in eng.steps) == 2  # a seed's pair together
    warned = [m for m in caplog.messages if "seeded request groups have waited" in m]
    assert len(warned) == 1 and loop.queued_groups >= SERIAL_GROUPS_WARNING


def test_unseeded_requests_share_steps() -> None:
    eng = FakeEngine()
    loop = EngineLoop(eng)
    reqs = [_req(None) for _ in range(16)]
    loop.submit(reqs)
    for r in reqs:
        r.future.result(timeout=30)
    loop.close()
    assert loop.queued_groups == 0 and sum(len(s) for s in eng.steps) == 16
    assert max(len(s) for s in eng.steps) == 16  # submitted together, all in one step
