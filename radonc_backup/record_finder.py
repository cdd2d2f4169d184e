"""The one RT Record finder: every way the backup asks an R&V (or a backup) for RT Records.

Used by the incremental and the nightly (date windows), the per-patient pass, plan-context
selection and probe. The strategy (relational or hierarchical), the memory of the peer's caps,
the splitting of answers that may have been cut and the screening of each answer live here
and nowhere else.

A peer may stop answering at N matches and still say Success (a silent cap). The finder does
not wait for the peer to say so:
- an answer the peer ended with Cancel (0xFE00), or whose count reaches a cap it knows (the
  source's ``max_find_results``, or one the peer showed before), is split and its parts asked;
  a part that cannot be split further and is still cut fails the run, naming the cap;
- an answer whose count reaches the largest count that peer has ever returned at that level,
  or a round number (100, 500, 1000, 256...), may be a cap nobody announced: it is checked by
  asking its parts. A part holding a match the whole did not is proof of a cap, which is
  remembered in the ledger; a part whose count reaches the whole's is checked in turn.
- what can be split: a date window into time ranges, a date range (TreatmentDate, StudyDate)
  into halves down to a day and then into time ranges, an undated query ("everything") into
  date ranges. A SERIES-level answer cannot be split: it fails at a known cap; a study's
  record series (two or more) as many as the largest SERIES answer are checked against the study's series of
  every modality (more prove them whole; as many leave them unproven).
- records a capped answer may hide and no part can show (no TreatmentDate, or no TreatmentTime
  in a day split into time ranges) are named as unproven, never called complete.

Every answer without the UID it was asked for is counted and named (patient, series): the run
that got it fails, nothing is dropped unseen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Protocol

from pydicom.dataset import Dataset

from .dicom_net import RT_RECORD_CLASSES, DicomClient, identifier
from .errors import FatalDicomError, FindTruncated
from .instance import InstanceRef
from .ledger import Ledger
from .windows import DayQuery, parse_treatment_datetime

EARLIEST = date(1900, 1, 1)
FUTURE_DAYS = 400  # an open date range is split no further than this far ahead of today


class Slice(Protocol):
    """A part of what a query asks for: the keys that say which part, and how to cut it in
    parts (``near``: the matches it returned, whose values place the cuts)."""

    def keys(self) -> dict[str, str]: ...

    def split(self, near: list[Dataset]) -> list["Slice"] | None: ...

    def holds(self, m: Dataset) -> bool: ...


def _dates(near: list[Dataset], key: str) -> list[date]:
    out = []
    for m in near:
        value = str(m.get(key, "") or "").strip()
        try:
            out.append(date(int(value[:4]), int(value[4:6]), int(value[6:8])))
        except ValueError:
            continue
    return sorted(out)


def _times(near: list[Dataset], key: str) -> list[time]:
    out = []
    for m in near:
        value = str(m.get(key, "") or "").strip()
        when = parse_treatment_datetime("19000101", value) if value else None
        if when is not None:
            out.append(when.time().replace(microsecond=0))
    return sorted(out)


def _shift(t: time, seconds: int) -> time | None:
    moved = datetime.combine(date(2000, 1, 1), t) + timedelta(seconds=seconds)
    return moved.time() if moved.date() == date(2000, 1, 1) else None


@dataclass(frozen=True)
class DayTime:
    """One date and an inclusive time range of it, on the given keys."""

    query: DayQuery
    date_key: str = "TreatmentDate"
    time_key: str = "TreatmentTime"

    def keys(self) -> dict[str, str]:
        return {self.date_key: self.query.treatment_date, self.time_key: self.query.treatment_time}

    def _part(self, start: time, end: time) -> "DayTime":
        return DayTime(DayQuery(self.query.day, start, end), self.date_key, self.time_key)

    def split(self, near: list[Dataset]) -> list[Slice] | None:
        """Around the median time of ``near`` (before it, its second, after it), else halves."""
        q = self.query
        inside = [t for t in _times(near, self.time_key) if q.start <= t <= q.end]
        if inside:
            m = inside[len(inside) // 2]
            before, after = _shift(m, -1), _shift(m, 1)
            parts = ([self._part(q.start, before)] if m > q.start and before else []) + \
                [self._part(m, m)] + ([self._part(after, q.end)] if m < q.end and after else [])
            if len(parts) > 1:
                return parts
        halves = q.split()
        return None if halves is None else [self._part(h.start, h.end) for h in halves]

    def holds(self, m: Dataset) -> bool:
        """Does the match say it belongs here (a peer that ignored the key sends others)?"""
        if str(m.get(self.date_key, "") or "").strip() != self.query.treatment_date:
            return False
        times = _times([m], self.time_key)
        return self.query.whole_day or not times or \
            self.query.start <= times[0] <= self.query.end

    def __str__(self) -> str:
        return str(self.query)


@dataclass(frozen=True)
class DateSpan:
    """Dates from ``lo`` to ``hi`` (open-ended when None) on the given keys."""

    lo: date
    hi: date | None
    today: date
    date_key: str = "TreatmentDate"
    time_key: str = "TreatmentTime"

    def keys(self) -> dict[str, str]:
        if self.hi == self.lo:
            value = f"{self.lo:%Y%m%d}"
        else:
            value = f"{self.lo:%Y%m%d}-" + (f"{self.hi:%Y%m%d}" if self.hi else "")
        return {self.date_key: value, self.time_key: ""}

    def _span(self, lo: date, hi: date | None) -> "DateSpan":
        return DateSpan(lo, hi, self.today, self.date_key, self.time_key)

    def split(self, near: list[Dataset]) -> list[Slice] | None:
        """Around the median date of ``near`` (before it, its day, after it), else halves; a
        single day into time ranges."""
        lo, hi, one = self.lo, self.hi, timedelta(days=1)
        if lo == hi:
            return DayTime(DayQuery(lo), self.date_key, self.time_key).split(near)
        inside = [d for d in _dates(near, self.date_key) if lo <= d and (hi is None or d <= hi)]
        if inside:
            m = inside[len(inside) // 2]
            parts = ([self._span(lo, m - one)] if m > lo else []) + [self._span(m, m)] + \
                ([self._span(m + one, hi)] if hi is None or m < hi else [])
            if len(parts) > 1:
                return parts
        if hi is None:
            if lo <= self.today:
                return [self._span(lo, self.today), self._span(self.today + one, None)]
            if lo > self.today + timedelta(days=FUTURE_DAYS):
                return None
            return [self._span(lo, lo), self._span(lo + one, None)]
        mid = lo + timedelta(days=(hi - lo).days // 2)
        return [self._span(lo, mid), self._span(mid + one, hi)]

    def holds(self, m: Dataset) -> bool:
        days = _dates([m], self.date_key)
        return bool(days) and self.lo <= days[0] and (self.hi is None or days[0] <= self.hi)

    def __str__(self) -> str:
        return f"{self.date_key} {self.keys()[self.date_key]}"


@dataclass(frozen=True)
class Everything:
    """No date asked (records without a date match too); splits into date ranges."""

    today: date
    date_key: str = "TreatmentDate"
    time_key: str = "TreatmentTime"

    def keys(self) -> dict[str, str]:
        return {self.date_key: "", self.time_key: ""}

    def split(self, near: list[Dataset]) -> list[Slice] | None:
        return DateSpan(EARLIEST, None, self.today, self.date_key, self.time_key).split(near)

    def holds(self, m: Dataset) -> bool:
        return True

    def __str__(self) -> str:
        return "any date"


@dataclass(frozen=True)
class Whole:
    """A query with no key to split it by (a study's series)."""

    def keys(self) -> dict[str, str]:
        return {}

    def split(self, near: list[Dataset]) -> list[Slice] | None:
        return None

    def holds(self, m: Dataset) -> bool:
        return True

    def __str__(self) -> str:
        return "whole"


def load_memory(ledger: "Ledger", peer: str, configured: int) -> "CapMemory":
    """What the ledger remembers of ``peer``'s answers, with the site's configured cap."""
    return CapMemory(configured, ledger.peer_cap(peer), ledger.largest_answers(peer))


def save_memory(ledger: "Ledger", peer: str, memory: "CapMemory") -> None:
    if memory.shown:
        ledger.remember_cap(peer, memory.shown)
    if memory.largest:
        ledger.remember_answers(peer, memory.largest)


def is_round(n: int) -> bool:
    """A count a vendor would choose as a limit: 100, 200, ..., or a power of two from 128."""
    return n >= 100 and (n % 100 == 0 or (n >= 128 and n & (n - 1) == 0))


@dataclass
class CapMemory:
    """What a peer's answers have shown: the cap it cut at (smallest), the largest count it has
    returned at each query level, and the cap the site configured. Loaded from and saved to
    the ledger by the caller."""

    configured: int = 0
    shown: int = 0
    largest: dict[str, int] = field(default_factory=dict)
    learned: set[int] = field(default_factory=set)  # caps proven this run
    cancelled: int = 0  # answers the peer ended with Cancel this run

    @property
    def cap(self) -> int:
        return min((c for c in (self.configured, self.shown) if c), default=0)

    def learn(self, n: int) -> None:
        if n > 0 and (not self.shown or n < self.shown):
            self.shown = n
        if n > 0:
            self.learned.add(n)

    def suspect(self, level: str, n: int) -> bool:
        """Might an answer of ``n`` at ``level`` have been cut by a cap nobody announced?"""
        return n > 0 and (n >= self.largest.get(level, 0) or is_round(n))

    def saw(self, level: str, n: int) -> None:
        self.largest[level] = max(self.largest.get(level, 0), n)


def _in_window(ref: InstanceRef, query: DayQuery) -> bool:
    """Our own check of the peer's date matching; a record we cannot place is kept."""
    when = parse_treatment_datetime(ref.treatment_date, ref.treatment_time)
    if when is None:
        return True
    if when.date() != query.day:
        return False
    if query.whole_day or not ref.treatment_time.strip():
        return True
    return query.start <= when.time().replace(microsecond=0) <= query.end


def _runs_of_days(windows: list[DayQuery], today: date) -> list[tuple[Slice, list[DayQuery]]]:
    """One query for each run of consecutive whole days (a date range: a new ledger's 62 days
    are one C-FIND, split only when its answer is or may be cut), one for each part day."""
    groups: list[tuple[Slice, list[DayQuery]]] = []
    run: list[DayQuery] = []

    def close() -> None:
        if run:
            part: Slice = DayTime(run[0]) if len(run) == 1 else \
                DateSpan(run[0].day, run[-1].day, today)
            groups.append((part, list(run)))
            run.clear()

    for q in sorted(set(windows)):
        if not q.whole_day:
            close()
            groups.append((DayTime(q), [q]))
        elif run and q.day == run[-1].day + timedelta(days=1):
            run.append(q)
        else:
            close()
            run.append(q)
    close()
    return groups


class Screen:
    """Trust no match: each answer is checked against what was asked (an RT Record, in the
    window, of the patient) before it enters the ledger or a move.

    A match that does not say what it is (no SOPClassUID and no Modality) or, answering a date
    query, when it was delivered, is asked again by its own UID; if the peer still does not say,
    the run stops with one line rather than move it blind. Matches a peer returned against a key
    (another class, date or patient) are dropped and counted, and ``notes`` names the key."""

    LOOKUPS = 200  # per run: beyond that the peer answers blind, and another setting is needed

    def __init__(self, client: DicomClient) -> None:
        self.client = client
        self.ignored: Counter[str] = Counter()
        self.looked_up = 0
        self._answers: dict[str, Dataset] = {}  # UID -> its answer when asked by UID

    def keep(self, match: Dataset, query: DayQuery | list[DayQuery] | None = None,
             patient_id: str | None = None) -> InstanceRef | None:
        windows = [query] if isinstance(query, DayQuery) else list(query or [])
        lacks_date = bool(windows) and "TreatmentDate" not in match
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
        if windows and not any(_in_window(ref, q) for q in windows):
            self.ignored["TreatmentDate/TreatmentTime"] += 1
            return None
        return ref

    def _look_up(self, match: Dataset) -> Dataset:
        uid = str(match.get("SOPInstanceUID", ""))
        if uid in self._answers:  # a peer that ignores the date sends it to every window
            return self._answers[uid]
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
        self._answers[uid] = answers[0]
        return answers[0]

    def _blind(self, detail: str) -> FatalDicomError:
        return FatalDicomError(self.client.site, self.client.peer.label, "C-FIND",
                               f"the peer does not say what its matches are ({detail}): "
                               "nothing is moved blind; run `dicom_tools check` and see "
                               "docs/r-and-v-compatibility.md", calling_ae=self.client.calling_ae)

    def notes(self) -> list[str]:
        return [f"{self.client.peer.label} ignored {key} in its C-FIND answers: {n} match(es) "
                "that were not asked for were dropped" for key, n in sorted(self.ignored.items())]


@dataclass
class Finding:
    """What a search found, and what it could not prove."""

    refs: list[InstanceRef] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the peer made the search do
    unusable: list[str] = field(default_factory=list)  # answers without their UID, named
    unproven: list[str] = field(default_factory=list)  # cut answers no part could complete
    finds: int = 0  # C-FIND requests sent


@dataclass
class _Check:
    """A part asked to test whether its parent's answer of ``n`` matches was cut."""

    n: int
    uids: frozenset[str]


UID_KEY = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


class RecordFinder:
    """Finds RT Records on one peer, the way that peer accepts (``hierarchical``: Study ->
    Series -> Image, each query naming its one parent)."""

    CHECKS = 400  # C-FINDs per finder spent checking answers that may be cut (not known cuts)

    def __init__(self, client: DicomClient, hierarchical: bool = False,
                 memory: CapMemory | None = None, today: date | None = None,
                 screen: Screen | None = None) -> None:
        self.client = client
        self.hierarchical = hierarchical
        self.memory = memory or CapMemory()
        self.today = today or date.today()
        self.screen = screen or Screen(client)
        self.finding = Finding()
        self._found: dict[str, InstanceRef] = {}
        self.checks = 0
        self.on_split: Callable[[str], None] | None = None

    # --- the searches -------------------------------------------------------------------

    def in_windows(self, queries: Iterable[DayQuery], studies: Iterable[tuple[str, str]] = (),
                   study_since: date | None = None,
                   on_answered: Callable[[int, int], None] | None = None) -> Finding:
        """Every RT Record treated in the windows. Hierarchical: the studies walked are
        ``studies`` (patient, study: the ledger's), those with a StudyDate from ``study_since``,
        and in each every record series; the windows are applied to the answers, and a record
        with no TreatmentDate is kept (it cannot be placed, and it is an RT Record)."""
        windows = list(queries)
        if self.hierarchical:
            walk = {study: patient for patient, study in studies}
            if study_since is not None:
                for m in self.collect("STUDY", {"StudyInstanceUID": "", "PatientID": ""},
                                       DateSpan(study_since, None, self.today, "StudyDate",
                                                "StudyTime"), "studies"):
                    walk.setdefault(str(m.StudyInstanceUID), str(m.get("PatientID", "") or ""))
            for ref in self._walk_studies(walk, on_answered):
                if not ref.treatment_date or any(_in_window(ref, q) for q in windows):
                    self._add(ref)
            return self._done()
        groups = _runs_of_days(windows, self.today)
        done = 0  # windows answered, for progress (a run of days is one query)
        for part, covered in groups:
            for m in self.collect("IMAGE", self._record_keys(""), part, f"window {part}"):
                ref = self.screen.keep(m, covered)
                if ref is not None:
                    self._add(ref)
            done += len(covered)
            if on_answered is not None:
                on_answered(done, len(windows))
        return self._done()

    def of_patients(self, patient_ids: Iterable[str],
                    on_answered: Callable[[int, int], None] | None = None) -> Finding:
        """Every RT Record of these patients, whatever its date (records with an empty
        TreatmentDate, or untimed in a split day, match no date query but their patient)."""
        patients = list(dict.fromkeys(patient_ids))
        for done, patient in enumerate(patients, 1):
            if self.hierarchical:
                walk = {str(m.StudyInstanceUID): patient for m in self.collect(
                    "STUDY", {"PatientID": patient, "StudyInstanceUID": ""},
                    Everything(self.today, "StudyDate", "StudyTime"), f"patient {patient}")}
                refs: Iterable[InstanceRef] = self._walk_studies(walk)
            else:
                refs = filter(None, (self.screen.keep(m) for m in self.collect(
                    "IMAGE", self._record_keys(patient), Everything(self.today),
                    f"patient {patient}")))
            for ref in refs:
                if ref.patient_id == patient:
                    self._add(ref)
                else:
                    self.screen.ignored["PatientID"] += 1
            if on_answered is not None:
                on_answered(done, len(patients))
        return self._done()

    def inventory(self, on_answered: Callable[[int, int], None] | None = None) -> Finding:
        """Every RT Record the peer holds, of every patient, without a date: the check that
        shares no blind spot with the date queries (a new patient whose only record has no
        TreatmentDate, a record older than any look-back). Relational: one query for every
        record, split by date when it is or may be cut; hierarchical: every study (split by
        StudyDate), walked to its record series and their records. Undated ones are in the
        unsplit answer; when that answer is cut where no date can split it, the relational
        inventory walks the studies too, and what no answer could prove is named unproven."""
        if self.hierarchical:
            self._inventory_by_study(on_answered)
            return self._done()
        unproven = len(self.finding.unproven)
        for m in self.collect("IMAGE", self._record_keys(""), Everything(self.today),
                              "inventory of records"):
            ref = self.screen.keep(m)
            if ref is not None:
                self._add(ref)
        doubts = self.finding.unproven[unproven:]
        if doubts:
            # The one answer was cut where no date can split it (undated records, or many at
            # one instant): asked study by study instead, each answer small enough to be whole.
            # What the walk proves complete is no longer unproven.
            del self.finding.unproven[unproven:]
            self._inventory_by_study(on_answered)
            if len(self.finding.unproven) > unproven:
                self.finding.unproven[unproven:unproven] = doubts
        elif on_answered is not None:
            on_answered(1, 1)
        return self._done()

    def _inventory_by_study(self, on_answered: Callable[[int, int], None] | None) -> None:
        walk = {str(m.StudyInstanceUID): str(m.get("PatientID", "") or "")
                for m in self.collect("STUDY", {"StudyInstanceUID": "", "PatientID": ""},
                                      Everything(self.today, "StudyDate", "StudyTime"),
                                      "inventory of studies")}
        for ref in self._walk_studies(walk, on_answered):
            self._add(ref)

    def in_dates(self, start: date | None, end: date | None,
                 patient_ids: Iterable[str] = ("",)) -> Finding:
        """Every RT Record treated from ``start`` to ``end`` (either open; neither: any date,
        undated records too) of each patient (``""``: every patient), asked relationally."""
        part: Slice = DateSpan(start or EARLIEST, end, self.today) if start or end else \
            Everything(self.today)
        for patient in patient_ids:
            for m in self.collect("IMAGE", self._record_keys(patient), part,
                                   f"patient {patient}" if patient else "records"):
                ref = self.screen.keep(m, patient_id=patient or None)
                if ref is not None:
                    self._add(ref)
        return self._done()

    def _record_keys(self, patient_id: str) -> dict[str, object]:
        return {"Modality": "RTRECORD", "PatientID": patient_id, "StudyInstanceUID": "",
                "SeriesInstanceUID": "", "SOPInstanceUID": "", "SOPClassUID": ""}

    def _walk_studies(self, walk: dict[str, str],
                      on_answered: Callable[[int, int], None] | None = None
                      ) -> list[InstanceRef]:
        found = []
        for done, (study, patient) in enumerate(sorted(walk.items()), 1):
            for m in self.series_instances(study, patient, "RTRECORD", PatientID="",
                                           TreatmentDate="", TreatmentTime=""):
                ref = self.screen.keep(m)
                if ref is not None:
                    found.append(ref)
            if on_answered is not None:
                on_answered(done, len(walk))
        return found

    def series_instances(self, study: str, patient_id: str, modality: str,
                         **keys: object) -> list[Dataset]:
        """One study's instances of ``modality``, as a hierarchical-only peer accepts: one
        SERIES-level C-FIND for its series of that modality, then the instances of each series
        returning ``keys`` (split by date when cut, for RT Records). Each answer is given its
        study, series and (when it has none) patient, and, when it says neither SOPClassUID nor
        Modality, its series' Modality; a series of another modality is skipped and counted."""
        found: list[Dataset] = []
        series = self.collect("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": "",
                                          "Modality": modality}, Whole(), f"study {study}",
                               patient_id)
        for s in series:
            said = str(s.get("Modality", "") or "")
            if said not in (modality, ""):
                self.screen.ignored["Modality"] += 1
                continue
            uid = str(s.SeriesInstanceUID)
            dated = modality == "RTRECORD" and "TreatmentDate" in keys
            part: Slice = Everything(self.today) if dated else Whole()
            base = {k: v for k, v in keys.items() if not dated or k not in ("TreatmentDate",
                                                                           "TreatmentTime")}
            for m in self.collect("IMAGE", {"StudyInstanceUID": study,
                                             "SeriesInstanceUID": uid, "SOPInstanceUID": "",
                                             "SOPClassUID": "", **base}, part,
                                   f"series {uid}", patient_id):
                m.StudyInstanceUID, m.SeriesInstanceUID = study, uid
                if not m.get("PatientID"):
                    m.PatientID = patient_id
                if not (m.get("SOPClassUID") or m.get("Modality")) and said == modality:
                    m.Modality = modality  # the series said what its instances are
                found.append(m)
        return found

    # --- the one place a C-FIND answer is taken -------------------------------------------

    def collect(self, level: str, base: dict[str, object], first: Slice, what: str,
                 patient_id: str = "") -> list[Dataset]:
        """Every match of ``base`` and ``first``, split as the rules in the module's text say.
        Matches are de-duplicated by the level's UID; an answer without it is named."""
        uid_key = UID_KEY[level]
        out: dict[str, Dataset] = {}
        pending: list[tuple[Slice, _Check | None]] = [(first, None)]
        while pending:
            part, check = pending.pop(0)
            matches, cut = self._ask(identifier(level, **base, **part.keys()))
            uids = []
            for m in matches:
                uid = str(m.get(uid_key, "") or "").strip()
                if not uid:
                    self._unusable(level, m, what, patient_id)
                    continue
                uids.append(uid)
                out.setdefault(uid, m)
            n = len(matches)
            largest_before = self.memory.largest.get(level, 0)
            self.memory.saw(level, n)
            if check is not None and set(uids) - check.uids:
                self.memory.learn(check.n)  # a part held what the whole did not: it was cut
            if cut:
                self.memory.learn(n)
                self.memory.cancelled += 1
            cap = self.memory.cap
            if cut or (cap and n >= cap):
                parts = part.split(matches)
                if parts is None:
                    raise FatalDicomError(
                        self.client.site, self.client.peer.label, "C-FIND",
                        f"{what} ({part}): {n} answers reach the peer's cap"
                        f"{f' of {cap}' if cap else ''} and cannot be asked in smaller parts: "
                        "raise its C-FIND result limit", calling_ae=self.client.calling_ae)
                self._split(what, part, n, cap)
                pending[:0] = [(p, None) for p in parts]
                self._may_hide(part, matches, what, patient_id, n)
                continue
            doubt = (n >= check.n) if check is not None else \
                (n > 0 and (n >= largest_before or is_round(n)))
            if doubt and not all(part.holds(m) for m in matches):
                doubt = False  # the peer ignores the key parts are cut by: no part can tell
                if check is not None and n >= 2 and is_round(n) and not cap:
                    # Only for a vendor's round count: a peer that ignores dates returns every
                    # answer whole, the largest it ever gave included. (Below a known cap an
                    # answer is not cut by it; at the cap it is split above.)
                    self._cannot_check(what, part, n, patient_id, "the peer ignores the key "
                                       "the parts are cut by")
            if doubt and self.checks >= self.CHECKS:
                self._unproven(f"{self.client.peer.label}: {what} ({part}): {n} matches may be "
                               f"a cap; not checked, this run already sent {self.CHECKS} "
                               "C-FINDs to check answers")
                doubt = False
            if doubt:
                parts = part.split(matches)
                if parts is not None:
                    self.checks += len(parts)
                    pending[:0] = [(p, _Check(n, frozenset(uids))) for p in parts]
                elif level == "SERIES" and base.get("Modality") == "RTRECORD" and n >= 2 \
                        and not cap:  # (one answer: as below, a cap of one is not doubted)
                    self._series_floor(base, n, what, patient_id)
                elif check is not None and n >= 2 and not cap:
                    # Every match of a doubted answer sits in one instant no key can split: a
                    # silent cap there can be neither shown nor ruled out.
                    self._cannot_check(what, part, n, patient_id, "its matches share one date "
                                       "and time")
        return list(out.values())

    def _series_floor(self, base: dict[str, object], n: int, what: str,
                      patient_id: str) -> None:
        """A study's record series, as many as the largest SERIES answer the peer ever gave:
        no key splits a SERIES query, so the study's series of every modality are asked once.
        No answer is longer than the cap: more of them prove the record series' answer whole
        (and lift the count below which no SERIES answer needs this); as many leave it
        unproven, never taken as whole."""
        self.checks += 1
        wider, _ = self._ask(identifier("SERIES", **{**base, "Modality": ""}))
        self.memory.saw("SERIES", len(wider))
        if len(wider) <= n:
            self._unproven(f"{self.client.peer.label}: {what}: {n} record series, as many as "
                           "the largest SERIES answer the peer ever gave, and the study holds "
                           "no more series of any kind: whether the peer cut them cannot be "
                           "shown" + (f" (patient {patient_id})" if patient_id else ""))

    def _cannot_check(self, what: str, part: Slice, n: int, patient_id: str, why: str) -> None:
        """A part that held every match of the answer it was to check, and that cannot be
        asked in smaller parts: whether the peer cut it stays unproven, never taken as whole."""
        self._unproven(f"{self.client.peer.label}: {what} ({part}): {n} matches, as many as the "
                       f"answer they were to check, and {why}: no smaller part can show whether "
                       "the peer cut them" + (f" (patient {patient_id})" if patient_id else ""))

    def _ask(self, query: Dataset) -> tuple[list[Dataset], bool]:
        self.finding.finds += 1
        matches: list[Dataset] = []
        try:
            for m in self.client.find(query):
                matches.append(m)
        except FindTruncated:
            return matches, True
        return matches, False

    def _split(self, what: str, part: Slice, n: int, cap: int) -> None:
        if self.on_split is not None:
            self.on_split(f"{what} ({part}): {n} answers"
                          + (f" reach the cap of {cap}" if cap else " cut short") + ": split")

    def _may_hide(self, part: Slice, matches: list[Dataset], what: str, patient_id: str,
                  n: int) -> None:
        """A cut answer may hide matches none of its parts can show: records without a date
        when an undated query is split into date ranges, records without a time when a day
        is split into time ranges. Those the cut answer held are kept; the rest are named as
        unproven, never taken as absent."""
        if isinstance(part, Everything):
            lacking = "a date"
        elif isinstance(part, DateSpan) and part.lo == part.hi or \
                isinstance(part, DayTime) and part.query.whole_day:
            lacking = "a time"
        else:
            return
        self._unproven(f"{self.client.peer.label}: {what} ({part}): the answer was cut at {n} "
                       f"matches; records without {lacking} beyond the cut match none of its "
                       "parts and cannot be proven absent"
                       + (f" (patient {patient_id})" if patient_id else ""))

    def _unusable(self, level: str, match: Dataset, what: str, patient_id: str) -> None:
        """Named once per patient and series (the parts of a checked answer hold it again)."""
        patient = str(match.get("PatientID", "") or "") or patient_id or "unknown"
        series = str(match.get("SeriesInstanceUID", "") or "")
        text = (f"{self.client.peer.label}: {level}-level answer(s) without {UID_KEY[level]} "
                f"(patient {patient}" + (f", series {series}" if series else "") + f"; {what})")
        if text not in self.finding.unusable:
            self.finding.unusable.append(text)

    def _unproven(self, text: str) -> None:
        if text not in self.finding.unproven:
            self.finding.unproven.append(text)

    def _add(self, ref: InstanceRef) -> None:
        self._found.setdefault(ref.sop_instance_uid, ref)

    def _done(self) -> Finding:
        self.finding.refs = sorted(self._found.values(), key=lambda r: (
            r.treatment_date, r.treatment_time, r.sop_instance_uid))
        self.finding.notes = self.screen.notes() + [
            f"{self.client.peer.label} cut a C-FIND answer at {n} matches without being asked "
            "to: the query was split and asked again; the cap is remembered"
            for n in sorted(self.memory.learned)]
        return self.finding
