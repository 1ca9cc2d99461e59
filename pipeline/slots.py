"""Slot extraction: order numbers, yes/no, amounts, dates, phones, emails, ordinals, handoff.

Pure functions over one utterance, typed or transcribed: no I/O, no model, deterministic.
Spoken numbers ("four five one seven", "forty five seventeen", "twenty five dollars") are
turned into digits first by :func:`words_to_digits`, which voice code can also use.

Spans are taken in a fixed order so one piece of text fills one slot only: email, phone,
dates and times, amounts, then order numbers from what is left. That is why a phone number,
"$25" or "2026-11-03" is never read as an order number.

Date rules, relative to ``now``: a month and day without a year ("Nov 3") is the occurrence
nearest to today; "last Tuesday" is the latest Tuesday before today and "next Tuesday" the
first after; a bare weekday or "on the 3rd" points back when the sentence is in the past
tense ("I ordered it on Tuesday") and forward otherwise ("can it come on Tuesday");
"11/3" is month/day (US order, like the +1 phone default).
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from pipeline.model import Slots

# --------------------------------------------------------------------------------------
# spoken numbers

_DIGITS = {
    "zero": 0, "oh": 0, "nought": 0, "one": 1, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
}  # fmt: skip
_TEENS = {
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fourty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALES = {"hundred": 100, "thousand": 1000}
_REPEATS = {"double": 2, "triple": 3}

_DIGIT_WORD = "|".join(sorted(_DIGITS, key=len, reverse=True))
_NUMBER_WORD = (
    rf"(?:double|triple)[\s-]+(?:{_DIGIT_WORD})"
    rf"|{'|'.join(sorted([*_DIGITS, *_TEENS, *_TENS, *_SCALES], key=len, reverse=True))}"
    r"|a(?=[\s-]+(?:hundred|thousand)\b)"
)
# A run of number words, joined by spaces, hyphens or commas ("four, five, one, seven"),
# and by "and" inside a cardinal ("one hundred and twenty").
_NUMBER_RUN = re.compile(
    rf"\b(?:{_NUMBER_WORD})(?:(?:[\s,-]+|\s+and\s+)(?:{_NUMBER_WORD}))*\b", re.IGNORECASE
)


def words_to_digits(text: str, *, min_words: int = 2) -> str:
    """Replace spoken numbers with digits, leaving every other word as it was.

    Runs of digit words are read digit by digit ("four five one seven" -> "4517",
    "one oh one" -> "101", "double five" -> "55"), tens and teens as two-digit groups
    ("forty five seventeen" -> "4517"), and runs with "hundred"/"thousand" as one cardinal
    ("two hundred and fifty" -> "250").

    Args:
        text: an utterance.
        min_words: runs with fewer number words are kept as words, so "the second one" or
            "oh I see" are not turned into digits. Use 1 to convert "five dollars".

    Returns:
        The text with number-word runs replaced by digit strings.
    """

    def replace(match: re.Match[str]) -> str:
        # A leading or trailing "oh" is an interjection ("oh I see", "one oh"), not a zero.
        edges = _OH_EDGES.match(match.group(0))
        assert edges is not None  # the pattern matches any string
        lead, core, trail = edges.groups()
        return lead + _convert_run(core, min_words) + trail if core else match.group(0)

    return _NUMBER_RUN.sub(replace, text)


_OH_EDGES = re.compile(r"^((?:oh[\s,-]+)*)(.*?)((?:[\s,-]+oh)*)$", re.IGNORECASE | re.DOTALL)


def _convert_run(run: str, min_words: int) -> str:
    groups = re.split(r"(\s*,\s*)", run)
    if len(groups) > 1 and any(_has_scale(g) for g in groups[::2]):
        # Commas join spoken digits ("five five five, zero one zero") but separate cardinals.
        groups[::2] = [_convert_run(g, min_words) for g in groups[::2]]
        return "".join(groups)
    parts = re.split(r"(\s+and\s+)", run, flags=re.IGNORECASE)
    if len(parts) > 1 and not all(_has_scale(p) for p in parts[:-1:2]):
        # "and" joins a cardinal only after hundred/thousand; elsewhere it separates.
        parts[::2] = [_convert_run(p, min_words) for p in parts[::2]]
        return "".join(parts)
    words = [w for w in re.findall(r"[a-z]+", run.lower()) if w != "and"]
    numbers = [w for w in words if w != "a"]
    if len(numbers) < min_words or set(numbers) == {"oh"}:
        return run
    return _cardinal(words) if any(w in _SCALES for w in words) else _digit_string(words)


def _has_scale(text: str) -> bool:
    return any(w in _SCALES for w in re.findall(r"[a-z]+", text.lower()))


def _cardinal(words: list[str]) -> str:
    total, current = 0, 0
    for word in words:
        if word == "a":
            current = max(current, 1)
        elif word in _DIGITS:
            current += _DIGITS[word]
        elif word in _TEENS:
            current += _TEENS[word]
        elif word in _TENS:
            current += _TENS[word]
        elif word == "hundred":
            current = max(current, 1) * 100
        elif word == "thousand":
            total += max(current, 1) * 1000
            current = 0
    return str(total + current)


def _digit_string(words: list[str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in _REPEATS and i + 1 < len(words) and words[i + 1] in _DIGITS:
            out.append(str(_DIGITS[words[i + 1]]) * _REPEATS[word])
            i += 2
        elif word in _TENS:
            tens = _TENS[word]
            if i + 1 < len(words) and words[i + 1] in _DIGITS and _DIGITS[words[i + 1]] > 0:
                out.append(str(tens + _DIGITS[words[i + 1]]))
                i += 2
            else:
                out.append(str(tens))
                i += 1
        elif word in _TEENS:
            out.append(str(_TEENS[word]))
            i += 1
        else:
            out.append(str(_DIGITS.get(word, "")))
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------
# emails and phones

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_SPOKEN_EMAIL = re.compile(
    r"\b([a-z0-9_-]+(?:\s+dot\s+[a-z0-9_-]+)*)\s+at\s+([a-z0-9-]+(?:\s+dot\s+[a-z0-9-]+)*)"
    r"\s+dot\s+(com|net|org|edu|gov|io|co|uk|us|ca|de|fr|info|biz)\b",
    re.IGNORECASE,
)
_INTERNATIONAL = re.compile(r"(?:\+|\b00)\s?\d(?:[\s().-]{0,2}\d){6,14}(?!\d)")
_NANP = re.compile(r"(?<![\d+])(?:1[\s.-]?)?\(?\d{3}\)?[\s.-]{0,2}\d{3}[\s.-]?\d{4}(?!\d)")
_LONG_DIGITS = re.compile(r"(?<!\d)\d{9,}(?!\d)")
_LOCAL = re.compile(r"(?<![\d+.-])\d{3}[.-]\d{4}(?![\d.-])")  # 555-0100: no area code, no E.164


def _find_email(text: str) -> tuple[str | None, list[tuple[int, int]]]:
    match = _EMAIL.search(text)
    if match:
        return match.group(0).lower(), [match.span()]
    spoken = _SPOKEN_EMAIL.search(text)
    if spoken:
        local, domain, tld = (re.sub(r"\s+dot\s+", ".", g, flags=re.IGNORECASE) for g in spoken.groups())
        return f"{local}@{domain}.{tld}".lower(), [spoken.span()]
    return None, []


def _find_phone(text: str) -> tuple[str | None, list[tuple[int, int]]]:
    phone: str | None = None
    spans: list[tuple[int, int]] = []
    for pattern in (_INTERNATIONAL, _NANP, _LONG_DIGITS, _LOCAL):
        for match in pattern.finditer(text):
            if any(s <= match.start() < e for s, e in spans):
                continue
            spans.append(match.span())
            if phone is None:
                phone = _e164(match.group(0))
    return phone, spans


def _e164(raw: str) -> str | None:
    digits = re.sub(r"\D", "", raw)
    stripped = raw.lstrip()
    if stripped.startswith("+"):
        return f"+{digits}" if 8 <= len(digits) <= 15 else None
    if stripped.startswith("00"):
        return f"+{digits[2:]}" if 8 <= len(digits) - 2 <= 15 else None
    if len(digits) == 10:
        return f"+1{digits}"
    if len(digits) == 11 and digits.startswith("1"):
        return f"+{digits}"
    return None


# --------------------------------------------------------------------------------------
# dates and times

_MONTHS = {
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6,
    "jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12,
}  # fmt: skip
_MONTH = (
    r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_ORDINAL_WORDS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12,
    "thirteenth": 13, "fourteenth": 14, "fifteenth": 15, "sixteenth": 16,
    "seventeenth": 17, "eighteenth": 18, "nineteenth": 19, "twentieth": 20, "thirtieth": 30,
}  # fmt: skip
_DAY_WORD = (
    r"(?:(?:twenty|thirty)[\s-]+(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth)"
    rf"|{'|'.join(sorted(_ORDINAL_WORDS, key=len, reverse=True))})"
)
_DAY = rf"(\d{{1,2}}(?:st|nd|rd|th)?|{_DAY_WORD})"
_YEAR = r"(?:,?\s+(\d{4}))?"
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_WEEKDAY = r"(mon|tues?|wed(?:nes)?|weds|thu(?:rs?)?|fri|sat(?:ur)?|sun)(day)?"

_ISO_DATE = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")
_MONTH_DAY = re.compile(rf"\b{_MONTH}\s+(?:the\s+)?{_DAY}\b{_YEAR}", re.IGNORECASE)
_DAY_MONTH = re.compile(rf"\b(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTH}(?![a-z]){_YEAR}", re.IGNORECASE)
_DAY_ONLY = re.compile(r"\bon\s+the\s+(\d{1,2})(?:st|nd|rd|th)\b", re.IGNORECASE)
_SLASH_DATE = re.compile(r"\b(\d{1,2})/(\d{1,2})(?:/(\d{2}|\d{4}))?\b")
_RELATIVE = re.compile(
    r"\b(the\s+day\s+before\s+yesterday|the\s+day\s+after\s+tomorrow|today|tonight|last\s+night"
    r"|yesterday|tomorrow)\b",
    re.IGNORECASE,
)
_AGO = re.compile(r"\b(\d{1,3}|a|one)\s+(day|week)s?\s+ago\b", re.IGNORECASE)
_WEEKDAY_PHRASE = re.compile(rf"\b(?:(last|next|this|on|past)\s+)?{_WEEKDAY}\b", re.IGNORECASE)
_TIME = re.compile(
    r"\b\d{1,2}(?::?\d{2})?\s*(?:am|pm|a\.m\.|p\.m\.|o'?clock)(?![a-z])|\b\d{1,2}:\d{2}\b",
    re.IGNORECASE,
)
# Past-tense cues decide which way a bare weekday points (see _weekday_date).
_PAST_CUE = re.compile(
    r"\b(?:ordered|placed|bought|purchased|paid|was|were|did|came|arrived|delivered|received"
    r"|got|sent|shipped|charged|happened|called|returned|last|ago|had)\b",
    re.IGNORECASE,
)

_DateSpan = tuple[str, tuple[int, int]]


def _find_dates(text: str, today: date) -> tuple[str | None, list[tuple[int, int]]]:
    found: list[_DateSpan] = []
    for match in _ISO_DATE.finditer(text):
        day = _safe_date(int(match[1]), int(match[2]), int(match[3]))
        if day:
            found.append((day.isoformat(), match.span()))
    for pattern, month_group, day_group in ((_MONTH_DAY, 1, 2), (_DAY_MONTH, 2, 1)):
        for match in pattern.finditer(text):
            month = _MONTHS[match[month_group][:3].lower()]
            number = _day_number(match[day_group])
            day = _with_year(month, number, match[3], today) if number else None
            if day:
                found.append((day.isoformat(), match.span()))
    for match in _DAY_ONLY.finditer(text):
        if not any(s <= match.start() < e for _, (s, e) in found):
            day = _day_of_month(int(match[1]), past=bool(_PAST_CUE.search(text)), today=today)
            if day:
                found.append((day.isoformat(), match.span()))
    for match in _SLASH_DATE.finditer(text):
        # US order (month/day), matching the +1 default of phone numbers.
        year = int(match[3]) + (2000 if len(match[3]) == 2 else 0) if match[3] else None
        day = _with_year(int(match[1]), int(match[2]), str(year) if year else None, today)
        if day:
            found.append((day.isoformat(), match.span()))
    for match in _RELATIVE.finditer(text):
        phrase = " ".join(match[1].lower().split())
        offset = {"today": 0, "tonight": 0, "last night": -1, "yesterday": -1, "tomorrow": 1}.get(
            phrase, -2 if "before" in phrase else 2
        )
        found.append(((today + timedelta(days=offset)).isoformat(), match.span()))
    for match in _AGO.finditer(text):
        count = 1 if match[1].lower() in ("a", "one") else int(match[1])
        days = count * (7 if match[2].lower() == "week" else 1)
        found.append(((today - timedelta(days=days)).isoformat(), match.span()))
    for match in _WEEKDAY_PHRASE.finditer(text):
        if any(s <= match.start() < e for _, (s, e) in found):
            continue
        if not match[3] and not match[1] and match[2].lower() not in ("tues", "weds", "thurs"):
            continue  # a bare "sun", "sat" or "wed" is more likely the word than the day
        day = _weekday_date(match, text, today)
        found.append((day.isoformat(), match.span()))
    spans = [span for _, span in found] + [m.span() for m in _TIME.finditer(text)]
    first = min(found, key=lambda item: item[1][0])[0] if found else None
    return first, spans


def _day_number(raw: str) -> int | None:
    raw = raw.lower()
    digits = re.match(r"\d+", raw)
    if digits:
        return int(digits.group(0))
    words = re.findall(r"[a-z]+", raw)
    if len(words) == 2:
        return {"twenty": 20, "thirty": 30}[words[0]] + _ORDINAL_WORDS[words[1]]
    return _ORDINAL_WORDS.get(raw)


def _safe_date(year: int, month: int, day: int) -> date | None:
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _with_year(month: int, day: int, year: str | None, today: date) -> date | None:
    """A date without a year is the occurrence nearest to today (last, this or next year)."""
    if year:
        return _safe_date(int(year), month, day)
    options = [d for y in (-1, 0, 1) if (d := _safe_date(today.year + y, month, day))]
    return min(options, key=lambda d: abs((d - today).days)) if options else None


def _day_of_month(number: int, *, past: bool, today: date) -> date | None:
    """ "On the 3rd": the latest 3rd up to today in the past tense, else the next from today."""
    months = [(today.year + (today.month + k - 1) // 12, (today.month + k - 1) % 12 + 1) for k in (-1, 0, 1)]
    options = [d for y, m in months if (d := _safe_date(y, m, number))]
    if past:
        return max((d for d in options if d <= today), default=None)
    return min((d for d in options if d >= today), default=None)


def _weekday_date(match: re.Match[str], text: str, today: date) -> date:
    """Which date a weekday means.

    "last Tuesday" is the most recent Tuesday before today, "next Tuesday" the first one
    after today. A bare or "on"/"this" weekday points back (most recent before today) when
    the utterance is in the past tense ("I ordered it on Tuesday"), and forward (today or
    later) otherwise ("can it come on Tuesday").
    """
    target = next(i for i, name in enumerate(_WEEKDAYS) if name.startswith(match[2].lower()[:3]))
    qualifier = (match[1] or "").lower()
    back = (today.weekday() - target) % 7 or 7
    forward = (target - today.weekday()) % 7
    if qualifier in ("last", "past"):
        return today - timedelta(days=back)
    if qualifier == "next":
        return today + timedelta(days=forward or 7)
    if _PAST_CUE.search(text):
        return today - timedelta(days=back)
    return today + timedelta(days=forward)


# --------------------------------------------------------------------------------------
# amounts

_CURRENCY_WORD = r"(?:dollars?|bucks|usd|euros?|eur|pounds?|gbp|quid)"
_SYMBOL_AMOUNT = re.compile(
    r"[$€£]\s?(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{1,2}))?(?!\d)"
    r"|(?<![\d.,])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d{1,2}))?\s?[$€£]"
)
_WORD_AMOUNT = re.compile(
    rf"(?<![\d.])(\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.(\d{{1,2}}))?\s?{_CURRENCY_WORD}\b"
    r"(?:\s+(?:and\s+)?(\d{1,2})\s+cents?\b)?",
    re.IGNORECASE,
)
_CENTS_ONLY = re.compile(r"(?<![\d.])(\d{1,2})\s+cents?\b", re.IGNORECASE)


def _cents(whole: str, fraction: str | None) -> int:
    cents = int(whole.replace(",", "")) * 100
    if fraction:
        cents += int(fraction.ljust(2, "0"))
    return cents


def _find_amount(text: str) -> tuple[int | None, list[tuple[int, int]]]:
    found: list[tuple[int, tuple[int, int]]] = []
    for match in _SYMBOL_AMOUNT.finditer(text):
        whole, fraction = (match[1], match[2]) if match[1] else (match[3], match[4])
        found.append((_cents(whole, fraction), match.span()))
    for match in _WORD_AMOUNT.finditer(text):
        cents = _cents(match[1], match[2]) + (int(match[3]) if match[3] else 0)
        found.append((cents, match.span()))
    if not found:
        for match in _CENTS_ONLY.finditer(text):
            found.append((int(match[1]), match.span()))
    first = min(found, key=lambda item: item[1][0])[0] if found else None
    return first, [span for _, span in found]


# --------------------------------------------------------------------------------------
# order numbers

_ORDER_CANDIDATE = re.compile(r"(?<![\w$€£.,:/+-])#?\s?(\d{3,8})(?![\w]|[.,:/-]\d)")
_ORDER_CUE = re.compile(
    r"(?:order|number|no\.?|#|ref(?:erence)?|confirmation)\s*(?:number|no\.?|is|#|:)?\s*$", re.IGNORECASE
)
_NOT_ORDER_AFTER = re.compile(
    r"\s*(?:%|percent|days?|weeks?|months?|years?|hours?|minutes?|items?|times?|pieces?|units?"
    r"|kg|kilos?|lbs?|pounds?|miles?|km|points?|calories)\b",
    re.IGNORECASE,
)
_NOT_ORDER_BEFORE = re.compile(
    r"\b(?:zip|post(?:al)?\s*code|pin|cvv|cvc|extension|ext|apt|apartment|suite|room|flight|model"
    r"|card|ending(?:\s+in)?|last\s+(?:four|4)(?:\s+digits)?|account)\s*(?:code|number|no\.?|is|#|:)?\s*$",
    re.IGNORECASE,
)
_YEAR_BEFORE = re.compile(r"\b(?:in|since|of|year|back in)\s*$", re.IGNORECASE)


def _find_order_number(text: str) -> str | None:
    candidates: list[tuple[bool, str]] = []
    for match in _ORDER_CANDIDATE.finditer(text):
        number = match[1]
        before = text[: match.start(1)]
        if _NOT_ORDER_AFTER.match(text, match.end(1)) or _NOT_ORDER_BEFORE.search(before):
            continue
        if len(number) == 4 and number[:2] in ("19", "20") and _YEAR_BEFORE.search(before):
            continue
        candidates.append((bool(_ORDER_CUE.search(before)), number))
    # A number after "order", "#" or "number" wins; otherwise the first one said.
    ranked = sorted(candidates, key=lambda c: not c[0])
    return ranked[0][1] if ranked else None


def _blank(text: str, spans: list[tuple[int, int]]) -> str:
    """Replace spans with spaces (same length) so later patterns cannot match inside them."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    return "".join(chars)


