"""`closeloop chat` (web/chat_client.py) against a fake web-chat server on 127.0.0.1.

The fake speaks the `WS /chat` protocol: `hello` -> `welcome` with history, each `message`
gets the replies scripted for its text, and some texts trigger an unsolicited `push`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from web.chat_client import (
    ChatUrlError,
    chat_ws_url,
    format_message,
    main_args,
    run_chat,
    run_from_args,
)

HISTORY = [
    {"seq": 1, "from": "customer", "text": "Hi, order 1042 is late", "at": "2024-05-02T09:00:00Z"},
    {"seq": 2, "from": "bot", "text": "Sorry! It ships today.", "at": "2024-05-02T09:00:01Z"},
    {"seq": 3, "from": "system", "text": "An agent joined", "at": "2024-05-02T09:01:00Z"},
]

# Fast settle so each exchange ends ~0.15 s after its last reply.
FAST = {"reply_settle": 0.15, "reply_timeout": 3.0}


@dataclass
class FakeChatServer:
    """What the fake server was sent, and how it answers."""

    url: str = ""
    session: str = "sess-new"
    history: list[dict[str, Any]] = field(default_factory=lambda: list(HISTORY))
    replies: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    pushes: dict[str, tuple[str, str]] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    close_on: str | None = None
    hellos: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 10

    def _frame(self, frame_type: str, sender: str, text: str, **extra: Any) -> str:
        self.seq += 1
        frame = {"type": frame_type, "seq": self.seq, "from": sender, "text": text}
        frame |= {"at": "2024-05-02T09:05:00Z", **extra}
        return json.dumps(frame)

    async def handle(self, ws: ServerConnection) -> None:
        hello = json.loads(await ws.recv())
        self.hellos.append(hello)
        session = hello.get("session") or self.session
        welcome = {"session": session, "conversation_id": 42, "history": self.history}
        await ws.send(json.dumps({"type": "welcome", **welcome}))
        async for raw in ws:
            frame = json.loads(raw)
            self.messages.append(frame)
            text = frame["text"]
            if text == self.close_on:
                await ws.close(1011, "internal error")
                return
            if text in self.errors:
                code, message = self.errors[text]
                await ws.send(json.dumps({"type": "error", "code": code, "message": message}))
                continue
            for sender, reply in self.replies.get(text, [("bot", f"echo: {text}")]):
                await asyncio.sleep(0.02)
                await ws.send(self._frame("reply", sender, reply))
            if text in self.pushes:
                sender, push = self.pushes[text]
                await asyncio.sleep(0.05)
                await ws.send(self._frame("push", sender, push, kind="followup"))


@asynccontextmanager
async def fake_chat_server(**config: Any) -> AsyncIterator[FakeChatServer]:
    fake = FakeChatServer(**config)
    async with serve(fake.handle, "127.0.0.1", 0) as server:
        fake.url = f"http://127.0.0.1:{_port(server)}"
        yield fake


def _port(server: Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio
async def test_scripted_chat_prints_history_replies_and_followup_in_order() -> None:
    replies = {
        "where is my order?": [("bot", "Order 1042 is out for delivery.")],
        "I want to return it": [
            ("bot", "Here is your return label: https://shop.example/r/1042"),
            ("agent", "I've also refunded the shipping."),
        ],
    }
    pushes = {"I want to return it": ("bot", "Did the label work?")}
    out, err = io.StringIO(), io.StringIO()
    async with fake_chat_server(replies=replies, pushes=pushes) as server:
        code = await run_chat(
            server.url,
            messages=["where is my order?", "I want to return it"],
            out=out,
            err=err,
            **FAST,
        )

    assert code == 0, err.getvalue()
    assert out.getvalue().splitlines() == [
        "connected to closeloop support · conversation #42 · 3 earlier messages",
        "you> Hi, order 1042 is late",
        "bot> Sorry! It ships today.",
        "[system] An agent joined",
        "you> where is my order?",
        "bot> Order 1042 is out for delivery.",
        "you> I want to return it",
        "bot> Here is your return label: https://shop.example/r/1042",
        "agent> I've also refunded the shipping.",
        "[follow-up] bot> Did the label work?",
    ]
    assert err.getvalue() == ""


@pytest.mark.asyncio
async def test_hello_carries_the_session_and_messages_have_unique_uuid_ids() -> None:
    async with fake_chat_server() as server:
        code = await run_chat(
            server.url, session="sess-abc", messages=["one", "two"], out=io.StringIO(), **FAST
        )

    assert code == 0
    assert server.hellos == [{"type": "hello", "session": "sess-abc"}]
    assert [m["text"] for m in server.messages] == ["one", "two"]
    assert all(m["type"] == "message" for m in server.messages)
    ids = [m["id"] for m in server.messages]
    assert len(set(ids)) == 2
    for message_id in ids:
        uuid.UUID(message_id)


@pytest.mark.asyncio
async def test_session_file_is_saved_on_first_run_and_continues_the_conversation(
    tmp_path: Path,
) -> None:
    session_file = tmp_path / "state" / "chat-session"
    async with fake_chat_server(session="sess-from-server") as server:
        first = await run_chat(
            server.url, messages=["hi"], session_file=session_file, out=io.StringIO(), **FAST
        )
        second = await run_chat(
            server.url, messages=["again"], session_file=session_file, out=io.StringIO(), **FAST
        )

    assert (first, second) == (0, 0)
    assert session_file.read_text().strip() == "sess-from-server"
    assert session_file.stat().st_mode & 0o077 == 0
    assert [h["session"] for h in server.hellos] == [None, "sess-from-server"]


@pytest.mark.asyncio
async def test_interactive_mode_prompts_reads_lines_and_quits_with_zero() -> None:
    out = io.StringIO()
    async with fake_chat_server(history=[]) as server:
        code = await run_chat(server.url, inp=io.StringIO("hello there\n\nquit\nnot sent\n"), out=out, **FAST)

    assert code == 0
    assert [m["text"] for m in server.messages] == ["hello there"]
    text = out.getvalue()
    assert "you> hello there\n" in text
    assert "bot> echo: hello there" in text
    assert text.rstrip().endswith("you> quit")


@pytest.mark.asyncio
async def test_interactive_mode_ends_with_zero_at_end_of_input() -> None:
    out = io.StringIO()
    async with fake_chat_server(history=[]) as server:
        code = await run_chat(server.url, inp=io.StringIO("last words\n"), out=out, **FAST)

    assert code == 0
    assert [m["text"] for m in server.messages] == ["last words"]
    assert "bot> echo: last words" in out.getvalue()


@pytest.mark.asyncio
async def test_server_error_is_shown_and_scripted_run_exits_one() -> None:
    out, err = io.StringIO(), io.StringIO()
    errors = {"x" * 3: ("message_too_long", "Messages are limited to 2000 characters.")}
    async with fake_chat_server(errors=errors) as server:
        code = await run_chat(server.url, messages=["xxx", "ok"], out=out, err=err, **FAST)

    assert code == 1
    assert "error: Messages are limited to 2000 characters. (message_too_long)" in err.getvalue()
    assert "bot> echo: ok" in out.getvalue()


@pytest.mark.asyncio
async def test_no_reply_within_timeout_is_reported() -> None:
    err = io.StringIO()
    async with fake_chat_server(replies={"silence": []}) as server:
        code = await run_chat(
            server.url,
            messages=["silence"],
            out=io.StringIO(),
            err=err,
            reply_timeout=0.3,
            reply_settle=0.1,
        )

    assert code == 1
    assert "(no reply within 0.3s)" in err.getvalue()


@pytest.mark.asyncio
async def test_connection_closed_by_server_mid_chat_exits_one_with_reason() -> None:
    err = io.StringIO()
    async with fake_chat_server(close_on="boom") as server:
        code = await run_chat(server.url, messages=["boom", "never sent"], out=io.StringIO(), err=err, **FAST)

    assert code == 1
    assert "connection to closeloop closed (code 1011): internal error" in err.getvalue()
    assert [m["text"] for m in server.messages] == ["boom"]


@pytest.mark.asyncio
async def test_unreachable_server_exits_two_with_a_hint() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    err = io.StringIO()

    code = await run_chat(url, messages=["hi"], out=io.StringIO(), err=err, reply_timeout=2.0)

    assert code == 2
    assert err.getvalue() == (
        f"cannot reach closeloop at {url}: connection refused. Is `make run` running?\n"
    )


@pytest.mark.asyncio
async def test_server_without_a_chat_endpoint_exits_two_naming_the_http_status() -> None:
    def not_found(connection: ServerConnection, request: Request) -> Response:
        return Response(404, "Not Found", Headers(), b"no chat here")

    err = io.StringIO()
    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=not_found) as s:
        url = f"http://127.0.0.1:{_port(s)}"
        code = await run_chat(url, messages=["hi"], out=io.StringIO(), err=err, reply_timeout=2.0)

    assert code == 2
    assert f"cannot reach closeloop at {url}: the server answered HTTP 404" in err.getvalue()


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/chat"),
        ("http://127.0.0.1:8080/", "ws://127.0.0.1:8080/chat"),
        ("https://support.example.com", "wss://support.example.com/chat"),
        ("https://example.com/closeloop/", "wss://example.com/closeloop/chat"),
        ("ws://localhost:9000/chat", "ws://localhost:9000/chat"),
    ],
)
def test_chat_ws_url_maps_http_base_urls_to_the_chat_socket(base_url: str, expected: str) -> None:
    assert chat_ws_url(base_url) == expected


@pytest.mark.parametrize("base_url", ["127.0.0.1:8080", "ftp://host/", "http://"])
def test_chat_ws_url_rejects_urls_it_cannot_use(base_url: str) -> None:
    with pytest.raises(ChatUrlError):
        chat_ws_url(base_url)


def test_multiline_messages_are_indented_under_their_speaker() -> None:
    assert format_message("agent", "line one\nline two") == "agent> line one\n       line two"
    assert format_message("bot", "hi", tag="follow-up") == "[follow-up] bot> hi"


def test_cli_arguments_parse_repeated_messages_and_defaults() -> None:
    parser = argparse.ArgumentParser(prog="closeloop chat")
    main_args(parser)

    ns = parser.parse_args(["-m", "first", "--message", "second", "--session-file", "s.txt"])

    assert ns.url == "http://127.0.0.1:8080"
    assert ns.message == ["first", "second"]
    assert ns.session is None
    assert ns.session_file == Path("s.txt")


def test_run_from_args_reports_an_unreachable_server_with_exit_two(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="closeloop chat")
    main_args(parser)
    ns = parser.parse_args(["--url", f"http://127.0.0.1:{_closed_port()}", "-m", "hi"])

    assert run_from_args(ns) == 2
    assert "Is `make run` running?" in capsys.readouterr().err
