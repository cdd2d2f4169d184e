"""Prefect tasks for the RT Record backup: thin wrappers that add retries and names.

Tasks take a ``LaneRef`` (which lane, by name) and plain values, and open the lane themselves.
They use no result cache: each run must ask the R&V and the backup afresh, and the ledger is
what lets a rerun skip finished work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from radonc_backup.backup_target import OrthancBackup
from radonc_backup.config import MosaiqSource, Settings
from radonc_backup.continuity import backup_gaps
from radonc_backup.errors import ConfigError
from radonc_backup.errors import is_retriable
from radonc_backup.instance import InstanceRef
from radonc_backup.lane import LaneRef, OpenLane
from radonc_backup.record_finder import Finding, RecordFinder, load_memory, save_memory
from radonc_backup.rt_backup import Plan, plan_work
from radonc_backup.transfer import Awaiting, Outcome, deliver, settle, verify_present
from radonc_backup.errors import DicomError
from radonc_backup.validation import DayCheck, Discrepancy, Validation, check_day, \
    context_damage, repair, source_copies, unknown_to_ledger, validate_lane
from radonc_backup.windows import DayQuery
from tasks.progress import INSTANCES_FROM, PATIENTS_FROM, WINDOWS_FROM, Progress


def retry_only_transient(task: Task[Any, Any], task_run: Any, state: Any) -> bool:
    """Retry association failures, timeouts and a busy or down peer; never config or data errors."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and is_retriable(exc)


def with_site_retries(t: Task[Any, Any], settings: Settings) -> Task[Any, Any]:
    """The task with the site's retry policy: N attempts, exponential backoff with jitter."""
    return t.with_options(
        retries=settings.retries - 1,
        retry_delay_seconds=exponential_backoff(backoff_factor=settings.retry_backoff_seconds),
        retry_jitter_factor=settings.retry_jitter_factor,
        retry_condition_fn=retry_only_transient,
    )


@dataclass
class Found:
    refs: list[InstanceRef]
    notes: list[str] = field(default_factory=list)  # keys the peer ignored, for the summary
    unusable: list[str] = field(default_factory=list)  # answers without a SOP Instance UID
    unproven: list[str] = field(default_factory=list)  # cut answers no part could complete


def record_finder(lane: OpenLane, today: date | None = None) -> RecordFinder:
    """The lane's source as the one finder asks it, with what the ledger remembers of its
    answers (caps shown, largest answers) and the configured ``max_find_results``."""
    memory = load_memory(lane.ledger.ledger, lane.source.label, lane.source.max_find_results)
    finder = RecordFinder(lane.client(), lane.source.query == "hierarchical", memory, today)
    finder.on_split = lambda text: get_run_logger().info("site %s: %s", lane.site.name, text)
    return finder


def finished(lane: OpenLane, finder: RecordFinder, finding: Finding) -> Found:
    """Remember what the peer's answers showed; log what the summary will say."""
    save_memory(lane.ledger.ledger, lane.source.label, finder.memory)
    logger = get_run_logger()
    for note in finding.notes + finding.unproven:
        logger.warning("site %s: %s", lane.site.name, note)
    for line in finding.unusable[:20]:
        logger.error("site %s: %s", lane.site.name, line)
    return Found(finding.refs, finding.notes, finding.unusable, finding.unproven)


INVENTORY_CHECKS = 100_000
"""Checking C-FINDs the inventory sweep may send (a backup run's budget is RecordFinder.CHECKS)."""


