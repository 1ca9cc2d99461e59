"""Outcome analytics is for supervisors and admins; its filters never become SQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date

import pytest

from crm_bridge.analytics import AnalyticsRange, compute_analytics
from tests.support import LiveServer, live_server, login, make_user, token_client
from web.analytics import analytics_router

APIS = ["/api/analytics", "/api/analytics.csv", "/api/analytics.csv?table=summary"]
INJECTIONS = [
    {"intent": "x' OR '1'='1"},
    {"intent": "refund_request'; DROP TABLE conversations; --"},
    {"intent": "a) OR (1=1"},
    {"channel": "voice' OR 'a'='a"},
    {"channel": "voice; DELETE FROM tickets"},
    {"from": "2019-05-06' OR 1=1 --"},
    {"to": "2019-05-12; DROP TABLE events"},
    {"table": "daily; DROP TABLE tickets"},
]


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        if not any(getattr(r, "path", None) == "/analytics" for r in live.app.routes):
            live.app.include_router(analytics_router(live.app.state.services))
        yield live


async def test_anonymous_callers_are_refused(server: LiveServer) -> None:
    anonymous = server.anonymous()
    page = await anonymous.get("/analytics?from=2019-05-06")
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=/analytics")
    for path in APIS:
        response = await anonymous.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "not_authenticated"
    bad_token = server.client({"Authorization": "Bearer clk_not-a-token"})
    assert (await bad_token.get("/api/analytics")).status_code == 401


async def test_agents_are_refused_with_a_token_and_with_a_session(server: LiveServer) -> None:
    agent_token = await token_client(server, "agent")
    user, password = await make_user(server, "agent")
    agent_session = await login(server, user.email, password)
    for client in (agent_token, agent_session):
        for path in [*APIS, "/analytics"]:
            response = await client.get(path)
            assert response.status_code == 403, (path, response.status_code)
            assert "rows" not in response.text and "contacts" not in response.text


@pytest.mark.parametrize("role", ["supervisor", "admin"])
async def test_supervisors_and_admins_are_admitted(server: LiveServer, role: str) -> None:
    user, password = await make_user(server, role)
    session = await login(server, user.email, password)
    page = await session.get("/analytics")
    assert page.status_code == 200 and "Outcome analytics" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for path in APIS:
        assert (await session.get(path)).status_code == 200, path
    assert (await (await token_client(server, role)).get("/api/analytics")).status_code == 200


@pytest.mark.parametrize("params", INJECTIONS)
async def test_injection_attempts_are_rejected(server: LiveServer, params: dict[str, str]) -> None:
    before = await server.services.pool.fetchval("SELECT count(*) FROM conversations")
    paths = ["/api/analytics.csv"] if "table" in params else ["/api/analytics", "/api/analytics.csv"]
    for path in paths:  # /api/analytics has no `table`: it ignores that parameter
        response = await server.http.get(path, params=params)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["code"].startswith("invalid_")
    assert await server.services.pool.fetchval("SELECT count(*) FROM conversations") == before


async def test_filters_reach_sql_as_parameters(server: LiveServer) -> None:
    """Past the web layer's checks, a hostile value is still only a value: it matches nothing."""
    pool = server.services.pool
    await pool.execute(
        """INSERT INTO conversations (channel, address, intent, created_at, updated_at)
           VALUES ('webchat', 'sec-analytics-1', 'order_status', '2003-03-03T10:00:00Z', '2003-03-03T10:00:00Z')"""
    )
    day = date(2003, 3, 3)
    assert (await compute_analytics(pool, AnalyticsRange(day, day)))["contacts"] == 1
    for hostile in ("x' OR '1'='1", "order_status' --", "%", "order_status\\"):
        found = await compute_analytics(pool, AnalyticsRange(day, day, intent=hostile))
        assert found["contacts"] == 0 and found["intents"] == [], hostile
    # a name the API accepts that looks like SQL is just an intent nobody has
    response = await server.http.get(
        "/api/analytics", params={"from": "2003-03-03", "to": "2003-03-03", "intent": "1:OR:1"}
    )
    assert response.status_code == 200 and response.json()["contacts"] == 0
    with pytest.raises(ValueError):
        AnalyticsRange(day, day, channel="voice' OR '1'='1")
    assert await pool.fetchval("SELECT to_regclass('conversations') IS NOT NULL")
