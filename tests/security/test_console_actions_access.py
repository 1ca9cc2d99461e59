"""Who may use the console's actions: only the agent who holds a conversation notes, transfers or
resolves it; only admins edit canned replies; cookie sessions need the CSRF token; a note with
markup is stored as typed and rendered as text."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from tests.support import LiveServer, live_server, login, make_user, token_client

XSS = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        yield live


async def held_by_someone(server: LiveServer) -> tuple[int, int, int, str]:
    """A web chat and its ticket held by a fresh agent: ``(conversation, ticket, agent, queue)``."""
    s = server.services
    queue = "q" + secrets.token_hex(5)
    await s.desk.routing.upsert_queue(queue)
    holder, _ = await make_user(server, "agent")
    now = s.clock.now()
    conversation_id = await s.pool.fetchval(
        """INSERT INTO conversations (channel, address, status, owner, created_at, updated_at)
           VALUES ('webchat', $1, 'escalated', $2, $3, $3) RETURNING id""",
        "sec-" + secrets.token_hex(8),
        f"agent:{holder.id}",
        now,
    )
    ticket_id = await s.pool.fetchval(
        """INSERT INTO tickets (protocol, status, priority, queue, owner, subject, conversation_id, created_at, updated_at)
           VALUES ($1, 'open', 'normal', $2, $3, 'help', $4, $5, $5) RETURNING id""",
        "SC-" + secrets.token_hex(6),
        queue,
        f"agent:{holder.id}",
        conversation_id,
        now,
    )
    await s.pool.execute("UPDATE conversations SET ticket_id = $2 WHERE id = $1", conversation_id, ticket_id)
    return conversation_id, ticket_id, holder.id, queue


def close_body(server: LiveServer) -> dict[str, str]:
    due = (server.services.clock.now() + timedelta(days=1)).isoformat()
    return {"next_step": "call back", "next_step_due": due, "wrap_up": "resolved"}


async def test_an_agent_cannot_note_transfer_or_resolve_a_conversation_they_do_not_hold(
    server: LiveServer,
) -> None:
    pool = server.services.pool
    conversation_id, ticket_id, holder, queue = await held_by_someone(server)
    user, password = await make_user(server, "agent")
    by_session = await login(server, user.email, password)
    by_token = await token_client(server, "agent")
    for client in (by_session, by_token):
        attempts = [
            (f"/api/desk/conversations/{conversation_id}/notes", {"text": "mine now"}),
            (f"/api/desk/conversations/{conversation_id}/transfer", {"to": f"queue:{queue}"}),
            (f"/api/desk/tickets/{ticket_id}/close", close_body(server)),
        ]
        for path, body in attempts:
            response = await client.post(path, json=body)
            assert response.status_code == 403 and response.json()["error"]["code"] == "not_owner", path
    assert (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        == f"agent:{holder}"
    )
    ticket = await pool.fetchrow("SELECT status, wrap_up FROM tickets WHERE id = $1", ticket_id)
    assert (ticket["status"], ticket["wrap_up"]) == ("open", None)
    assert await pool.fetchval("SELECT count(*) FROM events WHERE conversation_id = $1", conversation_id) == 0
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE target = $1", f"conversation:{conversation_id}"
        )
        == 0
    )


async def test_only_admins_edit_canned_replies(server: LiveServer) -> None:
    queue = "q" + secrets.token_hex(5)
    await server.services.desk.routing.upsert_queue(queue)
    made = await server.http.post(
        "/api/desk/canned-replies", json={"queue": queue, "title": "Hi", "body": "Hello!"}
    )
    assert made.status_code == 201
    reply_id = made.json()["canned_reply"]["id"]
    body = {"queue": queue, "title": "Hi", "body": "changed"}
    for role in ("agent", "supervisor"):
        user, password = await make_user(server, role)
        for client in (await login(server, user.email, password), await token_client(server, role)):
            for method, path in [
                ("POST", "/api/desk/canned-replies"),
                ("PUT", f"/api/desk/canned-replies/{reply_id}"),
                ("DELETE", f"/api/desk/canned-replies/{reply_id}"),
            ]:
                response = await client.request(method, path, json=body if method != "DELETE" else None)
                assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", (
                    role,
                    method,
                )
            assert (await client.get("/api/desk/canned-replies")).status_code == 200  # reading is for staff
    anonymous = await server.anonymous().get("/api/desk/canned-replies")
    assert anonymous.status_code == 401
    assert (
        await server.services.pool.fetchval("SELECT body FROM canned_replies WHERE id = $1", reply_id)
        == "Hello!"
    )


async def test_cookie_sessions_need_the_csrf_token_for_every_console_action(server: LiveServer) -> None:
    pool = server.services.pool
    conversation_id, ticket_id, holder_id, queue = await held_by_someone(server)
    holder = await server.services.users.get(holder_id)
    assert holder is not None
    password = secrets.token_urlsafe(12)
    await server.services.users.set_password(holder.id, password)
    browser = await login(server, holder.email, password)
    browser.headers.pop("X-CSRF-Token")
    admin_password = secrets.token_urlsafe(12)
    admin, _ = await make_user(server, "admin", password=admin_password)
    admin_browser = await login(server, admin.email, admin_password)
    admin_browser.headers.pop("X-CSRF-Token")
    attempts = [
        (browser, f"/api/desk/conversations/{conversation_id}/notes", {"text": "hi"}),
        (browser, f"/api/desk/conversations/{conversation_id}/transfer", {"to": f"queue:{queue}"}),
        (browser, f"/api/desk/tickets/{ticket_id}/close", close_body(server)),
        (admin_browser, "/api/desk/canned-replies", {"queue": queue, "title": "t", "body": "b"}),
    ]
    for client, path, body in attempts:
        response = await client.post(path, json=body)
        assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed", path
    assert (
        await pool.fetchval("SELECT owner FROM conversations WHERE id = $1", conversation_id)
        == f"agent:{holder_id}"
    )
    assert await pool.fetchval("SELECT count(*) FROM events WHERE conversation_id = $1", conversation_id) == 0
    assert await pool.fetchval("SELECT count(*) FROM canned_replies WHERE queue = $1", queue) == 0


async def test_a_note_with_markup_is_stored_as_typed_and_rendered_as_text(server: LiveServer) -> None:
    conversation_id, _, holder_id, _ = await held_by_someone(server)
    holder = await server.services.users.get(holder_id)
    assert holder is not None
    password = secrets.token_urlsafe(12)
    await server.services.users.set_password(holder.id, password)
    browser = await login(server, holder.email, password)
    response = await browser.post(f"/api/desk/conversations/{conversation_id}/notes", json={"text": XSS})
    assert response.status_code == 200 and response.json()["note"]["text"] == XSS
    conv = (await browser.get(f"/api/desk/conversations/{conversation_id}")).json()
    assert [n["text"] for n in conv["notes"]] == [XSS]
    # the console renders notes with textContent (el()), never as HTML, and never puts them in the page
    page = (await browser.get("/console")).text
    assert "alert(" not in page and "onerror" not in page
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    note_renderer = page[page.index("function addNote") : page.index("const THREAD_CONTROLS")]
    assert 'el("div", "bubble", n.text)' in note_renderer
