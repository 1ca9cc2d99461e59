"""Web chat: the page at ``GET /chat``, the JSON protocol at ``WS /chat``, and push delivery.

Protocol (JSON text frames): the client says ``hello`` (with the session id it kept, if any),
the server answers ``welcome`` with the session id and the transcript; then each ``message``
from the client gets one or more ``reply`` frames, and texts sent later (follow-ups, agents)
arrive as ``push``. Bad frames get an ``error`` frame and the socket stays open.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse

from pipeline.model import Channel, OutboundText, SendResult
from pipeline.ports import Clock
from pipeline.service import ConversationService

log = logging.getLogger(__name__)

SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
MAX_TEXT = 2000
HELLO_TIMEOUT = 15.0


class WebChatHub:
    """Open web-chat sockets by session; also the :class:`TextSender` for the webchat channel."""

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


def chat_router(service: ConversationService, store: Any, hub: WebChatHub, clock: Clock) -> APIRouter:
    router = APIRouter()
    page = Path(__file__).resolve().parent / "chat.html"

    @router.get("/chat", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @router.websocket("/chat")
    async def chat_socket(ws: WebSocket) -> None:
        await ws.accept()
        session: str | None = None
        try:
            session = await _hello(ws)
            if session is None:
                return
            opened = await store.open_conversation(Channel.WEBCHAT, session, clock.now())
            await ws.send_json(
                {
                    "type": "welcome",
                    "session": session,
                    "conversation_id": opened["conversation"]["id"],
                    "history": _history(opened["messages"]),
                }
            )
            hub.add(session, ws)
            while True:
                raw = await ws.receive_text()
                await _on_frame(ws, session, raw)
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                hub.remove(session, ws)

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

    async def _on_frame(ws: WebSocket, session: str, raw: str) -> None:
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
            f"webchat:{session}:{client_id}"
            if isinstance(client_id, str) and 0 < len(client_id) <= 100
            else None
        )
        reply = await service.handle_text(Channel.WEBCHAT, session, text, external_id=external_id)
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
