"""A fake external CRM on 127.0.0.1 implementing the REST contract of ``crm_bridge.rest_adapter``.

It holds a few customers and one order in each status, and enforces the business rules the
adapter relies on: cancel only a placed order, refund an order at most once, create one
return label per order.

Usage::

    async with FakeCRM(token="secret") as crm:
        system = RestBusinessSystem(crm.base_url, token="secret")
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from aiohttp import web

from pipeline.model import Balance, Customer, Order, OrderItem, OrderStatus, Refund, ReturnLabel

T0 = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
"""When the sample orders were placed."""


@dataclass
class CRMRequest:
    """One request the fake received (``json`` is None when the body was not JSON)."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    headers: dict[str, str]
    status: int = 0


@dataclass
class CRMData:
    """The fake's in-memory records, keyed by ref / order number."""

    customers: dict[str, Customer] = field(default_factory=dict)
    orders: dict[str, Order] = field(default_factory=dict)
    balances: dict[str, Balance] = field(default_factory=dict)
    refunds: dict[str, Refund] = field(default_factory=dict)
    labels: dict[str, ReturnLabel] = field(default_factory=dict)


def sample_data() -> CRMData:
    """Two customers; Ana has orders 1001-1005, one per status; Bruno has order 2001 (placed)."""
    ana = Customer(
        ref="C100",
        name="Ana Souza",
        phone="+5511987654321",
        email="ana@example.com",
        whatsapp_id="5511987654321",
    )
    bruno = Customer(ref="C200", name="Bruno Lima", phone="+15551230000", email="bruno@example.com")
    headphones = OrderItem(sku="HP-01", name="Wireless headphones", quantity=1, unit_cents=12900)
    cable = OrderItem(sku="CB-02", name="USB-C cable", quantity=2, unit_cents=1500)
    kettle = OrderItem(sku="KT-03", name="Electric kettle", quantity=1, unit_cents=4500)

    def order(number: str, customer: Customer, items: tuple[OrderItem, ...], **kw: Any) -> Order:
        total = sum(i.quantity * i.unit_cents for i in items)
        return Order(
            number=number,
            customer_ref=customer.ref,
            items=items,
            amount_cents=total,
            currency="USD",
            placed_at=T0,
            **kw,
        )

    day = timedelta(days=1)
    orders = [
        order("1001", ana, (headphones,), status=OrderStatus.PLACED),
        order(
            "1002",
            ana,
            (headphones, cable),
            status=OrderStatus.SHIPPED,
            shipped_at=T0 + day,
            tracking_code="1Z999AA10123456784",
        ),
        order(
            "1003",
            ana,
            (kettle,),
            status=OrderStatus.DELIVERED,
            shipped_at=T0 + day,
            delivered_at=T0 + 3 * day,
            tracking_code="1Z999AA10123456785",
        ),
        order("1004", ana, (cable,), status=OrderStatus.CANCELLED, cancelled_at=T0 + day / 2),
        order(
            "1005",
            ana,
            (kettle,),
            status=OrderStatus.RETURNED,
            shipped_at=T0 + day,
            delivered_at=T0 + 2 * day,
            returned_at=T0 + 9 * day,
        ),
        order("2001", bruno, (kettle, cable), status=OrderStatus.PLACED),
    ]
    return CRMData(
        customers={c.ref: c for c in (ana, bruno)},
        orders={o.number: o for o in orders},
        balances={
            ana.ref: Balance(customer_ref=ana.ref, amount_cents=2500, currency="USD"),
            bruno.ref: Balance(customer_ref=bruno.ref, amount_cents=0, currency="USD"),
        },
    )


