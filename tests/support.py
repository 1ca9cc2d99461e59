"""Helpers for integration tests: a live server on loopback, people who sign in, unique customers,
signed webhooks.

``live_server`` creates an admin and an API token for it, and ``server.http`` sends that token, so
tests about something else than access just work; ``anonymous``, ``make_user``, ``make_token`` and
``login`` are for the tests about access.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import uvicorn
from twilio.request_validator import RequestValidator

from crm_bridge.demo import add_customer, add_order
from crm_bridge.users import User
from server import Services, Settings, create_app

ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "test-auth-token-0123456789abcdef"


@dataclass
class LiveServer:
    base_url: str
    app: Any
    http: httpx.AsyncClient  # sends the admin's API token
    admin: User
    admin_token: str
    clients: list[httpx.AsyncClient] = field(default_factory=list)  # closed when the server stops

    @property
    def services(self) -> Services:
        return self.app.state.services

    def client(self, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        """A new HTTP client for this server (no credentials unless given), closed with the server."""
        client = httpx.AsyncClient(base_url=self.base_url, timeout=30, headers=headers)
        self.clients.append(client)
        return client

    def anonymous(self) -> httpx.AsyncClient:
        return self.client()

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/chat"


@asynccontextmanager
async def live_server(
    database_url: str, *, clock: Any = None, start_jobs: bool = False, **overrides: Any
) -> AsyncIterator[LiveServer]:
    """Run the real app with uvicorn on 127.0.0.1 (a free port) inside this event loop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    values: dict[str, Any] = {
        "database_url": database_url,
        "public_base_url": base,
        "demo_seed": False,
        "port": port,
        "voice_preload": False,
    }
    values.update(overrides)
    settings = Settings(_env_file=None, **values)
    app = create_app(settings, clock=clock, start_jobs=start_jobs)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            ws_max_size=65536,
            timeout_graceful_shutdown=5,
            proxy_headers=False,  # as `closeloop serve`: the app decides whom to believe
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="test-uvicorn")
    try:
        for _ in range(600):
            if server.started or task.done():
                break
            await asyncio.sleep(0.02)
        if task.done():
            task.result()
            raise RuntimeError("server stopped during start-up")
        services: Services = app.state.services
        admin = await services.users.create_user(
            unique_email("admin"), "Test Admin", "admin", secrets.token_urlsafe(16)
        )
        token = await services.api_tokens.create(admin, "tests")
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=bearer(token)) as http:
            live = LiveServer(base, app, http, admin, token)
            try:
                yield live
            finally:
                for client in live.clients:
                    await client.aclose()
    finally:
        server.should_exit = True
        await task
        sock.close()


def unique_email(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}@example.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_user(
    server: LiveServer, role: str, *, password: str | None = None, phone: str | None = None
) -> tuple[User, str]:
    """A new user with a unique email: ``(user, password)``."""
    password = password or secrets.token_urlsafe(12)
    user = await server.services.users.create_user(
        unique_email(role), f"Test {role.title()}", role, password, phone=phone
    )
    return user, password


async def make_token(server: LiveServer, user: User, name: str = "tests") -> str:
    return await server.services.api_tokens.create(user, name)


async def token_client(server: LiveServer, role: str) -> httpx.AsyncClient:
    """A client authenticated with an API token of a new user with ``role``."""
    user, _ = await make_user(server, role)
    return server.client(bearer(await make_token(server, user)))


async def login(server: LiveServer, email: str, password: str) -> httpx.AsyncClient:
    """Sign in through ``POST /login`` like a browser: a client holding the session cookie and
    sending the session's CSRF token as ``X-CSRF-Token`` (delete that header to test CSRF)."""
    client = server.client()
    response = await client.post("/login", data={"email": email, "password": password, "next": "/login"})
    if response.status_code != 303:
        raise AssertionError(f"sign-in failed: {response.status_code}")
    me = await client.get("/api/me")
    me.raise_for_status()
    client.headers["X-CSRF-Token"] = me.json()["csrf_token"]
    return client


@dataclass
class TestCustomer:
    id: int
    ref: str
    name: str
    phone: str
    orders: dict[str, str] = field(default_factory=dict)  # label -> order number


