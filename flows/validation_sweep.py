"""Weekly: check that the backup still holds every instance the ledger calls verified.

Whatever the backup lost since it was verified goes back to 'failed' (records) or reopens its
patients' plan contexts (plan, structure set, images, dose), and the run ends Failed naming the
UIDs, so the failure e-mail goes out and the next backup and backfill runs move them again.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows import naming
from flows.backup_run import artifact_key
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.errors import BackupIncomplete
from radonc_backup.lane import open_lane
from radonc_backup.validation import KINDS
from tasks.backup import validate_backup, with_site_retries

SHOW = 20


@flow(name="validation-sweep", flow_run_name=naming.VALIDATION, log_prints=False,
      **RUN_HOOKS)
def validation_sweep(site: str, source: str | None = None, backup: str | None = None,
                     config: str | None = None) -> dict[str, object]:
    """Check every verified record and plan-context object of a lane against the backup.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        source: R&V source alias of the site (empty: the site's default_source).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
    """
    lane = open_lane(site, source, backup, config)
    result = with_site_retries(validate_backup, lane.site.settings)(lane.ref)
    create_table_artifact(
        key=artifact_key("validation", site, lane.lane.source),
        table=[{"kind": kind, "verified in ledger": result.checked[kind],
                "still in backup": result.checked[kind] - len(result.missing[kind]),
                "missing, reopened": len(result.missing[kind])} for kind in KINDS],
        description=f"Validation of backup {lane.lane.backup}, site {site}")
    summary = {"site": site, "source": lane.lane.source, "backup": lane.lane.backup,
               "checked": result.checked,
               "missing": {k: len(v) for k, v in result.missing.items()},
               "reopened_contexts": result.reopened_contexts}
    get_run_logger().info("site %s: validation of backup %s: checked %s, missing %s", site,
                          lane.lane.backup, result.checked, summary["missing"])
    if result.missing_count:
        gone = [uid for kind in KINDS for uid in result.missing[kind]]
        raise BackupIncomplete(
            f"site {site}: {result.missing_count} instance(s) verified earlier are missing from "
            f"backup {lane.lane.backup} (marked failed; the next runs move them again; "
            f"{result.reopened_contexts} plan context(s) reopened): {', '.join(gone[:SHOW])}"
            + (" ..." if len(gone) > SHOW else ""))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(validation_sweep, __doc__ or ""))
