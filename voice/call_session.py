"""One phone call: caller audio in, turns through the conversation core, paced speech out.

The session is transport-agnostic: it gets 8 kHz mu-law audio, DTMF digits and playback marks
from a :class:`Line` (the Twilio media-stream adapter implements it) and sends audio, marks and
``clear`` back through it. It owns four things that make a call feel live:

* **Turn taking** — a :class:`Detector` (Silero VAD + smart-turn + silence rules) ends the
  caller's turn; Whisper transcribes it; the core answers (and commits the turn) before a single
  word is spoken.
* **Paced playout with marks** — speech goes out sentence by sentence, a little ahead of real
  time, with a mark after every chunk, so the session knows what the caller actually *heard*.
* **Barge-in** — caller speech longer than ``barge_in_min_ms`` while the bot talks stops
  synthesis and playout, sends ``clear``, and cuts the stored bot turn to the heard words
  (flagged interrupted). Short backchannels ("mm-hmm", "okay") do not interrupt. Transcript
  writes run in their own tasks, so a barge-in never cancels them.
* **Watchdogs** — silence gets a reprompt, then a polite goodbye; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from pipeline.model import Channel

log = logging.getLogger(__name__)

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
class _Speech:
    """One stored bot message being spoken: for barge-in accounting."""

    seq: int
    text: str
    heard_chars: int = 0
    started: bool = False
    finished: bool = False
    complete: bool = True  # False while a streamed reply may still grow
    alias: int | None = None  # the provisional seq its marks were named with (streamed replies)
    cut: bool = False  # a barge-in stopped it


@dataclass
class CallStats:
    turns: list[TurnTimings] = field(default_factory=list)
    interruptions: int = 0
    ignored_backchannels: int = 0
    dropped_events: int = 0  # turns or keypad digits over the session's bounds


def heard_prefix(text: str, chars: int) -> str:
    """The heard part of ``text``: whole words up to ``chars`` characters."""
    if chars >= len(text):
        return text
    if chars <= 0:
        return ""
    cut = text[:chars]
    if chars < len(text) and _in_word(text[chars]) and cut and _in_word(cut[-1]):
        cut = cut.rsplit(" ", 1)[0] if " " in cut else ""
    return cut.rstrip(" ,;:")


def _in_word(char: str) -> bool:
    return char.isalnum() or char in "'\u2019"


_DANGLING = frozenset(
    "a an the to of for and or but my your our is are was were with at in on from by about because so if "
    "that which who um uh er like i i'm it's".split()
)


def sounds_finished(text: str) -> bool:
    """Whether a transcript reads as a finished sentence: Whisper closed it with . ? or ! (not
    "...") and it does not end on a word that needs more ("I want to.", "my order is."), or it
    ends in a group of 4+ digits."""
    text = text.strip()
    if not text or text.endswith("..."):
        return False
    words = text.rstrip(".?!").lower().split()
    if not words:
        return False
    last = words[-1].strip(",;:")
    if text[-1] not in ".?!":
        # Whisper leaves "My order is 4517" open; a closing number of 4+ digits is an answer (an
        # order number, a phone number's last group). The transcriber may split it ("451 7",
        # "4-5-1-7", "4,517"); groups of three ("555 123") read as a phone number still going on.
        groups = _trailing_digit_groups(text)
        if len(words) < 2 or not groups or sum(map(len, groups)) < 4:
            return False
        return not (len(groups[-1]) == 3 and all(len(g) == 3 for g in groups[:-1]))
    return last not in _DANGLING


_TRAILING_DIGITS = re.compile(r"(?:\d+[\s,.-]*)*\d+$")


def _trailing_digit_groups(text: str) -> list[str]:
    """The digit groups a transcript ends with: "My order is 451 7" -> ["451", "7"]."""
    match = _TRAILING_DIGITS.search(text.rstrip())
    if not match or (match.start() > 0 and not text[match.start() - 1].isspace()):
        return []
    return re.findall(r"\d+", match.group())


def is_backchannel(text: str, words: frozenset[str]) -> bool:
    norm = re.sub(r"[^a-z' -]", "", text.lower()).strip()
    return bool(norm) and (norm in words or all(w in words for w in norm.split()))


class CallSession:
    """Runs one call. Build it, ``await start()``, feed it events, ``await close()``."""

    def __init__(
        self,
        *,
        call_sid: str,
        caller: str | None,
        conversation: Conversation,
        line: Line,
        detector: Detector,
        stt: Transcriber,
        tts: Synthesizer,
        resample_8k_to_16k: Callable[[bytes], np.ndarray],
        config: VoiceConfig | None = None,
        on_turn: Callable[[int, TurnTimings], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_handoff: Callable[[str, int], Awaitable[None]] | None = None,
        caller_attested: bool = False,
    ) -> None:
        self.call_sid = call_sid
        self.caller = caller
        # The carrier fully attested the caller's number (SHAKEN/STIR A): a signal about the
        # number only, for identity decisions made elsewhere.
        self.caller_attested = caller_attested
        self._conv = conversation
        self._line = line
        self._detector = detector
        self._stt = stt
        # A streaming transcriber (Deepgram) also hears every raw frame as it arrives.
        self._stt_feed: Callable[[bytes], None] | None = getattr(stt, "feed", None)
        self._tts = tts
        self._to16k = resample_8k_to_16k
        self.config = config or VoiceConfig()
        self._on_turn = on_turn
        # Called with (call_sid, conversation_id) once the handoff line was heard: a warm
        # transfer moves the call (and so ends this stream). Not cleared by a barge-in.
        self._on_handoff = on_handoff
        self._handoff_due = False
        self._now = clock
        self.state = CallState.STARTING
        self.conversation_id: int | None = None
        self.stats = CallStats()
        self._turn_no = 0
        self._epoch = 0  # bumped by every clear: marks of older epochs are not "heard"
        self._speaking: list[_Speech] = []
        self._speak_task: asyncio.Task[None] | None = None
        # A reply the core streams sentence by sentence before its turn is stored.
        self._early: _Speech | None = None
        self._early_queue: asyncio.Queue[tuple[str, int, int] | None] | None = None
        self._early_first_audio: float | None = None
        self._turns: asyncio.Queue[tuple[str, str, float, float | None]] = asyncio.Queue(
            maxsize=self.config.max_pending_turns
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._dtmf: list[str] = []
        self._dtmf_timer: asyncio.TimerHandle | None = None
        self._caller_speaking_since: float | None = None
        self._speech_end_at: float | None = None
        self._speech_generation = 0
        self._speculative: tuple[int, float, asyncio.Task[str]] | None = None
        self._last_activity = self._now()
        self._reprompts = 0
        self._end_after_speaking: str | None = None
        self._marks_pending: dict[str, float] = {}
        self._playout_done = asyncio.Event()
        self._playout_done.set()
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        reply = await self._conv.open_call(self.call_sid, self.caller, caller_attested=self.caller_attested)
        self.conversation_id = reply.conversation_id
        self._worker = asyncio.create_task(self._turn_worker(), name=f"call-{self.call_sid}-turns")
        self._watchdog = asyncio.create_task(self._silence_watchdog(), name=f"call-{self.call_sid}-watchdog")
        self._speak(reply.messages, timings=None)

    async def close(self, reason: str) -> None:
        """Stop everything of this call. Transcript writes already started are awaited, not cancelled."""
        if self._closed:
            return
        self._closed = True
        self.state = CallState.ENDED
        for task in (self._speak_task, self._worker, self._watchdog):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._speak_task, self._worker, self._watchdog):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
        if self._tasks:
            try:
                await asyncio.wait_for(
                    asyncio.gather(*list(self._tasks), return_exceptions=True),
                    timeout=self.config.turn_timeout_s,
                )
            except TimeoutError:
                log.warning("tasks still running at close were cancelled", extra={"call_sid": self.call_sid})
        stt_close = getattr(self._stt, "aclose", None)
        if stt_close is not None:
            await stt_close()
        log.info("call ended", extra={"call_sid": self.call_sid, "reason": reason})

    def _track(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- inbound events ----------------------------------------------------------------------
    async def on_audio(self, ulaw: bytes) -> None:
        if self._closed or not ulaw:
            return
        if self._stt_feed is not None:
            self._stt_feed(ulaw)
        for event in await self._detector.feed(self._to16k(ulaw)):
            await self._on_detector(event)
        # Barge-in: caller speech that has lasted long enough while the bot is talking.
        since = self._caller_speaking_since
        if (
            self.state == CallState.SPEAKING
            and since is not None
            and (self._now() - since) * 1000 >= self.config.barge_in_min_ms
        ):
            await self.interrupt()

    async def _on_detector(self, event: DetectorEvent) -> None:
        now = self._now()
        if event.kind == "speech_started":
            self._caller_speaking_since = now
            self._last_activity = now
            self._speech_generation += 1
            if self._speculative is not None:
                # The caller went on speaking: that early transcript is useless; free the
                # (single) Whisper worker if it has not started on it yet.
                self._speculative[2].cancel()
            self._speculative = None
            self._speech_end_at = None
        elif event.kind == "speech_stopped":
            self._speech_end_at = now
            self._last_activity = now
            self._caller_speaking_since = None
            if event.audio is not None and event.audio.size:
                # Speculative STT: start now, while the end of turn is still being decided. If
                # the caller goes on speaking the result is dropped (a new generation starts).
                task = self._track(self._stt.transcribe(event.audio), f"call-{self.call_sid}-stt-early")
                self._speculative = (self._speech_generation, now, task)
                generation = self._speech_generation
                task.add_done_callback(lambda t: self._on_early_transcript(t, generation))
        elif event.kind == "end_of_turn" and event.audio is not None:
            self._caller_speaking_since = None
            self._last_activity = now
            end_at = self._speech_end_at or now
            text = self._transcript(event.audio)
            if self.state == CallState.SPEAKING and event.speech_ms < self.config.barge_in_min_ms:
                # A short sound while the bot talks: transcribe it only to check for a backchannel.
                self._track(self._maybe_backchannel(text, end_at), f"call-{self.call_sid}-backchannel")
                return
            self._track(self._transcribe_and_queue(text, end_at), f"call-{self.call_sid}-stt")

    def _on_early_transcript(self, task: asyncio.Task[str], generation: int) -> None:
        """A speculative transcript that reads as a finished sentence ends the turn at the short
        pause even when smart-turn hesitates (it often does on sentences ending in digits)."""
        if task.cancelled() or task.exception() is not None or generation != self._speech_generation:
            return
        hint = getattr(self._detector, "transcript_complete", None)
        if hint is not None and self._caller_speaking_since is None and sounds_finished(task.result()):
            hint()

    def _transcript(self, audio: np.ndarray) -> tuple[float, Awaitable[str]]:
        """(start time, transcript) for a finished turn, reusing the speculative STT when valid."""
        speculative, self._speculative = self._speculative, None
        if speculative is not None and speculative[0] == self._speech_generation:
            _, started, task = speculative
            return started, task
        return self._now(), self._track(self._stt.transcribe(audio), f"call-{self.call_sid}-stt-final")

    def on_mark(self, name: str) -> None:
        self._marks_pending.pop(name, None)
        try:
            epoch_s, seq_s, chars_s = name.split(":")
            epoch, seq, chars = int(epoch_s), int(seq_s), int(chars_s)
        except ValueError:
            log.info("ignoring unknown mark", extra={"call_sid": self.call_sid})
            return
        if epoch != self._epoch:
            return  # echoed because a clear flushed it: never played
        for speech in self._speaking:
            if speech.seq == seq or speech.alias == seq:
                speech.heard_chars = max(speech.heard_chars, chars)
                if chars >= len(speech.text) and speech.complete:
                    speech.finished = True
        if not self._marks_pending and self._speak_task is not None and self._speak_task.done():
            self._finish_speaking()

    def on_dtmf(self, digit: str) -> None:
        self._last_activity = self._now()
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
            self._dtmf_timer = None
        if digit == "#":
            self._submit_dtmf()
            return
        if digit == "0" and not self._dtmf:
            self._queue_turn("0 (keypad: talk to a person)", "dtmf", None)
            return
        if len(self._dtmf) >= self.config.max_dtmf_digits:
            self._dropped("dtmf_digits")
        else:
            self._dtmf.append(digit)
        self._dtmf_timer = asyncio.get_running_loop().call_later(
            self.config.dtmf_timeout_s, self._submit_dtmf
        )

    def _submit_dtmf(self) -> None:
        self._dtmf_timer = None
        digits, self._dtmf = "".join(self._dtmf), []
        if digits:
            self._queue_turn(digits, "dtmf", None)

    # ---- turns -------------------------------------------------------------------------------
    async def _maybe_backchannel(self, transcript: tuple[float, Awaitable[str]], end_at: float) -> None:
        text = (await transcript[1]).strip()
        if not text:
            return
        if is_backchannel(text, self.config.backchannels):
            self.stats.ignored_backchannels += 1
            log.debug("backchannel ignored", extra={"call_sid": self.call_sid})
            return
        # Short but meaningful ("stop", "no"): treat as a turn and interrupt.
        await self.interrupt()
        self._queue_turn(text, "speech", end_at)

    async def _transcribe_and_queue(self, transcript: tuple[float, Awaitable[str]], end_at: float) -> None:
        started, pending = transcript
        text = (await pending).strip()
        stt_ms = (self._now() - started) * 1000
        if not text or not re.search(r"[A-Za-z0-9]", text):
            return
        if self.state == CallState.SPEAKING and is_backchannel(text, self.config.backchannels):
            self.stats.ignored_backchannels += 1
            return
        if self.state == CallState.SPEAKING:
            await self.interrupt()
        self._queue_turn(text, "speech", end_at, stt_ms)

    def _queue_turn(self, text: str, kind: str, end_at: float | None, stt_ms: float | None = None) -> None:
        self._reprompts = 0
        try:
            self._turns.put_nowait((text, kind, end_at if end_at is not None else self._now(), stt_ms))
        except asyncio.QueueFull:
            self._dropped(f"{kind}_turn")

    def _dropped(self, what: str) -> None:
        self.stats.dropped_events += 1
        if self.stats.dropped_events in (1, 100) or self.stats.dropped_events % 1000 == 0:
            log.warning(
                "caller events over the session's bounds dropped",
                extra={"call_sid": self.call_sid, "what": what, "dropped": self.stats.dropped_events},
            )

    @property
    def pending_turns(self) -> int:
        """Caller turns waiting for the conversation core (at most ``config.max_pending_turns``)."""
        return self._turns.qsize()

    @property
    def pending_digits(self) -> int:
        """Keypad digits collected towards the next turn (at most ``config.max_dtmf_digits``)."""
        return len(self._dtmf)

    async def _turn_worker(self) -> None:
        while True:
            text, kind, end_at, stt_ms = await self._turns.get()
            if self.state == CallState.SPEAKING:
                await self.interrupt()
            self.state = CallState.THINKING
            self._turn_no += 1
            timings = TurnTimings(stt_ms=stt_ms)
            started = self._now()
            self._early, self._early_queue, self._early_first_audio = None, None, None
            # The core commits the turn before we speak; shielded so a barge-in or hang-up
            # can never cancel a transcript write halfway.
            write = self._track(
                self._conv.handle_text(
                    Channel.VOICE,
                    self.call_sid,
                    text,
                    external_id=f"voice:{self.call_sid}:{self._turn_no}",
                    kind=kind,
                    speak=self._say_filler,
                    stream=self._say_early,
                ),
                f"call-{self.call_sid}-turn",
            )
            try:
                reply = await asyncio.wait_for(asyncio.shield(write), timeout=self.config.turn_timeout_s)
            except TimeoutError:
                log.warning("turn timed out", extra={"call_sid": self.call_sid})
                self.state = CallState.LISTENING
                continue
            except Exception:
                log.exception("turn failed", extra={"call_sid": self.call_sid})
                self.state = CallState.LISTENING
                continue
            timings.core_ms = (self._now() - started) * 1000
            timings.text_chars = sum(len(m.body) for m in reply.messages)
            messages = list(reply.messages)
            if self._early is not None:
                messages = await self._finish_early(messages, timings, started, end_at)
                if messages is None:
                    continue  # the caller talked over the streamed reply
            else:
                await self._let_filler_finish()
            intent = getattr(reply, "intent", None)
            if intent == "goodbye":
                self._end_after_speaking = "goodbye"
            elif intent == "handoff" and self._on_handoff is not None:
                self._handoff_due = True
            self._speak(messages, timings=timings, speech_end=end_at)

    async def _say_early(self, sentence: str) -> None:
        """Speak a sentence the core streamed before its turn is stored (see ``_finish_early``)."""
        if self._closed:
            return
        speech = self._early
        if speech is None:
            filler = self.state == CallState.SPEAKING and bool(self._speaking) and self._speaking[0].seq == -1
            if self.state != CallState.THINKING and not filler:
                return
            if filler and self._speak_task is not None:
                self._speak_task.cancel()  # the answer is here: no more filler (what was sent plays out)
            speech = self._early = _Speech(seq=-2, text="", complete=False)
            queue: asyncio.Queue[tuple[str, int, int] | None] = asyncio.Queue()
            self._early_queue = queue
            self._speaking = [speech]
            self.state = CallState.SPEAKING
            self._playout_done.clear()
            self._speak_task = asyncio.create_task(
                self._play_early(speech, queue), name=f"call-{self.call_sid}-speak-early"
            )
        if speech.cut or self._early_queue is None:
            return
        start = len(speech.text) + (1 if speech.text else 0)
        speech.text = f"{speech.text} {sentence}" if speech.text else sentence
        self._early_queue.put_nowait((sentence, start, len(speech.text)))

    async def _finish_early(
        self, messages: list[Any], timings: TurnTimings, started: float, end_at: float
    ) -> list[Any] | None:
        """The turn of a streamed reply is stored: bind what was spoken to the stored message, speak
        the rest of it, and return the messages still to be spoken (None: cut by a barge-in)."""
        speech, queue, task = self._early, self._early_queue, self._speak_task
        self._early = self._early_queue = None
        assert speech is not None and queue is not None
        first = messages[0] if messages else None
        if self._early_first_audio is not None:
            self._record_timings(timings, started, self._early_first_audio, end_at)
        if first is not None and first.body.startswith(speech.text):
            speech.alias, speech.seq = speech.seq, first.seq
            rest = first.body[len(speech.text) :].strip()
            if rest and not speech.cut:
                start = len(speech.text) + 1
                speech.text = first.body
                queue.put_nowait((rest, start, len(first.body)))
            else:
                speech.text = first.body if not speech.cut else speech.text
            messages = messages[1:]
        speech.complete = True
        queue.put_nowait(None)
        if speech.cut:
            if first is not None and speech.seq == first.seq and self.conversation_id is not None:
                heard = heard_prefix(speech.text, speech.heard_chars)
                self._track(
                    self._conv.mark_interrupted(self.conversation_id, first.seq, heard),
                    f"call-{self.call_sid}-cut",
                )
            return None
        if task is not None:
            await asyncio.wait({task})
        return None if speech.cut else messages

    async def _say_filler(self, text: str) -> None:
        """Say a filler the core asked for while a slow answer is on its way (not stored as a turn)."""
        if self.state == CallState.THINKING and not self._closed:
            self._speak([_SystemLine(seq=-1, body=text)], timings=None)

    async def _let_filler_finish(self) -> None:
        """The answer waits for a filler still playing, so the two never talk over each other."""
        task = self._speak_task
        if task is None or task.done() or not self._speaking or self._speaking[0].seq != -1:
            return
        # asyncio.wait neither raises the task's own error nor cancels it on timeout.
        await asyncio.wait({task}, timeout=self.config.turn_timeout_s)

    # ---- speaking ------------------------------------------------------------------------------
    def _speak(
        self, messages: Sequence[Any], *, timings: TurnTimings | None, speech_end: float | None = None
    ) -> None:
        speeches = [_Speech(seq=m.seq, text=m.body) for m in messages if m.body]
        if not speeches:
            self.state = CallState.LISTENING
            self._maybe_hand_off()
            if self._end_after_speaking and not self._closed:
                reason, self._end_after_speaking = self._end_after_speaking, None
                self.state = CallState.ENDING
                self._track(self._line.hangup(reason), f"call-{self.call_sid}-hangup")
            return
        self._speaking = speeches
        self.state = CallState.SPEAKING
        self._playout_done.clear()
        self._speak_task = asyncio.create_task(
            self._play(speeches, timings, speech_end), name=f"call-{self.call_sid}-speak"
        )

    async def _play(
        self, speeches: list[_Speech], timings: TurnTimings | None, speech_end: float | None
    ) -> None:
        pacer = _Pacer(self, self._epoch)
        started = self._now()
        try:
            for speech in speeches:
                speech.started = True
                await self._say_sentence(
                    pacer,
                    speech,
                    speech.text,
                    0,
                    lambda: self._record_timings(timings, started, self._now(), speech_end),
                )
        except Exception:
            log.warning(
                "speech failed; waiting for what was sent", extra={"call_sid": self.call_sid}, exc_info=True
            )
        await self._wait_heard(pacer)

    async def _play_early(self, speech: _Speech, queue: asyncio.Queue[tuple[str, int, int] | None]) -> None:
        """Speak a streamed reply sentence by sentence as the core writes it."""
        pacer = _Pacer(self, self._epoch)
        try:
            while (item := await queue.get()) is not None:
                text, start, _ = item
                speech.started = True
                await self._say_sentence(pacer, speech, text, start, self._note_early_audio)
        except Exception:
            log.warning(
                "streamed speech failed; waiting for what was sent",
                extra={"call_sid": self.call_sid},
                exc_info=True,
            )
        await self._wait_heard(pacer)

    def _note_early_audio(self) -> None:
        if self._early_first_audio is None:
            self._early_first_audio = self._now()

    async def _say_sentence(
        self, pacer: _Pacer, speech: _Speech, text: str, offset: int, on_first_audio: Callable[[], None]
    ) -> None:
        """Synthesize ``text`` (chars ``offset``.. of ``speech``) and send it paced, a mark after each chunk."""
        sentences = self._tts.sentences(text)
        ends = _sentence_ends(text, sentences)
        index = 0
        async for audio in self._tts.stream(sentences):
            sentence_start = offset + (ends[index - 1] if index else 0)
            sentence_end = offset + ends[index]
            index += 1
            if pacer.first_audio_at is None:
                pacer.start(self._now())
                on_first_audio()
            await pacer.send(
                audio,
                speech.alias if speech.alias is not None and speech.seq < 0 else speech.seq,
                sentence_start,
                sentence_end,
            )

    async def _wait_heard(self, pacer: _Pacer) -> None:
        """Wait (bounded) for the caller to hear the rest, then finish speaking."""
        remaining = max(0.0, pacer.sent_ms / 1000 - (self._now() - (pacer.first_audio_at or self._now())))
        deadline = remaining + self.config.mark_grace_s
        waited = 0.0
        while self._marks_pending and waited < deadline:
            await asyncio.sleep(0.05)
            waited += 0.05
        self._finish_speaking()

    def _record_timings(
        self, timings: TurnTimings | None, started: float, first_audio_at: float, speech_end: float | None
    ) -> None:
        if timings is None:
            return
        timings.tts_first_audio_ms = (first_audio_at - started) * 1000
        if speech_end is not None:
            timings.voice_to_voice_ms = (first_audio_at - speech_end) * 1000
        self.stats.turns.append(timings)
        if self._on_turn is not None and self.conversation_id is not None:
            self._track(self._on_turn(self.conversation_id, timings), f"call-{self.call_sid}-metrics")

    def _finish_speaking(self) -> None:
        if self.state != CallState.SPEAKING:
            return
        self._marks_pending.clear()
        self.state = CallState.LISTENING
        self._last_activity = self._now()
        self._playout_done.set()
        if self._maybe_hand_off():
            return
        if self._end_after_speaking and not self._closed:
            reason, self._end_after_speaking = self._end_after_speaking, None
            self.state = CallState.ENDING
            self._track(self._line.hangup(reason), f"call-{self.call_sid}-hangup")

    def _maybe_hand_off(self) -> bool:
        """After speech ends: start the warm transfer if the core handed the call off."""
        if not self._handoff_due or self._closed or self._on_handoff is None or self.conversation_id is None:
            return False
        self._handoff_due = False
        self.state = CallState.ENDING
        self._track(self._on_handoff(self.call_sid, self.conversation_id), f"call-{self.call_sid}-handoff")
        return True

    async def interrupt(self) -> None:
        """Barge-in: stop speaking, flush the caller's buffer, store only what was heard."""
        if self.state != CallState.SPEAKING:
            return
        self.stats.interruptions += 1
        self._epoch += 1
        task = self._speak_task
        if task is not None and not task.done():
            task.cancel()
        await self._line.send_clear()
        self._marks_pending.clear()
        self._end_after_speaking = None
        for speech in self._speaking:
            if not speech.finished:
                speech.cut = True
            if not speech.finished and speech.seq >= 0:
                heard = heard_prefix(speech.text, speech.heard_chars)
                if self.conversation_id is not None:
                    self._track(
                        self._conv.mark_interrupted(self.conversation_id, speech.seq, heard),
                        f"call-{self.call_sid}-cut",
                    )
        self._speaking = []
        self.state = CallState.LISTENING
        self._playout_done.set()
        log.info("barge-in", extra={"call_sid": self.call_sid})

    # ---- watchdog ------------------------------------------------------------------------------
    async def _silence_watchdog(self) -> None:
        started = self._now()
        while not self._closed:
            await asyncio.sleep(0.25)
            now = self._now()
            if now - started > self.config.max_call_s:
                await self.interrupt()
                self._end_after_speaking = "max_duration"
                await self._say_system("max_duration_goodbye")
                return
            if (
                self.state != CallState.LISTENING
                or self._caller_speaking_since is not None
                or not self._turns.empty()
            ):
                continue
            if now - self._last_activity < self.config.reprompt_after_s:
                continue
            if self._reprompts < self.config.reprompts_before_goodbye:
                self._reprompts += 1
                await self._say_system("reprompt")
            else:
                self._end_after_speaking = "silence"
                await self._say_system("silence_goodbye")
                return

    async def _say_system(self, key: str) -> None:
        from pipeline.templates import render  # noqa: PLC0415 - templates live in the core

        text = render(key)
        self._last_activity = self._now()
        self._speak([_SystemLine(seq=-1, body=text)], timings=None)


