"""The embedded turn manager: intent + slots -> policy-checked business actions -> templated replies.

One call to :meth:`TurnManager.handle` is one customer turn. It reads and mutates the
conversation's :class:`TurnContext`, calls the business system through its port, records
durable side effects through :class:`~pipeline.ports.TurnWork` (bound to the transaction that
stores the turn) and returns the reply texts. It never sends anything itself.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from pipeline.identity import (
    CodeIssue,
    Identity,
    IdentityLevel,
    code_in,
    required_level,
    satisfies,
    wants_new_code,
)
from pipeline.model import (
    Channel,
    ConversationState,
    Customer,
    Intent,
    IntentMatch,
    IntentPolicy,
    Order,
    OrderStatus,
    OutboundText,
    Priority,
    Slots,
)
from pipeline.policy import RefundPolicy, check_cancel, check_return_label
from pipeline.ports import ActionRefused, BusinessSystem, IntentClassifier, TurnWork, VerificationCodes
from pipeline.slots import extract_slots
from pipeline.summary import three_line_summary
from pipeline.templates import (
    join_choices,
    money,
    order_choice_label,
    order_values,
    render,
    sla_text,
    spoken_day,
)

log = logging.getLogger(__name__)

ACTIVE = (OrderStatus.PLACED, OrderStatus.SHIPPED)
_IDENTITY_WORDS = frozenset(
    "my the a an is it's its it this that here and phone number mobile cell email e-mail address on account "
    "i'm im i am me call at you can reach hi hello hey sure yes ok okay please".split()
)


def _last_change(order: Order) -> datetime:
    return order.delivered_at or order.shipped_at or order.placed_at


def _only_a_number(text: str) -> bool:
    """True for "4517", "#4517", "order 4517", "four five one seven" and the like."""
    words = [w.strip(".,!?#:;") for w in text.lower().split()]
    filler = {
        "order",
        "number",
        "it's",
        "its",
        "is",
        "my",
        "the",
        "oh",
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "",
        "no.",
        "nr",
    }
    return all(w in filler or w.isdigit() for w in words)


def _has_request(text: str) -> bool:
    """Whether a message that gave a phone number or email also asks for something."""
    words = [w.strip(".,!?:;()") for w in text.lower().split()]
    rest = [
        w
        for w in words
        if w and w not in _IDENTITY_WORDS and not any(ch.isdigit() for ch in w) and "@" not in w
    ]
    return len(rest) >= 2


@dataclass
class TurnContext:
    """The conversation as the turn manager sees it; mutated in place by a turn."""

    conversation_id: int
    channel: Channel
    address: str
    now: datetime
    state: ConversationState = field(default_factory=ConversationState)
    customer: Customer | None = None
    owner: str = "ai"
    status: str = "open"
    ticket_id: int | None = None
    next_step: str | None = None
    next_step_due: datetime | None = None
    # Speaks a line right away on a call (a filler while a slow answer is on its way); None on
    # text channels. Not stored with the turn: the engine records an event instead.
    speak: Callable[[str], Awaitable[None]] | None = None
    # Speaks a sentence of the reply as soon as it is written (LLM engine, calls only). The
    # stored reply starts with exactly the sentences streamed, so the call knows what is left.
    stream: Callable[[str], Awaitable[None]] | None = None
    # Who the conversation is with (see pipeline.identity); stored with the conversation.
    identity: Identity = field(default_factory=Identity)
    # The client's network address (web chat), for rate limiting one-time codes.
    client: str | None = None


@dataclass
class TurnResult:
    replies: list[str]
    intent: str | None = None
    match: IntentMatch | None = None
    action: str | None = None  # the action run this turn ("goodbye" ends a call)
    to_agent: bool = False  # the message is for the agent who owns the conversation (no bot reply)


#: (name, regex) of topics the AI never handles alone: a customer message matching one hands off.
DEFAULT_PROTECTED_TOPICS: tuple[tuple[str, str], ...] = (
    (
        "legal",
        r"\b(lawyers?|attorneys?|solicitors?|sue|suing|lawsuit|legal action|take (you|this) to court|small claims)\b",
    ),
    (
        "contract",
        r"\b(renegotiat\w*|contract terms|(change|amend|rewrite) (my|the|our) contract|breach of contract)\b",
    ),
)


@dataclass(frozen=True)
class CoreConfig:
    refund: RefundPolicy = field(default_factory=RefundPolicy)
    followup_hours: int = 48
    max_misses: int = 2
    fallback_queue: str = "support"
    history_size: int = 12  # customer/bot texts kept in the conversation state (LLM context)
    protected_topics: tuple[tuple[str, str], ...] = DEFAULT_PROTECTED_TOPICS


class MoodScorer(Protocol):
    """Scores how frustrated a customer message reads (see :mod:`pipeline.frustration`)."""

    def score_turn(self, text: str, previous_customer_texts: Sequence[str]) -> Any: ...


#: A frustrated turn raises escalations to at least this priority; angry ones to ``high``.
_PRIORITY_ORDER = [str(p) for p in (Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.URGENT)]


def higher_priority(a: str, b: str | None) -> str:
    if b is None or b not in _PRIORITY_ORDER or a not in _PRIORITY_ORDER:
        return a
    return max(a, b, key=_PRIORITY_ORDER.index)


def remember(state: ConversationState, role: str, text: str, size: int) -> None:
    """Append one text to the bounded conversation history kept in the state."""
    if text:
        state.history.append({"role": role, "content": text})
        del state.history[:-size]


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
    ) -> None:
        self._classifier = classifier
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

    def new_turn(self, ctx: TurnContext, text: str, work: TurnWork) -> _Turn:
        """A turn's working state; the LLM engine runs its tools through it (same governance)."""
        return _Turn(self, ctx, work, self._extract(text, now=ctx.now), text)

    def protected_topic(self, text: str) -> str | None:
        """The name of the protected topic ``text`` touches, if any."""
        return next((name for name, rx in self._topics if rx.search(text)), None)

    async def hand_off_protected(self, turn: _Turn, topic: str) -> TurnResult:
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

    def finish(self, turn: _Turn) -> TurnResult:
        """Close a turn: keep its texts in the bounded history and build the result."""
        ctx = turn.ctx
        if not turn.to_agent and ctx.owner == "ai" or turn.action == "handoff":
            remember(ctx.state, "user", turn.history_text, self._config.history_size)
            remember(ctx.state, "assistant", " ".join(turn.replies), self._config.history_size)
        return TurnResult(turn.replies, ctx.state.intent, turn.match, turn.action, to_agent=turn.to_agent)


