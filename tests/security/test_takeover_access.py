"""Who may join, take over, reply, hand back and close; who may list conversations; CSRF on
cookie sessions; and that a sort parameter never reaches SQL as text."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from tests.support import LiveServer, bearer, live_server, login, make_token, make_user, token_client

PREFIX = "/api/supervisor/actions"
ACTIONS = ["/join", "/leave", "/takeover", "/reply", "/hand-back", "/close"]


def body(path: str, conversation_id: int) -> dict[str, object]:
    extra: dict[str, object] = {"text": "hello"} if path == "/reply" else {}
    if path == "/close":
        extra = {"next_step": "call back", "next_step_due": "2999-01-01T00:00:00+00:00"}
    return {"conversation_id": conversation_id, **extra}


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        yield live


async def _conversation(server: LiveServer, owner: str = "ai") -> int:
    s = server.services
    now = s.clock.now()
    return int(
        await s.pool.fetchval(
            """INSERT INTO conversations (channel, address, status, owner, created_at, updated_at)
               VALUES ('webchat', $1, 'open', $2, $3, $3) RETURNING id""",
            "tko-" + secrets.token_hex(8),
            owner,
            now,
        )
    )


async def _trail(server: LiveServer, conversation_id: int) -> tuple[str, int, int]:
    pool = server.services.pool
    return (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id),
        await pool.fetchval("SELECT count(*) FROM events WHERE conversation_id = $1", conversation_id),
        await pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE target = $1", f"conversation:{conversation_id}"
        ),
    )


async def test_anonymous_callers_are_refused(server: LiveServer) -> None:
    conversation_id = await _conversation(server)
    anonymous = server.anonymous()
    for path in ACTIONS:
        response = await anonymous.post(PREFIX + path, json=body(path, conversation_id))
        assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated", path
    response = await anonymous.get("/api/supervisor/conversations")
    assert response.status_code == 401
    assert await _trail(server, conversation_id) == ("ai", 0, 0)


async def test_agents_cannot_take_over_or_act_on_others_conversations(server: LiveServer) -> None:
    colleague, _ = await make_user(server, "agent")
    conversation_id = await _conversation(server, owner=f"agent:{colleague.id}")
    user, password = await make_user(server, "agent")
    by_session = await login(server, user.email, password)
    by_token = await token_client(server, "agent")
    for client in (by_session, by_token):
        for path in ACTIONS:
            response = await client.post(PREFIX + path, json=body(path, conversation_id))
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", path
        # nor through the agent console: only the owner writes or hands back
        response = await client.post(f"/api/desk/conversations/{conversation_id}/reply", json={"text": "hi"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "not_owner"
        response = await client.post(f"/api/desk/conversations/{conversation_id}/hand-back")
        assert response.status_code == 403 and response.json()["error"]["code"] == "not_owner"
    assert await _trail(server, conversation_id) == (f"agent:{colleague.id}", 0, 0)


async def test_agents_cannot_read_the_list_beyond_their_scope(server: LiveServer) -> None:
    boss, boss_password = await make_user(server, "supervisor")
    taken = await _conversation(server)
    browser = await login(server, boss.email, boss_password)
    assert (await browser.post(f"{PREFIX}/takeover", json={"conversation_id": taken})).status_code == 200
    agent, _ = await make_user(server, "agent")
    mine = await _conversation(server, owner=f"agent:{agent.id}")
    client = server.client(bearer(await make_token(server, agent)))
    for params in ({}, {"sort": "id"}, {"ids": f"{taken},{mine}"}, {"metric": "contacts"}):
        response = await client.get("/api/supervisor/conversations", params=params)
        assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", params
    listed = (await client.get("/api/conversations", params={"limit": 500})).json()["conversations"]
    ids = {c["id"] for c in listed}
    assert mine in ids and taken not in ids
    response = await client.get(f"/api/conversations/{taken}")
    assert response.status_code == 404
    response = await client.get(f"/api/supervisor/conversations/{taken}")
    assert response.status_code == 403


async def test_another_supervisor_cannot_write_in_a_conversation_taken_over(server: LiveServer) -> None:
    conversation_id = await _conversation(server)
    first, first_password = await make_user(server, "supervisor")
    second, second_password = await make_user(server, "supervisor")
    one = await login(server, first.email, first_password)
    two = await login(server, second.email, second_password)
    assert (
        await one.post(f"{PREFIX}/takeover", json={"conversation_id": conversation_id})
    ).status_code == 200
    for path in ("/reply", "/hand-back"):
        response = await two.post(PREFIX + path, json=body(path, conversation_id))
        assert response.status_code == 403 and response.json()["error"]["code"] == "not_owner", path
    assert (await _trail(server, conversation_id))[0] == f"agent:{first.id}"


async def test_supervisor_sessions_need_the_csrf_token(server: LiveServer) -> None:
    conversation_id = await _conversation(server)
    boss, password = await make_user(server, "supervisor")
    browser = await login(server, boss.email, password)
    token = browser.headers.pop("X-CSRF-Token")
    for path in ACTIONS:
        response = await browser.post(PREFIX + path, json=body(path, conversation_id))
        assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed", path
    browser.headers["X-CSRF-Token"] = "not-" + token
    response = await browser.post(f"{PREFIX}/takeover", json={"conversation_id": conversation_id})
    assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed"
    assert await _trail(server, conversation_id) == ("ai", 0, 0)
    browser.headers["X-CSRF-Token"] = token
    response = await browser.post(f"{PREFIX}/takeover", json={"conversation_id": conversation_id})
    assert response.status_code == 200, response.text
    assert (await _trail(server, conversation_id))[0] == f"agent:{boss.id}"


async def test_a_sort_parameter_is_a_name_from_a_list_never_sql(server: LiveServer) -> None:
    await _conversation(server)
    before = await server.services.pool.fetchval("SELECT count(*) FROM conversations")
    for sort in (
        "id;DROP TABLE conversations",
        "id; DROP TABLE conversations --",
        "(SELECT 1)",
        "c.id",
        "id desc",
        "--id",
        "-",
        "started,id",
    ):
        response = await server.http.get("/api/supervisor/conversations", params={"sort": sort})
        assert response.status_code == 422, (sort, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_sort" and "must be one of" in error["message"]
    assert await server.services.pool.fetchval("SELECT count(*) FROM conversations") == before
    response = await server.http.get("/api/supervisor/conversations", params={"sort": "-started"})
    assert response.status_code == 200 and response.json()["sort"] == "-started"
