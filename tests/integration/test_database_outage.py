"""A 30-second outage of an external PostgreSQL, mid-call and mid-chat, through a TCP fault proxy
(tests/fakes/tcp_fault_proxy.py: open connections reset, new ones refused, then the same database
back). The real server with real models and real sockets:

* the caller keeps talking: the turn that needs the database hears "one moment", is committed when
  the database returns and answered; the call goes on to its goodbye;
* the web-chat page is told to reconnect (close 1013), reconnects when it can and resends what was
  not acknowledged, with the same id;
* a Twilio webhook gets 503 + Retry-After, and Twilio's retry is stored;

and afterwards nothing acknowledged is missing and nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import websockets

from telephony.simulator import Utterance, run_call
from tests.fakes.tcp_fault_proxy import TcpFaultProxy
from tests.integration.test_text_channels import chat, hello
from tests.support import AUTH_TOKEN, live_server, post_signed, whatsapp_form

OUTAGE_S = 30.0
CALLER = "+15550107301"
TEXTER = "+15550107302"


async def _until(what: str, check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.1)


async def _reconnect(url: str, session: str, within: float) -> tuple[Any, dict[str, Any]]:
    """What the page does after close 1013: reconnect with backoff until welcomed."""
    deadline = time.monotonic() + within
    while True:
        ws = await websockets.connect(url)
        try:
            return ws, await hello(ws, session)
        except websockets.ConnectionClosed as closed:
            await ws.close()
            assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
        assert time.monotonic() < deadline, "chat did not come back"
        await asyncio.sleep(0.5)  # the page's backoff


async def test_a_30_second_database_outage_mid_call_and_mid_chat_loses_nothing_and_stores_nothing_twice(
    database_url: str, pool: asyncpg.Pool
) -> None:
    proxy = TcpFaultProxy(database_url)
    await proxy.start()
    try:
        async with live_server(proxy.url_for(database_url), twilio_auth_token=AUTH_TOKEN) as server:
            await server.services.speech.start()

            # The chat page is open and one message is acknowledged before the outage.
            ws = await websockets.connect(server.ws_url)
            welcome = await hello(ws)
            session, chat_conversation = welcome["session"], welcome["conversation_id"]
            before = await chat(ws, "what are your opening hours", "m-before")
            assert any(f["type"] == "reply" and "Monday to Friday" in f["text"] for f in before)

            # A call: turn 1 before the outage, turn 2 inside it, turn 3 well after it.
            call = asyncio.create_task(
                run_call(
                    server.base_url,
                    [
                        Utterance(text="what are your opening hours"),
                        Utterance(text="how long does shipping take", pause_ms=1500),
                        # the caller hears "one moment", then the answer to turn 2 once the
                        # database is back (the reply ends with closeloop's end mark), then says goodbye
                        Utterance(text="thanks, goodbye"),
                    ],
                    caller=CALLER,
                    auth_token=AUTH_TOKEN,
                    max_call_seconds=150,
                    idle_timeout_s=OUTAGE_S + 30,  # the answer to turn 2 comes after the outage
                )
            )

            async def answered_turn_one() -> bool:
                assert not call.done() or call.exception() is None, call.exception()
                return bool(
                    await pool.fetchval(
                        """SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
                           JOIN calls k ON k.conversation_id = c.id
                           WHERE k.caller = $1 AND m.sender = 'bot' AND m.body LIKE '%Monday to Friday%'""",
                        CALLER,
                    )
                )

            await _until("the call's first turn is answered", answered_turn_one, 60)
            call_conversation = await pool.fetchval(
                "SELECT conversation_id FROM calls WHERE caller = $1", CALLER
            )

            # --- the database goes away ---
            await proxy.cut()
            cut_at = time.monotonic()

            health = await server.http.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "error"
            ready = await server.http.get("/readyz")
            assert ready.status_code == 503

            # The chat message sent now is not acknowledged: the page is told to reconnect.
            await ws.send(json.dumps({"type": "message", "text": "do you ship abroad", "id": "m-during"}))
            try:
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert frame.get("id") != "m-during", frame  # never acknowledged while away
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1013
            # Reconnecting during the outage is refused the same way (the page keeps trying).
            probe = await websockets.connect(server.ws_url)
            await probe.send(json.dumps({"type": "hello", "session": session}))
            try:
                await asyncio.wait_for(probe.recv(), 10)
                raise AssertionError("welcomed while the database is away")
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1013

            # Twilio's webhook gets 503 and will retry the same MessageSid.
            form = whatsapp_form(TEXTER, "what are your opening hours")
            refused = await post_signed(server, "/twilio/messaging", form)
            assert refused.status_code == 503 and refused.headers.get("retry-after")

            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))  # the outage's length
            # --- the database is back ---
            await proxy.restore()
            restored_wall = datetime.now(UTC)

            async def healthy() -> bool:
                return (await server.http.get("/healthz")).status_code == 200

            await _until("healthz is ok again", healthy, 15)

            ws, again = await _reconnect(server.ws_url, session, 15)
            assert again["conversation_id"] == chat_conversation
            resent = await chat(ws, "do you ship abroad", "m-during")
            assert any(f["type"] == "reply" and "ship" in f["text"] for f in resent), resent
            assert (await chat(ws, "do you ship abroad", "m-during"))[-1].get("duplicate") is True
            await ws.close()

            retried = await post_signed(server, "/twilio/messaging", form)
            assert retried.status_code == 200 and "Monday to Friday" in retried.text
            assert (await post_signed(server, "/twilio/messaging", form)).status_code == 200  # once more

            report = await asyncio.wait_for(call, 120)
            print(report.format())
    finally:
        await proxy.close()

    # The call: turn 2 heard "one moment" at once, was committed after the database returned and
    # answered; the goodbye came after. Every caller turn is stored once.
    assert not report.violations, report.violations
    turn2 = report.turns[1]
    assert turn2.latency_ms is not None and turn2.latency_ms < 5000  # the "one moment", not silence
    assert turn2.bot_heard_ms > 4000  # "one moment" and then the shipping answer
    rows = await pool.fetch(
        "SELECT sender, body, external_id, created_at FROM messages WHERE conversation_id = $1 ORDER BY seq",
        call_conversation,
    )
    print("\n".join(f"{r['sender']:>9}: {r['body']}" for r in rows))
    events = await pool.fetch(
        "SELECT kind, data, created_at FROM events WHERE conversation_id = $1 ORDER BY id", call_conversation
    )
    print("\n".join(f"{e['created_at']:%H:%M:%S.%f} {e['kind']} {e['data']}" for e in events))
    caller_turns = [r for r in rows if r["sender"] == "customer"]
    assert len({r["external_id"] for r in caller_turns}) == len(caller_turns)  # none stored twice
    shipping = [r for r in caller_turns if "shipping" in r["body"].lower() or "long" in r["body"].lower()]
    assert len(shipping) == 1, [r["body"] for r in caller_turns]
    assert shipping[0]["created_at"] >= restored_wall.replace(microsecond=0)  # committed after the outage
    answers = [r["body"] for r in rows if r["sender"] == "bot"]
    assert any("We ship to the US and Canada" in a for a in answers), answers
    assert any("opening hours" in r["body"].lower() or "hours" in r["body"].lower() for r in caller_turns)

    # The chat: the acknowledged message and the resent one, each once.
    chat_rows = await pool.fetch(
        "SELECT external_id FROM messages WHERE conversation_id = $1 AND sender = 'customer' ORDER BY seq",
        chat_conversation,
    )
    assert [r["external_id"].rsplit(":", 1)[1] for r in chat_rows] == ["m-before", "m-during"]

    # The webhook: stored once, answered once.
    stored = await pool.fetchval(
        "SELECT count(*) FROM messages WHERE external_id = $1", "twilio:" + form["MessageSid"]
    )
    assert stored == 1
