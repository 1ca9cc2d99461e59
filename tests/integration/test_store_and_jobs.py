"""The PostgreSQL store and the job runner: migrations, idempotent business actions, SKIP LOCKED, SLA."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg

from crm_bridge import db
from crm_bridge.crm import BuiltinCRM
from crm_bridge.jobs import JobRunner
from pipeline.clock import FakeClock
from pipeline.model import Channel, OutboundText, SendResult
from tests.support import make_customer


class RecordingSender:
    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.sent: list[OutboundText] = []
        self.delay = delay
        self.fail = fail

    async def send(self, message: OutboundText) -> SendResult:
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        self.sent.append(message)
        return SendResult(provider_ref=f"SM{len(self.sent)}", channel_used=message.channel)


class Retryable(Exception):
    retryable = True


async def test_migrations_are_applied_once_even_when_processes_race(database_url: str) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(db.migrate(c) for c in conns))
        assert applied == [[], [], []]  # the session fixture already applied everything
        versions = [
            r["version"]
            for r in await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        ]
        assert versions == [m.version for m in db.load_migrations()]
    finally:
        for c in conns:
            await c.close()


async def test_concurrent_refunds_of_one_order_issue_exactly_one(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    c = await make_customer(pool, clock.now(), {"tv": ("delivered", "TV", 50000, 3)})
    crm = BuiltinCRM(pool)
    refunds = await asyncio.gather(
        *(
            crm.issue_refund(
                c.orders["tv"], amount_cents=50000, reason="test", idempotency_key=f"k{i}", now=clock.now()
            )
            for i in range(8)
        )
    )
    assert len({r.provider_ref for r in refunds}) == 1
    assert sum(not r.already_existed for r in refunds) == 1
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = $1",
            c.orders["tv"],
        )
        == 1
    )
    order = await crm.get_order(c.orders["tv"])
    assert order is not None and order.refunded_cents == 50000


async def _followup(pool: asyncpg.Pool, due, address: str, key: str) -> int:
    return int(
        await pool.fetchval(
            "INSERT INTO followups (dedupe_key, channel, address, body, due_at, created_at) VALUES ($1, 'sms', $2, 'checking in', $3, $3) RETURNING id",
            key,
            address,
            due,
        )
    )


async def test_two_runners_sharing_the_database_send_each_due_followup_exactly_once(
    pool: asyncpg.Pool,
) -> None:
    clock = FakeClock()
    ids = [
        await _followup(pool, clock.now(), f"+1555000{i:04d}", f"race-{i}-{clock.now().timestamp()}")
        for i in range(12)
    ]
    a, b = RecordingSender(delay=0.01), RecordingSender(delay=0.01)
    runner_a = JobRunner(pool, {Channel.SMS: a}, clock)
    runner_b = JobRunner(pool, {Channel.SMS: b}, clock)
    await asyncio.gather(
        runner_a.send_due_followups(), runner_b.send_due_followups(), runner_a.send_due_followups()
    )
    sent = [m.to for m in a.sent + b.sent]
    assert len(sent) == len(set(sent)) == 12
    statuses = await pool.fetch("SELECT status FROM followups WHERE id = ANY($1::bigint[])", ids)
    assert {r["status"] for r in statuses} == {"sent"}


async def test_failed_followup_is_retried_with_backoff_and_not_lost(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    fid = await _followup(pool, clock.now(), "+15550001111", f"retry-{clock.now().timestamp()}")
    sender = RecordingSender(fail=Retryable("twilio 503"))
    runner = JobRunner(pool, {Channel.SMS: sender}, clock)
    stats = await runner.send_due_followups()
    assert stats.followups_failed >= 1
    row = await pool.fetchrow("SELECT status, attempts, due_at FROM followups WHERE id = $1", fid)
    assert row["status"] == "scheduled" and row["attempts"] == 1 and row["due_at"] > clock.now()
    sender.fail = None
    clock.advance(timedelta(minutes=5))
    await runner.send_due_followups()
    assert (await pool.fetchval("SELECT status FROM followups WHERE id = $1", fid)) == "sent"
    assert [m.to for m in sender.sent] == ["+15550001111"]


async def test_sla_breaches_are_marked_once_and_recorded(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    now = clock.now()
    tid = await pool.fetchval(
        """INSERT INTO tickets (protocol, status, priority, queue, subject, first_response_due, resolution_due, created_at, updated_at)
           VALUES ('CL-T' || nextval('ticket_protocol_seq'), 'open', 'high', 'billing', 'sla test', $1, $2, $3, $3) RETURNING id""",
        now + timedelta(minutes=30),
        now + timedelta(hours=8),
        now,
    )
    runner = JobRunner(pool, {}, clock)
    await runner.mark_sla_breaches()  # not yet due: our ticket must stay unbreached
    assert (await pool.fetchval("SELECT sla_breached FROM tickets WHERE id = $1", tid)) == []
    clock.advance(timedelta(hours=1))
    await runner.mark_sla_breaches()
    assert (await pool.fetchval("SELECT sla_breached FROM tickets WHERE id = $1", tid)) == ["first_response"]
    clock.advance(timedelta(hours=8))
    await runner.mark_sla_breaches()
    await runner.mark_sla_breaches()
    assert (await pool.fetchval("SELECT sla_breached FROM tickets WHERE id = $1", tid)) == [
        "first_response",
        "resolution",
    ]
    events = await pool.fetch(
        "SELECT data FROM events WHERE ticket_id = $1 AND kind = 'sla_breached' ORDER BY id", tid
    )
    assert [e["data"]["sla"] for e in events] == ["first_response", "resolution"]


async def test_a_burst_of_turns_larger_than_the_pool_never_starves_it(database_url: str) -> None:
    """Turns borrow connections only for single statements and their commit, and the built-in
    CRM borrows from the same pool: more concurrent turns than connections must all finish."""
    from crm_bridge.conversations import PgConversationStore
    from crm_bridge.intents_store import load_yaml
    from pipeline.service import ConversationService
    from pipeline.turn_manager import TurnManager
    from server import ROOT, Settings, build_classifier

    clock = FakeClock()
    small = await db.create_pool(database_url, min_size=1, max_size=4)
    try:
        crm = BuiltinCRM(small)
        turns = TurnManager(build_classifier(Settings(_env_file=None)), crm, load_yaml(ROOT / "intents.yaml"))
        service = ConversationService(PgConversationStore(small), turns, crm, clock)
        customers = [
            await make_customer(small, clock.now(), {"o": ("shipped", "Lamp", 1000, 1)}) for _ in range(12)
        ]
        replies = await asyncio.wait_for(
            asyncio.gather(
                *(
                    service.handle_text(Channel.SMS, c.phone, "where is my order", channel_signed=True)
                    for c in customers
                )
            ),
            60,
        )
        for customer, reply in zip(customers, replies, strict=True):
            assert customer.orders["o"] in reply.texts[0]
    finally:
        await small.close()
