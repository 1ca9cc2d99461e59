"""The embedded speech models on real audio: Whisper STT, the Piper server, Silero VAD + smart-turn.

Caller audio is rendered by espeak-ng (as a caller simulator would) and resampled to 16 kHz.
Turn timing is asserted in audio time (frames fed), never on the wall clock.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import wave
from pathlib import Path

import numpy as np
import psutil
import pytest
import soxr

from voice.piper_server import PiperServer, PiperStartError
from voice.sentences import split_sentences
from voice.spoken_text import sounds_finished
from voice.stt import Transcript, WhisperSTT, shared_whisper
from voice.tts import PiperTTS, TTSUnavailable, prefetched
from voice.turns import (
    OnsetLost,
    SpeechDetector,
    SpeechOnset,
    SpeechStarted,
    SpeechStopped,
    TurnEnded,
    TurnEvent,
)

RATE = 16000


def espeak_16k(text: str, folder: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng (en-us, 160 wpm), as 16 kHz int16 mono."""
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is needed to render caller audio: apt-get install espeak-ng"
    path = folder / "speech.wav"
    subprocess.run([espeak, "-v", "en-us", "-s", "160", "-w", str(path), text], check=True, timeout=30)
    with wave.open(str(path), "rb") as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    resampled = soxr.resample(samples.astype(np.float32) / 32768.0, rate, RATE)
    return np.clip(np.round(resampled * 32767.0), -32768, 32767).astype(np.int16)


def speech_bounds(audio: np.ndarray) -> tuple[float, float]:
    """First and last audible sample, in seconds."""
    loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > 300)
    return loud[0] / RATE, (loud[-1] + 1) / RATE


def padded(speech: np.ndarray, before: float = 1.0, after: float = 1.5) -> np.ndarray:
    return np.concatenate(
        [np.zeros(int(before * RATE), np.int16), speech, np.zeros(int(after * RATE), np.int16)]
    )


async def run_detector(detector: SpeechDetector, audio: np.ndarray) -> list[TurnEvent]:
    """Feed ``audio`` in 20 ms frames, as a media stream would, and collect the events."""
    events: list[TurnEvent] = []
    for start in range(0, len(audio), 320):
        events.extend(await detector.feed(audio[start : start + 320].tobytes()))
    return events


class FixedTurnModel:
    """An end-of-turn model with a fixed opinion (or a failure), counting its calls."""

    def __init__(self, probability: float | None) -> None:
        self.value = probability
        self.calls = 0

    async def probability(self, audio16k: np.ndarray) -> float:
        self.calls += 1
        if self.value is None:
            raise RuntimeError("model exploded")
        return self.value


@pytest.fixture(scope="module")
def refund_speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return espeak_16k("I want a refund for my order", tmp_path_factory.mktemp("refund"))


@pytest.fixture(scope="module")
def digits_speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return espeak_16k("my order is four five one seven", tmp_path_factory.mktemp("digits"))


# --- Whisper ----------------------------------------------------------------------------------


async def test_whisper_transcribes_a_spoken_refund_request(refund_speech: np.ndarray) -> None:
    stt = shared_whisper()
    assert shared_whisper() is stt
    await stt.load()
    transcript = await stt.transcribe(refund_speech)
    text = transcript.text.lower()
    assert "refund" in text and "order" in text, transcript
    assert transcript.seconds == pytest.approx(len(refund_speech) / RATE)
    assert transcript.language_probability is not None and transcript.language_probability > 0.5
    # The same audio as little-endian PCM bytes, with a prompt, gives the same words.
    again = await stt.transcribe(refund_speech.tobytes(), prompt="Orders, refunds and returns.")
    assert "refund" in again.text.lower()


