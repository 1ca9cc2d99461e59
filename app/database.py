"""The database of this process: ``DATABASE_URL``, or the embedded PostgreSQL started on demand."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from app.settings import Settings
from crm_bridge import db

T = TypeVar("T")
log = logging.getLogger(__name__)


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


@dataclass
class DatabaseHealth:
    """What ``/healthz`` says about the database besides a ``SELECT 1``."""

    restarting: bool = False
    restarts: int = 0


async def supervise_embedded(
    embedded: db.EmbeddedPostgres,
    pool: asyncpg.Pool,
    health: DatabaseHealth,
    *,
    interval_s: float = 1.0,
    retry_max_s: float = 10.0,
) -> None:
    """Keep the embedded PostgreSQL running: when its process dies (a crash, ``kill -9``, the OOM
    killer) start it again on the same data directory, point the pool at it and drop the pool's
    dead connections. ``health.restarting`` is set meanwhile (``/healthz`` reports it). Runs until
    cancelled."""
    delay = interval_s
    while True:
        await asyncio.sleep(delay)
        if embedded.alive():
            delay = interval_s
            continue
        health.restarting = True
        log.warning(
            "embedded PostgreSQL stopped; starting it again", extra={"data_dir": str(embedded.data_dir)}
        )
        try:
            dsn = await embedded.restart()
            pool.set_connect_args(dsn)
            await pool.expire_connections()
        except Exception:
            delay = min(retry_max_s, max(interval_s, delay * 2))
            log.exception("embedded PostgreSQL did not start; retrying in %.0f s", delay)
            continue
        health.restarting = False
        health.restarts += 1
        delay = interval_s
        print(
            "closeloop: embedded PostgreSQL restarted after it stopped; no committed data is lost",
            file=sys.stderr,
        )
