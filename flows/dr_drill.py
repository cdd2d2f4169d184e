"""Disaster-recovery drill: prove, before the day it is needed, that the backup restores.

Picks one patient at random among those with an RT Record verified in the last ``days`` days,
checks the fixity of everything the backup holds of them (records and plan context: Orthanc
reads each stored file back against the MD5 it kept on arrival), restores the sound objects to
a scratch Orthanc (a ``restore_targets`` entry), verifies each there and compares it with the
backup's copy, element by element, pixel data included. PASS only when every object passed all
three; otherwise FAIL naming each object (UID, patient, kind, why). The markdown artifact is
written however the drill ends; a failed drill ends the run Failed.
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
from radonc_backup.backup_target import HeldInstance
from radonc_backup.restore import KINDS, Restored, kind_of, patients_treated
from radonc_backup.windows import utc_now, wall
from tasks.backup import with_site_retries
from tasks.recovery import check_fixity, compare_objects, select_objects, send_objects

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
    bad: dict[str, str] = {}  # UID -> kind and why, for each object the drill cannot pass
    items: list[HeldInstance] = []
    done, stopped = Restored(), ""
    try:
        items = with_site_retries(select_objects, settings)(site, backup, config, [patient],
                                                           list(KINDS))
        kinds = {i.ref.sop_instance_uid: kind_of(i.modality) for i in items}
        # Fixity first: Orthanc reads each stored file back and checks the MD5 it kept when the
        # object arrived. A damaged copy is named, never restored and compared with itself.
        damaged = with_site_retries(check_fixity, settings)(site, backup, config, items)
        for uid, why in damaged.items():
            bad[uid] = f"{kinds[uid]}: damaged in the backup: {why}"
        good = [i for i in items if i.ref.sop_instance_uid not in damaged]
        done = with_site_retries(send_objects, settings)(site, backup, config, target, "", "",
                                                         0, good)
        for uid in done.missing:
            bad[uid] = (f"{kinds[uid]}: not restored to {target}: "
                        f"{done.why.get(uid, 'sent, but not there')}")
        arrived = [i for i in good if i.ref.sop_instance_uid in set(done.verified)]
        differ = with_site_retries(compare_objects, settings)(site, backup, config, target,
                                                              arrived)
        for uid, what in differ.items():
            bad[uid] = f"{kinds[uid]}: differs from the backup's copy in {what}"
    except Exception as exc:
        stopped = f"the drill stopped before its end: {exc}"
        raise
    finally:
        passed = bool(items) and not bad and not stopped
        size = sum(i.size for i in items)
        create_markdown_artifact(key=artifact_key("dr-drill", site), markdown="\n".join([
            f"# DR drill, site {site}: {'PASS' if passed else 'FAIL'}", "",
            f"Patient {patient} (chosen at random among {len(treated)} treated in the last "
            f"{days} days): {len(items)} object(s), {size / 1e6:.1f} MB; each stored file's "
            f"MD5 checked in the backup first, then restored to {target} in "
            f"{done.seconds:.1f} s ({done.rate:.1f} objects/s); {len(done.verified)} verified "
            f"there (presence), each compared with the backup's copy, element by element.",
            *([f"", f"**{stopped}**"] if stopped else []),
            *([f"", "| SOP Instance UID | patient | what |", "|---|---|---|"]
              + [f"| {uid} | {patient} | {why} |" for uid, why in sorted(bad.items())]
              if bad else [])]), description=f"DR drill, site {site}")
    summary: dict[str, object] = {
        "site": site, "patient": patient, "chosen_among": len(treated), "objects": len(items),
        "MB": round(size / 1e6, 2), "verified": len(done.verified),
        "missing": done.missing, "damaged": sorted(damaged), "different": differ,
        "seconds": round(done.seconds, 1), "objects_per_second": round(done.rate, 1),
        "passed": passed}
    logger.info("site %s: DR drill %s: patient %s, %d object(s) in %.1f s (%.1f/s), %d "
                "damaged in the backup, %d missing, %d different", site,
                "passed" if passed else "FAILED", patient, len(items), done.seconds, done.rate,
                len(damaged), len(done.missing), len(differ))
    if not passed:
        shown = "; ".join(f"{uid} ({why})" for uid, why in sorted(bad.items())[:SHOW])
        raise BackupIncomplete(
            f"site {site}: DR drill failed for patient {patient}: {len(bad)} of {len(items)} "
            f"object(s) not restored whole to {target}: {shown}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(dr_drill, __doc__ or ""))
