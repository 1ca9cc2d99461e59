"""Canned replies: short texts per queue that an agent inserts into the reply box of the console.

They are never sent by themselves: the agent edits and sends the reply as any other. Admins
keep them (``/api/desk/canned-replies``); every change is in the audit log (``canned.create``,
``canned.update``, ``canned.delete``, target ``canned:<id>``). Migration 017 holds the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from crm_bridge import audit
from crm_bridge.queues import NotFoundError, ValidationError
from crm_bridge.users import User

__all__ = ["MAX_BODY", "MAX_TITLE", "CannedReply", "canned_for", "delete_canned", "save_canned"]

MAX_TITLE = 80
MAX_BODY = 2000  # an agent's reply is limited to as much (crm_bridge.desk.MAX_TEXT)


@dataclass(frozen=True)
class CannedReply:
    id: int
    queue: str
    title: str
    body: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "queue": self.queue, "title": self.title, "body": self.body}


def _reply(row: asyncpg.Record) -> CannedReply:
    return CannedReply(row["id"], row["queue"], row["title"], row["body"])


async def canned_for(pool: asyncpg.Pool, queues: Sequence[str] | None) -> list[CannedReply]:
    """The canned replies of ``queues`` (of every queue when None), by queue then title."""
    rows = await pool.fetch(
        """SELECT id, queue, title, body FROM canned_replies
            WHERE $1::text[] IS NULL OR queue = ANY($1::text[]) ORDER BY queue, title, id""",
        list(queues) if queues is not None else None,
    )
    return [_reply(r) for r in rows]


def _checked(queue: str, title: str, body: str) -> tuple[str, str, str]:
    title, body = title.strip(), body.strip()
    if not title or not body:
        raise ValidationError("a canned reply needs a title and a text", code="canned_reply_empty")
    if len(title) > MAX_TITLE or len(body) > MAX_BODY:
        raise ValidationError(
            f"titles are limited to {MAX_TITLE} characters and texts to {MAX_BODY}",
            code="canned_reply_too_long",
        )
    return queue.strip(), title, body


async def save_canned(
    pool: asyncpg.Pool, by: User, *, queue: str, title: str, body: str, reply_id: int | None = None
) -> CannedReply:
    """Create (``reply_id`` None) or change a canned reply; audited with its value before and after."""
    queue, title, body = _checked(queue, title, body)
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT 1 FROM queues WHERE name = $1", queue) is None:
            raise ValidationError(f"there is no queue named {queue!r}", code="unknown_queue")
        before = None
        try:
            if reply_id is None:
                row = await conn.fetchrow(
                    "INSERT INTO canned_replies (queue, title, body) VALUES ($1, $2, $3) RETURNING *",
                    queue,
                    title,
                    body,
                )
            else:
                old = await conn.fetchrow("SELECT * FROM canned_replies WHERE id = $1 FOR UPDATE", reply_id)
                if old is None:
                    raise NotFoundError(f"canned reply {reply_id} not found")
                before = _reply(old).to_dict()
                row = await conn.fetchrow(
                    """UPDATE canned_replies SET queue = $2, title = $3, body = $4, updated_at = now()
                       WHERE id = $1 RETURNING *""",
                    reply_id,
                    queue,
                    title,
                    body,
                )
        except asyncpg.UniqueViolationError as e:
            raise ValidationError(
                f"the {queue} queue already has a canned reply titled {title!r}", code="canned_reply_exists"
            ) from e
        saved = _reply(row)
        await audit.record(
            conn,
            by,
            "canned.create" if reply_id is None else "canned.update",
            f"canned:{saved.id}",
            before,
            saved.to_dict(),
        )
    return saved


async def delete_canned(pool: asyncpg.Pool, by: User, reply_id: int) -> CannedReply:
    """Remove a canned reply (audited with its last value)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("DELETE FROM canned_replies WHERE id = $1 RETURNING *", reply_id)
        if row is None:
            raise NotFoundError(f"canned reply {reply_id} not found")
        gone = _reply(row)
        await audit.record(conn, by, "canned.delete", f"canned:{gone.id}", gone.to_dict(), None)
    return gone
