"""Browser calls over WebRTC (aiortc): the same call session as a Twilio call, another line.

``POST /webrtc/offer`` takes the browser's SDP offer (one audio track, ICE gathered: no trickle)
and answers it. The caller's Opus audio is decoded by aiortc and resampled once, to 16 kHz mono,
straight into the call session's turn detection; the bot's 8 kHz audio goes out through an
outbound track that resamples it once to 48 kHz, Opus's own rate. The line keeps Twilio's
playout semantics, so barge-in and "heard" accounting work unchanged: a mark comes back when the
audio before it has been played out at real time, ``clear`` drops the queued audio and returns
the pending marks at once. Keypad digits come over a data channel named ``keys``; the page's
``hangup`` message or a closed connection ends the call. WebRTC stops sending packets in silence
(DTX) and networks drop them: the session's turn detection runs on wall-clock time then
(:meth:`voice.call_session.CallSession._fill_audio_gaps`).

Who may call: anyone who can open the public ``/chat`` page, as with web chat. What an attacker
would try, and what stops it: many offers at once (per-address limit on open calls, and the
process's ``CLOSELOOP_MAX_CALLS``), a huge or malformed SDP (size limit, 400 with the reason), an
offer without audio (400), keeping a connection that never completes ICE (closed after
``connect_timeout_s``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket
from av import AudioFrame
from av.audio.resampler import AudioResampler

from voice.audio import ulaw_to_pcm16

log = logging.getLogger(__name__)

OUT_RATE = 8000  # what the call session sends (its synthesizers speak 8 kHz mu-law)
IN_RATE = 16000  # what turn detection and speech-to-text take
OPUS_RATE = 48000  # what the outbound track hands aiortc's Opus encoder
FRAME_S = 0.02
PAYBACK_S = 0.001  # how much of an early reply start each idle 20 ms frame pays back
MAX_SDP_BYTES = 20_000


class OfferRefused(Exception):
    """The offer cannot become a call; ``status`` and ``code`` say why (shown to the caller)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ---- the outbound track -----------------------------------------------------------------------


