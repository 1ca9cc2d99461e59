"""The agent console: ``GET /console``, its JSON API under ``/api/desk/...`` and ``WS /console/ws``.

The pages in ``web/console/`` are static, self-contained HTML+JS: no transcript text is ever
put into them on the server, and the scripts render everything with ``textContent``, so a
customer typing ``<script>`` or ``<img onerror=...>`` shows up as text. Every JSON route names
its roles with ``auth.require(...)`` (which also checks the CSRF token of cookie sessions on
changes); the socket admits the session cookie of a staff member only, refused before accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Depends, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from crm_bridge.access import AccessPolicy, Viewer
from crm_bridge.assignments import Assignment
from crm_bridge.desk import AgentDesk, callbacks_due, complete_callback
from crm_bridge.reports import Reports
from crm_bridge.routing import Conflict, NotFoundError, NotOwner, RoutingError, ValidationError
from crm_bridge.users import STAFF, User
from web.api import ApiError, readable_conversation, reader
from web.auth import SESSION_COOKIE, Authenticator
from web.shared_page_parts import inline_shared_parts

log = logging.getLogger(__name__)

PAGES = Path(__file__).resolve().parent / "console"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; media-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
WS_POLICY_VIOLATION = 1008


def page(name: str) -> HTMLResponse:
    """A static page of ``web/console/`` with the console's security headers.

    The pages share their head, one stylesheet and the script helpers (``console-head.html``,
    ``console.css`` and ``console.js`` of ``web/static/``); they are inlined into the page (the
    CSP allows inline styles and scripts only, so the pages stay self-contained).
    """
    html = inline_shared_parts((PAGES / name).read_text(encoding="utf-8"))
    return HTMLResponse(html, headers=PAGE_HEADERS)


def routing_error(e: RoutingError) -> ApiError:
    """A desk refusal as a JSON error a person can act on, with its stable code."""
    status = (
        404
        if isinstance(e, NotFoundError)
        else 403
        if isinstance(e, NotOwner)
        else 409
        if isinstance(e, Conflict)
        else 422
        if isinstance(e, ValidationError)
        else 400
    )
    return ApiError(status, e.code, str(e))


@contextlib.contextmanager
def routing_refusals_as_api_errors() -> Iterator[None]:
    """Raise a desk refusal (``RoutingError``) from the block as its :func:`routing_error`."""
    try:
        yield
    except RoutingError as e:
        raise routing_error(e) from e


def jsonable(value: Any) -> Any:
    """Rows as JSON (datetimes as ISO 8601) for socket frames."""
    return json.loads(
        json.dumps(value, default=lambda o: o.isoformat() if isinstance(o, datetime) else str(o))
    )


class PresenceIn(BaseModel):
    presence: str


class ReplyIn(BaseModel):
    text: str = Field(..., max_length=4000)


class CloseIn(BaseModel):
    next_step: str | None = None
    next_step_due: datetime | None = None
    status: str = "resolved"


def console_router(
    auth: Authenticator,
    desk: AgentDesk,
    reports: Reports,
    access: AccessPolicy,
    *,
    public_base_url: str | None = None,
) -> APIRouter:
    """The agent console for every staff role (agents, supervisors and admins can all take chats);
    what each may read is decided by ``access``."""
    router = APIRouter()
    staff = auth.require(*STAFF)
    read_as = reader(auth.require, access)
    routing = desk.routing

    async def notify(agent_id: int, kind: str, **data: Any) -> None:
        await desk.publish(agent_id, {"type": kind, **data})

    async def notify_assignment(agent_id: int, assignment: Assignment) -> None:
        """Tell the agent's console that an offer changed (accepted, declined)."""
        await notify(
            agent_id,
            "assignment",
            assignment_id=assignment.id,
            conversation_id=assignment.conversation_id,
            status=assignment.status,
        )

    @router.get("/console", response_class=HTMLResponse, include_in_schema=False)
    async def console_page(user: User = Depends(auth.require_page(*STAFF))) -> HTMLResponse:
        return page("console.html")

    @router.get("/api/desk/state", tags=["desk"])
    async def state(user: User = Depends(staff)) -> dict[str, Any]:
        """The caller's presence and queues, the queues' waiting counts, open offers and conversations."""
        agent = await routing.agent(user.id)
        return {
            "user": user.to_dict(),
            "agent": agent.__dict__ if agent else None,
            "queues": [q.__dict__ for q in await routing.queues()],
            "assignments": await reports.active_assignments(user.id),
        }

    @router.post("/api/desk/presence", tags=["desk"])
    async def presence(body: PresenceIn, user: User = Depends(staff)) -> dict[str, Any]:
        """Set ``available``, ``busy`` or ``away``; becoming available asks for an offer at once."""
        with routing_refusals_as_api_errors():
            agent = await routing.set_presence(user.id, body.presence)
        if agent.presence == "available":
            for queue in agent.queues:
                await desk.offer_next(queue)
        await notify(user.id, "presence", presence=agent.presence)
        return {"agent": agent.__dict__}

    @router.post("/api/desk/offers/{assignment_id}/accept", tags=["desk"])
    async def accept(assignment_id: int, user: User = Depends(staff)) -> dict[str, Any]:
        with routing_refusals_as_api_errors():
            taken = await routing.accept(assignment_id, user.id)
        await notify_assignment(user.id, taken)
        return {"assignment": taken.__dict__}

    @router.post("/api/desk/offers/{assignment_id}/decline", tags=["desk"])
    async def decline(assignment_id: int, user: User = Depends(staff)) -> dict[str, Any]:
        with routing_refusals_as_api_errors():
            passed = await routing.decline(assignment_id, user.id)
        await notify_assignment(user.id, passed)
        await desk.offer_next(passed.queue)  # someone else, now
        return {"assignment": passed.__dict__}

    @router.get("/api/desk/conversations/{conversation_id}", tags=["desk"])
    async def conversation(conversation_id: int, viewer: Viewer = Depends(read_as)) -> dict[str, Any]:
        return await readable_conversation(reports, access, viewer, conversation_id)

    @router.post("/api/desk/conversations/{conversation_id}/reply", tags=["desk"])
    async def reply(conversation_id: int, body: ReplyIn, user: User = Depends(staff)) -> dict[str, Any]:
        with routing_refusals_as_api_errors():
            sent = await desk.agent_reply(conversation_id, user.id, body.text)
        message = {"seq": sent.message.seq, "sender": "agent", "body": sent.message.body}
        await notify(user.id, "agent_message", conversation_id=conversation_id, **message)
        return {"message": message, "sent": sent.sent}

    @router.post("/api/desk/conversations/{conversation_id}/hand-back", tags=["desk"])
    async def hand_back(conversation_id: int, user: User = Depends(staff)) -> dict[str, Any]:
        with routing_refusals_as_api_errors():
            await desk.hand_back(conversation_id, user.id)
        await notify(user.id, "assignment", conversation_id=conversation_id, status="handed_back")
        return {"conversation_id": conversation_id, "owner": "ai"}

    @router.post("/api/desk/tickets/{ticket_id}/close", tags=["desk"])
    async def close(ticket_id: int, body: CloseIn = Body(...), user: User = Depends(staff)) -> dict[str, Any]:
        """Resolve the caller's ticket; refused (422 ``next_step_required``) without a next step due in the future."""
        with routing_refusals_as_api_errors():
            ticket = await desk.close_ticket(
                ticket_id, user.id, body.next_step, body.next_step_due, status=body.status
            )
        await notify(user.id, "assignment", ticket_id=ticket_id, status="completed")
        return {
            "ticket": {
                "id": ticket.id,
                "protocol": ticket.protocol,
                "status": str(ticket.status),
                "next_step": ticket.next_step,
                "next_step_due": ticket.next_step_due,
            }
        }

    @router.get("/api/desk/notifications", tags=["desk"])
    async def notifications(unread: bool = Query(False), user: User = Depends(staff)) -> dict[str, Any]:
        """The caller's notifications and those for their role (SLA alerts go to supervisors)."""
        found = await routing.notifications_for(user, unread_only=unread)
        return {"notifications": [n.__dict__ for n in found]}

    @router.post("/api/desk/notifications/{notification_id}/read", tags=["desk"])
    async def read(notification_id: int, user: User = Depends(staff)) -> dict[str, Any]:
        return {"read": await routing.mark_read(notification_id, user)}

    async def callback_queues(user: User) -> tuple[str, ...] | None:
        """The queues whose callbacks ``user`` returns: their own, or every queue for supervisors."""
        if user.role in ("supervisor", "admin"):
            return None
        agent = await routing.agent(user.id)
        return agent.queues if agent else ()

    @router.get("/api/desk/callbacks", tags=["desk"])
    async def callbacks(user: User = Depends(staff)) -> dict[str, Any]:
        """Calls we promised to return (no agent could take a warm transfer), the most urgent first."""
        found = await callbacks_due(desk.pool, await callback_queues(user))
        return {"callbacks": [jsonable(c.__dict__) for c in found]}

    @router.post("/api/desk/callbacks/{callback_id}/done", tags=["desk"])
    async def callback_done(callback_id: int, user: User = Depends(staff)) -> dict[str, Any]:
        """Mark a callback returned; the conversation records who did it."""
        with routing_refusals_as_api_errors():
            done = await complete_callback(
                desk.pool, callback_id, by=user.id, queues=await callback_queues(user), now=desk.clock.now()
            )
        return {"callback": jsonable(done.__dict__)}

    @router.websocket("/console/ws")
    async def events(ws: WebSocket) -> None:
        """The signed-in agent's live events (offers, customer messages, assignment changes)."""
        user = await _socket_user(auth, ws, public_base_url)
        if user is None:
            await ws.close(code=WS_POLICY_VIOLATION)  # before accept: the handshake is refused
            return
        await ws.accept()
        inbox = desk.subscribe(user.id)
        log.info("console connected", extra={"user_id": user.id})
        try:
            await ws.send_json({"type": "hello", "user_id": user.id})
            await _pump(ws, lambda: inbox.get())
        finally:
            desk.unsubscribe(user.id, inbox)
            log.info("console disconnected", extra={"user_id": user.id})

    return router


