"""Read-side queries behind the JSON API: conversations, transcripts, tickets, customer history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from crm_bridge.access import EVERYONE, Viewer, conversation_visible, ticket_visible
from crm_bridge.analytics import RECONTACT_DAYS, SCOPE_SQL
from crm_bridge.recordings import latest_recording, recording_json

# Readable labels of a conversation row ``c`` (joined with its customer ``cu``, ticket ``t`` and
# owning user ``ou``): who the customer is, who has it, and one status instead of three columns.
_CUSTOMER_NAME = "cu.name"
_CALLER = """COALESCE(c.state ->> 'caller_phone',
                      (SELECT k.caller FROM calls k WHERE k.conversation_id = c.id ORDER BY k.started_at DESC LIMIT 1),
                      CASE WHEN c.channel IN ('sms', 'whatsapp') THEN c.address END)"""
_OWNER_LABEL = """CASE WHEN c.owner = 'ai' THEN 'AI assistant'
                       WHEN c.owner LIKE 'queue:%' THEN 'queue ' || substr(c.owner, 7)
                       WHEN ou.name IS NOT NULL THEN ou.name ELSE c.owner END"""
_STATE = """CASE WHEN c.status = 'closed' THEN 'closed'
                 WHEN c.owner LIKE 'agent:%' THEN 'with a person'
                 WHEN c.owner LIKE 'queue:%' OR c.status = 'escalated' THEN 'waiting for a person'
                 WHEN t.status IN ('resolved', 'closed') THEN 'resolved'
                 ELSE 'with the AI' END"""

# The sortable columns of the conversation search: a public name -> its SQL expression. Only these
# names reach the ORDER BY; anything else is refused before a query is built.
CONVERSATION_SORTS: dict[str, str] = {
    "id": "c.id",
    "started": "c.created_at",
    "updated": "c.updated_at",
    "channel": "c.channel",
    "intent": "c.intent",
    "customer": f"COALESCE({_CUSTOMER_NAME}, {_CALLER}, c.customer_ref)",
    "owner": _OWNER_LABEL,
    "status": _STATE,
    "ticket": "t.protocol",
    "messages": "c.last_seq",
}

# The conversations behind each number of the outcome analytics, as a condition on the rows of
# its ``scope`` CTE (crm_bridge.analytics: $1 since, $2 until, $3 channel, $4 intent, and here $5
# now, $6 the recontact window). Keep each in step with the query that counts it there.
METRICS: dict[str, str] = {
    "contacts": "true",
    "contained": "s.resolved AND NOT s.person",
    "resolved": "s.resolved",
    "handed_off": "s.handed_off",
    "recontacts": """EXISTS (SELECT 1 FROM conversations p
                      WHERE p.customer_ref = s.customer_ref AND p.intent = s.intent AND p.id <> s.id
                        AND p.created_at < s.created_at AND p.created_at >= s.created_at - make_interval(days => $6))""",
    "limbo": """EXISTS (SELECT 1 FROM scope_tickets st
                  WHERE (st.conversation_id = s.id OR st.id = s.ticket_id) AND st.status IN ('open', 'pending')
                    AND (st.next_step IS NULL OR btrim(st.next_step) = '' OR st.next_step_due < $5
                         OR st.resolution_due < $5))""",
    "sla_breached": """EXISTS (SELECT 1 FROM scope_tickets st
                  WHERE (st.conversation_id = s.id OR st.id = s.ticket_id)
                    AND (st.first_response_due IS NOT NULL OR st.resolution_due IS NOT NULL)
                    AND (cardinality(st.sla_breached) > 0
                         OR (st.first_response_due IS NOT NULL AND COALESCE(st.first_response_at, $5) > st.first_response_due)
                         OR (st.resolution_due IS NOT NULL AND COALESCE(st.resolved_at, $5) > st.resolution_due)))""",
}


class _Params:
    """Numbered placeholders for a query built from optional filters: values never enter the SQL text."""

    def __init__(self, first: int = 1) -> None:
        self._first = first
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${self._first + len(self.values) - 1}"


@dataclass(frozen=True)
class ConversationSearch:
    """The filters of the supervisor's conversation search; ``None`` means "any".

    ``created_from``/``created_to`` bound the start time (``to`` exclusive). ``metric`` keeps the
    conversations behind one number of the outcome analytics (a key of :data:`METRICS`) for the
    contacts started in that same range, channel and intent. ``sort`` is a key of
    :data:`CONVERSATION_SORTS`, ``descending`` its direction.
    """

    q: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    channel: str | None = None
    intent: str | None = None
    status: str | None = None
    ticket_status: str | None = None
    agent_id: int | None = None
    escalated: bool | None = None
    customer_ref: str | None = None
    ids: tuple[int, ...] | None = None
    metric: str | None = None
    sort: str = "updated"
    descending: bool = True

    def __post_init__(self) -> None:
        if self.sort not in CONVERSATION_SORTS:
            raise ValueError(f"sort must be one of {', '.join(CONVERSATION_SORTS)}")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FOREVER = datetime(9999, 1, 1, tzinfo=UTC)


def _plain(row: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(row) if row is not None else None


class Reports:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def conversations(
        self,
        *,
        customer_ref: str | None = None,
        channel: str | None = None,
        status: str | None = None,
        q: str | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        intent: str | None = None,
        agent_id: int | None = None,
        escalated: bool | None = None,
        ticket_status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        viewer: Viewer = EVERYONE,
    ) -> list[dict[str, Any]]:
        """Newest first, only those ``viewer`` may read (:mod:`crm_bridge.access`). ``q`` is a full-text search over transcripts (English stemming).

        ``created_from`` / ``created_to`` bound the start time (``to`` exclusive); ``agent_id``
        keeps conversations that agent owns or took through an offer; ``escalated`` keeps those
        that were (or were never) handed off; ``ticket_status`` is the outcome of their ticket.
        """
        rows = await self._pool.fetch(
            """SELECT c.id, c.channel, c.address, c.customer_ref, c.status, c.owner, c.intent, c.ticket_id,
                      c.next_step, c.next_step_due, c.created_at, c.updated_at, c.last_seq AS message_count,
                      t.protocol AS ticket, t.status AS ticket_status,
                      EXISTS (SELECT 1 FROM handoffs h WHERE h.conversation_id = c.id) AS escalated,
                      (SELECT body FROM messages m WHERE m.conversation_id = c.id ORDER BY seq DESC LIMIT 1) AS last_message
               FROM conversations c LEFT JOIN tickets t ON t.id = c.ticket_id
               WHERE ($1::text IS NULL OR c.customer_ref = $1)
                 AND ($2::text IS NULL OR c.channel = $2)
                 AND ($3::text IS NULL OR c.status = $3)
                 AND ($4::text IS NULL OR EXISTS (
                        SELECT 1 FROM messages m WHERE m.conversation_id = c.id
                          AND m.tsv @@ websearch_to_tsquery('english', $4)))
                 AND ($7::timestamptz IS NULL OR c.created_at >= $7)
                 AND ($8::timestamptz IS NULL OR c.created_at < $8)
                 AND ($9::text IS NULL OR c.intent = $9)
                 AND ($10::bigint IS NULL OR c.owner = 'agent:' || $10::bigint OR EXISTS (
                        SELECT 1 FROM assignments a WHERE a.conversation_id = c.id AND a.agent_id = $10
                          AND a.status IN ('accepted', 'completed', 'handed_back')))
                 AND ($11::boolean IS NULL OR EXISTS (SELECT 1 FROM handoffs h WHERE h.conversation_id = c.id) = $11)
                 AND ($12::text IS NULL OR t.status = $12)
                 AND """
            + conversation_visible("c", "$13", "$14")
            + """
               ORDER BY c.updated_at DESC, c.id DESC LIMIT $5 OFFSET $6""",
            customer_ref,
            channel,
            status,
            q,
            limit,
            offset,
            created_from,
            created_to,
            intent,
            agent_id,
            escalated,
            ticket_status,
            *viewer.params,
        )
        return [dict(r) for r in rows]

    async def search_conversations(
        self,
        search: ConversationSearch,
        *,
        limit: int = 50,
        offset: int = 0,
        viewer: Viewer = EVERYONE,
        now: datetime | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of the conversations ``viewer`` may read that match ``search``, with readable
        labels (``customer_name``, ``caller``, ``owner_label``, ``state``), and how many match in all."""
        f = search
        head = ""
        p = _Params()
        if f.metric is not None:
            # The analytics scope owns $1..$6; the filters below are numbered after them.
            # $5 and $6 are typed here for the metrics that do not use them (always set, so true).
            head = (
                SCOPE_SQL
                + ", picked AS (SELECT s.id FROM scope s WHERE $5::timestamptz IS NOT NULL AND $6::int IS NOT NULL AND "
                + METRICS[f.metric]
                + ")\n"
            )
            for value in (
                f.created_from or _EPOCH,
                f.created_to or _FOREVER,
                f.channel,
                f.intent,
                now or datetime.now(UTC),
                RECONTACT_DAYS,
            ):
                p(value)
        where = ["true"]
        if f.metric is not None:
            where.append("c.id IN (SELECT id FROM picked)")
        if f.customer_ref is not None:
            where.append(f"c.customer_ref = {p(f.customer_ref)}")
        if f.channel is not None:
            where.append(f"c.channel = {p(f.channel)}")
        if f.status is not None:
            where.append(f"c.status = {p(f.status)}")
        if f.q is not None:
            where.append(
                "EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id"
                f" AND m.tsv @@ websearch_to_tsquery('english', {p(f.q)}))"
            )
        if f.created_from is not None:
            where.append(f"c.created_at >= {p(f.created_from)}")
        if f.created_to is not None:
            where.append(f"c.created_at < {p(f.created_to)}")
        if f.intent is not None:
            where.append(f"c.intent = {p(f.intent)}")
        if f.agent_id is not None:
            agent = p(f.agent_id)
            where.append(
                f"""(c.owner = 'agent:' || {agent}::bigint OR EXISTS (
                        SELECT 1 FROM assignments a WHERE a.conversation_id = c.id AND a.agent_id = {agent}::bigint
                          AND a.status IN ('accepted', 'completed', 'handed_back')))"""
            )
        if f.escalated is not None:
            where.append(
                f"EXISTS (SELECT 1 FROM handoffs h WHERE h.conversation_id = c.id) = {p(f.escalated)}::boolean"
            )
        if f.ticket_status is not None:
            where.append(f"t.status = {p(f.ticket_status)}")
        if f.ids is not None:
            where.append(f"c.id = ANY({p(list(f.ids))}::bigint[])")
        agent_id, queues = viewer.params
        where.append(conversation_visible("c", p(agent_id), p(queues)))
        joins = """FROM conversations c
                   LEFT JOIN tickets t ON t.id = c.ticket_id
                   LEFT JOIN customers cu ON cu.id = CASE WHEN c.customer_ref ~ '^[0-9]{1,18}$' THEN c.customer_ref::bigint END
                   LEFT JOIN users ou ON ou.id = CASE WHEN c.owner ~ '^agent:[0-9]{1,18}$' THEN substr(c.owner, 7)::bigint END"""
        condition = " AND ".join(where)
        direction = "DESC" if f.descending else "ASC"
        order = f"{CONVERSATION_SORTS[f.sort]} {direction} NULLS LAST, c.id {direction}"
        count_values = list(p.values)
        page_sql = f"""{head}SELECT c.id, c.channel, c.address, c.customer_ref, c.status, c.owner, c.intent, c.ticket_id,
                      c.next_step, c.next_step_due, c.created_at, c.updated_at, c.last_seq AS message_count,
                      t.protocol AS ticket, t.status AS ticket_status,
                      EXISTS (SELECT 1 FROM handoffs h WHERE h.conversation_id = c.id) AS escalated,
                      (SELECT body FROM messages m WHERE m.conversation_id = c.id ORDER BY seq DESC LIMIT 1) AS last_message,
                      {_CUSTOMER_NAME} AS customer_name, {_CALLER} AS caller, {_OWNER_LABEL} AS owner_label,
                      CASE WHEN c.owner = 'ai' THEN 'ai' ELSE split_part(c.owner, ':', 1) END AS owner_kind,
                      ou.role AS owner_role, {_STATE} AS state
               {joins}
               WHERE {condition}
               ORDER BY {order} LIMIT {p(limit)} OFFSET {p(offset)}"""
        async with self._pool.acquire() as conn:
            total = await conn.fetchval(f"{head}SELECT count(*) {joins} WHERE {condition}", *count_values)
            rows = await conn.fetch(page_sql, *p.values)
        return [dict(r) for r in rows], int(total)

    async def known_intents(self) -> list[str]:
        """Intent names configured or seen on a conversation, sorted."""
        rows = await self._pool.fetch(
            """SELECT name FROM intents UNION SELECT DISTINCT intent FROM conversations WHERE intent IS NOT NULL
               ORDER BY 1"""
        )
        return [r[0] for r in rows]

    async def conversation_labels(self, conversation_id: int) -> dict[str, Any] | None:
        """What a person reads at the top of a conversation: the customer's name, the caller's
        number, who has it and its one status."""
        row = await self._pool.fetchrow(
            f"""SELECT {_CUSTOMER_NAME} AS customer_name, {_CALLER} AS caller, {_OWNER_LABEL} AS owner_label,
                       CASE WHEN c.owner = 'ai' THEN 'ai' ELSE split_part(c.owner, ':', 1) END AS owner_kind,
                       ou.role AS owner_role, {_STATE} AS state
                  FROM conversations c
                  LEFT JOIN tickets t ON t.id = c.ticket_id
                  LEFT JOIN customers cu ON cu.id = CASE WHEN c.customer_ref ~ '^[0-9]{{1,18}}$' THEN c.customer_ref::bigint END
                  LEFT JOIN users ou ON ou.id = CASE WHEN c.owner ~ '^agent:[0-9]{{1,18}}$' THEN substr(c.owner, 7)::bigint END
                 WHERE c.id = $1""",
            conversation_id,
        )
        if row is None:
            return None
        return dict(row)

    async def conversation(self, conversation_id: int) -> dict[str, Any] | None:
        async with self._pool.acquire() as conn:
            conv = await conn.fetchrow("SELECT * FROM conversations WHERE id = $1", conversation_id)
            if conv is None:
                return None
            messages = await conn.fetch(
                "SELECT seq, direction, sender, body, kind, external_id, reply_to, interrupted, meta, created_at FROM messages WHERE conversation_id = $1 ORDER BY seq",
                conversation_id,
            )
            events = await conn.fetch(
                "SELECT id, kind, data, ticket_id, created_at FROM events WHERE conversation_id = $1 ORDER BY id",
                conversation_id,
            )
            tickets = await conn.fetch(
                "SELECT * FROM tickets WHERE conversation_id = $1 ORDER BY id", conversation_id
            )
            followups = await conn.fetch(
                "SELECT * FROM followups WHERE conversation_id = $1 ORDER BY id", conversation_id
            )
            outbox = await conn.fetch(
                # a one-time code is for the customer's phone only: staff see that one was sent, not which
                """SELECT id, conversation_id, message_seq, channel, address, kind, status, attempts, next_attempt_at,
                          last_error, provider_ref, channel_used, sent_at, created_at,
                          CASE WHEN kind = 'verification_code' THEN '[verification code]' ELSE body END AS body
                     FROM outbox WHERE conversation_id = $1 ORDER BY id""",
                conversation_id,
            )
            recording = await latest_recording(conn, conversation_id)
        result = dict(conv)
        result["recording"] = recording_json(recording)  # played by supervisors (web/recordings.py)
        result["messages"] = [dict(m) for m in messages]
        result["actions"] = [dict(e) for e in events]
        result["tickets"] = [dict(t) for t in tickets]
        result["followups"] = [dict(f) for f in followups]
        result["outbox"] = [dict(o) for o in outbox]
        return result

    async def tickets(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        owner: str | None = None,
        breached: bool | None = None,
        customer_ref: str | None = None,
        limit: int = 100,
        offset: int = 0,
        viewer: Viewer = EVERYONE,
    ) -> list[dict[str, Any]]:
        """Newest first, only those ``viewer`` may read (:mod:`crm_bridge.access`)."""
        rows = await self._pool.fetch(
            """SELECT * FROM tickets t
               WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR queue = $2)
                 AND ($3::text IS NULL OR owner = $3)
                 AND ($4::boolean IS NULL OR (cardinality(sla_breached) > 0) = $4)
                 AND ($5::text IS NULL OR customer_ref = $5)
                 AND """
            + ticket_visible("t", "$8", "$9")
            + """
               ORDER BY id DESC LIMIT $6 OFFSET $7""",
            status,
            queue,
            owner,
            breached,
            customer_ref,
            limit,
            offset,
            *viewer.params,
        )
        return [dict(r) for r in rows]

    async def ticket(self, ref: str) -> dict[str, Any] | None:
        """By numeric id or protocol (``CL-000123``), with its events."""
        async with self._pool.acquire() as conn:
            if ref.isdigit():
                row = await conn.fetchrow("SELECT * FROM tickets WHERE id = $1", int(ref))
            else:
                row = await conn.fetchrow("SELECT * FROM tickets WHERE protocol = $1", ref.upper())
            if row is None:
                return None
            events = await conn.fetch(
                "SELECT id, kind, data, created_at FROM events WHERE ticket_id = $1 ORDER BY id", row["id"]
            )
        result = dict(row)
        result["events"] = [dict(e) for e in events]
        return result

    async def active_assignments(self, agent_id: int) -> list[dict[str, Any]]:
        """The agent's open offers and accepted conversations with what the console shows of them:
        the ticket (protocol, subject, 3-line summary, status) and the customer."""
        rows = await self._pool.fetch(
            """SELECT a.id, a.status, a.queue, a.conversation_id, a.ticket_id, a.offered_at, a.responded_at,
                      c.channel, c.customer_ref, c.status AS conversation_status, c.owner,
                      t.protocol AS ticket, t.subject, t.summary, t.status AS ticket_status, t.priority,
                      t.next_step, t.next_step_due, t.first_response_due
               FROM assignments a JOIN conversations c ON c.id = a.conversation_id
               LEFT JOIN tickets t ON t.id = a.ticket_id
               WHERE a.agent_id = $1 AND a.status IN ('offered', 'accepted') ORDER BY a.offered_at, a.id""",
            agent_id,
        )
        return [dict(r) for r in rows]

    async def customer_history(self, customer_ref: str, viewer: Viewer = EVERYONE) -> list[dict[str, Any]]:
        """Every conversation of a customer across channels that ``viewer`` may read, oldest
        first, with transcripts."""
        async with self._pool.acquire() as conn:
            convs = await conn.fetch(
                "SELECT c.id, c.channel, c.address, c.status, c.owner, c.ticket_id, c.created_at, c.updated_at"
                " FROM conversations c WHERE c.customer_ref = $1 AND "
                + conversation_visible("c", "$2", "$3")
                + " ORDER BY c.created_at, c.id",
                customer_ref,
                *viewer.params,
            )
            ids = [c["id"] for c in convs]
            messages = await conn.fetch(
                "SELECT conversation_id, seq, sender, body, kind, created_at FROM messages WHERE conversation_id = ANY($1::bigint[]) ORDER BY conversation_id, seq",
                ids,
            )
        by_conv: dict[int, list[dict[str, Any]]] = {}
        for m in messages:
            by_conv.setdefault(m["conversation_id"], []).append(dict(m))
        return [dict(c) | {"messages": by_conv.get(c["id"], [])} for c in convs]

    async def counts(self) -> dict[str, int]:
        """Small gauges for /metrics."""
        row = await self._pool.fetchrow(
            """SELECT (SELECT count(*) FROM conversations WHERE status <> 'closed') AS open_conversations,
                      (SELECT count(*) FROM tickets WHERE status IN ('open', 'pending')) AS open_tickets,
                      (SELECT count(*) FROM tickets WHERE cardinality(sla_breached) > 0 AND status IN ('open', 'pending')) AS breached_tickets,
                      (SELECT count(*) FROM followups WHERE status = 'scheduled') AS scheduled_followups,
                      (SELECT count(*) FROM outbox WHERE status = 'queued') AS queued_texts"""
        )
        return {k: int(v) for k, v in dict(row).items()}
