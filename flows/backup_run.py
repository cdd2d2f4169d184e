"""The body both backup flows share: find, record, check the backup, move, verify, report.

Called from inside a flow that holds its R&V slots (``tasks.limits.rv_slots``). Reads like the
runbook: each step is a named task, and the ledger is written before anything moves so that no
found record can be forgotten.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from prefect import State, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from radonc_backup.config import MosaiqSource
from radonc_backup.errors import BackupIncomplete
from radonc_backup.instance import InstanceRef
from radonc_backup.lane import OpenLane
from radonc_backup.rt_backup import batches
from radonc_backup.transfer import Awaiting, Outcome
from radonc_backup.windows import DayQuery, utc_now
from tasks.backup import Continuity, Found, check_backup, check_continuity, find_rt_records, find_rt_records_by_patient, move_batch, \
    read_mosaiq_records, record_found, settle_moves, with_site_retries

SHOW_FAILED = 20


@dataclass
class BackupSummary:
    site: str
    source: str
    backup: str
    window: str
    found: int = 0
    new: int = 0
    already_verified: int = 0
    retried_from_earlier: int = 0
    already_in_backup: int = 0
    moved: int = 0
    verified: int = 0
    failed: int = 0
    failed_uids: dict[str, str] = field(default_factory=dict)
    catch_up: str = ""
    patients_asked: int = 0
    found_by_patient: dict[str, str] = field(default_factory=dict)
    watermark: str = ""
    plan_context: str = ""
    peer_notes: list[str] = field(default_factory=list)  # what the R&V made the run do
    unusable: list[str] = field(default_factory=list)  # answers without a SOP Instance UID
    unproven: list[str] = field(default_factory=list)  # what no query could prove absent
    continuity: list[str] = field(default_factory=list)  # fraction gaps in the backup
    continuity_unproven: str = ""  # why fraction continuity could not be checked
    downtime_pack: str = ""  # what the refresh of the downtime pack after the run did
    verified_uids: list[str] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("verified_uids")
        return out


def artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def run_backup(flow_name: str, lane: OpenLane, queries: list[DayQuery], window: str,
               advance_to: datetime | None = None,
               patients_since: date | None = None, catch_up: str = "",
               inventory: bool = False) -> BackupSummary:
    """``patients_since``: also ask, patient by patient and without a date, for the records of
    every patient with a record since that day (the nightly net under the date queries).
    ``inventory``: instead of the windows, every RT Record the R&V holds (the inventory sweep).
    """
    logger = get_run_logger()
    settings = lane.site.settings
    summary = BackupSummary(lane.lane.site, lane.lane.source, lane.lane.backup, window,
                            catch_up=catch_up)

    if isinstance(lane.source, MosaiqSource):  # the nightly also asks for undated fields
        by_date = with_site_retries(read_mosaiq_records, settings)(
            lane.ref, queries, undated=patients_since is not None)
    else:
        by_date = with_site_retries(find_rt_records, settings)(lane.ref, queries, inventory)
    found = by_date.refs
    take_finding(summary, by_date)
    if patients_since is not None and not isinstance(lane.source, MosaiqSource):
        found += by_patient(lane, found, patients_since, summary)
    # An answer without its UID fails the run; the window is asked again by the next one.
    plan, summary.watermark = record_found(lane.ref, found,
                                           None if summary.unusable else advance_to)
    summary.found, summary.new, summary.already_verified = plan.found, plan.new, \
        plan.already_verified
    found_uids = {r.sop_instance_uid for r in found}
    summary.retried_from_earlier = sum(1 for r in plan.todo
                                       if r.sop_instance_uid not in found_uids)

    in_backup = set(with_site_retries(check_backup, settings)(lane.ref, plan.todo)) \
        if plan.todo else set()
    summary.already_in_backup = len(in_backup)
    summary.verified_uids += sorted(in_backup)
    todo = [r for r in plan.todo if r.sop_instance_uid not in in_backup]

    awaiting: list[Awaiting] = []
    for batch in batches(todo, settings.batch_size):
        state = with_site_retries(move_batch, settings)(lane.ref, batch, return_state=True)
        if state.is_completed():
            outcome: Outcome = state.result()
            summary.moved += outcome.moved
            summary.verified += len(outcome.verified)
            summary.verified_uids += outcome.verified
            awaiting += outcome.awaiting
            note_peer(summary, outcome.notes)
        else:
            logger.error("site %s: batch of %d ended %s: %s", summary.site, len(batch),
                         state.name, state.message)
    if awaiting:  # a backup that may index later: one wait for the whole run, not one a batch
        arrived = with_site_retries(settle_moves, settings)(lane.ref, awaiting)
        summary.verified += len(arrived)
        summary.verified_uids += arrived

    remaining = lane.ledger.rows("found", "moved", "failed")
    summary.failed = len(remaining)
    summary.failed_uids = {r.ref.sop_instance_uid: r.last_error or r.state for r in remaining}
    if not summary.failed:  # else the run fails naming its records; the next one checks
        # The second proof, from the backup alone: every fraction of these patients' plans.
        continuity = with_site_retries(check_continuity, settings)(
            lane.ref, sorted({r.patient_id for r in found if r.patient_id}), return_state=True)
        if continuity.is_completed():
            checked: Continuity = continuity.result()
            summary.continuity = checked.gaps + checked.unreadable
            summary.continuity_unproven = checked.unproven
        else:
            summary.continuity_unproven = f"the check ended {continuity.name}: " \
                                          f"{continuity.message}"
    create_markdown_artifact(markdown=_report(flow_name, summary),
                             key=artifact_key(flow_name, summary.site, summary.source),
                             description=f"{flow_name} {summary.site}/{summary.source}")
    logger.info("site %s: %s: found %d (%d new), %d already verified, %d already in backup, "
                "%d moved, %d verified, %d not verified", summary.site, window, summary.found,
                summary.new, summary.already_verified, summary.already_in_backup, summary.moved,
                summary.verified, summary.failed)
    return summary


def take_finding(summary: BackupSummary, found: Found) -> None:
    """The finder's notes, unusable answers and unproven parts, into the summary."""
    note_peer(summary, found.notes)
    summary.unusable += [u for u in found.unusable if u not in summary.unusable]
    summary.unproven += [u for u in found.unproven if u not in summary.unproven]


