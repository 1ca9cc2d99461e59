"""The short-window Whisper path's guard against decoding loops (pure)."""

from __future__ import annotations

import pytest

from voice.stt import _looks_like_a_loop


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("Hello? " * 40, 0.8),
        ("I need to talk to a person. " * 14, 1.9),
        ("Goodbye! " * 30, 1.7),
    ],
)
def test_repetition_loops_are_recognised(text: str, seconds: float) -> None:
    assert _looks_like_a_loop(text, seconds)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("Hello?", 0.8),
        ("I want a refund for my wireless headphones, please.", 3.3),
        ("My phone number is 555 120 3 4567", 6.9),
        ("no no no no", 1.5),
        (
            "It arrived broken and I want my money back and the box was open and the charger is missing too.",
            5.0,
        ),
    ],
)
def test_ordinary_transcripts_are_not_loops(text: str, seconds: float) -> None:
    assert not _looks_like_a_loop(text, seconds)
