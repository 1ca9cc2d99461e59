"""Text channels through the real server: signatures, idempotency, web chat, one history across channels."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import pytest
import websockets

from pipeline.clock import FakeClock
from pipeline.ports import StoreUnavailable
from tests.support import (
    AUTH_TOKEN,
    LiveServer,
    live_server,
    make_customer,
    outbox_code,
    post_signed,
    sign,
    whatsapp_form,
)


async def chat(ws: Any, text: str, msg_id: str | None = None) -> list[dict[str, Any]]:
    """Send one web-chat message and collect frames up to the reply carrying its id."""
    msg_id = msg_id or secrets.token_hex(6)
    await ws.send(json.dumps({"type": "message", "text": text, "id": msg_id}))
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        frames.append(frame)
        if frame.get("id") == msg_id and frame["type"] in ("reply", "ack", "error"):
            # several replies may share the id: drain what is already there
            try:
                while True:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 0.3)))
            except TimeoutError:
                return frames


async def hello(ws: Any, session: str | None = None) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "session": session}))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return welcome


async def count_rows(server: LiveServer, sql: str, *args: Any) -> int:
    return int(await server.services.pool.fetchval(sql, *args))


async def test_same_signed_webhook_posted_five_times_concurrently_gives_one_turn_and_one_reply(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, twilio_auth_token=AUTH_TOKEN) as server:
        c = await make_customer(server.services.pool, clock.now(), {"lamp": ("placed", "Desk lamp", 4200, 1)})
        form = whatsapp_form(c.phone, "where is my order?")
        responses = await asyncio.gather(*(post_signed(server, "/twilio/messaging", form) for _ in range(5)))
        assert [r.status_code for r in responses] == [200] * 5
        with_reply = [r for r in responses if "<Message>" in r.text]
        assert len(with_reply) == 1
        assert c.orders["lamp"] in with_reply[0].text
        external = f"twilio:{form['MessageSid']}"
        assert await count_rows(server, "SELECT count(*) FROM messages WHERE external_id = $1", external) == 1
        conv_id = await server.services.pool.fetchval(
            "SELECT conversation_id FROM messages WHERE external_id = $1", external
        )
        assert (
            await count_rows(
                server,
                "SELECT count(*) FROM messages WHERE conversation_id = $1 AND direction = 'out'",
                conv_id,
            )
            == 1
        )

        # A later retry of the same MessageSid is still a no-op.
        again = await post_signed(server, "/twilio/messaging", form)
        assert again.status_code == 200 and "<Message>" not in again.text
        assert (
            await count_rows(server, "SELECT count(*) FROM messages WHERE conversation_id = $1", conv_id) == 2
        )


async def test_unsigned_or_mis_signed_webhook_is_refused_with_403_and_nothing_is_stored(
    database_url: str,
) -> None:
    async with live_server(database_url, twilio_auth_token=AUTH_TOKEN) as server:
        phone = "+15550177777"
        before = await count_rows(server, "SELECT count(*) FROM messages")
        form = whatsapp_form(phone, "I want a refund")
        unsigned = await server.http.post("/twilio/messaging", data=form)
        wrong_token = await server.http.post(
            "/twilio/messaging",
            data=form,
            headers={"X-Twilio-Signature": sign(server.base_url + "/twilio/messaging", form, "other-token")},
        )
        tampered = dict(form, Body="refund 5000 dollars")
        mis_signed = await server.http.post(
            "/twilio/messaging",
            data=tampered,
            headers={"X-Twilio-Signature": sign(server.base_url + "/twilio/messaging", form)},
        )
        wrong_url = await server.http.post(
            "/twilio/messaging",
            data=form,
            headers={"X-Twilio-Signature": sign("https://evil.example/twilio/messaging", form)},
        )
        for response in (unsigned, wrong_token, mis_signed, wrong_url):
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "bad_signature"
        assert await count_rows(server, "SELECT count(*) FROM messages") == before
        assert await count_rows(server, "SELECT count(*) FROM conversations WHERE address = $1", phone) == 0
        metrics = (await server.http.get("/metrics")).text
        assert 'closeloop_webhooks_rejected_total{reason="bad_signature"} 4.0' in metrics

        # The correctly signed one is accepted.
        ok = await post_signed(server, "/twilio/messaging", form)
        assert ok.status_code == 200 and "<Message>" in ok.text


async def test_malformed_webhook_gets_a_clear_json_error(database_url: str) -> None:
    async with live_server(database_url) as server:
        response = await server.http.post("/twilio/messaging", data={"Body": "hi"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_inbound"


async def test_customer_moving_from_whatsapp_to_web_chat_keeps_one_history(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, twilio_auth_token=AUTH_TOKEN) as server:
        c = await make_customer(
            server.services.pool, clock.now(), {"shoes": ("shipped", "Running shoes", 12000, 2)}
        )
        replies = (
            await post_signed(server, "/twilio/messaging", whatsapp_form(c.phone, "where is my order"))
        ).text
        assert c.orders["shoes"] in replies

        async with websockets.connect(server.ws_url) as ws:
            welcome = await hello(ws)
            frames = await chat(ws, "what's my account balance?")
            assert "phone number or email" in frames[-1]["text"]
            frames = await chat(ws, f"it's {c.phone}")
            texts = " ".join(f["text"] for f in frames if f["type"] == "reply")
            assert "I've sent it a 6-digit code" in texts and "Dana" not in texts
            frames = await chat(ws, await outbox_code(server.services.pool, c.phone))
            texts = " ".join(f["text"] for f in frames if f["type"] == "reply")
            assert "Thanks Dana, you're verified." in texts
            assert "balance is $0.00" in texts

        customer = (await server.http.get(f"/api/customers/{c.ref}")).json()
        channels = [conv["channel"] for conv in customer["conversations"]]
        assert channels == ["whatsapp", "webchat"]
        assert customer["conversations"][1]["id"] == welcome["conversation_id"]
        assert customer["conversations"][0]["messages"][0]["body"] == "where is my order"
        assert customer["orders"][0]["number"] == c.orders["shoes"]

        # Reconnecting with the session id returns the same conversation and its transcript.
        async with websockets.connect(server.ws_url) as ws:
            again = await hello(ws, welcome["session"])
            assert again["conversation_id"] == welcome["conversation_id"]
            assert [h["from"] for h in again["history"]][:2] == ["customer", "bot"]


async def test_web_chat_rejects_bad_frames_without_closing_and_resends_are_idempotent(
    database_url: str,
) -> None:
    async with live_server(database_url) as server, websockets.connect(server.ws_url) as ws:
        await hello(ws)
        await ws.send("not json")
        assert json.loads(await ws.recv())["code"] == "invalid_json"
        await ws.send(json.dumps({"type": "dance"}))
        assert json.loads(await ws.recv())["code"] == "unknown_type"
        await ws.send(json.dumps({"type": "message", "text": "   "}))
        assert json.loads(await ws.recv())["code"] == "empty_message"
        await ws.send(json.dumps({"type": "message", "text": "x" * 2001}))
        assert json.loads(await ws.recv())["code"] == "message_too_long"
        first = await chat(ws, "what are your opening hours?", "m-1")
        assert first[-1]["type"] == "reply"
        resend = await chat(ws, "what are your opening hours?", "m-1")
        assert resend == [{"type": "ack", "id": "m-1", "duplicate": True}]


async def test_web_chat_without_hello_is_closed_with_policy_violation(database_url: str) -> None:
    async with live_server(database_url) as server, websockets.connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "message", "text": "hi"}))
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1008
        else:
            raise AssertionError("socket should have been closed")


async def test_a_chat_message_during_a_database_outage_is_resent_after_reconnecting_and_stored_once(
    database_url: str,
) -> None:
    async with live_server(database_url) as server:
        service = server.services.service
        real = service.handle_text
        away = {"left": 1}

        async def outage(*args: Any, **kwargs: Any) -> Any:
            if away["left"] > 0:
                away["left"] -= 1
                raise StoreUnavailable("the database is unreachable")  # nothing was written
            return await real(*args, **kwargs)

        service.handle_text = outage  # type: ignore[method-assign]
        async with websockets.connect(server.ws_url) as ws:
            welcome = await hello(ws)
            await ws.send(
                json.dumps({"type": "message", "text": "what are your opening hours", "id": "m-outage"})
            )
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013  # try again later
        # the page reconnects and resends what was not acknowledged, with the same id
        async with websockets.connect(server.ws_url) as ws:
            await hello(ws, welcome["session"])
            frames = await chat(ws, "what are your opening hours", "m-outage")
            assert any(f["type"] == "reply" for f in frames)
            frames = await chat(ws, "what are your opening hours", "m-outage")  # a second resend
            assert frames[-1].get("duplicate") is True
        stored = await count_rows(
            server,
            "SELECT count(*) FROM messages WHERE conversation_id = $1 AND sender = 'customer'",
            welcome["conversation_id"],
        )
        assert stored == 1

        # Each socket was a chat session held by this node, closed with its reason.
        async def sessions() -> list[tuple[str, str | None]]:
            rows = await server.services.pool.fetch(
                "SELECT node_id, close_reason FROM chat_sessions WHERE conversation_id = $1 ORDER BY id",
                welcome["conversation_id"],
            )
            return [(r["node_id"], r["close_reason"]) for r in rows]

        node = server.services.nodes.id
        expected = [(node, "database_unreachable"), (node, "disconnected")]
        for _ in range(100):  # the server closes the second one as it sees the client leave
            if await sessions() == expected:
                break
            await asyncio.sleep(0.05)
        assert await sessions() == expected


async def test_a_webhook_during_a_database_outage_gets_503_with_retry_after_and_its_retry_is_stored_once(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, twilio_auth_token=AUTH_TOKEN) as server:
        c = await make_customer(server.services.pool, clock.now(), {"lamp": ("placed", "Desk lamp", 4200, 1)})
        service = server.services.service
        real = service.handle_text

        async def outage(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("the database is unreachable")

        service.handle_text = outage  # type: ignore[method-assign]
        form = whatsapp_form(c.phone, "where is my order?")
        refused = await post_signed(server, "/twilio/messaging", form)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert refused.json()["error"]["code"] == "database_unavailable"
        service.handle_text = real  # type: ignore[method-assign]
        retried = await post_signed(server, "/twilio/messaging", form)  # Twilio's retry, same MessageSid
        assert retried.status_code == 200 and c.orders["lamp"] in retried.text
        again = await post_signed(server, "/twilio/messaging", form)
        assert again.status_code == 200 and "<Message>" not in again.text  # stored once
