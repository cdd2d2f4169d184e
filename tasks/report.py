"""Prefect tasks for the treatment report: list, then parse in batches (never one task per record)."""

from __future__ import annotations

import atexit
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import date

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from radonc_backup.backup_target import OrthancBackup, open_backup
from radonc_backup.config import load_site
from radonc_backup.errors import BackupTargetError, ConfigError, RetriableBackupTargetError
from radonc_backup.treatment_report import FactCache, RecordFacts, facts_from_files, \
    plan_facts, record_facts


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


_DECODE_CHUNK = 50


def _decoders() -> ProcessPoolExecutor:
    """Decoding is CPU-bound pydicom work; a pool keeps it off the fetching interpreter."""
    global _POOL
    if _POOL is None:
        _POOL = ProcessPoolExecutor(max_workers=max(1, (os.cpu_count() or 2)),
                                    mp_context=multiprocessing.get_context("forkserver"))
        atexit.register(_POOL.shutdown)
    return _POOL


_POOL: ProcessPoolExecutor | None = None


def _decode(files: list[bytes]) -> Future[list[RecordFacts]]:
    """Decode in the pool; if the pool cannot run (e.g. an unguarded __main__), decode here."""
    global _POOL
    try:
        return _decoders().submit(facts_from_files, files)
    except (BrokenProcessPool, RuntimeError, OSError) as exc:
        get_run_logger().warning("decoding in this process: the decoder pool is unavailable "
                                 "(%s)", exc)
        _POOL = None
        done: Future[list[RecordFacts]] = Future()
        done.set_result(facts_from_files(files))
        return done


@task(name="parse-records", cache_policy=NO_CACHE)
def parse_records(site: str, backup: str | None, config: str | None,
                  resource_ids: list[str]) -> dict[str, str]:
    """Fetch and parse a batch of records into the cache; returns the unreadable ones."""
    target, cache = report_backup(site, backup, config)
    unreadable: dict[str, str] = {}
    pending: list[tuple[list[str], Future[list[RecordFacts]]]] = []
    ids: list[str] = []
    files: list[bytes] = []
    for rid in resource_ids:
        try:
            files.append(target.fetch_file(rid))
            ids.append(rid)
        except RetriableBackupTargetError:
            raise
        except BackupTargetError as exc:
            unreadable[rid] = str(exc)
        if len(files) == _DECODE_CHUNK:
            pending.append((ids, _decode(files)))
            ids, files = [], []
    if files:
        pending.append((ids, _decode(files)))
    parsed: list[tuple[str, RecordFacts]] = []
    for chunk_ids, future in pending:
        try:
            parsed += list(zip(chunk_ids, future.result()))
        except Exception as exc:  # one bad file in the chunk: decode one by one to name it
            get_run_logger().warning("decoding a chunk of %d in this process: %s",
                                     len(chunk_ids), exc)
            for rid in chunk_ids:
                try:
                    parsed.append((rid, record_facts(target.read_resource(rid))))
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
