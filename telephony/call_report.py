"""The report of a simulated call: per-turn latencies, marks, violations and errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TurnReport:
    """One turn: the caller's utterance and the bot's reply to it. Times are ms since ``start``.

    Attributes:
        index: 1, 2, ... for the script's utterances; 0 for the greeting (no caller audio; its
            latency counts from ``start``).
        said: the utterance's label (text, ``[dtmf ..]``, ``[wav ..]``); empty for the greeting.
        barge_in: the script made the caller talk over the bot.
        overlapped: bot audio was still playing when the caller started.
        caller_start_ms: first frame (or key press) of the caller's utterance.
        caller_end_ms: last frame (or key press) of the caller's utterance.
        first_bot_audio_ms: first bot ``media`` of the reply received.
        latency_ms: ``first_bot_audio_ms - caller_end_ms`` (voice to voice), None without reply.
        bot_audio_ms: play time of the reply audio received.
        bot_heard_ms: play time of the reply audio that actually played (after clears).
        clear_received: the app sent ``clear`` during this turn.
    """

    index: int
    said: str
    barge_in: bool
    overlapped: bool
    caller_start_ms: float | None
    caller_end_ms: float | None
    first_bot_audio_ms: float | None
    latency_ms: float | None
    bot_audio_ms: float
    bot_heard_ms: float
    clear_received: bool


@dataclass
class CallReport:
    """What happened on one simulated call.

    Attributes:
        call_sid, stream_sid: the ids the simulator used.
        stream_url: the Stream URL from the TwiML.
        duration_ms: from ``start`` to ``stop`` (or the socket closing).
        ended_by: ``caller`` (script done), ``app`` (socket closed by the app) or ``timeout``.
        greeting: the bot's first turn.
        turns: one per utterance spoken.
        marks_sent: mark names the app sent, in order.
        marks_echoed: mark names echoed back, in order.
        clears_received: ``clear`` messages from the app.
        violations: app -> Twilio messages Twilio would reject (Twilio error code first).
        errors: replies that never came, timeouts.
        unspoken: utterances never spoken because the call ended first.
        bot_audio: every bot ``media`` payload received, concatenated (8 kHz mu-law).
        record_path: where the call recording was written, if anywhere.
    """

    call_sid: str
    stream_sid: str
    stream_url: str
    duration_ms: float
    ended_by: str
    greeting: TurnReport
    turns: list[TurnReport]
    marks_sent: list[str]
    marks_echoed: list[str]
    clears_received: int
    violations: list[str]
    errors: list[str]
    unspoken: int
    bot_audio: bytes = field(repr=False)
    record_path: Path | None = None

    @property
    def latencies_ms(self) -> list[float]:
        """Voice-to-voice latency of every caller turn that got a reply."""
        return [t.latency_ms for t in self.turns if t.latency_ms is not None]

    @property
    def ok(self) -> bool:
        """No protocol violation, no missing reply, no timeout, whole script spoken."""
        return not self.violations and not self.errors and self.unspoken == 0

    def format(self) -> str:
        """A readable table of the call."""
        lines = [
            f"call {self.call_sid}  stream {self.stream_sid}  {self.duration_ms / 1000:.1f} s, ended by {self.ended_by}",
            f"{'turn':>4}  {'caller said':<34} {'ended':>8} {'latency':>8} {'bot audio':>9} {'heard':>7}  clear",
        ]
        for turn in (self.greeting, *self.turns):
            said = "(greeting)" if turn.index == 0 else turn.said
            if turn.barge_in:
                said = "(barge-in) " + said
            said = said if len(said) <= 34 else said[:33] + "…"
            lines.append(
                f"{turn.index:>4}  {said:<34} {_ms(turn.caller_end_ms):>8} {_ms(turn.latency_ms):>8} "
                f"{_ms(turn.bot_audio_ms):>9} {_ms(turn.bot_heard_ms):>7}  {'yes' if turn.clear_received else ''}"
            )
        latencies = sorted(self.latencies_ms)
        if latencies:
            lines.append(
                f"latency: {len(latencies)} replies, median {float(np.median(latencies)):.0f} ms, "
                f"min {latencies[0]:.0f} ms, max {latencies[-1]:.0f} ms"
            )
        lines.append(
            f"marks: {len(self.marks_sent)} sent, {len(self.marks_echoed)} echoed; clears: {self.clears_received}; "
            f"protocol violations: {len(self.violations)}"
        )
        lines += [f"  violation: {v}" for v in self.violations[:20]]
        lines += [f"  error: {e}" for e in self.errors]
        if self.unspoken:
            lines.append(f"  {self.unspoken} utterance(s) not spoken: the call ended first")
        if self.record_path is not None:
            lines.append(f"recording: {self.record_path}")
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
