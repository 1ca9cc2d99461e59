"""Reply templates of the embedded engine, and the formatting they use.

Replies are built only from these templates and data, so what the customer is told is
predictable, reviewable and reconstructible. Keep them short: they are also spoken on calls.
"""

from __future__ import annotations

from datetime import datetime
from string import Formatter
from typing import Any

from pipeline.model import Order, OrderStatus

_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}


def money(cents: int, currency: str) -> str:
    """``money(8900, "USD") -> "$89.00"``."""
    symbol = _SYMBOLS.get(currency.upper())
    amount = f"{cents / 100:,.2f}"
    return f"{symbol}{amount}" if symbol else f"{amount} {currency.upper()}"


def day(when: datetime | None) -> str:
    """``Nov 17``: short and speakable."""
    if when is None:
        return "an unknown date"
    return f"{when:%b} {when.day}"


def spoken_day(when: datetime | None, now: datetime) -> str:
    """``today``, ``yesterday``, ``on Tuesday`` within a week, else ``on Nov 17``."""
    if when is None:
        return "recently"
    days = (now.date() - when.date()).days
    if days == 0:
        return "today"
    if days == 1:
        return "yesterday"
    if 1 < days < 7:
        return f"on {when:%A}"
    return f"on {day(when)}"


TEMPLATES: dict[str, str] = {
    # greetings and small talk
    "greeting": "Hi{name_part}! I can check, cancel or refund an order, send a return label, or tell you your balance. What can I do for you?",
    "goodbye": "Thanks for contacting us{name_part}. Have a great day!",
    "clarify": "Sorry, I didn't quite get that. I can check an order, cancel it, refund it, send a return label, or tell you your balance. What would you like to do?",
    "clarify_between": "Just to be sure: do you want to {option_a}, or {option_b}?",
    # phone calls
    "call_greeting_unknown": "Thanks for calling. How can I help you today?",
    "call_greeting_known": "Hi {first_name}, thanks for calling. How can I help you today?",
    "call_greeting_order": "Hi {first_name}, I see order {number} {verb} {when}. Is this about that order?",
    "context_order_yes": "Sure. What would you like to do about order {number}: check on it, return it, or get a refund?",
    "context_order_no": "No problem. What can I help you with?",
    "reprompt": "Are you still there?",
    "say_again": "Sorry, could you say that again?",
    "one_moment": "One moment, please.",
    "systems_down": "Sorry, I can't reach our systems right now. Please try again in a few minutes, or write to us in the chat.",
    "silence_goodbye": "I haven't heard anything, so I'll end the call now. Goodbye!",
    "drain_goodbye": "I'm sorry, I have to end this call now. Everything we did is saved, so please call back and we'll pick up where we left off. Goodbye!",
    "max_duration_goodbye": "We've reached the time limit for this call, so I'll end it now. Please call back or write to us any time. Goodbye!",
    # identification
    "ask_identity": "To help with that I need to find your account. What's the phone number or email on your account?",
    "identity_not_found": "I couldn't find an account with that {kind}. Could you check it, or give me the email or phone number you used when ordering?",
    "identified": "Thanks {first_name}, I found your account.",
    # verification (the same words whether or not the contact is on an account)
    "code_sent": "Thanks. If that {kind} is on an account, I've sent it a 6-digit code. Please {how} to continue.",
    "step_up_code_sent": "Before I can do that, I need to make sure it's you. I've sent a 6-digit code to the phone on your account. Please {how}.",
    "code_pending": "I'll be glad to help with that once you're verified. Please {how}, or ask for a new code.",
    "code_wrong": "That code doesn't match. Please try again.",
    "code_expired": "That code has expired or was replaced. Ask for a new code and I'll send another.",
    "code_locked": "That's too many wrong codes, so I can't verify you here. I can connect you with a person who can help. Would you like that?",
    "code_rate_limited": "I've sent several codes already. Please wait a while before asking for another, or ask for an agent to reach a person.",
    "verified": "Thanks {first_name}, you're verified.",
    "code_text": "Your verification code is {code}. It expires in 10 minutes. Never share it: we will never ask for it except in the conversation you started.",
    # order selection
    "ask_order_choice": "Which order is it: {choices}?",
    "ask_order_number": "Which order is this about? Please give me the order number.",
    "order_not_found": "I couldn't find order {number} on your account. Could you check the number?",
    "no_orders_for": "I don't see any {what} on your account.",
    # order status
    "status_placed": "Order {number} ({title}) was placed on {placed} and hasn't shipped yet.",
    "status_shipped": "Order {number} ({title}) shipped on {shipped}{tracking_part}. It should arrive in 2 to 4 business days.",
    "status_delivered": "Order {number} ({title}) was delivered on {delivered}.",
    "status_cancelled": "Order {number} ({title}) was cancelled on {cancelled}.",
    "status_returned": "Order {number} ({title}) was returned on {returned}.",
    # cancel
    "cancel_confirm": "Order {number} ({title}, {amount}) hasn't shipped yet, so I can cancel it. Shall I cancel it?",
    "cancel_done": "Done: order {number} is cancelled. You won't be charged for it{refund_part}.",
    "cancel_refused_shipped": "Order {number} already shipped on {shipped}, so it can't be cancelled any more. Once it arrives you can return it for a refund within {window_days} days.",
    "cancel_refused_delivered": "Order {number} was already delivered on {delivered}, so it can't be cancelled. I can refund it or send you a return label instead.",
    "cancel_refused_other": "Order {number} is already {status}, so there's nothing to cancel.",
    "cancel_kept": "Okay, I've left order {number} as it is.",
    # refund
    "refund_confirm": "Order {number} ({title}) was delivered on {delivered}, within our {window_days}-day window. I can refund {amount} to your original payment method and text you a return label. Shall I go ahead?",
    "refund_done": "Done: {amount} is refunded for order {number} (reference {refund_ref}); it shows on your statement in 3 to 5 business days. I've texted you a return label, code {label_code}. Ticket {ticket} is resolved, and I'll check in with you in {followup_hours} hours.",
    "refund_refused_outside_window": "Order {number} was delivered on {delivered}, {days} days ago, which is outside our {window_days}-day refund window, so I can't refund it myself. Would you like me to pass this to a person on our billing team?",
    "refund_refused_already_refunded": "Order {number} has already been refunded ({amount}). Is there anything else I can help with?",
    "refund_refused_not_delivered": "Order {number} is {status}, and refunds are for delivered orders.{hint}",
    "refund_refused_over_limit": "A refund of {amount} needs a person to approve it. Would you like me to pass this to our billing team?",
    "refund_kept": "Okay, no refund. Is there anything else I can help with?",
    # return label
    "label_done": "I've texted you a return label for order {number} (code {label_code}) and let our warehouse know it's coming back.",
    "label_refused": "Order {number} is {status}; return labels are for delivered orders.",
    # balance
    "balance": "Your account balance is {amount}.",
    # tickets and handoff
    "ask_problem": "I'm sorry to hear that. Please describe the problem in a sentence or two and I'll open a ticket.",
    "ticket_opened": "I've opened ticket {ticket} for you. Our {queue} team will get back to you within {sla}.",
    "handoff": "I've passed this to our {queue} team with a summary, so you won't need to repeat yourself. Your ticket is {ticket}; someone will reply here within {sla}.",
    "handoff_closed": "Our team is available from {opens} ({zone}); we've opened ticket {ticket} and someone will get back to you then.",
    "handoff_closed_call": "Our team is available from {opens} ({zone}); we've opened ticket {ticket} and someone will call you back then.",
    "handoff_pending": "Your request is with our {queue} team (ticket {ticket}). I've added your message to it; someone will reply here shortly.",
    "offer_declined": "Okay. Is there anything else I can help with?",
    "frustration_offer": "I'm sorry this has been frustrating. Would you like me to connect you with a person?",
    "protected_topic": "That's something a member of our team needs to handle personally.",
    # follow-up and label texts
    "label_text": "Your return label for order {number}: {label_url} (code {label_code}). Print it and drop the parcel at any carrier point within 14 days.",
    "followup_refund": "Hi {first_name}, checking in on order {number}: your refund of {amount} was issued on {refunded_on}. Has the return been sent, and did the refund arrive? Reply here if anything isn't right.",
}