@task(name="find-rt-records", cache_policy=NO_CACHE)
def find_rt_records(ref: LaneRef, queries: list[DayQuery], inventory: bool = False) -> Found:
    """C-FIND the RT Records of each window on the R&V (``inventory``: every record it holds,
    without a date), splitting answers that were or may have been cut, and keeping only the
    matches that are what was asked for."""
    lane = ref.open()
    finder = record_finder(lane)
    progress = Progress(f"date windows asked of {lane.source.aet}, site {ref.site}",
                        len(queries), WINDOWS_FROM)
    if inventory:
        walked: list[Progress] = []

        def shown(done: int, total: int) -> None:
            if not walked:
                walked.append(Progress(f"studies walked on {lane.source.aet}, site {ref.site}",
                                       total, PATIENTS_FROM))
            walked[0].update(done, total=total)

        # The monthly proof is not a 10-minute run: every doubted answer is checked, however
        # many (an unchecked one would be unproven and fail the sweep every month).
        finder.CHECKS = INVENTORY_CHECKS
        finding = finder.inventory(on_answered=shown)
    elif lane.source.query == "hierarchical" and queries:
        first, last = min(q.day for q in queries), max(q.day for q in queries)
        since = first - timedelta(days=lane.site.settings.patient_pass_days)
        finding = finder.in_windows(
            queries, lane.ledger.studies_with_records_since(f"{since:%Y%m%d}"),
            last - timedelta(days=lane.source.new_study_days))
    else:
        finding = finder.in_windows(queries, on_answered=lambda done, total: progress.update(
            done, total=total))
    if finder.memory.cap and finder.memory.cap != lane.source.max_find_results:
        finding.notes.append(f"{lane.source.label} has shown a C-FIND cap of "
                             f"{finder.memory.cap} before: answers reaching it are split (set "
                             "max_find_results to say so in the config)")
    get_run_logger().info("site %s: %d RT Records on %s in %d window(s), %d C-FIND(s)",
                          ref.site, len(finding.refs), lane.source.aet, len(queries),
                          finding.finds)
    return finished(lane, finder, finding)


@task(name="read-mosaiq-sessions", cache_policy=NO_CACHE)
def read_mosaiq_records(ref: LaneRef, queries: list[DayQuery], undated: bool = False) -> Found:
    """SELECT the fields Mosaiq delivered in the windows, make one RT Beams Treatment Record
    per patient per session, and stage them for delivery (bound parameters only).

    ``undated`` (the nightly): also the fields Mosaiq holds without a treatment date, which
    no window selects; their records have an empty TreatmentDate and are named in a note."""
    from radonc_backup.mosaiq import connect, course_starts, odd_values, read_sessions, \
        read_undated, session_record, sessions, stage, staging_dir

    lane = ref.open()
    source = lane.source
    if not isinstance(source, MosaiqSource):
        raise TypeError(f"source {ref.source} is not a Mosaiq source")
    start = min(datetime.combine(q.day, q.start) for q in queries)
    end = max(datetime.combine(q.day, q.end) for q in queries)
    conn = connect(lane.site, ref.source, source)
    try:
        found = read_sessions(conn, lane.site, ref.source, source, start, end)
        no_date = read_undated(conn, lane.site, ref.source, source) if undated else []
        found += sessions(no_date)
        course_starts(conn, lane.site, ref.source, source, found)
    finally:
        conn.close()  # type: ignore[attr-defined]
    records = [session_record(s, lane.site, source) for s in found]
    refs = stage(records, staging_dir(lane.site, ref.source))
    superseded = lane.ledger.record_sessions(
        ("/".join(s.key), str(ds.SOPInstanceUID), len(s.fields))
        for s, ds in zip(found, records))
    logger = get_run_logger()
    logger.info("site %s: %d delivered field(s) in %d session(s) read from %s", ref.site,
                sum(len(s.fields) for s in found), len(found), source.label)
    notes = [f"{source.label}: {text}" for s in found for text in odd_values(s)]
    if superseded:
        notes.append(f"{source.label}: {len(superseded)} session(s) had more fields delivered "
                     "(or a row corrected) after their record was made: made again as new "
                     "records; the earlier ones are kept and marked superseded in the ledger")
    if no_date:
        patients = sorted({f.mrn or f.pat_id1 for f in no_date})
        notes.append(f"{source.label}: {len(no_date)} delivered field(s) have no treatment date "
                     f"in Dose_Hst (patient(s) {', '.join(patients)}): backed up as RT Records "
                     "with an empty TreatmentDate; date them in Mosaiq")
    for note in notes:
        logger.warning("site %s: %s", ref.site, note)
    return Found(refs, list(dict.fromkeys(notes)))


