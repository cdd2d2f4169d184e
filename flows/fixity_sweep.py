"""Monthly (and on demand): the fixity sweep. Every object the ledger holds as verified in the
backup (RT Records and plan context, every source) is read back whole from the backup and its
MD5 compared with the digest the ledger keeps of it (recorded the first time, from Orthanc's
record of its arrival) and with Orthanc's own; each object whose bytes changed, that is gone or
that cannot be read is named, and the run fails. Resumable: an object checked in the last
``days`` days is not read again, so a sweep stopped half way goes on where it stopped.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.backup_run import artifact_key
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.config import load_site
from radonc_backup.errors import BackupIncomplete
from radonc_backup.fixity import check_files
from radonc_backup.ledger import Ledger
from radonc_backup.windows import utc_now
from tasks.progress import Progress
from tasks.recovery import backup_of

CHUNK = 500  # objects checked between two writes to the ledger (what a stopped sweep keeps)
SHOW = 20


@flow(name="fixity-sweep", log_prints=False, **RUN_HOOKS)
def fixity_sweep(site: str, days: int = 28, backup: str | None = None,
                 config: str | None = None) -> dict[str, object]:
    """Read every verified object back from the backup and check its digest.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        days: Objects checked in this many last days are not read again (resumes a sweep).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
    """
    started = time.monotonic()
    cfg = load_site(site, config)
    alias, _ = cfg.backup(backup)
    target = backup_of(site, backup, config)
    ledger = Ledger.for_state_dir(cfg.state_dir)
    known = ledger.fixity(site, alias)
    since = (utc_now() - timedelta(days=days)).astimezone(timezone.utc).isoformat(
        timespec="seconds")
    everything = ledger.verified_everywhere(site, alias)
    todo = [r for r in everything if r.sop_instance_uid not in known
            or known[r.sop_instance_uid][2] < since]
    progress = Progress(f"files checked in backup {alias}, site {site}", len(todo), 1)
    checked = recorded = size = 0
    problems: dict[str, str] = {}
    for i in range(0, len(todo), CHUNK):
        part = check_files(target, todo[i:i + CHUNK], known,
                           on_checked=lambda n, base=i: progress.update(base + n))
        ledger.record_fixity(site, alias, part.rows)
        checked, recorded, size = checked + part.checked, recorded + part.recorded, \
            size + part.bytes
        problems.update(part.problems)
    seconds = time.monotonic() - started
    summary: dict[str, object] = {
        "site": site, "backup": alias, "objects": len(everything), "checked": checked,
        "skipped_checked_recently": len(everything) - len(todo), "digests_recorded": recorded,
        "MB": round(size / 1e6, 1), "seconds": round(seconds, 1),
        "MB_per_second": round(size / 1e6 / seconds, 1) if seconds else 0.0,
        "problems": problems}
    verdict = "FAIL" if problems else "every file read back matches its digest"
    create_markdown_artifact(key=artifact_key("fixity-sweep", site), markdown="\n".join([
        f"# Fixity sweep, site {site}, backup {alias}: {verdict}", "",
        f"{checked} file(s), {size / 1e6:.1f} MB read back whole in {seconds:.1f} s, each MD5 "
        f"compared with the ledger's digest and Orthanc's record of its arrival; "
        f"{recorded} digest(s) recorded for the first time; "
        f"{len(everything) - len(todo)} checked in the last {days} days not read again.",
        *(["", "| SOP Instance UID | what |", "|---|---|"]
          + [f"| {uid} | {why} |" for uid, why in sorted(problems.items())[:500]]
          if problems else [])]), description=f"Fixity sweep, site {site}")
    get_run_logger().info("site %s: fixity sweep of backup %s: %d file(s) checked, %d "
                          "problem(s), %.1f MB in %.1f s", site, alias, checked, len(problems),
                          size / 1e6, seconds)
    if problems:
        shown = "; ".join(f"{uid} ({why})" for uid, why in sorted(problems.items())[:SHOW])
        raise BackupIncomplete(f"site {site}: fixity sweep of backup {alias}: {len(problems)} "
                               f"of {checked} file(s) not as they arrived: {shown}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(fixity_sweep, __doc__ or ""))
