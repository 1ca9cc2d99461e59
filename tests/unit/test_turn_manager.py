"""Scenario tests of the conversation core, turn by turn, with plain fakes.

The turn manager runs with the seed intents of ``intents.yaml``, a keyword classifier (so these
tests do not depend on the embedding model), an in-memory business system and turn work, and a
clock that moves only when told to. The conversation service is driven with an in-memory store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.clock import FakeClock
from pipeline.identity import Identity, IdentityLevel
from pipeline.model import (
    Balance,
    Channel,
    ConversationState,
    Customer,
    Intent,
    Order,
    OrderStatus,
    OutboundText,
    Priority,
    TicketStatus,
)
from pipeline.ports import ActionRefused, BusinessSystem, IntentClassifier, ProviderUnavailable, TurnWork
from pipeline.service import APOLOGY, ConversationService, Reply
from pipeline.summary import three_line_summary
from pipeline.templates import (
    day,
    join_choices,
    money,
    order_choice_label,
    render,
    sla_text,
)
from pipeline.turn_manager import CoreConfig, TurnContext, TurnManager, TurnResult
from tests.unit.fakes import (
    FakeBusiness,
    FakeCodes,
    FakeConversationStore,
    FakeWork,
    Handoff,
    KeywordClassifier,
    load_intents,
    make_order,
)

# A Friday afternoon.
NOW = datetime(2026, 3, 20, 15, 0, tzinfo=UTC)
DAY = timedelta(days=1)
INTENTS = load_intents()

ANA_PHONE = "+15551230000"
ANA = Customer(ref="C1", name="Ana Souza", phone=ANA_PHONE, email="ana@example.com", whatsapp_id=ANA_PHONE)
BRUNO = Customer(ref="C2", name="Bruno Lima", phone="+15559870000", email="bruno@example.com")

HEADPHONES = make_order(
    "4517", ANA, ("Wireless headphones", 12900), status=OrderStatus.DELIVERED,
    placed_at=NOW - 8 * DAY, shipped_at=NOW - 6 * DAY, delivered_at=NOW - 3 * DAY,
)  # fmt: skip
KETTLE = make_order(
    "4520", ANA, ("Electric kettle", 4500), status=OrderStatus.DELIVERED,
    placed_at=NOW - 14 * DAY, shipped_at=NOW - 12 * DAY, delivered_at=NOW - 10 * DAY,
)  # fmt: skip
SHOES = make_order("4600", ANA, ("Running shoes", 8900), status=OrderStatus.PLACED, placed_at=NOW - 2 * DAY)
JACKET = make_order(
    "4700", ANA, ("Rain jacket", 7500), status=OrderStatus.SHIPPED,
    placed_at=NOW - 4 * DAY, shipped_at=NOW - 2 * DAY, tracking_code="1Z999AA10123456784",
)  # fmt: skip
OLD_LAMP = make_order(
    "4400", ANA, ("Desk lamp", 6000), status=OrderStatus.DELIVERED,
    placed_at=NOW - 52 * DAY, shipped_at=NOW - 49 * DAY, delivered_at=NOW - 45 * DAY,
)  # fmt: skip
PHONE_CASE = make_order(
    "4800",
    ANA,
    ("Phone case", 1500),
    status=OrderStatus.CANCELLED,
    placed_at=NOW - 9 * DAY,
    cancelled_at=NOW - 8 * DAY,
)
YOGA_MAT = make_order(
    "4900", ANA, ("Yoga mat", 3000), status=OrderStatus.RETURNED,
    placed_at=NOW - 30 * DAY, delivered_at=NOW - 25 * DAY, returned_at=NOW - 15 * DAY,
)  # fmt: skip
BRUNOS_ESPRESSO = make_order(
    "7001", BRUNO, ("Espresso machine", 24900), status=OrderStatus.DELIVERED,
    placed_at=NOW - 6 * DAY, shipped_at=NOW - 4 * DAY, delivered_at=NOW - 2 * DAY,
)  # fmt: skip

CHOICE_QUESTION = "Which order is it: 4517 (Wireless headphones, delivered Mar 17) or 4520 (Electric kettle, delivered Mar 10)?"
CLARIFY = (
    "Sorry, I didn't quite get that. I can check an order, cancel it, refund it, send a return label, "
    "or tell you your balance. What would you like to do?"
)


@dataclass
class Chat:
    """One conversation driven turn by turn, with everything a test wants to look at."""

    tm: TurnManager
    ctx: TurnContext
    work: FakeWork
    business: FakeBusiness
    classifier: KeywordClassifier
    clock: FakeClock
    last: TurnResult | None = None
    codes: FakeCodes | None = None

    async def send(self, text: str) -> str:
        """One customer turn at the clock's current time; returns the replies joined by a space."""
        self.ctx.now = self.clock.now()
        self.last = await self.tm.handle(self.ctx, text, self.work)
        return " ".join(self.last.replies)


def start(
    *orders: Order,
    customer: Customer | None = ANA,
    channel: Channel = Channel.WHATSAPP,
    address: str = ANA_PHONE,
    intents: list[Intent] | None = None,
    config: CoreConfig | None = None,
    business: FakeBusiness | None = None,
) -> Chat:
    business = business or FakeBusiness(
        [ANA, BRUNO], [*orders, BRUNOS_ESPRESSO], [Balance("C1", 1250, "USD")]
    )
    classifier = KeywordClassifier()
    clock = FakeClock(NOW)
    codes = FakeCodes()
    tm = TurnManager(classifier, business, INTENTS if intents is None else intents, config, codes=codes)
    ctx = TurnContext(conversation_id=1, channel=channel, address=address, now=NOW, customer=customer)
    if customer is not None:  # a known customer here came in on a signed WhatsApp/SMS webhook
        ctx.identity = Identity(IdentityLevel.VERIFIED, f"{channel}_signed", NOW, customer.ref)
    return Chat(tm, ctx, FakeWork(ctx), business, classifier, clock, codes=codes)


def lines(summary: str) -> list[str]:
    return summary.split("\n")


# --------------------------------------------------------------------------------------
# the fakes honour the ports


def test_fakes_implement_the_core_ports() -> None:
    assert isinstance(FakeBusiness(), BusinessSystem)
    assert isinstance(KeywordClassifier(), IntentClassifier)
    work: TurnWork = FakeWork()  # a Protocol without runtime_checkable: checked by mypy
    assert work is not None


def test_seed_intents_load_and_disabled_intents_are_not_given_to_the_classifier() -> None:
    intents = [*INTENTS[:-1], dataclasses.replace(INTENTS[-1], enabled=False)]
    chat = start(intents=intents)

    assert {i.name for i in INTENTS} >= {"refund", "cancel_order", "order_status", "talk_to_person"}
    assert INTENTS[-1].name not in chat.classifier.loaded
    assert len(chat.classifier.loaded) == len(INTENTS) - 1


async def test_disabled_intent_is_never_matched() -> None:
    greeting = next(i for i in INTENTS if i.name == "greeting")
    intents = [i if i.name != "greeting" else dataclasses.replace(greeting, enabled=False) for i in INTENTS]
    chat = start(intents=intents)

    assert await chat.send("hello") == CLARIFY


# --------------------------------------------------------------------------------------
# refund: choose, confirm, act, close the loop


async def test_refund_with_two_delivered_orders_asks_which_one_and_lists_both() -> None:
    chat = start(HEADPHONES, KETTLE, SHOES)

    reply = await chat.send("I want a refund")

    assert reply == CHOICE_QUESTION
    assert chat.ctx.state.awaiting == "order_choice"
    assert chat.ctx.state.candidates == ["4517", "4520"]
    assert chat.business.mutations == 0


