"""Calls from the browser over WebRTC: an aiortc peer plays the browser against the real server
(real models, the same call session as phone calls). The caller's audio is espeak-ng speech; after
it the caller's side sends no packets at all (DTX), and the turn still ends on wall-clock time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiortc import RTCPeerConnection
from av import AudioFrame

from telephony import webrtc_peer
from telephony.webrtc_peer import FRAME, RATE, AudioSink, accept_answer, post_offer, rms
from telephony.webrtc_peer import speech48k as speech
from tests.support import LiveServer, live_server


class Microphone(webrtc_peer.Microphone):
    """The browser's microphone: silence until told to say something, then the speech, then (DTX)
    no packets at all, as a browser sends nothing in silence."""

    def __init__(self) -> None:
        super().__init__()
        self.silent_after_speech = True
        self._never = asyncio.Event()
        self._hold_until = 0.0

    def hold(self, seconds: float) -> None:
        """Send no packets for ``seconds`` (a loss burst); the stream's clock goes on."""
        self._hold_until = time.monotonic() + seconds

    async def next_chunk(self) -> np.ndarray:
        if self.said.is_set() and self.silent_after_speech:
            await self._never.wait()  # DTX: nothing more is sent
        hold = self._hold_until - time.monotonic()
        if hold > 0:
            await asyncio.sleep(hold)  # packets lost: nothing goes out meanwhile
            self._pts += round(hold * RATE) // FRAME * FRAME
        return await super().next_chunk()


class Speaker(AudioSink):
    """The browser's speaker: when the bot's audio was loud, and how much of it came."""

    def __init__(self) -> None:
        super().__init__()
        self.voiced_ms = 0.0
        self.last_voiced: float | None = None
        self.frames = 0

    def hear(self, frame: AudioFrame) -> None:
        self.frames += 1
        if rms(frame.to_ndarray()) > 300:
            self.voiced_ms += frame.samples / frame.sample_rate * 1000
            self.last_voiced = time.monotonic()

    def quiet_for(self, seconds: float) -> bool:
        return self.last_voiced is not None and time.monotonic() - self.last_voiced >= seconds


async def until(what: str, check: Any, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not (await check() if asyncio.iscoroutinefunction(check) else check()):
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        await live.services.speech.start()
        yield live


async def call(server: LiveServer) -> tuple[RTCPeerConnection, Microphone, Speaker, Any, str]:
    pc = RTCPeerConnection()
    mic, speaker = Microphone(), Speaker()
    pc.addTrack(mic)
    keys = pc.createDataChannel("keys")
    keys.captions = []  # type: ignore[attr-defined]

    @keys.on("message")
    def on_message(message: str) -> None:
        keys.captions.append(json.loads(message) if message.startswith("{") else message)  # type: ignore[attr-defined]

    speaker.listen_to(pc)
    answer = await post_offer(pc, server.base_url)
    await accept_answer(pc, answer)
    return pc, mic, speaker, keys, answer["call_id"]


async def test_a_browser_call_is_greeted_answers_a_question_after_dtx_silence_and_hangs_up_cleanly(
    server: LiveServer,
) -> None:
    pool = server.services.pool
    pc, mic, speaker, keys, call_id = await call(server)
    try:
        await until("the greeting was heard", lambda: speaker.voiced_ms > 1000 and speaker.quiet_for(0.8))
        greeted_ms = speaker.voiced_ms
        mic.say(speech("what are your opening hours"))
        await until("the caller finished speaking", lambda: mic.said.is_set(), 15)
        # From here the browser sends no packets at all; the turn must still end and be answered.

        async def answered() -> bool:
            rows = await pool.fetch(
                """SELECT m.sender, m.body FROM messages m JOIN calls c ON c.conversation_id = m.conversation_id
                   WHERE c.call_sid = $1 ORDER BY m.seq""",
                call_id,
            )
            senders = [r["sender"] for r in rows]
            return (
                "customer" in senders
                and senders[-1] == "bot"
                and senders.index("customer") < len(senders) - 1
            )

        await until("the question was answered", answered, 30)
        await until("the answer was heard", lambda: speaker.voiced_ms > greeted_ms + 800, 20)
        rows = await pool.fetch(
            """SELECT m.sender, m.body FROM messages m JOIN calls c ON c.conversation_id = m.conversation_id
               WHERE c.call_sid = $1 ORDER BY m.seq""",
            call_id,
        )
        said = " ".join(r["body"].lower() for r in rows if r["sender"] == "customer")
        assert any(word in said for word in ("hour", "open", "time")), said
        row = await pool.fetchrow(
            "SELECT called, stream_sid, ended_at FROM calls WHERE call_sid = $1", call_id
        )
        assert row["called"] == "webrtc" and row["stream_sid"] == "webrtc" and row["ended_at"] is None
        assert len(server.services.active_calls) == 1
        # live captions of both sides came over the data channel, as stored
        captions = keys.captions
        assert {"caption": "assistant", "text": rows[0]["body"]} in captions  # the greeting
        assert any(
            c["caption"] == "you" and c["text"] == rows[1]["body"] for c in captions if isinstance(c, dict)
        )

        keys.send("hangup")  # the page's hang-up button

        async def ended() -> bool:
            return (
                await pool.fetchval("SELECT end_reason FROM calls WHERE call_sid = $1", call_id) == "hangup"
            )

        await until("the call ended in the store", ended, 10)
        await until("the session was closed", lambda: not server.services.active_calls, 10)
    finally:
        await pc.close()


async def test_talking_over_the_bot_in_a_browser_call_silences_it_and_a_loss_burst_does_not_wedge_the_call(
    server: LiveServer,
) -> None:
    pc, mic, speaker, keys, call_id = await call(server)
    try:
        await until("the greeting started", lambda: speaker.voiced_ms > 300)
        (session,) = [s for s in server.services.active_calls if s.call_sid == call_id]
        # the caller talks over the greeting, with 400 ms of packets lost in the middle
        words = speech("stop, I want to talk to a person")
        half = words.size // 2
        mic.silent_after_speech = False
        mic.say(words[:half])
        await until("the first half was sent", lambda: mic.said.is_set(), 10)
        mic.said.clear()
        mic.hold(0.4)  # a loss burst: no packets at all
        mic.say(words[half:])
        await until("the bot paused or yielded", lambda: session.stats.pauses > 0, 5)
        paused_at = time.monotonic()
        await until("the bot went quiet for the caller", lambda: speaker.quiet_for(0.5), 5)
        assert speaker.last_voiced is not None and speaker.last_voiced - paused_at < 0.6
        await until("the caller was heard as a turn", lambda: session.stats.interruptions > 0, 10)

        async def heard() -> bool:
            rows = await server.services.pool.fetch(
                """SELECT m.sender FROM messages m JOIN calls c ON c.conversation_id = m.conversation_id
                   WHERE c.call_sid = $1 ORDER BY m.seq""",
                call_id,
            )
            return "customer" in [r["sender"] for r in rows]

        await until("the interruption reached the core", heard, 20)
    finally:
        await pc.close()