# --------------------------------------------------------------------------------------
# yes / no

_UNSURE = re.compile(
    r"\b(?:(?:i\s+)?(?:don'?t|do\s+not|dont)\s+know|not\s+sure|unsure|no\s+idea|maybe|perhaps"
    r"|dunno|not\s+certain|i\s+guess\s+not\s+sure|let\s+me\s+think|i'?ll\s+think)\b"
)
# Phrases in the order the alternation tries them: where one phrase contains another of the
# opposite sense ("of course not" / "of course", "no problem" / "no"), the longer comes first.
_CONFIRM_PHRASES: list[tuple[str, bool]] = [
    (r"no\s+(?:problem|worries)|(?:i\s+)?(?:don'?t|do\s+not)\s+mind|why\s+not", True),
    (r"(?:of\s+course|absolutely|definitely|certainly|sure)\s+not", False),
    (r"that'?s\s+not\s+(?:right|correct)|that\s+is\s+not\s+(?:right|correct)|not\s+correct", False),
    (r"incorrect|(?:that'?s\s+)?wrong", False),
    (r"(?:please\s+)?(?:don'?t|do\s+not|dont)(?:\s+do\s+it)?", False),
    (r"cancel\s+that(?!\s+(?:order|one|purchase|item|\d))", False),
    (r"not\s+(?:now|yet|today|really|right\s+now)|never\s*mind|forget\s+(?:it|that)", False),
    (r"hold\s+on|hang\s+on|stop|nope|nah|negative|no+", False),
    (r"yes+|yeah|yea|yep|yup|ya|yah|aye|uh\s+huh|mm\s+hmm|mhm|sure|certainly|absolutely|definitely", True),
    (r"of\s+course", True),
    (r"please\s+do|go\s+ahead|go\s+for\s+it|(?:ok(?:ay)?\s+)?do\s+it|proceed|confirm(?:ed)?", True),
    (r"correct|that'?s\s+right|that\s+is\s+right|you'?re\s+right|exactly|affirmative", True),
    (r"ok(?:ay)?|alright|all\s+right|sounds\s+good|that\s+works|that'?s\s+fine|fine\s+by\s+me", True),
]
_CONFIRM = re.compile(
    "|".join(f"(?P<{'y' if yes else 'n'}{i}>\\b(?:{p})\\b)" for i, (p, yes) in enumerate(_CONFIRM_PHRASES))
)
# Words that confirm only when they are the whole answer ("right" / "the right one").
_ALONE_YES = re.compile(r"^(?:right|please|yes\s+please|good|great|perfect|fine|k)$")
_NEUTRAL = re.compile(r"\b(?:make|be)\s+sure\b|\bdon'?t\s+worry\b")