@pytest.mark.parametrize(
    ("answer", "number", "title", "delivered", "amount"),
    [
        ("4520", "4520", "Electric kettle", "Mar 10", "$45.00"),
        ("it's order 4517", "4517", "Wireless headphones", "Mar 17", "$129.00"),
        ("the second one", "4520", "Electric kettle", "Mar 10", "$45.00"),
        ("the first one", "4517", "Wireless headphones", "Mar 17", "$129.00"),
        ("the last one", "4520", "Electric kettle", "Mar 10", "$45.00"),
        ("the headphones", "4517", "Wireless headphones", "Mar 17", "$129.00"),
        ("the kettle please", "4520", "Electric kettle", "Mar 10", "$45.00"),
        ("four five one seven", "4517", "Wireless headphones", "Mar 17", "$129.00"),
    ],
)
async def test_refund_order_is_picked_by_number_ordinal_or_item_word_then_confirmation_is_asked(
    answer: str, number: str, title: str, delivered: str, amount: str
) -> None:
    chat = start(HEADPHONES, KETTLE)
    await chat.send("I want a refund")

    reply = await chat.send(answer)

    assert reply == (
        f"Order {number} ({title}) was delivered on {delivered}, within our 30-day window. I can refund {amount} "
        "to your original payment method and text you a return label. Shall I go ahead?"
    )
    assert chat.ctx.state.awaiting == "confirm"
    assert chat.ctx.state.slots["order_number"] == number
    assert chat.business.mutations == 0


async def test_confirmed_refund_refunds_once_texts_label_resolves_ticket_and_schedules_followup() -> None:
    chat = start(HEADPHONES, KETTLE)
    await chat.send("I want a refund")
    await chat.send("the second one")

    reply = await chat.send("yes")

    assert reply == (
        "Done: $45.00 is refunded for order 4520 (reference RF-0001); it shows on your statement in 3 to 5 "
        "business days. I've texted you a return label, code RL-0001. Ticket CL-000001 is resolved, and I'll "
        "check in with you in 48 hours."
    )
    biz = chat.business
    assert biz.calls["issue_refund"] == 1
    assert biz.refund_requests == [
        {
            "number": "4520",
            "amount_cents": 4500,
            "reason": "customer request via whatsapp",
            "idempotency_key": "refund:4520",
        }
    ]
    assert biz.orders["4520"].refunded_cents == 4500
    assert biz.orders["4517"].refunded_cents == 0
    assert biz.calls["create_return_label"] == 1
    assert list(biz.labels) == ["4520"]

    assert chat.work.texts == [
        OutboundText(
            channel=Channel.WHATSAPP,
            to=ANA_PHONE,
            body="Your return label for order 4520: https://labels.example.test/RL-0001 (code RL-0001). "
            "Print it and drop the parcel at any carrier point within 14 days.",
            kind="return_label",
        )
    ]

    due = NOW + timedelta(hours=48)
    [ticket] = chat.work.tickets.values()
    assert ticket.protocol == "CL-000001"
    assert ticket.status == TicketStatus.RESOLVED
    assert ticket.queue == "billing"
    assert ticket.priority == Priority.HIGH
    assert ticket.owner == "ai"
    assert ticket.subject == "Refund for order 4520"
    assert ticket.customer_ref == "C1"
    assert ticket.next_step == "Confirm the return of order 4520 arrived and the refund reached the customer"
    assert ticket.next_step_due == due
    assert lines(ticket.summary) == [
        "Who: Ana Souza (customer C1) on WhatsApp.",
        "Wants: a refund for order 4520.",
        "Status: done: refunded $45.00 for order 4520 (ref RF-0001), return label RL-0001 texted. "
        "Pending: confirm the return of order 4520 arrived. Handoff reason: resolved by AI.",
    ]

    [followup] = chat.work.followups
    assert followup.due_at == due
    assert followup.ticket_id == ticket.id
    assert followup.channel == Channel.WHATSAPP
    assert followup.address == ANA_PHONE
    assert followup.key == "followup:refund:4520"
    assert followup.body == (
        "Hi Ana, checking in on order 4520: your refund of $45.00 was issued on Mar 20. Has the return been sent, "
        "and did the refund arrive? Reply here if anything isn't right."
    )

    assert chat.ctx.ticket_id == ticket.id
    assert (chat.ctx.next_step, chat.ctx.next_step_due) == (ticket.next_step, due)
    assert chat.ctx.owner == "ai"
    assert chat.ctx.state.intent is None and chat.ctx.state.awaiting is None
    assert chat.ctx.state.touched == [{"kind": "order", "ref": "4520"}]
    assert chat.work.events_of("refund_issued") == [
        {"order": "4520", "amount_cents": 4500, "provider_ref": "RF-0001", "already_existed": False}
    ]
    assert chat.work.events_of("return_label_created") == [
        {"order": "4520", "code": "RL-0001", "warehouse_notified": True}
    ]


async def test_replaying_yes_after_a_refund_does_not_refund_again() -> None:
    chat = start(HEADPHONES, KETTLE)
    await chat.send("I want a refund")
    await chat.send("4520")
    await chat.send("yes")

    reply = await chat.send("yes")

    assert reply == CLARIFY
    assert chat.business.calls["issue_refund"] == 1
    assert chat.business.calls["create_return_label"] == 1
    assert len(chat.work.tickets) == 1
    assert len(chat.work.texts) == 1
    assert len(chat.work.followups) == 1


async def test_asking_again_for_a_refunded_order_says_it_is_already_refunded() -> None:
    chat = start(HEADPHONES, KETTLE)
    await chat.send("I want a refund")
    await chat.send("4520")
    await chat.send("yes")

    await chat.send("I want a refund")
    reply = await chat.send("4520")

    assert reply == "Order 4520 has already been refunded ($45.00). Is there anything else I can help with?"
    assert chat.business.calls["issue_refund"] == 1
    assert len(chat.work.tickets) == 1


async def test_no_at_refund_confirmation_issues_nothing() -> None:
    chat = start(HEADPHONES, KETTLE)
    await chat.send("I want a refund")
    await chat.send("the headphones")

    reply = await chat.send("no")

    assert reply == "Okay, no refund. Is there anything else I can help with?"
    assert chat.business.mutations == 0
    assert chat.work.tickets == {} and chat.work.texts == [] and chat.work.followups == []
    assert chat.work.events_of("confirmation_declined") == [{"intent": "refund", "order": "4517"}]
    assert chat.ctx.state.intent is None and chat.ctx.state.awaiting is None


async def test_unclear_answer_to_a_confirmation_asks_again_without_acting() -> None:
    chat = start(KETTLE)
    await chat.send("refund order 4520")

    reply = await chat.send("purple elephants")

    assert reply == "Shall I go ahead? Please answer yes or no."
    assert chat.ctx.state.awaiting == "confirm"
    assert chat.ctx.state.misses == 0
    assert chat.business.mutations == 0


async def test_refund_confirmed_after_the_window_closed_is_refused_on_the_fresh_check() -> None:
    # Delivered 29 days ago: eligible when asked, 31 days when the customer finally says yes.
    late = dataclasses.replace(KETTLE, delivered_at=NOW - 29 * DAY)
    chat = start(late)
    assert "Shall I go ahead?" in await chat.send("refund order 4520")
    chat.clock.advance(2 * DAY)

    reply = await chat.send("yes")

    assert reply.startswith(
        "Order 4520 was delivered on Feb 19, 31 days ago, which is outside our 30-day refund window"
    )
    assert chat.business.calls["issue_refund"] == 0
    assert chat.ctx.state.awaiting == "offer_handoff"


