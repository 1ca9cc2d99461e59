"""The supervisor pages in headless Chromium (Debian's, as tests/e2e/test_console_browser.py):
a link with filters opens the filtered list, a number on /analytics opens the conversations behind
it, the timeline folds diagnostic events away, and both pages fit a 390 px phone."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

from playwright.async_api import Page, async_playwright, expect

from tests.e2e.test_console_browser import CHROMIUM_ARGS, TIMEOUT, _chromium, _shot
from tests.support import LiveServer, live_server, make_customer, make_user

DAY = "2017-06-14"


async def _seed(server: LiveServer, intent: str) -> tuple[int, int, str]:
    """Two web chats on DAY: one of ``intent`` (a known customer, a diagnostic event) and one of
    another intent, handed off. Returns ``(mine, other, customer name)``."""
    pool = server.services.pool
    created = datetime(2017, 6, 14, 10, tzinfo=UTC)
    name = f"Rosa Park {secrets.token_hex(2)}"
    customer = await make_customer(pool, created, {}, name=name)
    ids = []
    for which, handed in ((intent, False), (intent + "_other", True)):
        cid = await pool.fetchval(
            """INSERT INTO conversations (channel, address, customer_ref, intent, created_at, updated_at, last_seq)
               VALUES ('webchat', $1, $2, $3, $4, $4, 1) RETURNING id""",
            "e2e-" + secrets.token_hex(6),
            customer.ref,
            which,
            created,
        )
        await pool.execute(
            """INSERT INTO messages (conversation_id, seq, direction, sender, body, created_at)
               VALUES ($1, 1, 'in', 'customer', 'where is my order?', $2)""",
            cid,
            created,
        )
        await pool.execute(
            """INSERT INTO events (conversation_id, kind, data, created_at)
               VALUES ($1, 'identity_claimed', '{"by": "webchat"}', $2)""",
            cid,
            created,
        )
        if handed:
            await pool.execute(
                "INSERT INTO events (conversation_id, kind, data, created_at) VALUES ($1, 'handoff', '{}', $2)",
                cid,
                created,
            )
        ids.append(int(cid))
    return ids[0], ids[1], name


async def _fits(page: Page, width: int) -> None:
    overflow = await page.evaluate("document.scrollingElement.scrollWidth")
    assert overflow <= width, f"the page is {overflow} px wide on a {width} px screen"


async def test_a_filtered_link_opens_the_filtered_list_and_analytics_numbers_open_their_conversations(
    database_url: str,
) -> None:
    executable = _chromium()
    async with live_server(database_url) as server:
        intent = "e2e_" + secrets.token_hex(3)
        mine, other, name = await _seed(server, intent)
        boss, password = await make_user(server, "supervisor")
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(
                    base_url=server.base_url, viewport={"width": 1024, "height": 800}
                )
                page = await context.new_page()
                await page.goto("/supervisor")
                await page.fill("#email", boss.email)
                await page.fill("#password", password)
                await page.click("button[type=submit]")
                await expect(page).to_have_url(server.base_url + "/supervisor")

                # a link with an intent: the form shows it and the list is filtered
                await page.goto(f"/supervisor?intent={intent}")
                await expect(page.locator("#intent")).to_have_value(intent, timeout=TIMEOUT)
                await expect(page.locator("#results tr")).to_have_count(1, timeout=TIMEOUT)
                await expect(page.locator("#results a")).to_have_text(f"#{mine}")
                await expect(page.locator("#results")).to_contain_text(name)  # the name, not an id
                await expect(page.locator("#c-range")).to_have_text("1–1 of 1")
                await _shot(page, "07-supervisor-filtered.png")

                # sorting is a button in the column header, usable from the keyboard
                await page.goto(f"/supervisor?from={DAY}&to={DAY}")
                await expect(page.locator("#results tr")).to_have_count(2, timeout=TIMEOUT)
                header = page.locator('th[data-sort="id"] button')
                await header.focus()
                await page.keyboard.press("Enter")
                await expect(page.locator('th[data-sort="id"]')).to_have_attribute("aria-sort", "descending")
                await expect(page.locator("#results a").first).to_have_text(f"#{other}", timeout=TIMEOUT)
                await page.keyboard.press("Enter")
                await expect(page.locator('th[data-sort="id"]')).to_have_attribute("aria-sort", "ascending")
                await expect(page.locator("#results a").first).to_have_text(f"#{mine}", timeout=TIMEOUT)
                assert "sort=id" in page.url

                # the contained number on /analytics opens the one conversation nobody had to touch
                await page.goto(f"/analytics?from={DAY}&to={DAY}")
                contained = page.locator('#tiles-outcomes a[href*="metric=contained"]')
                await expect(contained).to_be_visible(timeout=TIMEOUT)
                await expect(contained).to_have_text("50.0%")
                await contained.click()
                await expect(page).to_have_url(re.compile(r"/supervisor\?.*metric=contained"))
                await expect(page.locator("#metric")).to_have_value("contained")
                await expect(page.locator("#results tr")).to_have_count(1, timeout=TIMEOUT)
                await expect(page.locator("#results a")).to_have_text(f"#{mine}")
                await expect(page.locator("#filter-note")).to_contain_text("contained without a person")

                # the timeline: the customer's name, diagnostic events folded, the actions at hand
                await page.click(f'#results a:text("#{mine}")')
                await expect(page.locator("#title")).to_contain_text(name, timeout=TIMEOUT)
                folded = page.locator("#timeline details")
                await expect(folded).to_have_count(1)
                assert await folded.get_attribute("open") is None
                await expect(folded.locator("summary")).to_have_text("1 diagnostic event")
                await expect(page.get_by_role("button", name="Take over")).to_be_visible()
                await page.get_by_role("button", name="Take over").click()
                await expect(page.locator("#reply")).to_be_visible(timeout=TIMEOUT)
                await expect(page.get_by_role("button", name="Hand back to the AI")).to_be_visible()
                await _shot(page, "08-supervisor-timeline-taken-over.png")

                # a phone: nothing wider than the screen
                phone = await browser.new_context(
                    base_url=server.base_url,
                    viewport={"width": 390, "height": 844},
                    storage_state=await context.storage_state(),
                )
                small = await phone.new_page()
                await small.goto(f"/supervisor?intent={intent}")
                await expect(small.locator("#results tr")).to_have_count(1, timeout=TIMEOUT)
                await _fits(small, 390)
                await _shot(small, "09-supervisor-phone.png")
                await small.goto(f"/supervisor/conversations/{mine}")
                await expect(small.locator("#title")).to_contain_text(name, timeout=TIMEOUT)
                await _fits(small, 390)
            finally:
                await browser.close()
