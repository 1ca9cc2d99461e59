"""Supervisor actions ("pages that act"): reassign a conversation, join it (watch and note) or take
it over (the supervisor writes to the customer, the AI stops replying) and hand it back to the AI,
close its ticket, add an internal note, change an agent's presence; and the work lists they are
decided on (open tickets, queue health).

All routes live under ``/api/supervisor/actions/...`` and admit supervisors and admins only
(``auth.require(*MANAGERS)``, which also checks the CSRF token of browser sessions on POST).
Every change appends an event to the conversation (or the agent) and an ``audit_log`` entry.
An internal note is an ``internal_note`` event: it is never put in the transcript or the outbox,
so it never reaches the customer. A take-over is an accepted assignment of the supervisor, so
replies and hand-back are the agent console's own code paths (:class:`crm_bridge.desk.AgentDesk`).

Mount with ``app.include_router(supervisor_actions_router(s))``.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from crm_bridge import audit
from crm_bridge.conversations import HANDOFF_INSERT, record_event
from crm_bridge.desk import store_note
from crm_bridge.users import MANAGERS, User
from web.api import ApiError
from web.auth import Authenticator
from web.console import routing_refusals_as_api_errors

if TYPE_CHECKING:
    from app.container import Services

log = logging.getLogger(__name__)

MAX_NOTE = 2000
CLOSED = ("resolved", "closed")
TICKET_STATUSES = ("open", "pending")
_TARGET = re.compile(r"^(agent):(\d{1,18})$|^(queue):(.{1,40})$")
_LIVE = ["offered", "accepted"]
# The SLA deadline that matters now: first response while none was given, else resolution.
_SLA_DUE = "LEAST(CASE WHEN t.first_response_at IS NULL THEN t.first_response_due END, t.resolution_due)"


class AssignIn(BaseModel):
    conversation_id: int
    to: str = Field(..., max_length=100, description="'agent:<user id>' or 'queue:<name>'")


class NoteIn(BaseModel):
    conversation_id: int
    text: str = Field(..., max_length=20_000)


class ConversationIn(BaseModel):
    conversation_id: int


class ReplyIn(BaseModel):
    conversation_id: int
    text: str = Field(..., max_length=4000)


class CloseIn(BaseModel):
    conversation_id: int
    next_step: str | None = Field(None, max_length=20_000)
    next_step_due: datetime | None = None
    status: str = "resolved"


class PresenceIn(BaseModel):
    user_id: int
    presence: str = Field(..., max_length=20)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def supervisor_actions_router(services: Services) -> APIRouter:
    s = services
    auth = Authenticator(s.sessions, s.api_tokens, cookie_secure=s.settings.cookie_secure)
    desk = s.desk
    routing = desk.routing
    pool: asyncpg.Pool = s.pool
    manager = auth.require(*MANAGERS)
    router = APIRouter(prefix="/api/supervisor/actions", tags=["supervisor"])

    async def _target(conn: asyncpg.Connection, to: str) -> tuple[str, int | None, str | None]:
        """``(owner, agent_id, queue)`` for a valid target, else a 404/422 a person can act on."""
        match = _TARGET.match(to.strip())
        if match is None:
            raise ApiError(422, "invalid_target", "'to' must be 'agent:<user id>' or 'queue:<queue name>'")
        if match.group(1):
            agent_id = int(match.group(2))
            user = await conn.fetchrow("SELECT id, name, disabled FROM users WHERE id = $1", agent_id)
            if user is None:
                raise ApiError(404, "unknown_user", f"user {agent_id} does not exist")
            if user["disabled"]:
                raise ApiError(
                    422, "user_disabled", f"{user['name']} is disabled and cannot take conversations"
                )
            return f"agent:{agent_id}", agent_id, None
        queue = match.group(4)
        if await conn.fetchval("SELECT 1 FROM queues WHERE name = $1", queue) is None:
            raise ApiError(422, "unknown_queue", f"there is no queue named {queue!r}")
        return f"queue:{queue}", None, queue

    @router.post("/assign")
    async def assign(body: AssignIn, user: User = Depends(manager)) -> dict[str, Any]:
        """Reassign a conversation (and its open ticket) to an active agent or to a queue."""
        return await _move(body.conversation_id, body.to, user)

    async def _move(conversation_id: int, to: str, user: User, *, takeover: bool = False) -> dict[str, Any]:
        """Give the conversation to ``to`` (``agent:<id>`` or ``queue:<name>``); ``takeover``: the
        supervisor takes it for themself (event ``taken_over``, audit ``conversation.takeover``)."""
        now = s.clock.now()
        ended_agent: int | None = None
        assignment_id: int | None = None
        async with pool.acquire() as conn, conn.transaction():
            # lock order: conversation -> assignment -> handoff -> ticket -> agent
            conv = await conn.fetchrow(
                "SELECT * FROM conversations WHERE id = $1 FOR UPDATE", conversation_id
            )
            if conv is None:
                raise ApiError(404, "not_found", f"conversation {conversation_id} not found")
            if conv["status"] == "closed":
                raise ApiError(409, "conversation_closed", "this conversation is closed; nothing to reassign")
            owner, agent_id, queue = await _target(conn, to)
            if conv["owner"] == owner:
                if takeover:
                    raise ApiError(409, "already_taken_over", "you already have this conversation")
                raise ApiError(409, "already_assigned", f"the conversation is already with {owner}")
            live = await conn.fetchrow(
                "SELECT * FROM assignments WHERE conversation_id = $1 AND status = ANY($2::text[]) FOR UPDATE",
                conv["id"],
                _LIVE,
            )
            if live is not None:  # the previous agent lets go (an open offer is withdrawn)
                status = "expired" if live["status"] == "offered" else "completed"
                await conn.execute(
                    """UPDATE assignments SET status = $2, responded_at = COALESCE(responded_at, $3), ended_at = $3
                       WHERE id = $1""",
                    live["id"],
                    status,
                    now,
                )
                await conn.execute(
                    """UPDATE notifications SET read_at = $3 WHERE user_id = $1 AND kind = 'handoff_offered'
                         AND read_at IS NULL AND data ->> 'assignment' = $2""",
                    live["agent_id"],
                    str(live["id"]),
                    now,
                )
                ended_agent = int(live["agent_id"])
            handoff = await conn.fetchrow(
                """SELECT * FROM handoffs WHERE conversation_id = $1 AND status IN ('waiting', 'offered')
                   ORDER BY id DESC LIMIT 1 FOR UPDATE""",
                conv["id"],
            )
            ticket = await conn.fetchrow(
                """SELECT * FROM tickets WHERE (id = $1 OR conversation_id = $2) AND status IN ('open', 'pending')
                   ORDER BY (id = $1) DESC, id DESC LIMIT 1 FOR UPDATE""",
                conv["ticket_id"],
                conv["id"],
            )
            ticket_id = ticket["id"] if ticket is not None else None
            before = {
                "owner": conv["owner"],
                "ticket_queue": ticket["queue"] if ticket is not None else None,
                "ticket_owner": ticket["owner"] if ticket is not None else None,
            }
            if agent_id is not None:
                work_queue = (
                    handoff["queue"]
                    if handoff is not None
                    else ticket["queue"]
                    if ticket is not None
                    else conv["owner"][6:]
                    if conv["owner"].startswith("queue:")
                    else "support"
                )
                if handoff is not None:
                    await conn.execute(
                        "UPDATE handoffs SET status = 'assigned', updated_at = $2 WHERE id = $1",
                        handoff["id"],
                        now,
                    )
                if ticket is not None:
                    await conn.execute(
                        "UPDATE tickets SET owner = $2, updated_at = $3 WHERE id = $1", ticket_id, owner, now
                    )
                assignment_id = await conn.fetchval(
                    """INSERT INTO assignments (handoff_id, conversation_id, ticket_id, agent_id, queue, status, offered_at, responded_at)
                       VALUES ($1, $2, $3, $4, $5, 'accepted', $6, $6) RETURNING id""",
                    handoff["id"] if handoff is not None else None,
                    conv["id"],
                    ticket_id,
                    agent_id,
                    work_queue,
                    now,
                )
                await conn.execute(
                    "UPDATE conversations SET owner = $2, next_step = 'agent to reply', updated_at = $3 WHERE id = $1",
                    conv["id"],
                    owner,
                    now,
                )
            else:
                assert queue is not None
                priority = ticket["priority"] if ticket is not None else "normal"
                if handoff is not None:
                    await conn.execute(
                        """UPDATE handoffs SET queue = $2, status = 'waiting', tried_agents = '{}', updated_at = $3
                           WHERE id = $1""",
                        handoff["id"],
                        queue,
                        now,
                    )
                else:
                    await conn.fetchval(HANDOFF_INSERT, conv["id"], ticket_id, queue, priority, now)
                if ticket is not None:
                    await conn.execute(
                        "UPDATE tickets SET queue = $2, owner = $3, updated_at = $4 WHERE id = $1",
                        ticket_id,
                        queue,
                        owner,
                        now,
                    )
                await conn.execute(
                    """UPDATE conversations SET owner = $2, status = 'escalated', next_step = 'waiting for an agent',
                              updated_at = $3 WHERE id = $1""",
                    conv["id"],
                    owner,
                    now,
                )
            # agents' counters last (lock order), as the routing does
            if ended_agent is not None:
                await conn.execute(
                    "UPDATE agents SET active = GREATEST(active - 1, 0), updated_at = $2 WHERE user_id = $1",
                    ended_agent,
                    now,
                )
            if agent_id is not None:
                await conn.execute(
                    "UPDATE agents SET active = active + 1, last_assigned_at = $2, updated_at = $2 WHERE user_id = $1",
                    agent_id,
                    now,
                )
                await conn.execute(
                    "INSERT INTO notifications (user_id, kind, data, created_at) VALUES ($1, 'conversation_assigned', $2, $3)",
                    agent_id,
                    {
                        "conversation_id": conv["id"],
                        "ticket_id": ticket_id,
                        "by": user.id,
                        "from": conv["owner"],
                    },
                    now,
                )
            event = {"by": user.id, "by_name": user.name, "from": conv["owner"], "to": owner}
            await record_event(
                conn, conv["id"], "taken_over" if takeover else "reassigned", event, now, ticket_id
            )
            after = {
                "owner": owner,
                "ticket_queue": queue or (ticket["queue"] if ticket is not None else None),
                "ticket_owner": owner if ticket is not None else None,
            }
            await audit.record(
                conn,
                user,
                "conversation.takeover" if takeover else "conversation.reassign",
                f"conversation:{conv['id']}",
                before,
                after,
            )
        if ended_agent is not None and ended_agent != agent_id:
            await desk.publish(
                ended_agent,
                {"type": "assignment", "conversation_id": conv["id"], "status": "reassigned", "to": owner},
            )
        if agent_id is not None and not takeover:
            await desk.publish(
                agent_id,
                {
                    "type": "assignment",
                    "assignment_id": assignment_id,
                    "conversation_id": conv["id"],
                    "ticket_id": ticket_id,
                    "status": "accepted",
                    "reassigned_by": user.name,
                    "at": now.isoformat(),
                },
            )
        elif queue is not None:
            try:  # someone of the new queue, now (as after a decline)
                await desk.offer_next(queue)
            except Exception:
                log.exception("offering a reassigned conversation failed", extra={"queue": queue})
        return {"conversation_id": conv["id"], "from": conv["owner"], "to": owner, "ticket_id": ticket_id}

    @router.post("/note")
    async def note(body: NoteIn, user: User = Depends(manager)) -> dict[str, Any]:
        """An internal note on the conversation's timeline; never sent to the customer."""
        text = s.redactor.redact(body.text.strip())
        if not text:
            raise ApiError(422, "empty_note", "the note is empty")
        if len(text) > MAX_NOTE:
            raise ApiError(422, "note_too_long", f"notes are limited to {MAX_NOTE} characters")
        now = s.clock.now()
        async with pool.acquire() as conn, conn.transaction():
            conv = await conn.fetchrow(
                "SELECT ticket_id FROM conversations WHERE id = $1 FOR UPDATE", body.conversation_id
            )
            if conv is None:
                raise ApiError(404, "not_found", f"conversation {body.conversation_id} not found")
            note = await store_note(conn, body.conversation_id, conv["ticket_id"], user, text, now)
        return {"note": note}

    # ---- join, take over, reply, hand back, close ------------------------------------------------
    async def _conversation_row(conversation_id: int) -> asyncpg.Record:
        row = await pool.fetchrow(
            "SELECT id, owner, status, ticket_id FROM conversations WHERE id = $1", conversation_id
        )
        if row is None:
            raise ApiError(404, "not_found", f"conversation {conversation_id} not found")
        return row

    async def _watch(conversation_id: int, user: User, kind: str) -> dict[str, Any]:
        row = await _conversation_row(conversation_id)
        now = s.clock.now()
        data = {"by": user.id, "by_name": user.name}
        async with pool.acquire() as conn, conn.transaction():
            await record_event(conn, conversation_id, kind, data, now, row["ticket_id"])
            await audit.record(
                conn,
                user,
                "conversation.join" if kind == "supervisor_joined" else "conversation.leave",
                f"conversation:{conversation_id}",
                None,
                {"owner": row["owner"]},
            )
        return {
            "conversation_id": conversation_id,
            "owner": row["owner"],
            "watching": kind == "supervisor_joined",
        }

    @router.post("/join")
    async def join(body: ConversationIn, user: User = Depends(manager)) -> dict[str, Any]:
        """Watch the conversation live and post internal notes; the AI (or the agent) keeps serving."""
        return await _watch(body.conversation_id, user, "supervisor_joined")

    @router.post("/leave")
    async def leave(body: ConversationIn, user: User = Depends(manager)) -> dict[str, Any]:
        """Stop watching a joined conversation."""
        return await _watch(body.conversation_id, user, "supervisor_left")

    @router.post("/takeover")
    async def takeover(body: ConversationIn, user: User = Depends(manager)) -> dict[str, Any]:
        """The supervisor owns the conversation from now on, as an agent who accepted it: the AI
        stops replying to it, the supervisor's replies go to the customer over its channel, and
        the agent or queue that had it lets go. ``/hand-back`` returns it to the AI."""
        return await _move(body.conversation_id, f"agent:{user.id}", user, takeover=True)

    @router.post("/reply")
    async def reply(body: ReplyIn, user: User = Depends(manager)) -> dict[str, Any]:
        """Send the supervisor's text to the customer of a conversation they took over, exactly as
        an agent's reply (transcript, outbox, the customer's channel; the ticket's first response)."""
        with routing_refusals_as_api_errors():
            sent = await desk.agent_reply(body.conversation_id, user.id, body.text)
        await audit.record(
            pool,
            user,
            "conversation.reply",
            f"conversation:{body.conversation_id}",
            None,
            {"seq": sent.message.seq, "outbox_id": sent.outbox_id},
        )
        return {
            "message": {"seq": sent.message.seq, "sender": "agent", "body": sent.message.body},
            "sent": sent.sent,
        }

    @router.post("/hand-back")
    async def hand_back(body: ConversationIn, user: User = Depends(manager)) -> dict[str, Any]:
        """Return a conversation the supervisor took over to the AI, which answers again."""
        with routing_refusals_as_api_errors():
            await desk.hand_back(body.conversation_id, user.id)
        await audit.record(
            pool,
            user,
            "conversation.hand_back",
            f"conversation:{body.conversation_id}",
            {"owner": f"agent:{user.id}"},
            {"owner": "ai"},
        )
        return {"conversation_id": body.conversation_id, "owner": "ai"}

    @router.post("/close")
    async def close(body: CloseIn, user: User = Depends(manager)) -> dict[str, Any]:
        """Resolve (or close) a conversation's open ticket with its next step, whoever owns it; a
        person who had the conversation lets go and the AI answers the customer's next message."""
        now = s.clock.now()
        if body.status not in CLOSED:
            raise ApiError(422, "invalid_status", f"status must be one of {', '.join(CLOSED)}")
        step = s.redactor.redact((body.next_step or "").strip())
        if not step or body.next_step_due is None or body.next_step_due <= now:
            raise ApiError(
                422,
                "next_step_required",
                "closing a ticket needs a next step and a due date in the future (e.g. 'confirm the refund arrived', in 3 days)",
            )
        if len(step) > MAX_NOTE:
            raise ApiError(422, "next_step_too_long", f"the next step is limited to {MAX_NOTE} characters")
        freed: int | None = None
        async with pool.acquire() as conn, conn.transaction():
            # lock order: conversation -> assignment -> ticket -> agent
            conv = await conn.fetchrow(
                "SELECT * FROM conversations WHERE id = $1 FOR UPDATE", body.conversation_id
            )
            if conv is None:
                raise ApiError(404, "not_found", f"conversation {body.conversation_id} not found")
            owner = conv["owner"]
            if owner.startswith("agent:"):
                live = await routing.complete(conv["id"], conn=conn)  # frees the agent, AI answers next
                freed = live.agent_id if live is not None else None
            ticket = await conn.fetchrow(
                """SELECT * FROM tickets WHERE (id = $1 OR conversation_id = $2) AND status IN ('open', 'pending')
                   ORDER BY (id = $1) DESC, id DESC LIMIT 1 FOR UPDATE""",
                conv["ticket_id"],
                conv["id"],
            )
            if ticket is None:
                raise ApiError(409, "no_open_ticket", "this conversation has no open ticket to close")
            await conn.execute(
                """UPDATE tickets SET status = $2, next_step = $3, next_step_due = $4,
                          resolved_at = COALESCE(resolved_at, $5), updated_at = $5 WHERE id = $1""",
                ticket["id"],
                body.status,
                step,
                body.next_step_due,
                now,
            )
            await conn.execute(
                """UPDATE conversations SET next_step = $2, next_step_due = $3,
                          status = CASE WHEN status = 'escalated' AND owner NOT LIKE 'queue:%' THEN 'open' ELSE status END
                    WHERE id = $1""",
                conv["id"],
                step,
                body.next_step_due,
            )
            await conn.execute(
                "UPDATE handoffs SET status = 'cancelled', updated_at = $2 WHERE conversation_id = $1 AND status IN ('waiting', 'offered')",
                conv["id"],
                now,
            )
            if owner.startswith("queue:"):
                await conn.execute(
                    "UPDATE conversations SET owner = 'ai', status = 'open', updated_at = $2 WHERE id = $1",
                    conv["id"],
                    now,
                )
            data = {
                "ticket": ticket["protocol"],
                "status": body.status,
                "by": user.id,
                "by_name": user.name,
                "next_step": step,
                "next_step_due": body.next_step_due.isoformat(),
            }
            await record_event(conn, conv["id"], "ticket_closed", data, now, ticket["id"])
            await audit.record(
                conn,
                user,
                "ticket.close",
                f"ticket:{ticket['protocol']}",
                {"status": ticket["status"], "owner": ticket["owner"], "next_step": ticket["next_step"]},
                {"status": body.status, "next_step": step, "next_step_due": body.next_step_due.isoformat()},
            )
        if freed is not None and freed != user.id:
            await desk.publish(
                freed,
                {"type": "assignment", "conversation_id": conv["id"], "status": "completed", "by": user.name},
            )
        return {"conversation_id": conv["id"], "ticket": ticket["protocol"], "status": body.status}

    @router.post("/presence")
    async def presence(body: PresenceIn, user: User = Depends(manager)) -> dict[str, Any]:
        """Set an agent's presence (``available``, ``busy`` or ``away``)."""
        target = await s.users.get(body.user_id)
        if target is None:
            raise ApiError(404, "unknown_user", f"user {body.user_id} does not exist")
        if target.disabled:
            raise ApiError(422, "user_disabled", f"{target.name} is disabled")
        before = await routing.agent(body.user_id)
        with routing_refusals_as_api_errors():
            agent = await routing.set_presence(body.user_id, body.presence)
        await audit.record(
            pool,
            user,
            "agent.presence",
            f"user:{body.user_id}",
            {"presence": before.presence if before else None},
            {"presence": agent.presence},
        )
        await desk.publish(body.user_id, {"type": "presence", "presence": agent.presence, "by": user.name})
        if agent.presence == "available":
            for q in agent.queues:
                try:
                    await desk.offer_next(q)
                except Exception:
                    log.exception("offering after a presence change failed", extra={"queue": q})
        return {"agent": agent.__dict__}

    @router.get("/tickets")
    async def tickets(
        queue: str | None = Query(None, max_length=40),
        status: str = Query("open", description="open or pending"),
        limit: int = Query(25, ge=1, le=200),
        offset: int = Query(0, ge=0),
        _user: User = Depends(manager),
    ) -> dict[str, Any]:
        """Open (or pending) tickets, the soonest SLA deadline first."""
        if status not in TICKET_STATUSES:
            raise ApiError(422, "invalid_status", f"status must be one of {', '.join(TICKET_STATUSES)}")
        where = "t.status = $1 AND ($2::text IS NULL OR t.queue = $2)"
        total = await pool.fetchval(f"SELECT count(*) FROM tickets t WHERE {where}", status, queue or None)
        rows = await pool.fetch(
            f"""SELECT t.id, t.protocol, t.status, t.priority, t.queue, t.owner, t.subject, t.conversation_id,
                       t.next_step, t.next_step_due, t.sla_breached, t.created_at, {_SLA_DUE} AS sla_due,
                       u.name AS owner_user
                  FROM tickets t
                  LEFT JOIN users u
                    ON u.id = CASE WHEN t.owner ~ '^agent:[0-9]+$' THEN substr(t.owner, 7)::bigint END
                 WHERE {where}
                 ORDER BY {_SLA_DUE} ASC NULLS LAST, t.created_at, t.id
                 LIMIT $3 OFFSET $4""",
            status,
            queue or None,
            limit,
            offset,
        )
        items = []
        for r in rows:
            raw = r["owner"] or ""
            if r["owner_user"]:
                owner_name = r["owner_user"]
            elif raw.startswith("queue:"):
                owner_name = f"queue {raw[6:]}"
            else:
                owner_name = f"queue {r['queue']}" if not raw or raw == "ai" else raw
            items.append(
                {
                    "id": r["id"],
                    "protocol": r["protocol"],
                    "status": r["status"],
                    "priority": r["priority"],
                    "queue": r["queue"],
                    "owner": raw or None,
                    "owner_name": owner_name,
                    "subject": r["subject"],
                    "conversation_id": r["conversation_id"],
                    "next_step": r["next_step"],
                    "next_step_due": _iso(r["next_step_due"]),
                    "sla_due": _iso(r["sla_due"]),
                    "sla_breached": list(r["sla_breached"]),
                }
            )
        return {"tickets": items, "total": int(total), "limit": limit, "offset": offset}

    @router.get("/queues")
    async def queues(_user: User = Depends(manager)) -> dict[str, Any]:
        """Per queue: waiting handoffs, the longest wait, the next SLA due and available agents;
        ``warning`` when work waits and nobody is available to take it."""
        now = s.clock.now()
        rows = await pool.fetch(
            f"""SELECT q.name,
                       (SELECT count(*) FROM handoffs h WHERE h.queue = q.name AND h.status = 'waiting') AS waiting,
                       (SELECT min(h.created_at) FROM handoffs h WHERE h.queue = q.name AND h.status = 'waiting') AS oldest,
                       (SELECT min({_SLA_DUE}) FROM tickets t WHERE t.queue = q.name AND t.status IN ('open', 'pending')) AS next_sla_due,
                       (SELECT count(*) FROM agents a JOIN users u ON u.id = a.user_id AND NOT u.disabled
                         WHERE a.presence = 'available' AND q.name = ANY(a.queues)) AS available,
                       (SELECT count(*) FROM agents a JOIN users u ON u.id = a.user_id AND NOT u.disabled
                         WHERE a.presence = 'available' AND q.name = ANY(a.queues) AND a.active < a.capacity) AS free
                  FROM queues q ORDER BY q.name"""
        )
        out = []
        for r in rows:
            waiting = int(r["waiting"])
            out.append(
                {
                    "name": r["name"],
                    "waiting": waiting,
                    "longest_wait_seconds": int((now - r["oldest"]).total_seconds()) if r["oldest"] else 0,
                    "next_sla_due": _iso(r["next_sla_due"]),
                    "agents_available": int(r["available"]),
                    "agents_with_capacity": int(r["free"]),
                    "warning": waiting > 0 and int(r["available"]) == 0,
                }
            )
        return {"queues": out}

    return router
