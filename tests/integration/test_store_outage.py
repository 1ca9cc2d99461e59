"""The conversation store when the database is unreachable: the turn raises StoreUnavailable
(nothing written, the same turn may run again), never a driver error the caller cannot handle."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from crm_bridge.conversations import PgConversationStore
from pipeline.model import Channel
from pipeline.ports import StoreUnavailable
from tests.support import free_port


async def test_a_turn_on_an_unreachable_database_raises_store_unavailable() -> None:
    nothing_listens = f"postgresql://postgres@127.0.0.1:{free_port()}/closeloop"
    pool = await asyncpg.create_pool(nothing_listens, min_size=0, max_size=1)
    try:
        store = PgConversationStore(pool)
        with pytest.raises(StoreUnavailable, match="unreachable"):
            async with store.turn(
                channel=Channel.VOICE,
                address="CA" + "7" * 32,
                text="where is my order",
                external_id="voice:CA7:1",
                now=datetime.now(UTC),
            ):
                pass  # never reached: the load fails first
    finally:
        await pool.close()
