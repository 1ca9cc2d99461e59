"""A TCP proxy in front of PostgreSQL that can take the database away: an outage as a node sees it.

Every byte is passed through unchanged (the PostgreSQL wire protocol, TLS or not). :meth:`cut`
drops every open connection at once (both sides see the socket reset, as when the database host
dies or a network partition heals with resets) and stops listening, so new connections are
refused; :meth:`restore` listens again on the same port. Nothing is faked about PostgreSQL itself:
behind the proxy it is the real server with the real data.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.parse
from pathlib import Path


class TcpFaultProxy:
    """Args: dsn: the database the proxy stands in front of (TCP, or a Unix socket folder given as
    ``?host=/path`` as the embedded PostgreSQL does); :meth:`url_for` gives the DSN through it."""

    def __init__(self, dsn: str) -> None:
        parts = urllib.parse.urlsplit(dsn)
        folder = urllib.parse.parse_qs(parts.query).get("host", [""])[0]
        self.unix_socket: str | None = None
        self.target: tuple[str, int] = (parts.hostname or "127.0.0.1", parts.port or 5432)
        if folder.startswith("/"):
            sockets = sorted(Path(folder).glob(".s.PGSQL.*"))
            if not sockets or sockets[0].suffix == ".lock":
                raise ValueError(f"no PostgreSQL socket in {folder}")
            self.unix_socket = str(sockets[0])
        with socket.socket() as probe:  # a free port, kept across cut/restore
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted so far

    def url_for(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the proxy's."""
        parts = urllib.parse.urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        query = urllib.parse.urlencode(
            [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k not in ("host", "port")]
        )
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))

    @property
    def up(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        """The database goes away: open connections reset, new ones refused."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._server is None:
            client_w.transport.abort()
            return
        try:
            if self.unix_socket is not None:
                server_r, server_w = await asyncio.open_unix_connection(self.unix_socket)
            else:
                server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self.connections += 1
        self._links.update((client_w, server_w))
        pumps = [
            asyncio.create_task(self._pump(client_r, server_w)),
            asyncio.create_task(self._pump(server_r, client_w)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, server_w):
                self._links.discard(writer)
                writer.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
