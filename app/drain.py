"""Graceful drain of one node (issue: fleet operation): on SIGTERM the node says it is not ready
(``/readyz`` 503, ``/healthz`` stays ok for liveness), takes no new calls or chat sessions, stops
taking jobs (a job in flight rolls back and another node takes it), lets the calls in progress
finish for up to ``CLOSELOOP_DRAIN_SECONDS``, then ends the rest politely (a goodbye, the
conversation saved) and only then lets the server stop.

Who may drain a node: whoever may signal its process (the operator, Kubernetes, systemd); there is
no HTTP endpoint for it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: What a draining node refuses: the start of a new call and a new chat session.
_NEW_WORK_HTTP = frozenset({("POST", "/twilio/voice"), ("POST", "/webrtc/offer")})
_NEW_WORK_SOCKETS = frozenset({"/chat"})


@dataclass
class Drain:
    """Whether this node is draining (set once; a node never comes back from a drain)."""

    draining: bool = False
    started_at: float | None = None

    def start(self) -> bool:
        """Begin draining; False when it had already begun."""
        if self.draining:
            return False
        self.draining, self.started_at = True, time.monotonic()
        return True


class DrainMiddleware:
    """Refuses new calls (503, ``Retry-After``) and new chat sockets (closed with 1013, "try again
    later") while the node drains; everything else (media streams and status callbacks of calls in
    progress, the API, health checks) goes on."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        if self.drain.draining:
            path = scope.get("path", "")
            if scope["type"] == "http" and (scope.get("method", ""), path) in _NEW_WORK_HTTP:
                await send({
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5"), (b"connection", b"close")],
                })  # fmt: skip
                body = b'{"error":{"code":"draining","message":"this node is shutting down; try another"}}'
                await send({"type": "http.response.body", "body": body})
                return
            if scope["type"] == "websocket" and path in _NEW_WORK_SOCKETS:
                await receive()  # websocket.connect
                # Accepted, then closed with 1013 "try again later" (a close before the accept would
                # reach the client as a bare HTTP 403): the chat page reconnects, via the proxy, elsewhere.
                await send({"type": "websocket.accept"})
                await send({"type": "websocket.close", "code": 1013, "reason": "node draining"})
                return
        await self.app(scope, receive, send)


async def drain_node(
    drain: Drain,
    active_calls: set[Any],
    calls_idle: asyncio.Event,
    stop_jobs: Callable[[], Awaitable[None]],
    *,
    seconds: float,
    goodbye_s: float = 15.0,
) -> None:
    """Drain: no new work, calls finish (up to ``seconds``), then the rest end with a goodbye."""
    if not drain.start():
        return
    print(
        f"closeloop: draining: no new calls or chats; {len(active_calls)} call(s) in progress may take "
        f"up to {seconds:.0f} s",
        file=sys.stderr,
    )
    await stop_jobs()
    if active_calls and not await _idle_within(calls_idle, seconds):
        log.warning("drain time over: ending %d call(s) with a goodbye", len(active_calls))
        for session in list(active_calls):
            await session.end_politely("node_draining", "drain_goodbye")
        await _idle_within(calls_idle, goodbye_s)
    print("closeloop: drained; stopping", file=sys.stderr)


async def _idle_within(idle: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(idle.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True