async def test_refund_on_a_voice_call_texts_the_label_by_sms_to_the_customers_phone() -> None:
    chat = start(KETTLE, channel=Channel.VOICE, address="+15550001111")
    await chat.send("refund order four five two zero")

    await chat.send("yes please")

    [text] = chat.work.texts
    assert (text.channel, text.to) == (Channel.SMS, ANA_PHONE)
    [followup] = chat.work.followups
    assert (followup.channel, followup.address) == (Channel.SMS, ANA_PHONE)
    assert lines(chat.work.tickets[1].summary)[0] == "Who: Ana Souza (customer C1) on a phone call."


async def test_refund_of_a_placed_order_is_refused_with_a_cancel_hint() -> None:
    chat = start(SHOES)

    reply = await chat.send("refund order 4600")

    assert reply == (
        "Order 4600 is placed, and refunds are for delivered orders. It hasn't shipped yet, so I can cancel it instead."
    )
    assert chat.business.mutations == 0


async def test_refund_over_the_limit_offers_billing_and_escalates_on_yes() -> None:
    chat = start(
        HEADPHONES,
        config=CoreConfig(refund=dataclasses.replace(CoreConfig().refund, max_amount_cents=10_000)),
    )

    reply = await chat.send("refund order 4517")
    assert (
        reply
        == "A refund of $129.00 needs a person to approve it. Would you like me to pass this to our billing team?"
    )

    await chat.send("yes")
    [ticket] = chat.work.tickets.values()
    assert ticket.queue == "billing"
    assert "Pending: approval of a refund of $129.00 for order 4517." in ticket.summary
    assert chat.business.calls["issue_refund"] == 0


# --------------------------------------------------------------------------------------
# outside the window: explain, offer a person, escalate


async def test_refund_outside_the_window_explains_and_offers_a_person() -> None:
    chat = start(OLD_LAMP)

    reply = await chat.send("I want a refund")

    assert reply == (
        "Order 4400 was delivered on Feb 3, 45 days ago, which is outside our 30-day refund window, so I can't "
        "refund it myself. Would you like me to pass this to a person on our billing team?"
    )
    assert chat.ctx.state.awaiting == "offer_handoff"
    assert chat.work.events_of("policy_check") == [
        {
            "action": "refund",
            "order": "4400",
            "allowed": False,
            "reason": "outside_window",
            "days_since_delivery": 45,
            "window_days": 30,
        }
    ]
    assert chat.business.mutations == 0


async def test_yes_to_the_offer_escalates_to_billing_with_a_three_line_summary() -> None:
    chat = start(OLD_LAMP)
    await chat.send("I want a refund")

    reply = await chat.send("yes")

    assert reply == (
        "I've passed this to our billing team with a summary, so you won't need to repeat yourself. "
        "Your ticket is CL-000001; someone will reply here within 30 minutes."
    )
    [ticket] = chat.work.tickets.values()
    assert ticket.queue == "billing"
    assert ticket.status == TicketStatus.OPEN
    assert ticket.priority == Priority.HIGH
    assert ticket.first_response_due == NOW + timedelta(minutes=30)
    assert ticket.resolution_due == NOW + timedelta(minutes=1440)
    summary = lines(ticket.summary)
    assert len(summary) == 3
    assert summary[0] == "Who: Ana Souza (customer C1) on WhatsApp."
    assert summary[1] == "Wants: a refund for order 4400."
    assert summary[2].startswith(
        "Status: done: refund of order 4400 refused by policy (outside_window). "
        "Pending: a person to decide on a refund outside the window for order 4400."
    )
    assert chat.ctx.owner == "queue:billing"
    assert chat.ctx.status == "escalated"
    assert chat.ctx.ticket_id == ticket.id
    assert chat.ctx.next_step == "billing team to respond"
    assert chat.ctx.next_step_due == NOW + timedelta(minutes=30)
    assert chat.work.events_of("handoff")[0]["queue"] == "billing"
    assert chat.business.mutations == 0


async def test_no_to_the_offer_keeps_the_conversation_with_the_ai() -> None:
    chat = start(OLD_LAMP)
    await chat.send("I want a refund")

    reply = await chat.send("no thanks")

    assert reply == "Okay. Is there anything else I can help with?"
    assert chat.work.tickets == {}
    assert chat.ctx.owner == "ai"
    assert chat.ctx.state.awaiting is None


# --------------------------------------------------------------------------------------
# asking for a person


async def test_agent_please_at_the_start_escalates_to_the_handoff_queue() -> None:
    chat = start(HEADPHONES)

    reply = await chat.send("agent please")

    assert reply == (
        "I've passed this to our support team with a summary, so you won't need to repeat yourself. "
        "Your ticket is CL-000001; someone will reply here within 15 minutes."
    )
    [ticket] = chat.work.tickets.values()
    assert ticket.queue == "support"
    assert lines(ticket.summary) == [
        "Who: Ana Souza (customer C1) on WhatsApp.",
        "Wants: to talk to a person.",
        "Status: done: nothing yet. Pending: a person to take over. Handoff reason: customer asked for a person.",
    ]
    assert (chat.ctx.owner, chat.ctx.status) == ("queue:support", "escalated")
    assert chat.classifier.classified == []


@pytest.mark.parametrize(
    ("before", "queue"),
    [
        ([], "support"),
        (["I want a refund"], "billing"),
        (["I want a refund", "4520"], "billing"),
        (["cancel order 4600"], "support"),
    ],
)
async def test_agent_please_at_any_point_escalates_and_later_messages_go_to_the_team(
    before: list[str], queue: str
) -> None:
    chat = start(HEADPHONES, KETTLE, SHOES)
    for text in before:
        await chat.send(text)

    await chat.send("agent please")
    assert chat.ctx.owner == f"queue:{queue}"
    assert chat.ctx.status == "escalated"
    calls_before = sum(chat.business.calls.values())

    for text in ("yes", "hello? I want a refund for order 4520", "cancel order 4600"):
        reply = await chat.send(text)
        assert reply == (
            f"Your request is with our {queue} team (ticket CL-000001). I've added your message to it; "
            "someone will reply here shortly."
        )
    assert sum(chat.business.calls.values()) == calls_before
    assert chat.business.mutations == 0
    assert len(chat.work.tickets) == 1
    assert chat.work.event_kinds().count("customer_message_while_queued") == 3


async def test_asking_for_a_person_mid_refund_carries_the_refund_into_the_summary() -> None:
    chat = start(HEADPHONES, KETTLE)
    await chat.send("I want a refund")
    await chat.send("4520")

    await chat.send("can I talk to a real person")

    [ticket] = chat.work.tickets.values()
    assert ticket.queue == "billing"
    assert lines(ticket.summary)[1] == "Wants: a refund for order 4520."
    assert "Pending: customer to confirm a refund of $45.00 for order 4520." in ticket.summary


async def test_escalation_puts_the_conversation_in_its_queue_to_wait_for_an_agent() -> None:
    chat = start(HEADPHONES, KETTLE)
    await chat.send("I want a refund")

    await chat.send("agent please")

    [ticket] = chat.work.tickets.values()
    assert chat.work.handoffs == [Handoff(1, "billing", str(ticket.priority), ticket.id)]
    assert chat.work.event_kinds()[-2:] == ["handoff_requested", "handoff"]


