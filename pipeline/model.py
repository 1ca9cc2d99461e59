"""Plain data the conversation core works with.

Everything here is a frozen or simple dataclass with no I/O, so the core can be
tested with plain fakes. Money is always integer minor units (cents) plus an ISO
currency code; times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Channel(StrEnum):
    """Where a conversation happens."""

    WHATSAPP = "whatsapp"
    SMS = "sms"
    WEBCHAT = "webchat"
    VOICE = "voice"


class OrderStatus(StrEnum):
    PLACED = "placed"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"
    RETURNED = "returned"


class TicketStatus(StrEnum):
    OPEN = "open"
    PENDING = "pending"
    RESOLVED = "resolved"
    CLOSED = "closed"


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"


class IntentPolicy(StrEnum):
    """May the AI act alone, or must the customer confirm first."""

    AUTONOMOUS = "autonomous"
    CONFIRM = "confirm"


@dataclass(frozen=True)
class Customer:
    """A customer as the business system knows them. ``ref`` is the system's id as text."""

    ref: str
    name: str
    phone: str | None = None
    email: str | None = None
    whatsapp_id: str | None = None

    @property
    def first_name(self) -> str:
        return self.name.split()[0] if self.name else ""


@dataclass(frozen=True)
class OrderItem:
    sku: str
    name: str
    quantity: int
    unit_cents: int


@dataclass(frozen=True)
class Order:
    """An order. ``number`` is the customer-facing order number (digits as text)."""

    number: str
    customer_ref: str
    items: tuple[OrderItem, ...]
    amount_cents: int
    currency: str
    status: OrderStatus
    placed_at: datetime
    shipped_at: datetime | None = None
    delivered_at: datetime | None = None
    cancelled_at: datetime | None = None
    returned_at: datetime | None = None
    refunded_cents: int = 0
    tracking_code: str | None = None

    @property
    def title(self) -> str:
        """A short human description: the first item name plus a count of the rest."""
        if not self.items:
            return f"order {self.number}"
        first = self.items[0].name
        rest = len(self.items) - 1
        return first if rest == 0 else f"{first} and {rest} more item{'s' if rest > 1 else ''}"


@dataclass(frozen=True)
class Refund:
    order_number: str
    amount_cents: int
    currency: str
    provider_ref: str
    created_at: datetime
    already_existed: bool = False


@dataclass(frozen=True)
class ReturnLabel:
    order_number: str
    code: str
    url: str
    warehouse_notified_at: datetime | None
    already_existed: bool = False


@dataclass(frozen=True)
class Balance:
    customer_ref: str
    amount_cents: int
    currency: str


@dataclass(frozen=True)
class Intent:
    """An intent as configured by an admin. Intents are data, not code.

    Attributes:
        name: unique identifier, e.g. ``refund``.
        description: one line for admins and for clarifying questions.
        examples: example utterances the embedded engine matches against.
        action: which business action runs (``refund``, ``cancel_order``, ``faq`` ...).
        required_slots: slots that must be filled before the action runs.
        policy: ``autonomous`` or ``confirm`` (ask the customer before acting).
        queue: queue that receives escalations of this intent.
        priority: ticket priority for escalations of this intent.
        sla_first_response_minutes: SLA for the first human response.
        sla_resolution_minutes: SLA for resolution.
        answer: reply text for ``faq`` intents.
        enabled: disabled intents are never matched.
        identity: the identity level account actions of this intent need (``claimed`` lets
            order status be told on caller ID alone); money actions always need ``verified``.
    """

    name: str
    description: str = ""
    examples: tuple[str, ...] = ()
    action: str = "faq"
    required_slots: tuple[str, ...] = ()
    policy: IntentPolicy = IntentPolicy.AUTONOMOUS
    queue: str = "support"
    priority: Priority = Priority.NORMAL
    sla_first_response_minutes: int = 60
    sla_resolution_minutes: int = 1440
    answer: str | None = None
    enabled: bool = True
    identity: str = "verified"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["examples"] = list(self.examples)
        data["required_slots"] = list(self.required_slots)
        data["policy"] = str(self.policy)
        data["priority"] = str(self.priority)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Intent:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown intent field(s): {', '.join(sorted(unknown))}")
        if not data.get("name"):
            raise ValueError("intent needs a name")
        values = dict(data)
        values["examples"] = tuple(str(e) for e in values.get("examples") or ())
        values["required_slots"] = tuple(str(s) for s in values.get("required_slots") or ())
        values["policy"] = IntentPolicy(values.get("policy", IntentPolicy.AUTONOMOUS))
        values["priority"] = Priority(values.get("priority", Priority.NORMAL))
        values["identity"] = str(values.get("identity") or "verified")
        if values["identity"] not in ("claimed", "verified"):
            raise ValueError("identity must be 'claimed' or 'verified'")
        return cls(**values)


