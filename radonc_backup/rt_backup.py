"""Finding RT Records on the R&V and recording them before anything moves.

Plain functions over the DICOM layer and the ledger; the Prefect tasks and flows only wrap
them, and ``transfer.deliver`` moves and verifies. The rules that keep data from being lost:
- a failed query raises; it is never taken for "nothing new";
- a window whose answer reaches the peer's result cap is split and asked again;
- every match is checked against what was asked (``Screen``) before it enters the ledger;
- what is found is written to the ledger before anything is moved, so every later run retries it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from pydicom.dataset import Dataset

from .dicom_net import RT_RECORD_CLASSES, DicomClient, identifier
from .errors import FatalDicomError, FindTruncated
from .instance import InstanceRef
from .ledger import LaneLedger
from .windows import DayQuery, parse_treatment_datetime


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
                 screen: Screen | None = None,
                 on_cut: Callable[[int], None] | None = None,
                 on_answered: Callable[[int, int], None] | None = None) -> list[InstanceRef]:
    """Every RT Record the peer holds in the queries' windows, de-duplicated by SOP UID.

    A query that the peer cut short (a Cancel status, or ``cap`` or more matches from a peer that
    truncates silently) is split in two and both halves are asked; a one-second window still cut
    short is an error. ``on_cut(n)`` hears of each answer the peer itself ended as cut after
    ``n`` matches (its cap, to remember); ``on_answered(done, total)`` of each window answered
    whole, with the windows known so far (splits add some).
    """
    screen = screen or Screen(client)
    found: dict[str, InstanceRef] = {}
    pending = list(queries)
    answered = 0
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
            if on_cut is not None and matches:
                on_cut(len(matches))
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
        answered += 1
        if on_answered is not None:
            on_answered(answered, answered + len(pending))
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

    answers: list[Dataset] = []
    if study_since is not None:
        last = max((q.day for q in windows), default=study_since)
        answers += _studies_dated(client, study_since, max(last, study_since), cap)
    for p in patient_ids:
        answers += capped(list(client.find(identifier("STUDY", PatientID=p,
                                                      StudyInstanceUID=""))), f"patient {p}")
    for m in answers:
        if m.get("StudyInstanceUID"):
            walk.setdefault(str(m.StudyInstanceUID), str(m.get("PatientID", "") or ""))
    found: dict[str, InstanceRef] = {}
    for study, patient in sorted(walk.items()):
        for m in series_instances(client, study, patient, "RTRECORD", capped,
                                  PatientID="", TreatmentDate="", TreatmentTime="",
                                  on_other=lambda: screen.ignored.update(["Modality"])):
            ref = screen.keep(m)
            if ref is None:
                continue
            if patient_ids or not ref.treatment_date or any(_in_query(ref, q) for q in windows):
                found.setdefault(ref.sop_instance_uid, ref)
    return sorted(found.values(), key=lambda r: (r.treatment_date, r.treatment_time,
                                                 r.sop_instance_uid))


def series_instances(client: DicomClient, study: str, patient_id: str, modality: str,
                     capped: Callable[[list[Dataset], str], list[Dataset]] = lambda a, _: a,
                     on_other: Callable[[], None] | None = None,
                     **keys: object) -> list[Dataset]:
    """One study's instances of ``modality``, the way a hierarchical-only peer accepts: one
    SERIES-level C-FIND for its series of that modality, then one IMAGE-level C-FIND per series
    returning ``keys``. Each answer is given its study, series and (when it has none) patient,
    and, when it says neither SOPClassUID nor Modality, its series' Modality. A series of
    another modality (the peer ignored the key) is skipped and told to ``on_other``; ``capped``
    sees every answer list (it raises when one reaches the peer's cap)."""
    found: list[Dataset] = []
    series = capped(list(client.find(identifier("SERIES", StudyInstanceUID=study,
                                                SeriesInstanceUID="", Modality=modality))),
                    f"study {study}")
    for s in series:
        said = str(s.get("Modality", "") or "")
        if said not in (modality, ""):
            if on_other is not None:
                on_other()
            continue
        if not s.get("SeriesInstanceUID"):
            continue
        uid = str(s.SeriesInstanceUID)
        for m in capped(list(client.find(identifier(
                "IMAGE", StudyInstanceUID=study, SeriesInstanceUID=uid, SOPInstanceUID="",
                SOPClassUID="", **keys))), f"series {uid}"):
            if not m.get("SOPInstanceUID"):
                continue
            m.StudyInstanceUID, m.SeriesInstanceUID = study, uid
            if not m.get("PatientID"):
                m.PatientID = patient_id
            if not (m.get("SOPClassUID") or m.get("Modality")) and said == modality:
                m.Modality = modality  # the series said what its instances are
            found.append(m)
    return found


def _studies_dated(client: DicomClient, first: date, last: date, cap: int) -> list[Dataset]:
    """STUDY-level answers for StudyDate from ``first`` (the last range open-ended, so a study
    dated later is found too); a range whose answer reaches ``cap`` is asked again in halves,
    a single day still reaching it is an error."""
    pending: list[tuple[date, date | None]] = [(first, None)]
    found: list[Dataset] = []
    while pending:
        lo, hi = pending.pop()
        dates = f"{lo:%Y%m%d}-" + (f"{hi:%Y%m%d}" if hi else "")
        answers = list(client.find(identifier("STUDY", StudyDate=dates, StudyInstanceUID="",
                                               PatientID="")))
        if cap and len(answers) >= cap:
            end = hi if hi is not None else last
            if lo >= end and hi is None and lo <= last:  # the open range from the last day:
                pending += [(lo, lo), (lo + timedelta(days=1), None)]  # that day, then after
                continue
            if lo >= end:
                raise FatalDicomError(client.site, client.peer.label, "C-FIND",
                                      f"studies dated {dates}: {len(answers)} answers reach "
                                      f"the peer's cap of {cap}: raise its C-FIND result limit",
                                      calling_ae=client.calling_ae)
            mid = lo + timedelta(days=(end - lo).days // 2)
            pending += [(lo, mid), (mid + timedelta(days=1), hi)]
            continue
        found += answers
    return found


def patient_record_identifier(patient_id: str) -> Dataset:
    """IMAGE-level C-FIND for every RT Record of one patient, whatever its date."""
    return identifier("IMAGE", Modality="RTRECORD", PatientID=patient_id, StudyInstanceUID="",
                      SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="",
                      TreatmentDate="", TreatmentTime="")


def find_patient_records(client: DicomClient, patient_ids: Iterable[str],
                         cap: int = 0, screen: Screen | None = None,
                         on_answered: Callable[[int, int], None] | None = None,
                         ) -> list[InstanceRef]:
    """Every RT Record of these patients, asked one patient at a time and without a date.

    The nightly net under the date queries: a record with an empty TreatmentDate (Type 2), or
    without a TreatmentTime in a day that had to be split into time ranges, matches no date
    query, but it matches its patient. A match for another patient (a peer that ignored the
    key) or of another class is dropped; an answer that reaches the peer's cap is an error,
    never a silent cut.
    """
    screen = screen or Screen(client)
    found: dict[str, InstanceRef] = {}
    patient_ids = list(patient_ids)
    for done, patient_id in enumerate(patient_ids, 1):
        if on_answered is not None and done > 1:
            on_answered(done - 1, len(patient_ids))
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


@dataclass
class Plan:
    """What a run must do after finding: the lane's unverified rows, new and old."""

    found: int
    new: int
    already_verified: int
    todo: list[InstanceRef]


def plan_work(ledger: LaneLedger, found: list[InstanceRef]) -> Plan:
    """Record what was found, then take every unverified row of the lane (earlier failures too)."""
    new = ledger.record_found(found)
    states = ledger.states([r.sop_instance_uid for r in found])
    already = sum(1 for s in states.values() if s == "verified")
    return Plan(found=len(found), new=new, already_verified=already, todo=ledger.unverified())


def window_label(start: datetime, end: datetime) -> str:
    return f"{start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S}"
