"""The agent console acts: internal notes (never sent), canned replies by queue, transfer to a
queue or an agent (whose console socket gets the offer), a wrap-up code on resolve, and the times
the console shows (message timestamps, the customer's wait, the SLA due). Real server, PostgreSQL
and Twilio's wire format (a fake Twilio) on loopback, with a clock the test sets."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import websockets

from tests.fakes.twilio_server import FakeTwilio
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    bearer,
    live_server,
    login,
    make_token,
    make_user,
    twilio_settings,
    unique_phone,
)

START = datetime(2030, 3, 4, 9, 0, tzinfo=UTC)


class SetClock:
    """The server's clock: stands still until the test moves it."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


@dataclass
class World:
    server: LiveServer
    twilio: FakeTwilio
    clock: SetClock


@dataclass
class Held:
    conversation_id: int
    ticket_id: int
    phone: str
    queue: str
    agent_id: int
    agent: httpx.AsyncClient


@pytest.fixture(scope="module")
async def world(database_url: str) -> AsyncIterator[World]:
    clock = SetClock(START)
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio, whatsapp_from="+15550009999"),
        ) as server,
    ):
        yield World(server, twilio, clock)


async def new_queue(server: LiveServer) -> str:
    name = "q" + secrets.token_hex(5)
    await server.services.desk.routing.upsert_queue(name, sla_first_response={"normal": 30})
    return name


async def new_agent(
    server: LiveServer, queues: list[str], presence: str = "available"
) -> tuple[int, httpx.AsyncClient]:
    user, _ = await make_user(server, "agent")
    routing = server.services.desk.routing
    await routing.set_queues(user.id, queues)
    await routing.set_presence(user.id, presence)
    return user.id, server.client(bearer(await make_token(server, user)))


async def waiting_conversation(server: LiveServer, queue: str, *, due: timedelta) -> tuple[int, int, str]:
    """A WhatsApp conversation waiting in ``queue`` with its open ticket (first response due in ``due``)."""
    s = server.services
    now = s.clock.now()
    phone = unique_phone()
    conversation_id = await s.pool.fetchval(
        """INSERT INTO conversations (channel, address, status, owner, created_at, updated_at)
           VALUES ('whatsapp', $1, 'escalated', $2, $3, $3) RETURNING id""",
        f"whatsapp:{phone}",
        f"queue:{queue}",
        now,
    )
    ticket_id = await s.pool.fetchval(
        """INSERT INTO tickets (protocol, status, priority, queue, owner, subject, conversation_id,
                               first_response_due, created_at, updated_at)
           VALUES ($1, 'open', 'normal', $2, $3, 'broken jar', $4, $5, $6, $6) RETURNING id""",
        "CA-" + secrets.token_hex(6),
        queue,
        f"queue:{queue}",
        conversation_id,
        now + due,
        now,
    )
    await s.pool.execute("UPDATE conversations SET ticket_id = $2 WHERE id = $1", conversation_id, ticket_id)
    await s.pool.execute(
        """INSERT INTO messages (conversation_id, seq, direction, sender, body, kind, created_at)
           VALUES ($1, 1, 'in', 'customer', 'my jar arrived cracked', 'text', $2)""",
        conversation_id,
        now,
    )
    await s.pool.execute("UPDATE conversations SET last_seq = 1 WHERE id = $1", conversation_id)
    await s.desk.routing.enqueue(conversation_id, ticket_id, queue, "normal")
    return conversation_id, ticket_id, phone


async def held_conversation(server: LiveServer) -> Held:
    """A conversation an agent of a fresh queue was offered and accepted."""
    queue = await new_queue(server)
    conversation_id, ticket_id, phone = await waiting_conversation(server, queue, due=timedelta(minutes=30))
    agent_id, agent = await new_agent(server, [queue])
    offer = await server.services.desk.offer_next(queue)
    assert offer is not None and offer.agent_id == agent_id
    response = await agent.post(f"/api/desk/offers/{offer.id}/accept")
    assert response.status_code == 200, response.text
    return Held(conversation_id, ticket_id, phone, queue, agent_id, agent)


def at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def sent_to(twilio: FakeTwilio, phone: str) -> list[str]:
    return [m.form.get("Body", "") for m in twilio.messages if m.form.get("To") == f"whatsapp:{phone}"]


