"""Phone calls: one row per CallSid, and status callbacks deduplicated on (CallSid, CallStatus)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from crm_bridge.conversations import append_message, record_event
from crm_bridge.desk import schedule_callback

FINAL_STATUSES = ("completed", "busy", "failed", "no-answer", "canceled")


class CallStore:
    """Args: pool; node_id: the node (crm_bridge/nodes.py) whose process runs the streams it starts."""

    def __init__(self, pool: asyncpg.Pool, node_id: str | None = None) -> None:
        self._pool = pool
        self.node_id = node_id

    async def record_incoming(
        self,
        call_sid: str,
        caller: str | None,
        called: str | None,
        now: datetime,
        *,
        stir_verstat: str | None = None,
    ) -> bool:
        """Store a new call from the signed voice webhook; False when this CallSid was seen before
        (a retried webhook). A row a status callback created first gets the caller and the
        SHAKEN/STIR verification (``StirVerstat``) it lacks."""
        inserted = await self._pool.fetchval(
            """INSERT INTO calls (call_sid, caller, called, status, started_at, stir_verstat)
               VALUES ($1, $2, $3, 'ringing', $4, $5)
               ON CONFLICT (call_sid) DO UPDATE SET caller = COALESCE(calls.caller, EXCLUDED.caller),
                   called = COALESCE(calls.called, EXCLUDED.called),
                   stir_verstat = COALESCE(calls.stir_verstat, EXCLUDED.stir_verstat)
               RETURNING xmax = 0""",
            call_sid,
            caller,
            called,
            now,
            stir_verstat,
        )
        return bool(inserted)

    async def claim_stream(self, call_sid: str, now: datetime) -> asyncpg.Record | None:
        """Use the media stream token of ``call_sid`` (once): the call's ``caller`` and
        ``stir_verstat`` as the voice webhook stored them, or None when the call is unknown or its
        token was used already (a replayed stream start)."""
        return await self._pool.fetchrow(
            """UPDATE calls SET token_used_at = $2 WHERE call_sid = $1 AND token_used_at IS NULL
               RETURNING caller, stir_verstat""",
            call_sid,
            now,
        )

    async def stream_started(
        self, call_sid: str, stream_sid: str, conversation_id: int | None, caller: str | None, now: datetime
    ) -> None:
        await self._pool.execute(
            """INSERT INTO calls (call_sid, caller, status, started_at, answered_at, stream_sid, conversation_id, node_id)
               VALUES ($1, $2, 'in-progress', $3, $3, $4, $5, $6)
               ON CONFLICT (call_sid) DO UPDATE SET stream_sid = $4, conversation_id = COALESCE($5, calls.conversation_id),
                   status = 'in-progress', answered_at = COALESCE(calls.answered_at, $3), node_id = $6""",
            call_sid,
            caller,
            now,
            stream_sid,
            conversation_id,
            self.node_id,
        )

    async def lines_busy(
        self,
        call_sid: str,
        caller: str | None,
        *,
        queue: str,
        said: str,
        due: datetime,
        now: datetime,
    ) -> int | None:
        """A call turned away because every line was busy: its conversation holds what the caller
        heard, a ticket in ``queue`` with the caller as contact, and a call back due at ``due``.

        Returns the callback id; None when this call was turned away before (a retried webhook) or
        there is no number to call back (the ticket is opened anyway).
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE calls SET status = 'completed', end_reason = COALESCE(end_reason, 'lines_busy'),
                       ended_at = COALESCE(ended_at, $2) WHERE call_sid = $1""",
                call_sid,
                now,
            )
            conversation_id = await conn.fetchval(
                """INSERT INTO conversations (channel, address, status, owner, created_at, updated_at)
                   VALUES ('voice', $1, 'escalated', $2, $3, $3)
                   ON CONFLICT (channel, address) WHERE status <> 'closed' DO NOTHING RETURNING id""",
                call_sid,
                f"queue:{queue}",
                now,
            )
            if conversation_id is None:
                return None
            await append_message(conn, conversation_id, direction="out", sender="bot", body=said, now=now)
            ticket_id = await conn.fetchval(
                """INSERT INTO tickets (protocol, dedupe_key, status, priority, queue, subject, summary,
                                        conversation_id, first_response_due, next_step, next_step_due,
                                        created_at, updated_at)
                   VALUES ('CL-' || lpad(nextval('ticket_protocol_seq')::text, 6, '0'), $1, 'open', 'normal', $2,
                           'Call back: all lines were busy', $3, $4, $5, 'call the customer back', $5, $6, $6)
                   ON CONFLICT (dedupe_key) DO NOTHING RETURNING id""",
                f"lines_busy:{call_sid}",
                queue,
                "The caller reached us while every line was busy and was promised a call back.",
                conversation_id,
                due,
                now,
            )
            if ticket_id is None:
                return None
            await conn.execute(
                "UPDATE conversations SET ticket_id = $2 WHERE id = $1", conversation_id, ticket_id
            )
            await conn.execute(
                "UPDATE calls SET conversation_id = COALESCE(conversation_id, $2) WHERE call_sid = $1",
                call_sid,
                conversation_id,
            )
            await record_event(
                conn, conversation_id, "lines_busy", {"call_sid": call_sid, "queue": queue}, now, ticket_id
            )
            if not caller:
                return None
            return await schedule_callback(
                conn,
                conversation_id=conversation_id,
                ticket_id=ticket_id,
                queue=queue,
                phone=caller,
                due=due,
                now=now,
                extra={"reason": "lines_busy"},
            )

    async def stream_ended(self, call_sid: str, reason: str, now: datetime) -> None:
        await self._pool.execute(
            "UPDATE calls SET end_reason = COALESCE(end_reason, $2), ended_at = COALESCE(ended_at, $3) WHERE call_sid = $1",
            call_sid,
            reason,
            now,
        )

    async def record_status(self, form: dict[str, str], now: datetime) -> bool:
        """Store a status callback once; True when it was new."""
        call_sid, status = form.get("CallSid", ""), form.get("CallStatus", "")
        sequence = form.get("SequenceNumber")
        duration = form.get("CallDuration")
        async with self._pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                """INSERT INTO call_status_events (call_sid, status, sequence, duration_s, payload, received_at)
                   VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING call_sid""",
                call_sid,
                status,
                int(sequence) if sequence and sequence.isdigit() else None,
                int(duration) if duration and duration.isdigit() else None,
                {
                    k: v
                    for k, v in form.items()
                    if k
                    in (
                        "CallStatus",
                        "Direction",
                        "From",
                        "To",
                        "CallDuration",
                        "SequenceNumber",
                        "Timestamp",
                    )
                },
                now,
            )
            if inserted is None:
                return False
            conversation_id = await conn.fetchval(
                """INSERT INTO calls (call_sid, caller, called, status, started_at) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (call_sid) DO UPDATE SET status = $4,
                       ended_at = CASE WHEN $4 = ANY($6::text[]) THEN COALESCE(calls.ended_at, $5) ELSE calls.ended_at END
                   RETURNING conversation_id""",
                call_sid,
                form.get("From"),
                form.get("To"),
                status,
                now,
                list(FINAL_STATUSES),
            )
            if conversation_id is not None:
                await record_event(
                    conn, conversation_id, "call_status", {"status": status, "duration_s": duration}, now
                )
        return True

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow("SELECT * FROM calls WHERE call_sid = $1", call_sid)
        if row is None:
            return None
        statuses = await self._pool.fetch(
            "SELECT status, received_at FROM call_status_events WHERE call_sid = $1 ORDER BY received_at",
            call_sid,
        )
        return dict(row) | {"status_events": [dict(s) for s in statuses]}
