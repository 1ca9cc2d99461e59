"""Warm transfer of a call to an agent who takes calls in the browser (the console's softphone).

Unlike the Twilio conference transfer (:mod:`telephony.transfer`), the caller never leaves their
own leg (a Twilio media stream or a browser call): the server rings the agent's console, then
relays audio between the caller's call session and the agent's WebRTC leg
(:class:`voice.bridge.AgentBridge`). No Twilio REST call is made. The steps:

1. the core handed the call off: the handoff is offered to an available agent whose setting
   says softphone (``agents.softphone``); none -> the phone transfer (when Twilio call control is
   on), else the assistant keeps the call as before;
2. the caller hears the hold line; the agent's console gets an ``offer`` event of kind
   ``voice``; they accept or decline through the desk's offer API; declined or unanswered within
   ``ring_seconds`` -> the next agent; nobody left -> the phone transfer, else an apology and a
   call back owed (the same fallback as phone transfers);
3. accepted: the console opens the agent's leg (``POST /webrtc/agent/offer``); the agent hears
   the ticket number and the summary while the caller hears a short hold line; then both are
   bridged;
4. mute, hold, hang up and hand back (to the assistant, which takes turns again on the same call)
   come from the agent's console; a lost agent leg hands the call back too.

Every step is a row of ``transfer_steps`` (the transfer has ``via = 'browser'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from crm_bridge.assignments import Assignment
from crm_bridge.queues import RoutingError
from crm_bridge.transfers import WAITING_FOR_AGENT, BrowserTransferStore
from pipeline.ports import Clock
from telephony.agent_leg import AgentLeg, checked_offer
from telephony.webrtc import OfferRefused
from voice.bridge import AgentBridge, BridgeError
from voice.call_ports import CallState, Detector, Synthesizer, Transcriber

log = logging.getLogger(__name__)


class BridgedSession(Protocol):
    """What a transfer needs of the caller's :class:`voice.call_session.CallSession`."""

    call_sid: str
    state: CallState

    async def bridge(self, bridge: Any) -> None: ...

    async def unbridge(self) -> None: ...

    async def announce(self, text: str, *, then_end: str | None = None) -> None: ...

    async def until_heard(self, timeout_s: float) -> None: ...

    async def send_to_caller(self, ulaw: bytes) -> None: ...


class BrowserOffers(Protocol):
    """What a browser transfer needs of :class:`crm_bridge.routing.Routing`."""

    async def offer_to_browser_agent(
        self, conversation_id: int, *, exclude: list[int] | None = None
    ) -> Assignment | None: ...

    async def accept(self, assignment_id: int, agent_id: int) -> Assignment: ...

    async def decline(self, assignment_id: int, agent_id: int) -> Assignment: ...

    async def hand_back(self, conversation_id: int, agent_id: int) -> Assignment | None: ...


class AgentEvents(Protocol):
    """The agents' live events (:class:`crm_bridge.desk.AgentDesk`)."""

    async def publish(self, agent_id: int, event: dict[str, Any]) -> None: ...

    def subscribe(self, agent_id: int) -> asyncio.Queue[dict[str, Any]]: ...

    def unsubscribe(self, agent_id: int, queue: asyncio.Queue[dict[str, Any]]) -> None: ...

    async def customer_message(self, conversation_id: int, seq: int, text: str) -> None: ...


@dataclass(frozen=True)
class Speech:
    """Per-leg speech pieces: the agent's detector and transcriber, the briefing voice."""

    detector: Callable[[], Detector]
    transcriber: Callable[[], Transcriber]
    synthesizer: Callable[[], Synthesizer]


@dataclass(frozen=True)
class BrowserTransferConfig:
    ring_seconds: float = 20.0
    leg_timeout_s: float = 20.0  # accepted -> the agent's leg connected
    callback_minutes: int = 30
    hold_message: str = "Please hold while I connect you with a member of our team."
    connecting_message: str = "Connecting you now."
    handed_back: str = "You're back with our assistant. What else can I help you with?"
    apology: str = (
        "I'm sorry, everyone on our team is busy right now. Your ticket is saved and someone will call you back "
        "within {minutes} minutes. Goodbye."
    )
    ice_servers: list[dict[str, Any]] = field(default_factory=list)


