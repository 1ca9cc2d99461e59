"""Eligibility rules of business actions: refunds, cancellations and return labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.model import Customer, Order, OrderStatus
from pipeline.policy import Decision, RefundPolicy, check_cancel, check_return_label
from tests.unit.fakes import make_order

NOW = datetime(2026, 3, 20, 15, 0, tzinfo=UTC)
DAY = timedelta(days=1)
ANA = Customer(ref="C1", name="Ana Souza")


def delivered(days_ago: float, *, cents: int = 12900, refunded_cents: int = 0) -> Order:
    at = NOW - timedelta(days=days_ago)
    return make_order(
        "4517",
        ANA,
        ("Wireless headphones", cents),
        status=OrderStatus.DELIVERED,
        placed_at=at - 5 * DAY,
        shipped_at=at - 3 * DAY,
        delivered_at=at,
        refunded_cents=refunded_cents,
    )


def in_status(status: OrderStatus) -> Order:
    stamps: dict[str, Any] = {
        OrderStatus.PLACED: {},
        OrderStatus.SHIPPED: {"shipped_at": NOW - 2 * DAY},
        OrderStatus.DELIVERED: {"shipped_at": NOW - 4 * DAY, "delivered_at": NOW - DAY},
        OrderStatus.CANCELLED: {"cancelled_at": NOW - DAY},
        OrderStatus.RETURNED: {
            "shipped_at": NOW - 9 * DAY,
            "delivered_at": NOW - 7 * DAY,
            "returned_at": NOW - DAY,
        },
    }[status]
    return make_order(
        "5000", ANA, ("Electric kettle", 4500), status=status, placed_at=NOW - 10 * DAY, **stamps
    )


# --------------------------------------------------------------------------------------
# refunds


def test_refund_is_eligible_within_the_window() -> None:
    decision = RefundPolicy().check(delivered(3), NOW)

    assert decision == Decision(True, "eligible", {"days_since_delivery": 3, "window_days": 30})


def test_refund_is_eligible_exactly_thirty_days_after_delivery() -> None:
    assert RefundPolicy().check(delivered(30), NOW) == Decision(
        True, "eligible", {"days_since_delivery": 30, "window_days": 30}
    )


def test_refund_one_second_past_thirty_days_is_outside_the_window() -> None:
    late = delivered(30 + 1 / 86400)

    assert RefundPolicy().check(late, NOW).reason == "outside_window"


def test_refund_thirty_one_days_after_delivery_is_outside_the_window_with_facts() -> None:
    decision = RefundPolicy().check(delivered(31), NOW)

    assert decision == Decision(False, "outside_window", {"days_since_delivery": 31, "window_days": 30})


def test_refund_window_is_configurable() -> None:
    policy = RefundPolicy(window_days=14)

    assert policy.check(delivered(14), NOW).allowed is True
    assert policy.check(delivered(15), NOW) == Decision(
        False, "outside_window", {"days_since_delivery": 15, "window_days": 14}
    )


def test_refund_of_an_already_refunded_order_is_refused() -> None:
    decision = RefundPolicy().check(delivered(3, refunded_cents=12900), NOW)

    assert decision == Decision(False, "already_refunded", {"refunded_cents": 12900})


def test_already_refunded_wins_over_outside_window() -> None:
    assert RefundPolicy().check(delivered(90, refunded_cents=500), NOW).reason == "already_refunded"


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (OrderStatus.PLACED, "not_delivered_placed"),
        (OrderStatus.SHIPPED, "not_delivered_shipped"),
        (OrderStatus.CANCELLED, "not_delivered_cancelled"),
        (OrderStatus.RETURNED, "not_delivered_returned"),
    ],
)
def test_refund_of_an_order_that_is_not_delivered_is_refused(status: OrderStatus, reason: str) -> None:
    decision = RefundPolicy().check(in_status(status), NOW)

    assert decision == Decision(False, reason, {"status": str(status)})


def test_refund_of_a_delivered_order_without_delivery_time_is_refused() -> None:
    order = make_order("5001", ANA, ("Kettle", 4500), status=OrderStatus.DELIVERED, placed_at=NOW - DAY)

    assert RefundPolicy().check(order, NOW).reason == "not_delivered_delivered"


def test_refund_over_the_limit_needs_a_person() -> None:
    decision = RefundPolicy(max_amount_cents=10_000).check(delivered(3, cents=12900), NOW)

    assert decision == Decision(False, "over_limit", {"amount_cents": 12900, "limit_cents": 10_000})


def test_refund_exactly_at_the_limit_is_allowed() -> None:
    assert RefundPolicy(max_amount_cents=12900).check(delivered(3, cents=12900), NOW).allowed is True


def test_refund_outside_window_is_reported_before_over_limit() -> None:
    decision = RefundPolicy(max_amount_cents=100).check(delivered(45), NOW)

    assert decision.reason == "outside_window"
    assert decision.facts["days_since_delivery"] == 45


def test_delivery_time_in_the_future_counts_as_zero_days() -> None:
    # Clock skew between systems must not produce negative ages in replies.
    decision = RefundPolicy().check(delivered(-1), NOW)

    assert decision == Decision(True, "eligible", {"days_since_delivery": 0, "window_days": 30})


# --------------------------------------------------------------------------------------
# cancellations and return labels


def test_cancel_is_allowed_only_for_placed_orders() -> None:
    assert check_cancel(in_status(OrderStatus.PLACED)) == Decision(True, "eligible")


@pytest.mark.parametrize(
    "status", [OrderStatus.SHIPPED, OrderStatus.DELIVERED, OrderStatus.CANCELLED, OrderStatus.RETURNED]
)
def test_cancel_is_refused_once_the_order_left_placed(status: OrderStatus) -> None:
    assert check_cancel(in_status(status)) == Decision(False, f"status_{status}", {"status": str(status)})


def test_return_label_is_allowed_for_delivered_orders() -> None:
    assert check_return_label(in_status(OrderStatus.DELIVERED)) == Decision(True, "eligible")


@pytest.mark.parametrize(
    "status", [OrderStatus.PLACED, OrderStatus.SHIPPED, OrderStatus.CANCELLED, OrderStatus.RETURNED]
)
def test_return_label_is_refused_unless_delivered(status: OrderStatus) -> None:
    assert check_return_label(in_status(status)) == Decision(
        False, f"status_{status}", {"status": str(status)}
    )
