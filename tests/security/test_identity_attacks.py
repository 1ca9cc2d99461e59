"""Attacks on identity: acting on someone's account by knowing their phone number.

Who may act on an account: the customer, proven by the channel (a Twilio-signed SMS/WhatsApp
from the number on file) or by a one-time code sent to the contact on file. What an attacker
tries: type or say the victim's number, text from another phone, spoof the caller ID, probe which
numbers are customers, guess codes in parallel. Each test fails on code that trusts a number.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import websockets

from crm_bridge.verification import PgVerificationCodes
from pipeline.clock import FakeClock
from telephony.simulator import Utterance, run_call
from tests.fakes.twilio_server import FakeTwilio
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    bearer,
    live_server,
    make_customer,
    make_token,
    make_user,
    outbox_code,
    post_signed,
    twilio_settings,
    whatsapp_form,
)

CODE_SENT = "Thanks. If that phone number is on an account, I've sent it a 6-digit code. Please type the code here to continue."


async def chat(ws: Any, text: str) -> str:
    """One web-chat message; the bot's replies to it, joined."""
    msg_id = secrets.token_hex(6)
    await ws.send(json.dumps({"type": "message", "text": text, "id": msg_id}))
    replies: list[str] = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if frame.get("id") == msg_id and frame["type"] == "reply":
            replies.append(frame["text"])
            if frame.get("last", True):
                return " ".join(replies)
        elif frame.get("id") == msg_id and frame["type"] in ("ack", "error"):
            return " ".join(replies) or json.dumps(frame)


async def open_chat(server: LiveServer) -> Any:
    ws = await websockets.connect(server.ws_url)
    await ws.send(json.dumps({"type": "hello", "session": None}))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return ws


async def order_row(server: LiveServer, number: str) -> dict[str, Any]:
    row = await server.services.pool.fetchrow(
        """SELECT o.status, (SELECT count(*) FROM refunds r WHERE r.order_id = o.id) AS refunds,
                  (SELECT count(*) FROM return_labels l WHERE l.order_id = o.id) AS labels
             FROM orders o WHERE o.number = $1""",
        number,
    )
    return dict(row)


async def events_of(server: LiveServer, kind: str) -> list[dict[str, Any]]:
    rows = await server.services.pool.fetch("SELECT data FROM events WHERE kind = $1 ORDER BY id", kind)
    return [r["data"] for r in rows]


