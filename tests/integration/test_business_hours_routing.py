"""Handoff routing honours the queues' business hours and overflow queues (real PostgreSQL, FakeClock).

Every test uses queues of its own (the database is shared by the whole run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from crm_bridge.conversations import PgConversationStore
from crm_bridge.crm import BuiltinCRM
from crm_bridge.desk import AgentDesk
from crm_bridge.intents_store import load_yaml
from crm_bridge.queues import check_queue
from crm_bridge.routing import PgQueueHours, Routing
from pipeline.clock import FakeClock
from pipeline.model import Channel, OutboundText, SendResult
from pipeline.ports import IntentClassifier
from pipeline.service import ConversationService
from pipeline.turn_manager import TurnManager

ROOT = Path(__file__).resolve().parents[2]
NY = ZoneInfo("America/New_York")
SATURDAY_8PM_NY = datetime(2025, 1, 11, 20, 0, tzinfo=NY)
MONDAY_9AM_NY = datetime(2025, 1, 13, 9, 0, tzinfo=NY)
WEEKDAYS_9_17 = {d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")}


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[OutboundText] = []

    async def send(self, message: OutboundText) -> SendResult:
        self.sent.append(message)
        return SendResult(provider_ref=f"REC{len(self.sent)}", channel_used=message.channel)


@dataclass
class Center:
    pool: asyncpg.Pool
    clock: FakeClock
    routing: Routing
    desk: AgentDesk
    service: ConversationService
    queue: str  # where the handoff intent sends customers

    async def add_queue(self, name: str, hours: dict[str, list[str]], overflow: str | None = None) -> None:
        entry = {
            "name": name,
            "sla_first_response": {"normal": 15},
            "timezone": "America/New_York",
            "business_hours": hours,
            "overflow_queue": overflow,
        }
        await self.routing.save_queue(check_queue(entry), create=True)

    async def agent(self, queue: str) -> int:
        token = secrets.token_hex(4)
        user_id = await self.pool.fetchval(
            "INSERT INTO users (email, name, role, password_hash) VALUES ($1, $2, 'agent', 'not-a-hash') RETURNING id",
            f"bh-{token}@example.com",
            f"Agent {token}",
        )
        await self.routing.set_capacity(user_id, 3)
        await self.routing.set_queues(user_id, [queue])
        await self.routing.set_presence(user_id, "available")
        return int(user_id)

    async def events(self, conversation_id: int, kind: str) -> list[dict[str, object]]:
        rows = await self.pool.fetch(
            "SELECT data FROM events WHERE conversation_id = $1 AND kind = $2 ORDER BY id",
            conversation_id,
            kind,
        )
        return [dict(r["data"]) for r in rows]

    async def offers(self, conversation_id: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            "SELECT agent_id, queue FROM assignments WHERE conversation_id = $1 ORDER BY id", conversation_id
        )


@pytest.fixture(scope="module")
def classifier() -> IntentClassifier:
    from server import Settings, build_classifier

    return build_classifier(Settings(_env_file=None))


def _center(pool: asyncpg.Pool, clock: FakeClock, classifier: IntentClassifier, queue: str) -> Center:
    routing = Routing(pool, clock, overflow_after=timedelta(minutes=5))
    intents = [
        dataclasses.replace(i, queue=queue) if i.action == "handoff" else i
        for i in load_yaml(ROOT / "intents.yaml")
    ]
    crm = BuiltinCRM(pool)
    turns = TurnManager(classifier, crm, intents, hours=PgQueueHours(pool))
    desk = AgentDesk(pool, routing, {Channel.WEBCHAT: RecordingSender()}, clock)
    service = ConversationService(PgConversationStore(pool), turns, crm, clock)
    return Center(pool, clock, routing, desk, service, queue)


async def _ticket(pool: asyncpg.Pool, conversation_id: int) -> asyncpg.Record:
    return await pool.fetchrow(
        """SELECT t.* FROM tickets t JOIN conversations c ON c.ticket_id = t.id WHERE c.id = $1""",
        conversation_id,
    )


async def test_a_weekend_handoff_to_a_closed_queue_is_told_when_it_opens_and_waits_for_it(
    pool: asyncpg.Pool, classifier: IntentClassifier
) -> None:
    clock = FakeClock(SATURDAY_8PM_NY.astimezone(UTC))
    center = _center(pool, clock, classifier, f"bh-{secrets.token_hex(4)}")
    await center.add_queue(center.queue, WEEKDAYS_9_17)
    await center.agent(center.queue)  # someone left their presence on: still no offer while closed

    reply = await center.service.handle_text(Channel.WEBCHAT, f"s-{secrets.token_hex(6)}", "agent please")

    ticket = await _ticket(pool, reply.conversation_id)
    assert reply.texts == [
        f"Our team is available from Monday 9:00 (New York time); we've opened ticket {ticket['protocol']} "
        "and someone will get back to you then."
    ]
    assert ticket["queue"] == center.queue
    assert ticket["next_step_due"] == MONDAY_9AM_NY
    assert ticket["first_response_due"] == MONDAY_9AM_NY + timedelta(minutes=15)  # the SLA clock starts then
    assert [h["conversation_id"] for h in await center.routing.waiting(center.queue)] == [
        reply.conversation_id
    ]

    clock.advance(timedelta(hours=1))
    passed = await center.desk.routing_pass()

    assert await center.offers(reply.conversation_id) == []
    assert passed.overflowed == 0
    clock.set(MONDAY_9AM_NY.astimezone(UTC))
    await center.desk.offer_next(center.queue)
    assert [o["queue"] for o in await center.offers(reply.conversation_id)] == [
        center.queue
    ]  # served when open


async def test_a_handoff_to_a_closed_queue_goes_to_its_open_overflow_queue(
    pool: asyncpg.Pool, classifier: IntentClassifier
) -> None:
    clock = FakeClock(SATURDAY_8PM_NY.astimezone(UTC))
    center = _center(pool, clock, classifier, f"bh-{secrets.token_hex(4)}")
    overflow = f"bh-night-{secrets.token_hex(4)}"
    await center.add_queue(overflow, {})  # never closes
    await center.add_queue(center.queue, WEEKDAYS_9_17, overflow)
    night_agent = await center.agent(overflow)

    reply = await center.service.handle_text(Channel.WEBCHAT, f"s-{secrets.token_hex(6)}", "agent please")

    assert reply.texts[0].startswith(f"I've passed this to our {overflow} team")
    assert await center.events(reply.conversation_id, "overflowed") == [
        {"from": center.queue, "to": overflow, "reason": "closed"}
    ]
    assert (await _ticket(pool, reply.conversation_id))["queue"] == overflow
    await center.desk.routing_pass()
    assert [(o["agent_id"], o["queue"]) for o in await center.offers(reply.conversation_id)] == [
        (night_agent, overflow)
    ]


async def test_waiting_work_with_no_agent_moves_once_to_an_open_overflow_with_an_agent_across_two_routers(
    pool: asyncpg.Pool, classifier: IntentClassifier
) -> None:
    clock = FakeClock(datetime(2025, 1, 14, 11, 0, tzinfo=NY).astimezone(UTC))  # Tuesday, open
    center = _center(pool, clock, classifier, f"bh-{secrets.token_hex(4)}")
    overflow = f"bh-backup-{secrets.token_hex(4)}"
    await center.add_queue(overflow, WEEKDAYS_9_17)
    await center.add_queue(center.queue, WEEKDAYS_9_17, overflow)
    reply = await center.service.handle_text(Channel.WEBCHAT, f"s-{secrets.token_hex(6)}", "agent please")
    assert reply.texts[0].startswith(f"I've passed this to our {center.queue} team")
    backup_agent = await center.agent(overflow)

    clock.advance(timedelta(minutes=4))
    early = await center.desk.routing_pass()
    assert early.overflowed == 0 and await center.offers(reply.conversation_id) == []  # not yet 5 minutes

    clock.advance(timedelta(minutes=2))
    other = _center(pool, clock, classifier, center.queue)  # a second server process's router
    passes = await asyncio.gather(center.desk.routing_pass(), other.desk.routing_pass())

    assert sum(p.overflowed for p in passes) == 1
    assert await center.events(reply.conversation_id, "overflowed") == [
        {
            "handoff": (await center.events(reply.conversation_id, "handoff_requested"))[0]["handoff"],
            "from": center.queue,
            "to": overflow,
            "reason": "no_agent",
        }
    ]
    assert [(o["agent_id"], o["queue"]) for o in await center.offers(reply.conversation_id)] == [
        (backup_agent, overflow)
    ]
    again = await asyncio.gather(center.desk.routing_pass(), other.desk.routing_pass())
    assert sum(p.overflowed for p in again) == 0


async def test_a_caller_whose_queue_is_closed_gets_a_callback_at_the_opening_and_nobody_is_rung(
    pool: asyncpg.Pool, classifier: IntentClassifier
) -> None:
    clock = FakeClock(SATURDAY_8PM_NY.astimezone(UTC))
    center = _center(pool, clock, classifier, f"bh-{secrets.token_hex(4)}")
    await center.add_queue(center.queue, WEEKDAYS_9_17)
    await center.agent(center.queue)
    call_sid = "CA" + secrets.token_hex(16)
    caller = "+1555" + str(secrets.randbelow(10**7)).zfill(7)
    await center.service.open_call(call_sid, caller)

    reply = await center.service.handle_text(Channel.VOICE, call_sid, "I want to talk to an agent")

    ticket = await _ticket(pool, reply.conversation_id)
    assert reply.intent != "handoff"  # the call session starts a warm transfer only on "handoff"
    assert reply.texts == [
        f"Our team is available from Monday 9:00 (New York time); we've opened ticket {ticket['protocol']} "
        "and someone will call you back then."
    ]
    [callback] = await pool.fetch("SELECT * FROM callbacks WHERE conversation_id = $1", reply.conversation_id)
    assert (callback["queue"], callback["phone"], callback["due_at"]) == (center.queue, caller, MONDAY_9AM_NY)
    assert ticket["next_step_due"] == MONDAY_9AM_NY
    await center.desk.routing_pass()
    assert await center.offers(reply.conversation_id) == []
