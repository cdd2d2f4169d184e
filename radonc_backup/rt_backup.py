"""Backing up RT Records: find them on the R&V, move what the backup lacks, verify, record.

Plain functions over the DICOM layer, the backup target and the ledger; the Prefect tasks and
flows only wrap them. The rules that keep data from being lost:
- a failed query raises; it is never taken for "nothing new";
- a window whose answer reaches the peer's result cap is split and asked again;
- a C-MOVE's own status is recorded but never trusted: only ``present()`` in the backup verifies;
- what is found is written to the ledger before anything is moved, so every later run retries it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from pydicom.dataset import Dataset

from .backup_target import BackupTarget, wait_for
from .config import AriaSource, MimSource, Site
from .dicom_net import RT_RECORD_CLASSES, DicomClient, MoveResult, identifier
from .errors import BackupError, ConfigError, DicomError, FatalDicomError, FindTruncated, \
    RetriableBackupTargetError, RetriableDicomError
from .instance import InstanceRef
from .ledger import Lane, Ledger
from .windows import DayQuery, parse_treatment_datetime


def dicom_source(site: Site, alias: str | None) -> tuple[str, AriaSource | MimSource]:
    name, source = site.source(alias)
    if not isinstance(source, (AriaSource, MimSource)):
        raise ConfigError(f"{site.config_path}: site {site.name}: source {name!r} is of type "
                          f"{source.type!r}; RT Record backup by DICOM needs an 'aria' or 'mim' "
                          f"source")
    return name, source


def record_identifier(query: DayQuery) -> Dataset:
    """IMAGE-level C-FIND for RT Records of one local date (and time range)."""
    return identifier("IMAGE", Modality="RTRECORD", PatientID="", StudyInstanceUID="",
                      SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="",
                      TreatmentDate=query.treatment_date, TreatmentTime=query.treatment_time)


def _in_query(ref: InstanceRef, query: DayQuery) -> bool:
    """Our own check of the peer's matching; a record we cannot place is kept, not dropped."""
    when = parse_treatment_datetime(ref.treatment_date, ref.treatment_time)
    if when is None:
        return True
    if when.date() != query.day:
        return False
    if query.whole_day or not ref.treatment_time.strip():
        return True
    return query.start <= when.time().replace(microsecond=0) <= query.end


def find_records(client: DicomClient, queries: Iterable[DayQuery], cap: int = 0,
                 on_split: Callable[[DayQuery], None] | None = None) -> list[InstanceRef]:
    """Every RT Record the peer holds in the queries' windows, de-duplicated by SOP UID.

    A query that the peer cut short (a Cancel status, or ``cap`` or more matches from a peer that
    truncates silently) is split in two and both halves are asked; a one-second window still cut
    short is an error.
    """
    found: dict[str, InstanceRef] = {}
    pending = list(queries)
    while pending:
        query = pending.pop(0)
        matches: list[InstanceRef] = []
        truncated = False
        try:
            for m in client.find(record_identifier(query)):
                if m.get("SOPInstanceUID"):
                    matches.append(InstanceRef.from_match(m))
        except FindTruncated:
            truncated = True
        if truncated or (cap and len(matches) >= cap):
            halves = query.split()
            if halves is None:
                raise FatalDicomError(client.site, client.peer.label, "C-FIND",
                                      f"the peer still cuts its answer short for the one-second "
                                      f"window {query} ({len(matches)} matches): raise its "
                                      f"C-FIND result limit", calling_ae=client.calling_ae)
            if on_split:
                on_split(query)
            pending[:0] = list(halves)
            continue
        for ref in matches:
            if ref.sop_class_uid and ref.sop_class_uid not in RT_RECORD_CLASSES:
                continue
            if _in_query(ref, query):
                found.setdefault(ref.sop_instance_uid, ref)
    return sorted(found.values(), key=lambda r: (r.treatment_date, r.treatment_time,
                                                 r.sop_instance_uid))


def patient_record_identifier(patient_id: str) -> Dataset:
    """IMAGE-level C-FIND for every RT Record of one patient, whatever its date."""
    return identifier("IMAGE", Modality="RTRECORD", PatientID=patient_id, StudyInstanceUID="",
                      SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="",
                      TreatmentDate="", TreatmentTime="")


