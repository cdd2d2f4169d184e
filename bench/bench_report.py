"""Benchmark: the treatment report over many records, against raw list-and-fetch.

    .venv/bin/python -m bench.bench_report [--patients 500] [--fractions 30]

The backup Orthanc holds ``patients`` x ``fractions`` RT Beams Treatment Records (plus one plan
each). Measured in the same run:
- baseline: list the records over REST and GET every file (keep-alive), nothing else;
- cold report: the ``treatment_report`` flow with an empty cache (fetch, parse, cache, report);
- warm report: the same flow again (nothing new to fetch);
- next morning: one more session for every tenth patient, then the flow again.
Appends its section to docs/performance.md (replacing an older one).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import bench.env  # noqa: E402,F401  (first: the environment every benchmark runs in)

from pydicom.dataset import Dataset  # noqa: E402

from demo.site import start_demo_site  # noqa: E402
from demo.synthetic import Patient, Study, make_image_series, make_rtplan, make_rtstruct, \
    make_treatment_record, to_bytes  # noqa: E402
from bench.report_file import replace_section  # noqa: E402
from radonc_backup.config import PROJECT_ROOT  # noqa: E402

SECTION = "## Treatment report"
END = date(2026, 11, 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--fractions", type=int, default=30)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "performance.md"))
    parser.add_argument("--keep", metavar="DIR",
                        help="keep the loaded Orthanc pair in DIR and reuse it next time (a "
                             "200,000-record load takes about half an hour here)")
    args = parser.parse_args(argv)

    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-report-"))
    marker = workdir / f"loaded-{args.patients}x{args.fractions}"
    shutil.rmtree(workdir / "state", ignore_errors=True)  # the report cache: a cold run is cold
    site = start_demo_site(workdir)
    try:
        t = time.perf_counter()
        if marker.exists():
            n = args.patients * args.fractions
        else:
            n = load(site, args.patients, args.fractions)
            marker.touch()
        print(f"loaded {n} records in {time.perf_counter() - t:.0f} s", flush=True)

        t = time.perf_counter()
        with site.backup.rest() as client:
            ids = client.post("/tools/find", json={"Level": "Instance",
                                                   "Query": {"Modality": "RTRECORD"}}).json()
            listed = time.perf_counter() - t
            for rid in ids:
                client.get(f"/instances/{rid}/file").raise_for_status()
        raw = time.perf_counter() - t

        from flows.treatment_report import treatment_report

        def report() -> tuple[float, dict[str, object]]:
            t = time.perf_counter()
            result = treatment_report(site="DEMO", config=str(site.config_path),
                                      treatment_start_date=END - timedelta(days=6), end_date=END,
                                      out=str(workdir / "report.csv"))
            return time.perf_counter() - t, result

        # Warm-up as in the other benchmarks: starts the ephemeral Prefect server (lists nothing).
        treatment_report(site="DEMO", config=str(site.config_path), end_date=END,
                         study_start_date=date(2099, 1, 1), out=str(workdir / "warmup.csv"))
        cold, cold_result = report()
        warm, warm_result = report()
        assert cold_result["records_fetched"] == len(ids) and warm_result["records_fetched"] == 0
        # The next morning: one more session for every patient on treatment.
        day = next_day(args.patients, args.fractions)
        site.backup.upload([to_bytes(ds) for ds in day])  # type: ignore[attr-defined]
        daily, daily_result = report()
        assert daily_result["records_fetched"] == len(day), daily_result
        assert "change log" in str(daily_result["listing"]), daily_result["listing"]
        with site.backup.rest() as client:  # leave the kept backup as it was loaded
            for ds in day:
                found = client.post("/tools/lookup", content=str(ds.SOPInstanceUID)).json()
                client.delete(f"/instances/{found[0]['ID']}").raise_for_status()
    finally:
        if args.keep:
            site.rv.stop()
            site.backup.stop()
        else:
            site.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    write_report(Path(args.out), len(ids), Timings(listed, raw, cold, warm, daily, len(day)),
                 int(cold_result["rows"]))
    print(Path(args.out).read_text().split(SECTION, 1)[1])
    return 0


def load(site: object, patients: int, fractions: int) -> int:
    blobs: list[bytes] = []
    count = 0
    pool = ThreadPoolExecutor(max_workers=2)  # Orthanc stores while the next files are made
    uploads: list[Future[int]] = []
    for p in range(patients):
        study = Study(Patient(f"RPT{p:04d}", f"Patient^Number{p}"), study_date="20261001")
        ct = make_image_series(study, "ct", slices=1, rows=8, columns=8)
        plan = make_rtplan(study, make_rtstruct(study, ct), ct.frame_of_reference_uid,
                           fractions=fractions + 5)
        blobs.append(to_bytes(plan))
        first = datetime(2026, 11, 20, 8) - timedelta(days=fractions - 1 + p % 10)
        for f in range(1, fractions + 1):
            blobs.append(to_bytes(make_treatment_record(study, plan, f,
                                                        first + timedelta(days=f - 1))))
            count += 1
        if len(blobs) >= 1000:
            if len(uploads) >= 4:  # bounded: files made faster than stored wait in memory
                uploads.pop(0).result()
            uploads.append(pool.submit(site.backup.upload, blobs))  # type: ignore[attr-defined]
            blobs = []
    uploads.append(pool.submit(site.backup.upload, blobs))  # type: ignore[attr-defined]
    for upload in uploads:
        upload.result()
    pool.shutdown()
    return count


def next_day(patients: int, fractions: int) -> list[Dataset]:
    """One more fraction for each patient still on treatment on END (made as load made them)."""
    out = []
    for p in range(patients):
        if p % 10:
            continue  # the patients whose last fraction was on END: every tenth
        study = Study(Patient(f"RPT{p:04d}", f"Patient^Number{p}"), study_date="20261001")
        ct = make_image_series(study, "ct", slices=1, rows=8, columns=8)
        plan = make_rtplan(study, make_rtstruct(study, ct), ct.frame_of_reference_uid,
                           fractions=fractions + 5)
        out.append(make_treatment_record(study, plan, fractions + 1,
                                         datetime(2026, 11, 20, 17)))
    return out


@dataclass
class Timings:
    listed: float  # baseline: the instance-level listing alone
    raw: float  # baseline: listing and GET of every file
    cold: float
    warm: float
    daily: float
    daily_records: int


def write_report(path: Path, n: int, t: Timings, rows: int) -> None:
    lines = [
        SECTION,
        "",
        f"Measured by `python -m bench.bench_report` on {datetime.now(timezone.utc):%Y-%m-%d} "
        f"({platform.machine()}, {os.cpu_count()} cores): {n:,} RT Records in the backup "
        f"Orthanc, report over one week ({rows} patient-plan rows), no study-date narrowing.",
        "",
        "| path | s | records/s | vs raw list-and-fetch |",
        "|---|---|---|---|",
        f"| baseline: REST list + GET every record file | {t.raw:.1f} | {n / t.raw:.0f} | 1.00x |",
        f"| (of which the instance-level listing alone) | {t.listed:.1f} | - | - |",
        f"| cold report (empty cache: list, fetch, parse, cache, report, CSV, artifacts) | "
        f"{t.cold:.1f} | {n / t.cold:.0f} | {t.raw / t.cold:.2f}x |",
        f"| warm rerun (nothing new; reads the change log) | {t.warm:.1f} | - | - |",
        f"| next morning ({t.daily_records} new records; reads the change log) | {t.daily:.1f} "
        "| - | - |",
        "",
        "Goals (issue: nothing missed with exit 0): cold report at no less than 0.5x the raw "
        "list-and-fetch rate; warm within 5 s. This run: cold "
        f"{t.raw / t.cold:.2f}x ({'met' if t.raw / t.cold >= 0.5 else 'not met'}), warm "
        f"{t.warm:.1f} s ({'met' if t.warm <= 5 else 'not met'}), next morning {t.daily:.1f} s "
        f"({'met' if t.daily <= 5 else 'not met'}).",
        "",
        "Where the time goes: a full listing costs Orthanc about "
        f"{t.listed / n * 1e6:.0f} us a record ({t.listed:.1f} s here, the listing row: "
        f"{'more' if t.listed > 5 else 'less'} than the warm budget by itself), so only the "
        "first run lists in full, and later runs read "
        "Orthanc's change log from the cache's cursor (docs/treatment-report.md says why no "
        "arrival can be missed and when a run lists in full again). The report reads from the "
        "cache only the courses treated in the window (an index on patient, plan and day), not "
        "every record. Cold: a pool of worker processes (one per core, at least two) fetches "
        "and decodes chunks of 100 records over their own keep-alive connections; decoding a "
        "record costs ~0.22 ms (fraction numbers and the plan reference read from the "
        "sequences' bytes in place). On 2 cores Orthanc serving and the decoding workers share "
        "the CPU; the rest is Prefect's fixed cost (about 1 s a run, including the heartbeat "
        "join at the end of a sync flow run). Prefect's server is started by a warm-up run "
        "before timing; the worker pool is not: the cold row includes starting it. This "
        "backup holds every patient on treatment in the last weeks (70% of them in the "
        "window), the worst case for the report's course query; a real archive of years "
        "holds mostly finished courses, which the query skips. Orthanc's own speed varies "
        "between runs on this machine: compare rows of one run only.",
        "",
    ]
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    sys.exit(main())