class _Pacer:
    """Sends one playback's audio in real time (at most ``lead_ms`` ahead), a mark after each chunk."""

    def __init__(self, session: CallSession, epoch: int) -> None:
        self.session = session
        self.epoch = epoch
        self.sent_ms = 0.0
        self.first_audio_at: float | None = None

    def start(self, now: float) -> None:
        self.first_audio_at = now

    async def send(self, audio: bytes, seq: int, start: int, end: int) -> None:
        s = self.session
        chunk_bytes = s.config.chunk_ms * ULAW_PER_MS
        total = len(audio)
        assert self.first_audio_at is not None
        for pos in range(0, total, chunk_bytes):
            chunk = audio[pos : pos + chunk_bytes]
            ahead = self.sent_ms - (s._now() - self.first_audio_at) * 1000
            if ahead > s.config.lead_ms:
                await asyncio.sleep((ahead - s.config.lead_ms) / 1000)
            await s._line.send_audio(chunk)
            self.sent_ms += len(chunk) / ULAW_PER_MS
            chars = start + round((end - start) * (pos + len(chunk)) / total)
            name = f"{self.epoch}:{seq}:{chars}"
            s._marks_pending[name] = s._now()
            await s._line.send_mark(name)


@dataclass
class _SystemLine:
    """A prompt spoken by the call itself (reprompt), not a stored bot turn."""

    seq: int
    body: str


def _sentence_ends(text: str, sentences: Sequence[str]) -> list[int]:
    """Character offset in ``text`` where each sentence ends (for mark accounting)."""
    ends: list[int] = []
    cursor = 0
    for sentence in sentences:
        found = text.find(sentence, cursor)
        end = (found + len(sentence)) if found >= 0 else min(len(text), cursor + len(sentence))
        ends.append(end)
        cursor = end
    if ends:
        ends[-1] = max(ends[-1], len(text))
    return ends or [len(text)]
