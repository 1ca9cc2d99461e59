"""When a queue opens next, read on its own local calendar (DST changes, nights split over two days)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from crm_bridge.business_hours import check_hours, is_open, next_opening, zone_label
from crm_bridge.overflow import handoff_route
from crm_bridge.queues import Queue
from pipeline.templates import opening_time, render

NY = "America/New_York"
WEEKDAYS_9_17 = check_hours({d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")})


def test_a_weekend_handoff_learns_the_queue_opens_on_monday_at_nine_local_time() -> None:
    saturday_8pm_ny = datetime(2025, 1, 12, 1, 0, tzinfo=UTC)

    opens = next_opening(WEEKDAYS_9_17, NY, saturday_8pm_ny)

    assert opens is not None and opens.astimezone(UTC) == datetime(2025, 1, 13, 14, 0, tzinfo=UTC)
    assert f"{opening_time(opens)} ({zone_label(NY)})" == "Monday 9:00 (New York time)"


def test_while_open_the_next_opening_is_now_and_without_hours_there_is_none() -> None:
    tuesday_noon_ny = datetime(2025, 1, 14, 17, 0, tzinfo=UTC)

    assert next_opening(WEEKDAYS_9_17, NY, tuesday_noon_ny) == tuesday_noon_ny
    assert next_opening({}, NY, tuesday_noon_ny) is None


def test_the_opening_after_a_spring_forward_weekend_stays_at_nine_local() -> None:
    # US clocks go forward on Sunday 2025-03-09: Friday evening is EST (-5), Monday is EDT (-4)
    friday_6pm_est = datetime(2025, 3, 7, 23, 0, tzinfo=UTC)

    opens = next_opening(WEEKDAYS_9_17, NY, friday_6pm_est)

    assert opens is not None and opens.astimezone(UTC) == datetime(2025, 3, 10, 13, 0, tzinfo=UTC)
    assert (opens.hour, opens.minute) == (9, 0)


def test_the_opening_after_a_fall_back_weekend_stays_at_nine_local() -> None:
    # Clocks go back on Sunday 2025-11-02: Monday 09:00 is EST (-5)
    friday_6pm_edt = datetime(2025, 10, 31, 22, 0, tzinfo=UTC)

    opens = next_opening(WEEKDAYS_9_17, NY, friday_6pm_edt)

    assert opens is not None and opens.astimezone(UTC) == datetime(2025, 11, 3, 14, 0, tzinfo=UTC)


def test_an_opening_inside_the_dst_gap_is_the_first_real_minute_after_it() -> None:
    # 02:00-04:00 local on the spring-forward Sunday: 02:00-03:00 does not exist that day
    hours = check_hours({"sun": ["02:00-04:00"]})
    saturday_noon_est = datetime(2025, 3, 8, 17, 0, tzinfo=UTC)

    opens = next_opening(hours, NY, saturday_noon_est)

    assert opens is not None and opens.astimezone(UTC) == datetime(2025, 3, 9, 7, 0, tzinfo=UTC)
    assert (opens.hour, opens.minute) == (3, 0) and is_open(hours, NY, opens)


def test_an_interval_wholly_inside_the_dst_gap_is_skipped_to_the_next_week() -> None:
    hours = check_hours({"sun": ["02:00-03:00"]})
    saturday_noon_est = datetime(2025, 3, 8, 17, 0, tzinfo=UTC)

    opens = next_opening(hours, NY, saturday_noon_est)

    assert opens is not None and opens.astimezone(UTC) == datetime(2025, 3, 16, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("at_utc", "expected_utc"),
    [
        (datetime(2025, 1, 10, 21, 0, tzinfo=UTC), datetime(2025, 1, 10, 22, 0, tzinfo=UTC)),  # Fri 21:00
        (
            datetime(2025, 1, 10, 23, 30, tzinfo=UTC),
            datetime(2025, 1, 10, 23, 30, tzinfo=UTC),
        ),  # Fri 23:30, open
        (datetime(2025, 1, 11, 3, 0, tzinfo=UTC), datetime(2025, 1, 11, 3, 0, tzinfo=UTC)),  # Sat 03:00, open
        (datetime(2025, 1, 11, 6, 0, tzinfo=UTC), datetime(2025, 1, 17, 22, 0, tzinfo=UTC)),  # Sat 06:00
    ],
)
def test_a_night_shift_over_midnight_is_open_on_both_sides(at_utc: datetime, expected_utc: datetime) -> None:
    night = check_hours({"fri": ["22:00-24:00"], "sat": ["00:00-06:00"]})

    assert next_opening(night, "UTC", at_utc) == expected_utc


def test_a_closed_queue_hands_off_to_its_first_open_overflow_else_says_when_it_opens() -> None:
    def queue(name: str, hours: dict[str, list[str]], overflow: str | None) -> Queue:
        return Queue(name, "", (), {}, 0, NY, hours, overflow)

    always = queue("night", {}, None)
    saturday_8pm_ny = datetime(2025, 1, 12, 1, 0, tzinfo=UTC)
    queues = {
        "support": queue("support", WEEKDAYS_9_17, "billing"),
        "billing": queue("billing", WEEKDAYS_9_17, "night"),
        "night": always,
    }

    assert handoff_route(queues, "support", saturday_8pm_ny).queue == "night"
    assert handoff_route(queues, "support", saturday_8pm_ny).overflowed_from == "support"
    alone = handoff_route(
        {**queues, "billing": queue("billing", WEEKDAYS_9_17, None)}, "support", saturday_8pm_ny
    )
    assert (alone.queue, alone.overflowed_from, alone.zone) == ("support", None, "New York time")
    assert alone.opens_at is not None
    text = render("handoff_closed", opens=opening_time(alone.opens_at), zone=alone.zone, ticket="CL-123")
    assert text == (
        "Our team is available from Monday 9:00 (New York time); we've opened ticket CL-123 "
        "and someone will get back to you then."
    )
