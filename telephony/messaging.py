"""Inbound SMS/WhatsApp webhooks from Twilio, parsed into plain data without I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.model import Channel

MAX_BODY_CHARS = 1600
"""Twilio's limit for a message body; anything longer did not come from Twilio."""

MAX_MEDIA = 10
"""Twilio delivers at most ten media items per message."""

_WHATSAPP_PREFIX = "whatsapp:"


class InvalidInbound(ValueError):
    """The webhook form is not a Twilio inbound message (missing or impossible fields)."""


@dataclass(frozen=True)
class InboundText:
    """One inbound text message.

    Attributes:
        channel: ``Channel.WHATSAPP`` when ``From`` starts with ``whatsapp:``, else ``Channel.SMS``.
        from_address: the customer's number in E.164 (``+15551234567``), prefix removed.
        to_address: our number in E.164, prefix removed (empty if Twilio did not send ``To``).
        body: the text; empty for a media-only message.
        message_sid: Twilio's ``MessageSid``, the natural key for deduplicating retries.
        wa_id: WhatsApp id (``WaId``, digits without ``+``), WhatsApp only.
        profile_name: WhatsApp profile name (``ProfileName``), WhatsApp only.
        num_media: how many media items Twilio announced (``NumMedia``).
        media_urls: the ``MediaUrl{N}`` values present, in order.
    """

    channel: Channel
    from_address: str
    to_address: str
    body: str
    message_sid: str
    wa_id: str | None = None
    profile_name: str | None = None
    num_media: int = 0
    media_urls: tuple[str, ...] = ()


def parse_inbound(form: Mapping[str, str]) -> InboundText:
    """Parse the form fields of Twilio's inbound-message webhook.

    Args:
        form: the POST form fields (a dict or starlette ``FormData``).

    Returns:
        The message as :class:`InboundText`.

    Raises:
        InvalidInbound: when ``MessageSid`` or ``From`` is missing, ``Body`` is longer than
            1600 characters, or ``NumMedia`` is not a number from 0 to 10.
    """
    message_sid = (form.get("MessageSid") or form.get("SmsMessageSid") or "").strip()
    if not message_sid:
        raise InvalidInbound("inbound message has no MessageSid")
    raw_from = (form.get("From") or "").strip()
    if not raw_from:
        raise InvalidInbound(f"inbound message {message_sid} has no From")
    body = form.get("Body") or ""
    if len(body) > MAX_BODY_CHARS:
        raise InvalidInbound(
            f"inbound message {message_sid} has a {len(body)}-character Body;"
            f" Twilio sends at most {MAX_BODY_CHARS}"
        )
    num_media = _parse_num_media(form.get("NumMedia"), message_sid)

    channel = Channel.WHATSAPP if raw_from.lower().startswith(_WHATSAPP_PREFIX) else Channel.SMS
    media_urls = tuple(url for i in range(num_media) if (url := (form.get(f"MediaUrl{i}") or "").strip()))
    return InboundText(
        channel=channel,
        from_address=_strip_channel(raw_from),
        to_address=_strip_channel((form.get("To") or "").strip()),
        body=body,
        message_sid=message_sid,
        wa_id=(form.get("WaId") or "").strip() or None,
        profile_name=(form.get("ProfileName") or "").strip() or None,
        num_media=num_media,
        media_urls=media_urls,
    )


def _strip_channel(address: str) -> str:
    if address.lower().startswith(_WHATSAPP_PREFIX):
        return address[len(_WHATSAPP_PREFIX) :].strip()
    return address


def _parse_num_media(value: str | None, message_sid: str) -> int:
    if value is None or value.strip() == "":
        return 0
    try:
        count = int(value)
    except ValueError:
        raise InvalidInbound(f"inbound message {message_sid} has a non-numeric NumMedia {value!r}") from None
    if not 0 <= count <= MAX_MEDIA:
        raise InvalidInbound(f"inbound message {message_sid} has NumMedia={count}; expected 0 to {MAX_MEDIA}")
    return count
