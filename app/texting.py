"""Builders of the text senders: Twilio SMS/WhatsApp when configured, else a local stand-in."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from app.settings import Settings
from pipeline.model import Channel, OutboundText, SendResult
from pipeline.ports import TextSender
from web.chat_routes import WebChatHub

log = logging.getLogger("closeloop")

Closer = Callable[[], Awaitable[None]]


class LoggingSender:
    """Stands in for Twilio when no credentials are configured: records, does not send."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def send(self, message: OutboundText) -> SendResult:
        log.info(
            "twilio not configured; text kept in the transcript only",
            extra={"channel": str(message.channel), "kind": message.kind},
        )
        return SendResult(provider_ref="local-only", channel_used=self._channel, detail="not_sent_no_twilio")


def build_senders(settings: Settings, hub: WebChatHub, closers: list[Closer]) -> dict[Channel, TextSender]:
    """A sender per channel: the web chat hub, and Twilio (or :class:`LoggingSender`) for SMS and
    WhatsApp. What must be closed at shutdown is appended to ``closers``."""
    senders: dict[Channel, TextSender] = {Channel.WEBCHAT: hub}
    if settings.twilio_account_sid and settings.twilio_auth_token:
        from telephony.sender import TwilioTextSender  # noqa: PLC0415

        twilio = TwilioTextSender(
            settings.twilio_account_sid,
            settings.twilio_auth_token,
            sms_from=settings.twilio_sms_from,
            whatsapp_from=settings.twilio_whatsapp_from,
            api_base_url=settings.twilio_api_base_url,
            whatsapp_template_sid=settings.twilio_whatsapp_template_sid,
        )
        closers.append(twilio.aclose)
        senders[Channel.SMS] = senders[Channel.WHATSAPP] = twilio
    else:
        senders[Channel.SMS] = LoggingSender(Channel.SMS)
        senders[Channel.WHATSAPP] = LoggingSender(Channel.WHATSAPP)
    return senders
