"""Who may open the agent's audio leg of a voice call rung in the console, and control its bridge:
only the agent it was offered to, signed in, with the CSRF token of their session. Another agent,
a supervisor without the offer, an anonymous client and a request without the token are refused;
an unusable SDP offer gets a clear 400 and the call keeps ringing for the right agent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from pipeline.clock import FakeClock
from tests.fakes.twilio_server import FakeTwilio
from tests.integration.browser_agent_parts import TwilioCaller, until
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    live_server,
    login,
    make_customer,
    make_user,
    twilio_settings,
)

CONTROLS = ("mute", "hold", "hangup", "hand-back")


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[tuple[LiveServer, FakeClock]]:
    clock = FakeClock()
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio, sms_from=None),
            transfer_ring_seconds=120,
        ) as live,
    ):
        await live.services.speech.start()
        yield live, clock


async def signed_in(server: LiveServer, role: str) -> tuple[Any, Any]:
    user, password = await make_user(server, role)
    return user, await login(server, user.email, password)


async def test_only_the_offered_agent_with_the_csrf_token_opens_the_leg_and_controls_the_bridge(
    server: Any,
) -> None:
    live, clock = server
    pool = live.services.pool
    routing = live.services.desk.routing
    agent, browser = await signed_in(live, "agent")
    other, other_browser = await signed_in(live, "agent")
    _, boss = await signed_in(live, "supervisor")
    await pool.execute("UPDATE agents SET presence = 'away' WHERE user_id <> $1", agent.id)
    await routing.set_queues(agent.id, [q.name for q in await routing.queues()])
    await routing.set_capacity(agent.id, 1)
    await routing.set_presence(agent.id, "available")
    assert (await browser.post("/api/softphone", json={"on": True})).json() == {"softphone": True}
    customer = await make_customer(pool, clock.now(), {"mug": ("delivered", "Mug", 900, 1)}, name="Rui Costa")
    cookie = f"closeloop_session={browser.cookies['closeloop_session']}"
    caller = TwilioCaller(live, customer.phone)
    ws_url = live.base_url.replace("http://", "ws://") + "/console/ws"
    try:
        async with websockets.connect(ws_url, additional_headers={"Cookie": cookie}) as console:
            await caller.dial()
            await until("the greeting was heard", lambda: caller.voiced_ms() > 1000 and caller.quiet_for(0.8))
            caller.say("I want to talk to a person")
            while True:
                event = json.loads(await console.recv())
                if event.get("type") == "offer" and event.get("kind") == "voice":
                    break
        assignment = event["assignment_id"]
        offer = {
            "assignment_id": assignment,
            "type": "offer",
            "sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
        }

        refusals = {
            "another agent": (other_browser, 403, "not_your_call"),
            "a supervisor without the offer": (boss, 403, "not_your_call"),
            "an anonymous client": (live.anonymous(), 401, None),
        }
        for who, (client, status, code) in refusals.items():
            response = await client.post("/webrtc/agent/offer", json=offer)
            assert response.status_code == status, (who, response.text)
            assert code is None or response.json()["error"]["code"] == code, who
            for control in CONTROLS:
                response = await client.post(f"/webrtc/agent/{assignment}/{control}")
                assert response.status_code == status, (who, control, response.text)

        token = browser.headers.pop("X-CSRF-Token")
        response = await browser.post("/webrtc/agent/offer", json=offer)
        assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed"
        for control in CONTROLS:
            response = await browser.post(f"/webrtc/agent/{assignment}/{control}")
            assert response.status_code == 403 and response.json()["error"]["code"] == "csrf_failed", control
        browser.headers["X-CSRF-Token"] = token

        # The right agent with unusable offers: a clear 400, and the call still waits for them.
        for sdp in (
            "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" + "a=x\r\n" * 10_000,
            "v=0\r\nm=audio garbage",
        ):
            response = await browser.post("/webrtc/agent/offer", json={**offer, "sdp": sdp})
            assert response.status_code == 400 and response.json()["error"]["code"] == "bad_offer", (
                response.text
            )
        response = await browser.post(
            "/webrtc/agent/offer", json={"assignment_id": assignment, "type": "answer"}
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_offer"
        response = await browser.post("/webrtc/agent/offer", json={"type": "offer", "sdp": "v=0"})
        assert response.status_code == 400
        # Controls before anything is bridged are refused, not half-done.
        response = await browser.post(f"/webrtc/agent/{assignment}/hand-back")
        assert response.status_code == 409, response.text
        transfer = await pool.fetchrow(
            "SELECT status, agent_id FROM transfers WHERE call_sid = $1", caller.call_sid
        )
        assert transfer["agent_id"] == agent.id and transfer["status"] in ("ringing", "answered")
        # Nobody else became the owner on the way.
        owner = await pool.fetchval(
            "SELECT c.owner FROM conversations c JOIN calls k ON k.conversation_id = c.id WHERE k.call_sid = $1",
            caller.call_sid,
        )
        assert owner in ("ai", f"agent:{agent.id}")
    finally:
        await caller.hang_up()
        await routing.set_presence(agent.id, "away")
        await routing.set_softphone(agent.id, False)
        await routing.set_presence(other.id, "away")
