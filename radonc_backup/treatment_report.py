"""Who is on treatment, on which plan and machine, at which fraction: from the backup alone.

Each RT Record is parsed once into ``RecordFacts`` (records are immutable) and kept in a cache
addressable by SOP Instance UID; a report is a pure function of those facts and the plans' labels,
so it can be rebuilt at any time without the R&V. One row per patient per course: a plan, or for
the records made from Mosaiq (which name no plan) a prescription, so two concurrent courses are
two rows.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import date
from pathlib import Path

import pandas as pd

from .collation import sort_key
from .continuity import gap_warning
from .report_facts import PlanFacts, RecordFacts

# In the order the people who act on it read: who, which plan on which machine, where in the
# course, when last, whether it needs a look; then the rest, and the UID last (it is long).
COLUMNS = [
    "PatientID", "PatientName", "RTPlanLabel", "Machine", "CurrentFraction", "FractionsPlanned",
    "FractionsRemaining", "LastTreatment", "LastMeterset", "LastTermination", "Status",
    "Warnings", "SessionsInWindow", "FirstTreatment", "BirthDate", "Sex", "Physician", "PlanUID",
]


FIELDS = [f.name for f in fields(RecordFacts)]  # sop_instance_uid first, warnings last


class FactCache:
    """Parsed records and plans, keyed by SOP Instance UID, in one SQLite file.

    Also remembers the backup's resource ID of each record, so a rerun asks the backup only for
    records it has not parsed before.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS records (sop_instance_uid TEXT PRIMARY KEY, "
                         "resource_id TEXT UNIQUE, " + ", ".join(FIELDS[1:]) + ", day TEXT)")
            conn.execute("CREATE INDEX IF NOT EXISTS records_course ON records "
                         "(patient_id, course, day)")
            conn.execute("CREATE INDEX IF NOT EXISTS records_day ON records (day)")
            conn.execute("CREATE TABLE IF NOT EXISTS plans (sop_instance_uid TEXT PRIMARY KEY, "
                         "facts TEXT NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS cursor (id INTEGER PRIMARY KEY CHECK (id=1), "
                         "seq INTEGER NOT NULL, fingerprint TEXT, instances INTEGER NOT NULL)")

    @classmethod
    def for_backup(cls, state_dir: Path, alias: str) -> "FactCache":
        """The cache of one backup target (resource IDs and the change-log cursor are the
        backup's own; v4: a record's course, which is its plan or, for a record we made from
        Mosaiq, its prescription's series), shared by the report and fraction continuity."""
        return cls(state_dir / f"report-cache-v4-{re.sub(r'[^A-Za-z0-9_.-]', '_', alias)}.sqlite")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            yield conn
            conn.commit()
        finally:
            conn.close()

    def cursor(self) -> tuple[int, str | None, int] | None:
        """Where the last listing left the backup's change log: (sequence number, its entry,
        the backup's instance count then); see report_listing."""
        with self._connect() as conn:
            row = conn.execute("SELECT seq, fingerprint, instances FROM cursor").fetchone()
        return (int(row[0]), row[1], int(row[2])) if row and row[1] else None

    def set_cursor(self, seq: int, fingerprint: str | None, instances: int) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO cursor VALUES (1, ?, ?, ?)",
                         (seq, fingerprint, instances))

    def forget_all_but(self, resource_ids: Iterable[str]) -> None:
        """Drop the records the backup no longer holds (a full listing says which)."""
        with self._connect() as conn:
            conn.execute("CREATE TEMP TABLE listed (resource_id TEXT PRIMARY KEY)")
            conn.executemany("INSERT OR IGNORE INTO listed VALUES (?)",
                             [(r,) for r in resource_ids])
            conn.execute("DELETE FROM records WHERE resource_id NOT IN "
                         "(SELECT resource_id FROM listed)")

    def known_resources(self) -> set[str]:
        with self._connect() as conn:
            return {r[0] for r in conn.execute("SELECT resource_id FROM records")}

    def put_records(self, items: Iterable[tuple[str, RecordFacts]]) -> None:
        rows = []
        for rid, f in items:
            values = [getattr(f, name) for name in FIELDS]
            values[-1] = json.dumps(list(f.warnings))
            rows.append((values[0], rid, *values[1:], f.treated[:10]))
        with self._connect() as conn:
            marks = ", ".join("?" * (len(FIELDS) + 2))
            conn.executemany(f"INSERT OR REPLACE INTO records VALUES ({marks})", rows)

    def courses(self, start: date, end: date, only: Iterable[str] | None = None,
                ) -> pd.DataFrame:
        """Every dated record of each course (patient and plan) with a session from ``start``
        to ``end`` (those after ``end`` too: the report counts up to ``end`` and names records
        dated in the future): all it needs, however many records the cache holds.
        ``only``: resource IDs to keep to (a narrowed listing)."""
        listed = ""
        with self._connect() as conn:
            if only is not None:
                conn.execute("CREATE TEMP TABLE listed (resource_id TEXT PRIMARY KEY)")
                conn.executemany("INSERT OR IGNORE INTO listed VALUES (?)", [(r,) for r in only])
                listed = " AND resource_id IN (SELECT resource_id FROM listed)"
            conn.execute("CREATE TEMP TABLE treated AS SELECT DISTINCT patient_id, course "
                         "FROM records WHERE day >= ? AND day <= ?" + listed,
                         (start.isoformat(), end.isoformat()))
            frame = pd.read_sql_query(
                f"SELECT {', '.join('r.' + f for f in FIELDS)}, r.day FROM treated t "
                "JOIN records r ON r.patient_id = t.patient_id AND r.course = t.course "
                "AND r.day <> ''" + listed.replace("resource_id", "r.resource_id"), conn)
        frame["warnings"] = [() if text == "[]" else tuple(json.loads(text))
                             for text in frame["warnings"]]
        return frame

    def fractions(self, resource_ids: Iterable[str]) -> dict[tuple[str, str], list[int]]:
        """(patient, course) -> the fraction numbers of these records (the backup's resource
        IDs, as listed now: a record the backup lost no longer counts), dated or not. A
        course is a plan, or the prescription of a record made from Mosaiq."""
        out: dict[tuple[str, str], list[int]] = {}
        with self._connect() as conn:
            conn.execute("CREATE TEMP TABLE listed (resource_id TEXT PRIMARY KEY)")
            conn.executemany("INSERT OR IGNORE INTO listed VALUES (?)",
                             [(r,) for r in resource_ids])
            for patient, plan, fraction in conn.execute(
                    "SELECT patient_id, course, fraction FROM records WHERE resource_id IN "
                    "(SELECT resource_id FROM listed)"):
                numbers = out.setdefault((patient, plan), [])
                if fraction is not None:
                    numbers.append(int(fraction))
        return out

    def plans(self) -> dict[str, PlanFacts]:
        with self._connect() as conn:
            return {uid: PlanFacts(**json.loads(text))
                    for uid, text in conn.execute("SELECT sop_instance_uid, facts FROM plans")}

    def put_plans(self, plans: dict[str, PlanFacts]) -> None:
        with self._connect() as conn:
            conn.executemany("INSERT OR REPLACE INTO plans VALUES (?, ?)",
                             [(uid, json.dumps(asdict(f))) for uid, f in plans.items()])


