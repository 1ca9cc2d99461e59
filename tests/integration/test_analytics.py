"""Outcome analytics against a small dataset seeded straight into the database, in a week of 2019
no other test uses (2019-05-06 .. 2019-05-12, UTC). Every expected number is worked out by hand
in the comments of :func:`seed`; the formulas are in docs/metrics.md.
"""

from __future__ import annotations

import csv
import io
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from crm_bridge.analytics import AnalyticsRange, analytics_gauges, compute_analytics
from tests.support import LiveServer, live_server
from web.analytics import analytics_router

WEEK = {"from": "2019-05-06", "to": "2019-05-12"}


def at(day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2019, 5, day, hour, minute, second, tzinfo=UTC)


@dataclass
class Seeded:
    conversations: dict[str, int]
    tickets: dict[str, int]
    protocols: dict[str, str]


async def conversation(
    conn: asyncpg.Connection,
    channel: str,
    intent: str | None,
    customer: str | None,
    created: datetime,
    *,
    status: str = "open",
    owner: str = "ai",
) -> int:
    cid = await conn.fetchval(
        """INSERT INTO conversations (channel, address, customer_ref, status, owner, intent, created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING id""",
        channel,
        "an-" + secrets.token_hex(8),
        customer,
        status,
        owner,
        intent,
        created,
    )
    return int(cid)


async def message(conn: asyncpg.Connection, cid: int, seq: int, sender: str, when: datetime) -> None:
    direction = "in" if sender == "customer" else "out"
    await conn.execute(
        "INSERT INTO messages (conversation_id, seq, direction, sender, body, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        cid,
        seq,
        direction,
        sender,
        f"{sender} says hello",
        when,
    )


async def event(conn: asyncpg.Connection, cid: int, kind: str, data: dict[str, Any], when: datetime) -> None:
    await conn.execute(
        "INSERT INTO events (conversation_id, kind, data, created_at) VALUES ($1, $2, $3, $4)",
        cid,
        kind,
        data,
        when,
    )


async def ticket(conn: asyncpg.Connection, cid: int, created: datetime, **columns: Any) -> tuple[int, str]:
    protocol = "AN-" + secrets.token_hex(4).upper()
    values = {
        "protocol": protocol,
        "status": "open",
        "priority": "normal",
        "queue": "billing",
        "subject": "Handoff",
        "conversation_id": cid,
        "created_at": created,
        "updated_at": created,
        **columns,
    }
    names = ", ".join(values)
    marks = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    tid = await conn.fetchval(
        f"INSERT INTO tickets ({names}) VALUES ({marks}) RETURNING id", *values.values()
    )
    await conn.execute("UPDATE conversations SET ticket_id = $2 WHERE id = $1", cid, tid)
    return int(tid), protocol


async def order(conn: asyncpg.Connection, customer_id: int, cents: int) -> str:
    number = "AN" + secrets.token_hex(5)
    await conn.execute(
        """INSERT INTO orders (number, customer_id, amount_cents, status, placed_at)
           VALUES ($1, $2, $3, 'delivered', $4)""",
        number,
        customer_id,
        cents,
        at(1),
    )
    return number


