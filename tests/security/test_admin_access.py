"""Who may use the admin console, that intent text never becomes markup, and that the audit log
cannot be written or erased through any route."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support import LiveServer, live_server, login, make_user, token_client
from web.admin import admin_router

XSS = 'kumquat <script>alert("pwned")</script><img src=x onerror=alert(1)>'
PAGE = Path(__file__).resolve().parents[2] / "web" / "console" / "admin.html"
ADMIN_APIS = [
    ("GET", "/api/admin/intents.yaml", None),
    ("POST", "/api/admin/intents/import", {"yaml": "- name: x\n  examples: [a]\n"}),
    ("POST", "/api/admin/try", {"phrases": ["where is my order"]}),
    ("GET", "/api/admin/collisions", None),
    ("GET", "/api/admin/audit", None),
]
INTENT_CHANGES = [
    ("POST", "/api/intents", {"name": "intruder", "examples": ["a"]}),
    ("PUT", "/api/intents/intruder", {"examples": ["a"]}),
    ("DELETE", "/api/intents/intruder", None),
]


def mount_admin(server: LiveServer) -> None:
    """Mount the admin router unless app/routes.py already does."""
    if not any(getattr(r, "path", "") == "/admin" for r in server.app.routes):
        server.app.include_router(admin_router(server.app.state.services))


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        mount_admin(live)
        yield live


async def request(client: httpx.AsyncClient, method: str, path: str, body: object) -> httpx.Response:
    return (
        await client.request(method, path, json=body)
        if body is not None
        else await client.request(method, path)
    )


async def test_anonymous_callers_are_sent_to_sign_in_or_refused(server: LiveServer) -> None:
    anonymous = server.anonymous()
    page = await anonymous.get("/admin")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/admin"
    for method, path, body in ADMIN_APIS + INTENT_CHANGES:
        response = await request(anonymous, method, path, body)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "not_authenticated"


@pytest.mark.parametrize("role", ["agent", "supervisor"])
async def test_agents_and_supervisors_are_refused_everywhere(server: LiveServer, role: str) -> None:
    user, password = await make_user(server, role)
    browser = await login(server, user.email, password)
    page = await browser.get("/admin")
    assert page.status_code == 403 and XSS not in page.text
    by_token = await token_client(server, role)
    audit_before = await server.services.pool.fetchval("SELECT count(*) FROM audit_log")
    for client in (browser, by_token):
        for method, path, body in ADMIN_APIS + INTENT_CHANGES:
            response = await request(client, method, path, body)
            assert response.status_code == 403, (role, method, path, response.status_code)
            assert response.json()["error"]["code"] == "forbidden"
    assert await server.services.intents.get("intruder") is None
    assert await server.services.intents.get("x") is None
    assert await server.services.pool.fetchval("SELECT count(*) FROM audit_log") == audit_before


async def test_an_admin_session_needs_the_csrf_token_for_changes(server: LiveServer) -> None:
    user, password = await make_user(server, "admin")
    browser = await login(server, user.email, password)
    assert (await browser.get("/admin")).status_code == 200
    del browser.headers["X-CSRF-Token"]
    for method, path, body in ADMIN_APIS:
        if method == "GET":
            continue
        response = await request(browser, method, path, body)
        assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed", path


async def test_markup_in_an_example_is_stored_and_returned_as_text(server: LiveServer) -> None:
    name = "xss_probe"
    body = {"name": name, "description": XSS, "examples": [XSS, "kumquat markup test"], "answer": XSS}
    created = await server.http.post("/api/intents", json=body)
    assert created.status_code == 201, created.text
    try:
        stored = (await server.http.get(f"/api/intents/{name}")).json()
        assert stored["examples"][0] == XSS and stored["answer"] == XSS
        tried = (await server.http.post("/api/admin/try", json={"phrases": [XSS]})).json()["results"][0]
        assert tried["phrase"] == XSS
        entries = (await server.http.get("/api/admin/audit", params={"target": name})).json()["entries"]
        assert entries[0]["after"]["examples"][0] == XSS
        exported = await server.http.get("/api/admin/intents.yaml")
        assert exported.headers["content-type"].startswith("application/yaml")
        assert exported.headers["x-content-type-options"] == "nosniff"
        user, password = await make_user(server, "admin")
        page = await (await login(server, user.email, password)).get("/admin")
        assert page.status_code == 200 and XSS not in page.text and "<script>alert" not in page.text
    finally:
        await server.http.delete(f"/api/intents/{name}")


def test_the_page_renders_data_with_text_content_only() -> None:
    html = PAGE.read_text(encoding="utf-8")
    script = html[html.index("<script>") :]
    assert "textContent" in script
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in html, sink
    assert not re.search(r"<(?:script|link|img|iframe)[^>]+src=", html)  # no external resources
    assert "http://" not in html and "https://" not in html


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_no_route_writes_or_erases_audit_entries(server: LiveServer, method: str) -> None:
    pool = server.services.pool
    name = f"audit_probe_{method.lower()}"
    assert (
        await server.http.post("/api/intents", json={"name": name, "examples": ["probe"]})
    ).status_code == 201
    await server.http.delete(f"/api/intents/{name}")
    entry = await pool.fetchrow("SELECT * FROM audit_log WHERE target = $1 ORDER BY id LIMIT 1", name)
    assert entry is not None
    snapshot = await pool.fetch("SELECT * FROM audit_log ORDER BY id")
    forged = {"kind": "intent.delete", "target": name, "user_email": "nobody@example.com", "before": None}
    for path in (
        "/api/admin/audit",
        f"/api/admin/audit/{entry['id']}",
        "/api/audit",
        f"/api/audit/{entry['id']}",
    ):
        response = await server.http.request(method, path, json=forged)
        assert response.status_code in (404, 405), (method, path, response.status_code)
    assert await pool.fetch("SELECT * FROM audit_log ORDER BY id") == snapshot


async def test_the_database_refuses_to_change_or_delete_audit_entries(server: LiveServer) -> None:
    pool = server.services.pool
    name = "audit_probe_db"
    assert (
        await server.http.post("/api/intents", json={"name": name, "examples": ["probe"]})
    ).status_code == 201
    await server.http.delete(f"/api/intents/{name}")
    entry_id = await pool.fetchval("SELECT id FROM audit_log WHERE target = $1 ORDER BY id LIMIT 1", name)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("UPDATE audit_log SET user_email = 'someone@example.com' WHERE id = $1", entry_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("DELETE FROM audit_log WHERE id = $1", entry_id)
    assert (
        await pool.fetchval("SELECT user_email FROM audit_log WHERE id = $1", entry_id) == server.admin.email
    )