def note_peer(summary: BackupSummary, notes: list[str]) -> None:
    """What the R&V made the run do (keys it ignored, lists it refused): once each, logged."""
    for note in notes:
        if note not in summary.peer_notes:
            summary.peer_notes.append(note)
            get_run_logger().warning("site %s: %s", summary.site, note)


CONTEXT_INCOMPLETE = "Completed (context incomplete)"
"""A backup run's final state when every record is verified but the plan-context subflow did not
complete: the records are safe (not Failed), the context is not (not plain Completed). Filter on
it in the UI; the CLI exits 3."""


UNPROVEN = "Completed (unproven)"
"""A backup run's final state when every record it found is verified but an answer of the
R&V may have been cut and could not be checked (the run's budget of checking C-FINDs spent,
or no part could show it): the records found are safe, what a cut may hide is not proven
absent. The monthly inventory sweep checks every such answer. The CLI exits 3."""


FRACTION_GAPS = "Completed (fraction gaps)"
"""A backup run's final state when every record it found is verified but the backup's records
of those patients skip a fraction (5 and 7 without 6): a record no query found, or one an
operator must acknowledge. Filter on it in the UI; the CLI exits 3."""


def final_state(summary: BackupSummary) -> State:
    """Completed, ``Completed (fraction gaps)``, ``Completed (unproven)`` or ``Completed
    (context incomplete)``, with a message that says what the run proved and what it could not."""
    proved = (f"site {summary.site}: every RT Record found ({summary.found}) verified in backup "
              f"{summary.backup} (presence checked)")
    caveats = []
    if summary.unproven:
        caveats.append(f"unproven: {len(summary.unproven)} cut answer(s) (see the summary)")
    if summary.continuity_unproven:
        caveats.append(f"fraction continuity unproven: {summary.continuity_unproven}")
    context_incomplete = summary.plan_context and not summary.plan_context.startswith(
        ("Completed", "nothing new"))
    if context_incomplete:
        caveats.append(f"plan-context backfill {summary.plan_context}")
    if summary.downtime_pack.startswith("not refreshed"):
        caveats.append(f"downtime pack {summary.downtime_pack}")
    if summary.continuity:
        shown = "; ".join(summary.continuity[:SHOW_FAILED])
        return Completed(name=FRACTION_GAPS, data=summary.as_dict(), message=(
            f"{proved}; fraction continuity: {len(summary.continuity)} gap(s): {shown}"
            + "".join(f"; {c}" for c in caveats)))
    message = proved + "".join(f"; {c}" for c in caveats)
    if summary.unproven:
        return Completed(name=UNPROVEN, data=summary.as_dict(), message=message)
    if context_incomplete:
        return Completed(name=CONTEXT_INCOMPLETE, data=summary.as_dict(), message=message)
    return Completed(data=summary.as_dict(), message=message)


