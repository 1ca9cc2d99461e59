"""Where the voice webhook's TwiML sends a call's media stream, read the way Twilio reads it."""

from __future__ import annotations

import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass


class TwimlError(ValueError):
    """The voice webhook's TwiML does not connect the call to a media stream."""


@dataclass(frozen=True)
class StreamTarget:
    """Where ``<Connect><Stream>`` sends the call: the URL and the ``<Parameter>``s, in order."""

    url: str
    parameters: dict[str, str]


def parse_stream_twiml(xml: str) -> StreamTarget:
    """Read the Stream URL and Parameters from voice TwiML, as Twilio would.

    Raises:
        TwimlError: not XML, no ``<Response><Connect><Stream>``, a Stream URL that is not an
            absolute ``ws(s)://`` URL or has a query string (Twilio drops it: use Parameters),
            or a Parameter without a name.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise TwimlError(f"the voice webhook did not answer XML: {e}") from None
    stream = root.find("./Connect/Stream") if root.tag == "Response" else None
    if stream is None:
        raise TwimlError("the TwiML has no <Response><Connect><Stream>: the call would not reach the bot")
    url = (stream.get("url") or "").strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise TwimlError(f"<Stream url> must be an absolute wss:// URL, got {url!r}")
    if parts.query or parts.fragment:
        raise TwimlError("<Stream url> takes no query string: pass data as <Parameter>s")
    parameters: dict[str, str] = {}
    for param in stream.findall("Parameter"):
        name = param.get("name")
        if not name:
            raise TwimlError("a <Parameter> has no name")
        parameters[name] = param.get("value", "")
    return StreamTarget(url, parameters)


def media_socket_url(stream_url: str, base_url: str) -> str:
    """The URL the simulator opens for a Stream URL (the wss -> ws rule).

    A ``wss://`` Stream URL is opened as ``ws://`` (same host, port and path) when the webhook
    base URL is plain ``http://``; anything else is opened as given.
    """
    stream = urllib.parse.urlsplit(stream_url)
    if stream.scheme == "wss" and urllib.parse.urlsplit(base_url).scheme.lower() == "http":
        return urllib.parse.urlunsplit(stream._replace(scheme="ws"))
    return stream_url
