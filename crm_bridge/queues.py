"""Queues and the agents who serve them: presence, capacity, skills, SLA per queue, business hours
and an overflow queue.

:class:`QueueDirectory` keeps the staffing data that routing decides on
(:class:`crm_bridge.routing.Routing` builds on it). The routing errors live here too, as the base
of the routing family of modules. Business hours and the overflow queue are stored and checked
here (:func:`check_queue`, :meth:`QueueDirectory.save_queue`) and read with
:meth:`Queue.open_at` / :attr:`Queue.overflow_queue`; routing acts on them in :mod:`crm_bridge.overflow`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from crm_bridge.business_hours import HoursError, check_hours, check_timezone, is_open
from crm_bridge.conversations import record_event
from pipeline.model import Priority
from pipeline.ports import Clock

PRESENCES = ("available", "busy", "away")
MAX_SLA_MINUTES = 60 * 24 * 30
_QUEUE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_SKILL = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


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


class InvalidQueue(ValidationError):
    """A queue that cannot be saved; ``problems`` lists each ``{"field", "message"}`` found."""

    code = "invalid_queue"

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in problems))
        self.problems = problems


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
    timezone: str = "UTC"
    business_hours: dict[str, list[str]] = field(default_factory=dict)  # see crm_bridge.business_hours
    overflow_queue: str | None = None

    def open_at(self, when: datetime) -> bool:
        """Whether the queue's business hours are open at ``when`` (always, without hours)."""
        return is_open(self.business_hours, self.timezone, when)

    def settings(self) -> dict[str, Any]:
        """What an admin sets (no live counts): the queue's value in the audit log."""
        return {
            "name": self.name,
            "description": self.description,
            "skills": list(self.skills),
            "sla_first_response": dict(self.sla_first_response),
            "timezone": self.timezone,
            "business_hours": {d: list(v) for d, v in self.business_hours.items()},
            "overflow_queue": self.overflow_queue,
        }


def _queue(row: asyncpg.Record, waiting: int = 0) -> Queue:
    return Queue(
        row["name"],
        row["description"],
        tuple(row["skills"]),
        dict(row["sla_first_response"]),
        waiting,
        row["timezone"],
        dict(row["business_hours"]),
        row["overflow_queue"],
    )


