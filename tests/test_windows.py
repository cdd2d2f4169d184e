"""Query windows: local wall-clock time, midnight, DST changes and capped answers."""

from __future__ import annotations

from datetime import date, datetime, time, timezone
from zoneinfo import ZoneInfo

from radonc_backup.windows import DayQuery, day_queries, local_span, parse_treatment_datetime, \
    whole_days

NY = ZoneInfo("America/New_York")


def test_window_crossing_midnight_is_two_queries() -> None:
    start = datetime(2026, 11, 23, 4, 40, tzinfo=timezone.utc)  # 23:40 local
    end = datetime(2026, 11, 23, 5, 20, tzinfo=timezone.utc)  # 00:20 local
    queries = day_queries(*local_span(start, end, NY))
    assert [(q.treatment_date, q.treatment_time) for q in queries] == [
        ("20261122", "234000-235959"), ("20261123", "000000-002000")]


def test_autumn_fold_widens_the_window_to_the_repeated_hour() -> None:
    # 01:25 EDT to 01:05 EST: the wall clock ran back, records stamped 01:00-01:25 (EST) exist.
    start = datetime(2026, 11, 1, 5, 25, tzinfo=timezone.utc)
    end = datetime(2026, 11, 1, 6, 5, tzinfo=timezone.utc)
    earliest, latest = local_span(start, end, NY)
    assert earliest.time() == time(1, 0) and latest.time() >= time(1, 59, 59)


def test_spring_gap_is_covered() -> None:
    start = datetime(2026, 3, 8, 6, 50, tzinfo=timezone.utc)  # 01:50 EST
    end = datetime(2026, 3, 8, 7, 10, tzinfo=timezone.utc)  # 03:10 EDT
    earliest, latest = local_span(start, end, NY)
    assert (earliest.time(), latest.time()) == (time(1, 50), time(3, 10))


def test_whole_day_query_sends_no_time_key_so_untimed_records_match() -> None:
    q = DayQuery(date(2026, 11, 22))
    assert q.whole_day and q.treatment_time == ""
    assert [str(d.day) for d in whole_days(date(2026, 11, 23), 2)] == [
        "2026-11-21", "2026-11-22", "2026-11-23"]


def test_split_halves_cover_the_query_exactly() -> None:
    a, b = DayQuery(date(2026, 1, 1), time(8, 0, 0), time(8, 0, 9)).split()  # type: ignore[misc]
    assert (a.start, a.end, b.start, b.end) == (time(8, 0), time(8, 0, 4), time(8, 0, 5),
                                                time(8, 0, 9))
    assert DayQuery(date(2026, 1, 1), time(8, 0, 0), time(8, 0, 0)).split() is None


def test_treatment_datetime_parsing_tolerates_fractions_and_gaps() -> None:
    assert parse_treatment_datetime("20261122", "235959.123") == datetime(2026, 11, 22, 23, 59, 59)
    assert parse_treatment_datetime("20261122", "") == datetime(2026, 11, 22)
    assert parse_treatment_datetime("2026112", "0800") is None
