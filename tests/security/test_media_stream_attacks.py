"""Attacks on ``WS /twilio/media`` and the voice limits.

The media WebSocket is where a call's identity used to come from: whoever opened it chose the
caller number in ``start.customParameters``. Now the signed voice webhook stores the caller and
hands out a one-time token bound to the CallSid; these tests open real WebSockets against the
real server (speech models replaced by plain fakes: audio is not what is under test).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import websockets

from pipeline.clock import FakeClock
from telephony.simulator import StreamTarget, parse_stream_twiml
from telephony.twilio_protocol import twilio_connected, twilio_start
from tests.support import ACCOUNT_SID, AUTH_TOKEN, LiveServer, live_server, make_customer, sign, unique_phone
from tests.unit.test_call_session import FakeSTT, FakeTTS, ScriptedDetector


class FakeSpeech:
    """Stands in for :class:`voice.speech_stack.SpeechStack`: no models, silence in, tones out."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def detector(self) -> ScriptedDetector:
        return ScriptedDetector()

    def transcriber(self) -> FakeSTT:
        return FakeSTT()

    def synthesizer(self) -> FakeTTS:
        return FakeTTS()


@pytest.fixture(scope="module")
async def phone(database_url: str) -> AsyncIterator[tuple[LiveServer, FakeClock]]:
    clock = FakeClock()
    async with live_server(
        database_url,
        clock=clock,
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token=AUTH_TOKEN,
        media_start_timeout_s=0.5,
    ) as server:
        server.services.speech = FakeSpeech()
        yield server, clock


async def answer(server: LiveServer, caller: str, **extra: str) -> tuple[str, StreamTarget]:
    """POST the signed voice webhook like Twilio; the CallSid and the stream TwiML's target."""
    call_sid = "CA" + secrets.token_hex(16)
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": caller, "To": "+15550009999", **extra}
    url = server.base_url + "/twilio/voice"
    response = await server.http.post(
        "/twilio/voice", data=form, headers={"X-Twilio-Signature": sign(url, form)}
    )
    assert response.status_code == 200, response.text
    return call_sid, parse_stream_twiml(response.text)


async def open_stream(server: LiveServer, call_sid: str, parameters: dict[str, str]) -> Any:
    """A signed media WebSocket that sends ``connected`` and ``start`` with ``parameters``."""
    url = server.base_url.replace("http://", "ws://") + "/twilio/media"
    ws = await websockets.connect(url, additional_headers={"X-Twilio-Signature": sign(url, {})})
    await ws.send(twilio_connected())
    await ws.send(twilio_start("MZ" + secrets.token_hex(16), call_sid, ACCOUNT_SID, parameters))
    return ws


async def first_event(ws: Any, timeout: float = 10.0) -> str:  # noqa: ASYNC109 - bounds a wait on the socket
    """The first event the server sends (``media`` when the greeting plays), or ``closed:<reason>``."""
    try:
        async with asyncio.timeout(timeout):
            return str(json.loads(await ws.recv())["event"])
    except websockets.ConnectionClosed as closed:
        return f"closed:{closed.rcvd.reason if closed.rcvd else ''}"


async def closed(ws: Any, timeout: float = 10.0) -> tuple[int | None, str | None]:  # noqa: ASYNC109
    """Wait for the server to close ``ws``; its close code and reason."""
    async with asyncio.timeout(timeout):
        await ws.wait_closed()
    return ws.close_code, ws.close_reason


def live_session(server: LiveServer, call_sid: str) -> Any:
    sessions = [s for s in server.services.active_calls if s.call_sid == call_sid]
    assert len(sessions) == 1
    return sessions[0]


async def conversation_count(server: LiveServer, call_sid: str) -> int:
    return int(
        await server.services.pool.fetchval(
            "SELECT count(*) FROM conversations WHERE channel = 'voice' AND address = $1", call_sid
        )
    )


async def test_a_replayed_media_handshake_is_refused(phone: Any) -> None:
    server, _ = phone
    call_sid, target = await answer(server, unique_phone())
    first = await open_stream(server, call_sid, target.parameters)
    assert await first_event(first) == "media"  # the greeting plays on the real stream
    replay = await open_stream(server, call_sid, target.parameters)
    assert await closed(replay) == (1008, "token_used")
    assert len([s for s in server.services.active_calls if s.call_sid == call_sid]) == 1
    await first.close()


