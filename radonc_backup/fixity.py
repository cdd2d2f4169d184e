"""Fixity: is each stored file still the bytes that arrived?

The ledger keeps, per object verified in the backup, the MD5 and size of its stored file: the
MD5 Orthanc recorded when the object arrived, taken the first time the file is checked (with
its size when the bytes read match it; a first check that does not match is named, and the
size left unknown), and never rewritten. Each check reads the whole file back from the backup
(the backup Orthanc runs with its storage cache off, so the bytes come from the disk) and
compares its MD5 with both: the ledger's (a second record, kept outside Orthanc's database)
and Orthanc's. Every object whose bytes changed, that is gone, or that cannot be read is named.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .backup_target import OrthancBackup, orthanc_id
from .errors import BackupTargetError, RetriableBackupTargetError
from .instance import InstanceRef


@dataclass
class FixityCheck:
    checked: int = 0
    recorded: int = 0  # digests recorded for the first time
    bytes: int = 0
    problems: dict[str, str] = field(default_factory=dict)  # UID -> patient and why
    rows: list[tuple[str, str, int, str]] = field(default_factory=list)  # for the ledger


def check_files(target: OrthancBackup, refs: Iterable[InstanceRef],
                known: dict[str, tuple[str, int, str]],
                on_checked: Callable[[int], None] | None = None) -> FixityCheck:
    """Read each object's file from the backup and compare its MD5 with the ledger's (``known``)
    and with Orthanc's record of its arrival."""
    out = FixityCheck()
    for ref in refs:
        uid = ref.sop_instance_uid
        who = f"patient {ref.patient_id}"
        resource = orthanc_id(ref.patient_id, ref.study_uid, ref.series_uid, uid)
        try:
            data = target.fetch_file(resource, uid)
        except RetriableBackupTargetError:
            raise
        except BackupTargetError as exc:
            out.problems[uid] = f"{who}: cannot be read from the backup ({exc})"
            out.checked += 1
            continue
        md5, size = hashlib.md5(data).hexdigest(), len(data)
        arrival = target.stored_md5(resource)
        ours = known.get(uid)
        problem = ""
        if ours is not None and (ours[0] != md5 or 0 <= ours[1] != size):
            problem = (f"{who}: its file changed since its digest was recorded (MD5 {md5}, "
                       f"{size} bytes; the ledger holds {ours[0]}, {ours[1]} bytes)")
        elif arrival and arrival != md5:
            problem = (f"{who}: its file does not match the MD5 Orthanc recorded when it arrived "
                       "(changed or damaged on disk)")
        if problem:
            out.problems[uid] = problem
        if ours is None:  # first seen: the digest of the bytes that arrived, as Orthanc kept it
            ours = (arrival or md5, size if not arrival or arrival == md5 else -1, "")
            out.recorded += 1
        out.rows.append((uid, ours[0], ours[1], problem))
        out.checked, out.bytes = out.checked + 1, out.bytes + size
        if on_checked is not None:
            on_checked(out.checked)
    return out
