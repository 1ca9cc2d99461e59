"""A simulated Twilio caller, behind ``closeloop call``: real audio over the real media stream.

It does what Twilio does for an inbound call answered with ``<Connect><Stream>``: POSTs the
voice webhook (signed when an auth token is given), parses the Stream URL and ``<Parameter>``s
from the TwiML, opens the WebSocket (signed upgrade), sends ``connected`` and ``start``, then
20 ms ``media`` frames *continuously* for the whole call (mu-law silence between utterances, as
a phone line does), ``dtmf`` for key presses and a final ``stop``. The app's audio goes into a
simulated playout buffer that plays in real time; ``mark``s are echoed when the audio queued
before them has finished playing, and a ``clear`` drops unplayed audio and echoes pending marks
at once. Every app -> Twilio message is checked with
:func:`telephony.twilio_protocol.parse_outbound`; violations end up in the report.

Rules the simulator follows (also the contract of its measurements):

* **Stream URL scheme**: the simulator connects to the Stream URL from the TwiML, except that a
  ``wss://`` URL is opened as ``ws://`` (same host, port and path) when the webhook base URL is
  plain ``http://``: a local server has no TLS even when it announces ``wss://`` the way Twilio
  requires. The upgrade signature is still computed over the exact Stream URL from the TwiML.
* **Bot finished**: a reply is over when it has started (at least one bot ``media`` after the
  caller's audio ended), no bot audio has arrived for :data:`BOT_DONE_SILENCE_S` and the playout
  buffer is drained. Then the caller waits until ``pause_ms`` after the bot's audio finished
  playing (no earlier than the detection) and speaks. A reply that does not start within
  ``idle_timeout_s`` is an error in the report and the script goes on.
* **Turns**: turn *n* runs from the start of the caller's utterance *n* to the start of
  utterance *n + 1*. Bot audio that arrives while the caller is still speaking belongs to the
  previous turn's reply (the bot was talking over the caller).
* **Latency** (voice to voice) is the time from the last frame of the caller's utterance (DTMF:
  the last key press) to the first bot ``media`` received after it. Rendered speech is trimmed of
  leading and trailing silence, so this counts from the end of speech. In a barge-in turn, bot
  audio received before the app's first ``clear`` of that turn is the interrupted reply, not the
  new one, so it does not count.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import ipaddress
import math
import secrets
import subprocess
import sys
import tempfile
import urllib.parse
import wave
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from telephony.twilio_protocol import (
    DTMF_DIGITS,
    parse_outbound,
    twilio_connected,
    twilio_dtmf,
    twilio_mark,
    twilio_media,
    twilio_start,
    twilio_stop,
)
from voice.audio import (
    ULAW_FRAME_BYTES,
    ULAW_RATE,
    ULAW_SILENCE,
    frames,
    pcm16_to_ulaw,
    resample,
    ulaw_to_pcm16,
    wav_to_pcm16,
)

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CALLER = "+15550100001"
DEFAULT_CALLED = "+15550009999"
DEFAULT_ACCOUNT_SID = "AC" + "0" * 31 + "1"
VOICE_PATH = "/twilio/voice"

FRAME_S = ULAW_FRAME_BYTES / ULAW_RATE
"""Play time of one 160-byte media frame: 20 ms."""
BOT_DONE_SILENCE_S = 0.7
"""No bot audio for this long (and the playout buffer drained) means the bot finished its turn."""
DTMF_GAP_S = 0.25
"""Time between two key presses of one ``dtmf`` utterance."""
ESPEAK_ARGS = ("-v", "en-us", "-s", "165")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2

_POLL_S = 0.02
_TRIM_WINDOW = 80  # 10 ms at 8 kHz
_TRIM_LEVEL = 300.0  # RMS (int16 scale, about -40 dBFS) that counts as speech when trimming
_TRIM_MARGIN = 2  # windows of silence kept around speech
_TTS_CACHE: dict[str, bytes] = {}


class CallSetupError(RuntimeError):
    """The call could not be set up: webhook refused, bad TwiML, stream upgrade refused."""


class ServerUnreachable(CallSetupError):
    """Nothing answered at the base URL (connection refused, DNS, connect timeout)."""


class TwimlError(ValueError):
    """The voice webhook's TwiML does not connect the call to a media stream."""


