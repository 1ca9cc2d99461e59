"""Unit tests of :class:`voice.call_session.CallSession` with plain fakes: no models, no server.

The fakes stand in for everything the session talks to:

- :class:`FakeLine` records audio, marks, clears and hang-ups in order and plays the part of
  Twilio's playout: marks come back only when the test says the audio before them has played
  (``play``/``play_ms``), or at once (``echo=True``); a ``clear`` flushes pending marks back
  immediately, as Twilio does, and those must not count as heard.
- :class:`ScriptedDetector` returns the events a test queued for each ``feed`` call.
- :class:`FakeSTT` returns scripted texts; :class:`FakeTTS` splits on ". " and yields 8 bytes of
  mu-law silence per character (1 ms per character at 8 kHz), optionally after a delay.
- :class:`FakeConversation` records ``open_call``/``handle_text``/``mark_interrupted`` and can
  hold or fail a turn.

Time that matters to the session (barge-in length, silence, call length) comes from a manual
clock the test moves; only the watchdog's 0.25 s tick and short fake delays are real.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from pipeline.clock import FakeClock
from pipeline.model import Channel, Customer
from pipeline.ports import StoreUnavailable
from pipeline.service import ConversationService
from pipeline.templates import render
from pipeline.turn_manager import TurnManager
from tests.unit.fakes import FakeBusiness, FakeConversationStore, KeywordClassifier, load_intents
from voice.call_ports import CallState, DetectorEvent, TurnTimings, VoiceConfig
from voice.call_session import CallSession
from voice.playout import is_reply_end_mark
from voice.spoken_text import heard_prefix, is_backchannel, sentence_ends, sounds_finished, sounds_unfinished

CALL_SID = "CA1"
CALLER = "+15550001111"
CONVERSATION_ID = 77
GREETING = "Hello there. How can I help you today?"  # 12 + 1 + 25 = 38 characters
FRAME = b"\xff" * 160  # 20 ms of inbound mu-law
UTTERANCE = np.zeros(16000, dtype=np.int16)  # 1 s at 16 kHz, attached to end_of_turn


def config(**overrides: Any) -> VoiceConfig:
    """Small timings so every test runs in well under a second.

    ``lead_ms`` is huge so pacing never sleeps; ``chunk_ms=20`` puts a mark after every 160 bytes.
    Silence and call length are driven by the manual clock, so the defaults never fire by accident.
    """
    values: dict[str, Any] = {
        "barge_in_min_ms": 500,
        "lead_ms": 60_000,
        "chunk_ms": 20,
        "reprompt_after_s": 5.0,
        "reprompts_before_goodbye": 1,
        "dtmf_timeout_s": 0.1,
        "turn_timeout_s": 0.3,
        "mark_grace_s": 1.0,
        "max_call_s": 3600.0,
    }
    values.update(overrides)
    return VoiceConfig(**values)


# --------------------------------------------------------------------------------------
# fakes


class ManualClock:
    """A monotonic clock that moves only when told to. Starts far from 0 (0.0 is falsy)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeLine:
    """:class:`voice.call_ports.Line` that records everything and simulates Twilio's playout.

    Args:
        echo: echo every mark back as soon as it is sent (audio "plays" instantly).
    """

    def __init__(self, *, echo: bool = False) -> None:
        self.session: CallSession | None = None
        self.echo = echo
        self.events: list[tuple[str, Any]] = []
        self.hangups: list[str] = []
        self.sent_ms = 0.0  # audio sent so far, in ms
        self.played_ms = 0.0  # the playhead
        self.unplayed: list[tuple[str, float]] = []  # (mark, audio ms sent before it)

    # Line
    async def send_audio(self, ulaw: bytes) -> None:
        self.events.append(("audio", ulaw))
        self.sent_ms += len(ulaw) / 8

    async def send_mark(self, name: str) -> None:
        self.events.append(("mark", name))
        if self.echo:
            self._session().on_mark(name)
        else:
            self.unplayed.append((name, self.sent_ms))

    async def send_clear(self) -> None:
        self.events.append(("clear", None))
        # Twilio drops the buffered audio and sends every pending mark back at once.
        flushed, self.unplayed = self.unplayed, []
        self.played_ms = self.sent_ms
        for name, _ in flushed:
            self._session().on_mark(name)

    async def hangup(self, reason: str) -> None:
        self.events.append(("hangup", reason))
        self.hangups.append(reason)

    # playout
    def play(self, count: int | None = None) -> list[str]:
        """The audio before the next ``count`` marks (all when None) has played: echo them."""
        n = len(self.unplayed) if count is None else count
        played, self.unplayed = self.unplayed[:n], self.unplayed[n:]
        for name, at_ms in played:
            self.played_ms = max(self.played_ms, at_ms)
            self._session().on_mark(name)
        return [name for name, _ in played]

    def play_ms(self, ms: float) -> list[str]:
        """``ms`` more milliseconds of audio have played: echo the marks now behind the playhead."""
        self.played_ms = min(self.sent_ms, self.played_ms + ms)
        count = sum(1 for _, at_ms in self.unplayed if at_ms <= self.played_ms)
        return self.play(count)

    # views
    def marks(self) -> list[str]:
        """Marks of audio sent (the reply-end marks are in :meth:`reply_ends`)."""
        return [value for kind, value in self.events if kind == "mark" and not is_reply_end_mark(value)]

    def reply_ends(self) -> list[str]:
        return [value for kind, value in self.events if kind == "mark" and is_reply_end_mark(value)]

    def audio(self) -> list[bytes]:
        return [value for kind, value in self.events if kind == "audio"]

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def _session(self) -> CallSession:
        assert self.session is not None, "FakeLine.session must be set before the call starts"
        return self.session


class ScriptedDetector:
    """:class:`voice.call_ports.Detector` whose ``feed`` returns the next queued list of events."""

    def __init__(self) -> None:
        self.script: deque[list[DetectorEvent]] = deque()
        self.frames: list[np.ndarray] = []
        self.resets = 0

    def queue(self, *events: DetectorEvent) -> None:
        self.script.append(list(events))

    async def feed(self, frame16k: np.ndarray) -> list[DetectorEvent]:
        self.frames.append(frame16k)
        return self.script.popleft() if self.script else []

    def reset(self) -> None:
        self.resets += 1


class FakeSTT:
    """:class:`voice.call_ports.Transcriber` returning scripted texts, in order."""

    def __init__(self) -> None:
        self.texts: deque[str] = deque()
        self.delay = 0.0
        self.samples: list[int] = []

    async def transcribe(self, pcm16_16k: np.ndarray) -> str:
        self.samples.append(len(pcm16_16k))
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow transcriber: simulated work, not a wait
        return self.texts.popleft()


class FakeTTS:
    """:class:`voice.call_ports.Synthesizer`: 8 bytes (1 ms) of 0xFF per character of a sentence.

    Args:
        delay: seconds of "synthesis" before each sentence.
        fail_on: raise when asked to synthesize a sentence containing this text.
    """

    def __init__(self, *, delay: float = 0.0, fail_on: str | None = None, bytes_per_char: int = 8) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.bytes_per_char = bytes_per_char
        self.streamed: list[str] = []
        self.requested: list[str] = []  # sentences whose synthesis began

    def sentences(self, text: str) -> list[str]:
        parts = text.split(". ")
        return [p + "." for p in parts[:-1]] + [parts[-1]]

    async def stream(self, sentences: Sequence[str]) -> AsyncIterator[bytes]:
        for sentence in sentences:
            self.requested.append(sentence)
            if self.delay:
                await asyncio.sleep(self.delay)  # simulated synthesis time, not a wait
            if self.fail_on is not None and self.fail_on in sentence:
                raise RuntimeError("synthesis failed")
            self.streamed.append(sentence)
            yield b"\xff" * (len(sentence) * self.bytes_per_char)


@dataclass
class Msg:
    seq: int
    body: str


@dataclass
class FakeReply:
    conversation_id: int
    messages: list[Msg]
    intent: str | None = None
    understood: bool | None = None


@dataclass(frozen=True)
class HandleCall:
    channel: Channel
    address: str
    text: str
    external_id: str | None
    kind: str


