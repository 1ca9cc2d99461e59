"""The conversation service: one inbound text in, durable turn and replies out.

It ties a channel message to its conversation, lets the turn manager act, and commits the
inbound message, the replies and every side effect together *before* the replies are handed back
to the channel. A failing business system never loses the customer's message: the turn's side
effects roll back to a savepoint and the customer gets an honest apology.

A turn holds no lock while it thinks: the store reads the conversation, the engine decides, and
the commit checks that nobody changed the conversation meanwhile. If somebody did, the store
raises :class:`TurnConflict` and the whole turn runs again on the fresh state (at most
``MAX_ATTEMPTS`` times); business actions are idempotent, so a re-run finds them done. What a
caller already heard of a lost attempt is not streamed again. Voice and text turns have separate
concurrency budgets, so a burst of chats never delays a caller's turn.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from pipeline.identity import IdentityLevel
from pipeline.model import Channel
from pipeline.ports import BusinessError, BusinessSystem, Clock, TurnWork
from pipeline.redaction import Redactor
from pipeline.turn_engine import TurnContext, TurnEngine
from pipeline.turn_redaction import TurnRedactor, replace_span

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # a turn that loses its version check this often gives up (TurnConflict)

APOLOGY = (
    "Sorry, I can't reach our order system right now, so nothing has been changed. "
    "Please try again in a minute, or say 'agent' to reach a person."
)


@dataclass(frozen=True)
class StoredMessage:
    conversation_id: int
    seq: int
    sender: str
    body: str
    created_at: datetime
    kind: str = "message"


@dataclass
class Reply:
    conversation_id: int
    duplicate: bool
    messages: list[StoredMessage] = field(default_factory=list)
    outbox_ids: list[int] = field(default_factory=list)
    intent: str | None = None  # the action run this turn; "goodbye" ends a call
    # False when the core did not understand the message (no intent matched, no action ran, the
    # reply asks again); None when it did not classify it (a slot answer, the LLM engine).
    understood: bool | None = None

    @property
    def texts(self) -> list[str]:
        return [m.body for m in self.messages]


class TurnConflict(Exception):
    """The conversation changed between a turn's load and its commit; nothing was written."""

    def __init__(self, conversation_id: int) -> None:
        super().__init__(f"conversation {conversation_id} changed during the turn")
        self.conversation_id = conversation_id


class OpenTurn(Protocol):
    """A turn in progress (see ``ConversationStore.turn``): what it records is buffered and
    written when the ``turn`` block exits."""

    duplicate: bool
    context: TurnContext
    customer_ref: str | None
    outbox_ids: list[int]
    inbound_seq: int | None  # the stored inbound message of this turn (None: no text, duplicate)

    @property
    def work(self) -> TurnWork:
        """Where the engine records the turn's side effects (read-only: any TurnWork will do)."""
        ...

    def savepoint(self) -> AbstractAsyncContextManager[None]: ...

    async def reply(self, texts: Sequence[str]) -> list[StoredMessage]: ...

    async def duplicate_replies(self) -> list[StoredMessage]: ...

    async def rewrite_message(self, seq: int, rewrite: Callable[[str], str]) -> tuple[str, str] | None:
        """Replace the body of customer message ``seq`` (this turn's or an earlier one) by
        ``rewrite(body)`` when this turn commits; ``(old, new)`` bodies, None if not found."""
        ...


class ConversationStore(Protocol):
    def turn(
        self,
        *,
        channel: Channel,
        address: str,
        text: str | None,
        external_id: str | None,
        now: datetime,
        kind: str = "message",
    ) -> AbstractAsyncContextManager[OpenTurn]:
        """Open (or create) the conversation for ``channel``/``address``, append the inbound
        message (none when ``text`` is None), and commit everything at exit, only if the
        conversation did not change since it was read: otherwise nothing is written and
        :class:`TurnConflict` is raised (the caller runs the turn again)."""
        ...

    async def mark_interrupted(self, conversation_id: int, seq: int, heard: str, now: datetime) -> None:
        """Cut a stored bot message to what the caller heard and flag it interrupted."""
        ...