async def test_a_forged_caller_parameter_is_ignored_for_the_caller_of_the_call_row(phone: Any) -> None:
    server, clock = phone
    pool = server.services.pool
    real = await make_customer(pool, clock.now(), {}, name="Real Caller")
    victim = await make_customer(pool, clock.now(), {}, name="Victim Account")
    call_sid, target = await answer(server, real.phone, StirVerstat="TN-Validation-Passed-A")
    forged = {**target.parameters, "caller": victim.phone, "From": victim.phone}
    ws = await open_stream(server, call_sid, forged)
    assert await first_event(ws) == "media"
    session = live_session(server, call_sid)
    assert session.caller == real.phone
    assert session.caller_attested is True
    # Whatever the core records about who called (identity events, the conversation's customer),
    # it names the number on the call row, never the forged one.
    refs = await pool.fetch(
        """SELECT e.data->>'customer_ref' AS ref FROM events e JOIN conversations c ON c.id = e.conversation_id
            WHERE c.channel = 'voice' AND c.address = $1 AND e.data ? 'customer_ref'
           UNION ALL SELECT customer_ref FROM conversations WHERE channel = 'voice' AND address = $1""",
        call_sid,
    )
    named = {r["ref"] for r in refs} - {None}
    assert named == {real.ref}
    assert await pool.fetchval("SELECT caller FROM calls WHERE call_sid = $1", call_sid) == real.phone
    await ws.close()


async def test_the_caller_is_not_attested_without_full_shaken_stir_attestation(phone: Any) -> None:
    server, _ = phone
    call_sid, target = await answer(server, unique_phone(), StirVerstat="TN-Validation-Passed-C")
    ws = await open_stream(server, call_sid, target.parameters)
    assert await first_event(ws) == "media"
    assert live_session(server, call_sid).caller_attested is False
    await ws.close()


@pytest.mark.parametrize("attack", ["no_token", "forged_token", "token_of_another_call", "expired_token"])
async def test_a_stream_without_a_valid_token_is_refused_and_starts_nothing(phone: Any, attack: str) -> None:
    server, clock = phone
    call_sid, target = await answer(server, unique_phone())
    parameters = dict(target.parameters)
    expected = {
        "no_token": "token_missing",
        "forged_token": "token_forged",
        "token_of_another_call": "token_forged",
        "expired_token": "token_expired",
    }[attack]
    if attack == "no_token":
        del parameters["token"]
    elif attack == "forged_token":
        expiry, _, mac = parameters["token"].partition(".")
        parameters["token"] = f"{int(expiry) + 3600}.{mac}"
    elif attack == "token_of_another_call":
        _, other = await answer(server, unique_phone())
        parameters["token"] = other.parameters["token"]
    else:
        clock.advance(timedelta(minutes=2))
    ws = await open_stream(server, call_sid, parameters)
    assert await closed(ws) == (1008, expected)
    assert await conversation_count(server, call_sid) == 0
    assert not [s for s in server.services.active_calls if s.call_sid == call_sid]
    row = await server.services.pool.fetchrow(
        "SELECT token_used_at, stream_sid, end_reason FROM calls WHERE call_sid = $1", call_sid
    )
    assert row is not None and row["token_used_at"] is None and row["stream_sid"] is None
    assert row["end_reason"] is None


async def test_a_websocket_that_never_sends_start_is_closed_after_the_deadline(phone: Any) -> None:
    server, _ = phone
    url = server.base_url.replace("http://", "ws://") + "/twilio/media"
    async with websockets.connect(url, additional_headers={"X-Twilio-Signature": sign(url, {})}) as ws:
        await ws.send(twilio_connected())
        assert await closed(ws, timeout=10) == (1008, "start_timeout")
    metrics = (await server.http.get("/metrics")).text
    assert 'closeloop_media_frames_rejected_total{fatal="true",reason="start_timeout"}' in metrics


