"""The admin console and outcome analytics in headless Chromium (Debian's, driven as in
tests/e2e/test_console_browser.py), as their people use them:

- an admin teaches the assistant a new FAQ on ``/admin``, tries a phrase it was never shown, and a
  customer on ``/chat`` then gets the new answer;
- an agent is refused ``/admin``, page and API;
- a supervisor narrows the date range on ``/analytics`` and the numbers follow;
- every staff page fits 1280 and 390 px screens, names every control, and is reachable from the
  keyboard in reading order.

A screenshot of each page is written to ``artifacts/screenshots/`` on every run; the README shows
them. One server and one browser serve the whole module.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.e2e.test_console_browser import CHROMIUM_ARGS, TIMEOUT, _chromium, _shot
from tests.support import LiveServer, live_server, make_customer, make_user

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
# Days nothing else in the test database uses: the analytics numbers are exactly the seeded ones.
DAY_A, DAY_B = "2015-03-03", "2015-03-05"
# Presses of Tab within which a page's main controls must all have had the focus (a date input is
# three stops: month, day, year).
TABS = 30


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        yield live


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    # ComputedAccessibilityInfo: element.computedName is the name a screen reader announces
    args = [*CHROMIUM_ARGS, "--enable-blink-features=ComputedAccessibilityInfo"]
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=_chromium(), args=args)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Seeded:
    on_a: list[int]  # three web chats on DAY_A; the last was handed off and is still escalated
    on_b: list[int]  # one web chat on DAY_B, answered by the AI


@pytest.fixture(scope="module")
async def seeded(server: LiveServer) -> Seeded:
    """Four conversations on two days, written straight to the database."""
    pool = server.services.pool
    customer = await make_customer(pool, datetime(2015, 3, 1, tzinfo=UTC), {}, name="Ines Okafor")
    made: dict[str, list[int]] = {DAY_A: [], DAY_B: []}
    for day, handed_off in ((DAY_A, False), (DAY_A, False), (DAY_A, True), (DAY_B, False)):
        at = datetime.fromisoformat(day).replace(hour=9 + len(made[day]), tzinfo=UTC)
        cid = await pool.fetchval(
            """INSERT INTO conversations (channel, address, customer_ref, status, intent, created_at, updated_at, last_seq)
               VALUES ('webchat', $1, $2, $3, 'order_status', $4, $4, 2) RETURNING id""",
            "e2e-analytics-" + secrets.token_hex(6),
            customer.ref,
            "escalated" if handed_off else "open",
            at,
        )
        await pool.executemany(
            """INSERT INTO messages (conversation_id, seq, direction, sender, body, created_at)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            [
                (cid, 1, "in", "customer", "where is my order?", at),
                (cid, 2, "out", "bot", "It left our warehouse this morning.", at),
            ],
        )
        if handed_off:
            await pool.execute(
                """INSERT INTO events (conversation_id, kind, data, created_at)
                   VALUES ($1, 'handoff', '{"reason": "customer_asked"}', $2)""",
                cid,
                at,
            )
        made[day].append(int(cid))
    return Seeded(made[DAY_A], made[DAY_B])


async def _signed_in(browser: Browser, server: LiveServer, role: str, path: str) -> BrowserContext:
    """A 1280 px browser context of a new user with ``role``, signed in through the page."""
    user, password = await make_user(server, role)
    context = await browser.new_context(base_url=server.base_url, viewport=DESKTOP)
    page = await context.new_page()
    await page.goto(f"/login?next={path}")
    await page.fill("#email", user.email)
    await page.fill("#password", password)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r"^(?!.*/login)"))
    await page.close()
    return context


async def _tile(page: Page, index: int) -> str:
    return await page.locator("#tiles-outcomes .tile .big").nth(index).inner_text()


