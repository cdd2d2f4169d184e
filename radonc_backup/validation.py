"""Validation: does the backup still hold everything the ledger calls verified?

A backup PACS can lose data after the fact (a disk replaced, storage restored from an older
snapshot, an operator deleting a study). The sweep asks the backup for every verified instance,
records and plan context alike; whatever is gone goes back to 'failed' in the ledger (and its
patients' plan contexts back to incomplete), so the next backup and backfill runs move it again.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from .backup_target import BackupTarget, OrthancBackup, orthanc_id
from .errors import BackupTargetError
from .instance import InstanceRef
from .ledger import LaneLedger, Ledger

if TYPE_CHECKING:
    from .lane import OpenLane

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


# --- The two-way sweep: source against backup, a day at a time -----------------------------

FOUND = ("missing", "absent", "unknown-to-ledger", "unreadable", "content-differs",
         "count-differs")
"""Discrepancy kinds: ``missing`` on the source (and maybe verified in the ledger), not in the
backup; ``absent`` verified in the ledger, in neither; ``unknown-to-ledger`` in the backup, in
no lane's ledger; ``unreadable`` in the backup, its file damaged or not DICOM;
``content-differs`` source and backup copies differ (``content`` depth); ``count-differs`` a
series holds another number of the day's records on each side."""
READERS = 4
"""Records read back at once (MD5 check and fetch) on one keep-alive client."""
CSV_COLUMNS = ["day", "patient_id", "study_uid", "series_uid", "sop_instance_uid", "kind",
               "detail", "repaired"]


@dataclass
class Discrepancy:
    day: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    kind: str
    detail: str
    repaired: str = ""  # '', 'repaired', or why not
    ref: InstanceRef | None = field(default=None, repr=False, compare=False)
    ledger_kind: str = "record"

    @classmethod
    def of(cls, ref: InstanceRef, kind: str, detail: str, day: str = "",
           ledger_kind: str = "record") -> "Discrepancy":
        return cls(day or ref.treatment_date, ref.patient_id, ref.study_uid, ref.series_uid,
                   ref.sop_instance_uid, kind, detail, ref=ref, ledger_kind=ledger_kind)

    def row(self) -> dict[str, str]:
        return {c: str(getattr(self, c)) for c in CSV_COLUMNS}


def past_states(ledger: LaneLedger, uid: str, row: object) -> str:
    """What the ledger's history says of a row that is not verified now: "verified on ...,
    failed on ... (why)", or never verified."""
    if row is None:
        return "never verified (ledger: unknown)"
    seen = ledger.history(uid)
    if not any(state == "verified" for state, _, _ in seen):
        return f"never verified (ledger: {row.state})"  # type: ignore[attr-defined]
    return ", ".join(f"{state} on {at[:16].replace('T', ' ')}" + (f" ({detail[:120]})"
                     if detail and state == "failed" else "") for state, at, detail in seen
                     if state in ("verified", "failed"))


