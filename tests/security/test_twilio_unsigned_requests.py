"""Attack: fake Twilio webhooks sent to a server that has no TWILIO_AUTH_TOKEN.

The Docker image listens on 0.0.0.0; without a token nothing could tell Twilio's requests from
anyone else's. Such a server must refuse every /twilio/* request (403 / WebSocket refused) and
store nothing, unless it listens on loopback only or the operator opted in explicitly.
"""

from __future__ import annotations

import secrets

import pytest
import websockets

from telephony.signatures import check_twilio_request, is_loopback_host
from tests.support import ACCOUNT_SID, AUTH_TOKEN, live_server, sign, unique_phone, whatsapp_form


def _voice_form() -> dict[str, str]:
    return {
        "CallSid": "CA" + secrets.token_hex(16),
        "AccountSid": ACCOUNT_SID,
        "From": unique_phone(),
        "To": "+15550009999",
        "CallStatus": "ringing",
    }


async def test_unsigned_voice_and_messaging_webhooks_on_a_public_host_without_token_are_refused(
    database_url: str,
) -> None:
    # Served on loopback by the test, but configured like the Docker image: host 0.0.0.0, no token.
    async with live_server(database_url, host="0.0.0.0") as server:
        voice = _voice_form()
        response = await server.anonymous().post("/twilio/voice", data=voice)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "no_auth_token"
        text = whatsapp_form(unique_phone(), "refund my order please")
        response = await server.anonymous().post("/twilio/messaging", data=text)
        assert response.status_code == 403
        status = await server.anonymous().post(
            "/twilio/status", data={"CallSid": voice["CallSid"], "CallStatus": "completed"}
        )
        assert status.status_code == 403
        pool = server.services.pool
        assert await pool.fetchval("SELECT count(*) FROM calls WHERE call_sid = $1", voice["CallSid"]) == 0
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM messages WHERE external_id = $1", "twilio:" + text["MessageSid"]
            )
            == 0
        )
        url = server.base_url.replace("http://", "ws://") + "/twilio/media"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        assert refused.value.response.status_code == 403
        metrics = (await server.http.get("/metrics")).text
        assert 'closeloop_webhooks_rejected_total{reason="no_auth_token"}' in metrics


async def test_unsigned_requests_need_an_explicit_opt_in_on_a_public_host(database_url: str) -> None:
    async with live_server(database_url, host="0.0.0.0", allow_unsigned_twilio=True) as server:
        response = await server.anonymous().post("/twilio/voice", data=_voice_form())
        assert response.status_code == 200 and "<Stream" in response.text


async def test_a_configured_token_is_checked_whatever_the_host_or_opt_in(database_url: str) -> None:
    async with live_server(
        database_url, host="0.0.0.0", allow_unsigned_twilio=True, twilio_auth_token=AUTH_TOKEN
    ) as server:
        form = _voice_form()
        assert (await server.anonymous().post("/twilio/voice", data=form)).status_code == 403
        signed = {"X-Twilio-Signature": sign(server.base_url + "/twilio/voice", form)}
        assert (await server.anonymous().post("/twilio/voice", data=form, headers=signed)).status_code == 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("cc.example.com", False),
        ("", False),
    ],
)
def test_only_loopback_listen_hosts_count_as_local(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_the_decision_refuses_without_token_unless_allowed_and_never_skips_a_configured_token() -> None:
    url, params = "https://cc.example.com/twilio/voice", {"CallSid": "CA1"}
    good = sign(url, params)
    assert check_twilio_request(
        auth_token=None, allow_unsigned=False, url=url, params=params, signature=None
    ) == ("no_auth_token")
    assert (
        check_twilio_request(auth_token=None, allow_unsigned=True, url=url, params=params, signature=None)
        == "unsigned_allowed"
    )
    assert (
        check_twilio_request(
            auth_token=AUTH_TOKEN, allow_unsigned=True, url=url, params=params, signature=None
        )
        == "bad_signature"
    )
    assert (
        check_twilio_request(
            auth_token=AUTH_TOKEN, allow_unsigned=False, url=url, params=params, signature=good
        )
        == "ok"
    )