async def seed(pool: asyncpg.Pool) -> Seeded:
    """Five contacts in the week, two just outside it.

    ======  ========  ================  ========  =====================================================
    conv    channel   intent            customer  what happened
    ======  ========  ================  ========  =====================================================
    C1      webchat   order_status      A         AI answered; a return label (contained, resolved)
    C2      whatsapp  refund_request    B         handoff (customer_asked), agent replied, ticket T2
                                                  resolved: first response 300 s, resolution 7200 s,
                                                  SLA met (resolved, not contained)
    C3      whatsapp  refund_request    B         2 days after C2: a recontact; AI refunded 25.00 and
                                                  cancelled an order of 40.00 (contained, resolved)
    C4      voice     billing_question  C         handoff (frustration), ticket T4 open without a next
                                                  step and past due (limbo, SLA breached); call of
                                                  300 s; 5 voice turns; 1 barge-in; warm transfer fell
                                                  back to a callback (not resolved)
    C5      voice     order_status      D         AI answered; call of 100 s lost with its node;
                                                  1 voice turn (contained, resolved)
    ======  ========  ================  ========  =====================================================

    Contacts 5; contained 3 (C1 C3 C5) = 0.6; resolved 4 = 0.8; handed off 2 = 0.4; recontacts 1 =
    0.2; SLA 1 of 2 tickets = 0.5. Voice-to-voice ms sorted: 800 900 1000 1200 1400 3000, so p50 =
    1100 and p95 = 1400 + 0.75 * 1600 = 2600.
    """
    run = secrets.token_hex(4)
    a, b, c, d = (f"an-{run}-{x}" for x in "abcd")
    async with pool.acquire() as conn, conn.transaction():
        buyer = await conn.fetchval(
            "INSERT INTO customers (name, created_at) VALUES ('Analytics Buyer', $1) RETURNING id", at(1)
        )
        refunded, cancelled, labelled = (
            await order(conn, buyer, 2500),
            await order(conn, buyer, 4000),
            await order(conn, buyer, 1000),
        )

        c1 = await conversation(conn, "webchat", "order_status", a, at(6, 10))
        await message(conn, c1, 1, "customer", at(6, 10))
        await message(conn, c1, 2, "bot", at(6, 10, 0, 2))
        await event(conn, c1, "intent", {"intent": "order_status", "score": 0.9}, at(6, 10))
        await event(conn, c1, "return_label_created", {"order": labelled, "code": "L1"}, at(6, 10, 1))

        c2 = await conversation(
            conn, "whatsapp", "refund_request", b, at(7, 9), status="escalated", owner="agent:1"
        )
        await message(conn, c2, 1, "customer", at(7, 9))
        await message(conn, c2, 2, "bot", at(7, 9, 0, 2))
        await message(conn, c2, 3, "agent", at(7, 9, 5))
        t2, p2 = await ticket(
            conn,
            c2,
            at(7, 9),
            status="resolved",
            first_response_due=at(7, 9, 15),
            first_response_at=at(7, 9, 5),
            resolution_due=at(8, 9),
            resolved_at=at(7, 11),
            next_step="confirm the refund arrived",
            next_step_due=at(10, 9),
        )
        await conn.execute(
            """INSERT INTO handoffs (conversation_id, ticket_id, queue, priority, status, created_at, updated_at)
               VALUES ($1, $2, 'billing', 'normal', 'assigned', $3, $3)""",
            c2,
            t2,
            at(7, 9),
        )
        await event(
            conn, c2, "handoff", {"queue": "billing", "ticket": p2, "reason": "customer_asked"}, at(7, 9)
        )
        await conn.execute(
            """INSERT INTO followups (conversation_id, ticket_id, customer_ref, channel, address, body, due_at,
                                      status, sent_at, created_at)
               VALUES ($1, $2, $3, 'whatsapp', '+15550000001', 'How did it go?', $4, 'sent', $4, $5)""",
            c2,
            t2,
            b,
            at(7, 12),
            at(7, 9),
        )

        c3 = await conversation(conn, "whatsapp", "refund_request", b, at(9, 9))
        await message(conn, c3, 1, "customer", at(9, 9))  # the reply to C2's follow-up
        await message(conn, c3, 2, "bot", at(9, 9, 0, 2))
        refund = {"order": refunded, "amount_cents": 2500, "provider_ref": "rf1", "already_existed": False}
        await event(conn, c3, "refund_issued", refund, at(9, 9, 1))
        await event(conn, c3, "refund_issued", {**refund, "already_existed": True}, at(9, 9, 2))  # a retry
        await event(conn, c3, "order_cancelled", {"order": cancelled}, at(9, 9, 3))

        c4 = await conversation(
            conn, "voice", "billing_question", c, at(10, 14), status="escalated", owner="queue:billing"
        )
        t4, p4 = await ticket(
            conn,
            c4,
            at(10, 14),
            first_response_due=at(10, 14, 15),
            resolution_due=at(11, 14),
            sla_breached=["first_response"],
        )
        await conn.execute(
            """INSERT INTO handoffs (conversation_id, ticket_id, queue, priority, status, created_at, updated_at)
               VALUES ($1, $2, 'billing', 'normal', 'waiting', $3, $3)""",
            c4,
            t4,
            at(10, 14, 4),
        )
        await event(
            conn, c4, "handoff", {"queue": "billing", "ticket": p4, "reason": "frustration"}, at(10, 14, 4)
        )
        sid4 = "CA" + secrets.token_hex(16)
        await conn.execute(
            """INSERT INTO calls (call_sid, conversation_id, status, end_reason, started_at, answered_at, ended_at)
               VALUES ($1, $2, 'completed', 'caller_hung_up', $3, $4, $5)""",
            sid4,
            c4,
            at(10, 14),
            at(10, 14, 0, 5),
            at(10, 14, 5, 5),
        )
        for i, ms in enumerate((800, 1000, 1200, 1400, 3000)):
            await event(conn, c4, "voice_turn", {"voice_to_voice_ms": ms, "stt_ms": 100}, at(10, 14, 1, i))
        await event(
            conn, c4, "voice_turn", {"voice_to_voice_ms": None}, at(10, 14, 2)
        )  # a turn without audio
        await event(
            conn, c4, "bot_interrupted", {"seq": 2, "heard_chars": 5, "planned_chars": 40}, at(10, 14, 3)
        )
        transfer = await conn.fetchval(
            """INSERT INTO transfers (call_sid, conversation_id, ticket_id, queue, status, created_at, updated_at)
               VALUES ($1, $2, $3, 'billing', 'fallback', $4, $4) RETURNING id""",
            sid4,
            c4,
            t4,
            at(10, 14, 4),
        )
        await conn.execute(
            """INSERT INTO callbacks (transfer_id, conversation_id, ticket_id, queue, due_at, created_at)
               VALUES ($1, $2, $3, 'billing', $4, $4)""",
            transfer,
            c4,
            t4,
            at(10, 15),
        )
        await conn.execute(
            """INSERT INTO followups (conversation_id, ticket_id, customer_ref, channel, address, body, due_at,
                                      status, created_at)
               VALUES ($1, $2, $3, 'sms', '+15550000002', 'We tried', $4, 'failed', $4)""",
            c4,
            t4,
            c,
            at(10, 16),
        )
        await conn.execute(
            """INSERT INTO followups (conversation_id, customer_ref, channel, address, body, due_at, status, created_at)
               VALUES ($1, $2, 'webchat', 'sha256:x', 'Anything else?', $3, 'cancelled', $3)""",
            c1,
            a,
            at(6, 11),
        )

        c5 = await conversation(conn, "voice", "order_status", d, at(11, 8))
        await conn.execute(
            """INSERT INTO calls (call_sid, conversation_id, status, end_reason, started_at, answered_at, ended_at)
               VALUES ($1, $2, 'completed', 'node_lost', $3, $3, $4)""",
            "CA" + secrets.token_hex(16),
            c5,
            at(11, 8),
            at(11, 8, 1, 40),
        )
        await event(conn, c5, "voice_turn", {"voice_to_voice_ms": 900}, at(11, 8, 0, 30))

        # Just outside the week (the range is [05-06 00:00, 05-13 00:00) UTC): never counted.
        before = await conversation(conn, "webchat", "order_status", f"an-{run}-e", at(5, 23, 59, 59))
        await event(conn, before, "handoff", {"reason": "outside"}, at(6, 0, 0, 1))
        after = await conversation(conn, "voice", "order_status", f"an-{run}-f", at(13))
        await ticket(conn, after, at(13))
    return Seeded(
        {"c1": c1, "c2": c2, "c3": c3, "c4": c4, "c5": c5},
        {"t2": t2, "t4": t4},
        {"t2": p2, "t4": p4},
    )


