"""One turn's working state (:class:`TurnState`) and the steps every action shares.

The embedded engine's turn is :class:`pipeline.turn.Turn`, built from this base, the identity
steps (:mod:`pipeline.turn_identity`) and the business actions (:mod:`pipeline.turn_actions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from pipeline.model import Channel, Intent, IntentMatch, Order, OrderStatus, OutboundText, Slots
from pipeline.ports import HandoffRoute, TurnWork
from pipeline.summary import three_line_summary
from pipeline.templates import join_choices, opening_time, order_choice_label, render, sla_text
from pipeline.turn_engine import TurnContext, higher_priority

if TYPE_CHECKING:
    from pipeline.turn_manager import TurnManager


#: Actions of a turn that handed the conversation to people.
HANDOFF_ACTIONS = ("handoff", "handoff_later")


class TurnState:
    """One turn's working state and the steps every action shares: keeps the engine stateless.

    Attributes:
        tm: the embedded engine the turn runs on (intents, business system, configuration).
        ctx: the conversation, mutated in place.
        work: durable side effects, written when the turn commits.
        slots: what the deterministic extractor found in the customer's message.
        text: the customer's message (already redacted).
        replies: the reply texts so far, in order.
        action: the action run this turn (``"handoff"`` once it handed the conversation to people,
            ``"handoff_later"`` when their queue is closed now).
    """

    def __init__(self, tm: TurnManager, ctx: TurnContext, work: TurnWork, slots: Slots, text: str) -> None:
        self.tm, self.ctx, self.work, self.slots, self.text = tm, ctx, work, slots, text
        self.st = ctx.state
        self.biz = tm.business
        self.cfg = tm.config
        self.replies: list[str] = []
        self.match: IntentMatch | None = None
        self.action: str | None = None
        self.to_agent = False
        self.history_text = text  # what the conversation history (LLM context) keeps of the message

    def say(self, key: str, **values: object) -> None:
        """Add the reply template ``key`` rendered with ``values``."""
        self.replies.append(render(key, **values))

    @property
    def intent(self) -> Intent | None:
        return self.tm.intents.get(self.st.intent) if self.st.intent else None

    def reset(self) -> None:
        """Forget the current request: intent, question, slots, order choices and what is pending."""
        self.st.intent = None
        self.st.awaiting = None
        self.st.slots = {}
        self.st.candidates = []
        self.st.pending = None

    async def run_intent(self, *, confirmed: bool) -> None:
        """Run the current intent's action (see :meth:`pipeline.turn.Turn.run_intent`)."""
        raise NotImplementedError

    # ---- order selection ---------------------------------------------------------------------
    def pick_order(self) -> bool:
        """Fill ``order_number`` from an answer to "which order?". True when one was picked."""
        number = self.slots.order_number
        cands = self.st.candidates
        if number is None and cands and self.slots.ordinal:
            index = self.slots.ordinal - 1 if self.slots.ordinal > 0 else len(cands) + self.slots.ordinal
            if 0 <= index < len(cands):
                number = cands[index]
        if number is None and cands:
            words = set(self.text.lower().replace(",", " ").split())
            hits = [
                n
                for n, title in self.st.slots.get("candidate_titles", {}).items()
                if words & set(title.lower().split())
            ]
            if len(hits) == 1:
                number = hits[0]
        if number is None:
            return False
        self.st.slots["order_number"] = number
        self.st.candidates = []
        return True

    async def order_for(self, preferred: Sequence[OrderStatus]) -> Order | None:
        """The order this turn acts on, or None after asking the customer for what is missing."""
        ctx, st = self.ctx, self.st
        if ctx.customer is None:
            st.awaiting = "identify"
            self.say("ask_identity")
            return None
        number = st.slots.get("order_number")
        if number:
            order = await self.biz.get_order(number)
            if order is None or order.customer_ref != ctx.customer.ref:
                st.slots.pop("order_number", None)
                st.awaiting = "order_number"
                self.say("order_not_found", number=number)
                return None
            st.touch("order", order.number)
            return order
        orders = sorted(await self.biz.list_orders(ctx.customer.ref), key=lambda o: o.placed_at, reverse=True)
        context = next((o for o in orders if o.number == st.context_order), None)
        if context is not None and context.status in preferred:
            st.slots["order_number"] = context.number
            st.touch("order", context.number)
            return context
        if not orders:
            self.reset()
            self.say("no_orders_for", what="orders")
            return None
        candidates = [o for o in orders if o.status in preferred] or orders
        if len(candidates) == 1:
            st.slots["order_number"] = candidates[0].number
            st.touch("order", candidates[0].number)
            return candidates[0]
        shown = candidates[:4]
        st.candidates = [o.number for o in shown]
        st.slots["candidate_titles"] = {o.number: o.title for o in shown}
        st.awaiting = "order_choice"
        self.say("ask_order_choice", choices=join_choices([order_choice_label(o) for o in shown]))
        return None

    # ---- escalation ------------------------------------------------------------------------------
    async def escalate(self, reason: str) -> None:
        """Hand the conversation to people: a ticket with a summary, a handoff request, the reply.

        A queue closed now (business hours) hands off to its open overflow queue; with none open
        the customer is told when it opens, the ticket's next step is due then (and its SLA clock
        starts then), and a caller is promised a call back at that time instead of being rung
        through (the turn's action is ``"handoff_later"``, so no warm transfer starts).
        """
        ctx, st, now = self.ctx, self.st, self.ctx.now
        current = self.intent
        routing = (
            current if current and current.action not in ("handoff", "greeting", "goodbye", "faq") else None
        )
        routing = routing or next((i for i in self.tm.intents.values() if i.action == "handoff"), None)
        asked = routing.queue if routing else self.cfg.fallback_queue
        route = await self.tm.hours.route_handoff(asked, now) if self.tm.hours else HandoffRoute(asked)
        queue, opens_at = route.queue, route.opens_at
        if route.overflowed_from is not None:
            await self.work.record_event(
                "overflowed", {"from": route.overflowed_from, "to": queue, "reason": "closed"}
            )
        about = current or routing
        summary = three_line_summary(
            customer=ctx.customer, channel=ctx.channel, intent=about, state=st, reason=reason
        )
        first_minutes = routing.sla_first_response_minutes if routing else 60
        sla_start = opens_at if opens_at is not None else now  # a closed queue's clock starts when it opens
        calls_back = opens_at is not None and ctx.channel == Channel.VOICE
        next_step = "call the customer back" if calls_back else f"{queue} team to respond"
        ticket = await self.work.open_ticket(
            subject=f"Handoff: {about.description if about else 'customer request'}"[:120],
            summary=summary,
            queue=queue,
            priority=higher_priority(str(routing.priority) if routing else "normal", st.priority_floor),
            first_response_due=sla_start + timedelta(minutes=first_minutes),
            resolution_due=sla_start + timedelta(minutes=routing.sla_resolution_minutes if routing else 1440),
            next_step=next_step if opens_at is not None else None,
            next_step_due=opens_at,
        )
        ctx.ticket_id = ticket.id
        priority = str(ticket.priority)
        if calls_back:
            phone = ctx.customer.phone if ctx.customer and ctx.customer.phone else ctx.state.caller_phone
            await self.work.request_handoff(
                queue=queue,
                priority=priority,
                ticket_id=ticket.id,
                callback_phone=phone,
                callback_due=opens_at,
            )
        else:
            await self.work.request_handoff(queue=queue, priority=priority, ticket_id=ticket.id)
        ctx.owner = f"queue:{queue}"
        ctx.status = "escalated"
        ctx.next_step, ctx.next_step_due = next_step, opens_at or ticket.first_response_due
        await self.work.record_event("handoff", {"queue": queue, "ticket": ticket.protocol, "reason": reason})
        st.awaiting = None
        if opens_at is None:
            self.action = "handoff"  # whatever was running, this turn handed the conversation to people
            self.say("handoff", queue=queue, ticket=ticket.protocol, sla=sla_text(first_minutes))
            return
        self.action = "handoff_later"  # handed to people who are not there now: nobody is rung
        await self.work.record_event("handoff_closed", {"queue": queue, "opens_at": opens_at.isoformat()})
        self.say(
            "handoff_closed_call" if calls_back else "handoff_closed",
            opens=opening_time(opens_at),
            zone=route.zone,
            ticket=ticket.protocol,
        )

    # ---- texts to the customer -------------------------------------------------------------------
    def text_channel(self) -> tuple[Channel, str]:
        """Where texts for this customer go: the same text channel, or SMS for calls."""
        ctx = self.ctx
        if ctx.channel == Channel.VOICE:
            phone = (
                ctx.customer.phone
                if ctx.customer and ctx.customer.phone
                else (ctx.state.caller_phone or ctx.address)
            )
            return Channel.SMS, phone
        return ctx.channel, ctx.address

    async def text_customer(self, body: str, kind: str) -> None:
        """Queue a text to the customer (sent after the turn commits)."""
        channel, address = self.text_channel()
        await self.work.queue_text(OutboundText(channel=channel, to=address, body=body, kind=kind))
