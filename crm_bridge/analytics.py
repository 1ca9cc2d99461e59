"""Outcome analytics: what happened to the contacts of a date range, computed in SQL.

Every number is about the *contacts* of the range: conversations whose ``created_at`` falls in
``[start 00:00 UTC, end + 1 day 00:00 UTC)``, optionally of one channel and one intent. What a
conversation led to (tickets, refunds, calls, transfers, follow-ups) is counted with the day it
started. Each metric's formula is in ``docs/metrics.md``; keep the two in step.

All filters reach PostgreSQL as bind parameters (``$1``...), never as SQL text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg

__all__ = [
    "CHANNELS",
    "MAX_RANGE_DAYS",
    "RECONTACT_DAYS",
    "SCOPE_SQL",
    "AnalyticsRange",
    "analytics_gauges",
    "compute_analytics",
]

CHANNELS = ("webchat", "whatsapp", "sms", "voice")
MAX_RANGE_DAYS = 366
DEFAULT_DAYS = 7
RECONTACT_DAYS = 7
LIMBO_LIMIT = 200
TOP_INTENTS = 10


@dataclass(frozen=True)
class AnalyticsRange:
    """Days ``start``..``end`` (both included, UTC) and the optional filters."""

    start: date
    end: date
    channel: str | None = None
    intent: str | None = None

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError("the range ends before it starts")
        if self.days > MAX_RANGE_DAYS:
            raise ValueError(f"the range is {self.days} days; at most {MAX_RANGE_DAYS} are allowed")
        if self.channel is not None and self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")

    @classmethod
    def last_days(cls, today: date, days: int = DEFAULT_DAYS, **filters: str | None) -> AnalyticsRange:
        """The ``days`` days ending with ``today`` (included)."""
        return cls(today - timedelta(days=days - 1), today, **filters)

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    @property
    def since(self) -> datetime:
        return datetime.combine(self.start, time(0), tzinfo=UTC)

    @property
    def until(self) -> datetime:
        """The first instant after the range (exclusive bound)."""
        return datetime.combine(self.end + timedelta(days=1), time(0), tzinfo=UTC)

    def params(self) -> tuple[Any, ...]:
        return (self.since, self.until, self.channel, self.intent)


# The contacts of the range with what decides their outcome. $1 since, $2 until, $3 channel, $4 intent.
# A ticket belongs to a conversation through tickets.conversation_id or conversations.ticket_id.
_SCOPE = """
WITH base AS (
    SELECT c.id, c.channel, c.intent, c.status, c.customer_ref, c.ticket_id, c.created_at,
           (EXISTS (SELECT 1 FROM handoffs h WHERE h.conversation_id = c.id)
            OR EXISTS (SELECT 1 FROM events e WHERE e.conversation_id = c.id
                                                 AND e.kind IN ('handoff', 'handoff_requested'))
            OR EXISTS (SELECT 1 FROM transfers tr WHERE tr.conversation_id = c.id)) AS handed_off,
           EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.sender = 'agent') AS agent_replied,
           EXISTS (SELECT 1 FROM tickets t WHERE (t.conversation_id = c.id OR t.id = c.ticket_id)
                                           AND t.status IN ('open', 'pending')) AS open_work,
           EXISTS (SELECT 1 FROM tickets t WHERE (t.conversation_id = c.id OR t.id = c.ticket_id)
                                           AND t.status IN ('resolved', 'closed')) AS work_done
      FROM conversations c
     WHERE c.created_at >= $1 AND c.created_at < $2
       AND ($3::text IS NULL OR c.channel = $3)
       AND ($4::text IS NULL OR c.intent = $4)
), scope AS (
    SELECT b.*,
           (b.handed_off OR b.agent_replied) AS person,
           (NOT b.open_work AND (b.status <> 'escalated' OR b.work_done)) AS resolved
      FROM base b
), scope_tickets AS (
    SELECT DISTINCT ON (t.id) t.*, s.handed_off
      FROM tickets t JOIN scope s ON t.conversation_id = s.id OR t.id = s.ticket_id
     ORDER BY t.id
)
"""

# Public for the search that lists the conversations behind a number (crm_bridge.reports): it
# selects from ``scope`` with the same parameters, so a number and its list cannot drift apart.
SCOPE_SQL = _SCOPE

_HEADLINE = (
    _SCOPE
    + """
SELECT count(*) AS contacts,
       count(*) FILTER (WHERE resolved AND NOT person) AS contained,
       count(*) FILTER (WHERE resolved) AS resolved,
       count(*) FILTER (WHERE handed_off) AS handed_off,
       count(*) FILTER (WHERE EXISTS (
           SELECT 1 FROM conversations p
            WHERE p.customer_ref = scope.customer_ref AND p.intent = scope.intent AND p.id <> scope.id
              AND p.created_at < scope.created_at
              AND p.created_at >= scope.created_at - make_interval(days => $5))) AS recontacts
  FROM scope
