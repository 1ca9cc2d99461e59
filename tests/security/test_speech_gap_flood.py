"""A caller who leaves a short gap after every word (or plays audio cut that way) to make the call
transcribe over and over: each 0.1 s quiet starts a speculative transcription, so the attack is to
pile them up on the process's one Whisper worker and starve every other call.

Who may do it: anyone who can phone the number. What holds: a call has at most one speculative
transcription running at a time (voice coming back cancels the one not yet started), so 200 gaps
cost what one long sentence does, and the turn still gets the transcript of its last stretch.
"""

from __future__ import annotations

import asyncio
import secrets

import numpy as np

from tests.unit.test_call_session import (
    FRAME,
    FakeConversation,
    FakeLine,
    FakeSTT,
    FakeTTS,
    ScriptedDetector,
    config,
    to_16k,
    wait_until,
)
from voice.call_ports import DetectorEvent
from voice.call_session import CallSession


class CountingSTT(FakeSTT):
    """A slow transcriber that counts how many transcriptions run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0
        self.started = 0

    async def transcribe(self, pcm16_16k: np.ndarray) -> str:
        self.started += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.02)  # simulated model time, so the gaps overtake it
            return f"part {len(pcm16_16k)}"
        finally:
            self.running -= 1


async def test_a_gap_after_every_word_never_runs_more_than_one_transcription_at_a_time() -> None:
    stt, conv = CountingSTT(), FakeConversation()
    detector = ScriptedDetector()
    line = FakeLine(echo=True)
    session = CallSession(
        call_sid="CA" + secrets.token_hex(16),
        caller="+15550001111",
        conversation=conv,
        line=line,
        detector=detector,
        stt=stt,
        tts=FakeTTS(),
        resample_8k_to_16k=to_16k,
        config=config(),
    )
    line.session = session
    await session.start()
    try:
        detector.queue(DetectorEvent("speech_started"))
        await session.on_audio(FRAME)
        for k in range(200):  # 200 words, each followed by a 0.1-0.2 s gap
            audio = np.zeros(1600 * (k + 1), dtype=np.int16)
            detector.queue(DetectorEvent("speech_paused", audio=audio, speech_ms=300.0 * (k + 1)))
            await session.on_audio(FRAME)
            if k % 3 == 0:
                await asyncio.sleep(0.005)  # some transcriptions get going before the voice is back
            detector.queue(DetectorEvent("speech_resumed"))
            await session.on_audio(FRAME)
        last = np.zeros(1600 * 201, dtype=np.int16)
        detector.queue(DetectorEvent("speech_paused", audio=last, speech_ms=60_000.0))
        await session.on_audio(FRAME)
        detector.queue(DetectorEvent("speech_stopped", audio=last, speech_ms=60_000.0))
        await session.on_audio(FRAME)
        detector.queue(DetectorEvent("end_of_turn", audio=last, speech_ms=60_000.0))
        await session.on_audio(FRAME)
        await wait_until(lambda: conv.calls != [], "the turn reached the core")

        assert stt.most == 1  # never two at once for this call
        assert stt.started < 200  # most were cancelled before they started
        assert [c.text for c in conv.calls] == [f"part {last.size}"]  # the last stretch's transcript
    finally:
        await session.close("test")
