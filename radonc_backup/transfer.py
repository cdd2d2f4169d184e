"""One delivery path: what was found goes to the backup, and ends verified or failed.

``deliver`` is the only way an object reaches the backup, for RT Records and plan-context
objects alike: the ledger row is written first (found), then marked moved, the source is asked
to deliver in the lane's retrieve mode (C-MOVE straight to the backup, or C-GET relayed by
C-STORE), and only the backup's own answer verifies. A C-MOVE status counts for nothing; an
identifier the peer refuses fails its own UIDs with its own error; a backup that stopped
answering during the move is a retriable error naming it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from .backup_target import BackupTarget, wait_for
from .config import AriaSource, MosaiqSource, Site
from .dicom_net import DicomClient, MoveResult, StoreResult, identifier, uid_list
from .errors import BackupError, DicomError, FatalDicomError, \
    RetriableBackupTargetError, RetriableDicomError
from .instance import InstanceRef
from .lane import OpenLane
from .ledger import LaneLedger


STALE_SPOOL_SECONDS = 24 * 3600  # a relay spool folder older than this belongs to no live run


def move_identifiers(batch: Iterable[InstanceRef], relational: bool = False,
                     retrieve: str = "uid_list") -> list[Dataset]:
    """C-MOVE/C-GET identifiers for a batch, as the source's ``retrieve`` mode says:

    - ``uid_list``: one IMAGE-level identifier per series listing its UIDs, with the full
      hierarchy ARIA insists on (``relational``: one identifier listing every UID of the batch,
      for peers that support relational retrieve);
    - ``one_uid``: one IMAGE-level identifier per instance, for peers that take one UID a
      request;
    - ``series``: one SERIES-level identifier per series (the whole series moves, also
      instances the batch did not ask for).
    """
    if relational and retrieve == "uid_list":
        uids = sorted({ref.sop_instance_uid for ref in batch})
        return [identifier("IMAGE", SOPInstanceUID=uids if len(uids) > 1 else uids[0])]
    by_series: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for ref in batch:
        by_series[ref.series_key].append(ref.sop_instance_uid)
    identifiers = []
    for (patient_id, study, series), uids in sorted(by_series.items()):
        known = {k: v for k, v in (("PatientID", patient_id), ("StudyInstanceUID", study),
                                   ("SeriesInstanceUID", series)) if v}
        if retrieve == "series":
            identifiers.append(identifier("SERIES", **known))
        elif retrieve == "one_uid":
            identifiers += [identifier("IMAGE", **known, SOPInstanceUID=u) for u in uids]
        else:
            identifiers.append(identifier("IMAGE", **known,
                                          SOPInstanceUID=uids if len(uids) > 1 else uids[0]))
    return identifiers


def one_uid_each(ident: Dataset) -> list[Dataset]:
    """An IMAGE-level identifier listing several UIDs, as one identifier per UID."""
    keys = {k: ident.get(k) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
            if ident.get(k)}
    return [identifier("IMAGE", **keys, SOPInstanceUID=u)
            for u in uid_list(ident.get("SOPInstanceUID"))]


@dataclass
class Delivery:
    """What a transfer's peer said: its claims, and the UIDs whose identifier it refused."""

    claims: str
    refused: dict[str, str] = field(default_factory=dict)  # UID -> the peer's refusal
    notes: list[str] = field(default_factory=list)  # for the run summary


@dataclass
class Outcome:
    """How one delivery ended: every UID asked is in ``verified``, ``failed`` or ``awaiting``
    (or was verified before and skipped)."""

    requested: int = 0
    moved: int = 0
    verified: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    peer_claims: str = ""
    notes: list[str] = field(default_factory=list)  # what the peer made us do, for the summary
    # Moved to a backup that may index later, not seen yet: settled with the run's other such
    # objects in one wait (see settle), so refused objects do not cost one timeout per batch.
    awaiting: list[Awaiting] = field(default_factory=list)


@dataclass(frozen=True)
class Awaiting:
    """An object moved to a backup that indexes later, and what to record if it never shows."""

    ref: InstanceRef
    reason: str  # the ledger's error if it is still absent after the wait


def verify_present(ledger: LaneLedger, target: BackupTarget, refs: list[InstanceRef],
                   timeout: float = 0.0) -> set[str]:
    """Mark verified what the backup holds; returns those UIDs."""
    if not refs:
        return set()
    present = wait_for(target, refs, timeout)
    ledger.mark_verified(present)
    return present


def settle(lane: OpenLane, awaiting: list[Awaiting], timeout: float) -> set[str]:
    """One wait, of at most ``timeout``, for every object of a run moved to a backup that may
    index later; what is still absent is marked failed with its own reason. Returns the UIDs
    present. Waiting here once, instead of in each batch or plan, makes the waits overlap."""
    present = verify_present(lane.ledger, lane.target, [a.ref for a in awaiting], timeout)
    lane.ledger.mark_failed({a.ref.sop_instance_uid: a.reason for a in awaiting
                             if a.ref.sop_instance_uid not in present})
    return present


