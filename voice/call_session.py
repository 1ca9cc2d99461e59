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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from pipeline.model import Channel
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
from voice.spoken_text import heard_prefix, is_backchannel, sounds_finished

log = logging.getLogger(__name__)


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
        self._speaking: list[Speech] = []
        self._speak_task: asyncio.Task[None] | None = None
        # A reply the core streams sentence by sentence before its turn is stored.
        self._early: Speech | None = None
        self._early_queue: asyncio.Queue[tuple[str, int, int] | None] | None = None
        self._early_first_audio: float | None = None
        self._turns: asyncio.Queue[tuple[str, str, float, float | None]] = asyncio.Queue(
            maxsize=self.config.max_pending_turns
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._keypad = Keypad(
            max_digits=self.config.max_dtmf_digits,
            timeout_s=self.config.dtmf_timeout_s,
            on_turn=lambda text: self._queue_turn(text, "dtmf", None),
            on_dropped=self._dropped,
        )
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
        self._keypad.press(digit)

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
        return self._keypad.pending

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
            speech = self._early = Speech(seq=-2, text="", complete=False)
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
            self._speak([SystemLine(seq=-1, body=text)], timings=None)

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
        speeches = [Speech(seq=m.seq, text=m.body) for m in messages if m.body]
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
        self, speeches: list[Speech], timings: TurnTimings | None, speech_end: float | None
    ) -> None:
        pacer = Pacer(self._line, self.config, self._now, self._marks_pending, self._epoch)
        started = self._now()
        try:
            for speech in speeches:
                speech.started = True
                await pacer.say(
                    self._tts,
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

    async def _play_early(self, speech: Speech, queue: asyncio.Queue[tuple[str, int, int] | None]) -> None:
        """Speak a streamed reply sentence by sentence as the core writes it."""
        pacer = Pacer(self._line, self.config, self._now, self._marks_pending, self._epoch)
        try:
            while (item := await queue.get()) is not None:
                text, start, _ = item
                speech.started = True
                await pacer.say(self._tts, speech, text, start, self._note_early_audio)
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

    async def _wait_heard(self, pacer: Pacer) -> None:
        """Wait (bounded) for the caller to hear the rest, then finish speaking."""
        await pacer.wait_heard()
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
        self._speak([SystemLine(seq=-1, body=text)], timings=None)
