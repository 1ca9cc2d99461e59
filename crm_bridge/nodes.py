"""The nodes of a fleet (several ``closeloop serve`` processes on one PostgreSQL).

Each node registers at start-up and heartbeats; the calls it runs carry its id. Every node also
sweeps: a node whose heartbeat is older than ``timeout`` is *lost* (a ``kill -9``, a crashed host,
a network partition). The first node to see that (one ``UPDATE ... WHERE lost_at IS NULL`` wins)
ends the lost node's calls in the store (``end_reason = 'node_lost'``) and owes each of those
callers a call back: we dropped them. A caller who was waiting for a person (a warm transfer still
ringing agents) has the transfer moved to its fallback and the call back booked on it. A node that
stops cleanly marks itself stopped; its calls were closed first.

Who may change this: only the server processes (no API). What an attacker would try: nothing here
takes input from outside; node ids are random per process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from crm_bridge.conversations import record_event
from crm_bridge.db import UNREACHABLE
from crm_bridge.desk import schedule_callback
from crm_bridge.transfers import WAITING_FOR_AGENT

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    lost_nodes: list[str] = field(default_factory=list)
    calls_ended: list[str] = field(default_factory=list)
    callbacks: list[int] = field(default_factory=list)
    chats_closed: list[int] = field(default_factory=list)  # conversation ids


class NodeRegistry:
    """This process as a node: register, heartbeat, sweep for lost nodes, stop.

    Times are the database's (``now()``), never a node's own clock: nodes' clocks may differ, and
    the one database is what every node agrees on.

    Args:
        pool: The shared database.
        timeout: A heartbeat older than this means the node is lost.
        callback_after: When the call back of a caller cut off mid-transfer is due.
        node_id: Defaults to ``<hostname>-<pid>-<random>``.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        timeout: timedelta = timedelta(seconds=20),
        callback_after: timedelta = timedelta(minutes=5),
        callback_queue: str = "support",
        node_id: str | None = None,
    ) -> None:
        self._pool = pool
        self.timeout = timeout
        self.callback_after = callback_after
        self.callback_queue = callback_queue
        self.hostname = socket.gethostname()
        self.id = node_id or f"{self.hostname}-{os.getpid()}-{secrets.token_hex(3)}"

    async def register(self) -> None:
        await self._pool.execute(
            """INSERT INTO nodes (id, hostname, pid, started_at, heartbeat_at) VALUES ($1, $2, $3, now(), now())
               ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL, lost_at = NULL""",
            self.id,
            self.hostname,
            os.getpid(),
        )

    async def heartbeat(self, *, draining: bool = False) -> None:
        """Say this node is alive. A node that was declared lost (a long pause, a partition) comes
        back as live; the calls already ended for it stay ended."""
        await self._pool.execute(
            "UPDATE nodes SET heartbeat_at = now(), draining = $2, lost_at = NULL WHERE id = $1",
            self.id,
            draining,
        )

    async def stop(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """UPDATE chat_sessions SET closed_at = now(), close_reason = 'node_stopped'
                   WHERE node_id = $1 AND closed_at IS NULL""",
                self.id,
            )
            await conn.execute("UPDATE nodes SET stopped_at = now() WHERE id = $1", self.id)

    async def live_nodes(self) -> list[str]:
        rows = await self._pool.fetch(
            "SELECT id FROM nodes WHERE stopped_at IS NULL AND lost_at IS NULL ORDER BY started_at"
        )
        return [r["id"] for r in rows]

    async def sweep(self) -> SweepResult:
        """Find nodes lost since the last sweep (on any node) and clean up after them."""
        result = SweepResult()
        async with self._pool.acquire() as conn, conn.transaction():
            now: datetime = await conn.fetchval("SELECT now()")
            lost = await conn.fetch(
                """UPDATE nodes SET lost_at = $1
                   WHERE lost_at IS NULL AND stopped_at IS NULL AND heartbeat_at < $1::timestamptz - $2::interval AND id <> $3
                   RETURNING id""",
                now,
                self.timeout,
                self.id,
            )
            result.lost_nodes = [r["id"] for r in lost]
            if not result.lost_nodes:
                return result
            chats = await conn.fetch(
                """UPDATE chat_sessions SET closed_at = $2, close_reason = 'node_lost'
                   WHERE node_id = ANY($1::text[]) AND closed_at IS NULL
                   RETURNING conversation_id, node_id""",
                result.lost_nodes,
                now,
            )
            for chat in chats:  # the page reconnects to a live node on its own; the timeline says why
                result.chats_closed.append(chat["conversation_id"])
                await record_event(conn, chat["conversation_id"], "chat_lost", {"node": chat["node_id"]}, now)
            calls = await conn.fetch(
                """UPDATE calls SET status = 'completed', end_reason = 'node_lost', ended_at = $2
                   WHERE node_id = ANY($1::text[]) AND ended_at IS NULL
                   RETURNING call_sid, conversation_id, node_id, caller""",
                result.lost_nodes,
                now,
            )
            for call in calls:
                result.calls_ended.append(call["call_sid"])
                if call["conversation_id"] is not None:
                    await record_event(
                        conn, call["conversation_id"], "call_lost",
                        {"call_sid": call["call_sid"], "node": call["node_id"]}, now,
                    )  # fmt: skip
            if calls:
                result.callbacks = await self._call_back(conn, calls, now)
        for node in result.lost_nodes:
            log.warning(
                "node lost: its calls were ended",
                extra={
                    "node": node,
                    "calls": len(result.calls_ended),
                    "chats": len(result.chats_closed),
                    "callbacks": len(result.callbacks),
                },
            )
        return result

    async def _call_back(
        self, conn: asyncpg.Connection, calls: list[asyncpg.Record], now: datetime
    ) -> list[int]:
        """Every caller of a lost call with a conversation and a number is owed a call back; for one
        who was waiting for an agent it is booked on the transfer, which falls back."""
        call_sids = [c["call_sid"] for c in calls]
        transfers = await conn.fetch(
            """UPDATE transfers SET status = 'fallback', updated_at = $3
               WHERE call_sid = ANY($1::text[]) AND status = ANY($2::text[])
               RETURNING id, call_sid, conversation_id, ticket_id, queue""",
            call_sids,
            list(WAITING_FOR_AGENT),
            now,
        )
        callbacks: list[int] = []
        for t in transfers:
            phone = await conn.fetchval("SELECT caller FROM calls WHERE call_sid = $1", t["call_sid"])
            callback = await schedule_callback(
                conn,
                conversation_id=t["conversation_id"],
                ticket_id=t["ticket_id"],
                queue=t["queue"],
                phone=phone,
                due=now + self.callback_after,
                now=now,
                transfer_id=t["id"],
                extra={"transfer": t["id"], "reason": "node_lost"},
            )
            if callback is not None:
                callbacks.append(callback)
        transferred = {t["call_sid"] for t in transfers}
        for call in calls:
            if call["call_sid"] in transferred or call["conversation_id"] is None or not call["caller"]:
                continue
            ticket = await conn.fetchval(
                "SELECT ticket_id FROM conversations WHERE id = $1", call["conversation_id"]
            )
            callback = await schedule_callback(
                conn,
                conversation_id=call["conversation_id"],
                ticket_id=ticket,
                queue=self.callback_queue,
                phone=call["caller"],
                due=now + self.callback_after,
                now=now,
                extra={"reason": "node_lost", "call_sid": call["call_sid"]},
            )
            if callback is not None:
                callbacks.append(callback)
        return callbacks


