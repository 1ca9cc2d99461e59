"""The refund story over WhatsApp, end to end through the real server, PostgreSQL and Twilio's wire format."""

from __future__ import annotations

import re
from datetime import timedelta

from pipeline.clock import FakeClock
from tests.fakes.twilio_server import FakeTwilio
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    live_server,
    make_customer,
    post_signed,
    twilio_settings,
    whatsapp_form,
)

TEMPLATE_SID = "HX" + "a" * 32


def twiml_texts(xml: str) -> list[str]:
    return [
        m.replace("&amp;", "&").replace("&apos;", "'").replace("&quot;", '"')
        for m in re.findall(r"<Message>(.*?)</Message>", xml, re.S)
    ]


async def say(server: LiveServer, phone: str, body: str) -> list[str]:
    response = await post_signed(server, "/twilio/messaging", whatsapp_form(phone, body))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/xml")
    return twiml_texts(response.text)


async def test_refund_story_over_whatsapp_issues_once_texts_label_resolves_ticket_and_follows_up(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio, whatsapp_from="+15550009999"),
            twilio_whatsapp_template_sid=TEMPLATE_SID,
        ) as server,
    ):
        pool = server.services.pool
        dana = await make_customer(
            pool,
            clock.now(),
            {
                "headphones": ("delivered", "Wireless headphones", 8900, 5),
                "mat": ("delivered", "Yoga mat", 3500, 12),
                "lamp": ("placed", "Desk lamp", 4200, 1),
            },
        )
        headphones, mat = dana.orders["headphones"], dana.orders["mat"]

        # 1. Known customer (by WhatsApp number) asks for a refund: two delivered orders -> which one?
        replies = await say(server, dana.phone, "I want a refund for my order")
        assert len(replies) == 1
        assert headphones in replies[0] and mat in replies[0] and "Which order" in replies[0]

        # 2. Picks one: policy checked, confirmation asked, nothing issued yet.
        replies = await say(server, dana.phone, f"the headphones one, {headphones}")
        assert "Shall I go ahead?" in replies[0] and "$89.00" in replies[0]
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1",
                headphones,
            )
            == 0
        )

        # 3. Confirms: refund exactly once, warehouse notified, label texted, ticket resolved, follow-up scheduled.
        replies = await say(server, dana.phone, "yes please")
        assert "refunded" in replies[0]
        protocol = re.search(r"CL-\d{6}", replies[0]).group(0)
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1",
                headphones,
            )
            == 1
        )
        label = await pool.fetchrow(
            "SELECT l.* FROM return_labels l JOIN orders o ON o.id = l.order_id WHERE o.number = $1",
            headphones,
        )
        assert label["warehouse_notified_at"] is not None

        label_texts = [m for m in twilio.messages if label["code"] in m.form.get("Body", "")]
        assert len(label_texts) == 1
        assert label_texts[0].form["To"] == f"whatsapp:{dana.phone}"
        assert label_texts[0].form["From"] == "whatsapp:+15550009999"
        assert label["url"] in label_texts[0].form["Body"]
        page = await server.http.get(label["url"].replace(server.base_url, ""))
        assert page.status_code == 200 and label["code"] in page.text

        # A second "yes" (or a retried flow) never refunds twice.
        await say(server, dana.phone, "yes")
        await say(server, dana.phone, f"refund order {headphones} please")
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1",
                headphones,
            )
            == 1
        )

        # Every step is visible through the API.
        convs = (await server.http.get("/api/conversations", params={"customer": dana.ref})).json()[
            "conversations"
        ]
        assert len(convs) == 1 and convs[0]["channel"] == "whatsapp"
        conv = (await server.http.get(f"/api/conversations/{convs[0]['id']}")).json()
        bodies = [m["body"] for m in conv["messages"]]
        assert bodies[0] == "I want a refund for my order"
        assert any(label["code"] in b for b in bodies)
        assert [m["seq"] for m in conv["messages"]] == list(range(1, len(bodies) + 1))
        kinds = [a["kind"] for a in conv["actions"]]
        for kind in (
            "identity_verified",  # a signed WhatsApp from the number on file
            "policy_check",
            "refund_issued",
            "return_label_created",
            "ticket_opened",
            "followup_scheduled",
            "text_sent",
        ):
            assert kind in kinds, kind
        ticket = (await server.http.get(f"/api/tickets/{protocol}")).json()
        assert ticket["status"] == "resolved" and ticket["queue"] == "billing" and ticket["owner"] == "ai"
        assert headphones in ticket["next_step"]
        order = (await server.http.get(f"/api/orders/{headphones}")).json()
        assert order["refunded_cents"] == 8900
        [followup] = conv["followups"]
        assert followup["status"] == "scheduled"

        # 4. The follow-up is sent when the clock gets to 48 hours, not before, and only once.
        # (The database is shared by the whole run: only Dana's messages are this story's.)
        def to_dana() -> list:
            return [m for m in twilio.messages if m.form.get("To") == f"whatsapp:{dana.phone}"]

        sent_before = len(to_dana())
        clock.advance(timedelta(hours=47))
        await server.services.jobs.run_once()
        assert len(to_dana()) == sent_before
        clock.advance(timedelta(hours=1, minutes=1))
        stats = await server.services.jobs.run_once()
        assert stats.followups_sent >= 1
        await server.services.jobs.run_once()
        followup_msgs = to_dana()[sent_before:]
        assert len(followup_msgs) == 1
        # WhatsApp's 24-hour window has closed by then: the approved template is used.
        assert followup_msgs[0].form["ContentSid"] == TEMPLATE_SID
        assert headphones in followup_msgs[0].form["ContentVariables"]
        conv = (await server.http.get(f"/api/conversations/{convs[0]['id']}")).json()
        assert conv["followups"][0]["status"] == "sent"
        assert conv["messages"][-1]["kind"] == "followup"


