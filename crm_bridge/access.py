"""What each staff member may read: conversations (with transcripts), tickets and customers.

Supervisors and admins see everything. An agent sees only the work of the queues they serve
(``agents.queues``) and what was put in their hands:

- a **conversation** is visible when
  its owner is the agent (``agent:<id>``), or
  its owner is one of the agent's queues (``queue:<name>``, an escalation waiting there), or
  one of its tickets (``conversations.ticket_id`` or a ticket with ``conversation_id``) is in one
  of the agent's queues or owned by the agent, or
  the agent was offered it, accepted it, completed it or handed it back (``assignments``; a
  declined or expired offer gives nothing);
- a **ticket** is visible when its queue is one of the agent's queues, it is owned by the agent,
  or the agent has (or had) an assignment for it or for its conversation;
- a **customer** (and their orders) is visible when at least one of their conversations or
  tickets is; the customer's history then lists only the conversations and tickets the agent may
  see.

A conversation the AI handled alone (owner ``ai``, no ticket, no assignment) is in no queue, so
only supervisors and admins see it. Something an agent may not see answers exactly like something
that does not exist (404), so ids cannot be probed; list endpoints leave it out.

The rule lives here once, as SQL predicates that :class:`~crm_bridge.reports.Reports` embeds in its
queries and that :class:`AccessPolicy` uses to check single objects; routes never decide by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

SEES_ALL_ROLES = frozenset({"supervisor", "admin"})
# Assignment states that put a conversation in an agent's hands (now or before).
_HELD = "('offered', 'accepted', 'completed', 'handed_back')"


class Person(Protocol):
    """Any user object with an id and a role (``crm_bridge.users.User``)."""

    @property
    def id(self) -> int: ...

    @property
    def role(self) -> str: ...


@dataclass(frozen=True)
class Viewer:
    """Who reads, as the queries need it: ``agent_id`` and ``queues`` are ``None`` for people who
    see everything (supervisors, admins)."""

    agent_id: int | None
    queues: tuple[str, ...] | None

    @property
    def sees_all(self) -> bool:
        return self.agent_id is None

    @property
    def params(self) -> tuple[int | None, list[str] | None]:
        """The two query parameters of the predicates below: agent id, queues."""
        return self.agent_id, (list(self.queues) if self.queues is not None else None)


EVERYONE = Viewer(None, None)


def conversation_visible(alias: str, agent: str, queues: str) -> str:
    """SQL: the conversation row ``alias`` may be read by the viewer whose id and queues are the
    placeholders ``agent`` (bigint) and ``queues`` (text[]); true for every row when they are NULL."""
    return f"""({agent}::bigint IS NULL
        OR {alias}.owner = 'agent:' || {agent}::bigint
        OR ({alias}.owner LIKE 'queue:%' AND substr({alias}.owner, 7) = ANY({queues}::text[]))
        OR EXISTS (SELECT 1 FROM tickets acc_t
                   WHERE (acc_t.id = {alias}.ticket_id OR acc_t.conversation_id = {alias}.id)
                     AND (acc_t.queue = ANY({queues}::text[]) OR acc_t.owner = 'agent:' || {agent}::bigint))
        OR EXISTS (SELECT 1 FROM assignments acc_a
                   WHERE acc_a.conversation_id = {alias}.id AND acc_a.agent_id = {agent}::bigint
                     AND acc_a.status IN {_HELD}))"""


def ticket_visible(alias: str, agent: str, queues: str) -> str:
    """SQL: the ticket row ``alias`` may be read by the viewer (see :func:`conversation_visible`)."""
    return f"""({agent}::bigint IS NULL
        OR {alias}.queue = ANY({queues}::text[])
        OR {alias}.owner = 'agent:' || {agent}::bigint
        OR EXISTS (SELECT 1 FROM assignments acc_ta
                   WHERE (acc_ta.ticket_id = {alias}.id OR acc_ta.conversation_id = {alias}.conversation_id)
                     AND acc_ta.agent_id = {agent}::bigint AND acc_ta.status IN {_HELD}))"""


def customer_visible(customer: str, agent: str, queues: str) -> str:
    """SQL: the customer whose ref is the placeholder ``customer`` (text) may be read by the viewer."""
    return f"""({agent}::bigint IS NULL
        OR EXISTS (SELECT 1 FROM conversations acc_c WHERE acc_c.customer_ref = {customer}::text
                     AND {conversation_visible("acc_c", agent, queues)})
        OR EXISTS (SELECT 1 FROM tickets acc_ct WHERE acc_ct.customer_ref = {customer}::text
                     AND {ticket_visible("acc_ct", agent, queues)}))"""


class AccessPolicy:
    """Turns a user into a :class:`Viewer` and checks single objects against the rule above."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def viewer(self, user: Person) -> Viewer:
        """Supervisors and admins see all; an agent sees their queues (none without an agent row)."""
        if user.role in SEES_ALL_ROLES:
            return EVERYONE
        queues = await self._pool.fetchval("SELECT queues FROM agents WHERE user_id = $1", user.id)
        return Viewer(user.id, tuple(queues or ()))

    async def may_read_conversation(self, viewer: Viewer, conversation_id: int) -> bool:
        return await self._check(
            f"SELECT 1 FROM conversations c WHERE c.id = $3 AND {conversation_visible('c', '$1', '$2')}",
            viewer,
            conversation_id,
        )

    async def may_read_ticket(self, viewer: Viewer, ticket_id: int) -> bool:
        return await self._check(
            f"SELECT 1 FROM tickets t WHERE t.id = $3 AND {ticket_visible('t', '$1', '$2')}",
            viewer,
            ticket_id,
        )

    async def may_read_customer(self, viewer: Viewer, customer_ref: str) -> bool:
        return await self._check(f"SELECT 1 WHERE {customer_visible('$3', '$1', '$2')}", viewer, customer_ref)

    async def _check(self, sql: str, viewer: Viewer, key: Any) -> bool:
        if viewer.sees_all:
            return True
        return await self._pool.fetchval(sql, *viewer.params, key) is not None