@pytest.fixture(scope="module")
async def seeded(database_url: str) -> AsyncIterator[tuple[LiveServer, Seeded]]:
    async with live_server(database_url) as server:
        if not any(getattr(r, "path", None) == "/analytics" for r in server.app.routes):
            server.app.include_router(analytics_router(server.app.state.services))
        yield server, await seed(server.services.pool)


async def get(server: LiveServer, path: str = "/api/analytics", **params: str) -> Any:
    response = await server.http.get(path, params={**WEEK, **params})
    assert response.status_code == 200, response.text
    return response.json()


async def test_headline_numbers_of_the_week(seeded: tuple[LiveServer, Seeded]) -> None:
    server, ids = seeded
    d = await get(server)
    assert d["range"] == {
        **d["range"],
        "from": "2019-05-06",
        "to": "2019-05-12",
        "days": 7,
        "timezone": "UTC",
    }
    assert (d["contacts"], d["contained"], d["resolved"], d["handed_off"], d["recontacts"]) == (5, 3, 4, 2, 1)
    assert d["rates"] == {
        "containment": 0.6,
        "resolution": 0.8,
        "handoff": 0.4,
        "recontact": 0.2,
        "sla_compliance": 0.5,
    }
    assert d["sla"] == {"tickets": 2, "met": 1, "breached": 1}
    assert d["handoff"] == {
        "reasons": [{"reason": "customer_asked", "count": 1}, {"reason": "frustration", "count": 1}],
        "first_response_s": {"count": 1, "p50": 300.0, "p90": 300.0},
        "resolution_s": {"count": 1, "p50": 7200.0, "p90": 7200.0},
    }
    assert [t["id"] for t in d["limbo"]] == [ids.tickets["t4"]]
    assert d["limbo"][0]["protocol"] == ids.protocols["t4"]
    assert d["limbo"][0]["conversation_id"] == ids.conversations["c4"]
    assert d["limbo"][0]["why"] == ["no_next_step", "overdue"]
    assert d["followups"] == {"scheduled": 0, "sent": 1, "failed": 1, "cancelled": 1, "replied": 1}
    assert d["actions"] == [
        {"action": "cancellation", "count": 1, "value_cents": 4000, "currency": "USD"},
        {"action": "refund", "count": 1, "value_cents": 2500, "currency": "USD"},
        {"action": "return_label", "count": 1, "value_cents": None, "currency": "USD"},
    ]
    assert d["intents"] == [
        {"intent": "order_status", "count": 2},
        {"intent": "refund_request", "count": 2},
        {"intent": "billing_question", "count": 1},
    ]


