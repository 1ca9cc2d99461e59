"""Slot extraction from typed and transcribed utterances."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline.model import Slots
from pipeline.slots import extract_slots, words_to_digits

# A Thursday afternoon.
NOW = datetime(2026, 11, 5, 15, 0, tzinfo=UTC)


def slots(text: str) -> Slots:
    return extract_slots(text, now=NOW)


# --------------------------------------------------------------------------------------
# words_to_digits


@pytest.mark.parametrize(
    ("spoken", "digits"),
    [
        ("four five one seven", "4517"),
        ("four oh five one", "4051"),
        ("four zero five one", "4051"),
        ("forty five seventeen", "4517"),
        ("forty-five seventeen", "4517"),
        ("Four, five, one, seven.", "4517."),
        ("double five two", "552"),
        ("triple seven", "777"),
        ("two hundred and fifty", "250"),
        ("one thousand two hundred and five", "1205"),
        ("twenty twenty six", "2026"),
        ("order four five one seven please", "order 4517 please"),
        ("five five five, zero one zero, zero zero zero one", "5550100001"),
    ],
)
def test_words_to_digits_reads_spoken_numbers(spoken: str, digits: str) -> None:
    assert words_to_digits(spoken) == digits


@pytest.mark.parametrize(
    "text",
    [
        "the second one",
        "oh I see",
        "I have one question",
        "no one answered",
        "ten",
        "I was double charged",
        "a hundred",
    ],
)
def test_words_to_digits_leaves_single_number_words_and_interjections(text: str) -> None:
    assert words_to_digits(text) == text


def test_words_to_digits_keeps_an_interjection_oh_next_to_a_number() -> None:
    assert words_to_digits("oh four five one seven") == "oh 4517"
    assert words_to_digits("it was one oh I forget") == "it was one oh I forget"


def test_words_to_digits_converts_single_words_when_asked() -> None:
    assert words_to_digits("five dollars", min_words=1) == "5 dollars"
    assert words_to_digits("a hundred dollars", min_words=1) == "100 dollars"


def test_words_to_digits_keeps_separate_cardinals_apart() -> None:
    assert words_to_digits("two hundred, three hundred") == "200, 300"
    assert words_to_digits("four five and six seven") == "45 and 67"


# --------------------------------------------------------------------------------------
# order numbers


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("order 4517", "4517"),
        ("#4517", "4517"),
        ("it's 4517", "4517"),
        ("4517", "4517"),
        ("my order number is 10293845", "10293845"),
        ("order no. 123", "123"),
        ("where's order #88213?", "88213"),
        ("four five one seven", "4517"),
        ("um it's four oh five one", "4051"),
        ("order number four zero zero seven", "4007"),
        ("forty five seventeen", "4517"),
        ("I paid $25 for order 4517 on Nov 3", "4517"),
        ("refund 25 dollars on order 88213", "88213"),
        ("call me on 555-010-0001 about order 4517", "4517"),
        ("I have 3 items in order 4517", "4517"),
    ],
)
def test_order_numbers_are_found(text: str, number: str) -> None:
    assert slots(text).order_number == number


def test_a_cued_order_number_wins_over_an_earlier_bare_number() -> None:
    assert slots("I got 250 points but order 4517 is late").order_number == "4517"


@pytest.mark.parametrize(
    "text",
    [
        "+1 555 010 0001",
        "555-010-0001",
        "(555) 010-0001",
        "5550100001",
        "call me at five five five zero one zero zero zero zero one",
        "+44 20 7946 0958",
        "$25",
        "$4517",
        "25 dollars",
        "€300",
        "four hundred dollars",
        "2026-11-03",
        "Nov 3, 2026",
        "11/03/2026",
        "at 10:30",
        "at 1030 am",
        "I waited 120 days",
        "it's been 100 hours",
        "back in 2024",
        "1.500",
        "12",
        "my postcode is 12345678901",
        "no one answered",
        "my zip is 90210",
        "the card ending in 4242",
        "my number is 555-0100",
        "extension 2345",
        "25$",
    ],
)
def test_phones_amounts_dates_and_quantities_are_not_order_numbers(text: str) -> None:
    assert slots(text).order_number is None


def test_a_number_longer_than_eight_digits_is_not_an_order_number() -> None:
    assert slots("order 123456789").order_number is None


# --------------------------------------------------------------------------------------
# yes / no


@pytest.mark.parametrize(
    "text",
    [
        "yes",
        "Yes.",
        "yeah",
        "yep",
        "yup",
        "sure",
        "sure thing",
        "please do",
        "go ahead",
        "correct",
        "that's right",
        "that\u2019s right",
        "ok do it",
        "okay",
        "yes please",
        "please",
        "absolutely",
        "of course",
        "yeah go for it",
        "yes, no problem",
        "sounds good",
        "uh yeah that's correct",
        "I don't mind",
        "sure, why not",
        "yes don't worry about it",
        "fine",
        "right",
        "uh-huh",
        "mm-hmm",
        "yesss",
        "k",
    ],
)
def test_yes_phrases_confirm(text: str) -> None:
    assert slots(text).confirmation is True


@pytest.mark.parametrize(
    "text",
    [
        "no",
        "No.",
        "nope",
        "don't",
        "please don't",
        "cancel that",
        "not now",
        "stop",
        "no, I want a refund",
        "no thanks",
        "nah",
        "of course not",
        "absolutely not",
        "that's wrong",
        "that's not right",
        "never mind",
        "not yet",
        "hold on",
        "nooo",
        "no no no",
    ],
)
def test_no_phrases_decline(text: str) -> None:
    assert slots(text).confirmation is False


@pytest.mark.parametrize(
    "text",
    [
        "I don't know",
        "i dont know",
        "I'm not sure",
        "maybe",
        "no idea",
        "where is my order",
        "I want a refund for order 4517",
        "yes... actually no",
        "make sure it arrives by friday",
        "please cancel order 4517",
        "yesterday",
        "I know",
        "",
    ],
)
def test_neither_or_both_is_no_confirmation(text: str) -> None:
    assert slots(text).confirmation is None


# --------------------------------------------------------------------------------------
# amounts


@pytest.mark.parametrize(
    ("text", "cents"),
    [
        ("$25", 2500),
        ("$ 25", 2500),
        ("$25.50", 2550),
        ("$1,250.99", 125099),
        ("25.50 dollars", 2550),
        ("25 bucks", 2500),
        ("twenty five dollars", 2500),
        ("five dollars", 500),
        ("a hundred dollars", 10000),
        ("one hundred and twenty dollars", 12000),
        ("€30", 3000),
        ("30 euros", 3000),
        ("£7.5", 750),
        ("twenty dollars and fifty cents", 2050),
        ("50 cents", 50),
        ("25$", 2500),
        ("30.5€", 3050),
        ("you charged me $40 instead of $25", 4000),
    ],
)
def test_amounts_are_read_in_cents(text: str, cents: int) -> None:
    assert slots(text).amount_cents == cents


@pytest.mark.parametrize("text", ["order 4517", "I have 2 items", "call 555-010-0001", "on Nov 3"])
def test_numbers_without_currency_are_not_amounts(text: str) -> None:
    assert slots(text).amount_cents is None


# --------------------------------------------------------------------------------------
# dates (NOW is Thursday 2026-11-05)


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2026-11-03", "2026-11-03"),
        ("Nov 3", "2026-11-03"),
        ("nov. 3rd", "2026-11-03"),
        ("November 3, 2025", "2025-11-03"),
        ("3 November", "2026-11-03"),
        ("the 3rd of November", "2026-11-03"),
        ("november third", "2026-11-03"),
        ("the twenty first of october", "2026-10-21"),
        ("11/3", "2026-11-03"),
        ("today", "2026-11-05"),
        ("yesterday", "2026-11-04"),
        ("tomorrow", "2026-11-06"),
        ("the day before yesterday", "2026-11-03"),
        ("3 days ago", "2026-11-02"),
        ("a week ago", "2026-10-29"),
        ("last Tuesday", "2026-11-03"),
        ("last Thursday", "2026-10-29"),
        ("I ordered it on Tuesday", "2026-11-03"),
        ("it arrived on thursday", "2026-10-29"),
        ("can it come on Tuesday", "2026-11-10"),
        ("deliver it friday", "2026-11-06"),
        ("next Tuesday", "2026-11-10"),
        ("next thursday", "2026-11-12"),
        ("on sat", "2026-11-07"),
        ("last night", "2026-11-04"),
        ("I ordered it on the 3rd", "2026-11-03"),
        ("can it come on the 28th", "2026-11-28"),
        ("can it come on the 5th", "2026-11-05"),
    ],
)
def test_dates_are_resolved_relative_to_now(text: str, iso: str) -> None:
    assert slots(text).date == iso


def test_a_date_without_a_year_is_the_nearest_occurrence() -> None:
    new_year = datetime(2027, 1, 2, tzinfo=UTC)
    assert extract_slots("Dec 30", now=new_year).date == "2026-12-30"
    assert extract_slots("Jan 5", now=new_year).date == "2027-01-05"


@pytest.mark.parametrize(
    "text", ["Feb 30", "2026-13-01", "order 4517", "I may call", "march on", "I sat down", "the sun is out"]
)
def test_impossible_or_absent_dates_are_none(text: str) -> None:
    assert slots(text).date is None


def test_extract_slots_defaults_now_to_the_current_time() -> None:
    assert extract_slots("today").date == datetime.now(UTC).date().isoformat()


# --------------------------------------------------------------------------------------
# phones and emails


@pytest.mark.parametrize(
    ("text", "e164"),
    [
        ("+1 555 010 0001", "+15550100001"),
        ("555-010-0001", "+15550100001"),
        ("(555) 010-0001", "+15550100001"),
        ("555.010.0001", "+15550100001"),
        ("5550100001", "+15550100001"),
        ("1-555-010-0001", "+15550100001"),
        ("my number is five five five zero one zero zero zero zero one", "+15550100001"),
        ("+44 20 7946 0958", "+442079460958"),
        ("0044 20 7946 0958", "+442079460958"),
    ],
)
def test_phone_numbers_are_normalised_to_e164(text: str, e164: str) -> None:
    assert slots(text).phone == e164


@pytest.mark.parametrize("text", ["order 4517", "$25", "2026-11-03", "123456789"])
def test_short_numbers_are_not_phones(text: str) -> None:
    assert slots(text).phone is None


@pytest.mark.parametrize(
    ("text", "email"),
    [
        ("my email is John.Doe@Example.com", "john.doe@example.com"),
        ("send it to ana+orders@mail.co.uk please", "ana+orders@mail.co.uk"),
        ("it's jane at example dot com", "jane@example.com"),
        ("john dot doe at mail dot example dot com", "john.doe@mail.example.com"),
    ],
)
def test_emails_are_found_and_lower_cased(text: str, email: str) -> None:
    assert slots(text).email == email


def test_digits_inside_an_email_are_not_an_order_number() -> None:
    found = slots("email me at bob4517@example.com")
    assert (found.email, found.order_number) == ("bob4517@example.com", None)


# --------------------------------------------------------------------------------------
# ordinals


@pytest.mark.parametrize(
    ("text", "ordinal"),
    [
        ("the first one", 1),
        ("first", 1),
        ("second", 2),
        ("the second order", 2),
        ("the third one please", 3),
        ("the 2nd", 2),
        ("the last one", -1),
        ("last", -1),
    ],
)
def test_ordinals_pick_from_a_list(text: str, ordinal: int) -> None:
    assert slots(text).ordinal == ordinal


@pytest.mark.parametrize(
    "text",
    [
        "last Tuesday",
        "first of all, hi",
        "November third",
        "at first it worked",
        "this is my first time",
        "order 4517",
        "wait a second",
        "my last name is Smith",
    ],
)
def test_dates_and_figures_of_speech_are_not_ordinals(text: str) -> None:
    assert slots(text).ordinal is None


# --------------------------------------------------------------------------------------
# handoff


@pytest.mark.parametrize(
    "text",
    [
        "agent",
        "I want an agent",
        "human please",
        "can I talk to a person",
        "a real person please",
        "representative",
        "someone real",
        "operator",
        "let me talk to somebody",
        "get me your supervisor",
        "I don't want a bot, put me through to someone",
        "no more robots",
    ],
)
def test_asking_for_a_person_is_noticed(text: str) -> None:
    assert slots(text).wants_person is True


@pytest.mark.parametrize(
    "text",
    [
        "where is my order",
        "that was human error",
        "I don't need an agent",
        "the person who delivered it was rude",
        "yes",
    ],
)
def test_other_sentences_do_not_ask_for_a_person(text: str) -> None:
    assert slots(text).wants_person is False


# --------------------------------------------------------------------------------------
# whole utterances


def test_one_utterance_can_fill_several_slots() -> None:
    found = slots("yes, refund $25 on order 4517 from last Tuesday, my number is 555-010-0001")
    assert found == Slots(
        order_number="4517",
        confirmation=True,
        amount_cents=2500,
        date="2026-11-03",
        phone="+15550100001",
    )


def test_an_utterance_without_slots_is_empty() -> None:
    assert slots("hello there") == Slots()
