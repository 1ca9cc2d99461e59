"""Splitting a reply into sentences for text to speech, one request per sentence.

A sentence ends at ``.``, ``!``, ``?`` or ``…`` before a space, except after titles ("Mr.") and
inner abbreviations ("e.g."); a sentence longer than ``max_chars`` is cut at a soft break
(comma, semicolon, colon, dash) or a space. Pure functions, no I/O.
"""

from __future__ import annotations

import re

# Words whose period never ends a sentence (titles before a name).
_TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "mt", "sr", "jr", "rev", "gen", "capt", "sgt"})
# Abbreviations that end with a period but are followed by more of the same sentence.
_INNER_ABBREVIATIONS = frozenset({"e.g", "i.e", "vs", "approx", "cf", "ca", "u.s", "u.k"})
# A run of sentence-ending punctuation, with closing quotes or brackets, before a space or the end.
_BOUNDARY = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_WORD_BEFORE = re.compile(r"(\S+)$")
_SOFT_BREAK = re.compile(r"[,;:\u2014]\s")


def _is_boundary(text: str, start: int, end: int) -> bool:
    """Whether the punctuation at ``text[start:end]`` ends a sentence."""
    following = text[end:].lstrip()
    if not following:
        return True
    if "\n" in text[end : len(text) - len(following)]:
        return True
    punctuation = text[start:end]
    if punctuation[0] != ".":
        # "!" and "?" end sentences, unless what follows continues in lower case ("Wait! no").
        return not following[0].islower()
    if following[0].islower():
        return False  # "approx. five", "9 a.m. tomorrow", "etc. and so on"
    match = _WORD_BEFORE.search(text, 0, start)
    word = match.group(1) if match else ""
    bare = word.lstrip("\"'(\u201c\u2018[").lower()
    if bare in _TITLES or bare in _INNER_ABBREVIATIONS:
        return False
    if len(bare) == 1 and bare.isalpha() and word[-1].isupper():
        return False  # an initial: "John F. Kennedy"
    if bare == "no" and following[0].isdigit():
        return False  # "No. 5"
    return True


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """Cut a sentence longer than ``max_chars`` at commas, semicolons or dashes near the limit."""
    parts: list[str] = []
    rest = sentence
    while len(rest) > max_chars:
        cut = -1
        for match in _SOFT_BREAK.finditer(rest, 0, max_chars):
            # Keep at least a few words per piece: a lone "Well," would sound choppy.
            if match.end() >= 20:
                cut = match.end()
        if cut < 0:
            space = rest.rfind(" ", 20, max_chars)
            if space < 0:
                break
            cut = space + 1
        parts.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        parts.append(rest)
    return parts


def split_sentences(text: str, *, max_chars: int = 250) -> list[str]:
    """Split text into sentences so each can be synthesized (and heard) as soon as possible.

    Splits after ``.``, ``!``, ``?`` and ``…`` followed by a space and not a lower-case word,
    and at line breaks. It does not split inside numbers and prices ("$89.00"), web addresses
    ("example.com/returns"), after titles ("Mr.", "Dr."), initials ("John F. Kennedy") or
    "No. 5"; a sentence that ends with a number ("order 4517.") still ends there. Sentences
    longer than ``max_chars`` are cut at a comma, semicolon, colon or dash (or a space).
    Pieces without a letter or digit ("...") are dropped, since they have nothing to say.

    Args:
        text: What the bot is about to say.
        max_chars: Longest piece to send to the synthesizer at once.

    Returns:
        The sentences, stripped, in order; empty for blank text.
    """
    sentences: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if _is_boundary(text, match.start(), match.end()):
            sentences.append(text[start : match.end()])
            start = match.end()
    sentences.append(text[start:])
    pieces: list[str] = []
    for sentence in sentences:
        for line in sentence.splitlines():
            line = " ".join(line.split())
            if any(ch.isalnum() for ch in line):
                pieces.extend(_split_long(line, max_chars))
    return pieces
