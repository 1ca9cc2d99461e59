"""Warm transfer end to end: a caller asks for a person by voice (real models, the `closeloop call`
simulator over the real WebSocket), the server moves the call into a conference and rings agents'
phones on a fake Twilio that sends back the signed status and conference callbacks Twilio would."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pipeline.clock import FakeClock
from telephony.simulator import Utterance, run_call
from telephony.transfer_twiml import looks_personal
from tests.fakes.twilio_server import FakeTwilio
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    live_server,
    make_customer,
    make_user,
    post_signed,
    twilio_settings,
    unique_phone,
)

AGENT_CALLER_ID = "+15550009998"


@pytest.fixture(scope="module")
async def voice(database_url: str) -> AsyncIterator[tuple[LiveServer, FakeTwilio, FakeClock]]:
    clock = FakeClock()
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio, sms_from=AGENT_CALLER_ID),
        ) as server,
    ):
        assert server.services.transfer is not None, "server.py does not mount the warm transfer"
        await server.services.speech.start()
        yield server, twilio, clock


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:  # noqa: ASYNC109 - polls a DB condition
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def phone_agent(server: LiveServer, *, capacity: int = 1) -> tuple[Any, str]:
    """An available agent with a phone, serving every queue."""
    phone = unique_phone()
    user, _ = await make_user(server, "agent", phone=phone)
    routing = server.services.desk.routing
    await routing.set_queues(user.id, [q.name for q in await routing.queues()])
    await routing.set_capacity(user.id, capacity)
    await routing.set_presence(user.id, "available")
    return user, phone


async def only_these_phone_agents(server: LiveServer, ids: list[int]) -> None:
    """Agents with phones left by earlier tests go away, so the test knows who rings."""
    await server.services.pool.execute(
        """UPDATE agents SET presence = 'away' WHERE NOT (user_id = ANY($1::bigint[]))
             AND user_id IN (SELECT id FROM users WHERE COALESCE(phone, '') <> '')""",
        ids,
    )


async def ask_for_a_person(server: LiveServer, clock: FakeClock, name: str) -> Any:
    customer = await make_customer(
        server.services.pool, clock.now(), {"lamp": ("delivered", "Desk lamp", 4200, 1)}, name=name
    )
    report = await run_call(
        server.base_url,
        [Utterance(text="I want to talk to a person")],
        caller=customer.phone,
        auth_token=AUTH_TOKEN,
        account_sid=ACCOUNT_SID,
        max_call_seconds=90,
    )
    print(report.format())
    assert not report.violations, report.violations
    return customer, report


async def transfer_of(server: LiveServer, call_sid: str) -> dict[str, Any]:
    row = await server.services.pool.fetchrow("SELECT * FROM transfers WHERE call_sid = $1", call_sid)
    assert row is not None, "no transfer was started"
    return dict(row)


async def steps_of(server: LiveServer, transfer_id: int) -> list[dict[str, Any]]:
    return await server.services.transfer.steps(transfer_id)


async def test_caller_asking_for_a_person_is_held_in_a_conference_and_the_answering_agent_gets_the_ticket(
    voice: Any,
) -> None:
    server, twilio, clock = voice
    agent, agent_phone = await phone_agent(server)
    await only_these_phone_agents(server, [agent.id])
    twilio.agent_behaviour[agent_phone] = "answer"
    customer, report = await ask_for_a_person(server, clock, "Lena Park")

    await wait_for(lambda: _status_is(server, report.call_sid, "connected"))
    transfer = await transfer_of(server, report.call_sid)
    name = transfer["conference_name"]
    assert name == f"cl-transfer-{transfer['id']}" and not looks_personal(name)

    # The caller's call was moved into the conference, on hold music served by this server.
    update = next(u for u in twilio.call_updates if report.call_sid in u.path and "Twiml" in u.form)
    conference = ET.fromstring(update.form["Twiml"]).find("./Dial/Conference")
    assert conference is not None and conference.text == name
    assert conference.get("startConferenceOnEnter") == "false"
    assert conference.get("waitUrl") == server.base_url + "/twilio/transfer/hold"
    assert conference.get("statusCallbackEvent") == "start end join leave"
    hold = await post_signed(
        server, "/twilio/transfer/hold", {"CallSid": report.call_sid, "AccountSid": ACCOUNT_SID}
    )
    assert (
        hold.status_code == 200
        and "<Say>" in hold.text
        and "<Pause" in hold.text
        and "http" not in hold.text.split("<Redirect")[0]
    )

    # The agent's phone rang with a briefing: the ticket number and the summary, then the conference.
    ticket = await server.services.pool.fetchrow("SELECT * FROM tickets WHERE id = $1", transfer["ticket_id"])
    assert ticket["summary"]
    dial = next(c for c in twilio.calls if c.form["To"] == agent_phone)
    assert dial.form["From"] == AGENT_CALLER_ID
    assert dial.form_lists["StatusCallbackEvent"] == ["initiated", "ringing", "answered", "completed"]
    briefing = ET.fromstring(dial.form["Twiml"])
    said = briefing.findtext("./Say") or ""
    assert ticket["protocol"] in said and ticket["summary"].split("\n")[0].strip() in said
    assert briefing.findtext("./Dial/Conference") == name
    assert len(dial.form["Twiml"]) <= 4000

    # After the agent joined, they own the ticket and the conversation.
    assert ticket["owner"] == f"agent:{agent.id}"
    owner = await server.services.pool.fetchval(
        "SELECT owner FROM conversations WHERE id = $1", transfer["conversation_id"]
    )
    assert owner == f"agent:{agent.id}"
    steps = await steps_of(server, transfer["id"])
    kinds = [(s["step"], s["outcome"]) for s in steps]
    assert ("caller_to_conference", "updated") in kinds and ("agent_connected", "accepted") in kinds
    assert next(s for s in steps if s["step"] == "agent_dial")["twilio_sid"] == transfer["agent_call_sid"]
    assert all(c.status == 204 for c in twilio.callbacks if "/twilio/transfer/" in c.url), twilio.callbacks

    # Twilio retries callbacks: a repeated join changes nothing.
    join = next(
        c
        for c in twilio.callbacks
        if c.params.get("StatusCallbackEvent") == "participant-join"
        and c.params.get("CallSid") == transfer["agent_call_sid"]
    )
    path = join.url.removeprefix(server.base_url)
    assert (await post_signed(server, path, join.params)).status_code == 204
    assert len(await steps_of(server, transfer["id"])) == len(steps)
    unsigned = await server.http.post(path, data=join.params)
    assert unsigned.status_code == 403


async def test_nobody_answering_rings_the_next_agent_then_apologises_and_schedules_a_call_back(
    voice: Any,
) -> None:
    server, twilio, clock = voice
    first, first_phone = await phone_agent(server)
    second, second_phone = await phone_agent(server)
    await only_these_phone_agents(server, [first.id, second.id])
    twilio.agent_behaviour[first_phone] = "no-answer"
    twilio.agent_behaviour[second_phone] = "busy"
    customer, report = await ask_for_a_person(server, clock, "Omar Haddad")

    await wait_for(lambda: _status_is(server, report.call_sid, "fallback"))
    transfer = await transfer_of(server, report.call_sid)
    await wait_for(lambda: _has_callback(server, transfer["id"]))

    rang = [c.form["To"] for c in twilio.calls if c.form["To"] in (first_phone, second_phone)]
    assert sorted(rang) == sorted([first_phone, second_phone])  # each once, never the same twice
    apology = [
        u for u in twilio.call_updates if report.call_sid in u.path and "<Hangup" in u.form.get("Twiml", "")
    ]
    assert len(apology) == 1 and "call you back" in apology[0].form["Twiml"]

    callback = await server.services.pool.fetchrow(
        "SELECT * FROM callbacks WHERE transfer_id = $1", transfer["id"]
    )
    assert callback["phone"] == customer.phone and callback["status"] == "scheduled"
    assert callback["due_at"] > clock.now()
    ticket = await server.services.pool.fetchrow("SELECT * FROM tickets WHERE id = $1", transfer["ticket_id"])
    assert (
        ticket["status"] == "open"
        and ticket["first_response_due"] is not None
        and not (ticket["owner"] or "").startswith("agent:")
    )
    waiting = await server.services.pool.fetchval(
        "SELECT tried_agents FROM handoffs WHERE conversation_id = $1 AND status = 'waiting'",
        transfer["conversation_id"],
    )
    assert sorted(waiting) == sorted([first.id, second.id])  # still queued, with its SLA

    steps = await steps_of(server, transfer["id"])
    dials = [s for s in steps if s["step"] == "agent_dial"]
    assert [d["data"]["agent"] for d in dials] == [first.id, second.id]
    outcomes = {(s["twilio_sid"], s["outcome"]) for s in steps if s["step"] == "agent_status"}
    assert (dials[0]["twilio_sid"], "no-answer") in outcomes and (dials[1]["twilio_sid"], "busy") in outcomes
    assert [s["outcome"] for s in steps if s["step"] in ("caller_apology", "callback_scheduled")] == [
        "updated",
        "scheduled",
    ]
    assert (
        await server.services.pool.fetchval(
            "SELECT count(*) FROM events WHERE conversation_id = $1 AND kind = 'callback_scheduled'",
            transfer["conversation_id"],
        )
        == 1
    )


async def _status_is(server: LiveServer, call_sid: str, status: str) -> bool:
    return (
        await server.services.pool.fetchval("SELECT status FROM transfers WHERE call_sid = $1", call_sid)
        == status
    )


async def _has_callback(server: LiveServer, transfer_id: int) -> bool:
    return bool(
        await server.services.pool.fetchval(
            "SELECT count(*) FROM callbacks WHERE transfer_id = $1", transfer_id
        )
    )


@contextlib.contextmanager
def ring_config(server: LiveServer, **changes: Any) -> Iterator[None]:
    """Change the transfer's ring settings for one test (the server is shared by the module)."""
    transfer = server.services.transfer
    before = transfer.config
    transfer.config = dataclasses.replace(before, **changes)
    try:
        yield
    finally:
        transfer.config = before


