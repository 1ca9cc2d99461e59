"""Staff see what their role and queues allow: an agent outside a queue cannot read that queue's
conversations, transcripts, tickets or customers; an agent of the queue and a supervisor can."""

from __future__ import annotations

from datetime import timedelta

import httpx

from pipeline.clock import FakeClock
from pipeline.model import Channel
from tests import support
from tests.support import LiveServer, bearer, live_server, make_customer, make_token, make_user


async def _agent(server: LiveServer, queues: list[str] | None) -> httpx.AsyncClient:
    """An API client of a new agent serving ``queues`` (no agent row at all when ``None``)."""
    user, _ = await make_user(server, "agent")
    if queues is not None:
        await server.services.desk.routing.set_queues(user.id, queues)
    return server.client(bearer(await make_token(server, user)))


async def _escalated_to_support(
    server: LiveServer, clock: FakeClock
) -> tuple[support.TestCustomer, int, str]:
    """A customer who asked for a person on WhatsApp: ``(customer, conversation id, ticket protocol)``."""
    customer = await make_customer(
        server.services.pool, clock.now(), {"kettle": ("delivered", "Kettle", 2900, 3)}
    )
    reply = await server.services.service.handle_text(
        Channel.WHATSAPP, customer.phone, "let me speak to a human"
    )
    # the customer is known (as after verifying with a code), for the customer endpoints
    await server.services.pool.execute(
        "UPDATE conversations SET customer_ref = $2 WHERE id = $1", reply.conversation_id, customer.ref
    )
    await server.services.pool.execute(
        "UPDATE tickets SET customer_ref = $2 WHERE conversation_id = $1", reply.conversation_id, customer.ref
    )
    conv = await server.services.pool.fetchrow(
        "SELECT c.id, c.owner, t.protocol, t.queue FROM conversations c"
        " JOIN tickets t ON t.id = c.ticket_id WHERE c.id = $1",
        reply.conversation_id,
    )
    assert conv is not None and conv["queue"] == "support" and conv["owner"] == "queue:support", conv
    return customer, conv["id"], conv["protocol"]


async def test_an_agent_outside_the_queue_cannot_read_its_conversations_tickets_or_customers(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        customer, conversation_id, protocol = await _escalated_to_support(server, clock)
        order = customer.orders["kettle"]
        outsiders = [await _agent(server, ["billing"]), await _agent(server, None)]
        for outsider in outsiders:
            for path, code in (
                (f"/api/conversations/{conversation_id}", "conversation_not_found"),
                (f"/api/desk/conversations/{conversation_id}", "conversation_not_found"),
                (f"/api/tickets/{protocol}", "ticket_not_found"),
                (f"/api/customers/{customer.ref}", "customer_not_found"),
                (f"/api/orders/{order}", "order_not_found"),
            ):
                response = await outsider.get(path)
                assert response.status_code == 404 and response.json()["error"]["code"] == code, path
                assert "kettle" not in response.text.lower(), path
            listed = (await outsider.get("/api/conversations", params={"customer": customer.ref})).json()
            assert listed["conversations"] == []
            searched = (await outsider.get("/api/conversations", params={"q": "speak human"})).json()
            assert conversation_id not in [c["id"] for c in searched["conversations"]]
            tickets = (await outsider.get("/api/tickets", params={"queue": "support"})).json()["tickets"]
            assert protocol not in [t["protocol"] for t in tickets]
            assert protocol not in (await outsider.get("/api/tickets", params={"limit": 500})).text


async def test_an_agent_of_the_queue_and_a_supervisor_read_everything_of_it(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        customer, conversation_id, protocol = await _escalated_to_support(server, clock)
        supervisor_user, _ = await make_user(server, "supervisor")
        readers = [
            await _agent(server, ["support"]),
            server.client(bearer(await make_token(server, supervisor_user))),
            server.http,  # the admin
        ]
        for reader in readers:
            conv = (await reader.get(f"/api/conversations/{conversation_id}")).json()
            assert "let me speak to a human" in [m["body"] for m in conv["messages"]]
            assert (await reader.get(f"/api/desk/conversations/{conversation_id}")).status_code == 200
            assert (await reader.get(f"/api/tickets/{protocol}")).json()["protocol"] == protocol
            profile = (await reader.get(f"/api/customers/{customer.ref}")).json()
            assert conversation_id in [c["id"] for c in profile["conversations"]]
            assert protocol in [t["protocol"] for t in profile["tickets"]]
            assert (await reader.get(f"/api/orders/{customer.orders['kettle']}")).status_code == 200
            listed = (await reader.get("/api/conversations", params={"customer": customer.ref})).json()
            assert [c["id"] for c in listed["conversations"]] == [conversation_id]
            tickets = (await reader.get("/api/tickets", params={"customer": customer.ref})).json()["tickets"]
            assert [t["protocol"] for t in tickets] == [protocol]


async def test_an_agent_who_was_given_the_conversation_reads_it_outside_their_queues(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        _, conversation_id, protocol = await _escalated_to_support(server, clock)
        user, _ = await make_user(server, "agent")
        await server.services.desk.routing.set_queues(user.id, ["billing"])
        agent = server.client(bearer(await make_token(server, user)))
        assert (await agent.get(f"/api/conversations/{conversation_id}")).status_code == 404
        # a supervisor hands it to this agent directly
        await server.services.pool.execute(
            "UPDATE conversations SET owner = $2 WHERE id = $1", conversation_id, f"agent:{user.id}"
        )
        clock.advance(timedelta(seconds=1))
        assert (await agent.get(f"/api/conversations/{conversation_id}")).status_code == 200
        listed = (await agent.get("/api/conversations")).json()["conversations"]
        assert conversation_id in [c["id"] for c in listed]
