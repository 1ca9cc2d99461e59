"""A benchmark caller over WebRTC: what a browser on the ``/chat`` page does, played by aiortc.

It places a browser call (``POST /webrtc/offer``, Opus over loopback), hears the greeting, then says
each utterance of the script and measures voice to voice the way the Twilio simulator does, with
one difference forced by the transport: WebRTC sends audio frames all the time (silence too), so
the reply starts at the first received frame *with energy* (RMS over :data:`VOICED_RMS`), not at
the first packet. Rules, kept the same as the Twilio simulator's (telephony/simulated_call.py):

* the caller's audio is the same espeak-ng rendering (8 kHz mu-law, silence trimmed), decoded and
  resampled to 48 kHz; between utterances the microphone sends silence (no DTX), as the
  simulator sends mu-law silence;
* **latency** runs from the moment the frame holding the last of the utterance was handed to the
  encoder (it is sent right away) to the first voiced frame received after it, as it comes out of
  the caller's receive path, i.e. when a loudspeaker would get it. That path is chosen by
  ``receive``: ``"arrival"`` (the default) hands each packet to the Opus decoder as it arrives,
  with no jitter buffer, as the Twilio simulator takes each ``media`` as it arrives (neither
  simulated caller models a receive buffer, so the two transports are compared like for like);
  ``"aiortc"`` keeps aiortc's own jitter buffer, which holds a frame until four later ones came
  (80 ms). A browser has its own adaptive buffer (WebRTC's NetEq), whose delay
  ``benchmarks/browser_receive.py`` measures in Chromium;
* **at arrival** (``arrivals_ms``) runs to the moment the packet of that same frame reached the
  caller, before any buffer;
* the bot is **done** once it has started and nothing voiced arrived for ``BOT_DONE_SILENCE_S``;
  the caller then waits the utterance's ``pause_ms`` and speaks; a reply that does not start
  within ``idle_timeout_s`` is an error and the script goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket
from av import AudioFrame

from telephony.call_report import CallReport, TurnReport
from telephony.call_script import Utterance
from telephony.caller_audio import render_tts
from telephony.simulated_call import BOT_DONE_SILENCE_S
from telephony.webrtc import ArrivalOrder
from telephony.webrtc_peer import FRAME, RATE, AudioSink, Microphone, accept_answer, post_offer, rms
from voice.audio import resample, ulaw_to_pcm16

__all__ = [
    "FRAME",
    "RATE",
    "RECEIVE_PATHS",
    "VOICED_RMS",
    "ArrivalClock",
    "Microphone",
    "Speaker",
    "caller_speech",
    "clock_arrivals",
    "run_webrtc_call",
]

RECEIVE_PATHS = ("arrival", "aiortc")
VOICED_RMS = 100.0  # int16 RMS of a received frame that counts as bot audio (decoded silence is ~0)


class ArrivalClock:
    """Wraps the caller's receive jitter buffer to note when each frame's packet arrived.

    Decoded frames carry the RTP timestamp of their packet minus the first one's (aiortc's
    timestamp mapper), so a played frame's arrival is looked up by its ``pts``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._origin: int | None = None
        self._arrived: dict[int, float] = {}  # RTP timestamp -> arrival (monotonic)

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        self._arrived.setdefault(packet.timestamp, time.monotonic())
        if len(self._arrived) > 4096:  # only the recent past is ever looked up
            for old in list(self._arrived)[:2048]:
                del self._arrived[old]
        pli, frame = self._inner.add(packet)
        if frame is not None and self._origin is None:
            self._origin = frame.timestamp
        return pli, frame

    def arrival(self, pts: int | None) -> float | None:
        if pts is None or self._origin is None:
            return None
        return self._arrived.get((self._origin + pts) & 0xFFFFFFFF)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def clock_arrivals(pc: RTCPeerConnection, *, buffer: str = "aiortc") -> ArrivalClock | None:
    """Put an :class:`ArrivalClock` on ``pc``'s audio receiver (after the remote description is
    set), around aiortc's jitter buffer (``buffer="aiortc"``) or around closeloop's
    :class:`telephony.webrtc.ArrivalOrder`, which passes each packet on as it arrives
    (``"arrival"``); None when this aiortc keeps its jitter buffer elsewhere."""
    if buffer not in RECEIVE_PATHS:
        raise ValueError(f"buffer must be one of {RECEIVE_PATHS}, not {buffer!r}")
    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if transceiver.kind == "audio" and hasattr(receiver, "_RTCRtpReceiver__jitter_buffer"):
            inner = receiver._RTCRtpReceiver__jitter_buffer if buffer == "aiortc" else ArrivalOrder()
            clock = ArrivalClock(inner)
            receiver._RTCRtpReceiver__jitter_buffer = clock
            return clock
    return None


