"""A budget-aware OpenAI-compatible server: any chat-completions client gets budgetlm's strategies.

``budgetlm serve --backend vllm:default --port 8000`` serves ``/v1/chat/completions`` and
``/v1/models`` for the official ``openai`` client (streaming included).  The model name picks the
strategy (``budgetlm/majority``), the request's ``budget`` extra field (or the standard
``max_completion_tokens`` / ``reasoning_effort``) its budget, and the response's ``usage`` is the
real spend, with the full ledger under ``budgetlm``.  Per-key daily allowances are enforced across
requests and persisted in SQLite (:mod:`.store`); ``/health`` and ``/metrics`` (Prometheus) report
on the server.  Each request is an asyncio task on the shared engine (streamed token by token for
single-sample strategies; a client that disconnects cancels it).  Modules: :mod:`.config`,
:mod:`.protocol`, :mod:`.dispatch` (one task per request), :mod:`.store`, :mod:`.metrics`, :mod:`.app`.

``import budgetlm.server`` does not import FastAPI; :func:`create_app` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from budgetlm.server.config import EFFORT_BUDGETS, ServerConfig, parse_backend_args
from budgetlm.server.store import AllowanceExceeded, AllowanceStore

if TYPE_CHECKING:
    from fastapi import FastAPI

    from budgetlm.backends.base import Backend

__all__ = ["EFFORT_BUDGETS", "AllowanceExceeded", "AllowanceStore", "ServerConfig", "create_app",
           "parse_backend_args", "serve"]


def create_app(cfg: ServerConfig, backends: dict[str, Backend] | None = None) -> FastAPI:
    """The FastAPI app (see :func:`budgetlm.server.app.create_app`)."""
    from budgetlm.server.app import create_app as _create

    return _create(cfg, backends)


def serve(cfg: ServerConfig, log_level: str = "info") -> None:
    """Run the server with uvicorn until interrupted (backends load at start-up)."""
    try:
        import uvicorn
    except ImportError as exc:
        from budgetlm.errors import MissingDependency

        raise MissingDependency("uvicorn", "budgetlm serve", extra="server") from exc
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level=log_level)
