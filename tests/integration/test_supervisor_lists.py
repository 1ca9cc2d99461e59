"""The supervisor's conversation list: total, pages, sorting by a whitelist, readable labels, the
known intents, and the conversations behind each analytics number (same filter, same count).

The data is seeded straight into the database in a week of 2018 no other test uses
(2018-03-05 .. 2018-03-11, UTC); every expected value is worked out in :func:`seeded`.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support import LiveServer, live_server, make_customer, token_client, unique_phone

WEEK = {"from": "2018-03-05", "to": "2018-03-11"}
LIST = "/api/supervisor/conversations"


def at(day: int, hour: int = 12) -> datetime:
    return datetime(2018, 3, day, hour, tzinfo=UTC)


@dataclass
class Seeded:
    ids: dict[str, int]
    ann: str
    bob: str
    caller: str
    maya: str
    queue: str


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        yield live


@pytest.fixture(scope="module")
async def seeded(server: LiveServer) -> Seeded:
    """Five contacts in the week and one after it:

    ====  =========  ===========  ========  ===========================================  ============
    name  channel    intent       customer  what happened                                counts as
    ====  =========  ===========  ========  ===========================================  ============
    A     webchat    refund_x     Ann       the AI answered, no ticket                   contained
    B     whatsapp   refund_x     Ann       two days after A, same intent                contained, recontact
    C     voice      status_x     Bob       handed off, waits in the queue, ticket with  handoff, limbo
                                            no next step
    D     sms        cancel_x     (none)    handed off to agent Maya, ticket with a      handoff
                                            next step due next month
    E     webchat    refund_x     (none)    handed off, ticket resolved, closed          handoff, resolved
    F     webchat    refund_x     Ann       2018-03-12: outside the week                 nothing
    ====  =========  ===========  ========  ===========================================  ============
    """
    s = server.services
    pool = s.pool
    now = s.clock.now()
    ann = await make_customer(pool, now, {}, name="Ann Lee")
    bob = await make_customer(pool, now, {}, name="Bob Stone")
    caller = unique_phone()
    queue = "q" + secrets.token_hex(4)
    await s.desk.routing.upsert_queue(queue)
    maya = await s.users.create_user(
        f"maya-{secrets.token_hex(4)}@example.com", "Maya Quinn", "agent", secrets.token_urlsafe(12)
    )
    ids: dict[str, int] = {}

    async def conversation(
        name: str,
        channel: str,
        intent: str,
        customer: str | None,
        created: datetime,
        *,
        status: str = "open",
        owner: str = "ai",
        state: dict[str, Any] | None = None,
    ) -> int:
        cid = await pool.fetchval(
            """INSERT INTO conversations (channel, address, customer_ref, status, owner, intent, state,
                                          created_at, updated_at, last_seq)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, 1) RETURNING id""",
            channel,
            "sl-" + secrets.token_hex(8),
            customer,
            status,
            owner,
            intent,
            state or {},
            created,
        )
        await pool.execute(
            """INSERT INTO messages (conversation_id, seq, direction, sender, body, created_at)
               VALUES ($1, 1, 'in', 'customer', $2, $3)""",
            cid,
            f"hello from {name}",
            created,
        )
        ids[name] = int(cid)
        return int(cid)

    async def ticket(cid: int, created: datetime, **columns: Any) -> int:
        values = {
            "protocol": "SL-" + secrets.token_hex(4).upper(),
            "status": "open",
            "priority": "normal",
            "queue": queue,
            "subject": "Handoff",
            "conversation_id": cid,
            "created_at": created,
            "updated_at": created,
            **columns,
        }
        names = ", ".join(values)
        marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        tid = await pool.fetchval(
            f"INSERT INTO tickets ({names}) VALUES ({marks}) RETURNING id", *values.values()
        )
        await pool.execute("UPDATE conversations SET ticket_id = $2 WHERE id = $1", cid, tid)
        return int(tid)

    async def handoff(cid: int, tid: int, created: datetime, status: str = "waiting") -> None:
        await pool.execute(
            """INSERT INTO handoffs (conversation_id, ticket_id, queue, priority, status, created_at, updated_at)
               VALUES ($1, $2, $3, 'normal', $4, $5, $5)""",
            cid,
            tid,
            queue,
            status,
            created,
        )

    await conversation("A", "webchat", "refund_x", ann.ref, at(5))
    await conversation("B", "whatsapp", "refund_x", ann.ref, at(7))
    c = await conversation(
        "C",
        "voice",
        "status_x",
        bob.ref,
        at(6),
        status="escalated",
        owner=f"queue:{queue}",
        state={"caller_phone": caller},
    )
    await handoff(c, await ticket(c, at(6)), at(6))
    d = await conversation("D", "sms", "cancel_x", None, at(8), owner=f"agent:{maya.id}")
    await handoff(
        d,
        await ticket(
            d, at(8), owner=f"agent:{maya.id}", next_step="call back", next_step_due=now + timedelta(days=30)
        ),
        at(8),
        status="assigned",
    )
    e = await conversation("E", "webchat", "refund_x", None, at(9), status="closed")
    await handoff(
        e,
        await ticket(
            e, at(9), status="resolved", next_step="check", next_step_due=at(12), resolved_at=at(10)
        ),
        at(9),
        status="assigned",
    )
    await conversation("F", "webchat", "refund_x", ann.ref, at(12))
    return Seeded(ids, ann.name, bob.name, caller, maya.name, queue)


async def _list(server: LiveServer, **params: Any) -> dict[str, Any]:
    response = await server.http.get(LIST, params={**WEEK, **params})
    assert response.status_code == 200, response.text
    return response.json()


def _names(seeded: Seeded, body: dict[str, Any]) -> list[str]:
    by_id = {v: k for k, v in seeded.ids.items()}
    return [by_id[c["id"]] for c in body["conversations"]]


async def test_the_list_has_a_total_and_pages(server: LiveServer, seeded: Seeded) -> None:
    first = await _list(server, sort="started", limit=2)
    assert first["total"] == 5 and first["limit"] == 2 and first["offset"] == 0
    assert _names(seeded, first) == ["A", "C"]
    second = await _list(server, sort="started", limit=2, offset=2)
    assert second["total"] == 5 and _names(seeded, second) == ["B", "D"]
    last = await _list(server, sort="started", limit=2, offset=4)
    assert last["total"] == 5 and _names(seeded, last) == ["E"]
    beyond = await _list(server, sort="started", limit=2, offset=10)
    assert beyond["total"] == 5 and beyond["conversations"] == []


async def test_columns_sort_both_ways_on_the_server(server: LiveServer, seeded: Seeded) -> None:
    assert _names(seeded, await _list(server, sort="-started")) == ["E", "D", "B", "C", "A"]
    assert _names(seeded, await _list(server, sort="channel")) == ["D", "C", "A", "E", "B"]
    # customer: the name, else the number the customer wrote or called from, else nothing (last)
    by_customer = await _list(server, sort="customer")
    assert _names(seeded, by_customer)[:3] == ["A", "B", "C"]
    assert set(_names(seeded, by_customer)[3:]) == {"D", "E"}
    assert _names(seeded, await _list(server, sort="-id")) == ["E", "D", "C", "B", "A"]
    owners = await _list(server, sort="owner")
    assert [c["owner_label"] for c in owners["conversations"]] == sorted(
        ["AI assistant", "AI assistant", "AI assistant", f"queue {seeded.queue}", seeded.maya]
    )
    assert owners["sort"] == "owner"


async def test_rows_read_as_people_queues_and_one_status(server: LiveServer, seeded: Seeded) -> None:
    rows = {c["id"]: c for c in (await _list(server))["conversations"]}
    a, c, d, e = (rows[seeded.ids[k]] for k in "ACDE")
    assert (a["customer_name"], a["owner_label"], a["owner_kind"], a["state"]) == (
        seeded.ann,
        "AI assistant",
        "ai",
        "with the AI",
    )
    assert (c["customer_name"], c["caller"], c["owner_label"], c["owner_kind"], c["state"]) == (
        seeded.bob,
        seeded.caller,
        f"queue {seeded.queue}",
        "queue",
        "waiting for a person",
    )
    assert (d["customer_name"], d["owner_label"], d["owner_kind"], d["owner_role"], d["state"]) == (
        None,
        seeded.maya,
        "agent",
        "agent",
        "with a person",
    )
    assert e["state"] == "closed" and e["ticket_status"] == "resolved"
    timeline = (await server.http.get(f"{LIST}/{seeded.ids['C']}")).json()
    assert timeline["labels"]["customer_name"] == seeded.bob
    assert timeline["labels"]["caller"] == seeded.caller
    assert timeline["labels"]["owner_label"] == f"queue {seeded.queue}"


async def test_filters_by_a_known_intent_channel_and_ids(server: LiveServer, seeded: Seeded) -> None:
    known = (await server.http.get("/api/supervisor/intents")).json()["intents"]
    assert {"refund_x", "status_x", "cancel_x"} <= set(known) and known == sorted(known)
    assert _names(seeded, await _list(server, intent="refund_x", sort="started")) == ["A", "B", "E"]
    assert _names(seeded, await _list(server, channel="voice")) == ["C"]
    ids = f"{seeded.ids['A']},{seeded.ids['D']},{seeded.ids['F']}"
    assert _names(seeded, await _list(server, ids=ids, sort="id")) == ["A", "D"]  # F: not in the week
    everything = await server.http.get(LIST, params={"ids": ids, "sort": "id"})
    assert _names(seeded, everything.json()) == ["A", "D", "F"]
    # an ISO instant is exclusive, a day is included
    response = await server.http.get(
        LIST, params={"from": "2018-03-05", "to": "2018-03-07T12:00:00+00:00", "sort": "id"}
    )
    assert _names(seeded, response.json()) == ["A", "C"]


async def test_each_analytics_number_lists_exactly_the_conversations_it_counts(
    server: LiveServer, seeded: Seeded
) -> None:
    numbers = (await server.http.get("/api/analytics", params=WEEK)).json()
    assert (numbers["contacts"], numbers["contained"], numbers["resolved"]) == (5, 2, 3)
    assert (numbers["handed_off"], numbers["recontacts"], len(numbers["limbo"])) == (3, 1, 1)
    expected = {
        "contacts": (numbers["contacts"], {"A", "B", "C", "D", "E"}),
        "contained": (numbers["contained"], {"A", "B"}),
        "resolved": (numbers["resolved"], {"A", "B", "E"}),
        "handed_off": (numbers["handed_off"], {"C", "D", "E"}),
        "recontacts": (numbers["recontacts"], {"B"}),
        "limbo": (len(numbers["limbo"]), {"C"}),
    }
    for metric, (count, names) in expected.items():
        found = await _list(server, metric=metric)
        assert found["total"] == count, metric
        assert set(_names(seeded, found)) == names, metric
    # the same with the analytics' channel and intent filters
    voice = (await server.http.get("/api/analytics", params={**WEEK, "channel": "voice"})).json()
    found = await _list(server, channel="voice", metric="handed_off")
    assert found["total"] == voice["handed_off"] == 1
    refunds = (await server.http.get("/api/analytics", params={**WEEK, "intent": "refund_x"})).json()
    found = await _list(server, intent="refund_x", metric="contained")
    assert found["total"] == refunds["contained"] == 2
    page = await server.http.get("/analytics")
    assert "/supervisor?" in page.text and "/api/supervisor/conversations?" not in page.text


async def test_bad_parameters_are_refused_with_a_code(server: LiveServer, seeded: Seeded) -> None:
    for params, code in [
        ({"sort": "id;DROP TABLE conversations"}, "invalid_sort"),
        ({"sort": "created_at desc"}, "invalid_sort"),
        ({"metric": "everything"}, "invalid_metric"),
        ({"channel": "fax"}, "invalid_channel"),
        ({"ids": "1;2"}, "invalid_ids"),
        ({"from": "yesterday"}, "invalid_date"),
    ]:
        response = await server.http.get(LIST, params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["code"] == code and response.json()["error"]["message"]


async def test_sla_breach_alerts_reach_admins_as_well_as_supervisors(
    server: LiveServer, seeded: Seeded
) -> None:
    s = server.services
    cid = seeded.ids["C"]
    tid = await s.pool.fetchval("SELECT ticket_id FROM conversations WHERE id = $1", cid)
    await s.pool.execute("UPDATE tickets SET sla_breached = '{first_response}' WHERE id = $1", tid)
    await s.desk.routing.notify_sla_breaches()
    await s.desk.routing.notify_sla_breaches()  # once per breach and role, however often it runs

    supervisor = await token_client(server, "supervisor")
    agent = await token_client(server, "agent")

    async def alerts(client: Any, unread: bool = False) -> list[dict[str, Any]]:
        path = "/api/desk/notifications" if client is agent else "/api/supervisor/notifications"
        body = (await client.get(path, params={"unread": str(unread).lower()})).json()
        return [
            n for n in body["notifications"] if n["kind"] == "sla_breach" and n["data"]["ticket_id"] == tid
        ]

    [for_admin] = await alerts(server.http)
    [for_supervisor] = await alerts(supervisor)
    assert (for_admin["role"], for_supervisor["role"]) == ("admin", "supervisor")
    assert for_admin["data"]["sla"] == for_supervisor["data"]["sla"] == "first_response"
    assert await alerts(agent) == []
    # the admin reading theirs leaves the supervisors' unread
    response = await server.http.post(f"/api/desk/notifications/{for_admin['id']}/read")
    assert response.status_code == 200 and response.json() == {"read": True}
    assert await alerts(server.http, unread=True) == []
    assert [n["id"] for n in await alerts(supervisor, unread=True)] == [for_supervisor["id"]]
    events = await s.pool.fetch(
        "SELECT data FROM events WHERE conversation_id = $1 AND kind = 'sla_escalated'", cid
    )
    assert [e["data"]["to"] for e in events] == [["supervisor", "admin"]]
