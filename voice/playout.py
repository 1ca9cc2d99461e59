"""Playout of one reply: what is being spoken (for barge-in accounting) and the pacer that sends
its audio in real time with a Twilio ``mark`` after every chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from voice.call_ports import ULAW_PER_MS, Line, Synthesizer, VoiceConfig
from voice.spoken_text import sentence_ends


@dataclass
class Speech:
    """One stored bot message being spoken: for barge-in accounting."""

    seq: int
    text: str
    heard_chars: int = 0
    finished: bool = False
    complete: bool = True  # False while a streamed reply may still grow
    alias: int | None = None  # the provisional seq its marks were named with (streamed replies)
    cut: bool = False  # a barge-in stopped it


@dataclass
class SystemLine:
    """A prompt spoken by the call itself (reprompt), not a stored bot turn."""

    seq: int
    body: str


REPLY_END = "end"
"""The middle field of a reply's end mark, ``epoch:end:n`` (see ``voice.speaking.Speaking._reply_over``)."""


def reply_end_mark(epoch: int, n: int) -> str:
    """The name of the mark that ends the bot's ``n``-th reply of a call."""
    return f"{epoch}:{REPLY_END}:{n}"


def is_reply_end_mark(name: str) -> bool:
    """True for a mark named by :func:`reply_end_mark`."""
    parts = name.split(":")
    return len(parts) == 3 and parts[1] == REPLY_END


def _mark_seq(speech: Speech) -> int:
    """The seq a mark names: a streamed reply's provisional seq until it is bound to the stored
    message (read per chunk: the binding can happen while a sentence is being sent)."""
    return speech.alias if speech.alias is not None and speech.seq < 0 else speech.seq


