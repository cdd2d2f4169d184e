"""Prefect tasks for the plan-context backfill: one task per plan, never one per image."""

from __future__ import annotations

from datetime import date

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from radonc_backup.errors import FatalDicomError
from radonc_backup.instance import InstanceRef
from radonc_backup.lane import LaneRef
from radonc_backup.ledger import PlanLink
from radonc_backup.plan_context import ContextOutcome, ContextWalker, WalkGates, link_records
from radonc_backup.record_finder import RecordFinder


@task(name="link-records-to-plans", cache_policy=NO_CACHE)
def link_new_records(ref: LaneRef, records: list[InstanceRef] | None = None) -> dict[str, str]:
    """Read the plan reference of verified records from their copies in the backup.

    Returns the records that could not be read, with the reason.
    """
    lane = ref.open()
    site = ref.site
    logger = get_run_logger()
    todo = records if records is not None else \
        lane.ledger.verified_records_without_plan(limit=lane.site.settings.link_per_run)
    _, unreadable = link_records(lane, todo)
    for uid, why in list(unreadable.items())[:LOGGED_UNREADABLE]:
        logger.error("site %s: RT Record %s: %s", site, uid, why)
    if len(unreadable) > LOGGED_UNREADABLE:
        logger.error("site %s: %d more RT Record(s) unreadable in the backup (the run's "
                     "summary lists them)", site, len(unreadable) - LOGGED_UNREADABLE)
    return unreadable


LOGGED_UNREADABLE = 20


@task(name="select-records-in-backup", cache_policy=NO_CACHE)
def select_records(ref: LaneRef, patient_ids: list[str] | None, start_date: date | None,
                   end_date: date | None) -> list[InstanceRef]:
    """RT Records the backup holds for the given patients and/or treatment dates (C-FIND)."""
    lane = ref.open()
    site = ref.site
    client = lane.site.client(lane.site.backup(lane.lane.backup)[1])
    finding = RecordFinder(client).in_dates(start_date, end_date, patient_ids or [""])
    if finding.unusable or finding.unproven:
        raise FatalDicomError(site, client.peer.label, "C-FIND", "; ".join(
            finding.unusable + finding.unproven)[:2000], calling_ae=client.calling_ae)
    found = {r.sop_instance_uid: r for r in finding.refs}
    get_run_logger().info("site %s: %d RT Records in backup %s selected", site, len(found),
                          lane.lane.backup)
    return sorted(found.values(), key=lambda r: r.sop_instance_uid)


@task(name="walk-plan-context", task_run_name="walk-plan-context {link.patient_id}",
      cache_policy=NO_CACHE)
def walk_plan(ref: LaneRef, link: PlanLink, images_now: bool = True,
              gates: WalkGates | None = None) -> ContextOutcome:
    """Bring one plan's structure set, image series and doses into the backup, and verify.

    ``images_now`` is False outside the source's off-peak hours: image series wait. ``gates``:
    the R&V associations this walk shares with the run's other walks."""
    lane = ref.open()
    site = ref.site
    outcome = ContextWalker(lane, images_now, gates).walk(link)
    lane.ledger.set_context(link.plan_uid, link.patient_id, outcome.state,
                            "; ".join(outcome.unresolved))
    get_run_logger().info("site %s: plan %s (patient %s): %s; asked to move %s; verified in "
                          "the backup %s", site, link.plan_uid, link.patient_id, outcome.state,
                          dict(outcome.moved) or "nothing", dict(outcome.verified) or "nothing")
    return outcome
