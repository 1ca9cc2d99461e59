"""A phone caller handed to an agent who takes calls in the browser: the caller stays on their
Twilio media stream, the agent's console (an aiortc peer here) is rung over its socket, hears the
ticket and summary first, then the server relays audio both ways and keeps writing the
transcript for both sides; hand back gives the call to the assistant again. Real models, the
real server on loopback, the fake Twilio records every REST call (there must be none). A ring
declined goes to the next softphone agent; unanswered by everyone, the caller is owed a call back."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from pipeline.clock import FakeClock
from tests.fakes.twilio_server import FakeTwilio
from tests.integration.browser_agent_parts import TwilioCaller, agent_peer, answer_peer, speech48k, until
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


@pytest.fixture(scope="module")
async def voice(database_url: str) -> AsyncIterator[tuple[LiveServer, FakeTwilio, FakeClock]]:
    clock = FakeClock()
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio),
        ) as server,
    ):
        await server.services.speech.start()
        yield server, twilio, clock


async def softphone_agents(server: LiveServer, count: int) -> list[tuple[Any, Any]]:
    """``count`` available agents of every queue who take calls in the browser, each signed in
    (cookie + CSRF); every other agent is away and no earlier test's handoff still waits (a decline
    offers the queue's waiting work at once: it would fill the next agent's seat), so the test
    knows who rings and for what."""
    made = [await make_user(server, "agent") for _ in range(count)]
    routing = server.services.desk.routing
    await server.services.pool.execute(
        "UPDATE agents SET presence = 'away' WHERE NOT (user_id = ANY($1::bigint[]))", [u.id for u, _ in made]
    )
    await server.services.pool.execute("UPDATE handoffs SET status = 'cancelled' WHERE status = 'waiting'")
    agents = []
    for user, password in made:
        await routing.set_queues(user.id, [q.name for q in await routing.queues()])
        await routing.set_capacity(user.id, 1)
        await routing.set_presence(user.id, "available")
        browser = await login(server, user.email, password)
        assert (await browser.post("/api/softphone", json={"on": True})).json() == {"softphone": True}
        agents.append((user, browser))
    return agents


async def softphone_agent(server: LiveServer) -> tuple[Any, Any]:
    """One agent as :func:`softphone_agents` makes them."""
    return (await softphone_agents(server, 1))[0]


def console_socket(server: LiveServer, browser: Any) -> Any:
    """The agent's console socket (their session cookie)."""
    cookie = f"closeloop_session={browser.cookies['closeloop_session']}"
    ws_url = server.base_url.replace("http://", "ws://") + "/console/ws"
    return websockets.connect(ws_url, additional_headers={"Cookie": cookie})


async def rows(server: LiveServer, call_sid: str) -> list[dict[str, Any]]:
    found = await server.services.pool.fetch(
        """SELECT m.seq, m.sender, m.body, m.kind FROM messages m JOIN calls c ON c.conversation_id = m.conversation_id
           WHERE c.call_sid = $1 ORDER BY m.seq""",
        call_sid,
    )
    return [dict(r) for r in found]


async def next_event(console: Any, wanted: dict[str, Any], within: float = 60.0) -> dict[str, Any]:
    """The next console event with the fields of ``wanted``."""
    async with asyncio.timeout(within):
        while True:
            event = json.loads(await console.recv())
            if all(event.get(k) == v for k, v in wanted.items()):
                return event


