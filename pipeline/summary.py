"""The three-line handoff summary: who, what they want, what was done and what is pending.

Built from conversation state only (deterministic), so an agent reads the same summary a
supervisor later finds on the ticket.
"""

from __future__ import annotations

from pipeline.model import Channel, ConversationState, Customer, Intent

_CHANNEL_NAMES = {
    Channel.WHATSAPP: "WhatsApp",
    Channel.SMS: "SMS",
    Channel.WEBCHAT: "web chat",
    Channel.VOICE: "a phone call",
}

_WANTS = {
    "refund": "a refund",
    "cancel_order": "to cancel an order",
    "order_status": "the status of an order",
    "return_label": "a return label",
    "account_balance": "their account balance",
    "open_ticket": "to report a problem",
    "handoff": "to talk to a person",
    "faq": "information",
}


def three_line_summary(
    *,
    customer: Customer | None,
    channel: Channel,
    intent: Intent | None,
    state: ConversationState,
    reason: str,
) -> str:
    """Return exactly three lines: ``Who: ...``, ``Wants: ...``, ``Status: ...``."""
    where = _CHANNEL_NAMES.get(channel, str(channel))
    if customer is not None:
        who = f"Who: {customer.name} (customer {customer.ref}) on {where}."
    else:
        who = f"Who: unidentified customer on {where}."

    wants = _WANTS.get(intent.action, intent.description or intent.name) if intent else "not clear yet"
    order = state.slots.get("order_number")
    if order:
        wants += f" for order {order}"
    wants_line = f"Wants: {wants}."

    done = "; ".join(state.done) if state.done else "nothing yet"
    pending = state.pending or "a person to take over"
    status_line = f"Status: done: {done}. Pending: {pending}. Handoff reason: {reason}."
    return "\n".join((who, wants_line, status_line))
