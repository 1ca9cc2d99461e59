"""Parsing Twilio's inbound SMS/WhatsApp webhook form."""

from __future__ import annotations

import pytest

from pipeline.model import Channel
from telephony.messaging import InboundText, InvalidInbound, parse_inbound

SMS_FORM = {
    "ToCountry": "US",
    "SmsMessageSid": "SM" + "1" * 32,
    "NumMedia": "0",
    "MessageSid": "SM" + "1" * 32,
    "AccountSid": "AC" + "0" * 32,
    "From": "+15551234567",
    "To": "+15557654321",
    "Body": "Cancel order 1001 please",
    "NumSegments": "1",
    "ApiVersion": "2010-04-01",
}

WHATSAPP_FORM = {
    "MessageSid": "SM" + "2" * 32,
    "AccountSid": "AC" + "0" * 32,
    "From": "whatsapp:+5511987654321",
    "To": "whatsapp:+14155238886",
    "Body": "Oi, cadê meu pedido?",
    "ProfileName": "Ana",
    "WaId": "5511987654321",
    "NumMedia": "2",
    "MediaUrl0": "https://api.twilio.com/2010-04-01/Accounts/AC/Messages/SM/Media/ME1",
    "MediaContentType0": "image/jpeg",
    "MediaUrl1": "https://api.twilio.com/2010-04-01/Accounts/AC/Messages/SM/Media/ME2",
    "MediaContentType1": "image/png",
}


def test_sms_is_parsed() -> None:
    assert parse_inbound(SMS_FORM) == InboundText(
        channel=Channel.SMS,
        from_address="+15551234567",
        to_address="+15557654321",
        body="Cancel order 1001 please",
        message_sid="SM" + "1" * 32,
        wa_id=None,
        profile_name=None,
        num_media=0,
        media_urls=(),
    )


def test_whatsapp_prefix_is_removed_and_profile_kept() -> None:
    inbound = parse_inbound(WHATSAPP_FORM)
    assert inbound.channel is Channel.WHATSAPP
    assert inbound.from_address == "+5511987654321"
    assert inbound.to_address == "+14155238886"
    assert inbound.wa_id == "5511987654321"
    assert inbound.profile_name == "Ana"
    assert inbound.body == "Oi, cadê meu pedido?"


def test_media_urls_are_collected_in_order() -> None:
    inbound = parse_inbound(WHATSAPP_FORM)
    assert inbound.num_media == 2
    assert inbound.media_urls == (WHATSAPP_FORM["MediaUrl0"], WHATSAPP_FORM["MediaUrl1"])


def test_media_only_message_has_empty_body() -> None:
    form = {k: v for k, v in WHATSAPP_FORM.items() if k != "Body"}
    assert parse_inbound(form).body == ""


def test_missing_num_media_means_no_media() -> None:
    form = {k: v for k, v in SMS_FORM.items() if k != "NumMedia"}
    assert parse_inbound(form).num_media == 0


@pytest.mark.parametrize("field", ["MessageSid", "From"])
def test_missing_required_field_is_refused(field: str) -> None:
    form = {k: v for k, v in SMS_FORM.items() if k not in (field, "SmsMessageSid")}
    with pytest.raises(InvalidInbound, match=field):
        parse_inbound(form)


def test_empty_message_sid_is_refused() -> None:
    with pytest.raises(InvalidInbound, match="MessageSid"):
        parse_inbound({**SMS_FORM, "MessageSid": "", "SmsMessageSid": ""})


def test_body_of_1600_chars_is_accepted() -> None:
    assert len(parse_inbound({**SMS_FORM, "Body": "x" * 1600}).body) == 1600


def test_body_over_1600_chars_is_refused() -> None:
    with pytest.raises(InvalidInbound, match="1600"):
        parse_inbound({**SMS_FORM, "Body": "x" * 1601})


@pytest.mark.parametrize("value", ["two", "-1", "11"])
def test_impossible_num_media_is_refused(value: str) -> None:
    with pytest.raises(InvalidInbound, match="NumMedia"):
        parse_inbound({**SMS_FORM, "NumMedia": value})


def test_invalid_inbound_is_a_value_error() -> None:
    assert issubclass(InvalidInbound, ValueError)