def deliver(lane: OpenLane, refs: list[InstanceRef], kind: str = "record",
            wait: float | None = None, started: Future[str] | None = None) -> Outcome:
    """Bring ``refs`` into the lane's backup; every UID ends the call verified or failed in the
    ledger, or listed in ``awaiting``.

    ``kind``: the ledger's kind of row ('record' or 'context'). ``wait``: None looks once and,
    with a backup that may index later, leaves what it has not seen yet to the run's ``settle``;
    a number waits up to that many seconds here (the plan-context walk reads what it moved).
    ``started``: a move of these objects already under way (a whole series); only its end is
    awaited. Objects the ledger calls verified are skipped.

    On a DICOM error the backup is still asked (a move can deliver part of its objects before it
    fails), the rest is marked failed with the error, and the error is raised for the retry
    policy to judge.
    """
    outcome = Outcome(requested=len(refs))
    ledger, target = lane.ledger, lane.target
    ledger.record_found(refs, kind=kind)
    states = ledger.states([r.sop_instance_uid for r in refs])
    todo = [r for r in refs if states.get(r.sop_instance_uid) != "verified"]
    if not todo:
        return outcome
    ledger.mark_moved([r.sop_instance_uid for r in todo])
    outcome.moved = len(todo)
    error: BackupError | None = None
    refused: dict[str, str] = {}
    try:
        if started is not None:
            outcome.peer_claims = started.result()
        else:
            size = max(1, lane.site.settings.batch_size)
            for i in range(0, len(todo), size):
                delivery = transfer(lane, todo[i:i + size])
                outcome.peer_claims = delivery.claims
                refused.update(delivery.refused)
                outcome.notes += [n for n in delivery.notes if n not in outcome.notes]
        down = backup_unreachable(lane.site, target) if refused else None
    except DicomError as exc:
        error = exc
        down = None if isinstance(exc, RetriableDicomError) else backup_unreachable(lane.site,
                                                                                     target)
    if down:  # the R&V could not deliver because the backup is down: worth another try
        error = RetriableBackupTargetError(
            f"site {lane.site.name}: backup {target.alias} unreachable during the move from "
            f"{lane.source.label}: {down}")
    try:
        present = verify_present(ledger, target, todo, wait or 0.0)
    except Exception:
        if error is None:
            raise
        present = set()
    outcome.verified = sorted(present)
    reason = (str(error) if error else
              f"not found in backup {target.alias} ({target.aet}) after the move "
              f"({outcome.peer_claims})")
    absent = [r for r in todo if r.sop_instance_uid not in present]
    if error is None:  # the peer's own refusal, per UID
        outcome.failed = {r.sop_instance_uid: refused[r.sop_instance_uid] for r in absent
                          if r.sop_instance_uid in refused}
        absent = [r for r in absent if r.sop_instance_uid not in refused]
    if error is None and wait is None and not target.confirms_on_receipt:
        outcome.awaiting = [Awaiting(r, reason) for r in absent]
    else:
        outcome.failed.update({r.sop_instance_uid: reason for r in absent})
    ledger.mark_failed(outcome.failed)
    if error is not None:
        raise error
    return outcome


def transfer(lane: OpenLane, batch: list[InstanceRef]) -> Delivery:
    """Ask the source to deliver ``batch`` to the backup; returns what the peer claimed and
    which UIDs' identifiers it refused (each with its own error; the rest of the batch goes on).

    ARIA-type sources C-MOVE straight to the backup AE. MIM-type sources are fetched by C-GET and
    relayed by C-STORE to the backup's DICOM port. A UID list the peer refuses is asked again
    one UID per request (and the summary says to set ``retrieve``).
    """
    if isinstance(lane.source, MosaiqSource):
        return _store_staged(lane, batch)
    site, source, target = lane.site, lane.source, lane.target
    client = lane.client()
    identifiers = move_identifiers(batch, source.relational_move, source.retrieve)
    if isinstance(source, AriaSource):
        results = _parallel_moves(client, identifiers, target.aet,
                                  site.settings.move_associations)
        delivery = Delivery("")
        lists = [i for i, (ident, r) in enumerate(zip(identifiers, results))
                 if r.error and len(uid_list(ident.get("SOPInstanceUID"))) > 1]
        if lists:  # refused UID lists: asked again one UID per request
            singles = [one for i in lists for one in one_uid_each(identifiers[i])]
            again = _parallel_moves(client, singles, target.aet, site.settings.move_associations)
            if any(not r.error for r in again):  # the refusal was about lists, not the objects
                delivery.notes.append(
                    f"{source.label} refused {len(lists)} C-MOVE(s) listing several UIDs "
                    f"({results[lists[0]].error}); each UID was asked on its own: set retrieve "
                    f'= "one_uid" for this source')
            kept = [i for i in range(len(identifiers)) if i not in lists]
            identifiers = [identifiers[i] for i in kept] + singles
            results = [results[i] for i in kept] + again
        in_series: dict[str, list[str]] = defaultdict(list)
        for ref in batch:
            in_series[ref.series_uid].append(ref.sop_instance_uid)
        for ident, r in zip(identifiers, results):
            if r.error:
                uids = uid_list(ident.get("SOPInstanceUID")) or \
                    in_series[str(ident.get("SeriesInstanceUID", ""))]
                delivery.refused.update({u: r.error for u in uids})
        completed = sum(r.completed for r in results)
        failed = sum(r.failed for r in results)
        statuses = ",".join(sorted({f"0x{r.status:04X}" for r in results}))
        delivery.claims = (f"C-MOVE status {statuses}, {completed} completed, {failed} failed"
                           + (f", {len(delivery.refused)} refused" if delivery.refused else ""))
        return delivery
    return _relay(lane, client, identifiers, batch)