async def test_the_short_window_and_the_30_second_window_hear_the_same_request(
    refund_speech: np.ndarray,
) -> None:
    short = shared_whisper()
    full = WhisperSTT(short_window=False)
    full._model = short._model_sync()  # the same weights; only the encoder window differs
    try:
        a, b = await short.transcribe(refund_speech), await full.transcribe(refund_speech)
    finally:
        full.close()
    words = lambda t: {w.strip(".,?!").lower() for w in t.split()}  # noqa: E731
    assert {"refund", "order"} <= words(a.text) & words(b.text), (a.text, b.text)
    silence = np.zeros(RATE * 2, dtype=np.int16)
    assert (await short.transcribe(silence)).text == ""


async def test_whisper_calls_from_several_conversations_queue_on_one_model(refund_speech: np.ndarray) -> None:
    stt = shared_whisper()
    results = await asyncio.gather(*(stt.transcribe(refund_speech) for _ in range(3)))
    assert all("refund" in r.text.lower() for r in results)


async def test_very_short_audio_gives_empty_text_without_touching_the_model() -> None:
    # A model folder that does not exist: loading it would fail, so an answer proves it was not used.
    stt = WhisperSTT("/nonexistent/whisper-model")
    try:
        transcript = await stt.transcribe(np.zeros(int(0.15 * RATE), np.int16))
        assert transcript == Transcript(text="", seconds=0.15)
        assert (await stt.transcribe(b"")).text == ""
    finally:
        stt.close()


# --- Piper ------------------------------------------------------------------------------------


def children_running_piper() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "piper.http_server" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


async def test_piper_server_synthesizes_restarts_after_a_crash_and_stops_without_orphans() -> None:
    server = PiperServer(restart_backoff=0.1)
    await server.start()
    tts = PiperTTS(lambda: server.base_url)
    pids: list[int] = []
    try:
        assert server.pid is not None
        pids.append(server.pid)

        speech = await tts.synthesize("Your refund of $89.00 is on its way.")
        assert speech.pcm16.dtype == np.int16 and speech.sample_rate == 22050
        assert 1.0 < speech.seconds < 6.0
        assert np.abs(speech.pcm16.astype(np.int32)).max() > 1000  # audible, not silence

        text = "Hello Mr. Smith. Your order 4517 shipped today!"
        sentences = [s async for s in prefetched(split_sentences(text), tts.synthesize)]
        assert [s.text for s in sentences] == ["Hello Mr. Smith.", "Your order 4517 shipped today!"]
        assert all(s.seconds > 0.5 for s in sentences)

        os.kill(pids[0], signal.SIGKILL)
        for _ in range(600):  # the restart takes a few seconds: Piper loads its voice again
            if server.ready and server.pid not in (None, pids[0]):
                break
            await asyncio.sleep(0.05)
        assert server.ready and server.restarts == 1
        assert server.pid is not None and server.pid != pids[0]
        pids.append(server.pid)
        assert (await tts.synthesize("Welcome back.")).seconds > 0.3
    finally:
        await server.stop()
        await tts.aclose()
    assert children_running_piper() == []
    assert not any(psutil.pid_exists(pid) for pid in pids)

    stopped = PiperTTS(f"http://127.0.0.1:{server.base_url.rsplit(':', 1)[1]}", attempts=1)
    try:
        with pytest.raises(TTSUnavailable) as caught:
            await stopped.synthesize("Anyone there?")
        assert caught.value.retryable
    finally:
        await stopped.aclose()


async def test_piper_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an onnx model")
    server = PiperServer(model_path=broken, start_timeout=60)
    with pytest.raises(PiperStartError) as caught:
        await server.start()
    message = str(caught.value)
    assert "exited with code" in message and "its output ended with" in message
    assert len(message.splitlines()) > 2  # the child's own error lines are included
    assert children_running_piper() == []


async def test_cancelling_a_starting_piper_server_leaves_no_process() -> None:
    server = PiperServer()
    starting = asyncio.create_task(server.start())
    for _ in range(100):
        await asyncio.sleep(0.02)
        if children_running_piper():
            break
    assert children_running_piper(), "the server process should be starting"
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert children_running_piper() == []
    await server.stop()  # stopping a server that never started is fine


