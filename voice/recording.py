"""Call recording: both sides of a call as one stereo WAV (caller left, bot right), aligned by the
wall clock from the start of the call.

A :class:`CallRecording` is handed to :class:`voice.call_session.CallSession`, which taps the one
place caller audio enters the session (``on_audio``, whatever the transport) and wraps its
:class:`~voice.call_ports.Line` in a :class:`RecordedLine`, the one place bot audio leaves it. So
Twilio media streams and browser calls are recorded by the same code.

How the two channels are placed:

* **Caller** audio (16 kHz, as turn detection gets it) is resampled to the recording's 8 kHz and
  written where it arrived: a frame ends no later than the moment it came in; frames that come in
  a burst after a stall follow each other, and a gap (a browser's silence suppression, lost
  packets) stays silent.
* **Bot** audio is written where it plays: the line plays what it is sent in order at real time,
  so a chunk starts when the previous one ends, or when it is sent if the line was idle. The pacer
  sends a little ahead of real time; a ``clear`` (barge-in) drops what was queued and not yet
  played, so the recording drops it too: everything of the bot channel after the clear is erased.

Samples go to two raw files next to the final one while the call runs (memory stays flat however
long the call is); :meth:`CallRecording.write_wav` interleaves them, silencing the spans asked for
(a caller turn in which a card number was spoken), and removes them.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import wave
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from voice.audio import Resampler, ulaw_to_pcm16
from voice.call_ports import Line

log = logging.getLogger(__name__)

RATE = 8000  # the telephone rate: what Twilio carries and what the bot speaks
CALLER_RATE = 16000  # what the session's turn detection is fed
NOTICE = "This call is recorded."
_SAMPLE_BYTES = 2
_BLOCK = RATE * 10  # samples interleaved at a time when the file is written


@dataclass(frozen=True)
class CallerTurnSpan:
    """When the caller made one turn, in seconds from the start of the recording.

    Attributes:
        number: the session's turn number (the ``N`` of the turn's ``voice:CALL:N`` external id).
        kind: ``"speech"`` or ``"dtmf"``.
        start: the first audio of the turn (the first key press of keyed digits).
        end: the end of the turn (its last voiced audio, or the last key press).
    """

    number: int
    kind: str
    start: float
    end: float


def _read(file: BinaryIO, at: int, count: int) -> np.ndarray:
    """``count`` samples of a raw channel file from sample ``at`` (silence past its end)."""
    file.seek(at * _SAMPLE_BYTES)
    data = file.read(count * _SAMPLE_BYTES)
    out = np.zeros(count, dtype=np.int16)
    got = np.frombuffer(data[: len(data) // _SAMPLE_BYTES * _SAMPLE_BYTES], dtype="<i2")
    out[: got.size] = got
    return out


class _Channel:
    """One channel as raw 16-bit samples in a file, written at any sample position (holes read as
    silence)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = path.open("w+b")
        self.end = 0  # samples: one past the last sample written

    def write(self, at: int, pcm: np.ndarray) -> None:
        if pcm.size == 0:
            return
        self._file.seek(at * _SAMPLE_BYTES)
        self._file.write(pcm.astype("<i2").tobytes())
        self.end = max(self.end, at + pcm.size)

    def erase_from(self, at: int) -> None:
        """Silence everything from sample ``at`` on."""
        if self.end > at:
            self._file.seek(at * _SAMPLE_BYTES)
            self._file.truncate()
            self.end = at

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class CallRecording:
    """Both sides of one call, as it happens (see the module docstring).

    Times (``at``) are the session's clock in seconds; the first one given (:meth:`begin`, or the
    first audio) is the start of the recording.

    Args:
        folder: where the raw channels are kept while the call runs (created if missing).
        keep: called once by :meth:`finish` with this recording, the call id and the conversation
            id: it writes the file (:meth:`write_wav`) and records it (crm_bridge/recordings.py).
        notice: what the caller is told first (the session says it before the greeting).
    """

    def __init__(
        self,
        folder: Path,
        keep: Callable[[CallRecording, str, int | None], Awaitable[Any]] | None = None,
        *,
        notice: str = NOTICE,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.notice = notice
        self.name = secrets.token_hex(16)  # file names say nothing about the call or the caller
        self._keep = keep
        self._caller = _Channel(folder / f"{self.name}.caller.raw")
        self._bot = _Channel(folder / f"{self.name}.bot.raw")
        self._to8k = Resampler(CALLER_RATE, RATE)
        self._t0: float | None = None
        self._caller_at = 0  # samples: where the next caller audio goes at the earliest
        self._bot_at = 0  # samples: where the queued bot audio ends (the line plays it in order)
        self.turns: dict[int, CallerTurnSpan] = {}
        self._finished = False

    # ---- what the session tells it -------------------------------------------------------------
    def begin(self, at: float) -> None:
        """The call starts now (before the first words are spoken); later calls change nothing."""
        if self._t0 is None:
            self._t0 = at

    def _sample(self, at: float) -> int:
        self.begin(at)
        assert self._t0 is not None
        return max(0, round((at - self._t0) * RATE))

    def caller_audio(self, pcm16k: np.ndarray, at: float) -> None:
        """Caller audio (16 kHz int16) that arrived at ``at``."""
        if self._finished:
            return
        pcm = self._to8k.process(pcm16k)
        arrived = self._sample(at)
        start = max(self._caller_at, arrived - pcm.size)
        self._caller.write(start, pcm)
        self._caller_at = start + pcm.size

    def bot_audio(self, ulaw: bytes, at: float) -> None:
        """Bot audio (8 kHz mu-law) sent to the line at ``at``: it plays after what is queued."""
        if self._finished or not ulaw:
            return
        pcm = ulaw_to_pcm16(ulaw)
        start = max(self._bot_at, self._sample(at))
        self._bot.write(start, pcm)
        self._bot_at = start + pcm.size

    def bot_cleared(self, at: float) -> None:
        """The line dropped the bot audio not played yet (``clear``): it was never heard."""
        if self._finished:
            return
        now = self._sample(at)
        self._bot.erase_from(now)
        self._bot_at = min(self._bot_at, now)

    def caller_turn(self, number: int, kind: str, start: float, end: float) -> None:
        """The caller's turn ``number`` spanned ``start``..``end`` (session clock)."""
        if self._t0 is None:
            self.begin(start)
        assert self._t0 is not None
        self.turns[number] = CallerTurnSpan(
            number, kind, max(0.0, start - self._t0), max(0.0, end - self._t0)
        )

    async def finish(self, call_sid: str, conversation_id: int | None) -> None:
        """The call ended: hand the recording over to be kept (once); without a keeper it is dropped.
        A failure is logged with the call, never raised into the call's shutdown."""
        if self._finished:
            return
        self._finished = True
        self._caller.close()
        self._bot.close()
        try:
            if self._keep is not None and self._t0 is not None:
                await self._keep(self, call_sid, conversation_id)
        except Exception:
            log.exception("call recording could not be stored", extra={"call_sid": call_sid})
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the raw channels (the WAV, once written, stays)."""
        self._caller.remove()
        self._bot.remove()

    # ---- the file ------------------------------------------------------------------------------
    @property
    def samples(self) -> int:
        """Length of the recording so far, in samples per channel."""
        return max(self._caller.end, self._bot.end)

    @property
    def duration_s(self) -> float:
        return self.samples / RATE

    def write_wav(self, path: Path, silence: Iterable[tuple[float, float]] = ()) -> float:
        """Write the stereo WAV (caller left, bot right) to ``path``, with both channels silent in
        each ``(start, end)`` span (seconds from the start). Returns its duration in seconds.

        Blocking file work: run it in a thread."""
        total = self.samples
        spans = [
            (max(0, int(start * RATE)), min(total, int(np.ceil(end * RATE))))
            for start, end in silence
            if end > start
        ]
        self._caller.flush()
        self._bot.flush()
        tmp = path.with_suffix(".part")
        try:
            with (
                self._caller.path.open("rb") as caller,
                self._bot.path.open("rb") as bot,
                wave.open(str(tmp), "wb") as out,
            ):
                out.setnchannels(2)
                out.setsampwidth(_SAMPLE_BYTES)
                out.setframerate(RATE)
                for at in range(0, total, _BLOCK):
                    count = min(_BLOCK, total - at)
                    block = np.stack([_read(caller, at, count), _read(bot, at, count)], axis=1)
                    for start, end in spans:
                        lo, hi = max(start, at), min(end, at + count)
                        if lo < hi:
                            block[lo - at : hi - at, :] = 0
                    out.writeframes(block.astype("<i2").tobytes())
            tmp.replace(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return total / RATE


class RecordedLine:
    """A :class:`~voice.call_ports.Line` that tells a :class:`CallRecording` what the bot sends
    and when the line is cleared; everything else goes straight to the wrapped line."""

    def __init__(self, line: Line, recording: CallRecording, clock: Callable[[], float]) -> None:
        self._line = line
        self._recording = recording
        self._now = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._line, name)

    async def send_audio(self, ulaw: bytes) -> None:
        self._recording.bot_audio(ulaw, self._now())
        await self._line.send_audio(ulaw)

    async def send_mark(self, name: str) -> None:
        await self._line.send_mark(name)

    async def send_clear(self) -> None:
        self._recording.bot_cleared(self._now())
        await self._line.send_clear()

    async def hangup(self, reason: str) -> None:
        await self._line.hangup(reason)


__all__ = ["NOTICE", "RATE", "CallRecording", "CallerTurnSpan", "RecordedLine"]