@task(name="find-rt-records-by-patient", cache_policy=NO_CACHE)
def find_rt_records_by_patient(ref: LaneRef, patient_ids: list[str]) -> Found:
    """C-FIND every RT Record of each patient, whatever its date."""
    lane = ref.open()
    finder = record_finder(lane)
    progress = Progress(f"patients asked of {lane.source.aet} without a date, site "
                        f"{ref.site}", len(patient_ids), PATIENTS_FROM)
    finding = finder.of_patients(patient_ids, on_answered=lambda done, _: progress.update(done))
    get_run_logger().info("site %s: %d RT Records of %d patient(s) on %s, %d C-FIND(s)",
                          ref.site, len(finding.refs), len(patient_ids), lane.source.aet,
                          finding.finds)
    return finished(lane, finder, finding)


@task(name="record-found", cache_policy=NO_CACHE)
def record_found(ref: LaneRef, found: list[InstanceRef],
                 advance_to: datetime | None = None) -> tuple[Plan, str]:
    """Write what was found to the ledger before anything moves, take every unverified record
    of the lane (earlier failures too), then advance the watermark to ``advance_to``."""
    lane = ref.open()
    plan = plan_work(lane.ledger, found)
    mark = lane.ledger.advance_watermark(advance_to).isoformat() if advance_to else ""
    get_run_logger().info("site %s: %d found (%d new), %d unverified to do", ref.site,
                          plan.found, plan.new, len(plan.todo))
    return plan, mark


@task(name="copy-ledger", cache_policy=NO_CACHE)
def copy_ledger(ref: LaneRef, day: str) -> str:
    """Keep a dated copy of the ledger beside it (a lost ledger is then a day old, not gone)."""
    lane = ref.open()
    site = ref.site
    copy = lane.ledger.ledger.copy_to(lane.site.state_dir / "ledger-copies", day,
                               lane.site.settings.ledger_copies)
    get_run_logger().info("site %s: ledger copied to %s", site, copy)
    return str(copy)


@task(name="check-backup", cache_policy=NO_CACHE)
def check_backup(ref: LaneRef, refs: list[InstanceRef]) -> list[str]:
    """Mark verified whatever the backup already holds (from an earlier run or another path)."""
    lane = ref.open()
    return sorted(verify_present(lane.ledger, lane.target, refs))


@task(name="move-batch", cache_policy=NO_CACHE)
def move_batch(ref: LaneRef, batch: list[InstanceRef]) -> Outcome:
    """One association, one C-MOVE per series in the batch, then a presence check."""
    logger = get_run_logger()
    lane = ref.open()
    site = ref.site
    outcome = deliver(lane, batch)
    logger.info("site %s: batch of %d: %d moved, %d verified, %d failed, %d awaited (%s)",
                site, outcome.requested, outcome.moved, len(outcome.verified),
                len(outcome.failed), len(outcome.awaiting), outcome.peer_claims)
    return outcome


@task(name="settle-moves", cache_policy=NO_CACHE)
def settle_moves(ref: LaneRef, awaiting: list[Awaiting]) -> list[str]:
    """Wait once, up to verify_timeout, for every object the run moved to a backup that may
    index later and has not shown yet; the rest fail with their own reason."""
    lane = ref.open()
    site = ref.site
    present = settle(lane, awaiting, lane.site.settings.verify_timeout)
    get_run_logger().info("site %s: %d of %d object(s) awaited in backup %s arrived", site,
                          len(present), len(awaiting), lane.lane.backup)
    return sorted(present)


@task(name="validate-backup", cache_policy=NO_CACHE)
def validate_backup(ref: LaneRef) -> Validation:
    """Ask the backup for every instance the ledger calls verified; reopen what is gone."""
    lane = ref.open()
    site = ref.site
    progress: Progress | None = None

    def shown(done: int, total: int) -> None:
        nonlocal progress
        if progress is None:
            progress = Progress(f"verified instances checked, site {site}", total,
                                INSTANCES_FROM)
        progress.update(done)

    return validate_lane(lane.ledger, lane.target, on_progress=shown)


def _orthanc(lane: OpenLane) -> OrthancBackup:
    if not isinstance(lane.target, OrthancBackup):
        raise ConfigError(f"site {lane.site.name}: backup {lane.lane.backup} is a plain DICOM "
                          "SCP: the two-way sweep reads an Orthanc backup's REST API")
    return lane.target