async def _socket_user(auth: Authenticator, ws: WebSocket, public_base_url: str | None) -> User | None:
    """The staff member whose session cookie opened the socket, None to refuse. Browsers send
    cookies on cross-site socket handshakes too, so the Origin must be this site."""
    origin = ws.headers.get("origin")
    if origin is not None:
        allowed = {f"http://{ws.headers.get('host', '')}", f"https://{ws.headers.get('host', '')}"}
        if public_base_url:
            parts = urlsplit(public_base_url)
            allowed.add(f"{parts.scheme}://{parts.netloc}")
        if origin.lower() not in {a.lower() for a in allowed}:
            log.warning("console socket refused", extra={"reason": "foreign_origin"})
            return None
    found = await auth.sessions.lookup(ws.cookies.get(SESSION_COOKIE))
    if found is None:
        return None
    user = found[0]
    return user if user.role in STAFF and not user.disabled else None


async def _pump(ws: WebSocket, next_event: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Forward events until the browser goes away; what it sends is only read to notice that."""

    async def forward() -> None:
        while True:
            await ws.send_json(jsonable(await next_event()))

    async def drain() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await ws.receive_text()

    sender = asyncio.create_task(forward(), name="console-ws-forward")
    reader = asyncio.create_task(drain(), name="console-ws-drain")
    try:
        done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if (
                not task.cancelled()
                and task.exception() is not None
                and not isinstance(task.exception(), WebSocketDisconnect)
            ):
                log.warning("console socket closed", extra={"reason": type(task.exception()).__name__})
    finally:
        for task in (sender, reader):
            task.cancel()
        for task in (sender, reader):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
