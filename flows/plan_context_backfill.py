"""Plan-context backfill: every backed-up RT Record gets its plan, structure set, images and dose.

By default it takes the plans of verified records whose context is not complete yet. On demand it
takes the records the backup holds for some patients (``patient_ids`` or a CSV of MRNs in
``mrn_csv``, first column, header optional) and/or treatment dates, and walks their plans again
even if complete. ``--department`` takes every RT Record the backup holds (within the dates or
patients given) and walks only the plans not complete yet: a first backfill of a whole
department, which a rerun after a crash or a cancel resumes where it stopped. An incomplete
context (plan or CT missing on the R&V, a series shorter than announced) is reported with its
UIDs, never blocks the other plans, and is retried by later runs.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import date, datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows import naming
from flows.backup_run import artifact_key, retry_incomplete_before
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from tasks.progress import PLANS_FROM, Progress
from radonc_backup.backup_target import OrthancBackup
from radonc_backup.config import within_hours
from radonc_backup.errors import BackupIncomplete, ConfigError
from radonc_backup.lane import OpenLane, open_lane
from radonc_backup.ledger import PlanLink
from radonc_backup.plan_context import TYPES, ContextOutcome, WalkGates, totals
from radonc_backup.windows import utc_now, wall
from tasks.backup import with_site_retries
from tasks.limits import holding, rv_slots
from tasks.plan_context import link_new_records, select_records, walk_plan


def read_mrns(path: str) -> list[str]:
    """Patient IDs from the first column of a CSV (a header row such as 'MRN' is skipped)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [row[0].strip() for row in csv.reader(fh) if row and row[0].strip()]
    except OSError as exc:
        raise ConfigError(f"MRN list {path}: {exc.strerror}") from None
    if rows and rows[0].lower() in {"mrn", "patientid", "patient_id", "patient id", "id"}:
        rows = rows[1:]
    return rows


@flow(name="plan-context-backfill", flow_run_name=naming.BACKFILL, log_prints=False,
      task_runner=ThreadPoolTaskRunner(max_workers=8), **RUN_HOOKS)
