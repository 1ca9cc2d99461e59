"""Pieces of the browser-agent tests: a Twilio caller driven step by step over the real media
stream, and an aiortc peer playing the agent's console softphone."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from typing import Any

import numpy as np
import websockets
from aiortc import RTCPeerConnection
from av import AudioFrame

from telephony.simulator import parse_stream_twiml, render_tts
from telephony.twilio_protocol import twilio_connected, twilio_mark, twilio_media, twilio_start, twilio_stop
from telephony.webrtc_peer import RATE, AudioSink, Microphone, accept_answer, make_offer, rms, speech48k
from tests.support import ACCOUNT_SID, LiveServer, sign
from voice.audio import resample, ulaw_to_pcm16

__all__ = [
    "RATE",
    "Headset",
    "Microphone",
    "TwilioCaller",
    "agent_peer",
    "answer_peer",
    "speech48k",
    "until",
    "voiced",
]

LOUD = 300.0  # RMS of a voiced 20 ms frame
answer_peer = accept_answer  # the console sets the server's answer on its peer connection


def voiced(pcm: np.ndarray) -> bool:
    return rms(pcm) > LOUD


async def until(what: str, check: Any, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not (await check() if asyncio.iscoroutinefunction(check) else check()):
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.05)  # polls a condition of the running call


class TwilioCaller:
    """A phone caller as Twilio streams it: 20 ms mu-law frames at real time (silence unless told
    to say something), marks echoed once the audio before them has played, the bot's audio kept
    with its arrival time."""

    STREAM = "MZ" + "d" * 32

    def __init__(self, server: LiveServer, caller: str) -> None:
        self.server = server
        self.caller = caller
        self.call_sid = "CA" + secrets.token_hex(16)
        self.ws: Any = None
        self.heard: list[tuple[float, np.ndarray]] = []  # (arrival, 8 kHz pcm) of the bot's/agent's audio
        self._say = bytearray()
        self._marks: list[tuple[float, str]] = []
        self._played_until = 0.0
        self._seq = 1
        self._tasks: list[asyncio.Task[None]] = []

    async def dial(self) -> None:
        form = {
            "CallSid": self.call_sid,
            "AccountSid": ACCOUNT_SID,
            "From": self.caller,
            "To": "+15550009999",
        }
        url = self.server.base_url + "/twilio/voice"
        answer = await self.server.http.post(
            "/twilio/voice", data=form, headers={"X-Twilio-Signature": sign(url, form)}
        )
        assert answer.status_code == 200, answer.text
        parameters = parse_stream_twiml(answer.text).parameters
        ws_url = self.server.base_url.replace("http://", "ws://") + "/twilio/media"
        self.ws = await websockets.connect(
            ws_url, additional_headers={"X-Twilio-Signature": sign(ws_url, {})}
        )
        await self.ws.send(twilio_connected())
        await self.ws.send(twilio_start(self.STREAM, self.call_sid, ACCOUNT_SID, parameters))
        self._tasks = [asyncio.create_task(self._send_loop()), asyncio.create_task(self._receive_loop())]

    def say(self, text: str) -> None:
        self._say += render_tts(text)

    @property
    def saying(self) -> bool:
        return bool(self._say)

    def voiced_ms(self, since: float = 0.0) -> float:
        return sum(20.0 for at, pcm in self.heard if at >= since and voiced(pcm))

    def quiet_for(self, seconds: float) -> bool:
        last = max((at for at, pcm in self.heard if voiced(pcm)), default=None)
        return last is not None and time.monotonic() - last >= seconds

    async def _send_loop(self) -> None:
        started, n = time.monotonic(), 0
        while True:
            n += 1
            wait = started + n * 0.02 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # real-time pacing, as Twilio sends
            chunk = bytes(self._say[:160])
            del self._say[:160]
            chunk += b"\xff" * (160 - len(chunk))
            self._seq += 1
            await self.ws.send(twilio_media(self.STREAM, self._seq, n, n * 20, chunk))
            now = time.monotonic()
            while self._marks and self._marks[0][0] <= now:
                self._seq += 1
                await self.ws.send(twilio_mark(self.STREAM, self._seq, self._marks.pop(0)[1]))

    async def _receive_loop(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            now = time.monotonic()
            if message["event"] == "media":
                ulaw = base64.b64decode(message["media"]["payload"])
                self._played_until = max(self._played_until, now) + len(ulaw) / 8000
                pcm = ulaw_to_pcm16(ulaw)
                for i in range(0, len(pcm), 160):
                    self.heard.append((now, pcm[i : i + 160]))
            elif message["event"] == "mark":
                self._marks.append((max(self._played_until, now), message["mark"]["name"]))
            elif message["event"] == "clear":
                self._played_until = now  # what was queued is dropped; its marks come back now
                self._marks = [(now, name) for _, name in self._marks]

    async def hang_up(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ws is not None:
            try:
                with contextlib.suppress(websockets.ConnectionClosed):  # the server ended the call first
                    await self.ws.send(twilio_stop(self.STREAM, self._seq + 1, ACCOUNT_SID, self.call_sid))
            finally:
                await self.ws.close()


class Headset(AudioSink):
    """The agent's speaker: every frame heard, with its arrival time, as 16 kHz mono."""

    def __init__(self) -> None:
        super().__init__()
        self.heard: list[tuple[float, np.ndarray]] = []

    def hear(self, frame: AudioFrame) -> None:
        pcm = frame.to_ndarray().reshape(-1).astype(np.int16)
        layout = len(frame.layout.channels)
        mono = pcm.reshape(-1, layout)[:, 0] if layout > 1 else pcm
        self.heard.append((time.monotonic(), resample(mono, frame.sample_rate, 16000)))

    def voiced_ms(self, since: float = 0.0, until_: float | None = None) -> float:
        return sum(
            20.0 for at, pcm in self.heard if at >= since and (until_ is None or at < until_) and voiced(pcm)
        )

    def utterances(self, since: float = 0.0, until_: float | None = None) -> list[np.ndarray]:
        """What was heard in the span, split at pauses of 120 ms (one transcription each)."""
        out: list[np.ndarray] = []
        current: list[np.ndarray] = []
        quiet = 0
        for at, pcm in self.heard:
            if at < since or (until_ is not None and at >= until_):
                continue
            if np.abs(pcm).max(initial=0) > 100:
                current.append(pcm)
                quiet = 0
            elif current:
                quiet += 1
                if quiet >= 6:
                    out.append(np.concatenate(current))
                    current, quiet = [], 0
        if current:
            out.append(np.concatenate(current))
        return out


async def agent_peer() -> tuple[RTCPeerConnection, Microphone, Headset, dict[str, str]]:
    """An agent console's peer connection and its offer (ICE gathered)."""
    pc = RTCPeerConnection()
    mic, headset = Microphone(), Headset()
    pc.addTrack(mic)
    headset.listen_to(pc)
    return pc, mic, headset, await make_offer(pc)
