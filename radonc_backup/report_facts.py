"""What the treatment report needs from each DICOM object, read without pandas or Prefect.

Kept apart from the report itself so that the worker processes that fetch and decode records
import only pydicom and httpx (they start in a fraction of the time a pandas import takes).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.values import convert_IS_string, convert_UI

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
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        warnings.append(f"invalid {name} {str(value)!r}")
        return None


BEAM_SEQUENCE = 0x30080020  # TreatmentSessionBeamSequence
ION_BEAM_SEQUENCE = 0x30080021  # TreatmentSessionIonBeamSequence (RT Ion Beams Treatment Record)
FRACTION_NUMBER = 0x30080022  # CurrentFractionNumber (IS)
TERMINATION_STATUS = 0x3008002A  # TreatmentTerminationStatus (CS): NORMAL, OPERATOR, MACHINE...
DELIVERED_METERSET = 0x30080036  # DeliveredPrimaryMeterset (DS), MU of the beam this session
PLAN_SEQUENCE = 0x300C0002  # ReferencedRTPlanSequence
REFERENCED_UID = 0x00081155  # ReferencedSOPInstanceUID (UI)
_CONVERTERS = {"IS": convert_IS_string, "UI": convert_UI,  # ASCII-only VRs: no character set
               "DS": lambda raw, _: float(raw.decode("ascii").strip(" \0")),
               "CS": lambda raw, _: raw.decode("ascii").strip(" \0")}
_ITEM, _UNDEFINED = (0xFFFE, 0xE000), 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
             b"SV", b"UV"}


def item_values(ds: Dataset, sequence: int, element: int, vr: str) -> list[object]:
    """One element of every item of a sequence, e.g. the fraction number of every beam.

    The beam sequence is most of a record, and pydicom builds a dataset for every item and
    converts every value it is asked for (~60 us an item). In the form almost every file has
    (explicit VR little endian, defined lengths) this reads the items' element headers in place
    and converts only the one value; any other form goes through pydicom's datasets, with the
    same result (tests compare both).
    """
    return [values[element] for values in items_values(ds, sequence, {element: vr})]


def items_values(ds: Dataset, sequence: int, elements: dict[int, str],
                 ) -> list[dict[int, object]]:
    """Several elements (tag: VR) of every item of a sequence, in one pass over its bytes."""
    fast = _scan_items(ds, sequence, set(elements))
    if fast is not None:
        return [{tag: _convert(found.get(tag), vr) for tag, vr in elements.items()}
                for found in fast]
    items = ds[sequence].value if sequence in ds else None
    return [{tag: _value(item[tag].value) if tag in item else None for tag in elements}
            for item in items or []]


def _value(value: object) -> object:
    """pydicom's DSfloat/DSdecimal as float, like the in-place reader gives."""
    return float(value) if type(value).__name__ in ("DSfloat", "DSdecimal") else value


def _convert(raw: bytes | None, vr: str) -> object:
    """A value converted as pydicom converts it, kept as text when it does not convert."""
    if raw is None:
        return None
    try:
        return _CONVERTERS[vr](raw, True)
    except ValueError:
        return raw.decode("ascii", "replace").strip(" \0")


def _scan_items(ds: Dataset, sequence: int, wanted: set[int],
                ) -> list[dict[int, bytes]] | None:
    """Raw bytes of the wanted elements in each item, or None when the sequence is not in
    simple form."""
    raw = ds.get_item(sequence) if sequence in ds else None
    if raw is None:
        return []
    if not isinstance(raw, RawDataElement) or raw.VR != "SQ" or raw.is_implicit_VR \
            or not raw.is_little_endian or not isinstance(raw.value, bytes) \
            or raw.length == _UNDEFINED:
        return None  # e.g. a sequence stored as UN: pydicom knows how to read those
    data, pos, found = raw.value, 0, []
    while pos < len(data):
        if len(data) - pos < 8:
            return None
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        if (group, elem) != _ITEM or length == _UNDEFINED or pos + 8 + length > len(data):
            return None
        values = _find_elements(data, pos + 8, pos + 8 + length, wanted)
        if values is None:
            return None
        found.append(values)
        pos += 8 + length
    return found


def _find_elements(data: bytes, pos: int, end: int, wanted: set[int]) -> dict[int, bytes] | None:
    """The values of ``wanted`` in one item's explicit VR LE elements; None if not readable."""
    found: dict[int, bytes] = {}
    while pos < end and len(found) < len(wanted):
        if end - pos < 8:
            return None
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if end - pos < 12:
                return None
            length, header = struct.unpack_from("<L", data, pos + 8)[0], 12
        elif vr.isalpha() and vr.isupper():
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        else:
            return None  # not explicit VR after all
        if length == _UNDEFINED or pos + header + length > end:
            return None
        if (group << 16) | elem in wanted:
            found[(group << 16) | elem] = data[pos + header:pos + header + length]
        pos += header + length
    return found


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
    meterset: float | None = None  # MU delivered in this session, all beams
    termination: str = ""  # NORMAL when every beam ended normally, else the first other status
    course: str = ""  # what the report's rows are of: the plan, or a record series we made
    course_label: str = ""  # the course's name when no plan names it (Mosaiq's prescription)
    session: str = ""  # of records we made: the session, for which a later record supersedes
    beams: int = 0  # beams in the record (the most wins among records of one session)
    warnings: tuple[str, ...] = field(default_factory=tuple)


