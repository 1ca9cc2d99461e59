"""Eligibility rules for business actions, decided by code and data, never by reply text.

Every function is pure: it takes the business object and the current time and returns a
:class:`Decision` whose ``reason`` code is stable (used in events, tickets and templates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pipeline.model import Order, OrderStatus


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # stable code, e.g. "eligible", "outside_window"
    facts: dict[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True)
class RefundPolicy:
    """Refunds: delivered orders, within ``window_days`` of delivery, refunded at most once,
    and at most ``max_amount_cents`` without a person."""

    window_days: int = 30
    max_amount_cents: int = 100_000

    def check(self, order: Order, now: datetime) -> Decision:
        if order.refunded_cents > 0:
            return Decision(False, "already_refunded", {"refunded_cents": order.refunded_cents})
        if order.status != OrderStatus.DELIVERED or order.delivered_at is None:
            return Decision(False, f"not_delivered_{order.status}", {"status": str(order.status)})
        age = now - order.delivered_at
        days = max(0, age.days)
        if age > timedelta(days=self.window_days):
            return Decision(
                False, "outside_window", {"days_since_delivery": days, "window_days": self.window_days}
            )
        if order.amount_cents > self.max_amount_cents:
            return Decision(
                False,
                "over_limit",
                {"amount_cents": order.amount_cents, "limit_cents": self.max_amount_cents},
            )
        return Decision(True, "eligible", {"days_since_delivery": days, "window_days": self.window_days})


def check_cancel(order: Order) -> Decision:
    """Orders can be cancelled only before they ship."""
    if order.status == OrderStatus.PLACED:
        return Decision(True, "eligible")
    return Decision(False, f"status_{order.status}", {"status": str(order.status)})


def check_return_label(order: Order) -> Decision:
    """Return labels are for delivered orders."""
    if order.status == OrderStatus.DELIVERED:
        return Decision(True, "eligible")
    return Decision(False, f"status_{order.status}", {"status": str(order.status)})
