"""Deepgram live (streaming) speech to text for one call, with Whisper as the fallback.

A :class:`DeepgramTranscriber` opens one Deepgram ``listen`` v1 WebSocket per call through
``deepgram-sdk`` and streams the caller's raw 8 kHz mu-law audio to it as it arrives
(:meth:`~DeepgramTranscriber.feed`), so by the time the local VAD says the caller stopped,
Deepgram has already heard almost everything. :meth:`~DeepgramTranscriber.transcribe` then sends
``Finalize`` (flush what is buffered) and waits, bounded, for the ``Results`` marked
``from_finalize``; the answer is the text of the final results of the caller's utterance.

**Which finals belong to which call.** Final results are kept in arrival order; the answer to
the k-th ``Finalize`` marks a cut in that list. A call returns the finals between the cut where
its utterance began and its own cut. Whether a call continues the previous call's utterance is
read from its audio: :class:`~voice.call_session.CallSession` passes the turn's audio so far,
which only grows while the turn lasts, so audio that *extends* the previous call's audio is the
same utterance. That is the speculative-transcription case: the early call at
``speech_stopped`` was thrown away because the caller went on speaking, and the later call must
return the early words too (no word lost), once (no word doubled). Audio that does not extend
it is a new utterance, which begins at the previous call's cut.

**Fallback.** If the socket cannot be opened, is refused, reports an error, closes unexpectedly,
cannot keep up, or a ``Finalize`` goes unanswered for ``finalize_timeout_s``, the transcriber
gives up on Deepgram for the rest of the call (one warning with the call id, ``on_fallback``
called with a reason, ``failure`` set) and answers this and every later call with the fallback
transcriber (the shared Whisper) from the ``audio`` argument, so no utterance is lost. Deepgram
failures never raise out of :meth:`~DeepgramTranscriber.transcribe`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import ListenV1Error, ListenV1Results

from voice.call_ports import tell_running_text

if TYPE_CHECKING:
    from voice.call_ports import Transcriber

log = logging.getLogger(__name__)

#: The SDK's production endpoint for live transcription (the SDK appends ``/v1/listen``).
DEFAULT_URL = DeepgramClientEnvironment.PRODUCTION.production
ULAW_BYTES_PER_S = 8000
_MAX_SEND_BYTES = 1600  # coalesce queued frames into sends of at most 200 ms


def deepgram_client(api_key: str, url: str = DEFAULT_URL) -> AsyncDeepgramClient:
    """A Deepgram client for ``url`` (``wss://...``; ``https://`` is accepted too), shared by calls.

    The key goes in ``Authorization: Token KEY``, as the SDK sends it.
    """
    base = url.rstrip("/")
    if base.startswith("https://") or base.startswith("http://"):
        base = "ws" + base[4:]
    http = "http" + base[2:]
    production = DeepgramClientEnvironment.PRODUCTION
    environment = DeepgramClientEnvironment(
        base=http, production=base, agent=production.agent, agent_rest=production.agent_rest
    )
    return AsyncDeepgramClient(api_key=api_key, environment=environment)


@dataclass(frozen=True)
class DeepgramOptions:
    """How a call's Deepgram stream is opened and how long each step may take.

    Attributes:
        model: Deepgram model, e.g. ``nova-3``.
        endpointing_ms: Silence after which Deepgram finalizes on its own; None disables it
            (``Finalize`` from the local VAD still ends each utterance).
        interim_results: Ask for interim results (kept out of answers; they show progress).
        punctuate, smart_format: Deepgram formatting options.
        redact: What Deepgram itself redacts from transcripts before sending them (``pci``: card
            numbers, expiry dates and security codes; ``ssn``), so a card read out never leaves
            Deepgram in clear; closeloop's own redaction still runs on every transcript.
        connect_timeout_s: Longest wait for the socket to open.
        finalize_timeout_s: Longest wait for the answer to a ``Finalize``.
        keepalive_interval_s: Send ``KeepAlive`` after this long without audio (Deepgram
            closes a socket that hears nothing for 10 s).
        max_backlog_s: Audio queued but not sent beyond this means Deepgram cannot keep up.
        close_timeout_s: Longest wait for Deepgram to close after ``CloseStream``.
    """

    model: str = "nova-3"
    endpointing_ms: int | None = 300
    interim_results: bool = True
    punctuate: bool = True
    smart_format: bool = True
    redact: tuple[str, ...] = ("pci", "ssn")
    connect_timeout_s: float = 5.0
    finalize_timeout_s: float = 1.0
    keepalive_interval_s: float = 4.0
    max_backlog_s: float = 10.0
    close_timeout_s: float = 2.0

    def query(self) -> dict[str, Any]:
        """Keyword arguments of ``listen.v1.connect`` (booleans as the ``"true"``/``"false"`` the API takes)."""
        return {
            "model": self.model,
            "encoding": "mulaw",
            "sample_rate": ULAW_BYTES_PER_S,
            "channels": 1,
            "interim_results": _flag(self.interim_results),
            "punctuate": _flag(self.punctuate),
            "smart_format": _flag(self.smart_format),
            "endpointing": self.endpointing_ms if self.endpointing_ms is not None else "false",
            **({"redact": list(self.redact)} if self.redact else {}),  # repeated: redact=pci&redact=ssn
        }


def _flag(value: bool) -> str:
    return "true" if value else "false"


class _Failure(Exception):
    """Deepgram cannot serve this call any more; ``reason`` is a short code for logs and metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Control:
    def __init__(self, name: str) -> None:
        self.name = name


_FINALIZE = _Control("Finalize")
_CLOSE = _Control("CloseStream")


class DeepgramTranscriber:
    """One call's streaming transcriber (:class:`voice.call_ports.Transcriber` plus ``feed``).

    Build it, ``await start()``, ``feed()`` every inbound frame, ``await transcribe(audio)`` when
    the caller stopped, ``await aclose()`` at the end of the call.

    Args:
        client: Deepgram client (see :func:`deepgram_client`); may be shared by calls.
        fallback: Transcriber used once Deepgram failed (the shared Whisper).
        call_id: The call's id, for logs.
        options: Stream options and timeouts.
        on_fallback: Called once, with the reason, when the call switches to the fallback.

    Attributes:
        failure: Why Deepgram was given up for this call; None while it serves it.
        fallbacks: Utterances answered by the fallback.
    """

    def __init__(
        self,
        client: AsyncDeepgramClient,
        fallback: Transcriber,
        *,
        call_id: str,
        options: DeepgramOptions | None = None,
        on_fallback: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._fallback = fallback
        self.call_id = call_id
        self.options = options or DeepgramOptions()
        self._on_fallback = on_fallback
        self.failure: str | None = None
        self.fallbacks = 0
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._closing = False
        self._ready = asyncio.Event()  # connected, or failed
        self._news = asyncio.Event()  # replaced after every set: see _notify
        self._outbox: deque[bytes | _Control] = deque()
        self._outbox_bytes = 0
        self._wake = asyncio.Event()
        self._finals: list[str] = []
        self._cuts: list[int] = [0]  # _cuts[k]: len(_finals) when the k-th Finalize was answered
        self._finalizes = 0
        self._last_audio: np.ndarray | None = None
        self._last_cut = 0  # Finalize number of the previous call
        self._last_start = 0  # cut where the previous call's utterance began
        self._interim = ""
        #: Called with the running text since the last answered transcript whenever Deepgram sends
        #: a result, interim ones included (the call session uses it to end turns sooner).
        self.on_partial: Callable[[str], None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the stream in the background (audio fed meanwhile is queued); idempotent."""
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._run(), name=f"call-{self.call_id}-deepgram")

    async def aclose(self) -> None:
        """Close the stream (``CloseStream``, then a bounded wait for Deepgram to close)."""
        if self._closing:
            return
        self._closing = True
        task = self._task
        if task is None:
            return
        if self._connected and self.failure is None:
            self._outbox.append(_CLOSE)
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), self.options.close_timeout_s)
            except (TimeoutError, Exception):
                pass
        if not task.done():
            task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass

    # ---- audio in ------------------------------------------------------------------------------
    def feed(self, ulaw_8k: bytes) -> None:
        """Queue caller audio (8 kHz mu-law) for Deepgram; never blocks."""
        if self.failure is not None or self._closing or not ulaw_8k:
            return
        self._outbox.append(bytes(ulaw_8k))
        self._outbox_bytes += len(ulaw_8k)
        self._wake.set()
        if self._outbox_bytes > self.options.max_backlog_s * ULAW_BYTES_PER_S:
            self._fail("backlog")

    # ---- transcripts ---------------------------------------------------------------------------
    async def transcribe(self, pcm16_16k: np.ndarray) -> str:
        """The caller's utterance so far; ``pcm16_16k`` is its audio (used by the fallback)."""
        if self.failure is None:
            try:
                return await self._from_deepgram(pcm16_16k)
            except _Failure as e:
                self._fail(e.reason)
            except Exception:
                log.warning("deepgram transcription failed", extra={"call_sid": self.call_id}, exc_info=True)
                self._fail("internal_error")
        self.fallbacks += 1
        return await self._fallback.transcribe(pcm16_16k)

    async def _from_deepgram(self, audio: np.ndarray) -> str:
        try:
            async with asyncio.timeout(self.options.connect_timeout_s + 1.0):
                await self._ready.wait()
        except TimeoutError:
            raise _Failure("connect_timeout") from None
        if self.failure is not None:
            raise _Failure(self.failure)
        # From here to the Finalize being queued nothing awaits, so cut numbers match the order
        # in which Finalize messages reach Deepgram (and so the order of its answers).
        start = self._last_start if self._continues(audio) else self._last_cut
        self._finalizes += 1
        cut = self._finalizes
        self._last_audio, self._last_cut, self._last_start = audio, cut, start
        self._outbox.append(_FINALIZE)
        self._wake.set()
        try:
            async with asyncio.timeout(self.options.finalize_timeout_s):
                await self._wait_until(lambda: len(self._cuts) > cut or self.failure is not None)
        except TimeoutError:
            raise _Failure("finalize_timeout") from None
        if len(self._cuts) <= cut:
            raise _Failure(self.failure or "closed")
        return " ".join(self._finals[self._cuts[start] : self._cuts[cut]])

    def _continues(self, audio: np.ndarray) -> bool:
        """True when ``audio`` extends the previous call's audio: the same utterance, grown."""
        previous = self._last_audio
        if previous is None or previous.size == 0 or audio.size < previous.size:
            return False
        return bool(np.array_equal(audio[: previous.size], previous))

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while True:
            news = self._news
            if predicate():
                return
            await news.wait()

    def _tell_partial(self) -> None:
        tell_running_text(self.on_partial, self._finals[self._cuts[-1] :], self._interim, self.call_id)

    def _notify(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    def _fail(self, reason: str) -> None:
        if self.failure is not None or self._closing:
            return
        self.failure = reason
        self._outbox.clear()
        self._outbox_bytes = 0
        self._ready.set()
        self._notify()
        log.warning(
            "deepgram unavailable; whisper transcribes the rest of the call",
            extra={"call_sid": self.call_id, "reason": reason},
        )
        if self._on_fallback is not None:
            self._on_fallback(reason)
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()  # drop the socket; aclose() awaits the task

    # ---- the socket ----------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._stream()
        except asyncio.CancelledError:
            raise
        except _Failure as e:
            self._fail(e.reason)
        except ApiError as e:
            self._fail(f"rejected_{e.status_code}")
        except TimeoutError:
            self._fail("timeout")
        except Exception as e:
            self._fail(("connection_lost_" if self._connected else "connect_failed_") + type(e).__name__)
        else:
            if not self._closing:
                self._fail("closed")
        finally:
            self._ready.set()
            self._notify()

    async def _stream(self) -> None:
        async with AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(self.options.connect_timeout_s):
                    socket = await stack.enter_async_context(
                        self._client.listen.v1.connect(**self.options.query())
                    )
            except TimeoutError:
                raise _Failure("connect_timeout") from None
            self._connected = True
            self._ready.set()
            sender = asyncio.create_task(self._send(socket), name=f"call-{self.call_id}-deepgram-send")
            try:
                await self._receive(socket)
            finally:
                sender.cancel()
                try:
                    await sender
                except (asyncio.CancelledError, Exception):
                    pass

    async def _send(self, socket: Any) -> None:
        try:
            while True:
                if not self._outbox:
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(self.options.keepalive_interval_s):
                            await self._wake.wait()
                    except TimeoutError:
                        await socket.send_keep_alive()
                    continue
                item = self._outbox.popleft()
                if isinstance(item, bytes):
                    parts = [item]
                    size = len(item)
                    while self._outbox and isinstance(self._outbox[0], bytes) and size < _MAX_SEND_BYTES:
                        more = self._outbox.popleft()
                        assert isinstance(more, bytes)
                        parts.append(more)
                        size += len(more)
                    self._outbox_bytes -= size
                    await socket.send_media(b"".join(parts))
                elif item is _FINALIZE:
                    await socket.send_finalize()
                elif item is _CLOSE:
                    await socket.send_close_stream()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail("send_failed_" + type(e).__name__)

    async def _receive(self, socket: Any) -> None:
        async for message in socket:
            if isinstance(message, ListenV1Results):
                alternatives = message.channel.alternatives
                text = alternatives[0].transcript.strip() if alternatives else ""
                if message.is_final:
                    if text:
                        self._finals.append(text)
                    self._interim = ""
                else:
                    self._interim = text
                if message.from_finalize:
                    self._cuts.append(len(self._finals))
                    self._notify()
                self._tell_partial()
            elif isinstance(message, ListenV1Error):
                raise _Failure("error_" + (message.variant or "unknown"))
        # The socket ended: fine when we asked for it, a failure otherwise (see _run).