@dataclass(frozen=True)
class Utterance:
    """One step of the caller's script: speak ``text``, play ``wav``, or press ``dtmf`` keys.

    Attributes:
        text: words to speak (rendered with espeak-ng).
        wav: a WAV file to play (any rate, mono or stereo, integer PCM).
        dtmf: keys to press instead of speaking, e.g. ``"1234#"``.
        dtmf_from: keys to press, asked for when this step comes (a one-time code the caller
            reads on their phone once the bot has texted it).
        barge_in_after_ms: speak while the bot is still talking, this many ms after the bot's
            audio (the reply to the previous step, or the greeting) started playing.
        pause_ms: otherwise, wait this long after the bot's audio finished before speaking.
    """

    text: str | None = None
    wav: Path | None = None
    dtmf: str | None = None
    barge_in_after_ms: int | None = None
    pause_ms: int = 600
    dtmf_from: Callable[[], Awaitable[str]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in ("text", "wav", "dtmf", "dtmf_from") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"an utterance needs exactly one of text, wav, dtmf, dtmf_from; got {given or 'none'}"
            )
        if self.text is not None and not self.text.strip():
            raise ValueError("utterance text is blank")
        if self.dtmf is not None and (not self.dtmf or set(self.dtmf) - DTMF_DIGITS):
            raise ValueError(f"dtmf must be keys from 0-9 * #, got {self.dtmf!r}")
        if self.barge_in_after_ms is not None and self.barge_in_after_ms < 0:
            raise ValueError("barge_in_after_ms must be >= 0")
        if self.pause_ms < 0:
            raise ValueError("pause_ms must be >= 0")

    @property
    def label(self) -> str:
        """What the caller did, for reports: the text, ``[dtmf 12#]`` or ``[wav name.wav]``."""
        if self.text is not None:
            return self.text
        if self.dtmf is not None:
            return f"[dtmf {self.dtmf}]"
        if self.dtmf_from is not None:
            return "[dtmf from the phone]"
        return f"[wav {Path(self.wav or '').name}]"


# --- pure pieces ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamTarget:
    """Where ``<Connect><Stream>`` sends the call: the URL and the ``<Parameter>``s, in order."""

    url: str
    parameters: dict[str, str]


