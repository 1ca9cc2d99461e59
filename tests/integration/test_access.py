"""Who may use what: sign-in, sessions, CSRF, API tokens and roles, against the real server."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import websockets
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute, APIWebSocketRoute

from crm_bridge.users import hash_secret
from pipeline.clock import FakeClock
from tests.support import (
    LiveServer,
    bearer,
    live_server,
    login,
    make_token,
    make_user,
    process_env,
    token_client,
    unique_email,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Routes anyone may call, and why. Everything else must refuse a caller without credentials.
PUBLIC = {
    "/healthz": "load balancers and uptime checks",
    "/readyz": "load balancers: whether to send this node new work (says nothing else)",
    "/webrtc/offer": "a call from the customer's chat page (limited per address, tests/security/test_webrtc_offers.py)",
    "/webrtc/config": "the ICE servers the chat page needs to place a call",
    "/webrtc/hangup": "ends the caller's own call, named by its unguessable id",
    "/chat": "the customer's web chat (page and socket)",
    "/labels/{code}": "the return label a customer opens from a text message",
    "/login": "the sign-in page",
    "/logout": "ends the caller's own session; without one it only redirects to /login",
    "/": "redirects to the customer chat",
}
TWILIO_PREFIX = "/twilio/"  # protected by Twilio signatures instead (tests/integration/test_text_channels.py)

INTENT = {
    "name": "gift_card",
    "examples": ["do you sell gift cards", "can I buy a gift card"],
    "action": "faq",
    "answer": "Yes, from $10.",
}


def _filled(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def _routes(app: Any) -> Iterator[tuple[str, Any, Any]]:
    """``(path, route, effective)`` of every route, included routers flattened (newer FastAPI
    keeps them nested); ``effective`` answers ``methods`` and ``response_class`` as served."""
    try:
        from fastapi.routing import iter_route_contexts  # noqa: PLC0415 - FastAPI >= 0.160
    except ImportError:
        for route in app.routes:
            yield route.path, route, route
        return
    for context in iter_route_contexts(app.routes):
        yield context.path, context.original_route, context


def _is_page(effective: Any) -> bool:
    response_class = getattr(effective.response_class, "value", effective.response_class)  # unwrap Default()
    return isinstance(response_class, type) and issubclass(response_class, HTMLResponse)


def _session_cookie(response: httpx.Response) -> str:
    [cookie] = [c for c in response.headers.get_list("set-cookie") if c.startswith("closeloop_session=")]
    return cookie


async def _sign_in(
    client: httpx.AsyncClient, email: str, password: str, next_path: str = "/login"
) -> httpx.Response:
    return await client.post("/login", data={"email": email, "password": password, "next": next_path})


async def test_no_page_or_api_route_answers_without_credentials(database_url: str) -> None:
    async with live_server(database_url) as server:
        anonymous = server.anonymous()
        forged = server.client(bearer("clk_" + "x" * 43))
        checked: set[str] = set()
        for path, route, effective in _routes(server.app):
            if path in PUBLIC or path.startswith(TWILIO_PREFIX):
                continue
            if isinstance(route, APIWebSocketRoute):
                await _assert_socket_refused(server, _filled(path))
                checked.add(path)
                continue
            assert isinstance(route, APIRoute), f"{path}: unexpected route type {type(route).__name__}"
            for method in sorted(set(effective.methods) - {"HEAD"}):
                url = _filled(path)
                response = await anonymous.request(method, url)
                if _is_page(effective):
                    assert response.status_code == 303, (method, path, response.status_code)
                    assert response.headers["location"] == "/login?next=" + url, (method, path)
                else:
                    assert response.status_code == 401, (method, path, response.status_code, response.text)
                    assert response.json()["error"]["code"] == "not_authenticated", (method, path)
                    assert response.headers["www-authenticate"] == "Bearer"
                    refused = await forged.request(method, url)
                    assert (
                        refused.status_code == 401 and refused.json()["error"]["code"] == "not_authenticated"
                    ), (method, path)
                checked.add(path)
        expected = {
            "/api/conversations",
            "/api/conversations/{conversation_id}",
            "/api/tickets",
            "/api/tickets/{ref}",
            "/api/customers/{ref}",
            "/api/orders/{number}",
            "/api/intents",
            "/api/intents/{name}",
            "/api/me",
            "/metrics",
            "/docs",
            "/openapi.json",
        }
        assert expected <= checked, expected - checked

        # and the public ones stay public
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/chat")).status_code == 200
        assert (await anonymous.get("/login")).status_code == 200
        assert (await anonymous.get("/labels/RL-NOPE")).json()["error"]["code"] == "label_not_found"


async def _assert_socket_refused(server: LiveServer, path: str) -> None:
    url = server.base_url.replace("http://", "ws://") + path
    try:
        async with websockets.connect(url, open_timeout=5) as ws:
            await asyncio.wait_for(ws.recv(), 5)
    except (websockets.InvalidStatus, websockets.ConnectionClosed):
        return
    raise AssertionError(f"WS {path} answered without credentials")


async def test_the_docs_send_people_to_sign_in_and_back(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "agent")
        browser = server.anonymous()
        first = await browser.get("/docs")
        assert first.status_code == 303 and first.headers["location"] == "/login?next=/docs"
        page = await browser.get(first.headers["location"])
        assert page.status_code == 200
        assert '<input type="hidden" name="next" value="/docs">' in page.text
        assert '<label for="email">' in page.text and '<label for="password">' in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

        signed_in = await _sign_in(browser, user.email, password, "/docs")
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/docs"
        docs = await browser.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        # offline: every script, style and icon comes from this server, never a CDN
        urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", docs.text)
        assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
        assert assets and all(u.startswith("/docs/assets/") for u in assets), urls
        for url in assets:
            asset = await browser.get(url)
            assert asset.status_code == 200 and len(asset.content) > 500, url
        assert (await browser.get("/docs/assets/..%2Fswagger-initializer.js")).status_code == 404
        assert (await browser.get("/docs/assets/index.html")).status_code == 404  # only what /docs uses
        schema = (await browser.get("/openapi.json")).json()
        assert {"api_token", "session"} <= set(schema["components"]["securitySchemes"])

        # without a page to go back to, each role lands on the page it works in
        for role, home in (("agent", "/console"), ("supervisor", "/supervisor"), ("admin", "/admin")):
            someone, secret = await make_user(server, role)
            landed = await _sign_in(server.anonymous(), someone.email, secret)
            assert landed.status_code == 303 and landed.headers["location"] == home

        # signed in, /login shows who you are and /login?next=... goes straight there
        me_page = await browser.get("/login")
        assert user.name in me_page.text and 'action="/logout"' in me_page.text
        onward = await browser.get("/login", params={"next": "/api/tickets"})
        assert onward.status_code == 303 and onward.headers["location"] == "/api/tickets"


async def test_sign_in_sets_a_hardened_cookie_of_which_only_a_hash_is_stored(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "agent")
        browser = server.anonymous()
        response = await _sign_in(browser, user.email.upper(), password)
        assert response.status_code == 303
        cookie = _session_cookie(response)
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "path", "max-age"} <= attributes
        assert "samesite=lax" in cookie.lower()
        assert "secure" not in attributes  # this server is reached over http://
        assert "max-age=43200" in cookie.lower()  # 12 hours by default
        value = cookie.split(";")[0].split("=", 1)[1]
        stored = await server.services.pool.fetch(
            "SELECT token_hash FROM sessions WHERE user_id = $1", user.id
        )
        assert [r["token_hash"] for r in stored] == [hash_secret(value)]

        me = (await browser.get("/api/me")).json()
        assert me["user"]["email"] == user.email and me["user"]["role"] == "agent" and me["auth"] == "session"
        assert len(me["csrf_token"]) >= 40
        assert (await browser.get("/api/conversations")).status_code == 200


async def test_wrong_passwords_get_one_generic_answer_that_does_not_echo_markup(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "agent")
        browser = server.anonymous()
        for email, secret in (
            (user.email, "wrong password"),
            (unique_email("nobody"), password),
            ('"><script>x()</script>', "x" * 12),
            (user.email, ""),
        ):
            response = await _sign_in(browser, email, secret)
            assert response.status_code == 401
            assert "The email or password is wrong." in response.text
            assert "<script>x()" not in response.text
            assert not [
                c for c in response.headers.get_list("set-cookie") if c.startswith("closeloop_session=")
            ]
        assert (await browser.get("/api/me")).status_code == 401


async def test_sign_out_needs_the_csrf_token_and_ends_the_session(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "supervisor")
        browser = await login(server, user.email, password)
        csrf = browser.headers.pop("X-CSRF-Token")
        cookie_value = browser.cookies["closeloop_session"]

        refused = await browser.post("/logout", data={})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
        assert (await browser.get("/api/me")).status_code == 200

        done = await browser.post("/logout", data={"csrf_token": csrf})  # as the HTML form sends it
        assert done.status_code == 303 and done.headers["location"] == "/login"
        assert (
            "closeloop_session=" in done.headers["set-cookie"]
            and "max-age=0" in done.headers["set-cookie"].lower()
        )
        assert (await browser.get("/api/me")).status_code == 401
        replayed = server.client()
        replayed.cookies.set("closeloop_session", cookie_value)
        assert (await replayed.get("/api/me")).status_code == 401


async def test_changes_with_a_cookie_session_need_the_csrf_token(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "admin")
        browser = await login(server, user.email, password)
        csrf = browser.headers.pop("X-CSRF-Token")

        for headers in ({}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": csrf[:-2] + "xx"}):
            refused = await browser.post("/api/intents", json=INTENT, headers=headers)
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed", headers
        # a form post with the token in the wrong field is no better
        refused = await browser.post("/api/intents", data={"token": csrf})
        assert refused.json()["error"]["code"] == "csrf_failed"
        assert (await browser.get("/api/intents/gift_card")).status_code == 404  # nothing was created

        created = await browser.post("/api/intents", json=INTENT, headers={"X-CSRF-Token": csrf})
        assert created.status_code == 201
        changed = await browser.put("/api/intents/gift_card", json={**INTENT, "answer": "From $5."})
        assert changed.json()["error"]["code"] == "csrf_failed"
        changed = await browser.put(
            "/api/intents/gift_card", json={**INTENT, "answer": "From $5."}, headers={"X-CSRF-Token": csrf}
        )
        assert changed.status_code == 200
        assert (await browser.delete("/api/intents/gift_card")).json()["error"]["code"] == "csrf_failed"
        assert (
            await browser.delete("/api/intents/gift_card", headers={"X-CSRF-Token": csrf})
        ).status_code == 204


async def test_sign_in_forms_posted_from_another_site_are_refused(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "agent")
        browser = server.anonymous()
        response = await browser.post(
            "/login",
            data={"email": user.email, "password": password},
            headers={"Origin": "https://evil.example"},
        )
        assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed"
        assert "set-cookie" not in response.headers
        same_site = await browser.post(
            "/login",
            data={"email": user.email, "password": password, "next": "https://evil.example/"},
            headers={"Origin": server.base_url},
        )
        # never off-site: the agent lands on their own page instead
        assert same_site.status_code == 303 and same_site.headers["location"] == "/console"


async def test_roles_decide_what_each_person_may_do(database_url: str) -> None:
    async with live_server(database_url) as server:
        agent = await token_client(server, "agent")
        supervisor = await token_client(server, "supervisor")
        admin = server.http

        for client in (agent, supervisor, admin):
            for path in ("/api/conversations", "/api/tickets", "/api/me", "/docs", "/openapi.json"):
                assert (await client.get(path)).status_code == 200, path

        for method, path, body in (
            ("GET", "/api/intents", None),
            ("GET", "/api/intents/refund", None),
            ("POST", "/api/intents", INTENT),
            ("PUT", "/api/intents/refund", INTENT),
            ("DELETE", "/api/intents/refund", None),
            ("GET", "/metrics", None),
        ):
            response = await agent.request(method, path, json=body)
            assert response.status_code == 403, (method, path)
            assert response.json()["error"]["code"] == "forbidden"
            assert "admin" in response.json()["error"]["message"]

        assert (await supervisor.get("/api/intents")).status_code == 200
        assert (await supervisor.get("/api/intents/refund")).status_code == 200
        assert "closeloop_open_tickets" in (await supervisor.get("/metrics")).text
        for method, path in (
            ("POST", "/api/intents"),
            ("PUT", "/api/intents/refund"),
            ("DELETE", "/api/intents/refund"),
        ):
            response = await supervisor.request(method, path, json=INTENT if method != "DELETE" else None)
            assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden", (
                method,
                path,
            )
        assert (await admin.get("/api/intents/refund")).status_code == 200  # nothing was deleted

        me = (await agent.get("/api/me")).json()
        assert me["user"]["role"] == "agent" and me["auth"] == "token" and me["csrf_token"] is None


async def test_metrics_can_be_made_public(database_url: str) -> None:
    async with live_server(database_url, metrics_public=True) as server:
        assert "closeloop_open_tickets" in (await server.anonymous().get("/metrics")).text
        assert (await server.anonymous().get("/api/tickets")).status_code == 401


async def test_api_tokens_work_for_integrations_until_revoked(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, _ = await make_user(server, "supervisor")
        token = await make_token(server, user, "crm sync")
        integration = server.client(bearer(token))
        assert (await integration.get("/api/tickets")).status_code == 200
        rows = await server.services.pool.fetch(
            "SELECT token_hash, last_used_at FROM api_tokens WHERE user_id = $1", user.id
        )
        assert [r["token_hash"] for r in rows] == [hash_secret(token)]
        assert rows[0]["last_used_at"] is not None

        assert await server.services.api_tokens.revoke(token)
        refused = await integration.get("/api/tickets")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "not_authenticated"
        assert "revoked" in refused.json()["error"]["message"]
        assert not await server.services.api_tokens.revoke(token)

        basic = await server.anonymous().get("/api/tickets", headers={"Authorization": "Basic YTpi"})
        assert basic.status_code == 401 and "Bearer" in basic.json()["error"]["message"]


async def test_disabling_a_user_or_changing_the_password_ends_access(database_url: str) -> None:
    async with live_server(database_url) as server:
        user, password = await make_user(server, "agent")
        browser = await login(server, user.email, password)
        integration = server.client(bearer(await make_token(server, user)))
        await server.services.users.set_password(user.id, "a brand new passphrase")
        assert (await browser.get("/api/me")).status_code == 401
        assert (
            await integration.get("/api/me")
        ).status_code == 200  # tokens are for machines; revoke them by id
        assert (await _sign_in(server.anonymous(), user.email, password)).status_code == 401
        browser = await login(server, user.email, "a brand new passphrase")

        await server.services.pool.execute("UPDATE users SET disabled = true WHERE id = $1", user.id)
        assert (await browser.get("/api/me")).status_code == 401
        assert (await integration.get("/api/me")).status_code == 401
        assert (await _sign_in(server.anonymous(), user.email, "a brand new passphrase")).status_code == 401


async def test_five_wrong_passwords_lock_the_email_for_fifteen_minutes(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        user, password = await make_user(server, "agent")
        other, other_password = await make_user(server, "agent")
        browser = server.anonymous()
        for _ in range(5):
            assert (await _sign_in(browser, user.email, "not the password")).status_code == 401
        locked = await _sign_in(browser, user.email.upper(), password)
        assert locked.status_code == 429
        assert "Too many failed attempts" in locked.text and "15 minutes" in locked.text
        assert "set-cookie" not in locked.headers
        assert (await _sign_in(browser, other.email, other_password)).status_code == 303  # only that email

        clock.advance(timedelta(minutes=14))
        assert (await _sign_in(browser, user.email, password)).status_code == 429
        clock.advance(timedelta(minutes=2))
        assert (await _sign_in(browser, user.email, password)).status_code == 303

        # failures spread over more than 15 minutes never add up to a lock
        for _ in range(4):
            assert (await _sign_in(browser, other.email, "not the password")).status_code == 401
        clock.advance(timedelta(minutes=16))
        for _ in range(4):
            assert (await _sign_in(browser, other.email, "not the password")).status_code == 401
        assert (await _sign_in(browser, other.email, other_password)).status_code == 303


async def test_sessions_end_after_idle_time_and_after_their_lifetime(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, session_idle_minutes=30, session_hours=2) as server:
        user, password = await make_user(server, "agent")
        browser = await login(server, user.email, password)
        clock.advance(timedelta(minutes=29))
        assert (await browser.get("/api/me")).status_code == 200
        clock.advance(timedelta(minutes=31))
        assert (await browser.get("/api/me")).status_code == 401  # idle for 31 minutes

        browser = await login(server, user.email, password)
        for _ in range(5):  # busy all along: 5 x 25 minutes
            clock.advance(timedelta(minutes=25))
            if (await browser.get("/api/me")).status_code != 200:
                break
        assert (await browser.get("/api/me")).status_code == 401  # 2 hours after sign-in


async def test_cookies_are_secure_when_the_public_url_is_https(database_url: str) -> None:
    async with live_server(database_url, public_base_url="https://support.example.com") as server:
        user, password = await make_user(server, "agent")
        response = await _sign_in(server.anonymous(), user.email, password)
        assert response.status_code == 303
        assert "secure" in [p.strip().lower() for p in _session_cookie(response).split(";")]


# ---- the CLI ------------------------------------------------------------------------------------------------
async def _closeloop(*args: str, database_url: str, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "closeloop"),
        *args,
        cwd=ROOT,
        env=process_env(DATABASE_URL=database_url),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else b""), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_user_add_creates_a_user_who_can_sign_in(database_url: str) -> None:
    email = unique_email("sam")
    code, out, err = await _closeloop(
        "user",
        "add",
        email,
        "--name",
        "Sam Supervisor",
        "--role",
        "supervisor",
        "--phone",
        "+1 555 010 0042",
        "--password-stdin",
        database_url=database_url,
        stdin="correct horse battery\n",
    )
    assert code == 0, err
    assert f"created supervisor Sam Supervisor <{email}>" in out
    assert "correct horse" not in out + err

    code, _, err = await _closeloop(
        "user",
        "add",
        email,
        "--name",
        "Sam Again",
        "--role",
        "agent",
        "--password-stdin",
        database_url=database_url,
        stdin="another long password\n",
    )
    assert code == 1 and "already exists" in err

    weak = unique_email("weak")
    code, _, err = await _closeloop(
        "user",
        "add",
        weak,
        "--name",
        "Weak",
        "--role",
        "agent",
        "--password-stdin",
        database_url=database_url,
        stdin="short\n",
    )
    assert code == 1 and "at least 10 characters" in err
    code, _, err = await _closeloop(
        "user", "add", weak, "--name", "Weak", "--role", "agent", database_url=database_url
    )
    assert code == 1 and "--password-stdin" in err  # no terminal to ask on

    async with live_server(database_url) as server:
        assert await server.services.users.get_by_email(weak) is None
        browser = await login(server, email, "correct horse battery")
        me = (await browser.get("/api/me")).json()["user"]
        assert me["name"] == "Sam Supervisor" and me["role"] == "supervisor" and me["phone"] == "+15550100042"


async def test_cli_token_create_prints_a_token_once_and_revoke_ends_it(database_url: str) -> None:
    email = unique_email("ops")
    code, _, err = await _closeloop(
        "user",
        "add",
        email,
        "--name",
        "Ops",
        "--role",
        "supervisor",
        "--password-stdin",
        database_url=database_url,
        stdin="correct horse battery\n",
    )
    assert code == 0, err
    code, out, err = await _closeloop(
        "token", "create", email, "--name", "prometheus", database_url=database_url
    )
    assert code == 0, err
    token = out.strip()
    assert token.startswith("clk_") and "shown only this once" in err

    async with live_server(database_url) as server:
        scraper = server.client(bearer(token))
        assert (await scraper.get("/metrics")).status_code == 200
        code, out, _ = await _closeloop("token", "list", database_url=database_url)
        [line] = [line for line in out.splitlines() if email in line]
        assert "prometheus" in line and "live" in line and token not in out
        token_id = line.split()[0]
        code, out, err = await _closeloop("token", "revoke", token_id, database_url=database_url)
        assert code == 0 and f"revoked API token {token_id}" in out, err
        assert (await scraper.get("/metrics")).status_code == 401

    code, _, err = await _closeloop(
        "token", "create", unique_email("nobody"), "--name", "x", database_url=database_url
    )
    assert code == 1 and "no user with the email" in err