async def test_an_admin_adds_an_faq_on_the_page_tries_a_new_phrase_and_a_customer_gets_the_answer(
    server: LiveServer, browser: Browser
) -> None:
    name = "kumquat_delivery_" + secrets.token_hex(3)
    examples = ["do you deliver kumquats", "can I get kumquats shipped to my home", "kumquat delivery"]
    answer = f"Kumquats ship every Tuesday from our orchard (ref {secrets.token_hex(2)})."
    tried = "will you send kumquats to my house"
    assert tried not in examples
    admin = await _signed_in(browser, server, "admin", "/admin")
    try:
        page = await admin.new_page()
        await page.goto("/admin")
        await expect(page.locator("#intent-list li").first).to_be_visible(timeout=TIMEOUT)
        await page.click("#new-intent")
        await expect(page.locator("#f-name")).to_be_focused()
        await page.fill("#f-name", name)
        await page.fill("#f-examples", "\n".join(examples))
        await page.fill("#f-action", "faq")
        await page.fill("#f-answer", answer)
        await page.fill("#f-queue", "support")
        await page.click("#save")
        await expect(page.locator("#form-ok")).to_have_text("Saved.", timeout=TIMEOUT)
        await expect(page.locator("#form-title")).to_have_text(f"Edit {name}")
        created = page.locator("#intent-list .item[aria-current=true]")
        await expect(created).to_contain_text(name)
        await created.scroll_into_view_if_needed()  # in the list's own scroll; the page goes to its top
        await _picture(page, "11-admin-intent-created.png")

        await page.click("#tab-try")
        await page.fill("#phrases", tried)
        await page.locator("#try-form button[type=submit]").click()
        result = page.locator("#try-results tr")
        await expect(result).to_have_count(1, timeout=TIMEOUT)
        await expect(result.locator('td[data-label="Intent"]')).to_have_text(name)
        await expect(result.locator('td[data-label="Action"]')).to_have_text("faq")
        await expect(result.locator('td[data-label="Reply preview"]')).to_have_text(answer)
        await _shot(page, "12-admin-try-it.png")

        customer = await browser.new_context(base_url=server.base_url, viewport=DESKTOP)
        try:
            chat = await customer.new_page()
            await chat.goto("/chat")
            await expect(chat.locator("#status")).to_have_attribute("data-state", "online", timeout=TIMEOUT)
            await chat.fill("#input", "are kumquats delivered to my door")
            await chat.click("#send")
            await expect(chat.locator("#messages")).to_contain_text(answer, timeout=TIMEOUT)
            await _shot(chat, "13-customer-chat-new-faq.png")
        finally:
            await customer.close()
        matched = await server.services.pool.fetchval(
            """SELECT count(*) FROM events e JOIN conversations c ON c.id = e.conversation_id
               WHERE e.kind = 'intent' AND e.data->>'intent' = $1 AND c.channel = 'webchat'""",
            name,
        )
        assert matched == 1, "the customer's message was matched to the new intent"
    finally:
        await admin.close()
        # the intent was for this test only: the other tests of the run see the seed intents
        await server.http.delete(f"/api/intents/{name}")


async def test_an_agent_cannot_open_the_admin_console(server: LiveServer, browser: Browser) -> None:
    agent = await _signed_in(browser, server, "agent", "/console")
    try:
        page = await agent.new_page()
        response = await page.goto("/admin")
        assert response is not None
        assert response.status == 403 or "/admin" not in page.url, "the page was served to an agent"
        await expect(page.locator("[role=tablist], #intent-form, #tab-intents")).to_have_count(0)
        for path in ("/api/admin/users", "/api/admin/queues", "/api/admin/audit"):
            refused = await page.request.get(path)
            assert refused.status == 403, path
            assert (await refused.json())["error"]["code"] == "forbidden"
    finally:
        await agent.close()


async def test_a_supervisor_narrows_the_analytics_range_and_the_numbers_follow(
    server: LiveServer, browser: Browser, seeded: Seeded
) -> None:
    boss = await _signed_in(browser, server, "supervisor", "/analytics")
    try:
        page = await boss.new_page()
        await page.goto("/analytics")  # the last 7 days: none of the seeded conversations
        await expect(page.locator("#range-note")).to_contain_text("(7 days, UTC)", timeout=TIMEOUT)

        await page.fill("#from", DAY_A)
        await page.fill("#to", DAY_B)
        await page.click("#apply")
        await expect(page.locator("#range-note")).to_have_text(
            f"{DAY_A} to {DAY_B} (3 days, UTC)", timeout=TIMEOUT
        )
        # contacts, containment, resolution, handoff: 4 chats, one handed off and still escalated
        await expect(page.locator("#tiles-outcomes .tile .big").first).to_have_text("4")
        assert [await _tile(page, i) for i in range(4)] == ["4", "75.0%", "75.0%", "25.0%"]
        assert f"from={DAY_A}" in page.url and f"to={DAY_B}" in page.url
        await _shot(page, "14-analytics.png")

        await page.fill("#from", DAY_B)
        await page.click("#apply")
        await expect(page.locator("#range-note")).to_have_text(
            f"{DAY_B} to {DAY_B} (1 days, UTC)", timeout=TIMEOUT
        )
        await expect(page.locator("#tiles-outcomes .tile .big").first).to_have_text("1")
        assert [await _tile(page, i) for i in range(4)] == ["1", "100.0%", "100.0%", "0.0%"]

        await page.fill("#from", DAY_A)
        await page.fill("#to", DAY_A)
        await page.click("#apply")
        await expect(page.locator("#tiles-outcomes .tile .big").first).to_have_text("3", timeout=TIMEOUT)
        assert [await _tile(page, i) for i in range(4)] == ["3", "66.7%", "66.7%", "33.3%"]
        await expect(page.locator("#table-contacts")).to_contain_text(DAY_A)
    finally:
        await boss.close()


