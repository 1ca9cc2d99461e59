"""The embedded engine's business actions: each intent's action, governed by policy and data.

Eligibility, amounts, idempotency keys, tickets and follow-ups are decided here by code, for both
engines: the LLM engine's tools run these same handlers. A refund never takes an amount from
anything a customer or a model said.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from pipeline.model import Intent, IntentPolicy, Order, OrderStatus, ReturnLabel
from pipeline.policy import check_cancel, check_return_label
from pipeline.ports import ActionRefused
from pipeline.summary import three_line_summary
from pipeline.templates import money, order_values, render, sla_text
from pipeline.turn_state import TurnState

#: Orders whose status a customer most likely asks about.
ACTIVE = (OrderStatus.PLACED, OrderStatus.SHIPPED)

Handler = Callable[[Intent, bool], Awaitable[None]]


class BusinessActions(TurnState):
    """The action of every intent (see :class:`pipeline.turn.Turn`)."""

    def action_handler(self, action: str) -> Handler | None:
        """The handler of an intent's ``action``; None for an action this engine does not know."""
        return {
            "order_status": self._order_status,
            "cancel_order": self._cancel,
            "refund": self._refund,
            "return_label": self._return_label,
            "account_balance": self._balance,
            "faq": self._faq,
            "open_ticket": self._open_ticket_intent,
            "handoff": self._handoff_intent,
            "greeting": self._greeting,
            "goodbye": self._goodbye,
        }.get(action)

    async def _order_status(self, intent: Intent, confirmed: bool) -> None:
        order = await self.order_for(ACTIVE)
        if order is None:
            return
        await self.work.record_event("order_status", {"order": order.number, "status": str(order.status)})
        self.say(f"status_{order.status}", **order_values(order))
        self.st.done.append(f"told status of order {order.number} ({order.status})")
        self.reset()

    async def _cancel(self, intent: Intent, confirmed: bool) -> None:
        order = await self.order_for((OrderStatus.PLACED,))
        if order is None:
            return
        # Once confirmed, an already cancelled order is a re-run turn (its first attempt lost its
        # commit): cancel_order is idempotent, and the customer is told it is done.
        rerun = confirmed and order.status == OrderStatus.CANCELLED
        decision = check_cancel(dataclasses.replace(order, status=OrderStatus.PLACED) if rerun else order)
        await self.work.record_event(
            "policy_check",
            {
                "action": "cancel_order",
                "order": order.number,
                "allowed": decision.allowed,
                "reason": decision.reason,
            },
        )
        if not decision.allowed:
            self._refuse_cancel(order)
            return
        if intent.policy == IntentPolicy.CONFIRM and not confirmed:
            self.st.awaiting = "confirm"
            self.st.pending = f"customer to confirm cancelling order {order.number}"
            self.say("cancel_confirm", **order_values(order))
            return
        try:
            order = await self.biz.cancel_order(order.number, now=self.ctx.now)
        except ActionRefused:
            fresh = await self.biz.get_order(order.number)
            self._refuse_cancel(fresh or order)
            return
        await self.work.record_event("order_cancelled", {"order": order.number})
        self.st.done.append(f"cancelled order {order.number}")
        self.reset()
        self.say(
            "cancel_done",
            number=order.number,
            refund_part="; any payment goes back to your original payment method",
        )

    def _refuse_cancel(self, order: Order) -> None:
        values = order_values(order) | {"window_days": self.cfg.refund.window_days}
        key = {
            OrderStatus.SHIPPED: "cancel_refused_shipped",
            OrderStatus.DELIVERED: "cancel_refused_delivered",
        }.get(order.status, "cancel_refused_other")
        self.st.done.append(f"refused to cancel order {order.number} ({order.status})")
        self.reset()
        self.say(key, **values)

    async def _refund(self, intent: Intent, confirmed: bool) -> None:
        order = await self.order_for((OrderStatus.DELIVERED,))
        if order is None:
            return
        # Once confirmed, an existing refund of this order is a retried turn: issue_refund is
        # idempotent and the rest of the loop (label, ticket, follow-up) must still complete.
        decision = self.cfg.refund.check(
            dataclasses.replace(order, refunded_cents=0) if confirmed else order, self.ctx.now
        )
        await self.work.record_event(
            "policy_check",
            {
                "action": "refund",
                "order": order.number,
                "allowed": decision.allowed,
                "reason": decision.reason,
                **decision.facts,
            },
        )
        values = order_values(order) | {"window_days": self.cfg.refund.window_days}
        if not decision.allowed:
            await self._refuse_refund(order, decision.reason, values, decision.facts)
            return
        if intent.policy == IntentPolicy.CONFIRM and not confirmed:
            self.st.awaiting = "confirm"
            self.st.pending = f"customer to confirm a refund of {values['amount']} for order {order.number}"
            self.say("refund_confirm", **values)
            return
        await self._issue_refund(intent, order)

    async def _refuse_refund(self, order: Order, reason: str, values: dict, facts: dict) -> None:
        self.st.done.append(f"refund of order {order.number} refused by policy ({reason})")
        if reason == "outside_window":
            self.st.awaiting = "offer_handoff"
            self.st.pending = f"a person to decide on a refund outside the window for order {order.number}"
            self.say("refund_refused_outside_window", days=facts.get("days_since_delivery", "?"), **values)
        elif reason == "over_limit":
            self.st.awaiting = "offer_handoff"
            self.st.pending = f"approval of a refund of {values['amount']} for order {order.number}"
            self.say("refund_refused_over_limit", **values)
        elif reason == "already_refunded":
            self.reset()
            self.say(
                "refund_refused_already_refunded",
                **values | {"amount": money(order.refunded_cents, order.currency)},
            )
        else:
            hint = {
                OrderStatus.PLACED: " It hasn't shipped yet, so I can cancel it instead.",
                OrderStatus.SHIPPED: " Once it arrives I can refund it.",
            }.get(order.status, "")
            self.reset()
            self.say("refund_refused_not_delivered", hint=hint, **values)

    async def _issue_refund(self, intent: Intent, order: Order) -> None:
        ctx, now = self.ctx, self.ctx.now
        # Re-check with fresh data right before acting: the order may have changed since we asked.
        fresh = await self.biz.get_order(order.number) or order
        decision = self.cfg.refund.check(dataclasses.replace(fresh, refunded_cents=0), now)
        if not decision.allowed:
            values = order_values(fresh) | {"window_days": self.cfg.refund.window_days}
            await self._refuse_refund(fresh, decision.reason, values, decision.facts)
            return
        refund = await self.biz.issue_refund(
            fresh.number,
            amount_cents=fresh.amount_cents,
            reason=f"customer request via {ctx.channel}",
            idempotency_key=f"refund:{fresh.number}",
            now=now,
        )
        await self.work.record_event(
            "refund_issued",
            {
                "order": fresh.number,
                "amount_cents": refund.amount_cents,
                "provider_ref": refund.provider_ref,
                "already_existed": refund.already_existed,
            },
        )
        label = await self._text_return_label(fresh.number, now=now)
        amount = money(refund.amount_cents, refund.currency)
        self.st.done.append(
            f"refunded {amount} for order {fresh.number} (ref {refund.provider_ref}), return label {label.code} texted"
        )
        self.st.pending = f"confirm the return of order {fresh.number} arrived"
        due = now + timedelta(hours=self.cfg.followup_hours)
        customer = ctx.customer
        summary = three_line_summary(
            customer=customer, channel=ctx.channel, intent=intent, state=self.st, reason="resolved by AI"
        )
        ticket = await self.work.open_ticket(
            subject=f"Refund for order {fresh.number}",
            summary=summary,
            queue=intent.queue,
            priority=str(intent.priority),
            first_response_due=None,
            resolution_due=None,
            status="resolved",
            owner="ai",
            next_step=f"Confirm the return of order {fresh.number} arrived and the refund reached the customer",
            next_step_due=due,
        )
        ctx.ticket_id = ticket.id
        ctx.next_step, ctx.next_step_due = ticket.next_step, due
        body = render(
            "followup_refund",
            first_name=customer.first_name if customer else "there",
            number=fresh.number,
            amount=amount,
            refunded_on=f"{now:%b} {now.day}",
        )
        channel, address = self.text_channel()
        await self.work.schedule_followup(
            channel=channel,
            address=address,
            body=body,
            due_at=due,
            ticket_id=ticket.id,
            key=f"followup:refund:{fresh.number}",
        )
        self.reset()
        self.say(
            "refund_done",
            amount=amount,
            number=fresh.number,
            refund_ref=refund.provider_ref,
            label_code=label.code,
            ticket=ticket.protocol,
            followup_hours=self.cfg.followup_hours,
        )

    async def _return_label(self, intent: Intent, confirmed: bool) -> None:
        order = await self.order_for((OrderStatus.DELIVERED,))
        if order is None:
            return
        decision = check_return_label(order)
        await self.work.record_event(
            "policy_check",
            {
                "action": "return_label",
                "order": order.number,
                "allowed": decision.allowed,
                "reason": decision.reason,
            },
        )
        if not decision.allowed:
            self.reset()
            self.say("label_refused", **order_values(order))
            return
        label = await self._text_return_label(order.number, now=self.ctx.now)
        self.st.done.append(f"return label {label.code} for order {order.number} texted")
        self.reset()
        self.say("label_done", number=order.number, label_code=label.code)

    async def _text_return_label(self, number: str, *, now: datetime) -> ReturnLabel:
        """Create (or fetch) the return label of order ``number``, record it, and text it to the customer."""
        label = await self.biz.create_return_label(number, now=now)
        await self.work.record_event(
            "return_label_created",
            {
                "order": number,
                "code": label.code,
                "warehouse_notified": label.warehouse_notified_at is not None,
            },
        )
        await self.text_customer(
            render("label_text", number=number, label_url=label.url, label_code=label.code),
            "return_label",
        )
        return label

    async def _balance(self, intent: Intent, confirmed: bool) -> None:
        if self.ctx.customer is None:
            self.st.awaiting = "identify"
            self.say("ask_identity")
            return
        balance = await self.biz.get_balance(self.ctx.customer.ref)
        self.reset()
        self.say("balance", amount=money(balance.amount_cents, balance.currency))

    async def _faq(self, intent: Intent, confirmed: bool) -> None:
        self.reset()
        self.replies.append(intent.answer or intent.description or "Let me get someone to help with that.")

    async def _greeting(self, intent: Intent, confirmed: bool) -> None:
        self.reset()
        name = self.ctx.customer.first_name if self.ctx.customer else ""
        self.say("greeting", name_part=f" {name}" if name else "")

    async def _goodbye(self, intent: Intent, confirmed: bool) -> None:
        self.reset()
        name = self.ctx.customer.first_name if self.ctx.customer else ""
        self.say("goodbye", name_part=f", {name}" if name else "")

    async def _open_ticket_intent(self, intent: Intent, confirmed: bool) -> None:
        if len(self.text.split()) >= 6:
            await self.open_ticket(self.text)
        else:
            self.st.awaiting = "problem_description"
            self.say("ask_problem")

    async def open_ticket(self, description: str) -> None:
        """Open a ticket for a problem the customer described, in the ``open_ticket`` intent's queue."""
        intent = self.tm.intents.get("open_ticket") or self.intent
        queue = intent.queue if intent else self.cfg.fallback_queue
        now = self.ctx.now
        self.st.done.append("ticket opened for a reported problem")
        self.st.pending = "support to investigate the problem"
        summary = three_line_summary(
            customer=self.ctx.customer,
            channel=self.ctx.channel,
            intent=intent,
            state=self.st,
            reason="problem reported",
        )
        ticket = await self.work.open_ticket(
            subject=description[:120],
            summary=summary,
            queue=queue,
            priority=str(intent.priority) if intent else "normal",
            first_response_due=now + timedelta(minutes=intent.sla_first_response_minutes) if intent else None,
            resolution_due=now + timedelta(minutes=intent.sla_resolution_minutes) if intent else None,
        )
        self.ctx.ticket_id = ticket.id
        self.reset()
        self.say(
            "ticket_opened",
            ticket=ticket.protocol,
            queue=queue,
            sla=sla_text(intent.sla_first_response_minutes if intent else 60),
        )

    async def _handoff_intent(self, intent: Intent, confirmed: bool) -> None:
        await self.escalate("customer asked for a person")
