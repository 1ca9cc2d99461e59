"""Speech in through any pipecat ``STTService``: :class:`PipecatTranscriber`, one call's
:class:`voice.call_ports.Transcriber`, with the shared Whisper as its fallback.

**Streaming services** (pipecat's ``DeepgramSTTService`` and the other websocket ones) hear the
call as it happens: :meth:`~PipecatTranscriber.feed` queues every inbound frame as an
``InputAudioRawFrame`` (8 kHz PCM16, the phone's own rate). When the call session asks for a
transcript, ``VADUserStartedSpeakingFrame`` + ``VADUserStoppedSpeakingFrame`` go in behind the
audio: the stop frame is what makes pipecat's streaming services flush (Deepgram's
``Finalize``), and the start frame clears what the service remembers of the previous flush. The
answer is ready when a ``TranscriptionFrame`` marked ``finalized`` arrives; a service that flushes
without saying so is given ``settle_s`` of quiet after its last final result, and a service that
says nothing at all ``finalize_timeout_s``. Finals are kept in arrival order, and an utterance's
answer is the finals since the previous answer, or, when the audio passed *extends* the
previous call's audio (the session's speculative transcript was dropped because the caller went
on), since that previous call's start: no word lost, none doubled.

**Segmented services** (``SegmentedSTTService``: OpenAI, Groq and other upload-per-utterance
APIs) get the whole utterance at 16 kHz between the two VAD frames and answer with one
``TranscriptionFrame``.

**Failures.** A pipeline that cannot start or an ``ErrorFrame`` from the service gives the
service up for the rest of the call (one warning with the call id, ``on_fallback`` called with a
reason) and every utterance from then on is transcribed by the fallback from its audio, so none
is lost. Without a fallback, :class:`voice.pipecat_speech.PipecatServiceError` is raised instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.services.stt_service import SegmentedSTTService

from voice.audio import ulaw_to_pcm16
from voice.call_ports import Transcriber, tell_running_text
from voice.pipecat_speech import PipecatServiceError, ServicePipeline, ServiceSettingsError, ServiceSpec

log = logging.getLogger(__name__)

PHONE_RATE = 8000
UTTERANCE_RATE = 16000
_ids = itertools.count(1)


@dataclass(frozen=True)
class PipecatSTTOptions:
    """How long a call's pipecat transcriber waits.

    Attributes:
        start_timeout_s: Longest wait for the service (and its connection) to start.
        finalize_timeout_s: Longest wait for a streaming service's answer to a flush.
        settle_s: Quiet after the last final result that counts as the flush answered, for
            services that do not mark their answer ``finalized``.
        segment_timeout_s: Longest wait for a segmented service's transcript (an utterance it
            finds empty gets no frame at all).
        max_backlog_frames: Inbound frames queued but not yet handed to the pipeline beyond this
            mean the service cannot keep up.
    """

    start_timeout_s: float = 10.0
    finalize_timeout_s: float = 2.0
    settle_s: float = 0.3
    segment_timeout_s: float = 5.0
    max_backlog_frames: int = 500  # 10 s of 20 ms frames


class PipecatTranscriber:
    """One call's transcriber over a pipecat STT service (see the module docstring).

    Build it, ``await start()``, ``feed()`` every inbound frame, ``await transcribe(audio)`` when
    the caller stopped, ``await aclose()`` at the end of the call.

    Args:
        spec: The STT service; a new instance is built for this call.
        fallback: Transcribes once the service failed (the shared Whisper); None raises instead.
        call_id: For logs and task names.
        options: Timeouts.
        on_fallback: Called once, with the reason, when the call moves to the fallback.

    Attributes:
        failure: Why the service was given up for this call; None while it serves it.
        fallbacks: Utterances answered by the fallback.
        interim: The latest interim transcript of the utterance in progress (a hint only).
    """

    def __init__(
        self,
        spec: ServiceSpec,
        fallback: Transcriber | None = None,
        *,
        call_id: str = "",
        options: PipecatSTTOptions | None = None,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self._fallback = fallback
        self.call_id = call_id
        self.options = options or PipecatSTTOptions()
        self._on_fallback = on_fallback
        self.failure: str | None = None
        self.fallbacks = 0
        self.interim = ""
        #: Called with the running text since the last answered transcript whenever the service
        #: sends a result, interim ones included (the call session uses it to end turns sooner).
        self.on_partial: Callable[[str], None] | None = None
        self._pipeline: ServicePipeline | None = None
        self.streaming = True
        self._inbox: asyncio.Queue[Frame] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._news = asyncio.Event()  # replaced after every set: see _notify
        self._finals: list[str] = []
        self._finalized = 0  # finals marked finalized so far
        self._last_result_at = 0.0
        self._answered = 0  # len(_finals) at the previous answer
        self._utterance_start = 0
        self._last_audio: np.ndarray | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the service's pipeline in the background (audio fed meanwhile is queued; a
        failure moves the call to the fallback); idempotent."""
        if self._sender is not None or self.failure is not None:
            return
        try:
            service = self.spec.build()
        except ServiceSettingsError:
            log.warning("pipecat stt refused its parameters", extra={"call_sid": self.call_id}, exc_info=True)
            self._fail("bad_parameters")
            return
        self.streaming = not isinstance(service, SegmentedSTTService)
        self._pipeline = ServicePipeline(
            service,
            self._on_frame,
            name=f"call-{self.call_id}-pipecat-stt-{next(_ids)}",
            audio_in_rate=PHONE_RATE if self.streaming else UTTERANCE_RATE,
            start_timeout_s=self.options.start_timeout_s,
        )
        self._sender = asyncio.create_task(self._run(), name=f"call-{self.call_id}-pipecat-stt")

    async def aclose(self) -> None:
        """Stop sending and close the service's pipeline."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        if self._pipeline is not None:
            await self._pipeline.aclose()

    # ---- audio in ------------------------------------------------------------------------------
    def feed(self, ulaw_8k: bytes) -> None:
        """Queue caller audio (8 kHz mu-law) for a streaming service; never blocks."""
        if not self.streaming or self.failure is not None or self._sender is None or not ulaw_8k:
            return
        pcm = ulaw_to_pcm16(ulaw_8k).astype("<i2").tobytes()
        self._inbox.put_nowait(InputAudioRawFrame(audio=pcm, sample_rate=PHONE_RATE, num_channels=1))
        if self._inbox.qsize() > self.options.max_backlog_frames:
            self._fail("backlog")

    async def _run(self) -> None:
        """Start the pipeline, then hand it the queued frames in order."""
        assert self._pipeline is not None
        try:
            await self._pipeline.start()
            while True:
                await self._pipeline.send(await self._inbox.get())
        except PipecatServiceError as e:
            self._fail(e.reason)

    # ---- results -------------------------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, ErrorFrame):
            log.warning(
                "pipecat stt reported an error",
                extra={
                    "call_sid": self.call_id,
                    "service": self.spec.name,
                    "error": self.spec.mask(frame.error),
                },
            )
            self._fail("error")
        elif isinstance(frame, TranscriptionFrame):
            text = frame.text.strip()
            if text:
                self._finals.append(text)
            if frame.finalized:
                self._finalized += 1
            self.interim = ""
        elif isinstance(frame, InterimTranscriptionFrame):
            self.interim = frame.text.strip()
        else:
            return
        self._last_result_at = time.monotonic()
        self._notify()
        tell_running_text(self.on_partial, self._finals[self._answered :], self.interim, self.call_id)

    def _notify(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._notify()
        log.warning(
            "pipecat stt unavailable; the fallback transcribes the rest of the call",
            extra={"call_sid": self.call_id, "service": self.spec.name, "reason": reason},
        )
        if self._on_fallback is not None:
            self._on_fallback(reason)

    # ---- transcripts ---------------------------------------------------------------------------
    async def transcribe(self, pcm16_16k: np.ndarray) -> str:
        """The caller's utterance so far; ``pcm16_16k`` is its audio (segmented services and the
        fallback transcribe it).

        Raises:
            PipecatServiceError: the service failed and there is no fallback.
        """
        if self.failure is None:
            try:
                async with self._lock:
                    text = await (self._from_stream if self.streaming else self._from_segment)(pcm16_16k)
                if text is not None:
                    return text
                # No answer at all (the service heard nothing it would transcribe, or is slow):
                # this utterance goes to the fallback, the service keeps the call.
            except PipecatServiceError as e:
                self._fail(e.reason)
        if self._fallback is None:
            if self.failure is None:
                return ""
            raise PipecatServiceError(self.failure, f"{self.spec.name} failed ({self.failure})")
        self.fallbacks += 1
        return await self._fallback.transcribe(pcm16_16k)

    async def _flush_request(self) -> None:
        await self._inbox.put(VADUserStartedSpeakingFrame())
        await self._inbox.put(VADUserStoppedSpeakingFrame())

    async def _from_stream(self, audio: np.ndarray) -> str | None:
        if not audio_extends(self._last_audio, audio):
            self._utterance_start = self._answered
        self._last_audio = audio
        finalized = self._finalized
        finals = len(self._finals)
        asked_at = time.monotonic()
        await self._flush_request()
        deadline = asked_at + self.options.finalize_timeout_s
        while True:
            if self.failure is not None:
                raise PipecatServiceError(self.failure, f"{self.spec.name} failed")
            now = time.monotonic()
            if self._finalized > finalized:
                break  # the service answered the flush
            quiet_since = max(asked_at, self._last_result_at)
            if (
                len(self._finals) > self._utterance_start
                and not self.interim
                and now - quiet_since >= self.options.settle_s
            ):
                break  # finals and nothing pending: the flush was answered without a mark
            if now >= deadline:
                if len(self._finals) == finals == self._utterance_start:
                    return None
                break
            news = self._news
            wait = min(deadline, quiet_since + self.options.settle_s) - now
            try:
                async with asyncio.timeout(max(0.01, wait)):
                    await news.wait()
            except TimeoutError:
                pass
        self._answered = len(self._finals)
        return " ".join(self._finals[self._utterance_start : self._answered])

    async def _from_segment(self, audio: np.ndarray) -> str | None:
        finals, finalized = len(self._finals), self._finalized
        await self._inbox.put(VADUserStartedSpeakingFrame())
        pcm = audio.astype("<i2").tobytes()
        await self._inbox.put(InputAudioRawFrame(audio=pcm, sample_rate=UTTERANCE_RATE, num_channels=1))
        await self._inbox.put(VADUserStoppedSpeakingFrame())
        try:
            async with asyncio.timeout(self.options.segment_timeout_s):
                while self._finalized == finalized and self.failure is None:
                    await self._news.wait()
        except TimeoutError:
            return None  # an utterance the service found empty gets no transcript at all
        if self.failure is not None:
            raise PipecatServiceError(self.failure, f"{self.spec.name} failed")
        return " ".join(self._finals[finals:])


def audio_extends(previous: np.ndarray | None, audio: np.ndarray) -> bool:
    """True when ``audio`` begins with all of ``previous``: the same utterance, grown."""
    if previous is None or not previous.size or audio.size < previous.size:
        return False
    return bool(np.array_equal(previous, audio[: previous.size]))
