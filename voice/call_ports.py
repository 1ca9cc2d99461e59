"""What a :class:`voice.call_session.CallSession` needs (the line, detector, transcriber,
synthesizer and conversation it is built with), its settings, and what it reports.
"""

from __future__ import annotations

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
    kind: str  # "speech_started" | "speech_stopped" | "end_of_turn"
    audio: np.ndarray | None = None  # 16 kHz int16 utterance, on end_of_turn
    speech_ms: float = 0.0  # speech duration so far (speech_started/stopped) or of the utterance


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
    barge_in_min_ms: int = 500  # caller speech shorter than this never interrupts
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
    voice_to_voice_ms: float | None = None
    text_chars: int = 0


@dataclass
class CallStats:
    turns: list[TurnTimings] = field(default_factory=list)
    interruptions: int = 0
    ignored_backchannels: int = 0
    dropped_events: int = 0  # turns or keypad digits over the session's bounds