def _confirmation(text: str) -> bool | None:
    """True for yes, False for no, None when neither or both are said.

    The whole utterance is scanned for yes and no phrases (longest first, so "of course
    not" is a no and "no problem" a yes). Uncertainty ("I don't know", "not sure") means
    None, and so does a mix of yes and no ("yes... actually no"): the caller asks again
    rather than act on a guess.
    """
    words = _normalise(text)
    if not words or _UNSURE.search(words):
        return None
    if _ALONE_YES.match(words):
        return True
    words = _NEUTRAL.sub(" ", words)
    polarities = {m.lastgroup[0] == "y" for m in _CONFIRM.finditer(words) if m.lastgroup}
    return polarities.pop() if len(polarities) == 1 else None


def _normalise(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text).split())


# --------------------------------------------------------------------------------------
# ordinals and handoff

_ORDINAL = re.compile(
    r"\b(?:the\s+)?(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last"
    r"|1st|2nd|3rd|[4-9]th|10th)\b(?!\s+(?:time|of\s+all|thing|week|month|year|night|mon|tue|wed|thu|fri|sat|sun))"
)
_ORDINAL_EXCLUDED = re.compile(
    r"\b(?:at|for\s+the)\s+(?:first|last)\b|\b(?:last|first)\s+name\b"
    r"|\b(?:a|one|just\s+a)\s+second\b|\blast\s+(?:few|couple)\b"
)
_PERSON = re.compile(
    r"\b(?:agent|human(?!\s+(?:error|resources))|a\s+(?:real\s+|live\s+)?person|real\s+(?:person|human|people)"
    r"|live\s+(?:agent|person)|representative|rep|someone\s+real|somebody\s+real|operator"
    r"|supervisor|manager|(?:talk|speak|chat)\s+(?:to|with)\s+(?:someone|somebody|anyone|a\s+human|people)"
    r"|(?:put|transfer|connect)\s+me\s+(?:through\s+)?(?:to|with)\s+(?:someone|somebody|a\s+\w+)"
    r"|not\s+(?:a\s+)?(?:bot|robot|machine)|no\s+(?:more\s+)?(?:bots?|robots?|machines?))\b"
)
_PERSON_NEGATED = re.compile(r"\b(?:don'?t|do\s+not|dont|no\s+need|not)\s+(?:\w+\s+){0,3}$")


