"""A browser that hits an unknown staff page, or a staff page its role may not open, gets a small
branded HTML page with a way home; API routes and non-browser clients keep their JSON errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import LiveServer, live_server, login, make_user
from web.console import PAGE_HEADERS

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        yield live


async def test_unknown_staff_pages_are_an_html_404_with_a_link_home(server: LiveServer) -> None:
    user, password = await make_user(server, "supervisor")
    browser = await login(server, user.email, password)
    for path in ["/console/nope", "/supervisor/nope/deeper", "/admin/nope", "/analytics/nope"]:
        response = await browser.get(path, headers=HTML)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html"), path
        assert response.headers["content-security-policy"] == PAGE_HEADERS["Content-Security-Policy"]
        assert "<h1>Page not found</h1>" in response.text and '<a class="home" href="/">' in response.text
        assert "<!-- shared:" not in response.text  # the brand parts are inlined


async def test_a_staff_page_the_role_may_not_open_is_an_html_403(server: LiveServer) -> None:
    user, password = await make_user(server, "agent")
    browser = await login(server, user.email, password)
    for path in ["/admin", "/analytics", "/supervisor"]:
        response = await browser.get(path, headers=HTML)
        assert response.status_code == 403, path
        assert response.headers["content-type"].startswith("text/html"), path
        assert "<h1>You can&#x27;t open this page</h1>" in response.text and 'href="/"' in response.text
        # a script or an API client (no text/html in Accept) keeps the JSON error and its code
        plain = await browser.get(path)
        assert plain.status_code == 403 and plain.json()["error"]["code"] == "forbidden", path


async def test_api_routes_keep_json_errors_even_for_a_browser(server: LiveServer) -> None:
    user, password = await make_user(server, "agent")
    browser = await login(server, user.email, password)
    missing = await browser.get("/api/desk/nope", headers=HTML)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    refused = await browser.get("/api/supervisor/actions/queues", headers=HTML)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    other = await browser.get("/not-a-staff-page", headers=HTML)
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
