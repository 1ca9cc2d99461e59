"""The parts of an aiortc peer that plays a browser (the ``/chat`` page's call) or an agent's
console softphone against closeloop, for tests and benchmarks, as :mod:`telephony.simulated_call`
plays Twilio: a microphone sending real-time 20 ms frames at 48 kHz, a sink that plays the remote
track, and the offer/answer exchange."""

from __future__ import annotations

import asyncio
import fractions
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from voice.audio import resample, wav_to_pcm16

RATE = 48000
FRAME = 960  # 20 ms


def rms(pcm: np.ndarray) -> float:
    """Root mean square of the samples (0 for none)."""
    x = pcm.astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def speech48k(text: str) -> np.ndarray:
    """``text`` spoken by espeak-ng (en-us, 160 wpm) at 48 kHz, untrimmed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "said.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(out), text], check=True)
        pcm, rate = wav_to_pcm16(out.read_bytes())
    return resample(pcm, rate, RATE)


class Microphone(MediaStreamTrack):
    """A microphone: real-time 20 ms frames, silence (sent, no DTX) unless something is queued.

    :meth:`next_chunk` gives each frame's samples; a subclass may wait in it (send nothing)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = np.zeros(0, dtype=np.int16)
        self._pts = 0
        self._started: float | None = None
        self.said = asyncio.Event()  # set when the frame with the last queued samples went out
        self.ended_at = 0.0  # when that frame went out (time.monotonic)

    def say(self, pcm: np.ndarray) -> None:
        """Queue 48 kHz samples after anything still queued."""
        self.said.clear()
        self._pending = np.concatenate([self._pending, pcm.astype(np.int16)])

    async def next_chunk(self) -> np.ndarray:
        """The next frame's :data:`FRAME` samples: queued speech, else silence."""
        chunk = np.zeros(FRAME, dtype=np.int16)
        if self._pending.size:
            take = self._pending[:FRAME]
            chunk[: take.size] = take
            self._pending = self._pending[FRAME:]
            if not self._pending.size:
                self.ended_at = time.monotonic()
                self.said.set()
        return chunk

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._started is None:
            self._started = time.monotonic()
        else:
            self._pts += FRAME
            wait = self._started + self._pts / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # real-time pacing, as a microphone
        chunk = await self.next_chunk()
        frame = AudioFrame(format="s16", layout="mono", samples=FRAME)
        frame.planes[0].update(chunk.tobytes())
        frame.pts = self._pts
        frame.sample_rate = RATE
        frame.time_base = fractions.Fraction(1, RATE)
        return frame


class AudioSink:
    """Plays the peer's remote audio: :meth:`hear` gets each decoded frame as it comes out of the
    receive path (after aiortc's jitter buffer and decoder)."""

    def __init__(self) -> None:
        self._players: set[asyncio.Task[None]] = set()

    def hear(self, frame: AudioFrame) -> None:
        raise NotImplementedError

    async def play(self, track: MediaStreamTrack) -> None:
        """Hear ``track``'s frames until it ends."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, AudioFrame):
                self.hear(frame)

    def listen_to(self, pc: RTCPeerConnection) -> None:
        """Play each remote track of ``pc`` as it comes (call before the remote description)."""

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._players.add(asyncio.ensure_future(self.play(track)))

    async def stop(self) -> None:
        """Stop playing (after the peer connection closed)."""
        for task in self._players:
            task.cancel()
        await asyncio.gather(*self._players, return_exceptions=True)


async def make_offer(pc: RTCPeerConnection) -> dict[str, str]:
    """``pc``'s offer (ICE gathered), as the page sends it."""
    await pc.setLocalDescription(await pc.createOffer())
    return {"sdp": pc.localDescription.sdp, "type": "offer"}


async def accept_answer(pc: RTCPeerConnection, answer: dict[str, Any]) -> None:
    """Set the server's answer (``sdp``, ``type``) as ``pc``'s remote description."""
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))


async def post_offer(pc: RTCPeerConnection, base_url: str) -> dict[str, Any]:
    """Place a browser call: post ``pc``'s offer to ``/webrtc/offer``; the server's answer (with the
    ``call_id``), not yet set on ``pc`` (see :func:`accept_answer`).

    Raises:
        RuntimeError: the server refused the offer.
    """
    offer = await make_offer(pc)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        response = await http.post("/webrtc/offer", json=offer)
    if response.status_code != 200:
        raise RuntimeError(f"offer refused: {response.status_code} {response.text[:200]}")
    answer: dict[str, Any] = response.json()
    return answer
