"""Conversations and their durable transcript in PostgreSQL.

``PgConversationStore.turn`` is the heart of durability: one transaction locks the
conversation row, appends the inbound message (idempotent on its external id), lets the turn
manager record tickets, follow-ups, outbox texts and events through :class:`PgTurnWork` on the
same connection, appends the replies, saves the state, and commits before the caller replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from pipeline.identity import Identity, IdentityLevel
from pipeline.model import Channel, ConversationState, OutboundText, Priority, Ticket, TicketStatus
from pipeline.redaction import Redactor
from pipeline.service import StoredMessage
from pipeline.turn_manager import TurnContext

TICKET_INSERT = """
INSERT INTO tickets (protocol, status, priority, queue, owner, subject, summary, customer_ref, conversation_id,
                     first_response_due, resolution_due, next_step, next_step_due, resolved_at, created_at, updated_at)
VALUES ('CL-' || lpad(nextval('ticket_protocol_seq')::text, 6, '0'), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
        CASE WHEN $1 IN ('resolved', 'closed') THEN $13::timestamptz END, $13, $13)
RETURNING *
"""

# One open (waiting or offered) handoff per conversation: the partial unique index makes a
# repeated request, a retried turn or a second process a no-op.
HANDOFF_INSERT = """
INSERT INTO handoffs (conversation_id, ticket_id, queue, priority, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $5)
ON CONFLICT (conversation_id) WHERE status IN ('waiting', 'offered') DO NOTHING
RETURNING id
"""


def ticket_from_row(row: asyncpg.Record) -> Ticket:
    return Ticket(
        id=row["id"],
        protocol=row["protocol"],
        status=TicketStatus(row["status"]),
        priority=Priority(row["priority"]),
        queue=row["queue"],
        owner=row["owner"],
        subject=row["subject"],
        summary=row["summary"],
        customer_ref=row["customer_ref"],
        conversation_id=row["conversation_id"],
        first_response_due=row["first_response_due"],
        resolution_due=row["resolution_due"],
        next_step=row["next_step"],
        next_step_due=row["next_step_due"],
    )


async def append_message(
    conn: asyncpg.Connection,
    conversation_id: int,
    *,
    direction: str,
    sender: str,
    body: str,
    now: datetime,
    kind: str = "message",
    external_id: str | None = None,
    reply_to: int | None = None,
) -> StoredMessage:
    """Append one message with the next ``seq`` of its conversation (the row lock orders them)."""
    seq = await conn.fetchval(
        "UPDATE conversations SET last_seq = last_seq + 1, updated_at = $2 WHERE id = $1 RETURNING last_seq",
        conversation_id,
        now,
    )
    await conn.execute(
        """INSERT INTO messages (conversation_id, seq, direction, sender, body, external_id, reply_to, kind, created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        conversation_id,
        seq,
        direction,
        sender,
        body,
        external_id,
        reply_to,
        kind,
        now,
    )
    return StoredMessage(conversation_id, seq, sender, body, now, kind)


async def record_event(
    conn: asyncpg.Connection,
    conversation_id: int | None,
    kind: str,
    data: dict[str, Any],
    now: datetime,
    ticket_id: int | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO events (conversation_id, ticket_id, kind, data, created_at) VALUES ($1, $2, $3, $4, $5)",
        conversation_id,
        ticket_id,
        kind,
        data,
        now,
    )


class _TurnLog:
    """Messages and events of one turn, buffered and written in two batched statements at the
    end of the turn (the row lock already orders them; ``seq`` is assigned here).

    Every message body and event payload passes the redactor on its way in: whatever the core or
    an LLM engine puts in a turn, no card number reaches the transcript or the event log.
    """

    def __init__(self, conversation_id: int, last_seq: int, redactor: Redactor) -> None:
        self.conversation_id = conversation_id
        self.seq = last_seq
        self.redactor = redactor
        self.messages: list[tuple[Any, ...]] = []
        self.events: list[tuple[Any, ...]] = []

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

    def event(self, kind: str, data: dict[str, Any], now: datetime, ticket_id: int | None = None) -> None:
        self.events.append((self.conversation_id, ticket_id, kind, self.redactor.redact_obj(data), now))

    def rewrite(self, seq: int, rewrite: Callable[[str], str]) -> tuple[str, str] | None:
        """Rewrite a buffered customer message (redacted again on the way in); None if not here."""
        for i, row in enumerate(self.messages):
            if row[1] == seq and row[2] == "in":
                new = self.redactor.redact(rewrite(row[4]))
                self.messages[i] = (*row[:4], new, *row[5:])
                return row[4], new
        return None

    def mark(self) -> tuple[int, int, int]:
        return self.seq, len(self.messages), len(self.events)

    def rollback_to(self, mark: tuple[int, int, int]) -> None:
        self.seq = mark[0]
        del self.messages[mark[1] :]
        del self.events[mark[2] :]

    async def flush(self, conn: asyncpg.Connection) -> None:
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
        self.messages.clear()
        self.events.clear()