async def test_voice_numbers(seeded: tuple[LiveServer, Seeded]) -> None:
    server, _ = seeded
    v = (await get(server))["voice"]
    assert v == {
        "calls": 2,
        "avg_handle_s": 200.0,  # (300 + 100) / 2
        "voice_to_voice_ms": {"turns": 6, "p50": 1100.0, "p95": 2600.0},
        "barge_ins": 1,
        "calls_lost": 1,
        "end_reasons": [{"reason": "caller_hung_up", "count": 1}, {"reason": "node_lost", "count": 1}],
        "transfers": {"total": 1, "connected": 0, "fallback": 1, "lost": 0, "callbacks": 1},
    }


async def test_daily_trend(seeded: tuple[LiveServer, Seeded]) -> None:
    server, _ = seeded
    daily = (await get(server))["daily"]
    assert [(x["day"], x["contacts"], x["contained"], x["resolved"]) for x in daily] == [
        ("2019-05-06", 1, 1, 1),
        ("2019-05-07", 1, 0, 1),
        ("2019-05-08", 0, 0, 0),
        ("2019-05-09", 1, 1, 1),
        ("2019-05-10", 1, 0, 0),
        ("2019-05-11", 1, 1, 1),
        ("2019-05-12", 0, 0, 0),
    ]
    assert (
        daily[2]["containment"] is None and daily[1]["containment"] == 0.0 and daily[1]["resolution"] == 1.0
    )


async def test_channel_and_intent_filters(seeded: tuple[LiveServer, Seeded]) -> None:
    server, _ = seeded
    w = await get(server, channel="whatsapp")
    assert (w["contacts"], w["contained"], w["resolved"], w["handed_off"], w["recontacts"]) == (2, 1, 2, 1, 1)
    assert w["rates"] == {
        "containment": 0.5,
        "resolution": 1.0,
        "handoff": 0.5,
        "recontact": 0.5,
        "sla_compliance": 1.0,
    }
    assert w["limbo"] == [] and w["voice"]["calls"] == 0
    assert [a["count"] for a in w["actions"]] == [1, 1, 0]  # the return label was on the web chat

    o = await get(server, intent="order_status")
    assert (o["contacts"], o["contained"], o["rates"]["containment"]) == (2, 2, 1.0)
    assert o["voice"]["voice_to_voice_ms"] == {"turns": 1, "p50": 900.0, "p95": 900.0}

    v = await get(server, channel="voice", intent="billing_question")
    assert (v["contacts"], v["resolved"], v["voice"]["calls"], len(v["limbo"])) == (1, 0, 1, 1)

    none = await get(server, intent="no_such_intent")
    assert none["contacts"] == 0 and set(none["rates"].values()) == {None}
    assert len(none["daily"]) == 7

    one_day = await get(server, **{"from": "2019-05-10", "to": "2019-05-10"})
    assert (one_day["contacts"], one_day["range"]["days"], len(one_day["daily"])) == (1, 1, 1)


