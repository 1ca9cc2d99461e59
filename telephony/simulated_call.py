"""A simulated Twilio caller (``closeloop call``, see :mod:`telephony.simulator`): real audio over the real media stream.

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
  caller's audio ended), the playout buffer is drained, and either the app sent its reply-end
  mark (``epoch:end:n``, :func:`voice.playout.reply_end_mark`: closeloop sends one when it has
  nothing more to say) after the reply started, or no bot audio has arrived for
  :data:`BOT_DONE_SILENCE_S` (an app that sends no reply-end marks) or for ``idle_timeout_s``
  (an app that does, for a reply that ended without one, such as a person talking on a bridged
  call; closeloop may be silent for long inside a reply, e.g. after "one moment" while its
  database is away). The mark makes the caller's timing independent of the
  machine's speed: a busy machine can leave a gap between two sentences of one reply. Then the
  caller waits until ``pause_ms`` after the bot's audio finished playing (no earlier than the
  detection) and speaks. A reply that does not start within ``idle_timeout_s`` is an error in
  the report and the script goes on.
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

import asyncio
import base64
import math
import secrets
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from telephony.call_report import CallReport, TurnReport
from telephony.call_script import Utterance
from telephony.caller_audio import load_wav, render_tts
from telephony.playout_buffer import PlayoutBuffer
from telephony.signatures import is_loopback_host
from telephony.stream_target import StreamTarget, TwimlError, media_socket_url, parse_stream_twiml
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
    pcm16_to_wav,
    ulaw_to_pcm16,
)
from voice.playout import is_reply_end_mark

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CALLER = "+15550100001"
DEFAULT_CALLED = "+15550009999"
DEFAULT_ACCOUNT_SID = "AC" + "0" * 31 + "1"
VOICE_PATH = "/twilio/voice"

FRAME_S = ULAW_FRAME_BYTES / ULAW_RATE
"""Play time of one 160-byte media frame: 20 ms."""
BOT_DONE_SILENCE_S = 0.7
"""No bot audio for this long (and the playout buffer drained) means the bot finished its turn,
for an app that sends no reply-end marks."""
DTMF_GAP_S = 0.25
"""Time between two key presses of one ``dtmf`` utterance."""

_POLL_S = 0.02


class CallSetupError(RuntimeError):
    """The call could not be set up: webhook refused, bad TwiML, stream upgrade refused."""


class ServerUnreachable(CallSetupError):
    """Nothing answered at the base URL (connection refused, DNS, connect timeout)."""


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
        observe: Callable[[str, float, float], None] | None = None,
    ) -> None:
        self._ws = ws
        self._observe = observe
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
        self._reply_end_at: float | None = None  # the last reply-end mark received
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
                if not self.playout.is_playing(now) and self._reply_over(turn, now):
                    return
            elif now >= deadline:
                self._no_reply(turn)
                return
            await asyncio.sleep(_POLL_S)

    def _reply_over(self, turn: _Turn, now: float) -> bool:
        """The reply to ``turn`` (started, fully played) is over (see the module's "Bot finished")."""
        assert turn.first_bot_at is not None
        if self._reply_end_at is None:
            return now - self._last_bot_audio >= BOT_DONE_SILENCE_S
        heard_until = max(self._last_bot_audio, self.playout.play_end)
        return self._reply_end_at >= turn.first_bot_at or now - heard_until >= self.idle_timeout_s

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
            audio = base64.b64decode(message["media"]["payload"])
            self._on_bot_audio(now, audio)
            self._tell("media", now, len(audio) / ULAW_RATE)
        elif event == "mark":
            name = message["mark"]["name"]
            self.marks_sent.append(name)
            if is_reply_end_mark(name):
                self._reply_end_at = now
            self.playout.add_mark(now, name)
            await self._echo_due_marks()
        else:  # clear
            self.clears += 1
            self._tell("clear", now, max(0.0, self.playout.play_end - now))
            self._on_clear()
            for name in self.playout.clear(now):
                await self._send(twilio_mark, name)
                self.marks_echoed.append(name)

    def _tell(self, event: str, now: float, seconds: float) -> None:
        if self._observe is not None:
            self._observe(event, (now - self.t0) * 1000, seconds)

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
        return pcm16_to_wav(stereo, ULAW_RATE, channels=2)


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
    observe: Callable[[str, float, float], None] | None = None,
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
        observe: told ``(event, ms since start, seconds)`` of each bot ``media`` ("media", its play
            time) and ``clear`` ("clear", play time it dropped), e.g. for barge-in timelines.

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
            observe=observe,
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
    return is_loopback_host(urllib.parse.urlsplit(url).hostname)