async def test_a_message_for_the_agent_who_owns_the_conversation_gets_no_bot_reply() -> None:
    chat = start(HEADPHONES, KETTLE, SHOES)
    await chat.send("agent please")
    chat.ctx.owner = "agent:7"  # an agent accepted the handoff
    calls_before = sum(chat.business.calls.values())

    for text in ("hi, are you there?", "cancel order 4600", "agent please"):
        assert await chat.send(text) == ""
        assert chat.last is not None and chat.last.to_agent is True

    assert sum(chat.business.calls.values()) == calls_before
    assert chat.work.events_of("customer_message_to_agent") == [{"owner": "agent:7"}] * 3
    assert len(chat.work.tickets) == 1 and len(chat.work.handoffs) == 1
    assert chat.ctx.owner == "agent:7"


async def test_a_caller_on_a_line_an_agent_owns_still_hears_the_holding_line() -> None:
    chat = start(HEADPHONES, channel=Channel.VOICE, address="CA0001")
    await chat.send("agent please")
    chat.ctx.owner = "agent:7"

    reply = await chat.send("hello?")

    assert reply.startswith("Your request is with our support team (ticket CL-000001).")
    assert chat.last is not None and chat.last.to_agent is False


async def test_service_hands_customer_messages_to_the_owning_agent_after_commit() -> None:
    business = FakeBusiness([ANA], [KETTLE])
    store = FakeConversationStore()
    seen: list[tuple[int, int, str, int]] = []

    async def on_customer_message(conversation_id: int, seq: int, text: str) -> None:
        committed = len(store.conversations[(Channel.WHATSAPP, ANA_PHONE)].messages)
        seen.append((conversation_id, seq, text, committed))

    service = ConversationService(
        store,
        TurnManager(KeywordClassifier(), business, INTENTS),
        business,
        FakeClock(NOW),
        on_customer_message=on_customer_message,
    )
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "agent please", channel_signed=True)
    await service.handle_text(
        Channel.WHATSAPP, ANA_PHONE, "anyone?", channel_signed=True
    )  # still in the queue: the bot answers
    assert seen == [] and len(store.all_handoffs) == 1
    conv = store.conversations[(Channel.WHATSAPP, ANA_PHONE)]
    conv.owner = "agent:7"

    reply = await service.handle_text(Channel.WHATSAPP, ANA_PHONE, " my kettle leaks ", channel_signed=True)

    assert reply.texts == [] and reply.duplicate is False
    conv = store.conversations[(Channel.WHATSAPP, ANA_PHONE)]
    assert (conv.messages[-1].sender, conv.messages[-1].body) == ("customer", "my kettle leaks")
    assert seen == [(conv.id, conv.messages[-1].seq, "my kettle leaks", len(conv.messages))]  # after commit
    await service.handle_text(
        Channel.WHATSAPP, ANA_PHONE, "still leaking", external_id="SM9", channel_signed=True
    )
    await service.handle_text(
        Channel.WHATSAPP, ANA_PHONE, "still leaking", external_id="SM9"
    )  # a retried delivery
    assert [text for _, _, text, _ in seen] == ["my kettle leaks", "still leaking"]


async def test_a_failing_agent_hook_does_not_lose_the_customer_message() -> None:
    business = FakeBusiness([ANA], [KETTLE])
    store = FakeConversationStore()

    async def broken(conversation_id: int, seq: int, text: str) -> None:
        raise RuntimeError("console gone")

    service = ConversationService(
        store,
        TurnManager(KeywordClassifier(), business, INTENTS),
        business,
        FakeClock(NOW),
        on_customer_message=broken,
    )
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "agent please", channel_signed=True)
    store.conversations[(Channel.WHATSAPP, ANA_PHONE)].owner = "agent:7"

    reply = await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "hello?", channel_signed=True)

    assert reply.texts == []
    assert store.conversations[(Channel.WHATSAPP, ANA_PHONE)].messages[-1].body == "hello?"


# --------------------------------------------------------------------------------------
# misunderstandings


async def test_one_miss_asks_a_clarifying_question() -> None:
    chat = start(HEADPHONES)

    reply = await chat.send("purple elephants dancing")

    assert reply == CLARIFY
    assert chat.ctx.state.misses == 1
    assert chat.ctx.owner == "ai"
    assert chat.work.tickets == {}
    assert chat.work.events_of("intent") == [{"intent": None, "score": 0.0, "runner_up": None}]


async def test_two_misses_in_a_row_escalate_to_the_handoff_queue() -> None:
    chat = start(HEADPHONES)
    await chat.send("purple elephants dancing")

    reply = await chat.send("banana telephone")

    assert reply.startswith("I've passed this to our support team with a summary")
    [ticket] = chat.work.tickets.values()
    assert ticket.queue == "support"
    assert ticket.summary.endswith("Handoff reason: could not understand the request twice.")
    assert chat.ctx.owner == "queue:support"
    assert chat.work.events_of("handoff")[0]["reason"] == "could not understand the request twice"


async def test_two_misses_without_a_handoff_intent_escalate_to_the_fallback_queue() -> None:
    intents = [i for i in INTENTS if i.action != "handoff"]
    chat = start(HEADPHONES, intents=intents, config=CoreConfig(fallback_queue="frontdesk"))
    await chat.send("purple elephants dancing")

    reply = await chat.send("banana telephone")

    assert reply == (
        "I've passed this to our frontdesk team with a summary, so you won't need to repeat yourself. "
        "Your ticket is CL-000001; someone will reply here within 1 hour."
    )
    [ticket] = chat.work.tickets.values()
    assert ticket.queue == "frontdesk"
    assert ticket.subject == "Handoff: customer request"
    assert lines(ticket.summary)[1] == "Wants: not clear yet."
    assert chat.ctx.owner == "queue:frontdesk"


async def test_a_miss_then_an_understood_request_resets_the_count() -> None:
    chat = start(SHOES)
    await chat.send("purple elephants dancing")
    await chat.send("where is my order")

    reply = await chat.send("banana telephone")

    assert reply == CLARIFY
    assert chat.ctx.owner == "ai"


async def test_misses_separated_by_answered_questions_are_not_in_a_row() -> None:
    # A miss at the order question, then the customer picks an order and confirms: the refund
    # is done. One later miss is the first in a row and must get a clarifying question.
    chat = start(HEADPHONES, KETTLE)
    await chat.send("I want a refund")
    assert await chat.send("umm") == CLARIFY
    await chat.send("the second one")
    assert (await chat.send("yes")).startswith("Done: $45.00 is refunded")

    reply = await chat.send("banana telephone")

    assert reply == CLARIFY
    assert chat.ctx.owner == "ai"


# --------------------------------------------------------------------------------------
# cancellations


async def test_cancel_a_placed_order_after_confirmation() -> None:
    chat = start(SHOES, HEADPHONES)

    ask = await chat.send("I want to cancel my order")
    assert (
        ask == "Order 4600 (Running shoes, $89.00) hasn't shipped yet, so I can cancel it. Shall I cancel it?"
    )
    assert chat.business.calls["cancel_order"] == 0

    reply = await chat.send("yes")

    assert reply == (
        "Done: order 4600 is cancelled. You won't be charged for it; any payment goes back to your original "
        "payment method."
    )
    assert chat.business.calls["cancel_order"] == 1
    assert chat.business.orders["4600"].status == OrderStatus.CANCELLED
    assert chat.business.orders["4600"].cancelled_at == NOW
    assert chat.work.events_of("order_cancelled") == [{"order": "4600"}]


async def test_no_at_cancel_confirmation_keeps_the_order() -> None:
    chat = start(SHOES)
    await chat.send("cancel order 4600")

    reply = await chat.send("no")

    assert reply == "Okay, I've left order 4600 as it is."
    assert chat.business.calls["cancel_order"] == 0
    assert chat.business.orders["4600"].status == OrderStatus.PLACED


