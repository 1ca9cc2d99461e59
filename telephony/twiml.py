"""TwiML documents for messaging webhooks, built with the twilio SDK so text is escaped."""

from __future__ import annotations

from collections.abc import Sequence

from twilio.twiml.messaging_response import MessagingResponse


def messaging_reply(texts: Sequence[str]) -> str:
    """TwiML that replies inline to an inbound SMS/WhatsApp message.

    Each non-blank text becomes one ``<Message>``, in order. Blank texts are dropped because
    Twilio rejects an empty ``<Message>``; no texts at all gives :func:`empty_response`.

    Args:
        texts: reply texts, plain (``<``, ``&`` ... are escaped here).

    Returns:
        The XML document, e.g. ``<?xml ...?><Response><Message>Hi</Message></Response>``.
    """
    response = MessagingResponse()
    for text in texts:
        if text and text.strip():
            response.message(text)
    return str(response.to_xml())


def empty_response() -> str:
    """TwiML that acknowledges a webhook without sending anything back."""
    return str(MessagingResponse().to_xml())
