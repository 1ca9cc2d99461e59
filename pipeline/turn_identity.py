"""Who the customer is, decided by code: claims, one-time codes and the identity gate.

Both engines run these steps (the LLM engine through its ``identify_customer`` tool and before
every model call): a phone number or email only *claims* an account; a one-time code sent to
the contact on file verifies it; account data and actions need the level the intent asks for.
"""

from __future__ import annotations

from pipeline.identity import CodeIssue, IdentityLevel, code_in, required_level, satisfies, wants_new_code
from pipeline.model import Channel, Customer, Intent, OutboundText
from pipeline.templates import render
from pipeline.turn_state import TurnState

_IDENTITY_WORDS = frozenset(
    "my the a an is it's its it this that here and phone number mobile cell email e-mail address on account "
    "i'm im i am me call at you can reach hi hello hey sure yes ok okay please find look up under "
    "with by for use try it's listed registered should be".split()
)


def _has_request(text: str) -> bool:
    """Whether a message that gave a phone number or email also asks for something."""
    words = [w.strip(".,!?:;()") for w in text.lower().split()]
    rest = [
        w
        for w in words
        if w and w not in _IDENTITY_WORDS and not any(ch.isdigit() for ch in w) and "@" not in w
    ]
    return len(rest) >= 2


class IdentitySteps(TurnState):
    """The identity and verification steps of a turn (see :class:`pipeline.turn.Turn`)."""

    async def identify_from_message(self) -> bool:
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
        codes = self.tm.codes
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
        if not st.code_pending or ctx.identity.level == IdentityLevel.VERIFIED or self.tm.codes is None:
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
        result = await self.tm.codes.check(conversation_id=ctx.conversation_id, code=code, now=ctx.now)
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
                    await self.run_intent(confirmed=False)
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
