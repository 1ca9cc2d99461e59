"""Who may use the agent console and the supervisor pages, and that transcripts never become markup."""

from __future__ import annotations

import asyncio
import re
import secrets

import websockets

from tests.support import LiveServer, live_server, login, make_user

XSS = 'kumquat <script>alert("pwned")</script><img src=x onerror=alert(1)>'
PAGES = ["/console", "/supervisor", "/supervisor/conversations/1"]
SUPERVISOR_PAGES = ["/supervisor", "/supervisor/conversations/1"]
DESK_CHANGES = [
    ("POST", "/api/desk/presence", {"presence": "available"}),
    ("POST", "/api/desk/offers/1/accept", None),
    ("POST", "/api/desk/offers/1/decline", None),
    ("POST", "/api/desk/conversations/1/reply", {"text": "hello"}),
    ("POST", "/api/desk/conversations/1/hand-back", None),
    (
        "POST",
        "/api/desk/tickets/1/close",
        {"next_step": "call back", "next_step_due": "2099-01-01T00:00:00Z"},
    ),
    ("POST", "/api/desk/notifications/1/read", None),
]
DESK_READS = ["/api/desk/state", "/api/desk/conversations/1", "/api/desk/notifications"]
SUPERVISOR_APIS = [
    "/api/supervisor/conversations",
    "/api/supervisor/conversations/1",
    "/api/supervisor/live",
    "/api/supervisor/sla-breaches",
    "/api/supervisor/notifications",
]


async def test_console_and_supervisor_refuse_anonymous_callers(database_url: str) -> None:
    async with live_server(database_url) as server:
        anonymous = server.anonymous()
        for path in PAGES:
            response = await anonymous.get(path)
            assert response.status_code == 303 and response.headers["location"] == f"/login?next={path}", path
        for path in DESK_READS + SUPERVISOR_APIS:
            response = await anonymous.get(path)
            assert response.status_code == 401 and response.json()["error"]["code"] == "not_authenticated", (
                path
            )
        for method, path, body in DESK_CHANGES:
            response = await anonymous.request(method, path, json=body)
            assert response.status_code == 401, path


async def test_the_console_socket_refuses_anonymous_and_foreign_origins(database_url: str) -> None:
    async with live_server(database_url) as server:
        url = server.base_url.replace("http://", "ws://") + "/console/ws"
        await _assert_refused(url)
        user, password = await make_user(server, "agent")
        browser = await login(server, user.email, password)
        cookie = f"closeloop_session={browser.cookies['closeloop_session']}"
        await _assert_refused(url, {"Cookie": cookie, "Origin": "https://evil.example"})
        async with websockets.connect(
            url, additional_headers={"Cookie": cookie, "Origin": server.base_url}
        ) as ws:
            hello = await asyncio.wait_for(ws.recv(), 5)
            assert '"hello"' in str(hello)


async def _assert_refused(url: str, headers: dict[str, str] | None = None) -> None:
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
            await asyncio.wait_for(ws.recv(), 5)
    except websockets.InvalidStatus as e:
        assert e.response.status_code == 403
        return
    raise AssertionError("the console socket answered without a valid session")


async def test_agents_get_403_on_supervisor_pages_and_apis(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "agent")
        agent = await login(server, user.email, password)
        for path in SUPERVISOR_PAGES + SUPERVISOR_APIS:
            response = await agent.get(path)
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", path
        assert (await agent.get("/console")).status_code == 200
        assert (await agent.get("/api/desk/state")).status_code == 200

        boss, boss_password = await make_user(server, "supervisor")
        supervisor = await login(server, boss.email, boss_password)
        for path in ["/supervisor", "/api/supervisor/live", "/api/supervisor/sla-breaches", "/console"]:
            assert (await supervisor.get(path)).status_code == 200, path


async def test_desk_changes_without_the_csrf_token_are_refused(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "agent")
        browser = await login(server, user.email, password)
        token = browser.headers.pop("X-CSRF-Token")
        for method, path, body in DESK_CHANGES:
            response = await browser.request(method, path, json=body)
            assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed", path
        browser.headers["X-CSRF-Token"] = "wrong-" + token
        response = await browser.post("/api/desk/presence", json={"presence": "available"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed"
        agent = await server.services.desk.routing.agent(user.id)
        assert agent is None or agent.presence != "available"

        browser.headers["X-CSRF-Token"] = token
        response = await browser.post("/api/desk/presence", json={"presence": "available"})
        assert response.status_code == 200 and response.json()["agent"]["presence"] == "available"


async def test_closing_a_ticket_without_a_next_step_says_what_is_missing(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "agent")
        browser = await login(server, user.email, password)
        response = await browser.post(
            "/api/desk/tickets/1/close", json={"next_step": "", "next_step_due": None}
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "next_step_required"
        assert "next step" in response.json()["error"]["message"]


async def test_pages_never_interpolate_transcript_text(database_url: str) -> None:
    async with live_server(database_url) as server:
        conversation_id = await _conversation_with(server, XSS)
        boss, password = await make_user(server, "supervisor")
        supervisor = await login(server, boss.email, password)
        for path in ["/console", "/supervisor", f"/supervisor/conversations/{conversation_id}"]:
            page = await supervisor.get(path)
            assert page.status_code == 200, path
            assert "alert(" not in page.text and "onerror" not in page.text, path
            assert (
                "innerHTML" not in page.text
                and "insertAdjacentHTML" not in page.text
                and "document.write" not in page.text
            )
            assert "script-src 'unsafe-inline'" in page.headers["content-security-policy"]
            assert "connect-src 'self'" in page.headers["content-security-policy"]
            assert page.headers["x-frame-options"] == "DENY"
        # the stored text comes back as JSON data, for the page to put in textContent
        timeline = (await supervisor.get(f"/api/supervisor/conversations/{conversation_id}")).json()
        assert XSS in [m["body"] for m in timeline["messages"]]
        found = (await supervisor.get("/api/supervisor/conversations", params={"q": "kumquat"})).json()[
            "conversations"
        ]
        assert conversation_id in [c["id"] for c in found]


async def _conversation_with(server: LiveServer, text: str) -> int:
    services = server.services
    reply = await services.service.handle_text("webchat", "xss-" + secrets.token_hex(8), text)  # type: ignore[arg-type]
    assert re.match(r"^\d+$", str(reply.conversation_id))
    return int(reply.conversation_id)


def test_every_console_page_gets_the_shared_stylesheet_and_script_inlined() -> None:
    from web.console import page

    for name in ("console.html", "supervisor.html", "timeline.html"):
        html = page(name).body.decode()
        assert ":root { --brand" in html and "function el(tag, cls, text)" in html, name
        assert "inlined when the page is served" not in html, name
        assert '<script>\n"use strict";' in html, name
