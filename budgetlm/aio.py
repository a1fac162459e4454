"""Running budgetlm's async programs from synchronous code, and gathering calls that must not outlive a failure."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, also when this thread already runs an event loop
    (Jupyter): then it runs on a fresh loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="budgetlm-solve")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def gather_settled(aws: Iterable[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` that never leaves a call running behind it.

    When one call fails, the others are cancelled and awaited before the error propagates, so the
    engine aborts them and their meters are charged what they generated while the caller is still
    running (``gather`` alone would return at once and leave them generating).
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
