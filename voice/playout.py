"""Playout of one reply: what is being spoken (for barge-in accounting) and the pacer that sends
its audio in real time with a Twilio ``mark`` after every chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from voice.call_ports import ULAW_PER_MS, Line, Synthesizer, VoiceConfig
from voice.spoken_text import sentence_ends


@dataclass
class Speech:
    """One stored bot message being spoken: for barge-in accounting."""

    seq: int
    text: str
    heard_chars: int = 0
    started: bool = False
    finished: bool = False
    complete: bool = True  # False while a streamed reply may still grow
    alias: int | None = None  # the provisional seq its marks were named with (streamed replies)
    cut: bool = False  # a barge-in stopped it


@dataclass
class SystemLine:
    """A prompt spoken by the call itself (reprompt), not a stored bot turn."""

    seq: int
    body: str


class Pacer:
    """Sends one playback's audio in real time (at most ``lead_ms`` ahead), a mark after each chunk.

    Args:
        line: where audio and marks go.
        config: the call's settings (``chunk_ms``, ``lead_ms``, ``mark_grace_s``).
        clock: the session's clock (seconds).
        marks: the session's marks sent and not yet echoed (name -> time sent); shared, so a
            barge-in that clears it ends :meth:`wait_heard` at once.
        epoch: the session's clear counter; marks are named ``epoch:seq:chars``.
    """

    def __init__(
        self, line: Line, config: VoiceConfig, clock: Callable[[], float], marks: dict[str, float], epoch: int
    ) -> None:
        self._line = line
        self._config = config
        self._now = clock
        self._marks = marks
        self.epoch = epoch
        self.sent_ms = 0.0
        self.first_audio_at: float | None = None

    def start(self, now: float) -> None:
        self.first_audio_at = now

    async def send(self, audio: bytes, seq: int, start: int, end: int) -> None:
        chunk_bytes = self._config.chunk_ms * ULAW_PER_MS
        total = len(audio)
        assert self.first_audio_at is not None
        for pos in range(0, total, chunk_bytes):
            chunk = audio[pos : pos + chunk_bytes]
            ahead = self.sent_ms - (self._now() - self.first_audio_at) * 1000
            if ahead > self._config.lead_ms:
                await asyncio.sleep((ahead - self._config.lead_ms) / 1000)
            await self._line.send_audio(chunk)
            self.sent_ms += len(chunk) / ULAW_PER_MS
            chars = start + round((end - start) * (pos + len(chunk)) / total)
            name = f"{self.epoch}:{seq}:{chars}"
            self._marks[name] = self._now()
            await self._line.send_mark(name)

    async def say(
        self, tts: Synthesizer, speech: Speech, text: str, offset: int, on_first_audio: Callable[[], None]
    ) -> None:
        """Synthesize ``text`` (chars ``offset``.. of ``speech``) and send it paced, a mark after each chunk."""
        sentences = tts.sentences(text)
        ends = sentence_ends(text, sentences)
        index = 0
        async for audio in tts.stream(sentences):
            sentence_start = offset + (ends[index - 1] if index else 0)
            sentence_end = offset + ends[index]
            index += 1
            if self.first_audio_at is None:
                self.start(self._now())
                on_first_audio()
            await self.send(
                audio,
                speech.alias if speech.alias is not None and speech.seq < 0 else speech.seq,
                sentence_start,
                sentence_end,
            )

    async def wait_heard(self) -> None:
        """Wait (bounded) until the caller heard everything sent: every mark echoed."""
        now = self._now()
        remaining = max(0.0, self.sent_ms / 1000 - (now - (self.first_audio_at or now)))
        deadline = remaining + self._config.mark_grace_s
        waited = 0.0
        while self._marks and waited < deadline:
            await asyncio.sleep(0.05)
            waited += 0.05
