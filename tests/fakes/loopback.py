"""What every fake server of the speech tests shares: ``async with`` over ``start()``/``stop()``,
and an aiohttp app served on 127.0.0.1 at a free port."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from aiohttp import web


class LoopbackFake:
    """A fake server used as ``async with Fake(...) as fake``: started on entry, stopped on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class LoopbackHTTP(LoopbackFake):
    """An aiohttp application on 127.0.0.1 (a free port); subclasses add their routes in ``routes``."""

    def __init__(self) -> None:
        self.port = 0
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
