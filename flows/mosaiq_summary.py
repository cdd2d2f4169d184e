"""Mosaiq treatment summary, straight from Mosaiq's SQL: per patient and prescription, the
prescribed dose and fractions, the sessions delivered and the first and last treatment date.

For one MRN, or for every patient treated in a window (default: the 7 calendar days ending
today, site time); each such patient's whole course is counted, whatever its age. A
cross-check of the DICOM-based treatment report. Writes a CSV (UTF-8 with BOM; default
``reports/mosaiq-summary-<site>-<end date>.csv``) and a table artifact
``mosaiq-summary-<site>``. Queries use bound parameters only.
"""

from __future__ import annotations

import sys
from datetime import date, datetime, time, timedelta
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.backup_run import artifact_key
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.config import PROJECT_ROOT, MosaiqSource, load_site
from radonc_backup.errors import ConfigError
from radonc_backup.mosaiq import SUMMARY_COLUMNS, connect, fields_of_patient, read_fields, \
    summary_rows
from radonc_backup.windows import utc_now, wall


@task(name="read-mosaiq-courses", cache_policy=NO_CACHE)
def read_courses(site: str, source: str | None, config: str | None, mrn: str,
                 start: datetime, end: datetime) -> list[dict[str, object]]:
    """The summary rows: the MRN's fields, or those of every patient treated in the window."""
    cfg = load_site(site, config)
    alias, src = cfg.source(source)
    if not isinstance(src, MosaiqSource):
        raise ConfigError(f"{cfg.config_path}: site {site}: source {alias!r} is of type "
                          f"{src.type!r}: the Mosaiq summary reads a 'mosaiq' source")
    conn = connect(cfg, alias, src)
    try:
        if mrn:
            fields = fields_of_patient(conn, cfg, alias, src, mrn=mrn)
        else:
            treated = sorted({f.pat_id1 for f in read_fields(conn, cfg, alias, src, start, end)})
            fields = [f for p in treated
                      for f in fields_of_patient(conn, cfg, alias, src, pat_id1=p)]
    finally:
        conn.close()  # type: ignore[attr-defined]
    return summary_rows(fields)


@flow(name="mosaiq-summary", log_prints=False, **RUN_HOOKS)
def mosaiq_summary(site: str, mrn: str = "", start_date: date | None = None,
                   end_date: date | None = None, out: str | None = None,
                   source: str | None = None, config: str | None = None) -> dict[str, object]:
    """Mosaiq's own account of each course, for one MRN or every patient treated in the window.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        mrn: One patient's MRN (empty: every patient treated between the two dates).
        start_date: First day of the window (default: 6 days before the end date).
        end_date: Last day of the window (default: today, site time).
        out: CSV path on the worker (default: reports/mosaiq-summary-<site>-<end>.csv).
        source: The site's Mosaiq source alias (empty: the site's default_source).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
    """
    cfg = load_site(site, config)
    end = end_date or wall(utc_now(), cfg.tz).date()
    start = start_date or end - timedelta(days=6)
    rows = read_courses(site, source, config, mrn, datetime.combine(start, time()),
                        datetime.combine(end, time(23, 59, 59, 999999)))
    path = Path(out) if out else PROJECT_ROOT / "reports" / f"mosaiq-summary-{site}-{end}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=SUMMARY_COLUMNS).to_csv(path, index=False, encoding="utf-8-sig")
    create_table_artifact(table=[{k: str(v) for k, v in r.items()} for r in rows],
                          key=artifact_key("mosaiq-summary", site),
                          description=f"Mosaiq treatment summary, site {site}, "
                                      + (f"MRN {mrn}" if mrn else f"{start} to {end}"))
    get_run_logger().info("site %s: Mosaiq summary of %d course(s) written to %s", site,
                          len(rows), path)
    return {"site": site, "courses": len(rows), "csv": str(path)}


if __name__ == "__main__":
    sys.exit(run_cli(mosaiq_summary, __doc__ or "", uses_rv=False))
