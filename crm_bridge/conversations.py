"""Conversations and their durable transcript in PostgreSQL.

``PgConversationStore.turn`` is the heart of durability, in three steps:

1. *load*: one short read of the conversation (created if missing) and of the inbound message's
   external id (a duplicate delivery changes nothing), with the row's ``version``;
2. *decide*: the engine runs (LLM round trips, tools, sentences streamed to a caller) with no
   connection, transaction or lock held; whatever it records goes to a buffer
   (:mod:`crm_bridge.turn_work`);
3. *commit*: one short transaction updates the conversation only if its ``version`` is still the
   one read (every update of the row moves it: migration 010), then writes the inbound message,
   the replies, tickets, outbox texts, follow-ups, handoffs and events. If another writer got
   there first, nothing is written and :class:`pipeline.service.TurnConflict` tells the service to
   run the whole turn again on the fresh state.

Business actions the engine takes during an attempt reach the business system at once, not at
commit; they are idempotent (a refund by its idempotency key, a cancellation by the order's state,
a return label by its order), so a re-run turn finds them done and completes the loop without
doing them twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from crm_bridge.db import UNREACHABLE
from crm_bridge.turn_work import HANDOFF_INSERT, PgTurnWork, TurnLog, ticket_from_row
from pipeline.identity import Identity, IdentityLevel
from pipeline.model import Channel, ConversationState
from pipeline.ports import StoreUnavailable
from pipeline.redaction import Redactor
from pipeline.service import StoredMessage, TurnConflict
from pipeline.turn_manager import TurnContext

__all__ = [
    "HANDOFF_INSERT",
    "PgConversationStore",
    "PgOpenTurn",
    "append_message",
    "record_event",
    "ticket_from_row",
]

_SAVE = """UPDATE conversations SET customer_ref = $4, status = $5, owner = $6, intent = $7, state = $8,
                  ticket_id = $9, next_step = $10, next_step_due = $11, updated_at = $12, last_seq = $3,
                  last_inbound_at = CASE WHEN $13 THEN $12 ELSE last_inbound_at END,
                  identity_level = $14, identity_method = $15, identity_at = $16, claimed_ref = $17
           WHERE id = $1 AND version = $2 RETURNING id"""

_SAVE_SEQ = "UPDATE conversations SET last_seq = $3 WHERE id = $1 AND version = $2 RETURNING id"

# The open conversation, and whether the inbound message ($3) is stored already: one round trip.
_OPEN = """SELECT c.*, EXISTS (SELECT 1 FROM messages WHERE external_id = $3 AND direction = 'in') AS duplicate
           FROM conversations c WHERE channel = $1 AND address = $2 AND status <> 'closed'"""


def _commit_in_one(save: str, first: int) -> str:
    """The version-checked ``save`` with the turn's messages and events (arrays from parameter
    ``first`` on): a turn that queued no other rows commits in one statement, one round trip."""
    m = [f"${first + i}" for i in range(8)]
    e = [f"${first + 8 + i}" for i in range(4)]
    return f"""
WITH saved AS ({save}),
msgs AS (
    INSERT INTO messages (conversation_id, seq, direction, sender, body, external_id, reply_to, kind, created_at)
    SELECT $1, m.seq, m.direction, m.sender, m.body, m.external_id, m.reply_to, m.kind, m.created_at
    FROM unnest({m[0]}::int[], {m[1]}::text[], {m[2]}::text[], {m[3]}::text[], {m[4]}::text[], {m[5]}::int[],
                {m[6]}::text[], {m[7]}::timestamptz[])
         WITH ORDINALITY AS m(seq, direction, sender, body, external_id, reply_to, kind, created_at, ord)
    WHERE EXISTS (SELECT 1 FROM saved) ORDER BY m.ord),
evts AS (
    INSERT INTO events (conversation_id, ticket_id, kind, data, created_at)
    SELECT $1, e.ticket_id, e.kind, e.data, e.created_at
    FROM unnest({e[0]}::bigint[], {e[1]}::text[], {e[2]}::jsonb[], {e[3]}::timestamptz[])
         WITH ORDINALITY AS e(ticket_id, kind, data, created_at, ord)
    WHERE EXISTS (SELECT 1 FROM saved) ORDER BY e.ord)