_FIELDS = {key: {f for _, f, _, _ in Formatter().parse(text) if f} for key, text in TEMPLATES.items()}


def render(key: str, **values: Any) -> str:
    """Render template ``key``; a missing value is a programming error and raises KeyError."""
    missing = _FIELDS[key] - values.keys()
    if missing:
        raise KeyError(f"template {key!r} needs {sorted(missing)}")
    return TEMPLATES[key].format(**values)


def order_values(order: Order) -> dict[str, Any]:
    """The values every order template may use."""
    return {
        "number": order.number,
        "title": order.title,
        "amount": money(order.amount_cents, order.currency),
        "status": str(order.status),
        "placed": day(order.placed_at),
        "shipped": day(order.shipped_at),
        "delivered": day(order.delivered_at),
        "cancelled": day(order.cancelled_at),
        "returned": day(order.returned_at),
        "tracking_part": f", tracking {order.tracking_code}" if order.tracking_code else "",
    }


def order_choice_label(order: Order) -> str:
    """``4517 (Wireless headphones, delivered Nov 17)``."""
    when = {
        OrderStatus.PLACED: f"placed {day(order.placed_at)}",
        OrderStatus.SHIPPED: f"shipped {day(order.shipped_at)}",
        OrderStatus.DELIVERED: f"delivered {day(order.delivered_at)}",
        OrderStatus.CANCELLED: f"cancelled {day(order.cancelled_at)}",
        OrderStatus.RETURNED: f"returned {day(order.returned_at)}",
    }[order.status]
    return f"{order.number} ({order.title}, {when})"


def join_choices(labels: list[str]) -> str:
    if len(labels) <= 1:
        return "".join(labels)
    return ", ".join(labels[:-1]) + " or " + labels[-1]


def sla_text(minutes: int) -> str:
    if minutes < 60:
        return f"{minutes} minutes"
    if minutes < 60 * 24:
        hours = round(minutes / 60)
        return f"{hours} hour{'s' if hours != 1 else ''}"
    days = round(minutes / (60 * 24))
    return f"{days} day{'s' if days != 1 else ''}"


def opening_time(when: datetime) -> str:
    """``Monday 9:00``: the weekday and the time of a queue's next opening, in its own zone."""
    return f"{when:%A} {when.hour}:{when.minute:02d}"
