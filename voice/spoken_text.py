"""Pure functions on what the caller said and what they heard: the heard part of a cut reply,
whether a transcript sounds finished, backchannels, and where each sentence of a reply ends.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def heard_prefix(text: str, chars: int) -> str:
    """The heard part of ``text``: whole words up to ``chars`` characters."""
    if chars >= len(text):
        return text
    if chars <= 0:
        return ""
    cut = text[:chars]
    if chars < len(text) and _in_word(text[chars]) and cut and _in_word(cut[-1]):
        cut = cut.rsplit(" ", 1)[0] if " " in cut else ""
    return cut.rstrip(" ,;:")


def _in_word(char: str) -> bool:
    return char.isalnum() or char in "'\u2019"


_DANGLING = frozenset(
    "a an the to of for and or but my your our is are was were with at in on from by about because so if "
    "that which who um uh er like i i'm it's want need i'd i'll gonna wanna "
    # an auxiliary or modal at the end waits for its verb ("I was wondering if you could", "can you")
    "could would should can will might must shall".split()
)


def sounds_finished(text: str) -> bool:
    """Whether a transcript reads as a finished sentence: Whisper closed it with . ? or ! (not
    "...") and it does not end on a word that needs more ("I want to.", "my order is."), or it
    ends in a group of 4+ digits."""
    text = text.strip()
    if not text or text.endswith("..."):
        return False
    words = text.rstrip(".?!").lower().split()
    if not words:
        return False
    last = words[-1].strip(",;:")
    if text[-1] not in ".?!":
        # Whisper leaves "My order is 4517" open; a closing number of 4+ digits is an answer (an
        # order number, a phone number's last group). The transcriber may split it ("451 7",
        # "4-5-1-7", "4,517"); groups of three ("555 123") read as a phone number still going on.
        groups = _trailing_digit_groups(text)
        if len(words) < 2 or not groups or sum(map(len, groups)) < 4:
            return False
        return not (len(groups[-1]) == 3 and all(len(g) == 3 for g in groups[:-1]))
    return last not in _DANGLING


_TRAILING_DIGITS = re.compile(r"(?:\d+[\s,.-]*)*\d+$")


def _trailing_digit_groups(text: str) -> list[str]:
    """The digit groups a transcript ends with: "My order is 451 7" -> ["451", "7"]."""
    match = _TRAILING_DIGITS.search(text.rstrip())
    if not match or (match.start() > 0 and not text[match.start() - 1].isspace()):
        return []
    return re.findall(r"\d+", match.group())


def sounds_unfinished(text: str) -> bool:
    """Whether a transcript reads as a thought that goes on: it trails off ("...", "-", ","), or it
    ends on a word that needs more ("I'd like to cancel the", "my order is", "um")."""
    text = text.strip()
    if not text:
        return False
    if text.endswith(("...", "-", ",", "\u2026")):
        return True
    words = text.rstrip(".?!").lower().split()
    return bool(words) and words[-1].strip(",;:") in _DANGLING


#: Sounds a transcriber writes for no words: "[cough]", "(coughs)", "*clears throat*", "[BLANK_AUDIO]".
_NON_SPEECH = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*")
_NOISE_WORDS = frozenset("cough coughs coughing ahem sniff sniffs laughs laughing laughter noise".split())
#: Real words that look like a hum ("he", "me") stay content words.
_HUM_WORDS = frozenset("he me ma mom ham hem home hoe hue mama".split())
_HUM = re.compile(r"[mhauoe]{1,8}")
#: Words that acknowledge without asking for anything ("yeah", "right", "okay", "I see", "got it").
ACKNOWLEDGEMENTS = frozenset(
    "yeah yep yup ya yah yes ok okay okey kay right alright allright sure fine cool great good gotcha "
    "got it i see thanks thank you uh-huh".split()
)


def _hum_like(word: str) -> bool:
    """ "mm", "hmm", "mhm", "mm-mm", "uh", "uh-huh", "um", "ah", "oh": a hum, however it is spelt."""
    return bool(_HUM.fullmatch(word)) and ("m" in word or "h" in word) and word not in _HUM_WORDS


def content_words(text: str, acknowledgements: frozenset[str] = frozenset()) -> list[str]:
    """The words of ``text`` that carry meaning: not hums ("mm-mm", "uh-huh", in any spelling),
    not acknowledgements ("yeah", "right", "okay", ...), not non-speech marks ("[cough]")."""
    text = _NON_SPEECH.sub(" ", text.lower())
    acknowledgements = ACKNOWLEDGEMENTS | {w for phrase in acknowledgements for w in phrase.split()}
    words = re.findall(r"[a-z0-9']+", text.replace("-", " "))
    return [
        w
        for w in words
        if not _hum_like(w) and w not in acknowledgements and w not in _NOISE_WORDS and w.strip("'")
    ]


#: Words that carry no request on their own: a transcriber often writes a hum as them ("mm mm" ->
#: "and then and then"), so in a sound over the bot they do not make it an interruption.
_FUNCTION_WORDS = frozenset("a an the and then so or but um uh er oh ah well like i it is".split())

#: Words that mean "stop, listen to me" even in a short sound over the bot.
INTERRUPTING = frozenset(
    "no nope nah not don't didn't stop wait hold hang sorry actually excuse pardon what person agent "
    "human operator representative someone somebody help again repeat cancel wrong hello".split()
)


def is_backchannel(
    text: str,
    words: frozenset[str],
    *,
    speech_ms: float | None = None,
    max_ms: float = 1500,
    short_ms: float = 700,
) -> bool:
    """Whether a caller's sound over the bot is only a backchannel ("mm-hmm", "uh-huh", "yeah,
    right", "okay", a cough). Decided on duration and words, not on one spelling of a hum:

    * longer than ``max_ms``: never;
    * shorter than ``short_ms``: yes unless it holds an interrupting word ("no", "wait", "stop")
      or a number: a transcriber often writes a short hum as words ("mm hmm" -> "and");
    * otherwise: yes when it has no content word (function words such as "and", "then", "the"
      do not count: a hum written as words).
    """
    if speech_ms is not None and speech_ms > max_ms:
        return False
    if not re.search(r"[a-z]", _NON_SPEECH.sub(" ", text.lower())) and not _NON_SPEECH.search(text):
        return False  # nothing heard at all: noise, not a backchannel (the caller says nothing)
    content = [w for w in content_words(text, words) if w not in _FUNCTION_WORDS]
    if speech_ms is not None and speech_ms < short_ms:
        return not any(w in INTERRUPTING or any(ch.isdigit() for ch in w) for w in content)
    return not content


def sentence_ends(text: str, sentences: Sequence[str]) -> list[int]:
    """Character offset in ``text`` where each sentence ends (for mark accounting)."""
    ends: list[int] = []
    cursor = 0
    for sentence in sentences:
        found = text.find(sentence, cursor)
        end = (found + len(sentence)) if found >= 0 else min(len(text), cursor + len(sentence))
        ends.append(end)
        cursor = end
    if ends:
        ends[-1] = max(ends[-1], len(text))
    return ends or [len(text)]
