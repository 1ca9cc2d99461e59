"""Attacks on the chat session a browser call carries (``POST /webrtc/offer`` with ``session``).

The session is the web chat's bearer secret: whoever holds it continues that conversation, by
text or by voice, the same threat as on ``WS /chat``. What must hold: a malformed or made-up
session is not an error and never reaches anyone's conversation (the call gets its own), the
answer gives nothing away, and the secret is never written to the logs or the database (only its
hash names the conversation)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from tests.support import LiveServer, live_server


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url, webrtc_calls_per_client=50) as live:
        yield live


async def chat_session(server: LiveServer) -> tuple[str, int]:
    """A real web-chat session with one message in it: (session, conversation id)."""
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "session": None}))
        welcome = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "message", "text": "hi there", "id": "a1"}))
        while json.loads(await ws.recv())["type"] != "reply":
            pass
    return welcome["session"], welcome["conversation_id"]


async def place_call(server: LiveServer, session: Any) -> tuple[RTCPeerConnection, httpx.Response]:
    pc = RTCPeerConnection()
    pc.addTrack(AudioStreamTrack())
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        response = await http.post(
            "/webrtc/offer", json={"sdp": pc.localDescription.sdp, "type": "offer", "session": session}
        )
    if response.status_code == 200:
        answer = response.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return pc, response


async def conversation_of(pool: asyncpg.Pool, call_id: str, within: float = 30.0) -> asyncpg.Record:
    """The conversation the call's session opened (once the call is connected)."""
    deadline = time.monotonic() + within
    while True:
        row = await pool.fetchrow(
            """SELECT c.id, c.channel, c.address FROM calls k JOIN conversations c ON c.id = k.conversation_id
               WHERE k.call_sid = $1""",
            call_id,
        )
        if row is not None:
            return row
        assert time.monotonic() < deadline, "the call never opened a conversation"
        await asyncio.sleep(0.05)


async def hang_up(server: LiveServer, call_id: str) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        await http.post("/webrtc/hangup", json={"call_id": call_id})


@pytest.mark.parametrize(
    "session",
    [
        None,
        12345,
        {"session": "x"},
        ["a" * 20],
        "short",
        "../../etc/passwd",
        "a" * 65,
        "' OR 1=1 --aaaa",
        "sha256:" + "0" * 64,
        "A" * 24,  # well-formed, but no chat ever had it: made up or guessed
    ],
)
async def test_a_malformed_or_unknown_session_gets_a_call_of_its_own_without_an_error(
    server: LiveServer, session: Any
) -> None:
    pc, response = await place_call(server, session)
    try:
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"sdp", "type", "call_id"}  # nothing about the session comes back
        if isinstance(session, str):
            assert session not in response.text
        row = await conversation_of(server.services.pool, body["call_id"])
        assert (row["channel"], row["address"]) == ("voice", body["call_id"])
    finally:
        await pc.close()
        await hang_up(server, response.json().get("call_id", ""))


async def test_a_guessed_session_never_reaches_a_customers_chat(server: LiveServer) -> None:
    session, conversation_id = await chat_session(server)
    pool = server.services.pool
    before = await pool.fetchval("SELECT last_seq FROM conversations WHERE id = $1", conversation_id)
    # one character off, a prefix, the same id in another case: none is that chat's session
    guesses = [session[:-1] + ("A" if session[-1] != "A" else "B"), session[:12], session.swapcase()]
    for guess in guesses:
        if guess == session:
            continue
        pc, response = await place_call(server, guess)
        try:
            row = await conversation_of(pool, response.json()["call_id"])
            assert row["id"] != conversation_id and row["channel"] == "voice"
        finally:
            await pc.close()
            await hang_up(server, response.json()["call_id"])
    assert await pool.fetchval("SELECT last_seq FROM conversations WHERE id = $1", conversation_id) == before


async def test_the_session_secret_is_never_logged_or_stored(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    session, conversation_id = await chat_session(server)
    pool = server.services.pool
    with caplog.at_level(logging.DEBUG):
        pc, response = await place_call(server, session)
        try:
            call_id = response.json()["call_id"]
            row = await conversation_of(pool, call_id)
            assert row["id"] == conversation_id  # the real session does continue the chat
            assert row["address"].startswith("sha256:") and session not in row["address"]
        finally:
            await pc.close()
            await hang_up(server, call_id)
    logged = "\n".join(f"{r.getMessage()} {json.dumps(r.__dict__, default=str)}" for r in caplog.records)
    assert session not in logged
    tables = await pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )
    for table in tables:
        found = await pool.fetchval(
            f'SELECT count(*) FROM "{table["table_name"]}" t WHERE strpos(t::text, $1) > 0',  # noqa: S608
            session,
        )
        assert found == 0, f"the session secret is stored in {table['table_name']}"
