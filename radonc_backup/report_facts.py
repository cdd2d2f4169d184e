"""What the treatment report needs from each DICOM object, read without pandas or Prefect.

Kept apart from the report itself so that the worker processes that fetch and decode records
import only pydicom and httpx (they start in a fraction of the time a pandas import takes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .errors import BackupTargetError, RetriableBackupTargetError

if TYPE_CHECKING:
    from .backup_target import OrthancBackup


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


def fetch_plan_facts(target: OrthancBackup, plan_uids: list[str],
                     ) -> tuple[dict[str, PlanFacts], dict[str, str]]:
    """Label and fraction count of the plans the backup holds; and why the unreadable failed.

    A plan the backup lacks is simply absent (its rows say so); a backup that is down raises.
    """
    found: dict[str, PlanFacts] = {}
    unreadable: dict[str, str] = {}
    for uid in plan_uids:
        try:
            ds = target.read(uid)
        except RetriableBackupTargetError:
            raise
        except BackupTargetError as exc:
            unreadable[uid] = str(exc)
            continue
        if ds is not None:
            found[uid] = plan_facts(ds)
    return found, unreadable


_TARGETS: dict[tuple[object, ...], OrthancBackup] = {}
T = TypeVar("T")


def in_worker(fn: Callable[[OrthancBackup, list[str]], T], target: OrthancBackup,
              items: list[str]) -> T:
    """``fn(target, items)`` in a worker process, on one keep-alive connection per backup per
    worker, reused across calls (opening one costs more than fetching a chunk)."""
    return fn(_TARGETS.setdefault(target.identity, target), items)


def ready() -> bool:
    """A no-op a new worker runs so that it is started before the first chunk arrives."""
    return True
