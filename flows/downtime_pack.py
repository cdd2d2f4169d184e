"""Nightly (and on demand): the downtime pack, so that a clinic can go on in file mode when
the R&V and the network are gone: for every patient treated in the last N days, their plan
context, the last RT Record of each plan and a one-page sheet, beside the treatment report;
built from the backup alone into ``<downtime_pack_dir>/<site>-<time>``, and ``current``
repointed only when the pack is whole (a failed build keeps the last good pack).
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.backup_run import artifact_key
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from flows.treatment_report import treatment_report
from radonc_backup.config import load_site
from radonc_backup.downtime_pack import CURRENT, build, built_at
from radonc_backup.ledger import Ledger
from radonc_backup.errors import BackupIncomplete
from radonc_backup.windows import utc_now, wall
from tasks.recovery import backup_of


def kept(root: Path) -> str:
    """Which pack stays in use after a failed build, and from when."""
    last = built_at(root / CURRENT)
    if last is None:
        return f"and there is no earlier pack in {root}"
    return (f"the last good pack {(root / CURRENT).resolve()} (built {last:%Y-%m-%d %H:%M} UTC) "
            "is kept")


@flow(name="downtime-pack", log_prints=False, **RUN_HOOKS)
def downtime_pack(site: str, days: int | None = None, folder: str | None = None,
                  keep: int = 2, backup: str | None = None, config: str | None = None,
                  now: datetime | None = None, refresh: bool = False) -> dict[str, object]:
    """Build the downtime pack of every patient treated in the last ``days`` days.

    ``refresh`` (after each incremental run): only the patients with an instance verified in
    the backup since the last good pack began are made anew, the others linked from it; with
    no pack yet, or nothing new, nothing is built.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        days: Patients treated in this many last days (default: downtime_pack_days, 7).
        folder: Where the packs go (default: downtime_pack_dir, else <state_dir>/downtime-packs).
        keep: How many packs to keep (the newest; current is always one of them).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
        now: Replay as if it were this time; leave empty in production.
        refresh: Make anew only the patients with something verified since the last pack.
    """
    started = time.monotonic()
    began = utc_now().astimezone(timezone.utc).replace(microsecond=0)
    cfg = load_site(site, config)
    local = wall((now or utc_now()).astimezone(timezone.utc), cfg.tz)
    end = local.date()
    days = days or cfg.settings.downtime_pack_days
    root = Path(folder or cfg.settings.downtime_pack_dir or cfg.state_dir / "downtime-packs")
    patients: set[str] | None = None
    if refresh:
        last = built_at(root / CURRENT)
        if last is None:
            get_run_logger().info("site %s: no downtime pack to refresh yet in %s (the nightly "
                                  "build makes the first)", site, root)
            return {"site": site, "refreshed": 0, "pack": "", "current": str(root / CURRENT)}
        patients = Ledger.for_state_dir(cfg.state_dir).patients_verified_since(
            site, last.isoformat())
        if not patients:
            return {"site": site, "refreshed": 0, "pack": str((root / CURRENT).resolve()),
                    "current": str(root / CURRENT)}
    # The day's report (names, birth dates) is written beside the pack only: its working
    # copy is removed however the run ends.
    with tempfile.TemporaryDirectory(prefix="downtime-report-") as work:
        report_csv = Path(work) / f"treatment-report-{site}-{end}.csv"
        report = treatment_report(site=site, treatment_start_date=end - timedelta(days=days - 1),
                                  end_date=end, out=str(report_csv), backup=backup,
                                  config=config, return_state=True)
        if not report.is_completed():
            raise BackupIncomplete(f"site {site}: downtime pack not built, {kept(root)}: the "
                                   f"treatment report {report.name}: {report.message}")
        rows = pd.read_csv(report_csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        try:
            pack = build(backup_of(site, backup, config), rows, root,
                         f"{site}-{local:%Y%m%d-%H%M%S}", site,
                         [report_csv, report_csv.with_suffix(".html")], local, keep,
                         refresh=patients, started=began)
        except Exception as exc:
            raise BackupIncomplete(f"site {site}: downtime pack not built, {kept(root)}: "
                                   f"{exc}") from exc
    if pack.not_written:  # the pack is in use (its sheets name them); the run says so
        named = [f"{uid} ({why})" for uid, why in sorted(pack.not_written.items())]
        raise BackupIncomplete(f"site {site}: downtime pack {pack.folder} is in use without "
                               f"{len(named)} object(s) the backup could not serve (each "
                               f"patient's sheet names them): {'; '.join(named[:10])}")
    seconds = time.monotonic() - started
    summary: dict[str, object] = {
        "site": site, "pack": str(pack.folder), "current": str(root / CURRENT),
        "patients": pack.patients, "refreshed": pack.refreshed, "linked": pack.linked,
        "files": pack.files, "MB": round(pack.bytes / 1e6, 2),
        "seconds": round(seconds, 1)}
    create_markdown_artifact(key=artifact_key("downtime-pack", site), markdown=(
        f"# Downtime pack: site {site}\n\n{pack.patients} patient(s) treated in the last "
        f"{days} days, {pack.files} file(s), {pack.bytes / 1e6:.1f} MB, built in "
        f"{seconds:.1f} s from backup {backup_of(site, backup, config).alias}.\n\n"
        f"Open `{root / CURRENT}/` (each patient's `sheet.html`, and the treatment report)."),
        description=f"Downtime pack, site {site}")
    get_run_logger().info("site %s: downtime pack of %d patient(s), %d file(s), %.1f MB in "
                          "%.1f s: %s", site, pack.patients, pack.files, pack.bytes / 1e6,
                          seconds, pack.folder)
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(downtime_pack, __doc__ or ""))