def parse_stream_twiml(xml: str) -> StreamTarget:
    """Read the Stream URL and Parameters from voice TwiML, as Twilio would.

    Raises:
        TwimlError: not XML, no ``<Response><Connect><Stream>``, a Stream URL that is not an
            absolute ``ws(s)://`` URL or has a query string (Twilio drops it: use Parameters),
            or a Parameter without a name.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise TwimlError(f"the voice webhook did not answer XML: {e}") from None
    stream = root.find("./Connect/Stream") if root.tag == "Response" else None
    if stream is None:
        raise TwimlError("the TwiML has no <Response><Connect><Stream>: the call would not reach the bot")
    url = (stream.get("url") or "").strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise TwimlError(f"<Stream url> must be an absolute wss:// URL, got {url!r}")
    if parts.query or parts.fragment:
        raise TwimlError("<Stream url> takes no query string: pass data as <Parameter>s")
    parameters: dict[str, str] = {}
    for param in stream.findall("Parameter"):
        name = param.get("name")
        if not name:
            raise TwimlError("a <Parameter> has no name")
        parameters[name] = param.get("value", "")
    return StreamTarget(url, parameters)


def media_socket_url(stream_url: str, base_url: str) -> str:
    """The URL the simulator opens for a Stream URL (the wss -> ws rule).

    A ``wss://`` Stream URL is opened as ``ws://`` (same host, port and path) when the webhook
    base URL is plain ``http://``; anything else is opened as given.
    """
    stream = urllib.parse.urlsplit(stream_url)
    if stream.scheme == "wss" and urllib.parse.urlsplit(base_url).scheme.lower() == "http":
        return urllib.parse.urlunsplit(stream._replace(scheme="ws"))
    return stream_url


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


def trim_silence(pcm: np.ndarray) -> np.ndarray:
    """Cut leading and trailing silence (10 ms windows under about -40 dBFS) from 8 kHz PCM."""
    n = pcm.size // _TRIM_WINDOW
    if n == 0:
        return pcm
    windows = pcm[: n * _TRIM_WINDOW].astype(np.float64).reshape(n, _TRIM_WINDOW)
    loud = np.flatnonzero(np.sqrt((windows * windows).mean(axis=1)) > _TRIM_LEVEL)
    if loud.size == 0:
        return pcm
    first = max(0, int(loud[0]) - _TRIM_MARGIN) * _TRIM_WINDOW
    last = min(n, int(loud[-1]) + 1 + _TRIM_MARGIN) * _TRIM_WINDOW
    return pcm[first:last]


def render_tts(text: str, *, cache_dir: Path | None = None) -> bytes:
    """Speak ``text`` with espeak-ng (en-us, 165 wpm) as 8 kHz mu-law, silence trimmed.

    Results are cached in memory by text, and in ``cache_dir`` when given.

    Raises:
        RuntimeError: espeak-ng is not installed or failed.
    """
    if text in _TTS_CACHE:
        return _TTS_CACHE[text]
    cached = None
    if cache_dir is not None:
        key = hashlib.sha256(" ".join((*ESPEAK_ARGS, text)).encode()).hexdigest()[:32]
        cached = cache_dir / f"{key}.ulaw"
        if cached.is_file():
            _TTS_CACHE[text] = cached.read_bytes()
            return _TTS_CACHE[text]
    with tempfile.TemporaryDirectory(prefix="closeloop-tts-") as tmp:
        out = Path(tmp) / "speech.wav"
        try:
            subprocess.run(
                ["espeak-ng", *ESPEAK_ARGS, "--stdin", "-w", str(out)],
                input=text.encode(),
                capture_output=True,
                check=True,
                timeout=60,
            )
        except FileNotFoundError:
            raise RuntimeError("espeak-ng is not installed: run `apt-get install -y espeak-ng`") from None
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"espeak-ng failed: {e}") from e
        ulaw = _to_phone_audio(out.read_bytes())
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(ulaw)
    _TTS_CACHE[text] = ulaw
    return ulaw


def load_wav(path: Path) -> bytes:
    """A WAV file as 8 kHz mu-law, silence trimmed.

    Raises:
        ValueError: not an integer PCM WAV file.
        OSError: the file cannot be read.
    """
    return _to_phone_audio(path.read_bytes())


def _to_phone_audio(wav: bytes) -> bytes:
    pcm, rate = wav_to_pcm16(wav)
    return pcm16_to_ulaw(trim_silence(resample(pcm, rate, ULAW_RATE)))


# --- report --------------------------------------------------------------------------------


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


# --- the call ------------------------------------------------------------------------------


class _HungUp(Exception):
    """The app closed the media stream."""


@dataclass
class _Turn:
    index: int
    said: str
    barge_in: bool = False
    overlapped: bool = False
    caller_start: float | None = None
    caller_end: float | None = None
    first_bot_at: float | None = None
    first_bot_play_at: float | None = None
    bot_bytes: int = 0
    clears: int = 0
    barge_resolved: bool = False


class _Call:
    """One media stream, Twilio side: the frame pump, the receiver and the script driver."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        stream_sid: str,
        call_sid: str,
        account_sid: str,
        parameters: dict[str, str],
        realtime: bool,
        idle_timeout_s: float,
    ) -> None:
        self._ws = ws
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.account_sid = account_sid
        self.parameters = parameters
        self.realtime = realtime
        self.idle_timeout_s = idle_timeout_s
        self.clock = asyncio.get_running_loop().time
        self.playout = PlayoutBuffer(instant=not realtime)
        self.t0 = 0.0
        self.ended_at: float | None = None
        self.turns: list[_Turn] = [_Turn(0, "")]
        self.caller_audio = bytearray()
        self.bot_audio = bytearray()
        self.marks_sent: list[str] = []
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.violations: list[str] = []
        self.errors: list[str] = []
        self.unspoken = 0
        self.ended_by = "caller"
        self._seq = 0
        self._lock = asyncio.Lock()
        self._speech: deque[bytes] = deque()
        self._speaking: _Turn | None = None
        self._last_bot_audio = -math.inf
        self._stopping = False
        self._closed = asyncio.Event()

    async def run(self, script: Sequence[Utterance], audio: Sequence[bytes], max_call_seconds: float) -> None:
        await self._ws.send(twilio_connected())
        async with self._lock:
            self._seq = 1
            self.t0 = self.clock()
            self.turns[0].caller_start = self.turns[0].caller_end = self.t0
            await self._ws.send(
                twilio_start(self.stream_sid, self.call_sid, self.account_sid, self.parameters, seq=1)
            )
        pump = asyncio.create_task(self._pump(), name=f"sim-pump-{self.call_sid}")
        receiver = asyncio.create_task(self._receive(), name=f"sim-receive-{self.call_sid}")
        try:
            async with asyncio.timeout(max_call_seconds):
                await self._drive(script, audio)
        except _HungUp:
            self.ended_by = "app"
        except TimeoutError:
            self.ended_by = "timeout"
            self.errors.append(f"the call hit max_call_seconds ({max_call_seconds:g} s)")
        finally:
            self._stopping = True
            await _finish(pump)
            self.ended_at = self.clock()
            if not self._closed.is_set():
                try:
                    await self._echo_due_marks()  # audio that finished playing before the hang-up
                    await self._send(twilio_stop, self.account_sid, self.call_sid)
                    await self._ws.close()
                except ConnectionClosed:
                    pass
            self.playout.clear(self.ended_at)  # what had not played at the hang-up never will
            await _finish(receiver)

    # -- script -----------------------------------------------------------------------------

    async def _drive(self, script: Sequence[Utterance], audio: Sequence[bytes]) -> None:
        if not (script and script[0].barge_in_after_ms is not None):
            await self._wait_reply_done(self.turns[0])
        for i, (utterance, ulaw) in enumerate(zip(script, audio, strict=True), start=1):
            self.unspoken = len(script) - i + 1
            previous = self.turns[-1]
            if utterance.barge_in_after_ms is None:
                await self._sleep_until(self.playout.play_end + utterance.pause_ms / 1000)
            else:
                await self._wait_reply_started(previous)
                if previous.first_bot_play_at is not None:
                    await self._sleep_until(previous.first_bot_play_at + utterance.barge_in_after_ms / 1000)
            turn = _Turn(i, utterance.label, barge_in=utterance.barge_in_after_ms is not None)
            self.turns.append(turn)
            await self._speak(turn, utterance, ulaw)
            self.unspoken -= 1
            if i == len(script) or script[i].barge_in_after_ms is None:
                await self._wait_reply_done(turn)

    async def _speak(self, turn: _Turn, utterance: Utterance, ulaw: bytes) -> None:
        if utterance.dtmf is not None or utterance.dtmf_from is not None:
            keys = utterance.dtmf if utterance.dtmf is not None else await utterance.dtmf_from()  # type: ignore[misc]
            if not keys or set(keys) - DTMF_DIGITS:
                raise ValueError(f"dtmf must be keys from 0-9 * #, got {keys!r}")
            turn.caller_start = self.clock()
            turn.overlapped = self.playout.is_playing(turn.caller_start)
            for k, digit in enumerate(keys):
                if k:
                    await self._sleep_until(self.clock() + DTMF_GAP_S)
                await self._send(twilio_dtmf, digit)
            turn.caller_end = self.clock()
            return
        # An empty WAV still makes a (silent) utterance, so the turn has an end to measure from.
        self._speech.extend(frames(ulaw or bytes([ULAW_SILENCE]), pad=True))
        self._speaking = turn
        while turn.caller_end is None:
            self._check_open()
            await asyncio.sleep(_POLL_S)

    async def _wait_reply_done(self, turn: _Turn) -> None:
        """Until the reply to ``turn`` started and is over (see the module's "Bot finished")."""
        deadline = (turn.caller_end or self.clock()) + self.idle_timeout_s
        while True:
            self._check_open()
            now = self.clock()
            if turn.first_bot_at is not None:
                if now - self._last_bot_audio >= BOT_DONE_SILENCE_S and not self.playout.is_playing(now):
                    return
            elif now >= deadline:
                self._no_reply(turn)
                return
            await asyncio.sleep(_POLL_S)

    async def _wait_reply_started(self, turn: _Turn) -> None:
        deadline = (turn.caller_end or self.clock()) + self.idle_timeout_s
        while turn.first_bot_play_at is None:
            self._check_open()
            if self.clock() >= deadline:
                self._no_reply(turn)
                return
            await asyncio.sleep(_POLL_S)

    def _no_reply(self, turn: _Turn) -> None:
        what = "no greeting" if turn.index == 0 else f"turn {turn.index}: no reply"
        self.errors.append(f"{what}: no bot audio within {self.idle_timeout_s:g} s (idle_timeout_s)")

    async def _sleep_until(self, when: float) -> None:
        delay = when - self.clock()
        if delay <= 0:
            return
        try:
            await asyncio.wait_for(self._closed.wait(), delay)
        except TimeoutError:
            return
        raise _HungUp

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise _HungUp

    # -- wire -------------------------------------------------------------------------------

    async def _send(self, make: Any, *args: Any) -> None:
        """Send one message built by ``make(stream_sid, seq, *args)``, numbered in send order."""
        async with self._lock:
            self._seq += 1
            await self._ws.send(make(self.stream_sid, self._seq, *args))

    async def _pump(self) -> None:
        """Send a 20 ms media frame every 20 ms from ``start`` on: speech when queued, else silence."""
        silence = bytes([ULAW_SILENCE]) * ULAW_FRAME_BYTES
        n = 0
        try:
            while not self._stopping:
                speech = bool(self._speech)
                delay = self.t0 + n * FRAME_S - self.clock()
                if delay > 0 and (self.realtime or not speech):
                    await asyncio.sleep(delay)
                    continue  # re-check: the driver may have queued speech meanwhile
                frame = self._speech.popleft() if speech else silence
                now = self.clock()
                turn = self._speaking
                if speech and turn is not None and turn.caller_start is None:
                    turn.caller_start = now
                    turn.overlapped = self.playout.is_playing(now)
                await self._send(twilio_media, n + 1, n * 20, frame)
                self.caller_audio += frame
                if speech and not self._speech and turn is not None:
                    turn.caller_end = now
                    self._speaking = None
                n += 1
                await self._echo_due_marks()
        except ConnectionClosed:
            self._closed.set()

    async def _echo_due_marks(self) -> None:
        for name in self.playout.due_marks(self.clock()):
            await self._send(twilio_mark, name)
            self.marks_echoed.append(name)

    async def _receive(self) -> None:
        try:
            async for frame in self._ws:
                await self._on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self._closed.set()

    async def _on_frame(self, frame: str | bytes) -> None:
        now = self.clock()
        try:
            message = parse_outbound(frame, stream_sid=self.stream_sid)
        except ValueError as e:
            self.violations.append(f"{(now - self.t0) * 1000:.0f} ms: {e}")
            return
        if self._stopping:
            return
        event = message["event"]
        if event == "media":
            self._on_bot_audio(now, base64.b64decode(message["media"]["payload"]))
        elif event == "mark":
            name = message["mark"]["name"]
            self.marks_sent.append(name)
            self.playout.add_mark(now, name)
            await self._echo_due_marks()
        else:  # clear
            self.clears += 1
            self._on_clear()
            for name in self.playout.clear(now):
                await self._send(twilio_mark, name)
                self.marks_echoed.append(name)

    def _reply_turn(self) -> _Turn:
        """The turn whose reply bot audio arriving now belongs to (see "Turns")."""
        current = self.turns[-1]
        return current if current.caller_end is not None or len(self.turns) == 1 else self.turns[-2]

    def _on_bot_audio(self, now: float, audio: bytes) -> None:
        turn = self._reply_turn()
        start = self.playout.add_audio(now, audio, tag=turn.index)
        if turn.first_bot_at is None:
            turn.first_bot_at, turn.first_bot_play_at = now, start
        turn.bot_bytes += len(audio)
        self.bot_audio += audio
        self._last_bot_audio = now

    def _on_clear(self) -> None:
        current = self.turns[-1]
        current.clears += 1
        if current.barge_in and current.caller_start is not None and not current.barge_resolved:
            # Audio taken as this turn's reply before the app's first clear was the interrupted one.
            current.barge_resolved = True
            if current.first_bot_at is not None:
                previous = self.turns[-2]
                previous.bot_bytes += current.bot_bytes
                current.first_bot_at = current.first_bot_play_at = None
                current.bot_bytes = 0
                self.playout.retag(current.index, previous.index)

    # -- results ----------------------------------------------------------------------------

    def report(self, stream_url: str, record_path: Path | None) -> CallReport:
        end = self.ended_at if self.ended_at is not None else self.clock()

        def rel(t: float | None) -> float | None:
            return None if t is None else (t - self.t0) * 1000

        def turn_report(t: _Turn) -> TurnReport:
            latency = None
            if t.first_bot_at is not None and t.caller_end is not None:
                latency = (t.first_bot_at - t.caller_end) * 1000
            return TurnReport(
                index=t.index,
                said=t.said,
                barge_in=t.barge_in,
                overlapped=t.overlapped,
                caller_start_ms=rel(t.caller_start),
                caller_end_ms=rel(t.caller_end),
                first_bot_audio_ms=rel(t.first_bot_at),
                latency_ms=latency,
                bot_audio_ms=t.bot_bytes * 1000 / ULAW_RATE,
                bot_heard_ms=self.playout.heard_seconds(t.index, until=end) * 1000,
                clear_received=t.clears > 0,
            )

        return CallReport(
            call_sid=self.call_sid,
            stream_sid=self.stream_sid,
            stream_url=stream_url,
            duration_ms=(end - self.t0) * 1000,
            ended_by=self.ended_by,
            greeting=turn_report(self.turns[0]),
            turns=[turn_report(t) for t in self.turns[1:]],
            marks_sent=list(self.marks_sent),
            marks_echoed=list(self.marks_echoed),
            clears_received=self.clears,
            violations=list(self.violations),
            errors=list(self.errors),
            unspoken=self.unspoken,
            bot_audio=bytes(self.bot_audio),
            record_path=record_path,
        )

    def recording(self) -> bytes:
        """The call as a stereo 8 kHz WAV: caller on the left, what the bot played on the right."""
        caller = ulaw_to_pcm16(bytes(self.caller_audio))
        placed = [
            (round((start - self.t0) * ULAW_RATE), ulaw_to_pcm16(audio))
            for start, audio, _ in self.playout.segments()
        ]
        length = max([caller.size, *(max(0, at) + pcm.size for at, pcm in placed)])
        stereo = np.zeros((length, 2), dtype=np.int16)
        stereo[: caller.size, 0] = caller
        for at, pcm in placed:
            at = max(0, at)
            stereo[at : at + pcm.size, 1] = pcm
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as wav:
            wav.setnchannels(2)
            wav.setsampwidth(2)
            wav.setframerate(ULAW_RATE)
            wav.writeframes(stereo.astype("<i2").tobytes())
        return buffer.getvalue()