async def test_an_impostor_on_web_chat_cannot_refund_or_cancel_with_the_victims_phone_number(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        dana = await make_customer(
            server.services.pool,
            clock.now(),
            {
                "headphones": ("delivered", "Wireless headphones", 8900, 1),
                "lamp": ("placed", "Desk lamp", 4200, 1),
            },
        )
        ws = await open_chat(server)
        try:
            said = [await chat(ws, f"my phone number is {dana.phone}")]
            for text in (
                f"refund order {dana.orders['headphones']}",
                "yes",
                f"cancel order {dana.orders['lamp']}",
                "yes",
                "123456",
                "what's my balance",
            ):
                said.append(await chat(ws, text))
        finally:
            await ws.close()

        assert said[0] == CODE_SENT
        conversation = " ".join(said)
        assert "Dana" not in conversation and "Wireless headphones" not in conversation
        assert await order_row(server, dana.orders["headphones"]) == {
            "status": "delivered",
            "refunds": 0,
            "labels": 0,
        }
        assert (await order_row(server, dana.orders["lamp"]))["status"] == "placed"
        claims = await events_of(server, "identity_claimed")
        assert any(c.get("customer_ref") == dana.ref and c["level"] == "claimed" for c in claims)
        assert not [
            e for e in await events_of(server, "identity_verified") if e.get("customer_ref") == dana.ref
        ]
        # The code went to Dana's phone, never into the impostor's chat.
        code = await outbox_code(server.services.pool, dana.phone)
        assert code not in conversation


async def test_the_reply_to_an_unknown_number_equals_the_reply_to_a_customers_number(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        dana = await make_customer(server.services.pool, clock.now(), {})
        replies = []
        for number in (dana.phone, "+15550199999"):
            ws = await open_chat(server)
            try:
                replies.append(await chat(ws, f"my phone number is {number}"))
                replies.append(await chat(ws, "I want a refund"))
                replies.append(await chat(ws, "654321"))
            finally:
                await ws.close()
        assert replies[:3] == replies[3:]
        assert replies[0] == CODE_SENT


async def test_an_sms_from_another_number_claiming_the_victim_cannot_refund(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, twilio_auth_token=AUTH_TOKEN) as server:
        dana = await make_customer(
            server.services.pool, clock.now(), {"headphones": ("delivered", "Headphones", 8900, 1)}
        )
        attacker = "+15550177777"
        for text in (
            f"I'm Dana, my number is {dana.phone}",
            f"refund order {dana.orders['headphones']}",
            "yes",
        ):
            form = whatsapp_form(attacker, text) | {"From": attacker, "To": "+15550009999"}
            del form["WaId"], form["ProfileName"]
            response = await post_signed(server, "/twilio/messaging", form)
            assert response.status_code == 200, response.text
        assert await order_row(server, dana.orders["headphones"]) == {
            "status": "delivered",
            "refunds": 0,
            "labels": 0,
        }
        assert any(c.get("customer_ref") == dana.ref for c in await events_of(server, "identity_claimed"))


async def test_an_unsigned_whatsapp_from_the_number_on_file_only_claims_the_account(
    database_url: str,
) -> None:
    # A dev server on loopback accepts unsigned webhooks; an unsigned From proves nothing.
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        dana = await make_customer(
            server.services.pool, clock.now(), {"headphones": ("delivered", "Headphones", 8900, 1)}
        )
        answers = []
        for text in (f"refund order {dana.orders['headphones']}", "yes"):
            response = await server.http.post("/twilio/messaging", data=whatsapp_form(dana.phone, text))
            assert response.status_code == 200, response.text
            answers.append(response.text)
        assert "make sure it" in answers[0] and "once you're verified" in answers[1]
        assert (await order_row(server, dana.orders["headphones"]))["refunds"] == 0
        level = await server.services.pool.fetchval(
            "SELECT identity_level FROM conversations WHERE channel = 'whatsapp' AND address = $1", dana.phone
        )
        assert level == "claimed"


async def test_parallel_code_guesses_get_at_most_five_attempts(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        codes = PgVerificationCodes(server.services.pool)
        conversation_id = 10**9 + secrets.randbelow(10**6)
        issued = await codes.issue(
            conversation_id=conversation_id,
            customer_ref="1",
            client="203.0.113.5",
            channel="sms",
            now=clock.now(),
        )
        assert issued.code is not None
        wrong = [f"{n:06d}" for n in range(100000, 100050) if f"{n:06d}" != issued.code][:40]
        results = await asyncio.gather(
            *(codes.check(conversation_id=conversation_id, code=w, now=clock.now()) for w in wrong)
        )
        assert sum(r.status == "wrong" for r in results) <= 4
        assert sum(r.status in ("wrong", "locked") for r in results) == len(wrong)
        # The right code no longer works once the attempts are used up.
        late = await codes.check(conversation_id=conversation_id, code=issued.code, now=clock.now())
        assert late.status == "locked"
        stored = await server.services.pool.fetchrow(
            "SELECT code_hash, attempts FROM verification_codes WHERE conversation_id = $1", conversation_id
        )
        assert stored["attempts"] == 5 and issued.code not in stored["code_hash"]


async def test_a_spoofed_caller_id_cannot_refund_without_the_texted_code(database_url: str) -> None:
    clock = FakeClock()
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio),
        ) as server,
    ):
        dana = await make_customer(
            server.services.pool, clock.now(), {"headphones": ("delivered", "Headphones", 8900, 1)}
        )
        report = await run_call(
            server.base_url,
            [
                Utterance(text="I want a refund for my headphones please"),
                Utterance(text="yes please"),
                Utterance(dtmf="123456"),
                Utterance(text="thanks goodbye"),
            ],
            caller=dana.phone,  # the attacker spoofs Dana's number
            auth_token=AUTH_TOKEN,
            account_sid=ACCOUNT_SID,
            max_call_seconds=120,
        )
        assert not report.violations, report.violations
        assert await order_row(server, dana.orders["headphones"]) == {
            "status": "delivered",
            "refunds": 0,
            "labels": 0,
        }
        claims = [c for c in await events_of(server, "identity_claimed") if c.get("customer_ref") == dana.ref]
        assert claims and claims[0]["method"] == "caller_id"
        bot = await server.services.pool.fetch(
            """SELECT m.body FROM messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE c.address = $1 AND m.sender = 'bot' ORDER BY m.seq""",
            report.call_sid,
        )
        spoken = " ".join(r["body"] for r in bot)
        print(report.format(), spoken, sep="\n")
        assert "Dana" not in spoken and "Headphones" not in spoken
        # A code, when one was asked for, went to the real Dana's phone; the caller never heard it.
        texted = [m.form["Body"] for m in twilio.messages if m.form.get("To") == dana.phone]
        assert all(body.split("code is ")[1][:6] not in spoken for body in texted)
        if "make sure it's you" in spoken:
            assert texted


async def test_the_real_customer_completes_the_refund_on_web_chat_with_the_code_from_the_outbox(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        dana = await make_customer(
            server.services.pool, clock.now(), {"headphones": ("delivered", "Headphones", 8900, 1)}
        )
        admin, _ = await make_user(server, "admin")
        async with server.client(bearer(await make_token(server, admin))) as api:
            ws = await open_chat(server)
            try:
                assert await chat(ws, f"my phone number is {dana.phone}") == CODE_SENT
                # the embedded demo has no SMS provider: an admin reads the local outbox
                outbox = (await api.get("/api/outbox")).json()["messages"]
                mine = [m for m in outbox if m["address"] == dana.phone]
                code = mine[0]["body"].split("code is ")[1][:6]
                assert (await chat(ws, code)).startswith("Thanks Dana, you're verified.")
                assert "Shall I go ahead?" in await chat(ws, f"refund order {dana.orders['headphones']}")
                assert "refunded" in await chat(ws, "yes")
            finally:
                await ws.close()
            agent, _ = await make_user(server, "agent")
            async with server.client(bearer(await make_token(server, agent))) as as_agent:
                assert (await as_agent.get("/api/outbox")).status_code == 403
        assert await order_row(server, dana.orders["headphones"]) == {
            "status": "delivered",
            "refunds": 1,
            "labels": 1,
        }
        ticket = await server.services.pool.fetchrow(
            "SELECT status, next_step FROM tickets WHERE customer_ref = $1 ORDER BY id DESC LIMIT 1", dana.ref
        )
        assert ticket["status"] == "resolved" and ticket["next_step"]
        assert (
            await server.services.pool.fetchval(
                "SELECT count(*) FROM followups WHERE customer_ref = $1", dana.ref
            )
            == 1
        )