@dataclass
class Continuity:
    """Fraction continuity of some patients in the backup (see radonc_backup.continuity)."""

    patients: int
    gaps: list[str] = field(default_factory=list)  # one line per patient's plan with a gap
    unreadable: list[str] = field(default_factory=list)  # records whose fractions can't count
    unproven: str = ""  # why continuity could not be checked at all


@task(name="check-fraction-continuity", cache_policy=NO_CACHE)
def check_continuity(ref: LaneRef, patient_ids: list[str]) -> Continuity:
    """Every fraction from 1 to the highest held, for each plan of these patients, in the
    backup's own records (acknowledged fractions aside): the check that does not ask by date."""
    lane = ref.open()
    out = Continuity(len(set(patient_ids)))
    if not patient_ids:
        return out
    if not isinstance(lane.target, OrthancBackup):
        out.unproven = (f"backup {lane.lane.backup} is a plain DICOM SCP: its records cannot be "
                        "read back for fraction numbers, so continuity is unproven")
        return out
    from radonc_backup.treatment_report import FactCache  # pandas: only when asked

    acknowledged = lane.ledger.ledger.acknowledged_fractions(ref.site)
    found, unreadable = backup_gaps(lane.target, FactCache.for_backup(
        lane.site.state_dir, lane.target.alias), patient_ids, acknowledged)
    out.gaps = [str(g) for g in found]
    out.unreadable = [f"record {rid}: {why}" for rid, why in unreadable.items()]
    for line in out.gaps:
        get_run_logger().warning("site %s: fraction continuity: %s (find the record on the "
                                 "R&V, or acknowledge the fraction)", ref.site, line)
    return out


@task(name="list-backup-records", cache_policy=NO_CACHE)
def list_backup_records(ref: LaneRef) -> dict[str, str]:
    """Every RT Record the backup holds: SOPInstanceUID -> Orthanc ID (one listing)."""
    return _orthanc(ref.open()).record_listing()


@task(name="check-day", cache_policy=NO_CACHE)
def check_backup_day(ref: LaneRef, day: str, found: list[InstanceRef], held: dict[str, str],
                     depth: str) -> DayCheck:
    """One day both ways: source and ledger against the backup, each copy read back, and at
    ``content`` depth compared with the source's."""
    lane = ref.open()
    notes: list[str] = []

    def copies(refs: list[InstanceRef]) -> dict[str, Any]:
        try:
            return source_copies(lane, refs)
        except DicomError as exc:  # a move-only peer refuses C-GET: say so, compare nothing
            notes.append(f"{day}: content not compared, the source sent no copies ({exc})")
            return {}

    check = check_day(lane.ledger, _orthanc(lane), day, found, held,
                      copies if depth == "content" else None)
    check.notes += notes
    for note in check.notes:
        get_run_logger().warning("site %s: %s", ref.site, note)
    get_run_logger().info("site %s: %s: %d record(s) on the source, %d in the backup, %d "
                          "discrepancies", ref.site, day, check.on_source, check.in_backup,
                          len(check.discrepancies))
    return check


@task(name="check-ledger-and-context", cache_policy=NO_CACHE)
def check_beyond_days(ref: LaneRef, held: dict[str, str], patients: list[str]
                      ) -> list[Discrepancy]:
    """What the day walk does not see: records in the backup no ledger knows, and the plan
    context of the period's patients read back (MD5)."""
    lane = ref.open()
    target = _orthanc(lane)
    return unknown_to_ledger(lane.ledger.ledger, lane.lane.backup, held, target) + \
        context_damage(lane.ledger, target, set(patients))


@task(name="repair", cache_policy=NO_CACHE)
def repair_backup(ref: LaneRef, found: list[Discrepancy]) -> list[Discrepancy]:
    """Move again what is missing or damaged, by the one delivery path, and read it back."""
    repair(ref.open(), found)
    done = sum(1 for d in found if d.repaired == "repaired")
    get_run_logger().info("site %s: repaired %d of %d discrepancies", ref.site, done,
                          len(found))
    return found
