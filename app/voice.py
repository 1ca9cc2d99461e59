"""Phone calls: the speech stack, Twilio call control, the calls in progress and the voice routes.

A call's session is a plain :class:`~voice.call_session.CallSession`; what this process keeps
about it (the active-calls set, the gauge, the stream on the call row) is done by a
:class:`CallTracker` whose hooks the voice router calls when a session started and ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse

from app.metrics import Metrics
from app.settings import Settings
from crm_bridge.calls import CallStore
from crm_bridge.conversations import record_event
from crm_bridge.db import UNREACHABLE
from pipeline.ports import Clock
from pipeline.turn_manager import CoreConfig
from telephony.call_control import TwilioCallControl
from telephony.stream_tokens import StreamTokens
from telephony.twilio_protocol import Start
from telephony.voice_routes import BUSY_MESSAGE, StreamCaller, TwilioLine, voice_router
from voice.call_session import CallSession, Conversation, Synthesizer, Transcriber, TurnTimings, VoiceConfig
from voice.recording import CallRecording

if TYPE_CHECKING:  # the speech stack loads its models lazily; the container is built from this module
    from app.container import Services
    from telephony.browser_transfer import BrowserTransfers
    from voice.speech_stack import SpeechStack

log = logging.getLogger("closeloop")


def build_speech(settings: Settings) -> SpeechStack:
    """The shared speech models of this process (started on the first call, or preloaded)."""
    from voice.speech_stack import SpeechStack  # noqa: PLC0415

    return SpeechStack(
        whisper_model_path=settings.whisper_model_path,
        whisper_model=settings.stt_model,
        piper_voice_path=settings.piper_voice_path,
        whisper_threads=settings.whisper_threads,
        whisper_workers=settings.whisper_workers,
        short_silence=settings.voice_short_silence,
        long_silence=settings.voice_long_silence,
        speech_cache_size=settings.voice_speech_cache,
        **({} if settings.stt_prompt is None else {"stt_prompt": settings.stt_prompt}),
    )


def build_call_control(settings: Settings) -> TwilioCallControl | None:
    """Twilio call control (hang-ups, transfers) when Twilio credentials are configured."""
    if not (settings.twilio_account_sid and settings.twilio_auth_token):
        return None
    return TwilioCallControl(
        settings.twilio_account_sid, settings.twilio_auth_token, api_base_url=settings.twilio_api_base_url
    )


def build_voice_config(settings: Settings) -> VoiceConfig:
    return VoiceConfig(
        barge_in_min_ms=settings.voice_barge_in_ms,
        backchannels=frozenset(
            w.strip().lower() for w in settings.voice_backchannels.split(",") if w.strip()
        ),
        reprompt_after_s=settings.voice_reprompt_seconds,
    )


def build_stream_tokens(settings: Settings, clock: Clock) -> StreamTokens:
    """The media stream tokens, keyed by CLOSELOOP_SECRET_KEY (or a random key for this process)."""
    key = settings.secret_key
    if not key:
        key = secrets.token_urlsafe(32)
        log.warning(
            "CLOSELOOP_SECRET_KEY is not set: media stream tokens use a random key of this process "
            "(set it when several processes answer calls behind one address)"
        )
    return StreamTokens(key.encode(), lambda: clock.now().timestamp())


class CallTracker:
    """The calls with a running session in this process.

    The set counts against ``CLOSELOOP_MAX_CALLS``, feeds the ``calls_active`` gauge and is closed
    at shutdown; a started session's stream is recorded on its call row.
    """

    def __init__(
        self,
        active: set[CallSession],
        calls: CallStore,
        clock: Clock,
        metrics: Metrics,
        idle: asyncio.Event | None = None,
    ) -> None:
        self.active = active
        self._calls = calls
        self._clock = clock
        self._metrics = metrics
        self.idle = idle or asyncio.Event()  # set while no call runs (a drain waits on it)
        if not active:
            self.idle.set()

    def add(self, session: CallSession) -> None:
        self.active.add(session)
        self.idle.clear()
        self._metrics.calls_active.set(len(self.active))

    async def started(self, start: Start, session: CallSession) -> None:
        await self._calls.stream_started(
            session.call_sid, start.stream_sid, session.conversation_id, session.caller, self._clock.now()
        )

    def ended(self, session: CallSession) -> None:
        self.active.discard(session)
        if not self.active:
            self.idle.set()
        self._metrics.calls_active.set(len(self.active))


class _SpeechSource(Protocol):
    speech: SpeechStack


def transcriber_factory(
    settings: Settings, source: _SpeechSource, metrics: Metrics
) -> Callable[[str], Awaitable[Transcriber]]:
    """``async (call_sid) -> transcriber`` for new calls: the shared Whisper, or (``CLOSELOOP_STT=deepgram``
    with a key) a per-call Deepgram stream that falls back to the shared Whisper.

    The speech stack is looked up on ``source`` for every call (tests swap it for a fake)."""

    async def whisper(call_sid: str) -> Transcriber:
        return source.speech.transcriber()

    def count_fallback(reason: str) -> None:
        metrics.stt_fallbacks.labels(reason).inc()

    if settings.stt_provider == "pipecat":
        return pipecat_transcriber_factory(settings, source, count_fallback)
    if settings.stt_provider != "deepgram":
        return whisper
    if not settings.deepgram_api_key:
        log.warning("CLOSELOOP_STT=deepgram but DEEPGRAM_API_KEY is not set; calls use Whisper")
        return whisper
    from voice.deepgram_stt import DeepgramOptions, DeepgramTranscriber, deepgram_client  # noqa: PLC0415

    client = deepgram_client(settings.deepgram_api_key, settings.deepgram_url)
    options = DeepgramOptions(model=settings.deepgram_model)

    async def deepgram(call_sid: str) -> Transcriber:
        stt = DeepgramTranscriber(
            client,
            source.speech.transcriber(),
            call_id=call_sid,
            options=options,
            on_fallback=count_fallback,
        )
        await stt.start()
        return stt

    return deepgram


def pipecat_transcriber_factory(
    settings: Settings, source: _SpeechSource, on_fallback: Callable[[str], None]
) -> Callable[[str], Awaitable[Transcriber]]:
    """``async (call_sid) -> transcriber``: per call, the pipecat STT service that
    ``CLOSELOOP_STT_SERVICE``/``CLOSELOOP_STT_PARAMS`` name, falling back to the shared Whisper.

    Raises:
        voice.pipecat_speech.ServiceSettingsError: the settings name no usable STT service.
    """
    from voice.pipecat_speech import ServiceSettingsError, ServiceSpec, STTService  # noqa: PLC0415
    from voice.pipecat_stt import PipecatTranscriber  # noqa: PLC0415

    if not settings.stt_service:
        raise ServiceSettingsError(
            "CLOSELOOP_STT=pipecat needs CLOSELOOP_STT_SERVICE (see docs/speech_services.md)"
        )
    spec = ServiceSpec.from_settings(
        settings.stt_service, settings.stt_params, base=STTService, environ=os.environ
    ).checked()

    async def pipecat(call_sid: str) -> Transcriber:
        stt = PipecatTranscriber(spec, source.speech.transcriber(), call_id=call_sid, on_fallback=on_fallback)
        await stt.start()
        return stt

    return pipecat


def synthesizer_factory(
    settings: Settings, source: _SpeechSource, closers: list[Callable[[], Awaitable[None]]]
) -> Callable[[str], Synthesizer]:
    """``(call_sid) -> synthesizer`` for new calls: the embedded Piper voice, or (``CLOSELOOP_TTS_SERVICE``)
    the pipecat TTS service the settings name, with Piper speaking for it when it fails. The
    service's pipelines are shared by calls and closed with ``closers``.

    Raises:
        voice.pipecat_speech.ServiceSettingsError: the settings name no usable TTS service.
    """
    if not settings.tts_service:
        return lambda call_sid: source.speech.synthesizer()
    from voice.pipecat_speech import ServiceSpec, TTSService  # noqa: PLC0415
    from voice.pipecat_tts import PipecatVoice  # noqa: PLC0415

    spec = ServiceSpec.from_settings(
        settings.tts_service, settings.tts_params, base=TTSService, environ=os.environ
    ).checked()
    voice = PipecatVoice(spec, max_pipelines=settings.max_calls)  # every call may be speaking at once
    closers.append(voice.aclose)
    return lambda call_sid: voice.synthesizer(source.speech.synthesizer(), call_id=call_sid)


def call_recording(s: Services) -> CallRecording | None:
    """A recording for a new call when ``CLOSELOOP_RECORD_CALLS`` is on (voice/recording.py); the
    session taps it and, when the call ends, it is kept by ``s.recordings``."""
    if not s.settings.record_calls or s.recordings is None:
        return None
    return CallRecording(s.recordings.folder / "partial", s.recordings.keep)


def _ms(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def voice_routes(s: Services, conversation: Conversation) -> APIRouter:
    """``POST /twilio/voice``, ``/twilio/status`` and ``WS /twilio/media`` over ``s``'s calls."""
    from voice.speech_stack import Upsampler  # noqa: PLC0415

    settings = s.settings
    config = build_voice_config(settings)
    # Twilio sends a 20 ms frame every 20 ms, silence included: a gap in a phone call's audio is a
    # late packet or a stalled stream, never suppressed silence (see VoiceConfig.audio_gap_ms).
    phone_config = dataclasses.replace(config, audio_gap_ms=config.stall_gap_ms)
    new_transcriber = transcriber_factory(settings, s, s.metrics)
    new_synthesizer = synthesizer_factory(settings, s, s.closers)
    tracker = CallTracker(s.active_calls, s.calls, s.clock, s.metrics, s.calls_idle)
    from app.softphone import build_browser_transfers, softphone_routes  # noqa: PLC0415

    # Voice handoffs ring agents who take calls in the browser first (bridged over the caller's
    # own leg), then agents' phones through the Twilio conference transfer when it is on.
    browser_agents = build_browser_transfers(s, ice_servers(settings))

    async def twilio_handoff(call_sid: str, conversation_id: int) -> None:
        await browser_agents.on_handoff(call_sid, conversation_id, caller_rate=8000)

    async def on_turn(conversation_id: int, t: TurnTimings) -> None:
        for name, value in (
            ("stt", t.stt_ms),
            ("turn_manager", t.core_ms),
            ("tts_first_audio", t.tts_first_audio_ms),
            ("voice_to_voice", t.voice_to_voice_ms),
            ("endpoint", t.endpoint_ms),
        ):
            if value is not None:
                s.metrics.voice[name].observe(value / 1000)
        at = s.clock.now()
        timings = {
            "stt_ms": _ms(t.stt_ms),
            "turn_manager_ms": _ms(t.core_ms),
            "tts_first_audio_ms": _ms(t.tts_first_audio_ms),
            "voice_to_voice_ms": _ms(t.voice_to_voice_ms),
            "endpoint_ms": _ms(t.endpoint_ms),
            "reply_chars": t.text_chars,
        }
        # The database may be away (an outage): the timings wait for it like the turn did.
        deadline = time.monotonic() + config.store_wait_s
        while True:
            try:
                async with s.pool.acquire() as conn:
                    await record_event(conn, conversation_id, "voice_turn", timings, at)
                return
            except UNREACHABLE as e:
                if time.monotonic() >= deadline:
                    log.warning(
                        "voice turn timings not stored: database unreachable",
                        extra={"conversation_id": conversation_id, "error": type(e).__name__},
                    )
                    return
            await asyncio.sleep(config.store_retry_s)  # paced retries, as the call's own turn

    async def session_factory(start: Start, line: TwilioLine, identity: StreamCaller) -> CallSession:
        # The caller comes from the call row the signed voice webhook wrote (identity), never
        # from the stream's customParameters, which whoever opens the socket chooses.
        await s.speech.start()
        session = CallSession(
            call_sid=start.call_sid,
            caller=identity.caller,
            caller_attested=identity.attested,
            conversation=conversation,
            line=line,
            detector=s.speech.detector(),
            stt=await new_transcriber(start.call_sid),
            tts=new_synthesizer(start.call_sid),
            resample_8k_to_16k=Upsampler(),
            config=phone_config,
            on_turn=on_turn,
            on_handoff=twilio_handoff,
            recording=call_recording(s),
        )
        tracker.add(session)  # counts against max_calls while it starts
        return session

    fallback_queue = CoreConfig().fallback_queue

    async def lines_busy(call_sid: str, caller: str | None, called: str | None) -> None:
        now = s.clock.now()
        await s.calls.lines_busy(
            call_sid,
            caller,
            queue=fallback_queue,
            said=BUSY_MESSAGE,
            due=now + timedelta(minutes=settings.transfer_callback_minutes),
            now=now,
        )

    router = voice_router(
        guard=s.twilio_guard,
        calls=s.calls,
        clock=s.clock,
        tokens=build_stream_tokens(settings, s.clock),
        session_factory=session_factory,
        hangup=s.call_control.hangup if s.call_control else None,
        on_started=tracker.started,
        on_ended=tracker.ended,
        on_violation=lambda reason, fatal: s.metrics.media_violations.labels(
            reason, str(fatal).lower()
        ).inc(),
        active_calls=lambda: len(s.active_calls),
        max_calls=settings.max_calls,
        lines_busy=lines_busy,
        busy_message=BUSY_MESSAGE,
        start_timeout_s=settings.media_start_timeout_s,
    )
    router.include_router(browser_call_routes(s, config, on_turn, tracker, conversation, browser_agents))
    router.include_router(softphone_routes(s, browser_agents))
    return router


