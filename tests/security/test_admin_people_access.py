"""Who may manage queues, people, API tokens and the matching threshold (admins only, with the CSRF
token on a browser session), and that no token secret or password leaks into a listing or the
audit log."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support import LiveServer, live_server, login, make_user, token_client, unique_email

NEW_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/api/admin/queues", None),
    ("POST", "/api/admin/queues", {"name": "intruder-queue"}),
    ("PUT", "/api/admin/queues/support", {"description": "taken over"}),
    ("GET", "/api/admin/users", None),
    ("POST", "/api/admin/users", {"email": "intruder@example.com", "name": "Intruder", "role": "admin"}),
    ("PATCH", "/api/admin/users/{victim}", {"role": "admin"}),
    ("POST", "/api/admin/users/{victim}/disable", None),
    ("POST", "/api/admin/users/{victim}/enable", None),
    ("POST", "/api/admin/users/{victim}/password", None),
    ("GET", "/api/admin/tokens", None),
    ("POST", "/api/admin/users/{victim}/tokens", {"name": "stolen"}),
    ("POST", "/api/admin/tokens/{token}/revoke", None),
    ("GET", "/api/admin/matching", None),
    ("PUT", "/api/admin/matching", {"threshold": 0.01, "margin": 0, "max_misses": 5}),
    ("GET", "/api/admin/matching/heldout", None),
    ("POST", "/api/admin/matching/evaluate", {"lines": "hi => greeting"}),
]


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:  # app/routes.py mounts the admin router
        yield live


@pytest.fixture(scope="module")
async def targets(server: LiveServer) -> dict[str, int]:
    """A user and a live token of theirs that the refused requests aim at."""
    victim, _ = await make_user(server, "agent")
    created = await server.http.post(f"/api/admin/users/{victim.id}/tokens", json={"name": "victim"})
    assert created.status_code == 201
    return {"victim": victim.id, "token": created.json()["token"]["id"]}


def routes(targets: dict[str, int]) -> list[tuple[str, str, Any]]:
    return [(m, p.format(**targets), b) for m, p, b in NEW_ROUTES]


async def request(client: httpx.AsyncClient, method: str, path: str, body: Any) -> httpx.Response:
    if body is None:
        return await client.request(method, path)
    return await client.request(method, path, json=body)


async def snapshot(server: LiveServer) -> tuple[Any, ...]:
    pool = server.services.pool
    return (
        await pool.fetchval("SELECT count(*) FROM audit_log"),
        await pool.fetch("SELECT id, role, disabled, password_hash FROM users ORDER BY id"),
        await pool.fetch("SELECT id, revoked_at FROM api_tokens ORDER BY id"),
        await pool.fetch("SELECT * FROM queues ORDER BY name"),
        await pool.fetch("SELECT threshold, margin, max_misses FROM intent_matching"),
    )


async def test_anonymous_callers_are_refused(server: LiveServer, targets: dict[str, int]) -> None:
    anonymous = server.anonymous()
    before = await snapshot(server)
    for method, path, body in routes(targets):
        response = await request(anonymous, method, path, body)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "not_authenticated"
    assert await snapshot(server) == before


@pytest.mark.parametrize("role", ["agent", "supervisor"])
async def test_agents_and_supervisors_get_403_on_every_route(
    server: LiveServer, targets: dict[str, int], role: str
) -> None:
    user, password = await make_user(server, role)
    browser = await login(server, user.email, password)
    by_token = await token_client(server, role)
    before = await snapshot(server)
    for client in (browser, by_token):
        for method, path, body in routes(targets):
            response = await request(client, method, path, body)
            assert response.status_code == 403, (role, method, path, response.status_code)
            assert response.json()["error"]["code"] == "forbidden"
    assert await snapshot(server) == before
    assert await server.services.users.get_by_email("intruder@example.com") is None


async def test_an_admin_session_needs_the_csrf_token_for_every_change(
    server: LiveServer, targets: dict[str, int]
) -> None:
    user, password = await make_user(server, "admin")
    browser = await login(server, user.email, password)
    assert (await browser.get("/api/admin/users")).status_code == 200  # reads need none
    csrf = browser.headers.pop("X-CSRF-Token")
    before = await snapshot(server)
    for method, path, body in routes(targets):
        if method == "GET":
            continue
        response = await request(browser, method, path, body)
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "csrf_failed"
        # a form posted from another site carries the cookie but not the token
        forged = await browser.request(method, path, data={"name": "forged", "csrf_token": "guess"})
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "csrf_failed", path
    assert await snapshot(server) == before
    browser.headers["X-CSRF-Token"] = csrf
    allowed = await browser.post(f"/api/admin/users/{targets['victim']}/password")
    assert allowed.status_code == 200  # with the token the same session may


async def test_token_secrets_appear_once_and_never_in_listings_or_the_audit_log(server: LiveServer) -> None:
    owner, _ = await make_user(server, "supervisor")
    created = await server.http.post(f"/api/admin/users/{owner.id}/tokens", json={"name": "exporter"})
    assert created.status_code == 201
    secret = created.json()["secret"]
    hashed = hashlib.sha256(secret.encode()).hexdigest()
    revoked = await server.http.post(f"/api/admin/tokens/{created.json()['token']['id']}/revoke")
    assert revoked.status_code == 200
    for path in ("/api/admin/tokens", "/api/admin/users", "/api/admin/audit?limit=500"):
        text = (await server.http.get(path)).text
        assert secret not in text and hashed not in text, path
    assert secret not in revoked.text and hashed not in revoked.text
    rows = await server.services.pool.fetch("SELECT before::text, after::text FROM audit_log")
    assert rows and all(secret not in (r["before"] or "") + (r["after"] or "") for r in rows)
    assert all(hashed not in (r["before"] or "") + (r["after"] or "") for r in rows)


async def test_passwords_never_reach_the_audit_log_or_a_listing(server: LiveServer) -> None:
    created = await server.http.post(
        "/api/admin/users", json={"email": unique_email("pw"), "name": "Pw Probe", "role": "agent"}
    )
    assert created.status_code == 201
    uid, first = created.json()["user"]["id"], created.json()["password"]
    reset = await server.http.post(f"/api/admin/users/{uid}/password")
    second = reset.json()["password"]
    stored_hash = await server.services.pool.fetchval("SELECT password_hash FROM users WHERE id = $1", uid)
    rows = await server.services.pool.fetch("SELECT before::text, after::text FROM audit_log")
    for secret in (first, second, stored_hash):
        assert all(secret not in (r["before"] or "") + (r["after"] or "") for r in rows)
        for path in ("/api/admin/users", "/api/admin/audit?limit=500"):
            assert secret not in (await server.http.get(path)).text
    assert "password" not in created.json()["user"] and "password_hash" not in reset.text