async def test_an_agent_phone_that_never_reports_back_times_out_and_the_next_agent_is_rung(
    voice: Any,
) -> None:
    server, twilio, clock = voice
    first, first_phone = await phone_agent(server)
    second, second_phone = await phone_agent(server)
    await only_these_phone_agents(server, [first.id, second.id])
    twilio.agent_behaviour[first_phone] = "silent"  # rings, then nothing: no final status ever comes
    twilio.agent_behaviour[second_phone] = "answer"
    with ring_config(server, ring_seconds=1, ring_grace_s=0.5):
        _, report = await ask_for_a_person(server, clock, "Ines Duarte")
        await wait_for(lambda: _status_is(server, report.call_sid, "connected"), timeout=30)
    transfer = await transfer_of(server, report.call_sid)
    steps = await steps_of(server, transfer["id"])
    dials = [s for s in steps if s["step"] == "agent_dial"]
    assert [d["data"]["agent"] for d in dials][:2] == [first.id, second.id]
    silent_call = dials[0]["twilio_sid"]
    assert [s["twilio_sid"] for s in steps if s["step"] == "ring_timeout"] == [silent_call]
    cancelled = [
        u for u in twilio.call_updates if silent_call in u.path and u.form.get("Status") == "canceled"
    ]
    assert len(cancelled) == 1  # the silent phone stops ringing
    ticket = await server.services.pool.fetchrow(
        "SELECT owner FROM tickets WHERE id = $1", transfer["ticket_id"]
    )
    assert ticket["owner"] == f"agent:{second.id}"