class Playout(MediaStreamTrack):
    """The bot's voice as a WebRTC audio track, paced at real time in 20 ms frames (silence when
    there is nothing to say). Marks queued between audio fire when the audio before them has been
    sent, as Twilio echoes marks once the audio before them played.

    Frames leave at 48 kHz, resampled here from the session's 8 kHz: aiortc's Opus encoder takes
    48 kHz frames of 20 ms straight through, while an 8 kHz frame would sit in its resampler's
    frame buffer for one more frame (20 ms later on every reply). The resampler's first output is
    short by its filter delay (2 ms); that start of the stream is padded with silence, so each
    frame carries the audio taken for it, not the previous frame's.

    A reply that starts while the track is idle (its last frame carried no audio) goes out at
    once instead of in the next 20 ms slot (10 ms sooner on average), and the pacing clock runs
    on from that frame. The RTP timestamps stay continuous (aiortc stamps each packet from the
    frame's ``pts``), so the stream is then ahead of real time by what was skipped; idle frames
    pay that back 1 ms each, so over a call the track still sends at real time.

    Args:
        on_mark: called with a mark's name once the audio queued before it has been sent.
        clock: monotonic seconds (a test's fake clock).
    """

    kind = "audio"

    def __init__(self, on_mark: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._audio_queued = asyncio.Event()  # set by enqueue_audio: wakes an idle track at once
        self._idle = True  # the last frame carried no audio
        self.ahead_s = 0.0  # how far the stream runs ahead of real time (an early reply start)
        self._on_mark = on_mark
        self._queue: collections.deque[bytes | str] = collections.deque()  # pcm bytes or mark names
        self._samples = int(OUT_RATE * FRAME_S)
        self._out_samples = int(OPUS_RATE * FRAME_S)
        self._resampler = AudioResampler(format="s16", layout="mono", rate=OPUS_RATE)
        self._pending = b""  # resampled 48 kHz audio not yet in a frame (none after the first)
        self._pts = 0  # of the next frame, in 8 kHz samples
        self._started_at: float | None = None
        self.sent_audio_ms = 0.0  # bot audio (not silence) sent so far

    def enqueue_audio(self, pcm: bytes) -> None:
        if pcm:
            self._queue.append(pcm)
            self._audio_queued.set()

    def enqueue_mark(self, name: str) -> None:
        self._queue.append(name)

    def clear(self) -> None:
        """Drop the audio not yet sent; every mark still queued comes back at once."""
        marks = [item for item in self._queue if isinstance(item, str)]
        self._queue.clear()
        for name in marks:
            self._on_mark(name)

    def _fire_leading_marks(self) -> None:
        while self._queue and isinstance(self._queue[0], str):
            self._on_mark(self._queue.popleft())  # type: ignore[arg-type]

    def _take(self, nbytes: int) -> bytes:
        out = bytearray()
        while len(out) < nbytes:
            self._fire_leading_marks()
            if not self._queue:
                break
            head = self._queue[0]
            assert isinstance(head, bytes)
            need = nbytes - len(out)
            out += head[:need]
            if len(head) > need:
                self._queue[0] = head[need:]
            else:
                self._queue.popleft()
        return bytes(out)

    def _to_opus_rate(self, pcm: bytes) -> bytes:
        """20 ms of 8 kHz audio as 20 ms at 48 kHz (the very first frame padded at its start)."""
        frame = AudioFrame(format="s16", layout="mono", samples=self._samples)
        frame.planes[0].update(pcm)
        frame.pts = self._pts
        frame.sample_rate = OUT_RATE
        frame.time_base = fractions.Fraction(1, OUT_RATE)
        data = self._pending + b"".join(
            bytes(out.planes[0])[: out.samples * 2] for out in self._resampler.resample(frame)
        )
        nbytes = self._out_samples * 2
        if len(data) < nbytes:
            data = bytes(nbytes - len(data)) + data  # the start of the stream: silence before it
        self._pending = data[nbytes:]
        return data[:nbytes]

    def _has_audio(self) -> bool:
        return any(isinstance(item, bytes) for item in self._queue)

    async def _wait_for_slot(self) -> None:
        """Real-time pacing: wait for this frame's slot, or less when an idle track gets audio."""
        if self._idle and not self._has_audio():
            self.ahead_s = max(0.0, self.ahead_s - PAYBACK_S)  # silence pays back an early start
        slot = self._started_at + self._pts / OUT_RATE - self.ahead_s  # type: ignore[operator]
        while (wait := slot - self._clock()) > 0:
            if not self._idle:
                await asyncio.sleep(wait)
                return
            if self._has_audio():
                self.ahead_s += wait  # a reply starts now, not in the next slot
                return
            self._audio_queued.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._audio_queued.wait(), wait)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._started_at is None:
            self._started_at = self._clock()
        else:
            self._pts += self._samples
            await self._wait_for_slot()
        nbytes = self._samples * 2
        audio = self._take(nbytes)
        self._idle = not audio
        self.sent_audio_ms += len(audio) / 2 / OUT_RATE * 1000
        self._fire_leading_marks()  # marks right after this frame's audio: it is out now
        pcm = self._to_opus_rate(audio + bytes(nbytes - len(audio)))
        frame = AudioFrame(format="s16", layout="mono", samples=self._out_samples)
        frame.planes[0].update(pcm)
        frame.pts = self._pts * (OPUS_RATE // OUT_RATE)
        frame.sample_rate = OPUS_RATE
        frame.time_base = fractions.Fraction(1, OPUS_RATE)
        return frame


# ---- the inbound packets -------------------------------------------------------------------------

MAX_MISORDER = 100  # packets: further back than this is a new sequence (a restarted sender), not a late one


class ArrivalOrder:
    """The receive buffer of a browser call's audio: each packet goes to the decoder when it arrives.

    aiortc's audio receiver holds packets in a jitter buffer that lets a frame out only once four
    later frames have come (80 ms) and waits for a lost packet until sixteen have come (320 ms).
    That smooths what a loudspeaker plays; here a machine listens (turn detection and
    speech-to-text), which wants every frame as soon as it exists and fills silence on
    wall-clock time itself. An Opus packet is one whole frame, so nothing is reassembled: a packet
    newer than the last one passed goes straight on, a late or repeated one is dropped (its moment
    has passed), a lost one is simply missing.

    The interface is aiortc's ``JitterBuffer.add``: ``(packet) -> (picture_loss, frame or None)``.
    """

    capacity = 16  # what aiortc's audio buffer holds, for anything that reads it

    def __init__(self) -> None:
        self._last: int | None = None  # sequence number of the last packet passed on

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        seq = packet.sequence_number
        if self._last is not None:
            behind = (self._last - seq) & 0xFFFF
            if behind < MAX_MISORDER:  # a repeat (0) or a late packet
                return False, None
        self._last = seq
        return False, JitterFrame(data=getattr(packet, "_data", packet.payload), timestamp=packet.timestamp)


def hear_on_arrival(pc: RTCPeerConnection) -> bool:
    """Give the audio receivers of ``pc`` an :class:`ArrivalOrder` buffer instead of aiortc's
    80 ms jitter buffer; False when this aiortc keeps it elsewhere (the call then works as before,
    80 ms later per turn). Call it after the remote description is set (the receivers exist)."""
    done = False
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind == "audio" and hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            # aiortc has no setting for it: the receiver is built inside RTCPeerConnection.
            receiver._RTCRtpReceiver__jitter_buffer = ArrivalOrder()
            done = True
    return done


# ---- the line ------------------------------------------------------------------------------------


class WebRTCLine:
    """:class:`voice.call_ports.Line` over a peer connection."""

    def __init__(self, playout: Playout, on_hangup: Callable[[str], Awaitable[None]]) -> None:
        self._playout = playout
        self._on_hangup = on_hangup

    async def send_audio(self, ulaw: bytes) -> None:
        self._playout.enqueue_audio(ulaw_to_pcm16(ulaw).astype("<i2").tobytes())

    async def send_mark(self, name: str) -> None:
        self._playout.enqueue_mark(name)

    async def send_clear(self) -> None:
        self._playout.clear()

    async def hangup(self, reason: str) -> None:
        await self._on_hangup(reason)


def pcm16k(frame: AudioFrame, resampler: AudioResampler) -> bytes:
    """One received frame (any rate and layout aiortc decoded) as 16 kHz mono int16 bytes."""
    out = bytearray()
    for converted in resampler.resample(frame):
        out += converted.to_ndarray().astype("<i2").tobytes()
    return bytes(out)


# ---- captions ------------------------------------------------------------------------------------


class Captioned:
    """The call's conversation port, telling the page what each side said as it goes (live
    captions): the caller's words as stored (redacted) and every reply the assistant gives."""

    def __init__(self, conversation: Any, tell: Callable[[str], None], redact: Callable[[str], str]) -> None:
        self._conversation = conversation
        self._tell = tell
        self._redact = redact

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conversation, name)

    def _caption(self, who: str, text: str) -> None:
        if text.strip():
            self._tell(json.dumps({"caption": who, "text": text}))

    async def open_call(self, call_sid: str, caller: str | None, **kwargs: Any) -> Any:
        reply = await self._conversation.open_call(call_sid, caller, **kwargs)
        for message in getattr(reply, "messages", []):
            self._caption("assistant", message.body)
        return reply

    async def handle_text(self, channel: Any, address: str, text: str, **kwargs: Any) -> Any:
        kind = kwargs.get("kind", "message")
        if kind == "dtmf":
            self._caption("you", "keyed " + "\u2022" * len(text))  # digits may be a code: not shown
        else:
            self._caption("you", self._redact(text))
        reply = await self._conversation.handle_text(channel, address, text, **kwargs)
        for message in getattr(reply, "messages", []):
            self._caption("assistant", message.body)
        return reply


