"""The ``BusinessSystem`` port over a generic REST/JSON API.

Implement this contract in front of any CRM, ERP or shop and closeloop can look up
customers and orders, cancel, refund and send return labels through it.

Conventions
    * JSON bodies, UTF-8. Field names are the field names of the dataclasses in
      ``pipeline/model.py``: ``Customer``, ``Order`` (with ``items``: a list of ``OrderItem``
      objects), ``Refund``, ``ReturnLabel``, ``Balance``.
    * Ids (``ref``, ``number``, ``customer_ref``) are strings (integers are accepted).
      Money is an integer in minor units (``amount_cents``) plus an ISO 4217 ``currency``.
      Datetimes are ISO 8601 with a timezone (``2026-03-01T12:00:00Z``) or ``null``.
      ``status`` of an order is one of ``placed``, ``shipped``, ``delivered``, ``cancelled``,
      ``returned``.
    * When a token is configured, every request carries ``Authorization: Bearer <token>``.
    * Path segments are percent-encoded.

Endpoints
    ``GET /customers?phone=+15551234567`` (or ``?whatsapp_id=...`` or ``?email=...``, one
    filter per request)
        200 ``{"customers": [Customer, ...]}`` (empty list when nobody matches).
    ``GET /customers/{ref}``
        200 ``Customer``; 404 when unknown.
    ``GET /customers/{ref}/orders``
        200 ``{"orders": [Order, ...]}``, newest first; 404 when the customer is unknown.
    ``GET /customers/{ref}/balance``
        200 ``Balance``; 404 when the customer is unknown.
    ``GET /orders/{number}``
        200 ``Order``; 404 when unknown.
    ``POST /orders/{number}/cancel`` with ``{"requested_at": datetime}``
        200 the cancelled ``Order``. Cancelling an already cancelled order answers 200 with
        it (retries are safe). 409 when the order can no longer be cancelled (shipped ...).
    ``POST /orders/{number}/refunds`` with ``{"amount_cents": int, "reason": str,
    "requested_at": datetime}`` and header ``Idempotency-Key``
        201 the new ``Refund``. An order is refunded at most once: when it already has a
        refund (whatever the key) answer 200 with that refund. 409/422 when refused
        (e.g. amount above what was paid).
    ``POST /orders/{number}/return-label`` with ``{"requested_at": datetime}``
        201 the new ``ReturnLabel`` (the warehouse has been notified); 200 the existing one.
        409 when the order cannot be returned.

Errors
    Error bodies are ``{"code": "order_shipped", "message": "Order 1002 has shipped ..."}``;
    ``message`` is shown to staff and may be paraphrased to customers. The adapter maps
    404 to ``NotFound`` (or ``None`` for the lookups that return optional values), 409 and
    422 to ``ActionRefused`` carrying the server's message, 429, 5xx, timeouts and
    connection failures to ``ProviderUnavailable`` (retryable), 401/403 and other 4xx to a
    permanent ``BusinessError``, and a response that breaks this contract to
    ``BadProviderResponse``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from pipeline.model import Balance, Customer, Order, OrderItem, OrderStatus, Refund, ReturnLabel
from pipeline.ports import ActionRefused, BusinessError, NotFound, ProviderUnavailable

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class BadProviderResponse(BusinessError):
    """The business system answered, but not in the documented contract (a bug on its side)."""

    code = "bad_provider_response"


class RestBusinessSystem(AbstractAsyncContextManager["RestBusinessSystem", None]):
    """``BusinessSystem`` implemented over the REST/JSON contract in this module's docstring.

    Args:
        base_url: the API root, e.g. ``https://erp.example.com/closeloop/v1``.
        token: bearer token sent on every request, or None.
        timeout: seconds for connecting and for each read.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 5.0) -> None:
        headers = {"Accept": "application/json", "User-Agent": "closeloop-rest-adapter"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- lookups --------------------------------------------------------------------------

    async def find_customer(
        self,
        *,
        phone: str | None = None,
        whatsapp_id: str | None = None,
        email: str | None = None,
    ) -> Customer | None:
        """The first customer matching ``phone``, then ``whatsapp_id``, then ``email``."""
        for name, value in (("phone", phone), ("whatsapp_id", whatsapp_id), ("email", email)):
            if not value:
                continue
            data = await self._json("GET", "customers", params={name: value})
            customers = _list(data, "customers")
            if customers:
                return _customer(customers[0])
        return None

    async def get_customer(self, ref: str) -> Customer | None:
        data = await self._json("GET", _path("customers", ref), missing_ok=True)
        return None if data is None else _customer(data)

    async def list_orders(self, customer_ref: str) -> Sequence[Order]:
        data = await self._json("GET", _path("customers", customer_ref, "orders"))
        return tuple(_order(item) for item in _list(data, "orders"))

    async def get_order(self, number: str) -> Order | None:
        data = await self._json("GET", _path("orders", number), missing_ok=True)
        return None if data is None else _order(data)

    async def get_balance(self, customer_ref: str) -> Balance:
        data = await self._json("GET", _path("customers", customer_ref, "balance"))
        return _parse(
            "balance",
            data,
            lambda d: Balance(
                customer_ref=_id(d, "customer_ref"),
                amount_cents=_int(d, "amount_cents"),
                currency=_str(d, "currency"),
            ),
        )

    # --- actions --------------------------------------------------------------------------

    async def cancel_order(self, number: str, *, now: datetime) -> Order:
        data = await self._json("POST", _path("orders", number, "cancel"), json={"requested_at": _iso(now)})
        return _order(data)

    async def issue_refund(
        self, number: str, *, amount_cents: int, reason: str, idempotency_key: str, now: datetime
    ) -> Refund:
        response = await self._request(
            "POST",
            _path("orders", number, "refunds"),
            json={"amount_cents": amount_cents, "reason": reason, "requested_at": _iso(now)},
            headers={"Idempotency-Key": idempotency_key},
        )
        data, existed = _created(response)
        return _parse(
            "refund",
            data,
            lambda d: Refund(
                order_number=_id(d, "order_number"),
                amount_cents=_int(d, "amount_cents"),
                currency=_str(d, "currency"),
                provider_ref=_id(d, "provider_ref"),
                created_at=_datetime(d, "created_at"),
                already_existed=existed,
            ),
        )

    async def create_return_label(self, number: str, *, now: datetime) -> ReturnLabel:
        response = await self._request(
            "POST", _path("orders", number, "return-label"), json={"requested_at": _iso(now)}
        )
        data, existed = _created(response)
        return _parse(
            "return label",
            data,
            lambda d: ReturnLabel(
                order_number=_id(d, "order_number"),
                code=_str(d, "code"),
                url=_str(d, "url"),
                warehouse_notified_at=_optional_datetime(d, "warehouse_notified_at"),
                already_existed=existed,
            ),
        )

    # --- HTTP -----------------------------------------------------------------------------

    async def _json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        missing_ok: bool = False,
    ) -> Any:
        response = await self._request(method, path, params=params, json=json, missing_ok=missing_ok)
        if response.status_code == 404:
            return None
        return _body(response)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        missing_ok: bool = False,
    ) -> httpx.Response:
        try:
            response = await self._client.request(method, path, params=params, json=json, headers=headers)
        except httpx.TimeoutException as e:
            raise ProviderUnavailable(f"business system timed out on {method} /{path}") from e
        except httpx.TransportError as e:
            raise ProviderUnavailable(
                f"business system unreachable on {method} /{path}: {type(e).__name__}"
            ) from e
        status = response.status_code
        logger.debug("business system answered", extra={"method": method, "status": status})
        if 200 <= status < 300:
            return response
        message = _error_message(response)
        where = f"{method} /{path}"
        if status == 404:
            if missing_ok:
                return response
            raise NotFound(message or f"not found: {where}")
        if status in (409, 422):
            raise ActionRefused(message or f"the business system refused {where}")
        if status == 429 or status >= 500:
            raise ProviderUnavailable(
                f"business system answered {status} on {where}" + (f": {message}" if message else "")
            )
        if status in (401, 403):
            raise BusinessError(
                f"business system rejected our credentials ({status}) on {where}: check the token",
                code="provider_auth_failed",
            )
        raise BusinessError(
            f"business system answered {status} on {where}" + (f": {message}" if message else ""),
            code="provider_rejected",
        )


