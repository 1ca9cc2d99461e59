"""Queues and the agents who serve them: presence, capacity, skills, and SLA per queue.

:class:`QueueDirectory` keeps the staffing data that routing decides on
(:class:`crm_bridge.routing.Routing` builds on it). The routing errors live here too, as the base
of the routing family of modules.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from crm_bridge.conversations import record_event
from pipeline.model import Priority
from pipeline.ports import Clock

PRESENCES = ("available", "busy", "away")
_QUEUE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class RoutingError(Exception):
    """A routing or desk request was refused and nothing changed. ``code`` is stable."""

    code = "routing_refused"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class NotFoundError(RoutingError, LookupError):
    code = "not_found"


class NotOwner(RoutingError, PermissionError):
    """The agent does not own the conversation, ticket or offer they acted on."""

    code = "not_owner"


class ValidationError(RoutingError, ValueError):
    code = "invalid_request"


class Conflict(RoutingError):
    """The object is no longer in a state that allows the step (e.g. an offer already expired)."""

    code = "conflict"


@dataclass(frozen=True)
class Agent:
    user_id: int
    name: str
    presence: str
    capacity: int
    active: int
    skills: tuple[str, ...]
    queues: tuple[str, ...]
    last_assigned_at: datetime | None


@dataclass(frozen=True)
class Queue:
    name: str
    description: str
    skills: tuple[str, ...]
    sla_first_response: dict[str, int]  # minutes per priority
    waiting: int = 0


def _agent(row: asyncpg.Record) -> Agent:
    return Agent(
        row["user_id"],
        row["name"],
        row["presence"],
        row["capacity"],
        row["active"],
        tuple(row["skills"]),
        tuple(row["queues"]),
        row["last_assigned_at"],
    )


def checked_priority(value: str) -> str:
    """``value`` as a priority name, or :class:`ValidationError` (code ``invalid_priority``)."""
    try:
        return str(Priority(value))
    except ValueError:
        raise ValidationError(
            f"unknown priority {value!r}; use one of {', '.join(Priority)}", code="invalid_priority"
        ) from None


class QueueDirectory:
    """Agents and queues. Every method is its own transaction."""

    def __init__(self, pool: asyncpg.Pool, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock

    @asynccontextmanager
    async def _tx(self, conn: asyncpg.Connection | None = None) -> AsyncIterator[asyncpg.Connection]:
        """The caller's transaction (as a savepoint) when ``conn`` is given, else a new one."""
        if conn is not None:
            async with conn.transaction():
                yield conn
            return
        async with self._pool.acquire() as own, own.transaction():
            yield own

    # ---- agents ----------------------------------------------------------------------------------
    async def _upsert_agent(self, user_id: int, column: str, value: Any, event: dict[str, Any]) -> Agent:
        now = self._clock.now()
        async with self._tx() as conn:
            try:
                await conn.execute(
                    f"""INSERT INTO agents (user_id, {column}, updated_at) VALUES ($1, $2, $3)
                        ON CONFLICT (user_id) DO UPDATE SET {column} = EXCLUDED.{column}, updated_at = EXCLUDED.updated_at""",
                    user_id,
                    value,
                    now,
                )
            except asyncpg.ForeignKeyViolationError:
                raise NotFoundError(f"user {user_id} does not exist", code="unknown_user") from None
            await record_event(conn, None, "agent_updated", {"agent": user_id, **event}, now)
            row = await conn.fetchrow(
                "SELECT a.*, u.name FROM agents a JOIN users u ON u.id = a.user_id WHERE a.user_id = $1",
                user_id,
            )
        return _agent(row)

    async def set_presence(self, user_id: int, presence: str) -> Agent:
        """``available`` agents get offers; ``busy`` and ``away`` ones keep what they have."""
        if presence not in PRESENCES:
            raise ValidationError(f"presence must be one of {', '.join(PRESENCES)}", code="invalid_presence")
        return await self._upsert_agent(user_id, "presence", presence, {"presence": presence})

    async def set_capacity(self, user_id: int, capacity: int) -> Agent:
        """How many conversations the agent handles at once (offers count too)."""
        if not 0 <= capacity <= 100:
            raise ValidationError("capacity must be between 0 and 100", code="invalid_capacity")
        return await self._upsert_agent(user_id, "capacity", capacity, {"capacity": capacity})

    async def set_queues(self, user_id: int, queues: Sequence[str]) -> Agent:
        """The queues the agent serves; every one must exist."""
        wanted = sorted(set(queues))
        known = {
            r["name"]
            for r in await self._pool.fetch("SELECT name FROM queues WHERE name = ANY($1::text[])", wanted)
        }
        unknown = [q for q in wanted if q not in known]
        if unknown:
            raise ValidationError(f"unknown queue(s): {', '.join(unknown)}", code="unknown_queue")
        return await self._upsert_agent(user_id, "queues", wanted, {"queues": wanted})

    async def set_skills(self, user_id: int, skills: Sequence[str]) -> Agent:
        """The agent's skills; a queue that lists skills is served only by agents who have all of them."""
        wanted = sorted({s.strip().lower() for s in skills if s.strip()})
        return await self._upsert_agent(user_id, "skills", wanted, {"skills": wanted})

    async def agents(self) -> list[Agent]:
        rows = await self._pool.fetch(
            "SELECT a.*, u.name FROM agents a JOIN users u ON u.id = a.user_id ORDER BY u.name, a.user_id"
        )
        return [_agent(r) for r in rows]

    async def agent(self, user_id: int) -> Agent | None:
        row = await self._pool.fetchrow(
            "SELECT a.*, u.name FROM agents a JOIN users u ON u.id = a.user_id WHERE a.user_id = $1", user_id
        )
        return _agent(row) if row else None

    # ---- queues ----------------------------------------------------------------------------------
    async def queues(self) -> list[Queue]:
        rows = await self._pool.fetch(
            """SELECT q.*, (SELECT count(*) FROM handoffs h WHERE h.queue = q.name AND h.status = 'waiting') AS waiting
               FROM queues q ORDER BY q.name"""
        )
        return [
            Queue(
                r["name"], r["description"], tuple(r["skills"]), dict(r["sla_first_response"]), r["waiting"]
            )
            for r in rows
        ]

    async def upsert_queue(
        self,
        name: str,
        *,
        description: str = "",
        skills: Sequence[str] = (),
        sla_first_response: Mapping[str, int] | None = None,
    ) -> Queue:
        """Create or replace a queue. ``sla_first_response``: minutes per priority."""
        if not _QUEUE_NAME.match(name):
            raise ValidationError(
                "queue names are 1-40 lowercase letters, digits, '-' or '_'", code="invalid_queue_name"
            )
        sla = {checked_priority(k): v for k, v in (sla_first_response or {}).items()}
        if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in sla.values()):
            raise ValidationError("SLA minutes must be positive whole numbers", code="invalid_sla")
        wanted = sorted({s.strip().lower() for s in skills if s.strip()})
        async with self._tx() as conn:
            await conn.execute(
                """INSERT INTO queues (name, description, skills, sla_first_response) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description, skills = EXCLUDED.skills,
                                                    sla_first_response = EXCLUDED.sla_first_response""",
                name,
                description,
                wanted,
                sla,
            )
            await record_event(
                conn,
                None,
                "queue_updated",
                {"queue": name, "skills": wanted, "sla_first_response": sla},
                self._clock.now(),
            )
        return Queue(name, description, tuple(wanted), sla)

    async def sla_for(self, queue: str, priority: str) -> timedelta | None:
        """The first-response SLA of ``queue`` for ``priority``; None when the queue sets none."""
        minutes = await self._pool.fetchval(
            "SELECT (sla_first_response ->> $2)::int FROM queues WHERE name = $1",
            queue,
            checked_priority(priority),
        )
        return timedelta(minutes=minutes) if minutes else None
