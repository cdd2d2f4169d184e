"""Prefect tasks for the treatment report: list, then parse in batches (never one task per record)."""

from __future__ import annotations

from datetime import date

from prefect import task
from prefect.cache_policies import NO_CACHE

from radonc_backup.backup_target import OrthancBackup, open_backup
from radonc_backup.config import load_site
from radonc_backup.errors import BackupTargetError, ConfigError, RetriableBackupTargetError
from radonc_backup.treatment_report import FactCache, plan_facts, record_facts


def report_backup(site: str, backup: str | None, config: str | None,
                  ) -> tuple[OrthancBackup, FactCache]:
    cfg = load_site(site, config)
    target = open_backup(cfg, backup)
    if not isinstance(target, OrthancBackup):
        raise ConfigError(f"site {site}: the treatment report reads the backup over Orthanc's "
                          f"REST API; backup {target.alias} is a plain DICOM SCP")
    return target, FactCache(cfg.state_dir / "report-cache.sqlite")


@task(name="list-records-in-backup", cache_policy=NO_CACHE)
def list_records(site: str, backup: str | None, config: str | None,
                 study_start_date: date | None) -> list[str]:
    target, _ = report_backup(site, backup, config)
    query = {"Modality": "RTRECORD"}
    if study_start_date:
        query["StudyDate"] = f"{study_start_date:%Y%m%d}-"
    return target.find_resources(query)


@task(name="parse-records", cache_policy=NO_CACHE)
def parse_records(site: str, backup: str | None, config: str | None,
                  resource_ids: list[str]) -> dict[str, str]:
    """Fetch and parse a batch of records into the cache; returns the unreadable ones."""
    target, cache = report_backup(site, backup, config)
    parsed, unreadable = [], {}
    for rid in resource_ids:
        try:
            parsed.append((rid, record_facts(target.read_resource(rid))))
        except RetriableBackupTargetError:
            raise
        except BackupTargetError as exc:
            unreadable[rid] = str(exc)
    cache.put_records(parsed)
    return unreadable


@task(name="read-plans", cache_policy=NO_CACHE)
def read_plans(site: str, backup: str | None, config: str | None, plan_uids: list[str]) -> int:
    """Cache the label and fraction count of plans found in the backup; returns how many."""
    target, cache = report_backup(site, backup, config)
    found = 0
    for uid in plan_uids:
        ds = target.read(uid)
        if ds is not None:
            cache.put_plan(uid, plan_facts(ds))
            found += 1
    return found
