"""Phone calls: one row per CallSid, and status callbacks deduplicated on (CallSid, CallStatus)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from crm_bridge.conversations import record_event

FINAL_STATUSES = ("completed", "busy", "failed", "no-answer", "canceled")


class CallStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record_incoming(
        self, call_sid: str, caller: str | None, called: str | None, now: datetime
    ) -> bool:
        """Store a new call; False when this CallSid was seen before (a retried webhook)."""
        row = await self._pool.fetchval(
            """INSERT INTO calls (call_sid, caller, called, status, started_at) VALUES ($1, $2, $3, 'ringing', $4)
               ON CONFLICT (call_sid) DO NOTHING RETURNING call_sid""",
            call_sid,
            caller,
            called,
            now,
        )
        return row is not None

    async def stream_started(
        self, call_sid: str, stream_sid: str, conversation_id: int | None, caller: str | None, now: datetime
    ) -> None:
        await self._pool.execute(
            """INSERT INTO calls (call_sid, caller, status, started_at, answered_at, stream_sid, conversation_id)
               VALUES ($1, $2, 'in-progress', $3, $3, $4, $5)
               ON CONFLICT (call_sid) DO UPDATE SET stream_sid = $4, conversation_id = COALESCE($5, calls.conversation_id),
                   status = 'in-progress', answered_at = COALESCE(calls.answered_at, $3)""",
            call_sid,
            caller,
            now,
            stream_sid,
            conversation_id,
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