async def test_a_phone_caller_is_bridged_to_a_browser_agent_briefed_first_transcribed_on_both_sides_and_handed_back(
    voice: Any,
) -> None:
    server, twilio, clock = voice
    pool = server.services.pool
    agent, browser = await softphone_agent(server)
    customer = await make_customer(
        pool, clock.now(), {"lamp": ("delivered", "Desk lamp", 4200, 1)}, name="Ines Vidal"
    )
    cookie = f"closeloop_session={browser.cookies['closeloop_session']}"
    ws_url = server.base_url.replace("http://", "ws://") + "/console/ws"
    caller = TwilioCaller(server, customer.phone)
    pc = None
    twilio_before = len(twilio.requests)
    async with websockets.connect(ws_url, additional_headers={"Cookie": cookie}) as console:
        try:
            await caller.dial()
            await until("the greeting was heard", lambda: caller.voiced_ms() > 1000 and caller.quiet_for(0.8))
            caller.say("I want to talk to a person")

            # The agent's console rings with a voice offer; they accept through the desk API.
            offer = await next_event(console, {"type": "offer", "kind": "voice"})
            transfer = await pool.fetchrow("SELECT * FROM transfers WHERE call_sid = $1", caller.call_sid)
            assert transfer["via"] == "browser" and transfer["status"] == "ringing"
            assert transfer["agent_id"] == agent.id and transfer["agent_call_sid"] is None
            assignment_id = offer["assignment_id"]
            accepted = await browser.post(f"/api/desk/offers/{assignment_id}/accept")
            assert accepted.status_code == 200, accepted.text

            # The console opens its audio leg.
            pc, mic, headset, sdp = await agent_peer()
            opened = time.monotonic()
            answer = await browser.post("/webrtc/agent/offer", json={"assignment_id": assignment_id, **sdp})
            assert answer.status_code == 200, answer.text
            await answer_peer(pc, answer.json())

            # The agent hears the ticket and summary before anything of the caller.
            await next_event(console, {"type": "voice", "status": "bridged", "assignment_id": assignment_id})
            bridged_at = time.monotonic()
            assert headset.voiced_ms(opened, bridged_at) > 1500
            ticket = await pool.fetchrow(
                "SELECT protocol, summary FROM tickets WHERE id = $1", transfer["ticket_id"]
            )
            stt = server.services.speech.transcriber()
            briefing = " ".join(
                [await stt.transcribe(part) for part in headset.utterances(opened, bridged_at)]
            )
            # Whisper tiny mishears digits: the ticket's letters, then the summary's words.
            letters = re.sub(r"[^a-z]", "", ticket["protocol"].lower())
            # keywords with alternatives, never one exact transcript: other CPUs hear it differently
            squeezed = re.sub(r"[^a-z0-9]", "", briefing.lower())
            digits = re.sub(r"[^0-9]", "", ticket["protocol"])
            # "CL-000190" is heard as "see L00190" or "CL190": the letters, said letters, or the
            # number without its leading zeros
            keys = (letters, "seel", "seeel", digits, digits.lstrip("0"), "ticket")
            assert any(k in squeezed for k in keys), briefing
            # the summary: the customer asked for a person
            assert any(w in briefing.lower() for w in ("person", "human", "someone", "agent")), briefing

            # Bridged: the agent's voice reaches the caller's phone, the caller's reaches the agent.
            mic.say(speech48k("Hello, this is Sam from the support team. How can I help you today?"))
            await until("the caller heard the agent", lambda: caller.voiced_ms(bridged_at) > 1500, 30)
            caller_heard_from = time.monotonic()
            caller.say("My desk lamp arrived broken and I would like a replacement please")
            await until("the agent heard the caller", lambda: headset.voiced_ms(caller_heard_from) > 1500, 30)

            async def both_sides_written() -> bool:
                senders = {(r["sender"], r["kind"]) for r in await rows(server, caller.call_sid)}
                return ("agent", "agent_voice") in senders and ("customer", "voice") in senders

            await until("both sides were written to the transcript", both_sides_written, 40)
            written = await rows(server, caller.call_sid)
            agent_said = " ".join(r["body"].lower() for r in written if r["sender"] == "agent")
            caller_said = " ".join(r["body"].lower() for r in written if r["kind"] == "voice")
            assert "help" in agent_said or "support" in agent_said, agent_said
            assert "lamp" in caller_said or "replacement" in caller_said, caller_said
            # The assistant said nothing while the agent had the call.
            bridged_seq = min(r["seq"] for r in written if r["sender"] == "agent")
            assert not [r for r in written if r["sender"] == "bot" and r["seq"] > bridged_seq]

            # Hand back: the assistant answers the caller again on the same call.
            handed = await browser.post(f"/webrtc/agent/{assignment_id}/hand-back")
            assert handed.status_code == 200 and handed.json()["outcome"] == "hand_back", handed.text
            owner = await pool.fetchval(
                "SELECT owner FROM conversations WHERE id = $1", transfer["conversation_id"]
            )
            assert owner == "ai"
            back_at = time.monotonic()
            await until(
                "the caller heard the assistant",
                lambda: caller.voiced_ms(back_at) > 800 and caller.quiet_for(0.8),
            )
            before = len(await rows(server, caller.call_sid))
            caller.say("What are your opening hours")

            async def answered() -> bool:
                after = (await rows(server, caller.call_sid))[before:]
                return any(r["sender"] == "customer" for r in after) and after[-1]["sender"] == "bot"

            await until("the assistant answered after the hand back", answered, 40)
            steps = [
                (s["step"], s["outcome"])
                for s in await pool.fetch(
                    "SELECT step, outcome FROM transfer_steps WHERE transfer_id = $1 ORDER BY id",
                    transfer["id"],
                )
            ]
            assert ("agent_connected", "accepted") in steps and ("bridged", "ok") in steps
            assert ("ended", "hand_back") in steps
            # The whole path ran over the caller's own media stream: no Twilio REST call at all.
            assert twilio.requests[twilio_before:] == []
        finally:
            await caller.hang_up()
            if pc is not None:
                await pc.close()
            await server.services.desk.routing.set_presence(agent.id, "away")
            await server.services.desk.routing.set_softphone(agent.id, False)


