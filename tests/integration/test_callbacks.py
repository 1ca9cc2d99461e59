"""Callbacks (calls we promised to return) in the agent console's API."""

from __future__ import annotations

from datetime import timedelta

from pipeline.clock import FakeClock
from tests.support import live_server, login, make_customer, make_user


async def test_agents_see_and_return_the_callbacks_of_their_queues(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        pool, now = server.services.pool, clock.now()
        lee = await make_customer(
            pool, now, {"shoes": ("shipped", "Running shoes", 12000, 1)}, name="Lee Park"
        )
        conv_id = await pool.fetchval(
            "INSERT INTO conversations (channel, address, customer_ref, created_at, updated_at) "
            "VALUES ('voice', 'CA' || md5(random()::text), $1, $2, $2) RETURNING id",
            lee.ref,
            now,
        )
        ids = [
            await pool.fetchval(
                "INSERT INTO callbacks (conversation_id, queue, phone, due_at, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
                conv_id,
                queue,
                lee.phone,
                now + timedelta(minutes=minutes),
                now,
            )
            for queue, minutes in (("support", 30), ("billing", 10))
        ]
        support_cb, billing_cb = ids
        support_agent, support_pw = await make_user(server, "agent")
        billing_agent, billing_pw = await make_user(server, "agent")
        boss, boss_pw = await make_user(server, "supervisor")
        await server.services.desk.routing.set_queues(support_agent.id, ["support"])
        await server.services.desk.routing.set_queues(billing_agent.id, ["billing"])
        support = await login(server, support_agent.email, support_pw)
        billing = await login(server, billing_agent.email, billing_pw)
        supervisor = await login(server, boss.email, boss_pw)

        seen = (await support.get("/api/desk/callbacks")).json()["callbacks"]
        mine = [c for c in seen if c["id"] in ids]  # the test database is shared with other tests' callbacks
        assert [c["id"] for c in mine] == [support_cb]
        assert mine[0]["phone"] == lee.phone and mine[0]["queue"] == "support"
        everything = (await supervisor.get("/api/desk/callbacks")).json()["callbacks"]
        assert [c["id"] for c in everything if c["id"] in ids] == [
            billing_cb,
            support_cb,
        ]  # most urgent first

        refused = await billing.post(f"/api/desk/callbacks/{support_cb}/done")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_owner"
        done = await support.post(f"/api/desk/callbacks/{support_cb}/done")
        assert done.status_code == 200 and done.json()["callback"]["status"] == "done"
        again = await support.post(f"/api/desk/callbacks/{support_cb}/done")
        assert again.status_code == 409
        assert (await support.post("/api/desk/callbacks/999999/done")).status_code == 404
        assert support_cb not in [
            c["id"] for c in (await support.get("/api/desk/callbacks")).json()["callbacks"]
        ]
        event = await pool.fetchrow(
            "SELECT data FROM events WHERE conversation_id = $1 AND kind = 'callback_done'", conv_id
        )
        assert event is not None and event["data"]["by"] == support_agent.id