async def counts(server: LiveServer, conversation_id: int) -> tuple[int, int]:
    row = await server.services.pool.fetchrow(
        """SELECT (SELECT count(*) FROM messages WHERE conversation_id = $1) AS messages,
                  (SELECT count(*) FROM outbox WHERE conversation_id = $1) AS outbox""",
        conversation_id,
    )
    return int(row["messages"]), int(row["outbox"])


async def events(server: LiveServer, conversation_id: int, kind: str) -> list[dict[str, Any]]:
    rows = await server.services.pool.fetch(
        "SELECT data FROM events WHERE conversation_id = $1 AND kind = $2 ORDER BY id", conversation_id, kind
    )
    return [dict(r["data"]) for r in rows]


async def test_a_note_is_in_the_transcript_for_staff_and_never_reaches_the_customer(world: World) -> None:
    server, twilio = world.server, world.twilio
    held = await held_conversation(server)
    before = await counts(server, held.conversation_id)

    text = "Customer sounded upset; offer the express replacement."
    response = await held.agent.post(
        f"/api/desk/conversations/{held.conversation_id}/notes", json={"text": text}
    )
    assert response.status_code == 200, response.text
    note = response.json()["note"]
    assert note["text"] == text and note["by"] == held.agent_id and at(note["created_at"]) == START

    assert await counts(server, held.conversation_id) == before  # not in the transcript, not in the outbox
    conv = (await held.agent.get(f"/api/desk/conversations/{held.conversation_id}")).json()
    assert [(n["text"], n["by"], at(n["created_at"])) for n in conv["notes"]] == [
        (text, held.agent_id, START)
    ]
    [entry] = await server.services.pool.fetch(
        "SELECT user_id, after FROM audit_log WHERE kind = 'conversation.note' AND target = $1",
        f"conversation:{held.conversation_id}",
    )
    assert entry["user_id"] == held.agent_id and entry["after"]["text"] == text

    # the channel works: the agent's reply reaches the customer's WhatsApp, the note never did
    reply = await held.agent.post(
        f"/api/desk/conversations/{held.conversation_id}/reply", json={"text": "A new jar is on its way."}
    )
    assert reply.status_code == 200 and reply.json()["sent"] is True, reply.text
    assert sent_to(twilio, held.phone) == ["A new jar is on its way."]


async def test_canned_replies_are_listed_by_the_agents_queues_and_edited_by_admins(world: World) -> None:
    server = world.server
    mine, other = await new_queue(server), await new_queue(server)
    made = []
    for queue, title, body in [
        (mine, "Refund sent", "Your refund is on its way; it takes 3 to 5 days."),
        (mine, "Apology", "I'm sorry about that."),
        (other, "Billing hours", "Billing answers Monday to Friday."),
    ]:
        response = await server.http.post(
            "/api/desk/canned-replies", json={"queue": queue, "title": title, "body": body}
        )
        assert response.status_code == 201, response.text
        made.append(response.json()["canned_reply"])

    _, agent = await new_agent(server, [mine], presence="busy")
    listed = (await agent.get("/api/desk/canned-replies")).json()["canned_replies"]
    assert [(c["queue"], c["title"], c["body"]) for c in listed] == [
        (mine, "Apology", "I'm sorry about that."),
        (mine, "Refund sent", "Your refund is on its way; it takes 3 to 5 days."),
    ]
    everything = (await server.http.get("/api/desk/canned-replies")).json()["canned_replies"]
    assert {c["id"] for c in made} <= {c["id"] for c in everything}

    changed = await server.http.put(
        f"/api/desk/canned-replies/{made[1]['id']}",
        json={"queue": mine, "title": "Apology", "body": "Sorry!"},
    )
    assert changed.status_code == 200 and changed.json()["canned_reply"]["body"] == "Sorry!"
    same_title = await server.http.post(
        "/api/desk/canned-replies", json={"queue": mine, "title": "Apology", "body": "again"}
    )
    assert same_title.status_code == 422 and same_title.json()["error"]["code"] == "canned_reply_exists"
    unknown = await server.http.post(
        "/api/desk/canned-replies", json={"queue": "no-such-queue", "title": "x", "body": "y"}
    )
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_queue"
    gone = await server.http.delete(f"/api/desk/canned-replies/{made[0]['id']}")
    assert gone.status_code == 200
    listed = (await agent.get("/api/desk/canned-replies")).json()["canned_replies"]
    assert [(c["title"], c["body"]) for c in listed] == [("Apology", "Sorry!")]
    kinds = await server.services.pool.fetch(
        "SELECT kind FROM audit_log WHERE target = ANY($1::text[]) ORDER BY id",
        [f"canned:{c['id']}" for c in made],
    )
    assert [k["kind"] for k in kinds] == ["canned.create"] * 3 + ["canned.update", "canned.delete"]


