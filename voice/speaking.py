"""The bot's side of a call: speaking replies paced with marks, streamed replies and fillers, and
barge-in (pause at the caller's first sound, then interrupt or resume).

:class:`Speaking` is a base of :class:`voice.call_session.CallSession`; it holds no state of its
own beyond what the session sets up in ``__init__`` (declared below for the type checker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from voice.call_ports import CallState, CallStats, Conversation, Line, Synthesizer, TurnTimings, VoiceConfig
from voice.playout import Pacer, Speech, SystemLine, reply_end_mark
from voice.spoken_text import heard_prefix

log = logging.getLogger(__name__)


class Speaking:
    """Speech out of one call (see the module docstring)."""

    call_sid: str
    config: VoiceConfig
    state: CallState
    stats: CallStats
    conversation_id: int | None
    _conv: Conversation
    _line: Line
    _tts: Synthesizer
    _now: Callable[[], float]
    _closed: bool
    _epoch: int
    _speaking: list[Speech]
    _speak_task: asyncio.Task[None] | None
    _pacer: Pacer | None
    _paused_at: float | None
    _pause_guard: asyncio.Task[None] | None
    _early: Speech | None
    _early_queue: asyncio.Queue[tuple[str, int, int] | None] | None
    _early_first_audio: float | None
    _marks_pending: dict[str, float]
    _playout_done: asyncio.Event
    _last_activity: float
    _end_after_speaking: str | None
    _handoff_due: bool
    _on_handoff: Callable[[str, int], Awaitable[None]] | None
    _on_turn: Callable[[int, TurnTimings], Awaitable[None]] | None
    _turns: asyncio.Queue[Any]
    _answering: bool
    _reply_open: bool
    _replies: int

    def _track(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        raise NotImplementedError

    # ---- replies -------------------------------------------------------------------------------
    def _speak(
        self, messages: Sequence[Any], *, timings: TurnTimings | None, speech_end: float | None = None
    ) -> None:
        speeches = [Speech(seq=m.seq, text=m.body) for m in messages if m.body]
        if not speeches:
            self.state = CallState.LISTENING
            self._reply_over()
            self._maybe_hand_off()
            if self._end_after_speaking and not self._closed:
                reason, self._end_after_speaking = self._end_after_speaking, None
                self.state = CallState.ENDING
                self._track(self._line.hangup(reason), f"call-{self.call_sid}-hangup")
            return
        self._speaking = speeches
        self.state = CallState.SPEAKING
        self._reply_open = True
        self._playout_done.clear()
        self._speak_task = asyncio.create_task(
            self._play(speeches, timings, speech_end), name=f"call-{self.call_sid}-speak"
        )

    def _reply_over(self) -> None:
        """The bot has said all it has to say until the caller speaks again (no answer being
        worked out, no turn waiting, nothing playing): send a mark named ``epoch:end:n`` (nothing
        is queued, so Twilio echoes it at once). Whoever holds the other end of the stream (the
        simulated caller, any tool on the stream) then knows the reply is over instead of
        guessing from a silence, which a busy machine can leave between two sentences."""
        if not self._reply_open or self._answering or self._closed or self.state != CallState.LISTENING:
            return
        if not self._turns.empty():
            return
        self._reply_open = False
        self._replies += 1
        self._track(
            self._line.send_mark(reply_end_mark(self._epoch, self._replies)), f"call-{self.call_sid}-end"
        )

    def _new_pacer(self) -> Pacer:
        self._pacer = Pacer(self._line, self.config, self._now, self._marks_pending, self._epoch)
        return self._pacer

    async def _play(
        self, speeches: list[Speech], timings: TurnTimings | None, speech_end: float | None
    ) -> None:
        pacer = self._new_pacer()
        started = self._now()
        try:
            await pacer.say_all(
                self._tts, speeches, lambda: self._record_timings(timings, started, self._now(), speech_end)
            )
        except Exception:
            log.warning(
                "speech failed; waiting for what was sent", extra={"call_sid": self.call_sid}, exc_info=True
            )
        await self._wait_heard(pacer)

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

    async def _play_early(self, speech: Speech, queue: asyncio.Queue[tuple[str, int, int] | None]) -> None:
        """Speak a streamed reply sentence by sentence as the core writes it."""
        pacer = self._new_pacer()
        try:
            while (item := await queue.get()) is not None:
                text, start, _ = item
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
        self._end_pause()
        self.state = CallState.LISTENING
        self._last_activity = self._now()
        self._playout_done.set()
        self._reply_over()
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

    # ---- barge-in ------------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        """The bot stopped for a caller's sound and has not yet decided to yield or go on."""
        return self._paused_at is not None

    async def pause(self) -> None:
        """The caller made a sound while the bot talks: silence the bot at once (``clear``),
        keep the reply, and decide later (:meth:`interrupt` or :meth:`resume`)."""
        if self.state != CallState.SPEAKING or self.paused:
            return
        self._paused_at = self._now()
        self.stats.pauses += 1
        if self._pacer is not None:
            self._pacer.pause()
        self._epoch += 1  # the marks the clear echoes were never heard
        await self._line.send_clear()
        self._marks_pending.clear()
        self._pause_guard = asyncio.create_task(self._pause_timeout(), name=f"call-{self.call_sid}-pause")

    async def _pause_timeout(self) -> None:
        """A pause nothing decided (no words, no long speech) ends by going on."""
        await asyncio.sleep(self.config.pause_max_ms / 1000)
        self._pause_guard = None
        self.resume()

    def resume(self) -> None:
        """Go on where the pause stopped: the caller's sound was a backchannel or noise."""
        if not self.paused:
            return
        self._end_pause()
        self.stats.resumes += 1
        if self._pacer is not None:
            self._pacer.resume(self._epoch)
        log.debug("resumed after a backchannel", extra={"call_sid": self.call_sid})

    def _end_pause(self) -> None:
        self._paused_at = None
        guard, self._pause_guard = self._pause_guard, None
        if guard is not None and not guard.done() and guard is not asyncio.current_task():
            guard.cancel()

    async def interrupt(self) -> None:
        """Barge-in: stop speaking, flush the caller's buffer, store only what was heard."""
        if self.state != CallState.SPEAKING:
            return
        was_paused = self.paused
        self._end_pause()
        self.stats.interruptions += 1
        task = self._speak_task
        if task is not None and not task.done():
            task.cancel()
        if not was_paused:  # a pause already cleared the line and sent nothing since
            self._epoch += 1
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
