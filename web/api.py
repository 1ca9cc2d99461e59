"""The JSON API (``/api/...``) and the return-label page. Errors are JSON with a stable code."""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query
from fastapi.responses import HTMLResponse

from crm_bridge import audit
from crm_bridge.access import AccessPolicy, Viewer
from crm_bridge.intents_store import IntentStore
from crm_bridge.reports import Reports
from crm_bridge.users import ADMINS, MANAGERS, STAFF, User
from pipeline.model import Intent
from pipeline.ports import BusinessSystem


class ApiError(HTTPException):
    """An HTTP error with a stable machine-readable ``code``."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def _order_json(order: Any) -> dict[str, Any]:
    data = dict(order.__dict__)
    data["items"] = [dict(i.__dict__) for i in order.items]
    data["status"] = str(order.status)
    return data


def reader(
    require: Callable[..., Any], access: AccessPolicy, *roles: str
) -> Callable[..., Awaitable[Viewer]]:
    """A dependency admitting ``roles`` (all staff when none) and answering what the caller may
    read (:mod:`crm_bridge.access`): every route that returns conversations, tickets or customers
    takes its :class:`Viewer` from here."""
    admit = require(*(roles or STAFF))

    async def read_as(user: User = Depends(admit)) -> Viewer:
        return await access.viewer(user)

    return read_as


async def readable_conversation(
    reports: Reports, access: AccessPolicy, viewer: Viewer, conversation_id: int
) -> dict[str, Any]:
    """One conversation with its transcript, or 404 when it does not exist or ``viewer`` may not read it."""
    found = (
        await reports.conversation(conversation_id)
        if await access.may_read_conversation(viewer, conversation_id)
        else None
    )
    if found is None:
        raise ApiError(404, "conversation_not_found", f"no conversation {conversation_id}")
    return found


def api_router(
    reports: Reports,
    intents: IntentStore,
    business: BusinessSystem,
    *,
    require: Callable[..., Any],
    access: AccessPolicy,
    on_intents_changed: Callable[[], Awaitable[None]],
    label_lookup: Callable[[str], Awaitable[dict[str, Any] | None]] | None = None,
) -> APIRouter:
    """The JSON API. ``require(*roles)`` makes the dependency that admits a caller (web/auth.py).

    Reading conversations, tickets, customers and orders is for every staff role, each seeing
    what :mod:`crm_bridge.access` allows (agents: their queues and their own work); intents are
    read by supervisors and admins and changed by admins only. The return-label page is public:
    customers open it from a text message.
    """
    router = APIRouter()
    read_as = reader(require, access)
    managers = [Depends(require(*MANAGERS))]
    admin = require(*ADMINS)  # changes to intents are recorded in the audit log with who made them

    @router.get("/api/conversations", tags=["conversations"])
    async def list_conversations(
        viewer: Viewer = Depends(read_as),
        customer: str | None = None,
        channel: str | None = None,
        status: str | None = None,
        q: str | None = Query(None, description="full-text search over transcripts"),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        items = await reports.conversations(
            customer_ref=customer,
            channel=channel,
            status=status,
            q=q or None,
            limit=limit,
            offset=offset,
            viewer=viewer,
        )
        return {"conversations": items, "limit": limit, "offset": offset}

    @router.get("/api/conversations/{conversation_id}", tags=["conversations"])
    async def get_conversation(conversation_id: int, viewer: Viewer = Depends(read_as)) -> dict[str, Any]:
        return await readable_conversation(reports, access, viewer, conversation_id)

    @router.get("/api/tickets", tags=["tickets"])
    async def list_tickets(
        viewer: Viewer = Depends(read_as),
        status: str | None = None,
        queue: str | None = None,
        owner: str | None = None,
        breached: bool | None = None,
        customer: str | None = None,
        limit: int = Query(100, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        items = await reports.tickets(
            status=status,
            queue=queue,
            owner=owner,
            breached=breached,
            customer_ref=customer,
            limit=limit,
            offset=offset,
            viewer=viewer,
        )
        return {"tickets": items, "limit": limit, "offset": offset}

    @router.get("/api/tickets/{ref}", tags=["tickets"])
    async def get_ticket(ref: str, viewer: Viewer = Depends(read_as)) -> dict[str, Any]:
        ticket = await reports.ticket(ref)
        if ticket is None or not await access.may_read_ticket(viewer, ticket["id"]):
            raise ApiError(404, "ticket_not_found", f"no ticket {ref}")
        return ticket

    @router.get("/api/customers/{ref}", tags=["customers"])
    async def get_customer(ref: str, viewer: Viewer = Depends(read_as)) -> dict[str, Any]:
        customer = await business.get_customer(ref) if await access.may_read_customer(viewer, ref) else None
        if customer is None:
            raise ApiError(404, "customer_not_found", f"no customer {ref}")
        orders = await business.list_orders(ref)
        return {
            "customer": dict(customer.__dict__),
            "orders": [_order_json(o) for o in orders],
            "conversations": await reports.customer_history(ref, viewer),
            "tickets": await reports.tickets(customer_ref=ref, viewer=viewer),
        }

    @router.get("/api/orders/{number}", tags=["customers"])
    async def get_order(number: str, viewer: Viewer = Depends(read_as)) -> dict[str, Any]:
        """An order, for those who may read its customer."""
        order = await business.get_order(number)
        if order is None or not await access.may_read_customer(viewer, order.customer_ref):
            raise ApiError(404, "order_not_found", f"no order {number}")
        return _order_json(order)

    @router.get("/api/intents", tags=["intents"], dependencies=managers)
    async def list_intents() -> dict[str, Any]:
        return {"intents": [i.to_dict() for i in await intents.list()]}

    @router.get("/api/intents/{name}", tags=["intents"], dependencies=managers)
    async def get_intent(name: str) -> dict[str, Any]:
        intent = await intents.get(name)
        if intent is None:
            raise ApiError(404, "intent_not_found", f"no intent {name}")
        return intent.to_dict()

    def _parse_intent(data: dict[str, Any]) -> Intent:
        try:
            intent = Intent.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ApiError(422, "invalid_intent", str(e)) from e
        if not intent.examples and intent.enabled:
            raise ApiError(422, "invalid_intent", "an enabled intent needs at least one example utterance")
        return intent

    @router.post("/api/intents", tags=["intents"], status_code=201)
    async def create_intent(data: dict[str, Any] = Body(...), user: User = Depends(admin)) -> dict[str, Any]:
        intent = _parse_intent(data)
        if await intents.get(intent.name) is not None:
            raise ApiError(409, "intent_exists", f"intent {intent.name} already exists; use PUT to change it")
        await intents.upsert(intent)
        await audit.record_intent_change(intents, user, "intent.create", None, intent)
        await on_intents_changed()
        return intent.to_dict()

    @router.put("/api/intents/{name}", tags=["intents"])
    async def replace_intent(
        name: str, data: dict[str, Any] = Body(...), user: User = Depends(admin)
    ) -> dict[str, Any]:
        intent = _parse_intent({**data, "name": name})
        before = await intents.get(name)
        await intents.upsert(intent)
        kind = "intent.update" if before is not None else "intent.create"
        await audit.record_intent_change(intents, user, kind, before, intent)
        await on_intents_changed()
        return intent.to_dict()

    @router.delete("/api/intents/{name}", tags=["intents"], status_code=204)
    async def delete_intent(name: str, user: User = Depends(admin)) -> None:
        before = await intents.get(name)
        if before is None or not await intents.delete(name):
            raise ApiError(404, "intent_not_found", f"no intent {name}")
        await audit.record_intent_change(intents, user, "intent.delete", before, None)
        await on_intents_changed()

    @router.get("/labels/{code}", response_class=HTMLResponse, include_in_schema=False)
    async def label_page(code: str) -> HTMLResponse:
        label = await label_lookup(code) if label_lookup else None
        if label is None:
            raise ApiError(404, "label_not_found", f"no return label {code}")
        items = ", ".join(html.escape(i["name"]) for i in label["items"])
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>Return label</title>"
            "<style>body{font:16px system-ui;margin:2rem auto;max-width:28rem}"
            ".label{border:2px dashed #333;padding:1.5rem;border-radius:8px}code{font-size:1.6rem}</style>"
            f"<div class=label><h1>Return label</h1><p>Order {html.escape(label['number'])}: {items}</p>"
            f"<p>From: {html.escape(label['name'])}</p><p>Code: <code>{html.escape(label['code'])}</code></p>"
            "<p>Drop the parcel at any carrier point within 14 days.</p></div>"
        )

    return router
