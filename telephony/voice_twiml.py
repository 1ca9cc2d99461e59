"""TwiML documents for voice webhooks, built with the twilio SDK so text and attributes are escaped."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from twilio.twiml.voice_response import Connect, VoiceResponse


def connect_stream(ws_url: str, parameters: Mapping[str, str], *, action: str | None = None) -> str:
    """TwiML that connects the call to a bidirectional Media Stream.

    ``<Response><Connect><Stream url="..."><Parameter name=".." value=".."/></Stream></Connect></Response>``.
    ``<Connect>`` holds the call until the WebSocket closes.

    Args:
        ws_url: the ``wss://`` URL Twilio opens (``ws://`` is allowed for local simulators).
            Twilio takes no query string here, so one is refused: pass data as ``parameters``.
        parameters: sent as ``<Parameter>``s, in order; they arrive in ``start.customParameters``.
        action: optional URL Twilio requests when ``<Connect>`` ends (the stream closed).

    Returns:
        The XML document.

    Raises:
        ValueError: URL not ``ws(s)://`` with a host, URL with a query or fragment, or a
            parameter name that is empty or not a string / a value that is not a string.
    """
    parts = urlsplit(ws_url)
    if parts.scheme not in ("wss", "ws") or not parts.netloc:
        raise ValueError("stream URL must be an absolute wss:// URL")
    if parts.query or parts.fragment:
        raise ValueError("stream URL takes no query string: pass data as parameters")
    connect = Connect(action=action) if action else Connect()
    stream = connect.stream(url=ws_url)
    for name, value in parameters.items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValueError("stream parameters must map non-empty names to strings")
        stream.parameter(name=name, value=value)
    response = VoiceResponse()
    response.append(connect)
    return str(response.to_xml())


def say_and_hangup(text: str, *, voice: str | None = None, language: str | None = None) -> str:
    """TwiML that says ``text`` and hangs up (``<Say>`` then ``<Hangup/>``).

    Raises:
        ValueError: blank text (Twilio rejects an empty ``<Say>``).
    """
    if not text or not text.strip():
        raise ValueError("text to say is blank")
    response = VoiceResponse()
    response.say(text, voice=voice, language=language)
    response.hangup()
    return str(response.to_xml())
