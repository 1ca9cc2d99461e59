"""The database of this process: ``DATABASE_URL``, or the embedded PostgreSQL started on demand."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from app.settings import Settings
from crm_bridge import db

T = TypeVar("T")


async def open_database(settings: Settings) -> tuple[str, db.EmbeddedPostgres | None, bool]:
    """The DSN to use, the embedded server when one was started, and whether it is brand new."""
    if settings.database_url:
        return settings.database_url, None, False
    embedded = db.EmbeddedPostgres(settings.data_dir / "pgdata")
    first_run = embedded.first_run
    print(
        f"closeloop: starting embedded PostgreSQL in {embedded.data_dir}"
        + (" (first run)" if first_run else ""),
        file=sys.stderr,
    )
    return await embedded.start(), embedded, first_run


async def with_pool(settings: Settings, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run ``work`` with a small migrated pool (CLI commands), then stop what was started."""
    dsn, embedded, _ = await open_database(settings)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        return await work(pool)
    finally:
        await pool.close()
        if embedded:
            await embedded.stop()
