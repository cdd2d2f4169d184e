"""Plan context: everything a backed-up RT Record needs to restart treatment from the backup.

The chain (see docs/plan-context.md): RT Record -> ReferencedRTPlanSequence -> RT Plan ->
ReferencedStructureSetSequence -> RT Structure Set -> ReferencedFrameOfReferenceSequence /
RTReferencedStudySequence / RTReferencedSeriesSequence -> every image series, plus the RT Dose
objects that reference the plan. References are read from the copies already in the backup; the
R&V is asked only for what the backup lacks. A whole series moves in one SERIES-level C-MOVE
when the backup has none of it, only the missing images when it has some. A series counts as
complete when the backup holds every image the R&V lists and the R&V lists as many as it
announces (NumberOfSeriesRelatedInstances); a C-MOVE status counts for nothing.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TypeVar

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import sop_class as sop

from .backup_target import OrthancBackup
from .config import AriaSource
from .dicom_net import identifier
from .errors import BackupTargetError, DicomError, RetriableBackupTargetError
from .instance import InstanceRef
from .lane import OpenLane
from .ledger import LaneLedger, PlanLink
from .record_finder import RecordFinder, load_memory, save_memory
from .transfer import deliver

OBJECT_TYPES = {
    sop.RTPlanStorage: "RTPLAN",
    sop.RTIonPlanStorage: "RTPLAN",
    sop.RTStructureSetStorage: "RTSTRUCT",
    sop.RTDoseStorage: "RTDOSE",
    sop.CTImageStorage: "CT",
    sop.EnhancedCTImageStorage: "CT",
    sop.MRImageStorage: "MR",
    sop.EnhancedMRImageStorage: "MR",
    sop.PositronEmissionTomographyImageStorage: "PT",
    sop.EnhancedPETImageStorage: "PT",
}
T = TypeVar("T")
RT_DOSE = sop.RTDoseStorage
TYPES = ("RTPLAN", "RTSTRUCT", "CT", "MR", "PT", "RTDOSE", "OTHER")


def object_type(sop_class_uid: str) -> str:
    return OBJECT_TYPES.get(sop_class_uid, "OTHER")


def plan_link(record: Dataset) -> PlanLink:
    """The plan an RT Record delivers, and the machine it was delivered on."""
    plans = record.get("ReferencedRTPlanSequence") or []
    plan_uid = str(plans[0].get("ReferencedSOPInstanceUID", "")) if plans else ""
    machines = record.get("TreatmentMachineSequence") or []
    machine = str(machines[0].get("TreatmentMachineName", "")) if machines else ""
    return PlanLink(plan_uid, str(record.get("PatientID", "")), machine)


def referenced_series(rtstruct: Dataset) -> list[tuple[str, str]]:
    """(Study UID, Series UID) of every image series a structure set references."""
    found: list[tuple[str, str]] = []
    for frame in rtstruct.get("ReferencedFrameOfReferenceSequence") or []:
        for study in frame.get("RTReferencedStudySequence") or []:
            study_uid = str(study.get("ReferencedSOPInstanceUID", ""))
            for series in study.get("RTReferencedSeriesSequence") or []:
                key = (study_uid, str(series.get("SeriesInstanceUID", "")))
                if key[1] and key not in found:
                    found.append(key)
    return found


def _referenced(ds: Dataset, sequence: str) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in ds.get(sequence) or []
            if item.get("ReferencedSOPInstanceUID")]


@dataclass
class ContextOutcome:
    plan_uid: str
    patient_id: str
    state: str = "complete"
    unresolved: list[str] = field(default_factory=list)
    moved: Counter[str] = field(default_factory=Counter)
    verified: Counter[str] = field(default_factory=Counter)  # by modality, read from the
    # backup where it is Orthanc (else by the class the R&V's answer gave)
    notes: list[str] = field(default_factory=list)
    verified_uids: set[str] = field(default_factory=set)

    def note(self, text: str) -> None:
        """Something the peer made the walk do (not a failure), said once in the summary."""
        if text not in self.notes:
            self.notes.append(text)

    def problem(self, text: str) -> None:
        self.state = "incomplete"
        self.unresolved.append(text)

    def absorb(self, other: "ContextOutcome") -> None:
        """Add the counts and problems of a part of the walk that ran on its own thread."""
        self.moved.update(other.moved)
        self.verified.update(other.verified)
        self.verified_uids |= other.verified_uids
        for text in other.notes:
            self.note(text)
        for text in other.unresolved:
            self.problem(text)

    def defer(self, text: str) -> None:
        """Work left for the source's off-peak window: pending, not a failure."""
        if self.state == "complete":
            self.state = "deferred"
        self.unresolved.append(text)


