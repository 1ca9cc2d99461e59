"""TwilioTextSender (the real twilio SDK) against FakeTwilio on loopback."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from pipeline.model import Channel, OutboundText, SendResult
from pipeline.ports import TextSender
from telephony.sender import DeliveryError, TwilioApiHttpClient, TwilioTextSender, build_client, redirect_url
from tests.fakes.twilio_server import FakeTwilio

ACCOUNT_SID = "AC" + "5" * 32
AUTH_TOKEN = "fake-auth-token"
SMS_FROM = "+15550001111"
WHATSAPP_FROM = "+15550002222"
TEMPLATE_SID = "HX" + "7" * 32
CUSTOMER = "+15553334444"
MESSAGES_PATH = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as server:
        yield server


def make_sender(
    fake: FakeTwilio,
    *,
    auth_token: str = AUTH_TOKEN,
    sms_from: str | None = SMS_FROM,
    whatsapp_from: str | None = WHATSAPP_FROM,
    template_sid: str | None = TEMPLATE_SID,
) -> TwilioTextSender:
    return TwilioTextSender(
        ACCOUNT_SID,
        auth_token,
        sms_from=sms_from,
        whatsapp_from=whatsapp_from,
        api_base_url=fake.base_url,
        whatsapp_template_sid=template_sid,
    )


def sms(body: str = "Your return label: https://x.test/l/1") -> OutboundText:
    return OutboundText(channel=Channel.SMS, to=CUSTOMER, body=body, kind="label")


def whatsapp(body: str = "Your refund was issued.") -> OutboundText:
    return OutboundText(channel=Channel.WHATSAPP, to=CUSTOMER, body=body, kind="followup")


@pytest.mark.asyncio
async def test_sender_implements_text_sender_port(fake: FakeTwilio) -> None:
    async with make_sender(fake) as sender:
        assert isinstance(sender, TextSender)


@pytest.mark.asyncio
async def test_sms_is_sent_from_sms_number(fake: FakeTwilio) -> None:
    async with make_sender(fake) as sender:
        result = await sender.send(sms("Hello & welcome"))

    assert len(fake.messages) == 1
    request = fake.messages[0]
    assert request.path == MESSAGES_PATH
    assert request.form == {"To": CUSTOMER, "From": SMS_FROM, "Body": "Hello & welcome"}
    assert result == SendResult(
        provider_ref=request.response["sid"], channel_used=Channel.SMS, detail="session"
    )
    assert result.provider_ref.startswith("SM") and len(result.provider_ref) == 34


@pytest.mark.asyncio
async def test_requests_carry_basic_auth_and_sdk_headers(fake: FakeTwilio) -> None:
    async with make_sender(fake) as sender:
        await sender.send(sms())

    headers = fake.messages[0].headers
    expected = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    assert headers["Authorization"] == f"Basic {expected}"
    assert headers["User-Agent"].startswith("twilio-python/")
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"


@pytest.mark.asyncio
async def test_whatsapp_in_session_is_free_form_with_prefixes(fake: FakeTwilio) -> None:
    async with make_sender(fake) as sender:
        result = await sender.send(whatsapp("Your refund was issued."))

    assert fake.messages[0].form == {
        "To": f"whatsapp:{CUSTOMER}",
        "From": f"whatsapp:{WHATSAPP_FROM}",
        "Body": "Your refund was issued.",
    }
    assert result.channel_used is Channel.WHATSAPP
    assert result.detail == "session"


@pytest.mark.asyncio
async def test_whatsapp_prefix_already_present_is_not_doubled(fake: FakeTwilio) -> None:
    async with make_sender(fake, whatsapp_from=f"whatsapp:{WHATSAPP_FROM}") as sender:
        await sender.send(OutboundText(channel=Channel.WHATSAPP, to=f"whatsapp:{CUSTOMER}", body="hi"))

    assert fake.messages[0].form["To"] == f"whatsapp:{CUSTOMER}"
    assert fake.messages[0].form["From"] == f"whatsapp:{WHATSAPP_FROM}"


@pytest.mark.asyncio
async def test_followup_with_open_session_is_free_form(fake: FakeTwilio) -> None:
    async with make_sender(fake) as sender:
        result = await sender.send_followup(whatsapp(), whatsapp_session_open=True, sms_fallback_to=CUSTOMER)

    assert result.detail == "session"
    assert "ContentSid" not in fake.messages[0].form


@pytest.mark.asyncio
async def test_closed_whatsapp_window_uses_approved_template(fake: FakeTwilio) -> None:
    async with make_sender(fake) as sender:
        result = await sender.send_followup(
            whatsapp('Did "order 1002" arrive?'), whatsapp_session_open=False, sms_fallback_to=CUSTOMER
        )

    form = fake.messages[0].form
    assert form["To"] == f"whatsapp:{CUSTOMER}"
    assert form["From"] == f"whatsapp:{WHATSAPP_FROM}"
    assert form["ContentSid"] == TEMPLATE_SID
    assert json.loads(form["ContentVariables"]) == {"1": 'Did "order 1002" arrive?'}
    assert "Body" not in form
    assert result == SendResult(
        provider_ref=fake.messages[0].response["sid"], channel_used=Channel.WHATSAPP, detail="template"
    )


@pytest.mark.asyncio
async def test_closed_window_without_template_falls_back_to_sms(fake: FakeTwilio) -> None:
    async with make_sender(fake, template_sid=None) as sender:
        result = await sender.send_followup(
            whatsapp("Your refund was issued."), whatsapp_session_open=False, sms_fallback_to="+15559990000"
        )

    assert fake.messages[0].form == {
        "To": "+15559990000",
        "From": SMS_FROM,
        "Body": "Your refund was issued.",
    }
    assert result.channel_used is Channel.SMS
    assert result.detail == "sms_fallback"


@pytest.mark.asyncio
async def test_closed_window_with_no_template_and_no_fallback_is_permanent(fake: FakeTwilio) -> None:
    async with make_sender(fake, template_sid=None) as sender:
        with pytest.raises(DeliveryError, match="24-hour window") as caught:
            await sender.send_followup(whatsapp(), whatsapp_session_open=False, sms_fallback_to=None)

    assert caught.value.retryable is False
    assert fake.requests == []


@pytest.mark.asyncio
async def test_closed_window_fallback_needs_an_sms_sender(fake: FakeTwilio) -> None:
    async with make_sender(fake, template_sid=None, sms_from=None) as sender:
        with pytest.raises(DeliveryError) as caught:
            await sender.send_followup(whatsapp(), whatsapp_session_open=False, sms_fallback_to=CUSTOMER)

    assert caught.value.retryable is False
    assert fake.requests == []


@pytest.mark.asyncio
async def test_sms_without_sms_number_is_permanent(fake: FakeTwilio) -> None:
    async with make_sender(fake, sms_from=None) as sender:
        with pytest.raises(DeliveryError, match="sms_from") as caught:
            await sender.send(sms())
    assert caught.value.retryable is False


@pytest.mark.asyncio
async def test_webchat_message_is_refused(fake: FakeTwilio) -> None:
    async with make_sender(fake) as sender:
        with pytest.raises(DeliveryError, match="webchat") as caught:
            await sender.send(OutboundText(channel=Channel.WEBCHAT, to="session-1", body="hi"))
    assert caught.value.retryable is False


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 503, 429])
async def test_server_errors_are_retryable(fake: FakeTwilio, status: int) -> None:
    fake.fail_next(1, status=status)
    async with make_sender(fake) as sender:
        with pytest.raises(DeliveryError) as caught:
            await sender.send(sms())
        assert caught.value.retryable is True
        assert caught.value.status == status
        # Twilio recovered: the next attempt goes through.
        result = await sender.send(sms())

    assert result.provider_ref == fake.messages[0].response["sid"]
    assert len(fake.requests) == 2
    assert len(fake.messages) == 1


@pytest.mark.asyncio
async def test_invalid_number_is_permanent_with_twilio_code(fake: FakeTwilio) -> None:
    fake.fail_next(1, status=400, code=21211, message="The 'To' number +1555 is not a valid phone number.")
    async with make_sender(fake) as sender:
        with pytest.raises(DeliveryError, match="not a valid phone number") as caught:
            await sender.send(sms())

    error = caught.value
    assert error.retryable is False
    assert error.status == 400
    assert error.code == 21211
    assert error.__cause__ is not None


@pytest.mark.asyncio
async def test_wrong_auth_token_is_permanent(fake: FakeTwilio) -> None:
    async with make_sender(fake, auth_token="wrong-token") as sender:
        with pytest.raises(DeliveryError) as caught:
            await sender.send(sms())

    assert caught.value.retryable is False
    assert caught.value.status == 401
    assert caught.value.code == 20003
    assert fake.messages == []


@pytest.mark.asyncio
async def test_unreachable_twilio_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sender = TwilioTextSender(
        ACCOUNT_SID, AUTH_TOKEN, SMS_FROM, WHATSAPP_FROM, api_base_url=f"http://127.0.0.1:{port}"
    )
    try:
        with pytest.raises(DeliveryError, match="could not reach Twilio") as caught:
            await sender.send(sms())
    finally:
        await sender.aclose()
    assert caught.value.retryable is True


@pytest.mark.asyncio
async def test_aclose_is_idempotent_and_send_after_close_fails(fake: FakeTwilio) -> None:
    sender = make_sender(fake)
    await sender.send(sms())
    await sender.aclose()
    await sender.aclose()
    with pytest.raises(DeliveryError, match="closed"):
        await sender.send(sms())


def test_sender_can_be_built_outside_an_event_loop() -> None:
    # server.py may build it before the loop runs; the aiohttp session is opened lazily.
    TwilioTextSender(ACCOUNT_SID, AUTH_TOKEN, SMS_FROM, WHATSAPP_FROM)


@pytest.mark.asyncio
async def test_call_create_and_update_through_sdk_reach_the_fake(fake: FakeTwilio) -> None:
    http = TwilioApiHttpClient(api_base_url=fake.base_url)
    client = build_client(ACCOUNT_SID, AUTH_TOKEN, http)
    try:
        call = await client.calls.create_async(
            to="+15558887777",
            from_=SMS_FROM,
            twiml="<Response><Say>Briefing</Say></Response>",
            status_callback="https://cc.example.com/twilio/agent-status",
            status_callback_event=["initiated", "answered", "completed"],
        )
        updated = await client.calls(call.sid).update_async(status="completed")
    finally:
        await http.close()

    assert call.sid.startswith("CA") and call.status == "queued"
    assert fake.calls[0].form["Twiml"] == "<Response><Say>Briefing</Say></Response>"
    assert fake.calls[0].form_lists["StatusCallbackEvent"] == ["initiated", "answered", "completed"]
    assert updated.status == "completed"
    assert fake.call_updates[0].path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{call.sid}.json"


def test_only_twilio_hosts_are_redirected() -> None:
    assert (
        redirect_url(
            "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages.json?x=1", "http://127.0.0.1:9/p/"
        )
        == "http://127.0.0.1:9/p/2010-04-01/Accounts/AC1/Messages.json?x=1"
    )
    assert (
        redirect_url("https://media.example.com/a.jpg", "http://127.0.0.1:9")
        == "https://media.example.com/a.jpg"
    )
    assert redirect_url("https://api.twilio.com/x", None) == "https://api.twilio.com/x"
