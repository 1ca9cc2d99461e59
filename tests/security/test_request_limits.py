"""Limits that keep one client from exhausting the server: request bodies, web-chat connections,
message floods, idle sockets and oversize frames; and unguessable return-label codes."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import websockets

from crm_bridge.crm import BuiltinCRM
from pipeline.clock import FakeClock
from tests.support import live_server, make_customer

LIMIT = 64 * 1024


async def test_request_bodies_over_the_limit_are_refused_with_413_before_being_read(
    database_url: str,
) -> None:
    async with live_server(database_url, max_body_bytes=LIMIT) as server:
        big = {"name": "gift", "examples": ["x" * (LIMIT + 10)], "action": "faq", "answer": "a"}
        for client, path in (
            (server.http, "/api/intents"),  # signed in
            (server.anonymous(), "/login"),  # public
            (server.anonymous(), "/twilio/messaging"),  # before any signature check
        ):
            response = await client.post(path, json=big)
            assert response.status_code == 413, (path, response.status_code)
            assert response.json()["error"]["code"] == "body_too_large", path

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"name": "gift", "examples": ["'
            for _ in range(LIMIT // 1024 + 2):
                yield b"y" * 1024
            yield b'"], "action": "faq", "answer": "a"}'

        streamed = await server.http.post(
            "/api/intents", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "body_too_large"
        assert (await server.http.get("/api/intents/gift")).status_code == 404  # nothing was created

        small = {"name": "gift", "examples": ["do you sell gift cards"], "action": "faq", "answer": "Yes."}
        assert (await server.http.post("/api/intents", json=small)).status_code == 201


async def _hello(ws: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "session": None}))
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def _send(ws: Any, text: str, msg_id: str) -> list[dict[str, Any]]:
    """Send a message; frames until the one answering it (an error for a refused message)."""
    await ws.send(json.dumps({"type": "message", "text": text, "id": msg_id}))
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 15))
        frames.append(frame)
        if frame["type"] == "error" or (frame.get("id") == msg_id and frame["type"] in ("reply", "ack")):
            return frames


async def test_a_chat_message_flood_from_one_address_is_rate_limited_and_the_socket_stays_usable(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(
        database_url, clock=clock, chat_messages_burst=3, chat_messages_per_minute=6
    ) as server:
        async with websockets.connect(server.ws_url) as first, websockets.connect(server.ws_url) as second:
            await _hello(first)
            await _hello(second)
            outcomes = []
            for i in range(8):  # two sockets of one address share one allowance
                frames = await _send(first if i % 2 else second, "hello there", f"m{i}")
                outcomes.append(frames[-1]["type"])
            assert outcomes.count("error") == 5, outcomes
            assert outcomes[:3] == ["reply", "reply", "reply"]
            refused = await _send(first, "hello again", "m-late")
            assert refused[-1]["code"] == "rate_limited" and "too fast" in refused[-1]["message"]

            clock.advance(timedelta(seconds=10))  # 6 a minute: one more message after 10 s
            frames = await _send(first, "what are your opening hours", "m-after")
            assert frames[-1]["type"] == "reply" and frames[-1]["id"] == "m-after"


async def test_a_client_that_keeps_flooding_is_closed_with_a_reason(database_url: str) -> None:
    async with live_server(database_url, chat_messages_burst=1, chat_messages_per_minute=1) as server:
        async with websockets.connect(server.ws_url) as ws:
            await _hello(ws)
            for i in range(200):
                try:
                    await ws.send(json.dumps({"type": "message", "text": "spam", "id": f"s{i}"}))
                except websockets.ConnectionClosed:
                    break
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1008
                assert "too many messages" in closed.rcvd.reason


async def test_too_many_chat_connections_from_one_address_are_refused(database_url: str) -> None:
    async with live_server(database_url, chat_max_connections=2) as server:
        async with websockets.connect(server.ws_url) as a, websockets.connect(server.ws_url) as b:
            assert (await _hello(a))["type"] == "welcome"
            assert (await _hello(b))["type"] == "welcome"
            async with websockets.connect(server.ws_url) as c:
                try:
                    await asyncio.wait_for(c.recv(), 10)
                    raise AssertionError("a third connection from one address was served")
                except websockets.ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code == 1013
                    assert "too many chat connections" in closed.rcvd.reason
        # closing them frees the allowance
        async with websockets.connect(server.ws_url) as d:
            assert (await _hello(d))["type"] == "welcome"


async def test_an_idle_chat_socket_is_closed_with_a_reason(database_url: str) -> None:
    async with live_server(database_url, chat_idle_seconds=0.5) as server:
        async with websockets.connect(server.ws_url) as ws:
            assert (await _hello(ws))["type"] == "welcome"
            try:
                await asyncio.wait_for(ws.recv(), 10)
                raise AssertionError("the idle socket got a frame instead of being closed")
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1000
                assert "idle" in closed.rcvd.reason


async def test_an_oversize_chat_frame_closes_the_socket_and_a_long_message_is_refused(
    database_url: str,
) -> None:
    async with live_server(database_url) as server:
        async with websockets.connect(server.ws_url) as ws:
            await _hello(ws)
            too_long = await _send(ws, "a" * 2001, "long")
            assert too_long[-1]["code"] == "message_too_long"
            await ws.send(json.dumps({"type": "message", "text": "b" * 40_000, "id": "huge"}))
            try:
                await asyncio.wait_for(ws.recv(), 10)
                raise AssertionError("an oversize frame was answered")
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1009


async def test_return_label_codes_carry_at_least_128_random_bits(database_url: str) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as server:
        crm = server.services.business
        assert isinstance(crm, BuiltinCRM)
        customer = await make_customer(
            server.services.pool,
            clock.now(),
            {f"o{i}": ("delivered", "Kettle", 2900, 2) for i in range(5)},
        )
        codes = set()
        for number in customer.orders.values():
            label = await crm.create_return_label(number, now=clock.now())
            # base32: 5 bits a character, so 26 characters are 130 bits
            assert re.fullmatch(r"RL-[A-Z2-7]{26}", label.code), label.code
            assert label.url.endswith(f"/labels/{label.code}")
            codes.add(label.code)
            page = await server.anonymous().get(f"/labels/{label.code}")
            assert page.status_code == 200 and label.code in page.text
        assert len(codes) == 5
