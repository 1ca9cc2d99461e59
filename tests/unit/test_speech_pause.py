"""A short quiet inside a turn is reported (``SpeechPaused``) before the VAD confirms a stop, so the
call can start transcribing sooner; voice coming back is reported too (``SpeechResumed``)."""

from __future__ import annotations

import numpy as np
from pipecat.audio.vad.vad_analyzer import VADParams, VADState

from voice.turns import (
    FRAME_SAMPLES,
    SpeechDetector,
    SpeechOnset,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TurnEnded,
    TurnEvent,
)


class LoudnessVAD:
    """A VAD that calls every loud 20 ms frame speech at once and stops after ``stop_secs``."""

    def __init__(self, params: VADParams) -> None:
        self.stop_frames = round(params.stop_secs * 50)
        self.state = VADState.QUIET
        self.quiet = 0
        self.onset_voiced = False

    def analyze(self, frame: bytes) -> VADState:
        loud = float(np.abs(np.frombuffer(frame, dtype=np.int16)).mean()) > 1000
        self.onset_voiced = loud
        if loud:
            self.state, self.quiet = VADState.SPEAKING, 0
        elif self.state in (VADState.SPEAKING, VADState.STOPPING):
            self.quiet += 1
            self.state = VADState.QUIET if self.quiet >= self.stop_frames else VADState.STOPPING
        return self.state


class LoudnessModel:
    def analyzer(self, params: VADParams) -> LoudnessVAD:
        return LoudnessVAD(params)


class Complete:
    async def probability(self, audio16k: np.ndarray) -> float:
        return 0.9


def frames(ms: int, loud: bool) -> np.ndarray:
    return np.full(ms * FRAME_SAMPLES // 20, 3000 if loud else 0, dtype=np.int16)


async def run(detector: SpeechDetector, *parts: np.ndarray) -> list[TurnEvent]:
    events: list[TurnEvent] = []
    for part in parts:
        for at in range(0, part.size, FRAME_SAMPLES):
            events += await detector.feed(part[at : at + FRAME_SAMPLES])
    return [e for e in events if not isinstance(e, SpeechOnset)]


def detector(**kwargs: object) -> SpeechDetector:
    return SpeechDetector(vad=LoudnessModel(), smart_turn=Complete(), **kwargs)  # type: ignore[arg-type]


async def test_a_gap_shorter_than_the_vads_stop_is_a_pause_then_a_resume_not_a_stop() -> None:
    events = await run(
        detector(), frames(600, True), frames(140, False), frames(600, True), frames(600, False)
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "SpeechStarted", "SpeechPaused", "SpeechResumed", "SpeechPaused", "SpeechStopped", "TurnEnded",
    ]  # fmt: skip
    first_pause, second_pause = (e for e in events if isinstance(e, SpeechPaused))
    stop = next(e for e in events if isinstance(e, SpeechStopped))
    assert round(first_pause.at - 0.6, 2) == 0.1  # 100 ms after the last loud frame
    assert round(stop.at - second_pause.at, 2) == 0.1  # the stop is confirmed 100 ms later
    assert round(second_pause.duration, 2) == round(stop.duration, 2)  # the same stretch of speech


async def test_each_quiet_is_reported_once_and_the_turn_still_ends_as_before() -> None:
    events = await run(detector(), frames(400, True), frames(800, False))
    assert [type(e) for e in events] == [SpeechStarted, SpeechPaused, SpeechStopped, TurnEnded]
    (turn,) = (e for e in events if isinstance(e, TurnEnded))
    assert turn.reason == "smart_turn"


async def test_pause_after_none_reports_no_pauses() -> None:
    events = await run(detector(pause_after=None), frames(400, True), frames(140, False), frames(400, True),
                       frames(800, False))  # fmt: skip
    assert not [e for e in events if isinstance(e, SpeechPaused | SpeechResumed)]
    assert [type(e) for e in events] == [SpeechStarted, SpeechStopped, TurnEnded]


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    async def probability(self, audio16k: np.ndarray) -> float:
        self.calls += 1
        return 0.1  # "not finished": only the transcript can end this turn at the short pause


async def test_a_finished_transcript_in_before_the_short_pause_ends_the_turn_without_asking_smart_turn() -> (
    None
):
    model = Counting()
    d = SpeechDetector(vad=LoudnessModel(), smart_turn=model)  # type: ignore[arg-type]
    events = await run(d, frames(600, True), frames(200, False))
    assert isinstance(events[-1], SpeechStopped)  # the VAD confirmed the stop; the transcript is in
    d.transcript_complete()
    events = await run(d, frames(200, False))
    (turn,) = (e for e in events if isinstance(e, TurnEnded))
    assert turn.reason == "transcript" and round(turn.silence, 2) == 0.3
    assert model.calls == 0


async def test_without_a_transcript_smart_turn_is_asked_at_the_short_pause() -> None:
    model = Counting()
    d = SpeechDetector(vad=LoudnessModel(), smart_turn=model)  # type: ignore[arg-type]
    events = await run(d, frames(600, True), frames(1000, False))
    (turn,) = (e for e in events if isinstance(e, TurnEnded))
    assert turn.reason == "silence" and model.calls == 1  # asked once, said no: the long silence ended it
