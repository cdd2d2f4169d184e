"""Validation: does the backup still hold everything the ledger calls verified?

A backup PACS can lose data after the fact (a disk replaced, storage restored from an older
snapshot, an operator deleting a study). The sweep asks the backup for every verified instance,
records and plan context alike; whatever is gone goes back to 'failed' in the ledger (and its
patients' plan contexts back to incomplete), so the next backup and backfill runs move it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .backup_target import BackupTarget
from .ledger import LaneLedger

KINDS = ("record", "context")
CHUNK = 2000


@dataclass
class Validation:
    checked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    missing: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    reopened_contexts: int = 0

    @property
    def missing_count(self) -> int:
        return sum(len(v) for v in self.missing.values())


def validate_lane(ledger: LaneLedger, target: BackupTarget, chunk: int = CHUNK,
                  on_progress: Callable[[int, int], None] | None = None) -> Validation:
    """Check every verified row of the lane against the backup; reopen what is gone.

    ``on_progress(done, total)`` is called after each chunk (a progress bar for long sweeps).
    """
    result = Validation()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    verified = {kind: [row.ref for row in ledger.rows("verified", kind=kind)]
                for kind in KINDS}
    total, done = sum(len(refs) for refs in verified.values()), 0
    for kind in KINDS:
        refs = verified[kind]
        result.checked[kind] = len(refs)
        for i in range(0, len(refs), chunk):
            part = refs[i:i + chunk]
            held = target.present(part)
            done += len(part)
            if on_progress:
                on_progress(done, total)
            gone = [r for r in part if r.sop_instance_uid not in held]
            if not gone:
                continue
            why = (f"verified earlier, missing from backup {ledger.lane.backup} at validation "
                   f"{stamp}")
            ledger.reopen_missing({r.sop_instance_uid: why for r in gone})
            result.missing[kind] += [r.sop_instance_uid for r in gone]
            if kind == "context":
                result.reopened_contexts += ledger.reopen_contexts((r.patient_id for r in gone),
                                                              why)
    return result
