"""Supervisor actions: reassign, internal notes, presence, the ticket list and queue health."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from tests.support import LiveServer, live_server, make_user
from web.supervisor_actions import supervisor_actions_router

PREFIX = "/api/supervisor/actions"


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        if not any(getattr(r, "path", "").startswith(PREFIX) for r in live.app.routes):
            live.app.include_router(supervisor_actions_router(live.app.state.services))
        yield live


async def _queue(server: LiveServer) -> str:
    name = "q" + secrets.token_hex(5)
    await server.services.desk.routing.upsert_queue(name, sla_first_response={"normal": 60})
    return name


async def _conversation(
    server: LiveServer, queue: str, *, due_in: timedelta = timedelta(hours=1)
) -> tuple[int, int]:
    """An escalated web chat waiting in ``queue`` with its open ticket: ``(conversation, ticket)``."""
    s = server.services
    now = s.clock.now()
    conversation_id = await s.pool.fetchval(
        """INSERT INTO conversations (channel, address, status, owner, created_at, updated_at)
           VALUES ('webchat', $1, 'escalated', $2, $3, $3) RETURNING id""",
        "sa-" + secrets.token_hex(8),
        f"queue:{queue}",
        now,
    )
    ticket_id = await s.pool.fetchval(
        """INSERT INTO tickets (protocol, status, priority, queue, owner, subject, conversation_id,
                               first_response_due, created_at, updated_at)
           VALUES ($1, 'open', 'normal', $2, $3, 'help', $4, $5, $6, $6) RETURNING id""",
        "SA-" + secrets.token_hex(6),
        queue,
        f"queue:{queue}",
        conversation_id,
        now + due_in,
        now,
    )
    await s.pool.execute("UPDATE conversations SET ticket_id = $2 WHERE id = $1", conversation_id, ticket_id)
    await s.desk.routing.enqueue(conversation_id, ticket_id, queue, "normal")
    return conversation_id, ticket_id


async def _agent(server: LiveServer, queues: list[str], presence: str = "busy") -> int:
    user, _ = await make_user(server, "agent")
    routing = server.services.desk.routing
    await routing.set_queues(user.id, queues)
    await routing.set_presence(user.id, presence)
    return user.id


async def _events(server: LiveServer, conversation_id: int, kind: str) -> list[dict]:
    rows = await server.services.pool.fetch(
        "SELECT data FROM events WHERE conversation_id = $1 AND kind = $2 ORDER BY id", conversation_id, kind
    )
    return [dict(r["data"]) for r in rows]


async def _audit(server: LiveServer, kind: str, target: str) -> list[dict]:
    rows = await server.services.pool.fetch(
        "SELECT user_id, before, after FROM audit_log WHERE kind = $1 AND target = $2 ORDER BY id",
        kind,
        target,
    )
    return [dict(r) for r in rows]


async def test_reassign_to_an_agent_then_to_another_queue(server: LiveServer) -> None:
    pool = server.services.pool
    first, second = await _queue(server), await _queue(server)
    conversation_id, ticket_id = await _conversation(server, first)
    agent_id = await _agent(server, [first])
    inbox = server.services.desk.subscribe(agent_id)
    try:
        response = await server.http.post(
            f"{PREFIX}/assign", json={"conversation_id": conversation_id, "to": f"agent:{agent_id}"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["to"] == f"agent:{agent_id}"
        event = inbox.get_nowait()  # the agent's console hears about it at once
        assert event["type"] == "assignment" and event["conversation_id"] == conversation_id
    finally:
        server.services.desk.unsubscribe(agent_id, inbox)

    assert (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        == f"agent:{agent_id}"
    )
    assert await pool.fetchval("SELECT owner FROM tickets WHERE id = $1", ticket_id) == f"agent:{agent_id}"
    live = await pool.fetchrow(
        "SELECT agent_id, status FROM assignments WHERE conversation_id = $1 AND status = 'accepted'",
        conversation_id,
    )
    assert live is not None and live["agent_id"] == agent_id
    assert await pool.fetchval("SELECT active FROM agents WHERE user_id = $1", agent_id) == 1
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM handoffs WHERE conversation_id = $1 AND status = 'waiting'", conversation_id
        )
        == 0
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM notifications WHERE user_id = $1 AND kind = 'conversation_assigned'",
            agent_id,
        )
        == 1
    )
    [moved] = await _events(server, conversation_id, "reassigned")
    assert moved["from"] == f"queue:{first}" and moved["to"] == f"agent:{agent_id}"
    assert moved["by"] == server.admin.id
    [entry] = await _audit(server, "conversation.reassign", f"conversation:{conversation_id}")
    assert entry["user_id"] == server.admin.id
    assert entry["before"]["owner"] == f"queue:{first}" and entry["after"]["owner"] == f"agent:{agent_id}"

    # ... and on to another queue: the agent is freed, the work waits there
    response = await server.http.post(
        f"{PREFIX}/assign", json={"conversation_id": conversation_id, "to": f"queue:{second}"}
    )
    assert response.status_code == 200, response.text
    assert (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        == f"queue:{second}"
    )
    ticket = await pool.fetchrow("SELECT queue, owner FROM tickets WHERE id = $1", ticket_id)
    assert ticket["queue"] == second and ticket["owner"] == f"queue:{second}"
    assert await pool.fetchval("SELECT active FROM agents WHERE user_id = $1", agent_id) == 0
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM assignments WHERE conversation_id = $1 AND status IN ('offered', 'accepted')",
            conversation_id,
        )
        == 0
    )
    waiting = await pool.fetchval(
        "SELECT queue FROM handoffs WHERE conversation_id = $1 AND status = 'waiting'", conversation_id
    )
    assert waiting == second
    assert [e["to"] for e in await _events(server, conversation_id, "reassigned")] == [
        f"agent:{agent_id}",
        f"queue:{second}",
    ]
    assert len(await _audit(server, "conversation.reassign", f"conversation:{conversation_id}")) == 2


async def test_reassign_explains_what_is_wrong(server: LiveServer) -> None:
    queue = await _queue(server)
    conversation_id, _ = await _conversation(server, queue)
    cases = [
        ({"conversation_id": 999_999_999, "to": f"queue:{queue}"}, 404, "not_found"),
        ({"conversation_id": conversation_id, "to": "agent:999999999"}, 404, "unknown_user"),
        ({"conversation_id": conversation_id, "to": "queue:no-such-queue"}, 422, "unknown_queue"),
        ({"conversation_id": conversation_id, "to": "somebody"}, 422, "invalid_target"),
        ({"conversation_id": conversation_id, "to": f"queue:{queue}"}, 409, "already_assigned"),
    ]
    for body, status, code in cases:
        response = await server.http.post(f"{PREFIX}/assign", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["message"]
    assert await _events(server, conversation_id, "reassigned") == []


async def test_an_internal_note_is_on_the_timeline_and_never_sent(server: LiveServer) -> None:
    pool = server.services.pool
    queue = await _queue(server)
    conversation_id, _ = await _conversation(server, queue)
    before = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM messages WHERE conversation_id = $1) AS messages,
                  (SELECT count(*) FROM outbox WHERE conversation_id = $1) AS outbox""",
        conversation_id,
    )
    text = "Customer is a VIP; offer the refund if asked."
    response = await server.http.post(
        f"{PREFIX}/note", json={"conversation_id": conversation_id, "text": text}
    )
    assert response.status_code == 200, response.text
    assert response.json()["note"]["text"] == text

    after = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM messages WHERE conversation_id = $1) AS messages,
                  (SELECT count(*) FROM outbox WHERE conversation_id = $1) AS outbox""",
        conversation_id,
    )
    assert dict(after) == dict(before)  # nothing in the transcript or the customer's outbox
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE body = $1", text) == 0
    [note] = await _events(server, conversation_id, "internal_note")
    assert note["text"] == text and note["by"] == server.admin.id
    assert len(await _audit(server, "conversation.note", f"conversation:{conversation_id}")) == 1
    timeline = (await server.http.get(f"/api/supervisor/conversations/{conversation_id}")).json()
    assert [a["data"]["text"] for a in timeline["actions"] if a["kind"] == "internal_note"] == [text]
    assert text not in [m["body"] for m in timeline["messages"]]

    for bad, code in [("", "empty_note"), ("   ", "empty_note"), ("x" * 2001, "note_too_long")]:
        response = await server.http.post(
            f"{PREFIX}/note", json={"conversation_id": conversation_id, "text": bad}
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == code
    assert (
        await server.http.post(f"{PREFIX}/note", json={"conversation_id": 999_999_999, "text": "hi"})
    ).status_code == 404
    assert len(await _events(server, conversation_id, "internal_note")) == 1


async def test_a_supervisor_changes_an_agents_presence(server: LiveServer) -> None:
    queue = await _queue(server)
    agent_id = await _agent(server, [queue], presence="away")
    response = await server.http.post(f"{PREFIX}/presence", json={"user_id": agent_id, "presence": "busy"})
    assert response.status_code == 200, response.text
    assert response.json()["agent"]["presence"] == "busy"
    assert (await server.services.desk.routing.agent(agent_id)).presence == "busy"  # type: ignore[union-attr]
    [entry] = await _audit(server, "agent.presence", f"user:{agent_id}")
    assert entry["before"] == {"presence": "away"} and entry["after"] == {"presence": "busy"}

    response = await server.http.post(f"{PREFIX}/presence", json={"user_id": agent_id, "presence": "asleep"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_presence"
    response = await server.http.post(f"{PREFIX}/presence", json={"user_id": 999_999_999, "presence": "busy"})
    assert response.status_code == 404
    assert len(await _audit(server, "agent.presence", f"user:{agent_id}")) == 1


async def test_open_tickets_are_paged_soonest_due_first(server: LiveServer) -> None:
    queue = await _queue(server)
    made = [(await _conversation(server, queue, due_in=timedelta(minutes=m)))[1] for m in (90, 10, 50)]
    agent_id = await _agent(server, [queue])
    await server.http.post(
        f"{PREFIX}/assign",
        json={
            "conversation_id": await server.services.pool.fetchval(
                "SELECT conversation_id FROM tickets WHERE id = $1", made[0]
            ),
            "to": f"agent:{agent_id}",
        },
    )
    page = (await server.http.get(f"{PREFIX}/tickets", params={"queue": queue, "limit": 2})).json()
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
    assert [t["id"] for t in page["tickets"]] == [made[1], made[2]]
    rest = (
        await server.http.get(f"{PREFIX}/tickets", params={"queue": queue, "limit": 2, "offset": 2})
    ).json()
    assert rest["total"] == 3 and [t["id"] for t in rest["tickets"]] == [made[0]]
    last = rest["tickets"][0]
    assert last["owner"] == f"agent:{agent_id}" and last["owner_name"] == "Test Agent"
    assert page["tickets"][0]["owner_name"] == f"queue {queue}"
    assert page["tickets"][0]["sla_due"] and page["tickets"][0]["priority"] == "normal"
    assert (await server.http.get(f"{PREFIX}/tickets", params={"status": "bogus"})).status_code == 422


async def test_queues_warn_when_work_waits_and_nobody_is_available(server: LiveServer) -> None:
    queue = await _queue(server)
    await _conversation(server, queue)

    def mine(body: dict) -> dict:
        return next(q for q in body["queues"] if q["name"] == queue)

    found = mine((await server.http.get(f"{PREFIX}/queues")).json())
    assert found["waiting"] == 1 and found["agents_available"] == 0 and found["warning"] is True
    assert found["next_sla_due"] and found["longest_wait_seconds"] >= 0

    agent_id = await _agent(server, [queue], presence="away")
    await server.http.post(f"{PREFIX}/presence", json={"user_id": agent_id, "presence": "available"})
    found = mine((await server.http.get(f"{PREFIX}/queues")).json())
    assert found["agents_available"] == 1 and found["warning"] is False
