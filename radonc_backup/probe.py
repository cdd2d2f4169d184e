"""Probe an R&V's Q/R service before trusting it: what it answers, not what Orthanc would.

`dicom_tools probe --site X [source]` runs these checks with C-ECHO, C-FIND and association
negotiation only (it moves nothing), prints what it found, the settings that fit, and exits
non-zero when the site's configuration will not work with this peer. Each check is a plain
function of a ``DicomClient`` so tests can run it against in-process SCPs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, timedelta

from pydicom.dataset import Dataset
from pynetdicom import build_role
from pynetdicom import sop_class as sop
from pynetdicom.presentation import build_context

from .config import PROFILES, AriaSource, MimSource
from .dicom_net import RT_RECORD_CLASSES, DicomClient, contexts_for, identifier
from .errors import DicomError, FatalDicomError, FindTruncated
from .record_finder import DateSpan, RecordFinder, is_round

OK, WARN, FAIL = "ok", "warn", "FAIL"
RT_BEAMS_RECORD = sop.RTBeamsTreatmentRecordStorage
CT_IMAGE = sop.CTImageStorage


@dataclass
class Check:
    name: str
    verdict: str  # ok, warn, FAIL
    found: str


@dataclass
class ProbeReport:
    peer: str
    checks: list[Check] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # lines to copy into the site's TOML

    def add(self, name: str, verdict: str, found: str) -> None:
        self.checks.append(Check(name, verdict, found))

    @property
    def works(self) -> bool:
        return all(c.verdict != FAIL for c in self.checks)


def _answers(client: DicomClient, query: Dataset) -> tuple[list[Dataset], bool]:
    """Every match of ``query``, and whether the peer ended the answer with Cancel (cut)."""
    matches: list[Dataset] = []
    try:
        for m in client.find(query):
            matches.append(m)
    except FindTruncated:
        return matches, True
    return matches, False


def _cap_check(client: DicomClient, level: str, base: dict[str, object], since: date,
               today: date, date_key: str, time_key: str) -> tuple[int, str, int]:
    """The cap the peer shows (0: none), how, and how many matches there are, found the way
    runs find it: a broad query and, when its count may be a cap, its parts (a part holding a
    match the broad answer did not proves a silent cap; Cancel is a cap the peer announces)."""
    finder = RecordFinder(client, today=today)
    matches = finder.collect(level, base, DateSpan(since, today, today, date_key, time_key),
                             "probe")
    memory = finder.memory
    if not memory.learned:
        return 0, f"{len(matches)} matches from {since} to {today}, also asked in parts: no " \
                  "cap shown", len(matches)
    cap = min(memory.learned)
    how = (f"ends answers cut at {cap} with Cancel (0xFE00)" if memory.cancelled else
           f"stops at {cap} matches and says Success (a silent cap): {len(matches)} exist "
           f"from {since} to {today}")
    return cap, how, len(matches)


RECORD_KEYS: dict[str, object] = {"Modality": "RTRECORD", "PatientID": "",
                                  "StudyInstanceUID": "", "SeriesInstanceUID": "",
                                  "SOPInstanceUID": "", "SOPClassUID": ""}


def _record_query(start: date, end: date) -> Dataset:
    return identifier("IMAGE", **RECORD_KEYS, TreatmentDate=f"{start:%Y%m%d}-{end:%Y%m%d}",
                      TreatmentTime="")


def probe(client: DicomClient, source: AriaSource | MimSource, today: date) -> ProbeReport:
    """Every check; a peer that does not answer the echo gets no further checks."""
    report = ProbeReport(client.peer.label)
    try:
        client.echo()
    except DicomError as exc:
        report.add("C-ECHO", FAIL, str(exc))
        return report
    report.add("C-ECHO", OK, "answers")
    _records(client, source, today, report)
    _hierarchical(client, source, today, report)
    _retrieve(client, source, report)
    return report


def _records(client: DicomClient, source: AriaSource | MimSource, today: date,
             report: ProbeReport) -> None:
    """The query every backup run makes: relational, IMAGE level, the last 7 days' records."""
    start = today - timedelta(days=6)
    try:
        answers, _ = _answers(client, _record_query(start, today))
    except FatalDicomError as exc:
        if source.query == "hierarchical":
            report.add("relational record query", OK,
                       f"refused ({exc.detail}): a hierarchical-only peer, walked "
                       "hierarchically as this source is set to")
        else:
            fits = "strict" if isinstance(source, MimSource) else "aria"
            report.add("relational record query", FAIL,
                       f"refused ({exc.detail}): a hierarchical-only peer; set profile = "
                       f'"{fits}" (query = "hierarchical")')
            report.settings.append(f'profile = "{fits}"  # ' + ", ".join(
                f"{k} = {json.dumps(v)}" for k, v in PROFILES[fits].items()))
        return
    blind = [a for a in answers if not (a.get("SOPClassUID") or a.get("Modality"))]
    other = [a for a in answers if a.get("SOPClassUID")
             and str(a.SOPClassUID) not in RT_RECORD_CLASSES]
    dates = [str(a.get("TreatmentDate", "") or "") for a in answers]
    outside = [d for d in dates if d and not f"{start:%Y%m%d}" <= d <= f"{today:%Y%m%d}"]
    undated = sum(1 for a in answers if "TreatmentDate" not in a)
    records = len(answers) - len(other) - len(outside)
    report.add("relational record query", OK,
               f"{len(answers)} answer(s) for RT Records treated {start} to {today}"
               + (f", of which {records} are RT Records in that range (what the peer said of "
                  "the others is below)" if records != len(answers) else ""))
    if blind:
        uid = str(blind[0].get("SOPInstanceUID", ""))
        again = [a for a in client.find(identifier(
            "IMAGE", SOPInstanceUID=uid, SOPClassUID="", Modality="", TreatmentDate=""))
            if a.get("SOPClassUID") or a.get("Modality")]
        if not again:
            report.add("answers say what they are", FAIL,
                       f"{len(blind)} match(es) without SOPClassUID or Modality, also when asked "
                       f"by UID ({uid}): runs stop rather than move them blind")
        else:
            report.add("answers say what they are", FAIL if len(blind) > 200 else WARN,
                       f"{len(blind)} match(es) without SOPClassUID or Modality: each is asked "
                       "again by its UID (at most 200 a run)")
    if other:
        report.add("Modality/SOPClassUID honoured", WARN,
                   f"{len(other)} match(es) of other classes: the peer ignores the key; runs "
                   "drop them and say so")
    if outside or undated:
        report.add("TreatmentDate returned and honoured", WARN,
                   f"{len(outside)} match(es) outside the range, {undated} without the key")
    try:
        old = list(client.find(_record_query(date(1900, 1, 1), date(1900, 1, 1))))
    except DicomError as exc:
        report.add("TreatmentDate honoured", WARN, f"a query for 1900-01-01 failed: {exc}")
    else:
        if not old:
            report.add("TreatmentDate honoured", OK, "nothing treated on 1900-01-01")
        elif source.query == "relational":
            # Every window would list everything the peer holds, each match asked again by
            # UID when it does not say what it is: the run stops (nothing moved blind).
            report.add("TreatmentDate honoured", FAIL,
                       f"{len(old)} match(es) for 1900-01-01: the peer ignores TreatmentDate, "
                       "so a date query lists everything it holds; set profile = \"strict\" "
                       "(walk studies, then their RT Record series)")
            if not any(line.startswith("profile") for line in report.settings):
                report.settings.append('profile = "strict"  # ' + ", ".join(
                    f"{k} = {json.dumps(v)}" for k, v in PROFILES["strict"].items()))
        else:
            report.add("TreatmentDate honoured", WARN,
                       f"{len(old)} match(es) for 1900-01-01: the peer ignores TreatmentDate; "
                       "the hierarchical walk applies the windows itself")
    _report_cap(report, source, *_cap_check(client, "IMAGE", RECORD_KEYS, start, today,
                                            "TreatmentDate", "TreatmentTime"))


