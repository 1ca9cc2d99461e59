"""The simulated Twilio caller against a tiny fake closeloop app on loopback, in real time.

The fake app answers the voice webhook with ``<Connect><Stream>`` TwiML (a ``wss://`` URL on a
plain-http server, as a local closeloop does), checks signatures, greets, detects the caller's
speech by energy, replies with 1.5 s tones cut into marked parts, clears one reply on purpose
and clears another when the caller barges in. It also checks every frame the simulator sends
with closeloop's own Twilio -> app decoder.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from aiohttp import WSMsgType, web
from twilio.request_validator import RequestValidator

from telephony.simulator import (
    CallSetupError,
    Utterance,
    add_arguments,
    run_call,
    run_from_args,
)
from telephony.twilio_protocol import (
    Dtmf,
    Mark,
    Media,
    ProtocolViolation,
    Start,
    Stop,
    StreamDecoder,
    encode_clear,
    encode_mark,
    encode_media,
)
from telephony.voice_twiml import connect_stream
from voice.audio import pcm16_to_ulaw, ulaw_to_pcm16
from voice.playout import reply_end_mark

AUTH_TOKEN = "simulator-test-token"
ACCOUNT_SID = "AC" + "7" * 32
SPEECH_RMS = 500.0
SPEECH_START_FRAMES = 3  # 60 ms of sound starts an utterance
SPEECH_END_FRAMES = 15  # 300 ms of quiet ends it
PART_S = 0.5


def tone(seconds: float, hz: float = 440.0) -> bytes:
    n = round(seconds * 8000)
    return pcm16_to_ulaw((8000 * np.sin(np.arange(n) * 2 * np.pi * hz / 8000)).astype(np.int16))


@dataclass
class FakeApp:
    """A fake closeloop: webhook + media stream. Times are ``loop.time()`` seconds."""

    auth_token: str | None
    stream_token: str | None = None  # checks the upgrade with another token than the webhook
    reply_s: float = 1.5
    clear_turn: int | None = 2
    clear_after_s: float = 0.7
    reply_on_dtmf: str | None = None
    sloppy_greeting: bool = False
    gap_s: float = 0.0  # a second part of each reply comes this long after the first played out
    end_marks: bool = False  # send closeloop's reply-end mark once a reply has been heard
    no_end_mark_turns: tuple[int, ...] = ()
    base_url: str = ""
    problems: list[str] = field(default_factory=list)
    webhook_forms: list[dict[str, str]] = field(default_factory=list)
    start: Start | None = None
    stopped: Stop | None = None
    digits: list[str] = field(default_factory=list)
    replies_at: dict[int, float] = field(default_factory=dict)
    clears_at: dict[int, float] = field(default_factory=dict)
    barge_in_clears: list[float] = field(default_factory=list)
    echoes: list[tuple[str, float]] = field(default_factory=list)
    media_arrivals: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeApp:
        app = web.Application()
        app.router.add_post("/twilio/voice", self._voice)
        app.router.add_get("/twilio/media", self._media)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def stream_url(self) -> str:
        # Twilio requires wss://; a local server announces it although it has no TLS.
        return self.base_url.replace("http://", "wss://") + "/twilio/media"

    @staticmethod
    def _signed(token: str | None, url: str, params: dict[str, str], signature: str | None) -> bool:
        return token is None or bool(RequestValidator(token).validate(url, params, signature or ""))

    async def _voice(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.webhook_forms.append(form)
        if not self._signed(
            self.auth_token, self.base_url + "/twilio/voice", form, request.headers.get("X-Twilio-Signature")
        ):
            return web.json_response({"error": {"code": "bad_signature"}}, status=403)
        twiml = connect_stream(self.stream_url, {"callSid": form["CallSid"], "caller": form["From"]})
        return web.Response(text=twiml, content_type="application/xml")

    async def _media(self, request: web.Request) -> web.StreamResponse:
        if not self._signed(
            self.stream_token or self.auth_token,
            self.stream_url,
            {},
            request.headers.get("X-Twilio-Signature"),
        ):
            return web.Response(status=403)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await _MediaSession(self, ws).run()
        return ws

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _MediaSession:
    def __init__(self, app: FakeApp, ws: web.WebSocketResponse) -> None:
        self.app = app
        self.ws = ws
        self.decoder = StreamDecoder(max_bad_frames=0)
        self.clock = asyncio.get_running_loop().time
        self.lock = asyncio.Lock()
        self.pending: list[str] = []  # marks sent, not echoed yet: the caller is still hearing us
        self.heard = asyncio.Event()  # set while nothing is pending
        self.heard.set()
        self.turn = 0
        self.loud = self.quiet = 0
        self.in_speech = False
        self.last_seq = 0
        self.last_chunk = 0

    async def send(self, text: str) -> None:
        async with self.lock:
            if not self.ws.closed:
                await self.ws.send_str(text)

    async def run(self) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                self.app.problems.append(f"non-text frame {msg.type}")
                continue
            try:
                event = self.decoder.decode(msg.data)
            except ProtocolViolation as e:
                self.app.problems.append(f"decoder: {e}")
                return
            self.check_numbering(json.loads(msg.data))
            if isinstance(event, Start):
                self.app.start = event
                self.app.spawn(self.greet(event.stream_sid), "fake-greeting")
            elif isinstance(event, Media):
                self.app.media_arrivals.append(self.clock())
                await self.on_audio(event)
            elif isinstance(event, Dtmf):
                self.app.digits.append(event.digit)
                if event.digit == self.app.reply_on_dtmf:
                    self.turn += 1
                    self.app.spawn(self.reply(self.turn), "fake-reply")
            elif isinstance(event, Stop):
                self.app.stopped = event
                return
            elif isinstance(event, Mark):
                self.app.echoes.append((event.name, self.clock()))
                if event.name in self.pending:
                    self.pending.remove(event.name)
                if not self.pending:
                    self.heard.set()

    def check_numbering(self, message: dict[str, Any]) -> None:
        if message["event"] == "connected":
            return
        seq = int(message["sequenceNumber"])
        if seq != self.last_seq + 1:
            self.app.problems.append(f"sequenceNumber {seq} after {self.last_seq}")
        self.last_seq = seq
        if message["event"] == "media":
            media = message["media"]
            chunk, timestamp = int(media["chunk"]), int(media["timestamp"])
            if chunk != self.last_chunk + 1 or timestamp != 20 * (chunk - 1):
                self.app.problems.append(f"chunk {chunk} at {timestamp} ms after chunk {self.last_chunk}")
            if len(base64.b64decode(media["payload"])) != 160 or media["track"] != "inbound":
                self.app.problems.append("media frame is not 160 bytes of the inbound track")
            self.last_chunk = chunk

    async def on_audio(self, event: Media) -> None:
        pcm = ulaw_to_pcm16(event.payload).astype(np.float64)
        loud = float(np.sqrt(np.mean(pcm * pcm))) > SPEECH_RMS
        self.loud, self.quiet = (self.loud + 1, 0) if loud else (0, self.quiet + 1)
        if not self.in_speech and self.loud >= SPEECH_START_FRAMES:
            self.in_speech = True
            if self.pending:  # the caller talks over us: stop at once, like closeloop does
                self.app.barge_in_clears.append(self.clock())
                await self.send(encode_clear(event.stream_sid))
        elif self.in_speech and self.quiet >= SPEECH_END_FRAMES:
            self.in_speech = False
            self.turn += 1
            self.app.spawn(self.reply(self.turn), "fake-reply")

    async def play(self, stream_sid: str, audio: bytes, name: str) -> None:
        """Send audio in 20 ms media frames (as fast as TTS would), a mark after every 0.5 s."""
        part = round(PART_S * 8000)
        for k in range(0, len(audio), part):
            for i in range(k, min(k + part, len(audio)), 160):
                await self.send(encode_media(stream_sid, audio[i : i + 160]))
            self.pending.append(f"{name}-{k // part}")
            self.heard.clear()
            await self.send(encode_mark(stream_sid, f"{name}-{k // part}"))

    async def greet(self, stream_sid: str) -> None:
        if self.app.sloppy_greeting:
            bad = json.dumps({"event": "media", "media": {"payload": base64.b64encode(tone(0.02)).decode()}})
            await self.send(bad)  # no streamSid: Twilio error 31951
            async with self.lock:
                await self.ws.send_bytes(tone(0.02))  # binary: Twilio error 31950
        await self.play(stream_sid, tone(0.6, 330.0), "greeting")
        await self.end_reply(stream_sid, 0)

    async def end_reply(self, stream_sid: str, turn: int) -> None:
        """closeloop's reply-end mark, once the caller has heard the reply (all marks echoed)."""
        if not self.app.end_marks or turn in self.app.no_end_mark_turns:
            return
        await self.heard.wait()
        await self.send(encode_mark(stream_sid, reply_end_mark(0, turn + 1)))

    async def reply(self, turn: int) -> None:
        assert self.app.start is not None
        stream_sid = self.app.start.stream_sid
        self.app.replies_at[turn] = self.clock()
        await self.play(stream_sid, tone(self.app.reply_s), f"r{turn}")
        if self.app.gap_s:
            await asyncio.sleep(self.app.reply_s + self.app.gap_s)  # the first part plays, then a gap
            await self.play(stream_sid, tone(self.app.reply_s, 550.0), f"r{turn}b")
        await self.end_reply(stream_sid, turn)
        if turn == self.app.clear_turn:
            await asyncio.sleep(self.app.clear_after_s)
            self.app.clears_at[turn] = self.clock()
            await self.send(encode_clear(stream_sid))