async def _why_not_rung(pool: Any, transfer_id: int, agent_id: int) -> str:
    """What the store says when the next agent was not rung: the transfer's steps, the handoff
    and the agent (a failure that explains itself)."""
    steps = await pool.fetch(
        "SELECT step, outcome, data FROM transfer_steps WHERE transfer_id = $1 ORDER BY id", transfer_id
    )
    transfer = await pool.fetchrow("SELECT status, conversation_id FROM transfers WHERE id = $1", transfer_id)
    handoffs = await pool.fetch(
        "SELECT status, queue, tried_agents FROM handoffs WHERE conversation_id = $1",
        transfer["conversation_id"],
    )
    offers = await pool.fetch(
        "SELECT agent_id, status FROM assignments WHERE conversation_id = $1 ORDER BY id",
        transfer["conversation_id"],
    )
    agent = await pool.fetchrow(
        "SELECT presence, active, capacity, queues, softphone FROM agents WHERE user_id = $1", agent_id
    )
    return (
        f"agent {agent_id} was not rung: transfer {dict(transfer)}, steps "
        f"{[(r['step'], r['outcome'], r['data']) for r in steps]}, handoffs {[dict(h) for h in handoffs]}, "
        f"assignments {[dict(o) for o in offers]}, agent {dict(agent) if agent else None}"
    )


