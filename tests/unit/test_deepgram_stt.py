"""DeepgramTranscriber with the real ``deepgram-sdk`` client against a fake Deepgram live server
on 127.0.0.1 (tests/fakes/deepgram_server.py): synthetic caller audio (loud noise for speech,
mu-law silence between), scripted transcripts, and a small fake Whisper as the fallback."""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from tests.fakes.deepgram_server import FakeDeepgram
from voice.audio import pcm16_to_ulaw
from voice.call_ports import DetectorEvent, VoiceConfig
from voice.call_session import CallSession
from voice.deepgram_stt import DeepgramOptions, DeepgramTranscriber, deepgram_client

KEY = "dg-test-key-0123456789"
RNG = np.random.default_rng(7)


def speech(ms: int) -> bytes:
    """Loud noise as 8 kHz mu-law: the fake counts it as speech."""
    return pcm16_to_ulaw((RNG.standard_normal(8 * ms) * 4000).clip(-32000, 32000).astype(np.int16))


def silence(ms: int) -> bytes:
    return b"\xff" * (8 * ms)


def turn_audio(seconds: float) -> np.ndarray:
    """Stand-in for the detector's 16 kHz utterance audio (only its identity matters to Deepgram)."""
    return RNG.integers(-2000, 2000, int(16000 * seconds), dtype=np.int16)


