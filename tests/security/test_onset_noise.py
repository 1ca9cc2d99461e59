"""Noise on the caller's line while the bot speaks: music, a keyboard, or someone playing sounds on
purpose. A sound Silero scores 0.35 or more pauses the bot at once (``voice.vad.ONSET_CONFIDENCE``:
a barge-in must silence the bot within a few hundred ms), so such noise pauses it more often.

Who may do it: anyone on the call (it only affects that call). What holds: a pause is never an
interruption by itself; every sound that does not become speech resumes the reply where it paused,
nothing is stored as a caller turn, and the reply is not flagged interrupted, however many times.
"""

from __future__ import annotations

import secrets

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
from voice.call_session import CallSession, CallState


async def test_a_thousand_noise_onsets_pause_the_bot_but_never_cut_its_reply() -> None:
    conv, detector, line = FakeConversation(), ScriptedDetector(), FakeLine(echo=False)
    session = CallSession(
        call_sid="CA" + secrets.token_hex(16),
        caller="+15550001111",
        conversation=conv,
        line=line,
        detector=detector,
        stt=FakeSTT(),
        tts=FakeTTS(),
        resample_8k_to_16k=to_16k,
        config=config(),
    )
    line.session = session
    await session.start()
    try:
        await wait_until(lambda: session.state == CallState.SPEAKING, "the greeting is playing")
        for _ in range(1000):
            detector.queue(DetectorEvent("speech_onset"))
            await session.on_audio(FRAME)
            assert session.paused  # silent at once, as for a real barge-in
            detector.queue(DetectorEvent("onset_lost"))
            await session.on_audio(FRAME)
            assert not session.paused  # ...and on again when it was not speech

        assert session.stats.pauses == 1000 and session.stats.resumes == 1000
        assert session.stats.interruptions == 0
        assert session.state == CallState.SPEAKING
        line.echo = True  # from now on the caller's side plays everything: the greeting is heard out
        line.play()
        await wait_until(lambda: session.state == CallState.LISTENING, "the greeting finished")
        assert conv.interrupted == [] and conv.calls == []  # nothing cut, no turn made of noise
    finally:
        await session.close("test")
