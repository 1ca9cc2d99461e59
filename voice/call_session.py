"""One phone call: caller audio in, turns through the conversation core, paced speech out.

The session is transport-agnostic: it gets 8 kHz mu-law audio, DTMF digits and playback marks
from a :class:`Line` (the Twilio media-stream adapter implements it) and sends audio, marks and
``clear`` back through it. It owns what makes a call feel live:

* **Turn taking** — a :class:`Detector` (Silero VAD + smart-turn + silence rules) ends the
  caller's turn; Whisper transcribes it; the core answers (and commits the turn) before a single
  word is spoken. A speculative transcript of each pause helps: one that reads finished ends the
  turn at the short pause, one that trails off ("I'd like to cancel the...") holds it open. When
  caller audio stops arriving (silence suppression, a stalled stream) the detector is fed
  silence, so turns end on wall-clock time. A caller who goes on within ``resume_window_s`` of
  the end of their turn makes the bot yield; the two parts go to the core as one turn.
* **Paced playout with marks** — speech goes out sentence by sentence, a little ahead of real
  time, with a mark after every chunk, so the session knows what the caller actually *heard*
  (:mod:`voice.speaking`).
* **Barge-in** — at the caller's first sound while the bot talks, the bot pauses (``clear``,
  the reply kept). Speech lasting ``barge_in_min_ms``, or shorter speech with content words,
  interrupts: the stored bot turn is cut to the heard words (flagged interrupted). A backchannel
  ("mm-hmm", "uh-huh", "yeah, right", a cough: decided on duration and content words, not on a
  spelling) or a click resumes the reply where it paused. Transcript writes run in their own
  tasks, so a barge-in never cancels them.
* **Watchdogs** — silence gets a reprompt, then a polite goodbye; a failed transcription asks
  the caller to say it again; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.model import Channel
from pipeline.ports import StoreUnavailable
from voice.call_ports import (
    CallState,
    CallStats,
    Conversation,
    Detector,
    DetectorEvent,
    Line,
    Synthesizer,
    Transcriber,
    TurnTimings,
    VoiceConfig,
)
from voice.keypad import Keypad
from voice.playout import Pacer, Speech, SystemLine
from voice.recording import CallRecording, RecordedLine
from voice.speaking import Speaking
from voice.spoken_text import is_backchannel, sounds_finished, sounds_unfinished

log = logging.getLogger(__name__)

SAMPLES_16K_PER_MS = 16


@dataclass(frozen=True)
class CallerTurn:
    """A caller turn waiting for the core."""

    text: str
    kind: str  # "speech" | "dtmf"
    end_at: float  # when the caller stopped (last voiced audio; the key press for DTMF)
    stt_ms: float | None = None
    endpoint_ms: float | None = None  # end of speech -> the turn was judged finished
    start_at: float | None = None  # its first audio (the first key press for DTMF)

    @property
    def decided_at(self) -> float:
        """When the turn was judged finished."""
        return self.end_at + (self.endpoint_ms or 0.0) / 1000


class CallerBridge(Protocol):
    """Where a bridged call's caller side goes (:class:`voice.bridge.AgentBridge`)."""

    def caller_audio(self, raw: bytes, pcm16k: np.ndarray) -> None: ...

    async def caller_said(self, text: str) -> None: ...

    async def caller_left(self, reason: str) -> None: ...