MADE_BY_US = "RadOnc Backup"
"""Manufacturer of the RT Records this project makes (from Mosaiq's SQL). Such a record names
no plan: its course is its series (one per prescription), and a session made again with more
fields supersedes the earlier record of that session."""
MU_LIMIT = 2000.0  # MU per beam above which a delivered meterset is called absurd


def record_facts(ds: Dataset) -> RecordFacts:
    """Parse one record; missing fields become blanks and warnings, never an exception."""
    uid = str(ds.get("SOPInstanceUID", ""))
    warnings = []
    plans = item_values(ds, PLAN_SEQUENCE, REFERENCED_UID, "UI")
    plan_uid = str(plans[0] or "") if plans else ""
    # Ours (made from Mosaiq's SQL, which knows no plan UID): the prescription is the course.
    ours = str(ds.get("Manufacturer", "") or "") == MADE_BY_US and not plan_uid
    if not plan_uid and not ours:
        warnings.append("no referenced RT Plan")
    machines = ds.get("TreatmentMachineSequence") or []
    machine = str(machines[0].get("TreatmentMachineName", "")) if machines else ""
    if not machine:
        warnings.append("no treatment machine")
    fractions, metersets, statuses = [], [], []
    beams_tag = ION_BEAM_SEQUENCE if ION_BEAM_SEQUENCE in ds and BEAM_SEQUENCE not in ds \
        else BEAM_SEQUENCE
    for beam in items_values(ds, beams_tag, {FRACTION_NUMBER: "IS", DELIVERED_METERSET: "DS",
                                             TERMINATION_STATUS: "CS"}):
        value = _integer(beam[FRACTION_NUMBER], "CurrentFractionNumber", warnings)
        if value is not None:
            fractions.append(value)
        if isinstance(beam[DELIVERED_METERSET], (int, float)):
            metersets.append(float(beam[DELIVERED_METERSET]))
        statuses.append(str(beam[TERMINATION_STATUS] or "").strip())
    if not fractions:
        warnings.append("no CurrentFractionNumber")
    elif min(fractions) <= 0:
        warnings.append(f"fraction number {min(fractions)}")
    if any(m < 0 for m in metersets):
        warnings.append(f"negative delivered meterset ({min(metersets):g} MU)")
    if any(m > MU_LIMIT for m in metersets):
        warnings.append(f"delivered meterset of {max(metersets):g} MU on one beam (over "
                        f"{MU_LIMIT:g})")
    abnormal = [st for st in statuses if st != "NORMAL"]
    termination = (abnormal[0] or "not recorded") if abnormal else ("NORMAL" if statuses else "")
    day = _iso_date(ds.get("TreatmentDate"))
    if not day:
        warnings.append("no TreatmentDate")
    time_text = str(ds.get("TreatmentTime", "") or "").split(".")[0]
    treated = day
    if day and len(time_text) >= 4 and time_text.isdigit():
        time_text = time_text.ljust(6, "0")
        treated = f"{day}T{time_text[:2]}:{time_text[2:4]}:{time_text[4:6]}"
    planned = _integer(ds.get("NumberOfFractionsPlanned"), "NumberOfFractionsPlanned", warnings)
    fraction = max(fractions) if fractions else None
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
        fraction=fraction,
        fractions_planned=planned,
        meterset=round(sum(metersets), 3) if metersets else None,
        termination=termination,
        course=str(ds.get("SeriesInstanceUID", "") or "") if ours else plan_uid,
        course_label=str(ds.get("SeriesDescription", "") or "") if ours else "",
        session=(f"fraction {fraction}" if fraction is not None else f"day {day}") if ours
        else "",
        beams=len(statuses),
        warnings=tuple(warnings),
    )


def _read_each(keys: list[str], read: Callable[[str], Dataset | None],
               unreadable: dict[str, str]) -> Iterator[tuple[str, Dataset]]:
    """Each object the backup holds, read; why the others failed goes into ``unreadable``.

    A backup that is down raises (retriable) instead: that is not the object's fault.
    """
    for key in keys:
        try:
            ds = read(key)
        except RetriableBackupTargetError:
            raise
        except BackupTargetError as exc:
            unreadable[key] = str(exc)
            continue
        if ds is not None:
            yield key, ds


def fetch_facts(target: OrthancBackup, resource_ids: list[str],
                ) -> tuple[list[tuple[str, RecordFacts]], dict[str, str]]:
    """Fetch and parse records by Orthanc ID; returns the facts and, per unreadable record, why.

    A record that cannot be fetched or decoded is named, never skipped silently.
    """
    parsed: list[tuple[str, RecordFacts]] = []
    unreadable: dict[str, str] = {}
    for rid, ds in _read_each(resource_ids, target.read_resource, unreadable):
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

    A plan the backup lacks is simply absent (its rows say so).
    """
    unreadable: dict[str, str] = {}
    found = {uid: plan_facts(ds) for uid, ds in _read_each(plan_uids, target.read, unreadable)}
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
