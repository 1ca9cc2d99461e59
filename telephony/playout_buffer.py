"""Twilio's outbound audio queue of one simulated call: playout in real time, marks and clear."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from voice.audio import (
    ULAW_RATE,
)


@dataclass
class _Segment:
    start: float
    audio: bytearray
    tag: int


class PlayoutBuffer:
    """Twilio's outbound audio queue for one call, on a clock the caller passes in (seconds).

    Audio plays back to back in arrival order, starting when it arrives if nothing is playing.
    A mark is due when everything queued before it has played. :meth:`clear` drops what has not
    played yet and returns every pending mark at once. What did play is kept, with start times,
    as the record of what the caller heard.

    Args:
        instant: treat audio as played the moment it arrives (no real-time playout), so marks
            are due at once; for runs that are not real time.
        rate: samples (bytes of mu-law) per second.
    """

    def __init__(self, *, instant: bool = False, rate: int = ULAW_RATE) -> None:
        self.instant = instant
        self.rate = rate
        self._segments: list[_Segment] = []
        self._marks: deque[tuple[float, str]] = deque()
        self._end = -math.inf  # when the queued audio finishes playing

    @property
    def play_end(self) -> float:
        """When the audio queued so far finishes playing (``-inf`` before any audio)."""
        return self._end

    def is_playing(self, now: float) -> bool:
        """True while queued audio has not finished playing."""
        return self._end > now + 1e-9

    def add_audio(self, now: float, audio: bytes, tag: int = 0) -> float:
        """Queue audio that arrived at ``now``; ``tag`` labels it (e.g. with the turn number).

        Returns:
            When it starts playing.
        """
        if not audio:
            return max(now, self._end)
        last = self._segments[-1] if self._segments else None
        last_end = last.start + len(last.audio) / self.rate if last is not None else -math.inf
        # Instant playout still lays audio out back to back, so the recording stays listenable.
        start = max(now, last_end if self.instant else self._end)
        if last is not None and last.tag == tag and abs(last_end - start) < 1e-6:
            last.audio += audio
        else:
            self._segments.append(_Segment(start, bytearray(audio), tag))
        self._end = now if self.instant else start + len(audio) / self.rate
        return start

    def add_mark(self, now: float, name: str) -> None:
        """Queue a mark that arrived at ``now``: due when the audio queued before it has played."""
        self._marks.append((max(now, self._end), name))

    def due_marks(self, now: float) -> list[str]:
        """Remove and return, in order, the marks whose audio has finished playing by ``now``."""
        names = []
        while self._marks and self._marks[0][0] <= now + 1e-9:
            names.append(self._marks.popleft()[1])
        return names

    def clear(self, now: float) -> list[str]:
        """Drop the audio not played by ``now``; remove and return all pending marks in order."""
        names = [name for _, name in self._marks]
        self._marks.clear()
        if self.instant:  # everything played on arrival: nothing to drop
            return names
        kept: list[_Segment] = []
        for segment in self._segments:
            played = round((now - segment.start) * self.rate)
            if played >= len(segment.audio):
                kept.append(segment)
            elif played > 0:
                del segment.audio[played:]
                kept.append(segment)
        self._segments = kept
        self._end = min(self._end, now)
        return names

    def retag(self, old: int, new: int) -> None:
        """Relabel audio tagged ``old`` (a reply that turned out to belong to another turn)."""
        for segment in self._segments:
            if segment.tag == old:
                segment.tag = new

    def heard_seconds(self, tag: int | None = None, *, until: float = math.inf) -> float:
        """Play time of the audio (with ``tag``, or all) that has played by ``until``."""
        if self.instant:
            until = math.inf
        total = 0.0
        for segment in self._segments:
            if tag is None or segment.tag == tag:
                total += max(0.0, min(len(segment.audio) / self.rate, until - segment.start))
        return total

    def segments(self) -> list[tuple[float, bytes, int]]:
        """Queued and played audio as ``(start, mu-law, tag)``, in playing order."""
        return [(s.start, bytes(s.audio), s.tag) for s in self._segments]