class Speaker(AudioSink):
    """The caller's speaker: when voiced bot audio arrived, and how much."""

    def __init__(self) -> None:
        super().__init__()
        self.voiced: list[float] = []  # when voiced frames came out of the receive path
        self.arrived: list[float | None] = []  # when their packets reached the caller
        self.voiced_ms = 0.0
        self.changed = asyncio.Event()
        self.clock: ArrivalClock | None = None

    def hear(self, frame: AudioFrame) -> None:
        if rms(frame.to_ndarray()) > VOICED_RMS:
            self.voiced.append(time.monotonic())
            self.arrived.append(self.clock.arrival(frame.pts) if self.clock is not None else None)
            self.voiced_ms += frame.samples / frame.sample_rate * 1000
            self.changed.set()

    def first_after(self, t: float) -> float | None:
        return next((v for v in self.voiced if v > t), None)

    def arrival_of(self, played: float) -> float | None:
        """When the packet of the voiced frame played at ``played`` reached the caller."""
        return next((a for v, a in zip(self.voiced, self.arrived, strict=True) if v == played), None)

    async def until_done(self, since: float, idle_timeout_s: float) -> float | None:
        """Wait for the reply to start after ``since`` and then finish; its first voiced frame's time."""
        deadline = since + idle_timeout_s
        while (first := self.first_after(since)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return None
        while (quiet := time.monotonic() - self.voiced[-1]) < BOT_DONE_SILENCE_S:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), BOT_DONE_SILENCE_S - quiet)
            except TimeoutError:
                pass  # quiet long enough (checked by the loop)
        return first


def caller_speech(text: str, cache_dir: Path | None) -> np.ndarray:
    """The simulator's rendering of ``text`` (8 kHz mu-law, trimmed) at 48 kHz."""
    return resample(ulaw_to_pcm16(render_tts(text, cache_dir=cache_dir)), 8000, RATE)


def _turn(
    index: int, said: str, start: float, end: float | None, first: float | None, t0: float
) -> TurnReport:
    def ms(t: float | None) -> float | None:
        return None if t is None else (t - t0) * 1000

    return TurnReport(
        index=index,
        said=said,
        barge_in=False,
        overlapped=False,
        caller_start_ms=ms(start) if index else None,
        caller_end_ms=ms(end),
        first_bot_audio_ms=ms(first),
        latency_ms=None if first is None or end is None else (first - end) * 1000,
        bot_audio_ms=0.0,
        bot_heard_ms=0.0,
        clear_received=False,
    )


async def run_webrtc_call(
    base_url: str,
    script: Sequence[Utterance],
    *,
    idle_timeout_s: float = 15.0,
    tts_cache_dir: Path | None = None,
    arrivals_ms: list[float] | None = None,
    receive: str = "arrival",
) -> CallReport:
    """One browser call to ``base_url`` saying ``script`` after the greeting; a :class:`CallReport`
    whose ``call_sid`` is the browser call's id (the address of its conversation).

    ``arrivals_ms``: when given, each answered turn's latency at arrival (to the packet of the
    reply's first voiced frame reaching the caller, before any buffer) is appended. ``receive``:
    the caller's receive path, ``"arrival"`` or ``"aiortc"`` (see the module docstring)."""
    speech = [caller_speech(u.text or "", tts_cache_dir) for u in script]
    pc = RTCPeerConnection()
    mic, speaker = Microphone(), Speaker()
    pc.addTrack(mic)
    keys = pc.createDataChannel("keys")
    speaker.listen_to(pc)
    errors: list[str] = []
    turns: list[TurnReport] = []
    t0 = time.monotonic()
    call_id = ""
    greeting = _turn(0, "", t0, None, None, t0)
    try:
        answer = await post_offer(pc, base_url)
        call_id = answer["call_id"]
        t0 = time.monotonic()
        await accept_answer(pc, answer)
        speaker.clock = clock_arrivals(pc, buffer=receive)
        if speaker.clock is None and receive == "arrival":
            raise RuntimeError("this aiortc keeps its jitter buffer elsewhere: use receive='aiortc'")
        first = await speaker.until_done(t0, idle_timeout_s + 15)  # connect + greeting
        greeting = _turn(0, "", t0, t0, first, t0)
        if first is None:
            errors.append("no greeting")
        for index, (utterance, pcm) in enumerate(zip(script, speech, strict=True), start=1):
            await asyncio.sleep(utterance.pause_ms / 1000)
            start = time.monotonic()
            mic.say(pcm)
            await mic.said.wait()
            end = mic.ended_at
            first = await speaker.until_done(end, idle_timeout_s)
            if first is None:
                errors.append(f"turn {index}: no reply within {idle_timeout_s:g} s")
            elif arrivals_ms is not None and (arrived := speaker.arrival_of(first)) is not None:
                arrivals_ms.append((arrived - end) * 1000)
            turns.append(_turn(index, utterance.text or "", start, end, first, t0))
        if keys.readyState == "open":
            keys.send("hangup")
    finally:
        await pc.close()
        await speaker.stop()
    return CallReport(
        call_sid=call_id,
        stream_sid="webrtc",
        stream_url=base_url + "/webrtc/offer",
        duration_ms=(time.monotonic() - t0) * 1000,
        ended_by="caller",
        greeting=greeting,
        turns=turns,
        marks_sent=[],
        marks_echoed=[],
        clears_received=0,
        violations=[],
        errors=errors,
        unspoken=len(script) - len(turns),
        bot_audio=b"",
    )