def unique_phone() -> str:
    return "+1555" + str(secrets.randbelow(10**7)).zfill(7)


def unique_order_number() -> str:
    return str(100000 + secrets.randbelow(900000))


async def make_customer(
    pool: asyncpg.Pool,
    now: datetime,
    orders: dict[str, tuple[str, str, int, float]],
    *,
    name: str = "Dana Reyes",
    whatsapp: bool = True,
    balance_cents: int = 0,
) -> TestCustomer:
    """A customer with unique phone and order numbers. ``orders``: label -> (status, item, cents, age_days)."""
    phone = unique_phone()
    cid = await add_customer(
        pool,
        name=name,
        phone=phone,
        email=f"{phone[1:]}@example.com",
        whatsapp_id=phone if whatsapp else None,
        balance_cents=balance_cents,
    )
    customer = TestCustomer(cid, str(cid), name, phone)
    for label, (status, item, cents, age) in orders.items():
        number = unique_order_number()
        await add_order(
            pool,
            customer_id=cid,
            number=number,
            status=status,
            item=item,
            amount_cents=cents,
            now=now,
            age_days=age,
        )
        customer.orders[label] = number
    return customer


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def twilio_settings(
    twilio: Any, *, sms_from: str | None = "+15550009998", whatsapp_from: str | None = None
) -> dict[str, Any]:
    """``live_server`` settings for the fake Twilio ``twilio`` (tests/fakes/twilio_server.py): its
    account, signing token and API address, and the numbers closeloop texts from."""
    settings: dict[str, Any] = {
        "twilio_account_sid": ACCOUNT_SID,
        "twilio_auth_token": AUTH_TOKEN,
        "twilio_api_base_url": twilio.base_url,
    }
    if sms_from is not None:
        settings["twilio_sms_from"] = sms_from
    if whatsapp_from is not None:
        settings["twilio_whatsapp_from"] = whatsapp_from
    return settings


def whatsapp_form(phone: str, body: str, sid: str | None = None) -> dict[str, str]:
    return {
        "MessageSid": sid or "SM" + secrets.token_hex(16),
        "AccountSid": ACCOUNT_SID,
        "From": f"whatsapp:{phone}",
        "To": "whatsapp:+15550009999",
        "Body": body,
        "NumMedia": "0",
        "ProfileName": "Dana",
        "WaId": phone.lstrip("+"),
    }


async def post_signed(
    server: LiveServer, path: str, form: dict[str, str], token: str = AUTH_TOKEN
) -> httpx.Response:
    url = server.base_url + path
    return await server.http.post(path, data=form, headers={"X-Twilio-Signature": sign(url, form, token)})


async def outbox_code(pool: asyncpg.Pool, to: str) -> str:
    """The latest one-time code texted to ``to``, as the customer reads it on their phone (in the
    embedded demo, codes wait in the local outbox that admins read with `closeloop outbox`)."""
    body = await pool.fetchval(
        "SELECT body FROM outbox WHERE kind = 'verification_code' AND address = $1 ORDER BY id DESC LIMIT 1",
        to,
    )
    assert body is not None, f"no verification code was texted to {to}"
    match = re.search(r"\b(\d{6})\b", body)
    assert match is not None, body
    return match.group(1)


async def texted_code(twilio: Any, phone: str) -> str:
    """The one-time code the fake Twilio delivered to ``phone``, as the caller reads it."""
    for _ in range(200):  # the code is texted right after the turn that asked for it commits
        for m in reversed(twilio.messages):
            if m.form.get("To") == phone and "verification code" in m.form.get("Body", ""):
                return "".join(ch for ch in m.form["Body"].split("code is ")[1][:6])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no code was texted to {phone}")


def free_port() -> int:
    """A free TCP port on loopback (for a server the test starts as a process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(**extra: str) -> dict[str, str]:
    """This process's environment without closeloop's own settings, plus ``extra``: what a
    `closeloop` command a test starts sees (the developer's settings never leak in)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "TWILIO_", "CLOSELOOP_", "PUBLIC_BASE_URL"))
    }
    env.update(extra)
    return env
