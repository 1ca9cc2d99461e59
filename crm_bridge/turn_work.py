"""What a turn records, buffered in memory and written when the turn commits.

A turn never holds a connection, a transaction or a row lock while the engine thinks (LLM round
trips, tool calls, sentences streamed to a caller). Everything the engine records through
:class:`pipeline.ports.TurnWork` goes into a :class:`TurnLog`: messages and events, plus the
rows of tickets, outbox texts, follow-ups, handoffs and message rewrites as *deferred writes*
that :meth:`TurnLog.write` runs, in the order they were recorded, inside the short commit
transaction (see :mod:`crm_bridge.conversations`). A turn that loses the optimistic version check
throws its log away and re-runs, so nothing of a losing attempt is ever written.

Ids the engine needs during the turn are reserved, not guessed: a ticket's id and its ``CL-``
protocol (the reply quotes it, the follow-up and the handoff reference it, the conversation
stores it) and an outbox row's id (sent after commit) are taken with ``nextval`` from their
sequences in one short autocommit statement, and the deferred ``INSERT`` writes them
explicitly. This is simpler and safer than inserting at commit and patching every reference
(reply texts, conversation state, events): sequences are never rolled back, so a reserved id is
never handed out twice; an attempt that loses its conflict only leaves a gap in the numbers, as
a rolled-back transaction always did. Follow-ups (deduplicated by key) and handoffs (one open per
conversation) are decided by their unique constraints at commit; their events are completed
there with the row that won.

Reads during the turn (``get_ticket``, the dedupe check of a follow-up) borrow a pooled
connection for one statement and see this turn's own, not yet written, tickets first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from crm_bridge.db import from_columns
from pipeline.model import Channel, OutboundText, Priority, Ticket, TicketStatus
from pipeline.redaction import Redactor
from pipeline.service import StoredMessage
from pipeline.turn_manager import TurnContext

# One open (waiting or offered) handoff per conversation: the partial unique index makes a
# repeated request, a retried turn or a second process a no-op.
HANDOFF_INSERT = """
INSERT INTO handoffs (conversation_id, ticket_id, queue, priority, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $5)
ON CONFLICT (conversation_id) WHERE status IN ('waiting', 'offered') DO NOTHING
RETURNING id
"""

TICKET_INSERT = """
INSERT INTO tickets (id, protocol, status, priority, queue, owner, subject, summary, customer_ref, conversation_id,
                     first_response_due, resolution_due, next_step, next_step_due, resolved_at, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,
        CASE WHEN $3 IN ('resolved', 'closed') THEN $15::timestamptz END, $15, $15)
"""

TICKET_UPDATE = """
UPDATE tickets SET status = COALESCE($2, status), owner = COALESCE($3, owner),
       summary = COALESCE($4, summary), next_step = COALESCE($5, next_step),
       next_step_due = COALESCE($6, next_step_due), priority = COALESCE($8, priority),
       resolved_at = CASE WHEN $2 IN ('resolved', 'closed') THEN $7 ELSE resolved_at END,
       updated_at = $7