@pytest_asyncio.fixture
async def app() -> AsyncIterator[FakeApp]:
    async with FakeApp(AUTH_TOKEN) as fake:
        yield fake


def echo_time(app: FakeApp, name: str) -> float:
    [when] = [t for n, t in app.echoes if n == name]
    return when


async def test_scripted_call_measures_latency_echoes_marks_after_playback_and_handles_clears(
    app: FakeApp, tmp_path: Path
) -> None:
    record = tmp_path / "call.wav"
    script = [
        Utterance(text="Hello there.", pause_ms=200),
        Utterance(text="Cancel my order.", pause_ms=200),
        Utterance(text="Thank you.", pause_ms=200),
        Utterance(text="Hold on.", barge_in_after_ms=400),
    ]

    report = await run_call(
        app.base_url,
        script,
        auth_token=AUTH_TOKEN,
        account_sid=ACCOUNT_SID,
        record_path=record,
        max_call_seconds=40,
    )

    print(report.format())
    # The call itself, as the app saw it.
    assert app.problems == []
    [form] = app.webhook_forms
    assert (
        form["CallStatus"] == "ringing"
        and form["Direction"] == "inbound"
        and form["AccountSid"] == ACCOUNT_SID
    )
    assert app.start is not None and app.start.call_sid == form["CallSid"] == report.call_sid
    assert app.start.stream_sid == report.stream_sid and app.start.stream_sid.startswith("MZ")
    assert app.start.custom_parameters == {"callSid": form["CallSid"], "caller": "+15550100001"}
    assert (app.start.tracks, app.start.encoding, app.start.sample_rate) == (
        ("inbound",),
        "audio/x-mulaw",
        8000,
    )
    assert app.stopped is not None and app.stopped.call_sid == report.call_sid
    assert max(np.diff(app.media_arrivals)) < 0.5  # audio never stopped flowing, silence included

    # The report.
    assert report.violations == [] and report.errors == [] and report.ok
    assert report.ended_by == "caller" and report.stream_url == app.stream_url
    assert report.greeting.latency_ms is not None and report.greeting.bot_audio_ms == pytest.approx(600)
    assert [t.said for t in report.turns] == [u.text for u in script]
    for turn in report.turns:
        assert turn.latency_ms is not None and turn.latency_ms > 0
        assert turn.first_bot_audio_ms is not None and turn.caller_end_ms is not None
        assert turn.first_bot_audio_ms > turn.caller_end_ms
    assert [t.clear_received for t in report.turns] == [False, True, False, True]
    assert [t.barge_in for t in report.turns] == [False, False, False, True]
    assert report.clears_received == 2 and len(app.barge_in_clears) == 1

    # Marks: all echoed, in the order sent, each only after its audio played.
    assert report.marks_echoed == report.marks_sent == [name for name, _ in app.echoes]
    for turn in (1, 4):
        for k in range(3):
            assert echo_time(app, f"r{turn}-{k}") - app.replies_at[turn] >= (k + 1) * PART_S - 0.03
    assert report.turns[0].bot_heard_ms == pytest.approx(1500, abs=25)

    # The scripted clear 0.7 s into reply 2: the part still playing and the next come back at once.
    assert echo_time(app, "r2-0") - app.replies_at[2] >= PART_S - 0.03
    for name in ("r2-1", "r2-2"):
        assert echo_time(app, name) - app.clears_at[2] < 0.25
        assert echo_time(app, name) - app.replies_at[2] < 1.0  # well before it would have played
    assert report.turns[1].bot_audio_ms == pytest.approx(1500)
    assert 500 < report.turns[1].bot_heard_ms < 1100

    # The barge-in: the caller started over reply 3, which was cut; reply 4 is measured on its own.
    assert report.turns[3].overlapped
    assert report.turns[3].caller_start_ms is not None and report.turns[2].first_bot_audio_ms is not None
    assert report.turns[3].caller_start_ms - report.turns[2].first_bot_audio_ms >= 400
    assert report.turns[2].bot_heard_ms < 1400
    assert report.turns[3].bot_audio_ms == pytest.approx(1500)
    assert echo_time(app, "r3-2") - app.barge_in_clears[0] < 0.25

    # The recording: stereo 8 kHz, caller left, bot right, as long as the call.
    with wave.open(io.BytesIO(record.read_bytes())) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 8000, 2)
        assert wav.getnframes() / 8000 == pytest.approx(report.duration_ms / 1000, abs=0.5)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 2).astype(np.float64)
    assert np.sqrt(np.mean(samples[:, 0] ** 2)) > 100 and np.sqrt(np.mean(samples[:, 1] ** 2)) > 100
    assert len(report.bot_audio) == 8000 * (0.6 + 4 * 1.5)
    assert report.record_path == record and "recording:" in report.format()