class FakeConversation:
    """:class:`voice.call_ports.Conversation` with scripted replies.

    Sequence numbers: the greeting is seq 1; each turn stores the customer's message and then the
    bot's reply, so turn 1 replies with seq 3, turn 2 with seq 5, and so on.
    """

    def __init__(
        self, greeting: str = GREETING, replies: dict[str, str | tuple[str, str | None]] | None = None
    ) -> None:
        self.greeting = greeting
        self.replies = dict(replies or {})
        self.default_reply = "Sure."
        self.opened: list[tuple[str, str | None]] = []
        self.calls: list[HandleCall] = []
        self.completed: list[str] = []
        self.cancelled: list[str] = []
        self.interrupted: list[tuple[int, int, str]] = []
        self.interrupt_delay = 0.0
        self.fail: set[str] = set()
        self.gates: dict[str, asyncio.Event] = {}
        self.fillers: dict[str, str] = {}  # text -> filler the core says before waiting at its gate
        self.streams: dict[str, list[str]] = {}  # text -> sentences streamed before its gate
        self.not_understood: set[str] = set()  # texts the core does not understand (it asks again)
        self.store_away: dict[str, int] = {}  # text -> attempts that find the store unreachable
        self._seq = 0

    def hold(self, text: str) -> asyncio.Event:
        """Make ``handle_text(text)`` wait until the returned event is set."""
        gate = self.gates[text] = asyncio.Event()
        return gate

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def open_call(
        self, call_sid: str, caller: str | None, *, caller_attested: bool = False
    ) -> FakeReply:
        self.opened.append((call_sid, caller))
        return FakeReply(CONVERSATION_ID, [Msg(self._next_seq(), self.greeting)])

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
    ) -> FakeReply:
        self.calls.append(HandleCall(channel, address, text, external_id, kind))
        if self.store_away.get(text, 0) > 0:
            self.store_away[text] -= 1
            raise StoreUnavailable("the database is unreachable")  # nothing was written
        self._next_seq()  # the customer's message
        if text in self.fillers and speak is not None:
            await speak(self.fillers[text])
        for sentence in self.streams.get(text, []):
            assert stream is not None
            await stream(sentence)
        try:
            if text in self.gates:
                await self.gates[text].wait()
        except asyncio.CancelledError:
            self.cancelled.append(text)
            raise
        if text in self.fail:
            raise RuntimeError("conversation core failed")
        reply = self.replies.get(text, self.default_reply)
        body, intent = (reply, None) if isinstance(reply, str) else reply
        self.completed.append(text)
        understood = False if text in self.not_understood else None
        return FakeReply(CONVERSATION_ID, [Msg(self._next_seq(), body)], intent, understood)

    async def mark_interrupted(self, conversation_id: int, seq: int, heard: str) -> None:
        if self.interrupt_delay:
            await asyncio.sleep(self.interrupt_delay)  # a slow transcript write (simulated)
        self.interrupted.append((conversation_id, seq, heard))


def to_16k(ulaw: bytes) -> np.ndarray:
    return np.zeros(len(ulaw) * 2, dtype=np.int16)


@dataclass
class Call:
    session: CallSession
    line: FakeLine
    detector: ScriptedDetector
    stt: FakeSTT
    tts: FakeTTS
    conv: Any
    clock: ManualClock
    timings: list[tuple[int, TurnTimings]] = field(default_factory=list)

    async def caller_turn(self, text: str, *, speech_ms: float = 900.0) -> None:
        """The caller says ``text``: the detector reports the end of a turn of ``speech_ms``."""
        self.stt.texts.append(text)
        self.detector.queue(
            DetectorEvent("speech_stopped", speech_ms=speech_ms),
            DetectorEvent("end_of_turn", audio=UTTERANCE, speech_ms=speech_ms),
        )
        await self.session.on_audio(FRAME)

    async def caller_speaks_for(self, ms: float) -> None:
        """Caller speech starts and lasts ``ms`` (audio keeps coming; no end of turn yet)."""
        self.detector.queue(DetectorEvent("speech_started"))
        await self.session.on_audio(FRAME)
        self.clock.advance(ms / 1000)
        await self.session.on_audio(FRAME)

    def marks_of(self, seq: int) -> list[str]:
        return [m for m in self.line.marks() if m.split(":")[1] == str(seq)]