async def _finish(task: asyncio.Task[None]) -> None:
    """Let an owned task end on its own briefly, then cancel it, and collect it either way."""
    try:
        await asyncio.wait_for(asyncio.shield(task), 1.0)
    except TimeoutError:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    except ConnectionClosed:
        pass


async def run_call(
    base_url: str,
    script: Sequence[Utterance],
    *,
    caller: str = DEFAULT_CALLER,
    called: str = DEFAULT_CALLED,
    auth_token: str | None = None,
    account_sid: str = DEFAULT_ACCOUNT_SID,
    record_path: Path | None = None,
    realtime: bool = True,
    max_call_seconds: float = 120,
    idle_timeout_s: float = 15,
    tts_cache_dir: Path | None = None,
) -> CallReport:
    """Place one simulated inbound Twilio call to a closeloop server and run ``script`` on it.

    Speech is rendered before dialing, so rendering never delays a turn.

    Args:
        base_url: the server's base URL, e.g. ``http://127.0.0.1:8080``; the webhook is
            ``base_url + /twilio/voice``.
        script: what the caller does, in order, after the greeting.
        caller, called: ``From`` and ``To`` of the call.
        auth_token: when set, the webhook and the upgrade are signed with it.
        account_sid: ``AccountSid`` sent in the webhook and ``start``.
        record_path: write a stereo WAV of the call there (caller left, bot right).
        realtime: False sends the caller's speech faster than real time and plays bot audio
            instantly (marks echo at once): for functional checks only, latencies mean nothing.
        max_call_seconds: hang up after this long whatever happens.
        idle_timeout_s: how long to wait for the greeting or a reply to start.
        tts_cache_dir: keep rendered speech there between runs.

    Returns:
        The report; the call is never raised over for what the app does once connected.

    Raises:
        ServerUnreachable: nothing answered at ``base_url``.
        CallSetupError: the webhook failed or answered bad TwiML, or the stream upgrade failed.
        RuntimeError: espeak-ng is missing. OSError/ValueError: a WAV file cannot be used.
    """
    audio = [await _render(u, tts_cache_dir) for u in script]
    call_sid = "CA" + secrets.token_hex(16)
    stream_sid = "MZ" + secrets.token_hex(16)
    webhook = base_url.rstrip("/") + VOICE_PATH
    params = {
        "AccountSid": account_sid,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": called,
        "Caller": caller,
        "Direction": "inbound",
        "From": caller,
        "To": called,
    }
    target = await _answer(webhook, params, auth_token, idle_timeout_s)
    ws_target = media_socket_url(target.url, base_url)
    headers = (
        {"X-Twilio-Signature": RequestValidator(auth_token).compute_signature(target.url, {})}
        if auth_token
        else {}
    )
    try:
        ws = await connect(
            ws_target,
            additional_headers=headers,
            proxy=None if _is_loopback(ws_target) else True,
            compression=None,
            open_timeout=idle_timeout_s,
            max_size=1 << 20,
            max_queue=256,
        )
    except InvalidStatus as e:
        raise CallSetupError(
            f"the media stream upgrade at {ws_target} was refused with HTTP {e.response.status_code} (Twilio error 31920)"
        ) from None
    except (OSError, TimeoutError, WebSocketException) as e:
        raise CallSetupError(f"cannot open the media stream at {ws_target}: {e}") from e
    async with ws:
        call = _Call(
            ws,
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=account_sid,
            parameters=target.parameters,
            realtime=realtime,
            idle_timeout_s=idle_timeout_s,
        )
        await call.run(script, audio, max_call_seconds)
    if record_path is not None:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(record_path.write_bytes, call.recording())
    return call.report(target.url, record_path)


