"""One "server process" for the routing race test: routes handoffs of one queue until none wait.

Run by ``tests/integration/test_routing.py`` as a separate OS process with its own asyncpg pool::

    CLOSELOOP_TEST_DB=... CLOSELOOP_TEST_QUEUE=... python tests/integration/routing_worker.py

It connects, prints ``ready``, waits for ``go`` on stdin (so both processes start together), then
runs ``CLOSELOOP_TEST_ROUTERS`` concurrent loops of ``Routing.assign_next`` and prints the ids of
the offers it made as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crm_bridge import db  # noqa: E402
from crm_bridge.routing import Routing  # noqa: E402
from pipeline.clock import SystemClock  # noqa: E402


async def main() -> int:
    url = os.environ["CLOSELOOP_TEST_DB"]
    queue = os.environ["CLOSELOOP_TEST_QUEUE"]
    routers = int(os.environ.get("CLOSELOOP_TEST_ROUTERS", "5"))
    pool = await db.create_pool(url, min_size=routers, max_size=routers)
    try:
        routing = Routing(pool, SystemClock())
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        offers: list[int] = []
        deadline = time.monotonic() + 60

        async def route() -> None:
            while time.monotonic() < deadline:
                offer = await routing.assign_next(queue)
                if offer is not None:
                    offers.append(offer.id)
                    continue
                # None also means "everything left is locked by the other process right now".
                left = await pool.fetchrow(
                    """SELECT (SELECT count(*) FROM handoffs WHERE queue = $1 AND status = 'waiting') AS waiting,
                              (SELECT count(*) FROM agents WHERE $1 = ANY(queues) AND presence = 'available'
                                                              AND active < capacity) AS free""",
                    queue,
                )
                if left["waiting"] == 0 or left["free"] == 0:
                    return
                await asyncio.sleep(0.005)

        await asyncio.gather(*(route() for _ in range(routers)))
        print(json.dumps({"pid": os.getpid(), "offers": offers}), flush=True)
    finally:
        await pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
