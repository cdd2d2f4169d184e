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
        ("20261122", "234000-235959.999999"), ("20261123", "000000-002000.999999")]


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


# Property tests: a record stamped at any local time, fractions of a second included, is found by
# some query of the windows that cover it: consecutive incremental windows across midnight and
# both DST changes, and the halves of a capped window split again and again.

from datetime import timedelta  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from radonc_backup.record_finder import _in_window as _in_query  # noqa: E402
from radonc_backup.instance import InstanceRef  # noqa: E402


def _seconds(tm: str) -> float:
    whole, _, frac = tm.partition(".")
    whole = whole.ljust(6, "0")
    return int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + int(whole[4:6]) + float(f"0.{frac or 0}")


def peer_matches(q: DayQuery, day: str, tm: str) -> bool:
    """DICOM range matching as a peer does it: the date equal, the time within both bounds."""
    if day != q.treatment_date:
        return False
    if not q.treatment_time:
        return True
    lo, _, hi = q.treatment_time.partition("-")
    return _seconds(lo) <= _seconds(tm) <= _seconds(hi)


def found_by(queries: list[DayQuery], stamp: datetime) -> bool:
    day, tm = stamp.strftime("%Y%m%d"), stamp.strftime("%H%M%S.%f")
    ref = InstanceRef("1.2.3.4", "", "P", "1.2", "1.2.3", treatment_date=day, treatment_time=tm)
    return any(peer_matches(q, day, tm) and _in_query(ref, q) for q in queries)


instants = st.datetimes(min_value=datetime(2026, 3, 6), max_value=datetime(2026, 11, 3),
                        timezones=st.just(timezone.utc))


@settings(max_examples=300, deadline=None)
@given(start=instants, steps=st.lists(st.integers(1, 4 * 3600), min_size=1, max_size=12),
       overlap=st.integers(0, 1800), at=st.floats(0, 1))
def test_every_record_in_a_run_of_incremental_windows_is_found(
        start: datetime, steps: list[int], overlap: int, at: float) -> None:
    ends = [start]
    for step in steps:
        ends.append(ends[-1] + timedelta(seconds=step, microseconds=step * 7919 % 10**6))
    queries = [q for a, b in zip(ends, ends[1:])
               for q in day_queries(*local_span(a - timedelta(seconds=overlap), b, NY))]
    instant = ends[0] + (ends[-1] - ends[0]) * at
    assert found_by(queries, instant.astimezone(NY).replace(tzinfo=None)), instant


@settings(max_examples=300, deadline=None)
@given(day_start=st.integers(0, 86399), length=st.integers(0, 86399), depth=st.integers(1, 12),
       at=st.floats(0, 1), micro=st.integers(0, 999999), picks=st.lists(st.booleans(),
                                                                          min_size=12,
                                                                          max_size=12))
def test_the_halves_of_a_split_window_leave_no_gap(day_start: int, length: int, depth: int,
                                                   at: float, micro: int,
                                                   picks: list[bool]) -> None:
    day = date(2026, 11, 22)
    first = datetime.combine(day, time()) + timedelta(seconds=day_start)
    last = min(first + timedelta(seconds=length), datetime.combine(day, time(23, 59, 59)))
    query = DayQuery(day, first.time(), last.time())
    stamp = first + (last - first) * at
    stamp = stamp.replace(microsecond=micro) if stamp.replace(microsecond=micro) <= \
        last.replace(microsecond=999999) else stamp
    leaves = [query]
    for pick in picks[:depth]:  # split down one path, keep the other half as a leaf too
        halves = leaves[-1].split()
        if halves is None:
            break
        leaves[-1:] = list(halves) if pick else list(reversed(halves))
    assert found_by(leaves, stamp), (query, stamp)


def test_the_last_fraction_of_a_second_of_a_day_is_in_its_query() -> None:
    start = datetime(2026, 11, 23, 4, 50, tzinfo=timezone.utc)  # 23:50 local
    end = datetime(2026, 11, 23, 5, 5, tzinfo=timezone.utc)  # 00:05 local
    queries = day_queries(*local_span(start, end, NY))
    assert found_by(queries, datetime(2026, 11, 22, 23, 59, 59, 600000))
    assert found_by(queries, datetime(2026, 11, 23, 0, 0, 0, 1))