def plan_context_backfill(site: str, source: str | None = None, backup: str | None = None,
                          config: str | None = None, patient_ids: list[str] | None = None,
                          start_date: date | None = None, end_date: date | None = None,
                          mrn_csv: str | None = None, record_uids: list[str] | None = None,
                          department: bool = False, now: datetime | None = None,
                          ) -> dict[str, object]:
    """Backfill plan context for a site's backed-up RT Records (see module docstring).

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        source: R&V source alias of the site (empty: the site's default_source).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
        patient_ids: Only (and again, even if complete) the plans of these patient IDs.
        start_date: Only records treated on or after this date (site time).
        end_date: Only records treated on or before this date (site time).
        mrn_csv: A CSV file of patient IDs (first column) on the worker's disk.
        record_uids: Only the plans of these RT Record SOP Instance UIDs.
        department: Every RT Record the backup holds (within the dates or patients given),
            and only plans not complete yet: a first backfill, resumed by a rerun.
        now: Decide off-peak hours as if it were this time; leave empty in production.
    """
    logger = get_run_logger()
    lane = open_lane(site, source, backup, config)
    source_peer = lane.dicom  # a Mosaiq source has no plan context to walk: one line, here
    retrying = lane.site.settings

    def images_now() -> bool:
        """Asked as each plan starts: a long run that leaves the off-peak hours defers the
        image series of the plans it starts after that."""
        local_now = wall((now or utc_now()).astimezone(timezone.utc), lane.site.tz)
        return within_hours(source_peer.image_hours, local_now)

    if not images_now():
        logger.info("site %s: outside the off-peak hours %s of %s: image series wait", site,
                    source_peer.image_hours, lane.lane.source)

    ids = list(patient_ids or []) + (read_mrns(mrn_csv) if mrn_csv else [])
    on_demand = bool(ids or start_date or end_date or department)
    outcomes: list[ContextOutcome] = []
    in_flight = plans_in_flight(lane)
    # Slots first, before any task run (see rv_slots): an association for image series and
    # one for the chains' queries for each series moved at once (WalkGates).
    with rv_slots(lane.source, occupy=2 * in_flight):
        unreadable = with_site_retries(link_new_records, retrying)(lane.ref)
        if on_demand:
            chosen = with_site_retries(select_records, retrying)(lane.ref, ids or None,
                                                                   start_date, end_date)
            known = lane.ledger.linked(r.sop_instance_uid for r in chosen) if department \
                else set()  # a resumed department backfill reads only records not read yet
            unreadable.update(with_site_retries(link_new_records, retrying)(
                lane.ref, [r for r in chosen if r.sop_instance_uid not in known]))
            record_uids = [r.sop_instance_uid for r in chosen]
        # After a backup run (record_uids given): its records' plans, any plan a killed run
        # linked but never walked, and incomplete ones last walked context_retry_minutes ago.
        after_backup = record_uids is not None and not on_demand
        links = lane.ledger.plans(
            record_uids, pending_only=department or not on_demand, unwalked_too=after_backup,
            retry_before=retry_incomplete_before(lane, now) if after_backup else None)
        progress = Progress(f"plan contexts, site {site}", len(links), PLANS_FROM)
        grown = backup_growth(lane)
        for outcome in walk_pipelined(lane, links, images_now, in_flight):
            outcomes.append(outcome)
            moved = sum(sum(o.moved.values()) for o in outcomes)
            progress.update(len(outcomes), f"{moved} object(s) moved{grown()}")

    summary = summarize(site, lane.lane.source, outcomes, totals(lane.ledger))
    summary["unreadable_records"] = unreadable
    summary["records_left_to_link"] = lane.ledger.count_records_without_plan() \
        - len(unreadable)  # the next run reads them
    summary["records_without_plan"] = lane.ledger.records_without_plan()
    for uid, why in unreadable.items():
        outcomes.append(ContextOutcome(uid, "", "incomplete", [f"RT Record {uid}: {why}"]))
    for uid in summary["records_without_plan"]:  # type: ignore[union-attr]
        outcomes.append(ContextOutcome(uid, "", "no plan",
                                       [f"RT Record {uid} references no RT Plan"]))
    publish(summary, outcomes)
    logger.info("site %s: %d plan(s): %d complete, %d incomplete, %d deferred, %d skipped; "
                "asked to move %s; verified in the backup %s", site, len(outcomes),
                summary["complete"], summary["incomplete"], summary["deferred"],
                summary["skipped"], summary["moved"], summary["verified"])
    if summary["incomplete"] or unreadable:
        first = [f"{o.plan_uid} (patient {o.patient_id or '?'}): {'; '.join(o.unresolved)}"
                 for o in outcomes if o.state == "incomplete"][:5]
        raise BackupIncomplete(f"site {site}: {summary['incomplete']} plan context(s) incomplete "
                               f"and {len(unreadable)} RT Record(s) unreadable in backup "
                               f"{lane.lane.backup}: " + " | ".join(first))
    return summary