class CallSession(Speaking):
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
        recording: CallRecording | None = None,
    ) -> None:
        self.call_sid = call_sid
        self.caller = caller
        # The carrier fully attested the caller's number (SHAKEN/STIR A): a signal about the
        # number only, for identity decisions made elsewhere.
        self.caller_attested = caller_attested
        self._conv = conversation
        # Recording taps the two places audio passes: on_audio (the caller) and the line (the bot).
        self._recording = recording
        self._line: Line = line if recording is None else RecordedLine(line, recording, clock)
        self._detector = detector
        self._detector_lock = asyncio.Lock()  # caller audio and wall-clock silence feed it in turn
        self._stt = stt
        # A streaming transcriber (Deepgram) also hears every raw frame as it arrives.
        self._stt_feed: Callable[[bytes], None] | None = getattr(stt, "feed", None)
        if hasattr(stt, "on_partial"):
            # ... and tells its running text as results come (interim ones included): a pause
            # whose words read as finished may end the turn before the transcript is final.
            stt.on_partial = self._on_partial_transcript
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
        self._speaking: list[Speech] = []
        self._speak_task: asyncio.Task[None] | None = None
        self._pacer: Pacer | None = None
        self._paused_at: float | None = None
        self._pause_guard: asyncio.Task[None] | None = None
        # A reply the core streams sentence by sentence before its turn is stored.
        self._early: Speech | None = None
        self._early_queue: asyncio.Queue[tuple[str, int, int] | None] | None = None
        self._early_first_audio: float | None = None
        self._turns: asyncio.Queue[CallerTurn] = asyncio.Queue(maxsize=self.config.max_pending_turns)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._gaps: asyncio.Task[None] | None = None
        self._keypad = Keypad(
            max_digits=self.config.max_dtmf_digits,
            timeout_s=self.config.dtmf_timeout_s,
            on_turn=self._queue_keys,
            on_dropped=self._dropped,
        )
        self._caller_speaking_since: float | None = None
        self._speech_end_at: float | None = None
        self._speech_generation = 0
        self._speculative: tuple[int, float, asyncio.Task[str]] | None = None
        self._last_audio_at = self._now()
        # The caller's last spoken turn, for a caller who goes on right after it ended.
        self._last_speech_turn: CallerTurn | None = None
        self._continuing: str | None = None  # the first part of a turn the caller went on with
        self._continuing_at = 0.0
        self._continuing_from: float | None = None  # ...and when it began
        self._keys_from = 0.0  # the first key press of the digits being collected
        self._went_on = asyncio.Event()  # caller speech started (ends a hold on an unfinished turn)
        self._last_activity = self._now()
        self._reprompts = 0
        self._end_after_speaking: str | None = None
        self._answering = False  # a caller turn is being answered (its reply is not all spoken)
        self._reply_open = False  # the bot said something since its last reply-end mark
        self._replies = 0
        self._marks_pending: dict[str, float] = {}
        self._playout_done = asyncio.Event()
        self._playout_done.set()
        self._closed = False
        self._bridge: CallerBridge | None = None  # a person took the call (voice/bridge.py)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._recording is not None:
            self._recording.begin(self._now())
        reply = await self._conv.open_call(self.call_sid, self.caller, caller_attested=self.caller_attested)
        self.conversation_id = reply.conversation_id
        self._worker = asyncio.create_task(self._turn_worker(), name=f"call-{self.call_sid}-turns")
        self._watchdog = asyncio.create_task(self._silence_watchdog(), name=f"call-{self.call_sid}-watchdog")
        if getattr(self._detector, "in_turn", None) is not None:
            self._gaps = asyncio.create_task(self._fill_audio_gaps(), name=f"call-{self.call_sid}-gaps")
        messages = list(reply.messages)
        if self._recording is not None:
            # The caller is told first, in the same playout as the greeting (no extra wait).
            messages.insert(0, SystemLine(seq=-1, body=self._recording.notice))
        self._speak(messages, timings=None)

    async def close(self, reason: str) -> None:
        """Stop everything of this call. Transcript writes already started are awaited, not cancelled."""
        if self._closed:
            return
        self._closed = True
        self.state = CallState.ENDED
        self._end_pause()
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            self._track(bridge.caller_left(reason), f"call-{self.call_sid}-bridge-left")
        background = (self._speak_task, self._worker, self._watchdog, self._gaps)
        for task in background:
            if task is not None and not task.done():
                task.cancel()
        for task in background:
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._keypad.close()
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
        if self._recording is not None:
            # After the turns are stored: which of them were redacted decides what is silenced.
            await self._recording.finish(self.call_sid, self.conversation_id)
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
        self._last_audio_at = self._now()
        if self._stt_feed is not None:
            self._stt_feed(ulaw)
        pcm16k = self._to16k(ulaw)
        if self._recording is not None:
            self._recording.caller_audio(pcm16k, self._last_audio_at)
        if self._bridge is not None:
            self._bridge.caller_audio(ulaw, pcm16k)
        await self._feed_detector(pcm16k)

    async def _feed_detector(self, pcm16k: np.ndarray) -> None:
        async with self._detector_lock:
            events = await self._detector.feed(pcm16k)
        for event in events:
            await self._on_detector(event)
        # Barge-in: the caller is still voicing barge_in_min_ms after they began over the bot
        # (counted from the pause, so "sorry, ... that's not what I asked" counts as one; up to
        # their last voiced sound, not the VAD's confirmation of the stop 0.2 s later, so a
        # 0.8 s "mm mm" stays a backchannel).
        since = self._caller_speaking_since
        if self.state == CallState.SPEAKING and since is not None:
            began = min(since, self._paused_at) if self._paused_at is not None else since
            voiced_until = self._now() - getattr(self._detector, "since_voice_ms", 0.0) / 1000
            if (voiced_until - began) * 1000 >= self.config.barge_in_min_ms:
                await self.interrupt()

    async def _fill_audio_gaps(self) -> None:
        """When caller audio stops arriving mid-turn, feed the detector the silence the caller
        is making, so the turn ends (and a pause resolves) on wall-clock time.

        A client that suppresses silence stops sending once the caller is quiet, so a gap of
        ``audio_gap_ms`` after the VAD heard the speech stop is silence. A gap while the caller
        was still speaking is a stalled stream (its frames may still come, late): it is
        filled only once it lasts ``stall_gap_ms``, so network jitter never inserts silence."""
        gap_s, stall_s = self.config.audio_gap_ms / 1000, self.config.stall_gap_ms / 1000
        while not self._closed:
            await asyncio.sleep(gap_s / 2)
            busy = getattr(self._detector, "in_turn", False) or self.paused
            missing = self._now() - self._last_audio_at
            speaking = getattr(self._detector, "speaking", False) or self._caller_speaking_since is not None
            if not busy or missing < (stall_s if speaking else gap_s):
                continue
            self._last_audio_at = self._now()
            self.stats.filled_gaps += 1
            log.info(
                "caller audio stopped arriving: feeding silence",
                extra={"call_sid": self.call_sid, "gap_ms": round(missing * 1000), "speaking": speaking},
            )
            await self._feed_detector(np.zeros(round(missing * 1000) * SAMPLES_16K_PER_MS, dtype=np.int16))

    async def _on_detector(self, event: DetectorEvent) -> None:
        if self._bridge is not None:
            # A person has the call: no barge-in, no turns; what the caller says is only stored.
            if event.kind == "end_of_turn" and event.audio is not None and event.audio.size:
                self._track(self._tell_bridge(event.audio), f"call-{self.call_sid}-bridge-stt")
            return
        now = self._now()
        last_voice = now - event.since_voice_ms / 1000
        if event.kind == "speech_onset":
            await self.pause()
        elif event.kind == "onset_lost":
            if self._caller_speaking_since is None:
                self.resume()  # a click or a breath, not speech
        elif event.kind == "speech_started":
            self._caller_speaking_since = now
            self._last_activity = now
            self._speech_generation += 1
            if self._speculative is not None:
                # The caller went on speaking: that early transcript is useless; free the
                # (single) Whisper worker if it has not started on it yet.
                self._speculative[2].cancel()
            self._speculative = None
            self._speech_end_at = None
            self._went_on.set()
            await self._on_caller_speech()
        elif event.kind == "speech_stopped":
            self._speech_end_at = last_voice
            self._last_activity = now
            self._caller_speaking_since = None
            if event.audio is not None and event.audio.size:
                # Speculative STT: start now, while the end of turn is still being decided. If
                # the caller goes on speaking the result is dropped (a new generation starts).
                task = self._track(self._stt.transcribe(event.audio), f"call-{self.call_sid}-stt-early")
                self._speculative = (self._speech_generation, now, task)
                generation, speech_ms = self._speech_generation, event.speech_ms
                task.add_done_callback(lambda t: self._on_early_transcript(t, generation, speech_ms))
        elif event.kind == "end_of_turn" and event.audio is not None:
            self._caller_speaking_since = None
            self._last_activity = now
            end_at = self._speech_end_at or last_voice
            began = now - event.audio.size / (SAMPLES_16K_PER_MS * 1000)  # the turn's audio ends now
            text = self._transcript(event.audio)
            if self.state == CallState.SPEAKING and event.speech_ms <= self.config.backchannel_max_ms:
                # A short sound while the bot talks: a backchannel, or words that interrupt.
                self._track(
                    self._maybe_backchannel(text, end_at, event.speech_ms, began), f"call-{self.call_sid}-bc"
                )
                return
            self._track(self._transcribe_and_queue(text, end_at, now, began), f"call-{self.call_sid}-stt")

    async def _on_caller_speech(self) -> None:
        """Confirmed caller speech while the bot answers: pause it, or (the caller going on
        right after their turn) make it yield and keep the first part for one turn."""
        last = self._last_speech_turn
        if (
            last is not None
            and self.state in (CallState.THINKING, CallState.SPEAKING)
            and self._continuing is None
            and self._now() - last.decided_at <= self.config.resume_window_s
            and (self.state == CallState.THINKING or not any(speech.heard_chars for speech in self._speaking))
        ):
            self._continuing, self._continuing_at = last.text, self._now()
            self._continuing_from = last.start_at
            await self.interrupt()
            return
        await self.pause()

    def _on_early_transcript(self, task: asyncio.Task[str], generation: int, speech_ms: float) -> None:
        """A speculative transcript that reads as a finished sentence ends the turn at the short
        pause even when smart-turn hesitates (it often does on sentences ending in digits); one
        that trails off holds the turn open; a backchannel over the bot lets it go on at once."""
        if task.cancelled() or task.exception() is not None or generation != self._speech_generation:
            return
        if self._caller_speaking_since is not None:
            return
        text = task.result()
        if (
            self.paused
            and speech_ms <= self.config.backchannel_max_ms
            and is_backchannel(
                text, self.config.backchannels, speech_ms=speech_ms, max_ms=self.config.backchannel_max_ms
            )
        ):
            self.resume()
        self._hint_turn_end(text)

    def _on_partial_transcript(self, text: str) -> None:
        """A streaming transcriber's running text (interim or final) of what the caller said: in a
        pause it may end the turn sooner, or hold it open, as a speculative transcript does."""
        if self._caller_speaking_since is None and getattr(self._detector, "in_turn", False):
            self._hint_turn_end(text)

    def _hint_turn_end(self, text: str) -> None:
        if sounds_unfinished(text):
            hold = getattr(self._detector, "transcript_unfinished", None)
            if hold is not None:
                hold()
        elif sounds_finished(text):
            hint = getattr(self._detector, "transcript_complete", None)
            if hint is not None:
                hint()

    def _transcript(self, audio: np.ndarray) -> tuple[float, Awaitable[str]]:
        """(start time, transcript) for a finished turn, reusing the speculative STT when valid."""
        speculative, self._speculative = self._speculative, None
        if speculative is not None and speculative[0] == self._speech_generation:
            _, started, task = speculative
            return started, task
        return self._now(), self._track(self._stt.transcribe(audio), f"call-{self.call_sid}-stt-final")

    def on_mark(self, name: str) -> None:
        if self._marks_pending.pop(name, None) is None:
            # Not a mark of audio being played: a reply-end mark, a late echo of one already
            # accounted (a clear, the end of the reply), or one the app never sent (forged).
            return
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
        if self._bridge is not None:
            return  # keys are for the assistant; a person on the line is just talked to
        self._last_activity = self._now()
        if not self._keypad.pending:
            self._keys_from = self._last_activity
        self._keypad.press(digit)

    # ---- turns -------------------------------------------------------------------------------
    async def _heard(self, transcript: tuple[float, Awaitable[str]]) -> str | None:
        """The transcript's text, or None when transcription failed: then the failure is logged
        with the call and the caller is asked to say it again (nothing is lost silently)."""
        try:
            return (await transcript[1]).strip()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.stt_failures += 1
            log.exception("speech to text failed for a turn", extra={"call_sid": self.call_sid})
            await self._ask_again()
            return None

    async def _ask_again(self) -> None:
        """Nothing usable was heard where a turn was expected: ask the caller to repeat."""
        self._continuing = None
        if self.state in (CallState.LISTENING, CallState.SPEAKING) and not self._closed:
            await self.interrupt()
            await self._say_system("say_again")

    async def _maybe_backchannel(
        self, transcript: tuple[float, Awaitable[str]], end_at: float, speech_ms: float, began: float
    ) -> None:
        text = await self._heard(transcript)
        if text is None:
            return
        if not text or is_backchannel(
            text, self.config.backchannels, speech_ms=speech_ms, max_ms=self.config.backchannel_max_ms
        ):
            if text:
                self.stats.ignored_backchannels += 1
            log.debug("backchannel or noise over the bot: going on", extra={"call_sid": self.call_sid})
            self._continuing = None
            self.resume()
            return
        # Short but meaningful ("stop", "no"): treat as a turn and interrupt.
        await self.interrupt()
        self._queue_speech(text, end_at, None, None, began)

    async def _transcribe_and_queue(
        self, transcript: tuple[float, Awaitable[str]], end_at: float, decided_at: float, began: float
    ) -> None:
        started = transcript[0]
        text = await self._heard(transcript)
        if text is None:
            return
        stt_ms = (self._now() - started) * 1000
        if not text or not re.search(r"[A-Za-z0-9]", text):
            if self._continuing is not None:
                await self._ask_again()  # the first part's answer was dropped for this
            self.resume()
            return
        if self.state == CallState.SPEAKING and is_backchannel(text, self.config.backchannels):
            self.stats.ignored_backchannels += 1
            self._continuing = None
            self.resume()
            return
        if self.state == CallState.SPEAKING:
            await self.interrupt()
        elif await self._caller_goes_on(text, end_at, began):
            return  # the next part of the turn carries this one with it
        self._queue_speech(text, end_at, stt_ms, (decided_at - end_at) * 1000, began)

    async def _caller_goes_on(self, text: str, end_at: float, began: float) -> bool:
        """A turn ended at a short pause but its words trail off ("I need a refund for"): nothing
        has been said to the caller yet, so wait until ``hold_s`` after their last word for them to
        go on. True when they did: the text then leads the next part of the turn."""
        remaining = end_at + self.config.hold_s - self._now()
        if remaining <= 0 or not sounds_unfinished(text) or self._continuing is not None:
            return False
        self._continuing, self._continuing_at = text, self._now()
        self._continuing_from = began
        self._went_on.clear()
        try:
            await asyncio.wait_for(self._went_on.wait(), timeout=remaining)
        except TimeoutError:
            if self._continuing == text:
                self._continuing = None
            return False
        return True

    def _queue_speech(
        self, text: str, end_at: float, stt_ms: float | None, endpoint_ms: float | None, began: float
    ) -> None:
        first, self._continuing = self._continuing, None
        if first and self._now() - self._continuing_at <= self.config.resume_window_s + 30.0:
            text = f"{first} {text}"
            if self._continuing_from is not None:
                began = min(began, self._continuing_from)
        turn = CallerTurn(text, "speech", end_at, stt_ms, endpoint_ms, start_at=began)
        self._last_speech_turn = turn
        self._queue_turn(turn)

    def _queue_keys(self, text: str) -> None:
        self._continuing = None  # keys are a turn of their own: no spoken part waits for more
        self._queue_turn(CallerTurn(text, "dtmf", self._now(), start_at=self._keys_from))

    def _queue_turn(self, turn: CallerTurn) -> None:
        if self._bridge is not None:
            return  # a person took the call while this turn was being transcribed
        self._reprompts = 0
        try:
            self._turns.put_nowait(turn)
        except asyncio.QueueFull:
            self._dropped(f"{turn.kind}_turn")

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
        return self._keypad.pending

    async def _turn_worker(self) -> None:
        while True:
            self._answering = False
            self._reply_over()  # a turn that ended with nothing more to say (failed, dropped)
            turn = await self._turns.get()
            self._answering = self._reply_open = True
            if self.state == CallState.SPEAKING:
                await self.interrupt()
            self.state = CallState.THINKING
            self._turn_no += 1
            if self._recording is not None:
                start = turn.start_at if turn.start_at is not None else turn.end_at
                self._recording.caller_turn(self._turn_no, turn.kind, start, turn.end_at)
            timings = TurnTimings(stt_ms=turn.stt_ms, endpoint_ms=turn.endpoint_ms)
            started = self._now()
            self._early, self._early_queue, self._early_first_audio = None, None, None

            # The core commits the turn before we speak; shielded so a barge-in or hang-up
            # can never cancel a transcript write halfway.
            def answer(turn: CallerTurn = turn, number: int = self._turn_no) -> asyncio.Task[Any]:
                return self._track(
                    self._conv.handle_text(
                        Channel.VOICE,
                        self.call_sid,
                        turn.text,
                        external_id=f"voice:{self.call_sid}:{number}",  # a retry is the same turn
                        kind=turn.kind,
                        speak=self._say_filler,
                        stream=self._say_early,
                    ),
                    f"call-{self.call_sid}-turn",
                )

            try:
                try:
                    reply = await asyncio.wait_for(
                        asyncio.shield(answer()), timeout=self.config.turn_timeout_s
                    )
                except StoreUnavailable:
                    reply = await self._when_the_store_returns(answer)
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
            if self._continuing is not None and self._early is None and self._turns.empty():
                # The caller went on while this was being answered: the answer to the whole
                # turn comes next; this one was never heard.
                await self._drop_unheard(messages)
                continue
            if self._early is not None:
                messages = await self._finish_early(messages, timings, started, turn.end_at)
                if messages is None:
                    continue  # the caller talked over the streamed reply
            else:
                await self._let_filler_finish()
                if getattr(reply, "understood", None) is False and turn.kind == "speech":
                    if await self._caller_went_on_before(turn.end_at + self.config.unsure_wait_s):
                        await self._drop_unheard(messages)
                        continue
            intent = getattr(reply, "intent", None)
            if intent == "goodbye":
                self._end_after_speaking = "goodbye"
            elif intent == "handoff" and self._on_handoff is not None:
                self._handoff_due = True
            self._answering = False
            self._speak(messages, timings=timings, speech_end=turn.end_at)

    async def _when_the_store_returns(self, answer: Callable[[], asyncio.Task[Any]]) -> Any:
        """The conversation store is away (a database outage): the caller hears "one moment" and
        the same turn is tried again every second until it is committed (its external id makes a
        retry the same turn: stored once) or ``store_wait_s`` pass; then the caller is told.

        Raises:
            TimeoutError: the store did not come back in time (the turn is not stored).
        """
        self.stats.store_waits += 1
        log.warning(
            "conversation store unreachable; the turn waits for it", extra={"call_sid": self.call_sid}
        )
        from pipeline.templates import render  # noqa: PLC0415 - templates live in the core

        await self._say_filler(render("one_moment"))
        deadline = self._now() + self.config.store_wait_s
        while True:
            await asyncio.sleep(self.config.store_retry_s)  # paced retries, not a wait for an event
            try:
                return await asyncio.wait_for(asyncio.shield(answer()), timeout=self.config.turn_timeout_s)
            except StoreUnavailable:
                if self._now() >= deadline:
                    await self._let_filler_finish()
                    await self._say_system("systems_down")
                    raise TimeoutError("the conversation store did not come back") from None

    async def _caller_went_on_before(self, deadline: float) -> bool:
        """Wait until ``deadline`` (session time) unless the caller speaks again first; True when
        they went on with their turn (its answer comes with the whole turn)."""
        remaining = deadline - self._now()
        if remaining > 0 and self._continuing is None:
            self._went_on.clear()
            try:
                await asyncio.wait_for(self._went_on.wait(), timeout=remaining)
            except TimeoutError:
                pass
        return self._continuing is not None and self._turns.empty()

    async def _drop_unheard(self, messages: list[Any]) -> None:
        if self.state == CallState.SPEAKING:
            await self.interrupt()
        self.state = CallState.LISTENING
        if self.conversation_id is None:
            return
        for message in messages:
            if getattr(message, "seq", -1) >= 0 and message.body:
                self._track(
                    self._conv.mark_interrupted(self.conversation_id, message.seq, ""),
                    f"call-{self.call_sid}-cut",
                )

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
                or self._bridge is not None
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

    async def end_politely(self, reason: str, template: str) -> None:
        """End the call with the system line ``template`` (what is being said is cut; the goodbye
        is heard, then the line hangs up with ``reason``)."""
        if self._closed or self.state == CallState.ENDING:
            return
        await self.interrupt()
        self._end_after_speaking = reason
        await self._say_system(template)

    async def _say_system(self, key: str) -> None:
        from pipeline.templates import render  # noqa: PLC0415 - templates live in the core

        text = render(key)
        self._last_activity = self._now()
        self._speak([SystemLine(seq=-1, body=text)], timings=None)

    # ---- a person on the call (voice/bridge.py) ------------------------------------------------
    @property
    def bridged(self) -> bool:
        """A person has the call: the assistant neither speaks turns nor takes them."""
        return self._bridge is not None

    async def bridge(self, bridge: CallerBridge) -> None:
        """Hand the caller's side to ``bridge``: what is being said stops, turns not yet answered
        are dropped, and from now on caller audio and transcribed speech go to the bridge."""
        if self._closed:
            return
        await self.interrupt()
        self._bridge = bridge
        self._handoff_due = False
        self._end_after_speaking = None
        self._continuing = None
        while not self._turns.empty():
            self._turns.get_nowait()
        if self.state != CallState.THINKING:
            self.state = CallState.LISTENING

    async def unbridge(self) -> None:
        """The assistant has the call again: it listens for the caller's next turn."""
        self._bridge = None
        self._detector.reset()
        self._caller_speaking_since = None
        self._speculative = None
        self._reprompts = 0
        self._last_activity = self._now()
        if not self._closed and self.state in (CallState.LISTENING, CallState.ENDING):
            self.state = CallState.LISTENING

    async def announce(self, text: str, *, then_end: str | None = None) -> None:
        """Say ``text`` (a system line, not a stored turn); with ``then_end`` the call hangs up
        with that reason once it was heard."""
        if self._closed:
            return
        await self.interrupt()
        self._end_after_speaking = then_end
        self._last_activity = self._now()
        self._speak([SystemLine(seq=-1, body=text)], timings=None)

    async def until_heard(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until what is being said was heard."""
        try:
            await asyncio.wait_for(self._playout_done.wait(), timeout=timeout_s)
        except TimeoutError:
            await self.interrupt()

    async def send_to_caller(self, ulaw: bytes) -> None:
        """Audio straight to the caller's line (recorded with the call, no marks): a bridged agent."""
        if not self._closed:
            await self._line.send_audio(ulaw)

    async def _tell_bridge(self, audio: np.ndarray) -> None:
        try:
            text = (await self._stt.transcribe(audio)).strip()
        except Exception:
            log.exception("speech to text failed while bridged", extra={"call_sid": self.call_sid})
            return
        bridge = self._bridge
        if bridge is not None and text:
            try:
                await bridge.caller_said(text)
            except Exception:
                log.exception("caller speech not stored while bridged", extra={"call_sid": self.call_sid})
