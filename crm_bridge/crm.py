"""The built-in CRM: customers, orders, payments, refunds and return labels in PostgreSQL.

Implements :class:`pipeline.ports.BusinessSystem`. Idempotency lives in the schema: one refund
per order (UNIQUE), one return label per order (UNIQUE); a second call returns the first row.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from crm_bridge.db import from_columns
from pipeline.model import Balance, Customer, Order, OrderItem, OrderStatus, Refund, ReturnLabel
from pipeline.ports import ActionRefused, NotFound

_ORDER_SQL = """
SELECT o.*, c.id AS cid, COALESCE(r.amount_cents, 0) AS refunded_cents
FROM orders o JOIN customers c ON c.id = o.customer_id
LEFT JOIN refunds r ON r.order_id = o.id
"""


def _customer(row: asyncpg.Record) -> Customer:
    return from_columns(Customer, row, ref=str(row["id"]))


def _order(row: asyncpg.Record) -> Order:
    items = tuple(
        OrderItem(sku=i["sku"], name=i["name"], quantity=int(i["quantity"]), unit_cents=int(i["unit_cents"]))
        for i in row["items"]
    )
    return from_columns(
        Order, row, customer_ref=str(row["cid"]), items=items, status=OrderStatus(row["status"])
    )


def new_label_code() -> str:
    """A return-label code: ``RL-`` and 128 random bits in base32 (26 letters and digits 2-7).

    The code is the key to the label page (``/labels/{code}``, public: customers open it from a
    text), which shows the customer's name and order, so it must not be guessable.
    """
    return "RL-" + base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=")


class BuiltinCRM:
    """The default business system, stored next to the conversations."""

    def __init__(self, pool: asyncpg.Pool, *, label_base_url: str = "http://127.0.0.1:8080/labels") -> None:
        self._pool = pool
        self._label_base = label_base_url.rstrip("/")

    async def find_customer(
        self, *, phone: str | None = None, whatsapp_id: str | None = None, email: str | None = None
    ) -> Customer | None:
        conditions: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("phone", phone),
            ("whatsapp_id", whatsapp_id),
            ("lower(email)", email.lower() if email else None),
        ):
            if value:
                args.append(value)
                conditions.append(f"{column} = ${len(args)}")
        if not conditions:
            return None
        row = await self._pool.fetchrow(
            f"SELECT * FROM customers WHERE {' OR '.join(conditions)} ORDER BY id LIMIT 1", *args
        )
        return _customer(row) if row else None

    async def get_customer(self, ref: str) -> Customer | None:
        if not ref.isdigit():
            return None
        row = await self._pool.fetchrow("SELECT * FROM customers WHERE id = $1", int(ref))
        return _customer(row) if row else None

    async def list_orders(self, customer_ref: str) -> Sequence[Order]:
        if not customer_ref.isdigit():
            return []
        rows = await self._pool.fetch(
            _ORDER_SQL + " WHERE c.id = $1 ORDER BY o.placed_at DESC", int(customer_ref)
        )
        return [_order(r) for r in rows]

    async def get_order(self, number: str) -> Order | None:
        row = await self._pool.fetchrow(_ORDER_SQL + " WHERE o.number = $1", number)
        return _order(row) if row else None

    async def cancel_order(self, number: str, *, now: datetime) -> Order:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT status FROM orders WHERE number = $1 FOR UPDATE", number)
            if row is None:
                raise NotFound(f"order {number} not found")
            if row["status"] == OrderStatus.CANCELLED:
                pass  # idempotent: cancelling twice is a no-op
            elif row["status"] != OrderStatus.PLACED:
                raise ActionRefused(
                    f"order {number} is {row['status']}; only placed orders can be cancelled",
                    code=f"order_{row['status']}",
                )
            else:
                await conn.execute(
                    "UPDATE orders SET status = 'cancelled', cancelled_at = $2 WHERE number = $1", number, now
                )
        order = await self.get_order(number)
        assert order is not None
        return order

    async def issue_refund(
        self, number: str, *, amount_cents: int, reason: str, idempotency_key: str, now: datetime
    ) -> Refund:
        async with self._pool.acquire() as conn, conn.transaction():
            order = await conn.fetchrow(
                "SELECT id, amount_cents, currency FROM orders WHERE number = $1 FOR UPDATE", number
            )
            if order is None:
                raise NotFound(f"order {number} not found")
            if amount_cents <= 0 or amount_cents > order["amount_cents"]:
                raise ActionRefused(
                    f"refund amount must be between 1 and {order['amount_cents']} cents", code="bad_amount"
                )
            row = await conn.fetchrow(
                """INSERT INTO refunds (order_id, amount_cents, currency, reason, provider_ref, idempotency_key, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT DO NOTHING RETURNING *""",
                order["id"],
                amount_cents,
                order["currency"],
                reason,
                "RF-" + secrets.token_hex(5).upper(),
                idempotency_key,
                now,
            )
            existed = row is None
            if existed:
                row = await conn.fetchrow("SELECT * FROM refunds WHERE order_id = $1", order["id"])
        return from_columns(Refund, row, order_number=number, already_existed=existed)

    async def create_return_label(self, number: str, *, now: datetime) -> ReturnLabel:
        async with self._pool.acquire() as conn, conn.transaction():
            order = await conn.fetchrow("SELECT id FROM orders WHERE number = $1", number)
            if order is None:
                raise NotFound(f"order {number} not found")
            code = new_label_code()
            row = await conn.fetchrow(
                """INSERT INTO return_labels (order_id, code, url, warehouse_notified_at, created_at)
                   VALUES ($1, $2, $3, $4, $4) ON CONFLICT (order_id) DO NOTHING RETURNING *""",
                order["id"],
                code,
                f"{self._label_base}/{code}",
                now,
            )
            existed = row is None
            if existed:
                row = await conn.fetchrow("SELECT * FROM return_labels WHERE order_id = $1", order["id"])
        return from_columns(ReturnLabel, row, order_number=number, already_existed=existed)

    async def get_balance(self, customer_ref: str) -> Balance:
        row = await self._pool.fetchrow(
            "SELECT balance_cents, currency FROM customers WHERE id = $1", int(customer_ref)
        )
        if row is None:
            raise NotFound(f"customer {customer_ref} not found")
        return Balance(customer_ref=customer_ref, amount_cents=row["balance_cents"], currency=row["currency"])

    async def get_label(self, code: str) -> dict[str, Any] | None:
        """A return label with its order, for the label page."""
        row = await self._pool.fetchrow(
            """SELECT l.code, l.url, l.created_at, l.warehouse_notified_at, o.number, o.items, c.name
               FROM return_labels l JOIN orders o ON o.id = l.order_id JOIN customers c ON c.id = o.customer_id
               WHERE l.code = $1""",
            code,
        )
        return dict(row) if row else None
