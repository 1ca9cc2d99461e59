"""Warm transfers on PostgreSQL: ``transfers``, their ``transfer_steps``, and the call back owed
when nobody answers.

:class:`telephony.transfer.WarmTransfer` drives a transfer (Twilio call control, TwiML, ring
timers); every row it reads or writes goes through :class:`TransferStore`. Moves are
compare-and-set updates on ``transfers.status``, so a late or repeated Twilio callback changes
nothing; steps are idempotent on their ``dedupe_key``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from crm_bridge.assignments import Assignment
from crm_bridge.conversations import append_message, record_event
from crm_bridge.desk import schedule_callback
from pipeline.service import StoredMessage

#: A transfer in one of these states still owns its call (one live transfer per call).
LIVE = ("dialing", "ringing", "answered", "connected")
#: The caller is on hold and no agent has joined yet.
WAITING_FOR_AGENT = ("dialing", "ringing", "answered")


class Offers(Protocol):
    """What a transfer needs of :class:`crm_bridge.routing.Routing`."""

    async def offer_to_phone_agent(
        self, conversation_id: int, *, exclude: list[int] | None = None
    ) -> Assignment | None: ...

    async def accept(self, assignment_id: int, agent_id: int) -> Assignment: ...

    async def decline(self, assignment_id: int, agent_id: int) -> Assignment: ...


class TransferStore:
    """Rows of warm transfers. Safe to share; each method is one statement or one transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # ---- reads -------------------------------------------------------------------------------
    async def open_handoff(self, conversation_id: int) -> asyncpg.Record | None:
        """The conversation's newest waiting or offered handoff (``ticket_id``, ``queue``)."""
        return await self._pool.fetchrow(
            """SELECT ticket_id, queue FROM handoffs WHERE conversation_id = $1 AND status IN ('waiting', 'offered')
               ORDER BY id DESC LIMIT 1""",
            conversation_id,
        )

    async def load(self, transfer_id: int) -> asyncpg.Record | None:
        return await self._pool.fetchrow("SELECT * FROM transfers WHERE id = $1", transfer_id)

    async def agent_phone(self, agent_id: int) -> str | None:
        return await self._pool.fetchval("SELECT phone FROM users WHERE id = $1", agent_id)

    async def ticket_brief(self, ticket_id: int | None) -> asyncpg.Record | None:
        """``protocol`` and ``summary`` of the ticket an agent is briefed on; None without one."""
        if not ticket_id:
            return None
        return await self._pool.fetchrow("SELECT protocol, summary FROM tickets WHERE id = $1", ticket_id)

    async def called_number(self, call_sid: str) -> str | None:
        """The number the customer called (the agent's caller id when none is configured)."""
        return await self._pool.fetchval("SELECT called FROM calls WHERE call_sid = $1", call_sid)

    async def steps(self, transfer_id: int) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            "SELECT step, twilio_sid, outcome, data, created_at FROM transfer_steps WHERE transfer_id = $1 ORDER BY id",
            transfer_id,
        )
        return [dict(r) for r in rows]

    # ---- moves -------------------------------------------------------------------------------
    async def create(
        self,
        *,
        call_sid: str,
        conversation_id: int,
        ticket_id: int | None,
        queue: str,
        name_for: Callable[[int], str],
        now: datetime,
        via: str = "phone",
    ) -> tuple[int, str] | None:
        """Open a transfer of ``call_sid`` with its conference ``name_for(id)``, its ``started``
        step and a ``transfer_started`` event. Returns ``(id, conference name)``; None when the
        call already has a live transfer."""
        async with self._pool.acquire() as conn, conn.transaction():
            transfer_id = await conn.fetchval(
                """INSERT INTO transfers (call_sid, conversation_id, ticket_id, queue, status, created_at, updated_at, via)
                   VALUES ($1, $2, $3, $4, 'dialing', $5, $5, $6)
                   ON CONFLICT (call_sid) WHERE status IN ('dialing', 'ringing', 'answered', 'connected') DO NOTHING
                   RETURNING id""",
                call_sid,
                conversation_id,
                ticket_id,
                queue,
                now,
                via,
            )
            if transfer_id is None:
                return None
            name = name_for(transfer_id)
            await conn.execute("UPDATE transfers SET conference_name = $2 WHERE id = $1", transfer_id, name)
            await self.step(
                transfer_id,
                "started",
                call_sid,
                "ok",
                {"queue": queue, "conference": name, "via": via},
                now,
                conn=conn,
            )
            await record_event(
                conn,
                conversation_id,
                "transfer_started",
                {"transfer": transfer_id, "queue": queue, "via": via},
                now,
                ticket_id,
            )
        return transfer_id, name

    async def set_status(
        self, transfer_id: int, from_: Sequence[str], to: str, now: datetime
    ) -> asyncpg.Record | None:
        """Compare-and-set: the transfer moves only from one of ``from_``; returns the row or None."""
        return await self._pool.fetchrow(
            "UPDATE transfers SET status = $3, updated_at = $4 WHERE id = $1 AND status = ANY($2::text[]) RETURNING *",
            transfer_id,
            list(from_),
            to,
            now,
        )

    async def step(
        self,
        transfer_id: int,
        step: str,
        twilio_sid: str | None,
        outcome: str,
        data: dict[str, Any],
        now: datetime,
        *,
        dedupe_key: str | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> bool:
        """Store one step (inside ``conn``'s transaction when given); False when a step with
        ``dedupe_key`` was stored before (a retried callback)."""
        row = await (self._pool if conn is None else conn).fetchval(
            """INSERT INTO transfer_steps (transfer_id, step, twilio_sid, outcome, data, dedupe_key, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id""",
            transfer_id,
            step,
            twilio_sid,
            outcome,
            data,
            dedupe_key,
            now,
        )
        return row is not None

    async def ringing(
        self, transfer_id: int, *, offer: Assignment, agent_call_sid: str, ring_seconds: int, now: datetime
    ) -> None:
        """The offered agent's phone rings: remember the agent (never rung again) and the call."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE transfers SET status = 'ringing', agent_id = $2, agent_call_sid = $3, assignment_id = $4,
                          tried_agents = array_append(tried_agents, $2), updated_at = $5 WHERE id = $1""",
                transfer_id,
                offer.agent_id,
                agent_call_sid,
                offer.id,
                now,
            )
            await self.step(
                transfer_id,
                "agent_dial",
                agent_call_sid,
                "dialed",
                {"agent": offer.agent_id, "assignment": offer.id, "ring_seconds": ring_seconds},
                now,
                conn=conn,
            )

    async def forget_agent(self, transfer_id: int, agent_id: int | None, now: datetime) -> None:
        """Back to ``dialing`` without an agent call; ``agent_id`` is never rung again."""
        await self._pool.execute(
            """UPDATE transfers SET status = CASE WHEN status IN ('ringing', 'answered') THEN 'dialing' ELSE status END,
                      agent_call_sid = NULL, assignment_id = NULL,
                      tried_agents = CASE WHEN $2::bigint IS NULL OR $2 = ANY(tried_agents) THEN tried_agents
                                          ELSE array_append(tried_agents, $2) END,
                      updated_at = $3 WHERE id = $1""",
            transfer_id,
            agent_id,
            now,
        )

    async def connected(self, t: asyncpg.Record, now: datetime) -> None:
        """The agent joined the caller's conference (``t`` is the transfer row)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE transfers SET status = 'connected', updated_at = $2 WHERE id = $1 AND status = ANY($3::text[])",
                t["id"],
                now,
                list(WAITING_FOR_AGENT),
            )
            await self.step(
                t["id"],
                "agent_connected",
                t["agent_call_sid"],
                "accepted",
                {"agent": t["agent_id"]},
                now,
                conn=conn,
            )
            await record_event(
                conn,
                t["conversation_id"],
                "transfer_connected",
                {"transfer": t["id"], "agent": t["agent_id"]},
                now,
                t["ticket_id"],
            )

    async def schedule_callback(self, t: asyncpg.Record, *, due: datetime, now: datetime) -> int | None:
        """Owe the caller of transfer ``t`` a call back at ``due`` (see
        :func:`crm_bridge.desk.schedule_callback`); None when this transfer already has one."""
        async with self._pool.acquire() as conn, conn.transaction():
            phone = await conn.fetchval("SELECT caller FROM calls WHERE call_sid = $1", t["call_sid"])
            callback_id = await schedule_callback(
                conn,
                conversation_id=t["conversation_id"],
                ticket_id=t["ticket_id"],
                queue=t["queue"],
                phone=phone,
                due=due,
                now=now,
                transfer_id=t["id"],
                extra={"transfer": t["id"]},
            )
            if callback_id is None:
                return None
            await self.step(
                t["id"],
                "callback_scheduled",
                None,
                "scheduled",
                {"callback": callback_id, "due_at": due.isoformat()},
                now,
                conn=conn,
            )
        return callback_id


class BrowserTransferStore(TransferStore):
    """The rows of transfers to agents who take calls in the browser (``transfers.via = 'browser'``):
    the same table and steps as phone transfers, plus what is said on a bridged call."""

    async def offered(
        self, transfer_id: int, *, offer: Assignment, ring_seconds: float, now: datetime
    ) -> None:
        """The offered agent's console rings: remember the agent (never rung again)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE transfers SET status = 'ringing', agent_id = $2, agent_call_sid = NULL, assignment_id = $3,
                          tried_agents = array_append(tried_agents, $2), updated_at = $4 WHERE id = $1""",
                transfer_id,
                offer.agent_id,
                offer.id,
                now,
            )
            await self.step(
                transfer_id,
                "agent_ring",
                None,
                "offered",
                {"agent": offer.agent_id, "assignment": offer.id, "ring_seconds": ring_seconds},
                now,
                conn=conn,
            )

    async def said(
        self, conversation_id: int, *, sender: str, body: str, kind: str, now: datetime
    ) -> StoredMessage:
        """Store one utterance of a bridged call (``sender``: customer, agent or bot)."""
        direction = "in" if sender == "customer" else "out"
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id)
            return await append_message(
                conn, conversation_id, direction=direction, sender=sender, body=body, now=now, kind=kind
            )

    async def assignment_status(self, assignment_id: int) -> str | None:
        return await self._pool.fetchval("SELECT status FROM assignments WHERE id = $1", assignment_id)
