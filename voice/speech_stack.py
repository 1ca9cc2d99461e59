"""The embedded speech stack of a process, and the per-call adapters a :class:`CallSession` uses.

One copy of each model per process, shared by every call: Whisper (faster-whisper int8, tiny.en
unless ``whisper_model`` names another bundled model or ``whisper_model_path`` a folder), Silero
VAD and smart-turn v3 (inside pipecat-ai), and one supervised Piper HTTP server (GPL-3.0, so out
of process) for the en_US-joe-medium voice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np

from voice.audio import Resampler, pcm16_to_ulaw, resample, trim_leading_silence, ulaw_to_pcm16
from voice.call_ports import DetectorEvent
from voice.piper_server import PiperServer
from voice.sentences import split_sentences
from voice.speakable import speakable
from voice.stt import DEFAULT_MODEL, DEFAULT_PROMPT, WhisperSTT, known_model, shared_whisper
from voice.tts import PiperTTS, prefetched
from voice.turns import (
    OnsetLost,
    SpeechDetector,
    SpeechOnset,
    SpeechStarted,
    SpeechStopped,
    TurnEnded,
    shared_silero,
    shared_smart_turn,
)

log = logging.getLogger(__name__)


class DetectorAdapter:
    """:class:`voice.call_ports.Detector` over :class:`voice.turns.SpeechDetector`."""

    def __init__(self, detector: SpeechDetector) -> None:
        self._detector = detector

    async def feed(self, frame16k: np.ndarray) -> list[DetectorEvent]:
        out: list[DetectorEvent] = []
        for event in await self._detector.feed(frame16k):
            since_voice_ms = self._detector.since_voice * 1000
            if isinstance(event, SpeechOnset):
                out.append(DetectorEvent("speech_onset"))
            elif isinstance(event, OnsetLost):
                out.append(DetectorEvent("onset_lost"))
            elif isinstance(event, SpeechStarted):
                out.append(DetectorEvent("speech_started"))
            elif isinstance(event, SpeechStopped):
                # The audio so far goes with it: the session starts transcribing speculatively
                # while the end-of-turn decision is still being made.
                out.append(
                    DetectorEvent(
                        "speech_stopped",
                        audio=self._detector.utterance(),
                        speech_ms=event.duration * 1000,
                        since_voice_ms=since_voice_ms,
                    )
                )
            elif isinstance(event, TurnEnded):
                out.append(
                    DetectorEvent(
                        "end_of_turn",
                        audio=event.audio,
                        speech_ms=event.speech_seconds * 1000,
                        since_voice_ms=event.silence * 1000,
                    )
                )
        return out

    def transcript_complete(self) -> None:
        self._detector.transcript_complete()

    def transcript_unfinished(self) -> None:
        self._detector.transcript_unfinished()

    @property
    def in_turn(self) -> bool:
        return self._detector.in_turn

    @property
    def speaking(self) -> bool:
        return self._detector.speaking

    @property
    def since_voice_ms(self) -> float:
        return self._detector.since_voice * 1000

    def reset(self) -> None:
        self._detector.reset()


class TranscriberAdapter:
    """:class:`voice.call_ports.Transcriber` over the shared Whisper, primed with ``prompt``."""

    def __init__(self, stt: WhisperSTT, prompt: str | None = None) -> None:
        self._stt = stt
        self._prompt = prompt or None

    async def transcribe(self, pcm16_16k: np.ndarray) -> str:
        return (await self._stt.transcribe(pcm16_16k, prompt=self._prompt)).text


class SpeechCache:
    """Synthesized audio of recent pieces, shared by every call: fixed lines (FAQ answers,
    "Is this about that order?", goodbyes) start at once the second time they are said."""

    def __init__(self, size: int = 512) -> None:
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = size

    def get(self, text: str) -> bytes | None:
        if self._size <= 0:
            return None
        audio = self._items.get(text)
        if audio is not None:
            self._items.move_to_end(text)
        return audio

    def put(self, text: str, audio: bytes) -> None:
        if self._size <= 0:
            return
        self._items[text] = audio
        self._items.move_to_end(text)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class SynthesizerAdapter:
    """Sentences in, 8 kHz mu-law out; the next sentence is synthesized while one plays.

    Piper slows down badly when requests overlap (and grows its memory), so requests of all
    calls share ``limit``; a call's first piece waits for nobody's prefetch.
    """

    def __init__(
        self, tts: PiperTTS, cache: SpeechCache | None = None, limit: asyncio.Semaphore | None = None
    ) -> None:
        self._tts = tts
        self._cache = cache or SpeechCache()
        self._limit = limit or asyncio.Semaphore(2)

    def sentences(self, text: str) -> list[str]:
        """Pieces to synthesize one by one. A first sentence longer than ``FIRST_PIECE_CHARS`` is
        cut so the caller hears something sooner: at its first clause if that comes early, else
        after its first few words. Piper takes ~35 ms per second of audio plus ~10 ms, and the
        rest is synthesized while the first piece plays, so the cut costs no gap."""
        pieces = split_sentences(text) or [text]
        first = pieces[0]
        if len(first) > FIRST_PIECE_CHARS:
            cut = _clause_break(first, FIRST_PIECE_CHARS) or _word_break(first, FIRST_PIECE_WORDS_CHARS)
            if cut:
                pieces[:1] = [first[:cut].rstrip(), first[cut:].lstrip()]
        return pieces

    async def _audio(self, sentence: str) -> bytes:
        spoken = speakable(sentence)
        cached = self._cache.get(spoken)
        if cached is not None:
            return cached
        async with self._limit:
            synthesis = await self._tts.synthesize(spoken)
        if synthesis.pcm16.size == 0:
            audio = b"\xff" * 160  # keep sentence/offset accounting aligned
        else:
            # Piper's lead-in silence (30-55 ms per sentence) would be the caller's wait.
            audio = pcm16_to_ulaw(
                trim_leading_silence(resample(synthesis.pcm16, synthesis.sample_rate, 8000), 8000)
            )
        self._cache.put(spoken, audio)
        return audio

    async def stream(self, sentences: Sequence[str]) -> AsyncIterator[bytes]:
        """Audio of each sentence in order, the next one synthesized while one plays."""
        async with contextlib.aclosing(prefetched(sentences, self._audio)) as audio:
            async for chunk in audio:
                yield chunk


#: A first sentence longer than this is cut (see ``SynthesizerAdapter.sentences``).
FIRST_PIECE_CHARS = 32
#: Without an early clause, the first piece ends at the first word boundary past this.
FIRST_PIECE_WORDS_CHARS = 16


def _clause_break(sentence: str, within: int = 70) -> int | None:
    """Index after the first comma/colon/semicolon (within ``within`` characters) that leaves
    >= 2 words on each side."""
    for index, char in enumerate(sentence[:within]):
        if char in ",;:" and index + 1 < len(sentence) and sentence[index + 1] == " ":
            if len(sentence[:index].split()) >= 2 and len(sentence[index + 1 :].split()) >= 2:
                return index + 1
    return None


def _word_break(sentence: str, at: int) -> int | None:
    """Index of the first space at or after ``at`` that leaves >= 3 words after it."""
    index = sentence.find(" ", at)
    if index < 0 or len(sentence[index:].split()) < 3:
        return None
    return index + 1


class Upsampler:
    """8 kHz mu-law frames -> 16 kHz int16, with filter state kept across frames."""

    def __init__(self) -> None:
        self._resampler = Resampler(8000, 16000)

    def __call__(self, ulaw: bytes) -> np.ndarray:
        return self._resampler.process(ulaw_to_pcm16(ulaw))


class SpeechStack:
    """Owns the shared models and the Piper server; builds per-call adapters."""

    def __init__(
        self,
        *,
        whisper_model_path: Path | None = None,
        whisper_model: str = DEFAULT_MODEL,
        piper_voice_path: Path | None = None,
        whisper_threads: int = 2,
        whisper_workers: int = 1,
        short_silence: float = 0.3,
        long_silence: float = 0.8,
        speech_cache_size: int = 512,
        stt_prompt: str | None = DEFAULT_PROMPT,
    ) -> None:
        self._whisper_path = whisper_model_path
        self.stt_prompt = stt_prompt
        self._whisper_model = known_model(whisper_model)
        self._voice_path = piper_voice_path
        self._whisper_threads = whisper_threads
        self._whisper_workers = whisper_workers
        self.short_silence = short_silence
        self.long_silence = long_silence
        self.stt: WhisperSTT | None = None
        self.piper: PiperServer | None = None
        self.tts: PiperTTS | None = None
        self._started: asyncio.Task[None] | None = None
        self._speech_cache = SpeechCache(speech_cache_size)
        self._piper_slots = asyncio.Semaphore(2)

    @property
    def ready(self) -> bool:
        """The models are loaded and Piper is up (a start finished without an error)."""
        started = self._started
        return (
            started is not None and started.done() and not started.cancelled() and started.exception() is None
        )

    async def start(self) -> None:
        """Load models and start Piper (idempotent; concurrent callers wait for one start)."""
        started = self._started
        if started is not None and started.done() and (started.cancelled() or started.exception()):
            # A start that failed (Piper would not come up, a model would not load) is retried by
            # the next call instead of failing every call until a restart.
            log.warning(
                "speech stack failed to start; retrying",
                exc_info=started.exception() if not started.cancelled() else None,
            )
            await self._stop_parts()
            started = None
        if started is None:
            started = self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(started)

    async def _start(self) -> None:
        self.piper = PiperServer(model_path=self._voice_path)
        await self.piper.start()
        piper = self.piper
        self.tts = PiperTTS(lambda: piper.base_url)
        self.stt = shared_whisper(
            self._whisper_path,
            cpu_threads=self._whisper_threads,
            num_workers=self._whisper_workers,
            model=self._whisper_model,
        )
        await self.stt.load()
        await asyncio.to_thread(shared_silero)
        smart_turn = await asyncio.to_thread(shared_smart_turn)
        await self._warm_up(smart_turn)
        log.info("speech stack ready")

    async def _warm_up(self, smart_turn: object) -> None:
        """First inferences are several times slower (allocations, kernel selection): pay that
        at start-up, not on a caller's first turn."""
        assert self.tts is not None and self.stt is not None
        await self.tts.synthesize("Hello, thanks for calling.")
        rng = np.random.default_rng(0)
        noise = (rng.standard_normal(16000) * 300).astype(np.int16)
        await self.stt.transcribe(noise)
        probability = getattr(smart_turn, "probability", None)
        if probability is not None:
            await probability(noise)

    async def stop(self) -> None:
        if self._started is not None and not self._started.done():
            self._started.cancel()
            try:
                await self._started
            except (asyncio.CancelledError, Exception):
                pass
        await self._stop_parts()

    async def _stop_parts(self) -> None:
        if self.tts is not None:
            await self.tts.aclose()
            self.tts = None
        if self.piper is not None:
            await self.piper.stop()
            self.piper = None

    def detector(self) -> DetectorAdapter:
        return DetectorAdapter(
            SpeechDetector(short_silence=self.short_silence, long_silence=self.long_silence)
        )

    def transcriber(self) -> TranscriberAdapter:
        assert self.stt is not None, "start() the speech stack first"
        return TranscriberAdapter(self.stt, self.stt_prompt)

    def synthesizer(self) -> SynthesizerAdapter:
        assert self.tts is not None, "start() the speech stack first"
        return SynthesizerAdapter(self.tts, self._speech_cache, self._piper_slots)
