"""TwiML replies to messaging webhooks."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from telephony.twiml import empty_response, messaging_reply


def messages(document: str) -> list[str]:
    root = ET.fromstring(document)
    assert root.tag == "Response"
    return [element.text or "" for element in root]


def test_reply_has_one_message_per_text_in_order() -> None:
    document = messaging_reply(["Hi Ana!", "Your order 1002 ships tomorrow."])
    assert document.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    assert messages(document) == ["Hi Ana!", "Your order 1002 ships tomorrow."]


def test_reply_text_is_escaped() -> None:
    text = 'Use <b>code</b> & "quotes" </Message><Message>injected'
    document = messaging_reply([text])
    assert "<b>" not in document
    assert messages(document) == [text]


def test_blank_texts_are_dropped() -> None:
    assert messages(messaging_reply(["", "  ", "ok"])) == ["ok"]


def test_no_texts_gives_empty_response() -> None:
    assert messaging_reply([]) == empty_response()


def test_empty_response_is_a_bare_response_element() -> None:
    document = empty_response()
    root = ET.fromstring(document)
    assert root.tag == "Response"
    assert list(root) == []
