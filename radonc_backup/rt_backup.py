"""Backing up RT Records: find them on the R&V, move what the backup lacks, verify, record.

Plain functions over the DICOM layer, the backup target and the ledger; the Prefect tasks and
flows only wrap them. The rules that keep data from being lost:
- a failed query raises; it is never taken for "nothing new";
- a window whose answer reaches the peer's result cap is split and asked again;
- a C-MOVE's own status is recorded but never trusted: only ``present()`` in the backup verifies;
- what is found is written to the ledger before anything is moved, so every later run retries it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime

from pydicom.dataset import Dataset

from .backup_target import BackupTarget, wait_for
from .config import AriaSource, MimSource, Site
from .dicom_net import RT_RECORD_CLASSES, DicomClient, MoveResult, identifier, uid_list
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


class Screen:
    """Trust no match: each C-FIND answer is checked against what was asked (an RT Record, in
    the window, of the patient) before it enters the ledger or a move.

    A match that does not say what it is (no SOPClassUID and no Modality) or, answering a date
    query, when it was delivered, is asked again by its own UID; if the peer still does not say,
    the run stops with one line rather than move it blind. Matches a peer returned against a key
    (another class, date or patient) are dropped and counted, and ``notes`` names the key for
    the run summary.
    """

    LOOKUPS = 200  # per run: beyond that the peer answers blind, and another setting is needed

    def __init__(self, client: DicomClient) -> None:
        self.client = client
        self.ignored: Counter[str] = Counter()
        self.looked_up = 0

    def keep(self, match: Dataset, query: DayQuery | None = None,
             patient_id: str | None = None) -> InstanceRef | None:
        lacks_date = query is not None and "TreatmentDate" not in match
        if not (match.get("SOPClassUID") or match.get("Modality")) or lacks_date:
            match = self._look_up(match)
        ref = InstanceRef.from_match(match)
        sop_class, modality = ref.sop_class_uid, str(match.get("Modality", "") or "")
        if sop_class not in RT_RECORD_CLASSES and not (not sop_class and modality == "RTRECORD"):
            self.ignored["SOPClassUID/Modality"] += 1
            return None
        if patient_id is not None and ref.patient_id != patient_id:
            self.ignored["PatientID"] += 1
            return None
        if query is not None and not _in_query(ref, query):
            self.ignored["TreatmentDate/TreatmentTime"] += 1
            return None
        return ref

    def _look_up(self, match: Dataset) -> Dataset:
        uid = str(match.get("SOPInstanceUID", ""))
        self.looked_up += 1
        if self.looked_up > self.LOOKUPS:
            raise self._blind(f"more than {self.LOOKUPS} matches without SOPClassUID/Modality "
                              "or TreatmentDate")
        keys = {k: match.get(k) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
                if match.get(k)}
        q = identifier("IMAGE", **keys, SOPInstanceUID=uid, SOPClassUID="", Modality="",
                       TreatmentDate="", TreatmentTime="")
        answers = [m for m in self.client.find(q) if str(m.get("SOPInstanceUID", "")) == uid]
        if not answers or not (answers[0].get("SOPClassUID") or answers[0].get("Modality")):
            raise self._blind(f"{uid} comes without SOPClassUID or Modality, also when asked "
                              "by its UID")
        return answers[0]

    def _blind(self, detail: str) -> FatalDicomError:
        return FatalDicomError(self.client.site, self.client.peer.label, "C-FIND",
                               f"the peer does not say what its matches are ({detail}): "
                               "nothing is moved blind; run `dicom_tools check` and see "
                               "docs/r-and-v-compatibility.md", calling_ae=self.client.calling_ae)

    def notes(self) -> list[str]:
        return [f"{self.client.peer.label} ignored {key} in its C-FIND answers: {n} match(es) "
                "that were not asked for were dropped" for key, n in sorted(self.ignored.items())]


def find_records(client: DicomClient, queries: Iterable[DayQuery], cap: int = 0,
                 on_split: Callable[[DayQuery], None] | None = None,
                 screen: Screen | None = None) -> list[InstanceRef]:
    """Every RT Record the peer holds in the queries' windows, de-duplicated by SOP UID.

    A query that the peer cut short (a Cancel status, or ``cap`` or more matches from a peer that
    truncates silently) is split in two and both halves are asked; a one-second window still cut
    short is an error.
    """
    screen = screen or Screen(client)
    found: dict[str, InstanceRef] = {}
    pending = list(queries)
    while pending:
        query = pending.pop(0)
        matches: list[Dataset] = []
        truncated = False
        try:
            for m in client.find(record_identifier(query)):
                if m.get("SOPInstanceUID"):
                    matches.append(m)
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
        for m in matches:
            ref = screen.keep(m, query)
            if ref is not None:
                found.setdefault(ref.sop_instance_uid, ref)
    return sorted(found.values(), key=lambda r: (r.treatment_date, r.treatment_time,
                                                 r.sop_instance_uid))


def find_records_hierarchical(client: DicomClient, queries: Iterable[DayQuery],
                              studies: Iterable[tuple[str, str]], study_since: date | None,
                              cap: int = 0, screen: Screen | None = None,
                              patient_ids: Iterable[str] = ()) -> list[InstanceRef]:
    """Every RT Record in the queries' windows (or, with ``patient_ids``, every record of those
    patients), found the way a hierarchical-only peer accepts: Study -> Series -> Image.

    The studies walked: ``studies`` (the ledger's, known to hold the lane's records), those with
    a StudyDate from ``study_since`` (one STUDY-level C-FIND), and each patient's (one each).
    In each, one SERIES-level C-FIND for RT Record series, and in each of those one IMAGE-level
    C-FIND listing its records; the windows are applied to the answers, and a record with no
    TreatmentDate is kept (it cannot be placed, and it is an RT Record). Cost per run: 1 +
    patients + studies + record series C-FINDs. An answer that reaches ``cap`` is an error,
    never a silent cut.
    """
    screen = screen or Screen(client)
    windows = list(queries)
    walk: dict[str, str] = {study: patient for patient, study in studies}

    def capped(answers: list[Dataset], what: str) -> list[Dataset]:
        if cap and len(answers) >= cap:
            raise FatalDicomError(client.site, client.peer.label, "C-FIND",
                                  f"{what}: {len(answers)} answers reach the peer's cap of "
                                  f"{cap}: raise its C-FIND result limit",
                                  calling_ae=client.calling_ae)
        return answers

    asks = [("studies from " + str(study_since),
             identifier("STUDY", StudyDate=f"{study_since:%Y%m%d}-", StudyInstanceUID="",
                        PatientID=""))] if study_since is not None else []
    asks += [(f"patient {p}", identifier("STUDY", PatientID=p, StudyInstanceUID=""))
             for p in patient_ids]
    for what, ask in asks:
        for m in capped(list(client.find(ask)), what):
            if m.get("StudyInstanceUID"):
                walk.setdefault(str(m.StudyInstanceUID), str(m.get("PatientID", "") or ""))
    found: dict[str, InstanceRef] = {}
    for study, patient in sorted(walk.items()):
        series = capped(list(client.find(identifier(
            "SERIES", StudyInstanceUID=study, SeriesInstanceUID="", Modality="RTRECORD"))),
            f"study {study}")
        for s in series:
            modality = str(s.get("Modality", "") or "")
            if modality not in ("RTRECORD", ""):
                screen.ignored["Modality"] += 1  # the peer answered another series
                continue
            if not s.get("SeriesInstanceUID"):
                continue
            images = capped(list(client.find(identifier(
                "IMAGE", StudyInstanceUID=study, SeriesInstanceUID=str(s.SeriesInstanceUID),
                SOPInstanceUID="", SOPClassUID="", PatientID="", TreatmentDate="",
                TreatmentTime=""))), f"series {s.SeriesInstanceUID}")
            for m in images:
                if not m.get("SOPInstanceUID"):
                    continue
                m.StudyInstanceUID, m.SeriesInstanceUID = study, s.SeriesInstanceUID
                if not m.get("PatientID"):
                    m.PatientID = patient
                if not m.get("SOPClassUID") and modality == "RTRECORD":
                    m.Modality = "RTRECORD"  # a record series says what its images are
                ref = screen.keep(m)
                if ref is None:
                    continue
                if patient_ids or not ref.treatment_date \
                        or any(_in_query(ref, q) for q in windows):
                    found.setdefault(ref.sop_instance_uid, ref)
    return sorted(found.values(), key=lambda r: (r.treatment_date, r.treatment_time,
                                                 r.sop_instance_uid))


def patient_record_identifier(patient_id: str) -> Dataset:
    """IMAGE-level C-FIND for every RT Record of one patient, whatever its date."""
    return identifier("IMAGE", Modality="RTRECORD", PatientID=patient_id, StudyInstanceUID="",
                      SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="",
                      TreatmentDate="", TreatmentTime="")


def find_patient_records(client: DicomClient, patient_ids: Iterable[str],
                         cap: int = 0, screen: Screen | None = None) -> list[InstanceRef]:
    """Every RT Record of these patients, asked one patient at a time and without a date.

    The nightly net under the date queries: a record with an empty TreatmentDate (Type 2), or
    without a TreatmentTime in a day that had to be split into time ranges, matches no date
    query, but it matches its patient. A match for another patient (a peer that ignored the
    key) or of another class is dropped; an answer that reaches the peer's cap is an error,
    never a silent cut.
    """
    screen = screen or Screen(client)
    found: dict[str, InstanceRef] = {}
    for patient_id in patient_ids:
        matches = [m for m in client.find(patient_record_identifier(patient_id))
                   if m.get("SOPInstanceUID")]
        if cap and len(matches) >= cap:
            raise FatalDicomError(client.site, client.peer.label, "C-FIND",
                                  f"patient {patient_id}: {len(matches)} RT Records reach the "
                                  f"peer's cap of {cap}: raise its C-FIND result limit",
                                  calling_ae=client.calling_ae)
        for m in matches:
            ref = screen.keep(m, patient_id=patient_id)
            if ref is not None:
                found.setdefault(ref.sop_instance_uid, ref)
    return sorted(found.values(), key=lambda r: (r.patient_id, r.treatment_date,
                                                 r.treatment_time, r.sop_instance_uid))


def batches(refs: Iterable[InstanceRef], size: int) -> list[list[InstanceRef]]:
    """Batches of at most ``size``, series kept together so each C-MOVE lists many UIDs."""
    ordered = sorted(refs, key=lambda r: (r.series_key, r.sop_instance_uid))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


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
class BatchOutcome:
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
             batch: list[InstanceRef], store_client: DicomClient | None = None) -> Delivery:
    """Ask the source to deliver ``batch`` to the backup; returns what the peer claimed and
    which UIDs' identifiers it refused (each with its own error; the rest of the batch goes on).

    ARIA-type sources C-MOVE straight to the backup AE. MIM-type sources are fetched by C-GET and
    relayed by C-STORE (``store_client`` talks to the backup's DICOM port). A UID list the peer
    refuses is asked again one UID per request (and the summary says to set ``retrieve``).
    """
    client = site.client(source)
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
    if store_client is None:
        raise ConfigError(f"site {site.name}: MIM relay needs a DICOM backup target")
    return _relay(client, store_client, source, identifiers, batch)


def _relay(client: DicomClient, store_client: DicomClient, source: AriaSource | MimSource,
           identifiers: list[Dataset], batch: list[InstanceRef]) -> Delivery:
    """C-GET each identifier and C-STORE what arrives to the backup. A refused identifier
    fails its own UIDs; a refused UID list is asked again one UID per request."""
    delivery = Delivery("")
    classes = sorted({r.sop_class_uid for r in batch})
    pending, lists, singles_ok, not_stored = list(identifiers), 0, 0, 0
    while pending:
        ident = pending.pop(0)
        uids = uid_list(ident.get("SOPInstanceUID"))
        received: list[Dataset] = []
        try:
            client.get(ident, received.append, classes)
            if lists and len(uids) == 1:
                singles_ok += 1
        except FatalDicomError as exc:
            if not exc.refused_identifier:
                raise
            if len(uids) > 1:
                lists += 1
                pending += one_uid_each(ident)
            else:
                delivery.refused.update({u: str(exc) for u in uids or [
                    r.sop_instance_uid for r in batch
                    if r.series_uid == str(ident.get("SeriesInstanceUID", ""))]})
        not_stored += sum(1 for r in store_client.store(received) if not r.ok)
    if lists and singles_ok:
        delivery.notes.append(f"{source.label} refused {lists} C-GET(s) listing several UIDs; "
                              'each UID was asked on its own: set retrieve = "one_uid" for this '
                              "source")
    delivery.claims = (f"C-GET + C-STORE relay, {not_stored} refused by the backup"
                       + (f", {len(delivery.refused)} refused by the source"
                          if delivery.refused else ""))
    return delivery


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
    refused: dict[str, str] = {}
    try:
        delivery = transfer(site, source, target, todo, store_client)
        outcome.peer_claims, refused, outcome.notes = delivery.claims, delivery.refused, \
            delivery.notes
        down = backup_unreachable(site, target) if refused else None
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
    if error is None:  # the peer's own refusal, per UID
        outcome.failed = {r.sop_instance_uid: refused[r.sop_instance_uid] for r in absent
                          if r.sop_instance_uid in refused}
        absent = [r for r in absent if r.sop_instance_uid not in refused]
    if error is None and not target.confirms_on_receipt:
        outcome.awaiting = [Awaiting(r, reason) for r in absent]
    else:
        outcome.failed.update({r.sop_instance_uid: reason for r in absent})
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
