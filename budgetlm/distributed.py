"""Several training processes (``accelerate launch``, torchrun): who is the main process, and how they agree.

Training under ``accelerate launch --num_processes N`` runs ``budgetlm train`` N times, one process per
device, joined by ``torch.distributed`` (gloo on the CPU, NCCL on GPUs).  The helpers here are the only
places budgetlm talks to that process group:

* :func:`world_size`, :func:`rank`, :func:`is_main` — the process group's view once it is initialised
  (TRL's ``GRPOConfig`` initialises it through accelerate), else a single process (rank 0 of 1);
* :func:`barrier`, :func:`all_gather` and :func:`share` — collectives that every process must call in
  the same order, or the ones that did wait forever (until the process group's timeout, 30 minutes by
  default).  :func:`share` runs a function on the main process only and hands its result — or the
  exception it raised — to every process, so an error on the main process fails all of them instead
  of leaving the others at a barrier.

Nothing here imports torch until a process group may exist: ``torch.distributed`` is looked up in
``sys.modules`` first, since no process group can be initialised without importing it, so
``import budgetlm`` and single-process reward calls stay light.  With one process every helper is a
no-op (``all_gather`` returns ``[obj]``, ``share`` just calls the function).

The collectives use ``torch.distributed``'s object collectives (``all_gather_object``,
``broadcast_object_list``) directly, the calls accelerate's ``gather_object``/``broadcast_object_list``
wrap, so they also work in a process group that accelerate did not set up (the tests' plain
``init_process_group``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

__all__ = ["all_gather", "barrier", "is_main", "rank", "share", "world_size"]

T = TypeVar("T")


def _dist() -> ModuleType | None:
    """``torch.distributed`` when a process group of more than one process is initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist if dist.get_world_size() > 1 else None


def world_size() -> int:
    """Processes in the initialised process group (1 without one)."""
    dist = _dist()
    return 1 if dist is None else int(dist.get_world_size())


def rank() -> int:
    """This process's rank (0 without a process group)."""
    dist = _dist()
    return 0 if dist is None else int(dist.get_rank())


def is_main() -> bool:
    """Whether this is the main process (rank 0), the one that writes the run folder."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (no-op with one process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def all_gather(obj: T) -> list[T]:
    """``obj`` of every process, in rank order (``[obj]`` with one process); a collective."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _Failed:
    """An exception raised on the main process, carried to the others by :func:`share`.

    Exceptions whose constructor takes other arguments than their message (``UnknownNameError``) do not
    unpickle; those travel as their message and come back as the nearest budgetlm error class.
    """

    def __init__(self, exc: BaseException) -> None:
        import pickle

        try:
            pickle.loads(pickle.dumps(exc))
            self.exc: BaseException | None = exc
        except Exception:
            self.exc = None
        self.kind = "config" if isinstance(exc, ValueError) else "budgetlm" if _is_budgetlm(exc) else "other"
        self.message = f"{type(exc).__name__}: {exc}" if self.kind == "other" else str(exc)

    def error(self) -> BaseException:
        """The exception to raise on this process."""
        if self.exc is not None:
            return self.exc
        from budgetlm.errors import BudgetLMError, ConfigError

        if self.kind == "config":
            return ConfigError(self.message)
        return BudgetLMError(self.message) if self.kind == "budgetlm" else RuntimeError(self.message)


def _is_budgetlm(exc: BaseException) -> bool:
    from budgetlm.errors import BudgetLMError

    return isinstance(exc, BudgetLMError)


def share(fn: Callable[[], T]) -> T:
    """``fn()`` run on the main process only, its result (or exception) given to every process; a collective."""
    dist = _dist()
    if dist is None:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as exc:  # re-raised below, on every process
            box[0] = _Failed(exc)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], _Failed):
        raise box[0].error()
    value: T = box[0]  # what fn() returned on the main process
    return value
