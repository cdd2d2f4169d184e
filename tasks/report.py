"""Prefect tasks for the treatment report: list, then parse in batches, never a task per record."""

from __future__ import annotations

import atexit
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import date
from typing import TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from radonc_backup.backup_target import OrthancBackup, open_backup
from radonc_backup.config import load_site
from radonc_backup.errors import BackupTargetError, ConfigError
from radonc_backup.report_facts import PlanFacts, RecordFacts, fetch_facts, fetch_plan_facts, \
    in_worker, readable_name, ready
from radonc_backup.report_listing import Listing, list_backup_records
from radonc_backup.treatment_report import FactCache


def report_backup(site: str, backup: str | None, config: str | None,
                  ) -> tuple[OrthancBackup, FactCache]:
    cfg = load_site(site, config)
    target = open_backup(cfg, backup)
    if not isinstance(target, OrthancBackup):
        raise ConfigError(f"site {site}: the treatment report reads the backup over Orthanc's "
                          f"REST API; backup {target.alias} is a plain DICOM SCP")
    return target, FactCache.for_backup(cfg.state_dir, target.alias)


@task(name="list-records-in-backup", cache_policy=NO_CACHE)
def list_records(site: str, backup: str | None, config: str | None,
                 study_start_date: date | None) -> Listing:
    """Every RT Record in the backup: from its change log since the last run, or in full."""
    target, cache = report_backup(site, backup, config)
    listing = list_backup_records(target, cache, study_start_date)
    get_run_logger().info("site %s: %d RT Records in backup %s, %d not parsed yet (%s)", site,
                          len(listing.resource_ids), target.alias, len(listing.new),
                          listing.how)
    return listing


FETCH_CHUNK = 100  # records a worker fetches and decodes per call
PLAN_CHUNK = 25  # plans per call (each is a lookup and a larger file)
T = TypeVar("T")
WORKERS = max(2, os.cpu_count() or 2)
_POOL: ProcessPoolExecutor | None = None


def _workers() -> ProcessPoolExecutor:
    """Fetching and decoding are CPU-bound Python work: one worker process per core (at least
    two) does both, so neither the GIL of the flow's interpreter nor passing file bytes between
    processes limits the rate. Workers fork from a server that has already imported what they
    need (``radonc_backup.report_facts``: pydicom and httpx, no pandas, no Prefect)."""
    global _POOL
    if _POOL is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["radonc_backup.report_facts",
                                        "radonc_backup.backup_target"])
        _POOL = ProcessPoolExecutor(max_workers=WORKERS, mp_context=context)
        atexit.register(_POOL.shutdown)
    return _POOL


def start_workers() -> None:
    """Start the worker processes now, so they are up by the time the first batch is listed."""
    try:
        pool = _workers()
        for _ in range(WORKERS):
            pool.submit(ready)
    except (BrokenProcessPool, RuntimeError, OSError):
        pass  # _submit notices again and falls back to this process


def _submit(fn: Callable[[OrthancBackup, list[str]], T], target: OrthancBackup,
            items: list[str]) -> Future[T]:
    """``fn(target, items)`` in the pool; if the pool cannot run (e.g. an unguarded __main__),
    here."""
    global _POOL
    try:
        return _workers().submit(in_worker, fn, target, items)
    except (BrokenProcessPool, RuntimeError, OSError) as exc:
        get_run_logger().warning("working in this process: the worker pool is unavailable "
                                 "(%s)", exc)
        _POOL = None
        done: Future[T] = Future()
        done.set_result(fn(target, items))
        return done


@task(name="parse-records", cache_policy=NO_CACHE)
def parse_records(site: str, backup: str | None, config: str | None,
                  resource_ids: list[str]) -> dict[str, str]:
    """Fetch and parse a batch of records into the cache; returns the unreadable ones."""
    target, cache = report_backup(site, backup, config)
    chunks = [_submit(fetch_facts, target, resource_ids[i:i + FETCH_CHUNK])
              for i in range(0, len(resource_ids), FETCH_CHUNK)]
    parsed: list[tuple[str, RecordFacts]] = []
    unreadable: dict[str, str] = {}
    for chunk in chunks:
        facts, bad = chunk.result()  # a backup gone down raises here: the task retries
        parsed += facts
        unreadable.update(bad)
    cache.put_records(parsed)
    return unreadable


def known_to_index(target: OrthancBackup, resource_id: str) -> dict[str, str]:
    """What the backup's index knows of a record it cannot serve (names in readable form)."""
    try:
        tags = target.describe(resource_id)
    except BackupTargetError:
        tags = {}
    return {"sop_instance_uid": tags.get("SOPInstanceUID", ""),
            "patient_id": tags.get("PatientID", ""),
            "patient_name": readable_name(tags.get("PatientName", ""))}


@task(name="read-plans", cache_policy=NO_CACHE)
def read_plans(site: str, backup: str | None, config: str | None, plan_uids: list[str]) -> int:
    """Cache the label and fraction count of plans found in the backup; returns how many."""
    target, cache = report_backup(site, backup, config)
    chunks = [_submit(fetch_plan_facts, target, plan_uids[i:i + PLAN_CHUNK])
              for i in range(0, len(plan_uids), PLAN_CHUNK)]
    found: dict[str, PlanFacts] = {}
    for chunk in chunks:
        plans, unreadable = chunk.result()
        found.update(plans)
        for uid, why in unreadable.items():
            get_run_logger().warning("site %s: plan %s: %s", site, uid, why)
    cache.put_plans(found)
    return len(found)