def plans_in_flight(lane: OpenLane) -> int:
    """Image series moved at once: ``move_associations``, within the source's
    ``max_associations`` at two associations each (one for the series, one for the chains'
    queries). As a subflow of a backup run, which holds ``move_associations`` slots, within
    those: half as many."""
    share = lane.site.settings.move_associations
    if holding(lane.source):
        return max(1, share // 2)
    return max(1, min(share, lane.dicom.max_associations // 2))


def backup_growth(lane: OpenLane) -> Callable[[], str]:
    """How much the backup's storage grew since this was called, as a progress note."""
    if not isinstance(lane.target, OrthancBackup):
        return lambda: ""
    start = lane.target.disk_size()

    def note() -> str:
        return f", backup +{(lane.target.disk_size() - start) / 1e9:.2f} GB"  # type: ignore

    return note


def walk_pipelined(lane: OpenLane, links: list[PlanLink], images_now: Callable[[], bool],
                   in_flight: int) -> Iterator[ContextOutcome]:
    """Walk the plans, one task run each, ``2 x in_flight`` at once within ``in_flight`` image
    series moved at once (WalkGates): while one plan's series moves, the next plans' chains
    (plan -> structure set -> series listing, doses) are walked on the other association.
    Never two plans of one patient at once: their plans share a planning CT, which two walks
    would both find missing and move twice."""
    walker = with_site_retries(walk_plan, lane.site.settings)
    gates = WalkGates(in_flight)
    pending = list(links)
    running: dict[PrefectFuture[ContextOutcome], PlanLink] = {}
    while pending or running:
        busy = {link.patient_id for link in running.values()}
        ready = next((link for link in pending if link.patient_id not in busy), None) \
            if len(running) < 2 * in_flight else None
        if ready is None:  # the first walk to end frees its place, whichever it is
            done = next(as_completed(list(running)))
            yield settle_walk(lane, running.pop(done), done)
            continue
        pending.remove(ready)
        running[walker.submit(lane.ref, ready, images_now(), gates)] = ready


def settle_walk(lane: OpenLane, link: PlanLink, future: PrefectFuture[ContextOutcome],
                ) -> ContextOutcome:
    """A walk's outcome; a walk that failed is an incomplete context, not a crash."""
    future.wait()
    state = future.state
    if state.is_completed():
        return state.result()  # type: ignore[return-value]
    failed = ContextOutcome(link.plan_uid, link.patient_id)
    failed.problem(f"walk failed: {state.message}")
    lane.ledger.set_context(link.plan_uid, link.patient_id, "incomplete",
                            failed.unresolved[0])
    return failed


def summarize(site: str, source: str, outcomes: list[ContextOutcome],
              cumulative: dict[str, int]) -> dict[str, object]:
    moved: Counter[str] = Counter()
    verified: Counter[str] = Counter()
    for o in outcomes:
        moved.update(o.moved)
        verified.update(o.verified)
    return {
        "site": site, "source": source, "plans": len(outcomes),
        "complete": sum(o.state == "complete" for o in outcomes),
        "incomplete": sum(o.state == "incomplete" for o in outcomes),
        "deferred": sum(o.state == "deferred" for o in outcomes),
        "skipped": sum(o.state == "skipped" for o in outcomes),
        "moved": {t: moved[t] for t in TYPES if moved[t]},
        "verified": {t: verified[t] for t in [*TYPES, *sorted(set(verified) - set(TYPES))]
                     if verified[t]},
        "cumulative": {t: cumulative[t] for t in TYPES if cumulative[t]},
        "unresolved": {o.plan_uid: o.unresolved for o in outcomes if o.state != "complete"},
        "peer_notes": sorted({n for o in outcomes for n in o.notes}),
    }


def publish(summary: dict[str, object], outcomes: list[ContextOutcome]) -> None:
    key = artifact_key("plan-context", str(summary["site"]), str(summary["source"]))
    moved, verified = summary["moved"], summary["verified"]
    cumulative = summary["cumulative"]
    create_table_artifact(
        key=f"{key}-totals",
        table=[{"type": t, "asked to move this run": moved.get(t, 0),  # type: ignore[union-attr]
                "verified this run": verified.get(t, 0),  # type: ignore[union-attr]
                "verified in total": cumulative.get(t, 0)}  # type: ignore[union-attr]
               for t in [*TYPES, *[v for v in verified if v not in TYPES]]],  # type: ignore[union-attr]
        description=f"Plan-context objects, site {summary['site']} (verified: by the "
                    "modality the backup holds them under)")
    unresolved = [{"plan or record": o.plan_uid, "patient id": o.patient_id, "state": o.state,
                   "unresolved": "; ".join(o.unresolved)}
                  for o in outcomes if o.state != "complete"]
    create_table_artifact(key=f"{key}-unresolved",
                          table=unresolved or [{"plan or record": "", "patient id": "",
                                                "state": "", "unresolved": "nothing unresolved"}],
                          description=f"Plan contexts not complete, site {summary['site']}")
    notes: list[str] = summary["peer_notes"]  # type: ignore[assignment]
    create_markdown_artifact(
        key=key, markdown=(f"# Plan-context backfill: site {summary['site']}\n\n"
                           f"{summary['plans']} plan(s): {summary['complete']} complete, "
                           f"{summary['incomplete']} incomplete, {summary['deferred']} "
                           f"deferred to off-peak hours, {summary['skipped']} skipped.\n"
                           + (f"\n{summary['records_left_to_link']} verified RT Record(s) "
                              "left for the next run to read their plan from (at most "
                              "link_per_run a run).\n" if summary.get("records_left_to_link")
                              else "")
                           + "".join(f"\n- {n}" for n in notes)))


if __name__ == "__main__":
    sys.exit(run_cli(plan_context_backfill, __doc__ or ""))