def _report_cap(report: ProbeReport, source: AriaSource | MimSource, cap: int, how: str,
                count: int, level: str = "") -> None:
    """What the cap check found, and the setting that makes runs split at that cap. Runs also
    find a cap nobody set (docs/r-and-v-compatibility.md), but only once an answer shows it:
    said here, the first run splits too."""
    configured = source.max_find_results
    name = f"answer cap ({level})" if level else "answer cap"
    if cap:
        fits = configured and configured <= cap
        report.add(name, OK if fits else WARN,
                   f"the peer {how}" + (f"; max_find_results = {configured} covers it" if fits
                                        else "; set max_find_results so runs split from the "
                                             "first answer"))
        if not fits and not any(line.startswith("max_find_results") for line in
                                report.settings):
            report.settings.append(f"max_find_results = {cap}  # the cap this peer showed")
    elif is_round(count):
        report.add(name, WARN, f"exactly {count} matches: a round number, maybe a cap "
                                       "it did not show here; runs check such answers by "
                                       "splitting them")
    else:
        report.add(name, OK, how + (f" (max_find_results = {configured})"
                                            if configured else ""))


def _study_query(start: date, end: date | None) -> Dataset:
    dates = f"{start:%Y%m%d}-" + (f"{end:%Y%m%d}" if end else "")
    return identifier("STUDY", StudyDate=dates, StudyInstanceUID="", PatientID="")


