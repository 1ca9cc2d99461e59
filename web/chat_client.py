"""Terminal client for closeloop's customer web chat, behind `closeloop chat`.

It speaks the same JSON protocol over `WS /chat` as the browser page (`web/chat.html`):
a `hello` with an optional session id, a `welcome` carrying the history, then `message`
frames answered by one or more `reply` frames, plus unsolicited `push` frames.

Two modes:

* scripted: `closeloop chat -m "where is my order?" -m "return it"` sends each message in
  order, prints the replies, and exits 0 only if every message got a reply;
* interactive: lines are read from stdin at a `you> ` prompt until `quit`, `exit` or EOF.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import ipaddress
import json
import os
import sys
import threading
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

DEFAULT_URL = "http://127.0.0.1:8080"
PROMPT = "you> "
REPLY_SETTLE_SECONDS = 0.8
"""After a reply, how long to wait for the next one before deciding the bot is done."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130

_QUIT_WORDS = frozenset({"quit", "exit"})
_SPEAKERS = {"customer": "you", "bot": "bot", "agent": "agent"}
_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


class ChatUrlError(ValueError):
    """The base URL given to the client cannot be turned into a chat WebSocket URL."""


def chat_ws_url(base_url: str) -> str:
    """Turns a server base URL into the URL of its chat WebSocket.

    Args:
        base_url: e.g. `http://127.0.0.1:8080`; `https` maps to `wss`, and a URL that
            already points at `/chat` (or uses ws/wss) is accepted as is.

    Returns:
        e.g. `ws://127.0.0.1:8080/chat`.

    Raises:
        ChatUrlError: the scheme is not http(s)/ws(s) or the host is missing.
    """
    parts = urllib.parse.urlsplit(base_url.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ChatUrlError(f"expected a URL like {DEFAULT_URL}, got {base_url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat"):
        path += "/chat"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def format_message(sender: str, text: str, *, tag: str | None = None) -> str:
    """Formats one chat message as terminal lines, e.g. `bot> Your parcel left today.`.

    Continuation lines of a multi-line message are indented under the first one.
    """
    prefix = "[system] " if sender == "system" else f"{_SPEAKERS.get(sender, sender)}> "
    if tag:
        prefix = f"[{tag}] {prefix}"
    lines = text.splitlines() or [""]
    indent = "\n" + " " * len(prefix)
    return prefix + indent.join(lines)


async def run_chat(
    base_url: str,
    *,
    session: str | None = None,
    messages: Sequence[str] | None = None,
    out: TextIO | None = None,
    inp: TextIO | None = None,
    err: TextIO | None = None,
    reply_timeout: float = 10.0,
    reply_settle: float = REPLY_SETTLE_SECONDS,
    session_file: Path | None = None,
) -> int:
    """Runs one chat session against a closeloop server.

    Args:
        base_url: server base URL, e.g. `http://127.0.0.1:8080`.
        session: session id to continue; if None, the one in `session_file` (if any).
        messages: send these in order and exit (scripted mode); None reads lines from `inp`.
        out: where the conversation is printed (default stdout).
        inp: where lines are read from in interactive mode (default stdin).
        err: where errors are printed (default stderr).
        reply_timeout: seconds to wait for the first reply to a message (and for `welcome`).
        reply_settle: after a reply, seconds without a new one before the bot is done.
        session_file: if set, the session id is loaded from and saved to this file, so the
            next run continues the same conversation.

    Returns:
        0 on `quit`/`exit`/EOF, or in scripted mode when every message got a reply; 1 when
        the server errored, did not answer in time or closed the connection; 2 when the
        server could not be reached.
    """
    out = sys.stdout if out is None else out
    inp = sys.stdin if inp is None else inp
    err = sys.stderr if err is None else err
    try:
        url = chat_ws_url(base_url)
    except ChatUrlError as e:
        _write(err, f"invalid closeloop URL: {e}")
        return EXIT_UNREACHABLE
    if session is None and session_file is not None:
        session = _load_session(session_file, err)

    try:
        ws = await connect(
            url,
            open_timeout=reply_timeout,
            # A proxy from the environment must not intercept a local dev server.
            proxy=None if _is_loopback(url) else True,
        )
    except (OSError, WebSocketException) as e:
        _write(err, f"cannot reach closeloop at {base_url}: {_describe(e)}. Is `make run` running?")
        return EXIT_UNREACHABLE

    async with ws:
        chat = _ChatSession(ws, out, err, reply_timeout, reply_settle, session_file)
        return await chat.run(session, messages, inp)


def main_args(parser: argparse.ArgumentParser) -> None:
    """Adds the `closeloop chat` arguments to `parser`."""
    parser.add_argument("--url", default=DEFAULT_URL, help="closeloop server base URL (default: %(default)s)")
    parser.add_argument("--session", default=None, help="continue the conversation with this id")
    parser.add_argument(
        "--session-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="load the session id from PATH and save it there, to continue next time",
    )
    parser.add_argument(
        "-m",
        "--message",
        action="append",
        default=None,
        metavar="TEXT",
        help="send TEXT instead of reading stdin; repeat to send several in order",
    )
    parser.add_argument(
        "--reply-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for a reply (default: %(default)s)",
    )


def run_from_args(ns: argparse.Namespace) -> int:
    """Runs `closeloop chat` with arguments parsed by a parser set up by `main_args`."""
    try:
        return asyncio.run(
            run_chat(
                ns.url,
                session=getattr(ns, "session", None),
                messages=getattr(ns, "message", None),
                session_file=getattr(ns, "session_file", None),
                reply_timeout=getattr(ns, "reply_timeout", 10.0),
                out=sys.stdout,
                inp=sys.stdin,
                err=sys.stderr,
            )
        )
    except KeyboardInterrupt:
        _write(sys.stdout, "")
        return EXIT_INTERRUPTED


@dataclass(frozen=True, slots=True)
class _Event:
    """Something the session loop reacts to: a server frame, a closed socket, or input."""

    kind: Literal["frame", "closed", "line", "eof"]
    frame: dict[str, Any] = field(default_factory=dict)
    text: str = ""


class _ChatSession:
    """One connected chat: prints what the server says and sends what the user types."""

    def __init__(
        self,
        ws: ClientConnection,
        out: TextIO,
        err: TextIO,
        reply_timeout: float,
        reply_settle: float,
        session_file: Path | None,
    ) -> None:
        self._ws = ws
        self._out = out
        self._err = err
        self._reply_timeout = reply_timeout
        self._reply_settle = reply_settle
        self._session_file = session_file
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._typed_ahead: deque[str] = deque()
        self._prompt_shown = False
        self._input_done = False
        self._out_is_tty = _isatty(out)

    async def run(self, session: str | None, messages: Sequence[str] | None, inp: TextIO) -> int:
        receiver = asyncio.create_task(self._receive(), name="closeloop-chat-receive")
        reader: _LineReader | None = None
        try:
            if not await self._send({"type": "hello", "session": session}):
                return EXIT_FAILED
            if not await self._welcome(session):
                return EXIT_FAILED
            if messages is not None:
                return await self._run_scripted(messages)
            reader = _LineReader(inp, self._events.put_nowait)
            reader.start()
            return await self._run_interactive(echo=not _isatty(inp))
        finally:
            if reader is not None:
                reader.stop()
            receiver.cancel()
            try:
                await receiver
            except asyncio.CancelledError:
                pass

    async def _receive(self) -> None:
        try:
            async for raw in self._ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    frame = None
                if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                    self._print(self._err, "(ignored a malformed message from the server)")
                    continue
                self._events.put_nowait(_Event("frame", frame=frame))
        except ConnectionClosed:
            pass
        code, reason = self._ws.close_code, self._ws.close_reason
        if code == 1000:
            text = "closeloop ended the chat"
        else:
            text = f"connection to closeloop closed (code {code})"
        if reason:
            text += f": {reason}"
        self._events.put_nowait(_Event("closed", text=text))

    async def _welcome(self, requested: str | None) -> bool:
        deadline = asyncio.get_running_loop().time() + self._reply_timeout
        while True:
            event = await self._next_event(deadline)
            if event is None:
                self._print(self._err, f"closeloop did not answer within {self._reply_timeout:g}s")
                return False
            if event.kind == "closed":
                self._print(self._err, event.text)
                return False
            frame = event.frame
            if frame.get("type") == "error":
                self._print_error(frame)
                return False
            if frame.get("type") != "welcome":
                self._show(frame)
                continue
            session = frame.get("session")
            if isinstance(session, str) and session:
                if requested and session != requested:
                    self._print(self._out, "(that conversation was not found; this is a new one)")
                if self._session_file is not None:
                    _save_session(self._session_file, session, self._err)
            history = frame.get("history") or []
            conversation = frame.get("conversation_id")
            header = f"connected to closeloop support · conversation #{conversation}"
            if history:
                header += f" · {len(history)} earlier message{'s' if len(history) != 1 else ''}"
            self._print(self._out, header)
            for item in history:
                if isinstance(item, dict):
                    self._print(self._out, _format_item(item))
            return True

    async def _run_scripted(self, messages: Sequence[str]) -> int:
        status = EXIT_OK
        for text in messages:
            self._print(self._out, format_message("customer", text))
            outcome = await self._exchange(text)
            if outcome == "closed":
                return EXIT_FAILED
            if outcome != "replied":
                status = EXIT_FAILED
        return status

    async def _run_interactive(self, *, echo: bool) -> int:
        while True:
            line = await self._next_line()
            if line is None:  # EOF, or the connection closed while waiting
                if self._prompt_shown:
                    self._print(self._out, "")
                return EXIT_OK if self._ws.close_code is None else EXIT_FAILED
            self._prompt_shown = False
            if echo:
                self._print(self._out, line)
            text = line.strip()
            if text.lower() in _QUIT_WORDS:
                return EXIT_OK
            if text and await self._exchange(text) == "closed":
                return EXIT_FAILED

    async def _next_line(self) -> str | None:
        """Shows the prompt and waits for a line, printing whatever the server pushes."""
        if self._typed_ahead:
            self._prompt()
            return self._typed_ahead.popleft()
        if self._input_done:
            return None
        self._prompt()
        while True:
            event = await self._events.get()
            if event.kind == "line":
                return event.text
            if event.kind == "eof":
                self._input_done = True
                return None
            if event.kind == "closed":
                self._print(self._err, event.text)
                return None
            self._show(event.frame)

    async def _exchange(self, text: str) -> Literal["replied", "no_reply", "error", "closed"]:
        """Sends one message and prints the replies until the bot goes quiet."""
        if not await self._send({"type": "message", "text": text, "id": str(uuid.uuid4())}):
            return "closed"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reply_timeout
        replied = False
        while True:
            event = await self._next_event(deadline)
            if event is None:
                if not replied:
                    self._print(self._err, f"(no reply within {self._reply_timeout:g}s)")
                return "replied" if replied else "no_reply"
            if event.kind == "closed":
                self._print(self._err, event.text)
                return "closed"
            if event.kind == "line":
                self._typed_ahead.append(event.text)
                continue
            if event.kind == "eof":
                self._input_done = True  # still show the replies; stop after them
                continue
            frame = event.frame
            if frame.get("type") == "error":
                self._print_error(frame)
                return "error"
            if frame.get("type") == "ack":  # stored and passed to a person: no bot reply comes
                if not frame.get("duplicate"):
                    self._print(self._out, "(delivered to our team; a person will answer here)")
                replied = True
                deadline = loop.time() + self._reply_settle
                continue
            self._show(frame)
            if frame.get("type") == "reply":
                replied = True
                deadline = loop.time() + self._reply_settle

    async def _next_event(self, deadline: float) -> _Event | None:
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None

    async def _send(self, frame: dict[str, Any]) -> bool:
        try:
            await self._ws.send(json.dumps(frame))
        except ConnectionClosed:
            self._print(self._err, "connection to closeloop lost while sending")
            return False
        return True

    def _show(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "reply":
            self._print(self._out, _format_item(frame))
        elif kind == "push":
            push_kind = frame.get("kind")
            tag = "follow-up" if push_kind in (None, "followup") else str(push_kind)
            self._print(self._out, _format_item(frame, tag=tag))
        elif kind == "error":
            self._print_error(frame)
        # Other frame types are newer protocol features this client does not know; skip.

    def _print_error(self, frame: dict[str, Any]) -> None:
        message = frame.get("message") or "the server rejected the request"
        self._print(self._err, f"error: {message} ({frame.get('code', 'unknown')})")

    def _prompt(self) -> None:
        self._out.write(PROMPT)
        self._out.flush()
        self._prompt_shown = True

    def _print(self, stream: TextIO, text: str) -> None:
        """Prints a line, moving an open prompt out of the way and showing it again after."""
        if self._prompt_shown:
            self._out.write("\r\x1b[2K" if self._out_is_tty else "\n")
            self._out.flush()
        _write(stream, text)
        if self._prompt_shown:
            self._out.write(PROMPT)
            self._out.flush()


class _LineReader:
    """Feeds lines from a text stream into the event loop without blocking it.

    A real terminal or pipe is watched with `add_reader`, so nothing is left blocked in a
    thread when the chat ends; other streams (StringIO, regular files, Windows consoles)
    are read by a daemon thread, which for those reaches EOF or is harmless to abandon.
    """

    def __init__(self, inp: TextIO, emit: Callable[[_Event], None]) -> None:
        self._inp = inp
        self._emit = emit
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def start(self) -> None:
        fd = _fileno(self._inp)
        if fd is not None and sys.platform != "win32":
            try:
                self._loop.add_reader(fd, self._on_readable)
            except (OSError, ValueError, NotImplementedError):
                pass  # e.g. a regular file, which epoll refuses
            else:
                self._fd = fd
                return
        thread = threading.Thread(target=self._read_blocking, name="closeloop-chat-stdin")
        thread.daemon = True
        thread.start()

    def stop(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self._partial += self._decoder.decode(chunk, final=not chunk)
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._emit(_Event("line", text=line.rstrip("\r")))
        if not chunk:
            if self._partial:
                self._emit(_Event("line", text=self._partial.rstrip("\r")))
            self._emit(_Event("eof"))
            self.stop()

    def _read_blocking(self) -> None:
        try:
            for line in iter(self._inp.readline, ""):
                self._loop.call_soon_threadsafe(self._emit, _Event("line", text=line.rstrip("\r\n")))
            self._loop.call_soon_threadsafe(self._emit, _Event("eof"))
        except (RuntimeError, ValueError, OSError):
            pass  # the loop closed (chat over) or the stream was closed under us


def _format_item(item: dict[str, Any], *, tag: str | None = None) -> str:
    return format_message(str(item.get("from", "bot")), str(item.get("text", "")), tag=tag)


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, InvalidStatus):
        return f"the server answered HTTP {e.response.status_code} instead of opening the chat"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_session(path: Path, err: TextIO) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
    except OSError as e:
        _write(err, f"warning: cannot read session file {path}: {e.strerror or e}")
        return None


def _save_session(path: Path, session: str, err: TextIO) -> None:
    # The session id lets anyone continue this conversation: keep it private to the user.
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(session + "\n")
        os.replace(tmp, path)
    except OSError as e:
        _write(err, f"warning: cannot save session to {path}: {e.strerror or e}")


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _write(stream: TextIO, text: str) -> None:
    stream.write(text + "\n")
    stream.flush()
