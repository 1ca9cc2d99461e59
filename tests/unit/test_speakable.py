"""``voice.speakable.speakable``: reply text rewritten only where a caller would mishear it."""

from __future__ import annotations

import pytest

from voice.speakable import speakable


def test_the_docstring_example() -> None:
    assert speakable("Refund $89.00 for order 4517, ticket CL-000123") == (
        "Refund 89 dollars for order 4 5 1 7, ticket C L 0 0 0 1 2 3"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$89.00", "89 dollars"),
        ("$1.00", "1 dollar"),
        ("$1.50", "1 dollar and 50 cents"),
        ("$0.01", "0 dollars and 1 cent"),
        ("$45", "45 dollars"),
        ("€5", "5 euros"),
        ("£1", "1 pound"),
        ("a refund of $12.99 today", "a refund of 12 dollars and 99 cents today"),
    ],
)
def test_money_is_said_in_units_and_cents(text: str, expected: str) -> None:
    assert speakable(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Amounts of 100 and more are still amounts: "one hundred twenty-nine dollars",
        # not "one two nine dollars".
        ("$129.00", "129 dollars"),
        ("Your refund of $249.50 is on its way.", "Your refund of 249 dollars and 50 cents is on its way."),
        ("$1,299.99", "1299 dollars and 99 cents"),
        ("€12,000", "12000 euros"),
        # An amount without a thousands comma is one number, not "451 dollars" and a stray 7.
        ("$4517", "4517 dollars"),
    ],
)
def test_money_of_three_or_more_digits_is_not_spelled_digit_by_digit(text: str, expected: str) -> None:
    assert speakable(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("order 4517", "order 4 5 1 7"),
        ("Order 4517 was delivered.", "Order 4 5 1 7 was delivered."),
        ("orders 4517 and 4520?", "orders 4 5 1 7 and 4 5 2 0?"),
        ("order #4517.", "order #4 5 1 7."),
        ("code 123", "code 1 2 3"),
        ("ref 12345678", "ref 1 2 3 4 5 6 7 8"),
    ],
)
def test_order_numbers_are_read_digit_by_digit(text: str, expected: str) -> None:
    assert speakable(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "in 12 days",  # short numbers read fine as numbers
        "tracking 123456789",  # longer than an order number
        "it takes 3.5 days",
        "call us at 10:30",
        "1,234 points",
        "call +15551230000",  # phone numbers with + are left alone
        "or +442071234567",
        "tracking 1Z999AA10123456784",
        "Thanks for calling. Goodbye!",
    ],
)
def test_other_numbers_and_text_are_untouched(text: str) -> None:
    assert speakable(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ticket CL-000123", "ticket C L 0 0 0 1 2 3"),
        ("Your ticket is CL-4A7B.", "Your ticket is C L 4 A 7 B."),
        ("CL-000123 and CL-000124", "C L 0 0 0 1 2 3 and C L 0 0 0 1 2 4"),
    ],
)
def test_codes_are_spelled(text: str, expected: str) -> None:
    assert speakable(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Track it at https://track.example.com/1Z999 today", "Track it at the link I texted you today"),
        ("See http://example.com/returns?order=4517", "See the link I texted you"),
    ],
)
def test_urls_are_replaced_by_a_reference_to_the_text(text: str, expected: str) -> None:
    assert speakable(text) == expected


def test_plain_text_is_unchanged() -> None:
    assert speakable("How can I help you today?") == "How can I help you today?"
    assert speakable("") == ""