# --- parsing ------------------------------------------------------------------------------


def _path(*segments: str) -> str:
    return "/".join(quote(str(segment), safe="") for segment in segments)


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("datetimes sent to the business system must be timezone-aware")
    return value.isoformat()


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return ""
    if isinstance(data, dict):
        for key in ("message", "detail", "error"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return str(value["message"])
    return ""


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise BadProviderResponse(
            f"business system answered {response.status_code} without a JSON body"
            f" on {response.request.method} {response.request.url.path}"
        ) from e


def _created(response: httpx.Response) -> tuple[Any, bool]:
    """The body of the answer to a create, and whether the thing already existed (200, not 201,
    or flagged ``already_existed``)."""
    data = _body(response)
    flagged = isinstance(data, Mapping) and bool(data.get("already_existed"))
    return data, response.status_code == 200 or flagged


def _parse(what: str, data: Any, build: Callable[[Mapping[str, Any]], _T]) -> _T:
    if not isinstance(data, Mapping):
        raise BadProviderResponse(f"expected a JSON object for the {what}, got {type(data).__name__}")
    return build(data)


def _list(data: Any, key: str) -> list[Any]:
    if not isinstance(data, Mapping) or not isinstance(data.get(key), list):
        raise BadProviderResponse(f'expected a JSON object with a "{key}" list')
    return list(data[key])


def _field(data: Mapping[str, Any], key: str) -> Any:
    if key not in data or data[key] is None:
        raise BadProviderResponse(f'business system response is missing "{key}"')
    return data[key]


def _str(data: Mapping[str, Any], key: str) -> str:
    value = _field(data, key)
    if not isinstance(value, str):
        raise BadProviderResponse(f'"{key}" must be a string, got {type(value).__name__}')
    return value


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    return None if data.get(key) is None else _str(data, key)


def _id(data: Mapping[str, Any], key: str) -> str:
    value = _field(data, key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadProviderResponse(f'"{key}" must be a string id, got {type(value).__name__}')
    return str(value)


def _int(data: Mapping[str, Any], key: str, default: int | None = None) -> int:
    if default is not None and data.get(key) is None:
        return default
    value = _field(data, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadProviderResponse(f'"{key}" must be an integer, got {type(value).__name__}')
    return value


def _datetime(data: Mapping[str, Any], key: str) -> datetime:
    value = _str(data, key)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        raise BadProviderResponse(f'"{key}" is not an ISO 8601 datetime: {value!r}') from e
    if parsed.tzinfo is None:
        raise BadProviderResponse(f'"{key}" has no timezone: {value!r}')
    return parsed.astimezone(UTC)


def _optional_datetime(data: Mapping[str, Any], key: str) -> datetime | None:
    return None if data.get(key) is None else _datetime(data, key)


def _customer(data: Any) -> Customer:
    return _parse(
        "customer",
        data,
        lambda d: Customer(
            ref=_id(d, "ref"),
            name=_str(d, "name"),
            phone=_optional_str(d, "phone"),
            email=_optional_str(d, "email"),
            whatsapp_id=_optional_str(d, "whatsapp_id"),
        ),
    )


def _item(data: Any) -> OrderItem:
    return _parse(
        "order item",
        data,
        lambda d: OrderItem(
            sku=_id(d, "sku"),
            name=_str(d, "name"),
            quantity=_int(d, "quantity"),
            unit_cents=_int(d, "unit_cents"),
        ),
    )


def _status(data: Mapping[str, Any]) -> OrderStatus:
    value = _str(data, "status")
    try:
        return OrderStatus(value)
    except ValueError as e:
        allowed = ", ".join(s.value for s in OrderStatus)
        raise BadProviderResponse(f"unknown order status {value!r}; expected one of {allowed}") from e


def _order(data: Any) -> Order:
    def build(d: Mapping[str, Any]) -> Order:
        items = _field(d, "items")
        if not isinstance(items, list):
            raise BadProviderResponse('"items" must be a list of objects')
        return Order(
            number=_id(d, "number"),
            customer_ref=_id(d, "customer_ref"),
            items=tuple(_item(item) for item in items),
            amount_cents=_int(d, "amount_cents"),
            currency=_str(d, "currency"),
            status=_status(d),
            placed_at=_datetime(d, "placed_at"),
            shipped_at=_optional_datetime(d, "shipped_at"),
            delivered_at=_optional_datetime(d, "delivered_at"),
            cancelled_at=_optional_datetime(d, "cancelled_at"),
            returned_at=_optional_datetime(d, "returned_at"),
            refunded_cents=_int(d, "refunded_cents", default=0),
            tracking_code=_optional_str(d, "tracking_code"),
        )

    return _parse("order", data, build)