def find_patient_records(client: DicomClient, patient_ids: Iterable[str],
                         cap: int = 0) -> list[InstanceRef]:
    """Every RT Record of these patients, asked one patient at a time and without a date.

    The nightly net under the date queries: a record with an empty TreatmentDate (Type 2), or
    without a TreatmentTime in a day that had to be split into time ranges, matches no date
    query, but it matches its patient. A match for another patient (a peer that ignored the
    key) or of another class is dropped; an answer that reaches the peer's cap is an error,
    never a silent cut.
    """
    found: dict[str, InstanceRef] = {}
    for patient_id in patient_ids:
        matches = [InstanceRef.from_match(m)
                   for m in client.find(patient_record_identifier(patient_id))
                   if m.get("SOPInstanceUID")]
        if cap and len(matches) >= cap:
            raise FatalDicomError(client.site, client.peer.label, "C-FIND",
                                  f"patient {patient_id}: {len(matches)} RT Records reach the "
                                  f"peer's cap of {cap}: raise its C-FIND result limit",
                                  calling_ae=client.calling_ae)
        for ref in matches:
            if ref.patient_id != patient_id:
                continue
            if ref.sop_class_uid and ref.sop_class_uid not in RT_RECORD_CLASSES:
                continue
            found.setdefault(ref.sop_instance_uid, ref)
    return sorted(found.values(), key=lambda r: (r.patient_id, r.treatment_date,
                                                 r.treatment_time, r.sop_instance_uid))


def batches(refs: Iterable[InstanceRef], size: int) -> list[list[InstanceRef]]:
    """Batches of at most ``size``, series kept together so each C-MOVE lists many UIDs."""
    ordered = sorted(refs, key=lambda r: (r.series_key, r.sop_instance_uid))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def move_identifiers(batch: Iterable[InstanceRef], relational: bool = False) -> list[Dataset]:
    """One IMAGE-level identifier per series, with the full hierarchy ARIA insists on.

    ``relational``: a single identifier listing every UID, for peers that support relational
    retrieve (one C-MOVE for a whole batch instead of one per series).
    """
    if relational:
        uids = sorted({ref.sop_instance_uid for ref in batch})
        return [identifier("IMAGE", SOPInstanceUID=uids if len(uids) > 1 else uids[0])]
    by_series: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for ref in batch:
        by_series[ref.series_key].append(ref.sop_instance_uid)
    identifiers = []
    for (patient_id, study, series), uids in sorted(by_series.items()):
        known = {k: v for k, v in (("PatientID", patient_id), ("StudyInstanceUID", study),
                                   ("SeriesInstanceUID", series)) if v}
        identifiers.append(identifier("IMAGE", **known,
                                      SOPInstanceUID=uids if len(uids) > 1 else uids[0]))
    return identifiers


@dataclass
class BatchOutcome:
    requested: int = 0
    moved: int = 0
    verified: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    peer_claims: str = ""
    # Moved to a backup that may index later, not seen yet: settled with the run's other such
    # objects in one wait (see settle), so refused objects do not cost one timeout per batch.
    awaiting: list[Awaiting] = field(default_factory=list)


@dataclass(frozen=True)
class Awaiting:
    """An object moved to a backup that indexes later, and what to record if it never shows."""

    ref: InstanceRef
    reason: str  # the ledger's error if it is still absent after the wait
    what: str = ""  # the part of a plan's context it belongs to, e.g. "series 1.2.3"


def verify_present(ledger: Ledger, lane: Lane, target: BackupTarget,
                   refs: list[InstanceRef], timeout: float = 0.0) -> set[str]:
    """Mark verified what the backup holds; returns those UIDs."""
    if not refs:
        return set()
    present = wait_for(target, refs, timeout)
    ledger.mark_verified(lane, present)
    return present


def settle(ledger: Ledger, lane: Lane, target: BackupTarget, awaiting: list[Awaiting],
           timeout: float) -> set[str]:
    """One wait, of at most ``timeout``, for every object of a run moved to a backup that may
    index later; what is still absent is marked failed with its own reason. Returns the UIDs
    present. Waiting here once, instead of in each batch or plan, makes the waits overlap."""
    present = verify_present(ledger, lane, target, [a.ref for a in awaiting], timeout)
    ledger.mark_failed(lane, {a.ref.sop_instance_uid: a.reason for a in awaiting
                              if a.ref.sop_instance_uid not in present})
    return present


def backup_unreachable(site: Site, target: BackupTarget) -> str | None:
    """Why the backup's DICOM port does not answer a C-ECHO from us, or None when it does."""
    peer = site.backup_targets.get(target.alias)
    if peer is None:
        return None
    try:
        site.client(peer).echo()
    except RetriableDicomError as exc:
        return str(exc)
    except DicomError:
        return None  # it answered (even a refusal): the backup is up
    return None