async def test_cancel_a_shipped_order_is_refused_with_the_ship_date_and_no_cancel_call() -> None:
    chat = start(SHOES, JACKET)

    reply = await chat.send("cancel order 4700")

    assert reply == (
        "Order 4700 already shipped on Mar 18, so it can't be cancelled any more. Once it arrives you can return "
        "it for a refund within 30 days."
    )
    assert chat.business.calls["cancel_order"] == 0
    assert chat.business.orders["4700"].status == OrderStatus.SHIPPED


async def test_cancel_a_delivered_order_offers_refund_or_label() -> None:
    chat = start(HEADPHONES)

    reply = await chat.send("cancel order 4517")

    assert reply == (
        "Order 4517 was already delivered on Mar 17, so it can't be cancelled. I can refund it or send you a "
        "return label instead."
    )
    assert chat.business.calls["cancel_order"] == 0


async def test_order_that_ships_before_the_customer_confirms_is_not_cancelled() -> None:
    chat = start(SHOES)
    await chat.send("cancel order 4600")
    chat.business.orders["4600"] = dataclasses.replace(SHOES, status=OrderStatus.SHIPPED, shipped_at=NOW)

    reply = await chat.send("yes")

    assert reply.startswith("Order 4600 already shipped on Mar 20, so it can't be cancelled any more.")
    assert chat.business.calls["cancel_order"] == 0


async def test_business_refusing_a_cancel_is_reported_with_fresh_order_data() -> None:
    class ShipsDuringCancel(FakeBusiness):
        async def cancel_order(self, number: str, *, now: datetime) -> Order:
            self.orders[number] = dataclasses.replace(
                self.orders[number], status=OrderStatus.SHIPPED, shipped_at=now
            )
            return await super().cancel_order(number, now=now)

    business = ShipsDuringCancel([ANA], [SHOES])
    chat = start(business=business)
    await chat.send("cancel order 4600")

    reply = await chat.send("yes")

    assert reply.startswith("Order 4600 already shipped on Mar 20, so it can't be cancelled any more.")
    assert business.calls["cancel_order"] == 1
    assert chat.work.events_of("order_cancelled") == []


async def test_fake_business_refuses_to_cancel_a_shipped_order() -> None:
    business = FakeBusiness([ANA], [JACKET])

    with pytest.raises(ActionRefused) as refused:
        await business.cancel_order("4700", now=NOW)

    assert refused.value.code == "order_shipped"
    assert business.orders["4700"].status == OrderStatus.SHIPPED


# --------------------------------------------------------------------------------------
# order status and data isolation


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (SHOES, "Order 4600 (Running shoes) was placed on Mar 18 and hasn't shipped yet."),
        (
            JACKET,
            "Order 4700 (Rain jacket) shipped on Mar 18, tracking 1Z999AA10123456784. "
            "It should arrive in 2 to 4 business days.",
        ),
        (HEADPHONES, "Order 4517 (Wireless headphones) was delivered on Mar 17."),
        (PHONE_CASE, "Order 4800 (Phone case) was cancelled on Mar 12."),
        (YOGA_MAT, "Order 4900 (Yoga mat) was returned on Mar 5."),
    ],
    ids=lambda v: v.status if isinstance(v, Order) else "",
)
async def test_order_status_for_each_status(order: Order, expected: str) -> None:
    chat = start(SHOES, JACKET, HEADPHONES, PHONE_CASE, YOGA_MAT)

    reply = await chat.send(f"what's the status of order {order.number}")

    assert reply == expected
    assert chat.work.events_of("order_status") == [{"order": order.number, "status": str(order.status)}]
    assert chat.business.mutations == 0
    assert chat.ctx.state.done == [f"told status of order {order.number} ({order.status})"]


async def test_order_status_without_a_number_picks_the_only_active_order() -> None:
    chat = start(JACKET, HEADPHONES, PHONE_CASE)

    reply = await chat.send("where is my order")

    assert reply.startswith("Order 4700 (Rain jacket) shipped on Mar 18")


async def test_order_status_with_two_active_orders_asks_which() -> None:
    chat = start(JACKET, SHOES, HEADPHONES)

    reply = await chat.send("where is my order")

    assert (
        reply
        == "Which order is it: 4600 (Running shoes, placed Mar 18) or 4700 (Rain jacket, shipped Mar 18)?"
    )


async def test_order_number_of_another_customer_is_not_found_and_leaks_nothing() -> None:
    chat = start(HEADPHONES)

    reply = await chat.send("where is order 7001")

    assert reply == "I couldn't find order 7001 on your account. Could you check the number?"
    assert "Espresso" not in reply and "Bruno" not in reply
    assert "order_number" not in chat.ctx.state.slots
    assert chat.ctx.state.awaiting == "order_number"
    assert chat.ctx.state.touched == []
    assert chat.work.events_of("order_status") == []


@pytest.mark.parametrize(
    "text", ["refund order 7001", "cancel order 7001", "I need a return label for order 7001"]
)
async def test_no_action_on_another_customers_order(text: str) -> None:
    chat = start(HEADPHONES)

    reply = await chat.send(text)
    await chat.send("yes")

    assert reply == "I couldn't find order 7001 on your account. Could you check the number?"
    assert chat.business.mutations == 0
    assert chat.business.orders["7001"] == BRUNOS_ESPRESSO


async def test_unknown_order_number_then_a_correct_one_continues() -> None:
    chat = start(HEADPHONES, KETTLE)
    assert (await chat.send("refund order 9999")).startswith("I couldn't find order 9999")

    reply = await chat.send("sorry, it's 4517")

    assert reply.startswith(
        "Order 4517 (Wireless headphones) was delivered on Mar 17, within our 30-day window."
    )


async def test_customer_without_orders_is_told_so() -> None:
    chat = start()
    chat.business.orders.pop("7001")

    assert await chat.send("where is my order") == "I don't see any orders on your account."


# --------------------------------------------------------------------------------------
# identification on web chat


async def test_unidentified_web_chat_refund_asks_for_phone_or_email() -> None:
    chat = start(HEADPHONES, KETTLE, customer=None, channel=Channel.WEBCHAT, address="web-7f3a")

    reply = await chat.send("I want a refund")

    assert reply == (
        "To help with that I need to find your account. What's the phone number or email on your account?"
    )
    assert chat.ctx.state.awaiting == "identify"
    assert chat.business.calls["list_orders"] == 0


CODE_SENT_PHONE = "Thanks. If that phone number is on an account, I've sent it a 6-digit code. Please type the code here to continue."
CODE_SENT_EMAIL = CODE_SENT_PHONE.replace("phone number", "email")


