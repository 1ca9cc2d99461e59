"""Phone calls end to end: the real server, real WebSockets, real models (Silero, smart-turn, Whisper,
Piper), caller audio rendered by espeak-ng and played by the `closeloop call` simulator in real time."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from pipeline.clock import FakeClock
from telephony.simulator import Utterance, parse_stream_twiml, run_call
from telephony.twilio_protocol import twilio_connected, twilio_media, twilio_start, twilio_stop
from tests.fakes.twilio_server import FakeTwilio
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    live_server,
    make_customer,
    sign,
    texted_code,
    twilio_settings,
)


@pytest.fixture(scope="module")
async def voice(database_url: str) -> AsyncIterator[tuple[LiveServer, FakeTwilio, FakeClock]]:
    clock = FakeClock()
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio),
        ) as server,
    ):
        await server.services.speech.start()
        yield server, twilio, clock


async def transcript(server: LiveServer, call_sid: str) -> dict[str, Any]:
    conv_id = await server.services.pool.fetchval(
        "SELECT id FROM conversations WHERE channel = 'voice' AND address = $1", call_sid
    )
    assert conv_id is not None
    return (await server.http.get(f"/api/conversations/{conv_id}")).json()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - polls a DB condition
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def test_refund_story_by_voice_issues_once_texts_the_label_and_stores_both_sides(voice: Any) -> None:
    server, twilio, clock = voice
    dana = await make_customer(
        server.services.pool, clock.now(), {"headphones": ("delivered", "Wireless headphones", 8900, 1)}
    )
    number = dana.orders["headphones"]
    report = await run_call(
        server.base_url,
        [
            Utterance(text="I want a refund for my headphones please"),
            # caller ID only claims the account: the caller keys the code texted to the phone on file
            Utterance(dtmf_from=lambda: texted_code(twilio, dana.phone)),
            Utterance(text="yes please"),
            Utterance(text="thanks, goodbye"),
        ],
        caller=dana.phone,
        auth_token=AUTH_TOKEN,
        account_sid=ACCOUNT_SID,
        max_call_seconds=120,
    )
    print(report.format())
    assert not report.violations, report.violations
    assert report.greeting.first_bot_audio_ms is not None
    assert len(report.latencies_ms) >= 2

    refunds = await server.services.pool.fetchval(
        "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1", number
    )
    assert refunds == 1
    label_sms = [m for m in twilio.messages if number in m.form.get("Body", "")]
    assert len(label_sms) == 1 and label_sms[0].form["To"] == dana.phone
    # the loop closes: one resolved ticket with a next step and one follow-up due
    tickets = await server.services.pool.fetch(
        "SELECT status, next_step FROM tickets WHERE customer_ref = $1", dana.ref
    )
    assert [t["status"] for t in tickets] == ["resolved"] and tickets[0]["next_step"]
    followups = await server.services.pool.fetchval(
        "SELECT count(*) FROM followups WHERE customer_ref = $1", dana.ref
    )
    assert followups == 1

    conv = await transcript(server, report.call_sid)
    customer_turns = [m for m in conv["messages"] if m["sender"] == "customer"]
    bot_turns = [m for m in conv["messages"] if m["sender"] == "bot"]
    assert "refund" in customer_turns[0]["body"].lower()
    # A caller ID is a claim: no name or order is read out before the code.
    assert bot_turns[0]["body"] == "Thanks for calling. How can I help you today?"
    assert bot_turns[1]["body"].startswith("Before I can do that, I need to make sure it's you.")
    assert any(m["body"].startswith("Thanks Dana, you're verified.") for m in bot_turns)
    assert any("refunded" in m["body"] for m in bot_turns)
    said = [m["kind"] for m in customer_turns]
    # "thanks, goodbye" is one turn, or two when the caller's comma pause ends the first: either is right
    assert said[:3] == ["speech", "dtmf", "speech"] and said[3:] in (["speech"], ["speech", "speech"]), said
    kinds = [a["kind"] for a in conv["actions"]]
    assert "identity_claimed" in kinds and "identity_verified" in kinds
    turns = [a for a in conv["actions"] if a["kind"] == "voice_turn"]
    assert turns and all(t["data"]["voice_to_voice_ms"] is not None for t in turns)
    metrics = (await server.http.get("/metrics")).text
    assert "closeloop_voice_voice_to_voice_seconds_count" in metrics
    # The bot's goodbye is followed by a hang-up through Twilio REST, after it was heard.
    await wait_for(lambda: _hung_up(twilio, report.call_sid))
    assert report.ended_by in ("app", "caller")


async def _hung_up(twilio: FakeTwilio, call_sid: str) -> bool:
    return any(call_sid in u.path and u.form.get("Status") == "completed" for u in twilio.call_updates)


async def test_caller_barging_in_stops_the_reply_and_the_stored_turn_holds_only_what_was_heard(
    voice: Any,
) -> None:
    server, _, clock = voice
    sam = await make_customer(
        server.services.pool,
        clock.now(),
        {"shoes": ("shipped", "Running shoes", 12000, 1)},
        name="Sam Okafor",
    )
    report = await run_call(
        server.base_url,
        [
            Utterance(text="what is my account balance", barge_in_after_ms=1200),
            Utterance(text="thanks, goodbye"),
        ],
        caller=sam.phone,
        auth_token=AUTH_TOKEN,
        account_sid=ACCOUNT_SID,
    )
    print(report.format())
    assert not report.violations, report.violations
    assert report.clears_received >= 1
    assert report.turns[0].latency_ms is not None  # the conversation went on after the barge-in

    conv = await transcript(server, report.call_sid)
    for m in conv["messages"]:
        print(m["seq"], m["sender"], m["kind"], m["interrupted"], m["body"])
    for a in conv["actions"]:
        print(a["kind"], a["data"])
    greeting = conv["messages"][0]
    assert greeting["sender"] == "bot" and greeting["interrupted"] is True
    planned = greeting["meta"]["planned"]
    assert planned == "Thanks for calling. How can I help you today?"  # caller ID: a claim, no names
    assert len(greeting["body"]) < len(planned)
    assert planned.startswith(greeting["body"])
    # the balance needs the code texted to the phone on file first
    assert any(m["body"].startswith("Before I can do that") for m in conv["messages"] if m["sender"] == "bot")
    assert any(a["kind"] == "bot_interrupted" for a in conv["actions"])


async def test_order_number_typed_on_the_keypad_drives_the_order_status_answer(voice: Any) -> None:
    server, twilio, clock = voice
    priya = await make_customer(
        server.services.pool,
        clock.now(),
        {
            "watch": ("placed", "Smart watch", 19900, 0.5),
            "speaker": ("shipped", "Bluetooth speaker", 5900, 2),
        },
        name="Priya Nair",
    )
    report = await run_call(
        server.base_url,
        [
            Utterance(dtmf=priya.orders["speaker"] + "#"),
            Utterance(dtmf_from=lambda: _keyed(texted_code(twilio, priya.phone))),
            Utterance(text="thanks goodbye"),
        ],
        caller=priya.phone,
        auth_token=AUTH_TOKEN,
        account_sid=ACCOUNT_SID,
    )
    print(report.format())
    conv = await transcript(server, report.call_sid)
    keyed = [m for m in conv["messages"] if m["kind"] == "dtmf"]
    assert [m["body"] for m in keyed][0] == priya.orders["speaker"] and len(keyed) == 2
    ask = conv["messages"][conv["messages"].index(keyed[0]) + 1]
    assert ask["body"].startswith("Before I can do that")  # caller ID alone reads out no order
    after = conv["messages"][conv["messages"].index(keyed[1]) + 1 :]
    answer = " ".join(
        m["body"] for m in after[: next(i for i, m in enumerate(after) if m["sender"] != "bot")]
    )
    assert answer.startswith("Thanks Priya, you're verified.")
    assert f"Order {priya.orders['speaker']} (Bluetooth speaker) shipped" in answer


async def _keyed(code: Any) -> str:
    return await code + "#"


async def test_unsigned_media_upgrade_and_unsigned_voice_webhook_are_refused(voice: Any) -> None:
    server, _, _ = voice
    ws_url = server.base_url.replace("http://", "ws://") + "/twilio/media"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url):
            pass
    assert refused.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(
            ws_url, additional_headers={"X-Twilio-Signature": sign(ws_url + "x", {})}
        ):
            pass
    form = {
        "CallSid": "CA" + "9" * 32,
        "From": "+15550000001",
        "To": "+15550009999",
        "AccountSid": ACCOUNT_SID,
    }
    response = await server.http.post("/twilio/voice", data=form)
    assert response.status_code == 403
    assert (
        await server.services.pool.fetchval("SELECT count(*) FROM calls WHERE call_sid = $1", form["CallSid"])
        == 0
    )


async def test_call_status_callbacks_are_recorded_once(voice: Any) -> None:
    server, _, _ = voice
    form = {
        "CallSid": "CA" + "8" * 32,
        "CallStatus": "completed",
        "From": "+15550000002",
        "To": "+15550009999",
        "CallDuration": "42",
    }
    url = server.base_url + "/twilio/status"
    for _ in range(3):
        response = await server.http.post(
            "/twilio/status", data=form, headers={"X-Twilio-Signature": sign(url, form)}
        )
        assert response.status_code == 204
    rows = await server.services.pool.fetch(
        "SELECT status, duration_s FROM call_status_events WHERE call_sid = $1", form["CallSid"]
    )
    assert [(r["status"], r["duration_s"]) for r in rows] == [("completed", 42)]


# ---- robustness: one bad stream never disturbs another call -------------------------------------

STREAM = "MZ" + "b" * 32
CALL = "CA" + "b" * 32


def _media(payload: bytes, stream: str = STREAM) -> str:
    return twilio_media(stream, 3, 1, 20, payload)


MALFORMED: dict[str, list[str | bytes]] = {
    "invalid_json": ["{not json"],
    "missing_event": [json.dumps({"streamSid": STREAM})],
    "unknown_event": [json.dumps({"event": "dance", "streamSid": STREAM})],
    "bad_base64": [
        json.dumps({"event": "media", "streamSid": STREAM, "media": {"payload": "!!!not base64!!!"}})
    ],
    "empty_payload": [json.dumps({"event": "media", "streamSid": STREAM, "media": {"payload": ""}})],
    "odd_payload": [_media(b"\xff" * 161)],  # odd sizes are legal mu-law: accepted
    "wrong_stream_sid": [_media(b"\xff" * 160, stream="MZ" + "c" * 32)],
}
FATAL: dict[str, str | bytes] = {
    "binary_frame": b"\x00\x01\x02",
    "frame_too_large": json.dumps(
        {
            "event": "media",
            "streamSid": STREAM,
            "media": {"payload": base64.b64encode(b"\xff" * 60000).decode()},
        }
    ),
}


async def _open_stream(server: LiveServer, *, start: bool = True) -> Any:
    """A media stream of a new call, answered through the signed voice webhook (which hands out
    the stream's one-time token), like Twilio does it."""
    call_sid = "CA" + secrets.token_hex(16)
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": "+15550000003", "To": "+15550009999"}
    voice_url = server.base_url + "/twilio/voice"
    answer = await server.http.post(
        "/twilio/voice", data=form, headers={"X-Twilio-Signature": sign(voice_url, form)}
    )
    assert answer.status_code == 200, answer.text
    parameters = parse_stream_twiml(answer.text).parameters
    url = server.base_url.replace("http://", "ws://") + "/twilio/media"
    ws = await websockets.connect(
        url, additional_headers={"X-Twilio-Signature": sign(url, {})}, max_size=None
    )
    await ws.send(twilio_connected())
    if start:
        await ws.send(twilio_start(STREAM, call_sid, ACCOUNT_SID, parameters))
    return ws


async def _bad_streams(server: LiveServer) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    # media before start: dropped, stream stays usable
    ws = await _open_stream(server, start=False)
    await ws.send(_media(b"\xff" * 160))
    await asyncio.sleep(0.2)  # an absence to prove: the stream is not closed
    outcome["media_before_start"] = ws.state.name
    await ws.close()
    # non-fatal garbage on a started stream: each frame dropped, the stream stays open
    ws = await _open_stream(server)
    for frames in MALFORMED.values():
        for frame in frames:
            await ws.send(frame)
    await asyncio.sleep(0.5)  # an absence to prove: the stream is not closed
    outcome["non_fatal"] = ws.state.name
    await ws.send(twilio_stop(STREAM, 9, ACCOUNT_SID, CALL))
    await ws.close()
    # fatal ones close only their own stream
    for name, frame in FATAL.items():
        ws = await _open_stream(server)
        await ws.send(frame)
        try:
            await asyncio.wait_for(ws.wait_closed(), 5)
        except TimeoutError:
            pass
        outcome[name] = (ws.state.name, ws.close_code)
    return outcome


async def test_malformed_media_frames_close_only_their_stream_while_another_call_finishes(voice: Any) -> None:
    server, _, clock = voice
    c = await make_customer(server.services.pool, clock.now(), {"lamp": ("placed", "Desk lamp", 4200, 1)})
    good_call = asyncio.create_task(
        run_call(
            server.base_url,
            [Utterance(text="what are your opening hours"), Utterance(text="thanks goodbye")],
            caller=c.phone,
            auth_token=AUTH_TOKEN,
            account_sid=ACCOUNT_SID,
        )
    )
    # The bad streams arrive while the good call is under way (its call row exists).
    await wait_for(
        lambda: server.services.pool.fetchval("SELECT count(*) FROM calls WHERE caller = $1", c.phone)
    )
    outcome = await _bad_streams(server)
    report = await good_call
    print(report.format(), outcome)
    assert outcome["media_before_start"] == "OPEN"
    assert outcome["non_fatal"] == "OPEN"
    assert outcome["binary_frame"] == ("CLOSED", 1008)
    assert outcome["frame_too_large"][0] == "CLOSED" and outcome["frame_too_large"][1] in (1008, 1009)
    assert not report.violations and report.turns[0].latency_ms is not None
    conv = await transcript(server, report.call_sid)
    assert any("open" in m["body"].lower() for m in conv["messages"] if m["sender"] == "bot" and m["seq"] > 1)
    metrics = (await server.http.get("/metrics")).text
    assert 'closeloop_media_frames_rejected_total{fatal="true",reason="binary_frame"}' in metrics
    assert (await server.http.get("/healthz")).status_code == 200
