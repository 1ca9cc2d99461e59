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
    assert Redactor(cards=False).active  # SSNs are still redacted
    assert not Redactor(cards=False, ssn=False).active
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
        assert install_log_redaction(Redactor(cards=False, ssn=False), loggers=[logger]) == 0
        assert not [f for f in handler.filters if isinstance(f, RedactingFilter)]
    finally:
        logger.handlers = []


# ---- SSNs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("it's 123-45-6789", "it's [redacted ssn]"),
        ("it's 123 45 6789.", "it's [redacted ssn]."),
        ("my ssn is 123456789", "my ssn is [redacted ssn]"),
        ("social security number: 123456789", "social security number: [redacted ssn]"),
        ("my social is one two three four five six seven eight nine", "my social is [redacted ssn]"),
    ],
)
def test_ssns_are_redacted_with_dashes_spaces_or_no_separators_after_an_ssn_word(
    text: str, expected: str
) -> None:
    assert Redactor().redact(text) == expected


def test_nine_digits_without_an_ssn_word_and_phone_numbers_are_not_ssns() -> None:
    r = Redactor()
    for text in ("order 123456789", "call me on 555 010 0001", "555-123-4567", "tracking 123 456 789"):
        assert r.redact(text) == text


# ---- across turns ---------------------------------------------------------------------------------------

from pipeline.turn_redaction import CVV_MARKER, EXPIRY_MARKER, TurnRedactor, replace_span  # noqa: E402


class Conversation:
    """Customer texts through a :class:`TurnRedactor` as the service runs it: what is stored."""

    def __init__(self) -> None:
        self.tr = TurnRedactor(Redactor(DEFAULT_PATTERNS))
        self.memory: dict[str, object] = {}
        self.stored: list[str] = []
        self.awaiting: str | None = None

    def customer(self, text: str) -> str:
        result = self.tr.inbound(text, self.memory, seq=len(self.stored) + 1, awaiting=self.awaiting)
        self.stored.append(result.text)
        for seq, start, end in result.earlier:
            self.stored[seq - 1] = replace_span(self.stored[seq - 1], start, end)
        self.memory = result.memory
        return result.text

    def bot(self, text: str) -> None:
        self.memory = self.tr.outbound([text], self.memory)


def test_a_card_typed_over_two_messages_is_redacted_in_both_without_any_card_word() -> None:
    c = Conversation()
    c.customer("4111 1111")
    c.customer("1111 1111")
    assert c.stored == [CARD_MARKER, CARD_MARKER]


def test_four_turns_of_four_digits_redact_the_first_one_as_soon_as_the_second_comes() -> None:
    c = Conversation()
    assert c.customer("4532") == "4532"  # alone it is an order number
    c.customer("0151")
    assert c.stored == [CARD_MARKER, CARD_MARKER]  # the first message is rewritten
    c.customer("1283")
    c.customer("0366")
    assert c.stored == [CARD_MARKER] * 4


def test_a_card_spoken_in_words_over_two_voice_turns_is_redacted_in_both() -> None:
    c = Conversation()
    c.customer("four five three two zero one five one")
    c.customer("one two eight three, zero three six six.")
    assert c.stored == [CARD_MARKER, CARD_MARKER + "."]


def test_turns_that_join_into_a_luhn_valid_card_are_all_redacted_however_grouped() -> None:
    c = Conversation()
    c.customer("45")  # too short for anything
    c.customer("320151128")
    c.customer("30366")
    assert digits(" ".join(c.stored)) == ""


def test_a_payment_context_redacts_the_first_fragment_of_a_card_at_once() -> None:
    c = Conversation()
    assert c.customer("I'd like to pay with my visa") == "I'd like to pay with my visa"
    assert c.customer("4532") == CARD_MARKER
    assert c.customer("0151 1283") == CARD_MARKER
    c = Conversation()
    assert c.customer("my card is 4532 0151") == f"my card is {CARD_MARKER}"


def test_the_bot_asking_for_card_details_opens_a_payment_context() -> None:
    c = Conversation()
    c.customer("I want to update my payment")
    c.bot("Sure. What's the card number?")
    assert c.customer("4532") == CARD_MARKER


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the cvv is 737", f"the cvv is {CVV_MARKER}"),
        ("security code seven three seven", f"security code {CVV_MARKER}"),
        ("CVC: 1234", f"CVC: {CVV_MARKER}"),
        ("exp 12/27", f"exp {EXPIRY_MARKER}"),
        ("it expires december twenty seven", f"it expires {EXPIRY_MARKER}"),
        ("expiry 12 27", f"expiry {EXPIRY_MARKER}"),
    ],
)
def test_security_codes_and_expiry_dates_said_with_their_words_are_redacted(text: str, expected: str) -> None:
    assert Conversation().customer(text) == expected


def test_a_bare_code_or_expiry_right_after_card_details_is_redacted() -> None:
    c = Conversation()
    c.customer("my card is 4532 0151 1283 0366")
    assert c.customer("12 27") == EXPIRY_MARKER
    c.bot("And the security code on the back?")
    assert c.customer("737") == CVV_MARKER
    c = Conversation()
    c.bot("What's the expiry date on the card?")
    assert c.customer("one two two seven") == EXPIRY_MARKER


def test_an_order_number_outside_a_payment_context_is_kept() -> None:
    c = Conversation()
    assert c.customer("4517") == "4517"
    assert c.customer("where is order 4517?") == "where is order 4517?"
    assert c.customer("it is 4517 or 4518, not sure") == "it is 4517 or 4518, not sure"
    assert c.customer("12 27") == "12 27"


