"""Outcome analytics: ``GET /analytics`` (the page), ``GET /api/analytics`` (JSON) and
``GET /api/analytics.csv`` (one table as CSV). Supervisors and admins only.

Query parameters, all optional: ``from`` and ``to`` (days ``YYYY-MM-DD``, both included, UTC;
default the last 7 days), ``channel`` (webchat, whatsapp, sms, voice) and ``intent`` (an intent
name). Bad values are refused with 422 and a code: ``invalid_date``, ``invalid_range``,
``invalid_channel``, ``invalid_intent``, ``invalid_table``. The numbers come from
:mod:`crm_bridge.analytics`; their formulas are in ``docs/metrics.md``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, Response

from crm_bridge.analytics import CHANNELS, DEFAULT_DAYS, MAX_RANGE_DAYS, AnalyticsRange, compute_analytics
from crm_bridge.users import MANAGERS
from web.api import ApiError
from web.auth import Authenticator
from web.console import page

if TYPE_CHECKING:
    from app.container import Services

__all__ = ["CSV_TABLES", "analytics_router", "parse_range"]

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_INTENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}$")
CSV_TABLES = ("daily", "summary", "intents", "handoff_reasons", "actions", "limbo", "end_reasons")


def _day(value: str, name: str) -> date:
    if not _DAY.match(value):
        raise ApiError(422, "invalid_date", f"'{name}' must be a day as YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError as e:
        raise ApiError(422, "invalid_date", f"'{name}' is not a real day: {e}") from e


def parse_range(
    today: date,
    start: str | None,
    end: str | None,
    channel: str | None,
    intent: str | None,
) -> AnalyticsRange:
    """The request's range and filters, or a 422 :class:`ApiError` saying what is wrong."""
    channel = channel or None
    intent = intent or None
    if channel is not None and channel not in CHANNELS:
        raise ApiError(422, "invalid_channel", f"'channel' must be one of {', '.join(CHANNELS)}")
    if intent is not None and not _INTENT.match(intent):
        raise ApiError(
            422, "invalid_intent", "'intent' must be an intent name (letters, digits, _ . : -; at most 64)"
        )
    last = _day(end, "to") if end else today
    first = _day(start, "from") if start else None
    if first is None:
        return AnalyticsRange.last_days(last, DEFAULT_DAYS, channel=channel, intent=intent)
    if last < first:
        raise ApiError(422, "invalid_range", "'to' is before 'from'")
    if (last - first).days + 1 > MAX_RANGE_DAYS:
        raise ApiError(422, "invalid_range", f"the range may cover at most {MAX_RANGE_DAYS} days")
    return AnalyticsRange(first, last, channel=channel, intent=intent)


def _cell(value: Any) -> Any:
    """A CSV cell; text a spreadsheet would run as a formula is quoted with a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_rows(data: dict[str, Any], table: str) -> tuple[list[str], Iterable[list[Any]]]:
    """The header and rows of one table of :func:`compute_analytics`'s result."""
    if table == "daily":
        keys = ["day", "contacts", "contained", "resolved", "containment", "resolution"]
        return keys, ([d[k] for k in keys] for d in data["daily"])
    if table == "intents":
        return ["intent", "contacts"], ([i["intent"], i["count"]] for i in data["intents"])
    if table == "handoff_reasons":
        return ["reason", "conversations"], ([r["reason"], r["count"]] for r in data["handoff"]["reasons"])
    if table == "actions":
        keys = ["action", "count", "value_cents", "currency"]
        return keys, ([a[k] for k in keys] for a in data["actions"])
    if table == "limbo":
        keys = [
            "id",
            "protocol",
            "status",
            "queue",
            "priority",
            "conversation_id",
            "next_step_due",
            "resolution_due",
        ]
        return keys + ["why"], ([t[k] for k in keys] + [" ".join(t["why"])] for t in data["limbo"])
    if table == "end_reasons":
        return ["end_reason", "calls"], ([r["reason"], r["count"]] for r in data["voice"]["end_reasons"])
    return ["metric", "value"], _summary(data)