async def test_giving_the_phone_sends_a_code_to_the_phone_on_file_and_the_code_resumes_the_refund() -> None:
    chat = start(HEADPHONES, KETTLE, customer=None, channel=Channel.WEBCHAT, address="web-7f3a")
    await chat.send("I want a refund")

    reply = await chat.send("it's 555-123-0000")

    # A claim, not an identification: nothing about the account is said or opened yet.
    assert reply == CODE_SENT_PHONE
    assert chat.ctx.customer is None
    assert chat.ctx.identity.level == IdentityLevel.CLAIMED and chat.ctx.identity.claimed_ref == "C1"
    assert chat.business.calls["list_orders"] == 0
    [sms] = chat.work.private_texts
    assert (sms.channel, sms.to, sms.kind) == (Channel.SMS, ANA.phone, "verification_code")
    assert chat.codes is not None
    code = chat.codes.last_code()
    assert code is not None and code in sms.body
    assert chat.work.texts == []  # the code never enters the conversation it verifies

    await chat.send(code)

    assert chat.last is not None
    assert chat.last.replies == ["Thanks Ana, you're verified.", CHOICE_QUESTION]
    assert chat.ctx.customer == ANA
    assert chat.ctx.identity.level == IdentityLevel.VERIFIED and chat.ctx.identity.method == "one_time_code"
    assert [e["level"] for e in chat.work.events_of("identity_verified")] == ["verified"]

    await chat.send("the headphones")
    await chat.send("yes")
    assert chat.business.calls["issue_refund"] == 1
    [text] = chat.work.texts
    assert (text.channel, text.to) == (Channel.WEBCHAT, "web-7f3a")
    assert lines(chat.work.tickets[1].summary)[0] == "Who: Ana Souza (customer C1) on web chat."


async def test_an_unknown_phone_gets_the_same_reply_as_a_known_one_and_no_code_verifies_it() -> None:
    chat = start(HEADPHONES, customer=None, channel=Channel.WEBCHAT, address="web-7f3a")
    await chat.send("I want a refund")

    reply = await chat.send("+1 555 999 0000")

    assert reply == CODE_SENT_PHONE  # no enumeration: same words as for a customer's number
    assert chat.work.private_texts == []
    assert chat.ctx.identity.claimed_ref is None
    assert await chat.send("123456") == "That code doesn't match. Please try again."
    assert chat.ctx.customer is None

    reply = await chat.send("ana@example.com")
    assert reply == CODE_SENT_EMAIL
    assert chat.codes is not None
    reply = await chat.send(chat.codes.last_code() or "")

    assert chat.ctx.customer == ANA
    assert reply == (
        "Thanks Ana, you're verified. Order 4517 (Wireless headphones) was delivered on Mar 17, within our "
        "30-day window. I can refund $129.00 to your original payment method and text you a return label. "
        "Shall I go ahead?"
    )


async def test_balance_needs_verification_first() -> None:
    chat = start(customer=None, channel=Channel.WEBCHAT, address="web-7f3a")
    await chat.send("what's my balance")

    assert await chat.send("ANA@example.com") == CODE_SENT_EMAIL
    assert chat.business.calls.get("get_balance", 0) == 0
    assert chat.codes is not None
    reply = await chat.send(f"the code is {chat.codes.last_code()}")

    assert reply == "Thanks Ana, you're verified. Your account balance is $12.50."


async def test_verifying_without_a_request_asks_what_to_do() -> None:
    chat = start(customer=None, channel=Channel.WEBCHAT, address="web-7f3a")

    assert await chat.send("my email is ana@example.com") == CODE_SENT_EMAIL
    assert chat.codes is not None
    reply = await chat.send(chat.codes.last_code() or "")

    assert reply == "Thanks Ana, you're verified. What can I do for you?"


async def test_volunteering_an_unknown_phone_number_is_not_read_as_a_request_for_a_person() -> None:
    chat = start(customer=None, channel=Channel.WEBCHAT, address="web-8e1b")

    reply = await chat.send("my phone number is +1 555 999 0000")

    assert reply == CODE_SENT_PHONE
    assert not chat.work.tickets


async def test_five_wrong_codes_lock_verification_and_offer_a_person() -> None:
    chat = start(HEADPHONES, customer=None, channel=Channel.WEBCHAT, address="web-7f3a")
    await chat.send("refund order 4517")
    await chat.send("555-123-0000")
    assert chat.codes is not None
    right = chat.codes.last_code()
    wrong = "000000" if right != "000000" else "111111"

    replies = [await chat.send(wrong) for _ in range(5)]

    assert replies[:4] == ["That code doesn't match. Please try again."] * 4
    assert replies[4].startswith("That's too many wrong codes")
    assert await chat.send(right or "") != "Thanks Ana, you're verified."
    assert chat.ctx.identity.level != IdentityLevel.VERIFIED
    assert chat.business.calls["issue_refund"] == 0


async def test_a_spoken_code_verifies_a_caller_claimed_by_caller_id_before_a_refund() -> None:
    chat = start(HEADPHONES, customer=None, channel=Channel.VOICE, address="CA123")
    chat.ctx.identity = Identity(IdentityLevel.CLAIMED, "caller_id", NOW, "C1")

    reply = await chat.send("I want a refund for my headphones")

    assert reply.startswith("Before I can do that, I need to make sure it's you.")
    assert "say the code or key it in on your phone" in reply
    assert chat.business.calls["list_orders"] == 0
    [sms] = chat.work.private_texts
    assert (sms.channel, sms.to) == (Channel.SMS, ANA.phone)
    assert chat.codes is not None
    code = chat.codes.last_code() or ""
    spoken = " ".join(["zero one two three four five six seven eight nine".split()[int(d)] for d in code])

    reply = await chat.send(spoken)

    assert reply.startswith("Thanks Ana, you're verified. Order 4517")
    assert reply.endswith("Shall I go ahead?")
    await chat.send("yes")
    assert chat.business.calls["issue_refund"] == 1


async def test_a_caller_id_claim_never_reads_out_account_data_unless_the_admin_allows_it() -> None:
    chat = start(HEADPHONES, customer=None, channel=Channel.VOICE, address="CA123")
    chat.ctx.identity = Identity(IdentityLevel.CLAIMED, "caller_id", NOW, "C1")
    assert await chat.tm.greet_call(chat.ctx, chat.work) == ["Thanks for calling. How can I help you today?"]
    reply = await chat.send("where is my order 4517")
    assert reply.startswith("Before I can do that")

    lenient = [
        dataclasses.replace(i, identity="claimed") if i.action == "order_status" else i for i in INTENTS
    ]
    chat = start(HEADPHONES, customer=None, channel=Channel.VOICE, address="CA124", intents=lenient)
    chat.ctx.identity = Identity(IdentityLevel.CLAIMED, "caller_id", NOW, "C1")
    assert (await chat.tm.greet_call(chat.ctx, chat.work))[0].startswith("Hi Ana, I see order 4517")
    reply = await chat.send("where is my order 4517")
    assert reply.startswith("Order 4517 (Wireless headphones) was delivered")
    # ... but money still needs the code
    reply = await chat.send("I want a refund for it")
    assert reply.startswith("Before I can do that")
    assert chat.business.calls["issue_refund"] == 0


async def test_codes_are_rate_limited_with_the_same_reply_for_known_and_unknown_numbers() -> None:
    chat = start(customer=None, channel=Channel.WEBCHAT, address="web-7f3a")
    for number in ["555-123-0000", "+1 555 999 0000"] * 3:
        await chat.send(f"my number is {number}")
    assert chat.codes is not None and len(chat.codes.issued) == 5
    assert chat.last is not None and chat.last.replies == [
        "I've sent several codes already. Please wait a while before asking for another, or ask for an agent to reach a person."
    ]


# --------------------------------------------------------------------------------------
# spoken order numbers, labels, tickets, small talk


async def test_spoken_order_number_picks_that_order() -> None:
    chat = start(HEADPHONES, KETTLE)

    reply = await chat.send("refund order four five one seven")

    assert reply.startswith("Order 4517 (Wireless headphones) was delivered on Mar 17")
    assert chat.ctx.state.slots["order_number"] == "4517"


