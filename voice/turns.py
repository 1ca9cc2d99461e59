"""Speech detection and end-of-turn decisions for one call, on 16 kHz PCM in 20 ms frames.

Silero VAD says when the caller speaks; the smart-turn v3 model says whether what they said
sounds finished (both run by :mod:`voice.vad`, weights from ``pipecat-ai``). They are loaded once
per process: calls share one Silero ONNX session (each call keeps its own recurrent state) and
one smart-turn session (run on a small thread pool, ~35 ms per decision).

Why the turn does not end on smart-turn alone: smart-turn judges prosody, and it often calls a
finished sentence unfinished, above all one that ends in digits ("my order is four five one
seven"); pipecat then waits its 3 s fallback, which sounds like a dead line. So the turn ends
at the first of:

* ``short_silence`` (0.3 s) of silence and smart-turn says complete: the fast path;
* ``short_silence`` of silence and the speculative transcript of the pause reads as a finished
  sentence (:meth:`SpeechDetector.transcript_complete`, told by the call): Whisper's
  punctuation catches the finished sentences smart-turn misjudges;
* ``long_silence`` (0.8 s) of silence, whatever smart-turn said: longer than the pause
  between words or digit groups, short enough that a caller who is done does not wonder
  whether anyone is there;
* ``hold_silence`` (1.2 s) instead of all of the above when the transcript of the pause trails
  off (:meth:`SpeechDetector.transcript_unfinished`: "I'd like to cancel the..."): a caller
  thinking mid-sentence is not answered;
* ``max_turn`` (25 s) of turn, so a monologue or a noisy line still gets an answer.

A :class:`SpeechOnset` is reported at the first voiced window, before the VAD confirms speech,
so the call can pause the bot at once (and :class:`OnsetLost` when it was only a click).

Smart-turn runs once per pause (when it reaches ``short_silence``); speech resuming before the
turn ends keeps the turn open, and its audio keeps growing. Time here is audio time (samples
fed), never the wall clock, so decisions depend only on the audio.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import numpy as np

from voice.vad import SileroModel, SmartTurnModel, VADParams, VADState

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAME_SAMPLES = 320  # 20 ms
FRAME_BYTES = FRAME_SAMPLES * 2
_ONSET_LOST_FRAMES = 5  # 100 ms without a voiced window: the onset was a click, not speech

__all__ = [
    "EndOfTurnModel",
    "OnsetLost",
    "SileroModel",
    "SmartTurnModel",
    "SpeechDetector",
    "SpeechOnset",
    "SpeechStarted",
    "SpeechStopped",
    "TurnEnded",
    "TurnEvent",
    "VADParams",
    "shared_silero",
    "shared_smart_turn",
]


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class SpeechOnset:
    """The VAD heard the first voiced window of what may become speech (before ``start_secs``
    confirm it): early enough to pause the bot within a few hundred ms of the caller's onset."""

    at: float


@dataclass(frozen=True)
class OnsetLost:
    """A :class:`SpeechOnset` that never became speech (a click, a breath, a short noise)."""

    at: float


@dataclass(frozen=True)
class SpeechStarted:
    """VAD confirmed speech (``start_secs`` of it). ``at`` is audio seconds since the detector began."""

    at: float


@dataclass(frozen=True)
class SpeechStopped:
    """VAD confirmed the speech stopped (``stop_secs`` of silence).

    Attributes:
        at: Audio seconds since the detector began.
        duration: Seconds from the estimated start of this stretch of speech to its last voiced frame.
    """

    at: float
    duration: float


@dataclass(frozen=True, eq=False)
class TurnEnded:
    """The caller finished their turn; ``audio`` is what to transcribe.

    Attributes:
        at: Audio seconds since the detector began, when the decision was made.
        reason: ``"smart_turn"`` (short silence and the model said complete), ``"transcript"``
            (short silence and the transcript reads as finished), ``"silence"`` (long silence) or
            ``"max_duration"``.
        audio: 16 kHz int16 mono audio of the turn, from ~``pre_roll`` before the speech to
            ``tail`` after its last voiced frame.
        silence: Seconds of silence when the decision was made.
        speech_seconds: Seconds from the turn's first speech to its last voiced frame.
        probability: smart-turn's last probability of "complete" for this turn, if it ran.
    """

    at: float
    reason: Literal["smart_turn", "transcript", "silence", "max_duration"]
    audio: np.ndarray = field(repr=False)
    silence: float
    speech_seconds: float
    probability: float | None


TurnEvent = SpeechOnset | OnsetLost | SpeechStarted | SpeechStopped | TurnEnded


# ---------------------------------------------------------------------------------------------
# Shared models


class EndOfTurnModel(Protocol):
    """Judges whether a turn sounds finished (a fake in unit tests, smart-turn in production)."""

    async def probability(self, audio16k: np.ndarray) -> float:
        """Probability, 0..1, that the speaker finished, from the turn's 16 kHz int16 audio."""
        ...


_Model = TypeVar("_Model")


