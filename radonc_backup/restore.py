"""Restore: the backup's objects sent back to an AE (a rebuilt R&V, a scratch AE for the drill),
each one verified there, and, for the drill, compared with the backup's copy.

Orthanc, the backup, sends them itself (C-STORE from its own AE, the target declared to it as a
modality); what arrived is asked of the target: through its REST API when it is an Orthanc,
else by C-FIND at image level. A dry run selects and counts, and sends nothing.
"""

from __future__ import annotations

import io
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date

from pydicom import dcmread
from pydicom.dataset import Dataset

from .backup_target import DicomScpBackup, HeldInstance, OrthancBackup, orthanc_id, wait_for
from .config import DicomScpTarget, OrthancTarget, Site
from .errors import BackupTargetError, ConfigError
from .ledger import Ledger
from .validation import differences

KINDS = ("record", "context")


def kind_of(modality: str) -> str:
    return "record" if modality == "RTRECORD" else "context"


@dataclass
class Target:
    label: str
    aet: str
    host: str
    port: int
    check: OrthancBackup | DicomScpBackup  # how arrivals are asked for
    associations: int = 1  # C-STORE associations at once (the entry's max_associations)

    @property
    def modality(self) -> str:
        """The name the backup Orthanc knows the target by."""
        return f"radonc-restore-{self.aet.lower()}"


def open_target(site: Site, alias: str = "", ae: str = "", host: str = "",
                port: int = 0) -> Target:
    """A ``restore_targets`` entry by alias, or an AE/host/port given at run time."""
    if alias:
        if alias not in site.restore_targets:
            raise ConfigError(f"site {site.name}: no restore target {alias!r} (restore_targets: "
                              f"{', '.join(sorted(site.restore_targets)) or 'none'})")
        cfg = site.restore_targets[alias]
        check: OrthancBackup | DicomScpBackup = OrthancBackup(site, alias, cfg) \
            if isinstance(cfg, OrthancTarget) else DicomScpBackup(site, alias, cfg)
        return Target(f"{alias} ({cfg.label})", cfg.aet, cfg.ip, cfg.port, check,
                      cfg.max_associations)
    if not (ae and host and port):
        raise ConfigError(f"site {site.name}: name a restore target, or give ae, host and port")
    cfg = DicomScpTarget(type="dicom_scp", aet=ae, ip=host, port=port)
    return Target(cfg.label, ae, host, port, DicomScpBackup(site, "restore", cfg))


def patients_treated(ledger: Ledger, backup: str, start: date | None, end: date | None,
                     ) -> list[str]:
    """Patients with an RT Record verified in the backup from ``start`` to ``end``."""
    first, last = f"{start or date.min:%Y%m%d}", f"{end or date.max:%Y%m%d}"
    out: set[str] = set()
    for lane in ledger.lanes():
        if lane.backup == backup:
            out |= {row.ref.patient_id for row in ledger.at(lane).rows("verified")
                    if first <= row.ref.treatment_date <= last and row.ref.patient_id}
    return sorted(out)


def choose_patients(site: Site, backup: str, patient_ids: list[str] | None,
                    start: date | None, end: date | None) -> list[str]:
    """The patients named, or those with an RT Record verified in the period."""
    if patient_ids:
        return sorted(set(patient_ids))
    if start or end:
        return patients_treated(Ledger.for_state_dir(site.state_dir), backup, start, end)
    raise ConfigError(f"site {site.name}: name the patients (patient_ids) or a period "
                      "(start_date, end_date)")


def select(backup: OrthancBackup, patient_ids: list[str], kinds: list[str]
           ) -> list[HeldInstance]:
    """What the backup holds of these patients, of these kinds (record, context)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ConfigError(f"kinds {sorted(unknown)} are not among {', '.join(KINDS)}")
    return [i for pid in patient_ids for i in backup.patient_instances(pid)
            if kind_of(i.modality) in kinds]


def plan_rows(items: list[HeldInstance]) -> list[dict[str, object]]:
    """Per patient and kind: objects and megabytes (the dry run's table)."""
    count: Counter[tuple[str, str]] = Counter()
    size: defaultdict[tuple[str, str], int] = defaultdict(int)
    for i in items:
        key = (i.ref.patient_id, kind_of(i.modality))
        count[key] += 1
        size[key] += i.size
    return [{"patient": p, "kind": k, "objects": count[(p, k)],
             "MB": round(size[(p, k)] / 1e6, 2)} for p, k in sorted(count)]


@dataclass
class Restored:
    sent: int = 0
    verified: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    why: dict[str, str] = field(default_factory=dict)  # UID -> why it was not sent

    @property
    def rate(self) -> float:
        return len(self.verified) / self.seconds if self.seconds else 0.0


def send_and_verify(backup: OrthancBackup, target: Target, items: list[HeldInstance],
                    timeout: float) -> Restored:
    """Send every item, then ask the target for each (waiting up to ``timeout`` for a target
    that indexes late); ``missing`` is what it does not hold."""
    out = Restored()
    started = time.monotonic()
    out.sent, failed = backup.send(target.modality, target.aet, target.host, target.port,
                                   [i.resource_id for i in items], target.associations)
    out.why = {i.ref.sop_instance_uid: failed[i.resource_id] for i in items
               if i.resource_id in failed}
    held = wait_for(target.check, [i.ref for i in items], timeout)
    out.seconds = time.monotonic() - started
    out.verified = sorted(held)
    out.missing = sorted({i.ref.sop_instance_uid for i in items} - held)
    return out


def compare_copies(backup: OrthancBackup, target: OrthancBackup, items: list[HeldInstance],
                   ) -> dict[str, str]:
    """Each object as the target holds it against the backup's copy, whole (pixel data too when
    both are in one transfer syntax), group 0002 aside. Returns UID -> what differs."""
    out: dict[str, str] = {}
    for i in items:
        r = i.ref
        theirs_id = orthanc_id(r.patient_id, r.study_uid, r.series_uid, r.sop_instance_uid)
        ours = _whole(backup, i.resource_id)
        try:
            theirs = _whole(target, theirs_id)
        except BackupTargetError as exc:  # gone from the target since it was verified there
            out[r.sop_instance_uid] = f"its copy on the target cannot be read ({exc})"
            continue
        if ours.file_meta.get("TransferSyntaxUID") != theirs.file_meta.get("TransferSyntaxUID"):
            for ds in (ours, theirs):
                if "PixelData" in ds:
                    del ds.PixelData
        differ = differences(ours, theirs)
        if differ:
            out[r.sop_instance_uid] = ", ".join(differ[:10])
    return out


def _whole(target: OrthancBackup, resource_id: str) -> Dataset:
    return dcmread(io.BytesIO(target.fetch_file(resource_id)))
