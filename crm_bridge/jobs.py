"""PostgreSQL-backed background work: the outbox, due follow-ups and SLA breaches.

Rows are claimed with ``FOR UPDATE SKIP LOCKED``, so any number of server processes can run
the runner at once without sending a text twice. The clock is injected: tests move it 48 hours
and call :meth:`JobRunner.run_once`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from crm_bridge import db
from crm_bridge.conversations import append_message, record_event
from pipeline.model import Channel, OutboundText
from pipeline.ports import Clock, TextSender

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 6
WHATSAPP_SESSION = timedelta(hours=24)


def backoff(attempts: int) -> timedelta:
    """30 s, 1 min, 2 min, 4 min ... capped at 30 min."""
    return timedelta(seconds=min(30 * 2 ** max(0, attempts - 1), 1800))


def _retryable(exc: BaseException) -> bool:
    return bool(getattr(exc, "retryable", True))


# Claim the next due row for one transaction (other runners skip it); $1: now. The outbox's $2:
# only these ids, or NULL for any.
_OUTBOX_CLAIM = """SELECT * FROM outbox WHERE status = 'queued' AND next_attempt_at <= $1
   AND ($2::bigint[] IS NULL OR id = ANY($2::bigint[]))
   ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1"""
_FOLLOWUP_CLAIM = """SELECT f.*, c.last_inbound_at, cu.phone AS customer_phone
   FROM followups f
   LEFT JOIN conversations c ON c.id = f.conversation_id
   LEFT JOIN customers cu ON f.customer_ref ~ '^[0-9]+$' AND cu.id = f.customer_ref::bigint
   WHERE f.status = 'scheduled' AND f.due_at <= $1
   ORDER BY f.due_at FOR UPDATE OF f SKIP LOCKED LIMIT 1"""

# One more failed attempt of an outbox text or a follow-up; parameters: id, attempts, last error,
# final (failed for good, else due again), next due time.
_OUTBOX_ATTEMPT_FAILED = """UPDATE outbox SET attempts = $2, last_error = $3,
    status = CASE WHEN $4 THEN 'failed' ELSE 'queued' END, next_attempt_at = $5 WHERE id = $1"""
_FOLLOWUP_ATTEMPT_FAILED = """UPDATE followups SET attempts = $2, last_error = $3,
    status = CASE WHEN $4 THEN 'failed' ELSE 'scheduled' END, due_at = $5 WHERE id = $1"""


async def _count_failed_attempt(
    conn: asyncpg.Connection,
    update: str,
    row: asyncpg.Record,
    error: BaseException,
    now: datetime,
    *,
    event: str,
    data: dict[str, Any],
    ticket_id: int | None = None,
) -> tuple[int, bool]:
    """Store one more failed attempt of ``row`` with ``update`` (one of the statements above): failed
    for good when the error is not retryable or the attempts are used up, else due again after a
    backoff; then record ``event`` with ``data``, the attempts so far and whether that was the last.
    Returns those two."""
    attempts = row["attempts"] + 1
    final = not _retryable(error) or attempts >= MAX_ATTEMPTS
    await conn.execute(update, row["id"], attempts, str(error)[:500], final, now + backoff(attempts))
    await record_event(
        conn, row["conversation_id"], event, {**data, "attempts": attempts, "final": final}, now, ticket_id
    )
    return attempts, final


@dataclass
class RunStats:
    outbox_sent: int = 0
    outbox_failed: int = 0
    followups_sent: int = 0
    followups_failed: int = 0
    sla_breaches: int = 0


class JobRunner:
    """Sends queued texts and due follow-ups; marks SLA breaches."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        senders: Mapping[Channel, TextSender],
        clock: Clock,
        *,
        poll_seconds: float = 1.0,
        batch: int = 20,
        extra_passes: Sequence[Callable[[], Awaitable[object]]] = (),
    ) -> None:
        self._pool = pool
        self._extra_passes = tuple(extra_passes)  # e.g. routing: expire offers, offer handoffs, SLA alerts
        self._senders = senders
        self._clock = clock
        self._poll = poll_seconds
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    async def _claim_each(
        self, claim: str, *params: Any
    ) -> AsyncGenerator[tuple[asyncpg.Connection, asyncpg.Record, datetime], None]:
        """Up to a batch of rows, claimed one at a time by ``claim`` (parameters: now, then
        ``params``), each with the connection of its own transaction and the time it was claimed
        at; the transaction commits when the next row is asked for. Iterate it under
        ``contextlib.aclosing``, so that an error rolls back the row at hand at once."""
        for _ in range(self._batch):
            now = self._clock.now()
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(claim, now, *params)
                if row is None:
                    return
                yield conn, row, now

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="closeloop-job-runner")

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except db.UNREACHABLE as e:
                # The database is away (restarting, an outage): one line, the next pass retries.
                log.warning("job runner pass skipped: database unreachable (%s)", type(e).__name__)
            except Exception:  # keep the runner alive; the next pass retries
                log.exception("job runner pass failed")
            await asyncio.sleep(self._poll)

    async def run_once(self) -> RunStats:
        stats = RunStats()
        await self.dispatch_outbox(stats=stats)
        await self.send_due_followups(stats=stats)
        stats.sla_breaches = await self.mark_sla_breaches()
        for extra in self._extra_passes:
            try:
                await extra()
            except asyncio.CancelledError:
                raise
            except db.UNREACHABLE as e:  # the database went away mid-pass: the loop's one line
                log.warning(
                    "job runner extra pass skipped: database unreachable (%s)",
                    type(e).__name__,
                    extra={"job_pass": getattr(extra, "__qualname__", repr(extra))},
                )
            except Exception:  # one failing pass must not stop the outbox or the others
                log.exception(
                    "job runner extra pass failed",
                    extra={"job_pass": getattr(extra, "__qualname__", repr(extra))},
                )
        return stats

    # ---- outbox ------------------------------------------------------------------------------
    async def dispatch_outbox(
        self, ids: list[int] | None = None, *, stats: RunStats | None = None
    ) -> RunStats:
        """Send queued outbox texts (``ids`` to send particular ones right after a turn commits)."""
        stats = stats or RunStats()
        async with aclosing(self._claim_each(_OUTBOX_CLAIM, ids)) as rows:
            async for conn, row, now in rows:
                message = OutboundText(
                    channel=Channel(row["channel"]),
                    to=row["address"],
                    body=row["body"],
                    kind=row["kind"],
                    conversation_id=row["conversation_id"],
                    seq=row["message_seq"],
                )
                error = await self._send(message)
                if isinstance(error, BaseException):
                    await self._outbox_failed(conn, row, error, now)
                    stats.outbox_failed += 1
                else:
                    await conn.execute(
                        "UPDATE outbox SET status = 'sent', sent_at = $2, provider_ref = $3, channel_used = $4, attempts = attempts + 1 WHERE id = $1",
                        row["id"],
                        now,
                        error.provider_ref,
                        str(error.channel_used),
                    )
                    if row["kind"] == "verification_code" and error.provider_ref != "local-only":
                        # Delivered: the code lives on the customer's phone, not in our database.
                        await conn.execute(
                            "UPDATE outbox SET body = '[code delivered]' WHERE id = $1", row["id"]
                        )
                    await record_event(
                        conn,
                        row["conversation_id"],
                        "text_sent",
                        {
                            "outbox": row["id"],
                            "kind": row["kind"],
                            "channel": str(error.channel_used),
                            "provider_ref": error.provider_ref,
                        },
                        now,
                    )
                    stats.outbox_sent += 1
        return stats

    async def _outbox_failed(
        self, conn: asyncpg.Connection, row: asyncpg.Record, error: BaseException, now: datetime
    ) -> None:
        attempts, final = await _count_failed_attempt(
            conn,
            _OUTBOX_ATTEMPT_FAILED,
            row,
            error,
            now,
            event="text_failed",
            data={"outbox": row["id"], "error": type(error).__name__},
        )
        log.warning(
            "outbox send failed", extra={"outbox_id": row["id"], "attempts": attempts, "final": final}
        )

    async def _send(self, message: OutboundText, **kwargs: Any) -> Any:
        """Send through the channel's sender; returns SendResult or the exception."""
        sender = self._senders.get(message.channel)
        if sender is None:
            return LookupError(f"no sender configured for channel {message.channel}")
        try:
            if kwargs and hasattr(sender, "send_followup"):
                return await sender.send_followup(message, **kwargs)
            return await sender.send(message)
        except Exception as e:  # translated per provider; classified by .retryable
            return e

    # ---- follow-ups ----------------------------------------------------------------------------
    async def send_due_followups(self, *, stats: RunStats | None = None) -> RunStats:
        stats = stats or RunStats()
        async with aclosing(self._claim_each(_FOLLOWUP_CLAIM)) as rows:
            async for conn, row, now in rows:
                result = await self._send_followup(conn, row, now)
                if isinstance(result, BaseException):
                    await self._followup_failed(conn, row, result, now)
                    stats.followups_failed += 1
                else:
                    stats.followups_sent += 1
        return stats

    async def _send_followup(self, conn: asyncpg.Connection, row: asyncpg.Record, now: datetime) -> Any:
        channel = Channel(row["channel"])
        kwargs: dict[str, Any] = {}
        if channel == Channel.WHATSAPP:
            last = row["last_inbound_at"]
            kwargs = {
                "whatsapp_session_open": last is not None and now - last < WHATSAPP_SESSION,
                "sms_fallback_to": row["customer_phone"] or row["address"],
            }
        try:
            async with conn.transaction():  # savepoint: the transcript line exists only if the send worked
                seq = None
                if row["conversation_id"] is not None:
                    stored = await append_message(
                        conn,
                        row["conversation_id"],
                        direction="out",
                        sender="bot",
                        body=row["body"],
                        now=now,
                        kind="followup",
                    )
                    seq = stored.seq
                message = OutboundText(
                    channel=channel,
                    to=row["address"],
                    body=row["body"],
                    kind="followup",
                    conversation_id=row["conversation_id"],
                    seq=seq,
                )
                result = await self._send(message, **kwargs)
                if isinstance(result, BaseException):
                    raise _Rollback(result)
        except _Rollback as rollback:
            return rollback.error
        return await self._followup_sent(conn, row, result, now)

    async def _followup_sent(
        self, conn: asyncpg.Connection, row: asyncpg.Record, result: Any, now: datetime
    ) -> Any:
        await conn.execute(
            """UPDATE followups SET status = 'sent', sent_at = $2, provider_ref = $3, channel_used = $4,
                      attempts = attempts + 1 WHERE id = $1""",
            row["id"],
            now,
            result.provider_ref,
            f"{result.channel_used}:{result.detail}" if result.detail else str(result.channel_used),
        )
        await record_event(
            conn,
            row["conversation_id"],
            "followup_sent",
            {
                "followup": row["id"],
                "channel": str(result.channel_used),
                "detail": result.detail,
                "provider_ref": result.provider_ref,
            },
            now,
            row["ticket_id"],
        )
        return result

    async def _followup_failed(
        self, conn: asyncpg.Connection, row: asyncpg.Record, error: BaseException, now: datetime
    ) -> None:
        await _count_failed_attempt(
            conn,
            _FOLLOWUP_ATTEMPT_FAILED,
            row,
            error,
            now,
            event="followup_failed",
            data={"followup": row["id"]},
            ticket_id=row["ticket_id"],
        )

    # ---- SLA -------------------------------------------------------------------------------------
    async def mark_sla_breaches(self) -> int:
        now = self._clock.now()
        count = 0
        async with self._pool.acquire() as conn, conn.transaction():
            for kind, due, done in (
                ("first_response", "first_response_due", "first_response_at"),
                ("resolution", "resolution_due", "resolved_at"),
            ):
                rows = await conn.fetch(
                    f"""UPDATE tickets SET sla_breached = array_append(sla_breached, $2), updated_at = $1
                        WHERE status IN ('open', 'pending') AND {done} IS NULL AND {due} < $1
                          AND NOT ($2 = ANY(sla_breached))
                        RETURNING id, protocol, conversation_id, queue""",
                    now,
                    kind,
                )
                for r in rows:
                    await record_event(
                        conn,
                        r["conversation_id"],
                        "sla_breached",
                        {"ticket": r["protocol"], "sla": kind, "queue": r["queue"]},
                        now,
                        r["id"],
                    )
                count += len(rows)
        return count


class _Rollback(Exception):
    """Raised inside the follow-up savepoint to undo its transcript line; carries the send error."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = _retryable(error)
