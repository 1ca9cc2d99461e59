"""What a :class:`voice.call_session.CallSession` needs (the line, detector, transcriber,
synthesizer and conversation it is built with), its settings, and what it reports.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from pipeline.model import Channel

FRAME_MS = 20
ULAW_PER_MS = 8  # 8 kHz, one byte per sample


class Line(Protocol):
    """The telephony side of a call."""

    async def send_audio(self, ulaw: bytes) -> None: ...

    async def send_mark(self, name: str) -> None: ...

    async def send_clear(self) -> None: ...

    async def hangup(self, reason: str) -> None: ...


@dataclass
class DetectorEvent:
    # "speech_onset" (first voiced sound, not yet confirmed) | "onset_lost" (it was not speech) |
    # "speech_started" | "speech_stopped" | "end_of_turn"
    kind: str
    audio: np.ndarray | None = None  # 16 kHz int16 utterance, on end_of_turn
    speech_ms: float = 0.0  # speech duration so far (speech_started/stopped) or of the utterance
    since_voice_ms: float = 0.0  # audio since the caller's last voiced frame when the event was made


class Detector(Protocol):
    """Streaming VAD + end-of-turn for one call, fed 16 kHz int16 PCM frames."""

    async def feed(self, frame16k: np.ndarray) -> list[DetectorEvent]: ...

    def reset(self) -> None: ...


class Transcriber(Protocol):
    async def transcribe(self, pcm16_16k: np.ndarray) -> str: ...


class Synthesizer(Protocol):
    def sentences(self, text: str) -> list[str]: ...

    def stream(self, sentences: Sequence[str]) -> AsyncIterator[bytes]:
        """Yield 8 kHz mu-law audio, one item per sentence, in order."""
        ...


class Conversation(Protocol):
    """What the session needs of :class:`pipeline.service.ConversationService`."""

    async def open_call(self, call_sid: str, caller: str | None, *, caller_attested: bool = False) -> Any: ...

    async def handle_text(
        self,
        channel: Channel,
        address: str,
        text: str,
        *,
        external_id: str | None = None,
        kind: str = "message",
        speak: Callable[[str], Awaitable[None]] | None = None,
        stream: Callable[[str], Awaitable[None]] | None = None,
    ) -> Any: ...

    async def mark_interrupted(self, conversation_id: int, seq: int, heard: str) -> None: ...


@dataclass(frozen=True)
class VoiceConfig:
    # Barge-in: the bot pauses at the caller's first sound (``clear``, the reply kept), then
    # speech lasting ``barge_in_min_ms`` interrupts; shorter speech interrupts only if its words
    # carry meaning (not a backchannel), otherwise the bot resumes where it paused. A pause with
    # no decision after ``pause_max_ms`` resumes too.
    barge_in_min_ms: int = 900
    pause_max_ms: int = 2500
    backchannel_max_ms: int = 1500  # longer speech is never a backchannel
    # The caller goes on within this long after their turn ended ("I'd like to cancel ... the
    # order I placed yesterday"): the bot yields and both parts go to the core as one turn.
    resume_window_s: float = 1.0
    # The core did not understand a spoken turn (it is about to ask again): wait until this long
    # after the caller's last word before answering, in case they were only pausing mid-sentence
    # ("can you check on the ... running shoes"); if they go on, both parts are one turn.
    unsure_wait_s: float = 1.0
    # A turn whose words trail off ("I need a refund for") waits this long after the caller's
    # last word before it goes to the core, in case they go on.
    hold_s: float = 1.2
    # No caller audio for this long during a turn after the caller stopped speaking (silence
    # suppression), or for ``stall_gap_ms`` while they were speaking (a stalled stream): the
    # detector is fed silence so turns end on wall-clock time. A line that never suppresses
    # silence (Twilio sends every 20 ms frame) sets ``audio_gap_ms`` to ``stall_gap_ms``: a short
    # gap there is a late packet, and silence fed for it would cut the caller's sentence in two.
    audio_gap_ms: int = 250
    stall_gap_ms: int = 1000
    backchannels: frozenset[str] = frozenset(
        {
            "mm",
            "mmhmm",
            "mm-hmm",
            "mhm",
            "uh-huh",
            "uh",
            "um",
            "okay",
            "ok",
            "yeah",
            "yep",
            "right",
            "sure",
            "yes",
            "i see",
            "got it",
            "alright",
        }
    )
    lead_ms: int = 160  # how far ahead of real time audio is sent
    chunk_ms: int = 200  # a mark after every chunk of this length
    reprompt_after_s: float = 10.0
    reprompts_before_goodbye: int = 1
    dtmf_timeout_s: float = 2.0
    turn_timeout_s: float = 20.0  # STT + core for one turn
    # The conversation store is unreachable (a database outage): the turn is tried again every
    # ``store_retry_s`` for up to ``store_wait_s`` while the caller hears "one moment".
    store_wait_s: float = 45.0
    store_retry_s: float = 1.0
    mark_grace_s: float = 2.0  # after the last audio, how long to wait for its mark
    max_call_s: float = 3600.0
    # Bounds on what the caller's side can pile up (a flood of DTMF frames must not grow memory):
    # turns waiting for the core, and keypad digits before ``#``/the timeout. Extras are dropped
    # and counted in ``CallStats.dropped_events``.
    max_pending_turns: int = 8
    max_dtmf_digits: int = 32


class CallState(StrEnum):
    STARTING = "starting"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"
    ENDING = "ending"
    ENDED = "ended"


@dataclass
class TurnTimings:
    """Per-turn latency figures (milliseconds); stored as an event and exported as metrics."""

    stt_ms: float | None = None
    core_ms: float | None = None
    tts_first_audio_ms: float | None = None
    voice_to_voice_ms: float | None = None  # caller's last voiced audio -> first bot audio sent
    endpoint_ms: float | None = None  # the part of it spent deciding the caller had finished
    text_chars: int = 0


@dataclass
class CallStats:
    turns: list[TurnTimings] = field(default_factory=list)
    interruptions: int = 0
    ignored_backchannels: int = 0
    pauses: int = 0  # the bot paused for a caller's sound (each ends in an interruption or a resume)
    resumes: int = 0  # ...and went on where it paused (a backchannel, a cough, a click)
    stt_failures: int = 0  # turns whose transcription failed (the caller was asked to repeat)
    dropped_events: int = 0  # turns or keypad digits over the session's bounds
    store_waits: int = 0  # turns that waited for the conversation store to come back
    filled_gaps: int = 0  # times caller audio stopped arriving and silence was fed in its place


def tell_running_text(
    on_partial: Callable[[str], None] | None, finals: Sequence[str], interim: str, call_id: str
) -> None:
    """Give a streaming transcriber's running text (its finals since the last answer, then the
    interim result) to ``on_partial``; a failing handler is logged, never raised into the stream."""
    running = " ".join([*finals, interim]).strip()
    if running and on_partial is not None:
        try:
            on_partial(running)
        except Exception:
            logging.getLogger(__name__).exception(
                "partial transcript handler failed", extra={"call_sid": call_id}
            )