class FakeCRM:
    """A real HTTP server on a random loopback port holding :class:`CRMData` in memory.

    Args:
        token: when set, every request must carry ``Authorization: Bearer <token>`` (401 otherwise).
        data: records to serve; :func:`sample_data` when omitted.

    Attributes:
        data: the live records (tests may read or change them).
        requests: every request received, in order.
        delay: seconds every handler sleeps before answering (to test client timeouts).
    """

    def __init__(self, *, token: str | None = None, data: CRMData | None = None) -> None:
        self.token = token
        self.data = data if data is not None else sample_data()
        self.requests: list[CRMRequest] = []
        self.delay = 0.0
        self._failures: list[int] = []
        self._overrides: dict[str, tuple[int, Any]] = {}
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._sequence = 0

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("FakeCRM is not running; use 'async with FakeCRM(...)'")
        return self._base_url

    def fail_next(self, count: int = 1, *, status: int = 503) -> None:
        """Answer the next ``count`` requests with ``status`` and an error JSON."""
        self._failures.extend([status] * count)

    def override(self, path: str, body: Any, *, status: int = 200) -> None:
        """Answer every request to ``path`` with ``body`` (JSON, or text when a ``str``).

        For testing how clients cope with answers that break the contract.
        """
        self._overrides[path] = (status, body)

    def order_json(self, number: str) -> dict[str, Any]:
        """The contract JSON of an order, as the fake serves it."""
        return _jsonable(self.data.orders[number])

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/customers", self._find_customers)
        app.router.add_get("/customers/{ref}", self._get_customer)
        app.router.add_get("/customers/{ref}/orders", self._list_orders)
        app.router.add_get("/customers/{ref}/balance", self._get_balance)
        app.router.add_get("/orders/{number}", self._get_order)
        app.router.add_post("/orders/{number}/cancel", self._cancel)
        app.router.add_post("/orders/{number}/refunds", self._refund)
        app.router.add_post("/orders/{number}/return-label", self._return_label)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self._base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeCRM:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- plumbing -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await _json_body(request)
        recorded = CRMRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            json=body,
            headers=dict(request.headers),
        )
        self.requests.append(recorded)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            response: web.StreamResponse = _error(401, "unauthorized", "missing or wrong bearer token")
        elif request.path in self._overrides:
            status, override = self._overrides[request.path]
            if isinstance(override, str):
                response = web.Response(text=override, status=status, content_type="text/html")
            else:
                response = web.json_response(override, status=status)
        elif self._failures:
            status = self._failures.pop(0)
            response = _error(status, "unavailable", f"injected failure {status}")
        else:
            try:
                response = await handler(request)
            except web.HTTPNotFound:
                response = _error(404, "not_found", f"no route for {request.path}")
        recorded.status = response.status
        return response

    # --- lookups --------------------------------------------------------------------------

    async def _find_customers(self, request: web.Request) -> web.Response:
        filters = {k: v for k, v in request.query.items() if k in ("phone", "whatsapp_id", "email")}
        if len(filters) != 1:
            return _error(400, "bad_filter", "give exactly one of phone, whatsapp_id, email")
        ((key, value),) = filters.items()
        found = [c for c in self.data.customers.values() if getattr(c, key) == value]
        return web.json_response({"customers": [_jsonable(c) for c in found]})

    async def _get_customer(self, request: web.Request) -> web.Response:
        customer = self.data.customers.get(request.match_info["ref"])
        if customer is None:
            return _error(404, "customer_not_found", "no such customer")
        return web.json_response(_jsonable(customer))

    async def _list_orders(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        if ref not in self.data.customers:
            return _error(404, "customer_not_found", "no such customer")
        orders = sorted(
            (o for o in self.data.orders.values() if o.customer_ref == ref),
            key=lambda o: (o.placed_at, o.number),
            reverse=True,
        )
        return web.json_response({"orders": [_jsonable(o) for o in orders]})

    async def _get_balance(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        if ref not in self.data.customers:
            return _error(404, "customer_not_found", "no such customer")
        balance = self.data.balances.get(ref, Balance(customer_ref=ref, amount_cents=0, currency="USD"))
        return web.json_response(_jsonable(balance))

    async def _get_order(self, request: web.Request) -> web.Response:
        order = self.data.orders.get(request.match_info["number"])
        if order is None:
            return _error(404, "order_not_found", "no such order")
        return web.json_response(_jsonable(order))

    # --- actions --------------------------------------------------------------------------

    async def _cancel(self, request: web.Request) -> web.Response:
        order = self.data.orders.get(request.match_info["number"])
        if order is None:
            return _error(404, "order_not_found", "no such order")
        if order.status is OrderStatus.CANCELLED:
            return web.json_response(_jsonable(order))  # a retried cancel changes nothing
        if order.status is not OrderStatus.PLACED:
            return _error(
                409,
                f"order_{order.status.value}",
                f"Order {order.number} has already {order.status.value} and can no longer be cancelled.",
            )
        at = await _requested_at(request)
        order = dataclasses.replace(order, status=OrderStatus.CANCELLED, cancelled_at=at)
        self.data.orders[order.number] = order
        return web.json_response(_jsonable(order))

    async def _refund(self, request: web.Request) -> web.Response:
        number = request.match_info["number"]
        order = self.data.orders.get(number)
        if order is None:
            return _error(404, "order_not_found", "no such order")
        existing = self.data.refunds.get(number)
        if existing is not None:
            return web.json_response(_jsonable(existing), status=200)
        if not request.headers.get("Idempotency-Key"):
            return _error(400, "idempotency_key_required", "send an Idempotency-Key header")
        body = await _json_body(request)
        amount = body.get("amount_cents") if isinstance(body, dict) else None
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            return _error(422, "invalid_amount", "amount_cents must be a positive integer")
        if amount > order.amount_cents - order.refunded_cents:
            return _error(
                422,
                "amount_too_high",
                f"Refund of {amount} cents exceeds the {order.amount_cents} cents paid for order {number}.",
            )
        self._sequence += 1
        refund = Refund(
            order_number=number,
            amount_cents=amount,
            currency=order.currency,
            provider_ref=f"RF{self._sequence:05d}",
            created_at=await _requested_at(request),
        )
        self.data.refunds[number] = refund
        self.data.orders[number] = dataclasses.replace(order, refunded_cents=order.refunded_cents + amount)
        return web.json_response(_jsonable(refund), status=201)

    async def _return_label(self, request: web.Request) -> web.Response:
        number = request.match_info["number"]
        order = self.data.orders.get(number)
        if order is None:
            return _error(404, "order_not_found", "no such order")
        existing = self.data.labels.get(number)
        if existing is not None:
            return web.json_response(_jsonable(existing), status=200)
        if order.status not in (OrderStatus.SHIPPED, OrderStatus.DELIVERED):
            return _error(
                409,
                f"order_{order.status.value}",
                f"Order {number} is {order.status.value}; only shipped or delivered orders can be returned.",
            )
        self._sequence += 1
        code = f"RL{self._sequence:05d}"
        label = ReturnLabel(
            order_number=number,
            code=code,
            url=f"{self.base_url}/labels/{code}.pdf",
            warehouse_notified_at=await _requested_at(request),
        )
        self.data.labels[number] = label
        return web.json_response(_jsonable(label), status=201)


async def _json_body(request: web.Request) -> Any:
    # aiohttp caches the body, so the middleware and the handler can both read it.
    if not request.body_exists:
        return None
    try:
        return await request.json()
    except ValueError:
        return None


async def _requested_at(request: web.Request) -> datetime:
    body = await _json_body(request)
    value = body.get("requested_at") if isinstance(body, dict) else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return datetime.now(UTC)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


def _jsonable(record: Any) -> dict[str, Any]:
    """A model dataclass as contract JSON: ISO 8601 datetimes, enums as values, no flags."""
    data = dataclasses.asdict(record)
    data.pop("already_existed", None)
    return {key: _value(value) for key, value in data.items()}


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, OrderStatus):
        return value.value
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _value(v) for k, v in value.items()}
    return value