async def wait_until(predicate: Callable[[], bool], what: str, within: float = 1.0) -> None:
    """Poll ``predicate`` every 5 ms; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for: {what}")
        await asyncio.sleep(0.005)


MakeCall = Callable[..., Awaitable[Call]]


@pytest.fixture
async def make_call() -> AsyncIterator[MakeCall]:
    made: list[Call] = []

    async def factory(
        *,
        cfg: VoiceConfig | None = None,
        echo: bool = False,
        tts: FakeTTS | None = None,
        conv: Any = None,
        greeting: str = GREETING,
        replies: dict[str, str | tuple[str, str | None]] | None = None,
        caller: str | None = CALLER,
        start: bool = True,
        on_handoff: Any = None,
        stt: FakeSTT | None = None,
    ) -> Call:
        line = FakeLine(echo=echo)
        clock = ManualClock()
        call = Call(
            session=None,  # type: ignore[arg-type]
            line=line,
            detector=ScriptedDetector(),
            stt=stt or FakeSTT(),
            tts=tts or FakeTTS(),
            conv=conv if conv is not None else FakeConversation(greeting, replies),
            clock=clock,
        )

        async def on_turn(conversation_id: int, timings: TurnTimings) -> None:
            call.timings.append((conversation_id, timings))

        call.session = CallSession(
            call_sid=CALL_SID,
            caller=caller,
            conversation=call.conv,
            line=line,
            detector=call.detector,
            stt=call.stt,
            tts=call.tts,
            resample_8k_to_16k=to_16k,
            config=cfg or config(),
            on_turn=on_turn,
            clock=clock,
            on_handoff=on_handoff,
        )
        line.session = call.session
        made.append(call)
        if start:
            await call.session.start()
        return call

    yield factory
    for call in made:
        if isinstance(call.conv, FakeConversation):
            call.conv.release_all()
        await asyncio.wait_for(call.session.close("test_over"), timeout=2.0)


async def greeted(make_call: MakeCall, *, echo: bool = False, **kwargs: Any) -> Call:
    """A call whose greeting has been spoken and heard in full: the session is listening.

    The greeting's marks are echoed as they are sent; afterwards the line echoes only if ``echo``.
    """
    call = await make_call(echo=True, **kwargs)
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after the greeting")
    assert call.line.marks() == ["0:1:12", "0:1:33", "0:1:38"]
    call.line.echo = echo
    return call


# --------------------------------------------------------------------------------------
# 1. start: the greeting is spoken with marks


async def test_start_speaks_the_greeting_in_chunks_each_followed_by_a_mark_of_chars_heard(
    make_call: MakeCall,
) -> None:
    call = await make_call()

    await wait_until(lambda: len(call.line.marks()) == 3, "three greeting marks")

    assert call.conv.opened == [(CALL_SID, CALLER)]
    assert call.session.conversation_id == CONVERSATION_ID
    # "Hello there." = 12 chars = 96 bytes (one chunk); "How can I help you today?" = 200 bytes
    # = 160 + 40. Char offsets interpolate within the sentence: 12 + round(26 * 160 / 200) = 33.
    assert call.line.events == [
        ("audio", b"\xff" * 96),
        ("mark", "0:1:12"),
        ("audio", b"\xff" * 160),
        ("mark", "0:1:33"),
        ("audio", b"\xff" * 40),
        ("mark", "0:1:38"),
    ]
    offsets = [int(m.split(":")[2]) for m in call.line.marks()]
    assert offsets == sorted(offsets) and offsets[-1] == len(GREETING)
    assert call.tts.streamed == ["Hello there.", "How can I help you today?"]
    assert call.session.state == CallState.SPEAKING


async def test_the_session_keeps_speaking_until_twilio_echoes_the_last_mark(make_call: MakeCall) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting marks")

    assert call.line.play_ms(12) == ["0:1:12"]  # 96 bytes = 12 ms
    await asyncio.sleep(0.06)  # the session checks for its last mark every 50 ms
    assert call.session.state == CallState.SPEAKING
    assert call.line.play_ms(20) == ["0:1:33"]
    await asyncio.sleep(0.06)  # an absence to prove: still speaking until the last mark
    assert call.session.state == CallState.SPEAKING

    assert call.line.play_ms(5) == ["0:1:38"]
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after the last mark")
    assert call.line.hangups == []


async def test_marks_that_never_come_back_do_not_leave_the_call_speaking(make_call: MakeCall) -> None:
    call = await make_call(cfg=config(mark_grace_s=0.1))
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting marks")

    # 38 ms of audio + 0.1 s grace, polled every 50 ms.
    await wait_until(
        lambda: call.session.state == CallState.LISTENING, "listening after the grace period", 0.6
    )


async def test_an_empty_greeting_goes_straight_to_listening(make_call: MakeCall) -> None:
    call = await make_call(greeting="")

    assert call.session.state == CallState.LISTENING
    assert call.line.events == []


async def test_unknown_and_malformed_marks_are_ignored(make_call: MakeCall) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting marks")

    call.session.on_mark("not-ours")
    call.session.on_mark("a:b:c")
    call.session.on_mark("0:99:10")  # a seq this call is not speaking

    assert call.session.state == CallState.SPEAKING
    call.line.play()
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening")


# --------------------------------------------------------------------------------------
# 2. a caller turn


async def test_a_caller_turn_is_transcribed_sent_to_the_core_and_the_reply_is_spoken(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call, replies={"Where is my order?": "It shipped yesterday."})

    await call.caller_turn("Where is my order?")
    await wait_until(lambda: len(call.marks_of(3)) == 2, "reply marks")

    assert call.stt.samples == [len(UTTERANCE)]
    assert call.conv.calls == [
        HandleCall(Channel.VOICE, CALL_SID, "Where is my order?", f"voice:{CALL_SID}:1", "speech")
    ]
    # "It shipped yesterday." = 21 chars = 168 bytes = 160 + 8.
    assert call.marks_of(3) == ["0:3:20", "0:3:21"]
    assert call.line.audio()[-2:] == [b"\xff" * 160, b"\xff" * 8]
    assert call.session.state == CallState.SPEAKING

    call.line.play()
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after the reply")
    assert len(call.session.stats.turns) == 1
    assert call.session.stats.turns[0].text_chars == 21
    await wait_until(lambda: len(call.timings) == 1, "on_turn callback")
    assert call.timings[0][0] == CONVERSATION_ID


async def test_each_turn_gets_its_own_external_id(make_call: MakeCall) -> None:
    call = await greeted(make_call, echo=True)

    await call.caller_turn("Where is my order?")
    await wait_until(lambda: len(call.marks_of(3)) == 1, "first reply")
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening")
    await call.caller_turn("And the other one?")
    await wait_until(lambda: len(call.marks_of(5)) == 1, "second reply")

    assert [c.external_id for c in call.conv.calls] == [f"voice:{CALL_SID}:1", f"voice:{CALL_SID}:2"]
    assert [c.text for c in call.conv.calls] == ["Where is my order?", "And the other one?"]


@pytest.mark.parametrize("text", ["", "   ", "...", "?!"])
async def test_a_turn_with_no_words_is_dropped(make_call: MakeCall, text: str) -> None:
    call = await greeted(make_call)

    await call.caller_turn(text)
    await wait_until(lambda: call.stt.samples == [len(UTTERANCE)], "the turn was transcribed")
    await asyncio.sleep(0.02)  # an absence to prove: nothing reaches the core once it is transcribed

    assert call.stt.samples == [len(UTTERANCE)]
    assert call.conv.calls == []
    assert call.session.state == CallState.LISTENING


async def test_transcription_started_when_speech_stops_is_reused_at_the_end_of_turn(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call)
    early = np.zeros(8000, dtype=np.int16)
    call.stt.texts.append("Where is my order?")
    call.detector.queue(DetectorEvent("speech_started"))
    await call.session.on_audio(FRAME)
    call.detector.queue(DetectorEvent("speech_stopped", audio=early, speech_ms=900))
    await call.session.on_audio(FRAME)
    await wait_until(
        lambda: call.stt.samples == [len(early)], "transcription started before the turn is over"
    )

    call.detector.queue(DetectorEvent("end_of_turn", audio=UTTERANCE, speech_ms=900))
    await call.session.on_audio(FRAME)
    await wait_until(lambda: call.conv.calls != [], "handle_text")

    assert call.stt.samples == [len(early)]  # not transcribed twice
    assert [c.text for c in call.conv.calls] == ["Where is my order?"]


async def test_an_early_transcription_is_dropped_when_the_caller_goes_on_speaking(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call)
    early = np.zeros(8000, dtype=np.int16)
    call.stt.delay = 0.05  # the early transcription is still running when speech resumes
    call.stt.texts.extend(["Where is my order?"])  # a cancelled transcription never takes a text
    call.detector.queue(DetectorEvent("speech_started"))
    await call.session.on_audio(FRAME)
    call.detector.queue(DetectorEvent("speech_stopped", audio=early, speech_ms=400))
    await call.session.on_audio(FRAME)
    await wait_until(lambda: len(call.stt.samples) == 1, "the early transcription started")
    call.detector.queue(DetectorEvent("speech_started"))  # the caller was only pausing
    await call.session.on_audio(FRAME)

    call.detector.queue(DetectorEvent("end_of_turn", audio=UTTERANCE, speech_ms=900))
    await call.session.on_audio(FRAME)
    await wait_until(lambda: call.conv.calls != [], "handle_text")

    # the early one was cancelled (its text never used); the whole utterance was transcribed
    assert call.stt.samples == [len(early), len(UTTERANCE)]
    assert [c.text for c in call.conv.calls] == ["Where is my order?"]


# --------------------------------------------------------------------------------------
# 3. barge-in


async def test_barge_in_clears_stops_synthesis_and_stores_only_the_heard_words(make_call: MakeCall) -> None:
    greeting = "Hello there. I can help with orders. What do you need?"
    call = await make_call(
        greeting=greeting, tts=FakeTTS(delay=0.1), replies={"I want a refund": "Which order?"}
    )
    await wait_until(lambda: call.line.marks() == ["0:1:12"], "first sentence sent")
    assert call.line.play() == ["0:1:12"]

    await call.caller_speaks_for(300)
    # Paused at once (the caller hears nothing more), but not yet interrupted: not long enough.
    assert call.line.kinds()[-1] == "clear"
    assert call.session.paused and call.session.state == CallState.SPEAKING
    assert call.session.stats.interruptions == 0
    call.clock.advance(0.3)
    await call.session.on_audio(FRAME)

    assert call.line.kinds()[-1] == "clear"
    assert call.session.state == CallState.LISTENING
    assert call.session.stats.interruptions == 1
    await wait_until(lambda: call.conv.interrupted != [], "mark_interrupted")
    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "Hello there.")]
    events_at_clear = len(call.line.events)
    await asyncio.sleep(0.25)  # two more sentence delays: nothing more may be synthesized or sent
    assert len(call.line.events) == events_at_clear
    assert call.tts.streamed == ["Hello there."]

    # The next turn proceeds normally; the reply's marks belong to the new epoch.
    await call.caller_turn("I want a refund")
    await wait_until(lambda: len(call.marks_of(3)) == 1, "reply after the barge-in")
    assert call.conv.calls == [
        HandleCall(Channel.VOICE, CALL_SID, "I want a refund", f"voice:{CALL_SID}:1", "speech")
    ]
    assert call.marks_of(3) == ["1:3:12"]  # "Which order?" = 12 chars, one chunk
    call.line.play()
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after the reply")
    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "Hello there.")]


async def test_marks_echoed_because_of_the_clear_do_not_count_as_heard(make_call: MakeCall) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.line.play(1)  # "Hello there." played; the rest is still buffered at Twilio

    await call.caller_speaks_for(600)

    # FakeLine.send_clear echoed 0:1:33 and 0:1:38 back at once, like Twilio.
    assert call.line.unplayed == []
    await wait_until(lambda: call.conv.interrupted != [], "mark_interrupted")
    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "Hello there.")]
    call.session.on_mark("0:1:38")  # a straggler of the old epoch, later still
    await asyncio.sleep(0.02)  # an absence to prove: the straggler changes nothing
    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "Hello there.")]
    assert call.session.state == CallState.LISTENING


async def test_barge_in_before_anything_was_heard_stores_an_empty_prefix(make_call: MakeCall) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")

    await call.caller_speaks_for(600)

    await wait_until(lambda: call.conv.interrupted != [], "mark_interrupted")
    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "")]


async def test_barge_in_after_a_mid_sentence_mark_cuts_at_a_word_boundary(make_call: MakeCall) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.line.play(2)  # up to char 33: "Hello there. How can I help you t|oday?"

    await call.caller_speaks_for(600)

    await wait_until(lambda: call.conv.interrupted != [], "mark_interrupted")
    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "Hello there. How can I help you")]


async def test_speech_shorter_than_barge_in_min_ms_pauses_and_a_noise_resumes_where_it_paused(
    make_call: MakeCall,
) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.line.play(1)  # "Hello there." was heard; "How can I help you today?" is still buffered

    await call.caller_speaks_for(499)
    assert call.line.kinds()[-1] == "clear"  # silent at the caller's onset
    assert call.session.paused
    call.stt.texts.append("")  # a noise: nothing the transcriber can write
    call.detector.queue(
        DetectorEvent("speech_stopped", speech_ms=499),
        DetectorEvent("end_of_turn", audio=UTTERANCE, speech_ms=499),
    )
    await call.session.on_audio(FRAME)

    # The bot goes on: the two chunks the caller had not heard are sent again, new epoch.
    await wait_until(lambda: call.line.marks()[-2:] == ["1:1:33", "1:1:38"], "unheard chunks sent again")
    assert call.session.stats.interruptions == 0
    assert call.session.stats.resumes == 1
    assert call.session.state == CallState.SPEAKING and not call.session.paused
    call.line.play()
    await wait_until(lambda: call.session.state == CallState.LISTENING, "greeting finished after the resume")
    assert call.conv.interrupted == []


async def test_caller_speech_while_listening_never_sends_a_clear(make_call: MakeCall) -> None:
    call = await greeted(make_call)

    await call.caller_speaks_for(2000)

    assert "clear" not in call.line.kinds()
    assert call.session.stats.interruptions == 0


# --------------------------------------------------------------------------------------
# 4. backchannels


@pytest.mark.parametrize("text", ["mm-hmm", "Okay.", "yeah, right", "Uh-huh"])
async def test_a_short_backchannel_while_speaking_is_ignored(make_call: MakeCall, text: str) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")

    await call.caller_turn(text, speech_ms=300)
    await wait_until(lambda: call.session.stats.ignored_backchannels == 1, "backchannel counted")

    assert call.stt.samples == [len(UTTERANCE)]
    assert "clear" not in call.line.kinds()
    assert call.conv.calls == []
    assert call.conv.interrupted == []
    assert call.session.state == CallState.SPEAKING
    assert call.session.stats.interruptions == 0


async def test_a_short_stop_while_speaking_interrupts_and_becomes_a_turn(make_call: MakeCall) -> None:
    call = await make_call(replies={"stop": "Okay, I'll stop. What do you need?"})
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.line.play(1)

    await call.caller_turn("stop", speech_ms=300)
    await wait_until(lambda: call.conv.calls != [], "handle_text")

    assert "clear" in call.line.kinds()
    assert call.conv.calls == [HandleCall(Channel.VOICE, CALL_SID, "stop", f"voice:{CALL_SID}:1", "speech")]
    await wait_until(lambda: call.conv.interrupted != [], "mark_interrupted")
    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "Hello there.")]
    assert call.session.stats.ignored_backchannels == 0
    await wait_until(lambda: len(call.marks_of(3)) > 0, "reply spoken")
    assert all(m.startswith("1:") for m in call.marks_of(3))


async def test_a_backchannel_while_listening_is_a_normal_turn(make_call: MakeCall) -> None:
    call = await greeted(make_call)

    await call.caller_turn("okay", speech_ms=300)
    await wait_until(lambda: call.conv.calls != [], "handle_text")

    assert call.conv.calls[0].text == "okay"
    assert call.session.stats.ignored_backchannels == 0


# --------------------------------------------------------------------------------------
# 5. DTMF


async def test_keypad_digits_ending_with_hash_are_one_dtmf_turn(make_call: MakeCall) -> None:
    call = await greeted(make_call)

    for digit in "4517#":
        call.session.on_dtmf(digit)
    await wait_until(lambda: call.conv.calls != [], "handle_text")
    await asyncio.sleep(0.12)  # longer than dtmf_timeout_s: no second submission

    assert call.conv.calls == [HandleCall(Channel.VOICE, CALL_SID, "4517", f"voice:{CALL_SID}:1", "dtmf")]


async def test_keypad_digits_are_submitted_after_the_dtmf_timeout(make_call: MakeCall) -> None:
    call = await greeted(make_call)

    for digit in "451":
        call.session.on_dtmf(digit)
    # The keypad timer runs on the event loop's clock: these waits are the pauses between key
    # presses being simulated (0.03 + 0.05 s < dtmf_timeout_s only because "7" restarted it).
    await asyncio.sleep(0.03)
    call.session.on_dtmf("7")  # restarts the timer
    await asyncio.sleep(0.05)
    assert call.conv.calls == []

    await wait_until(lambda: call.conv.calls != [], "handle_text after the timeout", 0.5)
    assert call.conv.calls == [HandleCall(Channel.VOICE, CALL_SID, "4517", f"voice:{CALL_SID}:1", "dtmf")]


async def test_zero_pressed_first_asks_for_a_person(make_call: MakeCall) -> None:
    call = await greeted(make_call)

    call.session.on_dtmf("0")
    await wait_until(lambda: call.conv.calls != [], "handle_text")

    assert call.conv.calls == [
        HandleCall(Channel.VOICE, CALL_SID, "0 (keypad: talk to a person)", f"voice:{CALL_SID}:1", "dtmf")
    ]


async def test_zero_inside_a_number_is_just_a_digit(make_call: MakeCall) -> None:
    call = await greeted(make_call)

    for digit in "1020#":
        call.session.on_dtmf(digit)
    await wait_until(lambda: call.conv.calls != [], "handle_text")

    assert [c.text for c in call.conv.calls] == ["1020"]


async def test_a_lone_hash_submits_nothing(make_call: MakeCall) -> None:
    call = await greeted(make_call)

    call.session.on_dtmf("#")
    await asyncio.sleep(0.12)  # an absence to prove: longer than dtmf_timeout_s, still no turn

    assert call.conv.calls == []


async def test_a_keypad_turn_while_speaking_interrupts_the_bot(make_call: MakeCall) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")

    call.session.on_dtmf("0")
    await wait_until(lambda: call.conv.calls != [], "handle_text")

    assert "clear" in call.line.kinds()
    await wait_until(lambda: call.conv.interrupted != [], "mark_interrupted")
    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "")]


# --------------------------------------------------------------------------------------
# 6. goodbye


async def test_a_goodbye_reply_hangs_up_after_it_has_been_heard(make_call: MakeCall) -> None:
    call = await greeted(make_call, replies={"bye": ("Thanks for calling. Goodbye!", "goodbye")})

    await call.caller_turn("bye")
    await wait_until(lambda: call.marks_of(3)[-1:] == ["0:3:28"], "goodbye sent")
    await asyncio.sleep(0.08)  # an absence to prove: no hang-up while the goodbye plays
    assert call.line.hangups == []  # still playing

    call.line.play()
    await wait_until(lambda: call.line.hangups != [], "hang-up")

    assert call.line.hangups == ["goodbye"]
    assert call.line.kinds()[-1] == "hangup"
    assert call.session.state == CallState.ENDING


async def test_barge_in_during_the_goodbye_cancels_the_hang_up(make_call: MakeCall) -> None:
    call = await greeted(make_call, replies={"bye": ("Thanks for calling. Goodbye!", "goodbye")})
    await call.caller_turn("bye")
    await wait_until(lambda: len(call.marks_of(3)) > 0, "goodbye sent")

    await call.caller_speaks_for(600)
    await asyncio.sleep(0.1)  # an absence to prove: the cancelled goodbye never hangs up

    assert call.line.hangups == []
    assert call.session.state == CallState.LISTENING


async def test_a_handoff_reply_starts_the_transfer_only_after_it_has_been_heard(make_call: MakeCall) -> None:
    handed_off: list[tuple[str, int]] = []

    async def on_handoff(call_sid: str, conversation_id: int) -> None:
        handed_off.append((call_sid, conversation_id))

    call = await greeted(
        make_call,
        replies={"a person please": ("Connecting you to our team now.", "handoff")},
        on_handoff=on_handoff,
    )
    await call.caller_turn("a person please")
    await wait_until(lambda: len(call.marks_of(3)) > 0, "handoff line sent")
    await asyncio.sleep(0.08)  # an absence to prove: no transfer while the line plays
    assert handed_off == []  # still playing

    call.line.play()
    await wait_until(lambda: handed_off != [], "transfer started")

    assert handed_off == [(CALL_SID, call.session.conversation_id)]
    assert call.line.hangups == []  # moving the call ends the stream; no hang-up
    assert call.session.state == CallState.ENDING


async def test_a_barge_in_during_the_handoff_line_still_transfers_after_the_next_reply(
    make_call: MakeCall,
) -> None:
    handed_off: list[tuple[str, int]] = []

    async def on_handoff(call_sid: str, conversation_id: int) -> None:
        handed_off.append((call_sid, conversation_id))

    call = await greeted(
        make_call,
        replies={
            "a person please": ("Connecting you to our team now.", "handoff"),
            "hello?": "Still connecting you.",
        },
        on_handoff=on_handoff,
    )
    await call.caller_turn("a person please")
    await wait_until(lambda: len(call.marks_of(3)) > 0, "handoff line sent")
    await call.caller_speaks_for(600)
    await call.caller_turn("hello?")
    call.line.echo = True
    call.line.play()
    await wait_until(lambda: handed_off != [], "transfer started")
    assert call.line.hangups == []


ANA_PHONE = "+15551230000"
ANA = Customer(ref="C1", name="Ana Souza", phone=ANA_PHONE, email="ana@example.com", whatsapp_id=ANA_PHONE)


async def test_a_goodbye_through_the_real_conversation_core_hangs_up_the_call(make_call: MakeCall) -> None:
    # The session hangs up when the core's reply says intent == "goodbye"; the real
    # ConversationService must tell it so, or callers who say "bye" are never hung up on.
    business = FakeBusiness([ANA], [])
    service = ConversationService(
        FakeConversationStore(),
        TurnManager(KeywordClassifier(), business, load_intents()),
        business,
        FakeClock(datetime(2026, 3, 20, 15, 0, tzinfo=UTC)),
    )
    call = await make_call(conv=service, caller=ANA_PHONE, echo=True)
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after the greeting")

    await call.caller_turn("thanks, bye")
    await wait_until(
        lambda: any(s.startswith("Have a great day") for s in call.tts.streamed), "goodbye spoken"
    )

    await wait_until(lambda: call.line.hangups != [], "hang-up after the goodbye", 0.3)
    assert call.line.hangups == ["goodbye"]


# --------------------------------------------------------------------------------------
# 7. silence watchdog


async def test_silence_gets_a_reprompt_then_a_goodbye_and_a_hang_up(make_call: MakeCall) -> None:
    call = await greeted(make_call, echo=True, cfg=config(reprompt_after_s=1.0))
    reprompt, goodbye = render("reprompt"), render("silence_goodbye")

    call.clock.advance(0.9)
    await asyncio.sleep(0.26)  # at least one watchdog tick: not silent long enough yet
    assert call.tts.streamed == ["Hello there.", "How can I help you today?"]

    call.clock.advance(0.2)
    await wait_until(lambda: reprompt in call.tts.streamed, "reprompt")
    assert call.marks_of(-1) == [f"0:-1:{len(reprompt)}"]
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after the reprompt")
    assert call.line.hangups == []

    call.clock.advance(1.1)
    await wait_until(lambda: call.line.hangups != [], "hang-up")

    assert call.line.hangups == ["silence"]
    assert call.tts.streamed[2:] == [reprompt, *FakeTTS().sentences(goodbye)]
    assert call.line.kinds()[-1] == "hangup"
    assert call.conv.calls == []
    assert call.conv.interrupted == []  # prompts are not stored bot turns


async def test_a_caller_turn_after_a_reprompt_resets_the_silence_count(make_call: MakeCall) -> None:
    call = await greeted(make_call, echo=True, cfg=config(reprompt_after_s=1.0))
    reprompt = render("reprompt")
    call.clock.advance(1.1)
    await wait_until(lambda: reprompt in call.tts.streamed, "reprompt")
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening")

    await call.caller_turn("Sorry, I'm here")
    await wait_until(lambda: len(call.marks_of(3)) == 1, "reply")
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening")
    call.clock.advance(1.1)
    await wait_until(lambda: call.tts.streamed.count(reprompt) == 2, "a second reprompt, not a goodbye")

    assert call.line.hangups == []


async def test_a_filler_from_a_slow_core_is_spoken_and_the_answer_follows_it_without_overlap(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call, echo=False)
    call.conv.fillers["Where is my order?"] = "One moment."
    gate = call.conv.hold("Where is my order?")
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.marks_of(-1) != [], "filler spoken while the core works")
    gate.set()
    await asyncio.sleep(0.05)  # an absence to prove: see below
    assert call.marks_of(3) == []  # the answer waits while the filler is still playing
    call.line.play()
    await wait_until(lambda: call.marks_of(3) != [], "answer spoken after the filler")
    marks = call.line.marks()
    assert max(i for i, m in enumerate(marks) if m.split(":")[1] == "-1") < marks.index(call.marks_of(3)[0])
    assert call.conv.completed == ["Where is my order?"]


async def test_a_streamed_reply_is_spoken_before_the_core_returns_and_its_rest_follows_once(
    make_call: MakeCall,
) -> None:
    call = await greeted(
        make_call, echo=True, replies={"Where is my order?": "Let me check. It shipped on Monday."}
    )
    call.conv.streams["Where is my order?"] = ["Let me check."]
    gate = call.conv.hold("Where is my order?")
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.marks_of(-2) != [], "streamed sentence spoken while the core works")
    assert call.conv.completed == []
    gate.set()
    await wait_until(lambda: call.marks_of(3) != [], "the rest of the stored reply")
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening again")
    assert call.tts.streamed[-2:] == ["Let me check.", "It shipped on Monday."]  # each said once
    assert call.marks_of(3)[-1].endswith(f":{len('Let me check. It shipped on Monday.')}")
    assert call.session.stats.turns[-1].voice_to_voice_ms is not None


async def test_a_barge_in_over_a_streamed_reply_stores_what_was_heard_once_the_turn_is_stored(
    make_call: MakeCall,
) -> None:
    call = await greeted(
        make_call, echo=False, replies={"Where is my order?": "Let me check that. It shipped on Monday."}
    )
    call.conv.streams["Where is my order?"] = ["Let me check that."]
    gate = call.conv.hold("Where is my order?")
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.marks_of(-2) != [], "streamed sentence sent")
    call.line.play()
    await call.caller_speaks_for(600)
    assert call.line.kinds()[-1] == "clear"
    assert call.conv.interrupted == []  # the turn is not stored yet
    gate.set()
    await wait_until(lambda: call.conv.interrupted != [], "mark_interrupted after the turn was stored")
    assert call.conv.interrupted == [(CONVERSATION_ID, 3, "Let me check that.")]
    await asyncio.sleep(0.05)  # an absence to prove: see below
    assert call.marks_of(3) == []  # the rest is never spoken
    assert "It shipped on Monday." not in call.tts.streamed


# --------------------------------------------------------------------------------------
# 8. close


async def test_close_lets_an_in_flight_core_turn_finish(make_call: MakeCall) -> None:
    call = await greeted(make_call, echo=True)
    gate = call.conv.hold("Where is my order?")
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.conv.calls != [], "handle_text started")

    closing = asyncio.create_task(call.session.close("caller_hung_up"))
    await asyncio.sleep(0.05)  # an absence to prove: close does not return before the write
    assert not closing.done()  # waiting for the transcript write
    assert call.conv.cancelled == []

    gate.set()
    await asyncio.wait_for(closing, timeout=1.0)

    assert call.conv.completed == ["Where is my order?"]
    assert call.conv.cancelled == []
    assert call.session.state == CallState.ENDED
    assert call.marks_of(3) == []  # the reply is not spoken into a closed call


async def test_close_stops_speaking_and_the_watchdog(make_call: MakeCall) -> None:
    call = await make_call(tts=FakeTTS(delay=0.1), cfg=config(reprompt_after_s=1.0))
    await wait_until(lambda: call.line.marks() == ["0:1:12"], "first sentence sent")

    await asyncio.wait_for(call.session.close("caller_hung_up"), timeout=1.0)
    events_at_close = len(call.line.events)
    call.clock.advance(100.0)
    await asyncio.sleep(0.3)  # longer than a watchdog tick and two sentence delays

    assert call.session.state == CallState.ENDED
    assert len(call.line.events) == events_at_close
    assert call.tts.streamed == ["Hello there."]
    assert call.line.hangups == []
    await call.session.on_audio(FRAME)  # events after close are ignored
    call.session.on_mark("0:1:12")
    await call.session.close("again")  # idempotent


async def test_close_waits_for_a_mark_interrupted_write_started_by_a_barge_in(make_call: MakeCall) -> None:
    call = await make_call()
    call.conv.interrupt_delay = 0.1
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.line.play(1)
    await call.caller_speaks_for(600)
    assert call.conv.interrupted == []  # still being written

    await asyncio.wait_for(call.session.close("caller_hung_up"), timeout=1.0)

    assert call.conv.interrupted == [(CONVERSATION_ID, 1, "Hello there.")]


async def test_close_returns_even_if_a_transcript_write_never_finishes(make_call: MakeCall) -> None:
    # A hung database write must not hang the WebSocket handler (or server shutdown) forever:
    # every wait has a timeout.
    cfg = config(turn_timeout_s=0.2)
    call = await greeted(make_call, echo=True, cfg=cfg)
    call.conv.hold("Where is my order?")  # never released
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.conv.calls != [], "handle_text started")

    try:
        await asyncio.wait_for(call.session.close("caller_hung_up"), timeout=cfg.turn_timeout_s + 0.2)
    except TimeoutError:
        pytest.fail("close() waited forever for a transcript write that never finished")
    assert call.session.state == CallState.ENDED


# --------------------------------------------------------------------------------------
# 10. timeouts and failures never leave the call hanging


async def test_a_core_turn_that_never_returns_times_out_back_to_listening(make_call: MakeCall) -> None:
    call = await greeted(make_call, echo=True, replies={"Hello?": "Sorry, I'm here."})
    call.conv.hold("Where is my order?")  # never released during the call

    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.session.state == CallState.THINKING, "thinking")
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after turn_timeout_s", 1.0)
    assert call.marks_of(3) == []

    await call.caller_turn("Hello?")
    # The stuck turn stored the caller's message (seq 2) but no reply: this reply is seq 4.
    await wait_until(lambda: call.marks_of(4) == ["0:4:16"], "reply to the next turn")
    assert [c.external_id for c in call.conv.calls] == [f"voice:{CALL_SID}:1", f"voice:{CALL_SID}:2"]
    assert call.conv.cancelled == []  # timed out, but the write itself was not cancelled


async def test_a_core_turn_that_raises_does_not_kill_the_call(make_call: MakeCall) -> None:
    call = await greeted(make_call, echo=True, replies={"Hello?": "Sorry, I'm here."})
    call.conv.fail.add("Where is my order?")

    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.conv.calls != [], "handle_text")
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after a failed turn", 0.3)

    await call.caller_turn("Hello?")
    await wait_until(lambda: len(call.conv.calls) == 2, "the next turn reaches the core", 0.5)
    await wait_until(lambda: call.marks_of(4) == ["0:4:16"], "reply to the next turn")


async def test_a_synthesis_failure_does_not_leave_the_call_speaking_forever(make_call: MakeCall) -> None:
    call = await make_call(echo=True, tts=FakeTTS(fail_on="How can I help"), cfg=config(mark_grace_s=0.1))

    await wait_until(lambda: call.line.marks() == ["0:1:12"], "first sentence sent")
    await wait_until(lambda: call.session.state == CallState.LISTENING, "listening after the TTS failed", 0.3)


async def test_the_max_duration_goodbye_does_not_talk_over_the_current_speech(make_call: MakeCall) -> None:
    # Call length runs out while the greeting is still being synthesized: the goodbye must replace
    # it (not play interleaved with it from a second, untracked speaking task), and the hang-up
    # must come after the goodbye, not when the old greeting task finishes.
    greeting = "Hello there. I can help with orders. What do you need?"
    goodbye = FakeTTS().sentences(render("max_duration_goodbye"))
    call = await make_call(greeting=greeting, echo=True, tts=FakeTTS(delay=0.15), cfg=config(max_call_s=10.0))
    # Tasks start in creation order: the watchdog (noting the start time) runs before the greeting.
    await wait_until(lambda: call.tts.requested != [], "greeting synthesis started")
    call.clock.advance(11.0)  # its first tick (0.25 s) finds the call too long, mid-greeting

    await wait_until(lambda: call.line.hangups != [], "hang-up", 1.5)
    await asyncio.sleep(0.3)  # an absence to prove: nothing is sent after the hang-up

    assert call.line.hangups == ["max_duration"]
    assert call.line.kinds()[-1] == "hangup", "audio was sent after the hang-up"
    assert call.tts.streamed == ["Hello there.", *goodbye]


async def test_ending_politely_cuts_the_reply_says_the_goodbye_then_hangs_up(make_call: MakeCall) -> None:
    # A draining node ends the calls still running when its drain time is over.
    greeting = "Hello there. I can help with orders. What do you need?"
    goodbye = FakeTTS().sentences(render("drain_goodbye"))
    call = await make_call(greeting=greeting, echo=True, tts=FakeTTS(delay=0.15))
    await wait_until(lambda: call.tts.requested != [], "greeting synthesis started")

    await call.session.end_politely("node_draining", "drain_goodbye")
    await wait_until(lambda: call.line.hangups != [], "hang-up", 1.5)

    assert call.line.hangups == ["node_draining"]
    assert call.tts.streamed[-len(goodbye) :] == goodbye
    assert call.line.kinds()[-1] == "hangup"
    await call.session.end_politely("node_draining", "drain_goodbye")  # once only
    assert call.tts.streamed.count(goodbye[0]) == 1


# --------------------------------------------------------------------------------------
# 9. pure helpers


TEXT = "Hello there friend"


@pytest.mark.parametrize(
    ("chars", "expected"),
    [
        (0, ""),
        (-3, ""),
        (3, ""),  # inside the first word: nothing whole was heard
        (5, "Hello"),
        (6, "Hello"),
        (8, "Hello"),  # "Hello th|ere": the partial word is dropped
        (11, "Hello there"),
        (12, "Hello there"),
        (13, "Hello there"),
        (17, "Hello there"),
        (18, TEXT),
        (100, TEXT),
    ],
)
def test_heard_prefix_keeps_whole_words(chars: int, expected: str) -> None:
    assert heard_prefix(TEXT, chars) == expected


@pytest.mark.parametrize(
    ("text", "chars", "expected"),
    [
        ("Sure, your refund is done.", 5, "Sure"),
        ("Sure, your refund is done.", 6, "Sure"),
        ("Sure, your refund is done.", 26, "Sure, your refund is done."),
        ("Hello there. How are you?", 12, "Hello there."),
        ("Order 4517: delivered.", 10, "Order 4517"),
        ("Order 4517: delivered.", 8, "Order"),
    ],
)
def test_heard_prefix_trims_trailing_separators_and_partial_words(
    text: str, chars: int, expected: str
) -> None:
    assert heard_prefix(text, chars) == expected


@pytest.mark.parametrize(
    ("chars", "expected"),
    [
        (6, "We"),  # "We can|'t": saving "We can" would reverse the meaning
        (7, "We"),  # "We can'|t"
        (8, "We can't"),
    ],
)
def test_heard_prefix_never_cuts_a_contraction_into_a_different_word(chars: int, expected: str) -> None:
    assert heard_prefix("We can't refund that order.", chars) == expected


WORDS = VoiceConfig().backchannels


@pytest.mark.parametrize(
    "text",
    [
        "mm-hmm",
        "Mm-hmm.",
        "okay",
        "Okay.",
        "OK!",
        "yeah",
        "uh-huh",
        "I see",
        "got it",
        "yeah, right",
        "  sure  ",
        "Alright.",
        "Mm-mm.",
        "Mhm.",
        "Hmm?",
        "uh huh",
        "Uh-huh, yeah.",
        "[cough]",
        "(coughs)",
        "Thank you.",
    ],
)
def test_backchannels(text: str) -> None:
    assert is_backchannel(text, WORDS) is True


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "...",
        "stop",
        "no",
        "wait",
        "okay stop",
        "yes please",
        "4517",
        "hold on",
        "what",
        "he",
        "cancel it",
    ],
)
def test_not_backchannels(text: str) -> None:
    assert is_backchannel(text, WORDS) is False


@pytest.mark.parametrize(
    ("text", "backchannel"),
    [
        ("and", True),
        ("And they came.", True),
        ("and then and then", True),
        ("stop", False),
        ("no", False),
        ("wait a second", False),
        ("4517", False),
        ("sorry", False),
    ],
)
def test_a_short_sound_over_the_bot_is_a_backchannel_unless_it_holds_an_interrupting_word(
    text: str, backchannel: bool
) -> None:
    # A transcriber writes a 0.4 s "mm hmm" as "and": short sounds interrupt only with a word
    # that means "listen to me".
    assert is_backchannel(text, WORDS, speech_ms=400) is backchannel


@pytest.mark.parametrize(
    ("text", "backchannel"),
    [
        ("and then and then", True),  # a 1 s "mm mm" as tiny.en writes it
        ("Uh, and so, the...", True),
        ("and then what", False),
        ("and the other order", False),
        ("so cancel it", False),
    ],
)
def test_a_medium_sound_over_the_bot_needs_a_content_word_beyond_function_words(
    text: str, backchannel: bool
) -> None:
    assert is_backchannel(text, WORDS, speech_ms=1000) is backchannel


def test_long_speech_is_never_a_backchannel_whatever_its_words() -> None:
    assert is_backchannel("yeah yeah okay right", WORDS, speech_ms=800) is True
    assert is_backchannel("yeah yeah okay right", WORDS, speech_ms=2500) is False


@pytest.mark.parametrize(
    ("text", "unfinished"),
    [
        ("I'd like to cancel the", True),
        ("I'd like to cancel...", True),
        ("My order is", True),
        ("Um,", True),
        ("I was wondering if you could.", True),
        ("I think you should", True),
        ("I'd like to cancel my order.", False),
        ("Where is my order?", False),
        ("", False),
    ],
)
def test_a_thought_that_trails_off(text: str, unfinished: bool) -> None:
    assert sounds_unfinished(text) is unfinished


@pytest.mark.parametrize(
    ("text", "sentences", "expected"),
    [
        ("Hi there. How are you?", ["Hi there.", "How are you?"], [9, 22]),
        ("Hello.  Bye.", ["Hello.", "Bye."], [6, 12]),
        ("No. No.", ["No.", "No."], [3, 7]),  # a repeated sentence is found after the first
        ("Hi. ", ["Hi."], [4]),  # the last sentence always reaches the end of the text
        ("Short text", [], [10]),
        ("abc def", ["xyz"], [7]),  # not found: fall back to lengths, still ending at len(text)
        ("abc def ghi", ["X Y", "Z Z Z"], [3, 11]),
    ],
)
def test_sentence_ends(text: str, sentences: list[str], expected: list[int]) -> None:
    assert sentence_ends(text, sentences) == expected


@pytest.mark.parametrize(
    ("text", "finished"),
    [
        ("My order is 4517.", True),
        ("Where is my order?", True),
        ("Yes, please!", True),
        ("I want to.", False),
        ("My order number is...", False),
        ("my order number is", False),
        ("Cancel the order and.", False),
        ("", False),
        ("My order is 4517", True),
        ("my number is 555 123", False),
        ("4517", False),
        # digit groups split by the transcriber are still one finished number
        ("My order is 451 7", True),
        ("My order is 45 17", True),
        ("My order is 4-5-1-7", True),
        ("My order is 4,517", True),
        ("my number is 555 123 4567", True),
        ("my order is 45", False),
        ("my order is 4 5", False),
    ],
)
def test_a_transcript_reads_as_finished_only_when_closed_and_not_dangling(text: str, finished: bool) -> None:
    assert sounds_finished(text) is finished


# --------------------------------------------------------------------------------------
# turn-taking that feels human: pause at the onset, resume after a backchannel, yield to a
# caller who goes on, wall-clock turn ends, a failed transcription


@pytest.mark.parametrize("text", ["Mm-mm.", "Mhm.", "Uh huh.", "Hmm?", "[cough]", "Yeah, yeah, right."])
async def test_a_backchannel_in_any_spelling_pauses_the_bot_then_it_goes_on_where_it_paused(
    make_call: MakeCall, text: str
) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.line.play(1)

    call.detector.queue(DetectorEvent("speech_onset"))
    await call.session.on_audio(FRAME)
    assert call.line.kinds()[-1] == "clear" and call.session.paused  # silent at the onset
    call.detector.queue(DetectorEvent("speech_started"))
    await call.session.on_audio(FRAME)
    call.clock.advance(0.4)
    await call.caller_turn(text, speech_ms=400)

    await wait_until(lambda: call.line.marks()[-2:] == ["1:1:33", "1:1:38"], "the rest of the greeting again")
    assert call.session.stats.ignored_backchannels == 1
    assert call.session.stats.interruptions == 0
    assert call.conv.calls == [] and call.conv.interrupted == []


async def test_the_speculative_transcript_of_a_backchannel_resumes_before_the_turn_ends(
    make_call: MakeCall,
) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.detector.queue(DetectorEvent("speech_onset"))
    await call.session.on_audio(FRAME)
    call.stt.texts.append("Mm-hmm.")
    call.detector.queue(DetectorEvent("speech_started"))
    await call.session.on_audio(FRAME)
    call.detector.queue(DetectorEvent("speech_stopped", audio=UTTERANCE[:4000], speech_ms=300))
    await call.session.on_audio(FRAME)

    await wait_until(lambda: call.session.stats.resumes == 1, "resumed on the early transcript")
    assert not call.session.paused and call.session.state == CallState.SPEAKING


async def test_an_onset_that_was_only_a_click_resumes_at_once(make_call: MakeCall) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.detector.queue(DetectorEvent("speech_onset"))
    await call.session.on_audio(FRAME)
    assert call.session.paused
    call.detector.queue(DetectorEvent("onset_lost"))
    await call.session.on_audio(FRAME)

    assert not call.session.paused
    assert call.session.stats.resumes == 1
    await wait_until(lambda: call.line.marks()[-3:] == ["1:1:12", "1:1:33", "1:1:38"], "greeting sent again")


async def test_a_pause_nothing_decides_goes_on_after_pause_max_ms(make_call: MakeCall) -> None:
    call = await make_call(cfg=config(pause_max_ms=50))
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.detector.queue(DetectorEvent("speech_onset"))
    await call.session.on_audio(FRAME)
    assert call.session.paused

    await wait_until(lambda: not call.session.paused, "the pause timed out")
    assert call.session.stats.resumes == 1 and call.session.stats.interruptions == 0


async def test_long_speech_over_the_bot_interrupts_even_without_words(make_call: MakeCall) -> None:
    call = await make_call()
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.detector.queue(DetectorEvent("speech_onset"))
    await call.session.on_audio(FRAME)
    await call.caller_speaks_for(600)  # over barge_in_min_ms (500 here)

    assert call.session.stats.interruptions == 1
    assert call.line.kinds().count("clear") == 1  # the pause's clear was enough
    assert call.session.state == CallState.LISTENING


class StoppingDetector(ScriptedDetector):
    """A detector whose caller's last voiced frame was ``since_voice_ms`` ago (the VAD has not yet
    confirmed the stop)."""

    since_voice_ms = 0.0


async def test_speech_over_the_bot_counts_up_to_its_last_voiced_sound_not_the_stop_confirmation(
    make_call: MakeCall,
) -> None:
    call = await make_call()
    detector = StoppingDetector()
    call.session._detector = detector
    call.detector = detector
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    detector.queue(DetectorEvent("speech_onset"))
    await call.session.on_audio(FRAME)
    detector.since_voice_ms = 200.0  # a 400 ms hum, then 200 ms of quiet the VAD has not confirmed yet
    await call.caller_speaks_for(600)
    assert call.session.stats.interruptions == 0  # voiced for 400 ms: under barge_in_min_ms (500)
    assert call.session.paused

    detector.since_voice_ms = 0.0  # ... but voiced all along: it interrupts
    await call.session.on_audio(FRAME)
    assert call.session.stats.interruptions == 1


async def test_a_caller_who_goes_on_right_after_their_turn_makes_the_bot_yield_and_both_parts_are_one_turn(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call, replies={"I'd like to cancel": "Which order would you like to cancel?"})
    await call.caller_turn("I'd like to cancel")
    await wait_until(lambda: len(call.marks_of(3)) > 0, "the reply to the first part started")

    call.clock.advance(0.6)  # the caller resumes 0.6 s after the end of their turn
    call.detector.queue(DetectorEvent("speech_onset"))
    await call.session.on_audio(FRAME)
    call.detector.queue(DetectorEvent("speech_started"))
    await call.session.on_audio(FRAME)
    assert call.session.stats.interruptions == 1  # yielded at once, no backchannel check
    call.clock.advance(1.5)
    await call.caller_turn("the order I placed yesterday", speech_ms=1500)

    await wait_until(lambda: len(call.conv.calls) == 2, "the whole turn went to the core")
    assert call.conv.calls[1].text == "I'd like to cancel the order I placed yesterday"
    await wait_until(lambda: call.conv.interrupted != [], "first reply stored as not heard")
    assert call.conv.interrupted == [(CONVERSATION_ID, 3, "")]


async def test_a_reply_still_being_thought_about_is_dropped_when_the_caller_goes_on(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call)
    gate = call.conv.hold("I'd like to cancel")
    await call.caller_turn("I'd like to cancel")
    await wait_until(lambda: call.session.state == CallState.THINKING, "thinking")
    call.clock.advance(0.5)
    call.detector.queue(DetectorEvent("speech_started"))
    await call.session.on_audio(FRAME)
    gate.set()
    await wait_until(lambda: call.conv.interrupted == [(CONVERSATION_ID, 3, "")], "reply dropped unheard")
    assert call.marks_of(3) == []
    call.clock.advance(1.0)
    await call.caller_turn("the order from yesterday")
    await wait_until(lambda: len(call.conv.calls) == 2, "merged turn")
    assert call.conv.calls[1].text == "I'd like to cancel the order from yesterday"


async def test_speech_long_after_the_turn_is_a_normal_barge_in(make_call: MakeCall) -> None:
    call = await greeted(make_call, replies={"Where is my order?": "Let me look. It shipped on Monday."})
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: len(call.marks_of(3)) > 0, "reply started")
    call.clock.advance(2.0)  # well past resume_window_s
    call.detector.queue(DetectorEvent("speech_started"))
    await call.session.on_audio(FRAME)
    assert call.session.paused and call.session.stats.interruptions == 0


class FailingSTT(FakeSTT):
    async def transcribe(self, pcm16_16k: np.ndarray) -> str:
        raise RuntimeError("transcriber exploded")


async def test_a_failed_transcription_is_logged_and_the_caller_is_asked_to_say_it_again(
    make_call: MakeCall, caplog: pytest.LogCaptureFixture
) -> None:
    call = await greeted(make_call)
    call.session._stt = FailingSTT()  # the transcriber breaks mid-call

    with caplog.at_level("ERROR", logger="voice.call_session"):
        call.detector.queue(
            DetectorEvent("speech_stopped", speech_ms=900),
            DetectorEvent("end_of_turn", audio=UTTERANCE, speech_ms=900),
        )
        await call.session.on_audio(FRAME)
        await wait_until(lambda: call.tts.streamed[-1:] == [render("say_again")], "asked to repeat")

    assert call.session.stats.stt_failures == 1
    failures = [r for r in caplog.records if "speech to text failed" in r.getMessage()]
    assert failures and getattr(failures[0], "call_sid", None) == CALL_SID
    assert call.conv.calls == []


class StreamingSTT(FakeSTT):
    """A streaming transcriber: besides ``transcribe`` it tells its running text as results come."""

    def __init__(self) -> None:
        super().__init__()
        self.on_partial: Callable[[str], None] | None = None


class HintedDetector(ScriptedDetector):
    """A detector in a pause of a turn that records the transcript hints it was given."""

    in_turn = True

    def __init__(self) -> None:
        super().__init__()
        self.hints: list[str] = []

    def transcript_complete(self) -> None:
        self.hints.append("complete")

    def transcript_unfinished(self) -> None:
        self.hints.append("unfinished")


@pytest.mark.parametrize(
    ("running", "hint"),
    [
        ("Where is my order?", ["complete"]),
        ("I need a refund for", ["unfinished"]),
        ("where is", ["unfinished"]),
    ],
)
async def test_a_streaming_transcribers_interim_text_in_a_pause_hints_the_end_of_turn(
    make_call: MakeCall, running: str, hint: list[str]
) -> None:
    stt = StreamingSTT()
    call = await greeted(make_call, stt=stt)
    detector = HintedDetector()
    call.session._detector = detector
    assert stt.on_partial is not None  # the session listens to the transcriber's running text

    call.detector.queue(DetectorEvent("speech_started"))
    detector.script = call.detector.script
    await call.session.on_audio(FRAME)
    stt.on_partial(running)  # an interim result while the caller is still talking: no hint
    assert detector.hints == []

    detector.queue(DetectorEvent("speech_stopped", speech_ms=900))
    stt.texts.append(running)
    await call.session.on_audio(FRAME)
    detector.hints.clear()  # (the speculative transcript may have hinted already)
    stt.on_partial(running)  # in the pause: the running text decides as a transcript would
    assert detector.hints == hint


class GapDetector(ScriptedDetector):
    """A detector in the middle of a turn: reports what audio (real or filled-in silence) it got."""

    in_turn = True


async def test_when_caller_audio_stops_arriving_the_detector_hears_silence_on_wall_clock_time(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call)
    detector = GapDetector()
    call.session._detector = detector
    call.session._gaps = asyncio.create_task(call.session._fill_audio_gaps())
    await call.session.on_audio(FRAME)
    assert len(detector.frames) == 1

    call.clock.advance(0.7)  # no frames for 0.7 s (silence suppression, a stalled stream)
    await wait_until(lambda: len(detector.frames) >= 2, "silence fed")
    filled = detector.frames[1]
    assert not filled.any()
    assert len(filled) == pytest.approx(0.7 * 16000, abs=320)


async def test_on_a_line_that_never_suppresses_silence_a_late_packet_is_not_taken_for_silence(
    make_call: MakeCall,
) -> None:
    # Twilio sends every frame: its calls use audio_gap_ms = stall_gap_ms (app/voice.py). A
    # 0.4 s gap after the caller paused is a late packet: silence fed for it would end a turn
    # in the middle of the caller's sentence. A gap of the stall length is filled.
    call = await greeted(make_call, cfg=config(audio_gap_ms=200, stall_gap_ms=200))
    call_phone = await greeted(make_call, cfg=config(audio_gap_ms=1000, stall_gap_ms=1000))
    for c in (call, call_phone):
        c.session._detector = GapDetector()
        c.session._gaps = asyncio.create_task(c.session._fill_audio_gaps())
        await c.session.on_audio(FRAME)
        c.clock.advance(0.4)
    await wait_until(
        lambda: call.session.stats.filled_gaps == 1, "the short gap filled (silence suppression)"
    )
    await asyncio.sleep(0.6)  # an absence to prove: the phone line's gap loop ran (every 0.5 s)
    assert call_phone.session.stats.filled_gaps == 0
    call_phone.clock.advance(0.7)
    await wait_until(lambda: call_phone.session.stats.filled_gaps == 1, "a stalled stream filled", within=2.0)


async def test_voice_to_voice_counts_from_the_last_voiced_audio_and_records_the_endpointing_part(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call, echo=True)
    call.stt.texts.append("Where is my order?")
    call.detector.queue(
        DetectorEvent("speech_stopped", speech_ms=900, since_voice_ms=200),
        DetectorEvent("end_of_turn", audio=UTTERANCE, speech_ms=900, since_voice_ms=300),
    )
    await call.session.on_audio(FRAME)
    await wait_until(lambda: call.timings != [], "timings recorded")

    timings = call.timings[0][1]
    assert timings.endpoint_ms == pytest.approx(200.0)  # stopped at -0.2 s, judged finished at 0
    assert timings.voice_to_voice_ms is not None and timings.voice_to_voice_ms >= 200.0


async def test_a_turn_during_a_database_outage_says_one_moment_and_is_stored_once_when_it_returns(
    make_call: MakeCall,
) -> None:
    call = await greeted(
        make_call, echo=True, cfg=config(store_retry_s=0.01), replies={"Where is my order?": "It shipped."}
    )
    call.conv.store_away["Where is my order?"] = 3  # three tries find the database away
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: "It shipped." in call.tts.streamed, "answered once the store came back", 2.0)

    assert call.tts.streamed.index("One moment, please.") < call.tts.streamed.index("It shipped.")
    tries = [c for c in call.conv.calls if c.text == "Where is my order?"]
    assert len(tries) == 4 and len({c.external_id for c in tries}) == 1  # one turn, tried again
    assert call.conv.completed.count("Where is my order?") == 1
    assert call.session.stats.store_waits == 1


async def test_a_database_that_does_not_come_back_in_time_is_said_and_the_call_goes_on(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call, echo=True, cfg=config(store_retry_s=0.01, store_wait_s=0.05))
    call.conv.store_away["Where is my order?"] = 1000
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.session.stats.store_waits == 1, "waiting for the store")
    call.clock.advance(1.0)  # past store_wait_s
    await wait_until(lambda: render("systems_down").split(".")[0] in " ".join(call.tts.streamed), "told", 2.0)
    assert call.conv.completed == []
    assert call.session.state in (CallState.LISTENING, CallState.SPEAKING)  # the call goes on


async def test_a_turn_the_core_did_not_understand_waits_a_moment_and_a_caller_who_goes_on_is_not_answered_twice(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call, replies={"Can you hear it come this?": "Sorry, I didn't quite get that."})
    call.conv.not_understood.add("Can you hear it come this?")  # a mid-sentence pause, misheard
    await call.caller_turn("Can you hear it come this?")
    await wait_until(lambda: call.conv.completed != [], "the core answered")
    await asyncio.sleep(0.05)  # an absence to prove: the "didn't get that" is held, not spoken
    assert "Sorry, I didn't quite get that." not in call.tts.requested

    call.clock.advance(0.5)  # ... the caller goes on within the moment
    call.detector.queue(DetectorEvent("speech_started"))
    await call.session.on_audio(FRAME)
    call.clock.advance(1.5)
    await call.caller_turn("the running shoes I bought last week", speech_ms=1500)

    await wait_until(lambda: len(call.conv.calls) == 2, "the whole turn went to the core")
    assert call.conv.calls[1].text == "Can you hear it come this? the running shoes I bought last week"
    assert "Sorry, I didn't quite get that." not in call.tts.requested
    assert (CONVERSATION_ID, 3, "") in call.conv.interrupted  # stored as never heard


async def test_a_turn_the_core_did_not_understand_is_answered_after_the_moment_if_the_caller_says_nothing(
    make_call: MakeCall,
) -> None:
    call = await greeted(
        make_call, cfg=config(unsure_wait_s=0.2), replies={"Mumble.": "Sorry, I didn't quite get that."}
    )
    call.conv.not_understood.add("Mumble.")
    await call.caller_turn("Mumble.")
    await wait_until(lambda: "Sorry, I didn't quite get that." in call.tts.requested, "asked again", 2.0)


async def test_a_turn_whose_words_trail_off_waits_for_the_caller_to_go_on(make_call: MakeCall) -> None:
    call = await greeted(make_call)
    await call.caller_turn("I need a refund for")  # ended at the short pause; the words trail off
    await asyncio.sleep(0.05)  # an absence to prove: nothing reaches the core meanwhile
    assert call.conv.calls == []

    call.detector.queue(DetectorEvent("speech_started"))  # ...and the caller goes on
    await call.session.on_audio(FRAME)
    call.clock.advance(1.0)
    await call.caller_turn("the headphones that stopped working")

    await wait_until(lambda: call.conv.calls != [], "one turn reached the core")
    assert [c.text for c in call.conv.calls] == ["I need a refund for the headphones that stopped working"]


async def test_a_turn_whose_words_trail_off_goes_to_the_core_when_the_caller_stays_quiet(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call, cfg=config(hold_s=0.1))
    await call.caller_turn("I need a refund for")
    await wait_until(lambda: call.conv.calls != [], "sent after the hold")
    assert [c.text for c in call.conv.calls] == ["I need a refund for"]


async def test_speech_in_two_stretches_over_the_bot_interrupts_counted_from_the_pause(
    make_call: MakeCall,
) -> None:
    call = await make_call(cfg=config(barge_in_min_ms=900))
    await wait_until(lambda: len(call.line.marks()) == 3, "greeting sent")
    call.detector.queue(DetectorEvent("speech_onset"))
    await call.session.on_audio(FRAME)
    await call.caller_speaks_for(300)  # "sorry," ...
    call.detector.queue(DetectorEvent("speech_stopped", speech_ms=300))
    await call.session.on_audio(FRAME)
    call.clock.advance(0.2)
    await call.caller_speaks_for(100)  # ... "that's not what I asked": 600 ms after the pause
    assert call.session.stats.interruptions == 0
    call.clock.advance(0.35)
    await call.session.on_audio(FRAME)  # still speaking over 900 ms after the pause began

    assert call.session.stats.interruptions == 1


class StreamingTTS(FakeTTS):
    """A synthesizer that streams each sentence in two halves; the second half waits for ``more``."""

    def __init__(self) -> None:
        super().__init__()
        self.more = asyncio.Event()

    async def stream_chunks(self, sentences: Sequence[str]) -> AsyncIterator[tuple[int, bytes, bool]]:
        for index, sentence in enumerate(sentences):
            audio = b"\xff" * (len(sentence) * self.bytes_per_char)
            half = len(audio) // 2
            yield index, audio[:half], False
            await self.more.wait()
            yield index, audio[half:], True


async def test_a_streaming_synthesizer_is_heard_before_its_sentence_is_synthesized(
    make_call: MakeCall,
) -> None:
    tts = StreamingTTS()
    call = await make_call(tts=tts, greeting="Thanks for calling the very best store in town today.")
    # 53 chars = 424 bytes; half of it (212 bytes) arrives first: one 160-byte chunk goes out at once.
    await wait_until(lambda: len(call.line.audio()) == 1, "first audio before synthesis finished")
    assert call.line.marks() == ["0:1:0"]  # a partial sentence does not count as heard
    tts.more.set()
    await wait_until(lambda: call.line.marks()[-1] == "0:1:53", "the sentence's end marked")
    assert sum(len(a) for a in call.line.audio()) == 424


# --------------------------------------------------------------------------------------
# reply-end marks: the other end learns that a reply is over from a mark, not from a silence


async def test_a_reply_end_mark_follows_each_reply_once_the_caller_has_heard_it(make_call: MakeCall) -> None:
    call = await greeted(make_call, echo=False)
    await wait_until(lambda: call.line.reply_ends() == ["0:end:1"], "the greeting's end mark")
    await call.caller_turn("Where is my order?")
    await wait_until(lambda: call.marks_of(3) != [], "the answer sent")
    await asyncio.sleep(0.05)  # an absence to prove: no end mark while the answer is unheard
    assert call.line.reply_ends() == ["0:end:1"]
    call.line.play()
    await wait_until(lambda: call.line.reply_ends() == ["0:end:1", "0:end:2"], "the answer's end mark")
    assert [kind for kind, _ in call.line.events][-1] == "mark"  # nothing follows it
    assert call.line.events[-1] == ("mark", "0:end:2")


async def test_a_filler_gets_no_reply_end_mark_while_the_answer_is_still_being_worked_out(
    make_call: MakeCall,
) -> None:
    call = await greeted(make_call, echo=True)
    await wait_until(lambda: call.line.reply_ends() == ["0:end:1"], "the greeting's end mark")
    call.conv.fillers["Where is my order?"] = "One moment."
    gate = call.conv.hold("Where is my order?")
    await call.caller_turn("Where is my order?")
    await wait_until(
        lambda: call.marks_of(-1) != [] and call.session.state == CallState.LISTENING, "the filler heard"
    )
    await asyncio.sleep(0.05)  # an absence to prove: the reply is not over, its answer is coming
    assert call.line.reply_ends() == ["0:end:1"]
    gate.set()
    await wait_until(lambda: call.line.reply_ends() == ["0:end:1", "0:end:2"], "the answer's end mark")
    marks = [value for kind, value in call.line.events if kind == "mark"]
    assert marks.index("0:end:2") > marks.index(call.marks_of(3)[-1])


async def test_a_turn_the_core_fails_still_ends_with_a_reply_end_mark(make_call: MakeCall) -> None:
    call = await greeted(make_call, echo=True)
    await wait_until(lambda: call.line.reply_ends() == ["0:end:1"], "the greeting's end mark")
    call.conv.fail.add("Where is my order?")
    await call.caller_turn("Where is my order?")
    await wait_until(
        lambda: call.line.reply_ends() == ["0:end:1", "0:end:2"], "an end mark for the failed turn"
    )
    assert call.marks_of(3) == []