async def test_transfer_to_a_queue_frees_the_agent_and_waits_there(world: World) -> None:
    server = world.server
    pool = server.services.pool
    held = await held_conversation(server)
    billing = await new_queue(server)  # nobody serves it yet

    response = await held.agent.post(
        f"/api/desk/conversations/{held.conversation_id}/transfer", json={"to": f"queue:{billing}"}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "conversation_id": held.conversation_id,
        "to": f"queue:{billing}",
        "queue": billing,
        "assignment_id": None,
    }
    conv = await pool.fetchrow("SELECT owner, status FROM conversations WHERE id = $1", held.conversation_id)
    assert (conv["owner"], conv["status"]) == (f"queue:{billing}", "escalated")
    ticket = await pool.fetchrow("SELECT queue, owner FROM tickets WHERE id = $1", held.ticket_id)
    assert (ticket["queue"], ticket["owner"]) == (billing, f"queue:{billing}")
    assert await pool.fetchval("SELECT active FROM agents WHERE user_id = $1", held.agent_id) == 0
    assignments = await pool.fetch(
        "SELECT agent_id, status FROM assignments WHERE conversation_id = $1 ORDER BY id",
        held.conversation_id,
    )
    assert [(a["agent_id"], a["status"]) for a in assignments] == [(held.agent_id, "transferred")]
    handoff = await pool.fetchrow(
        "SELECT queue, tried_agents FROM handoffs WHERE conversation_id = $1 AND status = 'waiting'",
        held.conversation_id,
    )
    assert handoff["queue"] == billing and list(handoff["tried_agents"]) == [held.agent_id]
    [moved] = await events(server, held.conversation_id, "transferred")
    assert moved == {
        "by": held.agent_id,
        "from": f"agent:{held.agent_id}",
        "to": f"queue:{billing}",
        "queue": billing,
    }
    [entry] = await pool.fetch(
        "SELECT user_id, before, after FROM audit_log WHERE kind = 'conversation.transfer' AND target = $1",
        f"conversation:{held.conversation_id}",
    )
    assert entry["user_id"] == held.agent_id and entry["before"]["owner"] == f"agent:{held.agent_id}"
    assert entry["after"]["owner"] == f"queue:{billing}"

    # the old holder has lost it
    late = await held.agent.post(f"/api/desk/conversations/{held.conversation_id}/reply", json={"text": "hi"})
    assert late.status_code == 403 and late.json()["error"]["code"] == "not_owner"


