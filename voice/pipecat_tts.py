"""Speech out through any pipecat ``TTSService``: :class:`PipecatVoice` (the process's pipelines of
one service) and :class:`PipecatSynthesizer` (a call's :class:`voice.call_ports.Synthesizer`).

Each sentence is a :class:`~pipecat.frames.frames.TTSSpeakFrame`; the service answers with
``TTSStartedFrame``, ``TTSAudioRawFrame`` chunks as the provider streams them, and
``TTSStoppedFrame``. Every chunk is resampled once, with filter state kept across the chunks of a
sentence, from the service's rate to 8 kHz and encoded to mu-law as it arrives:
:meth:`PipecatSynthesizer.stream_chunks` yields it at once (first audio as soon as the provider
sends it), :meth:`PipecatSynthesizer.stream` joins each sentence into one item, as the
``Synthesizer`` protocol asks.

A pipeline serves one reply at a time; idle ones are kept warm (the provider's connection stays
open) for the next reply of any call. A reply abandoned half way (a barge-in) closes its
pipeline rather than hand on one with audio still coming, and a fresh one is started behind it.
When the service fails, the rest of the reply is spoken by the fallback synthesizer (the embedded
Piper voice) if there is one; otherwise :class:`voice.pipecat_speech.PipecatServiceError` is raised.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame, TTSStoppedFrame

from voice.audio import Resampler, pcm16_to_ulaw
from voice.call_ports import Synthesizer
from voice.pipecat_speech import PipecatServiceError, ServicePipeline, ServiceSpec
from voice.sentences import split_sentences
from voice.speakable import speakable

log = logging.getLogger(__name__)

ULAW_RATE = 8000
_SILENCE_FRAME = b"\xff" * 160  # 20 ms of mu-law silence: a sentence with no audio still has an item
_ids = itertools.count(1)


class _MulawEncoder:
    """PCM16 chunks at ``rate`` (any byte split) -> 8 kHz mu-law, filter state kept across chunks."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._resampler = Resampler(rate, ULAW_RATE) if rate != ULAW_RATE else None
        self._odd = b""

    def encode(self, pcm: bytes) -> bytes:
        data = self._odd + pcm
        whole = len(data) - len(data) % 2
        self._odd = data[whole:]
        samples = np.frombuffer(data[:whole], dtype="<i2")
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        return pcm16_to_ulaw(samples) if samples.size else b""

    def flush(self) -> bytes:
        if self._resampler is None:
            return b""
        rest = self._resampler.flush()
        return pcm16_to_ulaw(rest) if rest.size else b""


class _TTSPipeline:
    """One :class:`ServicePipeline` of the TTS service and the frames it answered with."""

    def __init__(self, spec: ServiceSpec, *, audio_out_rate: int, start_timeout_s: float) -> None:
        self.spec = spec
        self.frames: asyncio.Queue[Frame] = asyncio.Queue()
        self.pipeline = ServicePipeline(
            spec.build(),
            self._keep,
            name=f"pipecat-tts-{next(_ids)}",
            audio_out_rate=audio_out_rate,
            start_timeout_s=start_timeout_s,
        )

    def _keep(self, frame: Frame) -> None:
        if isinstance(frame, (TTSAudioRawFrame, TTSStoppedFrame, ErrorFrame)):
            self.frames.put_nowait(frame)

    def forget_late_frames(self) -> None:
        """Drop what arrived after the previous reply ended (a late error about it, say)."""
        while not self.frames.empty():
            self.frames.get_nowait()

    async def sentence(self, timeout_s: float) -> AsyncIterator[TTSAudioRawFrame]:
        """The audio of the next sentence queued, chunk by chunk, up to its ``TTSStoppedFrame``.

        Raises:
            PipecatServiceError: the service reported an error or went quiet for ``timeout_s``.
        """
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    frame = await self.frames.get()
            except TimeoutError:
                raise PipecatServiceError(
                    "timeout", f"{self.spec.name} sent no audio for {timeout_s} s"
                ) from None
            if isinstance(frame, ErrorFrame):
                raise PipecatServiceError("error", f"{self.spec.name} failed: {self.spec.mask(frame.error)}")
            if isinstance(frame, TTSStoppedFrame):
                return
            if isinstance(frame, TTSAudioRawFrame) and frame.audio:
                yield frame