class WalkGates:
    """The R&V associations that a run's concurrent walks share, so that more plans can be
    walked at once than series moved: ``series`` bounds the image-series moves (the bulk
    transfers: ``associations`` at once, what ``move_associations`` grants), ``queries`` bounds
    everything else (C-FINDs; moves of plans, structure sets and doses). A run holding
    ``2 x associations`` slots of the R&V's limit never opens more associations than that,
    however many walks are under way; while one plan's series moves, the next plans' chains
    (plan -> structure set -> series listing) are walked on the other association."""

    def __init__(self, associations: int) -> None:
        self.associations = max(1, associations)
        self.series = threading.BoundedSemaphore(self.associations)
        self.queries = threading.BoundedSemaphore(self.associations)


class ContextWalker:
    """Walks one plan's chain for one lane, moving and verifying what the backup lacks."""

    def __init__(self, lane: OpenLane, images_now: bool = True,
                 gates: WalkGates | None = None) -> None:
        self.lane = lane
        self.site, self.source, self.target, self.ledger = lane.site, lane.dicom, lane.target, \
            lane.ledger
        self.images_now = images_now  # False outside the source's image_hours: images wait
        # Lanes whose associations to the R&V hold a permit of the run's gates (if any): image
        # series on one, the chain's queries and small moves on the other.
        self.series_lane = replace(lane, gate=gates.series) if gates else lane
        self.query_lane = replace(lane, gate=gates.queries) if gates else lane
        self.client = self.query_lane.client()
        self.mover = self.series_lane.client()
        self.where = f"{lane.lane.source} ({self.source.aet})"
        # A hierarchical-only peer: plan, structure set and doses are found by walking the
        # patient's studies and series (the series lookups name their study and series anyway).
        self.hierarchical = self.source.query == "hierarchical"
        self.finder = RecordFinder(self.client, True, load_memory(
            lane.ledger.ledger, self.source.label, self.source.max_find_results))
        self._studies: dict[str, list[str]] = {}

    def walk(self, link: PlanLink) -> ContextOutcome:
        out = ContextOutcome(link.plan_uid, link.patient_id)
        skip = {m.lower() for m in self.site.settings.skip_machines}
        if link.machine and link.machine.lower() in skip:
            out.state = "skipped"
            out.unresolved.append(f"machine {link.machine} is in skip_machines")
            return out
        if not link.plan_uid:
            out.problem("RT Record has no ReferencedRTPlanSequence")
            return out
        plan = self._step(out, self._ensure_object, link.plan_uid, link.patient_id, "RTPLAN", out)
        if plan is None:
            return out
        # Doses hang off the plan, not the structure set: fetch them while the images move.
        dose_out = ContextOutcome(link.plan_uid, link.patient_id)
        with ThreadPoolExecutor(max_workers=1) as pool:
            doses = pool.submit(self._step, dose_out, self._ensure_doses, link.patient_id,
                                link.plan_uid, dose_out)
            self._walk_structure_sets(plan, link, out)
        doses.result()  # anything but a DICOM failure (backup down, ...) is raised here
        out.absorb(dose_out)
        self._count_held(out)
        return out

    def _count_held(self, out: ContextOutcome) -> None:
        """What this walk verified, counted by the modality the backup itself holds it under
        (the R&V's answers may not say, or say wrongly): the summary counts arrivals."""
        if not out.verified_uids or not isinstance(self.target, OrthancBackup):
            return
        held = {h.ref.sop_instance_uid: h.modality or "?"
                for h in self.target.patient_instances(out.patient_id)}
        out.verified = Counter(held.get(uid, "not found in backup") for uid in out.verified_uids)

    def _walk_structure_sets(self, plan: Dataset, link: PlanLink, out: ContextOutcome) -> None:
        for struct_uid in _referenced(plan, "ReferencedStructureSetSequence"):
            rtstruct = self._step(out, self._ensure_object, struct_uid, link.patient_id,
                                  "RTSTRUCT", out)
            if rtstruct is None:
                continue
            series = referenced_series(rtstruct)
            if not series:
                out.problem(f"RTSTRUCT {struct_uid} references no image series")
            for study_uid, series_uid in series:
                if not self.images_now:
                    out.defer(f"series {series_uid} (study {study_uid}): image moves wait for "
                              f"the off-peak hours {self.source.image_hours} of {self.where}")
                    continue
                self._step(out, self._ensure_series, link.patient_id, study_uid, series_uid, out)
        if not _referenced(plan, "ReferencedStructureSetSequence"):
            out.problem(f"RTPLAN {link.plan_uid} references no structure set")

    @staticmethod
    def _step(out: ContextOutcome, fn: Callable[..., T], *args: object) -> T | None:
        """One link of the chain; a DICOM failure is noted and the walk goes on."""
        try:
            return fn(*args)
        except DicomError as exc:
            out.problem(str(exc))
            return None

    def _ensure_object(self, uid: str, patient_id: str, kind: str,
                       out: ContextOutcome) -> Dataset | None:
        """The backup's copy of one object, moved there first if it is missing."""
        copy = self.target.read(uid)
        if copy is not None:
            self._note_present([InstanceRef(uid, str(copy.get("SOPClassUID", "")), patient_id,
                                            str(copy.get("StudyInstanceUID", "")),
                                            str(copy.get("SeriesInstanceUID", "")))])
            return copy
        ref = self._find_instance(uid, patient_id, kind)
        if ref is None:
            out.problem(f"{kind} {uid} not found on {self.where}")
            return None
        if not self._move([ref], out):
            out.problem(f"{kind} {uid} not verified in backup {self.lane.lane.backup} after "
                        "the move")
            return None
        return self.target.read(uid)

    def _ensure_series(self, patient_id: str, study_uid: str, series_uid: str,
                       out: ContextOutcome) -> None:
        have = self.target.series_instances(patient_id, study_uid, series_uid)
        whole_move = None
        if not have and isinstance(self.source, AriaSource):
            # Nothing of it in the backup: start the SERIES-level move at once and list the
            # series on the R&V meanwhile, on a second association.
            pool = ThreadPoolExecutor(max_workers=1)
            whole_move = pool.submit(self._move_series, patient_id, study_uid, series_uid)
            pool.shutdown(wait=False)
        announced, refs = self._find_series(patient_id, study_uid, series_uid)
        if not refs:
            if whole_move is not None:
                try:
                    whole_move.result()
                except DicomError:
                    pass  # a move of nothing fails; the listing says why
            out.problem(f"series {series_uid} (study {study_uid}) not found on {self.where}")
            return
        self._note_present([r for r in refs if r.sop_instance_uid in have])
        missing = [r for r in refs if r.sop_instance_uid not in have]
        if missing:
            verified = self._move(missing, out, started=whole_move, images=True)
            lost = [r.sop_instance_uid for r in missing if r.sop_instance_uid not in verified]
            if lost:
                out.problem(f"series {series_uid}: {len(lost)} of {len(refs)} images not verified "
                            f"in backup {self.lane.lane.backup}: {', '.join(lost[:5])}"
                            + (" ..." if len(lost) > 5 else ""))
        if announced is not None and announced > len(refs):
            out.problem(f"series {series_uid}: {self.where} announces {announced} images but "
                        f"lists {len(refs)}")

    def _ensure_doses(self, patient_id: str, plan_uid: str, out: ContextOutcome) -> None:
        item = Dataset()
        item.ReferencedSOPInstanceUID = ""
        q = identifier("IMAGE", PatientID=patient_id, Modality="RTDOSE", StudyInstanceUID="",
                       SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="",
                       ReferencedRTPlanSequence=Sequence([item]))
        # A list, not the answer stream: asking again by UID below needs the gate's permit that
        # an open answer stream holds.
        matches = (self._walk(patient_id, "RTDOSE", ReferencedRTPlanSequence=Sequence([item]))
                   if self.hierarchical else list(self.client.find(q)))
        doses = []
        blind = others = 0
        for match in matches:
            sop_class = str(match.get("SOPClassUID", "") or "")
            modality = str(match.get("Modality", "") or "")
            if (sop_class and sop_class != RT_DOSE) or (modality and modality != "RTDOSE"):
                continue  # the peer ignored Modality: not a dose
            if not (sop_class or modality) or not match.get("SOPInstanceUID"):
                blind += 1  # never moved blind
                continue
            refs = _referenced(match, "ReferencedRTPlanSequence")
            if not refs or not match.get("PatientID"):  # ask once more, by its UID
                match = self._dose_again(match) or match
                refs = _referenced(match, "ReferencedRTPlanSequence")
            if str(match.get("PatientID", "") or "") != patient_id:
                # the peer ignored PatientID, or does not say whose dose it is: never moved
                others += 1
                continue
            # The patient's dose whose plan the peer never says is moved and read afterwards:
            # it is this patient's, and a dose of another of their plans is worth keeping.
            if not refs or plan_uid in refs:
                doses.append((InstanceRef.from_match(match), bool(refs)))
        if others:
            out.note(f"{self.where} answered the RT Dose lookup of patient {patient_id} with "
                     f"{others} dose(s) of another patient, or of none it would name: not "
                     "moved")
        if blind:
            out.problem(f"{blind} answer(s) to the RT Dose lookup of patient {patient_id} on "
                        f"{self.where} say neither SOPClassUID nor Modality: not moved")
        if not doses:
            return
        present = self.target.present([d for d, _ in doses])
        self._note_present([d for d, _ in doses if d.sop_instance_uid in present])
        missing = [d for d, _ in doses if d.sop_instance_uid not in present]
        if missing:
            verified = self._move(missing, out)
            for d in missing:
                if d.sop_instance_uid not in verified:
                    out.problem(f"RTDOSE {d.sop_instance_uid} not verified in backup "
                                f"{self.lane.lane.backup}")

    def _dose_again(self, match: Dataset) -> Dataset | None:
        """A dose asked of the peer by its own UID, for its patient and the plans it
        references (a peer may return on a UID query what it leaves out of a broad one)."""
        item = Dataset()
        item.ReferencedSOPInstanceUID = ""
        keys = {k: match.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID")
                if match.get(k)}
        uid = str(match.SOPInstanceUID)
        answers = list(self.client.find(identifier(
            "IMAGE", **keys, SOPInstanceUID=uid, PatientID="", SOPClassUID="",
            ReferencedRTPlanSequence=Sequence([item]))))
        for again in answers:
            if str(again.get("SOPInstanceUID", "")) == uid:
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "Modality"):
                    if match.get(k) and not again.get(k):
                        setattr(again, k, match.get(k))
                return again
        return None

    def _walk(self, patient_id: str, modality: str, **keys: object) -> list[Dataset]:
        """For a hierarchical-only peer: the patient's studies (asked once per walk), their
        series of ``modality``, and those series' instances with ``keys`` returned."""
        if patient_id not in self._studies:
            self._studies[patient_id] = [
                str(m.StudyInstanceUID) for m in self.client.find(identifier(
                    "STUDY", PatientID=patient_id, StudyInstanceUID=""))
                if m.get("StudyInstanceUID")]
        return [m for study in self._studies[patient_id]
                for m in self.finder.series_instances(study, patient_id, modality, **keys)]

    def _find_instance(self, uid: str, patient_id: str, kind: str) -> InstanceRef | None:
        q = identifier("IMAGE", PatientID=patient_id, StudyInstanceUID="", SeriesInstanceUID="",
                       SOPInstanceUID=uid, SOPClassUID="")
        answers = self._walk(patient_id, kind) if self.hierarchical else self.client.find(q)
        matches = [m for m in answers if str(m.get("SOPInstanceUID", "")) == uid
                   and str(m.get("PatientID", "") or patient_id) == patient_id]
        return InstanceRef.from_match(matches[0]) if matches else None

    def _find_series(self, patient_id: str, study_uid: str, series_uid: str,
                     ) -> tuple[int | None, list[InstanceRef]]:
        hierarchy = {"PatientID": patient_id, "StudyInstanceUID": study_uid,
                     "SeriesInstanceUID": series_uid}
        q = identifier("SERIES", NumberOfSeriesRelatedInstances="", **hierarchy)
        announced = None
        for match in self.client.find(q):
            value = match.get("NumberOfSeriesRelatedInstances")
            if value not in (None, ""):
                announced = int(value)
        q = identifier("IMAGE", SOPInstanceUID="", SOPClassUID="", **hierarchy)
        # A peer that ignores keys answers with other series, other patients: only what says
        # it is of this series (and, when it says, of this patient) is taken.
        answers = list(self.client.find(q))
        refs = [InstanceRef.from_match(m) for m in answers if m.get("SOPInstanceUID")
                and str(m.get("SeriesInstanceUID", "") or series_uid) == series_uid
                and str(m.get("PatientID", "") or patient_id) == patient_id]
        # However it matched, no answer of this peer at IMAGE level is longer than its cap:
        # a planning CT's listing lifts the count below which record answers need no check.
        self.finder.memory.saw("IMAGE", len(answers))
        save_memory(self.ledger.ledger, self.source.label, self.finder.memory)
        return announced, refs

    def _note_present(self, refs: list[InstanceRef]) -> None:
        """Objects already in the backup: in the ledger as verified, for the running totals."""
        if refs:
            self.ledger.record_found(refs, kind="context")
            self.ledger.mark_verified([r.sop_instance_uid for r in refs])

    def _move(self, refs: list[InstanceRef], out: ContextOutcome,
              started: Future[str] | None = None, images: bool = False) -> set[str]:
        """Deliver ``refs`` (the one delivery path) and return the UIDs verified in the backup.

        ``started``: a move of the whole series already under way; only its end is awaited.
        ``images``: the objects of an image series (moved on the series association).
        A DICOM error is a problem of this link of the chain; the walk goes on."""
        out.moved.update(object_type(r.sop_class_uid) for r in refs)
        try:
            outcome = deliver(self.series_lane if images else self.query_lane, refs, "context",
                              self.site.settings.verify_timeout, started)
            for note in outcome.notes:
                out.note(note)
        except DicomError as exc:
            out.problem(str(exc))
        states = self.ledger.states([r.sop_instance_uid for r in refs])
        present = {uid for uid, state in states.items() if state == "verified"}
        out.verified.update(object_type(r.sop_class_uid) for r in refs
                            if r.sop_instance_uid in present)
        out.verified_uids |= present & {r.sop_instance_uid for r in refs}
        return present

    def _move_series(self, patient_id: str, study_uid: str, series_uid: str) -> str:
        ident = identifier("SERIES", PatientID=patient_id, StudyInstanceUID=study_uid,
                           SeriesInstanceUID=series_uid)
        result = self.mover.move([ident], self.target.aet)[0]
        return (f"C-MOVE status 0x{result.status:04X}, {result.completed} completed, "
                f"{result.failed} failed")


def link_records(lane: OpenLane, records: Iterable[InstanceRef],
                 ) -> tuple[dict[str, PlanLink], dict[str, str]]:
    """Read each record's plan reference from its copy in the backup and remember it.

    Returns the links and, per record that could not be read, why; those stay unlinked and are
    read again next run. A backup that is down raises (retriable) instead.
    """
    links, unreadable = {}, {}
    for ref in records:
        try:
            copy = lane.target.read(ref.sop_instance_uid)
        except RetriableBackupTargetError:
            raise
        except BackupTargetError as exc:
            unreadable[ref.sop_instance_uid] = str(exc)
            continue
        if copy is None:
            unreadable[ref.sop_instance_uid] = f"RT Record {ref.sop_instance_uid} is not in " \
                                               f"backup {lane.lane.backup}"
            continue
        links[ref.sop_instance_uid] = plan_link(copy)
    lane.ledger.link_plans(links)
    return links, unreadable


def totals(ledger: LaneLedger) -> dict[str, int]:
    """Cumulative verified context objects per type."""
    out = {t: 0 for t in TYPES}
    for sop_class, count in ledger.verified_by_class().items():
        out[object_type(sop_class)] += count
    return out
