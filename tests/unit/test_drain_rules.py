"""The drain of one node (app/drain.py): what it refuses, how long it lets calls run, and that the
calls still running at the end hear a goodbye."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket

from app.drain import Drain, DrainMiddleware, drain_node


class FakeCall:
    """A call in progress that ends ``after_s`` after it is asked to end politely (or on its own)."""

    def __init__(self, calls: set[Any], idle: asyncio.Event) -> None:
        self.calls, self.idle = calls, idle
        self.ended_with: tuple[str, str] | None = None
        calls.add(self)
        idle.clear()

    def hang_up(self) -> None:
        self.calls.discard(self)
        if not self.calls:
            self.idle.set()

    async def end_politely(self, reason: str, template: str) -> None:
        self.ended_with = (reason, template)
        asyncio.get_running_loop().call_soon(self.hang_up)  # the goodbye plays, then the line hangs up


async def test_calls_that_end_in_time_are_left_alone_and_jobs_stop_first() -> None:
    drain, calls, idle, stopped = Drain(), set(), asyncio.Event(), []
    call = FakeCall(calls, idle)

    async def stop_jobs() -> None:
        stopped.append(True)

    task = asyncio.create_task(drain_node(drain, calls, idle, stop_jobs, seconds=5))
    await asyncio.sleep(0.01)
    assert drain.draining and stopped == [True] and not task.done()
    call.hang_up()  # the caller finished
    await asyncio.wait_for(task, 1)
    assert call.ended_with is None


async def test_calls_still_running_when_the_drain_time_is_over_end_with_a_goodbye() -> None:
    drain, calls, idle = Drain(), set(), asyncio.Event()
    first, second = FakeCall(calls, idle), FakeCall(calls, idle)

    async def stop_jobs() -> None:
        return None

    await asyncio.wait_for(drain_node(drain, calls, idle, stop_jobs, seconds=0.05), 2)
    assert first.ended_with == second.ended_with == ("node_draining", "drain_goodbye")
    assert not calls


async def test_a_second_drain_does_nothing() -> None:
    drain = Drain()
    assert drain.start() is True
    assert drain.start() is False


@pytest.fixture
def app_and_drain() -> tuple[FastAPI, Drain]:
    drain = Drain()
    app = FastAPI()
    app.add_middleware(DrainMiddleware, drain=drain)

    @app.post("/twilio/voice")
    async def voice() -> dict[str, str]:
        return {"twiml": "..."}

    @app.post("/twilio/status")
    async def status() -> dict[str, str]:
        return {"ok": "yes"}

    @app.websocket("/chat")
    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    return app, drain


async def test_while_draining_new_calls_are_refused_with_503_and_other_requests_go_on(
    app_and_drain: tuple[FastAPI, Drain],
) -> None:
    app, drain = app_and_drain
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as http:
        assert (await http.post("/twilio/voice")).status_code == 200
        drain.start()
        refused = await http.post("/twilio/voice")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "draining"
        # a call in progress still gets its status callbacks
        assert (await http.post("/twilio/status")).status_code == 200


def test_while_draining_a_new_chat_socket_is_closed_with_try_again_later(
    app_and_drain: tuple[FastAPI, Drain],
) -> None:
    from fastapi.testclient import TestClient  # noqa: PLC0415
    from starlette.websockets import WebSocketDisconnect  # noqa: PLC0415

    app, drain = app_and_drain
    client = TestClient(app)
    with client.websocket_connect("/chat") as ws:
        assert ws.receive_text() == "hello"
    drain.start()
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/chat") as ws:
        ws.receive_text()
    assert closed.value.code == 1013
