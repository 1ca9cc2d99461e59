"""Business hours and overflow in routing: where a handoff goes when its queue is closed, and
when waiting work moves to the overflow queue.

* :class:`PgQueueHours` answers the conversation core (:class:`pipeline.ports.QueueHours`) when it
  hands off: the asked queue while open, else its first open overflow queue, else the asked queue
  with its next opening (the customer is told; a caller gets a call back then).
* :func:`closed_queues` is what :meth:`crm_bridge.routing.Routing.assign_next` leaves alone: no
  agent is offered the work of a closed queue.
* :func:`overflow_waiting` is the routing pass's move of waiting handoffs to an open overflow
  queue (``closed``, or ``no_agent`` after a wait), once across processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

import asyncpg

from crm_bridge.business_hours import is_open, next_opening, zone_label
from crm_bridge.conversations import record_event
from crm_bridge.queues import Queue
from pipeline.ports import HandoffRoute

# Serving order of waiting handoffs; the same expression as the handoffs_serve_idx index.
_RANK = "(CASE h.priority WHEN 'urgent' THEN 0 WHEN 'high' THEN 1 WHEN 'normal' THEN 2 ELSE 3 END)"


class PgQueueHours:
    """The queues' business hours for the conversation core. Reads the queues table on every call
    (a small table; an admin's change applies to the next handoff)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def route_handoff(self, queue: str, at: datetime) -> HandoffRoute:
        """See :func:`handoff_route`."""
        async with self._pool.acquire() as conn:
            return handoff_route(await _queue_hours(conn), queue, at)


def handoff_route(queues: Mapping[str, Queue], queue: str, at: datetime) -> HandoffRoute:
    """Where a handoff for ``queue`` raised at ``at`` goes: ``queue`` while it is open (or unknown
    here), else the first open queue along its overflow chain, else ``queue`` with its next
    opening and its zone's name."""
    asked = queues.get(queue)
    if asked is None or asked.open_at(at):
        return HandoffRoute(queue)
    seen = {queue}
    step = queues.get(asked.overflow_queue or "")
    while step is not None and step.name not in seen:  # chains are acyclic when saved; stay safe
        if step.open_at(at):
            return HandoffRoute(step.name, overflowed_from=queue)
        seen.add(step.name)
        step = queues.get(step.overflow_queue or "")
    return HandoffRoute(
        queue,
        opens_at=next_opening(asked.business_hours, asked.timezone, at),
        zone=zone_label(asked.timezone),
    )


async def closed_queues(conn: asyncpg.Connection, now: datetime) -> list[str]:
    """Names of the queues whose business hours are closed at ``now``."""
    rows = await conn.fetch(
        "SELECT name, timezone, business_hours FROM queues WHERE business_hours <> '{}'::jsonb"
    )
    return [r["name"] for r in rows if not is_open(dict(r["business_hours"]), r["timezone"], now)]


async def overflow_waiting(
    pool: asyncpg.Pool,
    now: datetime,
    *,
    no_agent_after: timedelta | None,
    skip_voice_handoffs: bool = False,
    limit: int = 50,
) -> int:
    """Move waiting handoffs to their queue's overflow queue when that one is open now:

    * reason ``closed``: the handoff's queue is closed (business hours);
    * reason ``no_agent``: the queue is open, the handoff has waited longer than
      ``no_agent_after`` (None: never) and no available agent of the queue has a free seat,
      while the overflow queue has one (at most as many move as it has free seats beyond its
      own waiting work).

    Voice handoffs are left alone with ``skip_voice_handoffs`` (the warm transfer routes them), as
    are conversations with a live transfer. The ticket and the conversation's owner follow the
    handoff; each move is an ``overflowed`` event (``from``, ``to``, ``reason``). A move happens
    once across processes: the conversation row is taken with ``SKIP LOCKED`` and the handoff
    moves only if it still waits in the queue it was read in. Returns the handoffs moved.
    """
    async with pool.acquire() as conn:
        queues = await _queue_hours(conn)
    moved = 0
    for name, hours in queues.items():
        target = queues.get(hours.overflow_queue or "")
        if target is None or moved >= limit or not target.open_at(now):
            continue
        if not hours.open_at(now):
            waited_before, reason = None, "closed"
        elif no_agent_after is not None:
            waited_before, reason = now - no_agent_after, "no_agent"
        else:
            continue
        async with pool.acquire() as conn, conn.transaction():
            moved += await _move(
                conn, name, target.name, reason, waited_before, skip_voice_handoffs, limit - moved, now
            )
    return moved


async def _move(
    conn: asyncpg.Connection,
    queue: str,
    target: str,
    reason: str,
    waited_before: datetime | None,
    skip_voice: bool,
    limit: int,
    now: datetime,
) -> int:
    if reason == "no_agent":
        if await _free_seats(conn, queue) > 0:
            return 0  # someone here can take it: the routing pass offers it
        waiting_there = await conn.fetchval(
            "SELECT count(*) FROM handoffs WHERE queue = $1 AND status = 'waiting'", target
        )
        limit = min(limit, await _free_seats(conn, target) - int(waiting_there))
    if limit <= 0:
        return 0
    candidates = await conn.fetch(
        f"""SELECT h.id, h.conversation_id FROM handoffs h JOIN conversations c ON c.id = h.conversation_id
            WHERE h.status = 'waiting' AND h.queue = $1 AND ($2::timestamptz IS NULL OR h.created_at <= $2)
              AND NOT ($3::boolean AND c.channel = 'voice')
              AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.conversation_id = h.conversation_id
                              AND t.status IN ('dialing', 'ringing', 'answered', 'connected'))
            ORDER BY {_RANK}, h.created_at, h.id LIMIT $4""",
        queue,
        waited_before,
        skip_voice,
        limit,
    )
    moved = 0
    for candidate in candidates:
        # Lock order: conversation -> handoff -> ticket. A conversation another process holds
        # (moving it too, or a turn committing) is left for the next pass.
        if not await conn.fetchval(
            "SELECT true FROM conversations WHERE id = $1 FOR UPDATE SKIP LOCKED",
            candidate["conversation_id"],
        ):
            continue
        handoff = await conn.fetchrow(
            """UPDATE handoffs SET queue = $2, updated_at = $3
               WHERE id = $1 AND status = 'waiting' AND queue = $4 RETURNING *""",
            candidate["id"],
            target,
            now,
            queue,
        )
        if handoff is None:
            continue  # offered or moved meanwhile
        await _follow(conn, handoff, queue, target, reason, now)
        moved += 1
    return moved


async def _queue_hours(conn: asyncpg.Connection) -> dict[str, Queue]:
    rows = await conn.fetch("SELECT name, timezone, business_hours, overflow_queue FROM queues")
    return {
        r["name"]: Queue(
            r["name"], "", (), {}, 0, r["timezone"], dict(r["business_hours"]), r["overflow_queue"]
        )
        for r in rows
    }


async def _free_seats(conn: asyncpg.Connection, queue: str) -> int:
    """Free capacity of the available agents who may take work of ``queue`` (with its skills)."""
    seats = await conn.fetchval(
        """SELECT COALESCE(sum(a.capacity - a.active), 0) FROM agents a JOIN users u ON u.id = a.user_id AND NOT u.disabled
           WHERE a.presence = 'available' AND a.active < a.capacity AND $1 = ANY(a.queues)
             AND a.skills @> COALESCE((SELECT q.skills FROM queues q WHERE q.name = $1), '{}'::text[])""",
        queue,
    )
    return int(seats)


async def _follow(
    conn: asyncpg.Connection, handoff: asyncpg.Record, source: str, target: str, reason: str, now: datetime
) -> None:
    """The moved handoff's ticket and conversation follow it to ``target``; an ``overflowed`` event."""
    if handoff["ticket_id"] is not None:
        await conn.execute(
            "UPDATE tickets SET queue = $2, updated_at = $3 WHERE id = $1 AND queue = $4",
            handoff["ticket_id"],
            target,
            now,
            source,
        )
    await conn.execute(
        "UPDATE conversations SET owner = $2, updated_at = $3 WHERE id = $1 AND owner = $4",
        handoff["conversation_id"],
        f"queue:{target}",
        now,
        f"queue:{source}",
    )
    await record_event(
        conn,
        handoff["conversation_id"],
        "overflowed",
        {"handoff": handoff["id"], "from": source, "to": target, "reason": reason},
        now,
        handoff["ticket_id"],
    )
