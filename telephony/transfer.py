"""Warm transfer of a phone call to an agent's phone, through a Twilio conference.

After the bot has said the handoff line, :meth:`WarmTransfer.start` moves the caller's call (over
REST) into a named conference where they hear hold audio, then rings an available agent who has
a phone. The agent hears the ticket number and the 3-line summary before joining. Twilio's status
callbacks drive the rest:

* agent ``answered`` -> ``answered``; the agent's ``participant-join`` -> the agent owns the
  ticket and the conversation (:meth:`Routing.accept`), ``connected``;
* agent ``no-answer``/``busy``/``failed``/``canceled`` (or no callback within the ring time) ->
  the offer is declined and the next agent rings (never the same one twice);
* nobody left -> the caller hears an apology and a promised call back, the call ends, the ticket
  stays queued with its SLA, and a ``callbacks`` row is due in ``callback_minutes``.

Every step is stored in ``transfer_steps`` with its Twilio SIDs and outcome; callbacks are
idempotent on their natural keys. Moves are compare-and-set updates on ``transfers.status``,
so a late or repeated callback changes nothing. The rows live in
:class:`crm_bridge.transfers.TransferStore`; this module keeps the call control and the routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import asyncpg
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from crm_bridge.queues import RoutingError
from crm_bridge.transfers import WAITING_FOR_AGENT, Offers, TransferStore
from pipeline.ports import Clock
from telephony.transfer_twiml import (
    agent_briefing,
    apology_and_hangup,
    caller_conference,
    conference_name,
    hold_music,
)
from telephony.twilio_guard import TwilioGuard

log = logging.getLogger(__name__)
XML = "application/xml"

AGENT_EVENTS = ("initiated", "ringing", "answered", "completed")
NO_ANSWER = frozenset({"no-answer", "busy", "failed", "canceled"})
ANSWERED = frozenset({"answered", "in-progress"})


class CallControl(Protocol):
    """What a transfer needs of the telephony provider (:class:`telephony.call_control.TwilioCallControl`)."""

    async def redirect(self, call_sid: str, twiml: str) -> None: ...

    async def dial(
        self, *, to: str, from_: str, twiml: str, status_callback: str, events: Sequence[str], timeout_s: int
    ) -> str: ...

    async def cancel(self, call_sid: str) -> None: ...


@dataclass(frozen=True)
class TransferConfig:
    """Settings of warm transfers.

    Attributes:
        base_url: public base URL of this server (Twilio calls the hold and callback URLs on it).
        caller_id: the number agents see (``TWILIO_SMS_FROM``); None: the number the customer called.
        ring_seconds: how long an agent's phone rings (Twilio's ``timeout``).
        ring_grace_s: extra wait for Twilio's final status before giving up on an agent ourselves.
        callback_minutes: when the promised call back is due after a failed transfer.
    """

    base_url: str
    caller_id: str | None = None
    ring_seconds: int = 20
    ring_grace_s: float = 15.0
    callback_minutes: int = 30
    hold_message: str = "Please hold while I connect you with a member of our team."
    apology: str = (
        "I'm sorry, everyone on our team is busy right now. Your ticket is saved and someone will call you back "
        "within {minutes} minutes. Goodbye."
    )


class TransferError(Exception):
    """A transfer step was refused; nothing changed."""


class WarmTransfer:
    """Runs warm transfers. One instance per process; owns its ring timers (see :meth:`aclose`)."""

    def __init__(
        self,
        store: TransferStore,
        routing: Offers,
        control: CallControl,
        clock: Clock,
        config: TransferConfig,
    ) -> None:
        self._store = store
        self._routing = routing
        self._control = control
        self._clock = clock
        self.config = config
        self._locks: dict[int, asyncio.Lock] = {}
        self._timers: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- URLs ---------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return self.config.base_url.rstrip("/") + path

    @property
    def hold_url(self) -> str:
        return self._url("/twilio/transfer/hold")

    # ---- lifecycle ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Cancel ring timers; wait (bounded) for transfer steps already running."""
        for task in list(self._timers.values()):
            task.cancel()
        for task in list(self._timers.values()):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._timers.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)

    @asynccontextmanager
    async def _serial(self, transfer_id: int) -> AsyncIterator[None]:
        """One step of a transfer at a time in this process (the DB updates guard across processes)."""
        lock = self._locks.setdefault(transfer_id, asyncio.Lock())
        async with lock:
            yield

    # ---- start --------------------------------------------------------------------------------
    async def on_handoff(self, call_sid: str, conversation_id: int) -> None:
        """The call session's hook after the handoff line was heard: start the transfer in a task
        this object owns (the session's stream ends as soon as the call is moved)."""
        task = asyncio.create_task(
            self._start_logged(call_sid, conversation_id), name=f"transfer-start-{call_sid}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def _start_logged(self, call_sid: str, conversation_id: int) -> None:
        try:
            await self.start(call_sid, conversation_id)
        except Exception:
            log.exception(
                "warm transfer failed to start",
                extra={"call_sid": call_sid, "conversation_id": conversation_id},
            )

    async def start(
        self, call_sid: str, conversation_id: int, ticket_id: int | None = None, queue: str | None = None
    ) -> int | None:
        """Move the caller into a conference on hold and ring the first agent.

        Returns the transfer id; None when the conversation has no open handoff, or when this call
        already has a live transfer (a repeated start changes nothing).
        """
        now = self._clock.now()
        handoff = await self._store.open_handoff(conversation_id)
        if handoff is not None:
            ticket_id = ticket_id if ticket_id is not None else handoff["ticket_id"]
            queue = queue or handoff["queue"]
        elif queue is None or ticket_id is None:
            log.warning(
                "no open handoff to transfer",
                extra={"call_sid": call_sid, "conversation_id": conversation_id},
            )
            return None
        created = await self._store.create(
            call_sid=call_sid,
            conversation_id=conversation_id,
            ticket_id=ticket_id,
            queue=queue,
            name_for=conference_name,
            now=now,
        )
        if created is None:
            return None
        transfer_id, name = created
        async with self._serial(transfer_id):
            twiml = caller_conference(
                name,
                hold_url=self.hold_url,
                status_callback=self._url(f"/twilio/transfer/conference?transfer={transfer_id}"),
            )
            try:
                await self._control.redirect(call_sid, twiml)
            except Exception as e:
                await self._set_status(transfer_id, ("dialing",), "failed")
                await self._store.step(
                    transfer_id,
                    "caller_to_conference",
                    call_sid,
                    "failed",
                    _error(e),
                    self._clock.now(),
                )
                log.warning(
                    "could not move the caller into the transfer conference",
                    extra={"transfer_id": transfer_id},
                )
                return transfer_id
            await self._store.step(
                transfer_id,
                "caller_to_conference",
                call_sid,
                "updated",
                {"conference": name},
                self._clock.now(),
            )
            await self._ring_next(transfer_id)
        return transfer_id

    # ---- ringing agents -----------------------------------------------------------------------
    async def _ring_next(self, transfer_id: int) -> None:
        """Offer the handoff to the next agent with a phone and ring them; fall back when none is left."""
        while True:
            t = await self._store.load(transfer_id)
            if t is None or t["status"] not in WAITING_FOR_AGENT:
                return
            offer = await self._routing.offer_to_phone_agent(
                t["conversation_id"], exclude=list(t["tried_agents"])
            )
            if offer is None:
                await self._fallback(transfer_id)
                return
            phone = await self._store.agent_phone(offer.agent_id)
            ticket = await self._store.ticket_brief(t["ticket_id"])
            called = await self._store.called_number(t["call_sid"])
            from_ = self.config.caller_id or called
            twiml = agent_briefing(
                t["conference_name"],
                ticket=ticket["protocol"] if ticket else "not opened",
                summary=ticket["summary"] if ticket else "",
            )
            callback = self._url(
                f"/twilio/transfer/agent-status?transfer={transfer_id}&assignment={offer.id}"
            )
            try:
                if not from_:
                    raise TransferError("no caller id for the agent call: set TWILIO_SMS_FROM")
                if not phone:
                    raise TransferError("the offered agent has no phone")
                agent_call = await self._control.dial(
                    to=phone,
                    from_=from_,
                    twiml=twiml,
                    status_callback=callback,
                    events=AGENT_EVENTS,
                    timeout_s=self.config.ring_seconds,
                )
            except Exception as e:
                await self._store.step(
                    transfer_id,
                    "agent_dial",
                    None,
                    "failed",
                    {"agent": offer.agent_id, "assignment": offer.id, **_error(e)},
                    self._clock.now(),
                )
                await self._release_offer(transfer_id, offer.id, offer.agent_id)
                continue
            await self._store.ringing(
                transfer_id,
                offer=offer,
                agent_call_sid=agent_call,
                ring_seconds=self.config.ring_seconds,
                now=self._clock.now(),
            )
            self._arm_timer(transfer_id, agent_call)
            return

    async def _release_offer(self, transfer_id: int, assignment_id: int | None, agent_id: int | None) -> None:
        """Give the handoff back to its queue (never to this agent again) and forget the agent."""
        if assignment_id is not None and agent_id is not None:
            try:
                await self._routing.decline(assignment_id, agent_id)
            except RoutingError as e:  # e.g. the offer already expired: the handoff waits anyway
                log.info("offer already closed", extra={"transfer_id": transfer_id, "code": e.code})
        await self._store.forget_agent(transfer_id, agent_id, self._clock.now())

    def _arm_timer(self, transfer_id: int, agent_call_sid: str) -> None:
        self._disarm(transfer_id)
        delay = self.config.ring_seconds + self.config.ring_grace_s
        self._timers[transfer_id] = asyncio.create_task(
            self._ring_timeout(transfer_id, agent_call_sid, delay), name=f"transfer-{transfer_id}-ring-timer"
        )

    def _disarm(self, transfer_id: int) -> None:
        task = self._timers.pop(transfer_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _ring_timeout(self, transfer_id: int, agent_call_sid: str, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._serial(transfer_id):
            if self._timers.get(transfer_id) is asyncio.current_task():
                del self._timers[transfer_id]
            t = await self._store.load(transfer_id)
            if t is None or t["agent_call_sid"] != agent_call_sid or t["status"] != "ringing":
                return
            await self._store.step(
                transfer_id,
                "ring_timeout",
                agent_call_sid,
                "no-answer",
                {"agent": t["agent_id"]},
                self._clock.now(),
            )
            try:
                await self._control.cancel(agent_call_sid)
            except Exception as e:
                await self._store.step(
                    transfer_id,
                    "agent_cancel",
                    agent_call_sid,
                    "failed",
                    _error(e),
                    self._clock.now(),
                )
            await self._release_offer(transfer_id, t["assignment_id"], t["agent_id"])
            await self._ring_next(transfer_id)

    # ---- fallback -----------------------------------------------------------------------------
    async def _fallback(self, transfer_id: int) -> None:
        now = self._clock.now()
        t = await self._set_status(transfer_id, WAITING_FOR_AGENT, "fallback")
        if t is None:
            return
        text = self.config.apology.format(minutes=self.config.callback_minutes)
        try:
            await self._control.redirect(t["call_sid"], apology_and_hangup(text))
            outcome, data = "updated", {}
        except Exception as e:  # the caller may have hung up already; the call back is owed either way
            outcome, data = "failed", _error(e)
        await self._store.step(transfer_id, "caller_apology", t["call_sid"], outcome, data, now)
        due = now + timedelta(minutes=self.config.callback_minutes)
        callback_id = await self._store.schedule_callback(t, due=due, now=now)
        if callback_id is None:
            return
        log.info(
            "warm transfer fell back to a call back",
            extra={"transfer_id": transfer_id, "callback_id": callback_id},
        )

    # ---- callbacks ----------------------------------------------------------------------------
    async def agent_status(self, transfer_id: int, assignment_id: int | None, params: dict[str, str]) -> None:
        """A status callback of an agent's call (``?transfer=&assignment=`` on its URL)."""
        call_sid, status = params.get("CallSid", ""), params.get("CallStatus", "")
        async with self._serial(transfer_id):
            t = await self._store.load(transfer_id)
            if t is None:
                return
            fresh = await self._store.step(
                transfer_id,
                "agent_status",
                call_sid,
                status,
                {"assignment": assignment_id, "duration": params.get("CallDuration")},
                self._clock.now(),
                dedupe_key=f"agent:{call_sid}:{status}",
            )
            current = t["agent_call_sid"] == call_sid and (
                assignment_id is None or t["assignment_id"] == assignment_id
            )
            if not fresh or not current:
                return
            if status in ANSWERED:
                await self._set_status(transfer_id, ("ringing",), "answered")
                self._disarm(transfer_id)
            elif status in NO_ANSWER or (status == "completed" and t["status"] in WAITING_FOR_AGENT):
                # Never answered, or hung up during the briefing: try the next agent.
                self._disarm(transfer_id)
                await self._release_offer(transfer_id, t["assignment_id"], t["agent_id"])
                await self._ring_next(transfer_id)
            elif status == "completed" and t["status"] == "connected":
                await self._set_status(transfer_id, ("connected",), "completed")

    async def conference_event(self, transfer_id: int, params: dict[str, str]) -> None:
        """A conference status callback (``start end join leave``) of a transfer's conference."""
        event = params.get("StatusCallbackEvent", "")
        conference_sid = params.get("ConferenceSid", "")
        participant = params.get("CallSid", "")
        async with self._serial(transfer_id):
            t = await self._store.load(transfer_id)
            if t is None or params.get("FriendlyName", t["conference_name"]) != t["conference_name"]:
                return
            fresh = await self._store.step(
                transfer_id,
                f"conference:{event}",
                conference_sid,
                "received",
                {"participant": participant or None},
                self._clock.now(),
                dedupe_key=f"conf:{conference_sid}:{event}:{participant}",
            )
            if not fresh:
                return
            if (
                event == "participant-join"
                and participant
                and participant == t["agent_call_sid"]
                and t["status"] in WAITING_FOR_AGENT
            ):
                await self._connect(t)
            elif (
                event == "participant-leave"
                and participant == t["call_sid"]
                and t["status"] in WAITING_FOR_AGENT
            ):
                await self._abandon(t)
            elif event == "conference-end" and t["status"] == "connected":
                await self._set_status(transfer_id, ("connected",), "completed")

    async def _connect(self, t: asyncpg.Record) -> None:
        self._disarm(t["id"])
        try:
            await self._routing.accept(t["assignment_id"], t["agent_id"])
        except RoutingError as e:
            await self._store.step(
                t["id"],
                "agent_accept",
                t["agent_call_sid"],
                "refused",
                {"code": e.code},
                self._clock.now(),
            )
            return
        await self._store.connected(t, self._clock.now())

    async def _abandon(self, t: asyncpg.Record) -> None:
        """The caller hung up while waiting: stop ringing; the handoff stays queued."""
        self._disarm(t["id"])
        if await self._set_status(t["id"], WAITING_FOR_AGENT, "abandoned") is None:
            return
        if t["agent_call_sid"]:
            try:
                await self._control.cancel(t["agent_call_sid"])
            except Exception as e:
                await self._store.step(
                    t["id"],
                    "agent_cancel",
                    t["agent_call_sid"],
                    "failed",
                    _error(e),
                    self._clock.now(),
                )
        if t["assignment_id"] is not None:
            try:
                await self._routing.decline(t["assignment_id"], t["agent_id"])
            except RoutingError:
                pass
        await self._store.step(t["id"], "caller_left", t["call_sid"], "abandoned", {}, self._clock.now())

    # ---- storage ------------------------------------------------------------------------------
    async def _set_status(self, transfer_id: int, from_: Sequence[str], to: str) -> asyncpg.Record | None:
        """Compare-and-set (see :meth:`TransferStore.set_status`); returns the row or None."""
        return await self._store.set_status(transfer_id, from_, to, self._clock.now())

    async def steps(self, transfer_id: int) -> list[dict[str, Any]]:
        """The stored steps of a transfer, oldest first."""
        return await self._store.steps(transfer_id)


def _error(e: BaseException) -> dict[str, Any]:
    return {"error": type(e).__name__, "status": getattr(e, "status", None), "code": getattr(e, "code", None)}


# ---- HTTP ----------------------------------------------------------------------------------------
def transfer_router(transfer: WarmTransfer, *, guard: TwilioGuard) -> APIRouter:
    """``POST /twilio/transfer/hold``, ``/twilio/transfer/agent-status`` and ``/twilio/transfer/conference``,
    each checked by the :class:`~telephony.twilio_guard.TwilioGuard` like the other Twilio webhooks."""
    router = APIRouter()
    _signed_form = guard.signed_form

    def _int(request: Request, name: str) -> int | None:
        try:
            return int(request.query_params[name])
        except (KeyError, ValueError):
            return None

    def _invalid(message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": "invalid_callback", "message": message}}, status_code=400)

    @router.post("/twilio/transfer/hold", tags=["twilio"])
    async def hold(request: Request) -> Response:
        _, refused = await _signed_form(request)
        if refused is not None:
            return refused
        return Response(hold_music(transfer.hold_url, message=transfer.config.hold_message), media_type=XML)

    async def _status_callback(
        request: Request,
        required: tuple[str, str],
        step: Callable[[int, dict[str, str]], Awaitable[None]],
    ) -> Response:
        """A signed status callback of transfer ``?transfer=``: 400 without it or a ``required``
        parameter, else ``step(transfer_id, params)`` runs (see :func:`_guarded`) and Twilio gets 204."""
        params, refused = await _signed_form(request)
        if refused is not None:
            return refused
        transfer_id = _int(request, "transfer")
        if transfer_id is None or not all(params.get(name) for name in required):
            return _invalid(f"transfer, {' and '.join(required)} are required")
        await _guarded(step(transfer_id, params), transfer_id)
        return Response(status_code=204)

    @router.post("/twilio/transfer/agent-status", tags=["twilio"])
    async def agent_status(request: Request) -> Response:
        assignment_id = _int(request, "assignment")
        return await _status_callback(
            request,
            ("CallSid", "CallStatus"),
            lambda transfer_id, params: transfer.agent_status(transfer_id, assignment_id, params),
        )

    @router.post("/twilio/transfer/conference", tags=["twilio"])
    async def conference(request: Request) -> Response:
        return await _status_callback(
            request, ("ConferenceSid", "StatusCallbackEvent"), transfer.conference_event
        )

    return router


async def _guarded(step: Awaitable[None], transfer_id: int) -> None:
    # A failing step is logged with the transfer id; Twilio gets 204 anyway (its retries would
    # repeat the same failure), and the stored steps show how far the transfer got.
    try:
        await step
    except Exception:
        log.exception("transfer callback failed", extra={"transfer_id": transfer_id})


def mount_transfer(app: FastAPI, transfer: WarmTransfer, *, guard: TwilioGuard) -> None:
    """Mount the webhooks of ``transfer`` (built by the composition root, see app/container.py)
    on ``app``, each checked by ``guard``."""
    app.include_router(transfer_router(transfer, guard=guard))