class ControlRefused(Exception):
    """A request about a browser transfer was refused; ``status`` and ``code`` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class BrowserCallTransfer:
    """One call being transferred to (or bridged with) a browser agent."""

    transfer_id: int
    call_sid: str
    conversation_id: int
    ticket_id: int | None
    session: BridgedSession
    bridge: AgentBridge
    caller_rate: int
    offer: Assignment | None = None
    accepted: bool = False
    leg: AgentLeg | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # something for the runner to look at
    finish: str | None = None  # "hand_back" | "hangup" | "agent_leg_lost", asked by the agent
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str = ""

    @property
    def agent_id(self) -> int | None:
        return self.offer.agent_id if self.offer is not None else None


class BrowserTransfers:
    """Runs browser transfers of this process; owns their tasks (see :meth:`aclose`).

    Args:
        find_session: the running call session of a call SID in this process, or None.
        phone_transfer: ``(call_sid, conversation_id)`` starts the Twilio conference transfer
            (None without Twilio call control).
        now: wall clock for stored rows.
    """

    def __init__(
        self,
        store: BrowserTransferStore,
        routing: BrowserOffers,
        events: AgentEvents,
        speech: Speech,
        clock: Clock,
        *,
        find_session: Callable[[str], BridgedSession | None],
        phone_transfer: Callable[[str, int], Awaitable[None]] | None = None,
        redact: Callable[[str], str] = lambda text: text,
        config: BrowserTransferConfig | None = None,
    ) -> None:
        self._store = store
        self._routing = routing
        self._events = events
        self._speech = speech
        self._clock = clock
        self._find_session = find_session
        self._phone_transfer = phone_transfer
        self._redact = redact
        self.config = config or BrowserTransferConfig()
        self.by_assignment: dict[int, BrowserCallTransfer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- start ----------------------------------------------------------------------------------
    async def on_handoff(self, call_sid: str, conversation_id: int, *, caller_rate: int) -> None:
        """The call session's hook after the handoff line was heard (``caller_rate``: 8000 for a
        Twilio media stream, 16000 for a browser caller's line)."""
        session = self._find_session(call_sid)
        offer = await self._routing.offer_to_browser_agent(conversation_id) if session is not None else None
        if session is None or offer is None:
            await self._not_ours(session, call_sid, conversation_id)
            return
        now = self._clock.now()
        created = await self._store.create(
            call_sid=call_sid,
            conversation_id=conversation_id,
            ticket_id=offer.ticket_id,
            queue=offer.queue,
            name_for=lambda transfer_id: f"cl-browser-{transfer_id}",
            now=now,
            via="browser",
        )
        if created is None:  # this call already has a live transfer
            await self._release(offer)
            return
        call = BrowserCallTransfer(
            created[0],
            call_sid,
            conversation_id,
            offer.ticket_id,
            session,
            self._new_bridge(call_sid, conversation_id, session, caller_rate),
            caller_rate,
        )
        await session.bridge(call.bridge)
        await session.announce(self.config.hold_message)
        task = asyncio.create_task(self._run_logged(call, offer), name=f"browser-transfer-{call.transfer_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _not_ours(self, session: BridgedSession | None, call_sid: str, conversation_id: int) -> None:
        """No browser agent: the phone transfer, or the assistant keeps the call (the handoff waits)."""
        if self._phone_transfer is not None:
            await self._phone_transfer(call_sid, conversation_id)
        elif session is not None:
            await session.unbridge()

    def _new_bridge(
        self, call_sid: str, conversation_id: int, session: BridgedSession, caller_rate: int
    ) -> AgentBridge:
        async def caller_said(text: str) -> None:
            body = self._redact(text)
            stored = await self._store.said(
                conversation_id, sender="customer", body=body, kind="voice", now=self._clock.now()
            )
            await self._events.customer_message(conversation_id, stored.seq, body)

        async def agent_said(text: str) -> None:
            await self._store.said(
                conversation_id,
                sender="agent",
                body=self._redact(text),
                kind="agent_voice",
                now=self._clock.now(),
            )

        return AgentBridge(
            call_sid=call_sid,
            caller=session,
            caller_rate=caller_rate,
            store_caller_text=caller_said,
            store_agent_text=agent_said,
            detector=self._speech.detector(),
            stt=self._speech.transcriber(),
            tts=self._speech.synthesizer(),
        )

    # ---- the run of one transfer -----------------------------------------------------------------
    async def _run_logged(self, call: BrowserCallTransfer, offer: Assignment) -> None:
        try:
            await self._run(call, offer)
        except Exception:
            log.exception("browser transfer failed", extra={"transfer_id": call.transfer_id})
            with contextlib.suppress(Exception):
                await self._end_bridge(call, "failed")
                await call.session.unbridge()
        finally:
            if call.offer is not None:
                self.by_assignment.pop(call.offer.id, None)
            call.done.set()

    async def _run(self, call: BrowserCallTransfer, offer: Assignment | None) -> None:
        while offer is not None:
            answer = await self._ring(call, offer)
            if answer == "accepted":
                await self._take(call)
                return
            if answer == "caller_left":
                await self._abandon(call)
                return
            await self._release(offer)
            await self._store.step(
                call.transfer_id,
                "agent_" + answer,
                None,
                answer,
                {"agent": offer.agent_id},
                self._clock.now(),
            )
            await self._tell(offer, "withdrawn", reason=answer)
            self.by_assignment.pop(offer.id, None)
            call.offer = None
            offer = await self._routing.offer_to_browser_agent(call.conversation_id)
        await self._fallback(call)

    async def _ring(self, call: BrowserCallTransfer, offer: Assignment) -> str:
        """Ring ``offer``'s agent: ``accepted``, ``declined``, ``no_answer`` or ``caller_left``."""
        call.offer, call.accepted = offer, False
        self.by_assignment[offer.id] = call
        inbox = self._events.subscribe(offer.agent_id)
        try:
            await self._store.offered(
                call.transfer_id, offer=offer, ring_seconds=self.config.ring_seconds, now=self._clock.now()
            )
            ticket = await self._store.ticket_brief(call.ticket_id)
            await self._events.publish(
                offer.agent_id,
                {
                    "type": "offer",
                    "kind": "voice",
                    "assignment_id": offer.id,
                    "conversation_id": offer.conversation_id,
                    "ticket_id": offer.ticket_id,
                    "ticket": ticket["protocol"] if ticket else None,
                    "queue": offer.queue,
                    "ring_seconds": self.config.ring_seconds,
                    "at": offer.offered_at.isoformat(),
                },
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.ring_seconds
            while True:
                if call.accepted:
                    return "accepted"
                if call.bridge.caller_gone.is_set():
                    return "caller_left"
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return await self._settled(offer, "no_answer")
                status = await self._next_answer(inbox, call, offer.id, remaining)
                if status == "accepted":
                    call.accepted = True
                elif status in ("declined", "expired"):
                    return "declined"
        finally:
            self._events.unsubscribe(offer.agent_id, inbox)

    async def _next_answer(
        self,
        inbox: asyncio.Queue[dict[str, Any]],
        call: BrowserCallTransfer,
        assignment_id: int,
        within_s: float,
    ) -> str | None:
        """The agent's answer to the offer from their desk events, or None (woken, or timed out)."""
        call.wake.clear()
        getter = asyncio.ensure_future(inbox.get())
        waker = asyncio.ensure_future(call.wake.wait())
        gone = asyncio.ensure_future(call.bridge.caller_gone.wait())
        try:
            done, _ = await asyncio.wait(
                {getter, waker, gone}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (getter, waker, gone):
                task.cancel()
        if getter in done and not getter.cancelled():
            event = getter.result()
            if event.get("type") == "assignment" and event.get("assignment_id") == assignment_id:
                return str(event.get("status"))
        return None

    async def _settled(self, offer: Assignment, answer: str) -> str:
        """The ring time is over: withdraw the offer, unless it was accepted meanwhile."""
        try:
            await self._routing.decline(offer.id, offer.agent_id)
        except RoutingError:
            status = await self._store.assignment_status(offer.id)
            return "accepted" if status == "accepted" else "declined"
        return answer

    async def _release(self, offer: Assignment) -> None:
        """Give the handoff back to its queue (never to this agent again)."""
        with contextlib.suppress(RoutingError):  # declined or withdrawn already
            await self._routing.decline(offer.id, offer.agent_id)

    async def _tell(self, offer: Assignment, status: str, **data: Any) -> None:
        await self._events.publish(
            offer.agent_id,
            {
                "type": "voice",
                "assignment_id": offer.id,
                "conversation_id": offer.conversation_id,
                "status": status,
                **data,
            },
        )

    async def _take(self, call: BrowserCallTransfer) -> None:
        """The agent accepted: wait for their leg, brief them, bridge, then serve until the end."""
        offer = call.offer
        assert offer is not None
        await self._store.set_status(call.transfer_id, ("ringing",), "answered", self._clock.now())
        if not await self._leg_up(call):
            gone = call.bridge.caller_gone.is_set()
            await self._store.step(
                call.transfer_id,
                "agent_leg",
                None,
                "caller_left" if gone else "timeout",
                {},
                self._clock.now(),
            )
            if gone:
                await self._end_bridge(call, "abandoned")
            else:
                await self._hand_back(call, "agent_leg_timeout")
            return
        transfer = await self._store.load(call.transfer_id)
        assert transfer is not None
        await self._store.connected(transfer, self._clock.now())
        await call.session.announce(self.config.connecting_message)
        ticket = await self._store.ticket_brief(call.ticket_id)
        await call.bridge.brief(
            briefing(ticket["protocol"] if ticket else None, ticket["summary"] if ticket else "")
        )
        await call.session.until_heard(10.0)
        call.bridge.connect()
        await self._store.step(
            call.transfer_id, "bridged", None, "ok", {"agent": offer.agent_id}, self._clock.now()
        )
        await self._tell(offer, "bridged")
        while call.finish is None and not call.bridge.caller_gone.is_set():
            call.wake.clear()
            waker = asyncio.ensure_future(call.wake.wait())
            left = asyncio.ensure_future(call.bridge.caller_gone.wait())
            try:
                await asyncio.wait({waker, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
                left.cancel()
        if call.bridge.caller_gone.is_set() and call.finish is None:
            await self._end_bridge(call, "caller_left")
            await self._tell(offer, "ended", reason="caller_left")
        elif call.finish == "hangup":
            await self._end_bridge(call, "agent_hangup")
            await self._tell(offer, "ended", reason="agent_hangup")
            await call.session.announce("Thank you for calling. Goodbye.", then_end="agent_hangup")
        else:
            await self._hand_back(call, call.finish or "hand_back")

    async def _leg_up(self, call: BrowserCallTransfer) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.leg_timeout_s
        while not call.bridge.caller_gone.is_set():
            if call.leg is not None and call.leg.connected.is_set():
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            call.wake.clear()
            waits = {
                asyncio.ensure_future(call.wake.wait()),
                asyncio.ensure_future(call.bridge.caller_gone.wait()),
            }
            if call.leg is not None:
                waits.add(asyncio.ensure_future(call.leg.connected.wait()))
            try:
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
        return False

    async def _end_bridge(self, call: BrowserCallTransfer, outcome: str) -> None:
        call.outcome = outcome
        await call.bridge.end()
        status = "abandoned" if outcome == "abandoned" else "completed"
        await self._store.set_status(
            call.transfer_id, ("dialing", "ringing", "answered", "connected"), status, self._clock.now()
        )
        await self._store.step(call.transfer_id, "ended", None, outcome, {}, self._clock.now())

    async def _hand_back(self, call: BrowserCallTransfer, reason: str) -> None:
        """The assistant takes the call again (the agent handed it back, or their leg was lost)."""
        offer = call.offer
        await self._end_bridge(call, reason)
        if offer is not None:
            with contextlib.suppress(RoutingError):
                await self._routing.hand_back(call.conversation_id, offer.agent_id)
            await self._tell(offer, "ended", reason=reason)
        await self._store.said(
            call.conversation_id,
            sender="bot",
            body=self.config.handed_back,
            kind="handback",
            now=self._clock.now(),
        )
        await call.session.unbridge()
        await call.session.announce(self.config.handed_back)

    async def _abandon(self, call: BrowserCallTransfer) -> None:
        if call.offer is not None:
            await self._release(call.offer)
            await self._tell(call.offer, "withdrawn", reason="caller_left")
        await self._end_bridge(call, "abandoned")

    async def _fallback(self, call: BrowserCallTransfer) -> None:
        """Nobody in the browser took it: agents' phones (Twilio), else an apology and a call back."""
        now = self._clock.now()
        call.outcome = "fallback"
        await call.bridge.end()
        t = await self._store.set_status(call.transfer_id, WAITING_FOR_AGENT, "fallback", now)
        await call.session.unbridge()
        if self._phone_transfer is not None:
            await self._store.step(call.transfer_id, "to_phone_agents", None, "started", {}, now)
            call.session.state = CallState.ENDING  # the conference transfer moves the call
            await self._phone_transfer(call.call_sid, call.conversation_id)
            return
        if t is not None:
            due = now + timedelta(minutes=self.config.callback_minutes)
            await self._store.schedule_callback(t, due=due, now=now)
        await call.session.announce(
            self.config.apology.format(minutes=self.config.callback_minutes), then_end="transfer_fallback"
        )

    # ---- the agent's requests ----------------------------------------------------------------------
    def _holder(self, assignment_id: int, user_id: int) -> BrowserCallTransfer:
        call = self.by_assignment.get(assignment_id)
        if call is None or call.done.is_set():
            raise ControlRefused(404, "no_call", "no call is waiting for this assignment")
        if call.agent_id != user_id:
            raise ControlRefused(403, "not_your_call", "this call was offered to another agent")
        return call

    async def open_leg(self, assignment_id: int, user_id: int, offer: dict[str, Any]) -> dict[str, str]:
        """The agent's console opens their leg of an offered (or accepted) voice call.

        Raises:
            ControlRefused: no such call (404), another agent's (403), the offer was withdrawn
                or the leg is open already (409).
            OfferRefused: the SDP offer is not usable (400).
        """
        call = self._holder(assignment_id, user_id)
        if call.leg is not None:
            raise ControlRefused(409, "leg_open", "this call's audio is already connected")
        description = checked_offer(offer)
        if not call.accepted:
            try:
                await self._routing.accept(assignment_id, user_id)
            except RoutingError as e:
                raise ControlRefused(409, e.code, str(e)) from None
            call.accepted = True
        leg = AgentLeg(
            call.caller_rate, ice_servers=self.config.ice_servers, on_closed=lambda _: self._leg_lost(call)
        )
        try:
            answer = await leg.answer(description, call.bridge.agent_audio)
            call.bridge.attach(leg)
        except (OfferRefused, BridgeError):
            await leg.close()
            call.wake.set()
            raise
        call.leg = leg
        call.wake.set()
        return {**answer, "assignment_id": str(assignment_id)}

    async def _leg_lost(self, call: BrowserCallTransfer) -> None:
        if call.finish is None:
            call.finish = "agent_leg_lost"
            call.wake.set()

    def control(self, assignment_id: int, user_id: int, action: str, on: bool = True) -> dict[str, Any]:
        """``mute``/``hold`` (``on``), ``hangup`` or ``hand_back`` from the call's agent.

        Raises:
            ControlRefused: not their call (403/404), or not bridged (409).
        """
        call = self._holder(assignment_id, user_id)
        try:
            if action == "mute":
                call.bridge.set_muted(on)
            elif action == "hold":
                call.bridge.set_held(on)
            elif action in ("hangup", "hand_back"):
                if call.bridge.stage not in ("briefing", "bridged") or call.finish is not None:
                    raise BridgeError("not_bridged", "the call is not bridged")
                call.finish = action
                call.wake.set()
            else:
                raise ControlRefused(400, "bad_action", f"unknown action {action!r}")
        except BridgeError as e:
            raise ControlRefused(409, e.code, str(e)) from None
        return state_of(call)

    async def finished(self, assignment_id: int, timeout_s: float = 15.0) -> BrowserCallTransfer | None:
        """Wait (bounded) until the transfer of ``assignment_id`` is done."""
        call = self.by_assignment.get(assignment_id)
        if call is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.done.wait(), timeout_s)
        return call

    async def aclose(self) -> None:
        for call in list(self.by_assignment.values()):
            call.bridge.caller_gone.set()
            call.wake.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for task in list(self._tasks):
            task.cancel()


def state_of(call: BrowserCallTransfer) -> dict[str, Any]:
    """A transfer as the console sees it."""
    return {
        "assignment_id": call.offer.id if call.offer else None,
        "conversation_id": call.conversation_id,
        "stage": call.bridge.stage,
        "muted": call.bridge.muted,
        "held": call.bridge.held,
    }


def briefing(ticket: str | None, summary: str) -> str:
    """What the agent hears before the caller: the ticket number and the (three-line) summary."""
    lines = [line.strip() for line in (summary or "").splitlines() if line.strip()][:3]
    head = f"Ticket {ticket}." if ticket else "No ticket was opened."
    return " ".join([head, *(line if line.endswith((".", "?", "!")) else line + "." for line in lines)])


__all__ = [
    "BrowserCallTransfer",
    "BrowserTransferConfig",
    "BrowserTransfers",
    "ControlRefused",
    "Speech",
    "briefing",
    "state_of",
]
