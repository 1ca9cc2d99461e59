"""How the intent matcher decides, as set by an admin: stored, checked and applied to the engine.

Three numbers: the ``threshold`` (lowest score that counts as a match), the ``margin`` (the lead
the best intent needs over the runner-up; closer calls match nothing) and ``max_misses`` (how
many turns in a row may match nothing, each answered with a clarifying question, before the
conversation goes to a person). They live in one row of ``intent_matching`` (migration 013), which
exists only once an admin changed them: then it wins over ``CLOSELOOP_INTENT_THRESHOLD`` and the
built-in defaults, at start-up (:func:`apply_stored`) and at once in the process that saved it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, TypeAlias

import asyncpg

Executor: TypeAlias = "asyncpg.Pool | asyncpg.Connection"
MAX_MISSES_LIMIT = 5
MAX_MARGIN = 0.5


class InvalidMatching(ValueError):
    """Settings that cannot be used; ``problems`` lists each ``{"field", "message"}``."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__("; ".join(f"{p['field']}: {p['message']}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class MatchingSettings:
    threshold: float
    margin: float
    max_misses: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def check_matching(entry: Any) -> MatchingSettings:
    """``entry`` (``threshold``, ``margin``, ``max_misses``) as settings, or :class:`InvalidMatching`."""
    if not isinstance(entry, dict):
        raise InvalidMatching(
            [{"field": "threshold", "message": "expected threshold, margin and max_misses"}]
        )
    problems: list[dict[str, str]] = []
    threshold = _number(entry.get("threshold"))
    if threshold is None or not 0.0 <= threshold <= 1.0:
        problems.append({"field": "threshold", "message": "a number from 0 to 1, e.g. 0.35"})
    margin = _number(entry.get("margin", 0.0))
    if margin is None or not 0.0 <= margin <= MAX_MARGIN:
        problems.append({"field": "margin", "message": f"a number from 0 to {MAX_MARGIN}, e.g. 0 or 0.03"})
    misses = entry.get("max_misses")
    if isinstance(misses, bool) or not isinstance(misses, int) or not 1 <= misses <= MAX_MISSES_LIMIT:
        problems.append(
            {"field": "max_misses", "message": f"a whole number of turns from 1 to {MAX_MISSES_LIMIT}"}
        )
    if problems:
        raise InvalidMatching(problems)
    assert threshold is not None and margin is not None and isinstance(misses, int)
    return MatchingSettings(round(threshold, 4), round(margin, 4), misses)


async def load(db: Executor) -> MatchingSettings | None:
    """The stored settings; None while no admin has changed them."""
    row = await db.fetchrow("SELECT threshold, margin, max_misses FROM intent_matching WHERE id")
    return MatchingSettings(row["threshold"], row["margin"], row["max_misses"]) if row else None


async def save(db: Executor, settings: MatchingSettings) -> None:
    await db.execute(
        """INSERT INTO intent_matching (id, threshold, margin, max_misses, updated_at) VALUES (true, $1, $2, $3, now())
           ON CONFLICT (id) DO UPDATE SET threshold = EXCLUDED.threshold, margin = EXCLUDED.margin,
                                          max_misses = EXCLUDED.max_misses, updated_at = EXCLUDED.updated_at""",
        settings.threshold,
        settings.margin,
        settings.max_misses,
    )


def embedded_engine(turns: Any) -> Any:
    """The embedded turn manager of an engine (the LLM engine's runs its actions and matcher)."""
    return getattr(turns, "embedded", turns)


def current(turns: Any) -> MatchingSettings | None:
    """What the running engine uses now; None when it has no threshold-based matcher."""
    engine = embedded_engine(turns)
    classifier = getattr(engine, "classifier", None)
    if classifier is None or not hasattr(classifier, "threshold"):
        return None
    return MatchingSettings(
        float(classifier.threshold),
        float(getattr(classifier, "margin", 0.0)),
        int(engine.config.max_misses),
    )


def apply(turns: Any, settings: MatchingSettings) -> None:
    """Make the running engine decide with ``settings`` from its next turn on."""
    engine = embedded_engine(turns)
    classifier = engine.classifier
    classifier.threshold = settings.threshold
    if hasattr(classifier, "margin"):
        classifier.margin = settings.margin
    engine.set_max_misses(settings.max_misses)


async def apply_stored(db: Executor, turns: Any) -> MatchingSettings | None:
    """Apply the stored settings, if an admin saved any (at start-up)."""
    stored = await load(db)
    if stored is not None and current(turns) is not None:
        apply(turns, stored)
    return stored
