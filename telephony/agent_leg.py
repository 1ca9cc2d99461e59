"""The agent's leg of a bridged call: a WebRTC peer connection with the agent's console.

The server answers the console's SDP offer (one audio track, ICE gathered: no trickle). What the
agent hears is an outbound track paced in 20 ms frames at the caller's line rate (8 kHz for a
Twilio caller, 16 kHz for a browser caller's line), which aiortc's Opus encoder resamples once
to 48 kHz. What the agent says arrives as decoded 48 kHz frames; each is resampled once to 8 kHz
for the caller's line (mu-law) and once to 16 kHz for the agent's transcriber, and handed to the
:class:`voice.bridge.AgentBridge` the leg serves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame
from av.audio.resampler import AudioResampler

from telephony.webrtc import MAX_SDP_BYTES, OfferRefused
from voice.audio import pcm16_to_ulaw

log = logging.getLogger(__name__)

FRAME_S = 0.02
MAX_BACKLOG_S = 0.5  # relayed audio queued beyond this is late: the oldest goes (jitter, not delay)


def checked_offer(offer: dict[str, Any]) -> RTCSessionDescription:
    """The console's offer as a session description.

    Raises:
        OfferRefused: not an offer, too large, or without audio (400, with the reason).
    """
    sdp, kind = offer.get("sdp"), offer.get("type")
    if kind != "offer" or not isinstance(sdp, str) or not sdp.strip():
        raise OfferRefused(400, "bad_offer", 'expected {"type": "offer", "sdp": "..."}')
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise OfferRefused(400, "bad_offer", f"the SDP is over {MAX_SDP_BYTES} bytes")
    if "m=audio" not in sdp:
        raise OfferRefused(400, "no_audio", "the offer has no audio: allow the microphone and try again")
    return RTCSessionDescription(sdp=sdp, type="offer")


class AgentPlayout(MediaStreamTrack):
    """What the agent hears: queued PCM at ``rate``, paced at real time, silence in between."""

    kind = "audio"

    def __init__(self, rate: int) -> None:
        super().__init__()
        self.rate = rate
        self._samples = int(rate * FRAME_S)
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._pts = 0
        self._started_at: float | None = None
        self._drained = asyncio.Event()
        self._drained.set()
        self.sent_audio_ms = 0.0

    def play(self, pcm: bytes, *, relay: bool = False) -> None:
        """Queue audio; ``relay`` audio (live from the caller) never builds up past ``MAX_BACKLOG_S``."""
        if not pcm:
            return
        self._queue.append(pcm)
        self._queued += len(pcm)
        self._drained.clear()
        limit = int(MAX_BACKLOG_S * self.rate) * 2
        while relay and self._queued > limit and len(self._queue) > 1:
            self._queued -= len(self._queue.popleft())

    def clear(self) -> None:
        self._queue.clear()
        self._queued = 0
        self._drained.set()

    async def played(self) -> None:
        await self._drained.wait()

    def _take(self, nbytes: int) -> bytes:
        out = bytearray()
        while len(out) < nbytes and self._queue:
            head = self._queue[0]
            need = nbytes - len(out)
            out += head[:need]
            if len(head) > need:
                self._queue[0] = head[need:]
            else:
                self._queue.popleft()
        self._queued -= len(out)
        return bytes(out)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._started_at is None:
            self._started_at = time.monotonic()
        else:
            self._pts += self._samples
            wait = self._started_at + self._pts / self.rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # real-time pacing of the outgoing stream
        nbytes = self._samples * 2
        audio = self._take(nbytes)
        self.sent_audio_ms += len(audio) / 2 / self.rate * 1000
        if not self._queue:
            self._drained.set()
        frame = AudioFrame(format="s16", layout="mono", samples=self._samples)
        frame.planes[0].update(audio + bytes(nbytes - len(audio)))
        frame.pts = self._pts
        frame.sample_rate = self.rate
        frame.time_base = fractions.Fraction(1, self.rate)
        return frame


#: ``(ulaw8k, pcm16k)`` of one frame of the agent's voice.
AgentAudio = Callable[[bytes, np.ndarray], Awaitable[None]]


class AgentLeg:
    """One agent's peer connection (the :class:`voice.bridge.AgentSide` of a bridge).

    Args:
        rate: the rate of the caller audio the agent hears (the caller's line rate).
        ice_servers: STUN/TURN servers, as ``CLOSELOOP_ICE_SERVERS`` gives them.
        on_closed: called once when the connection failed or closed (the agent went away).
    """

    def __init__(
        self,
        rate: int,
        *,
        ice_servers: list[dict[str, Any]] | None = None,
        on_closed: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        servers = [
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in ice_servers or []
        ]
        self.rate = rate
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.playout = AgentPlayout(rate)
        self.connected = asyncio.Event()
        self._on_closed = on_closed
        self._on_audio: AgentAudio | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.heard_ms = 0.0  # agent audio received

    # ---- AgentSide ------------------------------------------------------------------------------
    def play(self, pcm: bytes) -> None:
        self.playout.play(pcm, relay=True)

    def brief(self, pcm: bytes) -> None:
        self.playout.play(pcm)

    def clear(self) -> None:
        self.playout.clear()

    async def played(self) -> None:
        await self.playout.played()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.playout.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.pc.close()

    # ---- signalling -----------------------------------------------------------------------------
    async def answer(self, offer: RTCSessionDescription, on_audio: AgentAudio) -> dict[str, str]:
        """Answer the console's offer; the agent's audio goes to ``on_audio`` from then on.

        Raises:
            OfferRefused: the offer could not be answered or has no audio track (400).
        """
        self._on_audio = on_audio
        pc = self.pc
        pc.addTrack(self.playout)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._spawn(self._listen(track), "in")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected":
                self.connected.set()
            elif pc.connectionState in ("failed", "closed") and not self._closed:
                if self._on_closed is not None:
                    self._spawn(self._on_closed("agent_leg_" + pc.connectionState), "closed")

        try:
            await pc.setRemoteDescription(offer)
            if not any(t.receiver.track is not None and t.kind == "audio" for t in pc.getTransceivers()):
                raise OfferRefused(400, "no_audio", "the offer has no audio track")
            await pc.setLocalDescription(await pc.createAnswer())
        except OfferRefused:
            raise
        except Exception as e:
            raise OfferRefused(
                400, "bad_offer", f"the offer could not be answered: {type(e).__name__}"
            ) from None
        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}

    def _spawn(self, coro: Awaitable[Any], what: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"agent-leg-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, track: MediaStreamTrack) -> None:
        to_caller = AudioResampler(format="s16", layout="mono", rate=8000)
        to_stt = AudioResampler(format="s16", layout="mono", rate=16000)
        while not self._closed:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, AudioFrame):
                continue
            self.heard_ms += frame.samples / frame.sample_rate * 1000
            pcm8k = b"".join(f.to_ndarray().astype("<i2").tobytes() for f in to_caller.resample(frame))
            pcm16k = np.concatenate(
                [f.to_ndarray().reshape(-1).astype(np.int16) for f in to_stt.resample(frame)]
                or [np.zeros(0, dtype=np.int16)]
            )
            ulaw = pcm16_to_ulaw(np.frombuffer(pcm8k, dtype="<i2")) if pcm8k else b""
            if self._on_audio is not None:
                try:
                    await self._on_audio(ulaw, pcm16k)
                except Exception:
                    log.exception("agent audio could not be relayed")


__all__ = ["AgentLeg", "AgentPlayout", "checked_offer"]
