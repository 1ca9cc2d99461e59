"""Supervisor pages: ``GET /supervisor`` (conversations, live view, SLA breaches, notifications),
``GET /supervisor/conversations/{id}`` (one conversation's timeline) and their JSON API under
``/api/supervisor/...``. Supervisors and admins only; pages are static, see :mod:`web.console`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse

from crm_bridge.access import AccessPolicy, Viewer
from crm_bridge.analytics import CHANNELS
from crm_bridge.reports import CONVERSATION_SORTS, METRICS, ConversationSearch, Reports
from crm_bridge.routing import Routing
from crm_bridge.users import MANAGERS, User
from pipeline.ports import Clock
from web.api import ApiError, readable_conversation, reader
from web.auth import Authenticator
from web.console import page

Gauge = Callable[[], int]

STATUSES = ("open", "escalated", "closed")
TICKET_STATUSES = ("open", "pending", "resolved", "closed")
MAX_IDS = 500
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_IDS = re.compile(r"^\d{1,18}(,\d{1,18})*$")


def parse_sort(value: str | None) -> tuple[str, bool]:
    """``name`` (ascending) or ``-name`` (descending), ``name`` one of :data:`CONVERSATION_SORTS`;
    anything else is a 422 ``invalid_sort`` before any query is built."""
    if not value:
        return "updated", True
    descending = value.startswith("-")
    name = value[1:] if descending else value
    if name not in CONVERSATION_SORTS:
        raise ApiError(
            422,
            "invalid_sort",
            f"'sort' must be one of {', '.join(CONVERSATION_SORTS)}, optionally with a leading '-' for descending",
        )
    return name, descending


def parse_instant(value: str | None, name: str, *, end: bool) -> datetime | None:
    """A day ``YYYY-MM-DD`` (UTC; a ``to`` day is included: its end is the next midnight) or an
    ISO 8601 instant (a ``to`` instant is exclusive), the way /analytics counts its days."""
    if not value:
        return None
    try:
        if _DAY.match(value):
            day = datetime.combine(date.fromisoformat(value), time(0), tzinfo=UTC)
            return day + timedelta(days=1) if end else day
        found = datetime.fromisoformat(value)
    except ValueError as e:
        raise ApiError(422, "invalid_date", f"'{name}' must be a day (YYYY-MM-DD) or an ISO 8601 time") from e
    return found if found.tzinfo is not None else found.replace(tzinfo=UTC)


def parse_ids(value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    if not _IDS.match(value):
        raise ApiError(422, "invalid_ids", "'ids' must be conversation ids separated by commas")
    ids = tuple(dict.fromkeys(int(v) for v in value.split(",")))
    if len(ids) > MAX_IDS:
        raise ApiError(422, "invalid_ids", f"at most {MAX_IDS} ids at once")
    return ids


def _one_of(value: str | None, allowed: tuple[str, ...], name: str) -> str | None:
    if not value:
        return None
    if value not in allowed:
        raise ApiError(422, f"invalid_{name}", f"'{name}' must be one of {', '.join(allowed)}")
    return value


def supervisor_router(
    auth: Authenticator,
    routing: Routing,
    reports: Reports,
    access: AccessPolicy,
    *,
    active_calls: Gauge,
    webchat_online: Gauge,
    clock: Clock | None = None,
) -> APIRouter:
    """``active_calls`` and ``webchat_online`` read the live gauges of this process. Reads go
    through ``access`` like everywhere else (supervisors and admins see everything). ``clock``
    decides what is overdue for the ``limbo`` metric (the system clock when None)."""
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
        q: str | None = Query(None, description="full-text search over transcripts", max_length=200),
        created_from: str | None = Query(
            None, alias="from", description="first day (YYYY-MM-DD, UTC) or an ISO 8601 instant"
        ),
        created_to: str | None = Query(
            None, alias="to", description="last day, included (YYYY-MM-DD, UTC), or an exclusive instant"
        ),
        channel: str | None = None,
        intent: str | None = Query(None, max_length=64),
        status: str | None = Query(None, description="conversation status: open, escalated, closed"),
        outcome: str | None = Query(None, description="ticket status: open, pending, resolved, closed"),
        agent: int | None = Query(None, description="user id of an agent who owned the conversation"),
        escalated: bool | None = None,
        ids: str | None = Query(None, description="conversation ids, comma-separated"),
        metric: str | None = Query(
            None, description="the conversations behind an analytics number: " + ", ".join(METRICS)
        ),
        sort: str | None = Query(
            None, max_length=40, description=f"{', '.join(CONVERSATION_SORTS)}; '-' first for descending"
        ),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        """Conversations matching every filter given, one page in the order asked, with ``total``.

        ``metric`` with ``from``/``to``/``channel``/``intent`` lists exactly the conversations the
        same number on /analytics counts (e.g. ``metric=contained``)."""
        sort_name, descending = parse_sort(sort)
        search = ConversationSearch(
            q=q or None,
            created_from=parse_instant(created_from, "from", end=False),
            created_to=parse_instant(created_to, "to", end=True),
            channel=_one_of(channel, CHANNELS, "channel"),
            intent=intent or None,
            status=_one_of(status, STATUSES, "status"),
            ticket_status=_one_of(outcome, TICKET_STATUSES, "outcome"),
            agent_id=agent,
            escalated=escalated,
            ids=parse_ids(ids),
            metric=_one_of(metric, tuple(METRICS), "metric"),
            sort=sort_name,
            descending=descending,
        )
        items, total = await reports.search_conversations(
            search,
            limit=limit,
            offset=offset,
            viewer=viewer,
            now=clock.now() if clock is not None else None,
        )
        return {
            "conversations": items,
            "total": total,
            "limit": limit,
            "offset": offset,
            "sort": ("-" if descending else "") + sort_name,
        }

    @router.get("/api/supervisor/intents", tags=["supervisor"], dependencies=managers)
    async def known_intents() -> dict[str, Any]:
        """The intent names to filter by: those configured and those conversations had."""
        return {"intents": await reports.known_intents()}

    @router.get("/api/supervisor/conversations/{conversation_id}", tags=["supervisor"])
    async def conversation(conversation_id: int, viewer: Viewer = Depends(read_as)) -> dict[str, Any]:
        """The conversation with its transcript, events and tickets, and ``labels`` to read it by
        (customer name, caller number, owner as a person or a queue, one status)."""
        found = await readable_conversation(reports, access, viewer, conversation_id)
        found["labels"] = await reports.conversation_labels(conversation_id)
        return found

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