SELECT id FROM saved"""


_SAVE_ALL = _commit_in_one(_SAVE, 18)
_SAVE_SEQ_ALL = _commit_in_one(_SAVE_SEQ, 4)


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


class PgOpenTurn:
    """One turn attempt, buffered in memory; see :class:`pipeline.service.OpenTurn`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        ctx: TurnContext,
        customer_ref: str | None,
        log: TurnLog,
        *,
        inbound_seq: int | None,
        duplicate: bool = False,
        inbound_now: bool = False,
    ) -> None:
        self._pool = pool
        self._log = log
        self._inbound_now = inbound_now
        self.context = ctx
        self.customer_ref = customer_ref
        self.duplicate = duplicate
        self.inbound_seq = inbound_seq
        self.outbox_ids: list[int] = []
        self.work = PgTurnWork(pool, ctx, self.outbox_ids, log)
        self.saved: tuple[Any, ...] | None = None  # the conversation's columns, set by reply()

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        mark, outbox, tickets = self._log.mark(), len(self.outbox_ids), dict(self.work.tickets)
        try:
            yield
        except BaseException:
            self._log.rollback_to(mark)
            del self.outbox_ids[outbox:]
            self.work.tickets = tickets
            raise

    async def reply(self, texts: Sequence[str]) -> list[StoredMessage]:
        """Buffer the replies and the conversation's state; both are written at commit."""
        ctx = self.context
        stored = [
            self._log.message(direction="out", sender="bot", body=t, now=ctx.now, reply_to=self.inbound_seq)
            for t in texts
        ]
        self.saved = (
            ctx.customer.ref if ctx.customer else self.customer_ref,
            ctx.status,
            ctx.owner,
            ctx.state.intent,
            ctx.state.to_json(),
            ctx.ticket_id,
            ctx.next_step,
            ctx.next_step_due,
            ctx.now,
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
        committed one, written at commit (the search index follows the body)."""
        buffered = self._log.rewrite(seq, rewrite)
        if buffered is not None:
            return buffered
        conversation_id = self.context.conversation_id
        old = await self._pool.fetchval(
            "SELECT body FROM messages WHERE conversation_id = $1 AND seq = $2 AND direction = 'in'",
            conversation_id,
            seq,
        )
        if old is None:
            return None
        new = self._log.redactor.redact(rewrite(old))
        if new != old:

            async def update(conn: asyncpg.Connection) -> None:
                await conn.execute(
                    "UPDATE messages SET body = $3 WHERE conversation_id = $1 AND seq = $2",
                    conversation_id,
                    seq,
                    new,
                )

            self._log.writes.append(update)
        return old, new


class PgConversationStore:
    """Conversations on PostgreSQL; implements :class:`pipeline.service.ConversationStore`.

    ``redactor`` cleans every message, event payload and ticket text a turn writes (card numbers
    by default); the service redacts the inbound text earlier still, before the core sees it.
    A turn borrows a pooled connection only for single statements (load, id reservations, reads)
    and for its short commit, so concurrent turns cannot exhaust the pool while they think; how
    many run at once is the service's budget (voice and text apart), not the pool's size.
    """

    def __init__(self, pool: asyncpg.Pool, *, redactor: Redactor | None = None) -> None:
        self._pool = pool
        self._redactor = redactor if redactor is not None else Redactor()

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
        try:
            row, duplicate = await self._load(channel, address, external_id, now)
        except UNREACHABLE as e:
            raise StoreUnavailable(f"the database is unreachable: {type(e).__name__}") from e
        log = TurnLog(row["id"], row["last_seq"], self._redactor)
        inbound_seq: int | None = None
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
            self._pool,
            ctx,
            row["customer_ref"],
            log,
            inbound_seq=inbound_seq,
            duplicate=duplicate,
            inbound_now=inbound_seq is not None,
        )
        yield turn
        if turn.saved is None and log.empty:  # a duplicate that never replied: nothing to write
            return
        # The version check fails if anyone updated the conversation (a turn, an agent, a new
        # message) since the load; it takes the row lock only for the commit's own statements.
        save = (_SAVE, _SAVE_ALL) if turn.saved is not None else (_SAVE_SEQ, _SAVE_SEQ_ALL)
        args = (row["id"], row["version"], log.seq, *(turn.saved or ()))
        try:
            if not log.writes:
                won = await self._pool.fetchval(save[1], *args, *log.columns())
            else:
                async with self._pool.acquire() as conn, conn.transaction():
                    won = await conn.fetchval(save[0], *args)
                    if won is not None:
                        await log.write(conn)
        except UNREACHABLE as e:
            # A connection lost before the commit rolls it back: the turn runs again. If only the
            # commit's answer was lost, the rerun finds its message stored (same external id): once.
            raise StoreUnavailable(f"the database is unreachable: {type(e).__name__}") from e
        if won is None:
            raise TurnConflict(row["id"])

    async def _load(
        self, channel: Channel, address: str, external_id: str | None, now: datetime
    ) -> tuple[asyncpg.Record, bool]:
        """The open conversation (created if missing) and whether ``external_id`` is stored."""
        # A concurrent first delivery that commits after this read makes this attempt lose its
        # version check; the re-run sees the message here. The unique index is the backstop.
        row = await self._pool.fetchrow(_OPEN, str(channel), address, external_id)
        if row is None:
            async with self._pool.acquire() as conn:
                await conn.execute(
                    """INSERT INTO conversations (channel, address, created_at, updated_at) VALUES ($1, $2, $3, $3)
                       ON CONFLICT (channel, address) WHERE status <> 'closed' DO NOTHING""",
                    str(channel),
                    address,
                    now,
                )
                row = await conn.fetchrow(_OPEN, str(channel), address, external_id)
            assert row is not None
        return row, bool(row["duplicate"])

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

    async def open_conversation(self, channel: Channel, address: str, now: datetime) -> dict[str, Any]:
        """The open conversation for an address (created if missing), with its transcript."""
        row, _ = await self._load(channel, address, None, now)
        messages = await self._pool.fetch(
            "SELECT seq, sender, body, kind, created_at FROM messages WHERE conversation_id = $1 ORDER BY seq",
            row["id"],
        )
        conversation = {k: v for k, v in row.items() if k != "duplicate"}
        return {"conversation": conversation, "messages": [dict(m) for m in messages]}