# ---- layout, names and keyboard -------------------------------------------------------------

# Every visible control named by a label, aria-label(ledby) or its own text, as announced
# (element.computedName); a placeholder or a title alone does not count.
UNNAMED = """() => {
  const text = (n) => (n && n.textContent || "").trim();
  const bad = [];
  for (const e of document.querySelectorAll("input, select, textarea, button")) {
    if (e.type === "hidden" || !e.checkVisibility()) continue;
    const own = [...(e.labels || [])].some((l) => text(l))
      || (e.getAttribute("aria-label") || "").trim()
      || (e.getAttribute("aria-labelledby") || "").split(/\\s+/).some((id) => text(document.getElementById(id)))
      || (e.tagName === "BUTTON" && text(e))
      || (["submit", "button", "reset"].includes(e.type) && (e.value || "").trim());
    if (!own || !(e.computedName || "").trim()) bad.push(e.outerHTML.slice(0, 120));
  }
  return bad;
}"""
# Which of the expected selectors the focused element matches (-1: none).
FOCUSED = "(sels) => sels.findIndex((s) => document.activeElement && document.activeElement.matches(s))"


# The innermost elements that stick out on the right, to say what to fix.
STICKING_OUT = """() => [...document.querySelectorAll("body *")]
  .filter((e) => e.getBoundingClientRect().right > innerWidth + 1 && e.checkVisibility())
  .filter((e, _, all) => !all.some((inner) => inner !== e && e.contains(inner)))
  .slice(0, 5).map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className}: ${Math.round(e.getBoundingClientRect().right)} px`)"""


async def _overflow(page: Page, where: str) -> list[str]:
    """Nothing wider than the screen (no sideways scrolling), or what sticks out."""
    width = page.viewport_size["width"] if page.viewport_size else 0
    wide = await page.evaluate("document.scrollingElement.scrollWidth")
    if wide <= width:
        return []
    return [f"{where}: {wide} px wide on a {width} px screen: {await page.evaluate(STICKING_OUT)}"]


async def _click_top(page: Page) -> None:
    """Click the page's top-left corner (the header, nothing focusable): the focus leaves any
    control, and the next Tab starts from the top of the page."""
    await page.evaluate("window.scrollTo(0, 0)")
    await page.mouse.click(2, 2)


async def _layout_problems(page: Page, where: str, in_order: list[str]) -> list[str]:
    """Sideways scrolling, controls without a name, and whether Tab from the top of the page
    reaches ``in_order`` (CSS selectors) one after the other within ``TABS`` presses."""
    problems = await _overflow(page, where)
    unnamed = await page.evaluate(UNNAMED)
    if unnamed:
        problems.append(f"{where}: controls without an accessible name: {unnamed}")
    await _click_top(page)
    reached = 0
    for _ in range(TABS):
        await page.keyboard.press("Tab")
        if await page.evaluate(FOCUSED, in_order) == reached:
            reached += 1
            if reached == len(in_order):
                return problems
    problems.append(
        f"{where}: Tab from the top never reached {in_order[reached]!r} after {in_order[:reached]}"
    )
    return problems


