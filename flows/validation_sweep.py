"""Prove the backup: the source against the backup a day at a time, both ways, and every
verified instance of the ledger against the backup.

1. For each day of the period (one C-FIND day at a time: bounded R&V load): the source's RT
   Records and the ledger's against the backup's; each copy the backup holds read back (the
   MD5 Orthanc kept when it arrived, then parsed); at ``content`` depth compared element by
   element with the source's own copy.
2. Every instance the ledger calls verified, records and plan context, still in the backup
   (what is gone goes back to 'failed' and its plan context reopens, so the next runs move it
   again); the period's plan context read back; RT Records in the backup no ledger knows.
3. ``repair``: what is missing or damaged is moved again by the one delivery path and read
   back.

A discrepancy CSV (``reports/validation-<site>-<source>-<end>-<depth>-<run time>.csv``), a table and a markdown
artifact; the run ends Failed, naming the counts and the CSV, while anything is left
unrepaired.
"""

from __future__ import annotations

import sys
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from typing import Literal
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import naming
from flows.backup_run import artifact_key
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.config import PROJECT_ROOT, MosaiqSource
from radonc_backup.errors import BackupIncomplete, ConfigError
from radonc_backup.lane import open_lane
from radonc_backup.validation import CSV_COLUMNS, FOUND, KINDS, Discrepancy
from radonc_backup.windows import DayQuery, utc_now, wall
from tasks.backup import check_backup_day, check_beyond_days, find_rt_records, \
    list_backup_records, read_mosaiq_records, repair_backup, validate_backup, \
    with_site_retries
from tasks.limits import rv_slots
from tasks.progress import Progress

SHOW = 20
DEPTHS = ("presence", "content")


@flow(name="validation-sweep", flow_run_name=naming.VALIDATION, log_prints=False,
      **RUN_HOOKS)