def transfer(site: Site, source: AriaSource | MimSource, target: BackupTarget,
             batch: list[InstanceRef], store_client: DicomClient | None = None) -> str:
    """Ask the source to deliver ``batch`` to the backup; returns what the peer claimed.

    ARIA-type sources C-MOVE straight to the backup AE. MIM-type sources are fetched by C-GET and
    relayed by C-STORE (``store_client`` talks to the backup's DICOM port).
    """
    client = site.client(source)
    identifiers = move_identifiers(batch, source.relational_move)
    if isinstance(source, AriaSource):
        results = _parallel_moves(client, identifiers, target.aet,
                                  site.settings.move_associations)
        completed = sum(r.completed for r in results)
        failed = sum(r.failed for r in results)
        statuses = ",".join(sorted({f"0x{r.status:04X}" for r in results}))
        return f"C-MOVE status {statuses}, {completed} completed, {failed} failed"
    if store_client is None:
        raise ConfigError(f"site {site.name}: MIM relay needs a DICOM backup target")
    refused: list[str] = []
    for ident in identifiers:
        received: list[Dataset] = []
        client.get(ident, received.append)
        refused += [r.sop_instance_uid for r in store_client.store(received) if not r.ok]
    return f"C-GET + C-STORE relay, {len(refused)} refused by the backup"


def _parallel_moves(client: DicomClient, identifiers: list[Dataset], destination: str,
                    associations: int) -> list[MoveResult]:
    """Spread C-MOVEs over a few associations: each costs the peer a sub-association of its own.

    All moves run to the end; the first DICOM error is raised afterwards, so one bad series does
    not leave the others unattempted.
    """
    if associations <= 1 or len(identifiers) <= 1:
        return client.move(identifiers, destination)
    shares = [identifiers[i::associations] for i in range(associations)]
    results: list[MoveResult] = []
    errors: list[DicomError] = []
    with ThreadPoolExecutor(max_workers=associations) as pool:
        futures = [pool.submit(client.move, share, destination) for share in shares if share]
        for future in futures:
            try:
                results += future.result()
            except DicomError as exc:
                errors.append(exc)
    if errors:
        raise errors[0]
    return results


def move_and_verify(site: Site, source: AriaSource | MimSource, target: BackupTarget,
                    ledger: Ledger, lane: Lane, batch: list[InstanceRef],
                    store_client: DicomClient | None = None) -> BatchOutcome:
    """Move one batch and verify it; every UID ends the call verified or failed in the ledger,
    or, with a backup that may index later, listed in ``awaiting`` for the run's ``settle``.

    On a DICOM error the batch is still checked in the backup (a move can deliver part of its
    objects before it fails), the rest is marked failed, and the error is raised for the retry
    policy to judge.
    """
    outcome = BatchOutcome(requested=len(batch))
    states = ledger.states(lane, [r.sop_instance_uid for r in batch])
    todo = [r for r in batch if states.get(r.sop_instance_uid) != "verified"]
    if not todo:
        return outcome
    ledger.mark_moved(lane, [r.sop_instance_uid for r in todo])
    outcome.moved = len(todo)
    error: BackupError | None = None
    try:
        outcome.peer_claims = transfer(site, source, target, todo, store_client)
    except DicomError as exc:
        error = exc
        down = None if isinstance(exc, RetriableDicomError) else backup_unreachable(site, target)
        if down:  # the R&V could not deliver because the backup is down: worth another try
            error = RetriableBackupTargetError(
                f"site {site.name}: backup {target.alias} unreachable during the move from "
                f"{source.label}: {down}")
    try:
        present = verify_present(ledger, lane, target, todo)  # one look; waits come in settle
    except Exception:
        if error is not None:
            present = set()
        else:
            raise
    outcome.verified = sorted(present)
    reason = (str(error) if error else
              f"not found in backup {target.alias} ({target.aet}) after the move "
              f"({outcome.peer_claims})")
    absent = [r for r in todo if r.sop_instance_uid not in present]
    if error is None and not target.confirms_on_receipt:
        outcome.awaiting = [Awaiting(r, reason) for r in absent]
    else:
        outcome.failed = {r.sop_instance_uid: reason for r in absent}
        ledger.mark_failed(lane, outcome.failed)
    if error is not None:
        raise error
    return outcome


@dataclass
class Plan:
    """What a run must do after finding: the lane's unverified rows, new and old."""

    found: int
    new: int
    already_verified: int
    todo: list[InstanceRef]


def plan_work(ledger: Ledger, lane: Lane, found: list[InstanceRef]) -> Plan:
    """Record what was found, then take every unverified row of the lane (earlier failures too)."""
    new = ledger.record_found(lane, found)
    states = ledger.states(lane, [r.sop_instance_uid for r in found])
    already = sum(1 for s in states.values() if s == "verified")
    return Plan(found=len(found), new=new, already_verified=already, todo=ledger.unverified(lane))


def window_label(start: datetime, end: datetime) -> str:
    return f"{start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S}"
