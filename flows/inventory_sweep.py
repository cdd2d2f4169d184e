"""Monthly: every RT Record the R&V holds, of every patient, asked without a date, against the
backup. The proof that shares no blind spot with the date queries of the incremental and the
nightly: it finds a new patient's record with an empty TreatmentDate, a record older than any
look-back, a record of a patient the ledger never heard of.

Without ``repair`` it moves nothing: it checks each record's presence in the backup and the
fraction continuity of every patient listed (the backup's own records), and ends Failed, naming
what is missing, what skips a fraction, or what the peer's answers left unproven; or Completed
saying "every RT Record the R&V lists is in the backup (presence checked)". With ``repair`` the missing records are recorded in the ledger and
moved by the one delivery path, then verified; the run is resumable (the ledger skips what is
verified). The watermark is never moved.
"""

from __future__ import annotations

import sys

from prefect import State, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from flows import naming
from flows.backup_run import artifact_key, raise_if_incomplete, run_backup
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.errors import BackupIncomplete
from radonc_backup.lane import open_lane
from tasks.backup import check_backup, check_continuity, find_rt_records, validate_backup, with_site_retries
from tasks.limits import one_run_of, rv_slots

SHOWN = 50


@flow(name="inventory-sweep", flow_run_name=naming.INVENTORY, log_prints=False, **RUN_HOOKS)
def inventory_sweep(site: str, source: str | None = None, backup: str | None = None,
                    config: str | None = None, repair: bool = False) -> State:
    """Ask the R&V for every RT Record it holds, without a date, and check each in the backup.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        source: R&V source alias of the site (empty: the site's default_source).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
        repair: Move what the backup lacks (and verify it); without it nothing moves.
    """
    lane = open_lane(site, source, backup, config)
    settings = lane.site.settings
    with one_run_of(lane, on_wait=get_run_logger().warning), \
            rv_slots(lane.source, occupy=settings.move_associations):
        if repair:
            # What the ledger calls verified is asked of the backup first (gone: reopened), so
            # the Completed below rests on presence checks, not on the ledger's word.
            validate_backup(lane.ref)
            summary = run_backup("inventory-sweep", lane, [], "every RT Record the R&V holds",
                                 inventory=True)
            raise_if_incomplete(summary)
            raise_if_gaps(site, summary.continuity)
            raise_if_unproven(site, summary.unproven)
            return Completed(data=summary.as_dict(), message=(
                f"site {site}: {summary.found} RT Record(s) on {lane.source.aet}, every one "
                f"verified in backup {lane.lane.backup} (presence checked); "
                f"{summary.moved} moved by this sweep; "
                + (f"fraction continuity unproven: {summary.continuity_unproven}"
                   if summary.continuity_unproven else
                   "every fraction of their plans held (fraction continuity)")))
        found = with_site_retries(find_rt_records, settings)(lane.ref, [], True)
    held = set(with_site_retries(check_backup, settings)(lane.ref, found.refs))
    missing = [r for r in found.refs if r.sop_instance_uid not in held]
    continuity = with_site_retries(check_continuity, settings)(
        lane.ref, sorted({r.patient_id for r in found.refs if r.patient_id}))
    gaps = continuity.gaps + continuity.unreadable
    lines = [f"# inventory sweep: site {site}, {lane.lane.source} against {lane.lane.backup}",
             "", f"RT Records the R&V lists: {len(found.refs)}; in the backup (presence "
             f"checked): {len(held)}; missing: {len(missing)}"]
    if found.unproven or found.notes:
        lines += ["", "## What the R&V made this sweep do", "",
                  *[f"- {n}" for n in found.notes + found.unproven]]
    if gaps or continuity.unproven:
        lines += ["", "## Fraction continuity (the backup's own records)", "",
                  *([f"- unproven: {continuity.unproven}"] if continuity.unproven else []),
                  *[f"- {g}" for g in gaps[:500]]]
    if missing:
        lines += ["", "## Missing from the backup", "", "| patient | SOP Instance UID | "
                  "TreatmentDate |", "|---|---|---|"]
        lines += [f"| {r.patient_id} | {r.sop_instance_uid} | {r.treatment_date or '(empty)'} |"
                  for r in missing[:500]]
    create_markdown_artifact(markdown="\n".join(lines),
                             key=artifact_key("inventory-sweep", site, lane.lane.source),
                             description=f"inventory sweep {site}/{lane.lane.source}")
    if found.unusable:
        raise BackupIncomplete(f"site {site}: {len(found.unusable)} answer(s) without a SOP "
                               f"Instance UID: " + "; ".join(found.unusable[:SHOWN]))
    if missing:
        named = "; ".join(f"patient {r.patient_id}: {r.sop_instance_uid}"
                          for r in missing[:SHOWN])
        raise BackupIncomplete(
            f"site {site}: {len(missing)} RT Record(s) on {lane.source.aet} not in backup "
            f"{lane.lane.backup}: {named}; run the inventory sweep with --repair")
    raise_if_gaps(site, gaps)
    raise_if_unproven(site, found.unproven)
    text = (f"site {site}: every RT Record {lane.source.aet} lists ({len(found.refs)}) is in "
            f"backup {lane.lane.backup} (presence checked); "
            + (f"fraction continuity unproven: {continuity.unproven}" if continuity.unproven
               else "every fraction of their plans held (fraction continuity)"))
    get_run_logger().info(text)
    return Completed(message=text, data={"listed": len(found.refs), "missing": 0,
                                         "unproven": found.unproven})


def raise_if_unproven(site: str, unproven: list[str]) -> None:
    """The sweep is the proof: an answer it could not prove complete (a cut no smaller query
    can show) leaves it unproven, and an unproven sweep is not a clean one."""
    if unproven:
        raise BackupIncomplete(
            f"site {site}: the inventory could not prove {len(unproven)} answer(s) complete: "
            + "; ".join(unproven[:SHOWN]) + ". Raise the peer's C-FIND result limit (or ask "
            "its vendor how records without a date or time can be listed)")


def raise_if_gaps(site: str, gaps: list[str]) -> None:
    """A fraction no record in the backup holds is a record the sweep could not find (or one an
    operator has yet to acknowledge): the sweep is not clean."""
    if gaps:
        raise BackupIncomplete(
            f"site {site}: fraction continuity: {len(gaps)} gap(s) in the backup's records: "
            + "; ".join(gaps[:SHOWN]) + ". Find each record on the R&V, or acknowledge the "
            "fraction (python -m radonc_backup.dicom_tools acknowledge-fractions)")


if __name__ == "__main__":
    sys.exit(run_cli(inventory_sweep, __doc__ or ""))
