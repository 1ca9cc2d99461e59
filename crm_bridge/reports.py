"""Read-side queries behind the JSON API: conversations, transcripts, tickets, customer history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from crm_bridge.access import EVERYONE, Viewer, conversation_visible, ticket_visible


def _plain(row: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(row) if row is not None else None


class Reports:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def conversations(
        self,
        *,
        customer_ref: str | None = None,
        channel: str | None = None,
        status: str | None = None,
        q: str | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        intent: str | None = None,
        agent_id: int | None = None,
        escalated: bool | None = None,
        ticket_status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        viewer: Viewer = EVERYONE,
    ) -> list[dict[str, Any]]:
        """Newest first, only those ``viewer`` may read (:mod:`crm_bridge.access`). ``q`` is a full-text search over transcripts (English stemming).

        ``created_from`` / ``created_to`` bound the start time (``to`` exclusive); ``agent_id``
        keeps conversations that agent owns or took through an offer; ``escalated`` keeps those
        that were (or were never) handed off; ``ticket_status`` is the outcome of their ticket.
        """
        rows = await self._pool.fetch(
            """SELECT c.id, c.channel, c.address, c.customer_ref, c.status, c.owner, c.intent, c.ticket_id,
                      c.next_step, c.next_step_due, c.created_at, c.updated_at, c.last_seq AS message_count,
                      t.protocol AS ticket, t.status AS ticket_status,
                      EXISTS (SELECT 1 FROM handoffs h WHERE h.conversation_id = c.id) AS escalated,
                      (SELECT body FROM messages m WHERE m.conversation_id = c.id ORDER BY seq DESC LIMIT 1) AS last_message
               FROM conversations c LEFT JOIN tickets t ON t.id = c.ticket_id
               WHERE ($1::text IS NULL OR c.customer_ref = $1)
                 AND ($2::text IS NULL OR c.channel = $2)
                 AND ($3::text IS NULL OR c.status = $3)
                 AND ($4::text IS NULL OR EXISTS (
                        SELECT 1 FROM messages m WHERE m.conversation_id = c.id
                          AND m.tsv @@ websearch_to_tsquery('english', $4)))
                 AND ($7::timestamptz IS NULL OR c.created_at >= $7)
                 AND ($8::timestamptz IS NULL OR c.created_at < $8)
                 AND ($9::text IS NULL OR c.intent = $9)
                 AND ($10::bigint IS NULL OR c.owner = 'agent:' || $10::bigint OR EXISTS (
                        SELECT 1 FROM assignments a WHERE a.conversation_id = c.id AND a.agent_id = $10
                          AND a.status IN ('accepted', 'completed', 'handed_back')))
                 AND ($11::boolean IS NULL OR EXISTS (SELECT 1 FROM handoffs h WHERE h.conversation_id = c.id) = $11)
                 AND ($12::text IS NULL OR t.status = $12)
                 AND """
            + conversation_visible("c", "$13", "$14")
            + """
               ORDER BY c.updated_at DESC, c.id DESC LIMIT $5 OFFSET $6""",
            customer_ref,
            channel,
            status,
            q,
            limit,
            offset,
            created_from,
            created_to,
            intent,
            agent_id,
            escalated,
            ticket_status,
            *viewer.params,
        )
        return [dict(r) for r in rows]

    async def conversation(self, conversation_id: int) -> dict[str, Any] | None:
        async with self._pool.acquire() as conn:
            conv = await conn.fetchrow("SELECT * FROM conversations WHERE id = $1", conversation_id)
            if conv is None:
                return None
            messages = await conn.fetch(
                "SELECT seq, direction, sender, body, kind, external_id, reply_to, interrupted, meta, created_at FROM messages WHERE conversation_id = $1 ORDER BY seq",
                conversation_id,
            )
            events = await conn.fetch(
                "SELECT id, kind, data, ticket_id, created_at FROM events WHERE conversation_id = $1 ORDER BY id",
                conversation_id,
            )
            tickets = await conn.fetch(
                "SELECT * FROM tickets WHERE conversation_id = $1 ORDER BY id", conversation_id
            )
            followups = await conn.fetch(
                "SELECT * FROM followups WHERE conversation_id = $1 ORDER BY id", conversation_id
            )
            outbox = await conn.fetch(
                # a one-time code is for the customer's phone only: staff see that one was sent, not which
                """SELECT id, conversation_id, message_seq, channel, address, kind, status, attempts, next_attempt_at,
                          last_error, provider_ref, channel_used, sent_at, created_at,
                          CASE WHEN kind = 'verification_code' THEN '[verification code]' ELSE body END AS body
                     FROM outbox WHERE conversation_id = $1 ORDER BY id""",
                conversation_id,
            )
        result = dict(conv)
        result["messages"] = [dict(m) for m in messages]
        result["actions"] = [dict(e) for e in events]
        result["tickets"] = [dict(t) for t in tickets]
        result["followups"] = [dict(f) for f in followups]
        result["outbox"] = [dict(o) for o in outbox]
        return result

    async def tickets(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        owner: str | None = None,
        breached: bool | None = None,
        customer_ref: str | None = None,
        limit: int = 100,
        offset: int = 0,
        viewer: Viewer = EVERYONE,
    ) -> list[dict[str, Any]]:
        """Newest first, only those ``viewer`` may read (:mod:`crm_bridge.access`)."""
        rows = await self._pool.fetch(
            """SELECT * FROM tickets t
               WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR queue = $2)
                 AND ($3::text IS NULL OR owner = $3)
                 AND ($4::boolean IS NULL OR (cardinality(sla_breached) > 0) = $4)
                 AND ($5::text IS NULL OR customer_ref = $5)
                 AND """
            + ticket_visible("t", "$8", "$9")
            + """
               ORDER BY id DESC LIMIT $6 OFFSET $7""",
            status,
            queue,
            owner,
            breached,
            customer_ref,
            limit,
            offset,
            *viewer.params,
        )
        return [dict(r) for r in rows]

    async def ticket(self, ref: str) -> dict[str, Any] | None:
        """By numeric id or protocol (``CL-000123``), with its events."""
        async with self._pool.acquire() as conn:
            if ref.isdigit():
                row = await conn.fetchrow("SELECT * FROM tickets WHERE id = $1", int(ref))
            else:
                row = await conn.fetchrow("SELECT * FROM tickets WHERE protocol = $1", ref.upper())
            if row is None:
                return None
            events = await conn.fetch(
                "SELECT id, kind, data, created_at FROM events WHERE ticket_id = $1 ORDER BY id", row["id"]
            )
        result = dict(row)
        result["events"] = [dict(e) for e in events]
        return result

    async def active_assignments(self, agent_id: int) -> list[dict[str, Any]]:
        """The agent's open offers and accepted conversations with what the console shows of them:
        the ticket (protocol, subject, 3-line summary, status) and the customer."""
        rows = await self._pool.fetch(
            """SELECT a.id, a.status, a.queue, a.conversation_id, a.ticket_id, a.offered_at, a.responded_at,
                      c.channel, c.customer_ref, c.status AS conversation_status, c.owner,
                      t.protocol AS ticket, t.subject, t.summary, t.status AS ticket_status, t.priority,
                      t.next_step, t.next_step_due, t.first_response_due
               FROM assignments a JOIN conversations c ON c.id = a.conversation_id
               LEFT JOIN tickets t ON t.id = a.ticket_id
               WHERE a.agent_id = $1 AND a.status IN ('offered', 'accepted') ORDER BY a.offered_at, a.id""",
            agent_id,
        )
        return [dict(r) for r in rows]

    async def customer_history(self, customer_ref: str, viewer: Viewer = EVERYONE) -> list[dict[str, Any]]:
        """Every conversation of a customer across channels that ``viewer`` may read, oldest
        first, with transcripts."""
        async with self._pool.acquire() as conn:
            convs = await conn.fetch(
                "SELECT c.id, c.channel, c.address, c.status, c.owner, c.ticket_id, c.created_at, c.updated_at"
                " FROM conversations c WHERE c.customer_ref = $1 AND "
                + conversation_visible("c", "$2", "$3")
                + " ORDER BY c.created_at, c.id",
                customer_ref,
                *viewer.params,
            )
            ids = [c["id"] for c in convs]
            messages = await conn.fetch(
                "SELECT conversation_id, seq, sender, body, kind, created_at FROM messages WHERE conversation_id = ANY($1::bigint[]) ORDER BY conversation_id, seq",
                ids,
            )
        by_conv: dict[int, list[dict[str, Any]]] = {}
        for m in messages:
            by_conv.setdefault(m["conversation_id"], []).append(dict(m))
        return [dict(c) | {"messages": by_conv.get(c["id"], [])} for c in convs]

    async def counts(self) -> dict[str, int]:
        """Small gauges for /metrics."""
        row = await self._pool.fetchrow(
            """SELECT (SELECT count(*) FROM conversations WHERE status <> 'closed') AS open_conversations,
                      (SELECT count(*) FROM tickets WHERE status IN ('open', 'pending')) AS open_tickets,
                      (SELECT count(*) FROM tickets WHERE cardinality(sla_breached) > 0 AND status IN ('open', 'pending')) AS breached_tickets,
                      (SELECT count(*) FROM followups WHERE status = 'scheduled') AS scheduled_followups,
                      (SELECT count(*) FROM outbox WHERE status = 'queued') AS queued_texts"""
        )
        return {k: int(v) for k, v in dict(row).items()}
