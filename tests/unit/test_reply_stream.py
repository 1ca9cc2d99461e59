"""A reply of several messages is one synthesis stream: no gap between its messages.

The bot's reply to a turn is often two stored messages ("Thanks Priya, you're verified." and the
order status). Synthesized one message after the other, the second message's first sentence is
only requested once the first message has been paced out, so the caller hears a gap as long as
a synthesis: on a busy machine, long enough for a caller to take the turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np

from voice.call_ports import VoiceConfig
from voice.playout import Pacer, Speech
from voice.speech_stack import SynthesizerAdapter
from voice.tts import Synthesis

FIRST = "Thanks Priya, you're verified."
SECOND = "Your speaker shipped on Monday. It should arrive on Friday."


class SlowPiper:
    """Piper with a fixed synthesis time; logs when each request starts."""

    def __init__(self, log: list[str], seconds: float = 0.02) -> None:
        self.log = log
        self.seconds = seconds

    async def synthesize(self, text: str) -> Synthesis:
        self.log.append(f"synth {text}")
        await asyncio.sleep(self.seconds)  # simulated synthesis time, not a wait for an event
        pcm = np.full(22050 * len(text) // 40, 3000, dtype=np.int16)
        return Synthesis(pcm16=pcm, sample_rate=22050, seconds=pcm.size / 22050, text=text)


class Line:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def send_audio(self, ulaw: bytes) -> None:
        await asyncio.sleep(0)  # a socket write lets other tasks run

    async def send_mark(self, name: str) -> None:
        self.log.append(f"mark {name}")

    async def send_clear(self) -> None:
        pass

    async def hangup(self, reason: str) -> None:
        pass


async def test_the_next_messages_first_sentence_is_synthesized_before_the_previous_message_is_sent() -> None:
    log: list[str] = []
    adapter = SynthesizerAdapter(SlowPiper(log), limit=asyncio.Semaphore(2))  # type: ignore[arg-type]
    config = VoiceConfig(lead_ms=60_000, chunk_ms=20)
    pacer = Pacer(Line(log), config, time.monotonic, {}, 0)
    first, second = Speech(seq=3, text=FIRST), Speech(seq=4, text=SECOND)

    await pacer.say_all(adapter, [first, second], lambda: None)

    second_first_piece = adapter.sentences(SECOND)[0]
    assert log.index(f"synth {second_first_piece}") < log.index("mark 0:3:30")
    marks = [entry.removeprefix("mark ") for entry in log if entry.startswith("mark ")]
    assert [m for m in marks if m.split(":")[1] == "3"][-1] == f"0:3:{len(FIRST)}"
    assert [m for m in marks if m.split(":")[1] == "4"][-1] == f"0:4:{len(SECOND)}"
    assert marks.index(f"0:3:{len(FIRST)}") < min(i for i, m in enumerate(marks) if m.split(":")[1] == "4")
    ends_of_second = sorted({int(m.split(":")[2]) for m in marks if m.split(":")[1] == "4"})
    assert ends_of_second[-1] == len(SECOND) and ends_of_second == sorted(ends_of_second)


class StreamingTTS:
    """A streaming synthesizer (as voice.pipecat_tts): audio pieces as the provider sends them."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def sentences(self, text: str) -> list[str]:
        return [part if part.endswith(".") else part + "." for part in text.split(". ")]

    async def stream(self, sentences: list[str]) -> AsyncIterator[bytes]:
        raise AssertionError("a streaming synthesizer is asked for chunks")
        yield b""

    async def stream_chunks(self, sentences: list[str]) -> AsyncIterator[tuple[int, bytes, bool]]:
        self.calls.append(list(sentences))
        for index, sentence in enumerate(sentences):
            audio = b"\xff" * (8 * len(sentence))
            half = len(audio) // 2
            yield index, audio[:half], False
            yield index, audio[half:], True


async def test_a_streaming_synthesizer_gets_the_whole_reply_in_one_request_and_marks_stay_per_message() -> (
    None
):
    log: list[str] = []
    tts = StreamingTTS()
    pacer = Pacer(Line(log), VoiceConfig(lead_ms=60_000, chunk_ms=20), time.monotonic, {}, 0)
    first, second = Speech(seq=3, text=FIRST), Speech(seq=4, text=SECOND)

    await pacer.say_all(tts, [first, second], lambda: None)  # type: ignore[arg-type]

    assert tts.calls == [[FIRST, *tts.sentences(SECOND)]]
    marks = [entry.removeprefix("mark ") for entry in log]
    assert marks[-1] == f"0:4:{len(SECOND)}"
    assert f"0:3:{len(FIRST)}" in marks and f"0:4:{SECOND.index('It') - 1}" in marks
    last_of_first = marks.index(f"0:3:{len(FIRST)}")
    assert all(m.split(":")[1] == "3" for m in marks[:last_of_first])
    assert all(m.split(":")[1] == "4" for m in marks[last_of_first + 1 :])