def _store_staged(lane: OpenLane, batch: list[InstanceRef]) -> Delivery:
    """A Mosaiq lane: C-STORE the records staged from the database to the backup. A staged file
    that is gone (the staging folder was cleared) fails its own UID, to be made again by the
    next run over its day."""
    from pydicom import dcmread

    from .mosaiq import staging_dir

    folder = staging_dir(lane.site, lane.ref.source)
    delivery = Delivery("")
    datasets = []
    for ref in batch:
        path = folder / f"{ref.sop_instance_uid}.dcm"
        if path.is_file():
            datasets.append(dcmread(path))
        else:
            delivery.refused[ref.sop_instance_uid] = (
                f"site {lane.site.name}: RT Record {ref.sop_instance_uid} of {lane.source.label} "
                f"is no longer staged in {folder}: run the nightly backup over its day again")
    refused = [r for r in lane.backup_client().store(datasets) if not r.ok]
    delivery.claims = (f"C-STORE of {len(datasets)} staged record(s), {len(refused)} refused by "
                       "the backup")
    return delivery


def _relay(lane: OpenLane, client: DicomClient, identifiers: list[Dataset],
           batch: list[InstanceRef]) -> Delivery:
    """C-GET each identifier into a spool folder on disk and C-STORE the files from there to
    the backup, each file read when it is sent and deleted once sent: memory stays that of one
    object, whatever the size of the series. The store of one identifier's objects runs while
    the next identifier is fetched. A refused identifier fails its own UIDs; a refused UID list
    is asked again one UID per request."""
    source, store_client = lane.dicom, lane.backup_client()
    delivery = Delivery("")
    classes = sorted({r.sop_class_uid for r in batch})
    pending, lists, singles_ok, not_stored = list(identifiers), 0, 0, 0
    root = lane.site.state_dir / "spool"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("relay-*"):  # left by a run that died a day or more ago
        if time.time() - stale.stat().st_mtime > STALE_SPOOL_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    spool = Path(tempfile.mkdtemp(prefix="relay-", dir=root))
    storing: Future[list[StoreResult]] | None = None
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            while pending:
                ident = pending.pop(0)
                uids = uid_list(ident.get("SOPInstanceUID"))
                folder = Path(tempfile.mkdtemp(dir=spool))
                try:
                    _, files = client.get_to_folder(ident, folder, classes)
                    if lists and len(uids) == 1:
                        singles_ok += 1
                except FatalDicomError as exc:
                    if not exc.refused_identifier:
                        raise
                    files = sorted(folder.iterdir())  # what came before the refusal
                    if len(uids) > 1:
                        lists += 1
                        pending += one_uid_each(ident)
                    else:
                        delivery.refused.update({u: str(exc) for u in uids or [
                            r.sop_instance_uid for r in batch
                            if r.series_uid == str(ident.get("SeriesInstanceUID", ""))]})
                if storing is not None:
                    not_stored += sum(1 for r in storing.result() if not r.ok)
                storing = pool.submit(store_client.store_files, files, True)
            if storing is not None:
                not_stored += sum(1 for r in storing.result() if not r.ok)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    if lists and singles_ok:
        delivery.notes.append(f"{source.label} refused {lists} C-GET(s) listing several UIDs; "
                              'each UID was asked on its own: set retrieve = "one_uid" for this '
                              "source")
    delivery.claims = (f"C-GET + C-STORE relay, {not_stored} refused by the backup"
                       + (f", {len(delivery.refused)} refused by the source"
                          if delivery.refused else ""))
    return delivery


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


def _parallel_moves(client: DicomClient, identifiers: list[Dataset], destination: str,
                    associations: int) -> list[MoveResult]:
    """Spread C-MOVEs over a few associations: each costs the peer a sub-association of its own.
    Results come back in the order of ``identifiers``.

    All moves run to the end; the first DICOM error is raised afterwards, so one bad series does
    not leave the others unattempted.
    """
    if associations <= 1 or len(identifiers) <= 1:
        return client.move(identifiers, destination)
    shares = [identifiers[i::associations] for i in range(associations)]
    results: list[MoveResult | None] = [None] * len(identifiers)
    errors: list[DicomError] = []
    with ThreadPoolExecutor(max_workers=associations) as pool:
        futures = [(i, pool.submit(client.move, share, destination))
                   for i, share in enumerate(shares) if share]
        for i, future in futures:
            try:
                for k, result in enumerate(future.result()):
                    results[i + k * associations] = result
            except DicomError as exc:
                errors.append(exc)
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]
