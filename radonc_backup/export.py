"""Export from the backup to a folder: one folder per patient, study and series, plain DICOM
files (no DICOMDIR), optionally zipped, optionally pseudonymized with dicognito.

Pseudonymization is for the export only (the backup is never altered): one dicognito
Anonymizer per export, so a patient's IDs and every UID are replaced the same way across all
their studies and the references between objects (record -> plan -> structure set -> images)
still hold. A ``seed`` makes a later export of the same patients give the same pseudonyms; it
is a secret, like a key: whoever has it can redo the mapping.

The export is written to ``<folder>.partial`` and renamed when whole: a folder without that
suffix is never half written.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from .backup_target import HeldInstance, OrthancBackup
from .errors import RetriableBackupTargetError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe(name: object, fallback: str = "unknown") -> str:
    """A folder name from a DICOM value: letters, digits, dot, dash and underscore."""
    text = _UNSAFE.sub("_", str(name or "").strip()).strip("._")
    return text[:64] or fallback


def patient_folder(patient_id: object) -> str:
    """One folder per patient whatever the ID: the ID itself when it is already a safe name,
    else its safe form with a short digest of the real ID (``C3/X1``, ``C3_X1`` and ``C3 X1``
    are three folders, never one). The real ID is on the sheet and in every file."""
    real = str(patient_id or "")
    name = safe(real)
    if name == real:
        return name
    return f"{name[:55]}-{hashlib.sha256(real.encode('utf-8')).hexdigest()[:8]}"


def relative_path(ds: Dataset) -> Path:
    """``<patient folder>/<StudyInstanceUID>/<Modality>_<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
    (the patient folder: ``patient_folder``)."""
    return (Path(patient_folder(ds.get("PatientID"))) / safe(ds.get("StudyInstanceUID"))
            / f"{safe(ds.get('Modality'), 'OT')}_{safe(ds.get('SeriesInstanceUID'))}"
            / f"{safe(ds.get('SOPInstanceUID'))}.dcm")


def held_path(item: HeldInstance) -> Path:
    """Where ``relative_path`` puts an instance the backup holds, known without reading it."""
    ref = item.ref
    return (Path(patient_folder(ref.patient_id)) / safe(ref.study_uid)
            / f"{safe(item.modality, 'OT')}_{safe(ref.series_uid)}"
            / f"{safe(ref.sop_instance_uid)}.dcm")


def make_private(root: Path) -> None:
    """Patient data for its owner alone: folders 0700, files 0600 (the pack's and the export's
    files hold names, birth dates and treatment)."""
    root.chmod(0o700)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(0o700 if path.is_dir() else 0o600)


@dataclass
class Exported:
    folder: Path
    files: int = 0
    bytes: int = 0
    archive: Path | None = None
    not_written: dict[str, str] = field(default_factory=dict)  # UID -> why (the run fails)


def pseudonymizer(seed: str | None) -> object:
    """dicognito's pseudonyms, then PS3.15's Basic Profile (``deidentify``)."""
    from .deidentify import Deidentifier

    return Deidentifier(seed)


def write_items(backup: OrthancBackup, items: list[HeldInstance], into: Path,
                anonymizer: object | None = None,
                on_written: Callable[[int], None] | None = None,
                failed: dict[str, str] | None = None) -> tuple[int, int]:
    """Each item's file from the backup under ``into`` (pseudonymized with ``anonymizer``);
    ``on_written(n)`` hears of each. Returns files and bytes written. ``failed``: an object
    that cannot be read or parsed is named there (UID -> patient, kind and why) and the rest
    are written; without it the first such object is raised. A backup that cannot be reached
    is raised either way."""
    files = size = 0
    for item in items:
        try:
            data = backup.fetch_verified(item.resource_id, item.ref.sop_instance_uid)
            ds = dcmread(io.BytesIO(data))
        except RetriableBackupTargetError:
            raise
        except Exception as exc:
            if failed is None:
                raise
            kind = "record" if item.modality == "RTRECORD" else "context"
            failed[item.ref.sop_instance_uid] = (f"patient {item.ref.patient_id}, {kind}: "
                                                 f"cannot be read from the backup ({exc})")
            continue
        if anonymizer is not None:
            anonymizer.anonymize(ds)  # type: ignore[attr-defined]
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            data = out.getvalue()
        path = into / relative_path(ds)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files, size = files + 1, size + len(data)
        if on_written is not None:
            on_written(files)
    return files, size


def export(backup: OrthancBackup, items: list[HeldInstance], folder: Path,
           pseudonymize: bool = False, seed: str | None = None, zip_it: bool = False,
           on_written: Callable[[int], None] | None = None) -> Exported:
    """Write ``items`` to ``folder`` (which must not exist yet), whole or not at all."""
    if folder.exists():
        raise FileExistsError(f"{folder} exists: export to a new folder")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    failed: dict[str, str] = {}
    try:
        files, size = write_items(backup, items, partial,
                                  pseudonymizer(seed) if pseudonymize else None, on_written,
                                  failed)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest: dict[str, object] = {"files": files, "bytes": size, "pseudonymized": pseudonymize,
                                   "not_written": failed}
    if pseudonymize:
        from .deidentify import MANIFEST

        manifest.update(MANIFEST)
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    make_private(partial)
    partial.rename(folder)
    out = Exported(folder, files, size, not_written=failed)
    if zip_it:
        out.archive = Path(shutil.make_archive(str(folder), "zip", root_dir=folder))
        out.archive.chmod(0o600)
    return out
