"""Plain in-memory fakes of the conversation core's ports, for fast unit tests.

- :class:`FakeBusiness` implements :class:`pipeline.ports.BusinessSystem` over dicts and keeps
  the rules the real systems keep: one refund per order, one return label per order, cancel
  only a placed order. It counts every call and can be told to fail.
- :class:`FakeWork` implements :class:`pipeline.ports.TurnWork` by appending to lists.
- :class:`KeywordClassifier` implements :class:`pipeline.ports.IntentClassifier` with keyword
  rules, so scenario tests do not depend on the embedding model.
- :class:`FakeConversationStore` implements :class:`pipeline.service.ConversationStore` with
  commit-at-exit and savepoint rollback, like the PostgreSQL store.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.identity import CODE_ATTEMPTS, CodeCheck, CodeIssue, Identity, new_code
from pipeline.model import (
    Balance,
    Channel,
    ConversationState,
    Customer,
    Intent,
    IntentMatch,
    Order,
    OrderItem,
    OrderStatus,
    OutboundText,
    Priority,
    Refund,
    ReturnLabel,
    Ticket,
    TicketStatus,
)
from pipeline.ports import ActionRefused, BusinessError, NotFound, TurnWork
from pipeline.service import StoredMessage, TurnConflict
from pipeline.turn_manager import TurnContext

INTENTS_FILE = Path(__file__).resolve().parents[2] / "intents.yaml"


def load_intents(path: Path = INTENTS_FILE) -> list[Intent]:
    """The seed intents of ``intents.yaml``, read with :meth:`Intent.from_dict`."""
    with path.open(encoding="utf-8") as f:
        return [Intent.from_dict(item) for item in yaml.safe_load(f)]


def make_order(
    number: str,
    customer: Customer,
    *items: tuple[str, int],
    status: OrderStatus,
    placed_at: datetime,
    shipped_at: datetime | None = None,
    delivered_at: datetime | None = None,
    cancelled_at: datetime | None = None,
    returned_at: datetime | None = None,
    refunded_cents: int = 0,
    tracking_code: str | None = None,
    currency: str = "USD",
) -> Order:
    """An order of ``customer`` whose items are ``(name, unit_cents)`` pairs, quantity 1."""
    lines = tuple(
        OrderItem(sku=f"SKU-{i}", name=name, quantity=1, unit_cents=cents)
        for i, (name, cents) in enumerate(items)
    )
    return Order(
        number=number,
        customer_ref=customer.ref,
        items=lines,
        amount_cents=sum(line.unit_cents for line in lines),
        currency=currency,
        status=status,
        placed_at=placed_at,
        shipped_at=shipped_at,
        delivered_at=delivered_at,
        cancelled_at=cancelled_at,
        returned_at=returned_at,
        refunded_cents=refunded_cents,
        tracking_code=tracking_code,
    )


# --------------------------------------------------------------------------------------
# business system


class FakeBusiness:
    """In-memory :class:`~pipeline.ports.BusinessSystem`.

    Attributes:
        customers: by ref.
        orders: by order number; mutated (replaced) by cancel and refund.
        refunds: the one refund of each order, by order number.
        labels: the one return label of each order, by order number.
        calls: how often each method was called, by method name.
        fail_with: when set, methods in ``fail_on`` (all methods when empty) raise it.
    """

    def __init__(
        self,
        customers: Sequence[Customer] = (),
        orders: Sequence[Order] = (),
        balances: Sequence[Balance] = (),
    ) -> None:
        self.customers: dict[str, Customer] = {c.ref: c for c in customers}
        self.orders: dict[str, Order] = {o.number: o for o in orders}
        self.balances: dict[str, Balance] = {b.customer_ref: b for b in balances}
        self.refunds: dict[str, Refund] = {}
        self.labels: dict[str, ReturnLabel] = {}
        self.refund_requests: list[dict[str, Any]] = []
        self.calls: Counter[str] = Counter()
        self.fail_with: BusinessError | None = None
        self.fail_on: set[str] = set()

    @property
    def mutations(self) -> int:
        """Calls that could change a business object."""
        return self.calls["cancel_order"] + self.calls["issue_refund"] + self.calls["create_return_label"]

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self.fail_with is not None and (not self.fail_on or method in self.fail_on):
            raise self.fail_with

    async def find_customer(
        self, *, phone: str | None = None, whatsapp_id: str | None = None, email: str | None = None
    ) -> Customer | None:
        self._enter("find_customer")
        for customer in self.customers.values():
            if phone and customer.phone == phone:
                return customer
            if whatsapp_id and customer.whatsapp_id == whatsapp_id:
                return customer
            if email and customer.email and customer.email.lower() == email.lower():
                return customer
        return None

    async def get_customer(self, ref: str) -> Customer | None:
        self._enter("get_customer")
        return self.customers.get(ref)

    async def list_orders(self, customer_ref: str) -> Sequence[Order]:
        self._enter("list_orders")
        return [o for o in self.orders.values() if o.customer_ref == customer_ref]

    async def get_order(self, number: str) -> Order | None:
        self._enter("get_order")
        return self.orders.get(number)

    async def cancel_order(self, number: str, *, now: datetime) -> Order:
        self._enter("cancel_order")
        order = self.orders.get(number)
        if order is None:
            raise NotFound(f"order {number} not found")
        if order.status == OrderStatus.CANCELLED:
            return order  # idempotent, like the built-in CRM
        if order.status != OrderStatus.PLACED:
            raise ActionRefused(f"order {number} is {order.status}", code=f"order_{order.status}")
        order = dataclasses.replace(order, status=OrderStatus.CANCELLED, cancelled_at=now)
        self.orders[number] = order
        return order

    async def issue_refund(
        self, number: str, *, amount_cents: int, reason: str, idempotency_key: str, now: datetime
    ) -> Refund:
        self._enter("issue_refund")
        self.refund_requests.append(
            {
                "number": number,
                "amount_cents": amount_cents,
                "reason": reason,
                "idempotency_key": idempotency_key,
            }
        )
        order = self.orders.get(number)
        if order is None:
            raise NotFound(f"order {number} not found")
        if number in self.refunds:
            return dataclasses.replace(self.refunds[number], already_existed=True)
        if not 0 < amount_cents <= order.amount_cents:
            raise ActionRefused(
                f"refund amount must be between 1 and {order.amount_cents}", code="bad_amount"
            )
        refund = Refund(
            order_number=number,
            amount_cents=amount_cents,
            currency=order.currency,
            provider_ref=f"RF-{len(self.refunds) + 1:04d}",
            created_at=now,
        )
        self.refunds[number] = refund
        self.orders[number] = dataclasses.replace(order, refunded_cents=amount_cents)
        return refund

    async def create_return_label(self, number: str, *, now: datetime) -> ReturnLabel:
        self._enter("create_return_label")
        if number not in self.orders:
            raise NotFound(f"order {number} not found")
        if number in self.labels:
            return dataclasses.replace(self.labels[number], already_existed=True)
        code = f"RL-{len(self.labels) + 1:04d}"
        label = ReturnLabel(
            order_number=number,
            code=code,
            url=f"https://labels.example.test/{code}",
            warehouse_notified_at=now,
        )
        self.labels[number] = label
        return label

    async def get_balance(self, customer_ref: str) -> Balance:
        self._enter("get_balance")
        if customer_ref not in self.customers:
            raise NotFound(f"customer {customer_ref} not found")
        return self.balances.get(customer_ref) or Balance(customer_ref, 0, "USD")


# --------------------------------------------------------------------------------------
# turn work


@dataclass(frozen=True)
class Handoff:
    conversation_id: int | None
    queue: str
    priority: str
    ticket_id: int


@dataclass(frozen=True)
class FollowUp:
    id: int
    channel: Channel
    address: str
    body: str
    due_at: datetime
    ticket_id: int | None
    key: str


class FakeWork:
    """In-memory :class:`~pipeline.ports.TurnWork`: tickets ``CL-000001``..., follow-ups, texts, events.

    Args:
        context: the conversation, when tickets should carry its customer and id.
        outbox_ids: a list that receives the id of every queued text (the open turn's list).
        earlier_tickets: tickets of earlier turns, visible to ``get_ticket`` and ``update_ticket``.
    """

    def __init__(
        self,
        context: TurnContext | None = None,
        outbox_ids: list[int] | None = None,
        earlier_tickets: Sequence[Ticket] = (),
    ) -> None:
        self.context = context
        self.outbox_ids = outbox_ids if outbox_ids is not None else []
        self._earlier = {t.id: t for t in earlier_tickets}
        self.tickets: dict[int, Ticket] = {}
        self.ticket_notes: list[tuple[int, str]] = []
        self.followups: list[FollowUp] = []
        self.texts: list[OutboundText] = []
        self.private_texts: list[OutboundText] = []  # one-time codes: never in the transcript
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.handoffs: list[Handoff] = []
        self._next_ticket = max(self._earlier, default=0) + 1

    def event_kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [data for k, data in self.events if k == kind]

    async def open_ticket(
        self,
        *,
        subject: str,
        summary: str,
        queue: str,
        priority: str,
        first_response_due: datetime | None,
        resolution_due: datetime | None,
        status: str = "open",
        owner: str | None = None,
        next_step: str | None = None,
        next_step_due: datetime | None = None,
    ) -> Ticket:
        ticket_id = self._next_ticket
        self._next_ticket += 1
        ctx = self.context
        ticket = Ticket(
            id=ticket_id,
            protocol=f"CL-{ticket_id:06d}",
            status=TicketStatus(status),
            priority=Priority(priority),
            queue=queue,
            owner=owner,
            subject=subject,
            summary=summary,
            customer_ref=ctx.customer.ref if ctx and ctx.customer else None,
            conversation_id=ctx.conversation_id if ctx else None,
            first_response_due=first_response_due,
            resolution_due=resolution_due,
            next_step=next_step,
            next_step_due=next_step_due,
        )
        self.tickets[ticket_id] = ticket
        self.events.append(("ticket_opened", {"ticket": ticket.protocol, "queue": queue, "status": status}))
        return ticket

    async def update_ticket(
        self,
        ticket_id: int,
        *,
        status: str | None = None,
        owner: str | None = None,
        summary: str | None = None,
        next_step: str | None = None,
        next_step_due: datetime | None = None,
        note: str | None = None,
        priority: str | None = None,
    ) -> Ticket:
        ticket = self.tickets.get(ticket_id) or self._earlier.get(ticket_id)
        if ticket is None:
            raise LookupError(f"ticket {ticket_id} not found")
        changes: dict[str, Any] = {
            "priority": Priority(priority) if priority else None,
            "status": TicketStatus(status) if status else None,
            "owner": owner,
            "summary": summary,
            "next_step": next_step,
            "next_step_due": next_step_due,
        }
        ticket = dataclasses.replace(ticket, **{k: v for k, v in changes.items() if v is not None})
        self.tickets[ticket_id] = ticket
        if note:
            self.ticket_notes.append((ticket_id, note))
        return ticket

    async def get_ticket(self, ticket_id: int) -> Ticket | None:
        return self.tickets.get(ticket_id) or self._earlier.get(ticket_id)

    async def schedule_followup(
        self, *, channel: Channel, address: str, body: str, due_at: datetime, ticket_id: int | None, key: str
    ) -> int:
        for existing in self.followups:
            if existing.key == key:  # one follow-up per key, like ON CONFLICT DO NOTHING
                return existing.id
        followup = FollowUp(len(self.followups) + 1, channel, address, body, due_at, ticket_id, key)
        self.followups.append(followup)
        return followup.id

    async def queue_text(self, message: OutboundText) -> int:
        self.texts.append(message)
        text_id = len(self.texts)
        self.outbox_ids.append(text_id)
        return text_id

    async def queue_private_text(self, message: OutboundText) -> int:
        self.private_texts.append(message)
        self.outbox_ids.append(1000 + len(self.private_texts))
        return 1000 + len(self.private_texts)

    async def request_handoff(self, *, queue: str, priority: str, ticket_id: int) -> None:
        Priority(priority)  # the real store refuses an unknown priority too
        # One open handoff per conversation, like the partial unique index.
        if not self.handoffs:
            self.handoffs.append(
                Handoff(self.context.conversation_id if self.context else None, queue, priority, ticket_id)
            )
        self.events.append(("handoff_requested", {"queue": queue, "priority": priority}))

    async def record_event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, dict(data)))

    # savepoints for FakeOpenTurn ------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "tickets": dict(self.tickets),
            "ticket_notes": list(self.ticket_notes),
            "followups": list(self.followups),
            "texts": list(self.texts),
            "events": list(self.events),
            "handoffs": list(self.handoffs),
            "outbox_ids": list(self.outbox_ids),
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self.tickets = snap["tickets"]
        self.ticket_notes = snap["ticket_notes"]
        self.followups = snap["followups"]
        self.texts = snap["texts"]
        self.events = snap["events"]
        self.handoffs = snap["handoffs"]
        self.outbox_ids[:] = snap["outbox_ids"]  # the open turn holds this very list


# --------------------------------------------------------------------------------------
# intent classifier

KEYWORD_RULES: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"refund", "refunded", "money"}), "refund"),
    (frozenset({"cancel"}), "cancel_order"),
    (frozenset({"label", "return"}), "return_label"),
    (frozenset({"where", "status", "track"}), "order_status"),
    (frozenset({"balance", "owe"}), "account_balance"),
    (frozenset({"hours", "open"}), "faq_hours"),
    (frozenset({"problem", "broken", "damaged"}), "open_ticket"),
    (frozenset({"hi", "hello", "hey"}), "greeting"),
    (frozenset({"thanks", "bye", "goodbye"}), "goodbye"),
)


class KeywordClassifier:
    """Deterministic :class:`~pipeline.ports.IntentClassifier`: the first rule with a word of the
    utterance wins (score 1.0); nothing, or an intent that is not loaded, is no match."""

    def __init__(self, rules: Sequence[tuple[frozenset[str], str]] = KEYWORD_RULES) -> None:
        self.rules = tuple(rules)
        self.loaded: list[str] = []
        self.classified: list[str] = []

    def load(self, intents: Sequence[Intent]) -> None:
        self.loaded = [i.name for i in intents]

    def classify(self, text: str) -> IntentMatch:
        self.classified.append(text)
        words = set(re.findall(r"[a-z']+", text.lower()))
        for keywords, intent in self.rules:
            if words & keywords and intent in self.loaded:
                return IntentMatch(intent, 1.0)
        return IntentMatch(None, 0.0)


# --------------------------------------------------------------------------------------
# conversation store


@dataclass
class FakeConversation:
    id: int
    channel: Channel
    address: str
    state: dict[str, Any] = field(default_factory=dict)
    customer_ref: str | None = None
    owner: str = "ai"
    status: str = "open"
    ticket_id: int | None = None
    next_step: str | None = None
    next_step_due: datetime | None = None
    messages: list[StoredMessage] = field(default_factory=list)
    external_ids: set[str] = field(default_factory=set)
    identity: Identity = field(default_factory=Identity)
    version: int = 0  # moves on every commit, like the PostgreSQL row's


class FakeOpenTurn:
    """:class:`pipeline.service.OpenTurn` over a :class:`FakeConversation` copy (committed at exit)."""

    def __init__(self, conv: FakeConversation, ctx: TurnContext, duplicate: bool, work: FakeWork) -> None:
        self.conv = conv
        self.context = ctx
        self.customer_ref = conv.customer_ref
        self.duplicate = duplicate
        self.inbound_seq: int | None = None
        self.outbox_ids = work.outbox_ids
        self.work: TurnWork = work
        self._work = work

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        snap = self._work.snapshot()
        try:
            yield
        except BaseException:
            self._work.restore(snap)
            raise

    def _append(self, sender: str, body: str, kind: str = "message") -> StoredMessage:
        msg = StoredMessage(self.conv.id, len(self.conv.messages) + 1, sender, body, self.context.now, kind)
        self.conv.messages.append(msg)
        return msg

    async def reply(self, texts: Sequence[str]) -> list[StoredMessage]:
        ctx, conv = self.context, self.conv
        for text in self._work.texts:
            self._append("bot", text.body, text.kind)
        stored = [self._append("bot", t) for t in texts]
        conv.state = ctx.state.to_json()
        conv.customer_ref = ctx.customer.ref if ctx.customer else conv.customer_ref
        conv.owner, conv.status, conv.ticket_id = ctx.owner, ctx.status, ctx.ticket_id
        conv.next_step, conv.next_step_due = ctx.next_step, ctx.next_step_due
        conv.identity = ctx.identity
        return stored

    async def duplicate_replies(self) -> list[StoredMessage]:
        return []

    async def rewrite_message(self, seq: int, rewrite: Callable[[str], str]) -> tuple[str, str] | None:
        for i, msg in enumerate(self.conv.messages):
            if msg.seq == seq and msg.sender == "customer":
                new = rewrite(msg.body)
                self.conv.messages[i] = dataclasses.replace(msg, body=new)
                return msg.body, new
        return None


class FakeConversationStore:
    """In-memory :class:`pipeline.service.ConversationStore`.

    Like the PostgreSQL store, a turn works on its own copy of the conversation and commits it
    (inbound message, replies, state, tickets and texts) only when the ``turn`` block exits
    without an exception, and only if no other turn committed the conversation since it was
    read (else :class:`~pipeline.service.TurnConflict`, nothing committed). ``works`` keeps the
    committed :class:`FakeWork` of every turn. ``conflicts``: that many next commits lose as if
    another writer got there first (counted in ``conflicts_raised``).
    """

    def __init__(self) -> None:
        self.conversations: dict[tuple[Channel, str], FakeConversation] = {}
        self.works: list[FakeWork] = []
        self.conflicts = 0
        self.conflicts_raised = 0

    @property
    def all_texts(self) -> list[OutboundText]:
        return [t for w in self.works for t in w.texts]

    @property
    def all_handoffs(self) -> list[Handoff]:
        return [h for w in self.works for h in w.handoffs]

    @property
    def all_tickets(self) -> list[Ticket]:
        """The latest version of every committed ticket."""
        latest: dict[int, Ticket] = {}
        for w in self.works:
            latest.update(w.tickets)
        return list(latest.values())

    @asynccontextmanager
    async def turn(
        self,
        *,
        channel: Channel,
        address: str,
        text: str | None,
        external_id: str | None,
        now: datetime,
        kind: str = "message",
    ) -> AsyncIterator[FakeOpenTurn]:
        key = (channel, address)
        committed = self.conversations.get(key) or FakeConversation(
            len(self.conversations) + 1, channel, address
        )
        conv = copy.deepcopy(committed)
        duplicate = external_id is not None and external_id in conv.external_ids
        ctx = TurnContext(
            conversation_id=conv.id,
            channel=channel,
            address=address,
            now=now,
            state=ConversationState.from_json(conv.state),
            owner=conv.owner,
            status=conv.status,
            ticket_id=conv.ticket_id,
            next_step=conv.next_step,
            next_step_due=conv.next_step_due,
            identity=conv.identity,
        )
        work = FakeWork(ctx, earlier_tickets=self.all_tickets)
        turn = FakeOpenTurn(conv, ctx, duplicate, work)
        if not duplicate:
            if external_id is not None:
                conv.external_ids.add(external_id)
            turn.inbound_seq = turn._append("customer", text).seq
        yield turn
        current = self.conversations.get(key)
        if self.conflicts > 0 or (current is not None and current.version != conv.version):
            self.conflicts = max(0, self.conflicts - 1)
            self.conflicts_raised += 1
            raise TurnConflict(conv.id)
        conv.version += 1
        self.conversations[key] = conv
        self.works.append(work)


class FakeCodes:
    """In-memory :class:`~pipeline.ports.VerificationCodes`: the last code per conversation, in
    clear (a test reads it as the customer would from their phone), with attempts and a limit."""

    def __init__(self, limit: int = 5) -> None:
        self.limit = limit
        self.issued: list[tuple[int, str | None, str | None]] = []  # (conversation, customer, code)
        self._open: dict[int, dict[str, Any]] = {}

    def last_code(self, conversation_id: int = 1) -> str | None:
        return next((c for conv, _, c in reversed(self.issued) if conv == conversation_id), None)

    async def issue(
        self,
        *,
        conversation_id: int,
        customer_ref: str | None,
        client: str | None,
        channel: str | None,
        now: datetime,
    ) -> CodeIssue:
        if sum(1 for conv, _, _ in self.issued if conv == conversation_id) >= self.limit:
            return CodeIssue("rate_limited")
        code = new_code() if customer_ref else None
        self.issued.append((conversation_id, customer_ref, code))
        self._open[conversation_id] = {"ref": customer_ref, "code": code, "attempts": 0}
        return CodeIssue("sent", code=code, channel=channel)

    async def check(self, *, conversation_id: int, code: str, now: datetime) -> CodeCheck:
        entry = self._open.get(conversation_id)
        if entry is None:
            return CodeCheck("none")
        if entry["attempts"] >= CODE_ATTEMPTS:
            return CodeCheck("locked")
        entry["attempts"] += 1
        if entry["code"] is not None and code == entry["code"]:
            del self._open[conversation_id]
            return CodeCheck("ok", customer_ref=entry["ref"])
        left = CODE_ATTEMPTS - entry["attempts"]
        return CodeCheck("wrong" if left > 0 else "locked", attempts_left=left)