class _Turn:
    """One turn's working state: keeps :class:`TurnManager` itself stateless."""

    def __init__(self, tm: TurnManager, ctx: TurnContext, work: TurnWork, slots: Slots, text: str) -> None:
        self.tm, self.ctx, self.work, self.slots, self.text = tm, ctx, work, slots, text
        self.st = ctx.state
        self.biz = tm._business
        self.cfg = tm._config
        self.replies: list[str] = []
        self.match: IntentMatch | None = None
        self.action: str | None = None
        self.to_agent = False
        self.history_text = text  # what the conversation history (LLM context) keeps of the message

    def say(self, key: str, **values: object) -> None:
        self.replies.append(render(key, **values))

    @property
    def intent(self) -> Intent | None:
        return self.tm.intents.get(self.st.intent) if self.st.intent else None

    def _reset(self) -> None:
        self.st.intent = None
        self.st.awaiting = None
        self.st.slots = {}
        self.st.candidates = []
        self.st.pending = None

    # ---- escalation triggers ------------------------------------------------------------------
    async def mood_check(self, scorer: MoodScorer | None, *, llm_level: str | None = None) -> str | None:
        """Score the customer's mood. Returns ``"handoff"`` (hand off now), ``"offer"`` (offer a
        person after this turn's answer) or None.

        Rules: an annoyed or angry turn counts as frustrated and raises the priority of any
        escalation (angry: ``high``). The first angry turn, or the second frustrated one, gets the
        offer of a person; a third frustrated turn, or a second one when angry, hands off.
        ``llm_level`` is the LLM engine's own classification; the higher of the two counts.
        """
        if self.ctx.owner != "ai" or (scorer is None and llm_level is None):
            return None
        history = [m["content"] for m in self.st.history if m.get("role") == "user"]
        level, score = "calm", 0.0
        if scorer is not None:
            signal = scorer.score_turn(self.text, history)
            level, score = signal.level, float(signal.score)
        levels = ("calm", "annoyed", "angry")
        if llm_level in levels and levels.index(llm_level) > levels.index(level):
            level = llm_level
        if level == "calm":
            return None
        st = self.st
        st.frustrated_turns += 1
        st.priority_floor = higher_priority(
            str(Priority.HIGH if level == "angry" else Priority.NORMAL), st.priority_floor
        )
        await self.work.record_event(
            "frustration", {"level": level, "score": round(score, 2), "turns": st.frustrated_turns}
        )
        await self._raise_ticket_priority(st.priority_floor)
        if st.frustrated_turns >= 3 or (level == "angry" and st.frustrated_turns >= 2):
            return "handoff"
        if level == "angry" or st.frustrated_turns == 2:
            return "offer"
        return None

    async def _raise_ticket_priority(self, floor: str | None) -> None:
        """An open ticket of this conversation gets at least ``floor`` priority."""
        if self.ctx.ticket_id is None or floor is None:
            return
        ticket = await self.work.get_ticket(self.ctx.ticket_id)
        if ticket is None or str(ticket.status) in ("resolved", "closed"):
            return
        if higher_priority(str(ticket.priority), floor) != str(ticket.priority):
            await self.work.update_ticket(
                ticket.id, priority=floor, note="customer frustrated: priority raised"
            )

    def offer_person(self, why: str) -> None:
        """Offer a person at the end of this turn, unless the turn already asks something."""
        if self.ctx.owner != "ai" or self.st.awaiting is not None or self.action == "handoff":
            return
        self.st.awaiting = "offer_handoff"
        self.st.pending = why
        self.say("frustration_offer")

    async def escalate(self, reason: str) -> None:
        await self._escalate(reason)

    # ---- the turn ---------------------------------------------------------------------------
    async def run(self) -> None:
        st, slots = self.st, self.slots
        if self.ctx.owner != "ai":
            await self._while_with_people()
            return
        if await self.verification_step():
            return
        if await self._identify():
            return
        if slots.wants_person:
            await self._escalate("customer asked for a person")
            return
        if st.awaiting == "context_order" and slots.confirmation is not None and not slots.order_number:
            st.misses = 0
            st.awaiting = None
            if slots.confirmation and st.context_order:
                self.say("context_order_yes", number=st.context_order)
            else:
                st.context_order = None
                self.say("context_order_no")
            return
        if st.awaiting in ("confirm", "offer_handoff") and slots.confirmation is not None:
            st.misses = 0
            await self._answer_question(slots.confirmation)
            return
        if st.awaiting in ("order_choice", "order_number") and self._pick_order():
            st.misses = 0
            st.awaiting = None
            await self._run_intent(confirmed=False)
            return
        if st.awaiting == "problem_description":
            st.misses = 0
            await self._open_ticket(self.text)
            return

        if (
            slots.order_number
            and _only_a_number(self.text)
            and st.awaiting not in ("confirm", "offer_handoff")
        ):
            # A bare order number (typed, keyed on the phone pad, or said): continue the current
            # request with it, or look the order up when there is none.
            if st.intent is None and "order_status" in self.tm.intents:
                st.intent = "order_status"
            if st.intent is not None:
                st.misses = 0
                st.awaiting = None
                st.slots["order_number"] = slots.order_number
                await self._run_intent(confirmed=False)
                return
        classify_async = getattr(self.tm._classifier, "classify_async", None)
        match = await classify_async(self.text) if classify_async else self.tm._classifier.classify(self.text)
        self.match = match
        await self.work.record_event(
            "intent", {"intent": match.intent, "score": round(match.score, 3), "runner_up": match.runner_up}
        )
        if not match.matched or match.intent not in self.tm.intents:
            if st.awaiting == "confirm":
                self.replies.append("Shall I go ahead? Please answer yes or no.")
                return
            st.misses += 1
            if st.misses >= self.cfg.max_misses:
                await self._escalate("could not understand the request twice")
            else:
                self.say("clarify")
            return
        st.misses = 0
        if match.intent != st.intent:
            self._reset()
            st.intent = match.intent
        if slots.order_number:
            st.slots["order_number"] = slots.order_number
        await self._run_intent(confirmed=False)

    async def _run_intent(self, *, confirmed: bool) -> None:
        intent = self.intent
        if intent is None:
            self.say("clarify")
            return
        handler = {
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
        }.get(intent.action)
        self.action = intent.action
        if handler is not None and not await self.identity_allows(intent):
            self.action = None
            return
        if handler is None:
            await self.work.record_event("unknown_action", {"intent": intent.name, "action": intent.action})
            self._reset()
            self.say("clarify")
            return
        await handler(intent, confirmed)

    # ---- identity and order selection ---------------------------------------------------------
    async def _identify(self) -> bool:
        """A phone number or email given to identify: a claim, answered with a one-time code sent to
        the contact on file. The reply is the same whether or not the contact is on an account.
        True when the turn is finished."""
        slots, ctx = self.slots, self.ctx
        if ctx.identity.level == IdentityLevel.VERIFIED or not (slots.phone or slots.email):
            return False
        if (
            ctx.channel == Channel.VOICE
            and slots.phone
            and not slots.email
            and self.st.awaiting != "identify"
        ):
            return False  # digits said on a call are an order number or a code far more often
        await self.claim(phone=slots.phone, email=slots.email)
        return not _has_request(self.text)

    async def claim(self, *, phone: str | None = None, email: str | None = None) -> None:
        """The customer says who they are: remember the claim, send a code to the contact on file.
        Same words whether or not the contact is on an account (no enumeration)."""
        ctx = self.ctx
        customer = await self.biz.find_customer(phone=phone, email=email)
        by = "phone" if phone else "email"
        ctx.identity.claimed_ref = customer.ref if customer else None
        ctx.identity.raise_to(IdentityLevel.CLAIMED, f"said_{by}", ctx.now, None)
        ctx.customer = None
        await self.work.record_event(
            "identity_claimed", {"by": by, "matched": customer is not None, **ctx.identity.as_event()}
        )
        if self.st.awaiting == "identify":
            self.st.awaiting = None
        issue = await self._send_code(customer.ref if customer else None)
        if issue.status == "sent":
            kind = "phone number" if phone else "email"
            self.say("code_sent", kind=kind, how=self._how_to_give_code())

    # ---- verification ---------------------------------------------------------------------------
    def _how_to_give_code(self) -> str:
        if self.ctx.channel == Channel.VOICE:
            return "say the code or key it in on your phone"
        return "type the code here"

    async def _send_code(self, customer_ref: str | None) -> CodeIssue:
        """Issue a code for ``customer_ref`` (None: an unknown contact, nothing is sent) and text
        it to the phone or WhatsApp on file. Says why when no code could be issued."""
        codes = self.tm._codes
        if codes is None:
            await self.work.record_event("verification_unavailable", {})
            self.st.awaiting = "offer_handoff"
            self.st.pending = "a person to verify the customer"
            self.say("code_locked")
            return CodeIssue("unavailable")
        customer = await self.biz.get_customer(customer_ref) if customer_ref else None
        channel, to = self._code_destination(customer)
        issue = await codes.issue(
            conversation_id=self.ctx.conversation_id,
            customer_ref=customer.ref if customer and to else None,
            client=self.ctx.client,
            channel=str(channel) if to else None,
            now=self.ctx.now,
        )
        await self.work.record_event(
            "verification_code_issued", {"status": issue.status, "channel": str(channel) if to else None}
        )
        if issue.status == "rate_limited":
            self.say("code_rate_limited")
            return issue
        self.st.code_pending = True
        if issue.code is not None and to:
            await self.work.queue_private_text(
                OutboundText(
                    channel=channel,
                    to=to,
                    body=render("code_text", code=issue.code),
                    kind="verification_code",
                )
            )
        return issue

    @staticmethod
    def _code_destination(customer: Customer | None) -> tuple[Channel, str | None]:
        if customer is None:
            return Channel.SMS, None
        if customer.phone:
            return Channel.SMS, customer.phone
        if customer.whatsapp_id:
            return Channel.WHATSAPP, customer.whatsapp_id
        return Channel.SMS, None  # no phone on file: nothing to send a code to

    async def verification_step(self) -> bool:
        """While a code is pending: check a code the customer gave, or send a new one on request.
        Both engines call this before anything else; only the customer's own text verifies.
        True when the turn is finished."""
        st, ctx = self.st, self.ctx
        if not st.code_pending or ctx.identity.level == IdentityLevel.VERIFIED or self.tm._codes is None:
            return False
        code = code_in(self.text)
        if code is None:
            if wants_new_code(self.text):
                await self._send_code(ctx.identity.claimed_ref)
                if st.code_pending and self.replies == []:
                    self.say("code_sent", kind="contact", how=self._how_to_give_code())
                return True
            if self.slots.confirmation is not None and len(self.text.split()) <= 3 and st.intent:
                # "yes" to the question before the code: the code comes first
                self.say("code_pending", how=self._how_to_give_code())
                return True
            return False
        self.history_text = "[verification code]"  # a code never reaches a model's context
        result = await self.tm._codes.check(conversation_id=ctx.conversation_id, code=code, now=ctx.now)
        await self.work.record_event("verification_code_checked", {"result": result.status})
        if result.status == "ok" and result.customer_ref:
            customer = await self.biz.get_customer(result.customer_ref)
            if customer is not None:
                st.code_pending = False
                ctx.customer = customer
                ctx.identity.raise_to(IdentityLevel.VERIFIED, "one_time_code", ctx.now, customer.ref)
                await self.work.record_event("identity_verified", ctx.identity.as_event())
                self.say("verified", first_name=customer.first_name)
                if st.intent and self.intent and self.intent.action not in ("greeting", "goodbye"):
                    await self._run_intent(confirmed=False)
                else:
                    self.replies[-1] += " What can I do for you?"
                return True
        if result.status == "wrong":
            self.say("code_wrong")
        elif result.status == "locked":
            st.code_pending = False
            st.awaiting = "offer_handoff"
            st.pending = "a person to verify the customer (too many wrong codes)"
            self.say("code_locked")
        else:
            self.say("code_expired")
        return True

    async def identity_allows(self, intent: Intent) -> bool:
        """The one gate for account data and actions (both engines): True when the conversation's
        identity level is enough for ``intent``; otherwise asks for what is missing."""
        ctx, st = self.ctx, self.st
        need = required_level(intent)
        if satisfies(ctx.identity.level, need):
            if ctx.customer is None and ctx.identity.claimed_ref and need != IdentityLevel.ANONYMOUS:
                ctx.customer = await self.biz.get_customer(ctx.identity.claimed_ref)
            return True
        st.intent = intent.name
        await self.work.record_event(
            "identity_required", {"intent": intent.name, "need": str(need), "level": str(ctx.identity.level)}
        )
        if st.code_pending:
            self.say("code_pending", how=self._how_to_give_code())
        elif ctx.identity.claimed_ref:
            issue = await self._send_code(ctx.identity.claimed_ref)
            if issue.status == "sent":
                self.say("step_up_code_sent", how=self._how_to_give_code())
        else:
            st.awaiting = "identify"
            self.say("ask_identity")
        return False

    def _pick_order(self) -> bool:
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

    async def _order_for(self, preferred: Sequence[OrderStatus]) -> Order | None:
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
            self._reset()
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

    async def _answer_question(self, yes: bool) -> None:
        awaiting = self.st.awaiting
        self.st.awaiting = None
        if awaiting == "offer_handoff":
            if yes:
                await self._escalate(self.st.pending or "customer accepted the offer of a person")
            else:
                self._reset()
                self.say("offer_declined")
            return
        if yes:
            await self._run_intent(confirmed=True)
            return
        number = self.st.slots.get("order_number", "")
        action = self.intent.action if self.intent else ""
        await self.work.record_event("confirmation_declined", {"intent": self.st.intent, "order": number})
        self._reset()
        if action == "cancel_order":
            self.say("cancel_kept", number=number)
        elif action == "refund":
            self.say("refund_kept")
        else:
            self.say("offer_declined")

    # ---- actions --------------------------------------------------------------------------------
    async def _order_status(self, intent: Intent, confirmed: bool) -> None:
        order = await self._order_for(ACTIVE)
        if order is None:
            return
        await self.work.record_event("order_status", {"order": order.number, "status": str(order.status)})
        self.say(f"status_{order.status}", **order_values(order))
        self.st.done.append(f"told status of order {order.number} ({order.status})")
        self._reset()

    async def _cancel(self, intent: Intent, confirmed: bool) -> None:
        order = await self._order_for((OrderStatus.PLACED,))
        if order is None:
            return
        decision = check_cancel(order)
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
        self._reset()
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
        self._reset()
        self.say(key, **values)

    async def _refund(self, intent: Intent, confirmed: bool) -> None:
        order = await self._order_for((OrderStatus.DELIVERED,))
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
            self._reset()
            self.say(
                "refund_refused_already_refunded",
                **values | {"amount": money(order.refunded_cents, order.currency)},
            )
        else:
            hint = {
                OrderStatus.PLACED: " It hasn't shipped yet, so I can cancel it instead.",
                OrderStatus.SHIPPED: " Once it arrives I can refund it.",
            }.get(order.status, "")
            self._reset()
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
        label = await self.biz.create_return_label(fresh.number, now=now)
        await self.work.record_event(
            "return_label_created",
            {
                "order": fresh.number,
                "code": label.code,
                "warehouse_notified": label.warehouse_notified_at is not None,
            },
        )
        await self._text_customer(
            render("label_text", number=fresh.number, label_url=label.url, label_code=label.code),
            "return_label",
        )
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
        channel, address = self._text_channel()
        await self.work.schedule_followup(
            channel=channel,
            address=address,
            body=body,
            due_at=due,
            ticket_id=ticket.id,
            key=f"followup:refund:{fresh.number}",
        )
        self._reset()
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
        order = await self._order_for((OrderStatus.DELIVERED,))
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
            self._reset()
            self.say("label_refused", **order_values(order))
            return
        label = await self.biz.create_return_label(order.number, now=self.ctx.now)
        await self.work.record_event(
            "return_label_created",
            {
                "order": order.number,
                "code": label.code,
                "warehouse_notified": label.warehouse_notified_at is not None,
            },
        )
        await self._text_customer(
            render("label_text", number=order.number, label_url=label.url, label_code=label.code),
            "return_label",
        )
        self.st.done.append(f"return label {label.code} for order {order.number} texted")
        self._reset()
        self.say("label_done", number=order.number, label_code=label.code)

    async def _balance(self, intent: Intent, confirmed: bool) -> None:
        if self.ctx.customer is None:
            self.st.awaiting = "identify"
            self.say("ask_identity")
            return
        balance = await self.biz.get_balance(self.ctx.customer.ref)
        self._reset()
        self.say("balance", amount=money(balance.amount_cents, balance.currency))

    async def _faq(self, intent: Intent, confirmed: bool) -> None:
        self._reset()
        self.replies.append(intent.answer or intent.description or "Let me get someone to help with that.")

    async def _greeting(self, intent: Intent, confirmed: bool) -> None:
        self._reset()
        name = self.ctx.customer.first_name if self.ctx.customer else ""
        self.say("greeting", name_part=f" {name}" if name else "")

    async def _goodbye(self, intent: Intent, confirmed: bool) -> None:
        self._reset()
        name = self.ctx.customer.first_name if self.ctx.customer else ""
        self.say("goodbye", name_part=f", {name}" if name else "")

    async def _open_ticket_intent(self, intent: Intent, confirmed: bool) -> None:
        if len(self.text.split()) >= 6:
            await self._open_ticket(self.text)
        else:
            self.st.awaiting = "problem_description"
            self.say("ask_problem")

    async def _open_ticket(self, description: str) -> None:
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
        self._reset()
        self.say(
            "ticket_opened",
            ticket=ticket.protocol,
            queue=queue,
            sla=sla_text(intent.sla_first_response_minutes if intent else 60),
        )

    async def _handoff_intent(self, intent: Intent, confirmed: bool) -> None:
        await self._escalate("customer asked for a person")

    # ---- escalation ------------------------------------------------------------------------------
    async def _escalate(self, reason: str) -> None:
        ctx, st, now = self.ctx, self.st, self.ctx.now
        current = self.intent
        routing = (
            current if current and current.action not in ("handoff", "greeting", "goodbye", "faq") else None
        )
        routing = routing or next((i for i in self.tm.intents.values() if i.action == "handoff"), None)
        queue = routing.queue if routing else self.cfg.fallback_queue
        about = current or routing
        summary = three_line_summary(
            customer=ctx.customer, channel=ctx.channel, intent=about, state=st, reason=reason
        )
        first_minutes = routing.sla_first_response_minutes if routing else 60
        ticket = await self.work.open_ticket(
            subject=f"Handoff: {about.description if about else 'customer request'}"[:120],
            summary=summary,
            queue=queue,
            priority=higher_priority(str(routing.priority) if routing else "normal", st.priority_floor),
            first_response_due=now + timedelta(minutes=first_minutes),
            resolution_due=now + timedelta(minutes=routing.sla_resolution_minutes if routing else 1440),
        )
        ctx.ticket_id = ticket.id
        await self.work.request_handoff(queue=queue, priority=str(ticket.priority), ticket_id=ticket.id)
        ctx.owner = f"queue:{queue}"
        ctx.status = "escalated"
        ctx.next_step, ctx.next_step_due = f"{queue} team to respond", ticket.first_response_due
        await self.work.record_event("handoff", {"queue": queue, "ticket": ticket.protocol, "reason": reason})
        st.awaiting = None
        self.action = "handoff"  # whatever was running, this turn handed the conversation to people
        self.say("handoff", queue=queue, ticket=ticket.protocol, sla=sla_text(first_minutes))

    async def _while_with_people(self) -> None:
        owner = self.ctx.owner
        if owner.startswith("agent:") and self.ctx.channel != Channel.VOICE:
            # An agent is writing with the customer: the message goes to them live (the service
            # reports it after commit) and a bot line would only talk over the person. A caller
            # still hears the holding line below, so a phone line is never silent.
            await self.work.record_event("customer_message_to_agent", {"owner": owner})
            self.to_agent = True
            return
        ticket = await self.work.get_ticket(self.ctx.ticket_id) if self.ctx.ticket_id else None
        await self.work.record_event("customer_message_while_queued", {"owner": self.ctx.owner})
        queue = self.ctx.owner.split(":", 1)[1] if self.ctx.owner.startswith("queue:") else "support"
        self.say("handoff_pending", queue=queue, ticket=ticket.protocol if ticket else "pending")

    # ---- texts to the customer -------------------------------------------------------------------
    def _text_channel(self) -> tuple[Channel, str]:
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

    async def _text_customer(self, body: str, kind: str) -> None:
        channel, address = self._text_channel()
        await self.work.queue_text(OutboundText(channel=channel, to=address, body=body, kind=kind))
