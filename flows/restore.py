"""Restore from the backup to an AE: a rebuilt R&V, or any DICOM node.

Selects what the backup holds of the named patients (or of every patient with an RT Record
verified in a period), of the kinds asked for (``record``: RT Records; ``context``: plans,
structure sets, images, dose), and has the backup Orthanc C-STORE them to a ``restore_targets``
entry (over its ``max_associations`` at once) or an AE/host/port (one association); each
object is then asked for on the target (REST for an Orthanc, else C-FIND). ``--dry-run`` lists
what would move, per patient and kind, with sizes, and sends nothing. The run ends Failed
naming what the target does not hold.
"""

from __future__ import annotations

import sys
from datetime import date

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.backup_run import artifact_key
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.config import load_site
from radonc_backup.errors import BackupIncomplete
from radonc_backup.restore import KINDS, choose_patients, kind_of, open_target, plan_rows
from tasks.backup import with_site_retries
from tasks.limits import held_for
from tasks.recovery import select_objects, send_objects

SHOW = 20


@flow(name="restore", log_prints=False, **RUN_HOOKS)
def restore(site: str, target: str = "", ae: str = "", host: str = "", port: int = 0,
            patient_ids: list[str] | None = None, start_date: date | None = None,
            end_date: date | None = None, kinds: list[str] | None = None,
            dry_run: bool = False, backup: str | None = None, config: str | None = None,
            ) -> dict[str, object]:
    """Send the backup's objects of some patients to an AE and verify each one there.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        target: A restore_targets entry of the site (or give ae, host and port).
        ae: The receiving AE title, when no target is named.
        host: Its host.
        port: Its DICOM port.
        patient_ids: The patients (empty: every patient with a record in the period).
        start_date: First day of the period (by TreatmentDate, as the ledger has it).
        end_date: Last day of the period.
        kinds: record, context or both (default both).
        dry_run: Only list what would be sent, with counts and sizes.
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
    """
    logger = get_run_logger()
    cfg = load_site(site, config)
    where = open_target(cfg, target, ae, host, port)
    backup_alias, _ = cfg.backup(backup)
    kinds = kinds or list(KINDS)
    patients = choose_patients(cfg, backup_alias, patient_ids, start_date, end_date)
    settings = cfg.settings
    items = with_site_retries(select_objects, settings)(site, backup, config, patients, kinds)
    rows = plan_rows(items)
    size = sum(i.size for i in items)
    create_table_artifact(key=artifact_key("restore-plan", site), table=rows or [
        {"result": "the backup holds nothing of these patients"}],
        description=f"{'Would send' if dry_run else 'Sending'} to {where.label}")
    summary: dict[str, object] = {"site": site, "target": where.label, "patients": len(patients),
                                  "objects": len(items), "MB": round(size / 1e6, 2),
                                  "dry_run": dry_run, "plan": rows}
    logger.info("site %s: %s %d object(s), %.1f MB, of %d patient(s) to %s", site,
                "would send" if dry_run else "sending", len(items), size / 1e6, len(patients),
                where.label)
    missing_patients = sorted(set(patients) - {i.ref.patient_id for i in items})
    if missing_patients:
        summary["not_in_backup"] = missing_patients
        logger.warning("site %s: the backup holds nothing of %d patient(s): %s", site,
                       len(missing_patients), ", ".join(missing_patients[:SHOW]))
    if dry_run or not items:
        return summary
    with held_for(cfg, where.aet, where.host, where.associations):
        done = with_site_retries(send_objects, settings)(site, backup, config, target, ae,
                                                         host, port, items)
    summary.update(sent=done.sent, verified=len(done.verified), missing=len(done.missing),
                   seconds=round(done.seconds, 2), objects_per_second=round(done.rate, 1))
    about = {i.ref.sop_instance_uid: i for i in items}
    named = [f"{uid} (patient {about[uid].ref.patient_id}, {kind_of(about[uid].modality)}: "
             f"{done.why.get(uid, 'sent, not there')})" for uid in done.missing]
    create_markdown_artifact(key=artifact_key("restore", site), markdown=(
        f"# Restore: site {site} to {where.label}\n\n{len(patients)} patient(s), "
        f"{len(items)} object(s), {size / 1e6:.1f} MB: {len(done.verified)} verified on the "
        f"target, {len(done.missing)} not, in {done.seconds:.1f} s "
        f"({done.rate:.1f} objects/s)." + "".join(f"\n- not restored: {line}"
                                                   for line in named[:200])),
        description=f"Restore, site {site}")
    if done.missing:
        for line in named:
            logger.error("site %s: not restored: %s", site, line)
        raise BackupIncomplete(
            f"site {site}: {len(done.missing)} of {len(items)} object(s) not on {where.label} "
            f"after the restore (the rest are): {'; '.join(named[:SHOW])}"
            + (" ..." if len(done.missing) > SHOW else ""))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(restore, __doc__ or ""))