class Continued:
    """The call's conversation port when the call continues a text conversation (a call placed
    from the chat page): its greeting and turns are stored in that conversation, one history.
    Spoken turns stay recognisable there: the caller's carry the external id ``voice:<call id>:<n>``
    and the call row links the call to the conversation."""

    def __init__(self, conversation: Any, channel: Any, address: str) -> None:
        self._conversation = conversation
        self._channel = channel
        self._address = address

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conversation, name)

    async def open_call(self, call_sid: str, caller: str | None, **kwargs: Any) -> Any:
        return await self._conversation.open_call(
            call_sid, caller, continues=(self._channel, self._address), **kwargs
        )

    async def handle_text(self, channel: Any, address: str, text: str, **kwargs: Any) -> Any:
        return await self._conversation.handle_text(self._channel, self._address, text, **kwargs)


# ---- calls ---------------------------------------------------------------------------------------


#: Control messages (captions) kept for a page whose channel is not open yet.
MAX_UNSENT = 50


@dataclass
class BrowserCall:
    """One browser call: its peer connection, outbound track, control channel and call session."""

    call_id: str
    client: str
    pc: RTCPeerConnection
    session: Any = None
    channel: Any = None  # the page's "keys" data channel, once open
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # the connection state changed, or it ended
    reason: str = "hangup"
    continues: str | None = None  # the address (a hash) of the chat conversation it continues
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    unsent: list[str] = field(default_factory=list)  # control messages waiting for the channel
    playout: Playout = field(init=False)

    def __post_init__(self) -> None:
        self.playout = Playout(self._mark)

    def _mark(self, name: str) -> None:
        if self.session is not None:
            self.session.on_mark(name)

    def tell(self, text: str) -> None:
        """A control message to the page (a caption, ``hangup``). Until the page's channel is open
        (the greeting starts as soon as the audio does, often before it) messages wait, at most
        :data:`MAX_UNSENT` of them, and go in order when it opens (:meth:`channel_open`)."""
        if self.channel is not None and getattr(self.channel, "readyState", "") == "open":
            with contextlib.suppress(Exception):
                self.channel.send(text)
        elif len(self.unsent) < MAX_UNSENT:
            self.unsent.append(text)

    def channel_open(self) -> None:
        """The page's channel is open: send what waited for it."""
        waiting, self.unsent = self.unsent, []
        for text in waiting:
            self.tell(text)


