"""Prefect tasks of the recovery flows: thin wrappers naming the steps and adding retries."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from radonc_backup.backup_target import HeldInstance, OrthancBackup, open_backup
from radonc_backup.config import load_site
from radonc_backup.errors import ConfigError
from radonc_backup.export import Exported, export
from radonc_backup.restore import Restored, compare_copies, open_target, select, \
    send_and_verify
from tasks.progress import EXPORT_FROM, Progress


def backup_of(site: str, backup: str | None, config: str | None) -> OrthancBackup:
    cfg = load_site(site, config)
    target = open_backup(cfg, backup)
    if not isinstance(target, OrthancBackup):
        raise ConfigError(f"site {site}: backup {target.alias} is a plain DICOM SCP: restore "
                          "and the drill read an Orthanc backup's REST API")
    return target


@task(name="select-objects", cache_policy=NO_CACHE)
def select_objects(site: str, backup: str | None, config: str | None, patient_ids: list[str],
                   kinds: list[str]) -> list[HeldInstance]:
    """What the backup holds of the patients, of the kinds asked for."""
    return select(backup_of(site, backup, config), patient_ids, kinds)


@task(name="send-and-verify", cache_policy=NO_CACHE)
def send_objects(site: str, backup: str | None, config: str | None, target: str, ae: str,
                 host: str, port: int, items: list[HeldInstance]) -> Restored:
    """The backup C-STOREs the objects to the target; each is then asked for there."""
    cfg = load_site(site, config)
    where = open_target(cfg, target, ae, host, port)
    done = send_and_verify(backup_of(site, backup, config), where, items,
                           cfg.settings.verify_timeout)
    get_run_logger().info("site %s: %d object(s) sent to %s, %d verified there, %d not, in "
                          "%.1f s (%.1f objects/s)", site, done.sent, where.label,
                          len(done.verified), len(done.missing), done.seconds, done.rate)
    return done


@task(name="check-fixity", cache_policy=NO_CACHE)
def check_fixity(site: str, backup: str | None, config: str | None,
                 items: list[HeldInstance]) -> dict[str, str]:
    """UID -> why, for each object whose stored file fails the backup's MD5 check."""
    store = backup_of(site, backup, config)
    out = {}
    for item in items:
        why = store.damage(item.resource_id)
        if why:
            out[item.ref.sop_instance_uid] = why
    return out


@task(name="compare-copies", cache_policy=NO_CACHE)
def compare_objects(site: str, backup: str | None, config: str | None, target: str,
                    items: list[HeldInstance]) -> dict[str, str]:
    """Each object on the target against the backup's copy (the drill's diff)."""
    where = open_target(load_site(site, config), target)
    if not isinstance(where.check, OrthancBackup):
        raise ConfigError(f"site {site}: the drill reads its copies back from an Orthanc: "
                          f"restore target {target!r} is a plain DICOM SCP")
    return compare_copies(backup_of(site, backup, config), where.check, items)


@task(name="export-objects", cache_policy=NO_CACHE)
def export_objects(site: str, backup: str | None, config: str | None,
                   items: list[HeldInstance], folder: str, pseudonymize: bool, seed: str,
                   zip_it: bool) -> Exported:
    """Write the objects to a new folder (pseudonymized if asked), whole or not at all."""
    progress = Progress(f"objects exported, site {site}", len(items), EXPORT_FROM)
    return export(backup_of(site, backup, config), items, Path(folder), pseudonymize,
                  seed or None, zip_it, on_written=progress.update)
