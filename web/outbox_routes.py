"""The local outbox page for the embedded demo: verification codes nobody could text.

Admins only: a code in this list lets its reader verify as that customer. With Twilio
configured, codes go to the customer's phone and are blanked here once delivered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from fastapi import APIRouter, Depends, Query

from crm_bridge.verification import local_outbox


def outbox_router(pool: asyncpg.Pool, require: Callable[..., Callable[..., Awaitable[Any]]]) -> APIRouter:
    router = APIRouter()

    @router.get("/api/outbox", tags=["admin"], dependencies=[Depends(require("admin"))])
    async def list_local_outbox(limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
        """Verification texts waiting in the local outbox (no SMS provider configured)."""
        rows = await local_outbox(pool, limit=limit)
        return {"messages": [{**r, "created_at": r["created_at"].isoformat()} for r in rows]}

    return router
