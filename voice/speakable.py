"""Text as it should be spoken on a call: order numbers digit by digit, money in words, codes spelled.

Replies are written for reading (``Order 4517``, ``$89.00``, ``CL-000123``); a TTS voice would
say "four thousand five hundred seventeen" and "dollar eighty-nine point zero zero". This pure
function rewrites only what a caller would otherwise mishear.
"""

from __future__ import annotations

import re

_CURRENCY = {"$": ("dollar", "dollars"), "€": ("euro", "euros"), "£": ("pound", "pounds")}
_MONEY = re.compile(r"([$€£])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{2}))?")
_CODE = re.compile(r"\b([A-Z]{2})-([0-9A-Z]{4,12})\b")
_URL = re.compile(r"https?://\S+")
_NUMBER = re.compile(r"(?<![\d.,:$€£])\b(\d{3,8})\b(?![\d.,:]\d)")


def _money(match: re.Match[str]) -> str:
    one, many = _CURRENCY[match.group(1)]
    whole = int(match.group(2).replace(",", ""))
    cents = int(match.group(3) or 0)
    words = f"{whole} {one if whole == 1 else many}"
    if cents:
        words += f" and {cents} cent{'s' if cents != 1 else ''}"
    return words


def _spell(chars: str) -> str:
    return " ".join(chars)


def speakable(text: str) -> str:
    """``"Refund $89.00 for order 4517, ticket CL-000123"`` ->
    ``"Refund 89 dollars for order 4 5 1 7, ticket C L 0 0 0 1 2 3"``."""
    text = _URL.sub("the link I texted you", text)
    text = _CODE.sub(lambda m: f"{_spell(m.group(1))} {_spell(m.group(2))}", text)
    text = _NUMBER.sub(lambda m: _spell(m.group(1)), text)  # amounts are skipped: they follow a currency sign
    return _MONEY.sub(_money, text)