@dataclass
class DayCheck:
    day: str
    on_source: int = 0
    in_backup: int = 0
    discrepancies: list[Discrepancy] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_day(ledger: LaneLedger, target: OrthancBackup, day: str,
              source_refs: list[InstanceRef], held: dict[str, str],
              source_copies: Callable[[list[InstanceRef]], dict[str, Dataset]] | None = None,
              ) -> DayCheck:
    """One day's RT Records, both ways: the source's (``source_refs``, from its C-FIND or
    Mosaiq's SQL) and the ledger's against the backup (``held``: its record listing), each
    present one read back (MD5 and parse), and with ``source_copies`` compared element by
    element. A record is called missing only after a query by its own UID misses it too."""
    check = DayCheck(day, on_source=len(source_refs))
    on_source = {r.sop_instance_uid: r for r in source_refs}
    ledger_rows = {row.ref.sop_instance_uid: row for row in ledger.rows(kind="record", day=day)}
    unseen = [r for u, r in on_source.items() if u not in held]
    gone_ledger = [row.ref for u, row in ledger_rows.items()
                   if row.state == "verified" and u not in held and u not in on_source]
    late = target.present_by_uid(unseen + gone_ledger) if unseen or gone_ledger else set()
    for r in unseen:
        if r.sop_instance_uid in late:
            continue
        row = ledger_rows.get(r.sop_instance_uid)
        detail = ("verified in the ledger, absent from the backup" if row and
                  row.state == "verified" else past_states(ledger, r.sop_instance_uid, row))
        check.discrepancies.append(Discrepancy.of(r, "missing", detail, day))
    for r in gone_ledger:
        if r.sop_instance_uid not in late:
            check.discrepancies.append(Discrepancy.of(
                r, "absent", "verified in the ledger; neither the backup nor the source holds "
                             "it now", day))

    present = {u: r for u, r in {**{row.ref.sop_instance_uid: row.ref
                                    for row in ledger_rows.values()}, **on_source}.items()
               if u in held or u in late}
    check.in_backup = len(present)
    copies: dict[str, Dataset] = {}

    def read_back(ref: InstanceRef) -> tuple[InstanceRef, str, Dataset | None]:
        uid = ref.sop_instance_uid
        resource = held.get(uid) or orthanc_id(ref.patient_id, ref.study_uid, ref.series_uid,
                                               uid)
        damage = target.damage(resource)
        if damage:
            return ref, damage, None
        try:
            return ref, "", target.read_resource(resource, uid)
        except BackupTargetError as exc:
            return ref, f"not readable DICOM: {str(exc).split(': ')[-1]}", None

    target.connect()
    with ThreadPoolExecutor(max_workers=READERS) as pool:  # Orthanc answers in parallel
        for ref, damage, ds in pool.map(read_back, present.values()):
            if ds is not None:
                copies[ref.sop_instance_uid] = ds
            else:
                check.discrepancies.append(Discrepancy.of(ref, "unreadable", damage, day))

    if source_copies is not None:
        wanted = [on_source[u] for u in copies if u in on_source]
        theirs = source_copies(wanted) if wanted else {}
        for r in wanted:
            if r.sop_instance_uid not in theirs:
                check.notes.append(f"{r.sop_instance_uid}: the source sent no copy to compare")
                continue
            differ = differences(theirs[r.sop_instance_uid], copies[r.sop_instance_uid])
            if differ:
                check.discrepancies.append(Discrepancy.of(
                    r, "content-differs", "differs in " + ", ".join(differ[:20])
                    + (f" and {len(differ) - 20} more" if len(differ) > 20 else ""), day))

    per_series: dict[tuple[str, str, str], list[int]] = {}
    for r in on_source.values():
        per_series.setdefault((r.patient_id, r.study_uid, r.series_uid), [0, 0])[0] += 1
        if r.sop_instance_uid in present:
            per_series[(r.patient_id, r.study_uid, r.series_uid)][1] += 1
    for (patient, study, series), (theirs_n, ours_n) in per_series.items():
        if theirs_n != ours_n:
            check.discrepancies.append(Discrepancy(
                day, patient, study, series, "", "count-differs",
                f"{theirs_n} record(s) of this day on the source, {ours_n} in the backup"))
    return check


def differences(a: Dataset, b: Dataset, prefix: str = "") -> list[str]:
    """Keywords (or tags) whose values differ between two datasets, group 0002 aside and
    compared as decoded values (another character set or transfer syntax is not a
    difference). Sequences are compared item by item, named ``Seq[i].Keyword``."""
    out: list[str] = []
    tags = sorted({t for t in a.keys() if t.group != 2} | {t for t in b.keys() if t.group != 2})
    for tag in tags:
        if tag == 0x00080005:  # SpecificCharacterSet: the encoding, not the content
            continue
        x, y = a.get(tag), b.get(tag)
        one = x if x is not None else y
        name = prefix + (one.keyword or str(tag))  # type: ignore[union-attr]
        if x is None or y is None:
            if one.value not in (None, "", b"", []):  # type: ignore[union-attr]
                out.append(name)  # an empty Type 2 element and no element are the same
            continue
        if x.VR == "SQ" or y.VR == "SQ":
            xs, ys = list(x.value or []), list(y.value or [])
            if len(xs) != len(ys):
                out.append(name)
                continue
            for i, (p, q) in enumerate(zip(xs, ys)):
                out += differences(p, q, f"{name}[{i}].")
            continue
        if _plain(x.value) != _plain(y.value):
            out.append(name)
    return out


def _plain(value: object) -> object:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]  # type: ignore[union-attr]
    if isinstance(value, bytes):
        return value.rstrip(b"\0 ")
    if isinstance(value, (int, float)):  # IS and DS: 1.50 and 1.5 are one value
        return float(value)
    return str(value).strip()


def unknown_to_ledger(ledger: Ledger, backup: str, held: dict[str, str],
                      target: OrthancBackup) -> list[Discrepancy]:
    """RT Records in the backup that no lane's ledger to it knows (stored by hand, or by
    another system): reported, never deleted."""
    known: set[str] = set()
    uids = list(held)
    for lane in ledger.lanes():
        if lane.backup == backup:
            known |= set(ledger.at(lane).states(uids))
    out = []
    for uid in sorted(set(uids) - known):
        facts = target.describe(held[uid])
        out.append(Discrepancy("", facts["PatientID"], "", "", uid, "unknown-to-ledger",
                               f"in the backup (Orthanc {held[uid]}), in no ledger of backup "
                               f"{backup}"))
    return out