async def test_return_label_is_texted_without_confirmation() -> None:
    chat = start(HEADPHONES)

    reply = await chat.send("I need a return label")

    assert reply == (
        "I've texted you a return label for order 4517 (code RL-0001) and let our warehouse know it's coming back."
    )
    assert chat.business.calls["create_return_label"] == 1
    assert [t.kind for t in chat.work.texts] == ["return_label"]
    assert "https://labels.example.test/RL-0001" in chat.work.texts[0].body
    assert chat.business.calls["issue_refund"] == 0


async def test_return_label_for_a_shipped_order_is_refused() -> None:
    chat = start(JACKET, HEADPHONES)

    reply = await chat.send("return label for order 4700")

    assert reply == "Order 4700 is shipped; return labels are for delivered orders."
    assert chat.business.calls["create_return_label"] == 0


async def test_short_problem_report_asks_for_details_then_opens_a_ticket() -> None:
    chat = start(HEADPHONES)
    assert await chat.send("it arrived broken") == (
        "I'm sorry to hear that. Please describe the problem in a sentence or two and I'll open a ticket."
    )

    reply = await chat.send("The left earcup of my headphones makes a crackling noise")

    assert (
        reply == "I've opened ticket CL-000001 for you. Our support team will get back to you within 1 hour."
    )
    [ticket] = chat.work.tickets.values()
    assert ticket.subject == "The left earcup of my headphones makes a crackling noise"
    assert ticket.first_response_due == NOW + timedelta(minutes=60)
    assert ticket.resolution_due == NOW + timedelta(minutes=2880)
    assert lines(ticket.summary)[1] == "Wants: to report a problem."
    assert chat.ctx.owner == "ai"


async def test_greeting_goodbye_and_faq() -> None:
    chat = start(HEADPHONES)

    assert await chat.send("hello") == (
        "Hi Ana! I can check, cancel or refund an order, send a return label, or tell you your balance. "
        "What can I do for you?"
    )
    assert (await chat.send("what are your opening hours")).startswith(
        "We're open Monday to Friday 9am to 6pm"
    )
    assert await chat.send("thanks, bye") == "Thanks for contacting us, Ana. Have a great day!"
    assert chat.business.mutations == 0


# --------------------------------------------------------------------------------------
# a business system that fails


async def test_provider_unavailable_propagates_out_of_the_turn_manager() -> None:
    chat = start(HEADPHONES)
    chat.business.fail_with = ProviderUnavailable("CRM timed out")

    with pytest.raises(ProviderUnavailable):
        await chat.send("I want a refund")


async def test_provider_failure_while_refunding_leaves_no_ticket_or_text_behind() -> None:
    chat = start(KETTLE)
    await chat.send("refund order 4520")
    chat.business.fail_with = ProviderUnavailable("payments down")
    chat.business.fail_on = {"issue_refund"}

    with pytest.raises(ProviderUnavailable):
        await chat.send("yes")

    assert chat.business.refunds == {}
    assert chat.work.tickets == {} and chat.work.texts == [] and chat.work.followups == []


def service_for(
    business: FakeBusiness, *, after_commit: list[Reply] | None = None
) -> tuple[ConversationService, FakeConversationStore, FakeClock]:
    store = FakeConversationStore()
    clock = FakeClock(NOW)
    tm = TurnManager(KeywordClassifier(), business, INTENTS)

    async def collect(reply: Reply) -> None:
        if after_commit is not None:
            after_commit.append(reply)

    return ConversationService(store, tm, business, clock, after_commit=collect), store, clock


async def test_service_stores_the_inbound_message_and_apologises_when_the_business_system_fails() -> None:
    business = FakeBusiness([ANA], [HEADPHONES, KETTLE])
    service, store, _ = service_for(business)
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "I want a refund", channel_signed=True)
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "4520", channel_signed=True)
    business.fail_with = ProviderUnavailable("payments down")
    business.fail_on = {"issue_refund"}

    reply = await service.handle_text(Channel.WHATSAPP, ANA_PHONE, " yes ", channel_signed=True)

    assert reply.texts == [APOLOGY]
    assert reply.duplicate is False
    assert reply.outbox_ids == []
    conv = store.conversations[(Channel.WHATSAPP, ANA_PHONE)]
    assert [(m.sender, m.body) for m in conv.messages[-2:]] == [("customer", "yes"), ("bot", APOLOGY)]
    assert [m.seq for m in conv.messages] == [1, 2, 3, 4, 5, 6]
    # The turn's side effects rolled back; the state is as before, so "yes" can be retried.
    failed_turn = store.works[-1]
    assert failed_turn.events == [("turn_failed", {"code": "provider_unavailable", "retryable": True})]
    assert store.all_tickets == [] and store.all_texts == []
    assert ConversationState.from_json(conv.state).awaiting == "confirm"
    assert business.refunds == {}

    business.fail_with = None
    retry = await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "yes", channel_signed=True)

    assert retry.texts[-1].startswith("Done: $45.00 is refunded for order 4520")
    assert business.calls["issue_refund"] == 2
    assert len(business.refunds) == 1


async def test_service_commits_the_label_text_and_hands_its_outbox_id_over_after_commit() -> None:
    business = FakeBusiness([ANA], [KETTLE])
    committed: list[Reply] = []
    service, store, _ = service_for(business, after_commit=committed)
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "refund order 4520", channel_signed=True)
    assert committed == []

    reply = await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "yes", channel_signed=True)

    assert committed == [reply]
    assert reply.outbox_ids == [1]
    assert [t.kind for t in store.all_texts] == ["return_label"]
    conv = store.conversations[(Channel.WHATSAPP, ANA_PHONE)]
    assert conv.customer_ref == "C1"
    assert conv.ticket_id == store.all_tickets[0].id


async def test_service_ignores_a_duplicate_delivery_of_the_same_message() -> None:
    business = FakeBusiness([ANA], [KETTLE])
    service, store, _ = service_for(business)
    await service.handle_text(
        Channel.WHATSAPP, ANA_PHONE, "refund order 4520", external_id="SM1", channel_signed=True
    )
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "yes", external_id="SM2", channel_signed=True)
    calls = sum(business.calls.values())
    messages = len(store.conversations[(Channel.WHATSAPP, ANA_PHONE)].messages)

    again = await service.handle_text(
        Channel.WHATSAPP, ANA_PHONE, "yes", external_id="SM2", channel_signed=True
    )

    assert again.duplicate is True
    assert again.texts == []
    assert sum(business.calls.values()) == calls
    assert len(store.conversations[(Channel.WHATSAPP, ANA_PHONE)].messages) == messages
    assert len(business.refunds) == 1


async def test_service_retry_after_a_partial_failure_finishes_the_refund() -> None:
    # The refund went through but the label call failed: the turn rolled back and the customer
    # was told to try again. Saying "yes" again must finish the job (label, text, resolved
    # ticket, follow-up) with the same refund, not answer "already refunded" and leave the
    # customer without a label.
    business = FakeBusiness([ANA], [KETTLE])
    service, store, _ = service_for(business)
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "refund order 4520", channel_signed=True)
    business.fail_with = ProviderUnavailable("label service down")
    business.fail_on = {"create_return_label"}
    assert (await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "yes", channel_signed=True)).texts == [
        APOLOGY
    ]
    assert list(business.refunds) == ["4520"]
    business.fail_with = None

    retry = await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "yes", channel_signed=True)

    assert retry.texts[-1].startswith("Done: $45.00 is refunded for order 4520 (reference RF-0001)")
    assert len(business.refunds) == 1
    assert [t.kind for t in store.all_texts] == ["return_label"]
    assert [t.status for t in store.all_tickets] == [TicketStatus.RESOLVED]


