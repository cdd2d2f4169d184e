"""Disaster-recovery drill: prove, before the day it is needed, that the backup restores.

Picks one patient at random among those with an RT Record verified in the last ``days`` days,
restores everything the backup holds of them (records and plan context) to a scratch Orthanc
(a ``restore_targets`` entry), verifies each object there and compares it with the backup's
copy, element by element, pixel data included. Reports pass or fail, the timings and the
restore rate (objects/s) in a markdown artifact; a failed drill ends the run Failed.
"""

from __future__ import annotations

import random
import sys
from datetime import datetime, timedelta, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.backup_run import artifact_key
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.config import load_site
from radonc_backup.errors import BackupIncomplete, ConfigError
from radonc_backup.ledger import Ledger
from radonc_backup.restore import KINDS, patients_treated
from radonc_backup.windows import utc_now, wall
from tasks.backup import with_site_retries
from tasks.recovery import compare_objects, select_objects, send_objects

SHOW = 10


@flow(name="dr-drill", log_prints=False, **RUN_HOOKS)
def dr_drill(site: str, target: str, days: int = 7, seed: int | None = None,
             backup: str | None = None, config: str | None = None,
             now: datetime | None = None) -> dict[str, object]:
    """Restore one recently treated patient to a scratch Orthanc and diff every object.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        target: The scratch Orthanc, a restore_targets entry of the site.
        days: Choose among the patients treated in this many last days.
        seed: Fix the random choice (to repeat a drill).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
        now: Replay as if it were this time; leave empty in production.
    """
    logger = get_run_logger()
    cfg = load_site(site, config)
    backup_alias, _ = cfg.backup(backup)
    today = wall((now or utc_now()).astimezone(timezone.utc), cfg.tz).date()
    treated = patients_treated(Ledger.for_state_dir(cfg.state_dir), backup_alias,
                               today - timedelta(days=days - 1), today)
    if not treated:
        raise ConfigError(f"site {site}: no patient has an RT Record verified in backup "
                          f"{backup_alias} in the last {days} days: nothing to drill on")
    patient = random.Random(seed).choice(treated)
    settings = cfg.settings
    items = with_site_retries(select_objects, settings)(site, backup, config, [patient],
                                                       list(KINDS))
    done = with_site_retries(send_objects, settings)(site, backup, config, target, "", "", 0,
                                                     items)
    differ = with_site_retries(compare_objects, settings)(site, backup, config, target, items)
    passed = bool(items) and not done.missing and not differ
    size = sum(i.size for i in items)
    summary: dict[str, object] = {
        "site": site, "patient": patient, "chosen_among": len(treated), "objects": len(items),
        "MB": round(size / 1e6, 2), "verified": len(done.verified),
        "missing": done.missing, "different": differ, "seconds": round(done.seconds, 1),
        "objects_per_second": round(done.rate, 1), "passed": passed}
    create_markdown_artifact(key=artifact_key("dr-drill", site), markdown="\n".join([
        f"# DR drill, site {site}: {'PASS' if passed else 'FAIL'}", "",
        f"Patient {patient} (chosen at random among {len(treated)} treated in the last "
        f"{days} days): {len(items)} object(s), {size / 1e6:.1f} MB restored to {target} in "
        f"{done.seconds:.1f} s ({done.rate:.1f} objects/s); {len(done.verified)} verified "
        f"there, {len(done.missing)} missing, {len(differ)} different from the backup's copy.",
        *[f"- {uid}: differs in {what}" for uid, what in list(differ.items())[:SHOW]]]),
        description=f"DR drill, site {site}")
    logger.info("site %s: DR drill %s: patient %s, %d object(s) in %.1f s (%.1f/s), %d "
                "missing, %d different", site, "passed" if passed else "FAILED", patient,
                len(items), done.seconds, done.rate, len(done.missing), len(differ))
    if not passed:
        raise BackupIncomplete(
            f"site {site}: DR drill failed for patient {patient}: {len(done.missing)} of "
            f"{len(items)} object(s) missing on {target}, {len(differ)} different"
            + (f" ({', '.join(list(differ)[:SHOW])})" if differ else ""))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(dr_drill, __doc__ or ""))
