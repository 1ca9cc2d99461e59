"""Intents as data: stored in PostgreSQL, seeded from YAML, edited through the API."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from pipeline.model import Intent

_COLUMNS = (
    "name",
    "description",
    "examples",
    "action",
    "required_slots",
    "policy",
    "queue",
    "priority",
    "sla_first_response_minutes",
    "sla_resolution_minutes",
    "answer",
    "enabled",
    "identity",
)


def load_yaml(path: Path) -> list[Intent]:
    """Parse an intents YAML file (a list of intent mappings). Errors name the entry at fault."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "intents" in data:
        data = data["intents"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of intents")
    intents: list[Intent] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {index + 1} is not a mapping")
        try:
            intents.append(Intent.from_dict(entry))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: intent {entry.get('name', index + 1)!r}: {e}") from e
    names = [i.name for i in intents]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate intent names")
    return intents


def dump_yaml(intents: Iterable[Intent]) -> str:
    return yaml.safe_dump([i.to_dict() for i in intents], sort_keys=False, allow_unicode=True, width=100)


def _from_row(row: asyncpg.Record) -> Intent:
    return Intent.from_dict({k: row[k] for k in _COLUMNS})


class IntentStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        """The database the intents live in (the admin audit log is written next to them)."""
        return self._pool

    async def list(self) -> list[Intent]:
        rows = await self._pool.fetch("SELECT * FROM intents ORDER BY name")
        return [_from_row(r) for r in rows]

    async def get(self, name: str) -> Intent | None:
        row = await self._pool.fetchrow("SELECT * FROM intents WHERE name = $1", name)
        return _from_row(row) if row else None

    async def upsert(self, intent: Intent, *, conn: asyncpg.Connection | None = None) -> Intent:
        values: dict[str, Any] = intent.to_dict()
        placeholders = ", ".join(f"${i + 1}" for i in range(len(_COLUMNS)))
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS[1:])
        await (conn or self._pool).execute(
            f"INSERT INTO intents ({', '.join(_COLUMNS)}) VALUES ({placeholders}) "
            f"ON CONFLICT (name) DO UPDATE SET {updates}, updated_at = now()",
            *[values[c] for c in _COLUMNS],
        )
        return intent

    async def delete(self, name: str) -> bool:
        result = await self._pool.execute("DELETE FROM intents WHERE name = $1", name)
        return result.endswith(" 1")

    async def seed_if_empty(self, intents: Sequence[Intent]) -> int:
        if await self._pool.fetchval("SELECT count(*) FROM intents"):
            return 0
        for intent in intents:
            await self.upsert(intent)
        return len(intents)

    async def replace_all(self, intents: Sequence[Intent]) -> None:
        """Replace every stored intent in one transaction: all or nothing."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM intents")
            for intent in intents:
                await self.upsert(intent, conn=conn)
