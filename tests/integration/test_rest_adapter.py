"""RestBusinessSystem against FakeCRM, both real HTTP on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from crm_bridge.rest_adapter import BadProviderResponse, RestBusinessSystem
from pipeline.model import Balance, Customer, OrderStatus
from pipeline.ports import ActionRefused, BusinessError, BusinessSystem, NotFound, ProviderUnavailable
from tests.fakes.crm_server import T0, FakeCRM

TOKEN = "crm-secret-token"
NOW = datetime(2026, 3, 20, 9, 15, tzinfo=UTC)


@pytest_asyncio.fixture
async def crm() -> AsyncIterator[FakeCRM]:
    async with FakeCRM(token=TOKEN) as server:
        yield server


@pytest_asyncio.fixture
async def system(crm: FakeCRM) -> AsyncIterator[RestBusinessSystem]:
    async with RestBusinessSystem(crm.base_url, token=TOKEN, timeout=2.0) as adapter:
        yield adapter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.asyncio
async def test_adapter_implements_business_system_port(system: RestBusinessSystem) -> None:
    assert isinstance(system, BusinessSystem)


@pytest.mark.asyncio
async def test_find_customer_by_phone_whatsapp_id_or_email(system: RestBusinessSystem) -> None:
    by_phone = await system.find_customer(phone="+5511987654321")
    by_whatsapp = await system.find_customer(whatsapp_id="5511987654321")
    by_email = await system.find_customer(email="ana@example.com")

    assert by_phone == Customer(
        ref="C100",
        name="Ana Souza",
        phone="+5511987654321",
        email="ana@example.com",
        whatsapp_id="5511987654321",
    )
    assert by_whatsapp == by_phone == by_email


@pytest.mark.asyncio
async def test_find_customer_tries_the_next_identifier(system: RestBusinessSystem, crm: FakeCRM) -> None:
    customer = await system.find_customer(phone="+19999999999", email="bruno@example.com")
    assert customer is not None and customer.ref == "C200"
    assert [r.query for r in crm.requests] == [{"phone": "+19999999999"}, {"email": "bruno@example.com"}]


@pytest.mark.asyncio
async def test_unknown_customer_is_none(system: RestBusinessSystem) -> None:
    assert await system.find_customer(phone="+19999999999") is None
    assert await system.find_customer() is None
    assert await system.get_customer("C999") is None


@pytest.mark.asyncio
async def test_get_customer(system: RestBusinessSystem) -> None:
    customer = await system.get_customer("C200")
    assert customer is not None
    assert customer.name == "Bruno Lima" and customer.whatsapp_id is None


@pytest.mark.asyncio
async def test_list_orders_parses_items_statuses_and_times(system: RestBusinessSystem) -> None:
    orders = await system.list_orders("C100")

    assert {o.number: o.status for o in orders} == {
        "1001": OrderStatus.PLACED,
        "1002": OrderStatus.SHIPPED,
        "1003": OrderStatus.DELIVERED,
        "1004": OrderStatus.CANCELLED,
        "1005": OrderStatus.RETURNED,
    }
    shipped = next(o for o in orders if o.number == "1002")
    assert [(i.sku, i.quantity, i.unit_cents) for i in shipped.items] == [
        ("HP-01", 1, 12900),
        ("CB-02", 2, 1500),
    ]
    assert shipped.amount_cents == 15900 and shipped.currency == "USD"
    assert shipped.placed_at == T0 and shipped.placed_at.tzinfo is not None
    assert shipped.tracking_code == "1Z999AA10123456784"
    assert shipped.delivered_at is None


@pytest.mark.asyncio
async def test_orders_of_unknown_customer_is_not_found(system: RestBusinessSystem) -> None:
    with pytest.raises(NotFound):
        await system.list_orders("C999")


@pytest.mark.asyncio
async def test_get_order_and_unknown_order(system: RestBusinessSystem) -> None:
    order = await system.get_order("1003")
    assert order is not None and order.title == "Electric kettle"
    assert await system.get_order("9999") is None


@pytest.mark.asyncio
async def test_cancel_placed_order(system: RestBusinessSystem) -> None:
    order = await system.cancel_order("1001", now=NOW)

    assert order.status is OrderStatus.CANCELLED
    assert order.cancelled_at == NOW
    fetched = await system.get_order("1001")
    assert fetched is not None and fetched.status is OrderStatus.CANCELLED


@pytest.mark.asyncio
async def test_cancel_twice_returns_the_cancelled_order(system: RestBusinessSystem) -> None:
    first = await system.cancel_order("1001", now=NOW)
    second = await system.cancel_order("1001", now=NOW)
    assert second == first


@pytest.mark.asyncio
async def test_cancel_shipped_order_is_refused_with_server_message(system: RestBusinessSystem) -> None:
    with pytest.raises(ActionRefused, match="1002 has already shipped") as caught:
        await system.cancel_order("1002", now=NOW)
    assert caught.value.code == "action_refused"
    assert caught.value.retryable is False


@pytest.mark.asyncio
async def test_cancel_unknown_order_is_not_found(system: RestBusinessSystem) -> None:
    with pytest.raises(NotFound):
        await system.cancel_order("9999", now=NOW)


@pytest.mark.asyncio
async def test_refund_is_issued_once(system: RestBusinessSystem, crm: FakeCRM) -> None:
    first = await system.issue_refund(
        "1003", amount_cents=4500, reason="damaged", idempotency_key="refund-1003-a", now=NOW
    )
    second = await system.issue_refund(
        "1003", amount_cents=4500, reason="damaged", idempotency_key="refund-1003-b", now=NOW
    )

    assert first.already_existed is False
    assert (first.order_number, first.amount_cents, first.currency) == ("1003", 4500, "USD")
    assert first.created_at == NOW
    assert second.already_existed is True
    assert second.provider_ref == first.provider_ref
    refund_requests = [r for r in crm.requests if r.path.endswith("/refunds")]
    assert refund_requests[0].headers["Idempotency-Key"] == "refund-1003-a"
    assert refund_requests[0].json == {
        "amount_cents": 4500,
        "reason": "damaged",
        "requested_at": NOW.isoformat(),
    }
    order = await system.get_order("1003")
    assert order is not None and order.refunded_cents == 4500


@pytest.mark.asyncio
async def test_refund_above_paid_amount_is_refused(system: RestBusinessSystem) -> None:
    with pytest.raises(ActionRefused, match="exceeds"):
        await system.issue_refund("1003", amount_cents=99999, reason="x", idempotency_key="k", now=NOW)


@pytest.mark.asyncio
async def test_return_label_is_created_once(system: RestBusinessSystem) -> None:
    first = await system.create_return_label("1003", now=NOW)
    second = await system.create_return_label("1003", now=NOW)

    assert first.already_existed is False
    assert first.order_number == "1003"
    assert first.url.endswith(f"/labels/{first.code}.pdf")
    assert first.warehouse_notified_at == NOW
    assert second.already_existed is True
    assert second.code == first.code


@pytest.mark.asyncio
async def test_return_label_for_placed_order_is_refused(system: RestBusinessSystem) -> None:
    with pytest.raises(ActionRefused, match="only shipped or delivered"):
        await system.create_return_label("1001", now=NOW)


@pytest.mark.asyncio
async def test_balance(system: RestBusinessSystem) -> None:
    assert await system.get_balance("C100") == Balance(customer_ref="C100", amount_cents=2500, currency="USD")
    with pytest.raises(NotFound):
        await system.get_balance("C999")


@pytest.mark.asyncio
async def test_bearer_token_is_sent(system: RestBusinessSystem, crm: FakeCRM) -> None:
    await system.get_order("1001")
    assert crm.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.asyncio
async def test_wrong_token_is_a_permanent_error(crm: FakeCRM) -> None:
    async with RestBusinessSystem(crm.base_url, token="wrong") as adapter:
        with pytest.raises(BusinessError, match="credentials") as caught:
            await adapter.get_order("1001")
    assert caught.value.code == "provider_auth_failed"
    assert caught.value.retryable is False


@pytest.mark.asyncio
async def test_no_token_sends_no_authorization_header() -> None:
    async with FakeCRM() as crm, RestBusinessSystem(crm.base_url) as adapter:
        await adapter.get_order("1001")
    assert "Authorization" not in crm.requests[0].headers


@pytest.mark.asyncio
async def test_path_segments_are_escaped(system: RestBusinessSystem, crm: FakeCRM) -> None:
    assert await system.get_order("../customers/C100") is None
    assert crm.requests[0].path == "/orders/../customers/C100"  # one segment, decoded by the server
    assert crm.requests[0].status == 404


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_server_errors_are_provider_unavailable(
    system: RestBusinessSystem, crm: FakeCRM, status: int
) -> None:
    crm.fail_next(1, status=status)
    with pytest.raises(ProviderUnavailable) as caught:
        await system.get_order("1001")
    assert caught.value.retryable is True
    assert await system.get_order("1001") is not None


@pytest.mark.asyncio
async def test_server_down_is_provider_unavailable() -> None:
    async with RestBusinessSystem(f"http://127.0.0.1:{free_port()}", timeout=1.0) as adapter:
        with pytest.raises(ProviderUnavailable, match="unreachable") as caught:
            await adapter.get_order("1001")
    assert caught.value.__cause__ is not None


@pytest.mark.asyncio
async def test_slow_server_is_provider_unavailable(crm: FakeCRM) -> None:
    crm.delay = 0.5
    async with RestBusinessSystem(crm.base_url, token=TOKEN, timeout=0.1) as adapter:
        with pytest.raises(ProviderUnavailable, match="timed out"):
            await adapter.get_order("1001")


@pytest.mark.asyncio
async def test_order_missing_fields_is_a_clear_error(system: RestBusinessSystem, crm: FakeCRM) -> None:
    broken = crm.order_json("1001")
    del broken["customer_ref"]
    crm.override("/orders/1001", broken)
    with pytest.raises(BadProviderResponse, match='missing "customer_ref"'):
        await system.get_order("1001")


@pytest.mark.asyncio
async def test_unknown_status_and_naive_datetime_are_clear_errors(
    system: RestBusinessSystem, crm: FakeCRM
) -> None:
    good = await system.get_order("1001")
    assert good is not None
    crm.override("/orders/1001", {**crm.order_json("1001"), "status": "lost"})
    with pytest.raises(BadProviderResponse, match="unknown order status 'lost'"):
        await system.get_order("1001")
    crm.override("/orders/1001", {**crm.order_json("1001"), "placed_at": "2026-03-02T14:30:00"})
    with pytest.raises(BadProviderResponse, match="no timezone"):
        await system.get_order("1001")


@pytest.mark.asyncio
async def test_non_json_body_is_a_clear_error(system: RestBusinessSystem, crm: FakeCRM) -> None:
    crm.override("/customers/C100/balance", "<html>maintenance</html>")
    with pytest.raises(BadProviderResponse, match="without a JSON body"):
        await system.get_balance("C100")
