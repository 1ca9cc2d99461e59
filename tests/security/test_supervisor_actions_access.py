"""Who may use the supervisor actions, CSRF on changes, and that notes stay text."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from tests.support import LiveServer, live_server, login, make_user, token_client
from web.supervisor_actions import supervisor_actions_router

PREFIX = "/api/supervisor/actions"
XSS = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'
CHANGES = [
    ("/assign", {"conversation_id": 1, "to": "queue:support"}),
    ("/note", {"conversation_id": 1, "text": "hello"}),
    ("/presence", {"user_id": 1, "presence": "busy"}),
]
READS = ["/tickets", "/queues"]


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        if not any(getattr(r, "path", "").startswith(PREFIX) for r in live.app.routes):
            live.app.include_router(supervisor_actions_router(live.app.state.services))
        yield live


async def _queue(server: LiveServer) -> str:
    name = "q" + secrets.token_hex(5)
    await server.services.desk.routing.upsert_queue(name)
    return name


async def _conversation(server: LiveServer, queue: str) -> int:
    s = server.services
    now = s.clock.now()
    return int(
        await s.pool.fetchval(
            """INSERT INTO conversations (channel, address, status, owner, created_at, updated_at)
               VALUES ('webchat', $1, 'escalated', $2, $3, $3) RETURNING id""",
            "sec-" + secrets.token_hex(8),
            f"queue:{queue}",
            now,
        )
    )


async def test_anonymous_callers_are_refused_everywhere(server: LiveServer) -> None:
    anonymous = server.anonymous()
    for path in READS:
        response = await anonymous.get(PREFIX + path)
        assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated", path
    for path, body in CHANGES:
        response = await anonymous.post(PREFIX + path, json=body)
        assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated", path


async def test_agents_are_refused_everywhere(server: LiveServer) -> None:
    queue = await _queue(server)
    conversation_id = await _conversation(server, queue)
    user, password = await make_user(server, "agent")
    by_session = await login(server, user.email, password)
    by_token = await token_client(server, "agent")
    for client in (by_session, by_token):
        for path in READS:
            response = await client.get(PREFIX + path)
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", path
        for path, body in CHANGES:
            body = {**body, "conversation_id": conversation_id, "user_id": user.id}
            response = await client.post(PREFIX + path, json=body)
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", path
    pool = server.services.pool
    assert (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        == f"queue:{queue}"
    )
    assert await pool.fetchval("SELECT count(*) FROM events WHERE conversation_id = $1", conversation_id) == 0


async def test_supervisor_sessions_need_the_csrf_token_on_changes(server: LiveServer) -> None:
    queue = await _queue(server)
    conversation_id = await _conversation(server, queue)
    agent, _ = await make_user(server, "agent")
    boss, password = await make_user(server, "supervisor")
    browser = await login(server, boss.email, password)
    for path in READS:
        assert (await browser.get(PREFIX + path)).status_code == 200, path
    token = browser.headers.pop("X-CSRF-Token")
    for path, body in CHANGES:
        body = {**body, "conversation_id": conversation_id, "user_id": agent.id}
        response = await browser.post(PREFIX + path, json=body)
        assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed", path
    assert (
        await server.services.pool.fetchval(
            "SELECT count(*) FROM events WHERE conversation_id = $1", conversation_id
        )
        == 0
    )
    browser.headers["X-CSRF-Token"] = token
    response = await browser.post(f"{PREFIX}/note", json={"conversation_id": conversation_id, "text": "ok"})
    assert response.status_code == 200, response.text
    response = await browser.post(f"{PREFIX}/presence", json={"user_id": agent.id, "presence": "busy"})
    assert response.status_code == 200, response.text


async def test_markup_in_a_note_is_stored_and_returned_as_text(server: LiveServer) -> None:
    queue = await _queue(server)
    conversation_id = await _conversation(server, queue)
    response = await server.http.post(
        f"{PREFIX}/note", json={"conversation_id": conversation_id, "text": XSS}
    )
    assert response.status_code == 200 and response.json()["note"]["text"] == XSS
    assert response.headers["content-type"].startswith("application/json")
    stored = await server.services.pool.fetchval(
        "SELECT data ->> 'text' FROM events WHERE conversation_id = $1 AND kind = 'internal_note'",
        conversation_id,
    )
    assert stored == XSS
    timeline = (await server.http.get(f"/api/supervisor/conversations/{conversation_id}")).json()
    assert XSS in [a["data"].get("text") for a in timeline["actions"]]
    page = await server.http.get("/supervisor")  # the page renders with textContent, never markup
    assert "innerHTML" not in page.text and "insertAdjacentHTML" not in page.text


async def test_disabled_users_and_unknown_queues_cannot_be_assigned(server: LiveServer) -> None:
    pool = server.services.pool
    queue = await _queue(server)
    conversation_id = await _conversation(server, queue)
    gone, _ = await make_user(server, "agent")
    await pool.execute("UPDATE users SET disabled = true WHERE id = $1", gone.id)
    for to, code in [
        (f"agent:{gone.id}", "user_disabled"),
        ("queue:nope-" + secrets.token_hex(3), "unknown_queue"),
    ]:
        response = await server.http.post(
            f"{PREFIX}/assign", json={"conversation_id": conversation_id, "to": to}
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == code, response.text
    response = await server.http.post(
        f"{PREFIX}/presence", json={"user_id": gone.id, "presence": "available"}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "user_disabled"
    assert (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        == f"queue:{queue}"
    )
    assert (
        await pool.fetchval("SELECT count(*) FROM assignments WHERE conversation_id = $1", conversation_id)
        == 0
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE target = $1", f"conversation:{conversation_id}"
        )
        == 0
    )
