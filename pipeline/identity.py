"""Who the conversation is with: identity levels, decided by code and never by model text.

Every conversation is ``anonymous``, ``claimed`` or ``verified``:

* ``claimed``: a caller ID matched the phone on file (caller ID can be spoofed), or a customer
  typed or said a phone number or email. The claim is remembered, the account is not opened.
* ``verified``: a signed SMS/WhatsApp webhook whose ``From`` is the number on file, or a
  one-time code sent to the contact on file and given back in this conversation.

Reading account data and every account action need the level the intent asks for
(``Intent.identity``); money actions always need ``verified``. Both turn engines go through
:func:`required_level` and :func:`satisfies`: no tool and no model output can raise a level.

One-time codes are 6 digits, expire after 10 minutes, allow 5 attempts and are stored hashed
(:class:`pipeline.ports.VerificationCodes` keeps them). Codes are rate limited per conversation,
per customer and per client address; the reply to an unknown phone or email is the same as to
a known one, so nobody can learn who is a customer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from pipeline.model import Intent


class IdentityLevel(StrEnum):
    ANONYMOUS = "anonymous"
    CLAIMED = "claimed"
    VERIFIED = "verified"


_ORDER = (IdentityLevel.ANONYMOUS, IdentityLevel.CLAIMED, IdentityLevel.VERIFIED)

#: Actions that read account data or change the account.
ACCOUNT_ACTIONS = frozenset({"order_status", "cancel_order", "refund", "return_label", "account_balance"})
#: Actions that move money or goods: ``verified`` whatever the intent says.
MONEY_ACTIONS = frozenset({"cancel_order", "refund", "return_label"})

CODE_DIGITS = 6
CODE_TTL = timedelta(minutes=10)
CODE_ATTEMPTS = 5


@dataclass
class Identity:
    """Who the conversation is with, how that was established and when.

    ``claimed_ref`` is the customer a claim points at (None for an unknown number: the
    conversation then looks exactly like a claimed one to the customer, but nothing can verify).
    """

    level: IdentityLevel = IdentityLevel.ANONYMOUS
    method: str | None = None
    at: datetime | None = None
    claimed_ref: str | None = None

    def raise_to(self, level: IdentityLevel, method: str, at: datetime, ref: str | None) -> bool:
        """Move up to ``level`` (never down). True when the level changed."""
        if _ORDER.index(level) <= _ORDER.index(self.level):
            return False
        self.level, self.method, self.at = level, method, at
        if ref is not None:
            self.claimed_ref = ref
        return True

    def as_event(self) -> dict[str, str | None]:
        return {
            "level": str(self.level),
            "method": self.method,
            "at": self.at.isoformat() if self.at else None,
            "customer_ref": self.claimed_ref,
        }


def satisfies(level: IdentityLevel | str, required: IdentityLevel | str) -> bool:
    return _ORDER.index(IdentityLevel(level)) >= _ORDER.index(IdentityLevel(required))


def required_level(intent: Intent) -> IdentityLevel:
    """The level an intent's action needs: money always ``verified``, other account actions what
    the admin configured (default ``verified``), everything else ``anonymous``."""
    if intent.action in MONEY_ACTIONS:
        return IdentityLevel.VERIFIED
    if intent.action in ACCOUNT_ACTIONS:
        configured = IdentityLevel(intent.identity)
        return configured if configured != IdentityLevel.ANONYMOUS else IdentityLevel.CLAIMED
    return IdentityLevel.ANONYMOUS


# ---- one-time codes ---------------------------------------------------------------------------------


def new_code() -> str:
    """Six digits, never starting with 0: on a call a leading 0 on the keypad asks for a person."""
    return str(10 ** (CODE_DIGITS - 1) + secrets.randbelow(9 * 10 ** (CODE_DIGITS - 1)))


def hash_code(code: str, salt: str) -> str:
    """Codes are stored as HMAC-SHA256(salt, code): a database reader learns nothing usable."""
    return hmac.new(salt.encode(), code.encode(), hashlib.sha256).hexdigest()


def code_matches(code: str, salt: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_code(code, salt), stored_hash)


_SPOKEN = {
    "zero": "0",
    "oh": "0",
    "o": "0",
    "one": "1",
    "two": "2",
    "to": "2",
    "too": "2",
    "three": "3",
    "four": "4",
    "for": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
}
_CODE_FILLER = frozenset(
    "my the code is it's its it was verification one-time number yes ok okay sure here you go um uh and".split()
)


def code_in(text: str) -> str | None:
    """The 6-digit code in a message: typed ("123456", "123 456"), keyed on the phone pad, or
    said ("one two three, four five six"). None when the message is something else."""
    words = re.findall(r"[a-z'-]+|\d+", text.lower())
    digits: list[str] = []
    for w in words:
        if w.isdigit():
            digits.append(w)
        elif w in _SPOKEN and (w not in ("to", "too", "for", "o", "oh") or digits):
            digits.append(_SPOKEN[w])
        elif w in _CODE_FILLER or w in _SPOKEN:
            continue
        else:
            return None
    joined = "".join(digits)
    return joined if len(joined) == CODE_DIGITS else None


def wants_new_code(text: str) -> bool:
    return bool(
        re.search(r"\b(new|another|resend|send (it )?again|didn'?t (get|receive)|no code)\b", text.lower())
    )


@dataclass(frozen=True)
class CodeIssue:
    """The result of asking for a code: ``sent`` (or pretended, for an unknown contact) or
    ``rate_limited``. ``code`` is the plain code for the sender (None when nothing is sent)."""

    status: str
    code: str | None = None
    destination: str | None = None
    channel: str | None = None


@dataclass(frozen=True)
class CodeCheck:
    """``ok`` (with the customer it verifies), ``wrong``, ``expired``, ``locked`` or ``none``."""

    status: str
    customer_ref: str | None = None
    attempts_left: int = 0
