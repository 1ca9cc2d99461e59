"""Redaction of card numbers and configured patterns from customer text, payloads and logs.

Pure code: :class:`Redactor` turns text into text. Card numbers are found the way people and
speech recognizers write them, not only as one digit run:

- ``4111111111111111``, ``4111 1111 1111 1111``, ``4111-1111-1111-1111``;
- Whisper's punctuation of read-out digits: ``4532, 0151, 1283, 0366.``, ``4,532, 0,1,51, ...``;
- digit words, alone or mixed with digits: ``four five three two``, ``oh`` for zero,
  ``double one`` for ``11``.

Tokens (digit runs and digit words) separated only by spaces, commas, periods or dashes form a
*chain*. Inside a chain, any run of whole tokens with 13 to 19 digits that passes the Luhn check
is a card, provided it is written like one: a single run of digits, or groups of at most four
digits (which covers digit-by-digit speech), or the Amex/Diners ``4-6-5``/``4-6-4`` shapes.
The whole chain holding a card is redacted, so an expiry date or security code read out right
after it goes too.
That shape rule keeps a list of six-digit order numbers or an order number next to a ten-digit
phone number from being read as a card the one time in ten their digits happen to pass Luhn.
A number written after ``+`` (a phone number) never joins a chain.

Speech recognizers mishear digits, so a card read out loud may come back a digit short and fail
Luhn. When a card word (``card``, ``credit``, ``debit``, ``visa``, ``mastercard``, ``amex``,
``cvv``) comes shortly before a chain of 13 or more digits, the whole chain is redacted whatever
its checksum (``card_context``). Without such a word, digit runs that fail Luhn (order numbers,
phone numbers, dates, amounts, a 16-digit reference) are left alone.

Log records get a stricter redactor (:meth:`Redactor.for_logs`): there any chain of 8 or more
digits written in groups of at most four (a part of a card typed over two messages, a phone
number) becomes ``[redacted card]``, and 3-4 digits right after a security-code or expiry word
``[redacted cvv]``/``[redacted expiry]``: a log line has no conversation to tell a card's first
half from anything else, and logs carry identifiers, not content.

A US social security number is redacted as ``[redacted ssn]`` when written ``123-45-6789`` or
``123 45 6789``, and as any chain of nine digits (``123456789``, ``one two three ...``) that follows
an SSN word (``ssn``, ``social security``, ``social``) closely.

Number words beyond single digits ("four thousand one hundred eleven") are not parsed; speech
recognizers write those as digits, which are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CARD_MARKER",
    "CVV_MARKER",
    "EXPIRY_MARKER",
    "SSN_MARKER",
    "DEFAULT_PATTERNS",
    "RedactingFilter",
    "Redactor",
    "install_log_redaction",
    "luhn_valid",
    "redact",
    "redact_obj",
]

CARD_MARKER = "[redacted card]"
CVV_MARKER = "[redacted cvv]"
EXPIRY_MARKER = "[redacted expiry]"
SSN_MARKER = "[redacted ssn]"

#: Extra patterns redacted by default: a US social security number written ``123-45-6789``.
DEFAULT_PATTERNS: tuple[tuple[str, str], ...] = (("ssn", r"\b\d{3}-\d{2}-\d{4}\b"),)

_MIN_CARD, _MAX_CARD = 13, 19
_CARD_SHAPES = frozenset({(4, 6, 5), (4, 6, 4)})  # Amex and Diners as printed
_CONTEXT_CHARS = 40  # how far before a chain a card word counts

_DIGIT_WORDS = {
    "zero": "0",
    "oh": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
}
# Words a recognizer writes for a digit it misheard; only trusted *between* digits of a chain.
_WEAK_WORDS = {"o": "0", "won": "1", "to": "2", "too": "2", "free": "3", "tree": "3", "for": "4", "ate": "8"}
_REPEAT = {"double": 2, "triple": 3}

_WORD_ALT = "|".join(sorted({*_DIGIT_WORDS, *_WEAK_WORDS}, key=len, reverse=True))
# A digit run glued to letters ("SM0123...", "1Z999AA1...") or written as "ID-123..." is an
# identifier, and one after "+" is a phone number: neither is read as (part of) a card.
_TOKEN = re.compile(
    rf"(?<![\w+])(?:(?<![A-Za-z]-)(?P<num>\d+)|(?:(?P<rep>double|triple)\s+)?(?P<word>{_WORD_ALT}|\d))(?!\w)",
    re.IGNORECASE,
)
_SEPARATOR = re.compile(r"[\s,.\-\u2010-\u2015]{1,4}")
_CARD_WORD = re.compile(
    r"\b(?:card|credit|debit|visa|master\s?card|amex|american express|cvv|cvc)\b", re.IGNORECASE
)
# An SSN is 3-2-4 digits; with the same separator twice it is one whatever the words around it.
_SSN_GROUPED = re.compile(r"(?<![\w+\-])\d{3}([ -])\d{2}\1\d{4}(?![\w-])")
_SSN_WORD = re.compile(r"\b(?:ssn|social(?:\s+security)?|ss\s*#)", re.IGNORECASE)
_SSN_CONTEXT_CHARS = 30
CVV_WORD = re.compile(
    r"\b(?:cvv2?|cvc2?|cid|security\s+code|verification\s+(?:code|number)|code\s+on\s+the\s+back"
    r"|three[\s-]digit\s+code)\b",
    re.IGNORECASE,
)
EXPIRY_WORD = re.compile(
    r"\b(?:exp|expiry|expiration|expires|expiring|valid\s+(?:thru|through|until)|good\s+thru)\b",
    re.IGNORECASE,
)
_LOG_MIN_RUN = 8  # digits of a chain in small groups that a log line never shows
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9 _-]{0,39}$")
_HAS_DIGITISH = re.compile(rf"\d|\b(?:{'|'.join(_DIGIT_WORDS)})\b", re.IGNORECASE)


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn checksum card numbers carry."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    digits: str
    weak: bool  # a homophone ("to", "for"): a digit only between other digits


def _tokens(text: str) -> list[_Token]:
    found = []
    for m in _TOKEN.finditer(text):
        if m.group("num") is not None:
            found.append(_Token(m.start(), m.end(), m.group("num"), False))
            continue
        word = m.group("word").lower()
        weak = word in _WEAK_WORDS
        digit = word if word.isdigit() else _DIGIT_WORDS.get(word) or _WEAK_WORDS[word]
        rep = m.group("rep")
        found.append(
            _Token(m.start(), m.end(), digit * (_REPEAT[rep.lower()] if rep else 1), weak and not rep)
        )
    return found


def _chains(text: str, tokens: list[_Token]) -> list[list[_Token]]:
    """Tokens joined only by separators, with homophones trimmed from both ends."""
    chains: list[list[_Token]] = []
    current: list[_Token] = []
    for tok in tokens:
        if current and not _SEPARATOR.fullmatch(text, current[-1].end, tok.start):
            chains.append(current)
            current = []
        current.append(tok)
    if current:
        chains.append(current)
    trimmed = []
    for chain in chains:
        lo, hi = 0, len(chain)
        while lo < hi and chain[lo].weak:
            lo += 1
        while hi > lo and chain[hi - 1].weak:
            hi -= 1
        if hi > lo:
            trimmed.append(chain[lo:hi])
    return trimmed


def _card_shaped(window: Sequence[_Token]) -> bool:
    if len(window) == 1:
        return True
    sizes = tuple(len(t.digits) for t in window)
    return max(sizes) <= 4 or sizes in _CARD_SHAPES


class Redactor:
    """Replaces card numbers and configured patterns in text.

    Args:
        patterns: extra ``(name, regex)`` pairs; a match becomes ``[redacted NAME]``. Names are
            letters, digits, spaces, ``_`` and ``-``.
        cards: redact card numbers (see the module docstring for what counts as one).
        ssn: redact US social security numbers (see the module docstring).
        strict: the log rules too (see :meth:`for_logs`).
        card_context: also redact 13+ digit chains that fail Luhn when a card word comes just
            before them (speech recognizers drop or swap digits).
        keep_last_four: write ``[card ending 1111]`` instead of ``[redacted card]``.

    Raises:
        ValueError: a pattern is not a valid regular expression, or a name is unusable.
    """

    def __init__(
        self,
        patterns: Sequence[tuple[str, str]] = (),
        *,
        cards: bool = True,
        card_context: bool = True,
        keep_last_four: bool = False,
        ssn: bool = True,
        strict: bool = False,
    ) -> None:
        self.cards = cards
        self.ssn = ssn
        self.strict = strict
        self.card_context = card_context
        self.keep_last_four = keep_last_four
        compiled = []
        for name, regex in patterns:
            if not _NAME.match(name):
                raise ValueError(
                    f"redaction pattern name {name!r} must be letters, digits, spaces, '_' or '-' (up to 40)"
                )
            try:
                compiled.append((re.compile(regex), f"[redacted {name}]"))
            except re.error as e:
                raise ValueError(f"redaction pattern {name!r} is not a valid regular expression: {e}") from e
        self._patterns = tuple(compiled)
        self._source = (tuple(patterns), cards, card_context, keep_last_four, ssn)

    def for_logs(self) -> Redactor:
        """This redactor with the stricter log rules: 8+ digits in groups of at most four, and a
        code or date right after a security-code or expiry word, are redacted too."""
        patterns, cards, card_context, keep_last_four, ssn = self._source
        return Redactor(
            patterns,
            cards=cards,
            card_context=card_context,
            keep_last_four=keep_last_four,
            ssn=ssn,
            strict=True,
        )

    @property
    def active(self) -> bool:
        """Whether this redactor can change anything at all."""
        return self.cards or self.ssn or bool(self._patterns)

    def redact(self, text: str) -> str:
        """``text`` with card numbers, SSNs and pattern matches replaced (the same object if none)."""
        if self.cards and _HAS_DIGITISH.search(text):
            text = self._redact_cards(text)
        if self.ssn and _HAS_DIGITISH.search(text):
            text = _redact_ssn(text)
        if self.strict and self.cards and _HAS_DIGITISH.search(text):
            text = _redact_strict(text)
        for pattern, marker in self._patterns:
            text = pattern.sub(marker, text)  # names hold no backslashes: a literal replacement
        return text

    def redact_obj(self, obj: Any) -> Any:
        """Redact every string inside dicts, lists and tuples (keys are kept as they are).

        An integer that is a Luhn-valid 13-19 digit number becomes the card marker. Other
        values are returned unchanged; containers are copied only where something changed.
        """
        if isinstance(obj, str):
            return self.redact(obj)
        if isinstance(obj, dict):
            out = {k: self.redact_obj(v) for k, v in obj.items()}
            return obj if all(out[k] is v for k, v in obj.items()) else out
        if isinstance(obj, (list, tuple)):
            items = [self.redact_obj(v) for v in obj]
            if all(a is b for a, b in zip(items, obj, strict=True)):
                return obj
            if isinstance(obj, list):
                return items
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)  # a namedtuple takes fields
        if self.cards and isinstance(obj, int) and not isinstance(obj, bool) and obj > 0:
            digits = str(obj)
            if _MIN_CARD <= len(digits) <= _MAX_CARD and luhn_valid(digits):
                return self._marker(digits)
        return obj

    def _marker(self, digits: str) -> str:
        return f"[card ending {digits[-4:]}]" if self.keep_last_four else CARD_MARKER

    def _redact_cards(self, text: str) -> str:
        spans = [span for chain in _chains(text, _tokens(text)) if (span := self._card_span(text, chain))]
        if not spans:
            return text
        out, pos = [], 0
        for start, end, digits in spans:
            out.append(text[pos:start])
            out.append(self._marker(digits))
            pos = end
        out.append(text[pos:])
        return "".join(out)

    def _card_span(self, text: str, chain: list[_Token]) -> tuple[int, int, str] | None:
        """``(start, end, card digits)`` of the chain when it holds a card."""
        if sum(len(t.digits) for t in chain) < _MIN_CARD:
            return None
        if self.card_context and _CARD_WORD.search(
            text, max(0, chain[0].start - _CONTEXT_CHARS), chain[0].start
        ):
            return chain[0].start, chain[-1].end, "".join(t.digits for t in chain)
        # A card found anywhere in the chain takes the whole chain with it: what is read out
        # next to a card number is its expiry date and security code, or an order number that
        # happens to be glued to it; redacting a window alone could leave digits of the card.
        for i in range(len(chain)):
            digits = ""
            for j in range(i, len(chain)):
                digits += chain[j].digits
                if len(digits) > _MAX_CARD:
                    break
                if len(digits) >= _MIN_CARD and _card_shaped(chain[i : j + 1]) and luhn_valid(digits):
                    return chain[0].start, chain[-1].end, digits
        return None


def _redact_strict(text: str) -> str:
    spans = []
    for chain in _chains(text, _tokens(text)):
        digits = sum(len(t.digits) for t in chain)
        start = chain[0].start
        if digits >= _LOG_MIN_RUN and max(len(t.digits) for t in chain) <= 4:
            spans.append((start, chain[-1].end, CARD_MARKER))
        elif 3 <= digits <= 4 and CVV_WORD.search(text, max(0, start - 30), start):
            spans.append((start, chain[-1].end, CVV_MARKER))
        elif 4 <= digits <= 6 and EXPIRY_WORD.search(text, max(0, start - 20), start):
            spans.append((start, chain[-1].end, EXPIRY_MARKER))
    for start, end, marker in reversed(spans):
        text = text[:start] + marker + text[end:]
    return text


def _redact_ssn(text: str) -> str:
    text = _SSN_GROUPED.sub(SSN_MARKER, text)
    if not _SSN_WORD.search(text):
        return text
    spans = [
        (chain[0].start, chain[-1].end)
        for chain in _chains(text, _tokens(text))
        if sum(len(t.digits) for t in chain) == 9
        and _SSN_WORD.search(text, max(0, chain[0].start - _SSN_CONTEXT_CHARS), chain[0].start)
    ]
    for start, end in reversed(spans):
        text = text[:start] + SSN_MARKER + text[end:]
    return text


_DEFAULT = Redactor(DEFAULT_PATTERNS)


def redact(text: str) -> str:
    """Redact ``text`` with the default rules (cards and :data:`DEFAULT_PATTERNS`).

    For code without a configured :class:`Redactor` at hand, e.g. an LLM engine cleaning a tool
    result before it enters the model's context. Prefer the injected redactor where there is one:
    it carries the deployment's own patterns.
    """
    return _DEFAULT.redact(text)


def redact_obj(obj: Any) -> Any:
    """:meth:`Redactor.redact_obj` with the default rules; see :func:`redact`."""
    return _DEFAULT.redact_obj(obj)


# ---- logging ------------------------------------------------------------------------------------------
_WITHHELD = "[log message withheld: its arguments held redacted content]"
_PLAIN = (str, int, float, bool, type(None))
_REPR_LIMIT = 100_000


def _objects_hold_secrets(redactor: Redactor, args: Mapping[str, Any] | tuple[Any, ...]) -> bool:
    """Whether a non-plain log argument (an object, bytes) shows something to redact in its repr."""
    values = args.values() if isinstance(args, Mapping) else args
    for value in values:
        if isinstance(value, _PLAIN):
            continue
        try:
            text = repr(value)[:_REPR_LIMIT]
        except Exception:
            continue
        if redactor.redact(text) != text:
            return True
    return False


_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_EXC_FORMATTER = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Redacts a log record in place: message, arguments, ``extra`` fields, exception text.

    String arguments are redacted one by one, so formatters that read ``record.args`` (uvicorn's
    access log) keep working; if the formatted message still holds something to redact (a card
    split over two arguments, or passed as a number), the record is collapsed to the redacted
    message. An object argument whose ``repr`` holds a card (a websocket frame, whose ``str``
    shows only a cut-off part of it) has its message withheld. Never drops a record.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor.for_logs()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._redact(record)
        except Exception:  # a log call must never fail, nor leak what could not be checked
            record.msg, record.args, record.exc_info, record.exc_text = (
                "[log message withheld: redaction failed]",
                (),
                None,
                None,
            )
        return True

    def _redact(self, record: logging.LogRecord) -> None:
        r = self.redactor
        if isinstance(record.msg, str):
            record.msg = r.redact(record.msg)
        if record.args:
            if isinstance(record.args, Mapping):
                record.args = {k: r.redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
            else:
                record.args = tuple(r.redact(a) if isinstance(a, str) else a for a in record.args)
            if _objects_hold_secrets(r, record.args):
                # e.g. a websocket frame whose str() shows "4111-1111-1..." and whose bytes hold
                # the whole card: no pattern finds a cut-off card, so the message is withheld.
                record.msg, record.args = _WITHHELD, ()
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it itself
            message = None
        if message is not None:
            clean = r.redact(message)
            if clean != message:
                record.msg, record.args = clean, ()
        for key in [k for k in record.__dict__ if k not in _RECORD_ATTRS]:
            value = record.__dict__[key]
            if isinstance(value, (str, dict, list, tuple)):
                record.__dict__[key] = r.redact_obj(value)
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = _EXC_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = r.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = r.redact(record.stack_info)


def install_log_redaction(redactor: Redactor, *, loggers: Sequence[logging.Logger] | None = None) -> int:
    """Put a :class:`RedactingFilter` on every handler of the root logger and of every logger
    that has its own handlers (uvicorn's access and error logs), replacing an earlier one.

    Handler filters, not logger filters: a logger's filter does not see records that propagate
    to it from child loggers. Call it after logging is configured; handlers added later are not
    covered.

    Returns:
        How many handlers now redact.
    """
    if loggers is None:
        named = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
        loggers = [logging.getLogger(), *named]
    handlers = {id(h): h for lg in loggers for h in lg.handlers}
    for handler in handlers.values():
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        if redactor.active:
            handler.addFilter(RedactingFilter(redactor))
    return len(handlers) if redactor.active else 0