async def _render(utterance: Utterance, cache_dir: Path | None) -> bytes:
    if utterance.text is not None:
        return await asyncio.to_thread(render_tts, utterance.text, cache_dir=cache_dir)
    if utterance.wav is not None:
        return await asyncio.to_thread(load_wav, utterance.wav)
    return b""


async def _answer(
    webhook: str, params: dict[str, str], auth_token: str | None, timeout_s: float
) -> StreamTarget:
    """POST the voice webhook like Twilio and read the Stream from the TwiML."""
    headers = {"User-Agent": "TwilioProxy/1.1", "I-Twilio-Idempotency-Token": secrets.token_hex(16)}
    if auth_token:
        headers["X-Twilio-Signature"] = RequestValidator(auth_token).compute_signature(webhook, params)
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=not _is_loopback(webhook)) as http:
        try:
            response = await http.post(webhook, data=params, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise ServerUnreachable(f"nothing answered at {webhook}: {e}") from e
        except httpx.HTTPError as e:
            raise CallSetupError(f"POST {webhook} failed: {e}") from e
    if response.status_code != 200:
        raise CallSetupError(f"POST {webhook} answered HTTP {response.status_code}: {response.text[:200]}")
    try:
        return parse_stream_twiml(response.text)
    except TwimlError as e:
        raise CallSetupError(str(e)) from None


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- command line --------------------------------------------------------------------------


class _StepAction(argparse.Action):
    """Appends ``(kind, value)`` to one ordered list, so --say/--wav/--dtmf/--script keep their order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        steps = list(getattr(namespace, self.dest, None) or [])
        steps.append((self.const, values))
        setattr(namespace, self.dest, steps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``closeloop call`` arguments to ``parser`` (see :func:`run_from_args`)."""
    parser.add_argument("--url", default=DEFAULT_URL, help="closeloop server base URL (default: %(default)s)")
    parser.add_argument(
        "--caller", default=DEFAULT_CALLER, help="the caller's number, From (default: %(default)s)"
    )
    parser.add_argument(
        "--called", default=DEFAULT_CALLED, help="the number called, To (default: %(default)s)"
    )
    steps = (
        ("--say", "say", "TEXT", "say TEXT (repeatable; all steps run in the order given)"),
        ("--wav", "wav", "FILE", "play a WAV file (repeatable)"),
        ("--dtmf", "dtmf", "DIGITS", "press keys, e.g. 1234# (repeatable)"),
        (
            "--script",
            "script",
            "FILE",
            "YAML list of steps: '- say: TEXT' | '- wav: FILE' | '- dtmf: DIGITS', "
            "each with optional barge_in_after_ms and pause_ms",
        ),
    )
    for flag, kind, metavar, text in steps:
        parser.add_argument(
            flag, dest="steps", action=_StepAction, const=kind, default=None, metavar=metavar, help=text
        )
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="OUT.wav",
        help="write the call as a stereo WAV (caller left, bot right)",
    )
    parser.add_argument(
        "--auth-token",
        default=None,
        help="sign the webhook and the stream upgrade with this Twilio auth token",
    )
    parser.add_argument(
        "--account-sid", default=DEFAULT_ACCOUNT_SID, help="AccountSid to send (default: %(default)s)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=120, help="hang up after this long (default: %(default)s)"
    )


