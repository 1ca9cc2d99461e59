"""Business hours of a queue: checked, normalised and read, with no I/O.

Hours are a time zone (an IANA name such as ``Europe/London``) and, per weekday, a list of
``"HH:MM-HH:MM"`` intervals in that zone's local time::

    {"mon": ["09:00-12:30", "13:30-17:00"], "sat": ["10:00-14:00"]}

A weekday that is not listed is closed all day; no weekday at all (``{}``) means the queue never
closes. ``24:00`` may end an interval (open until midnight). Intervals of one day may not overlap.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_INTERVALS_PER_DAY = 6
_INTERVAL = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class HoursError(ValueError):
    """Business hours that cannot be stored; ``field`` says which part (``timezone`` or a weekday)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_timezone(name: Any) -> str:
    """``name`` when it is a known IANA time zone, else :class:`HoursError`."""
    if not isinstance(name, str) or not name.strip():
        raise HoursError("timezone", "a time zone is needed, e.g. UTC or Europe/London")
    name = name.strip()
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise HoursError(
            "timezone", f"{name!r} is not a known time zone; use a name such as UTC or America/New_York"
        ) from None
    return name


def _minutes(hours: str, minutes: str) -> int:
    return int(hours) * 60 + int(minutes)


def _interval(day: str, text: Any) -> tuple[int, int]:
    match = _INTERVAL.match(text) if isinstance(text, str) else None
    if match is None:
        raise HoursError(day, f"{text!r} is not an interval like 09:00-17:00")
    start, end = _minutes(*match.group(1, 2)), _minutes(*match.group(3, 4))
    if int(match.group(2)) > 59 or int(match.group(4)) > 59 or start >= 24 * 60 or end > 24 * 60:
        raise HoursError(day, f"{text.strip()} is not a time of day (00:00 to 24:00)")
    if start >= end:
        raise HoursError(day, f"{text.strip()} ends before it starts; split a night shift over two days")
    return start, end


def _text(start: int, end: int) -> str:
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def check_hours(hours: Any) -> dict[str, list[str]]:
    """The hours in their stored form (sorted ``HH:MM-HH:MM``, closed days left out), or
    :class:`HoursError` naming the weekday at fault."""
    if hours is None:
        return {}
    if not isinstance(hours, Mapping):
        raise HoursError("business_hours", "business hours must map weekdays to lists of intervals")
    unknown = [str(k) for k in hours if k not in WEEKDAYS]
    if unknown:
        raise HoursError(
            "business_hours", f"unknown weekday(s) {', '.join(unknown)}; use {', '.join(WEEKDAYS)}"
        )
    stored: dict[str, list[str]] = {}
    for day in WEEKDAYS:
        value = hours.get(day)
        if value is None or value == []:
            continue
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise HoursError(day, "a list of intervals like 09:00-17:00 is needed")
        if len(value) > MAX_INTERVALS_PER_DAY:
            raise HoursError(day, f"at most {MAX_INTERVALS_PER_DAY} intervals a day")
        intervals = sorted(_interval(day, v) for v in value)
        for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
            if start < end:
                raise HoursError(day, "two intervals of this day overlap")
        if intervals:
            stored[day] = [_text(s, e) for s, e in intervals]
    return stored


def is_open(hours: Mapping[str, list[str]], timezone: str, at: datetime) -> bool:
    """Whether stored ``hours`` (see :func:`check_hours`) are open at the aware time ``at``."""
    if not hours:
        return True
    local = at.astimezone(ZoneInfo(timezone))
    minute = local.hour * 60 + local.minute
    for text in hours.get(WEEKDAYS[local.weekday()], []):
        start, end = _interval("", text)
        if start <= minute < end:
            return True
    return False


def next_opening(hours: Mapping[str, list[str]], timezone: str, at: datetime) -> datetime | None:
    """The first instant at or after the aware time ``at`` when stored ``hours`` are open, in the
    queue's zone: ``at`` itself while open, None when no weekday has hours (never closes).

    Local opening times are read on the local calendar, so "09:00" stays 09:00 across a DST
    change; an opening that falls in a DST gap (a local time that does not exist that day) is
    taken at the first open minute after the gap, or skipped when the whole interval is in it.
    """
    if not hours:
        return None
    zone = ZoneInfo(timezone)
    local = at.astimezone(zone)
    if is_open(hours, timezone, at):
        return local
    for offset in range(15):  # two weeks: every weekday twice (an opening lost to a DST gap)
        day = (local + timedelta(days=offset)).date()
        for text in hours.get(WEEKDAYS[day.weekday()], []):
            start, _ = _interval("", text)
            wall = datetime.combine(day, time(start // 60, start % 60), tzinfo=zone)
            candidate = wall.astimezone(UTC).astimezone(zone)  # a gap time becomes its real instant
            if candidate > at and is_open(hours, timezone, candidate):
                return candidate
    return None


def zone_label(timezone: str) -> str:
    """How a time zone is named to a customer: ``America/New_York`` -> ``New York time``, ``UTC`` -> ``UTC``."""
    if "/" not in timezone:
        return timezone
    return timezone.rsplit("/", 1)[1].replace("_", " ") + " time"
