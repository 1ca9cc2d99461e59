"""One history across web chat and a browser call: a call placed from the chat page carries the
page's chat session, and what is said on the call is stored in the chat's conversation, between
the messages typed before and after it. An aiortc peer plays the browser's call (espeak-ng speech
in, real models), a websockets client plays the chat."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from tests.integration.test_webrtc_calls import Microphone, Speaker, speech, until
from tests.support import LiveServer, live_server


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        await live.services.speech.start()
        yield live


async def chat_hello(ws: Any, session: str | None = None) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "session": session}))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return welcome


async def chat_say(ws: Any, text: str, message_id: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "message", "text": text, "id": message_id}))
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "reply":
            return frame


async def call_with_session(
    server: LiveServer, session: str, speaker: Any = None
) -> tuple[RTCPeerConnection, Microphone, Any, Any, str]:
    """A browser call carrying the chat page's ``session``; ``speaker`` plays the bot's track
    (a :class:`Speaker` unless given)."""
    pc = RTCPeerConnection()
    mic, speaker = Microphone(), speaker or Speaker()
    pc.addTrack(mic)
    keys = pc.createDataChannel("keys")

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        asyncio.ensure_future(speaker.play(track))

    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        response = await http.post(
            "/webrtc/offer", json={"sdp": pc.localDescription.sdp, "type": "offer", "session": session}
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    return pc, mic, speaker, keys, answer["call_id"]


async def test_a_call_from_the_chat_page_continues_the_chat_and_the_chat_history_holds_both(
    server: LiveServer,
) -> None:
    pool = server.services.pool
    async with websockets.connect(server.ws_url) as ws:
        welcome = await chat_hello(ws)
        typed = await chat_say(ws, "hello, I have a question", "m1")
    session, conversation_id = welcome["session"], welcome["conversation_id"]

    pc, mic, speaker, keys, call_id = await call_with_session(server, session)
    try:
        await until("the greeting was heard", lambda: speaker.voiced_ms > 1000 and speaker.quiet_for(0.8))
        mic.say(speech("what time do you open"))
        await until("the caller finished speaking", lambda: mic.said.is_set(), 15)

        async def answered() -> bool:
            rows = await pool.fetch(
                "SELECT sender, external_id FROM messages WHERE conversation_id = $1 ORDER BY seq",
                conversation_id,
            )
            spoken = [
                i for i, r in enumerate(rows) if (r["external_id"] or "").startswith(f"voice:{call_id}:")
            ]
            return bool(spoken) and any(r["sender"] == "bot" for r in rows[spoken[-1] + 1 :])

        await until("the spoken question was answered in the chat's conversation", answered, 30)
        keys.send("hangup")

        async def ended() -> bool:
            return (
                await pool.fetchval("SELECT end_reason FROM calls WHERE call_sid = $1", call_id) == "hangup"
            )

        await until("the call ended", ended, 10)
    finally:
        await pc.close()

    # the call row ties the call to the chat's conversation: no conversation of its own
    assert (
        await pool.fetchval("SELECT conversation_id FROM calls WHERE call_sid = $1", call_id)
        == conversation_id
    )
    assert await pool.fetchval("SELECT count(*) FROM conversations WHERE address = $1", call_id) == 0

    async with websockets.connect(server.ws_url) as ws:
        again = await chat_hello(ws, session)
        after = await chat_say(ws, "thanks, that is all", "m2")
        assert again["conversation_id"] == conversation_id
        history = again["history"]
        rows = await pool.fetch(
            "SELECT seq, sender, body, external_id FROM messages WHERE conversation_id = $1 ORDER BY seq",
            conversation_id,
        )
    # the welcome history is the whole conversation in order: typed, then spoken, then typed
    thanks = next(r["seq"] for r in rows if r["body"] == "thanks, that is all")
    assert [(h["seq"], h["from"], h["text"]) for h in history] == [
        (r["seq"], r["sender"], r["body"]) for r in rows if r["seq"] < thanks
    ]
    assert after["seq"] > thanks  # and the chat goes on in the same conversation
    texts = [h["text"] for h in history]
    assert texts[0] == "hello, I have a question" and typed["text"] in texts
    spoken = [r for r in rows if (r["external_id"] or "").startswith(f"voice:{call_id}:")]
    assert spoken and all(r["sender"] == "customer" for r in spoken)
    said = " ".join(r["body"].lower() for r in spoken)
    assert any(word in said for word in ("time", "open")), said
    first_spoken = spoken[0]["seq"]
    assert texts.index(typed["text"]) < [h["seq"] for h in history].index(first_spoken)
    assert any(h["from"] == "bot" and h["seq"] > first_spoken for h in history)  # the spoken answer
