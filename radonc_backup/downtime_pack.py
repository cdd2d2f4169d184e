"""The downtime pack: what a clinic needs to go on treating in file mode when the R&V and the
network are gone, built ahead of time from the backup alone.

For every patient of the treatment report (treated in the last N days): a folder with the
plan context the backup holds of them (plans, structure sets, planning images, doses), the last
RT Record of each plan, and a one-page sheet (identity, plan, machine, fractions delivered and
planned, last treatment, warnings such as a fraction beyond the plan); beside them the report
itself (CSV and its print view). Built in ``<name>.partial`` and switched in by renaming and
repointing ``current`` only when whole: a failed build never replaces the last good pack.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from .backup_target import HeldInstance, OrthancBackup
from .export import safe, write_items
from .restore import kind_of

_ENV = Environment(loader=PackageLoader("radonc_backup", "templates"),
                   autoescape=select_autoescape(["html", "j2"]))
CURRENT = "current"


@dataclass
class Pack:
    folder: Path
    patients: int = 0
    files: int = 0
    bytes: int = 0


def last_records(backup: OrthancBackup, records: list[HeldInstance]) -> list[HeldInstance]:
    """The latest RT Record of each plan (by TreatmentDate and Time; a record without a plan
    reference counts as its own plan)."""
    latest: dict[str, tuple[str, HeldInstance]] = {}
    for item in records:
        ds = backup.read_resource(item.resource_id, item.ref.sop_instance_uid)
        plans = ds.get("ReferencedRTPlanSequence") or []
        plan = str(plans[0].get("ReferencedSOPInstanceUID", "")) if plans else ""
        when = f"{ds.get('TreatmentDate', '') or ''}{ds.get('TreatmentTime', '') or ''}"
        key = plan or item.ref.sop_instance_uid
        if key not in latest or when > latest[key][0]:
            latest[key] = (when, item)
    return [item for _, item in latest.values()]


def sheet(rows: list[dict[str, object]], site: str, backup: str, generated: datetime) -> str:
    first = rows[0]
    return _ENV.get_template("downtime_sheet.html.j2").render(
        patient_id=first["PatientID"], name=first["PatientName"], birth_date=first["BirthDate"],
        sex=first["Sex"], site=site, backup=backup, plans=rows,
        generated=f"{generated:%Y-%m-%d %H:%M}")


def build(backup: OrthancBackup, report: pd.DataFrame, root: Path, name: str, site: str,
          extra_files: list[Path], generated: datetime, keep: int = 2) -> Pack:
    """Write the pack ``root/name`` and point ``root/current`` at it; keep the ``keep`` newest
    packs. On any error the partial folder is removed and ``current`` is untouched."""
    root.mkdir(parents=True, exist_ok=True)
    final, partial = root / name, root / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    pack = Pack(final)
    rows = report.astype(object).where(report.notna(), "").to_dict(orient="records")
    try:
        for path in extra_files:
            shutil.copy2(path, partial / path.name)
        by_patient: dict[str, list[dict[str, object]]] = {}
        for row in rows:
            by_patient.setdefault(str(row["PatientID"]), []).append(row)
        for patient_id, plans in by_patient.items():
            held = backup.patient_instances(patient_id)
            context = [i for i in held if kind_of(i.modality) == "context"]
            records = last_records(backup, [i for i in held if kind_of(i.modality) == "record"])
            files, size = write_items(backup, context + records, partial)
            folder = partial / safe(patient_id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "sheet.html").write_text(sheet(plans, site, backup.alias, generated),
                                               encoding="utf-8")
            pack.patients += 1
            pack.files, pack.bytes = pack.files + files, pack.bytes + size
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
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