NAV = "#staff-nav a"
ADMIN_TABS = {
    "intents": ["#tab-intents", "#search", "#new-intent"],
    "try": ["#tab-try", "#phrases", "#try-form button[type=submit]"],
    "matching": ["#tab-matching", "#m-threshold", "#m-margin", "#m-max_misses"],
    "queues": ["#tab-queues", "#new-queue", "#queue-list .item"],
    "users": ["#tab-users", "#user-search", "#new-user", "#user-list .item"],
    "yaml": ["#tab-yaml", "#panel-yaml a[download]", "#import-yaml", "#import-replace"],
    "audit": ["#tab-audit", "#refresh-audit"],
}
# (width, page or admin tab): screenshot; 11 to 14 are taken by the tests above
SHOTS = {
    ("1280", "queues"): "15-admin-queues.png",
    ("1280", "users"): "16-admin-users.png",
    ("1280", "supervisor"): "17-supervisor.png",
    ("1280", "timeline"): "18-timeline.png",
    ("1280", "console"): "19-console.png",
    ("390", "intents"): "20-admin-phone.png",
    ("390", "analytics"): "21-analytics-phone.png",
}


async def _picture(page: Page, name: str) -> None:
    """A screenshot with no control focused (no focus ring in the picture)."""
    await _click_top(page)
    await _shot(page, name)


async def _admin_tabs(page: Page, size: str) -> list[str]:
    problems = []
    await page.goto("/admin")
    await expect(page.locator("#intent-list li").first).to_be_visible(timeout=TIMEOUT)
    for tab, controls in ADMIN_TABS.items():
        await page.click(f"#tab-{tab}")
        await expect(page.locator(f"#panel-{tab}")).to_be_visible()
        if tab in ("queues", "users"):
            await expect(page.locator(f"#{tab[:-1]}-list .item").first).to_be_visible(timeout=TIMEOUT)
        if tab == "matching":
            await expect(page.locator("#m-threshold")).not_to_have_value("", timeout=TIMEOUT)
        if tab == "audit":
            await expect(page.locator("#audit tr").first).to_be_attached(timeout=TIMEOUT)
        if (size, tab) in SHOTS:
            await _picture(page, SHOTS[size, tab])
        problems += await _layout_problems(page, f"/admin {tab} at {size} px", [NAV, *controls])
    return problems


async def test_staff_pages_fit_1280_and_390_px_name_every_control_and_follow_the_keyboard(
    server: LiveServer, browser: Browser, seeded: Seeded
) -> None:
    desktop = await _signed_in(browser, server, "admin", "/admin")
    phone = await browser.new_context(
        base_url=server.base_url, viewport=PHONE, storage_state=await desktop.storage_state()
    )
    problems: list[str] = []
    try:
        for context, size in ((desktop, "1280"), (phone, "390")):
            page = await context.new_page()
            problems += await _admin_tabs(page, size)

            await page.goto(f"/analytics?from={DAY_A}&to={DAY_B}")
            await expect(page.locator("#tiles-outcomes .tile .big").first).to_have_text("4", timeout=TIMEOUT)
            if (size, "analytics") in SHOTS:
                await _picture(page, SHOTS[size, "analytics"])
            problems += await _layout_problems(
                page, f"/analytics at {size} px", [NAV, "#from", "#to", "#channel", "#intent", "#apply"]
            )

            await page.goto(f"/supervisor?from={DAY_A}&to={DAY_B}")
            await expect(page.locator("#results tr")).to_have_count(4, timeout=TIMEOUT)
            if (size, "supervisor") in SHOTS:
                await _picture(page, SHOTS[size, "supervisor"])
            problems += await _layout_problems(
                page, f"/supervisor at {size} px", [NAV, "#q", "#from", "#to", "#channel", "#search"]
            )

            await page.goto(f"/supervisor/conversations/{seeded.on_a[-1]}")
            await expect(page.locator("#timeline")).to_contain_text("where is my order?", timeout=TIMEOUT)
            if (size, "timeline") in SHOTS:
                await _picture(page, SHOTS[size, "timeline"])
            problems += await _overflow(page, f"the timeline at {size} px")

            await page.goto("/console")
            await expect(page.locator("#status")).to_have_text("Live", timeout=TIMEOUT)
            if (size, "console") in SHOTS:
                await _picture(page, SHOTS[size, "console"])
            problems += await _layout_problems(
                page, f"/console at {size} px", ['[data-presence="available"]', NAV, "#sign-out"]
            )
            await page.close()
    finally:
        await phone.close()
        await desktop.close()
    assert problems == [], "\n".join(problems)
