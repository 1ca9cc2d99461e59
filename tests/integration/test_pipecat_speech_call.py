"""A phone call whose speech runs through pipecat services chosen by settings: pipecat's
``DeepgramSTTService`` against the fake Deepgram live server (scripted transcripts) and pipecat's
``CartesiaTTSService`` against the fake Cartesia WebSocket (espeak-ng audio), with the real server,
the real media stream and the simulator's espeak-ng caller, as in ``test_deepgram_calls.py``.

The scripted transcripts differ from what the caller actually says, so a stored customer turn
that equals the script came through the pipecat STT service, not from Whisper; the bot's words
reaching the fake Cartesia server show the caller heard the pipecat TTS service, not Piper."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipeline.clock import FakeClock
from telephony.simulator import Utterance, run_call
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.speech_servers import FakeCartesiaTTS
from tests.fakes.twilio_server import FakeTwilio
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    live_server,
    make_customer,
    texted_code,
    twilio_settings,
)

DG_KEY = "dg-pipecat-integration-0123456789"
CARTESIA_KEY = "sk_car_pipecat-integration-0123456789"

Speech = tuple[LiveServer, FakeTwilio, FakeClock, FakeDeepgram, FakeCartesiaTTS]


@pytest.fixture(scope="module")
async def pipecat_voice(database_url: str) -> AsyncIterator[Speech]:
    """The server with STT and TTS from pipecat services, keys from the environment."""
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TEST_DEEPGRAM_KEY", DG_KEY)
        env.setenv("TEST_CARTESIA_KEY", CARTESIA_KEY)
        async with (
            FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
            FakeDeepgram(DG_KEY) as deepgram,
            FakeCartesiaTTS(CARTESIA_KEY) as cartesia,
        ):
            stt_params = {
                "api_key": "$TEST_DEEPGRAM_KEY",
                "base_url": deepgram.url,
                # Deepgram's own endpointing off: closeloop's turn detection asks for each
                # transcript, so every utterance is one final (one scripted text).
                "settings": {"endpointing": False},
            }
            tts_params = {
                "api_key": "$TEST_CARTESIA_KEY",
                "url": cartesia.url,
                "settings": {"voice": "voice-1"},
            }
            async with live_server(
                database_url,
                clock=clock,
                **twilio_settings(twilio),
                stt_provider="pipecat",
                stt_service="pipecat.services.deepgram.stt.DeepgramSTTService",
                stt_params=json.dumps(stt_params),
                tts_service="pipecat.services.cartesia.tts.CartesiaTTSService",
                tts_params=json.dumps(tts_params),
            ) as server:
                await server.services.speech.start()
                yield server, twilio, clock, deepgram, cartesia


async def _messages(server: LiveServer, call_sid: str) -> list[dict[str, Any]]:
    conv_id = await server.services.pool.fetchval(
        "SELECT id FROM conversations WHERE channel = 'voice' AND address = $1", call_sid
    )
    assert conv_id is not None
    return (await server.http.get(f"/api/conversations/{conv_id}")).json()["messages"]


async def test_the_refund_story_completes_through_pipecat_stt_and_tts(pipecat_voice: Speech) -> None:
    server, twilio, clock, deepgram, cartesia = pipecat_voice
    dana = await make_customer(
        server.services.pool, clock.now(), {"headphones": ("delivered", "Wireless headphones", 8900, 1)}
    )
    number = dana.orders["headphones"]
    script = ["I want a refund for my headphones please.", "Yes please.", "Thanks, goodbye."]
    deepgram.script.extend(script)
    report = await run_call(
        server.base_url,
        [
            Utterance(text="I would like my money back for the headphones"),
            # caller ID only claims the account: the caller keys the code texted to the phone on file
            Utterance(dtmf_from=lambda: texted_code(twilio, dana.phone)),
            Utterance(text="yes do it"),
            Utterance(text="that is all bye"),
        ],
        caller=dana.phone,
        auth_token=AUTH_TOKEN,
        account_sid=ACCOUNT_SID,
        max_call_seconds=120,
    )
    print(report.format())
    messages = await _messages(server, report.call_sid)
    for m in messages:
        print(m["seq"], m["sender"], m["kind"], m["body"])
    assert not report.violations, report.violations
    assert report.greeting.first_bot_audio_ms is not None

    customer = [m["body"] for m in messages if m["sender"] == "customer" and m["kind"] != "dtmf"]
    assert customer == script  # every spoken turn came through pipecat's Deepgram service
    bot = [m["body"] for m in messages if m["sender"] == "bot"]
    assert bot[0] == "Thanks for calling. How can I help you today?"
    assert any("refunded" in body for body in bot)
    refunds = await server.services.pool.fetchval(
        "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1", number
    )
    assert refunds == 1
    tickets = await server.services.pool.fetch(
        "SELECT status, next_step FROM tickets WHERE customer_ref = $1", dana.ref
    )
    assert [t["status"] for t in tickets] == ["resolved"] and tickets[0]["next_step"]
    assert report.ended_by in ("app", "caller")

    # STT: pipecat's Deepgram client streamed the call's audio and flushed each utterance.
    conn = deepgram.connections[-1]
    assert conn.headers["Authorization"] == f"Token {DG_KEY}"
    assert conn.params["encoding"] == "linear16" and conn.params["sample_rate"] == "8000"
    assert conn.params["endpointing"] == "false"
    assert conn.controls.count("Finalize") >= 3
    assert conn.audio_bytes > 8000 * 2 * 3  # seconds of the caller's audio, silence included

    # TTS: the bot's replies were synthesized by pipecat's Cartesia service, sentence by sentence.
    spoken = " ".join(cartesia.transcripts)
    assert "Thanks for calling." in spoken and "refunded" in spoken
    assert all(c.headers["X-API-Key"] == CARTESIA_KEY for c in cartesia.connections)
    metrics = (await server.http.get("/metrics")).text
    assert "closeloop_stt_fallbacks_total{" not in metrics