async def test_csv_tables(seeded: tuple[LiveServer, Seeded]) -> None:
    server, _ = seeded
    response = await server.http.get("/api/analytics.csv", params=WEEK)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["day", "contacts", "contained", "resolved", "containment", "resolution"]
    assert len(rows) == 8 and rows[1] == ["2019-05-06", "1", "1", "1", "1.0", "1.0"]
    assert rows[3] == ["2019-05-08", "0", "0", "0", "", ""]

    summary = dict(
        csv.reader(
            io.StringIO(
                (await server.http.get("/api/analytics.csv", params={**WEEK, "table": "summary"})).text
            )
        )
    )
    assert summary["contacts"] == "5" and summary["containment_rate"] == "0.6"
    assert summary["voice_to_voice_p95_ms"] == "2600.0" and summary["limbo_tickets"] == "1"

    for table, header in (
        ("intents", ["intent", "contacts"]),
        ("handoff_reasons", ["reason", "conversations"]),
        ("actions", ["action", "count", "value_cents", "currency"]),
        ("end_reasons", ["end_reason", "calls"]),
    ):
        got = (await server.http.get("/api/analytics.csv", params={**WEEK, "table": table})).text
        assert next(csv.reader(io.StringIO(got))) == header, table
    limbo = list(
        csv.reader(
            io.StringIO((await server.http.get("/api/analytics.csv", params={**WEEK, "table": "limbo"})).text)
        )
    )
    assert len(limbo) == 2 and limbo[1][-1] == "no_next_step overdue"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"from": "2019-13-01", "to": "2019-12-31"}, "invalid_date"),
        ({"from": "2019-02-30", "to": "2019-03-01"}, "invalid_date"),
        ({"from": "yesterday"}, "invalid_date"),
        ({"from": "2019-05-06T00:00:00Z", "to": "2019-05-07"}, "invalid_date"),
        ({"from": "2019-05-07", "to": "2019-05-06"}, "invalid_range"),
        ({"from": "2019-01-01", "to": "2020-01-02"}, "invalid_range"),  # 367 days
        ({"channel": "fax"}, "invalid_channel"),
        ({"intent": "refund request"}, "invalid_intent"),
    ],
)
async def test_bad_parameters_are_422_with_a_code(
    seeded: tuple[LiveServer, Seeded], params: dict[str, str], code: str
) -> None:
    server, _ = seeded
    for path in ("/api/analytics", "/api/analytics.csv"):
        response = await server.http.get(path, params=params)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["code"] == code


async def test_range_limits_and_defaults(seeded: tuple[LiveServer, Seeded]) -> None:
    server, _ = seeded
    leap = await get(server, **{"from": "2020-01-01", "to": "2020-12-31"})  # 366 days: the most allowed
    assert leap["range"]["days"] == 366 and len(leap["daily"]) == 366
    default = (await server.http.get("/api/analytics")).json()["range"]
    today = datetime.now(UTC).date()
    assert default["to"] in (today.isoformat(), (today - timedelta(days=1)).isoformat())
    assert default["days"] == 7
    bad = await server.http.get("/api/analytics.csv", params={**WEEK, "table": "passwords"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_table"


async def test_page_is_served_with_the_console_headers(seeded: tuple[LiveServer, Seeded]) -> None:
    server, _ = seeded
    response = await server.http.get("/analytics")
    assert response.status_code == 200
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert "shared: console.js" not in response.text and 'id="chart-contacts"' in response.text
    assert "innerHTML" not in response.text and "http://" not in response.text.replace(
        "http://www.w3.org/2000/svg", ""
    )


async def test_gauges_of_the_last_seven_days(seeded: tuple[LiveServer, Seeded]) -> None:
    server, _ = seeded
    gauges = await analytics_gauges(server.services.pool, now=at(12, 23))
    assert gauges == {
        "containment_rate": 0.6,
        "resolution_rate": 0.8,
        "handoff_rate": 0.4,
        "recontact_rate": 0.2,
        "sla_compliance_rate": 0.5,
    }
    empty = await analytics_gauges(server.services.pool, now=datetime(2001, 1, 1, tzinfo=UTC))
    assert set(empty) == set(gauges) and all(math.isnan(v) for v in empty.values())
    direct = await compute_analytics(
        server.services.pool, AnalyticsRange(at(6).date(), at(12).date()), now=at(12, 23)
    )
    assert direct["contacts"] == 5