def catch_up_days(lane: OpenLane) -> int | None:
    """Whole days to look back when the ledger knows no RT Record of the lane, else None.

    A new ledger (a first run, or one lost or replaced) always catches up, whatever the backup
    holds: records that had failed before a loss, even when the backup never received one,
    would otherwise never be asked for again. ``catch_up_days`` (62) covers two monthly sweeps
    of 31 days, so nothing falls between the catch-up and the last sweep.
    """
    days = lane.site.settings.catch_up_days
    if not days or lane.ledger.has_records():
        return None
    held = lane.target.holds_rt_records()
    get_run_logger().warning(
        "site %s: the ledger %s knows no RT Record of %s (%s): looking back %d days to catch "
        "up", lane.site.name, lane.ledger.path, lane.lane.source,
        f"backup {lane.lane.backup} holds some: a lost or replaced ledger" if held else
        "a first run, or a ledger lost before any record arrived", days)
    return days


def catch_up_note(days: int) -> str:
    return (f"the ledger knew no RT Record of this source (a first run, or a lost or replaced "
            f"ledger): looked back {days} whole days")


def by_patient(lane: OpenLane, found: list[InstanceRef], since: date, summary: BackupSummary,
               ) -> list[InstanceRef]:
    """The records of recent patients that neither the date queries nor the ledger know."""
    patients = sorted(set(lane.ledger.patients_with_records_since(f"{since:%Y%m%d}"))
                      | {r.patient_id for r in found if r.patient_id})
    summary.patients_asked = len(patients)
    if not patients:
        return []
    asked = with_site_retries(find_rt_records_by_patient, lane.site.settings)(lane.ref, patients)
    take_finding(summary, asked)
    theirs = asked.refs
    dated = {r.sop_instance_uid for r in found}
    unseen = [r for r in theirs if r.sop_instance_uid not in dated]
    known = lane.ledger.states([r.sop_instance_uid for r in unseen])
    caught = [r for r in unseen if r.sop_instance_uid not in known]
    summary.found_by_patient = {
        r.sop_instance_uid: f"patient {r.patient_id}, TreatmentDate "
                            f"{r.treatment_date or '(empty)'} {r.treatment_time or '(no time)'}"
        for r in caught}
    if caught:
        get_run_logger().warning("site %s: %d RT Record(s) found only by asking per patient "
                                 "(no date, or a date no query matched): %s", summary.site,
                                 len(caught), ", ".join(sorted(summary.found_by_patient)))
    return caught


def raise_if_incomplete(summary: BackupSummary) -> None:
    """End the run Failed, naming the records, when any of its lane is not verified, or when
    the R&V answered with matches that carry no SOP Instance UID (they cannot be moved or
    checked, so they are not dropped unseen either)."""
    if summary.unusable:
        shown = "; ".join(summary.unusable[:SHOW_FAILED])
        more = f" and {len(summary.unusable) - SHOW_FAILED} more" \
            if len(summary.unusable) > SHOW_FAILED else ""
        raise BackupIncomplete(
            f"site {summary.site}: {len(summary.unusable)} C-FIND answer(s) from "
            f"{summary.source} without a SOP Instance UID, so not backed up: {shown}{more}")
    if summary.failed:
        shown = "; ".join(f"{uid} ({err})" for uid, err in
                          list(summary.failed_uids.items())[:SHOW_FAILED])
        more = f" and {summary.failed - SHOW_FAILED} more" if summary.failed > SHOW_FAILED else ""
        raise BackupIncomplete(
            f"site {summary.site}: {summary.failed} RT Record(s) from {summary.source} not "
            f"verified in backup {summary.backup}: {shown}{more}")


def backfill_context(lane: OpenLane, summary: BackupSummary, record_uids: list[str] | None,
                     now: datetime | None = None) -> None:
    """Run the plan-context backfill as a subflow; its own failure is reported, not raised.

    An incomplete plan context must not hide whether the records themselves are backed up, so
    the record flow's state stays its own and the subflow's state is noted in the summary. With
    nothing new verified, the subflow still runs when an earlier run (killed between verifying
    and walking) left records unlinked or contexts never walked.
    """
    from flows.plan_context_backfill import plan_context_backfill

    site, source, backup, config = lane.ref.site, lane.ref.source, lane.ref.backup, \
        lane.ref.config
    if isinstance(lane.source, MosaiqSource):
        note_peer(summary, [f"{lane.source.label}: Mosaiq's SQL holds no DICOM plan, structure "
                            "set or images: RT Records only, no plan-context backfill"])
        return
    if record_uids is not None and not record_uids \
            and not lane.ledger.context_work_left(retry_incomplete_before(lane, now)):
        summary.plan_context = "nothing new"
        return
    state = plan_context_backfill(site=site, source=source, backup=backup, config=config,
                                  record_uids=record_uids, now=now, return_state=True)
    summary.plan_context = state.name if state.is_completed() else \
        f"{state.name}: {state.message}"
    if not state.is_completed():
        get_run_logger().warning("site %s: plan-context backfill %s", site, summary.plan_context)


