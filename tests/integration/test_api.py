"""The JSON API: intents CRUD (and the engine picking changes up), search, errors, health and metrics."""

from __future__ import annotations

from pipeline.clock import FakeClock
from tests.support import AUTH_TOKEN, live_server, make_customer, post_signed, whatsapp_form

NEW_INTENT = {
    "name": "gift_wrap",
    "description": "Gift wrapping options",
    "examples": ["do you offer gift wrapping", "can you wrap my order as a gift", "is gift wrap available"],
    "action": "faq",
    "answer": "Yes: gift wrapping is $4 per order; tick 'gift' at checkout.",
    "queue": "sales",
}


async def test_intents_crud_changes_what_the_engine_answers(database_url: str) -> None:
    async with live_server(database_url) as server:
        listed = (await server.http.get("/api/intents")).json()["intents"]
        names = {i["name"] for i in listed}
        assert {"refund", "cancel_order", "order_status", "talk_to_person"} <= names

        created = await server.http.post("/api/intents", json=NEW_INTENT)
        assert created.status_code == 201
        assert (await server.http.post("/api/intents", json=NEW_INTENT)).json()["error"][
            "code"
        ] == "intent_exists"
        reply = await post_signed(
            server, "/twilio/messaging", whatsapp_form("+15550123001", "can you gift wrap it for me?")
        )
        assert "gift wrapping is $4" in reply.text

        changed = await server.http.put(
            "/api/intents/gift_wrap", json={**NEW_INTENT, "answer": "Gift wrap is free this month."}
        )
        assert changed.status_code == 200
        reply = await post_signed(
            server, "/twilio/messaging", whatsapp_form("+15550123002", "do you do gift wrapping?")
        )
        assert "free this month" in reply.text

        assert (await server.http.delete("/api/intents/gift_wrap")).status_code == 204
        assert (await server.http.get("/api/intents/gift_wrap")).json()["error"]["code"] == "intent_not_found"

        bad = await server.http.post(
            "/api/intents", json={"name": "x", "policy": "whenever", "examples": ["a"]}
        )
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_intent"
        bad = await server.http.post("/api/intents", json={"name": "y", "colour": "blue"})
        assert bad.status_code == 422 and "colour" in bad.json()["error"]["message"]


async def test_conversation_search_filters_and_errors_are_json_with_stable_codes(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock, twilio_auth_token=AUTH_TOKEN) as server:
        c = await make_customer(server.services.pool, clock.now(), {"kettle": ("placed", "Kettle", 2900, 1)})
        await post_signed(
            server,
            "/twilio/messaging",
            whatsapp_form(c.phone, "my parcel with the kettle seems lost somewhere"),
        )
        found = (await server.http.get("/api/conversations", params={"q": "kettle lost"})).json()[
            "conversations"
        ]
        assert c.ref in [conv["customer_ref"] for conv in found]
        assert (await server.http.get("/api/conversations", params={"q": "zebra quantum"})).json()[
            "conversations"
        ] == []
        by_channel = (
            await server.http.get("/api/conversations", params={"channel": "webchat", "customer": c.ref})
        ).json()
        assert by_channel["conversations"] == []

        for path, code in (
            ("/api/conversations/999999", "conversation_not_found"),
            ("/api/tickets/CL-999999", "ticket_not_found"),
            ("/api/customers/999999", "customer_not_found"),
            ("/api/orders/1", "order_not_found"),
            ("/nope", "not_found"),
        ):
            response = await server.http.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == code
        response = await server.http.get("/api/conversations", params={"limit": "lots"})
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


async def test_healthz_metrics_and_openapi(database_url: str) -> None:
    async with live_server(database_url) as server:
        assert (await server.http.get("/healthz")).json() == {"status": "ok", "database": "ok"}
        await post_signed(
            server, "/twilio/messaging", whatsapp_form("+15550123003", "what are your opening hours")
        )
        metrics = (await server.http.get("/metrics")).text
        assert 'closeloop_messages_total{channel="whatsapp",direction="in"} 1.0' in metrics
        assert "closeloop_turn_seconds_bucket" in metrics
        assert "closeloop_open_tickets" in metrics
        # the headline outcome rates (docs/metrics.md): the FAQ answer above was contained
        rates = dict(
            line.split()
            for line in metrics.splitlines()
            if line.startswith("closeloop_") and "_rate " in line
        )
        assert set(rates) == {
            "closeloop_containment_rate",
            "closeloop_resolution_rate",
            "closeloop_handoff_rate",
            "closeloop_recontact_rate",
            "closeloop_sla_compliance_rate",
        }
        assert 0.0 < float(rates["closeloop_containment_rate"]) <= 1.0
        schema = (await server.http.get("/openapi.json")).json()
        for path in (
            "/api/conversations",
            "/api/tickets",
            "/api/intents",
            "/api/customers/{ref}",
            "/twilio/messaging",
            "/healthz",
        ):
            assert path in schema["paths"], path