async def test_transfer_to_an_agent_offers_it_on_their_console_socket(world: World) -> None:
    server = world.server
    pool = server.services.pool
    held = await held_conversation(server)
    busy_id, _ = await new_agent(server, [held.queue], presence="busy")
    refused = await held.agent.post(
        f"/api/desk/conversations/{held.conversation_id}/transfer", json={"to": f"agent:{busy_id}"}
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "agent_unavailable"
    assert (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", held.conversation_id)
        == f"agent:{held.agent_id}"
    )  # nothing changed

    colleague, password = await make_user(server, "agent")
    await server.services.desk.routing.set_queues(
        colleague.id, [await new_queue(server)]
    )  # not the conversation's
    await server.services.desk.routing.set_presence(colleague.id, "available")
    browser = await login(server, colleague.email, password)
    url = server.base_url.replace("http://", "ws://") + "/console/ws"
    cookie = f"closeloop_session={browser.cookies['closeloop_session']}"
    async with websockets.connect(
        url, additional_headers={"Cookie": cookie, "Origin": server.base_url}
    ) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "hello"
        targets = (await held.agent.get("/api/desk/transfer-targets")).json()
        assert colleague.id in [a["id"] for a in targets["agents"]]
        assert held.agent_id not in [a["id"] for a in targets["agents"]] and held.queue in targets["queues"]

        response = await held.agent.post(
            f"/api/desk/conversations/{held.conversation_id}/transfer", json={"to": f"agent:{colleague.id}"}
        )
        assert response.status_code == 200, response.text
        assignment_id = response.json()["assignment_id"]
        offer = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert offer == {
        "type": "offer",
        "assignment_id": assignment_id,
        "conversation_id": held.conversation_id,
        "ticket_id": held.ticket_id,
        "queue": held.queue,
        "at": START.isoformat(),
        "transferred_by": "Test Agent",
    }
    accepted = await browser.post(f"/api/desk/offers/{assignment_id}/accept")
    assert accepted.status_code == 200, accepted.text
    assert (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", held.conversation_id)
        == f"agent:{colleague.id}"
    )
    assert (
        await pool.fetchval("SELECT owner FROM tickets WHERE id = $1", held.ticket_id)
        == f"agent:{colleague.id}"
    )
    states = await pool.fetch(
        "SELECT agent_id, status FROM assignments WHERE conversation_id = $1 ORDER BY id",
        held.conversation_id,
    )
    assert [(s["agent_id"], s["status"]) for s in states] == [
        (held.agent_id, "transferred"),
        (colleague.id, "accepted"),
    ]
    assert await pool.fetchval("SELECT active FROM agents WHERE user_id = $1", held.agent_id) == 0
    assert await pool.fetchval("SELECT active FROM agents WHERE user_id = $1", colleague.id) == 1


async def test_resolving_needs_a_wrap_up_code_which_is_stored_and_on_the_timeline(world: World) -> None:
    server = world.server
    pool = server.services.pool
    held = await held_conversation(server)
    due = (START + timedelta(days=2)).isoformat()
    path = f"/api/desk/tickets/{held.ticket_id}/close"
    body = {"next_step": "confirm the refund arrived", "next_step_due": due}
    for wrap_up in (None, "", "made_up"):
        refused = await held.agent.post(path, json=body | {"wrap_up": wrap_up})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "wrap_up_required"
        assert "refund_issued" in refused.json()["error"]["message"]
    assert await pool.fetchval("SELECT status FROM tickets WHERE id = $1", held.ticket_id) == "open"

    response = await held.agent.post(path, json=body | {"wrap_up": "refund_issued"})
    assert response.status_code == 200, response.text
    assert response.json()["ticket"]["wrap_up"] == "refund_issued"
    row = await pool.fetchrow("SELECT status, wrap_up FROM tickets WHERE id = $1", held.ticket_id)
    assert (row["status"], row["wrap_up"]) == ("resolved", "refund_issued")
    [closed] = await events(server, held.conversation_id, "ticket_closed")
    assert closed["wrap_up"] == "refund_issued" and closed["agent"] == held.agent_id
    timeline = (await server.http.get(f"/api/supervisor/conversations/{held.conversation_id}")).json()
    shown = [e for e in timeline["actions"] if e["kind"] == "ticket_closed"]
    assert [e["data"]["wrap_up"] for e in shown] == ["refund_issued"]


async def test_the_console_json_has_timestamps_wait_and_sla(world: World) -> None:
    server, clock = world.server, world.clock
    queue = await new_queue(server)
    conversation_id, ticket_id, _ = await waiting_conversation(server, queue, due=timedelta(minutes=30))
    waiting_since = clock.at
    clock.at = START + timedelta(minutes=7)  # the customer waited 7 minutes for a person
    try:
        agent_id, agent = await new_agent(server, [queue])
        offer = await server.services.desk.offer_next(queue)
        assert offer is not None and offer.agent_id == agent_id
        clock.at = START + timedelta(minutes=12)
        state = (await agent.get("/api/desk/state")).json()
        [offered] = state["assignments"]
        assert offered["conversation_id"] == conversation_id
        assert at(offered["waiting_since"]) == waiting_since
        assert offered["wait_seconds"] == 12 * 60
        assert at(offered["sla_due"]) == START + timedelta(minutes=30)
        assert (offered["sla_kind"], offered["sla_overdue"]) == ("first_response", False)
        assert at(state["server_time"]) == clock.at
        assert state["wrap_up_codes"] == [
            "resolved",
            "refund_issued",
            "callback_scheduled",
            "no_response",
            "duplicate",
            "other",
        ]

        clock.at = START + timedelta(minutes=41)  # 11 minutes past the first-response SLA
        [late] = (await agent.get("/api/desk/state")).json()["assignments"]
        assert (late["wait_seconds"], late["sla_overdue"]) == (41 * 60, True)

        conv = (await agent.get(f"/api/desk/conversations/{conversation_id}")).json()
        assert [(m["body"], at(m["created_at"])) for m in conv["messages"]] == [
            ("my jar arrived cracked", waiting_since)
        ]
        assert conv["ticket_id"] == ticket_id
    finally:
        clock.at = START
