"""Supervisor pages: ``GET /supervisor`` (conversations, live view, SLA breaches, notifications),
``GET /supervisor/conversations/{id}`` (one conversation's timeline) and their JSON API under
``/api/supervisor/...``. Supervisors and admins only; pages are static, see :mod:`web.console`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse

from crm_bridge.access import AccessPolicy, Viewer
from crm_bridge.reports import Reports
from crm_bridge.routing import Routing
from crm_bridge.users import MANAGERS, User
from web.api import readable_conversation, reader
from web.auth import Authenticator
from web.console import page

Gauge = Callable[[], int]


def supervisor_router(
    auth: Authenticator,
    routing: Routing,
    reports: Reports,
    access: AccessPolicy,
    *,
    active_calls: Gauge,
    webchat_online: Gauge,
) -> APIRouter:
    """``active_calls`` and ``webchat_online`` read the live gauges of this process. Reads go
    through ``access`` like everywhere else (supervisors and admins see everything)."""
    router = APIRouter()
    managers = [Depends(auth.require(*MANAGERS))]
    read_as = reader(auth.require, access, *MANAGERS)
    page_access = [Depends(auth.require_page(*MANAGERS))]

    @router.get("/supervisor", response_class=HTMLResponse, include_in_schema=False, dependencies=page_access)
    async def supervisor_page() -> HTMLResponse:
        return page("supervisor.html")

    @router.get(
        "/supervisor/conversations/{conversation_id}",
        response_class=HTMLResponse,
        include_in_schema=False,
        dependencies=page_access,
    )
    async def timeline_page(conversation_id: int) -> HTMLResponse:
        # The id is read by the page's script from its own URL: nothing is interpolated here.
        return page("timeline.html")

    @router.get("/api/supervisor/conversations", tags=["supervisor"])
    async def conversations(
        viewer: Viewer = Depends(read_as),
        q: str | None = Query(None, description="full-text search over transcripts"),
        created_from: datetime | None = Query(None, alias="from"),
        created_to: datetime | None = Query(None, alias="to"),
        channel: str | None = None,
        intent: str | None = None,
        status: str | None = Query(None, description="conversation status: open, escalated, closed"),
        outcome: str | None = Query(None, description="ticket status: open, pending, resolved, closed"),
        agent: int | None = Query(None, description="user id of an agent who owned the conversation"),
        escalated: bool | None = None,
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        items = await reports.conversations(
            q=q or None,
            created_from=created_from,
            created_to=created_to,
            channel=channel or None,
            intent=intent or None,
            status=status or None,
            ticket_status=outcome or None,
            agent_id=agent,
            escalated=escalated,
            limit=limit,
            offset=offset,
            viewer=viewer,
        )
        return {"conversations": items, "limit": limit, "offset": offset}

    @router.get("/api/supervisor/conversations/{conversation_id}", tags=["supervisor"])
    async def conversation(conversation_id: int, viewer: Viewer = Depends(read_as)) -> dict[str, Any]:
        return await readable_conversation(reports, access, viewer, conversation_id)

    @router.get("/api/supervisor/live", tags=["supervisor"], dependencies=managers)
    async def live() -> dict[str, Any]:
        """Active calls and web chats of this process, queues with waiting counts, agents with presence."""
        return {
            "active_calls": active_calls(),
            "webchat_online": webchat_online(),
            "queues": [q.__dict__ for q in await routing.queues()],
            "agents": [a.__dict__ for a in await routing.agents()],
        }

    @router.get("/api/supervisor/sla-breaches", tags=["supervisor"])
    async def sla_breaches(
        viewer: Viewer = Depends(read_as), limit: int = Query(100, ge=1, le=500)
    ) -> dict[str, Any]:
        """Open or pending tickets that missed an SLA, newest first."""
        tickets = [
            t
            for t in await reports.tickets(breached=True, limit=limit, viewer=viewer)
            if t["status"] in ("open", "pending")
        ]
        return {"tickets": tickets}

    @router.get("/api/supervisor/notifications", tags=["supervisor"])
    async def notifications(
        unread: bool = Query(False), user: User = Depends(auth.require(*MANAGERS))
    ) -> dict[str, Any]:
        found = await routing.notifications_for(user, unread_only=unread)
        return {"notifications": [n.__dict__ for n in found]}

    return router
