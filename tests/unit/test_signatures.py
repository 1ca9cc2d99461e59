"""Twilio request signatures and the public URL they are computed over."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from telephony.signatures import is_valid_signature, public_url, ws_url

TOKEN = "12345678901234567890123456789012"
URL = "https://cc.example.com/twilio/sms"
FORM = {
    "MessageSid": "SM" + "a" * 32,
    "From": "+15551234567",
    "To": "+15557654321",
    "Body": "Where is my order 1002?",
}


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Sign like Twilio does, independently of the SDK: HMAC-SHA1 over URL + sorted name/value pairs."""
    payload = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def test_signature_computed_independently_is_accepted() -> None:
    signature = twilio_signature(TOKEN, URL, FORM)
    assert is_valid_signature(TOKEN, URL, FORM, signature)


def test_tampered_param_is_rejected() -> None:
    signature = twilio_signature(TOKEN, URL, FORM)
    tampered = {**FORM, "Body": "Refund me 1000 dollars"}
    assert not is_valid_signature(TOKEN, URL, tampered, signature)


def test_added_param_is_rejected() -> None:
    signature = twilio_signature(TOKEN, URL, FORM)
    assert not is_valid_signature(TOKEN, URL, {**FORM, "Extra": "1"}, signature)


def test_signature_over_another_url_is_rejected() -> None:
    signature = twilio_signature(TOKEN, "https://evil.example.com/twilio/sms", FORM)
    assert not is_valid_signature(TOKEN, URL, FORM, signature)


def test_signature_made_with_another_token_is_rejected() -> None:
    signature = twilio_signature("another-token", URL, FORM)
    assert not is_valid_signature(TOKEN, URL, FORM, signature)


@pytest.mark.parametrize("signature", [None, ""])
def test_missing_signature_is_rejected(signature: str | None) -> None:
    assert not is_valid_signature(TOKEN, URL, FORM, signature)


def test_garbage_signature_is_rejected() -> None:
    assert not is_valid_signature(TOKEN, URL, FORM, "not-base64!!")


def test_request_without_form_is_signed_over_the_url_only() -> None:
    url = "wss://cc.example.com/twilio/media"
    signature = twilio_signature(TOKEN, url, {})
    assert is_valid_signature(TOKEN, url, None, signature)
    assert is_valid_signature(TOKEN, url, {}, signature)


def test_signature_with_query_string_in_url() -> None:
    url = public_url("https://cc.example.com", "/twilio/voice", "tenant=acme&x=1")
    signature = twilio_signature(TOKEN, url, FORM)
    assert is_valid_signature(TOKEN, url, FORM, signature)
    assert not is_valid_signature(
        TOKEN, public_url("https://cc.example.com", "/twilio/voice"), FORM, signature
    )


def test_empty_auth_token_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="auth_token"):
        is_valid_signature("", URL, FORM, "abc")


def test_public_url_is_built_from_configured_base() -> None:
    assert public_url("https://cc.example.com", "/twilio/sms") == "https://cc.example.com/twilio/sms"
    assert public_url("https://cc.example.com/", "twilio/sms") == "https://cc.example.com/twilio/sms"


def test_public_url_keeps_path_prefix_port_and_raw_query() -> None:
    assert (
        public_url("https://example.com:8443/closeloop/", "/twilio/sms", "?a=1%202&b=x")
        == "https://example.com:8443/closeloop/twilio/sms?a=1%202&b=x"
    )


def test_ws_url_maps_https_to_wss_and_http_to_ws() -> None:
    assert ws_url("https://cc.example.com", "/twilio/media") == "wss://cc.example.com/twilio/media"
    assert ws_url("http://127.0.0.1:8000", "/twilio/media") == "ws://127.0.0.1:8000/twilio/media"
    assert ws_url("wss://cc.example.com/", "/twilio/media") == "wss://cc.example.com/twilio/media"


def test_ws_upgrade_signature_over_rebuilt_wss_url() -> None:
    # The app behind a TLS-terminating proxy sees ws://internal:8000; Twilio signed wss://public.
    url = ws_url("https://cc.example.com", "/twilio/media")
    signature = twilio_signature(TOKEN, "wss://cc.example.com/twilio/media", {})
    assert is_valid_signature(TOKEN, url, None, signature)
    assert not is_valid_signature(TOKEN, "ws://internal:8000/twilio/media", None, signature)


@pytest.mark.parametrize("base", ["cc.example.com", "ftp://cc.example.com", "https://", "https://x.com/?a=1"])
def test_invalid_public_base_url_is_refused(base: str) -> None:
    with pytest.raises(ValueError, match="public base URL"):
        public_url(base, "/twilio/sms")