# --- Speech detection and turn ends -----------------------------------------------------------


async def test_a_spoken_request_is_one_turn_ending_within_a_second_of_the_speech(
    refund_speech: np.ndarray,
) -> None:
    audio = padded(refund_speech)
    speech_start, speech_end = speech_bounds(audio)
    events = await run_detector(SpeechDetector(), audio)

    starts = [e for e in events if isinstance(e, SpeechStarted)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    ends = [e for e in events if isinstance(e, TurnEnded)]
    assert len(starts) == 1 and len(stops) == 1 and len(ends) == 1, events
    assert events.index(stops[0]) < events.index(ends[0])
    assert speech_start < starts[0].at < speech_start + 0.6
    turn = ends[0]
    assert speech_end < turn.at <= speech_end + 1.0
    # The turn's audio holds the whole utterance: pre-roll before it, a short tail after.
    assert len(turn.audio) / RATE >= speech_end - speech_start
    assert len(turn.audio) / RATE <= speech_end - speech_start + 1.0
    first_loud, _ = speech_bounds(turn.audio)
    assert first_loud >= 0.1  # some quiet pre-roll before the first word

    transcript = await shared_whisper().transcribe(turn.audio)
    assert "refund" in transcript.text.lower()


async def test_a_sentence_ending_in_digits_still_ends_by_the_long_silence_rule(
    digits_speech: np.ndarray,
) -> None:
    audio = padded(digits_speech)
    _, speech_end = speech_bounds(audio)
    detector = SpeechDetector(short_silence=0.3, long_silence=0.8)
    events = await run_detector(detector, audio)

    ends = [e for e in events if isinstance(e, TurnEnded)]
    assert len(ends) == 1 and len([e for e in events if isinstance(e, SpeechStarted)]) == 1, events
    turn = ends[0]
    # smart-turn hears "... one seven" as unfinished; the silence rule ends the turn anyway.
    assert turn.reason == "silence"
    assert turn.probability is not None and turn.probability < 0.5
    assert 0.8 <= turn.silence < 0.9
    assert speech_end < turn.at <= speech_end + 1.0


@pytest.mark.parametrize(
    "transcript",
    # what Whisper wrote for "my order is four five one seven" on different CPUs
    ["My order is 4517.", "My order is 4517", "My order is 451 7", "My order is 45 17"],
)
async def test_a_finished_transcript_ends_a_digits_sentence_at_the_short_pause(
    digits_speech: np.ndarray, transcript: str
) -> None:
    audio = padded(digits_speech)
    # smart-turn's opinion fixed at "unfinished": the rule under test is the transcript's.
    detector = SpeechDetector(short_silence=0.3, long_silence=0.8, smart_turn=FixedTurnModel(0.0))
    events: list[TurnEvent] = []
    for start in range(0, len(audio), 320):
        new = await detector.feed(audio[start : start + 320].tobytes())
        events.extend(new)
        if any(isinstance(e, SpeechStopped) for e in new) and sounds_finished(transcript):
            detector.transcript_complete()  # what the call does when the speculative transcript is back
    (turn,) = [e for e in events if isinstance(e, TurnEnded)]
    assert turn.reason == "transcript"
    assert turn.silence == pytest.approx(0.3, abs=0.021)


_NUMBER_WORDS = {"four": "4", "five": "5", "one": "1", "seven": "7", "for": "4", "to": "", "the": ""}


async def test_whisper_hears_a_spoken_order_number_as_a_finished_sentence(digits_speech: np.ndarray) -> None:
    # Whisper's exact spelling of the digits varies by CPU ("4517", "451 7", "four five one seven"):
    # assert what holds for all of them.
    text = (await shared_whisper().transcribe(digits_speech)).text
    words = text.lower().replace("-", " ").split()
    digits = "".join(_NUMBER_WORDS.get(w.strip(",.?!"), w) for w in words)
    assert "4517" in "".join(ch for ch in digits if ch.isdigit()), text
    assert "order" in text.lower(), text
    assert sounds_finished(text), text


@pytest.mark.parametrize(
    ("opinion", "reason", "silence"),
    [(1.0, "smart_turn", 0.3), (0.0, "silence", 0.8), (None, "silence", 0.8)],
    ids=["complete", "incomplete", "model-fails"],
)
async def test_turn_ends_at_short_silence_only_when_the_model_says_complete(
    refund_speech: np.ndarray, opinion: float | None, reason: str, silence: float
) -> None:
    model = FixedTurnModel(opinion)
    events = await run_detector(SpeechDetector(smart_turn=model), padded(refund_speech))
    (turn,) = [e for e in events if isinstance(e, TurnEnded)]
    assert turn.reason == reason
    assert turn.silence == pytest.approx(silence, abs=0.021)
    assert model.calls == 1  # asked once per pause


async def test_speech_resuming_within_the_pause_continues_the_same_turn(refund_speech: np.ndarray) -> None:
    start, end = speech_bounds(refund_speech)
    words = refund_speech[int(start * RATE) : int(end * RATE)]
    pause = np.zeros(int(0.5 * RATE), np.int16)  # longer than short_silence, shorter than long_silence
    audio = padded(np.concatenate([words, pause, words]))
    detector = SpeechDetector(smart_turn=FixedTurnModel(0.0))
    events = await run_detector(detector, audio)

    kinds = [type(e).__name__ for e in events if not isinstance(e, SpeechOnset)]
    assert kinds == ["SpeechStarted", "SpeechStopped", "SpeechStarted", "SpeechStopped", "TurnEnded"]
    turn = events[-1]
    assert isinstance(turn, TurnEnded)
    assert len(turn.audio) / RATE > 2 * len(words) / RATE + 0.5
    assert not detector.in_turn and len(detector.utterance()) == 0


async def test_silence_alone_never_starts_a_turn() -> None:
    detector = SpeechDetector(smart_turn=FixedTurnModel(1.0))
    assert await run_detector(detector, np.zeros(3 * RATE, np.int16)) == []
    assert detector.now == pytest.approx(3.0)


async def test_the_first_voiced_sound_is_reported_before_the_vad_confirms_speech(
    refund_speech: np.ndarray,
) -> None:
    audio = padded(refund_speech)
    speech_start, _ = speech_bounds(audio)
    events = await run_detector(SpeechDetector(smart_turn=FixedTurnModel(1.0)), audio)

    onsets = [e for e in events if isinstance(e, SpeechOnset)]
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert onsets and starts
    assert events.index(onsets[0]) < events.index(starts[0])
    # Early enough to silence the bot within 300 ms of the caller's first sound.
    assert speech_start <= onsets[0].at < speech_start + 0.3
    assert onsets[0].at < starts[0].at
    assert not [e for e in events if isinstance(e, OnsetLost)]


async def test_a_click_is_an_onset_that_is_lost_and_never_a_turn() -> None:
    rng = np.random.default_rng(7)
    click = (rng.standard_normal(int(0.06 * RATE)) * 9000).astype(np.int16)
    events = await run_detector(SpeechDetector(smart_turn=FixedTurnModel(1.0)), padded(click))
    assert not [e for e in events if isinstance(e, (SpeechStarted, TurnEnded))]
    onsets = [e for e in events if isinstance(e, SpeechOnset)]
    lost = [e for e in events if isinstance(e, OnsetLost)]
    assert len(onsets) == len(lost)  # every onset (if the VAD heard one) is withdrawn


async def test_a_pause_after_a_thought_that_trails_off_is_not_the_end_of_the_turn(
    refund_speech: np.ndarray,
) -> None:
    start, end = speech_bounds(refund_speech)
    words = refund_speech[int(start * RATE) : int(end * RATE)]
    pause = np.zeros(int(1.0 * RATE), np.int16)  # longer than long_silence, under hold_silence
    audio = padded(np.concatenate([words, pause, words]), after=2.0)
    # smart-turn says "complete" at every pause: only the transcript's hint holds the turn.
    detector = SpeechDetector(smart_turn=FixedTurnModel(1.0), long_silence=0.8, hold_silence=1.2)
    events: list[TurnEvent] = []
    stops = 0
    for offset in range(0, len(audio), 320):
        new = await detector.feed(audio[offset : offset + 320].tobytes())
        events.extend(new)
        if any(isinstance(e, SpeechStopped) for e in new):
            stops += 1
            if stops == 1:
                detector.transcript_unfinished()  # "I want a refund for the..." (what the call does)
    ends = [e for e in events if isinstance(e, TurnEnded)]
    assert len(ends) == 1, [type(e).__name__ for e in events]
    assert len(ends[0].audio) / RATE > 2 * len(words) / RATE + 0.9  # both parts, one turn
    # After the second part (no hint) the fast path applies again.
    assert ends[0].reason == "smart_turn"


async def test_a_thought_that_trails_off_still_ends_after_the_hold_silence(refund_speech: np.ndarray) -> None:
    detector = SpeechDetector(smart_turn=FixedTurnModel(1.0), long_silence=0.8, hold_silence=1.2)
    events: list[TurnEvent] = []
    for offset in range(0, len(audio := padded(refund_speech, after=2.0)), 320):
        new = await detector.feed(audio[offset : offset + 320].tobytes())
        events.extend(new)
        if any(isinstance(e, SpeechStopped) for e in new):
            detector.transcript_unfinished()
    (turn,) = [e for e in events if isinstance(e, TurnEnded)]
    assert turn.reason == "silence"
    assert turn.silence == pytest.approx(1.2, abs=0.021)


async def test_a_caller_whose_audio_stops_arriving_after_speaking_still_gets_an_answer(
    refund_speech: np.ndarray,
) -> None:
    """Silence suppression: the client sends the words, then no frames at all (for 2 s). The turn
    must end on wall-clock time and the core must answer."""
    from tests.unit.test_call_session import FakeConversation, FakeLine, FakeSTT, FakeTTS, wait_until  # noqa: PLC0415
    from voice.audio import pcm16_to_ulaw, resample  # noqa: PLC0415
    from voice.call_session import CallSession  # noqa: PLC0415
    from voice.speech_stack import DetectorAdapter, Upsampler  # noqa: PLC0415

    line, stt, conv = FakeLine(echo=True), FakeSTT(), FakeConversation()
    stt.texts.extend(["I want a refund for my order."] * 2)  # speculative and final transcripts
    session = CallSession(
        call_sid="CA-dtx",
        caller=None,
        conversation=conv,
        line=line,
        detector=DetectorAdapter(SpeechDetector(smart_turn=FixedTurnModel(0.0))),
        stt=stt,
        tts=FakeTTS(),
        resample_8k_to_16k=Upsampler(),
    )
    line.session = session
    await session.start()
    await wait_until(lambda: session.state.value == "listening", "greeting heard", within=5.0)
    ulaw = pcm16_to_ulaw(resample(np.concatenate([np.zeros(8000, np.int16), refund_speech]), RATE, 8000))
    for offset in range(0, len(ulaw), 160):  # the words, in real time...
        await session.on_audio(ulaw[offset : offset + 160])
        await asyncio.sleep(0.02)
    # ...then nothing: no frames arrive. The answer must come anyway.
    await wait_until(
        lambda: [c.text for c in conv.calls] == ["I want a refund for my order."], "answered", within=2.0
    )
    await session.close("test_over")
