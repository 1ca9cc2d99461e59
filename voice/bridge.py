"""A caller bridged to a person: the server relays audio between the caller's own leg (a Twilio
media stream or a browser call) and an agent's leg (the console's softphone over WebRTC).

:class:`AgentBridge` sits between a :class:`voice.call_session.CallSession` (which, while
bridged, neither speaks nor takes turns, but hands over the caller's audio and transcribed
speech, see :meth:`~voice.call_session.CallSession.bridge`) and an :class:`AgentSide` (the agent's
peer connection, :mod:`telephony.agent_leg`). Its stages:

* ``waiting``: the agent is being rung; the caller is on hold, what they say is still stored;
* ``briefing``: the agent hears the ticket number and the summary, the caller a short hold line;
* ``bridged``: audio flows both ways; ``muted`` stops the agent's audio reaching the caller,
  ``held`` stops both directions;
* ``ended``: handed back, hung up, or the caller left.

Both sides keep being transcribed: the caller through the call's own speech-to-text (stored as
the customer by the session's conversation), the agent through a second detector and
transcriber of their own (stored as the agent through ``store_agent_text``).

Audio formats (each resampled once where rates differ): the caller's raw line audio goes to the
agent as it came (8 kHz from Twilio, 16 kHz from a browser caller's line; the agent's Opus
encoder resamples it to 48 kHz); the agent's 48 kHz audio is resampled by the leg to 8 kHz mu-law
for the caller's line and to 16 kHz for the agent's transcriber.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from voice.audio import resample, ulaw_to_pcm16
from voice.call_ports import Detector, Synthesizer, Transcriber

log = logging.getLogger(__name__)

STAGES = ("waiting", "briefing", "bridged", "ended")
SAMPLES_16K_PER_MS = 16


class BridgeError(Exception):
    """A move the bridge's stage does not allow (``code`` says which)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AgentSide(Protocol):
    """The agent's leg, as the bridge uses it."""

    rate: int  # the PCM rate ``play`` takes (the caller's line rate)

    def play(self, pcm: bytes) -> None:
        """Queue live 16-bit mono PCM at ``rate`` for the agent to hear (late audio may be dropped)."""
        ...

    def brief(self, pcm: bytes) -> None:
        """Queue 16-bit mono PCM at ``rate`` that must be heard whole (the briefing)."""
        ...

    def clear(self) -> None: ...

    async def played(self) -> None:
        """Return once everything queued was sent to the agent."""
        ...

    async def close(self) -> None: ...


class CallerSide(Protocol):
    """What the bridge needs of the caller's call session."""

    call_sid: str

    async def send_to_caller(self, ulaw: bytes) -> None: ...