UNREADABLE = "record unreadable"


@dataclass(frozen=True)
class UnreadableRecord:
    """A listed record whose file could not be read: what Orthanc's index still knows of it."""

    resource_id: str
    sop_instance_uid: str
    patient_id: str
    patient_name: str
    reason: str


def build_report(records: pd.DataFrame, plans: dict[str, PlanFacts], start: date,
                 end: date, unreadable: Iterable[UnreadableRecord] = (),
                 acknowledged: dict[tuple[str, str], set[int]] | None = None,
                 locale: str = "en_US", today: date | None = None) -> pd.DataFrame:
    """One row per patient per course (plan or prescription) with a session from ``start`` to
    ``end``.

    ``records``: one row per RT Record (the fields of ``RecordFacts`` and ``day``), at least
    every record up to ``end`` of each course treated in the window (``FactCache.courses``).
    The current fraction is the highest CurrentFractionNumber over every beam of every session of
    the plan up to ``end`` (not only the window's, and not the first beam's). Each unreadable
    record gets a row of its own (status ``record unreadable``): its patient's fraction count
    may be short, and a report that silently left it out could show a wrong fraction.
    ``acknowledged``: (patient, plan) -> fractions an operator said will never be in the backup
    (the ledger's); fraction continuity does not warn of them. Rows are ordered by patient name,
    then plan label, in ``locale``'s collation (ICU, numbers in natural order).
    """
    lost = [{"PatientID": u.patient_id, "PatientName": u.patient_name, "Status": UNREADABLE,
             "Warnings": f"RT Record {u.sop_instance_uid or u.resource_id} could not be read "
                         f"from the backup ({u.reason}): this patient's fractions may be "
                         "incomplete"} for u in unreadable]
    report = _course_rows(records, plans, start, end, acknowledged or {},
                          today or date.today())
    if lost:
        extra = pd.DataFrame(lost, columns=COLUMNS)
        report = pd.concat([report, extra], ignore_index=True) if len(report) else extra
    for column in ("CurrentFraction", "FractionsPlanned", "FractionsRemaining"):
        report[column] = report[column].astype("Int64")
    order = sort_key(locale)  # the site's collation, numbers in natural order
    return report.sort_values(["PatientName", "RTPlanLabel"],
                              key=lambda c: c.fillna("").astype(str).map(order),
                              kind="stable").reset_index(drop=True)


def facts_frame(records: Iterable[RecordFacts]) -> pd.DataFrame:
    """RecordFacts as the frame ``build_report`` takes (tests and small callers)."""
    frame = pd.DataFrame([asdict(r) for r in records], columns=FIELDS)
    frame["day"] = frame["treated"].fillna("").str[:10]
    return frame


