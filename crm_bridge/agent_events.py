"""Agent console events across server processes, over PostgreSQL LISTEN/NOTIFY.

An :class:`~crm_bridge.desk.AgentDesk` delivers an event to the consoles connected to its own
process. With more than one process (``uvicorn --workers``, several containers behind a load
balancer) an agent's console may be connected to another one; this bridge publishes every event
with ``pg_notify`` and every process delivers the events of the others to its own consoles.

Each process tags what it sends with a random origin and ignores its own notifications (they
were delivered locally already), so an event reaches a console exactly once. The listening
connection is watched and re-opened if it drops; events published while it is down reach the
consoles of the publishing process only (a console reloads its state from the API when it
reconnects, so nothing is lost for good). NOTIFY payloads are limited to 8000 bytes: a larger
event is delivered locally and logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "closeloop_agent_events"
MAX_PAYLOAD = 7900


class PgEventBridge:
    """Publishes agent events to every server process of the same database.

    Args:
        dsn: the database (a connection of its own is kept for LISTEN).
        pool: used to send notifications.
        channel: the NOTIFY channel.
        check_every: seconds between checks of the listening connection.
    """

    def __init__(
        self, dsn: str, pool: asyncpg.Pool, *, channel: str = CHANNEL, check_every: float = 2.0
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self._channel = channel
        self._check_every = check_every
        self.origin = secrets.token_hex(8)
        self._deliver: Callable[[int, dict[str, Any]], None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._watch: asyncio.Task[None] | None = None
        self.received = 0  # events from other processes delivered here

    async def start(self, deliver: Callable[[int, dict[str, Any]], None]) -> None:
        """Listen; ``deliver(agent_id, event)`` gets the events other processes publish."""
        self._deliver = deliver
        await self._listen()
        self._watch = asyncio.create_task(self._watchdog(), name="closeloop-agent-events-listen")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass
            self._watch = None
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()

    async def publish(self, agent_id: int, event: dict[str, Any]) -> None:
        """Send ``event`` for ``agent_id`` to the other processes (the desk delivered it here)."""
        payload = json.dumps(
            {"o": self.origin, "a": agent_id, "e": event}, separators=(",", ":"), default=str
        )
        if len(payload.encode()) > MAX_PAYLOAD:
            log.warning(
                "agent event too large for NOTIFY; delivered in this process only",
                extra={"agent_id": agent_id, "type": event.get("type")},
            )
            return
        await self._pool.execute("SELECT pg_notify($1, $2)", self._channel, payload)

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(self._channel, self._on_notify)
        self._conn = conn

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message.get("o") == self.origin:
                return
            agent_id, event = int(message["a"]), dict(message["e"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed agent event notification")
            return
        if self._deliver is not None:
            self.received += 1
            self._deliver(agent_id, event)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self._check_every)
            if self._conn is not None and not self._conn.is_closed():
                continue
            try:
                await self._listen()
                log.info("agent events: listening again")
            except (OSError, asyncpg.PostgresError) as e:
                log.warning("agent events: cannot listen yet", extra={"error": type(e).__name__})
