"""Web chat: the page at ``GET /chat``, the JSON protocol at ``WS /chat``, and push delivery.

Protocol (JSON text frames): the client says ``hello`` (with the session id it kept, if any),
the server answers ``welcome`` with the session id and the transcript; then each ``message``
from the client gets one or more ``reply`` frames, and texts sent later (follow-ups, agents)
arrive as ``push``. Bad frames get an ``error`` frame and the socket stays open.

The session id is a bearer secret: whoever presents it continues the conversation. The server
never stores it: the conversation's address is :func:`webchat_address` of it (``sha256:<hex>``),
so no API, page, log or database reader ever sees a session id.

Limits (:class:`ChatLimits`, from settings): open sockets per client address, a token bucket of
messages per client address (over it, an ``error`` frame ``rate_limited`` and the socket stays
usable; a client that keeps flooding is closed with a reason), an idle timeout that closes the
socket with a reason, and a cap on the size of a frame.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse
from starlette.websockets import WebSocketState

from crm_bridge.db import UNREACHABLE
from pipeline.model import Channel, OutboundText, SendResult
from pipeline.ports import Clock, StoreUnavailable
from pipeline.service import ConversationService
from web.limits import ClientBuckets, ConnectionCounter, Network, client_address, forwarded_for
from web.shared_page_parts import inline_shared_parts

if TYPE_CHECKING:
    from crm_bridge.nodes import ChatSessions

#: What a database outage raises here (the store translates its own; the session load may not).
_UNREACHABLE: tuple[type[BaseException], ...] = (StoreUnavailable, *UNREACHABLE)
log = logging.getLogger(__name__)

SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_TEXT = 2000
HELLO_TIMEOUT = 15.0
ADDRESS_PREFIX = "sha256:"
WS_NORMAL = 1000
WS_POLICY_VIOLATION = 1008
WS_TOO_BIG = 1009
WS_TRY_AGAIN_LATER = 1013


def webchat_address(session: str) -> str:
    """The conversation address of a web-chat session: a hash, so the secret itself is never stored."""
    return ADDRESS_PREFIX + hashlib.sha256(session.encode("utf-8")).hexdigest()


async def chat_session_address(pool: Any, session: object) -> str | None:
    """The conversation address of a web-chat session this server knows, or None.

    A browser call placed from the chat page presents the page's session so that the call
    continues that conversation (one history). None when ``session`` is not a well-formed
    session id or no web-chat conversation was ever opened with it: such a call gets a
    conversation of its own. Only the hash is looked up; the secret is never stored or logged.
    Presenting someone else's session is the web chat's own threat (a bearer secret of 18
    random bytes): whoever holds it may continue that conversation, by text or by voice.
    """
    if not isinstance(session, str) or not SESSION_RE.match(session):
        return None
    address = webchat_address(session)
    known = await pool.fetchval(
        "SELECT EXISTS (SELECT 1 FROM conversations WHERE channel = 'webchat' AND address = $1)", address
    )
    return address if known else None


@dataclass(frozen=True)
class ChatLimits:
    """What one client address may do on ``WS /chat`` (settings ``CLOSELOOP_CHAT_*``)."""

    max_connections_per_client: int = 10
    messages_burst: int = 10  # messages sent at once before the rate applies
    messages_per_minute: float = 30.0
    flood_close_after: int = 50  # refused messages in a row before the socket is closed
    idle_timeout_s: float = 900.0  # no message from the client for this long closes the socket
    max_frame_bytes: int = 16 * 1024


class WebChatHub:
    """Open web-chat sockets by conversation address (:func:`webchat_address` of the session);
    also the :class:`TextSender` for the webchat channel."""

    def __init__(self, clock: Clock) -> None:
        self._sockets: dict[str, set[WebSocket]] = defaultdict(set)
        self._clock = clock

    def add(self, session: str, ws: WebSocket) -> None:
        self._sockets[session].add(ws)

    def remove(self, session: str, ws: WebSocket) -> None:
        sockets = self._sockets.get(session)
        if sockets is not None:
            sockets.discard(ws)
            if not sockets:
                del self._sockets[session]

    @property
    def online(self) -> int:
        return len(self._sockets)

    async def send(self, message: OutboundText) -> SendResult:
        """Push to every open socket of the session. Offline sessions get it with the history."""
        frame = {
            "type": "push",
            "seq": message.seq,
            "from": "agent" if message.kind == "agent_reply" else "bot",
            "text": message.body,
            "at": self._clock.now().isoformat(),
            "kind": message.kind,
        }
        for ws in list(self._sockets.get(message.to, ())):
            try:
                await ws.send_json(frame)
            except Exception:  # a dead socket must not fail the send; the transcript has the text
                self.remove(message.to, ws)
        return SendResult(
            provider_ref=f"webchat:{message.conversation_id}:{message.seq}", channel_used=Channel.WEBCHAT
        )


def _history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "seq": m["seq"],
            "from": m["sender"],
            "text": m["body"],
            "at": m["created_at"].isoformat(),
            "kind": m["kind"],
        }
        for m in messages
    ]


def chat_router(
    service: ConversationService,
    store: Any,
    hub: WebChatHub,
    clock: Clock,
    *,
    limits: ChatLimits | None = None,
    trusted_proxies: tuple[Network, ...] = (),
    sessions: ChatSessions | None = None,
) -> APIRouter:
    """Args: sessions: records which node holds each socket (crm_bridge/nodes.py), when given."""
    router = APIRouter()
    page = Path(__file__).resolve().parent / "chat.html"
    limits = limits or ChatLimits()
    connections = ConnectionCounter(limits.max_connections_per_client)
    buckets = ClientBuckets(limits.messages_burst, limits.messages_per_minute / 60.0)

    @router.get("/chat", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(inline_shared_parts(page.read_text(encoding="utf-8")))

    @router.websocket("/chat")
    async def chat_socket(ws: WebSocket) -> None:
        client = client_address(
            ws.client.host if ws.client else None, forwarded_for(ws.headers), trusted_proxies
        )
        await ws.accept()
        if not connections.acquire(client):
            log.warning("web chat refused", extra={"reason": "too_many_connections"})
            await ws.close(
                code=WS_TRY_AGAIN_LATER,
                reason=f"too many chat connections from your address (at most {limits.max_connections_per_client})",
            )
            return
        address: str | None = None
        held: int | None = None  # this socket's chat_sessions row
        close_reason = "disconnected"
        try:
            session = await _hello(ws)
            if session is None:
                return
            address = webchat_address(session)
            opened = await store.open_conversation(Channel.WEBCHAT, address, clock.now())
            if sessions is not None:
                held = await sessions.opened(opened["conversation"]["id"], clock.now())
            await ws.send_json(
                {
                    "type": "welcome",
                    "session": session,
                    "conversation_id": opened["conversation"]["id"],
                    "history": _history(opened["messages"]),
                }
            )
            hub.add(address, ws)
            refused_in_a_row = 0
            while True:
                try:
                    raw = await asyncio.wait_for(ws.receive_text(), timeout=limits.idle_timeout_s)
                except TimeoutError:
                    close_reason = "idle"
                    await ws.close(
                        code=WS_NORMAL,
                        reason=f"idle timeout: no message for {limits.idle_timeout_s:g} seconds",
                    )
                    return
                if len(raw) > limits.max_frame_bytes:  # characters >= bytes / 4: cheap and safe
                    await ws.close(
                        code=WS_TOO_BIG, reason=f"frames are limited to {limits.max_frame_bytes} bytes"
                    )
                    return
                if not buckets.take(client, clock.now()):
                    refused_in_a_row += 1
                    if refused_in_a_row >= limits.flood_close_after:
                        log.warning("web chat closed", extra={"reason": "flood"})
                        await ws.close(code=WS_POLICY_VIOLATION, reason="too many messages: slow down")
                        return
                    await ws.send_json(
                        {
                            "type": "error",
                            "code": "rate_limited",
                            "message": "You are sending messages too fast. Wait a moment, then send it again.",
                        }
                    )
                    continue
                refused_in_a_row = 0
                await _on_frame(ws, address, raw)
        except WebSocketDisconnect:
            pass
        except _UNREACHABLE as e:
            close_reason = "database_unreachable"
            # The database is away: the page shows "reconnecting", comes back with backoff and
            # resends what was not acknowledged (same ids: stored once).
            log.warning(
                "web chat: database unreachable; the client will reconnect", extra={"error": type(e).__name__}
            )
            if ws.client_state == WebSocketState.CONNECTED:
                await ws.close(
                    code=WS_TRY_AGAIN_LATER, reason="our systems are briefly unavailable: reconnecting"
                )
        finally:
            connections.release(client)
            if address is not None:
                hub.remove(address, ws)
            if held is not None and sessions is not None:
                try:
                    await sessions.closed(held, clock.now(), close_reason)
                except _UNREACHABLE:
                    pass  # kept: the node's heartbeat loop writes it when the database is back

    async def _hello(ws: WebSocket) -> str | None:
        try:
            raw = await asyncio.wait_for(ws.receive_text(), timeout=HELLO_TIMEOUT)
            frame = json.loads(raw)
        except (TimeoutError, json.JSONDecodeError, KeyError, TypeError):
            await ws.close(code=1008, reason="expected a hello frame")
            return None
        if not isinstance(frame, dict) or frame.get("type") != "hello":
            await ws.close(code=1008, reason="expected a hello frame")
            return None
        session = frame.get("session")
        if not isinstance(session, str) or not SESSION_RE.match(session):
            session = secrets.token_urlsafe(18)
        return session

    async def _on_frame(ws: WebSocket, address: str, raw: str) -> None:
        try:
            frame = json.loads(raw)
        except json.JSONDecodeError:
            await ws.send_json(
                {"type": "error", "code": "invalid_json", "message": "frames must be JSON objects"}
            )
            return
        if not isinstance(frame, dict) or frame.get("type") != "message":
            await ws.send_json(
                {
                    "type": "error",
                    "code": "unknown_type",
                    "message": 'expected {"type": "message", "text": ...}',
                }
            )
            return
        text = frame.get("text")
        if not isinstance(text, str) or not text.strip():
            await ws.send_json({"type": "error", "code": "empty_message", "message": "message text is empty"})
            return
        if len(text) > MAX_TEXT:
            await ws.send_json(
                {
                    "type": "error",
                    "code": "message_too_long",
                    "message": f"messages are limited to {MAX_TEXT} characters",
                }
            )
            return
        client_id = frame.get("id")
        external_id = (
            f"webchat:{address}:{client_id}"
            if isinstance(client_id, str) and 0 < len(client_id) <= 100
            else None
        )
        reply = await service.handle_text(
            Channel.WEBCHAT,
            address,
            text,
            external_id=external_id,
            client=client_address(
                ws.client.host if ws.client else None, forwarded_for(ws.headers), trusted_proxies
            ),
        )
        if reply.duplicate:
            await ws.send_json({"type": "ack", "id": client_id, "duplicate": True})
            return
        if not reply.messages:  # a person owns the conversation: stored and passed on, no bot reply
            await ws.send_json({"type": "ack", "id": client_id})
            return
        for m in reply.messages:
            await ws.send_json(
                {
                    "type": "reply",
                    "seq": m.seq,
                    "from": m.sender,
                    "text": m.body,
                    "at": m.created_at.isoformat(),
                    "id": client_id,
                }
            )

    return router