async def test_the_caller_waits_for_the_reply_end_mark_across_a_gap_inside_the_reply() -> None:
    # A busy machine can leave a gap inside one reply (here 1.0 s, between its two parts): an
    # app that sends reply-end marks is heard out to the end, whatever the gap.
    script = [Utterance(text="Where is my order?", pause_ms=200), Utterance(text="Thanks.", pause_ms=200)]
    async with FakeApp(AUTH_TOKEN, clear_turn=None, gap_s=1.0, end_marks=True) as app:
        report = await run_call(app.base_url, script, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    print(report.format())
    assert report.ok and app.problems == []
    assert [t.bot_audio_ms for t in report.turns] == [3000, 3000]  # both parts, one turn each
    assert not any(t.clear_received or t.overlapped for t in report.turns)
    assert [n for n in report.marks_sent if n.split(":")[1:2] == ["end"]] == ["0:end:1", "0:end:2", "0:end:3"]


async def test_without_reply_end_marks_the_caller_takes_a_long_gap_as_the_end_of_the_reply() -> None:
    # An app that sends no reply-end marks (a stock pipecat bot): 0.7 s of quiet ends a reply,
    # so the caller speaks into the gap. An app that does, for a reply that ended without one
    # (a person talking on a bridged call): the caller goes on after idle_timeout_s of quiet.
    script = [Utterance(text="Where is my order?", pause_ms=200), Utterance(text="Thanks.", pause_ms=200)]
    async with FakeApp(AUTH_TOKEN, clear_turn=None, gap_s=1.0) as app:
        report = await run_call(app.base_url, script, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    print(report.format())
    assert report.turns[0].bot_audio_ms == 1500  # the second part came while the caller spoke
    assert report.turns[1].overlapped or report.turns[1].bot_audio_ms > 3000

    async with FakeApp(AUTH_TOKEN, clear_turn=None, end_marks=True, no_end_mark_turns=(1,)) as app:
        report = await run_call(
            app.base_url, script, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, idle_timeout_s=1.5
        )
    print(report.format())
    assert report.ok
    first, second = report.turns
    assert first.first_bot_audio_ms is not None and second.caller_start_ms is not None
    assert second.caller_start_ms - first.first_bot_audio_ms >= 1500 + 1500 - 100  # played, then waited


async def test_dtmf_turn_and_protocol_violations_are_reported(tmp_path: Path) -> None:
    async with FakeApp(None, reply_s=0.5, clear_turn=None, reply_on_dtmf="#", sloppy_greeting=True) as app:
        report = await run_call(app.base_url, [Utterance(dtmf="12#", pause_ms=0)], max_call_seconds=20)

    assert app.problems == []
    assert app.digits == ["1", "2", "#"]
    assert [v.split(": ", 1)[1][:5] for v in report.violations] == ["31951", "31950"]
    assert not report.ok and report.errors == []
    [turn] = report.turns
    assert turn.said == "[dtmf 12#]" and turn.latency_ms is not None and turn.latency_ms >= 0
    assert report.marks_echoed == ["greeting-0", "greeting-1", "r1-0"]
    assert "protocol violations: 2" in report.format()


async def test_call_that_is_not_real_time_bursts_speech_and_still_speaks_the_protocol() -> None:
    async with FakeApp(None, reply_s=0.5, clear_turn=None) as app:
        report = await run_call(app.base_url, [Utterance(text="Hello there.", pause_ms=0)], realtime=False)

    assert app.problems == [] and report.ok
    assert report.marks_echoed == report.marks_sent == ["greeting-0", "greeting-1", "r1-0"]
    assert report.turns[0].bot_heard_ms == pytest.approx(500)


async def test_wrong_auth_token_fails_setup_with_the_http_status(app: FakeApp) -> None:
    with pytest.raises(CallSetupError, match="HTTP 403"):
        await run_call(app.base_url, [], auth_token="not-the-token")


async def test_unsigned_stream_upgrade_is_refused_like_twilio_error_31920() -> None:
    async with FakeApp(None, stream_token=AUTH_TOKEN) as app:
        with pytest.raises(CallSetupError, match="31920"):
            await run_call(app.base_url, [])


def test_unreachable_server_exits_2_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    url = f"http://127.0.0.1:{port}"

    code = run_from_args(parser.parse_args(["--url", url, "--say", "hello"]))

    assert code == 2
    assert capsys.readouterr().err == f"cannot reach closeloop at {url}; is `make run` running?\n"
