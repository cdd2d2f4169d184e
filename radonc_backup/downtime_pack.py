"""The downtime pack: what a clinic needs to go on treating in file mode when the R&V and the
network are gone, built ahead of time from the backup alone.

For every patient of the treatment report (treated in the last N days): a folder with the
plan context the backup holds of them (plans, structure sets, planning images, doses), the last
RT Record of each course, and a sheet a therapist can treat the next fraction from (identity;
per course the prescription, what was delivered, the next fraction and its limit check, beams
with the last session's MU, setup and approval: ``treatment_sheet``); beside them the report
itself (CSV and its print view). Built in ``<name>.partial`` and switched in by renaming and
repointing ``current`` only when whole: a failed build never replaces the last good pack.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
from pydicom.dataset import Dataset
from jinja2 import Environment, PackageLoader, select_autoescape

from .backup_target import HeldInstance, OrthancBackup
from .export import held_path, make_private, patient_folder, write_items
from .report_facts import MADE_BY_US
from .restore import kind_of
from .treatment_sheet import PlanSheet, plan_sheet

STAMP = "built-utc.txt"  # in each pack: when its build began (UTC), for refreshes and status
AS_OF = "as-of.txt"  # in each patient's folder: the newest record on its sheet (site time)
_ENV = Environment(loader=PackageLoader("radonc_backup", "templates"),
                   autoescape=select_autoescape(["html", "j2"]))
CURRENT = "current"


@dataclass
class Pack:
    folder: Path
    patients: int = 0
    files: int = 0
    bytes: int = 0
    refreshed: int = 0  # patients whose folder was made anew (the others linked from the last)
    linked: int = 0  # files linked from the last good pack instead of read from the backup
    not_written: dict[str, str] = field(default_factory=dict)  # UID -> why (named on the sheet)


def course_of(ds: Dataset) -> str:
    """The course a record belongs to, as the report groups them: its plan, or for a record we
    made from Mosaiq (no plan) its prescription's series; else the record alone."""
    plans = ds.get("ReferencedRTPlanSequence") or []
    plan = str(plans[0].get("ReferencedSOPInstanceUID", "")) if plans else ""
    if plan:
        return plan
    if str(ds.get("Manufacturer", "") or "") == MADE_BY_US:
        return f"series {ds.get('SeriesInstanceUID', '')}"
    return f"record {ds.get('SOPInstanceUID', '')}"


def _session_order(ds: Dataset) -> tuple[str, int]:
    beams = ds.get("TreatmentSessionBeamSequence") or ds.get("TreatmentSessionIonBeamSequence")
    return (f"{ds.get('TreatmentDate', '') or ''}{ds.get('TreatmentTime', '') or ''}",
            len(beams or []))


def last_records(records: list[tuple[HeldInstance, Dataset]]) -> list[HeldInstance]:
    """The latest RT Record of each course (by TreatmentDate and Time, then the most beams: a
    Mosaiq session made again with more fields supersedes its earlier record)."""
    latest: dict[str, tuple[tuple[str, int], HeldInstance]] = {}
    for item, ds in records:
        key, when = course_of(ds), _session_order(ds)
        if key not in latest or when > latest[key][0]:
            latest[key] = (when, item)
    return [item for _, item in latest.values()]


def course_sheets(backup: OrthancBackup, rows: list[dict[str, object]],
                  records: list[Dataset]) -> list[tuple[dict[str, object], PlanSheet]]:
    """Each report row of one patient with the sheet of its course, from the backup alone."""
    by_course: dict[str, list[Dataset]] = {}
    for ds in records:
        by_course.setdefault(course_of(ds), []).append(ds)
    out = []
    for row in rows:
        plan_uid = str(row.get("PlanUID", "") or "")
        if plan_uid:
            course, plan = plan_uid, backup.read(plan_uid)
        else:  # Mosaiq: the prescription's series, named by the row's label
            course = next((key for key, group in by_course.items() if key.startswith("series ")
                           and str(group[0].get("SeriesDescription", "")) == row["RTPlanLabel"]),
                          "")
            plan = None
        out.append((row, plan_sheet(plan, by_course.get(course, []), plan_expected=bool(
            plan_uid))))
    return out


def newest_record(courses: list[tuple[dict[str, object], PlanSheet]]) -> str:
    """The latest session on a patient's sheet ('YYYY-MM-DD HH:MM', site time; '' if none)."""
    return max((s.last_treatment for _, s in courses if s.last_treatment), default="")


def sheet(rows: list[dict[str, object]], courses: list[tuple[dict[str, object], PlanSheet]],
          site: str, backup: str, generated: datetime,
          missing: dict[str, str] | None = None) -> str:
    first = rows[0]
    newest = newest_record(courses)
    return _ENV.get_template("downtime_sheet.html.j2").render(
        patient_id=first["PatientID"], name=first["PatientName"], birth_date=first["BirthDate"],
        sex=first["Sex"], site=site, backup=backup, courses=courses, as_of=newest,
        missing=sorted((missing or {}).items()),
        generated=f"{generated:%Y-%m-%d %H:%M}")


