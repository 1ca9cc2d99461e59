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
import html
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from crm_bridge.access import AccessPolicy, Viewer
from crm_bridge.assignments import Assignment
from crm_bridge.canned import canned_for, delete_canned, save_canned
from crm_bridge.desk import WRAP_UP_CODES, AgentDesk, callbacks_due, complete_callback
from crm_bridge.reports import Reports
from crm_bridge.routing import Conflict, NotFoundError, NotOwner, RoutingError, ValidationError
from crm_bridge.users import ADMINS, STAFF, User
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
    wrap_up: str | None = Field(
        None, max_length=40, description="one of the wrap-up codes of /api/desk/state"
    )


class NoteIn(BaseModel):
    text: str = Field(..., max_length=20_000)


class TransferIn(BaseModel):
    to: str = Field(..., max_length=100, description="'agent:<user id>' or 'queue:<name>'")


class CannedIn(BaseModel):
    queue: str = Field(..., max_length=40)
    title: str = Field(..., max_length=200)
    body: str = Field(..., max_length=4000)


#: Staff pages whose errors a browser gets as a page (API routes keep their JSON errors).
STAFF_PAGE_PREFIXES = ("/console", "/supervisor", "/admin", "/analytics")
_ERROR_TEXT = {
    403: ("You can't open this page", "Your role does not include this page. Ask an admin if you need it."),
    404: (
        "Page not found",
        "There is no page at this address. Check the link, or start again from your home page.",
    ),
}


