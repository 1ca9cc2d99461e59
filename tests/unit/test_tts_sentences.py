"""Splitting replies into sentences for sentence-by-sentence speech synthesis."""

from __future__ import annotations

from typing import Any

import pytest

from voice.sentences import split_sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello. How can I help?", ["Hello.", "How can I help?"]),
        ("Great! Your refund is on its way.", ["Great!", "Your refund is on its way."]),
        ("Thanks, Mr. Smith. Anything else?", ["Thanks, Mr. Smith.", "Anything else?"]),
        ("Dr. Jones and Mrs. Lee will call you.", ["Dr. Jones and Mrs. Lee will call you."]),
    ],
)
def test_splits_after_sentence_punctuation_but_not_after_titles(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_prices_with_decimals_stay_whole() -> None:
    assert split_sentences("Your refund of $89.00 is on its way. It takes 3.5 days.") == [
        "Your refund of $89.00 is on its way.",
        "It takes 3.5 days.",
    ]


def test_a_sentence_ending_in_a_number_still_ends_there() -> None:
    assert split_sentences("Your order number is 4517. It shipped today.") == [
        "Your order number is 4517.",
        "It shipped today.",
    ]
    assert split_sentences("Your order number is 4517.") == ["Your order number is 4517."]


def test_web_addresses_are_not_split_at_their_dots() -> None:
    assert split_sentences(
        "Print your label at https://shop.example.com/returns?id=4517. Then drop it off."
    ) == [
        "Print your label at https://shop.example.com/returns?id=4517.",
        "Then drop it off.",
    ]
    assert split_sentences("See example.com for details.") == ["See example.com for details."]


def test_initials_abbreviations_and_numbered_items_do_not_end_sentences() -> None:
    assert split_sentences("John F. Kennedy was No. 35 on the list.") == [
        "John F. Kennedy was No. 35 on the list."
    ]
    assert split_sentences("We take cards, e.g. Visa. We open at 9 a.m. tomorrow.") == [
        "We take cards, e.g. Visa.",
        "We open at 9 a.m. tomorrow.",
    ]


def test_closing_quotes_stay_with_their_sentence() -> None:
    assert split_sentences('She said "it arrived broken." What now?') == [
        'She said "it arrived broken."',
        "What now?",
    ]


def test_line_breaks_end_sentences_and_whitespace_is_collapsed() -> None:
    assert split_sentences("Your options:\n  return it\n\n  or   exchange it") == [
        "Your options:",
        "return it",
        "or exchange it",
    ]


def test_blank_and_punctuation_only_text_gives_nothing_to_say() -> None:
    assert split_sentences("") == []
    assert split_sentences("   ") == []
    assert split_sentences("...") == []
    assert split_sentences("Okay. ...") == ["Okay."]


def test_long_sentences_are_cut_at_a_comma_within_the_limit() -> None:
    text = (
        "I can do that, and I will also check your other orders, your payment methods, "
        "the shipping address on file, and whether the policy allows an exception here."
    )
    pieces = split_sentences(text, max_chars=80)
    assert all(len(piece) <= 80 for piece in pieces)
    assert len(pieces) > 1
    assert all(piece.endswith((",", ".")) for piece in pieces)
    assert " ".join(pieces) == text


def test_a_long_sentence_without_commas_is_cut_at_spaces() -> None:
    text = " ".join(["word"] * 60)
    pieces = split_sentences(text, max_chars=50)
    assert all(len(piece) <= 50 for piece in pieces)
    assert " ".join(pieces) == text


def _adapter() -> Any:
    from voice.speech_stack import SynthesizerAdapter

    return SynthesizerAdapter(tts=None)  # type: ignore[arg-type] - sentences() never synthesizes


def test_a_long_first_sentence_is_cut_early_so_the_caller_hears_something_sooner() -> None:
    pieces = _adapter().sentences("I see order 4517 was delivered on Tuesday. Is this about that order?")
    assert pieces == ["I see order 4517", "was delivered on Tuesday.", "Is this about that order?"]
    assert _adapter().sentences("Hi Dana, I see order 4517 was delivered on Tuesday.")[0] == "Hi Dana,"


def test_short_first_sentences_and_short_tails_stay_whole() -> None:
    assert _adapter().sentences("Okay. Your refund is on its way.") == ["Okay.", "Your refund is on its way."]
    assert _adapter().sentences("Sorry, I didn't quite get that.") == ["Sorry, I didn't quite get that."]
    assert _adapter().sentences("Unfortunately that is impossible.") == ["Unfortunately that is impossible."]


async def test_a_sentences_lead_in_silence_is_not_sent_to_the_caller() -> None:
    import numpy as np

    from voice.audio import ulaw_to_pcm16
    from voice.speech_stack import SynthesizerAdapter
    from voice.tts import Synthesis

    rate = 22050
    t = np.arange(rate // 4) / rate
    speech = (4000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    lead_in = np.zeros(rate * 45 // 1000, dtype=np.int16)  # Piper's ~45 ms before a sentence

    class Piper:
        async def synthesize(self, text: str) -> Synthesis:
            pcm = np.concatenate([lead_in, speech])
            return Synthesis(pcm16=pcm, sample_rate=rate, seconds=pcm.size / rate, text=text)

    audio = await SynthesizerAdapter(tts=Piper())._audio("Thanks for calling.")  # type: ignore[arg-type]
    pcm = ulaw_to_pcm16(audio)
    loud = np.flatnonzero(np.abs(pcm) > 200)
    assert 0 < loud[0] <= 8000 * 8 // 1000  # the sound starts within 8 ms, not after 45
    assert abs(pcm.size - 8000 // 4) <= 8000 * 8 // 1000  # the speech itself is all there