"""
)

_SLA = (
    _SCOPE
    + """
SELECT count(*) AS tickets,
       count(*) FILTER (WHERE breached) AS breached
  FROM (SELECT cardinality(t.sla_breached) > 0
               OR (t.first_response_due IS NOT NULL AND COALESCE(t.first_response_at, $5) > t.first_response_due)
               OR (t.resolution_due IS NOT NULL AND COALESCE(t.resolved_at, $5) > t.resolution_due) AS breached
          FROM scope_tickets t
         WHERE t.first_response_due IS NOT NULL OR t.resolution_due IS NOT NULL) x
"""
)

_HANDOFF_TIMES = (
    _SCOPE
    + """
SELECT count(*) FILTER (WHERE first_response_at IS NOT NULL) AS responded,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM first_response_at - created_at))
           FILTER (WHERE first_response_at IS NOT NULL) AS frt_p50,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM first_response_at - created_at))
           FILTER (WHERE first_response_at IS NOT NULL) AS frt_p90,
       count(*) FILTER (WHERE resolved_at IS NOT NULL) AS resolved,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM resolved_at - created_at))
           FILTER (WHERE resolved_at IS NOT NULL) AS ttr_p50,
       percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM resolved_at - created_at))
           FILTER (WHERE resolved_at IS NOT NULL) AS ttr_p90
  FROM scope_tickets WHERE handed_off
"""
)

_HANDOFF_REASONS = (
    _SCOPE
    + """
SELECT COALESCE(NULLIF(e.data->>'reason', ''), 'unspecified') AS reason, count(DISTINCT e.conversation_id) AS count
  FROM events e JOIN scope s ON s.id = e.conversation_id
 WHERE e.kind = 'handoff'
 GROUP BY 1 ORDER BY 2 DESC, 1
"""
)

_LIMBO = (
    _SCOPE
    + """
SELECT t.id, t.protocol, t.status, t.queue, t.priority, t.owner, t.conversation_id,
       t.next_step, t.next_step_due, t.resolution_due, t.created_at,
       (t.next_step IS NULL OR btrim(t.next_step) = '') AS no_next_step,
       (COALESCE(t.next_step_due < $5, false) OR COALESCE(t.resolution_due < $5, false)) AS overdue
  FROM scope_tickets t
 WHERE t.status IN ('open', 'pending')
   AND (t.next_step IS NULL OR btrim(t.next_step) = '' OR t.next_step_due < $5 OR t.resolution_due < $5)
 ORDER BY t.created_at, t.id
 LIMIT $6
"""
)

_FOLLOWUPS = (
    _SCOPE
    + """
SELECT count(*) FILTER (WHERE f.status = 'scheduled') AS scheduled,
       count(*) FILTER (WHERE f.status = 'sent') AS sent,
       count(*) FILTER (WHERE f.status = 'failed') AS failed,
       count(*) FILTER (WHERE f.status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE f.status = 'sent' AND EXISTS (
           SELECT 1 FROM messages m JOIN conversations c2 ON c2.id = m.conversation_id
            WHERE (c2.id = f.conversation_id OR (f.customer_ref IS NOT NULL AND c2.customer_ref = f.customer_ref))
              AND m.direction = 'in' AND m.sender = 'customer'
              AND m.created_at > f.sent_at AND m.created_at <= f.sent_at + make_interval(days => $5))) AS replied
  FROM followups f JOIN scope s ON s.id = f.conversation_id
"""
)

# refund_issued carries its amount; an order's cancellation is worth the order. A refund that
# already existed (a retried turn) is not a new action.
_ACTIONS = (
    _SCOPE
    + """
SELECT a.action, a.currency, count(*) AS count, sum(a.value_cents)::bigint AS value_cents
  FROM (SELECT CASE e.kind WHEN 'refund_issued' THEN 'refund'
                           WHEN 'order_cancelled' THEN 'cancellation'
                           ELSE 'return_label' END AS action,
               o.currency,
               CASE e.kind WHEN 'refund_issued' THEN (e.data->>'amount_cents')::bigint
                           WHEN 'order_cancelled' THEN o.amount_cents END AS value_cents
          FROM events e JOIN scope s ON s.id = e.conversation_id
          LEFT JOIN orders o ON o.number = e.data->>'order'
         WHERE e.kind IN ('refund_issued', 'order_cancelled', 'return_label_created')
           AND COALESCE(e.data->>'already_existed', 'false') <> 'true') a
 GROUP BY 1, 2 ORDER BY 1, 2