def staff_error_page(request: Request, status: int) -> HTMLResponse | None:
    """The branded HTML page for a 403/404 of a staff page asked for by a browser, else None
    (the caller answers JSON: API clients and scripts keep their stable error codes)."""
    path = request.url.path
    if status not in _ERROR_TEXT or "text/html" not in request.headers.get("accept", ""):
        return None
    if not any(path == p or path.startswith(p + "/") for p in STAFF_PAGE_PREFIXES):
        return None
    title, message = _ERROR_TEXT[status]
    values = {
        "__STATUS__": str(status),
        "__TITLE__": title,
        "__MESSAGE__": message,
        "__HOME__": "/",
        "__HOME_LABEL__": "Go to your home page",
    }
    text = inline_shared_parts((PAGES / "error.html").read_text(encoding="utf-8"))
    for marker, value in values.items():
        text = text.replace(marker, html.escape(value))
    return HTMLResponse(text, status_code=status, headers=PAGE_HEADERS)


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
    admin = auth.require(*ADMINS)
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
        assignments = await reports.active_assignments(user.id)
        clocks = await desk.offer_clocks([a["id"] for a in assignments])
        return {
            "user": user.to_dict(),
            "agent": agent.__dict__ if agent else None,
            "queues": [q.__dict__ for q in await routing.queues()],
            # waiting_since, wait_seconds, sla_due, sla_kind, sla_overdue: the console ticks them
            "assignments": [a | clocks.get(a["id"], {}) for a in assignments],
            "server_time": desk.clock.now(),
            "wrap_up_codes": list(WRAP_UP_CODES),
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
        """The conversation, its transcript (each message with ``created_at``) and its internal
        ``notes`` (never sent to the customer)."""
        found = await readable_conversation(reports, access, viewer, conversation_id)
        notes = [
            {"id": e["id"], "created_at": e["created_at"], **e["data"]}
            for e in found["actions"]
            if e["kind"] == "internal_note"
        ]
        return found | {"notes": notes}

    @router.post("/api/desk/conversations/{conversation_id}/notes", tags=["desk"])
    async def add_note(conversation_id: int, body: NoteIn, user: User = Depends(staff)) -> dict[str, Any]:
        """An internal note on a conversation the caller holds; never sent to the customer."""
        with routing_refusals_as_api_errors():
            note = await desk.add_note(conversation_id, user, body.text)
        await notify(user.id, "note", conversation_id=conversation_id, note_id=note["id"])
        return {"note": note}

    @router.get("/api/desk/transfer-targets", tags=["desk"])
    async def transfer_targets(user: User = Depends(staff)) -> dict[str, Any]:
        """Where the caller can transfer a conversation: every queue, and the other agents who are
        available with free capacity now."""
        agents = [
            {"id": a.user_id, "name": a.name, "queues": list(a.queues), "free": a.capacity - a.active}
            for a in await routing.agents()
            if a.user_id != user.id and a.presence == "available" and a.active < a.capacity
        ]
        return {"queues": [q.name for q in await routing.queues()], "agents": agents}

    @router.post("/api/desk/conversations/{conversation_id}/transfer", tags=["desk"])
    async def transfer(conversation_id: int, body: TransferIn, user: User = Depends(staff)) -> dict[str, Any]:
        """Give a conversation the caller holds to a queue or to an available agent (offered to
        them); the caller loses it."""
        with routing_refusals_as_api_errors():
            moved = await desk.transfer(conversation_id, user, body.to)
        return {
            "conversation_id": conversation_id,
            "to": moved.to,
            "queue": moved.queue,
            "assignment_id": moved.offer.id if moved.offer else None,
        }

    async def agent_queues(user: User) -> tuple[str, ...] | None:
        """The queues whose work ``user`` serves: their own, or every queue for supervisors and admins."""
        if user.role in ("supervisor", "admin"):
            return None
        agent = await routing.agent(user.id)
        return agent.queues if agent else ()

    @router.get("/api/desk/canned-replies", tags=["desk"])
    async def canned(user: User = Depends(staff)) -> dict[str, Any]:
        """The canned replies of the caller's queues (every queue for supervisors and admins)."""
        found = await canned_for(desk.pool, await agent_queues(user))
        return {"canned_replies": [c.to_dict() for c in found]}

    @router.post("/api/desk/canned-replies", tags=["desk"], status_code=201)
    async def canned_create(body: CannedIn, user: User = Depends(admin)) -> dict[str, Any]:
        """Add a canned reply to a queue (admins)."""
        with routing_refusals_as_api_errors():
            saved = await save_canned(desk.pool, user, queue=body.queue, title=body.title, body=body.body)
        return {"canned_reply": saved.to_dict()}

    @router.put("/api/desk/canned-replies/{reply_id}", tags=["desk"])
    async def canned_update(reply_id: int, body: CannedIn, user: User = Depends(admin)) -> dict[str, Any]:
        """Change a canned reply (admins)."""
        with routing_refusals_as_api_errors():
            saved = await save_canned(
                desk.pool, user, queue=body.queue, title=body.title, body=body.body, reply_id=reply_id
            )
        return {"canned_reply": saved.to_dict()}

    @router.delete("/api/desk/canned-replies/{reply_id}", tags=["desk"])
    async def canned_delete(reply_id: int, user: User = Depends(admin)) -> dict[str, Any]:
        """Remove a canned reply (admins)."""
        with routing_refusals_as_api_errors():
            gone = await delete_canned(desk.pool, user, reply_id)
        return {"deleted": gone.to_dict()}

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
        """Resolve the caller's ticket; refused (422 ``next_step_required``) without a next step due in
        the future and (422 ``wrap_up_required``) without one of the wrap-up codes."""
        with routing_refusals_as_api_errors():
            ticket = await desk.close_ticket(
                ticket_id,
                user.id,
                body.next_step,
                body.next_step_due,
                status=body.status,
                wrap_up=body.wrap_up,
                wrap_up_required=True,
            )
        await notify(user.id, "assignment", ticket_id=ticket_id, status="completed")
        return {
            "ticket": {
                "id": ticket.id,
                "protocol": ticket.protocol,
                "status": str(ticket.status),
                "next_step": ticket.next_step,
                "next_step_due": ticket.next_step_due,
                "wrap_up": body.wrap_up,
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

    callback_queues = agent_queues  # an agent returns the calls of the queues they serve

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
