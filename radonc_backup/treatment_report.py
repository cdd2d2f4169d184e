"""Who is on treatment, on which plan and machine, at which fraction: from the backup alone.

Each RT Record is parsed once into ``RecordFacts`` (records are immutable) and kept in a cache
addressable by SOP Instance UID; a report is a pure function of those facts and the plans' labels,
so it can be rebuilt at any time without the R&V. One row per patient per plan.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from .report_facts import PlanFacts, RecordFacts

# In the order the people who act on it read: who, which plan on which machine, where in the
# course, when last, whether it needs a look; then the rest, and the UID last (it is long).
COLUMNS = [
    "PatientID", "PatientName", "RTPlanLabel", "Machine", "CurrentFraction", "FractionsPlanned",
    "FractionsRemaining", "LastTreatment", "LastMeterset", "LastTermination", "Status",
    "Warnings", "SessionsInWindow", "FirstTreatment", "BirthDate", "Sex", "Physician", "PlanUID",
]


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
                         "resource_id TEXT UNIQUE, facts TEXT NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS plans (sop_instance_uid TEXT PRIMARY KEY, "
                         "facts TEXT NOT NULL)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            yield conn
            conn.commit()
        finally:
            conn.close()

    def known_resources(self) -> set[str]:
        with self._connect() as conn:
            return {r[0] for r in conn.execute("SELECT resource_id FROM records")}

    def put_records(self, items: Iterable[tuple[str, RecordFacts]]) -> None:
        with self._connect() as conn:
            conn.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                             [(f.sop_instance_uid, rid, json.dumps(asdict(f)))
                              for rid, f in items])

    def records(self, resource_ids: Iterable[str] | None = None) -> list[RecordFacts]:
        with self._connect() as conn:
            rows = conn.execute("SELECT resource_id, facts FROM records").fetchall()
        wanted = set(resource_ids) if resource_ids is not None else None
        out = []
        for rid, text in rows:
            if wanted is None or rid in wanted:
                data = json.loads(text)
                data["warnings"] = tuple(data["warnings"])
                out.append(RecordFacts(**data))
        return out

    def record(self, sop_instance_uid: str) -> RecordFacts | None:
        with self._connect() as conn:
            row = conn.execute("SELECT facts FROM records WHERE sop_instance_uid=?",
                               (sop_instance_uid,)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        data["warnings"] = tuple(data["warnings"])
        return RecordFacts(**data)

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


def build_report(records: Iterable[RecordFacts], plans: dict[str, PlanFacts], start: date,
                 end: date, unreadable: Iterable[UnreadableRecord] = ()) -> pd.DataFrame:
    """One row per patient per plan with at least one session from ``start`` to ``end``.

    The current fraction is the highest CurrentFractionNumber over every beam of every session of
    the plan up to ``end`` (not only the window's, and not the first beam's). Each unreadable
    record gets a row of its own (status ``record unreadable``): its patient's fraction count
    may be short, and a report that silently left it out could show a wrong fraction.
    """
    lost = [{"PatientID": u.patient_id, "PatientName": u.patient_name, "Status": UNREADABLE,
             "Warnings": f"RT Record {u.sop_instance_uid or u.resource_id} could not be read "
                         f"from the backup ({u.reason}): this patient's fractions may be "
                         "incomplete"} for u in unreadable]
    report = _course_rows(records, plans, start, end)
    if lost:
        extra = pd.DataFrame(lost, columns=COLUMNS)
        report = pd.concat([report, extra], ignore_index=True) if len(report) else extra
    for column in ("CurrentFraction", "FractionsPlanned", "FractionsRemaining"):
        report[column] = report[column].astype("Int64")
    return report.sort_values(["PatientName", "RTPlanLabel"],
                              key=lambda c: c.fillna("").str.casefold(),
                              kind="stable").reset_index(drop=True)


def _minutes(treated: str) -> str:
    """'2026-11-18T08:00:00' as '2026-11-18 08:00', which spreadsheets open as a date-time."""
    return treated.replace("T", " ")[:16]


def _course_rows(records: Iterable[RecordFacts], plans: dict[str, PlanFacts], start: date,
                 end: date) -> pd.DataFrame:
    frame = pd.DataFrame([asdict(r) for r in records])
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    frame["day"] = frame["treated"].str[:10]
    upto = frame[(frame["day"] != "") & (frame["day"] <= end.isoformat())]
    window = upto[upto["day"] >= start.isoformat()]
    rows = []
    courses = dict(iter(upto.groupby(["patient_id", "plan_uid"], sort=False)))
    for (patient_id, plan_uid), sessions in window.groupby(["patient_id", "plan_uid"],
                                                           sort=False):
        course = courses[(patient_id, plan_uid)]
        latest = sessions.sort_values("treated").iloc[-1]
        termination = latest["termination"] if "termination" in latest else ""
        plan = plans.get(plan_uid)
        warnings = sorted({w for ws in course["warnings"] for w in ws})
        if plan_uid and plan is None:
            warnings.append("plan not in the backup")
        if termination and termination != "NORMAL":
            warnings.append(f"last session not completed normally ({termination})")
        fractions = course["fraction"].dropna()
        current = int(fractions.max()) if not fractions.empty else None
        planned_values = course["fractions_planned"].dropna()
        planned = int(planned_values.iloc[-1]) if not planned_values.empty else (
            plan.fractions_planned if plan else None)
        remaining = max(planned - current, 0) if planned is not None and current is not None \
            else None
        rows.append({
            "PatientID": patient_id,
            "PatientName": latest["patient_name"],
            "BirthDate": latest["birth_date"],
            "Sex": latest["sex"],
            "Physician": latest["physician"],
            "RTPlanLabel": plan.label if plan else "",
            "PlanUID": plan_uid,
            "Machine": latest["machine"],
            "FirstTreatment": _minutes(sessions["treated"].min()),
            "LastTreatment": _minutes(latest["treated"]),
            "LastMeterset": latest["meterset"] if pd.notna(latest["meterset"]) else None,
            "LastTermination": termination,
            "CurrentFraction": current,
            "FractionsPlanned": planned,
            "FractionsRemaining": remaining,
            "SessionsInWindow": len(sessions),
            "Status": "completed in window" if remaining == 0 else "on treatment",
            "Warnings": "; ".join(warnings),
        })
    return pd.DataFrame(rows, columns=COLUMNS)
