"""TwiML documents of a warm transfer: hold music, the caller's conference leg, the agent's
briefing leg and the apology when nobody answers. Pure functions, built with the twilio SDK so
text and attributes are escaped.

Twilio accepts at most 4000 characters of TwiML on a call create/update; the agent's briefing
is shortened (at a word boundary) to fit. Conference names must never carry personal data:
:func:`conference_name` makes them from the transfer id only.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from twilio.twiml.voice_response import Dial, VoiceResponse

MAX_TWIML_CHARS = 4000
_NAME = re.compile(r"^cl-transfer-[0-9]{1,18}$")
_PHONE_LIKE = re.compile(r"\+|[0-9]{7,}")


def conference_name(transfer_id: int) -> str:
    """``cl-transfer-<id>``: the conference of one transfer, with no personal data in it."""
    if isinstance(transfer_id, bool) or not isinstance(transfer_id, int) or transfer_id <= 0:
        raise ValueError("transfer id must be a positive integer")
    return f"cl-transfer-{transfer_id}"


def _checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError("conference names are 'cl-transfer-<id>' (no personal data); use conference_name()")
    return name


def _checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("callback and hold URLs must be absolute http(s) URLs")
    return url


def hold_music(
    hold_url: str,
    *,
    message: str = "Please hold while I connect you with a member of our team.",
    pause_s: int = 20,
) -> str:
    """The conference ``waitUrl`` document: a short line, silence, then fetch itself again.

    No external audio: ``<Say>`` + ``<Pause>`` + ``<Redirect>`` back to ``hold_url``.
    """
    response = VoiceResponse()
    response.say(message)
    response.pause(length=max(1, int(pause_s)))
    response.redirect(_checked_url(hold_url), method="POST")
    return str(response.to_xml())


def caller_conference(name: str, *, hold_url: str, status_callback: str) -> str:
    """The caller's leg: wait (hearing ``hold_url``) in conference ``name`` until the agent joins.

    ``startConferenceOnEnter="false"``: the conference starts only when the agent enters.
    """
    dial = Dial()
    dial.conference(
        _checked_name(name),
        start_conference_on_enter=False,
        end_conference_on_exit=False,
        wait_url=_checked_url(hold_url),
        wait_method="POST",
        status_callback=_checked_url(status_callback),
        status_callback_method="POST",
        status_callback_event="start end join leave",
    )
    response = VoiceResponse()
    response.append(dial)
    return str(response.to_xml())


def agent_briefing(name: str, *, ticket: str, summary: str, limit: int = MAX_TWIML_CHARS) -> str:
    """The agent's leg: hear the ticket number and the summary, then join conference ``name``.

    The agent's entry starts the conference; their leaving ends it (the caller is not left
    alone on hold music). The summary is cut at a word boundary so the document fits ``limit``.
    """
    _checked_name(name)
    summary = " ".join(summary.split())
    intro = f"Incoming transfer. Ticket {ticket}."
    outro = "Connecting you to the caller now."

    def build(text: str) -> str:
        spoken = " ".join(part for part in (intro, text, outro) if part)
        response = VoiceResponse()
        response.say(spoken)
        dial = Dial()
        dial.conference(name, start_conference_on_enter=True, end_conference_on_exit=True, beep=False)
        response.append(dial)
        return str(response.to_xml())

    document = build(summary)
    if len(document) > limit:
        # Escaping makes the XML longer than the text: find the longest prefix that fits.
        low, high = 0, len(summary)
        while low < high:
            mid = (low + high + 1) // 2
            if len(build(_shortened(summary, mid))) <= limit:
                low = mid
            else:
                high = mid - 1
        document = build(_shortened(summary, low))
    if len(document) > limit:
        raise ValueError(f"the agent briefing cannot fit in {limit} characters")
    return document


def _shortened(text: str, chars: int) -> str:
    """``text`` cut to at most ``chars`` characters at a word boundary, marked with an ellipsis."""
    if chars >= len(text):
        return text
    cut = text[: max(0, chars - 4)]
    cut = cut.rsplit(" ", 1)[0] if " " in cut else ""
    return (cut.rstrip(" ,;:.") + " ...") if cut else ""


def apology_and_hangup(text: str) -> str:
    """Nobody could take the call: say ``text`` (the apology and promised call back) and hang up."""
    if not text or not text.strip():
        raise ValueError("text to say is blank")
    response = VoiceResponse()
    response.say(text)
    response.hangup()
    document = str(response.to_xml())
    if len(document) > MAX_TWIML_CHARS:
        raise ValueError("apology TwiML is longer than Twilio accepts")
    return document


def looks_personal(name: str) -> bool:
    """True when ``name`` looks like it carries a phone number (for checks and tests)."""
    return bool(_PHONE_LIKE.search(name))
