"""The demo: a day at a small clinic, backed up by the real incremental flow.

Starts an Orthanc standing in for the R&V and a backup Orthanc on free loopback ports, loads
synthetic patients (planning CT, structure set, plan, dose, one RT Beams Treatment Record per
delivered fraction) and pydicom's RT sample files into the R&V, runs ``incremental_backup`` for
site DEMO through Prefect, prints what reached the backup, and stops both servers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from radonc_backup.config import PROJECT_ROOT


def _prefect_env() -> Path:
    home = Path(os.environ.setdefault("PREFECT_HOME", str(PROJECT_ROOT / ".prefect")))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="keep the servers' files (printed at the end)")
    args = parser.parse_args(argv)
    prefect_home = _prefect_env()

    from demo.site import pydicom_rt_samples, start_demo_site
    from demo.synthetic import demo_cohort, to_bytes
    from flows.cli import EPHEMERAL_TIMED_OUT, ephemeral_advice
    from flows.incremental_backup import incremental_backup
    from radonc_backup.config import load_site
    from radonc_backup.errors import BackupError
    from tasks.limits import ensure_rv_limits

    workdir = Path(tempfile.mkdtemp(prefix="radonc-demo-"))
    site = start_demo_site(workdir)
    try:
        tz = load_site("DEMO", site.config_path).tz
        now = datetime.now(tz).replace(tzinfo=None)
        courses = demo_cohort(now.date(), now)
        objects = [to_bytes(ds) for c in courses for ds in c.all()]
        loaded = site.rv.upload(objects) + site.rv.upload(pydicom_rt_samples())
        records = sum(len(c.records) for c in courses)
        print(f"R&V stand-in {site.rv.aet} on 127.0.0.1:{site.rv.dicom_port}: {loaded} objects "
              f"for {len(courses)} patients ({records} RT Beams Treatment Records)")
        print(f"Backup Orthanc {site.backup.aet} on 127.0.0.1:{site.backup.dicom_port} "
              f"(REST {site.backup.url})")
        print("Running flow incremental-backup for site DEMO ...")
        try:
            ensure_rv_limits(load_site("DEMO", site.config_path))
            summary = incremental_backup(site="DEMO", config=str(site.config_path))
        except BackupError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        except RuntimeError as exc:
            if not str(exc).startswith(EPHEMERAL_TIMED_OUT):
                raise
            print(f"FAILED: site DEMO: {ephemeral_advice()}", file=sys.stderr)
            return 1
        print(f"\nWindow (America/New_York): {summary['window']}")
        print(f"Found {summary['found']} RT Records; moved {summary['moved']}; verified in the "
              f"backup {summary['verified']}; not verified {summary['failed']}.")
        gaps = list(summary.get("continuity") or [])
        print("Fraction continuity (read back from the backup's records): "
              + (f"{len(gaps)} gap(s): " + "; ".join(gaps) if gaps else
                 "every fraction from 1 to the latest of each plan is held"))
        _print_backup(site.backup)
        _print_context(site.backup, str(summary.get("plan_context", "")))
        print(f"\nRun history is in {prefect_home}. To see it in the Prefect UI:\n"
              f"  PREFECT_HOME={prefect_home} .venv/bin/prefect server start\n"
              f"  then open http://127.0.0.1:4200/runs")
        return 0
    finally:
        site.stop()
        if args.keep:
            print(f"Files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _print_backup(backup: object) -> None:
    """What the backup holds: one line per RT Record, by patient ID and UID (no names)."""
    rows = []
    with backup.rest() as client:  # type: ignore[attr-defined]
        ids = client.post("/tools/find", json={"Level": "Instance",
                                               "Query": {"Modality": "RTRECORD"}}).json()
        for orthanc_id in ids:
            tags = client.get(f"/instances/{orthanc_id}/simplified-tags").json()
            fraction = max((int(b.get("CurrentFractionNumber", 0) or 0)
                            for b in tags.get("TreatmentSessionBeamSequence", [])), default=0)
            rows.append((tags.get("PatientID", ""), tags.get("TreatmentDate", ""),
                         tags.get("TreatmentTime", "")[:6], fraction,
                         tags.get("SOPInstanceUID", "")))
    print(f"\nRT Records now in the backup ({len(rows)}):")
    print(f"  {'PatientID':<10} {'Date':<9} {'Time':<6} {'Fx':>3}  SOPInstanceUID")
    for pid, d, t, fx, uid in sorted(rows):
        print(f"  {pid:<10} {d:<9} {t:<6} {fx:>3}  {uid}")


def _print_context(backup: object, state: str) -> None:
    """Plan context now in the backup, counted by modality."""
    counts: dict[str, int] = {}
    with backup.rest() as client:  # type: ignore[attr-defined]
        for series in client.get("/series", params={"expand": "true"}).json():
            modality = series["MainDicomTags"].get("Modality", "?")
            if modality != "RTRECORD":
                counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    listed = ", ".join(f"{n} {m}" for m, n in sorted(counts.items())) or "nothing"
    print(f"\nPlan-context backfill ({state}): the backup now also holds {listed}.")


if __name__ == "__main__":
    sys.exit(main())