async def test_a_call_over_the_limit_hears_lines_busy_and_gets_a_callback_ticket(database_url: str) -> None:
    async with live_server(
        database_url, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN, max_calls=1
    ) as server:
        server.services.speech = FakeSpeech()
        await answer(server, unique_phone())  # takes the only line (its stream is about to start)
        caller = unique_phone()
        call_sid = "CA" + secrets.token_hex(16)
        form = {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": caller, "To": "+15550009999"}
        url = server.base_url + "/twilio/voice"
        for _ in range(2):  # Twilio may retry the webhook: one ticket, one call back
            response = await server.http.post(
                "/twilio/voice", data=form, headers={"X-Twilio-Signature": sign(url, form)}
            )
            assert response.status_code == 200
            assert "<Say>" in response.text and "lines are busy" in response.text
            assert "<Hangup" in response.text and "<Stream" not in response.text
        pool = server.services.pool
        callbacks = await pool.fetch(
            """SELECT cb.queue, cb.status, t.queue AS ticket_queue, t.status AS ticket_status
                 FROM callbacks cb JOIN tickets t ON t.id = cb.ticket_id WHERE cb.phone = $1""",
            caller,
        )
        assert [dict(r) for r in callbacks] == [
            {"queue": "support", "status": "scheduled", "ticket_queue": "support", "ticket_status": "open"}
        ]
        due = (await server.http.get("/api/desk/callbacks")).json()["callbacks"]
        assert [c["queue"] for c in due if c["phone"] == caller] == ["support"]
        # The test database is shared: leave the support queue's callbacks as other tests expect.
        await pool.execute("UPDATE callbacks SET status = 'cancelled' WHERE phone = $1", caller)


def dtmf_frame(stream_sid: str, seq: int, digit: str) -> str:
    return json.dumps(
        {
            "event": "dtmf",
            "streamSid": stream_sid,
            "sequenceNumber": str(seq),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
    )


async def test_a_dtmf_flood_over_the_media_stream_stays_bounded(phone: Any) -> None:
    server, _ = phone
    call_sid, target = await answer(server, unique_phone())
    url = server.base_url.replace("http://", "ws://") + "/twilio/media"
    stream_sid = "MZ" + secrets.token_hex(16)
    async with websockets.connect(url, additional_headers={"X-Twilio-Signature": sign(url, {})}) as ws:
        await ws.send(twilio_connected())
        await ws.send(twilio_start(stream_sid, call_sid, ACCOUNT_SID, target.parameters))
        assert await first_event(ws) == "media"
        session = live_session(server, call_sid)
        flood = 5000
        for seq in range(flood):
            await ws.send(dtmf_frame(stream_sid, seq + 2, "5"))
        deadline = asyncio.get_running_loop().time() + 10
        while session.pending_digits + session.stats.dropped_events < flood:
            assert asyncio.get_running_loop().time() < deadline, "the flood was not read in time"
            await asyncio.sleep(0.05)
        assert session.pending_digits == session.config.max_dtmf_digits
        assert session.stats.dropped_events == flood - session.config.max_dtmf_digits
        assert session.pending_turns <= session.config.max_pending_turns


async def test_a_flood_of_keypad_turns_queues_at_most_the_bound_while_the_core_is_busy() -> None:
    from tests.unit.test_call_session import FakeConversation, FakeLine, config, to_16k  # noqa: PLC0415
    from voice.call_session import CallSession  # noqa: PLC0415

    conv = FakeConversation()
    gate = conv.hold("0 (keypad: talk to a person)")  # the core is stuck on the first turn
    line = FakeLine(echo=True)
    session = CallSession(
        call_sid="CA" + secrets.token_hex(16),
        caller="+15550001111",
        conversation=conv,
        line=line,
        detector=ScriptedDetector(),
        stt=FakeSTT(),
        tts=FakeTTS(),
        resample_8k_to_16k=to_16k,
        config=config(max_pending_turns=4),
    )
    line.session = session
    await session.start()
    try:
        for _ in range(10_000):  # "0" with no digits typed queues a turn at once; "#" submits
            session.on_dtmf("0")
            session.on_dtmf("#")
        assert session.pending_turns <= 4
        assert session.stats.dropped_events >= 10_000 - 5
    finally:
        gate.set()
        await session.close("test")


async def test_forged_mark_echoes_cannot_make_an_unheard_reply_count_as_heard_or_over() -> None:
    # Who sends marks: Twilio echoes the app's own. Whoever holds the stream (its token) could
    # echo marks the app never sent: a reply-end mark, or a mark saying the whole reply was
    # heard while its audio is still playing. The transcript must keep only what was played.
    from tests.unit.test_call_session import FakeConversation, FakeLine, to_16k  # noqa: PLC0415
    from tests.unit.test_call_session import config as call_config  # noqa: PLC0415
    from voice.call_ports import CallState  # noqa: PLC0415
    from voice.call_session import CallSession  # noqa: PLC0415

    line = FakeLine(echo=False)  # nothing plays: marks come back only when forged
    session = CallSession(
        call_sid="CA" + secrets.token_hex(16),
        caller="+15550001111",
        conversation=FakeConversation(),
        line=line,
        detector=ScriptedDetector(),
        stt=FakeSTT(),
        tts=FakeTTS(),
        resample_8k_to_16k=to_16k,
        config=call_config(),
    )
    line.session = session
    await session.start()
    try:
        for _ in range(50):
            if line.marks():
                break
            await asyncio.sleep(0.01)  # the greeting's first chunks are sent (a poll, bounded)
        for forged in ("0:end:1", "0:end:999", "7:end:x", "0:end", "end:0:1", "0:1:9999", "x:y:z", ""):
            session.on_mark(forged)
        assert session.state == CallState.SPEAKING  # still speaking: nothing forged ended the reply
        assert line.reply_ends() == []  # and no reply-end mark went out for it
        assert all(speech.heard_chars <= len(speech.text) for speech in session._speaking)
    finally:
        await session.close("test")