async def test_a_caller_who_hangs_up_while_waiting_stops_the_ringing_and_stays_queued(voice: Any) -> None:
    server, twilio, clock = voice
    agent, agent_phone = await phone_agent(server)
    await only_these_phone_agents(server, [agent.id])
    twilio.agent_behaviour[agent_phone] = "silent"
    with ring_config(server, ring_seconds=60):
        _, report = await ask_for_a_person(server, clock, "Tomas Berg")
        await wait_for(lambda: _status_is(server, report.call_sid, "ringing"))
        transfer = await transfer_of(server, report.call_sid)
        moved = next(
            u
            for u in twilio.call_updates
            if report.call_sid in u.path and "<Conference" in u.form.get("Twiml", "")
        )
        callback = re.search(r'statusCallback="([^"]+)"', moved.form["Twiml"]).group(1).replace("&amp;", "&")
        form = {
            "AccountSid": ACCOUNT_SID,
            "ConferenceSid": "CF" + "1" * 32,
            "FriendlyName": transfer["conference_name"],
            "StatusCallbackEvent": "participant-leave",
            "CallSid": report.call_sid,
        }
        path = callback.removeprefix(server.base_url)
        response = await post_signed(server, path, form)
        assert response.status_code in (200, 204), response.text
        await wait_for(lambda: _status_is(server, report.call_sid, "abandoned"))
    steps = await steps_of(server, transfer["id"])
    assert [s["outcome"] for s in steps if s["step"] == "caller_left"] == ["abandoned"]
    agent_call = next(s["twilio_sid"] for s in steps if s["step"] == "agent_dial")
    assert [u.form.get("Status") for u in twilio.call_updates if agent_call in u.path] == ["canceled"]
    assert not [s for s in steps if s["step"] == "callback_scheduled"]  # the caller left: no apology call
    waiting = await server.services.pool.fetchval(
        "SELECT count(*) FROM handoffs WHERE conversation_id = $1 AND status = 'waiting'",
        transfer["conversation_id"],
    )
    assert waiting == 1  # still queued for a person, with its SLA