async def test_a_declined_ring_goes_to_the_next_browser_agent_and_with_nobody_left_the_caller_is_owed_a_call_back(
    database_url: str,
) -> None:
    # No Twilio call control here: after the browser agents comes the call back, not the phones.
    # The ring time must outlast the test's own steps between the ring and the decline on a busy
    # machine (the first agent must still be ringing when they decline); the second rings it out.
    async with live_server(database_url, transfer_ring_seconds=8, transfer_callback_minutes=30) as server:
        await server.services.speech.start()
        pool = server.services.pool
        (first, first_browser), (second, second_browser) = await softphone_agents(server, 2)
        customer = await make_customer(
            pool, server.services.clock.now(), {"kettle": ("delivered", "Kettle", 3900, 1)}, name="Rui Costa"
        )
        caller = TwilioCaller(server, customer.phone)
        try:
            async with (
                console_socket(server, first_browser) as one,
                console_socket(server, second_browser) as two,
            ):
                await caller.dial()
                await until(
                    "the greeting was heard", lambda: caller.voiced_ms() > 1000 and caller.quiet_for(0.8)
                )
                caller.say("I want to talk to a person")

                # Both agents are free: whoever rings first declines; the other rings next.
                consoles = {first.id: (one, first_browser), second.id: (two, second_browser)}
                waiting = asyncio.ensure_future(next_event(one, {"type": "offer", "kind": "voice"}))
                other = asyncio.ensure_future(next_event(two, {"type": "offer", "kind": "voice"}))
                done, _ = await asyncio.wait(
                    {waiting, other}, timeout=60, return_when=asyncio.FIRST_COMPLETED
                )
                assert done, "no softphone rang within 60 s"
                rang = done.pop()
                offer = rang.result()
                for task in (waiting, other):
                    task.cancel()
                rung = first.id if rang is waiting else second.id  # the console that rang, not a later row
                nxt = second.id if rung == first.id else first.id
                transfer = await pool.fetchrow("SELECT * FROM transfers WHERE call_sid = $1", caller.call_sid)
                socket, browser = consoles[rung]
                declined = await browser.post(f"/api/desk/offers/{offer['assignment_id']}/decline")
                assert declined.status_code == 200, declined.text
                await next_event(socket, {"type": "voice", "status": "withdrawn", "reason": "declined"})

                # The next softphone agent rings for the same call, and does not answer.
                socket, _ = consoles[nxt]
                try:
                    again = await next_event(socket, {"type": "offer", "kind": "voice"})
                except TimeoutError:
                    raise AssertionError(await _why_not_rung(pool, transfer["id"], nxt)) from None
                assert again["conversation_id"] == offer["conversation_id"]
                assert again["assignment_id"] != offer["assignment_id"]
                await next_event(socket, {"type": "voice", "status": "withdrawn", "reason": "no_answer"}, 30)
                unanswered_at = time.monotonic()

            # Nobody left: the caller hears the apology, is owed a call back, and the call ends.
            async def fell_back() -> bool:
                status = await pool.fetchval("SELECT status FROM transfers WHERE id = $1", transfer["id"])
                return status == "fallback"

            await until("the transfer fell back", fell_back)

            async def owed_a_call_back() -> bool:  # scheduled right after the status (not one write)
                return bool(
                    await pool.fetchval(
                        "SELECT count(*) FROM callbacks WHERE transfer_id = $1", transfer["id"]
                    )
                )

            await until("the call back is scheduled", owed_a_call_back)
            callback = await pool.fetchrow("SELECT * FROM callbacks WHERE transfer_id = $1", transfer["id"])
            assert callback is not None and callback["status"] == "scheduled"
            assert callback["phone"] == customer.phone and callback["ticket_id"] == transfer["ticket_id"]
            assert (callback["due_at"] - callback["created_at"]).total_seconds() == 30 * 60
            steps = [
                (s["step"], s["outcome"], s["data"].get("agent"))
                for s in await pool.fetch(
                    "SELECT step, outcome, data FROM transfer_steps WHERE transfer_id = $1 ORDER BY id",
                    transfer["id"],
                )
            ]
            assert ("agent_declined", "declined", rung) in steps, steps
            assert ("agent_no_answer", "no_answer", nxt) in steps, steps
            assert [s for s, *_ in steps].count("callback_scheduled") == 1, steps

            # the server ends the call once the apology was heard (the stream closes with the reason)
            await until("the call ended after the apology", lambda: caller.ws.close_code is not None)
            assert caller.ws.close_reason == "transfer_fallback"
            assert caller.voiced_ms(unanswered_at) > 1500, "the caller heard no apology"
            # neither agent was left holding the conversation
            owner = await pool.fetchval(
                "SELECT owner FROM conversations WHERE id = $1", transfer["conversation_id"]
            )
            assert owner is None or not owner.startswith("agent:"), owner
        finally:
            await caller.hang_up()
            for user in (first, second):
                await server.services.desk.routing.set_presence(user.id, "away")
                await server.services.desk.routing.set_softphone(user.id, False)
