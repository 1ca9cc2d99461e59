"""The embedded turn manager: intent + slots -> policy-checked business actions -> templated replies.

One call to :meth:`TurnManager.handle` is one customer turn. It reads and mutates the
conversation's :class:`TurnContext`, calls the business system through its port, records
durable side effects through :class:`~pipeline.ports.TurnWork` (written when the turn
commits) and returns the reply texts. It never sends anything itself.

The turn's working state and actions live in :mod:`pipeline.turn` (with
:mod:`pipeline.turn_state`, :mod:`pipeline.turn_identity` and :mod:`pipeline.turn_actions`);
the engine interface and the turn types in :mod:`pipeline.turn_engine`, re-exported here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from pipeline.identity import required_level, satisfies
from pipeline.model import Intent, Order, OrderStatus, Priority, Slots
from pipeline.ports import BusinessSystem, IntentClassifier, QueueHours, TurnWork, VerificationCodes
from pipeline.slots import extract_slots
from pipeline.templates import render, spoken_day
from pipeline.turn import Turn
from pipeline.turn_engine import (
    DEFAULT_PROTECTED_TOPICS,
    CoreConfig,
    MoodScorer,
    TurnContext,
    TurnEngine,
    TurnResult,
    higher_priority,
    remember,
)
from pipeline.turn_state import HANDOFF_ACTIONS

__all__ = [
    "DEFAULT_PROTECTED_TOPICS",
    "CoreConfig",
    "MoodScorer",
    "Turn",
    "TurnContext",
    "TurnEngine",
    "TurnManager",
    "TurnResult",
    "higher_priority",
    "remember",
]


def _last_change(order: Order) -> datetime:
    return order.delivered_at or order.shipped_at or order.placed_at


class TurnManager:
    """Runs turns with the embedded intent engine. Safe to share between conversations."""

    def __init__(
        self,
        classifier: IntentClassifier,
        business: BusinessSystem,
        intents: Sequence[Intent],
        config: CoreConfig | None = None,
        *,
        slot_extractor: Callable[..., Slots] = extract_slots,
        mood: MoodScorer | None = None,
        codes: VerificationCodes | None = None,
        hours: QueueHours | None = None,
    ) -> None:
        self._classifier = classifier
        self._hours = hours
        self._codes = codes
        self._business = business
        self._config = config or CoreConfig()
        self._extract = slot_extractor
        self._mood = mood
        self._topics = [(name, re.compile(rx, re.I)) for name, rx in self._config.protected_topics]
        self._intents: dict[str, Intent] = {}
        self.set_intents(intents)

    def set_intents(self, intents: Sequence[Intent]) -> None:
        """Replace the configured intents (after an admin edit)."""
        enabled = [i for i in intents if i.enabled]
        self._intents = {i.name: i for i in intents}
        self._classifier.load(enabled)

    @property
    def intents(self) -> Mapping[str, Intent]:
        return self._intents

    async def greet_call(self, ctx: TurnContext, work: TurnWork) -> list[str]:
        """The first words of a phone call: a known caller is greeted with context.

        "Hi Dana, I see order 4517 was delivered on Tuesday. Is this about that order?"
        """
        customer = ctx.customer
        order_intent = self._intents.get("order_status")
        if customer is None and ctx.identity.claimed_ref and order_intent is not None:
            # A caller ID only claims the account: its details are read out only when the admin
            # lets order status be told on a claim (Intent.identity == "claimed").
            if satisfies(ctx.identity.level, required_level(order_intent)):
                customer = ctx.customer = await self._business.get_customer(ctx.identity.claimed_ref)
        if customer is None:
            return [render("call_greeting_unknown")]
        orders = sorted(await self._business.list_orders(customer.ref), key=_last_change, reverse=True)
        recent = next(
            (
                o
                for o in orders
                if o.status in (OrderStatus.DELIVERED, OrderStatus.SHIPPED, OrderStatus.PLACED)
            ),
            None,
        )
        if recent is None:
            return [render("call_greeting_known", first_name=customer.first_name)]
        ctx.state.context_order = recent.number
        ctx.state.awaiting = "context_order"
        await work.record_event(
            "call_greeting", {"context_order": recent.number, "status": str(recent.status)}
        )
        verb = {
            OrderStatus.DELIVERED: "was delivered",
            OrderStatus.SHIPPED: "shipped",
            OrderStatus.PLACED: "was placed",
        }[recent.status]
        return [
            render(
                "call_greeting_order",
                first_name=customer.first_name,
                number=recent.number,
                verb=verb,
                when=spoken_day(_last_change(recent), ctx.now),
            )
        ]

    @property
    def config(self) -> CoreConfig:
        return self._config

    def set_max_misses(self, max_misses: int) -> None:
        """How many turns in a row may match no intent before the conversation goes to a person
        (an admin setting; turns that start after this call use it)."""
        if max_misses < 1:
            raise ValueError("max_misses must be at least 1")
        self._config = dataclasses.replace(self._config, max_misses=max_misses)

    @property
    def business(self) -> BusinessSystem:
        """The business system the actions act on."""
        return self._business

    @property
    def classifier(self) -> IntentClassifier:
        return self._classifier

    @property
    def hours(self) -> QueueHours | None:
        """The queues' business hours; None: every queue is always open."""
        return self._hours

    @property
    def codes(self) -> VerificationCodes | None:
        """One-time verification codes; None when no code can be sent (a person verifies)."""
        return self._codes

    async def aclose(self) -> None:
        """Nothing to release: the embedded engine holds no connections."""

    def new_turn(self, ctx: TurnContext, text: str, work: TurnWork) -> Turn:
        """Start a turn: its working state and actions (:class:`~pipeline.turn.Turn`).

        The LLM engine runs its tools through it, so both engines share one governance.
        """
        return Turn(self, ctx, work, self._extract(text, now=ctx.now), text)

    def protected_topic(self, text: str) -> str | None:
        """The name of the protected topic ``text`` touches, if any."""
        return next((name for name, rx in self._topics if rx.search(text)), None)

    async def hand_off_protected(self, turn: Turn, topic: str) -> TurnResult:
        """A protected topic goes to a person at high priority, whatever else the message asks."""
        await turn.work.record_event("protected_topic", {"topic": topic})
        turn.st.priority_floor = higher_priority(str(Priority.HIGH), turn.st.priority_floor)
        turn.say("protected_topic")
        await turn.escalate(f"protected topic ({topic})")
        return self.finish(turn)

    async def handle(self, ctx: TurnContext, text: str, work: TurnWork) -> TurnResult:
        turn = self.new_turn(ctx, text, work)
        topic = self.protected_topic(text) if ctx.owner == "ai" else None
        if topic is not None:
            return await self.hand_off_protected(turn, topic)
        mood = await turn.mood_check(self._mood)
        if mood == "handoff":
            await turn.escalate("customer frustrated repeatedly")
        else:
            await turn.run()
            if mood == "offer":
                turn.offer_person("a person to help a frustrated customer")
        return self.finish(turn)

    def finish(self, turn: Turn) -> TurnResult:
        """Close a turn: keep its texts in the bounded history and build the result."""
        ctx = turn.ctx
        if not turn.to_agent and ctx.owner == "ai" or turn.action in HANDOFF_ACTIONS:
            remember(ctx.state, "user", turn.history_text, self._config.history_size)
            remember(ctx.state, "assistant", " ".join(turn.replies), self._config.history_size)
        return TurnResult(turn.replies, ctx.state.intent, turn.match, turn.action, to_agent=turn.to_agent)