def _link_tree(old: Path, new: Path) -> tuple[int, int]:
    """``old`` copied to ``new`` as hard links (the same files, no bytes read or written)."""
    files = size = 0
    for path in old.rglob("*"):
        if path.is_file():
            target = new / path.relative_to(old)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
            files, size = files + 1, size + path.stat().st_size
    return files, size


def _write_or_link(backup: OrthancBackup, items: list[HeldInstance], into: Path,
                   last: Path | None, pack: Pack, failed: dict[str, str]) -> tuple[int, int]:
    """Each item's file under ``into``: linked from the last good pack when it holds it (an
    instance's file never changes), else read from the backup."""
    files = size = 0
    fetch = []
    for item in items:
        old = last / held_path(item) if last is not None else None
        if old is not None and old.is_file():
            target = into / held_path(item)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(old, target)
            files, size, pack.linked = files + 1, size + old.stat().st_size, pack.linked + 1
        else:
            fetch.append(item)
    written, more = write_items(backup, fetch, into, failed=failed)
    return files + written, size + more


def built_at(pack: Path) -> datetime | None:
    """When the build of ``pack`` (or of the pack ``current`` points at) began, UTC."""
    try:
        return datetime.fromisoformat((pack / STAMP).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


@dataclass
class PackStatus:
    folder: Path | None
    built: datetime | None
    patients: int
    as_of: str  # the newest record on any of its sheets


def status(root: Path) -> PackStatus:
    """Where the last good pack is, when it was built, and how fresh its sheets are."""
    current = root / CURRENT
    if not current.is_dir():
        return PackStatus(None, None, 0, "")
    folder = current.resolve()
    sheets = list(folder.glob("*/sheet.html"))
    newest = max((p.read_text(encoding="utf-8").strip() for p in folder.glob(f"*/{AS_OF}")),
                 default="")
    return PackStatus(folder, built_at(folder), len(sheets), newest)


def build(backup: OrthancBackup, report: pd.DataFrame, root: Path, name: str, site: str,
          extra_files: list[Path], generated: datetime, keep: int = 2,
          refresh: set[str] | None = None, started: datetime | None = None) -> Pack:
    """Write the pack ``root/name`` and point ``root/current`` at it; keep the ``keep`` newest
    packs. On any error the partial folder is removed and ``current`` is untouched.

    ``refresh``: only these patients' folders are made anew (those whose records a backup run
    just verified); every other patient's folder is linked from the last good pack when it has
    one, and the instance files of the refreshed ones too when it holds them. None: every
    folder is made anew from the backup (the nightly build: nothing is taken on trust)."""
    root.mkdir(parents=True, exist_ok=True)
    final, partial = root / name, root / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    pack = Pack(final)
    if started is not None:
        (partial / STAMP).write_text(started.isoformat(), encoding="ascii")
    last = (root / CURRENT).resolve() if refresh is not None and (root / CURRENT).is_dir() \
        else None
    rows = report.astype(object).where(report.notna(), "").to_dict(orient="records")
    try:
        for path in extra_files:
            shutil.copy2(path, partial / path.name)
        by_patient: dict[str, list[dict[str, object]]] = {}
        for row in rows:
            by_patient.setdefault(str(row["PatientID"]), []).append(row)
        for patient_id, plans in by_patient.items():
            folder = partial / patient_folder(patient_id)
            if last is not None and refresh is not None and patient_id not in refresh \
                    and (last / patient_folder(patient_id) / "sheet.html").is_file():
                files, size = _link_tree(last / patient_folder(patient_id), folder)
                pack.linked += files
            else:
                held = backup.patient_instances(patient_id)
                context = [i for i in held if kind_of(i.modality) == "context"]
                read = [(i, backup.read_resource(i.resource_id, i.ref.sop_instance_uid))
                        for i in held if kind_of(i.modality) == "record"]
                failed: dict[str, str] = {}
                files, size = _write_or_link(backup, context + last_records(read), partial,
                                             last, pack, failed)
                pack.not_written.update(failed)
                folder.mkdir(parents=True, exist_ok=True)
                courses = course_sheets(backup, plans, [ds for _, ds in read])
                (folder / "sheet.html").write_text(
                    sheet(plans, courses, site, backup.alias, generated, failed),
                    encoding="utf-8")
                (folder / AS_OF).write_text(newest_record(courses), encoding="utf-8")
                pack.refreshed += 1
            pack.patients += 1
            pack.files, pack.bytes = pack.files + files, pack.bytes + size
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    make_private(partial)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    link = root / f".{CURRENT}.new"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(name)
    os.replace(link, root / CURRENT)  # atomic: readers see the old pack or the new one
    packs = sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                    and not p.name.endswith(".partial")), key=lambda p: p.name)
    for old in packs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return pack
