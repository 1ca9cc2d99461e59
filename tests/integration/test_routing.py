"""Queues, agents and routing on real PostgreSQL, the agent desk, and the text handoff end to end.

Every test routes in a queue of its own (the database is shared by the whole run), so handoffs
left waiting by other tests never get in the way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from crm_bridge.conversations import PgConversationStore
from crm_bridge.crm import BuiltinCRM
from crm_bridge.desk import HANDED_BACK, AgentDesk
from crm_bridge.intents_store import load_yaml
from crm_bridge.jobs import JobRunner
from crm_bridge.routing import Conflict, NotOwner, Routing, ValidationError
from pipeline.clock import FakeClock
from pipeline.model import Channel, OutboundText, SendResult
from pipeline.service import ConversationService
from pipeline.turn_manager import TurnManager

ROOT = Path(__file__).resolve().parents[2]


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[OutboundText] = []

    async def send(self, message: OutboundText) -> SendResult:
        self.sent.append(message)
        return SendResult(provider_ref=f"REC{len(self.sent)}", channel_used=message.channel)


@dataclass
class Person:
    id: int
    role: str


@dataclass
class Setup:
    pool: asyncpg.Pool
    clock: FakeClock
    routing: Routing
    queue: str

    async def agent(
        self,
        *,
        capacity: int = 3,
        presence: str = "available",
        queues: tuple[str, ...] | None = None,
        skills: tuple[str, ...] = (),
        role: str = "agent",
    ) -> int:
        token = secrets.token_hex(4)
        user_id = await self.pool.fetchval(
            "INSERT INTO users (email, name, role, password_hash) VALUES ($1, $2, $3, 'not-a-hash') RETURNING id",
            f"agent-{token}@example.com",
            f"Agent {token}",
            role,
        )
        await self.routing.set_capacity(user_id, capacity)
        await self.routing.set_queues(user_id, [self.queue] if queues is None else list(queues))
        if skills:
            await self.routing.set_skills(user_id, skills)
        await self.routing.set_presence(user_id, presence)
        return int(user_id)

    async def handoff(
        self,
        priority: str = "normal",
        *,
        channel: str = "webchat",
        age: timedelta = timedelta(seconds=1),
        first_response_due: timedelta | None = timedelta(minutes=15),
    ) -> tuple[int, int]:
        """A conversation waiting in the queue with its ticket; returns (conversation_id, ticket_id)."""
        now = self.clock.now()
        conversation_id = await self.pool.fetchval(
            """INSERT INTO conversations (channel, address, owner, status, created_at, updated_at)
               VALUES ($1, $2, $3, 'escalated', $4, $4) RETURNING id""",
            channel,
            f"test-{secrets.token_hex(8)}",
            f"queue:{self.queue}",
            now,
        )
        ticket_id = await self.pool.fetchval(
            """INSERT INTO tickets (protocol, status, priority, queue, subject, conversation_id, first_response_due, created_at, updated_at)
               VALUES ('CL-R' || nextval('ticket_protocol_seq'), 'open', $1, $2, 'routing test', $3, $4, $5, $5) RETURNING id""",
            priority,
            self.queue,
            conversation_id,
            now + first_response_due if first_response_due else None,
            now,
        )
        await self.pool.execute(
            "UPDATE conversations SET ticket_id = $2 WHERE id = $1", conversation_id, ticket_id
        )
        handoff_id = await self.routing.enqueue(conversation_id, ticket_id, self.queue, priority)
        assert handoff_id is not None
        self.clock.advance(age)
        return int(conversation_id), int(ticket_id)


@pytest.fixture
async def setup(pool: asyncpg.Pool) -> Setup:
    clock = FakeClock()
    routing = Routing(pool, clock)
    queue = f"rt-{secrets.token_hex(5)}"
    await routing.upsert_queue(
        queue,
        description="routing test",
        sla_first_response={"urgent": 5, "high": 15, "normal": 60, "low": 240},
    )
    return Setup(pool, clock, routing, queue)


async def _events(pool: asyncpg.Pool, conversation_id: int) -> list[str]:
    return [
        r["kind"]
        for r in await pool.fetch(
            "SELECT kind FROM events WHERE conversation_id = $1 ORDER BY id", conversation_id
        )
    ]


# ---- order, capacity, presence --------------------------------------------------------------------------


async def test_handoffs_are_offered_by_priority_then_by_age(setup: Setup) -> None:
    await setup.agent(capacity=10)
    old_low, _ = await setup.handoff("low")
    old_normal, _ = await setup.handoff("normal")
    urgent, _ = await setup.handoff("urgent")
    new_normal, _ = await setup.handoff("normal")
    high, _ = await setup.handoff("high")

    order = []
    while (offer := await setup.routing.assign_next(setup.queue)) is not None:
        order.append(offer.conversation_id)

    assert order == [urgent, high, old_normal, new_normal, old_low]


async def test_an_agent_never_holds_more_offers_and_conversations_than_capacity(setup: Setup) -> None:
    agent = await setup.agent(capacity=2)
    first, _ = await setup.handoff()
    await setup.handoff()
    third, _ = await setup.handoff()

    a = await setup.routing.assign_next(setup.queue)
    b = await setup.routing.assign_next(setup.queue)
    assert a is not None and b is not None
    assert await setup.routing.assign_next(setup.queue) is None
    await setup.routing.accept(a.id, agent)
    assert await setup.routing.assign_next(setup.queue) is None  # accepted ones count too
    assert (await setup.routing.agent(agent)).active == 2  # type: ignore[union-attr]

    await setup.routing.complete(first)

    c = await setup.routing.assign_next(setup.queue)
    assert c is not None and c.conversation_id == third and c.agent_id == agent
    assert (await setup.routing.agent(agent)).active == 2  # type: ignore[union-attr]


async def test_only_available_agents_of_the_queue_with_its_skills_get_offers(setup: Setup) -> None:
    await setup.routing.upsert_queue(setup.queue, skills=["spanish"], sla_first_response={"normal": 60})
    await setup.agent(presence="away", skills=("spanish",))
    await setup.agent(presence="busy", skills=("spanish",))
    other = f"{setup.queue}-other"
    await setup.routing.upsert_queue(other)
    await setup.agent(queues=(other,), skills=("spanish",))  # serves another queue
    await setup.agent()  # lacks the skill
    await setup.agent(capacity=0, skills=("spanish",))
    await setup.handoff()

    assert await setup.routing.assign_next(setup.queue) is None

    ready = await setup.agent(skills=("Spanish",))
    offer = await setup.routing.assign_next(setup.queue)
    assert offer is not None and offer.agent_id == ready


async def test_urgent_work_of_many_queues_nobody_staffs_does_not_starve_a_staffed_queue(setup: Setup) -> None:
    # 30 queues (more than the candidates one pass looks at) each hold older, urgent work and
    # have nobody available; the staffed queue's normal handoff is still offered.
    for n in range(30):
        other = dataclasses.replace(setup, queue=f"{setup.queue}-empty{n}")
        await setup.routing.upsert_queue(other.queue)
        await other.handoff("urgent")
    agent = await setup.agent()
    ours, _ = await setup.handoff("normal")

    offered: list[int] = []
    while len(offered) < 100 and (offer := await setup.routing.assign_next()) is not None:
        offered.append(offer.conversation_id)  # other tests' staffed work may come first
        if offer.conversation_id == ours:
            assert offer.agent_id == agent
            break
    assert ours in offered


async def test_going_away_stops_new_offers_and_coming_back_resumes_them(setup: Setup) -> None:
    agent = await setup.agent()
    await setup.handoff()
    await setup.routing.set_presence(agent, "away")
    assert await setup.routing.assign_next(setup.queue) is None

    await setup.routing.set_presence(agent, "available")

    offer = await setup.routing.assign_next(setup.queue)
    assert offer is not None and offer.agent_id == agent


async def test_the_least_recently_assigned_agent_gets_the_next_offer(setup: Setup) -> None:
    first, second = await setup.agent(), await setup.agent()
    for _ in range(4):
        await setup.handoff()

    agents = []
    for _ in range(4):
        offer = await setup.routing.assign_next(setup.queue)
        assert offer is not None
        agents.append(offer.agent_id)
        setup.clock.advance(timedelta(seconds=1))

    assert agents == [first, second, first, second]


async def test_invalid_agent_and_queue_settings_are_refused_with_a_code(setup: Setup) -> None:
    agent = await setup.agent()
    routing = setup.routing
    for call, code in (
        (lambda: routing.set_presence(agent, "asleep"), "invalid_presence"),
        (lambda: routing.set_capacity(agent, -1), "invalid_capacity"),
        (lambda: routing.set_queues(agent, ["no-such-queue"]), "unknown_queue"),
        (lambda: routing.upsert_queue("Bad Name!"), "invalid_queue_name"),
        (lambda: routing.upsert_queue(setup.queue, sla_first_response={"whenever": 5}), "invalid_priority"),
        (lambda: routing.upsert_queue(setup.queue, sla_first_response={"high": 0}), "invalid_sla"),
    ):
        with pytest.raises(ValidationError) as e:
            await call()
        assert e.value.code == code
    queues = {q.name: q for q in await setup.routing.queues()}
    assert queues[setup.queue].sla_first_response["normal"] == 60
    assert {"support", "billing", "sales"} <= set(queues)


# ---- offers: decline, expiry, accept ----------------------------------------------------------------------


async def test_a_declined_handoff_goes_to_the_next_agent_and_never_back(setup: Setup) -> None:
    first, second = await setup.agent(), await setup.agent()
    conversation, _ = await setup.handoff()

    offer = await setup.routing.assign_next(setup.queue)
    assert offer is not None and offer.agent_id == first
    await setup.routing.decline(offer.id, first)
    assert (await setup.routing.agent(first)).active == 0  # type: ignore[union-attr]

    again = await setup.routing.assign_next(setup.queue)
    assert again is not None and again.agent_id == second and again.conversation_id == conversation
    await setup.routing.decline(again.id, second)

    # Both said no: the handoff waits (and its SLA runs) rather than going back to either.
    assert await setup.routing.assign_next(setup.queue) is None
    [waiting] = await setup.routing.waiting(setup.queue)
    assert waiting["tried_agents"] == [first, second]
    third = await setup.agent()
    last = await setup.routing.assign_next(setup.queue)
    assert last is not None and last.agent_id == third
    assert (await _events(setup.pool, conversation)).count("assignment_declined") == 2


async def test_unanswered_offers_expire_and_go_to_someone_else(setup: Setup) -> None:
    first, second = await setup.agent(), await setup.agent()
    conversation, _ = await setup.handoff()
    offer = await setup.routing.assign_next(setup.queue)
    assert offer is not None and offer.agent_id == first

    setup.clock.advance(timedelta(seconds=30))
    assert await setup.routing.expire_offers(timedelta(minutes=2), setup.queue) == 0
    setup.clock.advance(timedelta(minutes=2))
    assert await setup.routing.expire_offers(timedelta(minutes=2), setup.queue) == 1

    with pytest.raises(Conflict) as e:
        await setup.routing.accept(offer.id, first)
    assert e.value.code == "offer_not_open"
    nxt = await setup.routing.assign_next(setup.queue)
    assert nxt is not None and nxt.agent_id == second and nxt.conversation_id == conversation
    assert (await setup.routing.agent(first)).active == 0  # type: ignore[union-attr]
    assert "assignment_expired" in await _events(setup.pool, conversation)


async def test_accepting_makes_the_agent_owner_of_ticket_and_conversation(setup: Setup) -> None:
    agent, other = await setup.agent(), await setup.agent(capacity=0)
    conversation, ticket = await setup.handoff("high")
    offer = await setup.routing.assign_next(setup.queue)
    assert offer is not None

    with pytest.raises(NotOwner):
        await setup.routing.accept(offer.id, other)
    accepted = await setup.routing.accept(offer.id, agent)

    assert accepted.status == "accepted"
    conv = await setup.pool.fetchrow("SELECT owner, status FROM conversations WHERE id = $1", conversation)
    assert (conv["owner"], conv["status"]) == (f"agent:{agent}", "escalated")
    t = await setup.pool.fetchrow("SELECT owner, first_response_at FROM tickets WHERE id = $1", ticket)
    assert t["owner"] == f"agent:{agent}" and t["first_response_at"] is None
    assert (
        await setup.pool.fetchval("SELECT status FROM handoffs WHERE conversation_id = $1", conversation)
        == "assigned"
    )
    assert await _events(setup.pool, conversation) == [
        "handoff_requested",
        "assignment_offered",
        "assignment_accepted",
    ]
    [note] = [
        n
        for n in await setup.routing.notifications_for(Person(agent, "agent"))
        if n.kind == "handoff_offered"
    ]
    assert (
        note.data["conversation_id"] == conversation and note.read_at is not None
    )  # answered: no longer news
    with pytest.raises(Conflict):
        await setup.routing.decline(offer.id, agent)


async def test_hand_back_frees_the_agent_and_returns_the_conversation_to_the_ai(setup: Setup) -> None:
    agent, other = await setup.agent(), await setup.agent(capacity=0)
    conversation, ticket = await setup.handoff()
    offer = await setup.routing.assign_next(setup.queue)
    assert offer is not None
    await setup.routing.accept(offer.id, agent)

    with pytest.raises(NotOwner):
        await setup.routing.hand_back(conversation, other)
    ended = await setup.routing.hand_back(conversation, agent)

    assert ended is not None and ended.status == "handed_back"
    conv = await setup.pool.fetchrow(
        "SELECT owner, status, state FROM conversations WHERE id = $1", conversation
    )
    assert (conv["owner"], conv["status"], conv["state"]) == ("ai", "open", {})
    assert (await setup.routing.agent(agent)).active == 0  # type: ignore[union-attr]
    assert await setup.routing.live_assignment(conversation) is None
    assert "assignment_handed_back" in await _events(setup.pool, conversation)


async def test_enqueue_is_idempotent_per_open_conversation_and_applies_the_queue_sla(setup: Setup) -> None:
    conversation, ticket = await setup.handoff("high", first_response_due=None)

    assert await setup.routing.enqueue(conversation, ticket, setup.queue, "high") is None
    assert len(await setup.routing.waiting(setup.queue)) == 1
    assert await setup.routing.sla_for(setup.queue, "high") == timedelta(minutes=15)
    assert await setup.routing.sla_for("no-such-queue", "high") is None
    due, created = await setup.pool.fetchrow(
        "SELECT first_response_due, created_at FROM tickets WHERE id = $1", ticket
    )
    assert due == created + timedelta(minutes=15)


async def test_a_handoff_of_a_closed_conversation_is_cancelled_not_offered(setup: Setup) -> None:
    await setup.agent()
    closed, _ = await setup.handoff("urgent")
    live, _ = await setup.handoff("low")
    await setup.pool.execute("UPDATE conversations SET status = 'closed' WHERE id = $1", closed)

    offer = await setup.routing.assign_next(setup.queue)

    assert offer is not None and offer.conversation_id == live
    assert (
        await setup.pool.fetchval("SELECT status FROM handoffs WHERE conversation_id = $1", closed)
        == "cancelled"
    )


async def test_a_pass_that_loses_the_database_mid_way_is_one_warning_and_the_others_still_run(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    async def cut_off() -> None:
        raise asyncpg.exceptions.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        )

    async def fine() -> None:
        ran.append("fine")

    jobs = JobRunner(setup.pool, {}, setup.clock, extra_passes=[cut_off, fine])
    with caplog.at_level(logging.WARNING, logger="crm_bridge.jobs"):
        await jobs.run_once()
    assert ran == ["fine"]
    [record] = [r for r in caplog.records if r.name == "crm_bridge.jobs"]
    assert record.levelno == logging.WARNING and "database unreachable" in record.getMessage()
    assert record.exc_info is None  # no traceback for an outage: an operator sees one line


# ---- SLA escalation and notifications ------------------------------------------------------------------------


async def test_sla_breaches_notify_supervisors_once_per_breached_ticket(setup: Setup) -> None:
    agent = await setup.agent(capacity=0)
    _, late = await setup.handoff("urgent", first_response_due=timedelta(minutes=5))
    _, fine = await setup.handoff("low", first_response_due=timedelta(hours=4))
    supervisor = Person(0, "supervisor")
    desk = AgentDesk(setup.pool, setup.routing, {}, setup.clock)
    jobs = JobRunner(setup.pool, {}, setup.clock, extra_passes=[desk.routing_pass])

    setup.clock.advance(timedelta(minutes=10))
    await jobs.run_once()
    await jobs.run_once()
    await setup.routing.notify_sla_breaches()

    alerts = [
        n for n in await setup.routing.notifications_for(supervisor, limit=500) if n.kind == "sla_breach"
    ]
    mine = [n for n in alerts if n.data["ticket_id"] in (late, fine)]
    protocol = await setup.pool.fetchval("SELECT protocol FROM tickets WHERE id = $1", late)
    assert [(n.data["ticket"], n.data["sla"], n.role) for n in mine] == [
        (protocol, "first_response", "supervisor")
    ]
    assert not [
        n for n in await setup.routing.notifications_for(Person(agent, "agent")) if n.kind == "sla_breach"
    ]

    assert await setup.routing.mark_read(mine[0].id, supervisor) is True
    assert await setup.routing.mark_read(mine[0].id, supervisor) is False
    unread = await setup.routing.notifications_for(supervisor, unread_only=True, limit=500)
    assert mine[0].id not in [n.id for n in unread]
    assert await setup.routing.mark_read(mine[0].id, Person(agent, "agent")) is False


# ---- the desk ----------------------------------------------------------------------------------------------


async def _accepted(setup: Setup, desk: AgentDesk, **handoff: object) -> tuple[int, int, int]:
    agent = await setup.agent()
    conversation, ticket = await setup.handoff(**handoff)  # type: ignore[arg-type]
    offer = await desk.offer_next(setup.queue)
    assert offer is not None and offer.agent_id == agent
    await setup.routing.accept(offer.id, agent)
    return agent, conversation, ticket


async def test_only_the_owning_agent_may_reply_and_the_first_reply_is_the_first_response(
    setup: Setup,
) -> None:
    chat = RecordingSender()
    desk = AgentDesk(setup.pool, setup.routing, {Channel.WEBCHAT: chat}, setup.clock)
    agent, conversation, ticket = await _accepted(setup, desk)
    stranger = await setup.agent(capacity=0)

    with pytest.raises(NotOwner):
        await desk.agent_reply(conversation, stranger, "hi, I'll take this")
    with pytest.raises(ValidationError) as e:
        await desk.agent_reply(conversation, agent, "   ")
    assert e.value.code == "empty_message"
    setup.clock.advance(timedelta(minutes=1))
    first = await desk.agent_reply(conversation, agent, "Hi, this is Sam. I'm looking at it now.")
    setup.clock.advance(timedelta(minutes=1))
    await desk.agent_reply(conversation, agent, "Done.")

    assert first.sent and [m.body for m in chat.sent] == ["Hi, this is Sam. I'm looking at it now.", "Done."]
    assert chat.sent[0].kind == "agent_reply" and chat.sent[0].seq == first.message.seq
    responded = await setup.pool.fetchval("SELECT first_response_at FROM tickets WHERE id = $1", ticket)
    assert responded == first.message.created_at
    rows = await setup.pool.fetch(
        "SELECT sender, body FROM messages WHERE conversation_id = $1 ORDER BY seq", conversation
    )
    assert [(r["sender"], r["body"]) for r in rows] == [
        ("agent", "Hi, this is Sam. I'm looking at it now."),
        ("agent", "Done."),
    ]
    assert (
        await setup.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE conversation_id = $1 AND status = 'sent'", conversation
        )
        == 2
    )


async def test_a_reply_that_cannot_be_sent_now_stays_queued_for_the_job_runner(setup: Setup) -> None:
    desk = AgentDesk(setup.pool, setup.routing, {}, setup.clock)  # no sender for web chat yet
    agent, conversation, _ = await _accepted(setup, desk)

    reply = await desk.agent_reply(conversation, agent, "Still there?")

    assert reply.sent is False
    row = await setup.pool.fetchrow("SELECT status, attempts FROM outbox WHERE id = $1", reply.outbox_id)
    assert (row["status"], row["attempts"]) == ("queued", 1)


async def test_closing_a_ticket_requires_a_next_step_with_a_future_due_date(setup: Setup) -> None:
    desk = AgentDesk(setup.pool, setup.routing, {Channel.WEBCHAT: RecordingSender()}, setup.clock)
    agent, conversation, ticket = await _accepted(setup, desk)
    now = setup.clock.now()

    for step, due in (
        ("", now + timedelta(days=2)),
        ("  ", now + timedelta(days=2)),
        (None, now + timedelta(days=2)),
        ("Call back", None),
        ("Call back", now - timedelta(minutes=1)),
        ("Call back", now),
    ):
        with pytest.raises(ValidationError) as e:
            await desk.close_ticket(ticket, agent, step, due)
        assert e.value.code == "next_step_required"
    assert await setup.pool.fetchval("SELECT status FROM tickets WHERE id = $1", ticket) == "open"
    with pytest.raises(NotOwner):
        await desk.close_ticket(ticket, await setup.agent(capacity=0), "Call back", now + timedelta(days=1))

    closed = await desk.close_ticket(
        ticket, agent, "Confirm the replacement arrived", now + timedelta(days=3)
    )

    assert closed.status == "resolved" and closed.next_step == "Confirm the replacement arrived"
    assert (await setup.routing.agent(agent)).active == 0  # type: ignore[union-attr]
    conv = await setup.pool.fetchrow(
        "SELECT owner, next_step, next_step_due FROM conversations WHERE id = $1", conversation
    )
    assert (conv["owner"], conv["next_step"], conv["next_step_due"]) == (
        "ai",
        "Confirm the replacement arrived",
        now + timedelta(days=3),
    )
    assert (
        await setup.pool.fetchval("SELECT status FROM assignments WHERE conversation_id = $1", conversation)
        == "completed"
    )


async def test_a_phone_callers_agent_replies_go_by_sms_to_the_number_they_called_from(setup: Setup) -> None:
    sms = RecordingSender()
    desk = AgentDesk(setup.pool, setup.routing, {Channel.SMS: sms}, setup.clock)
    agent, conversation, _ = await _accepted(setup, desk, channel="voice")
    with pytest.raises(ValidationError) as e:
        await desk.agent_reply(conversation, agent, "Hi")
    assert e.value.code == "no_text_channel"
    await setup.pool.execute(
        'UPDATE conversations SET state = \'{"caller_phone": "+15550104444"}\' WHERE id = $1', conversation
    )

    await desk.agent_reply(conversation, agent, "Hi, following up on your call.")

    assert [(m.channel, m.to) for m in sms.sent] == [(Channel.SMS, "+15550104444")]


# ---- the text handoff, end to end at the service level ----------------------------------------------------------


async def test_text_handoff_from_agent_please_to_agent_replies_and_back_to_the_ai(setup: Setup) -> None:
    from server import Settings, build_classifier

    pool, clock = setup.pool, setup.clock
    crm = BuiltinCRM(pool)
    intents = [
        dataclasses.replace(i, queue=setup.queue) if i.action == "handoff" else i
        for i in load_yaml(ROOT / "intents.yaml")
    ]
    turns = TurnManager(build_classifier(Settings(_env_file=None)), crm, intents)
    chat = RecordingSender()
    desk = AgentDesk(pool, setup.routing, {Channel.WEBCHAT: chat}, clock)
    service = ConversationService(
        PgConversationStore(pool), turns, crm, clock, on_customer_message=desk.customer_message
    )
    session = "s-" + secrets.token_hex(8)
    agent = await setup.agent()
    inbox = desk.subscribe(agent)

    first = await service.handle_text(Channel.WEBCHAT, session, "agent please")

    assert "passed this to our" in first.texts[0]
    conversation = first.conversation_id
    [waiting] = await setup.routing.waiting(setup.queue)
    assert waiting["conversation_id"] == conversation
    queued = await service.handle_text(Channel.WEBCHAT, session, "hello? anyone?")
    assert queued.texts[0].startswith(f"Your request is with our {setup.queue} team")

    offer = await desk.offer_next(setup.queue)
    assert offer is not None and offer.conversation_id == conversation
    assert (await inbox.get())["type"] == "offer"
    await setup.routing.accept(offer.id, agent)
    clock.advance(timedelta(minutes=2))
    reply = await desk.agent_reply(conversation, agent, "Hi, I'm Sam from support. How can I help?")

    assert [(m.to, m.body, m.kind) for m in chat.sent] == [
        (session, "Hi, I'm Sam from support. How can I help?", "agent_reply")
    ]
    assert reply.sent

    later = await service.handle_text(Channel.WEBCHAT, session, "my lamp arrived broken")

    assert later.texts == []
    event = await asyncio.wait_for(inbox.get(), 5)
    assert event["type"] == "customer_message" and event["conversation_id"] == conversation
    assert event["text"] == "my lamp arrived broken"
    transcript = await pool.fetch(
        "SELECT seq, sender, body FROM messages WHERE conversation_id = $1 ORDER BY seq", conversation
    )
    assert transcript[-1]["sender"] == "customer" and transcript[-1]["seq"] == event["seq"]
    assert transcript[-2]["sender"] == "agent"

    await desk.hand_back(conversation, agent)

    assert chat.sent[-1].body == HANDED_BACK
    again = await service.handle_text(Channel.WEBCHAT, session, "hello")
    assert again.texts and again.texts[0] != ""
    assert inbox.empty()
    senders = [
        r["sender"]
        for r in await pool.fetch(
            "SELECT sender FROM messages WHERE conversation_id = $1 ORDER BY seq", conversation
        )
    ]
    assert senders[-3:] == ["bot", "customer", "bot"]
    desk.unsubscribe(agent, inbox)


# ---- the acceptance test: two server processes, one database -----------------------------------------------------


async def test_two_server_processes_assign_50_concurrent_handoffs_without_double_assignment(
    setup: Setup, database_url: str
) -> None:
    agents = [await setup.agent(capacity=5) for _ in range(10)]
    conversations = [(await setup.handoff(("urgent", "high", "normal", "low")[i % 4]))[0] for i in range(50)]
    env = {
        **os.environ,
        "CLOSELOOP_TEST_DB": database_url,
        "CLOSELOOP_TEST_QUEUE": setup.queue,
        "CLOSELOOP_TEST_ROUTERS": "5",
    }
    worker = str(Path(__file__).with_name("routing_worker.py"))
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            worker,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(ROOT),
        )
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            assert line.strip() == b"ready", (line, await p.stderr.read() if p.stderr else b"")
        for p in procs:  # both start routing at the same moment
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        results = []
        for p in procs:
            out, err = await asyncio.wait_for(p.communicate(), 120)
            assert p.returncode == 0, err.decode()
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()

    offers = [o for r in results for o in r["offers"]]
    assert len({r["pid"] for r in results}) == 2
    assert all(r["offers"] for r in results), "both processes must have routed some handoffs"
    assert len(offers) == len(set(offers)) == 50
    rows = await setup.pool.fetch(
        "SELECT conversation_id, agent_id, status FROM assignments WHERE conversation_id = ANY($1::bigint[])",
        conversations,
    )
    assert len(rows) == 50 and {r["status"] for r in rows} == {"offered"}
    assert sorted(r["conversation_id"] for r in rows) == sorted(conversations)  # exactly one per handoff
    per_agent = {a: sum(r["agent_id"] == a for r in rows) for a in agents}
    assert max(per_agent.values()) <= 5 and sum(per_agent.values()) == 50
    active = {
        r["user_id"]: r["active"]
        for r in await setup.pool.fetch(
            "SELECT user_id, active FROM agents WHERE user_id = ANY($1::bigint[])", agents
        )
    }
    assert active == per_agent
    statuses = await setup.pool.fetch(
        "SELECT status FROM handoffs WHERE conversation_id = ANY($1::bigint[])", conversations
    )
    assert [r["status"] for r in statuses] == ["offered"] * 50


async def test_with_the_warm_transfer_on_phone_call_handoffs_are_left_to_it(setup: Setup) -> None:
    await setup.agent(capacity=10)
    call, _ = await setup.handoff("urgent", channel="voice")
    chat, _ = await setup.handoff("normal")
    setup.routing.skip_voice_handoffs = True
    try:
        offered = []
        while (offer := await setup.routing.assign_next(setup.queue)) is not None:
            offered.append(offer.conversation_id)
        assert offered == [chat]  # the call waits for the transfer, which rings agents' phones
    finally:
        setup.routing.skip_voice_handoffs = False
    offer = await setup.routing.assign_next(setup.queue)
    assert offer is not None and offer.conversation_id == call