def ice_servers(settings: Settings) -> list[dict[str, Any]]:
    """``CLOSELOOP_ICE_SERVERS`` as a list of ICE servers.

    Raises:
        ValueError: not a JSON list of objects with ``urls``.
    """
    try:
        servers = json.loads(settings.ice_servers or "[]")
    except json.JSONDecodeError as e:
        raise ValueError(f"CLOSELOOP_ICE_SERVERS is not JSON: {e}") from None
    if not isinstance(servers, list) or not all(isinstance(x, dict) and x.get("urls") for x in servers):
        raise ValueError('CLOSELOOP_ICE_SERVERS must be a JSON list like [{"urls": "stun:host:3478"}]')
    return servers


def browser_call_routes(
    s: Services,
    config: VoiceConfig,
    on_turn: Callable[[int, TurnTimings], Awaitable[None]],
    tracker: CallTracker,
    conversation: Conversation,
    browser_agents: BrowserTransfers | None = None,
) -> APIRouter:
    """``POST /webrtc/offer`` and ``POST /webrtc/hangup``: calls from the browser (telephony/webrtc.py),
    served by the same call session as phone calls (no Twilio involved)."""
    from pipeline.model import Channel  # noqa: PLC0415
    from telephony.webrtc import (  # noqa: PLC0415
        BrowserCalls,
        Captioned,
        Continued,
        OfferRefused,
        WebRTCLine,
        WebRTCSettings,
    )
    from web.chat_routes import chat_session_address  # noqa: PLC0415
    from web.limits import client_address, forwarded_for, parse_networks  # noqa: PLC0415

    settings = s.settings
    trusted = parse_networks(settings.trusted_proxies)

    async def browser_handoff(call_sid: str, conversation_id: int) -> None:
        if browser_agents is not None:
            await browser_agents.on_handoff(call_sid, conversation_id, caller_rate=16000)

    async def new_session(
        call_id: str, line: WebRTCLine, tell: Callable[[str], None], continues: str | None
    ) -> CallSession:
        await s.speech.start()
        await s.calls.record_incoming(call_id, None, "webrtc", s.clock.now())
        # A call from the chat page continues the page's conversation (one history); the call
        # row (stream "webrtc") links it, so which turns were spoken stays visible.
        port = conversation if continues is None else Continued(conversation, Channel.WEBCHAT, continues)
        session = CallSession(
            call_sid=call_id,
            caller=None,  # a browser has no caller ID: the caller identifies like on web chat
            conversation=Captioned(port, tell, s.redactor.redact),  # live captions in the page
            line=line,
            detector=s.speech.detector(),
            stt=s.speech.transcriber(),
            tts=s.speech.synthesizer(),
            resample_8k_to_16k=lambda data: np.frombuffer(data, dtype="<i2"),  # the line sends 16 kHz
            config=config,
            on_turn=on_turn,
            on_handoff=browser_handoff if browser_agents is not None else None,
            recording=call_recording(s),
        )
        tracker.add(session)
        return session

    async def on_end(call_id: str, session: CallSession, reason: str) -> None:
        tracker.ended(session)
        await s.calls.stream_ended(call_id, reason, s.clock.now())

    async def started(call_id: str, session: CallSession) -> None:
        await s.calls.stream_started(call_id, "webrtc", session.conversation_id, None, s.clock.now())

    calls = BrowserCalls(
        new_session,
        on_end,
        can_take_call=lambda: len(s.active_calls) < settings.max_calls and not s.drain.draining,
        settings=WebRTCSettings(
            ice_servers=ice_servers(settings), max_calls_per_client=settings.webrtc_calls_per_client
        ),
        on_started=started,
    )
    s.closers.append(calls.close)
    router = APIRouter()

    @router.post("/webrtc/offer", tags=["voice"])
    async def offer(request: Request, body: dict[str, Any] = Body(...)) -> JSONResponse:
        client = client_address(
            request.client.host if request.client else None, forwarded_for(request.headers), trusted
        )
        # The page's chat session (a bearer secret, as on WS /chat) names the conversation the
        # call continues; only its hash is used, the secret itself is neither stored nor logged.
        # A malformed or unknown session is not an error: the call gets its own conversation.
        session = body.pop("session", None)
        try:
            continues = await chat_session_address(s.pool, session)
            answer = await calls.answer(body, client, continues=continues)
        except OfferRefused as e:
            return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status)
        return JSONResponse(answer)

    @router.get("/webrtc/config", tags=["voice"])
    async def webrtc_config() -> dict[str, Any]:
        """What the page needs to place a call: the ICE servers (STUN/TURN) of CLOSELOOP_ICE_SERVERS."""
        return {"iceServers": calls.settings.ice_servers}

    @router.post("/webrtc/hangup", tags=["voice"])
    async def hangup(body: dict[str, Any] = Body(...)) -> JSONResponse:
        if not calls.hang_up(str(body.get("call_id", ""))):
            return JSONResponse({"error": {"code": "no_call", "message": "no such call"}}, status_code=404)
        return JSONResponse({"status": "ending"})

    return router
