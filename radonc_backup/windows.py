"""Query windows in the site's local wall-clock time.

R&V systems stamp ``TreatmentDate``/``TreatmentTime`` in local time without an offset. The
watermark is kept as a UTC instant; a window [start, end) in UTC is turned into the span of local
wall-clock times it covers. On the autumn DST change the wall clock runs back an hour, so the span
is widened to the earliest wall time reached, never narrowed. A span is queried one local date at
a time, because C-FIND matches date and time separately: a window that crosses midnight is two
queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

DAY_START = time(0, 0, 0)
DAY_END = time(23, 59, 59)


@dataclass(frozen=True, order=True)
class DayQuery:
    """One C-FIND's worth of window: a local date and an inclusive local time range."""

    day: date
    start: time = DAY_START
    end: time = DAY_END

    @property
    def whole_day(self) -> bool:
        return self.start == DAY_START and self.end == DAY_END

    @property
    def treatment_date(self) -> str:
        return self.day.strftime("%Y%m%d")

    @property
    def treatment_time(self) -> str:
        """Empty for a whole day, so records without a TreatmentTime still match.

        Bounds are whole seconds and both inclusive; the upper one reaches to the end of its
        second (``.999999``): TM allows fractions, and a record at 23:59:59.6, or at hh:mm:ss.5
        where a capped window was split, must fall inside some query.
        """
        if self.whole_day:
            return ""
        return f"{self.start.strftime('%H%M%S')}-{self.end.strftime('%H%M%S')}.999999"

    def split(self) -> tuple["DayQuery", "DayQuery"] | None:
        """Halves, for a peer that capped its answer; None when down to one second."""
        a = datetime.combine(self.day, self.start)
        b = datetime.combine(self.day, self.end)
        if (b - a) < timedelta(seconds=1):
            return None
        mid = a + (b - a) / 2
        mid = mid.replace(microsecond=0)
        return (DayQuery(self.day, self.start, mid.time()),
                DayQuery(self.day, (mid + timedelta(seconds=1)).time(), self.end))

    def __str__(self) -> str:
        return f"{self.treatment_date} {self.treatment_time or 'whole day'}"


def wall(instant: datetime, tz: ZoneInfo) -> datetime:
    """Local wall-clock time (naive) of an aware instant."""
    return instant.astimezone(tz).replace(tzinfo=None)


def local_span(start_utc: datetime, end_utc: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """Earliest and latest local wall-clock time reached between two instants.

    Wall time only runs backwards at a fold (autumn DST change); the earliest wall time after a
    fold is the wall time just before it minus the fold's size. Transitions are found by bisection
    on the UTC offset, so no table of zone rules is needed.
    """
    if end_utc < start_utc:
        raise ValueError("window ends before it starts")
    lo_wall, hi_wall = wall(start_utc, tz), wall(end_utc, tz)
    earliest, latest = min(lo_wall, hi_wall), max(lo_wall, hi_wall)
    for before, after in _transitions(start_utc, end_utc, tz):
        jump = after.astimezone(tz).utcoffset() - before.astimezone(tz).utcoffset()  # type: ignore[operator]
        if jump < timedelta(0):
            earliest = min(earliest, wall(after, tz))
        latest = max(latest, wall(before, tz))
    return earliest, latest


def _transitions(start: datetime, end: datetime, tz: ZoneInfo,
                 ) -> list[tuple[datetime, datetime]]:
    """Pairs of instants one second apart that straddle each UTC-offset change in [start, end]."""
    found: list[tuple[datetime, datetime]] = []
    step = timedelta(hours=6)
    t = start
    while t < end:
        u = min(t + step, end)
        if t.astimezone(tz).utcoffset() != u.astimezone(tz).utcoffset():
            a, b = t, u
            while b - a > timedelta(seconds=1):
                m = a + (b - a) / 2
                if a.astimezone(tz).utcoffset() == m.astimezone(tz).utcoffset():
                    a = m
                else:
                    b = m
            found.append((a, b))
        t = u
    return found


def day_queries(local_start: datetime, local_end: datetime) -> list[DayQuery]:
    """One query per local date from ``local_start`` to ``local_end`` (both inclusive)."""
    queries = []
    day = local_start.date()
    while day <= local_end.date():
        start = local_start.time().replace(microsecond=0) if day == local_start.date() else DAY_START
        end = local_end.time().replace(microsecond=0) if day == local_end.date() else DAY_END
        queries.append(DayQuery(day, start, end))
        day += timedelta(days=1)
    return queries


def whole_days(today: date, days: int) -> list[DayQuery]:
    """The nightly sweep: ``days`` whole past days and today so far, oldest first."""
    return [DayQuery(today - timedelta(days=n)) for n in range(days, -1, -1)]


def parse_treatment_datetime(treatment_date: str, treatment_time: str) -> datetime | None:
    """Naive local datetime of a record, or None when the date is missing or malformed."""
    d = (treatment_date or "").strip()
    if len(d) != 8 or not d.isdigit():
        return None
    t = (treatment_time or "").strip().split(".")[0].ljust(6, "0")[:6]
    if not t.isdigit():
        t = "000000"
    try:
        return datetime.strptime(d + t, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
