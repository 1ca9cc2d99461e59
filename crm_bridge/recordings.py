"""Call recordings kept: the stereo WAV files under the data directory and their ``recordings`` rows.

When a recorded call ends, :meth:`Recordings.keep` asks the store which of the call's caller turns
were redacted (their stored text holds a ``[redacted ...]`` marker: a card number, a security code,
an expiry, or an earlier fragment a later turn completed into a card) and writes the file with
those turns' audio silenced on both channels, then records the row with its expiry. The job
runner's :meth:`Recordings.cleanup_pass` deletes expired files and rows.

A file is only ever found through its row, and a row's path must resolve to a file directly inside
the recordings folder (:meth:`Recordings.file_of`): a row pointing anywhere else is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import asyncpg

from crm_bridge.conversations import record_event
from pipeline.ports import Clock

log = logging.getLogger(__name__)

REDACTION_MARK = "[redacted "  # how every redaction marker begins ("[redacted card]" ...)
PAD_S = 0.25  # silenced around a redacted turn's span: its edges are estimates


class TurnSpan(Protocol):
    """A caller turn's span in a recording, in seconds from its start."""

    @property
    def start(self) -> float: ...

    @property
    def end(self) -> float: ...


class RecordingFile(Protocol):
    """What :meth:`Recordings.keep` needs of a finished recording (voice.recording.CallRecording)."""

    @property
    def name(self) -> str: ...

    @property
    def notice(self) -> str: ...

    @property
    def turns(self) -> Mapping[int, TurnSpan]: ...

    def write_wav(self, path: Path, silence: Iterable[tuple[float, float]] = ()) -> float: ...


@dataclass(frozen=True)
class Recording:
    """One kept recording (a ``recordings`` row)."""

    id: int
    conversation_id: int
    call_sid: str
    path: str
    duration_s: float
    created_at: datetime
    expires_at: datetime


