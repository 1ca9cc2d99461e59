"""Agent console events reach an agent whatever server process their console is connected to."""

from __future__ import annotations

import asyncio

import asyncpg

from crm_bridge.agent_events import PgEventBridge
from pipeline.clock import FakeClock
from tests.support import live_server


async def test_an_event_published_by_one_server_reaches_a_console_on_another_exactly_once(
    database_url: str,
) -> None:
    clock = FakeClock()
    async with live_server(database_url, clock=clock) as a, live_server(database_url, clock=clock) as b:
        agent_id = 424242
        on_a = a.services.desk.subscribe(agent_id)
        on_b = b.services.desk.subscribe(agent_id)
        await b.services.desk.publish(agent_id, {"type": "offer", "conversation": 7, "summary": "Who: Dana"})

        got_a = await asyncio.wait_for(on_a.get(), timeout=5)
        got_b = await asyncio.wait_for(on_b.get(), timeout=5)
        assert got_a == got_b == {"type": "offer", "conversation": 7, "summary": "Who: Dana"}
        await asyncio.sleep(0.3)  # an absence to prove: no second delivery
        assert on_a.empty() and on_b.empty()  # once each: B ignores its own notification

        # another agent's events never reach this console
        await a.services.desk.publish(agent_id + 1, {"type": "offer", "conversation": 8})
        await asyncio.sleep(0.3)  # an absence to prove: nothing is delivered
        assert on_a.empty() and on_b.empty()


async def test_the_bridge_listens_again_after_its_connection_drops(
    database_url: str, pool: asyncpg.Pool
) -> None:
    got: list[tuple[int, dict]] = []
    listener = PgEventBridge(database_url, pool, channel="closeloop_test_events", check_every=0.1)
    sender = PgEventBridge(database_url, pool, channel="closeloop_test_events")
    await listener.start(lambda agent, event: got.append((agent, event)))
    try:
        assert listener._conn is not None
        dropped = listener._conn
        dropped.terminate()  # the database dropped the connection
        deadline = asyncio.get_running_loop().time() + 5
        while listener._conn is dropped or listener._conn is None:  # wait for the reconnect
            assert asyncio.get_running_loop().time() < deadline, "the bridge did not listen again"
            await asyncio.sleep(0.02)
        await sender.publish(1, {"type": "ping"})
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.05)
        assert got == [(1, {"type": "ping"})]
        too_big = {"type": "huge", "text": "x" * 9000}
        await sender.publish(1, too_big)  # over NOTIFY's limit: logged, not sent
        await asyncio.sleep(0.2)  # an absence to prove: the oversized event is never delivered
        assert len(got) == 1
    finally:
        await listener.stop()
