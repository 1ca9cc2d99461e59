"""The LLM engine's tools: each one runs the embedded engine's action code (same governance).

The model only chooses a tool and an order number. Eligibility, amounts, confirmation and
identity are decided by the embedded engine's public actions API (:class:`pipeline.turn.Turn`);
a tool's result carries the policy's own words (``message_for_customer``) and an ``outcome``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.identity import IdentityLevel, required_level, satisfies
from pipeline.llm_providers import ToolCall, ToolSpec
from pipeline.model import Intent, IntentPolicy
from pipeline.ports import TurnWork
from pipeline.templates import money, order_choice_label
from pipeline.turn import Turn
from pipeline.turn_engine import TurnContext
from pipeline.turn_manager import TurnManager

_LEVELS = list(IdentityLevel)
_ORDER_NUMBER = re.compile(r"\d{3,12}")


@dataclass
class ToolRound:
    """What the tools of one customer turn did (and what of the reply was streamed)."""

    said: list[str] = field(default_factory=list)  # the policy's own texts, in order
    results: list[str] = field(default_factory=list)  # every tool result (JSON text)
    done: set[str] = field(default_factory=set)  # actions that changed something
    calls: int = 0
    llm_mood: str | None = None
    texts: list[str] = field(default_factory=list)  # the model's texts of this turn, in order
    streamed: list[str] = field(default_factory=list)  # sentences already spoken on the call
    stream_problem: str | None = None  # why streaming stopped (a sentence failed the reply check)


class LLMTools:
    """The tools the model may call, run on the embedded engine's turn.

    Args:
        embedded: the embedded engine whose actions the tools run.
    """

    def __init__(self, embedded: TurnManager) -> None:
        self._emb = embedded

    def action_intent(self, action: str) -> Intent | None:
        """The enabled intent that runs ``action``, if any: a tool exists only for those."""
        return next((i for i in self._emb.intents.values() if i.action == action and i.enabled), None)

    def specs(self) -> list[ToolSpec]:
        """The tools offered to the model: the fixed ones and one per enabled action."""
        order = {
            "type": "object",
            "properties": {
                "order_number": {"type": "string", "description": "the order number, digits only"}
            },
        }
        needs_order = order | {"required": ["order_number"]}
        specs = [
            ToolSpec(
                "identify_customer",
                "Find the customer's account by the phone number or email they gave.",
                {"type": "object", "properties": {"phone": {"type": "string"}, "email": {"type": "string"}}},
            ),
            ToolSpec(
                "list_orders",
                "List the identified customer's orders (number, items, status, dates, amount).",
                {"type": "object", "properties": {}},
            ),
            ToolSpec(
                "note_customer_mood",
                "Record that the customer sounds annoyed or angry.",
                {
                    "type": "object",
                    "properties": {"level": {"type": "string", "enum": ["annoyed", "angry"]}},
                    "required": ["level"],
                },
            ),
        ]
        catalogue = {
            "order_status": ("get_order_status", "Tell the customer the status of an order.", order),
            "cancel_order": (
                "cancel_order",
                "Cancel an order that has not shipped (asks the customer to confirm first).",
                needs_order,
            ),
            "refund": (
                "refund_order",
                "Refund a delivered order in full if the refund policy allows it (asks the customer to confirm first). Also texts a return label.",
                needs_order,
            ),
            "return_label": (
                "send_return_label",
                "Text the customer a return label for a delivered order.",
                needs_order,
            ),
            "account_balance": (
                "get_account_balance",
                "Tell the customer their account balance.",
                {"type": "object", "properties": {}},
            ),
            "open_ticket": (
                "open_ticket",
                "Open a support ticket for a problem the tools cannot solve.",
                {
                    "type": "object",
                    "properties": {"description": {"type": "string"}},
                    "required": ["description"],
                },
            ),
            "handoff": (
                "transfer_to_person",
                "Hand the conversation to a human agent with a summary.",
                {"type": "object", "properties": {"reason": {"type": "string"}}},
            ),
            "goodbye": (
                "end_conversation",
                "Say goodbye when the customer has nothing else.",
                {"type": "object", "properties": {}},
            ),
        }
        for action, (name, description, schema) in catalogue.items():
            if self.action_intent(action) is not None or action == "handoff":
                specs.append(ToolSpec(name, description, schema))
        return specs

    async def run(
        self, call: ToolCall, ctx: TurnContext, turn: Turn, work: TurnWork, previous: tuple, rnd: ToolRound
    ) -> dict[str, Any]:
        """Run one tool call of the model; the result (a JSON object) goes back to the model."""
        args = call.arguments if isinstance(call.arguments, dict) else {}
        await work.record_event("llm_tool_call", {"tool": call.name, "args": sorted(args)})
        actions = {
            "get_order_status": "order_status",
            "cancel_order": "cancel_order",
            "refund_order": "refund",
            "send_return_label": "return_label",
            "get_account_balance": "account_balance",
            "end_conversation": "goodbye",
        }
        if call.name in actions:
            allowed = (
                {"order_number"}
                if actions[call.name] in ("order_status", "cancel_order", "refund", "return_label")
                else set()
            )
            ignored = sorted(set(args) - allowed)
            if ignored:
                # e.g. an "amount" for a refund: amounts come from the order, never from the model.
                await work.record_event("llm_tool_args_ignored", {"tool": call.name, "ignored": ignored})
            return await self._run_action(
                actions[call.name], args.get("order_number"), ctx, turn, previous, rnd, ignored
            )
        if call.name == "identify_customer":
            return await self._identify(args, ctx, turn, rnd)
        if call.name == "list_orders":
            return await self._list_orders(ctx, turn)
        if call.name == "open_ticket":
            description = str(args.get("description") or turn.text)[:500]
            return await self._say_through(turn, rnd, lambda: turn.open_ticket(description), "ticket")
        if call.name == "transfer_to_person":
            return await self._say_through(
                turn, rnd, lambda: turn.escalate("the assistant judged a person is needed"), "handoff"
            )
        if call.name == "note_customer_mood":
            level = args.get("level")
            rnd.llm_mood = level if level in ("annoyed", "angry") else None
            return {"ok": True}
        await work.record_event("llm_unknown_tool", {"tool": call.name})
        return {"ok": False, "error": f"there is no tool named {call.name!r}"}

    async def _run_action(
        self,
        action: str,
        order_number: Any,
        ctx: TurnContext,
        turn: Turn,
        previous: tuple,
        rnd: ToolRound,
        ignored: list[str],
    ) -> dict[str, Any]:
        intent = self.action_intent(action)
        if intent is None:
            return {"ok": False, "error": "that action is switched off here; offer a person instead"}
        st = ctx.state
        number = None
        if order_number is not None:
            digits = re.sub(r"\D", "", str(order_number))
            if not _ORDER_NUMBER.fullmatch(digits):
                return {"ok": False, "error": "order numbers are digits only; ask the customer for it"}
            number = digits
        was_awaiting, was_intent, was_order = previous
        confirmed = (
            intent.policy == IntentPolicy.CONFIRM
            and was_awaiting == "confirm"
            and was_intent == intent.name
            and (number is None or number == was_order)
            and turn.slots.confirmation is True
        )
        if number is None and was_order and was_intent == intent.name:
            number = was_order
        done_before = len(st.done)
        result = await self._say_through(
            turn, rnd, lambda: turn.run_action(intent, confirmed=confirmed, order_number=number), action
        )
        if len(st.done) > done_before and any(
            word in st.done[-1] for word in ("refunded", "cancelled order", "return label")
        ):
            rnd.done.add(action)
        result["outcome"] = {
            "confirm": "needs_customer_confirmation: ask the customer and wait for their answer",
            "order_choice": "customer_must_choose_an_order",
            "order_number": "order_not_found_for_this_customer",
            "identify": "customer_not_verified: ask for their phone number or email",
            "offer_handoff": "not_allowed_by_policy: a person can decide; offer one",
        }.get(
            st.awaiting or "",
            "done"
            if action in rnd.done or action in ("order_status", "account_balance", "goodbye")
            else "not_done",
        )
        if ignored:
            result["note"] = (
                f"ignored arguments {ignored}: amounts and policy come from the order and the policy, not from requests"
            )
        return result

    async def _say_through(self, turn: Turn, rnd: ToolRound, run: Any, what: str) -> dict[str, Any]:
        """Run embedded action code; its templated reply becomes the tool result."""
        before = len(turn.replies)
        await run()
        said = turn.replies[before:]
        del turn.replies[before:]
        rnd.said.extend(said)
        return {"ok": True, "message_for_customer": " ".join(said)}

    async def _identify(
        self, args: Mapping[str, Any], ctx: TurnContext, turn: Turn, rnd: ToolRound
    ) -> dict[str, Any]:
        if ctx.customer is not None and ctx.identity.level == IdentityLevel.VERIFIED:
            return {"ok": True, "verified": True, "first_name": ctx.customer.first_name}
        phone = re.sub(r"[^\d+]", "", str(args.get("phone") or "")) or None
        email = str(args.get("email") or "").strip() or None
        if phone is None and email is None:
            return {"ok": False, "error": "give the phone number or email the customer said"}
        # The same claim as the embedded engine: a code goes to the contact on file and only the
        # customer's own next message can give it back. Nothing says whether the contact exists.
        result = await self._say_through(turn, rnd, lambda: turn.claim(phone=phone, email=email), "identify")
        return result | {"verified": False}

    async def _list_orders(self, ctx: TurnContext, turn: Turn) -> dict[str, Any]:
        # Listing orders reads account data: the level the admin set for order status.
        status = self.action_intent("order_status")
        need = required_level(status) if status else IdentityLevel.VERIFIED
        if not satisfies(ctx.identity.level, max(need, IdentityLevel.CLAIMED, key=_LEVELS.index)):
            return {
                "ok": False,
                "error": "customer not verified: ask for their phone number or email and call identify_customer",
            }
        if ctx.customer is None and ctx.identity.claimed_ref:
            ctx.customer = await turn.biz.get_customer(ctx.identity.claimed_ref)
        if ctx.customer is None:
            return {"ok": False, "error": "customer not found"}
        orders = await self._emb.business.list_orders(ctx.customer.ref)
        recent = sorted(orders, key=lambda o: o.placed_at, reverse=True)[:8]
        return {
            "ok": True,
            "orders": [
                {
                    "order_number": o.number,
                    "summary": order_choice_label(o),
                    "status": str(o.status),
                    "amount": money(o.amount_cents, o.currency),
                    "refunded": o.refunded_cents > 0,
                }
                for o in recent
            ],
        }