class AgentBridge:
    """The relay of one bridged call (see the module docstring).

    Args:
        call_sid: the caller's call.
        caller: the caller's session (its ``bridge``/``unbridge`` are called by the owner).
        caller_rate: the rate of the raw audio the caller's line delivers (8000: mu-law from
            Twilio; 16000: PCM from a browser caller's line).
        store_caller_text: stores what the caller said (as the customer) while bridged.
        store_agent_text: stores what the agent said (as the agent).
        detector, stt: the agent's own turn detector and transcriber.
        tts: speaks the briefing to the agent.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        *,
        call_sid: str,
        caller: CallerSide,
        caller_rate: int,
        store_caller_text: Callable[[str], Awaitable[None]],
        store_agent_text: Callable[[str], Awaitable[None]],
        detector: Detector,
        stt: Transcriber,
        tts: Synthesizer,
        clock: Callable[[], float] = time.monotonic,
        audio_gap_ms: int = 300,
    ) -> None:
        self.call_sid = call_sid
        self.stage = "waiting"
        self.muted = False
        self.held = False
        self._caller = caller
        self._caller_rate = caller_rate
        self._store_caller_text = store_caller_text
        self._store_agent_text = store_agent_text
        self._detector = detector
        self._detector_lock = asyncio.Lock()
        self._stt = stt
        self._tts = tts
        self._now = clock
        self._gap_s = audio_gap_ms / 1000
        self._agent: AgentSide | None = None
        self._last_agent_audio = self._now()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gaps: asyncio.Task[None] | None = None
        self.caller_gone = asyncio.Event()
        self.caller_left_reason: str | None = None
        # Counters a test or a metric can read.
        self.to_agent_ms = 0.0
        self.to_caller_ms = 0.0

    # ---- the agent's leg ------------------------------------------------------------------------
    def attach(self, agent: AgentSide) -> None:
        """The agent's leg is up: it hears the briefing next."""
        if self.stage != "waiting":
            raise BridgeError("not_waiting", f"the call is {self.stage}, not waiting for an agent")
        if agent.rate != self._caller_rate:
            raise BridgeError("bad_rate", "the agent's leg must take the caller's audio rate")
        self._agent = agent
        self.stage = "briefing"
        self._gaps = asyncio.create_task(self._fill_agent_gaps(), name=f"bridge-{self.call_sid}-gaps")

    async def brief(self, text: str) -> None:
        """Speak ``text`` (the ticket and its summary) to the agent only; return once it was sent."""
        agent = self._agent
        if agent is None or self.stage != "briefing":
            raise BridgeError("not_briefing", "there is no agent leg to brief")
        async for ulaw in self._tts.stream(self._tts.sentences(text)):
            pcm = ulaw_to_pcm16(ulaw)
            if self._caller_rate != 8000:
                pcm = resample(pcm, 8000, self._caller_rate)
            agent.brief(pcm.astype("<i2").tobytes())
        await agent.played()

    def connect(self) -> None:
        """Briefing done: audio flows both ways from now on."""
        if self.stage != "briefing":
            raise BridgeError("not_briefing", f"the call is {self.stage}")
        self.stage = "bridged"

    def set_muted(self, on: bool) -> None:
        self._require_bridged()
        self.muted = on

    def set_held(self, on: bool) -> None:
        self._require_bridged()
        self.held = on
        if on and self._agent is not None:
            self._agent.clear()

    def _require_bridged(self) -> None:
        if self.stage != "bridged":
            raise BridgeError("not_bridged", f"the call is {self.stage}, not bridged")

    async def end(self) -> None:
        """Stop relaying; the agent's leg closes. Transcript writes already started finish."""
        if self.stage == "ended":
            return
        self.stage = "ended"
        if self._gaps is not None:
            self._gaps.cancel()
            await asyncio.gather(self._gaps, return_exceptions=True)
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)
        close = getattr(self._stt, "aclose", None)
        if close is not None:
            await close()

    # ---- the caller's side (called by the session) ------------------------------------------------
    def caller_audio(self, raw: bytes, pcm16k: np.ndarray) -> None:
        """The caller's raw line audio (mu-law at 8 kHz, or PCM at 16 kHz from a browser line)."""
        agent = self._agent
        if agent is None or self.stage != "bridged" or self.held:
            return
        pcm = ulaw_to_pcm16(raw).astype("<i2").tobytes() if self._caller_rate == 8000 else raw
        self.to_agent_ms += len(pcm) / 2 / self._caller_rate * 1000
        agent.play(pcm)

    async def caller_said(self, text: str) -> None:
        """A caller utterance transcribed while bridged (or on hold): stored as the customer's."""
        if _has_words(text):
            await self._store_caller_text(text)

    async def caller_left(self, reason: str) -> None:
        """The caller's call ended."""
        self.caller_left_reason = reason
        self.caller_gone.set()

    # ---- the agent's side (called by the leg) ------------------------------------------------------
    async def agent_audio(self, ulaw8k: bytes, pcm16k: np.ndarray) -> None:
        """One frame of the agent's voice: to the caller (unless muted or held), and to the agent's
        own transcriber."""
        if self.stage != "bridged":
            return
        self._last_agent_audio = self._now()
        if not (self.muted or self.held) and ulaw8k:
            self.to_caller_ms += len(ulaw8k) / 8
            await self._caller.send_to_caller(ulaw8k)
        await self._feed(pcm16k if not self.muted else np.zeros_like(pcm16k))

    async def _feed(self, pcm16k: np.ndarray) -> None:
        async with self._detector_lock:
            events = await self._detector.feed(pcm16k)
        for event in events:
            if event.kind == "end_of_turn" and event.audio is not None and event.audio.size:
                self._track(self._transcribe_agent(event.audio), "agent-stt")

    async def _fill_agent_gaps(self) -> None:
        """A browser sends no packets in silence (DTX): the agent's turns end on wall-clock time."""
        while True:
            await asyncio.sleep(self._gap_s / 2)
            if self.stage != "bridged" or not getattr(self._detector, "in_turn", False):
                continue
            missing = self._now() - self._last_agent_audio
            if missing >= self._gap_s:
                self._last_agent_audio = self._now()
                await self._feed(np.zeros(round(missing * 1000) * SAMPLES_16K_PER_MS, dtype=np.int16))

    async def _transcribe_agent(self, audio: np.ndarray) -> None:
        try:
            text = (await self._stt.transcribe(audio)).strip()
        except Exception:
            log.exception("agent speech to text failed", extra={"call_sid": self.call_sid})
            return
        if not _has_words(text):
            return
        try:
            await self._store_agent_text(text)
        except Exception:
            log.exception("agent speech not stored", extra={"call_sid": self.call_sid})

    def _track(self, coro: Awaitable[Any], what: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"bridge-{self.call_sid}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _has_words(text: str) -> bool:
    return bool(re.search(r"[A-Za-z0-9]", text or ""))


__all__ = ["STAGES", "AgentBridge", "AgentSide", "BridgeError", "CallerSide"]