async def test_refund_outside_window_explains_offers_person_and_agent_request_queues_ticket_with_summary(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, twilio_auth_token=AUTH_TOKEN) as server:
        sam = await make_customer(
            server.services.pool,
            clock.now(),
            {"blender": ("delivered", "Blender", 7900, 45)},
            name="Sam Okafor",
        )
        replies = await say(server, sam.phone, "I'd like my money back for the blender")
        assert "outside our 30-day refund window" in replies[0]
        assert "45 days ago" in replies[0]
        assert "person" in replies[0]
        assert (
            await server.services.pool.fetchval(
                "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1",
                sam.orders["blender"],
            )
            == 0
        )

        replies = await say(server, sam.phone, "agent please")
        protocol = re.search(r"CL-\d{6}", replies[0]).group(0)
        assert "billing" in replies[0]
        ticket = (await server.http.get(f"/api/tickets/{protocol}")).json()
        assert ticket["queue"] == "billing" and ticket["status"] == "open"
        lines = ticket["summary"].split("\n")
        assert len(lines) == 3
        assert lines[0].startswith("Who: Sam Okafor") and "WhatsApp" in lines[0]
        assert lines[1].startswith("Wants: a refund") and sam.orders["blender"] in lines[1]
        assert lines[2].startswith("Status:") and "outside_window" in lines[2]
        assert ticket["first_response_due"] is not None
        conv = (await server.http.get("/api/conversations", params={"customer": sam.ref})).json()[
            "conversations"
        ][0]
        assert conv["owner"] == "queue:billing" and conv["status"] == "escalated"
        queued = (
            await server.http.get("/api/tickets", params={"queue": "billing", "status": "open"})
        ).json()["tickets"]
        assert protocol in [t["protocol"] for t in queued]


async def test_cancel_placed_order_is_cancelled_and_shipped_order_is_refused_with_reason(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, twilio_auth_token=AUTH_TOKEN) as server:
        c = await make_customer(
            server.services.pool,
            clock.now(),
            {
                "lamp": ("placed", "Desk lamp", 4200, 1),
                "shoes": ("shipped", "Running shoes", 12000, 2),
            },
        )
        replies = await say(server, c.phone, f"please cancel order {c.orders['lamp']}")
        assert "Shall I cancel it?" in replies[0]
        replies = await say(server, c.phone, "yes")
        assert "is cancelled" in replies[0]
        order = (await server.http.get(f"/api/orders/{c.orders['lamp']}")).json()
        assert order["status"] == "cancelled" and order["cancelled_at"] is not None

        replies = await say(server, c.phone, f"I want to cancel order {c.orders['shoes']}")
        assert "already shipped" in replies[0] and "can't be cancelled" in replies[0]
        order = (await server.http.get(f"/api/orders/{c.orders['shoes']}")).json()
        assert order["status"] == "shipped"
