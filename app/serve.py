"""``closeloop serve``: the app under uvicorn, with a drain on SIGTERM (app/drain.py)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

from app.factory import create_app, start_drain
from app.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Serve until stopped; the first SIGTERM drains the node first."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_max_size=65536,
        access_log=False,
        timeout_graceful_shutdown=10,
        proxy_headers=False,  # X-Forwarded-For is believed only from CLOSELOOP_TRUSTED_PROXIES (web/limits.py)
    )
    DrainingServer(config, lambda: start_drain(app, settings)).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM drains the node before the server stops;
    Ctrl-C (SIGINT) and a second SIGTERM stop it at once, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if (
            sig == signal.SIGTERM
            and self._drain_task is None
            and self._loop is not None
            and not self.should_exit
        ):
            self._loop.call_soon_threadsafe(self._begin_drain)
            return
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain_then_exit(), name="closeloop-drain")

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:
            log.exception("drain failed; stopping anyway")
        self.should_exit = True
