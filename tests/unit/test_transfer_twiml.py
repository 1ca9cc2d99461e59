"""The warm transfer's TwiML builders: escaping, Twilio's 4000-character limit, safe conference names."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from telephony.transfer_twiml import (
    MAX_TWIML_CHARS,
    agent_briefing,
    apology_and_hangup,
    caller_conference,
    conference_name,
    hold_music,
    looks_personal,
)

HOLD = "https://cc.example.com/twilio/transfer/hold"
STATUS = "https://cc.example.com/twilio/transfer/conference?transfer=7&x=1"


def test_conference_names_come_from_the_transfer_id_only() -> None:
    assert conference_name(7) == "cl-transfer-7"
    assert not looks_personal(conference_name(123456))
    for bad in (0, -1, True):
        with pytest.raises(ValueError):
            conference_name(bad)


@pytest.mark.parametrize("name", ["+15551234567", "dana-reyes", "cl-transfer-7 ", "cl-transfer-x"])
def test_builders_refuse_conference_names_that_could_carry_personal_data(name: str) -> None:
    with pytest.raises(ValueError):
        caller_conference(name, hold_url=HOLD, status_callback=STATUS)
    with pytest.raises(ValueError):
        agent_briefing(name, ticket="T-1", summary="x")


def test_caller_waits_on_hold_and_reports_conference_events() -> None:
    root = ET.fromstring(caller_conference("cl-transfer-7", hold_url=HOLD, status_callback=STATUS))
    conference = root.find("./Dial/Conference")
    assert conference is not None and conference.text == "cl-transfer-7"
    assert conference.get("startConferenceOnEnter") == "false"
    assert conference.get("waitUrl") == HOLD
    assert conference.get("statusCallback") == STATUS  # '&' escaped in the XML, intact once parsed
    assert conference.get("statusCallbackEvent") == "start end join leave"


def test_callback_urls_must_be_absolute() -> None:
    with pytest.raises(ValueError):
        caller_conference("cl-transfer-7", hold_url="/twilio/transfer/hold", status_callback=STATUS)


def test_agent_briefing_escapes_the_summary_and_joins_the_conference() -> None:
    summary = 'Customer: Dana <VIP> & "friends"\nAsked for: a person\nDone: nothing yet'
    document = agent_briefing("cl-transfer-7", ticket="T-2024-0042", summary=summary)
    root = ET.fromstring(document)
    said = root.findtext("./Say") or ""
    assert "T-2024-0042" in said and 'Dana <VIP> & "friends"' in said
    assert "<VIP>" not in document
    conference = root.find("./Dial/Conference")
    assert conference is not None and conference.text == "cl-transfer-7"
    assert (
        conference.get("startConferenceOnEnter") == "true" and conference.get("endConferenceOnExit") == "true"
    )


def test_agent_briefing_cuts_a_long_summary_at_a_word_to_fit_twilios_limit() -> None:
    summary = "refund & <return> " * 1000
    document = agent_briefing("cl-transfer-7", ticket="T-9", summary=summary)
    assert len(document) <= MAX_TWIML_CHARS
    said = ET.fromstring(document).findtext("./Say") or ""
    assert "T-9" in said and said.endswith("Connecting you to the caller now.")
    assert "... Connecting" in said and "&" in said and "retu ..." not in said


def test_hold_music_uses_no_external_audio() -> None:
    root = ET.fromstring(hold_music(HOLD))
    assert [child.tag for child in root] == ["Say", "Pause", "Redirect"]
    assert root.find("Play") is None and root.findtext("Redirect") == HOLD


def test_apology_says_then_hangs_up() -> None:
    root = ET.fromstring(apology_and_hangup("Sorry & goodbye"))
    assert [child.tag for child in root] == ["Say", "Hangup"] and root.findtext("Say") == "Sorry & goodbye"
    with pytest.raises(ValueError):
        apology_and_hangup("  ")
