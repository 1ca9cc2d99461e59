"""Limits on one-time verification codes over web chat: a client address may ask for 10 codes an
hour and a customer may be sent 5, whatever numbers or accounts are named, with the same refusal
as ever. The limits are settings (``CLOSELOOP_CODE_LIMIT_PER_CLIENT_HOUR``,
``CLOSELOOP_CODE_LIMIT_PER_CUSTOMER_HOUR``); these tests pin the defaults and show a raised one.

Each test speaks from its own address (the server trusts loopback's ``X-Forwarded-For``), so
codes other tests asked for in the shared test database do not count against it, and allows an
address more chat messages than the 10 in a burst the message limit allows by default.
"""

from __future__ import annotations

import secrets
from typing import Any

import websockets

from pipeline.clock import FakeClock
from tests.security.test_identity_attacks import CODE_SENT, chat
from tests.support import LiveServer, live_server, make_customer, unique_phone

REFUSED = "I've sent several codes already. Please wait a while before asking for another, or ask for an agent to reach a person."

FROM_ANY_ADDRESS: dict[str, Any] = {"trusted_proxies": "127.0.0.1", "chat_messages_burst": 100}


def new_address() -> str:
    """An address no other test uses (IPv6 documentation prefix, random suffix)."""
    return f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}:{secrets.token_hex(2)}"


async def claim_in_a_new_chat(server: LiveServer, address: str, phone: str) -> str:
    """Open a new web-chat conversation from ``address`` and give ``phone``: the bot's reply."""
    async with websockets.connect(server.ws_url, additional_headers={"X-Forwarded-For": address}) as ws:
        await ws.send('{"type": "hello", "session": null}')
        await ws.recv()
        return await chat(ws, f"my phone number is {phone}")


async def codes_texted_to(server: LiveServer, phone: str) -> int:
    count: Any = await server.services.pool.fetchval(
        "SELECT count(*) FROM outbox WHERE kind = 'verification_code' AND address = $1", phone
    )
    return int(count)


async def test_an_eleventh_code_for_one_client_address_in_an_hour_is_refused(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, **FROM_ANY_ADDRESS) as server:
        dana = await make_customer(server.services.pool, clock.now(), {})
        address = new_address()
        # Ten numbers that are on no account count like customers' numbers.
        for _ in range(10):
            assert await claim_in_a_new_chat(server, address, unique_phone()) == CODE_SENT
        assert await claim_in_a_new_chat(server, address, dana.phone) == REFUSED
        assert await codes_texted_to(server, dana.phone) == 0
        # Another address is not held back by this one.
        assert await claim_in_a_new_chat(server, new_address(), dana.phone) == CODE_SENT
        assert await codes_texted_to(server, dana.phone) == 1


async def test_a_sixth_code_for_one_customer_in_an_hour_is_refused_from_any_address(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, **FROM_ANY_ADDRESS) as server:
        dana = await make_customer(server.services.pool, clock.now(), {})
        for _ in range(5):
            assert await claim_in_a_new_chat(server, new_address(), dana.phone) == CODE_SENT
        assert await claim_in_a_new_chat(server, new_address(), dana.phone) == REFUSED
        assert await codes_texted_to(server, dana.phone) == 5


async def test_the_code_limits_are_settings(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(
        database_url,
        clock=clock,
        **FROM_ANY_ADDRESS,
        code_limit_per_client_hour=3,
        code_limit_per_customer_hour=7,
    ) as server:
        address = new_address()
        replies = [await claim_in_a_new_chat(server, address, unique_phone()) for _ in range(4)]
        assert replies == [CODE_SENT] * 3 + [REFUSED]

        dana = await make_customer(server.services.pool, clock.now(), {})
        replies = [await claim_in_a_new_chat(server, new_address(), dana.phone) for _ in range(8)]
        assert replies == [CODE_SENT] * 7 + [REFUSED]
