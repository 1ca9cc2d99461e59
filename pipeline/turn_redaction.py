"""Redaction that holds across the turns of one conversation.

:class:`~pipeline.redaction.Redactor` sees one text at a time, so a card number typed as
``4111 1111`` and then ``1111 1111`` passes it twice. :class:`TurnRedactor` adds what only the
conversation knows, on top of it:

- **Payment context.** A payment word (card, credit, debit, visa, mastercard, amex, cvv, security
  code, expiry...) in the customer's text, or in what the bot just said (the bot asked for card
  details, or warned about them), opens a payment context for this and the next
  ``window`` customer turns. Inside it, digits that look like card data are redacted: an expiry
  (``12/27``, ``exp 12 27``, ``december twenty seven``) becomes ``[redacted expiry]``, a 3-4 digit
  code after a security-code word (or right after the bot asked for one), or three digits alone,
  ``[redacted cvv]``, and any other run of 4+ digits written in groups of at most four (or of 13+
  digits however written) ``[redacted card]``. Outside it, ``4517`` stays an order number.
- **The start of a card.** A chain of 8-19 digits that begins like a card (first digit 2-6) and is
  written in groups of four or digit by digit is redacted whatever the context, also when the
  chains of consecutive customer turns add up to it (``4111`` then ``1111``): the earlier
  fragments go too.
- **A card over several turns.** When the chains of consecutive customer turns join into a
  Luhn-valid 13-19 digit number, every fragment is redacted.

A fragment that reached the transcript before it could be recognised is reported in
:attr:`TurnRedaction.earlier` (message ``seq`` and character span) so the service rewrites the
stored message in the same transaction. Only a lone 4-digit group can get that far: as many digits
as a receipt prints.

What is never redacted here: a chain right after ``order``/``#``/``ticket`` (an order reference),
an amount (``$125``, ``125 dollars``), and digits given in an identity context (``my number is
555 010 0001``) unless a card word is in the same text. While the bot waits for an order number
or for the customer to identify, digits are that answer unless they complete a card with the
turns before. Luhn-valid card numbers and SSNs are the base redactor's,
everywhere.

What is remembered between turns is JSON in ``ConversationState.redaction``, stored in the
database, so it never holds digits: whether a payment context is open and for how long, what the
bot last asked for, and per recent fragment where it sits (``seq``, span), how many digits it has,
how it was written, whether it starts like a card, and its two Luhn partial sums mod 10 (enough to
test a join; no more than a check digit reveals).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.redaction import (
    CARD_MARKER,
    CVV_MARKER,
    CVV_WORD,
    EXPIRY_MARKER,
    EXPIRY_WORD,
    SSN_MARKER,
    Redactor,
    _chains,
    _Token,
    _tokens,
)

__all__ = ["CVV_MARKER", "EXPIRY_MARKER", "TurnRedaction", "TurnRedactor", "replace_span"]


_MIN_CARD, _MAX_CARD = 13, 19
_MIN_START = 8  # digits of a card's beginning that are redacted without any payment word
_MAX_FRAGMENTS = 6  # fragments remembered (a card read out digit group by digit group)
_ORDER_AWAITING = frozenset({"order_number", "order_choice", "context_order"})

_PAYMENT_WORD = re.compile(
    r"\b(?:card|cards|(?<!store )(?<!account )credit|debit|visa|master\s?card|amex|american\s+express"
    r"|discover|cvv2?|cvc2?|security\s+code|exp|expiry|expiration|expires|valid\s+(?:thru|through))\b",
    re.IGNORECASE,
)
# Card words proper: with one of these in the text, digits are not an identity answer.
_CARD_WORD = re.compile(
    r"\b(?:card|credit|debit|visa|master\s?card|amex|american\s+express|cvv2?|cvc2?|security\s+code)\b",
    re.IGNORECASE,
)
_IDENTITY_WORD = re.compile(
    r"\b(?:phone|mobile|cell|telephone|landline|whats\s?app|my\s+number|number\s+is|call\s+me|text\s+me"
    r"|reach\s+me|e-?mail|zip|post\s?code|postal\s+code|date\s+of\s+birth|born)\b",
    re.IGNORECASE,
)
_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_UNIT = r"(?:one|two|three|four|five|six|seven|eight|nine)"
_SPOKEN_YEAR = (
    rf"(?:(?:twenty[\s-]+)?(?:twenty|thirty)(?:[\s-]+{_UNIT})?|(?:two|three)[\s-]+(?:zero|oh|{_UNIT}))"
)
_EXPIRY = re.compile(
    # 12/27, 12-27, 1/2027
    r"(?<![\w/.-])(?:0?[1-9]|1[0-2])\s?[/-]\s?(?:20)?\d{2}(?![\w/-])"
    # december 27, dec 2027, december twenty seven, march of twenty twenty eight
    rf"|\b{_MONTH}\b[\s,]*(?:of\s+)?(?:(?:20)?\d{{2}}(?!\w)|{_SPOKEN_YEAR}\b)",
    re.IGNORECASE,
)
# What makes a chain an order or ticket reference, or an amount, rather than card data.
_REFERENCE_BEFORE = re.compile(
    r"(?:\border(?:\s+(?:number|no\.?|num))?|#|\bticket|\btracking(?:\s+number)?|\bref(?:erence)?)"
    r"\s*(?:is\s+)?[:#]?\s*$"
    r"|[$€£]\s*$",
    re.IGNORECASE,
)
_AMOUNT_AFTER = re.compile(r"\s*(?:dollars?|euros?|pounds?|bucks|cents|usd|eur|gbp|%)", re.IGNORECASE)


@dataclass
class TurnRedaction:
    """The outcome of :meth:`TurnRedactor.inbound`.

    Attributes:
        text: the customer's text with everything the conversation says is card data redacted.
        earlier: ``(seq, start, end)`` of fragments in earlier stored customer messages that must
            now be redacted too (``[redacted card]`` in place of ``body[start:end]``).
        memory: the new ``ConversationState.redaction``.
    """

    text: str
    earlier: list[tuple[int, int, int]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)


def _luhn_partials(digits: str) -> tuple[int, int]:
    """Luhn sums mod 10 of ``digits`` when its last digit is at an even / odd place from the right."""
    sums = []
    for offset in (0, 1):
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = ord(ch) - 48
            if (i + offset) % 2:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        sums.append(total % 10)
    return sums[0], sums[1]


def _digits(chain: Sequence[_Token]) -> str:
    return "".join(t.digits for t in chain)


def _small_groups(chain: Sequence[_Token]) -> bool:
    return max(len(t.digits) for t in chain) <= 4


def _start_shaped(chain: Sequence[_Token]) -> bool:
    """Written as a card is read out: groups of four, or digit by digit."""
    sizes = {len(t.digits) for t in chain}
    return sizes == {4} or sizes == {1}


def replace_span(body: str, start: int, end: int, marker: str = CARD_MARKER) -> str:
    """``body`` with ``body[start:end]`` replaced by ``marker`` if that span still holds digits
    (a message rewritten since, e.g. by an earlier turn, is left as it is)."""
    if not (0 <= start < end <= len(body)) or not _tokens(body[start:end]):
        return body
    return body[:start] + marker + body[end:]


class TurnRedactor:
    """Conversation-aware redaction of customer turns; see the module docstring.

    Args:
        redactor: the deployment's stateless redactor (card numbers, SSNs, patterns); it runs first.
        window: customer turns a payment context stays open after the last payment word.
        enabled: False turns every rule of this class off (the base redactor still applies).
    """

    def __init__(self, redactor: Redactor | None = None, *, window: int = 3, enabled: bool = True) -> None:
        self.redactor = redactor if redactor is not None else Redactor()
        self.window = window
        self.enabled = enabled and self.redactor.cards

    def inbound(
        self, text: str, memory: dict[str, Any] | None, *, seq: int | None, awaiting: str | None = None
    ) -> TurnRedaction:
        """Redact one customer text given what the conversation remembers.

        Args:
            text: the customer's text (already through the base redactor or not: it runs again).
            memory: ``ConversationState.redaction`` before this turn.
            seq: the stored message's ``seq`` (where a fragment of it can be found later).
            awaiting: ``ConversationState.awaiting``: what the bot's last turn asked for.
        """
        text = self.redactor.redact(text)
        memory = dict(memory or {})
        if not self.enabled:
            return TurnRedaction(text, [], memory)
        card_words = bool(_CARD_WORD.search(text))
        identity = not card_words and bool(_IDENTITY_WORD.search(text))
        # The bot asked to identify or for an order: digits are the answer, unless they complete
        # a card with the turns before (a card is a card whatever was asked).
        answering = not card_words and (awaiting == "identify" or awaiting in _ORDER_AWAITING)
        payment = memory.get("payment", 0) > 0 or bool(_PAYMENT_WORD.search(text))
        expect = memory.get("expect")
        spans: list[tuple[int, int, str]] = []
        if payment and not identity and not answering:
            spans += [(m.start(), m.end(), EXPIRY_MARKER) for m in _EXPIRY.finditer(text)]
        chains = [c for c in _chains(text, _tokens(text)) if not _inside(c, spans)]
        fragments: list[dict[str, Any]] = list(memory.get("fragments") or [])
        earlier: list[tuple[int, int, int]] = []
        for i, chain in enumerate(chains):
            start, end = chain[0].start, chain[-1].end
            if i:
                fragments = []  # words stand between this chain and the one before: two numbers
            if identity or _is_reference(text, start, end):
                fragments = []  # an identity answer or an order reference ends any run of fragments
                continue
            digits = _digits(chain)
            marker = self._payment_marker(text, chain, expect) if payment and not answering else None
            # The text's first chain read together with the chains of the turns just before.
            joined = _joins(fragments, digits, chain)
            if joined is not None and answering and not joined[1]:
                joined = None
            if joined is not None:
                frags = joined[0]
                marker = marker or CARD_MARKER
                for f in frags:
                    if f.get("here"):
                        spans.append((f["start"], f["end"], CARD_MARKER))
                    elif f.get("seq") is not None:
                        earlier.append((f["seq"], f["start"], f["end"]))
                        f["seq"] = None  # rewritten now: nothing left to find later
            if marker is not None:
                spans.append((start, end, marker))
            if marker in (CVV_MARKER, EXPIRY_MARKER) or (joined is not None and joined[1]):
                fragments = []
            else:
                fragments = [*fragments, _fragment(digits, chain, start, end, redacted=marker is not None)]
        if not chains:
            fragments = []
        out = _apply(text, spans)
        fragments = [_stored(f, seq, spans) for f in fragments[-_MAX_FRAGMENTS:]]
        memory["fragments"] = fragments
        opened = bool(_PAYMENT_WORD.search(text)) or any(m != SSN_MARKER for _, _, m in spans)
        memory["payment"] = self.window if opened else max(0, memory.get("payment", 0) - 1)
        memory["expect"] = _expects(text) if payment else None
        return TurnRedaction(out, _dedupe(earlier), memory)

    def outbound(self, replies: Sequence[str], memory: dict[str, Any] | None) -> dict[str, Any]:
        """The memory after the bot said ``replies``: asking for (or about) card details opens a
        payment context, and a question for the security code or expiry is remembered."""
        memory = dict(memory or {})
        if not self.enabled:
            return memory
        said = " ".join(replies)
        if _PAYMENT_WORD.search(said):
            memory["payment"] = max(memory.get("payment", 0), self.window)
            memory["expect"] = _expects(said)
        return memory

    def _payment_marker(self, text: str, chain: list[_Token], expect: str | None) -> str | None:
        digits = _digits(chain)
        n, start = len(digits), chain[0].start
        cvv_cue = CVV_WORD.search(text, max(0, start - 30), start) or (
            expect == "cvv" and not _CARD_WORD.search(text)
        )
        if 3 <= n <= 4 and cvv_cue:
            return CVV_MARKER
        expiry_cue = EXPIRY_WORD.search(text, max(0, start - 20), start) or expect == "expiry"
        sizes = [len(t.digits) for t in chain]
        if expiry_cue and n in (4, 6) and (sizes in ([2, 2], [2, 4], [4], [6]) or set(sizes) == {1}):
            return EXPIRY_MARKER
        if sizes == [2, 2] and 1 <= int(digits[:2]) <= 12:
            return EXPIRY_MARKER
        if n == 3:
            return CVV_MARKER
        if n >= _MIN_CARD or (n >= 4 and _small_groups(chain)):
            return CARD_MARKER
        return None


def _joins(
    run: list[dict[str, Any]], digits: str, chain: list[_Token]
) -> tuple[list[dict[str, Any]], bool] | None:
    """The earlier fragments that, with this chain, make a card or a card's beginning.

    A card: 13-19 digits over consecutive turns, starting like one and passing Luhn, however each
    part was written. A card's beginning: 8+ digits starting like a card, every part written in
    groups of four or digit by digit (a phone number's 3-3-4 or an order number run is not).

    Returns ``(fragments to redact with it, whether they complete a card)`` (no fragments: the
    chain alone is a card's beginning), or None when this chain is not card data by itself or
    with its predecessors.
    """
    shaped = _start_shaped(chain)
    for k in range(len(run), -1, -1):  # the longest run first
        frags = run[len(run) - k :]
        n = len(digits) + sum(f["n"] for f in frags)
        if n > _MAX_CARD:
            continue
        first_iin = frags[0]["iin"] if frags else digits[0] in "23456"
        if frags and n >= _MIN_CARD and first_iin:
            total, right = _luhn_partials(digits)[0], len(digits)
            for f in reversed(frags):
                total += f["l1"] if right % 2 else f["l0"]
                right += f["n"]
            if total % 10 == 0:
                return frags, True
        if n >= _MIN_START and first_iin and shaped and all(f["shaped"] for f in frags):
            return frags, False
    return None


def _fragment(digits: str, chain: list[_Token], start: int, end: int, *, redacted: bool) -> dict[str, Any]:
    """What is remembered of one chain of this text: never its digits."""
    l0, l1 = _luhn_partials(digits)
    return {
        "here": True,  # of the text in hand (span in its unredacted form)
        "redacted": redacted,
        "start": start,
        "end": end,
        "n": len(digits),
        "l0": l0,
        "l1": l1,
        "iin": digits[0] in "23456",
        "shaped": _start_shaped(chain),
    }


def _is_reference(text: str, start: int, end: int) -> bool:
    return bool(_REFERENCE_BEFORE.search(text, max(0, start - 30), start)) or bool(
        _AMOUNT_AFTER.match(text, end)
    )


def _inside(chain: list[_Token], spans: list[tuple[int, int, str]]) -> bool:
    return any(s < chain[-1].end and chain[0].start < e for s, e, _ in spans)


def _apply(text: str, spans: list[tuple[int, int, str]]) -> str:
    out, pos = [], 0
    for start, end, marker in sorted(spans):
        if start < pos:
            continue
        out.append(text[pos:start])
        out.append(marker)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _stored(f: dict[str, Any], seq: int | None, spans: list[tuple[int, int, str]]) -> dict[str, Any]:
    """A fragment as the memory keeps it: a fragment of this text gets its stored message's seq
    (none when it was redacted: nothing to rewrite later) and its span in the redacted text."""
    if not f.pop("here", False):
        return f
    redacted = f.pop("redacted")
    shift = sum(len(m) - (e - s) for s, e, m in spans if e <= f["start"])
    return {**f, "seq": None if redacted else seq, "start": f["start"] + shift, "end": f["end"] + shift}


def _expects(text: str) -> str | None:
    """What card detail a text asks for or announces last: ``cvv``, ``expiry`` or None."""
    cvv = [m.end() for m in CVV_WORD.finditer(text)]
    exp = [m.end() for m in EXPIRY_WORD.finditer(text)]
    if not cvv and not exp:
        return None
    return "cvv" if max(cvv, default=-1) > max(exp, default=-1) else "expiry"


def _dedupe(items: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    return list(dict.fromkeys(items))
