"""Password guessing: parallel guesses cannot overrun the per-email limit, and one address cannot
try more than its share of passwords across many emails."""

from __future__ import annotations

import asyncio
import re
import secrets

from tests.support import LiveServer, live_server, make_user, unique_email


def _from(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def _test_address() -> str:
    return f"2001:db8::{secrets.token_hex(2)}:{secrets.token_hex(2)}"


async def _checks(server: LiveServer) -> float:
    """Password verifications so far, as /metrics reports them."""
    text = (await server.http.get("/metrics")).text
    match = re.search(r"^closeloop_password_checks_total (\S+)$", text, re.M)
    assert match, "the metric closeloop_password_checks_total is missing"
    return float(match.group(1))


async def test_fifty_parallel_wrong_passwords_cost_at_most_five_password_checks(database_url: str) -> None:
    async with live_server(database_url, trusted_proxies="127.0.0.1") as server:
        user, password = await make_user(server, "agent")
        client = server.client(headers=_from(_test_address()))
        before = await _checks(server)
        responses = await asyncio.gather(
            *(
                client.post("/login", data={"email": user.email, "password": f"guess number {i}"})
                for i in range(50)
            )
        )
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {401, 429} and statuses.count(401) <= 5, statuses
        assert await _checks(server) - before <= 5
        # and the email is now locked, even for the right password
        locked = await client.post("/login", data={"email": user.email, "password": password})
        assert locked.status_code == 429 and "this email" in locked.text
        assert await _checks(server) - before <= 5


async def test_one_address_guessing_across_many_emails_is_stopped(database_url: str) -> None:
    async with live_server(
        database_url, trusted_proxies="127.0.0.1", login_max_failures_per_client=10
    ) as server:
        user, password = await make_user(server, "agent")
        attacker = server.client(headers=_from(_test_address()))
        before = await _checks(server)
        responses = await asyncio.gather(
            *(
                attacker.post("/login", data={"email": unique_email("victim"), "password": "Summer2026!"})
                for _ in range(30)
            )
        )
        assert sorted(r.status_code for r in responses).count(401) <= 10
        assert await _checks(server) - before <= 10
        refused = await attacker.post("/login", data={"email": user.email, "password": password})
        assert refused.status_code == 429 and "your network address" in refused.text
        assert "set-cookie" not in refused.headers

        # someone else, from another address, signs in as usual
        colleague = server.client(headers=_from(_test_address()))
        assert (
            await colleague.post("/login", data={"email": user.email, "password": password})
        ).status_code == 303


async def test_x_forwarded_for_is_ignored_unless_the_proxy_is_trusted(database_url: str) -> None:
    async with live_server(
        database_url, login_max_failures_per_client=3, trusted_proxies="10.9.9.9"
    ) as server:
        # the loopback address is every test's: start from no failures (others' wrong passwords)
        await server.services.pool.execute("DELETE FROM login_throttle_clients WHERE client = '127.0.0.1'")
        try:
            # an attacker rotating X-Forwarded-For still counts as its own peer address
            for i in range(3):
                rotating = server.client(headers=_from(f"2001:db8::{i + 1:x}"))
                response = await rotating.post(
                    "/login", data={"email": unique_email("v"), "password": "x" * 12}
                )
                assert response.status_code == 401
            response = await server.client(headers=_from(_test_address())).post(
                "/login", data={"email": unique_email("v"), "password": "x" * 12}
            )
            assert response.status_code == 429 and "your network address" in response.text
        finally:  # the loopback address is every test's: unlock it for the tests that follow
            await server.services.pool.execute(
                "DELETE FROM login_throttle_clients WHERE client = '127.0.0.1'"
            )