class FakeWhisper:
    """The fallback: answers from the audio it is given, and records what it got."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def transcribe(self, pcm16_16k: np.ndarray) -> str:
        self.calls.append(pcm16_16k.size)
        return f"whisper heard {pcm16_16k.size} samples"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDeepgram]:
    async with FakeDeepgram(KEY) as server:
        yield server


@pytest.fixture
async def opened() -> AsyncIterator[Callable[..., Any]]:
    """Build and start transcribers; every one is closed at the end of the test."""
    made: list[DeepgramTranscriber] = []

    async def factory(
        url: str, *, key: str = KEY, fallback: Any = None, **options: Any
    ) -> DeepgramTranscriber:
        reasons: list[str] = []
        stt = DeepgramTranscriber(
            deepgram_client(key, url),
            fallback or FakeWhisper(),
            call_id="CA-test",
            options=DeepgramOptions(**options),
            on_fallback=reasons.append,
        )
        stt.reasons = reasons  # type: ignore[attr-defined]
        await stt.start()
        made.append(stt)
        return stt

    yield factory
    for stt in made:
        await stt.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# ---- transcripts ---------------------------------------------------------------------------------


async def test_transcripts_come_back_through_finalize_over_one_raw_mulaw_stream(
    fake: FakeDeepgram, opened: Any
) -> None:
    fake.script.extend(["Hello there.", "My order is late."])
    stt = await opened(fake.url)
    fed = speech(600) + silence(100)
    stt.feed(fed)
    assert await stt.transcribe(turn_audio(0.7)) == "Hello there."
    # A pause longer than endpointing: Deepgram finalizes by itself; Finalize then flushes nothing.
    more = speech(600) + silence(500)
    stt.feed(more)
    assert await stt.transcribe(turn_audio(1.1)) == "My order is late."
    await stt.aclose()

    assert len(fake.connections) == 1
    conn = fake.connections[0]
    assert conn.params == {
        "model": "nova-3",
        "encoding": "mulaw",
        "sample_rate": "8000",
        "channels": "1",
        "interim_results": "true",
        "punctuate": "true",
        "smart_format": "true",
        "endpointing": "300",
        "redact": "ssn",
    }
    # Deepgram's own redaction of card data and SSNs, both asked for (the parameter repeats).
    assert [v for k, v in conn.query if k == "redact"] == ["pci", "ssn"]
    assert conn.headers["Authorization"] == f"Token {KEY}"
    assert conn.audio_bytes == len(fed) + len(more)
    assert conn.controls == ["Finalize", "Finalize", "CloseStream"]
    assert conn.closed_by == "close_stream"
    # interim results were streamed too, but only finals make an answer
    assert [r["is_final"] for r in conn.results][:2] == [False, True]
    assert conn.results[1]["from_finalize"] is True
    assert conn.results[3]["speech_final"] is True and conn.results[4]["from_finalize"] is True
    assert stt.failure is None and stt.fallbacks == 0


async def test_interim_and_endpointed_results_are_told_as_running_text_before_any_finalize(
    fake: FakeDeepgram, opened: Any
) -> None:
    fake.script.append("I need a refund for the blender.")
    stt = await opened(fake.url)
    told: list[str] = []
    stt.on_partial = told.append

    stt.feed(speech(1200))  # long enough for an interim result with the first half
    await eventually(lambda: told != [])
    assert told[0] == "I need a refund"
    stt.feed(silence(500))  # past endpointing: Deepgram finalizes by itself (speech_final)
    await eventually(lambda: told[-1:] == ["I need a refund for the blender."])
    assert fake.connections[0].controls == []  # nobody asked: the call may end the turn on it

    assert await stt.transcribe(turn_audio(1.7)) == "I need a refund for the blender."


async def test_a_longer_call_for_the_same_utterance_returns_the_early_words_once(
    fake: FakeDeepgram, opened: Any
) -> None:
    # The speculative call at speech_stopped got "I want a refund"; the caller went on, so the
    # session dropped that answer and asks again with the grown audio of the same turn.
    fake.script.extend(["I want a refund", "for my headphones", "thanks"])
    stt = await opened(fake.url)
    first = turn_audio(0.7)
    stt.feed(speech(600) + silence(100))
    assert await stt.transcribe(first) == "I want a refund"
    grown = np.concatenate([first, turn_audio(0.7)])
    stt.feed(speech(600) + silence(100))
    assert await stt.transcribe(grown) == "I want a refund for my headphones"
    # The next turn's audio does not extend the last one: a new utterance.
    stt.feed(speech(400) + silence(100))
    assert await stt.transcribe(turn_audio(0.5)) == "thanks"


async def test_a_speculative_call_cancelled_while_deepgram_finalizes_loses_no_words(opened: Any) -> None:
    async with FakeDeepgram(KEY, ["my order number is", "four five one"], finalize_delay_s=0.3) as fake:
        stt = await opened(fake.url)
        first = turn_audio(0.7)
        stt.feed(speech(600) + silence(100))
        early = asyncio.create_task(stt.transcribe(first))
        await eventually(lambda: bool(fake.connections) and fake.connections[0].controls == ["Finalize"])
        early.cancel()  # the caller goes on speaking while the answer is on its way
        with pytest.raises(asyncio.CancelledError):
            await early
        stt.feed(speech(600) + silence(100))
        assert (
            await stt.transcribe(np.concatenate([first, turn_audio(0.7)]))
            == "my order number is four five one"
        )
        assert stt.fallbacks == 0


async def test_idle_stream_is_kept_open_with_keepalive(opened: Any) -> None:
    async with FakeDeepgram(KEY, ["still here"], idle_timeout_s=0.6) as fake:
        stt = await opened(fake.url, keepalive_interval_s=0.2)
        await asyncio.sleep(1.5)  # no audio at all: longer than the server's idle timeout
        assert "KeepAlive" in fake.connections[0].controls
        stt.feed(speech(400) + silence(100))
        assert await stt.transcribe(turn_audio(0.5)) == "still here"
        assert fake.connections[0].closed_by == "" and stt.failure is None


# ---- fallback ------------------------------------------------------------------------------------


async def test_nothing_listening_at_start_means_whisper_answers(opened: Any) -> None:
    whisper = FakeWhisper()
    stt = await opened(f"ws://127.0.0.1:{free_port()}", fallback=whisper)
    stt.feed(speech(400) + silence(100))
    audio = turn_audio(0.5)
    assert await stt.transcribe(audio) == f"whisper heard {audio.size} samples"
    assert stt.failure is not None and stt.failure.startswith("connect_failed")
    assert stt.reasons == [stt.failure] and stt.fallbacks == 1 and whisper.calls == [audio.size]


async def test_a_refused_key_means_whisper_answers(fake: FakeDeepgram, opened: Any) -> None:
    stt = await opened(fake.url, key="not-the-key")
    assert (await stt.transcribe(turn_audio(0.5))).startswith("whisper heard")
    assert stt.failure == "rejected_401"
    assert [status for status, _ in fake.rejected] == [401] and fake.connections == []


async def test_killing_deepgram_mid_utterance_moves_the_call_to_whisper_for_good(
    fake: FakeDeepgram, opened: Any
) -> None:
    fake.script.extend(["first turn", "second turn", "third turn"])
    whisper = FakeWhisper()
    stt = await opened(fake.url, fallback=whisper)
    stt.feed(speech(600) + silence(100))
    assert await stt.transcribe(turn_audio(0.7)) == "first turn"

    stt.feed(speech(400))  # the caller is mid-sentence when Deepgram goes away
    await eventually(lambda: fake.connections[0].audio_bytes >= 8 * 1100)
    await fake.kill()
    stt.feed(speech(200) + silence(100))
    second = turn_audio(0.7)
    assert await stt.transcribe(second) == f"whisper heard {second.size} samples"
    stt.feed(speech(400) + silence(100))
    third = turn_audio(0.5)
    assert await stt.transcribe(third) == f"whisper heard {third.size} samples"

    assert stt.failure is not None and stt.failure.startswith("connection_lost")
    assert stt.reasons == [stt.failure]  # switched once
    assert stt.fallbacks == 2 and whisper.calls == [second.size, third.size]
    assert fake.connections[0].closed_by == "killed" and len(fake.connections) == 1


async def test_an_unanswered_finalize_times_out_to_whisper(opened: Any) -> None:
    async with FakeDeepgram(KEY, ["never said"], answer_finalize=False) as fake:
        stt = await opened(fake.url, finalize_timeout_s=0.3)
        stt.feed(speech(400) + silence(100))
        assert (await stt.transcribe(turn_audio(0.5))).startswith("whisper heard")
        assert stt.failure == "finalize_timeout" and stt.fallbacks == 1
        await eventually(lambda: fake.connections[0].closed_by == "client")  # the socket was dropped


# ---- with a CallSession: the speculative transcription and the end of turn --------------------------


@dataclass
class _Reply:
    conversation_id: int = 1
    messages: list[Any] = field(default_factory=list)
    intent: str | None = None


class _Conversation:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def open_call(self, call_sid: str, caller: str | None, *, caller_attested: bool = False) -> _Reply:
        return _Reply()

    async def handle_text(self, channel: Any, address: str, text: str, **options: Any) -> _Reply:
        self.texts.append(text)
        return _Reply()

    async def mark_interrupted(self, conversation_id: int, seq: int, heard: str) -> None:
        pass


class _Line:
    async def send_audio(self, ulaw: bytes) -> None:
        pass

    async def send_mark(self, name: str) -> None:
        pass

    async def send_clear(self) -> None:
        pass

    async def hangup(self, reason: str) -> None:
        pass


class _Detector:
    """Returns the events queued for the next frame."""

    def __init__(self) -> None:
        self.next: deque[list[DetectorEvent]] = deque()

    async def feed(self, frame16k: np.ndarray) -> list[DetectorEvent]:
        return self.next.popleft() if self.next else []

    def reset(self) -> None:
        pass


class _Mute:
    def sentences(self, text: str) -> list[str]:
        return [text]

    async def stream(self, sentences: Any) -> AsyncIterator[bytes]:
        for _ in ():
            yield b""


async def _play(
    session: CallSession,
    detector: _Detector,
    audio: bytes,
    *,
    first: list[DetectorEvent] | None = None,
    last: list[DetectorEvent] | None = None,
) -> None:
    frames = [audio[i : i + 160] for i in range(0, len(audio), 160)]
    for index, frame in enumerate(frames):
        events = (first or []) if index == 0 else []
        if index == len(frames) - 1:
            events = events + (last or [])
        detector.next.append(events)
        await session.on_audio(frame)


async def test_call_session_streams_every_frame_and_a_resumed_turn_is_stored_whole(
    fake: FakeDeepgram, opened: Any
) -> None:
    fake.script.extend(["I want a refund", "for my headphones"])
    stt = await opened(fake.url)
    conversation, detector = _Conversation(), _Detector()
    session = CallSession(
        call_sid="CA-test",
        caller=None,
        conversation=conversation,
        line=_Line(),
        detector=detector,
        stt=stt,
        tts=_Mute(),
        resample_8k_to_16k=lambda ulaw: np.zeros(2 * len(ulaw), dtype=np.int16),
        config=VoiceConfig(),
    )
    await session.start()
    early = turn_audio(0.7)
    whole = np.concatenate([early, turn_audio(0.7)])
    fed = 0
    for audio, first, last in (
        (speech(600), [DetectorEvent("speech_started")], None),
        (silence(100), None, [DetectorEvent("speech_stopped", audio=early, speech_ms=600)]),
    ):
        await _play(session, detector, audio, first=first, last=last)
        fed += len(audio)
    await eventually(
        lambda: bool(fake.connections) and len(fake.connections[0].final_transcripts) == 1
    )  # early answer in
    for audio, first, last in (
        (speech(600), [DetectorEvent("speech_started")], None),  # ...but the caller goes on
        (silence(100), None, [DetectorEvent("speech_stopped", audio=whole, speech_ms=1200)]),
        (silence(20), None, [DetectorEvent("end_of_turn", audio=whole, speech_ms=1200)]),
    ):
        await _play(session, detector, audio, first=first, last=last)
        fed += len(audio)
    await eventually(lambda: bool(conversation.texts))
    await session.close("test")

    assert conversation.texts == ["I want a refund for my headphones"]
    conn = fake.connections[0]
    assert conn.audio_bytes == fed
    assert conn.controls == ["Finalize", "Finalize", "CloseStream"] and conn.closed_by == "close_stream"