class Pacer:
    """Sends one playback's audio in real time (at most ``lead_ms`` ahead), a mark after each chunk.

    A barge-in first *pauses* the pacer (:meth:`pause`: nothing more is sent; the session sends
    ``clear``), then either cuts the reply (the session cancels the task) or :meth:`resume`s it:
    the chunks the caller had not heard yet (their marks had not come back) are sent again, under
    the new epoch, and playback goes on where it paused.

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
        self._unheard: dict[str, bytes] = {}  # mark name -> the chunk before it, until echoed
        self._replay: list[tuple[bytes, str]] = []  # (chunk, "seq:chars") to send again on resume
        self._running = asyncio.Event()
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def start(self, now: float) -> None:
        self.first_audio_at = now

    def pause(self) -> None:
        """Send nothing more until :meth:`resume`; remember what the caller has not heard yet.
        Call it before the ``clear`` (which echoes, and so forgets, every pending mark)."""
        if self.paused:
            return
        self._replay = [
            (chunk, name.split(":", 1)[1]) for name, chunk in self._unheard.items() if name in self._marks
        ]
        self._unheard.clear()
        self._running.clear()

    def resume(self, epoch: int) -> None:
        """Go on where :meth:`pause` stopped: the unheard chunks first, marked with ``epoch``."""
        self.epoch = epoch
        self._running.set()

    async def _gate(self) -> None:
        """Wait out a pause, then send again what the caller had not heard."""
        if not self._running.is_set():
            await self._running.wait()
        if self._replay:
            replay, self._replay = self._replay, []
            self.first_audio_at, self.sent_ms = self._now(), 0.0  # pace from here
            for chunk, position in replay:
                await self._send_chunk(chunk, position)

    async def _send_chunk(self, chunk: bytes, position: str) -> None:
        await self._gate()
        assert self.first_audio_at is not None
        ahead = self.sent_ms - (self._now() - self.first_audio_at) * 1000
        if ahead > self._config.lead_ms:
            await asyncio.sleep((ahead - self._config.lead_ms) / 1000)
            await self._gate()
        await self._line.send_audio(chunk)
        self.sent_ms += len(chunk) / ULAW_PER_MS
        name = f"{self.epoch}:{position}"
        self._marks[name] = self._now()
        for echoed in [n for n in self._unheard if n not in self._marks]:
            del self._unheard[echoed]
        self._unheard[name] = chunk
        await self._line.send_mark(name)

    async def send(self, audio: bytes, seq: int, start: int, end: int) -> None:
        chunk_bytes = self._config.chunk_ms * ULAW_PER_MS
        total = len(audio)
        for pos in range(0, total, chunk_bytes):
            chunk = audio[pos : pos + chunk_bytes]
            chars = start + round((end - start) * (pos + len(chunk)) / total)
            await self._send_chunk(chunk, f"{seq}:{chars}")

    async def say(
        self, tts: Synthesizer, speech: Speech, text: str, offset: int, on_first_audio: Callable[[], None]
    ) -> None:
        """Synthesize ``text`` (chars ``offset``.. of ``speech``) and send it paced, a mark after each chunk."""
        sentences = tts.sentences(text)
        ends = sentence_ends(text, sentences)
        plan = [(speech, offset + (ends[i - 1] if i else 0), offset + ends[i]) for i in range(len(ends))]
        await self._say_planned(tts, sentences, plan, on_first_audio)

    async def say_all(
        self, tts: Synthesizer, speeches: Sequence[Speech], on_first_audio: Callable[[], None]
    ) -> None:
        """Speak the messages of one reply in order as one synthesis stream: the next message's
        first sentence is synthesized while the previous message's last one plays, so a reply of
        several messages has no gap between them (synthesized message by message, a busy
        machine leaves one the length of a synthesis, long enough for a caller to take the turn)."""
        sentences: list[str] = []
        plan: list[tuple[Speech, int, int]] = []
        for speech in speeches:
            own = tts.sentences(speech.text)
            ends = sentence_ends(speech.text, own)
            sentences += own
            plan += [(speech, ends[i - 1] if i else 0, ends[i]) for i in range(len(ends))]
        await self._say_planned(tts, sentences, plan, on_first_audio)

    async def _say_planned(
        self,
        tts: Synthesizer,
        sentences: list[str],
        plan: list[tuple[Speech, int, int]],
        on_first_audio: Callable[[], None],
    ) -> None:
        """Send the audio of ``sentences`` in order; sentence *i* is chars ``start..end`` of the
        speech ``plan[i]`` names."""
        chunks = getattr(tts, "stream_chunks", None)
        if chunks is not None:
            await self._say_as_it_arrives(chunks(sentences), plan, on_first_audio)
            return
        index = 0
        async for audio in tts.stream(sentences):
            speech, start, end = plan[index]
            index += 1
            if self.first_audio_at is None:
                self.start(self._now())
                on_first_audio()
            await self.send(audio, _mark_seq(speech), start, end)

    async def _say_as_it_arrives(
        self,
        pieces: AsyncIterator[tuple[int, bytes, bool]],
        plan: list[tuple[Speech, int, int]],
        on_first_audio: Callable[[], None],
    ) -> None:
        """Send a streaming synthesizer's audio as it arrives (first audio before the sentence is
        synthesized). A sentence's length is unknown until it ends, so its chunks are marked
        with where it starts and its last chunk with where it ends: only whole sentences count
        as heard."""
        chunk_bytes = self._config.chunk_ms * ULAW_PER_MS
        pending = b""
        async for index, audio, complete in pieces:
            speech, start, end = plan[index]
            pending += audio
            if pending and self.first_audio_at is None:
                self.start(self._now())
                on_first_audio()
            while len(pending) > chunk_bytes:  # keep a piece back for the sentence's end mark
                chunk, pending = pending[:chunk_bytes], pending[chunk_bytes:]
                await self._send_chunk(chunk, f"{_mark_seq(speech)}:{start}")
            if complete and pending:
                await self._send_chunk(pending, f"{_mark_seq(speech)}:{end}")
                pending = b""

    async def wait_heard(self) -> None:
        """Wait (bounded) until the caller heard everything sent: every mark echoed. A pause
        meanwhile is waited out (and what it kept from the caller sent again)."""
        while True:
            await self._gate()
            now = self._now()
            remaining = max(0.0, self.sent_ms / 1000 - (now - (self.first_audio_at or now)))
            deadline = remaining + self._config.mark_grace_s
            waited = 0.0
            while self._marks and waited < deadline and not self._interrupted:
                await asyncio.sleep(0.05)
                waited += 0.05
            if not self._interrupted:
                return

    @property
    def _interrupted(self) -> bool:
        """Paused, or resumed with chunks still to send again."""
        return self.paused or bool(self._replay)