def validation_sweep(site: str, start_date: date | None = None, end_date: date | None = None,
                     days: int = 7, depth: Literal["presence", "content"] = "presence",
                     repair: bool = False,
                     out: str | None = None,
                     source: str | None = None, backup: str | None = None,
                     config: str | None = None, now: datetime | None = None,
                     ) -> dict[str, object]:
    """Compare the R&V with the backup, both ways, and read every copy back.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        start_date: First day of the period (default: the end date's ``days`` days).
        end_date: Last day of the period (default: today, site time).
        days: Length of the period when start_date is empty (weekly 7, monthly 31).
        depth: presence (each copy there and readable) or content (also compared with the
            source's copy, element by element).
        repair: Move again what is missing or damaged, and read it back.
        out: CSV path on the worker (default: reports/validation-<site>-<source>-<end>-<depth>-<run time>.csv).
        source: R&V source alias of the site (empty: the site's default_source).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
        now: Replay as if it were this time; leave empty in production.
    """
    if depth not in DEPTHS:
        raise ConfigError(f"site {site}: depth {depth!r} is not one of {', '.join(DEPTHS)}")
    logger = get_run_logger()
    lane = open_lane(site, source, backup, config)
    settings = lane.site.settings
    end = end_date or wall((now or utc_now()).astimezone(timezone.utc), lane.site.tz).date()
    if days < 1 or (start_date and start_date > end):
        raise ConfigError(f"site {site}: the period is empty ({start_date} to {end}, "
                          f"days {days})")
    start = start_date or end - timedelta(days=days - 1)
    walk = [start + timedelta(days=n) for n in range((end - start).days + 1)]
    finder = read_mosaiq_records if isinstance(lane.source, MosaiqSource) else find_rt_records

    found: list[Discrepancy] = []
    notes: list[str] = []
    patients: set[str] = set()
    on_source = in_backup = 0
    with rv_slots(lane.source):
        held = with_site_retries(list_backup_records, settings)(lane.ref)
        progress = Progress(f"days compared, site {site}", len(walk), 2)
        for n, day in enumerate(walk, 1):
            refs = with_site_retries(finder, settings)(lane.ref, [DayQuery(day)]).refs
            check = with_site_retries(check_backup_day, settings)(
                lane.ref, f"{day:%Y%m%d}", refs, held, depth)
            found += check.discrepancies
            notes += check.notes
            on_source, in_backup = on_source + check.on_source, in_backup + check.in_backup
            patients |= {r.patient_id for r in refs}
            progress.update(n, f"{len(found)} discrepancies so far")

    ledger_check = with_site_retries(validate_backup, settings)(lane.ref)
    seen = {d.sop_instance_uid for d in found}
    rows = lane.ledger.known(uid for kind in KINDS for uid in ledger_check.missing[kind])
    for kind in KINDS:
        for uid in ledger_check.missing[kind]:
            if uid not in seen:
                ref, day = rows.get(uid, (None, ""))
                detail = (f"{kind}: verified in the ledger, absent from the backup (found by "
                          "the ledger check; reopened, the next runs move it)")
                found.append(Discrepancy.of(ref, "missing", detail, ref.treatment_date or day,
                                            ledger_kind=kind) if ref is not None else
                             Discrepancy(day, "", "", "", uid, "missing", detail))
    found += with_site_retries(check_beyond_days, settings)(lane.ref, held, sorted(patients))
    if repair and found:
        found = with_site_retries(repair_backup, settings)(lane.ref, found)

    ran = wall(utc_now().astimezone(timezone.utc), lane.site.tz)
    path = Path(out) if out else PROJECT_ROOT / "reports" / \
        f"validation-{site}-{lane.lane.source}-{end}-{depth}-{ran:%Y%m%d-%H%M%S}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([d.row() for d in found], columns=CSV_COLUMNS).to_csv(
        path, index=False, encoding="utf-8-sig")
    by_kind = Counter(d.kind for d in found)
    left = [d for d in found if d.repaired != "repaired"]
    summary: dict[str, object] = {
        "site": site, "source": lane.lane.source, "backup": lane.lane.backup,
        "period": f"{start} to {end}", "depth": depth, "records_on_source": on_source,
        "records_in_backup": in_backup, "checked": ledger_check.checked,
        "discrepancies": dict(by_kind), "repaired": len(found) - len(left),
        "left": len(left), "csv": str(path), "notes": notes}
    create_table_artifact(
        key=artifact_key("validation", site, lane.lane.source),
        table=[d.row() for d in found][:1000] or [{"result": "clean: no discrepancy"}],
        description=f"Discrepancies, backup {lane.lane.backup}, site {site}, {start} to {end}")
    create_markdown_artifact(key=artifact_key("validation-summary", site, lane.lane.source),
                             markdown=_markdown(summary, by_kind, notes),
                             description=f"Validation sweep, site {site}")
    logger.info("site %s: validation %s to %s (%s) of backup %s: %d record(s) on the source, "
                "%d in the backup; discrepancies %s; %d repaired, %d left; CSV %s", site, start,
                end, depth, lane.lane.backup, on_source, in_backup, dict(by_kind) or "none",
                len(found) - len(left), len(left), path)
    if left:
        shown = ", ".join(f"{d.kind} {d.sop_instance_uid or d.series_uid}" for d in left[:SHOW])
        lost = ledger_check.missing_count
        raise BackupIncomplete(
            f"site {site}: backup {lane.lane.backup}: {len(left)} discrepancies left ("
            + ", ".join(f"{k} {v}" for k, v in sorted(Counter(d.kind for d in left).items()))
            + (f"; {lost} instance(s) verified earlier are missing from backup "
               f"{lane.lane.backup}, marked failed, the next runs move them again" if lost
               else "") + f"): {shown}" + (" ..." if len(left) > SHOW else "") + f"; CSV {path}")
    return summary


def _markdown(summary: dict[str, object], by_kind: Counter[str], notes: list[str]) -> str:
    lines = [f"# Validation sweep: site {summary['site']}, {summary['source']} against "
             f"{summary['backup']}", "",
             f"Period {summary['period']}, depth {summary['depth']}: "
             f"{summary['records_on_source']} RT Record(s) on the source, "
             f"{summary['records_in_backup']} in the backup.", ""]
    if not by_kind:
        lines.append("**Clean**: no discrepancy in either direction; every copy read back.")
    else:
        lines += ["| kind | found |", "|---|---|"] + [f"| {k} | {by_kind[k]} |"
                                                      for k in FOUND if by_kind[k]]
        lines += ["", f"Repaired {summary['repaired']}, left {summary['left']}. "
                      f"Every row: `{summary['csv']}`."]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(validation_sweep, __doc__ or ""))
