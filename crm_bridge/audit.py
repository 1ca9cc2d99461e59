"""The audit log: who changed what, when, through the admin console and the intent endpoints.

Each change is one row of ``audit_log`` (migration 012): the user's id and email, the time, a
``kind`` (``intent.create``, ``intent.update``, ``intent.delete``, ``intent.import`` ...), its
``target`` (the intent's name) and the value ``before`` and ``after`` as JSON (``None`` before a
create and after a delete). The log is append-only: this module only inserts and reads, no route
changes or removes an entry, and a trigger refuses UPDATE and DELETE in the database itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from crm_bridge.users import User

if TYPE_CHECKING:
    from crm_bridge.intents_store import IntentStore
    from pipeline.model import Intent

__all__ = ["AuditEntry", "record", "record_intent_change", "recent"]

Executor: TypeAlias = "asyncpg.Pool | asyncpg.Connection"
MAX_LIMIT = 500


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    user_id: int | None
    user_email: str
    kind: str
    target: str
    before: Any
    after: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "user_id": self.user_id,
            "user_email": self.user_email,
            "kind": self.kind,
            "target": self.target,
            "before": self.before,
            "after": self.after,
        }


async def record(db: Executor, user: User, kind: str, target: str, before: Any, after: Any) -> int:
    """Append one entry; ``db`` may be the connection of the change's transaction. Returns its id."""
    entry_id = await db.fetchval(
        "INSERT INTO audit_log (user_id, user_email, kind, target, before, after)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        user.id,
        user.email,
        kind,
        target,
        before,
        after,
    )
    return int(entry_id)


async def record_intent_change(
    intents: IntentStore, user: User, kind: str, before: Intent | None, after: Intent | None
) -> int:
    """Record a change of one intent made through ``intents`` (the store's database)."""
    changed = after if after is not None else before
    assert changed is not None, "an intent change has a value before or after"
    return await record(
        intents.pool,  # the intents' own database: the audit log lives next to them
        user,
        kind,
        changed.name,
        before.to_dict() if before is not None else None,
        after.to_dict() if after is not None else None,
    )


async def recent(
    db: Executor, *, limit: int = 100, kind: str | None = None, target: str | None = None
) -> list[AuditEntry]:
    """The latest entries first, optionally of one ``kind`` and/or one ``target``."""
    rows = await db.fetch(
        "SELECT id, at, user_id, user_email, kind, target, before, after FROM audit_log"
        " WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR target = $2)"
        " ORDER BY at DESC, id DESC LIMIT $3",
        kind,
        target,
        max(1, min(limit, MAX_LIMIT)),
    )
    return [AuditEntry(**dict(r)) for r in rows]