class PgTurnWork:
    """:class:`pipeline.ports.TurnWork` on the turn's own connection and transaction."""

    def __init__(
        self, conn: asyncpg.Connection, ctx: TurnContext, outbox_ids: list[int], log: _TurnLog
    ) -> None:
        self._conn = conn
        self._ctx = ctx
        self._outbox_ids = outbox_ids
        self._log = log

    @property
    def _now(self) -> datetime:
        return self._ctx.now

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
        ctx = self._ctx
        redact = self._log.redactor.redact
        row = await self._conn.fetchrow(
            TICKET_INSERT,
            status,
            priority,
            queue,
            owner,
            redact(subject),
            redact(summary),
            ctx.customer.ref if ctx.customer else None,
            ctx.conversation_id,
            first_response_due,
            resolution_due,
            next_step,
            next_step_due,
            self._now,
        )
        ticket = ticket_from_row(row)
        self._log.event(
            "ticket_opened",
            {
                "ticket": ticket.protocol,
                "queue": queue,
                "priority": priority,
                "status": status,
                "owner": owner,
            },
            self._now,
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
        row = await self._conn.fetchrow(
            """UPDATE tickets SET status = COALESCE($2, status), owner = COALESCE($3, owner),
                      summary = COALESCE($4, summary), next_step = COALESCE($5, next_step),
                      next_step_due = COALESCE($6, next_step_due), priority = COALESCE($8, priority),
                      resolved_at = CASE WHEN $2 IN ('resolved', 'closed') THEN $7 ELSE resolved_at END,
                      updated_at = $7
               WHERE id = $1 RETURNING *""",
            ticket_id,
            status,
            owner,
            summary and self._log.redactor.redact(summary),
            next_step,
            next_step_due,
            self._now,
            priority,
        )
        if row is None:
            raise LookupError(f"ticket {ticket_id} not found")
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
        return ticket_from_row(row)

    async def get_ticket(self, ticket_id: int) -> Ticket | None:
        row = await self._conn.fetchrow("SELECT * FROM tickets WHERE id = $1", ticket_id)
        return ticket_from_row(row) if row else None

    async def schedule_followup(
        self, *, channel: Channel, address: str, body: str, due_at: datetime, ticket_id: int | None, key: str
    ) -> int:
        ctx = self._ctx
        row_id = await self._conn.fetchval(
            """INSERT INTO followups (dedupe_key, conversation_id, ticket_id, customer_ref, channel, address, body, due_at, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id""",
            key,
            ctx.conversation_id,
            ticket_id,
            ctx.customer.ref if ctx.customer else None,
            str(channel),
            address,
            body,
            due_at,
            self._now,
        )
        if row_id is None:
            row_id = await self._conn.fetchval("SELECT id FROM followups WHERE dedupe_key = $1", key)
        self._log.event(
            "followup_scheduled",
            {"followup": row_id, "due_at": due_at.isoformat(), "channel": str(channel)},
            self._now,
            ticket_id,
        )
        return int(row_id)

    async def queue_text(self, message: OutboundText) -> int:
        ctx = self._ctx
        stored = self._log.message(
            direction="out", sender="bot", body=message.body, now=self._now, kind=message.kind
        )
        row_id = await self._conn.fetchval(
            """INSERT INTO outbox (conversation_id, message_seq, channel, address, body, kind, next_attempt_at, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING id""",
            ctx.conversation_id,
            stored.seq,
            str(message.channel),
            message.to,
            stored.body,
            message.kind,
            self._now,
        )
        self._outbox_ids.append(row_id)
        return int(row_id)

    async def queue_private_text(self, message: OutboundText) -> int:
        row_id = await self._conn.fetchval(
            """INSERT INTO outbox (conversation_id, channel, address, body, kind, next_attempt_at, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING id""",
            self._ctx.conversation_id,
            str(message.channel),
            message.to,
            message.body,
            message.kind,
            self._now,
        )
        self._outbox_ids.append(row_id)
        self._log.event("private_text_queued", {"outbox": row_id, "kind": message.kind}, self._now)
        return int(row_id)

    async def request_handoff(self, *, queue: str, priority: str, ticket_id: int) -> None:
        handoff_id = await self._conn.fetchval(
            HANDOFF_INSERT, self._ctx.conversation_id, ticket_id, queue, str(Priority(priority)), self._now
        )
        self._log.event(
            "handoff_requested",
            {"handoff": handoff_id, "queue": queue, "priority": priority, "already_open": handoff_id is None},
            self._now,
            ticket_id,
        )

    async def record_event(self, kind: str, data: dict[str, Any]) -> None:
        self._log.event(kind, data, self._now)


class PgOpenTurn:
    """One turn inside its transaction; see :class:`pipeline.service.OpenTurn`."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        ctx: TurnContext,
        customer_ref: str | None,
        log: _TurnLog,
        *,
        inbound_seq: int | None,
        duplicate: bool = False,
        inbound_now: bool = False,
    ) -> None:
        self._conn = conn
        self._log = log
        self._inbound_now = inbound_now
        self.context = ctx
        self.customer_ref = customer_ref
        self.duplicate = duplicate
        self.inbound_seq = inbound_seq
        self.outbox_ids: list[int] = []
        self.work = PgTurnWork(conn, ctx, self.outbox_ids, log)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        mark, outbox = self._log.mark(), len(self.outbox_ids)
        try:
            async with self._conn.transaction():
                yield
        except BaseException:
            self._log.rollback_to(mark)
            del self.outbox_ids[outbox:]
            raise

    async def reply(self, texts: Sequence[str]) -> list[StoredMessage]:
        """Store the replies and everything buffered, and save the conversation's state."""
        ctx = self.context
        stored = [
            self._log.message(direction="out", sender="bot", body=t, now=ctx.now, reply_to=self.inbound_seq)
            for t in texts
        ]
        await self._log.flush(self._conn)
        await self._conn.execute(
            """UPDATE conversations SET customer_ref = $2, status = $3, owner = $4, intent = $5, state = $6,
                      ticket_id = $7, next_step = $8, next_step_due = $9, updated_at = $10, last_seq = $11,
                      last_inbound_at = CASE WHEN $12 THEN $10 ELSE last_inbound_at END,
                      identity_level = $13, identity_method = $14, identity_at = $15, claimed_ref = $16
               WHERE id = $1""",
            ctx.conversation_id,
            ctx.customer.ref if ctx.customer else self.customer_ref,
            ctx.status,
            ctx.owner,
            ctx.state.intent,
            ctx.state.to_json(),
            ctx.ticket_id,
            ctx.next_step,
            ctx.next_step_due,
            ctx.now,
            self._log.seq,
            self._inbound_now,
            str(ctx.identity.level),
            ctx.identity.method,
            ctx.identity.at,
            ctx.identity.claimed_ref,
        )
        return stored

    async def duplicate_replies(self) -> list[StoredMessage]:
        return []

    async def rewrite_message(self, seq: int, rewrite: Callable[[str], str]) -> tuple[str, str] | None:
        """Rewrite a customer message of this conversation: this turn's (still buffered) or a
        committed one, in this transaction (the search index follows the body)."""
        buffered = self._log.rewrite(seq, rewrite)
        if buffered is not None:
            return buffered
        old = await self._conn.fetchval(
            "SELECT body FROM messages WHERE conversation_id = $1 AND seq = $2 AND direction = 'in'",
            self.context.conversation_id,
            seq,
        )
        if old is None:
            return None
        new = self._log.redactor.redact(rewrite(old))
        if new != old:
            await self._conn.execute(
                "UPDATE messages SET body = $3 WHERE conversation_id = $1 AND seq = $2",
                self.context.conversation_id,
                seq,
                new,
            )
        return old, new


class PgConversationStore:
    """Conversations on PostgreSQL; implements :class:`pipeline.service.ConversationStore`.

    ``redactor`` cleans every message, event payload and ticket text a turn writes (card numbers
    by default); the service redacts the inbound text earlier still, before the core sees it.
    """

    def __init__(self, pool: asyncpg.Pool, *, redactor: Redactor | None = None) -> None:
        self._pool = pool
        self._redactor = redactor if redactor is not None else Redactor()
        # A turn holds its own connection and may borrow one more for a business-system call
        # (the built-in CRM uses the same pool). Admitting at most half the pool's size as
        # concurrent turns means that second connection is always there: without this bound,
        # a burst of turns can take every connection and then wait forever for another.
        self._turn_slots = asyncio.Semaphore(max(1, pool.get_max_size() // 2))

    @asynccontextmanager
    async def turn(
        self,
        *,
        channel: Channel,
        address: str,
        text: str | None,
        external_id: str | None,
        now: datetime,
        kind: str = "message",
    ) -> AsyncIterator[PgOpenTurn]:
        async with self._turn_slots, self._pool.acquire() as conn, conn.transaction():
            row = await self._lock_open_conversation(conn, channel, address, now)
            log = _TurnLog(row["id"], row["last_seq"], self._redactor)
            inbound_seq: int | None = None
            # Duplicates serialize on the row lock above, so the first delivery is committed
            # (and visible here) before a retry gets this far; the unique index is the backstop.
            duplicate = external_id is not None and await conn.fetchval(
                "SELECT 1 FROM messages WHERE external_id = $1 AND direction = 'in'", external_id
            )
            if not duplicate and text is not None:
                inbound_seq = log.message(
                    direction="in", sender="customer", body=text, now=now, external_id=external_id, kind=kind
                ).seq
            ctx = TurnContext(
                conversation_id=row["id"],
                channel=Channel(row["channel"]),
                address=row["address"],
                now=now,
                state=ConversationState.from_json(row["state"]),
                owner=row["owner"],
                status=row["status"],
                ticket_id=row["ticket_id"],
                next_step=row["next_step"],
                next_step_due=row["next_step_due"],
                identity=Identity(
                    IdentityLevel(row["identity_level"]),
                    row["identity_method"],
                    row["identity_at"],
                    row["claimed_ref"],
                ),
            )
            turn = PgOpenTurn(
                conn,
                ctx,
                row["customer_ref"],
                log,
                inbound_seq=inbound_seq,
                duplicate=bool(duplicate),
                inbound_now=inbound_seq is not None,
            )
            yield turn
            if log.messages or log.events:  # a turn that never replied (duplicate) still keeps its log
                await log.flush(conn)
                await conn.execute("UPDATE conversations SET last_seq = $2 WHERE id = $1", row["id"], log.seq)

    async def mark_interrupted(self, conversation_id: int, seq: int, heard: str, now: datetime) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT body, interrupted FROM messages WHERE conversation_id = $1 AND seq = $2 FOR UPDATE",
                conversation_id,
                seq,
            )
            if row is None or row["interrupted"]:
                return
            await conn.execute(
                "UPDATE messages SET body = $3, interrupted = true, meta = $4 WHERE conversation_id = $1 AND seq = $2",
                conversation_id,
                seq,
                heard,
                {"planned": row["body"], "heard_chars": len(heard)},
            )
            # A question the caller never heard to its end is not pending any more: a later
            # "yes" must not confirm something they did not hear.
            latest_bot = await conn.fetchval(
                "SELECT max(seq) FROM messages WHERE conversation_id = $1 AND sender = 'bot'", conversation_id
            )
            if latest_bot == seq:
                await conn.execute(
                    """UPDATE conversations SET state = jsonb_set(state, '{awaiting}', 'null'::jsonb)
                       WHERE id = $1 AND state ? 'awaiting'""",
                    conversation_id,
                )
            await record_event(
                conn,
                conversation_id,
                "bot_interrupted",
                {"seq": seq, "heard_chars": len(heard), "planned_chars": len(row["body"])},
                now,
            )

    async def _lock_open_conversation(
        self, conn: asyncpg.Connection, channel: Channel, address: str, now: datetime
    ) -> asyncpg.Record:
        row = await conn.fetchrow(
            "SELECT * FROM conversations WHERE channel = $1 AND address = $2 AND status <> 'closed' FOR UPDATE",
            str(channel),
            address,
        )
        if row is not None:
            return row
        await conn.execute(
            """INSERT INTO conversations (channel, address, created_at, updated_at) VALUES ($1, $2, $3, $3)
               ON CONFLICT (channel, address) WHERE status <> 'closed' DO NOTHING""",
            str(channel),
            address,
            now,
        )
        row = await conn.fetchrow(
            "SELECT * FROM conversations WHERE channel = $1 AND address = $2 AND status <> 'closed' FOR UPDATE",
            str(channel),
            address,
        )
        assert row is not None
        return row

    async def open_conversation(self, channel: Channel, address: str, now: datetime) -> dict[str, Any]:
        """The open conversation for an address (created if missing), with its transcript."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._lock_open_conversation(conn, channel, address, now)
            messages = await conn.fetch(
                "SELECT seq, sender, body, kind, created_at FROM messages WHERE conversation_id = $1 ORDER BY seq",
                row["id"],
            )
        return {"conversation": dict(row), "messages": [dict(m) for m in messages]}
