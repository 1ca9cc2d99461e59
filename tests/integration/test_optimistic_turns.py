"""Turns that hold no lock while they think: load, decide, commit with a version check, re-run on
conflict. Business actions stay exactly-once when a turn is re-run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from crm_bridge import db
from crm_bridge.conversations import PgConversationStore, append_message
from crm_bridge.crm import BuiltinCRM
from crm_bridge.intents_store import load_yaml
from pipeline.clock import FakeClock
from pipeline.model import Channel, Order, Refund, ReturnLabel
from pipeline.service import ConversationService
from pipeline.turn_manager import TurnManager
from server import ROOT, Settings, build_classifier
from tests import support
from tests.support import make_customer


class InterferingCRM(BuiltinCRM):
    """The built-in CRM; right after the first call of a chosen action, another writer (an agent
    adding a note to the transcript) changes the conversation the turn is working on."""

    def __init__(self, pool: asyncpg.Pool, clock: FakeClock) -> None:
        super().__init__(pool)
        self.clock = clock
        self.interfere_after: str | None = None
        self.conversation_id: int | None = None
        self.calls: dict[str, int] = {}

    async def _after(self, action: str) -> None:
        self.calls[action] = self.calls.get(action, 0) + 1
        if action == self.interfere_after and self.conversation_id is not None:
            self.interfere_after = None
            async with self._pool.acquire() as conn, conn.transaction():
                await append_message(
                    conn,
                    self.conversation_id,
                    direction="out",
                    sender="agent",
                    body="(agent note) looking at this one",
                    now=self.clock.now(),
                    kind="note",
                )

    async def cancel_order(self, number: str, *, now: datetime) -> Order:
        order = await super().cancel_order(number, now=now)
        await self._after("cancel_order")
        return order

    async def issue_refund(
        self, number: str, *, amount_cents: int, reason: str, idempotency_key: str, now: datetime
    ) -> Refund:
        refund = await super().issue_refund(
            number, amount_cents=amount_cents, reason=reason, idempotency_key=idempotency_key, now=now
        )
        await self._after("issue_refund")
        return refund

    async def create_return_label(self, number: str, *, now: datetime) -> ReturnLabel:
        label = await super().create_return_label(number, now=now)
        await self._after("create_return_label")
        return label


@dataclass
class Setup:
    pool: asyncpg.Pool
    crm: InterferingCRM
    store: PgConversationStore
    service: ConversationService
    clock: FakeClock


@pytest.fixture(scope="module")
def classifier() -> Any:
    return build_classifier(Settings(_env_file=None))


@pytest.fixture
async def setup(database_url: str, classifier: Any) -> AsyncIterator[Setup]:
    clock = FakeClock()
    pool = await db.create_pool(database_url, min_size=1, max_size=4)
    try:
        crm = InterferingCRM(pool, clock)
        turns = TurnManager(classifier, crm, load_yaml(ROOT / "intents.yaml"))
        store = PgConversationStore(pool)
        yield Setup(pool, crm, store, ConversationService(store, turns, crm, clock), clock)
    finally:
        await pool.close()


async def say(s: Setup, customer: support.TestCustomer, text: str) -> list[str]:
    reply = await s.service.handle_text(Channel.SMS, customer.phone, text, channel_signed=True)
    s.crm.conversation_id = reply.conversation_id
    return reply.texts


async def transcript(pool: asyncpg.Pool, conversation_id: int) -> list[tuple[int, str, str]]:
    rows = await pool.fetch(
        "SELECT seq, sender, body FROM messages WHERE conversation_id = $1 ORDER BY seq", conversation_id
    )
    return [(r["seq"], r["sender"], r["body"]) for r in rows]


async def count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    return int(await pool.fetchval(sql, *args))


async def test_a_refund_turn_rerun_after_a_conflict_refunds_labels_tickets_and_texts_once(
    setup: Setup,
) -> None:
    s = setup
    dana = await make_customer(
        s.pool, s.clock.now(), {"headphones": ("delivered", "Wireless headphones", 8900, 5)}
    )
    number = dana.orders["headphones"]
    assert "Shall I go ahead?" in (await say(s, dana, f"I want a refund for order {number}"))[0]
    conversation_id = s.crm.conversation_id
    s.crm.interfere_after = "issue_refund"

    replies = await say(s, dana, "yes please")

    # The first attempt lost its version check to the agent's note and was run again.
    assert s.crm.calls["issue_refund"] == 2 and s.crm.calls["create_return_label"] >= 1
    assert replies[0].startswith("Done: $89.00 is refunded for order")
    order_id = await s.pool.fetchval("SELECT id FROM orders WHERE number = $1", number)
    assert await count(s.pool, "SELECT count(*) FROM refunds WHERE order_id = $1", order_id) == 1
    assert await count(s.pool, "SELECT count(*) FROM return_labels WHERE order_id = $1", order_id) == 1
    assert (
        await count(s.pool, "SELECT count(*) FROM tickets WHERE conversation_id = $1", conversation_id) == 1
    )
    assert (
        await count(s.pool, "SELECT count(*) FROM followups WHERE conversation_id = $1", conversation_id) == 1
    )
    assert (
        await count(
            s.pool,
            "SELECT count(*) FROM outbox WHERE conversation_id = $1 AND kind = 'return_label'",
            conversation_id,
        )
        == 1
    )
    assert (
        await count(
            s.pool,
            "SELECT count(*) FROM events WHERE conversation_id = $1 AND kind = 'refund_issued'",
            conversation_id,
        )
        == 1
    )
    # The agent's note kept its place; the re-run turn numbered its messages after it.
    rows = await transcript(s.pool, conversation_id)
    assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1))
    senders = [sender for _, sender, _ in rows]
    assert senders.count("agent") == 1 and [b for _, _, b in rows].count("yes please") == 1
    assert senders.index("agent") < [b for _, _, b in rows].index("yes please")
    ticket = await s.pool.fetchrow(
        "SELECT protocol, status FROM tickets WHERE conversation_id = $1", conversation_id
    )
    assert ticket["status"] == "resolved" and ticket["protocol"] in replies[0]


async def test_a_cancellation_rerun_after_a_conflict_cancels_once_and_says_it_is_cancelled(
    setup: Setup,
) -> None:
    s = setup
    dana = await make_customer(s.pool, s.clock.now(), {"lamp": ("placed", "Desk lamp", 4200, 1)})
    number = dana.orders["lamp"]
    assert "Shall I cancel it?" in (await say(s, dana, f"please cancel order {number}"))[0]
    s.crm.interfere_after = "cancel_order"

    replies = await say(s, dana, "yes")

    assert s.crm.calls["cancel_order"] == 2
    assert replies == [
        f"Done: order {number} is cancelled. You won't be charged for it; any payment goes back to your original payment method."
    ]
    assert await s.pool.fetchval("SELECT status FROM orders WHERE number = $1", number) == "cancelled"
    assert (
        await count(
            s.pool,
            "SELECT count(*) FROM events WHERE conversation_id = $1 AND kind = 'order_cancelled'",
            s.crm.conversation_id,
        )
        == 1
    )


async def test_a_return_label_turn_rerun_after_a_conflict_creates_and_texts_one_label(setup: Setup) -> None:
    s = setup
    dana = await make_customer(s.pool, s.clock.now(), {"mat": ("delivered", "Yoga mat", 3500, 3)})
    number = dana.orders["mat"]
    await say(s, dana, "hello")
    s.crm.interfere_after = "create_return_label"

    replies = await say(s, dana, f"I need a return label for order {number}")

    assert s.crm.calls["create_return_label"] == 2
    code = await s.pool.fetchval(
        "SELECT l.code FROM return_labels l JOIN orders o ON o.id = l.order_id WHERE o.number = $1", number
    )
    assert code in replies[0]
    assert (
        await count(
            s.pool,
            "SELECT count(*) FROM outbox WHERE conversation_id = $1 AND kind = 'return_label'",
            s.crm.conversation_id,
        )
        == 1
    )


async def test_the_same_message_delivered_twice_at_once_is_stored_and_answered_once(setup: Setup) -> None:
    s = setup
    dana = await make_customer(s.pool, s.clock.now(), {})
    first, second = await asyncio.gather(
        *(
            s.service.handle_text(
                Channel.SMS, dana.phone, "what are your opening hours?", external_id="SM-dup-1"
            )
            for _ in range(2)
        )
    )
    assert sorted([first.duplicate, second.duplicate]) == [False, True]
    conversation_id = first.conversation_id
    rows = await transcript(s.pool, conversation_id)
    assert [sender for _, sender, _ in rows] == ["customer", "bot"]


async def test_a_turn_holds_no_connection_while_the_engine_thinks(database_url: str, classifier: Any) -> None:
    """With a one-connection pool, a turn whose engine is stuck thinking lets other turns and
    other queries through: nothing is held across engine time."""
    clock = FakeClock()
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        crm = BuiltinCRM(pool)
        turns = TurnManager(classifier, crm, load_yaml(ROOT / "intents.yaml"))
        service = ConversationService(PgConversationStore(pool), turns, crm, clock)
        thinking, release = asyncio.Event(), asyncio.Event()
        original = turns.handle

        async def slow_for_alice(ctx: Any, text: str, work: Any) -> Any:
            if ctx.address == "alice":
                thinking.set()
                await release.wait()
            return await original(ctx, text, work)

        turns.handle = slow_for_alice  # type: ignore[method-assign]
        alice = asyncio.create_task(service.handle_text(Channel.WEBCHAT, "alice", "hello"), name="alice-turn")
        await asyncio.wait_for(thinking.wait(), 30)
        bob = await asyncio.wait_for(service.handle_text(Channel.WEBCHAT, "bob", "hello"), 30)
        assert bob.texts and await asyncio.wait_for(pool.fetchval("SELECT 1"), 5) == 1
        release.set()
        assert (await asyncio.wait_for(alice, 30)).texts
    finally:
        await pool.close()
