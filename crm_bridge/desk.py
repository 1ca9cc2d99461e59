"""The agent side of text conversations: reply, internal notes, transfer, hand back, close with a
next step and a wrap-up code, live events.

An agent who accepted a handoff owns the conversation (``owner = 'agent:<id>'``). Their replies
are stored in the transcript under the conversation's row lock, queued in the outbox in the same
transaction and sent at once through the customer's channel (retried by the job runner if that
fails). Customer messages for the agent arrive through :meth:`AgentDesk.customer_message`, the
:class:`~pipeline.service.ConversationService` hook, and are published to the agent's
subscriptions (an in-process pub/sub the console listens to).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from crm_bridge import audit
from crm_bridge.conversations import append_message, record_event, ticket_from_row
from crm_bridge.jobs import JobRunner
from crm_bridge.queues import Conflict
from crm_bridge.routing import Assignment, NotFoundError, NotOwner, Routing, ValidationError
from crm_bridge.users import User
from pipeline.model import Channel, Ticket
from pipeline.ports import Clock, TextSender
from pipeline.redaction import Redactor
from pipeline.service import StoredMessage

log = logging.getLogger(__name__)

HANDED_BACK = "You're back with our assistant."
MAX_TEXT = 2000
CLOSED = ("resolved", "closed")
MAX_NOTE = 2000
#: Why the work ended; one is required when a ticket is resolved or closed from the console.
WRAP_UP_CODES = ("resolved", "refund_issued", "callback_scheduled", "no_response", "duplicate", "other")
EventHook = Callable[[int, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class AgentReply:
    message: StoredMessage
    outbox_id: int
    sent: bool  # False: queued, the job runner retries


@dataclass(frozen=True)
class Transfer:
    conversation_id: int
    queue: str
    to: str  # 'agent:<id>' (offered to them) or 'queue:<name>'
    offer: Assignment | None


@dataclass(frozen=True)
class RoutingPass:
    expired: int
    offered: int
    sla_alerts: int
    overflowed: int = 0


def _text_route(row: asyncpg.Record) -> tuple[Channel, str] | None:
    """Where the customer of a conversation reads texts: its own channel, SMS for a phone caller."""
    channel = Channel(row["channel"])
    if channel != Channel.VOICE:
        return channel, row["address"]
    phone = (row["state"] or {}).get("caller_phone")
    return (Channel.SMS, phone) if phone else None


class AgentDesk:
    """What an agent does with text conversations.

    Args:
        pool: the database.
        routing: queues, offers and assignments.
        senders: the channel senders (web-chat hub, Twilio) used to deliver agent texts at once.
        clock: the clock.
        on_event: also called with ``(agent_id, event)`` for every event published to an agent
            (e.g. to bridge events to other processes); its failures are logged.
        queue_size: events kept per subscription; a subscriber that falls behind loses the oldest.
        redactor: cleans what agents type (replies, next steps) before it is stored or sent; card
            numbers by default.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        routing: Routing,
        senders: Mapping[Channel, TextSender],
        clock: Clock,
        on_event: EventHook | None = None,
        *,
        queue_size: int = 200,
        redactor: Redactor | None = None,
    ) -> None:
        self._pool = pool
        self._redactor = redactor if redactor is not None else Redactor()
        self.routing = routing
        self._clock = clock
        self._on_event = on_event
        self._queue_size = queue_size
        # Not started: used for its claim (SKIP LOCKED) -> send -> mark logic, so a text is
        # never sent twice even when the background runner looks at the same outbox row.
        self._dispatcher = JobRunner(pool, senders, clock)
        self._subscribers: dict[int, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def clock(self) -> Clock:
        return self._clock

    # ---- live events -------------------------------------------------------------------------------
    def subscribe(self, agent_id: int) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives the agent's events from now on; ``unsubscribe`` it when done."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=self._queue_size)
        self._subscribers[agent_id].add(queue)
        return queue

    def unsubscribe(self, agent_id: int, queue: asyncio.Queue[dict[str, Any]]) -> None:
        queues = self._subscribers.get(agent_id)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[agent_id]

    async def publish(self, agent_id: int, event: dict[str, Any]) -> None:
        """Deliver ``event`` to the agent's consoles in this process, then to the hook (which
        bridges it to the other processes, see :mod:`crm_bridge.agent_events`)."""
        self.deliver_local(agent_id, event)
        if self._on_event is not None:
            try:
                await self._on_event(agent_id, event)
            except Exception:
                log.exception("agent event hook failed", extra={"agent_id": agent_id})

    def deliver_local(self, agent_id: int, event: dict[str, Any]) -> None:
        """Put ``event`` in the queue of every console of ``agent_id`` connected to this process."""
        for queue in list(self._subscribers.get(agent_id, ())):
            if queue.full():  # a stalled console must not grow memory without bound
                queue.get_nowait()
                log.warning("agent event queue full; dropped the oldest event", extra={"agent_id": agent_id})
            queue.put_nowait(event)

    async def customer_message(self, conversation_id: int, seq: int, text: str) -> None:
        """The :class:`~pipeline.service.ConversationService` hook: a stored customer message an
        agent owns the conversation of. Publishes it to that agent."""
        owner = await self._pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        if not owner or not owner.startswith("agent:"):
            return
        await self.publish(
            int(owner.split(":", 1)[1]),
            {
                "type": "customer_message",
                "conversation_id": conversation_id,
                "seq": seq,
                "text": text,
                "at": self._clock.now().isoformat(),
            },
        )

    # ---- routing ---------------------------------------------------------------------------------------
    async def offer_next(self, queue: str | None = None) -> Assignment | None:
        """Offer the next waiting handoff and tell the agent it was offered to."""
        offer = await self.routing.assign_next(queue)
        if offer is not None:
            await self._publish_offer(offer)
        return offer

    async def _publish_offer(self, offer: Assignment, **extra: Any) -> None:
        await self.publish(
            offer.agent_id,
            {
                "type": "offer",
                "assignment_id": offer.id,
                "conversation_id": offer.conversation_id,
                "ticket_id": offer.ticket_id,
                "queue": offer.queue,
                "at": offer.offered_at.isoformat(),
                **extra,
            },
        )

    async def offer_clocks(self, assignment_ids: list[int]) -> dict[int, dict[str, Any]]:
        """Per assignment: since when its customer waits for a person (the handoff was raised)
        and the ticket's SLA deadline that matters now (first response while none was given,
        else resolution), for the console's wait time and SLA countdown."""
        rows = await self._pool.fetch(
            """SELECT a.id, COALESCE(h.created_at, a.offered_at) AS waiting_since,
                      CASE WHEN t.first_response_at IS NULL THEN t.first_response_due ELSE t.resolution_due END AS sla_due,
                      CASE WHEN t.id IS NULL THEN NULL WHEN t.first_response_at IS NULL THEN 'first_response'
                           ELSE 'resolution' END AS sla_kind
                 FROM assignments a LEFT JOIN handoffs h ON h.id = a.handoff_id
                 LEFT JOIN tickets t ON t.id = a.ticket_id WHERE a.id = ANY($1::bigint[])""",
            assignment_ids,
        )
        now = self._clock.now()
        return {
            r["id"]: {
                "waiting_since": r["waiting_since"],
                "wait_seconds": max(0, int((now - r["waiting_since"]).total_seconds())),
                "sla_due": r["sla_due"],
                "sla_kind": r["sla_kind"] if r["sla_due"] is not None else None,
                "sla_overdue": r["sla_due"] is not None and r["sla_due"] <= now,
            }
            for r in rows
        }

    async def routing_pass(
        self, *, offer_timeout: timedelta = timedelta(minutes=2), max_offers: int = 50
    ) -> RoutingPass:
        """One pass for the job runner: withdraw unanswered offers, move waiting work of closed
        or unstaffed queues to their overflow queue, offer waiting handoffs (never of a closed
        queue), alert supervisors about SLA breaches."""
        expired = await self.routing.expire_offers(offer_timeout)
        overflowed = await self.routing.overflow_waiting()
        offered = 0
        while offered < max_offers and await self.offer_next() is not None:
            offered += 1
        return RoutingPass(expired, offered, await self.routing.notify_sla_breaches(), overflowed)

    # ---- the agent's texts -----------------------------------------------------------------------------
    async def _owned_conversation(
        self, conn: asyncpg.Connection, conversation_id: int, agent_id: int
    ) -> asyncpg.Record:
        row = await conn.fetchrow("SELECT * FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
        if row is None:
            raise NotFoundError(f"conversation {conversation_id} not found")
        if row["owner"] != f"agent:{agent_id}":
            raise NotOwner("only the agent who owns this conversation can do that; accept it first")
        return row

    async def _store_text(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        *,
        sender: str,
        body: str,
        kind: str,
        now: datetime,
    ) -> tuple[StoredMessage, int | None]:
        """Append the text to the transcript and queue it for the customer's channel (same transaction)."""
        stored = await append_message(
            conn, row["id"], direction="out", sender=sender, body=body, now=now, kind=kind
        )
        route = _text_route(row)
        if route is None:
            return stored, None
        outbox_id = await conn.fetchval(
            """INSERT INTO outbox (conversation_id, message_seq, channel, address, body, kind, next_attempt_at, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING id""",
            row["id"],
            stored.seq,
            str(route[0]),
            route[1],
            body,
            kind,
            now,
        )
        return stored, int(outbox_id)

    async def _send_now(self, outbox_id: int | None) -> bool:
        if outbox_id is None:
            return False
        try:
            stats = await self._dispatcher.dispatch_outbox([outbox_id])
        except Exception:  # queued: the job runner retries it
            log.exception("immediate send of an agent text failed", extra={"outbox_id": outbox_id})
            return False
        return stats.outbox_sent > 0

    async def agent_reply(self, conversation_id: int, agent_id: int, text: str) -> AgentReply:
        """Send the owning agent's text to the customer; the first one is the ticket's first response."""
        body = self._redactor.redact(text.strip())
        if not body:
            raise ValidationError("the message is empty", code="empty_message")
        if len(body) > MAX_TEXT:
            raise ValidationError(f"messages are limited to {MAX_TEXT} characters", code="message_too_long")
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._owned_conversation(conn, conversation_id, agent_id)
            if _text_route(row) is None:
                raise ValidationError(
                    "this caller left no number to text; call them back instead", code="no_text_channel"
                )
            stored, outbox_id = await self._store_text(
                conn, row, sender="agent", body=body, kind="agent_reply", now=now
            )
            ticket_id = row["ticket_id"]
            if ticket_id is not None:
                first = await conn.fetchval(
                    """UPDATE tickets SET first_response_at = $2, updated_at = $2
                       WHERE id = $1 AND first_response_at IS NULL RETURNING id""",
                    ticket_id,
                    now,
                )
                if first is not None:
                    await record_event(
                        conn,
                        conversation_id,
                        "first_response",
                        {"agent": agent_id, "seq": stored.seq},
                        now,
                        ticket_id,
                    )
            await record_event(
                conn,
                conversation_id,
                "agent_reply",
                {"agent": agent_id, "seq": stored.seq, "outbox": outbox_id},
                now,
                ticket_id,
            )
        assert outbox_id is not None
        return AgentReply(stored, outbox_id, await self._send_now(outbox_id))

    async def add_note(self, conversation_id: int, by: User, text: str) -> dict[str, Any]:
        """An internal note of the agent who holds the conversation; never sent to the customer."""
        body = self._checked_note(text)
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._owned_conversation(conn, conversation_id, by.id)
            return await store_note(conn, row["id"], row["ticket_id"], by, body, now)

    def _checked_note(self, text: str) -> str:
        body = self._redactor.redact(text.strip())
        if not body:
            raise ValidationError("the note is empty", code="empty_note")
        if len(body) > MAX_NOTE:
            raise ValidationError(f"notes are limited to {MAX_NOTE} characters", code="note_too_long")
        return body

    async def transfer(self, conversation_id: int, by: User, to: str) -> Transfer:
        """The holder gives the conversation to ``queue:<name>`` (it waits there and is offered to
        the next agent) or to ``agent:<id>`` (offered to that agent now; they must be available
        with free capacity, and if they decline it waits in the queue). Audited as
        ``conversation.transfer``; the holder's console and the receiving agent's hear of it."""
        kind, _, value = to.strip().partition(":")
        if kind not in ("agent", "queue") or not value or (kind == "agent" and not value.isdigit()):
            raise ValidationError(
                "'to' must be 'agent:<user id>' or 'queue:<queue name>'", code="invalid_target"
            )
        if len(value) > 40:
            raise ValidationError("'to' names an unknown agent or queue", code="invalid_target")
        to_agent = int(value) if kind == "agent" else None
        async with self._pool.acquire() as conn, conn.transaction():
            moved = await self.routing.transfer(
                conn, conversation_id, by.id, queue=value if kind == "queue" else None, to_agent=to_agent
            )
            offer = None
            if to_agent is not None:  # routing's own offer step: event, notification, one code path
                offer = await self.routing._offer(conn, moved.handoff, to_agent, self._clock.now())
            target = f"agent:{to_agent}" if to_agent is not None else f"queue:{moved.queue}"
            await audit.record(
                conn,
                by,
                "conversation.transfer",
                f"conversation:{conversation_id}",
                moved.before,
                {"owner": f"queue:{moved.queue}", "ticket_queue": moved.queue, "offered_to": target},
            )
        await self.publish(
            by.id,
            {"type": "assignment", "conversation_id": conversation_id, "status": "transferred", "to": target},
        )
        if offer is not None:
            await self._publish_offer(offer, transferred_by=by.name)
        else:
            try:  # someone of that queue, now (as after a decline)
                await self.offer_next(moved.queue)
            except Exception:
                log.exception("offering a transferred conversation failed", extra={"queue": moved.queue})
        return Transfer(conversation_id, moved.queue, target, offer)

    async def hand_back(self, conversation_id: int, agent_id: int) -> StoredMessage:
        """Return the conversation to the AI, which starts fresh; the customer is told so."""
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._owned_conversation(conn, conversation_id, agent_id)
            await self.routing.hand_back(conversation_id, agent_id, conn=conn)
            stored, outbox_id = await self._store_text(
                conn, row, sender="bot", body=HANDED_BACK, kind="handback", now=now
            )
        await self._send_now(outbox_id)
        return stored

    async def close_ticket(
        self,
        ticket_id: int,
        agent_id: int,
        next_step: str | None,
        next_step_due: datetime | None,
        *,
        status: str = "resolved",
        wrap_up: str | None = None,
        wrap_up_required: bool = False,
    ) -> Ticket:
        """Resolve or close the agent's ticket. A next step with a future due date is required:
        a loop is only closed when everyone knows what happens next and when. ``wrap_up`` (one of
        :data:`WRAP_UP_CODES`, required with ``wrap_up_required`` as the console does) says why
        the work ended; it is stored on the ticket and in the ``ticket_closed`` event."""
        if status not in CLOSED:
            raise ValidationError(f"status must be one of {', '.join(CLOSED)}", code="invalid_status")
        now = self._clock.now()
        step = self._redactor.redact((next_step or "").strip())
        if not step or next_step_due is None or next_step_due <= now:
            raise ValidationError(
                "closing a ticket needs a next step and a due date in the future (e.g. 'confirm the refund arrived', in 3 days)",
                code="next_step_required",
            )
        if (wrap_up is not None or wrap_up_required) and wrap_up not in WRAP_UP_CODES:
            raise ValidationError(
                f"choose a wrap-up code: {', '.join(WRAP_UP_CODES)}", code="wrap_up_required"
            )
        async with self._pool.acquire() as conn, conn.transaction():
            conversation_id = await conn.fetchval(
                "SELECT conversation_id FROM tickets WHERE id = $1", ticket_id
            )
            if conversation_id is not None:  # lock order: conversation, then ticket
                await conn.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
            ticket = await conn.fetchrow("SELECT * FROM tickets WHERE id = $1 FOR UPDATE", ticket_id)
            if ticket is None:
                raise NotFoundError(f"ticket {ticket_id} not found")
            if ticket["owner"] != f"agent:{agent_id}":
                raise NotOwner("only the agent who owns this ticket can close it")
            row = await conn.fetchrow(
                """UPDATE tickets SET status = $2, next_step = $3, next_step_due = $4, resolved_at = COALESCE(resolved_at, $5),
                          updated_at = $5, wrap_up = COALESCE($6, wrap_up) WHERE id = $1 RETURNING *""",
                ticket_id,
                status,
                step,
                next_step_due,
                now,
                wrap_up,
            )
            await record_event(
                conn,
                conversation_id,
                "ticket_closed",
                {
                    "ticket": row["protocol"],
                    "status": status,
                    "agent": agent_id,
                    "next_step": step,
                    "next_step_due": next_step_due.isoformat(),
                    "wrap_up": wrap_up,
                },
                now,
                ticket_id,
            )
            if conversation_id is not None:
                owner = await conn.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
                if owner == f"agent:{agent_id}":
                    await self.routing.complete(conversation_id, conn=conn)
                    await conn.execute(
                        "UPDATE conversations SET next_step = $2, next_step_due = $3 WHERE id = $1",
                        conversation_id,
                        step,
                        next_step_due,
                    )
        return ticket_from_row(row)


async def store_note(
    conn: asyncpg.Connection, conversation_id: int, ticket_id: int | None, by: User, text: str, now: datetime
) -> dict[str, Any]:
    """Store an internal note (inside the caller's transaction): an ``internal_note`` event on the
    conversation's timeline and an audit entry, never the transcript or the outbox, so it never
    reaches the customer. ``text`` is already checked and redacted. Returns the note as JSON."""
    data = {"text": text, "by": by.id, "by_name": by.name}
    event_id = await conn.fetchval(
        """INSERT INTO events (conversation_id, ticket_id, kind, data, created_at)
           VALUES ($1, $2, 'internal_note', $3, $4) RETURNING id""",
        conversation_id,
        ticket_id,
        data,
        now,
    )
    await audit.record(conn, by, "conversation.note", f"conversation:{conversation_id}", None, data)
    return {"id": event_id, "conversation_id": conversation_id, **data, "created_at": now.isoformat()}


@dataclass(frozen=True)
class Callback:
    """A call we promised to return (a warm transfer nobody could take)."""

    id: int
    queue: str
    phone: str | None
    due_at: datetime
    status: str
    conversation_id: int | None
    ticket: str | None
    summary: str | None


async def schedule_callback(
    conn: asyncpg.Connection,
    *,
    conversation_id: int,
    ticket_id: int | None,
    queue: str,
    phone: str | None,
    due: datetime,
    now: datetime,
    transfer_id: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> int | None:
    """Promise the customer a call back (inside the caller's transaction): a ``callbacks`` row of
    ``queue`` due at ``due`` (the console's *Callbacks due*), the conversation's next step, an agent
    notification and a ``callback_scheduled`` event. None when ``transfer_id`` already has one."""
    callback_id = await conn.fetchval(
        """INSERT INTO callbacks (transfer_id, conversation_id, ticket_id, queue, phone, due_at, created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (transfer_id) DO NOTHING RETURNING id""",
        transfer_id,
        conversation_id,
        ticket_id,
        queue,
        phone,
        due,
        now,
    )
    if callback_id is None:
        return None
    await conn.execute(
        "UPDATE conversations SET next_step = 'call the customer back', next_step_due = $2, updated_at = $3 WHERE id = $1",
        conversation_id,
        due,
        now,
    )
    data = {
        "callback": callback_id,
        **(extra or {}),
        "queue": queue,
        "due_at": due.isoformat(),
        "conversation_id": conversation_id,
        "ticket_id": ticket_id,
    }
    await conn.execute(
        "INSERT INTO notifications (role, kind, data, created_at) VALUES ('agent', 'callback_due', $1, $2)",
        data,
        now,
    )
    await record_event(conn, conversation_id, "callback_scheduled", data, now, ticket_id)
    return int(callback_id)


async def callbacks_due(
    pool: asyncpg.Pool, queues: tuple[str, ...] | None, *, limit: int = 50
) -> list[Callback]:
    """Scheduled callbacks of ``queues`` (all queues when None), the most urgent first."""
    rows = await pool.fetch(
        """SELECT cb.id, cb.queue, cb.phone, cb.due_at, cb.status, cb.conversation_id, t.protocol, t.summary
             FROM callbacks cb LEFT JOIN tickets t ON t.id = cb.ticket_id
            WHERE cb.status = 'scheduled' AND ($1::text[] IS NULL OR cb.queue = ANY($1::text[]))
            ORDER BY cb.due_at LIMIT $2""",
        list(queues) if queues is not None else None,
        limit,
    )
    return [
        Callback(
            r["id"],
            r["queue"],
            r["phone"],
            r["due_at"],
            r["status"],
            r["conversation_id"],
            r["protocol"],
            r["summary"],
        )
        for r in rows
    ]


async def complete_callback(
    pool: asyncpg.Pool, callback_id: int, *, by: int, queues: tuple[str, ...] | None, now: datetime
) -> Callback:
    """Mark a callback done (by an agent of its queue, or anyone when ``queues`` is None); the
    conversation records who returned the call."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT * FROM callbacks WHERE id = $1 FOR UPDATE", callback_id)
        if row is None:
            raise NotFoundError(f"callback {callback_id} not found")
        if queues is not None and row["queue"] not in queues:
            raise NotOwner(f"callback {callback_id} belongs to the {row['queue']} queue")
        if row["status"] != "scheduled":
            raise Conflict(f"callback {callback_id} is already {row['status']}")
        await conn.execute("UPDATE callbacks SET status = 'done' WHERE id = $1", callback_id)
        if row["conversation_id"] is not None:
            await record_event(
                conn, row["conversation_id"], "callback_done", {"callback": callback_id, "by": by}, now
            )
    found = await pool.fetchrow(
        "SELECT cb.*, t.protocol, t.summary FROM callbacks cb LEFT JOIN tickets t ON t.id = cb.ticket_id WHERE cb.id = $1",
        callback_id,
    )
    return Callback(
        found["id"],
        found["queue"],
        found["phone"],
        found["due_at"],
        found["status"],
        found["conversation_id"],
        found["protocol"],
        found["summary"],
    )


def build_desk(
    pool: asyncpg.Pool,
    senders: Mapping[Channel, TextSender],
    clock: Clock,
    *,
    on_event: EventHook | None = None,
    redactor: Redactor | None = None,
    skip_voice_handoffs: bool = False,
    overflow_after_minutes: int = 0,
) -> AgentDesk:
    """The routing and the agent desk of one server process (see app/container.py).

    ``skip_voice_handoffs``: the warm transfer routes phone-call handoffs (Twilio call control is
    on), so the general routing pass leaves them alone. ``overflow_after_minutes``: how long
    waiting work of an open queue with nobody available waits before it moves to the queue's
    overflow queue (0: never).
    """
    overflow_after = timedelta(minutes=overflow_after_minutes) if overflow_after_minutes > 0 else None
    routing = Routing(pool, clock, skip_voice_handoffs=skip_voice_handoffs, overflow_after=overflow_after)
    return AgentDesk(pool, routing, senders, clock, on_event, redactor=redactor)
