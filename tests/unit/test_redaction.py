"""Card numbers and configured patterns are redacted; order numbers, phones, dates and amounts are not."""

from __future__ import annotations

import io
import logging
from collections import namedtuple

import pytest

from pipeline.redaction import (
    CARD_MARKER,
    DEFAULT_PATTERNS,
    RedactingFilter,
    Redactor,
    install_log_redaction,
    luhn_valid,
    redact,
    redact_obj,
)

VISA = "4111111111111111"
VISA_2 = "4532015112830366"
AMEX = "378282246310005"


@pytest.fixture
def redactor() -> Redactor:
    return Redactor(DEFAULT_PATTERNS)


def test_luhn_accepts_test_cards_and_refuses_a_changed_digit() -> None:
    for card in (VISA, VISA_2, AMEX, "5555555555554444", "6011111111111117", "4222222222222"):
        assert luhn_valid(card), card
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("1234567890123456")


@pytest.mark.parametrize(
    "text",
    [
        "my card is 4111 1111 1111 1111 please charge it",
        "my card is 4111-1111-1111-1111 please charge it",
        "my card is 4111111111111111 please charge it",
        "pay with 4111 1111 1111 1111",
        "charge 4532, 0151, 1283, 0366.",  # Whisper's punctuation of read-out digit groups
        "it is 4,532, 0,1,51, 1,283, 0,3,6,6 ok",  # Whisper's thousands commas
        "4532.0151.1283.0366",
        "3782 822463 10005",  # Amex as printed
        "four five three two zero one five one one two eight three zero three six six",
        "Four five three two, oh one five one, one two eight three, oh three six six.",
        "4 5 3 2 0 1 5 1 1 2 8 3 0 3 6 6",
        "4 five 3 two 0 one 5 one 1 two 8 three 0 three 6 six",  # digits and words mixed
        "four five three two oh one five double one two eight three oh three double six",
        "4532 0151 1283 0366 and that's it",
        # what Whisper tiny.en wrote on real simulated calls for "4 5 3 2, 0 1 5 1, 1 2 8 3, 0 3 6 6"
        "My card number in 4532, 0 1 5 1 1 2 8 3 0 3 6 6",
        "My card number in 4532, 0 1, 51, 1283, 0 3, 6, 6.",
    ],
)
def test_card_numbers_in_every_written_and_spoken_form_are_redacted(redactor: Redactor, text: str) -> None:
    out = redactor.redact(text)
    assert CARD_MARKER in out
    digits = "".join(c for c in out if c.isdigit())
    assert "1111" not in digits and "0366" not in digits, out


def test_the_words_around_a_card_are_kept(redactor: Redactor) -> None:
    assert redactor.redact("my card is 4111 1111 1111 1111 please charge it") == (
        "my card is [redacted card] please charge it"
    )
    assert redactor.redact("Card: 4111-1111-1111-1111.") == "Card: [redacted card]."
    assert (
        redactor.redact("a 4111111111111111 b 4532015112830366 c") == "a [redacted card] b [redacted card] c"
    )


def test_expiry_and_security_code_read_right_after_the_card_go_with_it(redactor: Redactor) -> None:
    assert redactor.redact("it's 4111 1111 1111 1111, 12 27, 123 thanks") == "it's [redacted card] thanks"


@pytest.mark.parametrize(
    "text",
    [
        "where is order 4517?",
        "my phone is +15551234567",
        "call me on 555-123-4567 or (555) 123 4567",
        "order 4517 and my phone is +15551234567",
        "order 4517 5551234567",  # an order number followed by a ten-digit phone number
        "order 451789, phone 5551234567",
        "orders 451789, 451790, 451791 and 451792",  # a list of order numbers
        "reference 1234 5678 9012 3456",  # 16 digits that fail Luhn
        "1234567890123456",
        "it was delivered on 2026-11-22 at 03:24, and cost $1,234.56",
        "I paid 12.50 on 11/22/2026",
        "tracking 1Z999AA10123456784 and call CA0123456789012345678901234567890a",
        "refund TX-4111111111111111 and RF-4532015112830366",  # provider ids, not cards
        "I have one question and two orders, four items in total",
        "oh no, not again",
        "+1 555 123 4567",
    ],
)
def test_numbers_that_are_not_cards_are_left_alone(redactor: Redactor, text: str) -> None:
    assert redactor.redact(text) == text


