"""Offers and assignments of handoffs to agents, on PostgreSQL: an agent accepts or declines an
offer, an unanswered offer expires, and an assignment ends when its work is done or handed back.

:class:`Assignments` is the base of :class:`crm_bridge.routing.Routing`, which makes the offers.
Lock order (to never deadlock): conversation -> assignment -> handoff -> ticket -> agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from crm_bridge.conversations import HANDOFF_INSERT, record_event
from crm_bridge.queues import Conflict, NotFoundError, NotOwner, QueueDirectory, ValidationError
from crm_bridge.users import STAFF

LIVE = ("offered", "accepted")


@dataclass(frozen=True)
class Assignment:
    id: int
    handoff_id: int | None
    conversation_id: int
    ticket_id: int | None
    agent_id: int
    queue: str
    status: str
    offered_at: datetime
    responded_at: datetime | None = None
    ended_at: datetime | None = None


@dataclass(frozen=True)
class Handover:
    """What a transfer changed: the holder let go and the conversation waits in ``queue`` (for
    ``to_agent`` when the transfer named one; the caller offers it to them in the same transaction)."""

    conversation_id: int
    ticket_id: int | None
    from_agent: int
    queue: str
    to_agent: int | None
    handoff: asyncpg.Record  # the waiting handoff, as routing's offer step takes it
    before: dict[str, str | None]


def assignment_from_row(row: asyncpg.Record) -> Assignment:
    return Assignment(
        row["id"],
        row["handoff_id"],
        row["conversation_id"],
        row["ticket_id"],
        row["agent_id"],
        row["queue"],
        row["status"],
        row["offered_at"],
        row["responded_at"],
        row["ended_at"],
    )


class Assignments(QueueDirectory):
    """Answering offers and ending assignments (see :class:`~crm_bridge.queues.QueueDirectory` for
    agents and queues). Every method is its own transaction unless given ``conn``."""

    async def _locked_assignment(
        self, conn: asyncpg.Connection, assignment_id: int, agent_id: int
    ) -> asyncpg.Record:
        row = await conn.fetchrow("SELECT * FROM assignments WHERE id = $1 FOR UPDATE", assignment_id)
        if row is None:
            raise NotFoundError(f"assignment {assignment_id} not found")
        if row["agent_id"] != agent_id:
            raise NotOwner("this conversation was offered to another agent", code="not_your_offer")
        if row["status"] != "offered":
            raise Conflict(f"this offer is {row['status']}, not open any more", code="offer_not_open")
        return row

    async def accept(self, assignment_id: int, agent_id: int) -> Assignment:
        """The agent takes the conversation: they own it and its ticket from now on."""
        now = self._clock.now()
        owner = f"agent:{agent_id}"
        async with self._tx() as conn:
            conversation_id = await conn.fetchval(
                "SELECT conversation_id FROM assignments WHERE id = $1", assignment_id
            )
            if conversation_id is None:
                raise NotFoundError(f"assignment {assignment_id} not found")
            await conn.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
            offer = await self._locked_assignment(conn, assignment_id, agent_id)
            row = await conn.fetchrow(
                "UPDATE assignments SET status = 'accepted', responded_at = $2 WHERE id = $1 RETURNING *",
                assignment_id,
                now,
            )
            if offer["handoff_id"] is not None:
                await conn.execute(
                    "UPDATE handoffs SET status = 'assigned', updated_at = $2 WHERE id = $1",
                    offer["handoff_id"],
                    now,
                )
            if offer["ticket_id"] is not None:
                # first_response_at stays unset: the agent's first reply is the first response.
                await conn.execute(
                    "UPDATE tickets SET owner = $2, updated_at = $3 WHERE id = $1",
                    offer["ticket_id"],
                    owner,
                    now,
                )
            await conn.execute(
                "UPDATE conversations SET owner = $2, next_step = $3, updated_at = $4 WHERE id = $1",
                conversation_id,
                owner,
                "agent to reply",
                now,
            )
            await self._settle_offer_notice(conn, offer, now)
            await _record_assignment_event(conn, offer, "accepted", now)
        return assignment_from_row(row)

    async def decline(self, assignment_id: int, agent_id: int) -> Assignment:
        """The agent passes: the handoff waits again and is never offered to them again."""
        now = self._clock.now()
        async with self._tx() as conn:
            offer = await self._locked_assignment(conn, assignment_id, agent_id)
            return await self._end_offer(conn, offer, "declined", now)

    async def expire_offers(self, older_than: timedelta, queue: str | None = None) -> int:
        """Withdraw offers (of ``queue``, or of all queues) nobody answered within ``older_than``;
        returns how many. The handoff waits again for someone else."""
        now = self._clock.now()
        async with self._tx() as conn:
            rows = await conn.fetch(
                """SELECT * FROM assignments WHERE status = 'offered' AND offered_at <= $1 AND ($2::text IS NULL OR queue = $2)
                   ORDER BY offered_at FOR UPDATE SKIP LOCKED LIMIT 100""",
                now - older_than,
                queue,
            )
            for row in rows:
                await self._end_offer(conn, row, "expired", now)
        return len(rows)

    async def _end_offer(
        self, conn: asyncpg.Connection, offer: asyncpg.Record, status: str, now: datetime
    ) -> Assignment:
        row = await conn.fetchrow(
            "UPDATE assignments SET status = $2, responded_at = $3, ended_at = $3 WHERE id = $1 RETURNING *",
            offer["id"],
            status,
            now,
        )
        if offer["handoff_id"] is not None:
            await conn.execute(
                """UPDATE handoffs SET status = 'waiting', tried_agents = array_append(tried_agents, $2), updated_at = $3
                   WHERE id = $1 AND status = 'offered'""",
                offer["handoff_id"],
                offer["agent_id"],
                now,
            )
        await self._free_agent(conn, offer["agent_id"], now)
        await self._settle_offer_notice(conn, offer, now)
        await _record_assignment_event(conn, offer, status, now)
        return assignment_from_row(row)

    async def _settle_offer_notice(
        self, conn: asyncpg.Connection, offer: asyncpg.Record, now: datetime
    ) -> None:
        # An answered or withdrawn offer is no longer news for the agent.
        await conn.execute(
            """UPDATE notifications SET read_at = $3 WHERE user_id = $1 AND kind = 'handoff_offered' AND read_at IS NULL
                 AND data ->> 'assignment' = $2""",
            offer["agent_id"],
            str(offer["id"]),
            now,
        )

    async def _free_agent(self, conn: asyncpg.Connection, agent_id: int, now: datetime) -> None:
        await conn.execute(
            "UPDATE agents SET active = GREATEST(active - 1, 0), updated_at = $2 WHERE user_id = $1",
            agent_id,
            now,
        )

    async def transfer(
        self,
        conn: asyncpg.Connection,
        conversation_id: int,
        agent_id: int,
        *,
        queue: str | None = None,
        to_agent: int | None = None,
    ) -> Handover:
        """The agent who holds the conversation gives it to a queue or to another agent (inside
        the caller's transaction). The holder's assignment ends as ``transferred`` and their
        capacity is freed; the conversation and its open ticket wait in ``queue`` (default: the
        queue it came from) with a handoff that is never offered back to the holder. For
        ``to_agent`` (who must be available with free capacity) a seat is claimed here; the
        caller offers them the handoff (:meth:`crm_bridge.routing.Routing._offer`).
        """
        now = self._clock.now()
        # lock order: conversation -> assignment -> handoff -> ticket -> agent
        conv = await conn.fetchrow("SELECT * FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
        if conv is None:
            raise NotFoundError(f"conversation {conversation_id} not found")
        if conv["owner"] != f"agent:{agent_id}":
            raise NotOwner("only the agent who holds this conversation can transfer it")
        if to_agent == agent_id:
            raise ValidationError("you already hold this conversation", code="transfer_to_self")
        live = await conn.fetchrow(
            "SELECT * FROM assignments WHERE conversation_id = $1 AND agent_id = $2 AND status = 'accepted' FOR UPDATE",
            conversation_id,
            agent_id,
        )
        ticket = await conn.fetchrow(
            """SELECT id, queue, priority, owner FROM tickets WHERE (id = $1 OR conversation_id = $2)
                 AND status IN ('open', 'pending') ORDER BY (id = $1) DESC, id DESC LIMIT 1""",
            conv["ticket_id"],
            conversation_id,
        )
        target = queue or (live["queue"] if live else None) or (ticket["queue"] if ticket else None)
        if not target or await conn.fetchval("SELECT 1 FROM queues WHERE name = $1", target) is None:
            raise ValidationError(f"there is no queue named {target!r}", code="unknown_queue")
        if to_agent is not None:
            person = await conn.fetchrow("SELECT role, disabled FROM users WHERE id = $1", to_agent)
            if person is None or person["role"] not in STAFF:
                raise NotFoundError(f"there is no agent {to_agent}", code="unknown_agent")
        if live is not None:
            ended = await conn.fetchrow(
                "UPDATE assignments SET status = 'transferred', ended_at = $2 WHERE id = $1 RETURNING *",
                live["id"],
                now,
            )
            await _record_assignment_event(conn, ended, "transferred", now)
        owner = f"queue:{target}"
        priority = ticket["priority"] if ticket is not None else "normal"
        ticket_id = ticket["id"] if ticket is not None else None
        handoff_id = await conn.fetchval(HANDOFF_INSERT, conversation_id, ticket_id, target, priority, now)
        handoff = await conn.fetchrow(
            """UPDATE handoffs SET queue = $2, tried_agents = ARRAY[$3::bigint], updated_at = $4
               WHERE conversation_id = $1 AND status IN ('waiting', 'offered') AND ($5::bigint IS NULL OR id = $5)
               RETURNING *""",
            conversation_id,
            target,
            agent_id,
            now,
            handoff_id,
        )
        if ticket is not None:
            await conn.execute(
                "UPDATE tickets SET queue = $2, owner = $3, updated_at = $4 WHERE id = $1",
                ticket_id,
                target,
                owner,
                now,
            )
        await conn.execute(
            """UPDATE conversations SET owner = $2, status = 'escalated', next_step = 'waiting for an agent',
                      updated_at = $3 WHERE id = $1""",
            conversation_id,
            owner,
            now,
        )
        if live is not None:
            await self._free_agent(conn, agent_id, now)
        if to_agent is not None:
            seated = await conn.fetchval(
                """UPDATE agents a SET active = active + 1, last_assigned_at = $2, updated_at = $2
                    FROM users u WHERE a.user_id = $1 AND u.id = a.user_id AND NOT u.disabled
                      AND a.presence = 'available' AND a.active < a.capacity RETURNING a.user_id""",
                to_agent,
                now,
            )
            if seated is None:
                raise Conflict(
                    "that agent is not available or has no free capacity now; choose another agent or their queue",
                    code="agent_unavailable",
                )
        await record_event(
            conn,
            conversation_id,
            "transferred",
            {
                "by": agent_id,
                "from": conv["owner"],
                "to": f"agent:{to_agent}" if to_agent is not None else owner,
                "queue": target,
            },
            now,
            ticket_id,
        )
        before = {"owner": conv["owner"], "ticket_queue": ticket["queue"] if ticket is not None else None}
        return Handover(conversation_id, ticket_id, agent_id, target, to_agent, handoff, before)

    async def live_assignment(self, conversation_id: int) -> Assignment | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM assignments WHERE conversation_id = $1 AND status = ANY($2::text[])",
            conversation_id,
            list(LIVE),
        )
        return assignment_from_row(row) if row else None

    async def complete(
        self, conversation_id: int, conn: asyncpg.Connection | None = None
    ) -> Assignment | None:
        """End the conversation's live assignment (its ticket is done): the agent's capacity is
        freed and the AI answers the customer's next message. None when there was none."""
        now = self._clock.now()
        async with self._tx(conn) as c:
            await c.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
            live = await c.fetchrow(
                "SELECT * FROM assignments WHERE conversation_id = $1 AND status = ANY($2::text[]) FOR UPDATE",
                conversation_id,
                list(LIVE),
            )
            if live is None:
                return None
            return await self._end_assignment(c, live, "completed", now)

    async def hand_back(
        self, conversation_id: int, agent_id: int, conn: asyncpg.Connection | None = None
    ) -> Assignment | None:
        """The agent returns the conversation to the AI. Only its owner may; the ticket keeps its owner."""
        now = self._clock.now()
        async with self._tx(conn) as c:
            owner = await c.fetchval(
                "SELECT owner FROM conversations WHERE id = $1 FOR UPDATE", conversation_id
            )
            if owner is None:
                raise NotFoundError(f"conversation {conversation_id} not found")
            if owner != f"agent:{agent_id}":
                raise NotOwner("only the agent who owns this conversation can hand it back")
            live = await c.fetchrow(
                "SELECT * FROM assignments WHERE conversation_id = $1 AND agent_id = $2 AND status = 'accepted' FOR UPDATE",
                conversation_id,
                agent_id,
            )
            if live is None:  # owned without an assignment (set by hand): just give it back
                await self._release(c, conversation_id, f"agent:{agent_id}", now)
                await record_event(c, conversation_id, "conversation_handed_back", {"agent": agent_id}, now)
                return None
            return await self._end_assignment(c, live, "handed_back", now)

    async def _end_assignment(
        self, conn: asyncpg.Connection, live: asyncpg.Record, status: str, now: datetime
    ) -> Assignment:
        row = await conn.fetchrow(
            "UPDATE assignments SET status = $2, ended_at = $3 WHERE id = $1 RETURNING *",
            live["id"],
            status,
            now,
        )
        if live["status"] == "offered" and live["handoff_id"] is not None:  # ended before anyone took it
            await conn.execute(
                "UPDATE handoffs SET status = 'cancelled', updated_at = $2 WHERE id = $1 AND status = 'offered'",
                live["handoff_id"],
                now,
            )
        await self._free_agent(conn, live["agent_id"], now)
        await self._release(conn, live["conversation_id"], f"agent:{live['agent_id']}", now)
        await _record_assignment_event(conn, live, status, now)
        return assignment_from_row(row)

    async def _release(
        self, conn: asyncpg.Connection, conversation_id: int, owner: str, now: datetime
    ) -> None:
        # The AI starts fresh: no half-finished intent or question from before the handoff.
        # Only the caller's number survives (texts to a phone caller need it).
        await conn.execute(
            """UPDATE conversations SET owner = 'ai', status = 'open', intent = NULL, next_step = NULL, next_step_due = NULL,
                      state = jsonb_strip_nulls(jsonb_build_object('caller_phone', state -> 'caller_phone')), updated_at = $3
               WHERE id = $1 AND owner = $2""",
            conversation_id,
            owner,
            now,
        )


async def _record_assignment_event(
    conn: asyncpg.Connection, assignment: asyncpg.Record, status: str, now: datetime
) -> None:
    """The ``assignment_<status>`` event of an assignment row (its id, agent and queue)."""
    await record_event(
        conn,
        assignment["conversation_id"],
        f"assignment_{status}",
        {"assignment": assignment["id"], "agent": assignment["agent_id"], "queue": assignment["queue"]},
        now,
        assignment["ticket_id"],
    )