def context_damage(ledger: LaneLedger, target: OrthancBackup, patient_ids: set[str],
                   ) -> list[Discrepancy]:
    """The MD5 check of every verified plan-context object of these patients."""
    out = []
    for row in ledger.rows("verified", kind="context"):
        r = row.ref
        if r.patient_id not in patient_ids:
            continue
        damage = target.damage(orthanc_id(r.patient_id, r.study_uid, r.series_uid,
                                          r.sop_instance_uid))
        if damage and damage != "not in the backup":  # presence: validate_lane's to say
            out.append(Discrepancy.of(r, "unreadable", damage, "", ledger_kind="context"))
    return out


NOT_REPAIRABLE = {
    "absent": "the source no longer holds it: nothing to move again",
    "unknown-to-ledger": "the sweep never deletes from the backup: check who stored it",
    "content-differs": "changed on the source after the backup: the backup keeps the copy as "
                       "delivered; review the change",
    "count-differs": "see the rows of its instances",
}


def repair(lane: "OpenLane", found: list[Discrepancy]) -> None:
    """Move again, by the one delivery path, what is missing or unreadable (a damaged copy is
    deleted first), then read each back: ``repaired`` says what holds afterwards."""
    from .transfer import deliver

    target = lane.target
    if not isinstance(target, OrthancBackup):
        raise TypeError("repair needs an Orthanc backup")
    fixable = [d for d in found if d.kind in ("missing", "unreadable") and d.ref is not None]
    for d in found:
        if d not in fixable:
            d.repaired = "not repaired: " + NOT_REPAIRABLE.get(d.kind, "no source reference")
    for d in fixable:
        if d.kind == "unreadable":
            target.delete(_resource(d.ref))  # type: ignore[arg-type]
    lane.ledger.reopen_missing({d.sop_instance_uid: f"validation sweep: {d.kind}: {d.detail}"
                                for d in fixable})
    wait = lane.site.settings.verify_timeout
    for kind in ("record", "context"):
        refs = [d.ref for d in fixable if d.ledger_kind == kind]
        if refs:
            try:
                deliver(lane, refs, kind, wait=wait)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - each row says what became of it below
                for d in fixable:
                    if d.ledger_kind == kind:
                        d.repaired = f"not repaired: {exc}"
    states = lane.ledger.states(d.sop_instance_uid for d in fixable)
    for d in fixable:
        if d.repaired:
            continue
        damage = target.damage(_resource(d.ref)) if \
            states.get(d.sop_instance_uid) == "verified" else "not verified after the move"
        d.repaired = "repaired" if not damage else f"not repaired: {damage}"
    # A series' count row is derived from its instances' rows: it is repaired when each of
    # them is (and never counted as left on its own).
    for d in found:
        if d.kind != "count-differs":
            continue
        rows = [x for x in found if x.kind != "count-differs" and x.series_uid == d.series_uid
                and x.patient_id == d.patient_id]
        if rows and all(x.repaired == "repaired" for x in rows):
            d.repaired = "repaired"


def _resource(ref: InstanceRef) -> str:
    return orthanc_id(ref.patient_id, ref.study_uid, ref.series_uid, ref.sop_instance_uid)


def source_copies(lane: "OpenLane", refs: list[InstanceRef]) -> dict[str, Dataset]:
    """The source's own copy of each record, to compare: Mosaiq's as made from its SQL this
    run (staged), a DICOM source's by C-GET (a move-only peer refuses: the caller notes it)."""
    from pydicom import dcmread

    from .config import MosaiqSource
    from .mosaiq import staging_dir
    from .transfer import move_identifiers

    if isinstance(lane.source, MosaiqSource):
        folder = staging_dir(lane.site, lane.lane.source)
        return {r.sop_instance_uid: dcmread(folder / f"{r.sop_instance_uid}.dcm")
                for r in refs if (folder / f"{r.sop_instance_uid}.dcm").exists()}
    client = lane.client()
    wanted = {r.sop_instance_uid for r in refs}
    received: list[Dataset] = []
    classes = sorted({r.sop_class_uid for r in refs if r.sop_class_uid})
    for ident in move_identifiers(refs, lane.source.relational_move, lane.source.retrieve):
        client.get(ident, received.append, classes)
    return {str(ds.SOPInstanceUID): ds for ds in received if str(ds.SOPInstanceUID) in wanted}
