"""Routing of handoffs to agents, SLA alerts and notifications, on PostgreSQL (answering offers
and ending assignments: :mod:`crm_bridge.assignments`).

A handoff waits in its queue until :meth:`Routing.assign_next` offers it to an agent: the most
urgent, then oldest, waiting handoff goes to the least recently assigned available agent of its
queue with free capacity who has not been offered it before. Each step is one transaction; rows
are claimed with ``FOR UPDATE SKIP LOCKED``, so any number of server processes can route at once
without offering one handoff twice or filling an agent past capacity.

Lock order (to never deadlock): conversation -> assignment -> handoff -> ticket -> agent.
Every step appends an event (``assignment_offered``, ``assignment_accepted`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from crm_bridge.access import Person
from crm_bridge.assignments import Assignment, Assignments, assignment_from_row
from crm_bridge.conversations import HANDOFF_INSERT, record_event
from crm_bridge.overflow import PgQueueHours, closed_queues, overflow_waiting
from crm_bridge.queues import (
    PRESENCES,
    Agent,
    Conflict,
    NotFoundError,
    NotOwner,
    Queue,
    RoutingError,
    ValidationError,
    checked_priority,
)
from pipeline.ports import Clock

__all__ = [
    "PRESENCES",
    "Agent",
    "Assignment",
    "Conflict",
    "NotFoundError",
    "NotOwner",
    "Notification",
    "Person",
    "PgQueueHours",
    "Queue",
    "Routing",
    "RoutingError",
    "ValidationError",
]

# Serving order of waiting handoffs; the same expression as the handoffs_serve_idx index.
_RANK = "(CASE priority WHEN 'urgent' THEN 0 WHEN 'high' THEN 1 WHEN 'normal' THEN 2 ELSE 3 END)"


@dataclass(frozen=True)
class Notification:
    id: int
    user_id: int | None
    role: str | None
    kind: str
    data: dict[str, Any]
    created_at: datetime
    read_at: datetime | None


#: Queues with at least one agent who could take an offer now (same rules as ``_claim_agent``).
_STAFFED_QUEUES = """SELECT DISTINCT aq.name FROM agents a
    JOIN users u ON u.id = a.user_id AND NOT u.disabled
    CROSS JOIN LATERAL unnest(a.queues) AS aq(name)
    LEFT JOIN queues q ON q.name = aq.name
    WHERE a.presence = 'available' AND a.active < a.capacity
      AND a.skills @> COALESCE(q.skills, '{}'::text[])"""


class Routing(Assignments):
    """Queues, agents (see :class:`~crm_bridge.queues.QueueDirectory`), offers and assignments (see
    :class:`~crm_bridge.assignments.Assignments`), handoff routing and notifications.
    Safe to share; every method is its own transaction unless given ``conn`` (then it runs in a
    savepoint of the caller's transaction)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        clock: Clock,
        *,
        max_candidates: int = 25,
        skip_voice_handoffs: bool = False,
        overflow_after: timedelta | None = None,
    ) -> None:
        super().__init__(pool, clock)
        self._max_candidates = max_candidates
        # A waiting handoff of an open queue with nobody available moves to the queue's overflow
        # queue after this long (None: never; see overflow_waiting).
        self.overflow_after = overflow_after
        # When the Twilio warm transfer is on, it routes phone-call handoffs itself (to agents
        # reachable by phone); the general pass must not offer them to console agents first.
        self.skip_voice_handoffs = skip_voice_handoffs

    # ---- handoffs ----------------------------------------------------------------------------------
    async def enqueue(
        self,
        conversation_id: int,
        ticket_id: int | None,
        queue: str,
        priority: str,
        conn: asyncpg.Connection | None = None,
    ) -> int | None:
        """Put a conversation in ``queue``. Returns the handoff id, or None when the conversation
        already waits (or has an open offer): one open handoff per conversation.

        A ticket without a first-response deadline gets the queue's SLA for ``priority``.
        """
        priority = checked_priority(priority)
        now = self._clock.now()
        async with self._tx(conn) as c:
            handoff_id = await c.fetchval(HANDOFF_INSERT, conversation_id, ticket_id, queue, priority, now)
            if ticket_id is not None:
                await c.execute(
                    """UPDATE tickets t SET first_response_due = $3::timestamptz + make_interval(mins => (q.sla_first_response ->> $4)::int)
                       FROM queues q WHERE t.id = $1 AND q.name = $2 AND t.first_response_due IS NULL
                         AND q.sla_first_response ? $4""",
                    ticket_id,
                    queue,
                    now,
                    priority,
                )
            await record_event(
                c,
                conversation_id,
                "handoff_requested",
                {
                    "handoff": handoff_id,
                    "queue": queue,
                    "priority": priority,
                    "already_open": handoff_id is None,
                },
                now,
                ticket_id,
            )
        return handoff_id

    async def assign_next(self, queue: str | None = None) -> Assignment | None:
        """Offer the next waiting handoff (of ``queue``, or of any queue) to an agent.

        Returns the offer, or None when no waiting handoff has an eligible agent now. Handoffs
        another process is routing are skipped, never waited for.
        """
        now = self._clock.now()
        async with self._tx() as conn:
            passed: list[int] = []
            # queues where even a fresh handoff found nobody, and queues closed now (business
            # hours): their work waits for the opening (or moves to an overflow queue)
            unstaffed: list[str] = await closed_queues(conn, now)
            # Only queues with an agent free now: waiting work of queues nobody can take (however
            # many, however urgent) must not use up the candidates of a pass before the work of
            # a staffed queue is reached.
            staffed = [r["name"] for r in await conn.fetch(_STAFFED_QUEUES)]
            for _ in range(self._max_candidates):
                handoff = await conn.fetchrow(
                    f"""SELECT h.*, c.status AS conversation_status FROM handoffs h
                        JOIN conversations c ON c.id = h.conversation_id
                        WHERE h.status = 'waiting' AND ($1::text IS NULL OR h.queue = $1)
                          AND NOT ($4::boolean AND c.channel = 'voice')
                          AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.conversation_id = h.conversation_id
                                          AND t.status IN ('dialing', 'ringing', 'answered', 'connected'))
                          AND NOT (h.id = ANY($2::bigint[])) AND NOT (h.queue = ANY($3::text[]))
                          AND h.queue = ANY($5::text[])
                          AND NOT EXISTS (SELECT 1 FROM assignments x WHERE x.conversation_id = h.conversation_id
                                          AND x.status IN ('offered', 'accepted'))
                        ORDER BY {_RANK.replace("priority", "h.priority")}, h.created_at, h.id
                        FOR UPDATE OF h SKIP LOCKED LIMIT 1""",
                    queue,
                    passed,
                    unstaffed,
                    self.skip_voice_handoffs,
                    staffed,
                )
                if handoff is None:
                    return None
                if handoff["conversation_status"] == "closed":
                    await self._cancel_handoff(conn, handoff, "conversation closed", now)
                    continue
                agent_id = await self._claim_agent(conn, handoff, now)
                if agent_id is None:
                    passed.append(handoff["id"])
                    if not handoff["tried_agents"]:
                        unstaffed.append(handoff["queue"])
                    continue
                return await self._offer(conn, handoff, agent_id, now)
        return None

    async def offer_to_phone_agent(
        self, conversation_id: int, *, exclude: list[int] | None = None
    ) -> Assignment | None:
        """Offer this conversation's waiting handoff now to an available agent who has a phone
        (a warm transfer rings them at once). Agents in ``exclude`` or already tried are skipped.

        Returns the offer, or None when the conversation has no waiting handoff or nobody fits.
        """
        return await self._offer_now(conversation_id, exclude=exclude, phone_only=True)

    async def offer_to_browser_agent(
        self, conversation_id: int, *, exclude: list[int] | None = None
    ) -> Assignment | None:
        """Offer this conversation's waiting handoff now to an available agent who takes calls in
        the browser (``agents.softphone``): their console rings. Agents in ``exclude`` or already
        tried are skipped.

        Returns the offer, or None when the conversation has no waiting handoff or nobody fits.
        """
        return await self._offer_now(conversation_id, exclude=exclude, softphone_only=True)

    async def _offer_now(
        self,
        conversation_id: int,
        *,
        exclude: list[int] | None,
        phone_only: bool = False,
        softphone_only: bool = False,
    ) -> Assignment | None:
        # The conversation's waiting handoff, offered now to an agent that _claim_agent picks with
        # these filters (offer_to_phone_agent, offer_to_browser_agent).
        now = self._clock.now()
        async with self._tx() as conn:
            await conn.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
            handoff = await conn.fetchrow(
                "SELECT * FROM handoffs WHERE conversation_id = $1 AND status = 'waiting' FOR UPDATE",
                conversation_id,
            )
            if handoff is None:
                return None
            agent_id = await self._claim_agent(
                conn,
                handoff,
                now,
                phone_only=phone_only,
                softphone_only=softphone_only,
                exclude=exclude or [],
            )
            if agent_id is None:
                return None
            return await self._offer(conn, handoff, agent_id, now)

    async def set_softphone(self, user_id: int, on: bool) -> bool:
        """Whether the staff member takes voice handoffs in the browser; returns the stored setting."""
        stored = await self._pool.fetchval(
            """INSERT INTO agents (user_id, softphone, updated_at) VALUES ($1, $2, $3)
               ON CONFLICT (user_id) DO UPDATE SET softphone = EXCLUDED.softphone, updated_at = EXCLUDED.updated_at
               RETURNING softphone""",
            user_id,
            on,
            self._clock.now(),
        )
        return bool(stored)

    async def softphone(self, user_id: int) -> bool:
        """True when the agent takes voice handoffs in the browser."""
        return bool(await self._pool.fetchval("SELECT softphone FROM agents WHERE user_id = $1", user_id))

    async def _claim_agent(
        self,
        conn: asyncpg.Connection,
        handoff: asyncpg.Record,
        now: datetime,
        *,
        phone_only: bool = False,
        softphone_only: bool = False,
        exclude: list[int] | None = None,
    ) -> int | None:
        # The row lock (re-checked by PostgreSQL on the latest row version) plus the guarded
        # UPDATE keep active <= capacity even with many routers at once.
        agent_id = await conn.fetchval(
            """SELECT a.user_id FROM agents a JOIN users u ON u.id = a.user_id AND NOT u.disabled
               WHERE a.presence = 'available' AND a.active < a.capacity AND $1 = ANY(a.queues)
                 AND a.skills @> COALESCE((SELECT q.skills FROM queues q WHERE q.name = $1), '{}'::text[])
                 AND NOT (a.user_id = ANY($2::bigint[])) AND NOT (a.user_id = ANY($4::bigint[]))
                 AND (NOT $3 OR (COALESCE(u.phone, '') <> '' AND NOT a.softphone))
                 AND (NOT $5 OR a.softphone)
               ORDER BY a.last_assigned_at ASC NULLS FIRST, a.user_id
               FOR UPDATE OF a SKIP LOCKED LIMIT 1""",
            handoff["queue"],
            handoff["tried_agents"],
            phone_only,
            exclude or [],
            softphone_only,
        )
        if agent_id is None:
            return None
        return await conn.fetchval(
            """UPDATE agents SET active = active + 1, last_assigned_at = $2, updated_at = $2
               WHERE user_id = $1 AND active < capacity AND presence = 'available' RETURNING user_id""",
            agent_id,
            now,
        )

    async def _offer(
        self, conn: asyncpg.Connection, handoff: asyncpg.Record, agent_id: int, now: datetime
    ) -> Assignment:
        row = await conn.fetchrow(
            """INSERT INTO assignments (handoff_id, conversation_id, ticket_id, agent_id, queue, status, offered_at)
               VALUES ($1, $2, $3, $4, $5, 'offered', $6) RETURNING *""",
            handoff["id"],
            handoff["conversation_id"],
            handoff["ticket_id"],
            agent_id,
            handoff["queue"],
            now,
        )
        await conn.execute(
            "UPDATE handoffs SET status = 'offered', updated_at = $2 WHERE id = $1", handoff["id"], now
        )
        data = {
            "assignment": row["id"],
            "handoff": handoff["id"],
            "agent": agent_id,
            "queue": handoff["queue"],
            "priority": handoff["priority"],
        }
        await record_event(
            conn, handoff["conversation_id"], "assignment_offered", data, now, handoff["ticket_id"]
        )
        await conn.execute(
            "INSERT INTO notifications (user_id, kind, data, created_at) VALUES ($1, 'handoff_offered', $2, $3)",
            agent_id,
            {**data, "conversation_id": handoff["conversation_id"], "ticket_id": handoff["ticket_id"]},
            now,
        )
        return assignment_from_row(row)

    async def _cancel_handoff(
        self, conn: asyncpg.Connection, handoff: asyncpg.Record, reason: str, now: datetime
    ) -> None:
        await conn.execute(
            "UPDATE handoffs SET status = 'cancelled', updated_at = $2 WHERE id = $1", handoff["id"], now
        )
        await record_event(
            conn,
            handoff["conversation_id"],
            "handoff_cancelled",
            {"handoff": handoff["id"], "reason": reason},
            now,
            handoff["ticket_id"],
        )

    # ---- business hours and overflow (crm_bridge.overflow) ----------------------------------------
    async def overflow_waiting(self, *, limit: int = 50) -> int:
        """Move waiting handoffs of closed queues, and of open queues where nobody has been
        available for :attr:`overflow_after`, to their open overflow queue (see
        :func:`crm_bridge.overflow.overflow_waiting`). Returns the handoffs moved."""
        return await overflow_waiting(
            self._pool,
            self._clock.now(),
            no_agent_after=self.overflow_after,
            skip_voice_handoffs=self.skip_voice_handoffs,
            limit=limit,
        )

    async def waiting(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Waiting handoffs in serving order."""
        rows = await self._pool.fetch(
            f"""SELECT id, conversation_id, ticket_id, queue, priority, tried_agents, created_at FROM handoffs
                WHERE status = 'waiting' AND ($1::text IS NULL OR queue = $1) ORDER BY {_RANK}, created_at, id""",
            queue,
        )
        return [dict(r) for r in rows]

    # ---- SLA escalation and notifications ----------------------------------------------------------
    async def notify_sla_breaches(self) -> int:
        """Alert supervisors and admins once per breached SLA of an open ticket (``tickets.sla_breached``
        is kept by :meth:`crm_bridge.jobs.JobRunner.mark_sla_breaches`): one notification per role,
        so one role reading it leaves it unread for the other. Returns the breaches alerted."""
        now = self._clock.now()
        async with self._tx() as conn:
            # The supervisors' dedupe key is the breach's (as before admins were told); the admins'
            # adds ':admin'.
            rows = await conn.fetch(
                """INSERT INTO notifications (role, kind, data, created_at, dedupe_key)
                   SELECT r.role, 'sla_breach',
                          jsonb_build_object('ticket_id', t.id, 'ticket', t.protocol, 'sla', b.sla, 'queue', t.queue,
                                             'priority', t.priority, 'owner', t.owner, 'subject', t.subject,
                                             'conversation_id', t.conversation_id),
                          $1, 'sla_breach:' || t.id || ':' || b.sla || r.suffix
                   FROM tickets t CROSS JOIN LATERAL unnest(t.sla_breached) AS b(sla)
                   CROSS JOIN (VALUES ('supervisor', ''), ('admin', ':admin')) AS r(role, suffix)
                   WHERE t.status IN ('open', 'pending') AND cardinality(t.sla_breached) > 0
                     AND NOT EXISTS (SELECT 1 FROM notifications n
                                      WHERE n.dedupe_key = 'sla_breach:' || t.id || ':' || b.sla || r.suffix)
                   ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
                   RETURNING id, role, data""",
                now,
            )
            breaches = [r for r in rows if r["role"] == "supervisor"]  # one event per breach
            for r in breaches:
                d = r["data"]
                await record_event(
                    conn,
                    d["conversation_id"],
                    "sla_escalated",
                    {
                        "notification": r["id"],
                        "ticket": d["ticket"],
                        "sla": d["sla"],
                        "to": ["supervisor", "admin"],
                    },
                    now,
                    d["ticket_id"],
                )
        return len(breaches)

    async def notifications_for(
        self, user: Person, *, unread_only: bool = False, limit: int = 50
    ) -> list[Notification]:
        """The user's own notifications and those for their role, newest first."""
        rows = await self._pool.fetch(
            """SELECT * FROM notifications WHERE (user_id = $1 OR (user_id IS NULL AND role = $2))
                 AND (NOT $3 OR read_at IS NULL) ORDER BY created_at DESC, id DESC LIMIT $4""",
            user.id,
            user.role,
            unread_only,
            limit,
        )
        return [
            Notification(
                r["id"], r["user_id"], r["role"], r["kind"], r["data"], r["created_at"], r["read_at"]
            )
            for r in rows
        ]

    async def mark_read(self, notification_id: int, user: Person) -> bool:
        """Mark one of the user's notifications read (a role-wide one is read for the whole role).
        False when it is not theirs or was already read."""
        status = await self._pool.execute(
            """UPDATE notifications SET read_at = $3 WHERE id = $1 AND read_at IS NULL
                 AND (user_id = $2 OR (user_id IS NULL AND role = $4))""",
            notification_id,
            user.id,
            self._clock.now(),
            user.role,
        )
        return status.endswith(" 1")