def test_an_order_number_in_a_payment_context_is_kept_when_it_says_so() -> None:
    c = Conversation()
    c.customer("I paid with my visa")
    assert c.customer("refund order 4517 please") == "refund order 4517 please"
    assert c.customer("it was $125 or 125 dollars") == "it was $125 or 125 dollars"
    c.awaiting = "order_number"
    assert c.customer("4518") == "4518"


def test_a_phone_number_given_to_identify_is_not_eaten_even_after_card_talk() -> None:
    c = Conversation()
    c.customer("my card got declined")
    assert c.customer("my number is 555 010 0001") == "my number is 555 010 0001"
    c = Conversation()
    c.awaiting = "identify"
    assert c.customer("5550100001") == "5550100001"
    assert c.customer("five five five zero one zero zero zero zero one") == (
        "five five five zero one zero zero zero zero one"
    )


def test_a_payment_context_closes_after_a_few_turns_without_payment_talk() -> None:
    c = Conversation()
    c.customer("is my credit card on file?")
    for text in ("ok", "thanks", "anything else?"):
        c.customer(text)
    assert c.customer("4517") == "4517"


def test_the_memory_kept_in_the_state_holds_no_digits_of_the_card() -> None:
    import json

    c = Conversation()
    c.customer("4532 0151")
    c.customer("12")
    stored = json.dumps(c.memory)
    assert "4532" not in stored and "0151" not in stored and "45320151" not in stored
    assert all(not isinstance(v, str) for f in c.memory["fragments"] for v in f.values())  # type: ignore[attr-defined]


def digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


# ---- in the conversation service ------------------------------------------------------------------------


def _service(*orders: object) -> tuple[object, object, object]:
    from datetime import UTC, datetime

    from pipeline.clock import FakeClock
    from pipeline.model import Customer
    from pipeline.service import ConversationService
    from pipeline.turn_manager import TurnManager
    from tests.unit.fakes import FakeBusiness, FakeConversationStore, KeywordClassifier, load_intents

    ana = Customer(ref="C1", name="Ana Souza", phone="+15551230000", whatsapp_id="+15551230000")
    business = FakeBusiness([ana], list(orders))
    store = FakeConversationStore()
    tm = TurnManager(KeywordClassifier(), business, load_intents())
    clock = FakeClock(datetime(2026, 3, 20, 15, 0, tzinfo=UTC))
    return (
        ConversationService(store, tm, business, clock, redactor=Redactor(DEFAULT_PATTERNS)),
        store,
        business,
    )


async def test_the_service_rewrites_an_earlier_stored_fragment_and_the_model_history_in_the_same_turn() -> (
    None
):
    from pipeline.model import Channel

    service, store, _ = _service()
    await service.handle_text(Channel.WEBCHAT, "web-1", "4532")  # type: ignore[attr-defined]
    conv = store.conversations[(Channel.WEBCHAT, "web-1")]  # type: ignore[attr-defined]
    assert [m.body for m in conv.messages if m.sender == "customer"] == ["4532"]

    await service.handle_text(Channel.WEBCHAT, "web-1", "0151 1283 0366")  # type: ignore[attr-defined]

    conv = store.conversations[(Channel.WEBCHAT, "web-1")]  # type: ignore[attr-defined]
    assert [m.body for m in conv.messages if m.sender == "customer"] == [CARD_MARKER, CARD_MARKER]
    assert [h["content"] for h in conv.state["history"] if h["role"] == "user"] == [CARD_MARKER, CARD_MARKER]
    assert "4532" not in str(conv.state["redaction"])


async def test_order_4517_still_works_in_the_embedded_refund_flow_after_card_talk() -> None:
    from datetime import UTC, datetime

    from pipeline.model import Channel, Customer, OrderStatus
    from tests.unit.fakes import make_order

    ana = Customer(ref="C1", name="Ana Souza", phone="+15551230000", whatsapp_id="+15551230000")
    now = datetime(2026, 3, 20, 15, 0, tzinfo=UTC)
    headphones = make_order(
        "4517",
        ana,
        ("Wireless headphones", 12900),
        status=OrderStatus.DELIVERED,
        placed_at=now,
        delivered_at=now,
    )
    service, store, business = _service(headphones)
    phone = "+15551230000"
    await service.handle_text(Channel.WHATSAPP, phone, "I paid with my visa card", channel_signed=True)  # type: ignore[attr-defined]
    offer = await service.handle_text(Channel.WHATSAPP, phone, "refund order 4517", channel_signed=True)  # type: ignore[attr-defined]
    assert "Order 4517" in offer.texts[0]
    await service.handle_text(Channel.WHATSAPP, phone, "yes", channel_signed=True)  # type: ignore[attr-defined]
    assert list(business.refunds) == ["4517"]  # type: ignore[attr-defined]
    conv = store.conversations[(Channel.WHATSAPP, phone)]  # type: ignore[attr-defined]
    assert "refund order 4517" in [m.body for m in conv.messages]


def test_log_records_redact_half_a_card_and_a_code_after_its_word_which_a_transcript_cannot() -> None:
    record = logging.LogRecord(
        "x", logging.DEBUG, "", 0, "< TEXT %s", ('{"text": "4111 1111", "then": "cvv 904"}',), None
    )
    RedactingFilter(Redactor()).filter(record)
    assert record.getMessage() == '< TEXT {"text": "[redacted card]", "then": "cvv [redacted cvv]"}'
    assert Redactor().redact("4111 1111") == "4111 1111"  # a transcript needs the conversation for that