@dataclass(frozen=True)
class IntentMatch:
    """Result of classifying one utterance."""

    intent: str | None
    score: float
    runner_up: str | None = None
    runner_up_score: float = 0.0

    @property
    def matched(self) -> bool:
        return self.intent is not None


@dataclass
class Slots:
    """What slot extraction found in one utterance. ``None`` means not present."""

    order_number: str | None = None
    confirmation: bool | None = None  # yes -> True, no -> False
    amount_cents: int | None = None
    date: str | None = None  # ISO date
    phone: str | None = None
    email: str | None = None
    ordinal: int | None = None  # "the first one" -> 1, "the second" -> 2, "the last" -> -1
    wants_person: bool = False


@dataclass(frozen=True)
class Ticket:
    id: int
    protocol: str
    status: TicketStatus
    priority: Priority
    queue: str
    owner: str | None
    subject: str
    summary: str
    customer_ref: str | None
    conversation_id: int | None
    first_response_due: datetime | None
    resolution_due: datetime | None
    next_step: str | None = None
    next_step_due: datetime | None = None


@dataclass(frozen=True)
class OutboundText:
    """A text the system sends outside the request/response flow (label link, follow-up)."""

    channel: Channel
    to: str
    body: str
    kind: str = "notice"
    conversation_id: int | None = None  # set when the text is also in a transcript
    seq: int | None = None


@dataclass(frozen=True)
class SendResult:
    provider_ref: str
    channel_used: Channel
    detail: str = ""


@dataclass
class ConversationState:
    """Mutable state of one conversation, stored as JSON between turns."""

    intent: str | None = None
    awaiting: str | None = None  # what the last bot turn asked for
    slots: dict[str, Any] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)  # order numbers offered as choices
    misses: int = 0
    touched: list[dict[str, str]] = field(default_factory=list)  # business objects acted on
    done: list[str] = field(default_factory=list)  # human-readable actions completed
    pending: str | None = None  # what still has to happen
    context_order: str | None = None  # order the conversation is about (e.g. from a call greeting)
    caller_phone: str | None = None  # the number a voice caller rang from (for texting labels)
    frustrated_turns: int = 0  # customer turns that read as annoyed or angry
    priority_floor: str | None = None  # escalations of this conversation get at least this priority
    llm_turns: int = 0  # turns answered by the LLM engine (limited per conversation)
    llm_tool_calls: int = 0  # tool calls the LLM engine ran (limited per conversation)
    history: list[dict[str, str]] = field(default_factory=list)  # recent customer/bot texts (LLM context)
    code_pending: bool = False  # a one-time code was sent and not yet given back
    # Cross-turn redaction memory (pipeline.turn_redaction): payment context, card-fragment
    # positions and Luhn partial sums. Stored as JSON, so it never holds digits.
    redaction: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ConversationState:
        if not data:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def touch(self, kind: str, ref: str) -> None:
        item = {"kind": kind, "ref": ref}
        if item not in self.touched:
            self.touched.append(item)