class ConversationService:
    """Handles inbound texts from any channel with the same core.

    Args:
        after_commit: called with a committed reply that queued outbox texts (to send them now).
        on_customer_message: called after commit with ``(conversation_id, seq, text)`` for a
            customer message that an agent who owns the conversation must see (the core gives
            no reply then). A failing hook is logged; the message is stored either way.
        redactor: applied to every inbound text before it is stored or reaches the turn
            manager (card numbers by default), so transcripts, the search index, summaries and
            the LLM's context only ever see the redacted text. A :class:`TurnRedactor` built on
            it adds what only the conversation knows (a payment context, a card split over
            turns) and rewrites an earlier stored fragment when the turn commits.
        voice_turns: how many call turns (greetings included) may run at once.
        text_turns: how many text turns (WhatsApp, SMS, web chat) may run at once. A turn
            holds no database connection while it thinks, so these budgets bound work in
            flight (engine, LLM calls), not the pool; a turn over budget waits for a slot.
    """

    def __init__(
        self,
        store: ConversationStore,
        turns: TurnEngine,
        business: BusinessSystem,
        clock: Clock,
        *,
        after_commit: Callable[[Reply], Awaitable[None]] | None = None,
        on_customer_message: Callable[[int, int, str], Awaitable[None]] | None = None,
        redactor: Redactor | None = None,
        voice_turns: int = 50,
        text_turns: int = 200,
    ) -> None:
        self._store = store
        self._budgets = {"voice": asyncio.Semaphore(voice_turns), "text": asyncio.Semaphore(text_turns)}
        self.redactor = redactor if redactor is not None else Redactor()
        self.turn_redactor = TurnRedactor(self.redactor)
        self._turns = turns
        self._business = business
        self._clock = clock
        self._after_commit = after_commit
        self._on_customer_message = on_customer_message

    async def open_call(
        self,
        call_sid: str,
        caller: str | None,
        *,
        caller_attested: bool = False,
        continues: tuple[Channel, str] | None = None,
    ) -> Reply:
        """Start the conversation of a phone call and return its greeting (stored, like any reply).

        A caller ID that matches the phone on file only *claims* the account (caller ID can be
        spoofed; ``caller_attested`` records a full SHAKEN/STIR attestation, still a claim).
        ``continues``: the ``(channel, address)`` of a conversation the call continues (a browser
        call from the chat page): the greeting is stored there, not in a conversation of its own."""
        now = self._clock.now()
        channel, address = continues or (Channel.VOICE, call_sid)
        async with self._budgets["voice"]:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    return await self._greeting_turn(channel, address, caller, caller_attested, now)
                except TurnConflict as e:
                    self._conflict(e, attempt)
        raise AssertionError("unreachable")

    async def _greeting_turn(
        self, channel: Channel, address: str, caller: str | None, caller_attested: bool, now: datetime
    ) -> Reply:
        async with self._store.turn(
            channel=channel, address=address, text=None, external_id=None, now=now
        ) as turn:
            ctx = turn.context
            if caller is not None or channel == Channel.VOICE:
                ctx.state.caller_phone = caller
            try:
                claimed = await self._business.find_customer(phone=caller) if caller else None
                if claimed is not None:
                    method = "caller_id_attested" if caller_attested else "caller_id"
                    ctx.identity.raise_to(IdentityLevel.CLAIMED, method, now, claimed.ref)
                    await turn.work.record_event(
                        "identity_claimed", {"by": method, **ctx.identity.as_event()}
                    )
                async with turn.savepoint():
                    greeting = await self._turns.greet_call(ctx, turn.work)
            except BusinessError as e:
                log.warning(
                    "business system failed during call greeting",
                    extra={"conversation_id": ctx.conversation_id, "code": e.code},
                )
                ctx.customer = None
                greeting = ["Thanks for calling. How can I help you today?"]
            stored = await turn.reply(greeting)
            return Reply(ctx.conversation_id, duplicate=False, messages=stored)

    async def mark_interrupted(self, conversation_id: int, seq: int, heard: str) -> None:
        await self._store.mark_interrupted(conversation_id, seq, heard, self._clock.now())

    async def handle_text(
        self,
        channel: Channel,
        address: str,
        text: str,
        *,
        external_id: str | None = None,
        kind: str = "message",
        speak: Callable[[str], Awaitable[None]] | None = None,
        stream: Callable[[str], Awaitable[None]] | None = None,
        channel_signed: bool = False,
        client: str | None = None,
    ) -> Reply:
        """Run one customer turn. Duplicate deliveries (same ``external_id``) change nothing.

        ``channel_signed``: the message came in a request signed by the channel provider (a
        Twilio-signed SMS/WhatsApp webhook), so its ``address`` is proven; a customer whose phone
        or WhatsApp on file equals it is verified by the channel. ``client``: the sender's network
        address (web chat), used to rate limit one-time codes.

        Calls only: ``speak`` lets the turn manager say a filler while a slow answer is coming;
        ``stream`` speaks the reply's first sentences before the turn is done (the stored reply
        starts with them).
        """
        now = self._clock.now()
        text = self.redactor.redact(text.strip())
        heard = _Heard(speak, stream)
        async with self._budgets["voice" if channel == Channel.VOICE else "text"]:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    reply, to_agent, inbound_seq, text_seen = await self._text_turn(
                        channel, address, text, external_id, kind, now, heard, channel_signed, client
                    )
                    break
                except TurnConflict as e:
                    self._conflict(e, attempt)
                    heard.next_attempt()
        if self._after_commit is not None and reply.outbox_ids:
            await self._after_commit(reply)
        if to_agent and inbound_seq is not None and self._on_customer_message is not None:
            try:
                await self._on_customer_message(reply.conversation_id, inbound_seq, text_seen)
            except Exception:  # the message is stored; the agent sees it in the transcript
                log.exception(
                    "customer message hook failed", extra={"conversation_id": reply.conversation_id}
                )
        return reply

    @staticmethod
    def _conflict(e: TurnConflict, attempt: int) -> None:
        """Log a lost version check; re-raise once the attempts are used up."""
        extra = {"conversation_id": e.conversation_id, "attempt": attempt}
        if attempt >= MAX_ATTEMPTS:
            log.warning("turn gave up after conflicts", extra=extra)
            raise e
        log.info("turn conflict: running the turn again on the fresh state", extra=extra)

    async def _text_turn(
        self,
        channel: Channel,
        address: str,
        text: str,
        external_id: str | None,
        kind: str,
        now: datetime,
        heard: _Heard,
        channel_signed: bool,
        client: str | None,
    ) -> tuple[Reply, bool, int | None, str]:
        """One attempt of a customer turn: (reply, to_agent, inbound seq, text the core saw)."""
        async with self._store.turn(
            channel=channel, address=address, text=text, external_id=external_id, now=now, kind=kind
        ) as turn:
            ctx = turn.context
            if turn.duplicate:
                return Reply(ctx.conversation_id, duplicate=True), False, None, text
            ctx.speak, ctx.stream, ctx.client = heard.speak, heard.stream, client
            text = await self._redact_in_context(turn, text)
            saved_state = copy.deepcopy(ctx.state)
            to_agent = False
            understood: bool | None = None
            try:
                await self._attach_customer(turn, channel, address, channel_signed)
                async with turn.savepoint():
                    result = await self._turns.handle(ctx, text, turn.work)
                replies = result.replies
                action = result.action
                to_agent = result.to_agent
                if result.match is not None:
                    understood = result.match.matched or action is not None
            except BusinessError as e:
                action = None
                log.warning(
                    "business system failed during turn",
                    extra={"conversation_id": ctx.conversation_id, "code": e.code},
                )
                ctx.state = saved_state
                turn.outbox_ids.clear()
                await turn.work.record_event("turn_failed", {"code": e.code, "retryable": e.retryable})
                replies = [APOLOGY]
            ctx.state.redaction = self.turn_redactor.outbound(replies, ctx.state.redaction)
            stored = await turn.reply(replies)
            reply = Reply(
                ctx.conversation_id,
                duplicate=False,
                messages=stored,
                outbox_ids=list(turn.outbox_ids),
                intent=action,
                understood=understood,
            )
            return reply, to_agent, turn.inbound_seq, text

    async def _redact_in_context(self, turn: OpenTurn, text: str) -> str:
        """Apply the conversation's redaction to this turn's text (and to earlier fragments of a
        card it completes) before anything else sees it; returns the text the core works on."""
        state = turn.context.state
        result = self.turn_redactor.inbound(
            text, state.redaction, seq=turn.inbound_seq, awaiting=state.awaiting
        )
        if result.text != text and turn.inbound_seq is not None:
            await turn.rewrite_message(turn.inbound_seq, lambda _body: result.text)
        for seq, start, end in result.earlier:
            changed = await turn.rewrite_message(seq, functools.partial(replace_span, start=start, end=end))
            if changed is not None and changed[0] != changed[1]:
                old, new = changed
                # The LLM's context holds the same text: it must not carry the fragment either.
                for entry in state.history:
                    if entry.get("role") == "user" and entry.get("content") == old:
                        entry["content"] = new
                await turn.work.record_event("message_redacted", {"seq": seq, "reason": "card_fragment"})
        state.redaction = result.memory
        return result.text

    async def _attach_customer(self, turn: OpenTurn, channel: Channel, address: str, signed: bool) -> None:
        ctx = turn.context
        if turn.customer_ref:
            # An identified customer whose record can't be read gets the apology, not a new
            # identification question (BusinessError reaches handle_text).
            if ctx.owner == "ai":
                ctx.customer = await self._business.get_customer(turn.customer_ref)
            return
        if ctx.identity.level == IdentityLevel.VERIFIED or channel not in (Channel.WHATSAPP, Channel.SMS):
            return
        try:
            if channel == Channel.WHATSAPP:
                found = await self._business.find_customer(whatsapp_id=address, phone=address)
            else:
                found = await self._business.find_customer(phone=address)
        except BusinessError as e:  # the turn goes on; the customer can identify later
            log.warning(
                "customer lookup failed", extra={"conversation_id": ctx.conversation_id, "code": e.code}
            )
            return
        if found is None:
            return
        if signed:
            # A Twilio-signed webhook proves the message came from this number: the channel verifies.
            ctx.customer = found
            ctx.identity.raise_to(IdentityLevel.VERIFIED, f"{channel}_signed", ctx.now, found.ref)
            await turn.work.record_event("identity_verified", ctx.identity.as_event())
        elif ctx.identity.raise_to(IdentityLevel.CLAIMED, f"{channel}_unsigned", ctx.now, found.ref):
            await turn.work.record_event("identity_claimed", {"by": str(channel), **ctx.identity.as_event()})


class _Heard:
    """A caller's ``speak``/``stream`` across the attempts of one turn.

    A re-run turn must not say again what the caller already heard from a lost attempt: the
    filler is said once, and streamed sentences are skipped while they repeat, in order, what
    was streamed before (an engine given the same state mostly writes the same sentences).
    """

    def __init__(
        self, speak: Callable[[str], Awaitable[None]] | None, stream: Callable[[str], Awaitable[None]] | None
    ) -> None:
        self._speak, self._stream = speak, stream
        self._streamed: list[str] = []
        self._replaying: list[str] = []
        self.speak = speak
        self.stream = self._say if stream is not None else None

    async def _say(self, sentence: str) -> None:
        assert self._stream is not None
        if self._replaying and self._replaying[0] == sentence:
            self._replaying.pop(0)
            return
        self._replaying.clear()
        self._streamed.append(sentence)
        await self._stream(sentence)

    def next_attempt(self) -> None:
        self.speak = None
        self._replaying = list(self._streamed)
