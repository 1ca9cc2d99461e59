"""TwiML replies to voice webhooks."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from telephony.voice_twiml import connect_stream, say_and_hangup


def parse(document: str) -> ET.Element:
    assert document.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(document)
    assert root.tag == "Response"
    return root


def test_connect_stream_nests_stream_and_parameters_in_order() -> None:
    root = parse(connect_stream("wss://cc.example.com/twilio/stream", {"conversation": "c-1", "lang": "en"}))
    (connect,) = root
    assert connect.tag == "Connect" and connect.attrib == {}
    (stream,) = connect
    assert stream.tag == "Stream"
    assert stream.attrib == {"url": "wss://cc.example.com/twilio/stream"}
    assert [(p.tag, p.attrib) for p in stream] == [
        ("Parameter", {"name": "conversation", "value": "c-1"}),
        ("Parameter", {"name": "lang", "value": "en"}),
    ]


def test_connect_stream_escapes_parameter_values() -> None:
    value = '"/><Hangup/><Parameter name="x" value="& <tricky>'
    document = connect_stream("wss://h/s", {"note": value, "empty": ""})
    assert "<Hangup" not in document
    (stream,) = parse(document)[0]
    assert [p.attrib for p in stream] == [{"name": "note", "value": value}, {"name": "empty", "value": ""}]


def test_connect_stream_without_parameters() -> None:
    (stream,) = parse(connect_stream("wss://h/s", {}))[0]
    assert list(stream) == []


def test_connect_stream_can_name_an_action_url() -> None:
    (connect,) = parse(connect_stream("wss://h/s", {}, action="https://h/twilio/after-stream"))
    assert connect.attrib == {"action": "https://h/twilio/after-stream"}


@pytest.mark.parametrize(
    "url",
    ["https://h/s", "h/s", "wss:///s", "wss://h/s?conversation=1", "wss://h/s#x", ""],
)
def test_connect_stream_refuses_urls_twilio_cannot_use(url: str) -> None:
    with pytest.raises(ValueError):
        connect_stream(url, {})


def test_connect_stream_allows_plain_ws_for_local_simulators() -> None:
    (stream,) = parse(connect_stream("ws://127.0.0.1:8000/twilio/stream", {}))[0]
    assert stream.attrib["url"] == "ws://127.0.0.1:8000/twilio/stream"


@pytest.mark.parametrize("parameters", [{"": "v"}, {"k": 1}, {"k": None}])
def test_connect_stream_refuses_bad_parameters(parameters: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        connect_stream("wss://h/s", parameters)  # type: ignore[arg-type]


def test_say_and_hangup_says_escaped_text_then_hangs_up() -> None:
    text = "Goodbye <b>now</b> & thanks"
    root = parse(say_and_hangup(text))
    assert [child.tag for child in root] == ["Say", "Hangup"]
    assert root[0].text == text


def test_say_and_hangup_passes_voice_and_language() -> None:
    say = parse(say_and_hangup("Hola", voice="Polly.Lupe", language="es-US"))[0]
    assert say.attrib == {"voice": "Polly.Lupe", "language": "es-US"}


@pytest.mark.parametrize("text", ["", "   "])
def test_say_and_hangup_refuses_blank_text(text: str) -> None:
    with pytest.raises(ValueError):
        say_and_hangup(text)