def check_queue(entry: Any) -> Queue:
    """``entry`` (a mapping as the admin page sends it) as a :class:`Queue`, or
    :class:`InvalidQueue` listing every problem with its field (``sla_first_response.high``,
    ``business_hours.mon`` ...). Whether the overflow queue exists is checked on save."""
    if not isinstance(entry, dict):
        raise InvalidQueue([{"field": "queue", "message": "a queue must be a mapping of fields"}])
    problems: list[dict[str, str]] = []

    def problem(name: str, message: str) -> None:
        problems.append({"field": name, "message": message})

    name = entry.get("name")
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        problem(
            "name",
            "queue names are 1-40 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
        name = ""
    description = entry.get("description") or ""
    if not isinstance(description, str) or len(description) > 500:
        problem("description", "the description must be text of at most 500 characters")
        description = ""
    raw_skills = entry.get("skills") or []
    if isinstance(raw_skills, str):
        raw_skills = raw_skills.split(",")
    skills: list[str] = []
    if not isinstance(raw_skills, list) or not all(isinstance(s, str) for s in raw_skills):
        problem("skills", "skills must be a list of words")
    else:
        skills = sorted({s.strip().lower() for s in raw_skills if s.strip()})
        bad = [s for s in skills if not _SKILL.match(s)]
        if bad:
            problem("skills", f"skills are single words of letters, digits, '-' or '_': not {', '.join(bad)}")
    sla: dict[str, int] = {}
    raw_sla = entry.get("sla_first_response") or {}
    if not isinstance(raw_sla, dict):
        problem("sla_first_response", "the SLA must map priorities to minutes")
    else:
        for key, minutes in raw_sla.items():
            try:
                priority = checked_priority(key)
            except ValidationError as e:
                problem("sla_first_response", str(e))
                continue
            if minutes is None or minutes == "":
                continue  # no SLA for this priority
            if (
                isinstance(minutes, bool)
                or not isinstance(minutes, int)
                or not 1 <= minutes <= MAX_SLA_MINUTES
            ):
                problem(
                    f"sla_first_response.{priority}",
                    f"a whole number of minutes from 1 to {MAX_SLA_MINUTES}, or empty for no SLA",
                )
                continue
            sla[priority] = minutes
    timezone = "UTC"
    try:
        timezone = check_timezone(entry.get("timezone", "UTC"))
    except HoursError as e:
        problem(e.field, str(e))
    hours: dict[str, list[str]] = {}
    try:
        hours = check_hours(entry.get("business_hours"))
    except HoursError as e:
        problem(e.field if e.field == "business_hours" else f"business_hours.{e.field}", str(e))
    overflow = entry.get("overflow_queue") or None
    if overflow is not None and not isinstance(overflow, str):
        problem("overflow_queue", "the overflow queue must be a queue name")
        overflow = None
    elif overflow is not None and overflow == name:
        problem("overflow_queue", "a queue cannot overflow into itself")
    if problems:
        raise InvalidQueue(problems)
    return Queue(name, description, tuple(skills), sla, 0, timezone, hours, overflow)


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
        return [_queue(r, r["waiting"]) for r in rows]

    async def queue(self, name: str) -> Queue | None:
        row = await self._pool.fetchrow(
            """SELECT q.*, (SELECT count(*) FROM handoffs h WHERE h.queue = q.name AND h.status = 'waiting') AS waiting
               FROM queues q WHERE q.name = $1""",
            name,
        )
        return _queue(row, row["waiting"]) if row else None

    async def save_queue(
        self, queue: Queue, *, create: bool, conn: asyncpg.Connection | None = None
    ) -> tuple[Queue | None, Queue]:
        """Create (``create``) or replace every setting of a checked queue (:func:`check_queue`).

        Returns ``(before, after)``. Raises :class:`Conflict` (``queue_exists``) when creating a
        queue that exists, :class:`NotFoundError` (``unknown_queue``) when replacing one that does
        not, :class:`InvalidQueue` when the overflow queue is unknown or would lead back here.
        """
        async with self._tx(conn) as c:
            await c.execute("LOCK TABLE queues IN SHARE ROW EXCLUSIVE MODE")  # overflow chains stay acyclic
            row = await c.fetchrow("SELECT * FROM queues WHERE name = $1", queue.name)
            if create and row is not None:
                raise Conflict(f"a queue named {queue.name} already exists", code="queue_exists")
            if not create and row is None:
                raise NotFoundError(f"no queue named {queue.name}", code="unknown_queue")
            if queue.overflow_queue is not None:
                chain = {
                    r["name"]: r["overflow_queue"]
                    for r in await c.fetch("SELECT name, overflow_queue FROM queues")
                }
                if queue.overflow_queue not in chain:
                    raise InvalidQueue(
                        [
                            {
                                "field": "overflow_queue",
                                "message": f"there is no queue named {queue.overflow_queue}",
                            }
                        ]
                    )
                seen: set[str] = {queue.name}
                at: str | None = queue.overflow_queue
                while at is not None:
                    if at in seen:
                        message = f"{queue.overflow_queue} overflows back into {queue.name}"
                        raise InvalidQueue([{"field": "overflow_queue", "message": message}])
                    seen.add(at)
                    at = chain.get(at)
            await c.execute(
                """INSERT INTO queues (name, description, skills, sla_first_response, timezone, business_hours, overflow_queue)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description, skills = EXCLUDED.skills,
                       sla_first_response = EXCLUDED.sla_first_response, timezone = EXCLUDED.timezone,
                       business_hours = EXCLUDED.business_hours, overflow_queue = EXCLUDED.overflow_queue""",
                queue.name,
                queue.description,
                list(queue.skills),
                queue.sla_first_response,
                queue.timezone,
                queue.business_hours,
                queue.overflow_queue,
            )
            await record_event(
                c, None, "queue_updated", {"queue": queue.name, **queue.settings()}, self._clock.now()
            )
            after = await c.fetchrow("SELECT * FROM queues WHERE name = $1", queue.name)
        return (_queue(row) if row is not None else None), _queue(after)

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