WHERE id = $1
"""

Write = Callable[[asyncpg.Connection], Awaitable[None]]


def ticket_from_row(row: asyncpg.Record) -> Ticket:
    return from_columns(Ticket, row, status=TicketStatus(row["status"]), priority=Priority(row["priority"]))


class TurnLog:
    """Messages, events and deferred writes of one turn attempt (``seq`` is assigned here, from
    the ``last_seq`` the turn read; the version check at commit proves nobody took it since).

    Every message body and event payload passes the redactor on its way in: whatever the core or
    an LLM engine puts in a turn, no card number reaches the transcript or the event log.
    """

    def __init__(self, conversation_id: int, last_seq: int, redactor: Redactor) -> None:
        self.conversation_id = conversation_id
        self.seq = last_seq
        self.redactor = redactor
        self.messages: list[tuple[Any, ...]] = []
        self.events: list[tuple[Any, ...]] = []
        self.writes: list[Write] = []

    @property
    def empty(self) -> bool:
        return not (self.messages or self.events or self.writes)

    def message(
        self,
        *,
        direction: str,
        sender: str,
        body: str,
        now: datetime,
        kind: str = "message",
        external_id: str | None = None,
        reply_to: int | None = None,
    ) -> StoredMessage:
        self.seq += 1
        body = self.redactor.redact(body)
        self.messages.append(
            (self.conversation_id, self.seq, direction, sender, body, external_id, reply_to, kind, now)
        )
        return StoredMessage(self.conversation_id, self.seq, sender, body, now, kind)

    def event(self, kind: str, data: dict[str, Any], now: datetime, ticket_id: int | None = None) -> int:
        """Buffer an event; returns its index for :meth:`complete_event`."""
        self.events.append((self.conversation_id, ticket_id, kind, self.redactor.redact_obj(data), now))
        return len(self.events) - 1

    def complete_event(self, index: int, **data: Any) -> None:
        """Add what only the commit knows (the row a unique constraint kept) to a buffered event."""
        row = self.events[index]
        self.events[index] = (*row[:3], {**row[3], **data}, *row[4:])

    def rewrite(self, seq: int, rewrite: Callable[[str], str]) -> tuple[str, str] | None:
        """Rewrite a buffered customer message (redacted again on the way in); None if not here."""
        for i, row in enumerate(self.messages):
            if row[1] == seq and row[2] == "in":
                new = self.redactor.redact(rewrite(row[4]))
                self.messages[i] = (*row[:4], new, *row[5:])
                return row[4], new
        return None

    def mark(self) -> tuple[int, int, int, int]:
        return self.seq, len(self.messages), len(self.events), len(self.writes)

    def rollback_to(self, mark: tuple[int, int, int, int]) -> None:
        self.seq = mark[0]
        del self.messages[mark[1] :]
        del self.events[mark[2] :]
        del self.writes[mark[3] :]

    def columns(self) -> tuple[list[Any], ...]:
        """Messages then events as column arrays (see ``conversations._commit_in_one``)."""
        messages = [list(col) for col in zip(*self.messages, strict=True)] or [[]] * 9
        events = [list(col) for col in zip(*self.events, strict=True)] or [[]] * 5
        return (*messages[1:], *events[1:])

    async def write(self, conn: asyncpg.Connection) -> None:
        """Write everything, in the caller's (commit) transaction."""
        for deferred in self.writes:  # tickets first: events and handoffs reference them
            await deferred(conn)
        if self.messages:
            await conn.executemany(
                """INSERT INTO messages (conversation_id, seq, direction, sender, body, external_id, reply_to, kind, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
                self.messages,
            )
        if self.events:
            await conn.executemany(
                "INSERT INTO events (conversation_id, ticket_id, kind, data, created_at) VALUES ($1, $2, $3, $4, $5)",
                self.events,
            )


class PgTurnWork:
    """:class:`pipeline.ports.TurnWork` buffered in a :class:`TurnLog`, written at commit.

    ``tickets`` holds this turn's view of the tickets it opened or changed (``get_ticket`` reads
    it first); a savepoint in the turn snapshots and restores it with the log.
    """

    def __init__(self, pool: asyncpg.Pool, ctx: TurnContext, outbox_ids: list[int], log: TurnLog) -> None:
        self._pool = pool
        self._ctx = ctx
        self._outbox_ids = outbox_ids
        self._log = log
        self.tickets: dict[int, Ticket] = {}

    @property
    def _now(self) -> datetime:
        return self._ctx.now

    async def _reserve(self, sequence: str) -> int:
        return int(await self._pool.fetchval("SELECT nextval(pg_get_serial_sequence($1, 'id'))", sequence))

    async def open_ticket(
        self,
        *,
        subject: str,
        summary: str,
        queue: str,
        priority: str,
        first_response_due: datetime | None,
        resolution_due: datetime | None,
        status: str = "open",
        owner: str | None = None,
        next_step: str | None = None,
        next_step_due: datetime | None = None,
    ) -> Ticket:
        ctx, now, redact = self._ctx, self._now, self._log.redactor.redact
        ids = await self._pool.fetchrow(
            """SELECT nextval(pg_get_serial_sequence('tickets', 'id')) AS id,
                      'CL-' || lpad(nextval('ticket_protocol_seq')::text, 6, '0') AS protocol"""
        )
        ticket = Ticket(
            id=int(ids["id"]),
            protocol=ids["protocol"],
            status=TicketStatus(status),
            priority=Priority(priority),
            queue=queue,
            owner=owner,
            subject=redact(subject),
            summary=redact(summary),
            customer_ref=ctx.customer.ref if ctx.customer else None,
            conversation_id=ctx.conversation_id,
            first_response_due=first_response_due,
            resolution_due=resolution_due,
            next_step=next_step,
            next_step_due=next_step_due,
        )
        self.tickets[ticket.id] = ticket
        values = (
            ticket.id,
            ticket.protocol,
            status,
            priority,
            queue,
            owner,
            ticket.subject,
            ticket.summary,
            ticket.customer_ref,
            ticket.conversation_id,
            first_response_due,
            resolution_due,
            next_step,
            next_step_due,
            now,
        )

        async def insert(conn: asyncpg.Connection) -> None:
            await conn.execute(TICKET_INSERT, *values)

        self._log.writes.append(insert)
        self._log.event(
            "ticket_opened",
            {
                "ticket": ticket.protocol,
                "queue": queue,
                "priority": priority,
                "status": status,
                "owner": owner,
            },
            now,
            ticket.id,
        )
        return ticket

    async def update_ticket(
        self,
        ticket_id: int,
        *,
        status: str | None = None,
        owner: str | None = None,
        summary: str | None = None,
        next_step: str | None = None,
        next_step_due: datetime | None = None,
        note: str | None = None,
        priority: str | None = None,
    ) -> Ticket:
        current = await self.get_ticket(ticket_id)
        if current is None:
            raise LookupError(f"ticket {ticket_id} not found")
        summary = summary and self._log.redactor.redact(summary)
        ticket = dataclasses.replace(
            current,
            status=TicketStatus(status) if status else current.status,
            owner=owner or current.owner,
            summary=summary or current.summary,
            next_step=next_step or current.next_step,
            next_step_due=next_step_due or current.next_step_due,
            priority=Priority(priority) if priority else current.priority,
        )
        self.tickets[ticket_id] = ticket
        # The same COALESCE update as ever, run at commit on the row as it is then: an agent's
        # change made meanwhile to a field this turn does not touch survives.
        values = (ticket_id, status, owner, summary, next_step, next_step_due, self._now, priority)

        async def update(conn: asyncpg.Connection) -> None:
            await conn.execute(TICKET_UPDATE, *values)

        self._log.writes.append(update)
        changes = {
            k: v
            for k, v in {
                "status": status,
                "owner": owner,
                "next_step": next_step,
                "note": note,
                "priority": priority,
            }.items()
            if v
        }
        self._log.event("ticket_updated", changes, self._now, ticket_id)
        return ticket

    async def get_ticket(self, ticket_id: int) -> Ticket | None:
        if ticket_id in self.tickets:
            return self.tickets[ticket_id]
        row = await self._pool.fetchrow("SELECT * FROM tickets WHERE id = $1", ticket_id)
        return ticket_from_row(row) if row else None

    async def schedule_followup(
        self, *, channel: Channel, address: str, body: str, due_at: datetime, ticket_id: int | None, key: str
    ) -> int:
        ctx, now = self._ctx, self._now
        existing = await self._pool.fetchval("SELECT id FROM followups WHERE dedupe_key = $1", key)
        row_id = int(existing) if existing is not None else await self._reserve("followups")
        event = self._log.event(
            "followup_scheduled",
            {"followup": row_id, "due_at": due_at.isoformat(), "channel": str(channel)},
            now,
            ticket_id,
        )
        if existing is not None:
            return row_id
        values = (
            row_id,
            key,
            ctx.conversation_id,
            ticket_id,
            ctx.customer.ref if ctx.customer else None,
            str(channel),
            address,
            body,
            due_at,
            now,
        )

        async def insert(conn: asyncpg.Connection) -> None:
            kept = await conn.fetchval(
                """INSERT INTO followups (id, dedupe_key, conversation_id, ticket_id, customer_ref, channel, address,
                                          body, due_at, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id""",
                *values,
            )
            if kept is None:  # another turn scheduled it first: the event names that one
                kept = await conn.fetchval("SELECT id FROM followups WHERE dedupe_key = $1", key)
                self._log.complete_event(event, followup=kept)

        self._log.writes.append(insert)
        return row_id

    async def _outbox(self, message: OutboundText, message_seq: int | None, body: str) -> int:
        row_id = await self._reserve("outbox")
        values = (
            row_id,
            self._ctx.conversation_id,
            message_seq,
            str(message.channel),
            message.to,
            body,
            message.kind,
            self._now,
        )

        async def insert(conn: asyncpg.Connection) -> None:
            await conn.execute(
                """INSERT INTO outbox (id, conversation_id, message_seq, channel, address, body, kind,
                                       next_attempt_at, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)""",
                *values,
            )

        self._log.writes.append(insert)
        self._outbox_ids.append(row_id)
        return row_id

    async def queue_text(self, message: OutboundText) -> int:
        stored = self._log.message(
            direction="out", sender="bot", body=message.body, now=self._now, kind=message.kind
        )
        return await self._outbox(message, stored.seq, stored.body)

    async def queue_private_text(self, message: OutboundText) -> int:
        row_id = await self._outbox(message, None, message.body)
        self._log.event("private_text_queued", {"outbox": row_id, "kind": message.kind}, self._now)
        return row_id

    async def request_handoff(
        self,
        *,
        queue: str,
        priority: str,
        ticket_id: int,
        callback_phone: str | None = None,
        callback_due: datetime | None = None,
    ) -> None:
        values = (self._ctx.conversation_id, ticket_id, queue, str(Priority(priority)), self._now)
        conversation_id, now = self._ctx.conversation_id, self._now
        event = self._log.event(
            "handoff_requested",
            {"handoff": None, "queue": queue, "priority": priority, "already_open": None},
            self._now,
            ticket_id,
        )

        async def insert(conn: asyncpg.Connection) -> None:
            handoff_id = await conn.fetchval(HANDOFF_INSERT, *values)
            self._log.complete_event(event, handoff=handoff_id, already_open=handoff_id is None)
            if callback_due is not None and handoff_id is not None:
                # the queue is closed: the caller is called back when it opens (desk imports
                # this module through conversations, hence the late import)
                from crm_bridge.desk import schedule_callback  # noqa: PLC0415

                await schedule_callback(
                    conn,
                    conversation_id=conversation_id,
                    ticket_id=ticket_id,
                    queue=queue,
                    phone=callback_phone,
                    due=callback_due,
                    now=now,
                    extra={"reason": "queue_closed"},
                )

        self._log.writes.append(insert)

    async def record_event(self, kind: str, data: dict[str, Any]) -> None:
        self._log.event(kind, data, self._now)