def _summary(data: dict[str, Any]) -> list[list[Any]]:
    voice, handoff = data["voice"], data["handoff"]
    rows: list[list[Any]] = [
        [k, data[k]] for k in ("contacts", "contained", "resolved", "handed_off", "recontacts")
    ]
    rows += [[f"{k}_rate", v] for k, v in data["rates"].items()]
    rows += [[f"sla_{k}", v] for k, v in data["sla"].items()]
    for name in ("first_response_s", "resolution_s"):
        rows += [[f"handoff_{name}_{k}", v] for k, v in handoff[name].items()]
    rows += [[f"followups_{k}", v] for k, v in data["followups"].items()]
    rows += [["limbo_tickets", len(data["limbo"])]]
    rows += [
        ["calls", voice["calls"]],
        ["avg_handle_s", voice["avg_handle_s"]],
        ["voice_turns", voice["voice_to_voice_ms"]["turns"]],
        ["voice_to_voice_p50_ms", voice["voice_to_voice_ms"]["p50"]],
        ["voice_to_voice_p95_ms", voice["voice_to_voice_ms"]["p95"]],
        ["barge_ins", voice["barge_ins"]],
        ["calls_lost", voice["calls_lost"]],
    ]
    rows += [[f"transfers_{k}", v] for k, v in voice["transfers"].items()]
    return rows


def analytics_router(services: Services) -> APIRouter:
    """The analytics page and API, built from the app's services (pool, clock, sign-in stores)."""
    s = services
    auth = Authenticator(s.sessions, s.api_tokens, cookie_secure=s.settings.cookie_secure)
    router = APIRouter()
    managers = [Depends(auth.require(*MANAGERS))]

    def now() -> datetime:
        return s.clock.now().astimezone(UTC)

    async def analytics(
        start: str | None, end: str | None, channel: str | None, intent: str | None
    ) -> dict[str, Any]:
        current = now()
        scope = parse_range(current.date(), start, end, channel, intent)
        return await compute_analytics(s.pool, scope, now=current)

    @router.get(
        "/analytics",
        response_class=HTMLResponse,
        include_in_schema=False,
        dependencies=[Depends(auth.require_page(*MANAGERS))],
    )
    async def analytics_page() -> HTMLResponse:
        # Filters are read by the page's script from its own URL: nothing is interpolated here.
        return page("analytics.html")

    @router.get("/api/analytics", tags=["analytics"], dependencies=managers)
    async def analytics_json(
        start: str | None = Query(None, alias="from", description="first day, YYYY-MM-DD (UTC)"),
        end: str | None = Query(None, alias="to", description="last day, YYYY-MM-DD (UTC), included"),
        channel: str | None = Query(None, description="webchat, whatsapp, sms or voice"),
        intent: str | None = Query(None, description="an intent name"),
    ) -> dict[str, Any]:
        """Outcome metrics of the contacts of a date range (at most 366 days); see docs/metrics.md."""
        return await analytics(start, end, channel, intent)

    @router.get("/api/analytics.csv", tags=["analytics"], dependencies=managers, response_class=Response)
    async def analytics_csv(
        start: str | None = Query(None, alias="from"),
        end: str | None = Query(None, alias="to"),
        channel: str | None = None,
        intent: str | None = None,
        table: str = Query("daily", description=", ".join(CSV_TABLES)),
    ) -> Response:
        """One table of ``/api/analytics`` as CSV (``table``: daily, summary, intents, ...)."""
        if table not in CSV_TABLES:
            raise ApiError(422, "invalid_table", f"'table' must be one of {', '.join(CSV_TABLES)}")
        data = await analytics(start, end, channel, intent)
        header, rows = csv_rows(data, table)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(header)
        for r in rows:
            writer.writerow([_cell(v) for v in r])
        name = f"closeloop-{table}-{data['range']['from']}-{data['range']['to']}.csv"
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return router
