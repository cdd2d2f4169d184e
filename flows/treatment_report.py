"""Treatment report from the backup: every patient under treatment with the current fraction.

This is what the clinic opens when the R&V is down, so it reads only the backup PACS. Defaults:
the 7 calendar days ending today (site time), over every RT Record in the backup whatever the
age of its study (``study_start_date`` narrows that only when given).
Each record is parsed once and cached by SOP Instance UID, so a rerun fetches only new records.
Writes a CSV for spreadsheets (UTF-8 with BOM; default
``reports/treatment-report-<site>-<end date>.csv`` in the checkout), a print view beside it
(``.html``), copies of both in the site's ``report_share`` if set, a table artifact
``treatment-report-<site>`` and a markdown summary that links the copies.
"""

from __future__ import annotations

import sys
from datetime import date, timedelta
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows import naming
from flows.backup_run import artifact_key
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from tasks.progress import RECORDS_FROM, Progress
from radonc_backup.config import PROJECT_ROOT, load_site
from radonc_backup.errors import BackupIncomplete
from radonc_backup.ledger import Ledger
from radonc_backup.report_print import render_html, write_html
from radonc_backup.report_share import share_copies, where_to_open
from radonc_backup.treatment_report import COLUMNS, UnreadableRecord, build_report
from radonc_backup.windows import utc_now, wall
from tasks.backup import with_site_retries
from tasks.report import known_to_index, list_records, parse_records, read_plans, \
    report_backup, start_workers

PARSE_BATCH = 1000  # records per task run: 15,000 records are 15 task runs, not 15,000
PARALLEL_BATCHES = 3  # batches in flight; their chunks keep every worker process busy


@flow(name="treatment-report", flow_run_name=naming.REPORT, log_prints=False, **RUN_HOOKS,
      task_runner=ThreadPoolTaskRunner(max_workers=PARALLEL_BATCHES))
def treatment_report(site: str, treatment_start_date: date | None = None,
                     end_date: date | None = None, study_start_date: date | None = None,
                     out: str | None = None, backup: str | None = None,
                     config: str | None = None) -> dict[str, object]:
    """Report every patient treated between the two dates, one row per patient per course (plan,
    or Mosaiq prescription).

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        treatment_start_date: First day of the window (default: 6 days before the end date).
        end_date: Last day of the window (default: today, site time).
        study_start_date: Optional narrowing: only studies that began on or after this date.
        out: CSV path on the worker (default: reports/treatment-report-<site>-<end>.csv).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
    """
    logger = get_run_logger()
    cfg = load_site(site, config)
    end = end_date or wall(utc_now(), cfg.tz).date()
    start = treatment_start_date or end - timedelta(days=6)  # 7 calendar days with the end
    study_start = study_start_date  # a narrowing only when asked: a course can last months
    params = (site, backup, config)
    target, cache = report_backup(*params)
    start_workers()

    listing = with_site_retries(list_records, cfg.settings)(*params, study_start)
    resources, new = listing.resource_ids, listing.new
    unreadable: dict[str, str] = {}
    parse = with_site_retries(parse_records, cfg.settings)
    batches = [parse.submit(*params, new[i:i + PARSE_BATCH])
               for i in range(0, len(new), PARSE_BATCH)]
    progress = Progress(f"records read, site {site}", len(new), RECORDS_FROM)
    for done, batch in enumerate(batches, 1):
        unreadable.update(batch.result())
        progress.update(min(done * PARSE_BATCH, len(new)))
    # Only the courses treated in the window, from the cache's index, however long the history.
    facts = cache.courses(start, end, only=resources if study_start else None)
    plans = cache.plans()
    missing_plans = sorted({uid for uid in facts["plan_uid"].unique()
                            if uid and uid not in plans})
    if missing_plans:
        with_site_retries(read_plans, cfg.settings)(*params, missing_plans)
        plans = cache.plans()

    lost = [UnreadableRecord(rid, reason=why, **known_to_index(target, rid))
            for rid, why in unreadable.items()]
    report = build_report(facts, plans, start, end, lost,
                          Ledger.for_state_dir(cfg.state_dir).acknowledged_fractions(site),
                          cfg.settings.report_locale)
    path = Path(out) if out else PROJECT_ROOT / "reports" / f"treatment-report-{site}-{end}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    # utf-8-sig: Excel reads a CSV without a byte-order mark as cp1252 and garbles 'Müller'.
    report.to_csv(path, index=False, encoding="utf-8-sig")
    printable = write_html(path.with_suffix(".html"), render_html(
        report, site, target.alias, start, end, wall(utc_now(), cfg.tz)))
    shared = share_copies(cfg.settings.report_share, [path, printable])
    key = artifact_key("treatment-report", site)
    table = report.astype(object).where(report.notna(), "").to_dict(orient="records")
    create_table_artifact(key=key, table=table or [{c: "" for c in COLUMNS}],
                          description=f"Patients treated {start} to {end}, site {site}")
    warned = int((report["Warnings"] != "").sum()) if not report.empty else 0
    courses = len(report) - len(lost)
    message = (f"{courses} patient-plan row(s) treated {start} to {end}" if courses else
               f"No RT Records in backup {target.alias} treated {start} to {end}")
    if lost:
        message += f", and {len(lost)} row(s) for records that could not be read"
    create_markdown_artifact(key=f"{key}-summary", markdown=(
        f"# Treatment report: site {site}\n\n{message}.\n\n"
        f"Records in the backup {len(resources)} ({listing.how}), fetched this run "
        f"{len(new)}, unreadable {len(unreadable)}; rows with warnings {warned}.\n\n"
        + where_to_open(cfg.settings.report_share_url, shared, [path, printable])))
    logger.info("site %s: %s; %d records listed, %d fetched, CSV %s", site, message,
                len(resources), len(new), path)
    if lost:
        raise BackupIncomplete(
            f"site {site}: {len(lost)} RT Record(s) in backup {target.alias} could not be read; "
            f"their rows in {path} say so: " + "; ".join(
                f"{u.sop_instance_uid or u.resource_id} (patient {u.patient_id or '?'}): "
                f"{u.reason}" for u in lost[:5]))
    return {"site": site, "start": str(start), "end": str(end), "rows": courses,
            "records_listed": len(resources), "listing": listing.how,
            "records_fetched": len(new),
            "unreadable": unreadable, "rows_with_warnings": warned, "csv": str(path),
            "html": str(printable), "shared": [str(p) for p in shared], "message": message}


if __name__ == "__main__":
    sys.exit(run_cli(treatment_report, __doc__ or "", uses_rv=False, runs_without_server=True))