"""
)

_INTENTS = (
    _SCOPE
    + """
SELECT COALESCE(intent, '(none)') AS intent, count(*) AS count
  FROM scope GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $5
"""
)

_VOICE = (
    _SCOPE
    + """
SELECT (SELECT count(*) FROM calls k JOIN scope s ON s.id = k.conversation_id) AS calls,
       (SELECT avg(extract(epoch FROM k.ended_at - COALESCE(k.answered_at, k.started_at)))
          FROM calls k JOIN scope s ON s.id = k.conversation_id WHERE k.ended_at IS NOT NULL) AS avg_handle_s,
       (SELECT count(*) FROM calls k JOIN scope s ON s.id = k.conversation_id
         WHERE k.end_reason = 'node_lost') AS calls_lost,
       v.turns, v.p50, v.p95,
       (SELECT count(*) FROM events e JOIN scope s ON s.id = e.conversation_id
         WHERE e.kind = 'bot_interrupted') AS barge_ins,
       (SELECT count(*) FROM transfers tr JOIN scope s ON s.id = tr.conversation_id) AS transfers,
       (SELECT count(*) FROM transfers tr JOIN scope s ON s.id = tr.conversation_id
         WHERE tr.status IN ('connected', 'completed')) AS transfers_connected,
       (SELECT count(*) FROM transfers tr JOIN scope s ON s.id = tr.conversation_id
         WHERE tr.status = 'fallback') AS transfers_fallback,
       (SELECT count(*) FROM transfers tr JOIN scope s ON s.id = tr.conversation_id
         WHERE tr.status IN ('abandoned', 'failed')) AS transfers_lost,
       (SELECT count(*) FROM callbacks cb JOIN transfers tr ON tr.id = cb.transfer_id
          JOIN scope s ON s.id = tr.conversation_id) AS callbacks
  FROM (SELECT count(*) AS turns,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95
          FROM (SELECT (e.data->>'voice_to_voice_ms')::double precision AS ms
                  FROM events e JOIN scope s ON s.id = e.conversation_id
                 WHERE e.kind = 'voice_turn' AND jsonb_typeof(e.data->'voice_to_voice_ms') = 'number') t) v
"""
)

_END_REASONS = (
    _SCOPE
    + """
SELECT COALESCE(k.end_reason, 'normal') AS reason, count(*) AS count
  FROM calls k JOIN scope s ON s.id = k.conversation_id
 GROUP BY 1 ORDER BY 2 DESC, 1
"""
)

_DAILY = (
    _SCOPE
    + """
SELECT d::date AS day,
       count(s.id) AS contacts,
       count(s.id) FILTER (WHERE s.resolved AND NOT s.person) AS contained,
       count(s.id) FILTER (WHERE s.resolved) AS resolved
  FROM generate_series($1::timestamptz, $2::timestamptz - interval '1 day', interval '1 day') d
  LEFT JOIN scope s ON s.created_at >= d AND s.created_at < d + interval '1 day'
 GROUP BY d ORDER BY d
