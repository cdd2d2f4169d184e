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
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .errors import BackupTargetError, RetriableBackupTargetError

if TYPE_CHECKING:
    from .backup_target import OrthancBackup

COLUMNS = [
    "PatientID", "PatientName", "BirthDate", "Sex", "Physician", "RTPlanLabel", "PlanUID",
    "Machine", "FirstTreatment", "LastTreatment", "CurrentFraction", "FractionsPlanned",
    "FractionsRemaining", "SessionsInWindow", "Status", "Warnings",
]


def readable_name(pn: object) -> str:
    """'Müller^Jürgen^Karl^Dr.^' -> 'Müller, Jürgen Karl' (prefix and suffix dropped)."""
    text = str(pn or "").split("=")[0]
    family, given, middle = (text.split("^") + ["", "", ""])[:3]
    first = " ".join(p for p in (given, middle) if p)
    return f"{family}, {first}" if family and first else family or first


def _iso_date(value: object) -> str:
    text = str(value or "").strip()
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date().isoformat() if text else ""
    except ValueError:
        return ""


def _integer(value: object, name: str, warnings: list[str]) -> int | None:
    """An IS value as int; an invalid one is a warning (the rest of the record still counts)."""
    if value in (None, ""):
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        warnings.append(f"invalid {name} {str(value)!r}")
        return None


@dataclass(frozen=True)
class RecordFacts:
    """What the report needs from one RT Record, with what was missing."""

    sop_instance_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    physician: str
    plan_uid: str
    machine: str
    treated: str  # ISO date-time, local, '' if unknown
    fraction: int | None
    fractions_planned: int | None
    warnings: tuple[str, ...] = field(default_factory=tuple)


def record_facts(ds: Dataset) -> RecordFacts:
    """Parse one record; missing fields become blanks and warnings, never an exception."""
    uid = str(ds.get("SOPInstanceUID", ""))
    warnings = []
    plans = ds.get("ReferencedRTPlanSequence") or []
    plan_uid = str(plans[0].get("ReferencedSOPInstanceUID", "")) if plans else ""
    if not plan_uid:
        warnings.append("no referenced RT Plan")
    machines = ds.get("TreatmentMachineSequence") or []
    machine = str(machines[0].get("TreatmentMachineName", "")) if machines else ""
    if not machine:
        warnings.append("no treatment machine")
    fractions = []
    for beam in ds.get("TreatmentSessionBeamSequence") or []:
        value = _integer(beam.get("CurrentFractionNumber"), "CurrentFractionNumber", warnings)
        if value is not None:
            fractions.append(value)
    if not fractions:
        warnings.append("no CurrentFractionNumber")
    day = _iso_date(ds.get("TreatmentDate"))
    if not day:
        warnings.append("no TreatmentDate")
    time_text = str(ds.get("TreatmentTime", "") or "").split(".")[0]
    treated = day
    if day and len(time_text) >= 4 and time_text.isdigit():
        time_text = time_text.ljust(6, "0")
        treated = f"{day}T{time_text[:2]}:{time_text[2:4]}:{time_text[4:6]}"
    planned = _integer(ds.get("NumberOfFractionsPlanned"), "NumberOfFractionsPlanned", warnings)
    physicians = ds.get("PhysiciansOfRecord") or ds.get("ReferringPhysicianName") or ""
    if isinstance(physicians, (MultiValue, list)):  # several physicians: the first is of record
        physicians = physicians[0] if physicians else ""
    return RecordFacts(
        sop_instance_uid=uid,
        patient_id=str(ds.get("PatientID", "")),
        patient_name=readable_name(ds.get("PatientName", "")),
        birth_date=_iso_date(ds.get("PatientBirthDate")),
        sex=str(ds.get("PatientSex", "") or ""),
        physician=readable_name(physicians),
        plan_uid=plan_uid,
        machine=machine,
        treated=treated,
        fraction=max(fractions) if fractions else None,
        fractions_planned=planned,
        warnings=tuple(warnings),
    )


def fetch_facts(target: "OrthancBackup", resource_ids: list[str],
                ) -> tuple[list[tuple[str, RecordFacts]], dict[str, str]]:
    """Fetch and parse records by Orthanc ID; returns the facts and, per unreadable record, why.

    A record that cannot be fetched or decoded is named, never skipped silently; a backup that
    is down raises (retriable) instead.
    """
    parsed: list[tuple[str, RecordFacts]] = []
    unreadable: dict[str, str] = {}
    for rid in resource_ids:
        try:
            ds = target.read_resource(rid)
        except RetriableBackupTargetError:
            raise
        except BackupTargetError as exc:
            unreadable[rid] = str(exc)
            continue
        try:
            parsed.append((rid, record_facts(ds)))
        except Exception as exc:  # a value pydicom cannot convert: name the record
            unreadable[rid] = (f"RT Record {ds.get('SOPInstanceUID', rid)} (patient "
                               f"{ds.get('PatientID', '?')}) could not be parsed: {exc}")
    return parsed, unreadable


@dataclass(frozen=True)
class PlanFacts:
    label: str
    fractions_planned: int | None


def plan_facts(ds: Dataset) -> PlanFacts:
    groups = ds.get("FractionGroupSequence") or []
    ignored: list[str] = []  # an invalid count in the plan: the record's count still shows
    planned = [n for g in groups
               if (n := _integer(g.get("NumberOfFractionsPlanned"), "", ignored)) is not None]
    return PlanFacts(str(ds.get("RTPlanLabel", "") or ""), max(planned) if planned else None)


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

    def put_plan(self, uid: str, facts: PlanFacts) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO plans VALUES (?, ?)",
                         (uid, json.dumps(asdict(facts))))


def build_report(records: Iterable[RecordFacts], plans: dict[str, PlanFacts], start: date,
                 end: date) -> pd.DataFrame:
    """One row per patient per plan with at least one session from ``start`` to ``end``.

    The current fraction is the highest CurrentFractionNumber over every beam of every session of
    the plan up to ``end`` (not only the window's, and not the first beam's).
    """
    frame = pd.DataFrame([asdict(r) for r in records])
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    frame["day"] = frame["treated"].str[:10]
    upto = frame[(frame["day"] != "") & (frame["day"] <= end.isoformat())]
    window = upto[upto["day"] >= start.isoformat()]
    rows = []
    for (patient_id, plan_uid), sessions in window.groupby(["patient_id", "plan_uid"],
                                                           sort=False):
        course = upto[(upto["patient_id"] == patient_id) & (upto["plan_uid"] == plan_uid)]
        latest = sessions.sort_values("treated").iloc[-1]
        plan = plans.get(plan_uid)
        warnings = sorted({w for ws in course["warnings"] for w in ws})
        if plan_uid and plan is None:
            warnings.append("plan not in the backup")
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
            "FirstTreatment": sessions["treated"].min(),
            "LastTreatment": sessions["treated"].max(),
            "CurrentFraction": current,
            "FractionsPlanned": planned,
            "FractionsRemaining": remaining,
            "SessionsInWindow": len(sessions),
            "Status": "completed in window" if remaining == 0 else "on treatment",
            "Warnings": "; ".join(warnings),
        })
    report = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("CurrentFraction", "FractionsPlanned", "FractionsRemaining"):
        report[column] = report[column].astype("Int64")
    return report.sort_values(["PatientName", "RTPlanLabel"], key=lambda c: c.str.casefold(),
                              kind="stable").reset_index(drop=True)
