"""A small demo company for the built-in CRM: customers with orders in every status.

Dates are relative to "now", so the demo stays meaningful whenever it is seeded: Dana has two
refundable orders, one outside the 30-day window, one placed and one shipped.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg


@dataclass(frozen=True)
class DemoOrder:
    number: str
    status: str
    item: str
    amount_cents: int
    age_days: float  # days since the status change that defines it (delivery, shipping ...)


@dataclass(frozen=True)
class DemoCustomer:
    name: str
    phone: str
    email: str
    balance_cents: int
    orders: tuple[DemoOrder, ...]
    whatsapp: bool = True


DEMO: tuple[DemoCustomer, ...] = (
    DemoCustomer(
        "Dana Reyes",
        "+15550100001",
        "dana@example.com",
        1250,
        (
            DemoOrder("4517", "delivered", "Wireless headphones", 8900, 5),
            DemoOrder("4522", "delivered", "Yoga mat", 3500, 12),
            DemoOrder("4519", "delivered", "Espresso machine", 24900, 48),
            DemoOrder("4521", "placed", "Desk lamp", 4200, 1),
            DemoOrder("4520", "shipped", "Running shoes", 12000, 2),
        ),
    ),
    DemoCustomer(
        "Sam Okafor",
        "+15550100002",
        "sam@example.com",
        0,
        (
            DemoOrder("4530", "delivered", "Blender", 7900, 50),
            DemoOrder("4531", "shipped", "Hiking backpack", 6400, 1),
            DemoOrder("4532", "placed", "Water bottle", 2500, 0.5),
        ),
    ),
    DemoCustomer(
        "Priya Nair",
        "+15550100003",
        "priya@example.com",
        -1999,
        (
            DemoOrder("4540", "delivered", "Smart watch", 19900, 3),
            DemoOrder("4541", "cancelled", "Phone case", 1500, 20),
            DemoOrder("4542", "returned", "Bluetooth speaker", 5900, 25),
        ),
    ),
)


async def add_customer(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    name: str,
    phone: str | None,
    email: str | None = None,
    whatsapp_id: str | None = None,
    balance_cents: int = 0,
    currency: str = "USD",
) -> int:
    """Insert a customer (or return the existing one with that phone/email)."""
    existing = await conn.fetchval(
        "SELECT id FROM customers WHERE phone = $1 OR lower(email) = lower($2)", phone, email
    )
    if existing:
        return int(existing)
    return int(
        await conn.fetchval(
            "INSERT INTO customers (name, phone, email, whatsapp_id, balance_cents, currency) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            name,
            phone,
            email,
            whatsapp_id,
            balance_cents,
            currency,
        )
    )


async def add_order(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    customer_id: int,
    number: str,
    status: str,
    item: str,
    amount_cents: int,
    now: datetime,
    age_days: float,
    currency: str = "USD",
) -> None:
    """Insert an order whose timestamps are consistent with its status, ``age_days`` ago."""
    changed = now - timedelta(days=age_days)
    placed = changed - timedelta(days=4) if status != "placed" else changed
    shipped = (
        changed - timedelta(days=2)
        if status in ("delivered", "returned")
        else (changed if status == "shipped" else None)
    )
    delivered = (
        changed if status == "delivered" else (changed - timedelta(days=1) if status == "returned" else None)
    )
    items = [{"sku": f"SKU-{number}", "name": item, "quantity": 1, "unit_cents": amount_cents}]
    order_id = await conn.fetchval(
        """INSERT INTO orders (number, customer_id, items, amount_cents, currency, status, tracking_code,
                               placed_at, shipped_at, delivered_at, cancelled_at, returned_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
           ON CONFLICT (number) DO NOTHING RETURNING id""",
        number,
        customer_id,
        items,
        amount_cents,
        currency,
        status,
        f"1Z{number}{secrets.randbelow(10**6):06d}" if shipped else None,
        placed,
        shipped,
        delivered,
        changed if status == "cancelled" else None,
        changed if status == "returned" else None,
    )
    if order_id is not None and status != "cancelled":
        await conn.execute(
            "INSERT INTO payments (order_id, amount_cents, currency, provider_ref, created_at) VALUES ($1, $2, $3, $4, $5)",
            order_id,
            amount_cents,
            currency,
            "PAY-" + secrets.token_hex(6).upper(),
            placed,
        )


async def seed_demo(pool: asyncpg.Pool, now: datetime) -> int:
    """Load the demo company; returns the number of orders now present for demo customers."""
    async with pool.acquire() as conn, conn.transaction():
        for customer in DEMO:
            cid = await add_customer(
                conn,
                name=customer.name,
                phone=customer.phone,
                email=customer.email,
                whatsapp_id=customer.phone if customer.whatsapp else None,
                balance_cents=customer.balance_cents,
            )
            for order in customer.orders:
                await add_order(
                    conn,
                    customer_id=cid,
                    number=order.number,
                    status=order.status,
                    item=order.item,
                    amount_cents=order.amount_cents,
                    now=now,
                    age_days=order.age_days,
                )
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.phone = ANY($1::text[])",
                [c.phone for c in DEMO],
            )
        )