@dataclass
class WebRTCSettings:
    ice_servers: list[dict[str, Any]] = field(
        default_factory=list
    )  # [{"urls": ..., "username": ..., "credential": ...}]
    max_calls_per_client: int = 2
    connect_timeout_s: float = 15.0


#: ``(call_id, line, tell, continues) -> session``: ``tell(text)`` sends a control message (a caption)
#: to the page; ``continues`` is the address of the chat conversation the call continues, or None.
SessionFactory = Callable[[str, WebRTCLine, Callable[[str], None], str | None], Awaitable[Any]]


class BrowserCalls:
    """The browser calls of this process.

    Args:
        new_session: ``(call_id, line, tell, continues) -> session`` (not started): the app
            builds the same call session a Twilio call gets.
        on_end: ``(call_id, session, reason)`` after the session closed (store the end).
        can_take_call: False when the process is at its call limit (or draining).
        on_started: ``(call_id, session)`` once the session started (its conversation is open).
    """

    def __init__(
        self,
        new_session: SessionFactory,
        on_end: Callable[[str, Any, str], Awaitable[None]],
        can_take_call: Callable[[], bool],
        settings: WebRTCSettings | None = None,
        on_started: Callable[[str, Any], Awaitable[None]] | None = None,
    ) -> None:
        self._new_session = new_session
        self._on_end = on_end
        self._on_started = on_started
        self._can_take_call = can_take_call
        self.settings = settings or WebRTCSettings()
        self.calls: dict[str, BrowserCall] = {}

    def _configuration(self) -> RTCConfiguration:
        servers = [
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in self.settings.ice_servers
        ]
        return RTCConfiguration(iceServers=servers)

    async def answer(
        self, offer: dict[str, Any], client: str, *, continues: str | None = None
    ) -> dict[str, str]:
        """Answer a browser's offer and start the call; ``{"sdp", "type", "call_id"}``.

        ``continues``: the address of the chat conversation the call continues (resolved by the
        app from the page's session), or None for a conversation of its own.

        Raises:
            OfferRefused: bad offer (400), too many calls from this client (429) or in this
                process (503).
        """
        sdp, kind = offer.get("sdp"), offer.get("type")
        if kind != "offer" or not isinstance(sdp, str) or not sdp.strip():
            raise OfferRefused(400, "bad_offer", 'expected {"type": "offer", "sdp": "..."}')
        if len(sdp.encode()) > MAX_SDP_BYTES:
            raise OfferRefused(400, "bad_offer", f"the SDP is over {MAX_SDP_BYTES} bytes")
        if "m=audio" not in sdp:
            raise OfferRefused(400, "no_audio", "the offer has no audio: allow the microphone and call again")
        if sum(1 for c in self.calls.values() if c.client == client) >= self.settings.max_calls_per_client:
            raise OfferRefused(
                429, "too_many_calls", "too many calls from this address; hang up another first"
            )
        if not self._can_take_call():
            raise OfferRefused(503, "lines_busy", "all our lines are busy; please try again in a few minutes")
        call_id = "WR" + secrets.token_hex(16)
        call = BrowserCall(call_id, client, RTCPeerConnection(self._configuration()), continues=continues)
        self.calls[call_id] = call
        try:
            return await self._connect(call, RTCSessionDescription(sdp=sdp, type="offer"))
        except OfferRefused:
            await self._forget(call)
            raise
        except Exception as e:
            await self._forget(call)
            log.warning("webrtc offer failed", extra={"call_sid": call_id, "error": str(e)[:200]})
            raise OfferRefused(
                400, "bad_offer", f"the offer could not be answered: {type(e).__name__}"
            ) from None

    async def _connect(self, call: BrowserCall, offer: RTCSessionDescription) -> dict[str, str]:
        pc = call.pc
        pc.addTrack(call.playout)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(call, self._listen(call, track), "in")

        @pc.on("datachannel")
        def on_channel(channel: Any) -> None:
            call.channel = channel

            @channel.on("message")
            def on_message(message: Any) -> None:
                self._on_control(call, message)

            @channel.on("open")
            def on_open() -> None:
                call.channel_open()

            if getattr(channel, "readyState", "") == "open":
                call.channel_open()

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            call.wake.set()
            if pc.connectionState in ("failed", "closed"):
                self._end(call, "connection_" + pc.connectionState)

        await pc.setRemoteDescription(offer)
        if not any(t.receiver.track is not None and t.kind == "audio" for t in pc.getTransceivers()):
            raise OfferRefused(400, "no_audio", "the offer has no audio track")
        if not hear_on_arrival(pc):
            log.warning(
                "webrtc: aiortc's jitter buffer stays on the caller's audio", extra={"call_sid": call.call_id}
            )
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)  # gathers ICE candidates: the answer carries them
        line = WebRTCLine(call.playout, lambda reason: self._hang_up(call, reason))
        call.session = await self._new_session(call.call_id, line, call.tell, call.continues)
        self._spawn(call, self._run(call), "run")
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "call_id": call.call_id}

    def _spawn(self, call: BrowserCall, coro: Awaitable[Any], what: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"webrtc-{call.call_id}-{what}")
        call.tasks.add(task)
        task.add_done_callback(call.tasks.discard)

    def _on_control(self, call: BrowserCall, message: Any) -> None:
        text = message if isinstance(message, str) else ""
        if text == "hangup":
            self._end(call, "hangup")
        elif len(text) == 1 and text in "0123456789*#" and call.session is not None:
            call.session.on_dtmf(text)

    async def _listen(self, call: BrowserCall, track: MediaStreamTrack) -> None:
        resampler = AudioResampler(format="s16", layout="mono", rate=IN_RATE)
        while not call.ended.is_set():
            try:
                frame = await track.recv()
            except MediaStreamError:
                return  # the browser stopped its track: the call goes on until it hangs up
            data = pcm16k(frame, resampler)  # type: ignore[arg-type]
            if data and call.session is not None:
                await call.session.on_audio(data)

    async def _run(self, call: BrowserCall) -> None:
        session = call.session
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                while call.pc.connectionState != "connected" and not call.ended.is_set():
                    call.wake.clear()
                    await call.wake.wait()
        except TimeoutError:
            self._end(call, "connect_timeout")
        if not call.ended.is_set():
            await session.start()
            if self._on_started is not None:
                await self._on_started(call.call_id, session)
            await call.ended.wait()
        try:
            await session.close(call.reason)
        finally:
            await self._forget(call)
            await self._on_end(call.call_id, session, call.reason)

    async def _hang_up(self, call: BrowserCall, reason: str) -> None:
        """The session hangs up (its goodbye was heard): tell the page, then end."""
        call.tell("hangup")
        self._end(call, reason)

    def _end(self, call: BrowserCall, reason: str) -> None:
        if not call.ended.is_set():
            call.reason = reason
            call.ended.set()
            call.wake.set()

    async def _forget(self, call: BrowserCall) -> None:
        self.calls.pop(call.call_id, None)
        call.ended.set()
        call.playout.stop()
        with contextlib.suppress(Exception):
            await call.pc.close()

    def hang_up(self, call_id: str) -> bool:
        """End the call ``call_id`` (the page's hang-up button); False when there is no such call."""
        call = self.calls.get(call_id)
        if call is None:
            return False
        self._end(call, "hangup")
        return True

    async def close(self) -> None:
        for call in list(self.calls.values()):
            self._end(call, "server_shutdown")
        for call in list(self.calls.values()):
            for task in list(call.tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)


__all__ = [
    "ArrivalOrder",
    "BrowserCall",
    "BrowserCalls",
    "Continued",
    "OfferRefused",
    "Playout",
    "WebRTCLine",
    "WebRTCSettings",
    "hear_on_arrival",
]