def _minutes(treated: str) -> str:
    """'2026-11-18T08:00:00' as '2026-11-18 08:00', which spreadsheets open as a date-time."""
    return treated.replace("T", " ")[:16]


def latest_of_sessions(records: pd.DataFrame) -> pd.DataFrame:
    """Records we made from Mosaiq, one per session: a session made again with more fields
    (delivered after the last run) supersedes the earlier record, which the backup keeps; the
    record with the most beams is read (then the latest treated)."""
    if records.empty or "session" not in records or not (records["session"] != "").any():
        return records
    ours = records[records["session"] != ""]
    latest = ours.sort_values(["beams", "treated", "sop_instance_uid"], kind="stable") \
        .groupby(["patient_id", "course", "session"], sort=False).tail(1)
    return pd.concat([records[records["session"] == ""], latest]).sort_index()


def _course_rows(records: pd.DataFrame, plans: dict[str, PlanFacts], start: date,
                 end: date, acknowledged: dict[tuple[str, str], set[int]],
                 today: date) -> pd.DataFrame:
    if records.empty:
        return pd.DataFrame(columns=COLUMNS)
    keys = ["patient_id", "course"]
    records = latest_of_sessions(records)
    upto = records[(records["day"] != "") & (records["day"] <= end.isoformat())]
    upto = upto.sort_values("treated", kind="stable")  # "last" below: the latest session
    window = upto[upto["day"] >= start.isoformat()]
    if window.empty:
        return pd.DataFrame(columns=COLUMNS)
    in_window = window.groupby(keys, sort=False)
    latest = in_window.tail(1).set_index(keys)
    sessions = in_window.size()
    course = upto.merge(latest.index.to_frame(index=False), on=keys).groupby(keys, sort=False)
    first = course["treated"].min()  # of the course, not of the window
    current = pd.to_numeric(course["fraction"].max(), errors="coerce")
    planned_in_records = pd.to_numeric(course["fractions_planned"].last(), errors="coerce")
    course_warnings = course["warnings"].agg(lambda ws: sorted({w for t in ws for w in t}))
    # Fraction continuity over every record of the course the backup holds, dated or not.
    fractions = records.merge(latest.index.to_frame(index=False), on=keys).groupby(
        keys, sort=False)["fraction"].agg(
        lambda fs: [int(f) for f in pd.to_numeric(fs, errors="coerce").dropna()])
    # A record dated after today (a recording system's clock, a typing error) is not counted
    # up to the end date, and would hide a delivered fraction: each is named on its row.
    ahead = records[(records["day"] != "") & (records["day"] > today.isoformat())]
    future: dict[tuple[str, str], list[str]] = {}
    for _, r in ahead.iterrows():
        future.setdefault((r["patient_id"], r["course"]), []).append(
            f"fraction {r['fraction'] if pd.notna(r['fraction']) else '?'} on {r['day']}")
    rows = []
    for key, row in latest.iterrows():
        patient_id, plan_uid = key[0], row["plan_uid"]
        termination = row["termination"] or ""
        plan = plans.get(plan_uid)
        warnings = list(course_warnings[key])
        if plan_uid and plan is None:
            warnings.append("plan not in the backup")
        if key in future:
            warnings.append("record(s) dated in the future, not counted: "
                            + ", ".join(sorted(future[key])))
        gap = gap_warning(fractions[key], acknowledged.get(key, ()))
        if gap:
            warnings.append(gap)
        if termination and termination != "NORMAL":
            warnings.append(f"last session not completed normally ({termination})")
        now = int(current[key]) if pd.notna(current[key]) else None
        planned = int(planned_in_records[key]) if pd.notna(planned_in_records[key]) else (
            plan.fractions_planned if plan else None)
        remaining = max(planned - now, 0) if planned is not None and now is not None else None
        if planned is not None and now is not None and now > planned:
            warnings.append(f"fraction {now} is beyond the {planned} planned")
        rows.append({
            "PatientID": patient_id,
            "PatientName": row["patient_name"],
            "BirthDate": row["birth_date"],
            "Sex": row["sex"],
            "Physician": row["physician"],
            "RTPlanLabel": plan.label if plan else row["course_label"],
            "PlanUID": plan_uid,
            "Machine": row["machine"],
            "FirstTreatment": _minutes(first[key]),
            "LastTreatment": _minutes(row["treated"]),
            "LastMeterset": row["meterset"] if pd.notna(row["meterset"]) else None,
            "LastTermination": termination,
            "CurrentFraction": now,
            "FractionsPlanned": planned,
            "FractionsRemaining": remaining,
            "SessionsInWindow": int(sessions[key]),
            "Status": "completed in window" if remaining == 0 else "on treatment",
            "Warnings": "; ".join(warnings),
        })
    return pd.DataFrame(rows, columns=COLUMNS)