def _ordinal(words: str) -> int | None:
    if _ORDINAL_EXCLUDED.search(words):
        words = _ORDINAL_EXCLUDED.sub(" ", words)
    match = _ORDINAL.search(words)
    if not match:
        return None
    word = match[1]
    if word == "last":
        return -1
    return int(word[:-2]) if word[0].isdigit() else _ORDINAL_WORDS[word]  # "2nd" -> 2


def _wants_person(text: str) -> bool:
    # Negation reaches to the end of its clause only: "I don't want a bot, put me through
    # to someone" asks for a person, "I don't need an agent" does not.
    for clause in re.split(r"[,.;!?]|\bbut\b", text.lower()):
        words = _normalise(clause)
        for match in _PERSON.finditer(words):
            negated = _PERSON_NEGATED.search(words[: match.start()])
            if not negated or match[0].startswith(("not", "no")):
                return True
    return False


# --------------------------------------------------------------------------------------


def extract_slots(text: str, *, now: datetime | None = None) -> Slots:
    """Find every slot in one utterance.

    Args:
        text: what the customer typed or said (a transcript).
        now: reference time for relative dates ("yesterday", "last Tuesday");
            defaults to the current time. Dates are calendar days of ``now``'s timezone
            (UTC in closeloop).

    Returns:
        A :class:`Slots`; fields not present in the text are ``None`` (``wants_person``
        is ``False``).
    """
    today = (now or datetime.now(UTC)).date()
    spoken = words_to_digits(text)
    slots = Slots()

    slots.email, email_spans = _find_email(spoken)
    rest = _blank(spoken, email_spans)
    slots.phone, phone_spans = _find_phone(rest)
    rest = _blank(rest, phone_spans)
    slots.date, date_spans = _find_dates(rest, today)
    rest = _blank(rest, date_spans)
    # Amounts also read single number words ("five dollars"); order numbers never do.
    slots.amount_cents, _ = _find_amount(words_to_digits(text, min_words=1))
    _, amount_spans = _find_amount(rest)
    rest = _blank(rest, amount_spans)
    slots.order_number = _find_order_number(rest)

    words = _normalise(_blank(spoken, date_spans))
    slots.confirmation = _confirmation(text)
    slots.ordinal = _ordinal(words)
    slots.wants_person = _wants_person(text)
    return slots