async def test_service_apologises_to_a_known_customer_when_the_business_system_is_down() -> None:
    # With the whole business system down, the customer lookup fails too. A customer who was
    # already identified must get the honest apology and keep the pending confirmation, not be
    # asked who they are.
    business = FakeBusiness([ANA], [KETTLE])
    service, store, _ = service_for(business)
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "refund order 4520", channel_signed=True)
    business.fail_with = ProviderUnavailable("CRM down")

    reply = await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "yes", channel_signed=True)

    assert reply.texts == [APOLOGY]
    conv = store.conversations[(Channel.WHATSAPP, ANA_PHONE)]
    assert ConversationState.from_json(conv.state).awaiting == "confirm"


# --------------------------------------------------------------------------------------
# summary and templates


def test_summary_is_exactly_three_lines_for_an_identified_customer() -> None:
    refund = next(i for i in INTENTS if i.name == "refund")
    state = ConversationState(
        intent="refund",
        slots={"order_number": "4517"},
        done=["told status of order 4517 (delivered)", "refund of order 4517 refused by policy (over_limit)"],
        pending="approval of a refund of $1,290.00 for order 4517",
    )

    summary = three_line_summary(
        customer=ANA, channel=Channel.SMS, intent=refund, state=state, reason="needs approval"
    )

    assert summary == (
        "Who: Ana Souza (customer C1) on SMS.\n"
        "Wants: a refund for order 4517.\n"
        "Status: done: told status of order 4517 (delivered); refund of order 4517 refused by policy (over_limit). "
        "Pending: approval of a refund of $1,290.00 for order 4517. Handoff reason: needs approval."
    )
    assert len(summary.splitlines()) == 3


def test_summary_of_an_unidentified_customer_without_intent() -> None:
    summary = three_line_summary(
        customer=None, channel=Channel.VOICE, intent=None, state=ConversationState(), reason="caller asked"
    )

    assert summary.splitlines() == [
        "Who: unidentified customer on a phone call.",
        "Wants: not clear yet.",
        "Status: done: nothing yet. Pending: a person to take over. Handoff reason: caller asked.",
    ]


def test_summary_of_a_faq_like_intent_uses_its_action_or_description() -> None:
    custom = Intent(name="warranty", description="Warranty questions", action="warranty_check")

    summary = three_line_summary(
        customer=ANA, channel=Channel.WEBCHAT, intent=custom, state=ConversationState(), reason="x"
    )

    assert summary.splitlines()[1] == "Wants: Warranty questions."


def test_render_raises_on_a_missing_value() -> None:
    with pytest.raises(KeyError, match=r"template 'balance' needs \['amount'\]"):
        render("balance")
    with pytest.raises(KeyError, match=r"'label_done' needs \['label_code'\]"):
        render("label_done", number="4517")


def test_render_fills_every_value() -> None:
    assert render("balance", amount="$3.00") == "Your account balance is $3.00."
    assert render("cancel_kept", number="4600", unused="ignored") == "Okay, I've left order 4600 as it is."


@pytest.mark.parametrize(
    ("cents", "currency", "text"),
    [
        (8900, "USD", "$89.00"),
        (5, "usd", "$0.05"),
        (0, "USD", "$0.00"),
        (123456789, "EUR", "€1,234,567.89"),
        (1999, "GBP", "£19.99"),
        (4550, "BRL", "45.50 BRL"),
    ],
)
def test_money_formatting(cents: int, currency: str, text: str) -> None:
    assert money(cents, currency) == text


def test_day_formatting_is_short_and_speakable() -> None:
    assert day(datetime(2026, 11, 7, 23, 59, tzinfo=UTC)) == "Nov 7"
    assert day(datetime(2026, 3, 17, tzinfo=UTC)) == "Mar 17"
    assert day(None) == "an unknown date"


@pytest.mark.parametrize(
    ("minutes", "text"),
    [(15, "15 minutes"), (60, "1 hour"), (240, "4 hours"), (1440, "1 day"), (2880, "2 days")],
)
def test_sla_text(minutes: int, text: str) -> None:
    assert sla_text(minutes) == text


def test_order_choices_are_joined_for_speech() -> None:
    two_items = dataclasses.replace(HEADPHONES, items=HEADPHONES.items + KETTLE.items + SHOES.items)

    assert order_choice_label(two_items) == "4517 (Wireless headphones and 2 more items, delivered Mar 17)"
    assert order_choice_label(SHOES) == "4600 (Running shoes, placed Mar 18)"
    assert join_choices(["a"]) == "a"
    assert join_choices(["a", "b", "c"]) == "a, b or c"
    assert join_choices([]) == ""


async def test_a_protected_topic_hands_off_at_high_priority_in_the_embedded_engine_too() -> None:
    chat = start(HEADPHONES)
    reply = await chat.send("Refund order 4517 or I will take this to court")
    assert chat.business.mutations == 0
    assert chat.ctx.owner.startswith("queue:")
    assert chat.work.events_of("protected_topic") == [{"topic": "legal"}]
    assert [h.priority for h in chat.work.handoffs] == ["high"]
    assert reply.startswith(render("protected_topic"))


async def test_protected_topics_are_configurable() -> None:
    chat = start(HEADPHONES, config=CoreConfig(protected_topics=(("press", r"\bjournalist\b"),)))
    await chat.send("I'm a journalist writing about your refunds")
    assert chat.work.events_of("protected_topic") == [{"topic": "press"}]
    other = start(HEADPHONES, config=CoreConfig(protected_topics=()))
    await other.send("I will sue you")
    assert other.work.events_of("protected_topic") == []


async def test_a_caller_id_only_claims_even_with_full_attestation_and_the_greeting_names_nobody() -> None:
    business = FakeBusiness([ANA], [HEADPHONES])
    service, store, _ = service_for(business)
    plain = await service.open_call("CA1", ANA_PHONE)
    attested = await service.open_call("CA2", ANA_PHONE, caller_attested=True)

    assert plain.texts == attested.texts == ["Thanks for calling. How can I help you today?"]
    identities = [store.conversations[(Channel.VOICE, sid)].identity for sid in ("CA1", "CA2")]
    assert [(i.level, i.method, i.claimed_ref) for i in identities] == [
        (IdentityLevel.CLAIMED, "caller_id", "C1"),
        (IdentityLevel.CLAIMED, "caller_id_attested", "C1"),
    ]


async def test_a_signed_whatsapp_from_the_number_on_file_verifies_and_an_unsigned_one_only_claims() -> None:
    business = FakeBusiness([ANA], [HEADPHONES])
    service, store, _ = service_for(business)
    await service.handle_text(Channel.WHATSAPP, ANA_PHONE, "hi", channel_signed=True)
    await service.handle_text(Channel.SMS, ANA_PHONE, "hi")
    signed = store.conversations[(Channel.WHATSAPP, ANA_PHONE)]
    unsigned = store.conversations[(Channel.SMS, ANA_PHONE)]
    assert (signed.identity.level, signed.identity.method) == (IdentityLevel.VERIFIED, "whatsapp_signed")
    assert (unsigned.identity.level, unsigned.identity.method) == (IdentityLevel.CLAIMED, "sms_unsigned")
    assert unsigned.customer_ref is None


@pytest.mark.parametrize(
    ("text", "asks"),
    [
        ("you can find me under 555 010 2030", False),
        ("look me up with 5550102030", False),
        ("it's listed under dana@example.com", False),
        ("my number is 5550102030 and I want a refund for my headphones", True),
    ],
)
def test_a_message_that_only_says_who_the_customer_is_asks_for_nothing_else(text: str, asks: bool) -> None:
    from pipeline.turn_identity import _has_request  # noqa: PLC0415 - the rule under test

    assert _has_request(text) is asks
