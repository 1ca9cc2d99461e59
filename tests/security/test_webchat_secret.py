"""The web chat's session id is a bearer secret: only its hash is stored, and no API returns it."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import websockets

from tests.support import live_server
from web.chat_routes import webchat_address

MIGRATION = Path(__file__).resolve().parents[2] / "crm_bridge" / "migrations" / "009_access.sql"


async def _hello(ws: Any, session: str | None = None) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "session": session}))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome", welcome
    return welcome


async def _say(ws: Any, text: str, msg_id: str) -> None:
    await ws.send(json.dumps({"type": "message", "text": text, "id": msg_id}))
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
        if frame.get("id") == msg_id and frame["type"] in ("reply", "ack", "error"):
            return


async def test_no_api_response_or_database_row_holds_a_web_chat_session_secret(database_url: str) -> None:
    async with live_server(database_url) as server:
        async with websockets.connect(server.ws_url) as ws:
            welcome = await _hello(ws)
            session, conversation_id = welcome["session"], welcome["conversation_id"]
            await _say(ws, "I want to talk to a person please", "m1")
        address = await server.services.pool.fetchval(
            "SELECT address FROM conversations WHERE id = $1", conversation_id
        )
        assert address == webchat_address(session) and session not in address

        # whoever reads the store finds no secret anywhere in the conversation's rows
        rows = await server.services.pool.fetch(
            "SELECT row_to_json(x)::text AS j FROM ("
            " SELECT c.*, NULL AS tsv FROM conversations c WHERE c.id = $1) x"
            " UNION ALL SELECT row_to_json(m)::text FROM messages m WHERE m.conversation_id = $1"
            " UNION ALL SELECT row_to_json(e)::text FROM events e WHERE e.conversation_id = $1"
            " UNION ALL SELECT row_to_json(t)::text FROM tickets t WHERE t.conversation_id = $1",
            conversation_id,
        )
        assert rows and not [r["j"] for r in rows if session in r["j"]]

        staff = server.http  # an admin sees the most
        for path in (
            "/api/conversations",
            f"/api/conversations/{conversation_id}",
            f"/api/desk/conversations/{conversation_id}",
            "/api/supervisor/conversations",
            f"/api/supervisor/conversations/{conversation_id}",
            "/api/tickets",
            "/api/supervisor/live",
        ):
            response = await staff.get(path)
            assert response.status_code == 200, path
            assert session not in response.text, path
        # the supervisor's timeline still has the conversation, with the hashed address
        timeline = (await staff.get(f"/api/supervisor/conversations/{conversation_id}")).json()
        assert timeline["address"].startswith("sha256:") and timeline["channel"] == "webchat"

        # the browser's secret still continues the same conversation
        async with websockets.connect(server.ws_url) as ws:
            again = await _hello(ws, session)
            assert again["conversation_id"] == conversation_id and again["session"] == session
            assert "I want to talk to a person please" in [m["text"] for m in again["history"]]


async def test_the_migration_hashes_session_ids_stored_in_the_clear(database_url: str) -> None:
    async with live_server(database_url) as server:
        pool = server.services.pool
        session = secrets.token_urlsafe(18)
        conversation_id = await pool.fetchval(
            "INSERT INTO conversations (channel, address, created_at, updated_at)"
            " VALUES ('webchat', $1, now(), now()) RETURNING id",
            session,
        )
        await pool.execute(
            "INSERT INTO messages (conversation_id, seq, direction, sender, body, external_id, created_at)"
            " VALUES ($1, 1, 'in', 'customer', 'hello', $2, now())",
            conversation_id,
            f"webchat:{session}:client-1",
        )
        hashing = MIGRATION.read_text().split("CREATE TABLE", 1)[0]  # the data part; runs twice safely
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(hashing)
            await conn.execute(hashing)
        row = await pool.fetchrow(
            "SELECT c.address, m.external_id FROM conversations c JOIN messages m ON m.conversation_id = c.id"
            " WHERE c.id = $1",
            conversation_id,
        )
        assert row["address"] == webchat_address(session)
        assert row["external_id"] == f"webchat:{webchat_address(session)}:client-1"
        # and the customer holding the old secret gets the same conversation back
        async with websockets.connect(server.ws_url) as ws:
            assert (await _hello(ws, session))["conversation_id"] == conversation_id