class ChatSessions:
    """The web-chat sockets this node holds, one row per connection (``chat_sessions``).

    A close that cannot be written (the database is away: the very reason many sockets close) is
    kept and written by :meth:`flush`, which the node's heartbeat loop calls; a node that stops
    closes whatever is left, and a lost node's rows are closed by the node that finds it lost.
    """

    def __init__(self, pool: asyncpg.Pool, node_id: str) -> None:
        self._pool = pool
        self.node_id = node_id
        self._unwritten: dict[int, tuple[datetime, str]] = {}

    async def opened(self, conversation_id: int, at: datetime) -> int:
        session: int = await self._pool.fetchval(
            """INSERT INTO chat_sessions (conversation_id, node_id, opened_at) VALUES ($1, $2, $3)
               RETURNING id""",
            conversation_id,
            self.node_id,
            at,
        )
        return session

    async def closed(self, session: int, at: datetime, reason: str) -> None:
        self._unwritten[session] = (at, reason)
        await self.flush()

    async def flush(self) -> None:
        """Write the closes not written yet; raises what the database raises (they stay kept)."""
        for session, (at, reason) in list(self._unwritten.items()):
            await self._pool.execute(
                """UPDATE chat_sessions SET closed_at = $2, close_reason = $3
                   WHERE id = $1 AND closed_at IS NULL""",
                session,
                at,
                reason,
            )
            del self._unwritten[session]


async def run_node(
    registry: NodeRegistry,
    *,
    draining: Callable[[], bool] = lambda: False,
    every_s: float = 5.0,
    chats: ChatSessions | None = None,
) -> None:
    """Heartbeat and sweep every ``every_s`` until cancelled (a failed pass is retried next time)."""
    while True:
        try:
            await registry.heartbeat(draining=draining())
            await registry.sweep()
            if chats is not None:
                await chats.flush()
        except asyncio.CancelledError:
            raise
        except UNREACHABLE as e:
            log.warning("node heartbeat skipped: database unreachable (%s)", type(e).__name__)
        except Exception:
            log.exception("node heartbeat or sweep failed")
        await asyncio.sleep(every_s)
