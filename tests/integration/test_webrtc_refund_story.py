"""The refund story by voice in a browser call: the customer verifies in the page's chat (the code
from the outbox, typed), presses Call, and over WebRTC asks for a refund and confirms it. An aiortc
peer plays the browser (espeak-ng speech in, Opus both ways, real models); the bot's spoken answer
is transcribed at the browser's speaker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import websockets

from tests.integration.browser_agent_parts import Headset
from tests.integration.test_text_channels import chat, hello
from tests.integration.test_webrtc_calls import speech, until
from tests.integration.test_webrtc_history import call_with_session
from tests.support import LiveServer, live_server, make_customer, outbox_code


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        await live.services.speech.start()
        yield live


def heard_to_its_end(headset: Headset, since: float) -> bool:
    """A reply started after ``since`` and has been quiet for 1.5 s (longer than the pause between
    its sentences)."""
    return headset.voiced_ms(since) > 1000 and headset.voiced_ms(time.monotonic() - 1.5) == 0


async def test_a_customer_verified_in_the_chat_gets_a_refund_by_voice_in_a_browser_call(
    server: LiveServer,
) -> None:
    pool = server.services.pool
    dana = await make_customer(
        pool, server.services.clock.now(), {"headphones": ("delivered", "Wireless headphones", 8900, 1)}
    )
    number = dana.orders["headphones"]
    async with websockets.connect(server.ws_url) as ws:
        welcome = await hello(ws)
        await chat(ws, "I'd like to check my account")
        await chat(ws, f"it's {dana.phone}")
        frames = await chat(ws, await outbox_code(pool, dana.phone))
        assert any("verified" in f.get("text", "") for f in frames), frames
    conversation = welcome["conversation_id"]

    headset = Headset()
    pc, mic, _, keys, call_id = await call_with_session(server, welcome["session"], headset)
    mic.silent_after_speech = False  # two utterances: keep sending (silence) between them
    try:
        await until("the greeting was heard", lambda: heard_to_its_end(headset, 0.0), 30)

        async def offered_refund() -> bool:
            rows = await pool.fetch(
                "SELECT sender, body FROM messages WHERE conversation_id = $1 ORDER BY seq", conversation
            )
            return bool(rows) and rows[-1]["sender"] == "bot" and "go ahead" in rows[-1]["body"]

        asked_at = time.monotonic()
        mic.say(speech("I want a refund for my headphones please"))
        await until("the refund was offered", offered_refund, 40)
        offered = await pool.fetchval(
            "SELECT body FROM messages WHERE conversation_id = $1 AND sender = 'bot' ORDER BY seq DESC LIMIT 1",
            conversation,
        )
        assert number in offered and "$89.00" in offered, offered

        await until("the offer was heard to its end", lambda: heard_to_its_end(headset, asked_at), 30)
        mic.say(speech("yes please"))
        confirmed_at = time.monotonic()

        async def refunded() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1",
                    number,
                )
            )

        await until("the refund was issued", refunded, 40)
        await until("the answer was heard to its end", lambda: heard_to_its_end(headset, confirmed_at), 40)
        keys.send("hangup")
    finally:
        await pc.close()

    # exactly one refund, and the caller heard it said (Whisper at the browser's speaker)
    refunds = await pool.fetchval(
        "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1", number
    )
    assert refunds == 1
    stt = server.services.speech.transcriber()
    heard = " ".join([(await stt.transcribe(part)).lower() for part in headset.utterances(confirmed_at)])
    assert any(word in heard for word in ("refund", "refunded", "89")), heard
    spoken = await pool.fetch(
        "SELECT sender FROM messages WHERE conversation_id = $1 AND external_id LIKE $2",
        conversation,
        f"voice:{call_id}:%",
    )
    assert len(spoken) >= 2 and {r["sender"] for r in spoken} == {"customer"}
