"""Twilio voice: ``POST /twilio/voice``, ``POST /twilio/status`` and the media stream ``WS /twilio/media``.

Both webhooks and the WebSocket upgrade go through the :class:`~telephony.twilio_guard.TwilioGuard`
(signatures over the URL rebuilt from PUBLIC_BASE_URL; no token: refused unless on loopback or
opted in): 403 / close 1008 before any work.

Who is calling comes from the signed voice webhook only. It stores the call row (``From``, the
SHAKEN/STIR ``StirVerstat``) and hands the stream a one-time ``token`` ``<Parameter>`` bound to the
CallSid; the ``start`` frame must bring it back unexpired and unused, else the stream is closed
(1008, the reason logged) before any conversation starts. The caller is then read from the call
row, never from ``customParameters``. A stream that sends no ``start`` within ``start_timeout_s``
is closed. Over ``max_calls`` the webhook says the lines are busy, hangs up and books a call back.

A malformed frame is dropped with a logged reason, or closes only its own stream; the codec
never hangs a call up over REST.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect, WebSocketState

from telephony.signatures import ws_url
from telephony.stream_tokens import StreamTokens
from telephony.twilio_guard import TwilioGuard
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
from telephony.voice_twiml import connect_stream, say_and_hangup

log = logging.getLogger(__name__)
XML = "application/xml"


ATTESTED = "TN-Validation-Passed-A"
BUSY_MESSAGE = (
    "Thank you for calling. All our lines are busy right now. We have saved your number and someone "
    "from our team will call you back soon. Goodbye."
)


@dataclass(frozen=True)
class StreamCaller:
    """Who is on a call, as the signed voice webhook stored it in the call row.

    Attributes:
        caller: the ``From`` number (None when withheld).
        stir_verstat: Twilio's SHAKEN/STIR verification of it (``StirVerstat``), when reported.
    """

    caller: str | None
    stir_verstat: str | None = None

    @property
    def attested(self) -> bool:
        """Full (A-level) attestation of the number by the carrier: a signal about the number, not
        about the person holding the phone."""
        return self.stir_verstat == ATTESTED


class Session(Protocol):
    async def start(self) -> None: ...

    async def on_audio(self, ulaw: bytes) -> None: ...

    def on_mark(self, name: str) -> None: ...

    def on_dtmf(self, digit: str) -> None: ...

    async def close(self, reason: str) -> None: ...


S = TypeVar("S", bound=Session)


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
    guard: TwilioGuard,
    calls: Any,
    clock: Any,
    tokens: StreamTokens,
    session_factory: Callable[[Start, TwilioLine, StreamCaller], Awaitable[S]],
    hangup: Callable[[str], Awaitable[None]] | None,
    on_started: Callable[[Start, S], Awaitable[None]] | None = None,
    on_ended: Callable[[S], None] | None = None,
    on_violation: Callable[[str, bool], None] = lambda reason, fatal: None,
    active_calls: Callable[[], int] = lambda: 0,
    max_calls: int | None = None,
    lines_busy: Callable[[str, str | None, str | None], Awaitable[None]] | None = None,
    busy_message: str = BUSY_MESSAGE,
    start_timeout_s: float = 5.0,
) -> APIRouter:
    """The voice routes.

    Args:
        guard: decides whether a request came from Twilio.
        calls: the call store (:class:`crm_bridge.calls.CallStore`).
        tokens: issues and verifies the per-call stream tokens.
        session_factory: builds the call session once a stream's ``start`` was verified; gets the
            caller as stored by the voice webhook.
        on_started: ``(start, session)`` after the session started (its greeting is on its way).
        on_ended: ``(session)`` after the session closed, even when closing it failed.
        active_calls: calls with a running session in this process.
        max_calls: calls at once in this process; further calls hear ``busy_message``. None: no limit.
        lines_busy: ``(call_sid, caller, called)`` after a call was turned away (books the call back).
        start_timeout_s: how long an accepted stream may take to send ``start``.
    """
    router = APIRouter()
    loop_time = lambda: asyncio.get_running_loop().time()  # noqa: E731
    # Calls answered with a stream whose ``start`` has not arrived yet: they count against
    # max_calls until they start or their token expires.
    pending: dict[str, float] = {}

    def _busy() -> bool:
        if max_calls is None:
            return False
        now = loop_time()
        for sid in [sid for sid, until in pending.items() if until < now]:
            del pending[sid]
        return active_calls() + len(pending) >= max_calls

    def _base(request: Request | WebSocket) -> str:
        return (
            guard.public_base_url or f"{request.url.scheme.replace('ws', 'http')}://{request.url.netloc}"
        ).rstrip("/")

    @router.post("/twilio/voice", tags=["twilio"])
    async def twilio_voice(request: Request) -> Response:
        params, refused = await guard.signed_form(request)
        if refused is not None:
            return refused
        call_sid = params.get("CallSid")
        if not call_sid:
            return JSONResponse(
                {"error": {"code": "invalid_call", "message": "CallSid is required"}}, status_code=400
            )
        caller, called = params.get("From") or None, params.get("To") or None
        await calls.record_incoming(
            call_sid, caller, called, clock.now(), stir_verstat=params.get("StirVerstat") or None
        )
        if _busy():
            log.warning(
                "all lines busy: call turned away", extra={"call_sid": call_sid, "max_calls": max_calls}
            )
            guard.on_rejected("lines_busy")
            if lines_busy is not None:
                try:
                    await lines_busy(call_sid, caller, called)
                except Exception:  # the caller still hears the busy message
                    log.exception("could not book the call back of a busy call", extra={"call_sid": call_sid})
            return Response(say_and_hangup(busy_message), media_type=XML)
        pending[call_sid] = loop_time() + tokens.ttl_s
        stream = ws_url(_base(request), "/twilio/media")
        parameters = {"callSid": call_sid, "token": tokens.issue(call_sid)}
        return Response(connect_stream(stream, parameters), media_type=XML)

    @router.post("/twilio/status", tags=["twilio"])
    async def twilio_status(request: Request) -> Response:
        params, refused = await guard.signed_form(request)
        if refused is not None:
            return refused
        if not params.get("CallSid") or not params.get("CallStatus"):
            return JSONResponse(
                {"error": {"code": "invalid_status", "message": "CallSid and CallStatus are required"}},
                status_code=400,
            )
        await calls.record_status(params, clock.now())
        return Response(status_code=204)

    async def _verify_start(event: Start) -> tuple[str | None, StreamCaller | None]:
        """(why the stream is refused, None) or (None, the caller from the call row)."""
        refusal: str | None = tokens.verify(event.custom_parameters.get("token"), event.call_sid)
        if refusal is not None:
            return refusal, None
        row = await calls.claim_stream(event.call_sid, clock.now())
        if row is None:
            return "token_used", None
        return None, StreamCaller(row["caller"], row["stir_verstat"])

    @router.websocket("/twilio/media")
    async def twilio_media(ws: WebSocket) -> None:
        if not guard.websocket_allowed(ws):
            await ws.close(code=1008)
            return
        await ws.accept()
        decoder = StreamDecoder()
        session: S | None = None
        call_sid: str | None = None  # set once the stream's token was verified
        reason = "socket_closed"
        start_deadline = loop_time() + start_timeout_s
        try:
            while True:
                if session is None:
                    try:
                        async with asyncio.timeout(max(0.0, start_deadline - loop_time())):
                            message = await ws.receive()
                    except TimeoutError:
                        reason = "start_timeout"
                        on_violation("start_timeout", True)
                        log.warning(
                            "media stream sent no start in time; closed", extra={"timeout_s": start_timeout_s}
                        )
                        await ws.close(code=1008, reason="start_timeout")
                        break
                else:
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
                    refusal, identity = await _verify_start(event)
                    if refusal is not None or identity is None:
                        # Nothing else happens: no conversation, no greeting, the call row untouched.
                        reason = f"refused:{refusal}"
                        guard.on_rejected(f"stream_{refusal}")
                        log.warning(
                            "refused a media stream start",
                            extra={"reason": refusal, "claimed_call_sid": event.call_sid[:64]},
                        )
                        await ws.close(code=1008, reason=str(refusal))
                        break
                    pending.pop(event.call_sid, None)
                    call_sid = event.call_sid
                    line = TwilioLine(ws, event.stream_sid, event.call_sid, hangup)
                    session = await session_factory(event, line, identity)
                    await session.start()
                    if on_started is not None:
                        await on_started(event, session)
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
                try:
                    await session.close(reason)
                finally:
                    if on_ended is not None:
                        on_ended(session)
            if call_sid is not None:
                await calls.stream_ended(call_sid, reason, clock.now())

    return router
