"""Attacks on browser calls (``POST /webrtc/offer`` is public, as the chat page is): malformed or
huge offers, offers without audio, and one address opening call after call. Each is refused with a
clear error and leaves no call, session or peer connection behind."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack

from tests.support import LiveServer, live_server


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url, webrtc_calls_per_client=2) as live:
        yield live


async def _offer(audio: bool = True) -> tuple[RTCPeerConnection, dict[str, str]]:
    pc = RTCPeerConnection()
    if audio:
        pc.addTrack(AudioStreamTrack())
    else:
        pc.createDataChannel("keys")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, {"sdp": pc.localDescription.sdp, "type": "offer"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"type": "answer", "sdp": "v=0"}, "bad_offer"),
        ({"type": "offer"}, "bad_offer"),
        (
            {"type": "offer", "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" + "a=x\r\n" * 10_000},
            "bad_offer",
        ),
        ({"type": "offer", "sdp": "v=0\r\nm=audio garbage"}, "bad_offer"),
    ],
)
async def test_malformed_offers_are_refused_with_a_clear_error(
    server: LiveServer, body: dict[str, str], code: str
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        response = await http.post("/webrtc/offer", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert not server.services.active_calls


async def test_an_offer_without_audio_is_refused(server: LiveServer) -> None:
    pc, offer = await _offer(audio=False)
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            response = await http.post("/webrtc/offer", json=offer)
        assert response.status_code == 400 and response.json()["error"]["code"] == "no_audio"
        assert "microphone" in response.json()["error"]["message"]
    finally:
        await pc.close()


async def test_one_address_cannot_hold_more_calls_than_its_limit(server: LiveServer) -> None:
    peers: list[RTCPeerConnection] = []
    ids: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            for _ in range(2):
                pc, offer = await _offer()
                peers.append(pc)
                response = await http.post("/webrtc/offer", json=offer)
                assert response.status_code == 200, response.text
                ids.append(response.json()["call_id"])
            pc, offer = await _offer()
            peers.append(pc)
            refused = await http.post("/webrtc/offer", json=offer)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_calls"
            # hanging up needs the call's unguessable id; someone else's guess ends nothing
            assert (await http.post("/webrtc/hangup", json={"call_id": "WR" + "0" * 32})).status_code == 404
            for call_id in ids:
                assert (await http.post("/webrtc/hangup", json={"call_id": call_id})).status_code == 200
    finally:
        for pc in peers:
            await pc.close()
