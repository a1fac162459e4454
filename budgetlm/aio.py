"""Running budgetlm's async programs from synchronous code, and gathering calls that must not outlive a failure."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

_CLEANUPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Callable[[], Awaitable[None]]]] = (
    weakref.WeakKeyDictionary())
_CLEANUPS_LOCK = threading.Lock()


def on_loop_exit(cleanup: Callable[[], Awaitable[None]]) -> None:
    """Run ``cleanup()`` on the running event loop before :func:`run_sync` closes it.

    For resources bound to one loop (HTTP clients): closed while their loop still runs, instead of
    complaining from the garbage collector after it closed.  Loops not driven by :func:`run_sync` never
    run it (their owner closes what it opened).
    """
    loop = asyncio.get_running_loop()
    with _CLEANUPS_LOCK:
        _CLEANUPS.setdefault(loop, []).append(cleanup)


async def _with_cleanups(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        with _CLEANUPS_LOCK:
            todo = _CLEANUPS.pop(asyncio.get_running_loop(), [])
        for fn in todo:
            try:
                await fn()
            except Exception:  # noqa: BLE001, S110 - closing is best effort; the result stands
                pass


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, also when this thread already runs an event loop
    (Jupyter): then it runs on a fresh loop in a helper thread.  Cleanups registered with
    :func:`on_loop_exit` run before the loop closes."""
    coro = _with_cleanups(coro)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    values: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            values.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
            errors.append(exc)

    t = threading.Thread(target=target, name="budgetlm-solve")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return values[0]


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