def test_a_near_card_after_a_card_word_is_redacted_even_when_luhn_fails(redactor: Redactor) -> None:
    # Whisper dropped a digit of "4532 0151 1283 0366": the checksum fails, the card word decides.
    assert (
        redactor.redact("My card number in 4.532, 0.1.51283, 0.366.") == "My card number in [redacted card]."
    )
    assert redactor.redact("my visa is 1234 5678 9012 3456") == "my visa is [redacted card]"
    assert redactor.redact("my card is 1234 5678 9012 3456") == "my card is [redacted card]"
    assert redactor.redact("order 1234 5678 9012 3456") == "order 1234 5678 9012 3456"
    # short numbers after a card word stay: "card ending 4242", a gift card order
    assert redactor.redact("my card ending 4242 was charged for order 451789") == (
        "my card ending 4242 was charged for order 451789"
    )
    strict = Redactor(card_context=False)
    assert strict.redact("my visa is 1234 5678 9012 3456") == "my visa is 1234 5678 9012 3456"


def test_homophones_count_as_digits_only_between_digits(redactor: Redactor) -> None:
    assert redactor.redact("4.5-3 to 0.15-1 to 0.8-3-0-3-6-6") == CARD_MARKER
    assert redactor.redact("I went to 4 shops for 2 hours") == "I went to 4 shops for 2 hours"


def test_configured_patterns_get_their_own_marker() -> None:
    r = Redactor([("ssn", r"\b\d{3}-\d{2}-\d{4}\b"), ("iban", r"\bDE\d{20}\b")])
    assert (
        r.redact("ssn 123-45-6789, iban DE89370400440532013000") == "ssn [redacted ssn], iban [redacted iban]"
    )
    assert r.redact("order 123-456-7890") == "order 123-456-7890"


def test_cards_can_be_turned_off_and_the_last_four_kept_on_request() -> None:
    assert Redactor(cards=False).redact("4111 1111 1111 1111") == "4111 1111 1111 1111"
    assert not Redactor(cards=False).active
    assert Redactor(keep_last_four=True).redact("card 4532015112830366") == "card [card ending 0366]"


def test_a_bad_pattern_is_refused_at_construction_with_its_name() -> None:
    with pytest.raises(ValueError, match="'broken' is not a valid regular expression"):
        Redactor([("broken", "(")])
    with pytest.raises(ValueError, match="name"):
        Redactor([("no]brackets", "x")])


def test_redaction_is_idempotent_and_returns_clean_text_unchanged(redactor: Redactor) -> None:
    once = redactor.redact("card 4111 1111 1111 1111 and ssn 123-45-6789")
    assert redactor.redact(once) == once
    clean = "where is my order 4517?"
    assert redactor.redact(clean) is clean


def test_redact_obj_walks_dicts_lists_and_tuples_and_keeps_other_values(redactor: Redactor) -> None:
    Point = namedtuple("Point", "a b")
    payload = {
        "text": "card 4111 1111 1111 1111",
        "nested": [{"note": "ssn 123-45-6789"}, ("4532015112830366", 7)],
        "number": 4111111111111111,
        "order": 451789,
        "flag": True,
        "none": None,
        "point": Point("4111111111111111", 1),
    }
    out = redactor.redact_obj(payload)
    assert out == {
        "text": "card [redacted card]",
        "nested": [{"note": "ssn [redacted ssn]"}, (CARD_MARKER, 7)],
        "number": CARD_MARKER,
        "order": 451789,
        "flag": True,
        "none": None,
        "point": Point(CARD_MARKER, 1),
    }
    assert payload["text"] == "card 4111 1111 1111 1111"  # the input is not changed
    clean = {"order": "451789", "items": [1, 2]}
    assert redactor.redact_obj(clean) is clean


