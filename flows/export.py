"""Export from the backup to a folder, for a physicist, a vendor or a research copy.

One folder per patient, study and series (``<PatientID>/<StudyInstanceUID>/
<Modality>_<SeriesInstanceUID>/<SOPInstanceUID>.dcm``), plain DICOM files, no DICOMDIR;
``--zip`` also writes ``<folder>.zip``. ``--pseudonymize`` replaces names, IDs, dates and UIDs
with dicognito, the same way across the whole export (a study's references still hold); the
backup itself is never altered. The folder is written as ``<folder>.partial`` and renamed when
whole.
"""

from __future__ import annotations

import sys
from datetime import date

from prefect import flow, get_run_logger

from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.config import load_site
from radonc_backup.errors import BackupIncomplete
from radonc_backup.restore import KINDS, choose_patients
from tasks.backup import with_site_retries
from tasks.recovery import export_objects, select_objects


@flow(name="export", log_prints=False, **RUN_HOOKS)
def export(site: str, folder: str, patient_ids: list[str] | None = None,
           start_date: date | None = None, end_date: date | None = None,
           kinds: list[str] | None = None, pseudonymize: bool = False, seed: str = "",
           zip: bool = False, backup: str | None = None, config: str | None = None,
           ) -> dict[str, object]:
    """Write what the backup holds of some patients to a new folder on the worker.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        folder: A folder that does not exist yet (created).
        patient_ids: The patients (empty: every patient with a record in the period).
        start_date: First day of the period (by TreatmentDate, as the ledger has it).
        end_date: Last day of the period.
        kinds: record, context or both (default both).
        pseudonymize: Replace names, IDs, dates and UIDs (dicognito), consistently.
        seed: Pseudonymization seed (a secret): the same seed gives the same pseudonyms.
        zip: Also write <folder>.zip.
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
    """
    cfg = load_site(site, config)
    backup_alias, _ = cfg.backup(backup)
    patients = choose_patients(cfg, backup_alias, patient_ids, start_date, end_date)
    settings = cfg.settings
    items = with_site_retries(select_objects, settings)(site, backup, config, patients,
                                                       kinds or list(KINDS))
    done = export_objects(site, backup, config, items, folder, pseudonymize, seed, zip)
    get_run_logger().info("site %s: %d file(s), %.1f MB of %d patient(s) exported to %s%s%s",
                          site, done.files, done.bytes / 1e6, len(patients), done.folder,
                          " (pseudonymized)" if pseudonymize else "",
                          f", zipped as {done.archive}" if done.archive else "")
    if done.not_written:
        named = [f"{uid} ({why})" for uid, why in sorted(done.not_written.items())]
        for line in named:
            get_run_logger().error("site %s: not exported: %s", site, line)
        raise BackupIncomplete(f"site {site}: {len(named)} of {len(items)} object(s) not "
                               f"exported to {done.folder} (the rest are; manifest.json lists "
                               f"them): {'; '.join(named[:10])}")
    return {"site": site, "patients": len(patients), "files": done.files,
            "MB": round(done.bytes / 1e6, 2), "folder": str(done.folder),
            "zip": str(done.archive or ""), "pseudonymized": pseudonymize}


if __name__ == "__main__":
    sys.exit(run_cli(export, __doc__ or ""))