class _LoadedOnFirstUse(Generic[_Model]):
    """One process-wide model, built by ``load`` the first time ``get`` is called (thread-safe)."""

    def __init__(self, load: Callable[[], _Model], lock: threading.Lock) -> None:
        self._load = load
        self._lock = lock
        self._model: _Model | None = None

    def get(self) -> _Model:
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model


_shared_lock = threading.Lock()
_shared_silero = _LoadedOnFirstUse(SileroModel, _shared_lock)
_shared_smart_turn = _LoadedOnFirstUse(SmartTurnModel, _shared_lock)


def shared_silero() -> SileroModel:
    """The process's Silero VAD model (bundled weights), loaded on first use."""
    return _shared_silero.get()


def shared_smart_turn() -> SmartTurnModel:
    """The process's smart-turn model (bundled weights), loaded on first use."""
    return _shared_smart_turn.get()


# ---------------------------------------------------------------------------------------------
# Detector


class SpeechDetector:
    """Speech start/stop and end-of-turn decisions for one call.

    Feed it the caller's audio as 16 kHz int16 mono (any chunk size; it works in 20 ms frames)
    with ``await feed(...)``; it returns the events each chunk caused, in order. A ``TurnEnded``
    carries the turn's audio for speech-to-text. ``feed`` awaits smart-turn (~35 ms) on the one
    frame per pause where it runs; the transport keeps buffering meanwhile.

    Args:
        vad: Shared Silero model (``shared_silero()`` by default).
        smart_turn: End-of-turn model (``shared_smart_turn()`` by default).
        vad_params: Silero thresholds: ``confidence``, ``start_secs`` (speech needed to confirm
            a start), ``stop_secs`` (silence needed to confirm a stop), ``min_volume``.
        short_silence: Silence after which smart-turn is asked; the turn ends if it says complete.
        long_silence: Silence after which the turn ends whatever smart-turn said.
        complete_threshold: smart-turn probability at or above which a turn counts as complete.
        pre_roll: Seconds of audio kept before the confirmed speech start (besides ``start_secs``).
        tail: Seconds of audio kept after the last voiced frame in ``TurnEnded.audio``.
        max_turn: Longest turn, in seconds, before it is ended anyway.
    """

    def __init__(
        self,
        *,
        vad: SileroModel | None = None,
        smart_turn: EndOfTurnModel | None = None,
        vad_params: VADParams | None = None,
        short_silence: float = 0.3,
        long_silence: float = 0.8,
        complete_threshold: float = 0.5,
        pre_roll: float = 0.2,
        tail: float = 0.3,
        max_turn: float = 25.0,
        hold_silence: float = 1.2,
    ) -> None:
        params = vad_params or VADParams()
        if not params.stop_secs <= short_silence <= long_silence:
            raise ValueError("need vad_params.stop_secs <= short_silence <= long_silence")
        self._vad_model = vad or shared_silero()
        self._smart_turn = smart_turn if smart_turn is not None else shared_smart_turn()
        self.vad_params = params
        self.short_silence = short_silence
        self.long_silence = long_silence
        self.complete_threshold = complete_threshold
        self.tail = tail
        self.max_turn = max_turn
        self.hold_silence = max(hold_silence, long_silence)
        # Speech is confirmed start_secs after it began, plus ~0.15 s while pipecat's smoothed
        # volume climbs past min_volume: keep that much more than pre_roll before the confirmation.
        preroll_frames = math.ceil((pre_roll + params.start_secs + 0.15) * SAMPLE_RATE / FRAME_SAMPLES)
        self._preroll: collections.deque[bytes] = collections.deque(maxlen=preroll_frames)
        self._vad = self._vad_model.analyzer(params)
        self._pending = b""
        self._samples = 0
        self._speaking = False
        self._speech_began = 0.0
        self._last_voiced = 0.0
        self._in_turn = False
        self._turn_frames: list[bytes] = []
        self._turn_began = 0.0
        self._turn_first_speech = 0.0
        self._turn_start_samples = 0
        self._transcript_done = False
        self._unfinished = False
        self._onset = False
        self._onset_quiet_frames = 0
        self._checked = False
        self._probability: float | None = None

    @property
    def now(self) -> float:
        """Audio seconds fed so far (in whole frames)."""
        return self._samples / SAMPLE_RATE

    @property
    def speaking(self) -> bool:
        """True between ``SpeechStarted`` and ``SpeechStopped``."""
        return self._speaking

    @property
    def since_voice(self) -> float:
        """Audio seconds since the last voiced frame (~0 while voiced; it grows from the last voiced
        frame on, also in the ``stop_secs`` before the VAD confirms the speech stopped)."""
        return max(0.0, self.now - self._last_voiced)

    @property
    def in_turn(self) -> bool:
        """True between a turn's first ``SpeechStarted`` and its ``TurnEnded``."""
        return self._in_turn

    def utterance(self) -> np.ndarray:
        """The current turn's audio so far (16 kHz int16, with pre-roll); empty between turns."""
        if not self._in_turn:
            return np.zeros(0, dtype=np.int16)
        return np.frombuffer(b"".join(self._turn_frames), dtype=np.int16).copy()

    def reset(self) -> None:
        """Forget the current turn and the VAD's state (e.g. after the call was on hold)."""
        self._vad = self._vad_model.analyzer(self.vad_params)
        self._preroll.clear()
        self._pending = b""
        self._speaking = False
        self._onset = False
        self._end_turn_state()

    async def feed(self, audio: bytes | np.ndarray) -> list[TurnEvent]:
        """Add caller audio (16 kHz int16 mono) and return the events it caused."""
        if isinstance(audio, np.ndarray):
            if audio.dtype != np.int16 or audio.ndim != 1:
                raise ValueError("expected 1-D int16 audio at 16 kHz")
            audio = audio.tobytes()
        data = self._pending + bytes(audio)
        events: list[TurnEvent] = []
        offset = 0
        while len(data) - offset >= FRAME_BYTES:
            await self._step(data[offset : offset + FRAME_BYTES], events)
            offset += FRAME_BYTES
        self._pending = data[offset:]
        return events

    async def _step(self, frame: bytes, events: list[TurnEvent]) -> None:
        self._samples += FRAME_SAMPLES
        now = self.now
        state = self._vad.analyze(frame)
        if self._in_turn:
            self._turn_frames.append(frame)
        else:
            self._preroll.append(frame)

        early = state == VADState.STARTING or self._vad.onset_voiced
        if early and not self._speaking and not self._onset:
            self._onset = True
            self._onset_quiet_frames = 0
            events.append(SpeechOnset(at=now))
        elif self._onset and not self._speaking and state == VADState.QUIET and not early:
            self._onset_quiet_frames += 1
            if self._onset_quiet_frames >= _ONSET_LOST_FRAMES:
                self._onset = False
                events.append(OnsetLost(at=now))
        elif self._onset:
            self._onset_quiet_frames = 0
        if state == VADState.SPEAKING:
            self._last_voiced = now
            self._onset = False
            if not self._speaking:
                self._speaking = True
                self._speech_began = now - self.vad_params.start_secs
                if not self._in_turn:
                    self._begin_turn()
                self._checked = False
                self._transcript_done = False
                self._unfinished = False
                events.append(SpeechStarted(at=now))
        elif state == VADState.QUIET and self._speaking:
            self._speaking = False
            events.append(SpeechStopped(at=now, duration=self._last_voiced - self._speech_began))

        if not self._in_turn:
            return
        if now - self._turn_began >= self.max_turn:
            self._finish("max_duration", events)
            return
        if state in (VADState.SPEAKING, VADState.STARTING):
            return  # talking, or maybe starting to again: never cut in here
        silence = now - self._last_voiced
        if self._unfinished:
            # The words so far trail off ("I'd like to cancel the..."): a pause to think, not the end.
            if silence >= self.hold_silence:
                self._finish("silence", events)
            return
        if silence >= self.short_silence and not self._checked:
            self._checked = True
            try:
                self._probability = await self._smart_turn.probability(self.utterance())
            except Exception:
                # The long-silence rule still ends the turn; a broken model must not hang the call.
                logger.exception("smart-turn failed; falling back to the silence rule")
            else:
                if self._probability >= self.complete_threshold:
                    self._finish("smart_turn", events)
                    return
        if silence >= self.short_silence and self._transcript_done:
            self._finish("transcript", events)
            return
        if silence >= self.long_silence:
            self._finish("silence", events)

    def transcript_complete(self) -> None:
        """The transcript of the audio up to the current pause reads as a finished sentence:
        end the turn once the pause reaches ``short_silence``. Forgotten when speech resumes."""
        if self._in_turn and not self._speaking and not self._unfinished:
            self._transcript_done = True

    def transcript_unfinished(self) -> None:
        """The transcript up to the current pause trails off ("I'd like to cancel the"): wait up to
        ``hold_silence`` for the caller to go on, whatever smart-turn says. Forgotten when speech resumes."""
        if self._in_turn and not self._speaking:
            self._unfinished = True
            self._transcript_done = False

    def _begin_turn(self) -> None:
        self._in_turn = True
        self._turn_frames = list(self._preroll)
        self._preroll.clear()
        self._turn_began = self._speech_began
        self._turn_first_speech = self._speech_began
        self._turn_start_samples = self._samples - len(self._turn_frames) * FRAME_SAMPLES
        self._probability = None

    def _finish(
        self, reason: Literal["smart_turn", "transcript", "silence", "max_duration"], events: list[TurnEvent]
    ) -> None:
        now = self.now
        if self._speaking:
            self._speaking = False
            events.append(SpeechStopped(at=now, duration=self._last_voiced - self._speech_began))
        audio = self.utterance()
        keep = round((self._last_voiced + self.tail) * SAMPLE_RATE) - self._turn_start_samples
        audio = audio[: max(0, keep)]
        events.append(
            TurnEnded(
                at=now,
                reason=reason,
                audio=audio,
                silence=max(0.0, now - self._last_voiced),
                speech_seconds=max(0.0, self._last_voiced - self._turn_first_speech),
                probability=self._probability,
            )
        )
        self._end_turn_state()

    def _end_turn_state(self) -> None:
        self._in_turn = False
        self._turn_frames = []
        self._checked = False
        self._transcript_done = False
        self._unfinished = False
        self._probability = None