def test_module_helpers_use_the_default_rules() -> None:
    assert redact("card 4111111111111111, ssn 123-45-6789") == "card [redacted card], ssn [redacted ssn]"
    assert redact_obj({"result": ["4111 1111 1111 1111"]}) == {"result": [CARD_MARKER]}


def _logger_with_stream(redactor: Redactor) -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s %(detail)s"))
    handler.addFilter(RedactingFilter(redactor))
    logger = logging.getLogger("closeloop.test_redaction")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers = [handler]
    return logger, stream, handler


def test_log_filter_redacts_message_args_extra_fields_and_exceptions(redactor: Redactor) -> None:
    logger, stream, _ = _logger_with_stream(redactor)
    logger.info(
        "customer wrote %s", "card 4111 1111 1111 1111", extra={"detail": {"body": "ssn 123-45-6789"}}
    )
    logger.info("split %s %s", "4111 1111", "1111 1111", extra={"detail": "-"})
    logger.info("as a number %d", 4111111111111111, extra={"detail": "-"})
    try:
        raise ValueError("bad card 4111-1111-1111-1111")
    except ValueError:
        logger.exception("failed", extra={"detail": "-"})
    out = stream.getvalue()
    assert "1111" not in out and "123-45" not in out, out
    assert "customer wrote card [redacted card] {'body': 'ssn [redacted ssn]'}" in out
    assert "split [redacted card]" in out
    assert "ValueError: bad card [redacted card]" in out


def test_log_filter_keeps_args_for_formatters_that_read_them(redactor: Redactor) -> None:
    # uvicorn's access formatter unpacks record.args: redacting one string arg must keep the tuple.
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/api/search?q=4111111111111111", "1.1", 200),
        None,
    )
    assert RedactingFilter(redactor).filter(record)
    assert record.args == ("127.0.0.1:5000", "GET", "/api/search?q=[redacted card]", "1.1", 200)


def test_an_object_argument_holding_a_card_withholds_the_message(redactor: Redactor) -> None:
    class Frame:  # like a websocket frame: str() cuts the payload off, repr() holds all of it
        data = b'{"text": "card 4111-1111-1111-1111 ok"}'

        def __str__(self) -> str:
            return 'TEXT \'{"text": "card 4111-1111-1...\' [40 bytes]'

        def __repr__(self) -> str:
            return f"Frame(data={self.data!r})"

    record = logging.LogRecord("websockets.client", logging.DEBUG, "", 0, "> %s", (Frame(),), None)
    RedactingFilter(redactor).filter(record)
    assert "4111" not in record.getMessage() and record.args == ()
    harmless = logging.LogRecord("x", logging.DEBUG, "", 0, "> %s", (Frame.__mro__,), None)
    RedactingFilter(redactor).filter(harmless)
    assert harmless.args == (Frame.__mro__,)


def test_install_puts_one_filter_on_each_handler_and_replaces_an_earlier_one() -> None:
    logger = logging.getLogger("closeloop.test_install")
    handler = logging.StreamHandler(io.StringIO())
    logger.handlers = [handler]
    try:
        assert install_log_redaction(Redactor(), loggers=[logger]) == 1
        assert install_log_redaction(Redactor(DEFAULT_PATTERNS), loggers=[logger]) == 1
        filters = [f for f in handler.filters if isinstance(f, RedactingFilter)]
        assert len(filters) == 1
        assert install_log_redaction(Redactor(cards=False), loggers=[logger]) == 0
        assert not [f for f in handler.filters if isinstance(f, RedactingFilter)]
    finally:
        logger.handlers = []