class PipecatVoice:
    """The process's pipelines of one pipecat TTS service, each lent to one reply at a time.

    Args:
        spec: The service (see :class:`voice.pipecat_speech.ServiceSpec`).
        max_pipelines: Replies spoken at the same time (more wait for a free pipeline).
        audio_out_rate: The rate services that take it from the pipeline produce (OpenAI: 24000).
        start_timeout_s: Longest wait for a pipeline (and the provider's connection) to start.
        chunk_timeout_s: Longest silence of the provider inside a sentence.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        max_pipelines: int = 4,
        audio_out_rate: int = 24000,
        start_timeout_s: float = 10.0,
        chunk_timeout_s: float = 10.0,
    ) -> None:
        self.spec = spec
        self.chunk_timeout_s = chunk_timeout_s
        self._audio_out_rate = audio_out_rate
        self._start_timeout_s = start_timeout_s
        self._idle: list[_TTSPipeline] = []
        self._lent: set[_TTSPipeline] = set()
        self._slots = asyncio.Semaphore(max_pipelines)
        self._chores: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        """Start one pipeline now, so the first reply does not wait for the provider's connection."""
        if not self._idle and not self._lent:
            self._idle.append(await self._new_pipeline())

    async def _new_pipeline(self) -> _TTSPipeline:
        tts = _TTSPipeline(
            self.spec, audio_out_rate=self._audio_out_rate, start_timeout_s=self._start_timeout_s
        )
        await tts.pipeline.start()
        return tts

    async def speak(self, sentences: Sequence[str]) -> AsyncIterator[tuple[int, TTSAudioRawFrame | None]]:
        """``(sentence index, audio chunk)`` as the provider sends them; ``(index, None)`` ends a sentence.

        Raises:
            PipecatServiceError: the service failed (no pipeline is handed on after a failure).
        """
        if self._closed:
            raise PipecatServiceError("closed", "the pipecat voice is closed")
        async with self._slots:
            if self._idle:
                tts = self._idle.pop()
                tts.forget_late_frames()
            else:
                tts = await self._new_pipeline()
            self._lent.add(tts)
            finished = False
            try:
                for sentence in sentences:
                    if sentence.strip():  # nothing to say gets no request (and no audio)
                        await tts.pipeline.send(TTSSpeakFrame(sentence, append_to_context=False))
                for index, sentence in enumerate(sentences):
                    if sentence.strip():
                        async for chunk in tts.sentence(self.chunk_timeout_s):
                            yield index, chunk
                    yield index, None
                finished = True
            finally:
                self._lent.discard(tts)
                if finished and tts.pipeline.running and not self._closed:
                    self._idle.append(tts)
                else:
                    self._chore(self._replace(tts), "pipecat-tts-replace")

    async def _replace(self, tts: _TTSPipeline) -> None:
        """Close a pipeline that failed or still has audio coming, and warm up another one."""
        await tts.pipeline.aclose()
        if self._closed or self._idle:
            return
        try:
            fresh = await self._new_pipeline()
        except PipecatServiceError:
            log.warning("pipecat tts could not start a pipeline", extra={"service": self.spec.name})
            return
        if self._closed:
            await fresh.pipeline.aclose()
        else:
            self._idle.append(fresh)

    def _chore(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def aclose(self) -> None:
        """Close every pipeline (lent ones too) and wait for background replacements."""
        self._closed = True
        pipelines = [*self._idle, *self._lent]
        self._idle.clear()
        for tts in pipelines:
            await tts.pipeline.aclose()
        if self._chores:
            await asyncio.gather(*list(self._chores), return_exceptions=True)

    def synthesizer(
        self,
        fallback: Synthesizer | None = None,
        *,
        call_id: str = "",
        on_fallback: Callable[[str], None] | None = None,
    ) -> PipecatSynthesizer:
        """A call's synthesizer over this voice (see :class:`PipecatSynthesizer`)."""
        return PipecatSynthesizer(self, fallback, call_id=call_id, on_fallback=on_fallback)


class PipecatSynthesizer:
    """A call's :class:`voice.call_ports.Synthesizer` over a :class:`PipecatVoice`.

    Args:
        voice: The process's pipelines of the TTS service.
        fallback: Speaks the rest of a reply when the service fails (the embedded Piper); None
            raises :class:`~voice.pipecat_speech.PipecatServiceError` instead.
        call_id: For logs.
        on_fallback: Called with the reason each time a reply moves to the fallback.
    """

    def __init__(
        self,
        voice: PipecatVoice,
        fallback: Synthesizer | None = None,
        *,
        call_id: str = "",
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self._voice = voice
        self._fallback = fallback
        self.call_id = call_id
        self._on_fallback = on_fallback
        self.fallbacks = 0

    def sentences(self, text: str) -> list[str]:
        """The pieces to speak one by one: the fallback's pieces when there is one (so both voices
        cut a reply alike), else its sentences."""
        if self._fallback is not None:
            return self._fallback.sentences(text)
        return split_sentences(text) or [text]

    async def stream_chunks(self, sentences: Sequence[str]) -> AsyncIterator[tuple[int, bytes, bool]]:
        """``(sentence index, 8 kHz mu-law, sentence complete)`` as the provider sends audio.

        After a failure mid-sentence, the fallback says that whole sentence again.
        """
        async for piece in self._pieces(sentences):
            yield piece.index, piece.audio, piece.end

    async def stream(self, sentences: Sequence[str]) -> AsyncIterator[bytes]:
        """8 kHz mu-law, one item per sentence, in order (the ``Synthesizer`` protocol)."""
        parts: list[bytes] = []
        async for piece in self._pieces(sentences):
            if piece.restart:
                parts.clear()  # the fallback says the whole sentence
            parts.append(piece.audio)
            if piece.end:
                yield b"".join(parts) or _SILENCE_FRAME
                parts.clear()

    async def _pieces(self, sentences: Sequence[str]) -> AsyncIterator[_Piece]:
        spoken = [speakable(s) for s in sentences]
        done = 0  # sentences whose audio is complete
        encoder: _MulawEncoder | None = None
        try:
            async for index, frame in self._voice.speak(spoken):
                if frame is None:
                    yield _Piece(index, encoder.flush() if encoder is not None else b"", end=True)
                    encoder, done = None, index + 1
                    continue
                if encoder is None or encoder.rate != frame.sample_rate:
                    encoder = _MulawEncoder(frame.sample_rate)
                chunk = encoder.encode(frame.audio)
                if chunk:
                    yield _Piece(index, chunk)
        except PipecatServiceError as e:
            extra = {"call_sid": self.call_id, "service": self._voice.spec.name, "reason": e.reason}
            if self._fallback is None:
                log.warning("pipecat tts failed", extra=extra)
                raise
            self.fallbacks += 1
            log.warning("pipecat tts failed; the fallback voice speaks the rest of the reply", extra=extra)
            if self._on_fallback is not None:
                self._on_fallback(e.reason)
            index = done
            async for audio in self._fallback.stream(list(sentences[done:])):
                yield _Piece(index, audio, end=True, restart=index == done)
                index += 1


@dataclass(frozen=True)
class _Piece:
    index: int  # of the sentence
    audio: bytes  # 8 kHz mu-law
    end: bool = False  # the sentence is complete
    restart: bool = False  # the sentence starts again (the fallback took over in its middle)
