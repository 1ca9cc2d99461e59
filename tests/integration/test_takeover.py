"""A supervisor joins, takes over, writes to the customer over WhatsApp, hands back to the AI and
closes the ticket: through the real server, PostgreSQL and Twilio's wire format (a fake Twilio)."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from crm_bridge.desk import HANDED_BACK
from tests.fakes.twilio_server import FakeTwilio
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    live_server,
    login,
    make_user,
    post_signed,
    twilio_settings,
    unique_phone,
    whatsapp_form,
)

PREFIX = "/api/supervisor/actions"
WHATSAPP_FROM = "+15550009999"


def twiml_texts(xml: str) -> list[str]:
    return [
        m.replace("&amp;", "&").replace("&apos;", "'").replace("&quot;", '"')
        for m in re.findall(r"<Message>(.*?)</Message>", xml, re.S)
    ]


@pytest.fixture(scope="module")
async def world(database_url: str) -> AsyncIterator[tuple[LiveServer, FakeTwilio]]:
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            **twilio_settings(twilio, whatsapp_from=WHATSAPP_FROM),
        ) as server,
    ):
        yield server, twilio


async def say(server: LiveServer, phone: str, body: str) -> list[str]:
    """The customer writes on WhatsApp; the AI's replies are the webhook's TwiML."""
    response = await post_signed(server, "/twilio/messaging", whatsapp_form(phone, body))
    assert response.status_code == 200, response.text
    return twiml_texts(response.text)


async def supervisor(server: LiveServer) -> tuple[httpx.AsyncClient, int]:
    """A supervisor signed in like a browser (session cookie and CSRF token)."""
    user, password = await make_user(server, "supervisor")
    return await login(server, user.email, password), user.id


async def conversation_of(server: LiveServer, phone: str) -> int:
    found = await server.services.pool.fetchval(
        "SELECT id FROM conversations WHERE channel = 'whatsapp' AND address LIKE '%' || $1 AND status <> 'closed'",
        phone,
    )
    assert found is not None
    return int(found)


async def rows(server: LiveServer, sql: str, *args: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in await server.services.pool.fetch(sql, *args)]


def to_customer(twilio: FakeTwilio, phone: str) -> list[str]:
    return [m.form.get("Body", "") for m in twilio.messages if m.form.get("To") == f"whatsapp:{phone}"]


async def test_take_over_silences_the_ai_sends_the_supervisors_reply_and_hand_back_restores_it(
    world: tuple[LiveServer, FakeTwilio],
) -> None:
    server, twilio = world
    phone = unique_phone()
    assert await say(server, phone, "hello") != []  # the AI answers
    conversation_id = await conversation_of(server, phone)
    boss, boss_id = await supervisor(server)

    response = await boss.post(f"{PREFIX}/takeover", json={"conversation_id": conversation_id})
    assert response.status_code == 200, response.text
    assert response.json()["to"] == f"agent:{boss_id}" and response.json()["from"] == "ai"
    again = await boss.post(f"{PREFIX}/takeover", json={"conversation_id": conversation_id})
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_taken_over"

    # the customer writes: no AI reply, the message waits for the supervisor
    bot_before = await server.services.pool.fetchval(
        "SELECT count(*) FROM messages WHERE conversation_id = $1 AND sender = 'bot'", conversation_id
    )
    assert await say(server, phone, "where is my parcel?") == []
    assert (
        await server.services.pool.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1 AND sender = 'bot'", conversation_id
        )
        == bot_before
    )
    kinds = [
        r["kind"]
        for r in await rows(
            server, "SELECT kind FROM events WHERE conversation_id = $1 ORDER BY id", conversation_id
        )
    ]
    assert "taken_over" in kinds and kinds[-1] == "customer_message_to_agent"

    # the supervisor's reply reaches the customer's WhatsApp through Twilio, as an agent's does
    text = "Hi, this is Sam from the team, I am looking at your parcel now."
    sent_before = len(to_customer(twilio, phone))
    response = await boss.post(f"{PREFIX}/reply", json={"conversation_id": conversation_id, "text": text})
    assert response.status_code == 200, response.text
    assert response.json()["sent"] is True and response.json()["message"]["body"] == text
    assert to_customer(twilio, phone)[sent_before:] == [text]
    [sent] = [m for m in twilio.messages if m.form.get("Body") == text]
    assert sent.form["From"] == f"whatsapp:{WHATSAPP_FROM}"
    last = await rows(
        server,
        "SELECT sender, body FROM messages WHERE conversation_id = $1 ORDER BY seq DESC LIMIT 1",
        conversation_id,
    )
    assert last == [{"sender": "agent", "body": text}]

    # hand back: the customer is told, and the AI answers the next message
    response = await boss.post(f"{PREFIX}/hand-back", json={"conversation_id": conversation_id})
    assert response.status_code == 200, response.text
    assert to_customer(twilio, phone)[sent_before:] == [text, HANDED_BACK]
    assert (
        await server.services.pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        == "ai"
    )
    assert await say(server, phone, "hello again") != []
    audit = await rows(
        server,
        "SELECT user_id, kind FROM audit_log WHERE target = $1 ORDER BY id",
        f"conversation:{conversation_id}",
    )
    assert audit == [
        {"user_id": boss_id, "kind": "conversation.takeover"},
        {"user_id": boss_id, "kind": "conversation.reply"},
        {"user_id": boss_id, "kind": "conversation.hand_back"},
    ]
    # a reply after handing back is refused: only the owner writes to the customer
    response = await boss.post(f"{PREFIX}/reply", json={"conversation_id": conversation_id, "text": "hi"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "not_owner"


async def test_taking_over_from_an_agent_frees_them_and_tells_their_console(
    world: tuple[LiveServer, FakeTwilio],
) -> None:
    server, _ = world
    phone = unique_phone()
    await say(server, phone, "hello")
    conversation_id = await conversation_of(server, phone)
    routing = server.services.desk.routing
    agent, _ = await make_user(server, "agent")
    await routing.set_queues(agent.id, ["support"])
    await routing.set_capacity(agent.id, 3)
    response = await server.http.post(
        f"{PREFIX}/assign", json={"conversation_id": conversation_id, "to": f"agent:{agent.id}"}
    )
    assert response.status_code == 200, response.text
    inbox = server.services.desk.subscribe(agent.id)
    try:
        boss, boss_id = await supervisor(server)
        response = await boss.post(f"{PREFIX}/takeover", json={"conversation_id": conversation_id})
        assert response.status_code == 200, response.text
        event = inbox.get_nowait()
        assert (event["type"], event["status"], event["to"]) == (
            "assignment",
            "reassigned",
            f"agent:{boss_id}",
        )
    finally:
        server.services.desk.unsubscribe(agent.id, inbox)
    assert (await routing.agent(agent.id)).active == 0  # type: ignore[union-attr]
    live = await rows(
        server,
        "SELECT agent_id, status FROM assignments WHERE conversation_id = $1 ORDER BY id",
        conversation_id,
    )
    assert live == [
        {"agent_id": agent.id, "status": "completed"},
        {"agent_id": boss_id, "status": "accepted"},
    ]
    # the agent cannot write to the customer any more
    response = await server.client({"Authorization": f"Bearer {await _token(server, agent)}"}).post(
        f"/api/desk/conversations/{conversation_id}/reply", json={"text": "still me"}
    )
    assert response.status_code == 403 and response.json()["error"]["code"] == "not_owner"


async def _token(server: LiveServer, user: Any) -> str:
    return await server.services.api_tokens.create(user, "tests")


async def test_joining_keeps_the_ai_serving_and_records_who_watched(
    world: tuple[LiveServer, FakeTwilio],
) -> None:
    server, _ = world
    phone = unique_phone()
    await say(server, phone, "hello")
    conversation_id = await conversation_of(server, phone)
    boss, boss_id = await supervisor(server)
    response = await boss.post(f"{PREFIX}/join", json={"conversation_id": conversation_id})
    assert response.status_code == 200, response.text
    assert response.json() == {"conversation_id": conversation_id, "owner": "ai", "watching": True}
    assert await say(server, phone, "what are your opening hours?") != []  # the AI keeps serving
    note = await boss.post(f"{PREFIX}/note", json={"conversation_id": conversation_id, "text": "watching"})
    assert note.status_code == 200
    response = await boss.post(f"{PREFIX}/leave", json={"conversation_id": conversation_id})
    assert response.status_code == 200 and response.json()["watching"] is False
    events = await rows(
        server,
        """SELECT kind, data ->> 'by' AS by FROM events WHERE conversation_id = $1
             AND kind IN ('supervisor_joined', 'internal_note', 'supervisor_left') ORDER BY id""",
        conversation_id,
    )
    assert events == [
        {"kind": "supervisor_joined", "by": str(boss_id)},
        {"kind": "internal_note", "by": str(boss_id)},
        {"kind": "supervisor_left", "by": str(boss_id)},
    ]
    audit = await rows(
        server,
        "SELECT kind FROM audit_log WHERE target = $1 ORDER BY id",
        f"conversation:{conversation_id}",
    )
    assert [a["kind"] for a in audit] == ["conversation.join", "conversation.note", "conversation.leave"]
    assert (
        await server.services.pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        == "ai"
    )
    missing = await boss.post(f"{PREFIX}/join", json={"conversation_id": 999_999_999})
    assert missing.status_code == 404


async def test_a_supervisor_closes_a_waiting_ticket_with_its_next_step(
    world: tuple[LiveServer, FakeTwilio],
) -> None:
    server, _ = world
    s = server.services
    queue = "q" + secrets.token_hex(4)
    await s.desk.routing.upsert_queue(queue)
    now = s.clock.now()
    conversation_id = await s.pool.fetchval(
        """INSERT INTO conversations (channel, address, status, owner, created_at, updated_at)
           VALUES ('webchat', $1, 'escalated', $2, $3, $3) RETURNING id""",
        "tk-" + secrets.token_hex(6),
        f"queue:{queue}",
        now,
    )
    protocol = "TK-" + secrets.token_hex(4).upper()
    ticket_id = await s.pool.fetchval(
        """INSERT INTO tickets (protocol, status, priority, queue, owner, subject, conversation_id, created_at, updated_at)
           VALUES ($1, 'open', 'normal', $2, $3, 'help', $4, $5, $5) RETURNING id""",
        protocol,
        queue,
        f"queue:{queue}",
        conversation_id,
        now,
    )
    await s.pool.execute("UPDATE conversations SET ticket_id = $2 WHERE id = $1", conversation_id, ticket_id)
    await s.desk.routing.enqueue(conversation_id, ticket_id, queue, "normal")
    boss, boss_id = await supervisor(server)

    refused = await boss.post(f"{PREFIX}/close", json={"conversation_id": conversation_id})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "next_step_required"
    due = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    response = await boss.post(
        f"{PREFIX}/close",
        json={
            "conversation_id": conversation_id,
            "next_step": "confirm the refund arrived",
            "next_step_due": due,
        },
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"conversation_id": conversation_id, "ticket": protocol, "status": "resolved"}
    ticket = await s.pool.fetchrow("SELECT status, next_step FROM tickets WHERE id = $1", ticket_id)
    assert dict(ticket) == {"status": "resolved", "next_step": "confirm the refund arrived"}
    conv = await s.pool.fetchrow("SELECT owner, status FROM conversations WHERE id = $1", conversation_id)
    assert dict(conv) == {"owner": "ai", "status": "open"}
    assert (
        await s.pool.fetchval("SELECT status FROM handoffs WHERE conversation_id = $1", conversation_id)
        == "cancelled"
    )
    [entry] = await rows(
        server, "SELECT user_id, after FROM audit_log WHERE target = $1", f"ticket:{protocol}"
    )
    assert entry["user_id"] == boss_id and entry["after"]["status"] == "resolved"
    again = await boss.post(
        f"{PREFIX}/close",
        json={"conversation_id": conversation_id, "next_step": "x", "next_step_due": due},
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "no_open_ticket"
