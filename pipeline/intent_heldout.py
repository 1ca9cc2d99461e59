"""A held-out list of phrases with the intent each should match, and how a matcher setting does on it.

The admin console lets people paste lines ``phrase => expected_intent`` (``none`` for a phrase
that should match nothing), scores every phrase once against every intent, and replays the
matcher's decision (:func:`pipeline.intent_engine.decide`) with the current and a proposed
threshold: accuracy, how many phrases would go to the low-confidence fallback (a clarifying
question, then a person), and which ones would match the wrong intent. Pure: no I/O, nothing runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.intent_engine import decide

NO_INTENT = "none"  # the expected intent of a phrase that should match nothing
SEPARATOR = "=>"
MAX_PHRASES = 300
MAX_PHRASE_CHARS = 500


@dataclass(frozen=True)
class HeldOutPhrase:
    line: int  # 1-based line of the pasted text
    text: str
    expected: str | None  # None: should match no intent


def parse_lines(text: str, known: Collection[str]) -> tuple[list[HeldOutPhrase], list[dict[str, Any]]]:
    """The phrases of ``text`` (blank lines and ``#`` comments skipped), or every problem found as
    ``{"line", "message"}``; ``known`` are the intent names an expected intent may be."""
    phrases: list[HeldOutPhrase] = []
    errors: list[dict[str, Any]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if SEPARATOR not in line:
            errors.append(
                {"line": number, "message": f"write the line as: phrase {SEPARATOR} expected intent"}
            )
            continue
        phrase, expected = (part.strip() for part in line.rsplit(SEPARATOR, 1))
        if not phrase:
            errors.append({"line": number, "message": "the phrase is empty"})
        elif len(phrase) > MAX_PHRASE_CHARS:
            errors.append({"line": number, "message": f"a phrase is at most {MAX_PHRASE_CHARS} characters"})
        elif expected.lower() == NO_INTENT:
            phrases.append(HeldOutPhrase(number, phrase, None))
        elif expected not in known:
            errors.append(
                {
                    "line": number,
                    "message": f"unknown intent {expected!r} (use an intent's name, or {NO_INTENT})",
                }
            )
        else:
            phrases.append(HeldOutPhrase(number, phrase, expected))
    if not errors and not phrases:
        errors.append(
            {"line": None, "message": f"no phrases: write one per line as: phrase {SEPARATOR} intent"}
        )
    if len(phrases) > MAX_PHRASES:
        errors.append({"line": None, "message": f"at most {MAX_PHRASES} phrases at once"})
    return (phrases, []) if not errors else ([], errors)


def as_lines(entries: Iterable[Mapping[str, Any]]) -> str:
    """``{"text", "intent"}`` entries (the repository's held-out YAML) as pasteable lines."""
    return "\n".join(f"{e['text']} {SEPARATOR} {e.get('intent') or NO_INTENT}" for e in entries)


def evaluate(
    phrases: Sequence[HeldOutPhrase],
    scores: Sequence[Mapping[str, float]],
    *,
    threshold: float,
    margin: float,
) -> dict[str, Any]:
    """How the matcher decides every phrase at ``threshold`` and ``margin``, from each phrase's
    score per intent (``scores[i]`` belongs to ``phrases[i]``).

    ``fallback`` counts phrases that would match no intent (the low-confidence path),
    ``fallback_wanted`` those of them expected to match nothing; ``wrong`` lists phrases matched
    to another intent than expected, ``missed`` phrases with an expected intent that fell back.
    """
    correct = 0
    fallback = 0
    fallback_wanted = 0
    wrong: list[dict[str, Any]] = []
    missed: list[dict[str, Any]] = []
    for phrase, by_intent in zip(phrases, scores, strict=True):
        names = list(by_intent)
        if names:
            values = np.asarray([by_intent[n] for n in names], dtype=np.float64)
            match = decide(names, values, threshold=threshold, margin=margin)
            got, score = match.intent, round(match.score, 4)
            best = names[int(np.argmax(values))]
        else:
            got, score, best = None, 0.0, None
        if got == phrase.expected:
            correct += 1
        if got is None:
            fallback += 1
            if phrase.expected is None:
                fallback_wanted += 1
            else:
                missed.append(
                    {
                        "line": phrase.line,
                        "phrase": phrase.text,
                        "expected": phrase.expected,
                        "best": best,
                        "score": score,
                    }
                )
        elif got != phrase.expected:
            wrong.append(
                {
                    "line": phrase.line,
                    "phrase": phrase.text,
                    "expected": phrase.expected,
                    "got": got,
                    "score": score,
                }
            )
    total = len(phrases)
    return {
        "threshold": threshold,
        "margin": margin,
        "total": total,
        "correct": correct,
        "accuracy": round(correct / total, 4) if total else 0.0,
        "fallback": fallback,
        "fallback_wanted": fallback_wanted,
        "wrong": wrong,
        "missed": missed,
    }