def refresh_pack(lane: OpenLane, summary: BackupSummary, now: datetime | None = None) -> None:
    """Refresh the downtime pack for the patients this run (or an earlier one since the pack
    was built) verified something of, so that sheets show the morning's fractions when the
    R&V is lost at 14:00. A subflow: its failure is noted and logged, never raised (the
    records are safe; the last good pack stays, and its sheets say how old they are)."""
    from flows.downtime_pack import downtime_pack
    from radonc_backup.downtime_pack import CURRENT, built_at

    settings = lane.site.settings
    root = Path(settings.downtime_pack_dir or lane.site.state_dir / "downtime-packs")
    if not settings.downtime_pack_refresh or not summary.verified_uids \
            or built_at(root / CURRENT) is None:  # none yet: the nightly build makes the first
        return
    state = downtime_pack(site=lane.ref.site, backup=lane.ref.backup, config=lane.ref.config,
                          now=now, refresh=True, return_state=True)
    if state.is_completed():
        done = state.result()
        summary.downtime_pack = (f"refreshed {done['refreshed']} patient(s): {done['pack']}"
                                 if done.get("refreshed") else
                                 "no pack yet" if not done.get("pack") else "unchanged")
    else:
        summary.downtime_pack = f"not refreshed ({state.name}: {state.message})"
        get_run_logger().warning("site %s: downtime pack %s", lane.ref.site,
                                 summary.downtime_pack)


def retry_incomplete_before(lane: OpenLane, now: datetime | None) -> datetime:
    """Incomplete plan contexts last walked before this are walked again by an incremental."""
    return (now or utc_now()) - timedelta(minutes=lane.site.settings.context_retry_minutes)


def _report(flow_name: str, s: BackupSummary) -> str:
    lines = [
        f"# {flow_name}: site {s.site}, {s.source} to {s.backup}",
        "",
        f"Window (site local time): {s.window}",
        "",
        *([f"**Catch-up:** {s.catch_up}", ""] if s.catch_up else []),
        "| found | new | already verified | retried from earlier runs | already in backup | "
        "moved | verified | not verified |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s.found} | {s.new} | {s.already_verified} | {s.retried_from_earlier} | "
        f"{s.already_in_backup} | {s.moved} | {s.verified} | {s.failed} |",
        "",
        f"Watermark (UTC): {s.watermark or 'unchanged'}",
        *(["", f"Downtime pack: {s.downtime_pack}"] if s.downtime_pack else []),
    ]
    if s.peer_notes:
        lines += ["", "## What the R&V made this run do", "", *[f"- {n}" for n in s.peer_notes]]
    if s.unusable:
        lines += ["", "## Answers without a SOP Instance UID (the run fails)", "",
                  *[f"- {u}" for u in s.unusable[:200]]]
    if s.unproven:
        lines += ["", "## Unproven: what a cut answer may hide", "",
                  *[f"- {u}" for u in s.unproven[:200]]]
    if s.continuity or s.continuity_unproven:
        lines += ["", "## Fraction continuity (the backup's own records)", "",
                  *([f"- unproven: {s.continuity_unproven}"] if s.continuity_unproven else []),
                  *[f"- {g}" for g in s.continuity[:200]],
                  *(["", "Find each on the R&V (the inventory sweep with --repair), or "
                     "acknowledge it: `python -m radonc_backup.dicom_tools acknowledge-fractions "
                     "--help`"] if s.continuity else [])]
    if s.patients_asked:
        lines += ["", f"Asked per patient, without a date: {s.patients_asked} patient(s); "
                      f"found only that way: {len(s.found_by_patient)}"]
    if s.found_by_patient:
        lines += ["", "## Found only by the per-patient pass", "",
                  "| SOP Instance UID | what the R&V holds |", "|---|---|"]
        lines += [f"| {uid} | {what} |" for uid, what in s.found_by_patient.items()]
    if s.failed_uids:
        lines += ["", "## Not verified in the backup", "", "| SOP Instance UID | last error |",
                  "|---|---|"]
        lines += [f"| {uid} | {err.replace('|', '/')} |"
                  for uid, err in list(s.failed_uids.items())[:200]]
    return "\n".join(lines)