"""
)


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _num(value: Any, digits: int = 1) -> float | None:
    return None if value is None else round(float(value), digits)


async def compute_analytics(
    pool: asyncpg.Pool, scope: AnalyticsRange, *, now: datetime | None = None
) -> dict[str, Any]:
    """Every outcome metric of ``scope`` as JSON-ready values (rates are fractions 0..1, ``None``
    without a denominator; durations in seconds, voice latencies in milliseconds)."""
    now = now or datetime.now(UTC)
    p = scope.params()
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        # one snapshot: every number below is about the same rows
        await conn.execute("SET LOCAL TIME ZONE 'UTC'")
        head = await conn.fetchrow(_HEADLINE, *p, RECONTACT_DAYS)
        sla = await conn.fetchrow(_SLA, *p, now)
        times = await conn.fetchrow(_HANDOFF_TIMES, *p)
        reasons = await conn.fetch(_HANDOFF_REASONS, *p)
        limbo = await conn.fetch(_LIMBO, *p, now, LIMBO_LIMIT)
        followups = await conn.fetchrow(_FOLLOWUPS, *p, RECONTACT_DAYS)
        actions = await conn.fetch(_ACTIONS, *p)
        intents = await conn.fetch(_INTENTS, *p, TOP_INTENTS)
        voice = await conn.fetchrow(_VOICE, *p)
        end_reasons = await conn.fetch(_END_REASONS, *p)
        daily = await conn.fetch(_DAILY, *p)
    assert head is not None and sla is not None and times is not None
    assert followups is not None and voice is not None
    contacts = int(head["contacts"])
    tickets, breached = int(sla["tickets"]), int(sla["breached"])
    by_action = {(r["action"], r["currency"]): r for r in actions}
    action_rows = [
        {
            "action": r["action"],
            "count": int(r["count"]),
            "value_cents": None if r["action"] == "return_label" else int(r["value_cents"] or 0),
            "currency": r["currency"],
        }
        for r in actions
    ]
    for name in ("refund", "cancellation", "return_label"):
        if not any(action == name for action, _ in by_action):
            action_rows.append(
                {
                    "action": name,
                    "count": 0,
                    "value_cents": None if name == "return_label" else 0,
                    "currency": None,
                }
            )
    action_rows.sort(key=lambda a: (a["action"], a["currency"] or ""))
    return {
        "range": {
            "from": scope.start.isoformat(),
            "to": scope.end.isoformat(),
            "days": scope.days,
            "channel": scope.channel,
            "intent": scope.intent,
            "timezone": "UTC",
            "computed_at": now.isoformat(),
        },
        "contacts": contacts,
        "contained": int(head["contained"]),
        "resolved": int(head["resolved"]),
        "handed_off": int(head["handed_off"]),
        "recontacts": int(head["recontacts"]),
        "rates": {
            "containment": _rate(head["contained"], contacts),
            "resolution": _rate(head["resolved"], contacts),
            "handoff": _rate(head["handed_off"], contacts),
            "recontact": _rate(head["recontacts"], contacts),
            "sla_compliance": _rate(tickets - breached, tickets),
        },
        "sla": {"tickets": tickets, "met": tickets - breached, "breached": breached},
        "handoff": {
            "reasons": [{"reason": r["reason"], "count": int(r["count"])} for r in reasons],
            "first_response_s": {
                "count": int(times["responded"]),
                "p50": _num(times["frt_p50"]),
                "p90": _num(times["frt_p90"]),
            },
            "resolution_s": {
                "count": int(times["resolved"]),
                "p50": _num(times["ttr_p50"]),
                "p90": _num(times["ttr_p90"]),
            },
        },
        "limbo": [
            {
                "id": r["id"],
                "protocol": r["protocol"],
                "status": r["status"],
                "queue": r["queue"],
                "priority": r["priority"],
                "owner": r["owner"],
                "conversation_id": r["conversation_id"],
                "next_step": r["next_step"],
                "next_step_due": r["next_step_due"].isoformat() if r["next_step_due"] else None,
                "resolution_due": r["resolution_due"].isoformat() if r["resolution_due"] else None,
                "created_at": r["created_at"].isoformat(),
                "why": [
                    w for w, on in (("no_next_step", r["no_next_step"]), ("overdue", r["overdue"])) if on
                ],
            }
            for r in limbo
        ],
        "followups": {k: int(followups[k]) for k in ("scheduled", "sent", "failed", "cancelled", "replied")},
        "actions": action_rows,
        "intents": [{"intent": r["intent"], "count": int(r["count"])} for r in intents],
        "voice": {
            "calls": int(voice["calls"]),
            "avg_handle_s": _num(voice["avg_handle_s"]),
            "voice_to_voice_ms": {
                "turns": int(voice["turns"]),
                "p50": _num(voice["p50"]),
                "p95": _num(voice["p95"]),
            },
            "barge_ins": int(voice["barge_ins"]),
            "calls_lost": int(voice["calls_lost"]),
            "end_reasons": [{"reason": r["reason"], "count": int(r["count"])} for r in end_reasons],
            "transfers": {
                "total": int(voice["transfers"]),
                "connected": int(voice["transfers_connected"]),
                "fallback": int(voice["transfers_fallback"]),
                "lost": int(voice["transfers_lost"]),
                "callbacks": int(voice["callbacks"]),
            },
        },
        "daily": [
            {
                "day": r["day"].isoformat(),
                "contacts": int(r["contacts"]),
                "contained": int(r["contained"]),
                "resolved": int(r["resolved"]),
                "containment": _rate(r["contained"], r["contacts"]),
                "resolution": _rate(r["resolved"], r["contacts"]),
            }
            for r in daily
        ],
    }


GAUGES = ("containment", "resolution", "handoff", "recontact", "sla_compliance")


async def analytics_gauges(pool: asyncpg.Pool, *, now: datetime | None = None) -> dict[str, float]:
    """The headline rates of the last 7 days (today, UTC, included) for Prometheus gauges, e.g.
    ``closeloop_containment_rate``. A rate without a denominator (no contacts, no SLA tickets) is
    NaN, which Prometheus shows as "no data" rather than a false 0."""
    now = now or datetime.now(UTC)
    found = await compute_analytics(pool, AnalyticsRange.last_days(now.astimezone(UTC).date()), now=now)
    return {
        f"{name}_rate": math.nan if found["rates"][name] is None else float(found["rates"][name])
        for name in GAUGES
    }
