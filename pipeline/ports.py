"""The ports the conversation core needs. Adapters in ``crm_bridge`` and ``telephony`` implement them.

The core never imports an adapter; ``server.py`` wires concrete pieces together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from pipeline.identity import CodeCheck, CodeIssue
from pipeline.model import (
    Balance,
    Channel,
    Customer,
    Intent,
    IntentMatch,
    Order,
    OutboundText,
    Refund,
    ReturnLabel,
    SendResult,
    Ticket,
)


class BusinessError(Exception):
    """Base of errors a business system raises. ``code`` is stable and machine readable."""

    code = "business_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class NotFound(BusinessError):
    code = "not_found"


class ActionRefused(BusinessError):
    """The business object is in a state that does not allow the action (e.g. cancel a shipped order)."""

    code = "action_refused"


class ProviderUnavailable(BusinessError):
    """The business system could not be reached or answered 5xx; the action may be retried."""

    code = "provider_unavailable"
    retryable = True


class StoreUnavailable(Exception):
    """The conversation store cannot be reached (the database restarts, an outage): nothing of the
    turn was written, and the same turn (same external id) may be tried again."""


@runtime_checkable
class Clock(Protocol):
    def now(self) -> datetime:
        """Current time, timezone-aware UTC."""
        ...


@runtime_checkable
class BusinessSystem(Protocol):
    """The business system of record: customers, orders, payments, refunds, returns.

    The built-in CRM implements it on PostgreSQL; ``crm_bridge.rest_adapter`` implements it
    over a generic REST/JSON API. Every mutating call is idempotent: issuing a refund twice
    for one order returns the first refund with ``already_existed=True``.
    """

    async def find_customer(
        self,
        *,
        phone: str | None = None,
        whatsapp_id: str | None = None,
        email: str | None = None,
    ) -> Customer | None: ...

    async def get_customer(self, ref: str) -> Customer | None: ...

    async def list_orders(self, customer_ref: str) -> Sequence[Order]: ...

    async def get_order(self, number: str) -> Order | None: ...

    async def cancel_order(self, number: str, *, now: datetime) -> Order:
        """Cancel a placed order. Raises ActionRefused when it has shipped, NotFound when unknown."""
        ...

    async def issue_refund(
        self, number: str, *, amount_cents: int, reason: str, idempotency_key: str, now: datetime
    ) -> Refund:
        """Refund an order at most once. Eligibility is checked by the caller's policy code."""
        ...

    async def create_return_label(self, number: str, *, now: datetime) -> ReturnLabel:
        """Create (or return the existing) return label and notify the warehouse."""
        ...

    async def get_balance(self, customer_ref: str) -> Balance: ...


@runtime_checkable
class TextSender(Protocol):
    """Sends a text outside a request/response exchange (SMS, WhatsApp, web-chat push)."""

    async def send(self, message: OutboundText) -> SendResult: ...


@runtime_checkable
class IntentClassifier(Protocol):
    """Maps an utterance to the nearest configured intent, or to no intent."""

    def load(self, intents: Sequence[Intent]) -> None:
        """Replace the intents it knows (called at start and after every admin change)."""
        ...

    def classify(self, text: str) -> IntentMatch: ...


class VerificationCodes(Protocol):
    """Keeps one-time codes (hashed), their attempts, expiry and rate limits.

    Writes commit on their own, outside the turn's transaction: an attempt counts even when
    the turn that made it fails.
    """

    async def issue(
        self,
        *,
        conversation_id: int,
        customer_ref: str | None,
        client: str | None,
        channel: str | None,
        now: datetime,
    ) -> CodeIssue:
        """A new code for the conversation (earlier ones stop working). ``customer_ref`` None:
        the contact matched no account; the attempt is recorded and rate limited all the same,
        and no code is returned (nothing is sent)."""
        ...

    async def check(self, *, conversation_id: int, code: str, now: datetime) -> CodeCheck: ...


class TurnWork(Protocol):
    """Durable side effects of one turn, written together with the turn when it commits.

    Whatever the turn manager records here commits together with the transcript of the turn,
    so a crash can never leave a reply without its ticket, or a ticket without its turn; a turn
    that is run again after a conflict writes only what its last attempt recorded. Ids returned
    here (a ticket's id and protocol, an outbox row's id) are final as soon as they are returned.
    """

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
    ) -> Ticket: ...

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
    ) -> Ticket: ...

    async def get_ticket(self, ticket_id: int) -> Ticket | None: ...

    async def schedule_followup(
        self, *, channel: Channel, address: str, body: str, due_at: datetime, ticket_id: int | None, key: str
    ) -> int: ...

    async def queue_text(self, message: OutboundText) -> int:
        """Put a text in the outbox; it is sent after the turn commits (and retried until sent)."""
        ...

    async def queue_private_text(self, message: OutboundText) -> int:
        """Like :meth:`queue_text` for a text that must stay out of the transcript (a one-time
        code goes to the contact on file, never into the conversation it verifies)."""
        ...

    async def request_handoff(
        self,
        *,
        queue: str,
        priority: str,
        ticket_id: int,
        callback_phone: str | None = None,
        callback_due: datetime | None = None,
    ) -> None:
        """Put the conversation in ``queue`` to wait for an agent (at most one open handoff per
        conversation: asking again while one is waiting changes nothing). With ``callback_due``
        (a caller whose queue is closed) a call back to ``callback_phone`` is also promised then."""
        ...

    async def record_event(self, kind: str, data: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class HandoffRoute:
    """Where a handoff raised now waits, by the queues' business hours.

    Attributes:
        queue: the queue the handoff goes to (the asked one, or its open overflow queue).
        overflowed_from: the asked queue when it was closed and ``queue`` is its overflow.
        opens_at: set when ``queue`` is closed now and no overflow is open: its next opening,
            in the queue's own time zone.
        zone: the queue's time zone as a customer reads it ("New York time").
    """

    queue: str
    overflowed_from: str | None = None
    opens_at: datetime | None = None
    zone: str = ""


class QueueHours(Protocol):
    """The queues' business hours, as the core needs them when it hands a conversation off."""

    async def route_handoff(self, queue: str, at: datetime) -> HandoffRoute: ...