def load_script(path: Path) -> list[Utterance]:
    """Read a YAML script: a list of ``{say|wav|dtmf: ..., barge_in_after_ms?, pause_ms?}``.

    A bare string is a ``say``. WAV paths are relative to the script's folder.

    Raises:
        ValueError: the file is not such a list. OSError: it cannot be read.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a YAML list of steps like '- say: hello'")
    script = []
    for number, item in enumerate(data, start=1):
        step = {"say": item} if isinstance(item, str) else item
        if not isinstance(step, dict):
            raise ValueError(f"{path} step {number}: expected a mapping like 'say: hello'")
        unknown = set(step) - {"say", "wav", "dtmf", "barge_in_after_ms", "pause_ms"}
        if unknown:
            raise ValueError(f"{path} step {number}: unknown keys {sorted(unknown)}")
        try:
            script.append(
                Utterance(
                    text=None if step.get("say") is None else str(step["say"]),
                    wav=None if step.get("wav") is None else path.parent / str(step["wav"]),
                    dtmf=None if step.get("dtmf") is None else str(step["dtmf"]),
                    barge_in_after_ms=step.get("barge_in_after_ms"),
                    pause_ms=step.get("pause_ms", 600),
                )
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} step {number}: {e}") from None
    return script


def script_from_args(ns: argparse.Namespace) -> list[Utterance]:
    """The script given by --say/--wav/--dtmf/--script, in command-line order."""
    script: list[Utterance] = []
    for kind, value in getattr(ns, "steps", None) or []:
        if kind == "script":
            script += load_script(Path(value))
        elif kind == "wav":
            script.append(Utterance(wav=Path(value)))
        elif kind == "dtmf":
            script.append(Utterance(dtmf=value))
        else:
            script.append(Utterance(text=value))
    return script


def run_from_args(ns: argparse.Namespace) -> int:
    """Run ``closeloop call`` with arguments from :func:`add_arguments`; print the report.

    Returns:
        0 when the call went fine, 1 when it did not (violations, missing replies, setup
        errors), 2 when the server could not be reached.
    """
    try:
        script = script_from_args(ns)
    except (OSError, ValueError) as e:
        print(f"closeloop call: {e}", file=sys.stderr)
        return EXIT_FAILED
    try:
        report = asyncio.run(
            run_call(
                ns.url,
                script,
                caller=ns.caller,
                called=getattr(ns, "called", DEFAULT_CALLED),
                auth_token=ns.auth_token,
                account_sid=getattr(ns, "account_sid", DEFAULT_ACCOUNT_SID),
                record_path=ns.record,
                max_call_seconds=getattr(ns, "max_seconds", 120),
            )
        )
    except ServerUnreachable:
        print(f"cannot reach closeloop at {ns.url}; is `make run` running?", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (CallSetupError, OSError, ValueError) as e:
        print(f"closeloop call: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(report.format())
    return EXIT_OK if report.ok else EXIT_FAILED
