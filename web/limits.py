"""Limits that keep one client from using up the server: request body size, who a client is
(its address), token buckets and per-address connection counts.

Pure pieces with no I/O except :class:`BodyLimitMiddleware`, a plain ASGI middleware; every
time-based piece takes the time as an argument (or a ``now`` callable), so tests need no sleeps.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


# ---- request bodies ------------------------------------------------------------------------------------
class BodyTooLarge(HTTPException):
    """A request body over the limit: 413 ``body_too_large`` (rendered like every API error)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes; send less")
        self.code = "body_too_large"


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 before they are read in full.

    A ``Content-Length`` over the limit is answered at once, without reading the body; a body
    without one (chunked) is counted as it streams in and refused at the chunk that crosses the
    limit. Inside a route the refusal surfaces as :class:`BodyTooLarge`, an ``HTTPException``, so
    FastAPI's body parsing passes it on to the app's JSON error handler.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(send, self.max_bytes)
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            await _refuse(send, self.max_bytes)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "body_too_large",
                "message": f"the request body is larger than {limit} bytes; send less",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ---- who a client is -----------------------------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str | Iterable[str]) -> tuple[Network, ...]:
    """``"10.0.0.1, 192.168.0.0/16"`` (or a list of such) as networks; empty for none."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip())


def forwarded_for(headers: Any) -> str | None:
    """Every ``X-Forwarded-For`` line of a request, joined in order. A proxy such as HAProxy adds its
    own line after the client's: reading only the first line would believe the client's spoof."""
    lines = headers.getlist("x-forwarded-for")
    return ",".join(lines) if lines else None


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The address a request or socket came from: the peer, unless the peer is a trusted proxy;
    then the nearest address in ``X-Forwarded-For`` that is not itself a trusted proxy. Nobody
    else's ``X-Forwarded-For`` is believed (anyone can send one)."""
    address = peer or "unknown"
    if not trusted or not forwarded_for or not _trusted(address, trusted):
        return address
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _valid(hop):
            return address  # a mangled header: fall back to the proxy itself
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else address


def _valid(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _trusted(text: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


# ---- rates and counts ------------------------------------------------------------------------------------
@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``per_second``; each message takes one."""

    capacity: float
    per_second: float
    tokens: float = field(init=False)
    updated: datetime | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, now: datetime) -> bool:
        if self.updated is not None:
            elapsed = max(0.0, (now - self.updated).total_seconds())
            self.tokens = min(self.capacity, self.tokens + elapsed * self.per_second)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def full(self, now: datetime) -> bool:
        if self.updated is None:
            return True
        elapsed = max(0.0, (now - self.updated).total_seconds())
        return self.tokens + elapsed * self.per_second >= self.capacity


class ClientBuckets:
    """One :class:`TokenBucket` per client address; buckets that filled up again are forgotten."""

    def __init__(self, capacity: float, per_second: float, *, sweep_every: int = 1000) -> None:
        self._capacity = capacity
        self._rate = per_second
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_every = sweep_every
        self._since_sweep = 0

    def take(self, client: str, now: datetime) -> bool:
        self._since_sweep += 1
        if self._since_sweep >= self._sweep_every:
            self._since_sweep = 0
            self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self._capacity, self._rate)
        return bucket.take(now)


class ConnectionCounter:
    """Open connections per client address, at most ``limit`` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        count = self._open.get(client, 0)
        if count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    def count(self, client: str) -> int:
        return self._open.get(client, 0)
