"""One turn of the embedded engine: :class:`Turn`, the public actions API both engines use.

:meth:`pipeline.turn_manager.TurnManager.new_turn` starts one; the embedded engine calls
:meth:`Turn.run`, and the LLM engine's tools call the actions one by one
(:meth:`Turn.run_action`, :meth:`Turn.open_ticket`, :meth:`Turn.escalate`, :meth:`Turn.claim`,
:meth:`Turn.verification_step`); :meth:`pipeline.turn_manager.TurnManager.finish` closes it.
"""

from __future__ import annotations

from pipeline.model import Channel, Intent, Priority
from pipeline.turn_actions import BusinessActions
from pipeline.turn_engine import MoodScorer, higher_priority
from pipeline.turn_identity import IdentitySteps
from pipeline.turn_state import HANDOFF_ACTIONS


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


class Turn(IdentitySteps, BusinessActions):
    """One turn's working state and actions: keeps the engine itself stateless."""

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
        if self.ctx.owner != "ai" or self.st.awaiting is not None or self.action in HANDOFF_ACTIONS:
            return
        self.st.awaiting = "offer_handoff"
        self.st.pending = why
        self.say("frustration_offer")

    # ---- the turn ---------------------------------------------------------------------------
    async def run(self) -> None:
        """The embedded engine's whole turn: questions pending, identity, intent, action."""
        st, slots = self.st, self.slots
        if self.ctx.owner != "ai":
            await self._while_with_people()
            return
        if await self.verification_step():
            return
        if await self.identify_from_message():
            return
        if slots.wants_person:
            await self.escalate("customer asked for a person")
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
        if st.awaiting in ("order_choice", "order_number") and self.pick_order():
            st.misses = 0
            st.awaiting = None
            await self.run_intent(confirmed=False)
            return
        if st.awaiting == "problem_description":
            st.misses = 0
            await self.open_ticket(self.text)
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
                await self.run_intent(confirmed=False)
                return
        classify_async = getattr(self.tm.classifier, "classify_async", None)
        match = await classify_async(self.text) if classify_async else self.tm.classifier.classify(self.text)
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
                await self.escalate("could not understand the request twice")
            else:
                self.say("clarify")
            return
        st.misses = 0
        if match.intent != st.intent:
            self.reset()
            st.intent = match.intent
        if slots.order_number:
            st.slots["order_number"] = slots.order_number
        await self.run_intent(confirmed=False)

    async def run_intent(self, *, confirmed: bool) -> None:
        """Run the current intent's action behind the identity gate.

        Args:
            confirmed: the customer said yes to exactly this action in their own message (an
                intent whose policy asks for confirmation acts only then).
        """
        intent = self.intent
        if intent is None:
            self.say("clarify")
            return
        handler = self.action_handler(intent.action)
        self.action = intent.action
        if handler is not None and not await self.identity_allows(intent):
            self.action = None
            return
        if handler is None:
            await self.work.record_event("unknown_action", {"intent": intent.name, "action": intent.action})
            self.reset()
            self.say("clarify")
            return
        await handler(intent, confirmed)

    async def run_action(self, intent: Intent, *, confirmed: bool, order_number: str | None = None) -> None:
        """Make ``intent`` the current request (a new one starts afresh) and run its action.

        The LLM engine's action tools come here: the action runs exactly as in the embedded
        engine, behind the same identity gate and policy checks.

        Args:
            intent: the intent whose action to run.
            confirmed: the customer's own message confirmed exactly this action.
            order_number: the order to act on, if known.
        """
        if self.st.intent != intent.name:
            self.reset()
            self.st.intent = intent.name
        if order_number is not None:
            self.st.slots["order_number"] = order_number
        await self.run_intent(confirmed=confirmed)

    async def _answer_question(self, yes: bool) -> None:
        awaiting = self.st.awaiting
        self.st.awaiting = None
        if awaiting == "offer_handoff":
            if yes:
                await self.escalate(self.st.pending or "customer accepted the offer of a person")
            else:
                self.reset()
                self.say("offer_declined")
            return
        if yes:
            await self.run_intent(confirmed=True)
            return
        number = self.st.slots.get("order_number", "")
        action = self.intent.action if self.intent else ""
        await self.work.record_event("confirmation_declined", {"intent": self.st.intent, "order": number})
        self.reset()
        if action == "cancel_order":
            self.say("cancel_kept", number=number)
        elif action == "refund":
            self.say("refund_kept")
        else:
            self.say("offer_declined")

    # ---- while people own the conversation ------------------------------------------------------
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