class Recordings:
    """The recordings folder and table.

    Args:
        pool: the database.
        folder: where the files live (``<data dir>/recordings``); created when missing.
        clock: the time rows are stamped with and expire by.
        retention: how long a recording is kept.
        sample_rate: the rate the files are written at (recorded in the row).
        cleanup_every_s: the job runner calls :meth:`cleanup_pass` every poll; it deletes expired
            recordings at most this often.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        folder: Path,
        clock: Clock,
        *,
        retention: timedelta,
        sample_rate: int = 8000,
        cleanup_every_s: float = 600.0,
    ) -> None:
        self._pool = pool
        self.folder = folder
        self._clock = clock
        self.retention = retention
        self._rate = sample_rate
        self._cleanup_every = cleanup_every_s
        self._last_cleanup: float | None = None

    # ---- keeping ------------------------------------------------------------------------------
    async def redacted_turns(self, conversation_id: int, call_sid: str) -> list[int]:
        """Numbers of the call's caller turns whose stored text was redacted (``voice:CALL:N``)."""
        prefix = f"voice:{call_sid}:"
        rows = await self._pool.fetch(
            """SELECT external_id FROM messages
                WHERE conversation_id = $1 AND direction = 'in' AND starts_with(external_id, $2)
                  AND strpos(body, $3) > 0""",
            conversation_id,
            prefix,
            REDACTION_MARK,
        )
        numbers = []
        for row in rows:
            tail = row["external_id"][len(prefix) :]
            if tail.isdigit():
                numbers.append(int(tail))
        return numbers

    async def keep(self, recording: RecordingFile, call_sid: str, conversation_id: int | None) -> None:
        """Write ``recording`` as ``<folder>/<name>.wav`` with its redacted turns silenced and record
        it. A call without a conversation (it never started) is not kept."""
        if conversation_id is None:
            return
        spans = [
            (span.start - PAD_S, span.end + PAD_S)
            for number in await self.redacted_turns(conversation_id, call_sid)
            if (span := recording.turns.get(number)) is not None
        ]
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{recording.name}.wav"
        duration = await asyncio.to_thread(recording.write_wav, self.folder / name, spans)
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                """INSERT INTO recordings (conversation_id, call_sid, path, duration_s, sample_rate,
                                           redacted_spans, notice, created_at, expires_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                   ON CONFLICT (call_sid) DO NOTHING RETURNING id""",
                conversation_id,
                call_sid,
                name,
                duration,
                self._rate,
                len(spans),
                recording.notice,
                now,
                now + self.retention,
            )
            if stored is not None:
                await record_event(
                    conn,
                    conversation_id,
                    "call_recorded",
                    {"duration_s": round(duration, 1), "redacted_spans": len(spans)},
                    now,
                )
        if stored is None:  # the call was already recorded (cannot happen twice): keep the first
            self._unlink(name)
        log.info(
            "call recording stored",
            extra={"call_sid": call_sid, "conversation_id": conversation_id, "redacted_spans": len(spans)},
        )

    # ---- reading ------------------------------------------------------------------------------
    async def latest(self, conversation_id: int) -> Recording | None:
        """The conversation's most recent recording, if one is kept."""
        async with self._pool.acquire() as conn:
            return await latest_recording(conn, conversation_id)

    def file_of(self, recording: Recording) -> Path | None:
        """The recording's file, or None when it is gone or its row points anywhere but a file
        directly inside the recordings folder (``..``, an absolute path, a symbolic link out)."""
        folder = self.folder.resolve()
        try:
            path = (folder / recording.path).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if path.parent != folder or not path.is_file():
            log.warning(
                "recording row points outside the recordings folder; refused",
                extra={"recording_id": recording.id},
            )
            return None
        return path

    # ---- retention ----------------------------------------------------------------------------
    async def cleanup(self, *, batch: int = 100) -> int:
        """Delete the files and rows of expired recordings; returns how many went. Rows are claimed
        with ``SKIP LOCKED`` (several processes may run it) and each file is removed before its row,
        so a failure leaves a row to retry, never a file nobody can find."""
        removed = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    """SELECT id, path FROM recordings WHERE expires_at <= $1
                        ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED""",
                    self._clock.now(),
                    batch,
                )
                for row in rows:
                    self._unlink(row["path"])
                await conn.execute(
                    "DELETE FROM recordings WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
                )
            removed += len(rows)
            if len(rows) < batch:
                break
        if removed:
            log.info("expired call recordings deleted", extra={"count": removed})
        return removed

    async def cleanup_pass(self) -> None:
        """A job-runner pass: :meth:`cleanup` at most every ``cleanup_every_s``."""
        now = time.monotonic()
        if self._last_cleanup is not None and now - self._last_cleanup < self._cleanup_every:
            return
        self._last_cleanup = now
        await self.cleanup()

    def _unlink(self, name: str) -> None:
        folder = self.folder.resolve()
        path = (folder / name).resolve()
        if path.parent != folder:
            log.warning("recording row points outside the recordings folder; file left alone")
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def latest_recording(conn: asyncpg.Connection, conversation_id: int) -> Recording | None:
    """The conversation's most recent recording, if one is kept."""
    row = await conn.fetchrow(
        """SELECT id, conversation_id, call_sid, path, duration_s, created_at, expires_at
             FROM recordings WHERE conversation_id = $1 ORDER BY id DESC LIMIT 1""",
        conversation_id,
    )
    return Recording(**dict(row)) if row is not None else None


def recording_json(recording: Recording | None) -> dict[str, object] | None:
    """The ``recording`` field of a conversation's JSON: where supervisors play it, and how long it is."""
    if recording is None:
        return None
    return {
        "url": f"/api/supervisor/conversations/{recording.conversation_id}/recording",
        "duration_s": round(recording.duration_s, 1),
        "expires_at": recording.expires_at.isoformat(),
    }


__all__ = ["REDACTION_MARK", "Recording", "RecordingFile", "Recordings", "latest_recording", "recording_json"]
