"""Twilio voice: ``POST /twilio/voice``, ``POST /twilio/status`` and the media stream ``WS /twilio/media``.

Signatures are checked on both webhooks and on the WebSocket upgrade (over the ``wss://`` URL
rebuilt from PUBLIC_BASE_URL) when an auth token is configured: 403 / close 1008 before any
work. A malformed frame is dropped with a logged reason, or closes only its own stream; the
codec never hangs a call up over REST.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect, WebSocketState

from telephony.signatures import is_valid_signature, public_url, ws_url
from telephony.twilio_protocol import (
    Dtmf,
    Mark,
    Media,
    ProtocolViolation,
    Start,
    Stop,
    StreamDecoder,
    encode_clear,
    encode_mark,
    encode_media,
)
from telephony.voice_twiml import connect_stream

log = logging.getLogger(__name__)
XML = "application/xml"


class Session(Protocol):
    async def start(self) -> None: ...

    async def on_audio(self, ulaw: bytes) -> None: ...

    def on_mark(self, name: str) -> None: ...

    def on_dtmf(self, digit: str) -> None: ...

    async def close(self, reason: str) -> None: ...


class TwilioLine:
    """The :class:`voice.call_session.Line` of one Twilio media stream."""

    def __init__(
        self, ws: WebSocket, stream_sid: str, call_sid: str, hangup: Callable[[str], Awaitable[None]] | None
    ) -> None:
        self._ws = ws
        self._stream_sid = stream_sid
        self._call_sid = call_sid
        self._hangup = hangup
        self._lock = asyncio.Lock()
        self.sent_frames = 0

    async def _send(self, text: str) -> None:
        if self._ws.client_state != WebSocketState.CONNECTED:
            return
        async with self._lock:
            try:
                await self._ws.send_text(text)
            except (RuntimeError, WebSocketDisconnect):
                pass  # the stream is gone; the receive loop ends the session

    async def send_audio(self, ulaw: bytes) -> None:
        self.sent_frames += 1
        await self._send(encode_media(self._stream_sid, ulaw))

    async def send_mark(self, name: str) -> None:
        await self._send(encode_mark(self._stream_sid, name))

    async def send_clear(self) -> None:
        await self._send(encode_clear(self._stream_sid))

    async def hangup(self, reason: str) -> None:
        """End the call: through Twilio REST when configured, else by closing the stream."""
        if self._hangup is not None:
            try:
                await self._hangup(self._call_sid)
                return
            except Exception:
                log.warning(
                    "REST hang-up failed; closing the stream instead", extra={"call_sid": self._call_sid}
                )
        if self._ws.client_state == WebSocketState.CONNECTED:
            await self._ws.close(code=1000, reason=reason)


def voice_router(
    *,
    auth_token: str | None,
    public_base_url: str | None,
    calls: Any,
    clock: Any,
    session_factory: Callable[[Start, TwilioLine], Awaitable[Session]],
    hangup: Callable[[str], Awaitable[None]] | None,
    on_rejected: Callable[[str], None] = lambda reason: None,
    on_violation: Callable[[str, bool], None] = lambda reason, fatal: None,
) -> APIRouter:
    router = APIRouter()

    def _base(request: Request | WebSocket) -> str:
        return (
            public_base_url or f"{request.url.scheme.replace('ws', 'http')}://{request.url.netloc}"
        ).rstrip("/")

    async def _signed_form(request: Request) -> tuple[dict[str, str], JSONResponse | None]:
        form = await request.form()
        params = {k: str(v) for k, v in form.multi_items()}
        if auth_token:
            url = (
                public_url(public_base_url, request.url.path, request.url.query)
                if public_base_url
                else str(request.url)
            )
            if not is_valid_signature(auth_token, url, params, request.headers.get("X-Twilio-Signature")):
                on_rejected("bad_signature")
                return params, JSONResponse(
                    {
                        "error": {
                            "code": "bad_signature",
                            "message": "X-Twilio-Signature is missing or does not match",
                        }
                    },
                    status_code=403,
                )
        return params, None

    @router.post("/twilio/voice", tags=["twilio"])
    async def twilio_voice(request: Request) -> Response:
        params, refused = await _signed_form(request)
        if refused is not None:
            return refused
        call_sid = params.get("CallSid")
        if not call_sid:
            return JSONResponse(
                {"error": {"code": "invalid_call", "message": "CallSid is required"}}, status_code=400
            )
        await calls.record_incoming(call_sid, params.get("From"), params.get("To"), clock.now())
        stream = ws_url(_base(request), "/twilio/media")
        parameters = {"callSid": call_sid, "caller": params.get("From", ""), "called": params.get("To", "")}
        return Response(connect_stream(stream, parameters), media_type=XML)

    @router.post("/twilio/status", tags=["twilio"])
    async def twilio_status(request: Request) -> Response:
        params, refused = await _signed_form(request)
        if refused is not None:
            return refused
        if not params.get("CallSid") or not params.get("CallStatus"):
            return JSONResponse(
                {"error": {"code": "invalid_status", "message": "CallSid and CallStatus are required"}},
                status_code=400,
            )
        await calls.record_status(params, clock.now())
        return Response(status_code=204)

    @router.websocket("/twilio/media")
    async def twilio_media(ws: WebSocket) -> None:
        if auth_token:
            url = ws_url(_base(ws), "/twilio/media")
            if not is_valid_signature(auth_token, url, {}, ws.headers.get("X-Twilio-Signature")):
                on_rejected("bad_signature_ws")
                log.warning("refused unsigned media stream upgrade")
                await ws.close(code=1008)
                return
        await ws.accept()
        decoder = StreamDecoder()
        session: Session | None = None
        call_sid: str | None = None
        reason = "socket_closed"
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                frame = message.get("text")
                if frame is None:
                    frame = message.get("bytes") or b""
                try:
                    event = decoder.decode(frame)
                except ProtocolViolation as violation:
                    on_violation(violation.reason, violation.fatal)
                    log.warning(
                        "bad media stream frame",
                        extra={"reason": violation.reason, "fatal": violation.fatal, "call_sid": call_sid},
                    )
                    if violation.fatal:
                        reason = f"protocol:{violation.reason}"
                        await ws.close(code=1008, reason=violation.reason)
                        break
                    continue
                if event is None:
                    continue
                if isinstance(event, Media):
                    if session is not None:
                        await session.on_audio(event.payload)
                elif isinstance(event, Start):
                    call_sid = event.call_sid
                    line = TwilioLine(ws, event.stream_sid, event.call_sid, hangup)
                    session = await session_factory(event, line)
                    await session.start()
                elif isinstance(event, Mark):
                    if session is not None:
                        session.on_mark(event.name)
                elif isinstance(event, Dtmf):
                    if session is not None:
                        session.on_dtmf(event.digit)
                elif isinstance(event, Stop):
                    reason = "stop"
                    break
        except WebSocketDisconnect:
            reason = "socket_closed"
        except Exception:
            reason = "error"
            log.exception("media stream failed", extra={"call_sid": call_sid})
            if ws.client_state == WebSocketState.CONNECTED:
                await ws.close(code=1011)
        finally:
            if session is not None:
                await session.close(reason)
            if call_sid is not None:
                await calls.stream_ended(call_sid, reason, clock.now())

    return router