def _hierarchical(client: DicomClient, source: AriaSource | MimSource, today: date,
                  report: ProbeReport) -> None:
    """The STUDY-level search a hierarchical run makes: studies of the last new_study_days."""
    since = today - timedelta(days=source.new_study_days)
    try:
        studies, cut = _answers(client, _study_query(since, None))
    except DicomError as exc:
        report.add("STUDY-level query", WARN, f"refused: {exc}")
        return
    report.add("STUDY-level query", OK, f"{len(studies)} studies since {since}"
               + (" (cut short with Cancel)" if cut else ""))
    try:
        found = _cap_check(client, "STUDY", {"StudyInstanceUID": "", "PatientID": ""}, since,
                           today, "StudyDate", "StudyTime")
    except DicomError as exc:
        report.add("answer cap (STUDY level)", WARN, f"not checked: {exc}")
        return
    _report_cap(report, source, *found, level="STUDY level")


def _retrieve(client: DicomClient, source: AriaSource | MimSource, report: ProbeReport) -> None:
    """Which retrieve service the peer accepts, and for C-GET which transfer syntaxes."""
    wanted = client.get_model if isinstance(source, MimSource) else client.move_model
    name = "C-GET" if isinstance(source, MimSource) else "C-MOVE"
    contexts = [build_context(wanted)]
    roles: list[object] = []
    if isinstance(source, MimSource):
        contexts += contexts_for([RT_BEAMS_RECORD, CT_IMAGE])
        roles = [build_role(RT_BEAMS_RECORD, scp_role=True), build_role(CT_IMAGE, scp_role=True)]
    try:
        with client.association(name, contexts, roles) as assoc:
            accepted = assoc.accepted_contexts
    except DicomError as exc:
        report.add(f"{name} service", FAIL, str(exc))
        return
    if not any(cx.abstract_syntax == wanted for cx in accepted):
        report.add(f"{name} service", FAIL, f"the peer accepts no {name} for this source's type "
                                            f"({source.type})")
        return
    report.add(f"{name} service", OK, "accepted (a probe moves nothing: a UID-list refusal "
                                      "shows in the first run's summary)")
    if isinstance(source, MimSource):
        syntaxes = sorted({cx.transfer_syntax[0].name for cx in accepted
                           if cx.abstract_syntax == CT_IMAGE})
        report.add("C-GET transfer syntaxes (CT)", OK if len(syntaxes) > 2 else WARN,
                   ", ".join(syntaxes) or "none: images cannot come by C-GET")
