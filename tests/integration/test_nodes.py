"""Nodes of a fleet on one PostgreSQL (crm_bridge/nodes.py): a node that stops heartbeating is found
lost by another, its calls end with ``node_lost``, a caller who was waiting for an agent is owed a
call back, exactly once however many nodes sweep."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from crm_bridge.calls import CallStore
from crm_bridge.nodes import ChatSessions, NodeRegistry


def _sid() -> str:
    return "CA" + secrets.token_hex(16)


async def _waiting_for_agent(pool: asyncpg.Pool, call_sid: str) -> int:
    """A conversation whose caller is on hold while agents are rung (a live warm transfer)."""
    now = datetime.now(UTC)
    conversation = await pool.fetchval(
        """INSERT INTO conversations (channel, address, status, owner, created_at, updated_at)
           VALUES ('voice', $1, 'escalated', 'queue:support', $2, $2) RETURNING id""",
        call_sid,
        now,
    )
    await pool.execute(
        """INSERT INTO transfers (call_sid, conversation_id, queue, status, created_at, updated_at)
           VALUES ($1, $2, 'support', 'ringing', $3, $3)""",
        call_sid,
        conversation,
        now,
    )
    return int(conversation)


async def test_a_node_that_stops_heartbeating_is_lost_its_calls_end_and_a_waiting_caller_gets_a_call_back(
    pool: asyncpg.Pool,
) -> None:
    a = NodeRegistry(pool, node_id="node-a-" + secrets.token_hex(3))
    b = NodeRegistry(pool, node_id="node-b-" + secrets.token_hex(3))
    c = NodeRegistry(pool, node_id="node-c-" + secrets.token_hex(3))
    for node in (a, b, c):
        await node.register()
    now = datetime.now(UTC)
    on_a, waiting_on_a, on_b, silent_on_a = _sid(), _sid(), _sid(), _sid()
    conversation = await _waiting_for_agent(pool, waiting_on_a)
    talking = await pool.fetchval(
        """INSERT INTO conversations (channel, address, status, created_at, updated_at)
           VALUES ('voice', $1, 'open', $2, $2) RETURNING id""",
        on_a,
        now,
    )
    await CallStore(pool, a.id).stream_started(on_a, "MZ1", talking, "+15550109001", now)
    await CallStore(pool, a.id).stream_started(
        silent_on_a, "MZ4", None, "+15550109004", now
    )  # no conversation yet
    await CallStore(pool, a.id).stream_started(waiting_on_a, "MZ2", conversation, "+15550109002", now)
    await CallStore(pool, b.id).stream_started(on_b, "MZ3", None, "+15550109003", now)

    assert a.id not in (await b.sweep()).lost_nodes  # A heartbeats: alive
    # A's process dies: no heartbeat for longer than the timeout.
    await pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '1 minute' WHERE id = $1", a.id)
    sweeps = await asyncio.gather(b.sweep(), c.sweep())  # two nodes see it at once: one acts

    acted = [s for s in sweeps if a.id in s.lost_nodes]
    assert len(acted) == 1
    assert sorted(acted[0].calls_ended) == sorted([on_a, waiting_on_a, silent_on_a])
    assert len(acted[0].callbacks) == 2  # the caller on hold for an agent, and the one mid-conversation
    rows = {
        r["call_sid"]: r
        for r in await pool.fetch(
            "SELECT call_sid, status, end_reason, ended_at FROM calls WHERE call_sid = ANY($1::text[])",
            [on_a, waiting_on_a, on_b],
        )
    }
    assert rows[on_a]["end_reason"] == rows[waiting_on_a]["end_reason"] == "node_lost"
    assert rows[on_a]["ended_at"] is not None
    assert rows[on_b]["end_reason"] is None and rows[on_b]["ended_at"] is None  # B's call goes on
    callback = await pool.fetchrow(
        "SELECT phone, queue, status, transfer_id FROM callbacks WHERE conversation_id = $1", conversation
    )
    assert callback["transfer_id"] is not None
    assert (callback["phone"], callback["queue"], callback["status"]) == (
        "+15550109002",
        "support",
        "scheduled",
    )
    dropped = await pool.fetchrow("SELECT phone, status FROM callbacks WHERE conversation_id = $1", talking)
    assert dict(dropped) == {"phone": "+15550109001", "status": "scheduled"}
    assert await pool.fetchval("SELECT status FROM transfers WHERE call_sid = $1", waiting_on_a) == "fallback"
    kinds = await pool.fetch("SELECT kind FROM events WHERE conversation_id = $1", conversation)
    assert {"call_lost", "callback_scheduled"} <= {k["kind"] for k in kinds}

    assert (await b.sweep()).lost_nodes == []  # nothing twice
    count = await pool.fetchval(
        "SELECT count(*) FROM callbacks WHERE conversation_id = ANY($1::bigint[])", [conversation, talking]
    )
    assert count == 2

    await a.heartbeat()  # a paused node that comes back is live again; what was ended stays ended
    assert a.id in await b.live_nodes()
    assert await pool.fetchval("SELECT end_reason FROM calls WHERE call_sid = $1", on_a) == "node_lost"


async def test_a_node_that_stopped_cleanly_is_never_lost(pool: asyncpg.Pool) -> None:
    a = NodeRegistry(pool, node_id="node-a-" + secrets.token_hex(3), timeout=timedelta(seconds=1))
    b = NodeRegistry(pool, node_id="node-b-" + secrets.token_hex(3))
    await a.register()
    await b.register()
    await a.stop()
    await pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '1 hour' WHERE id = $1", a.id)
    assert a.id not in (await b.sweep()).lost_nodes
    assert a.id not in await b.live_nodes()


async def test_a_lost_nodes_chat_sockets_are_closed_and_noted_a_stopped_nodes_too_and_a_close_kept_during_an_outage_is_written_later(
    pool: asyncpg.Pool,
) -> None:
    a = NodeRegistry(pool, node_id="node-a-" + secrets.token_hex(3))
    b = NodeRegistry(pool, node_id="node-b-" + secrets.token_hex(3))
    for node in (a, b):
        await node.register()
    now = datetime.now(UTC)
    conversations = [
        await pool.fetchval(
            """INSERT INTO conversations (channel, address, status, created_at, updated_at)
               VALUES ('webchat', $1, 'open', $2, $2) RETURNING id""",
            f"webchat:{secrets.token_hex(8)}",
            now,
        )
        for _ in range(3)
    ]
    chats_a, chats_b = ChatSessions(pool, a.id), ChatSessions(pool, b.id)
    open_on_a = await chats_a.opened(conversations[0], now)
    closed_on_a = await chats_a.opened(conversations[1], now)
    await chats_a.closed(closed_on_a, now, "disconnected")
    on_b = await chats_b.opened(conversations[2], now)

    await pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '1 minute' WHERE id = $1", a.id)
    swept = await b.sweep()
    assert swept.lost_nodes == [a.id] and swept.chats_closed == [conversations[0]]
    rows = {
        r["id"]: (r["node_id"], r["close_reason"])
        for r in await pool.fetch(
            "SELECT id, node_id, close_reason FROM chat_sessions WHERE id = ANY($1::bigint[])",
            [open_on_a, closed_on_a, on_b],
        )
    }
    assert rows == {
        open_on_a: (a.id, "node_lost"),
        closed_on_a: (a.id, "disconnected"),  # closed before: left as it was
        on_b: (b.id, None),
    }
    events = await pool.fetch(
        "SELECT conversation_id, data FROM events WHERE kind = 'chat_lost' AND conversation_id = ANY($1::bigint[])",
        conversations,
    )
    assert [(e["conversation_id"], e["data"]["node"]) for e in events] == [(conversations[0], a.id)]

    # A close the database could not take is kept and written by the next flush.
    flaky = _Flaky(pool)
    chats = ChatSessions(flaky, b.id)  # type: ignore[arg-type]
    with pytest.raises(ConnectionRefusedError):
        await chats.closed(on_b, now, "database_unreachable")
    assert await pool.fetchval("SELECT closed_at FROM chat_sessions WHERE id = $1", on_b) is None
    flaky.up = True  # the database is back
    await chats.flush()
    assert await pool.fetchval("SELECT close_reason FROM chat_sessions WHERE id = $1", on_b) == (
        "database_unreachable"
    )

    # A node that stops closes the sockets it still holds.
    again = await chats_b.opened(conversations[2], now)
    await b.stop()
    assert (
        await pool.fetchval("SELECT close_reason FROM chat_sessions WHERE id = $1", again) == "node_stopped"
    )


class _Flaky:
    """A pool whose database is away until ``up``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool, self.up = pool, False

    async def execute(self, *args: object) -> str:
        if not self.up:
            raise ConnectionRefusedError("the database is away")
        return await self.pool.execute(*args)
