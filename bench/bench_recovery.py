"""Benchmark: restore and the validation sweep, each against a raw baseline in the same run.

    .venv/bin/python -m bench.bench_recovery [--slices 200] [--patients 500] [--fractions 30]

Restore: the backup Orthanc holds one course with a ``slices``-slice CT (plus structure set,
plan, dose, records). Baseline: one raw C-MOVE of the patient's study from the backup to a
scratch Orthanc (the backup's own C-STORE, as restore uses). Measured: the ``restore`` flow of
that patient to the same scratch Orthanc, from the call to every object verified there
(select, send, verify, artifacts), with the target's ``max_associations`` 1 and 2. Twice each,
alternating with the baseline, the scratch Orthanc emptied between; the best of each.

Sweep: ``patients`` x ``fractions`` RT Records, the same files in the R&V stand-in and in the
backup, all verified in the ledger. Baseline: the raw REST listing of the backup's records
(one ``/tools/find``). Measured: ``validation_sweep`` at presence depth over every day that
holds a record (a C-FIND per day on the R&V, the listing, the MD5 check and a parse of every
record, the ledger check).

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
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import bench.env  # noqa: E402,F401  (first: the environment every benchmark runs in)

from demo.orthanc import OrthancServer  # noqa: E402
from demo.site import DemoSite, add_restore_target, start_demo_site  # noqa: E402
from demo.synthetic import Patient, Study, make_image_series, make_rtdose, make_rtplan, \
    make_rtstruct, make_treatment_record, to_bytes  # noqa: E402
from bench.bench_context import run_seconds  # noqa: E402
from bench.report_file import replace_section  # noqa: E402
from radonc_backup.config import PROJECT_ROOT, load_site  # noqa: E402
from radonc_backup.dicom_net import identifier  # noqa: E402
from radonc_backup.instance import InstanceRef  # noqa: E402
from radonc_backup.ledger import Lane, Ledger  # noqa: E402
from tasks.limits import ensure_rv_limits  # noqa: E402

SECTION = "## Recovery: restore and validation sweep"
END = date(2026, 11, 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="CT rows and columns")
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--fractions", type=int, default=30)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "performance.md"))
    args = parser.parse_args(argv)
    os.environ["TCP_NODELAY"] = "1"

    workdir = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    site = start_demo_site(workdir / "site")
    scratch: OrthancServer | None = None
    try:
        cfg = load_site("DEMO", str(site.config_path))
        backup_cfg = cfg.backup_targets["orthanc"]
        scratch = OrthancServer("SCRATCH", modalities={
            "backup": (backup_cfg.aet, "127.0.0.1", site.backup.dicom_port)}).start()
        add_restore_target(site, "scratch", scratch)
        add_restore_target(site, "scratch2", scratch, associations=2)  # the same, two at once
        ensure_rv_limits(load_site("DEMO", str(site.config_path)))  # as deployments.register
        restore_rows = bench_restore(site, scratch, args.slices, args.size)
        print(f"restore: {restore_rows}", flush=True)
        sweep_row = bench_sweep(site, args.patients, args.fractions)
    finally:
        site.stop()
        if scratch is not None:
            scratch.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(Path(args.out), args, restore_rows, sweep_row)
    print(Path(args.out).read_text().split(SECTION, 1)[1])
    return 0


def empty(server: OrthancServer) -> None:
    with server.rest() as client:
        for pid in client.get("/patients").json():
            client.delete(f"/patients/{pid}").raise_for_status()


def bench_restore(site: DemoSite, scratch: OrthancServer, slices: int, size: int,
                  ) -> dict[str, float]:
    from flows.restore import restore

    study = Study(Patient("BENCH01", "Bench^Restore"), study_date="20261101")
    ct = make_image_series(study, "ct", slices=slices, rows=size, columns=size)
    struct = make_rtstruct(study, ct)
    plan = make_rtplan(study, struct, ct.frame_of_reference_uid)
    every = [*ct.instances, struct, plan, make_rtdose(study, plan, ct),
             *(make_treatment_record(study, plan, n, datetime(2026, 11, 17 + n, 9))
               for n in (1, 2, 3))]
    site.backup.upload([to_bytes(ds) for ds in every])
    objects = len(every)
    cfg = load_site("DEMO", str(site.config_path))
    client = cfg.client(cfg.backup_targets["orthanc"])
    params = {"site": "DEMO", "config": str(site.config_path), "target": "scratch",
              "patient_ids": ["BENCH01"]}
    restore(**params)  # warm-up: starts Prefect, declares SCRATCH to the backup
    empty(scratch)

    def raw() -> float:
        t = time.perf_counter()
        [result] = client.move([identifier("STUDY", PatientID="BENCH01",
                                           StudyInstanceUID=study.uid)], "SCRATCH")
        elapsed = time.perf_counter() - t
        assert result.completed == objects and scratch.instance_count() == objects, result
        return elapsed

    def flow(target: str) -> tuple[float, float, float]:
        t = time.perf_counter()
        state = restore(**{**params, "target": target}, return_state=True)
        elapsed = time.perf_counter() - t
        result = state.result()
        assert result["verified"] == objects, result
        return elapsed, run_seconds(state.state_details.flow_run_id), float(result["seconds"])

    raws: list[float] = []
    runs: dict[str, list[tuple[float, float, float]]] = {"scratch": [], "scratch2": []}
    for _ in range(3):
        for target in runs:
            raws.append(raw())
            empty(scratch)
            runs[target].append(flow(target))
            empty(scratch)
    empty(site.backup)  # the sweep would rightly call this patient unknown to the ledger
    out = {"objects": objects, "raw": min(raws)}
    for target, suffix in (("scratch", ""), ("scratch2", "2")):
        out[f"flow{suffix}"] = min(r[0] for r in runs[target])
        out[f"recorded{suffix}"] = min(r[1] for r in runs[target])
        out[f"inner{suffix}"] = min(r[2] for r in runs[target])
    return out


def bench_sweep(site: DemoSite, patients: int, fractions: int) -> dict[str, float]:
    from flows.validation_sweep import validation_sweep

    t = time.perf_counter()
    refs, blobs, first_day = [], [], END
    for p in range(patients):
        study = Study(Patient(f"SWP{p:04d}", f"Sweep^Number{p}"), study_date="20261001")
        ct = make_image_series(study, "ct", slices=1, rows=8, columns=8)
        plan = make_rtplan(study, make_rtstruct(study, ct), ct.frame_of_reference_uid,
                           fractions=fractions + 5)
        first = datetime(2026, 11, 20, 8) - timedelta(days=fractions - 1 + p % 10)
        first_day = min(first_day, first.date())
        for f in range(1, fractions + 1):
            ds = make_treatment_record(study, plan, f, first + timedelta(days=f - 1))
            blobs.append(to_bytes(ds))
            refs.append(InstanceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                    str(ds.PatientID), str(ds.StudyInstanceUID),
                                    str(ds.SeriesInstanceUID), str(ds.TreatmentDate),
                                    str(ds.TreatmentTime)))
        if len(blobs) >= 1000:
            site.rv.upload(blobs)
            site.backup.upload(blobs)
            blobs = []
    site.rv.upload(blobs)
    site.backup.upload(blobs)
    lane = Ledger.for_state_dir(site.workdir / "state").at(Lane("DEMO", "aria", "orthanc"))
    lane.record_found(refs)
    lane.mark_verified(r.sop_instance_uid for r in refs)
    print(f"loaded {len(refs)} records twice in {time.perf_counter() - t:.0f} s", flush=True)

    t = time.perf_counter()
    with site.backup.rest() as client:
        listed = client.post("/tools/find", json={"Level": "Instance", "Expand": True,
                                                  "Query": {"Modality": "RTRECORD"}}).json()
    listing = time.perf_counter() - t
    assert len(listed) >= len(refs)

    cfg = load_site("DEMO", str(site.config_path))
    client = cfg.client(cfg.sources["aria"])
    t = time.perf_counter()
    asked = 0
    for n in range((END - first_day).days + 1):
        day = first_day + timedelta(days=n)
        asked += sum(1 for m in client.find(identifier(
            "IMAGE", Modality="RTRECORD", PatientID="", StudyInstanceUID="",
            SeriesInstanceUID="", SOPInstanceUID="", TreatmentDate=f"{day:%Y%m%d}"))
            if "SOPInstanceUID" in m)
    finds = time.perf_counter() - t
    assert asked == len(refs), asked

    t = time.perf_counter()
    state = validation_sweep(site="DEMO", config=str(site.config_path), start_date=first_day,
                             end_date=END, out=str(site.workdir / "sweep.csv"),
                             return_state=True)
    sweep = time.perf_counter() - t
    assert state.is_completed(), state.message
    result = state.result()
    assert result["records_on_source"] == len(refs), result
    return {"records": len(refs), "days": (END - first_day).days + 1, "listing": listing,
            "finds": finds, "sweep": sweep}


def write_report(path: Path, args: argparse.Namespace, r: dict[str, float],
                 s: dict[str, float]) -> None:
    ratio = {k: r["raw"] / r[k] for k in ("flow", "recorded", "inner", "flow2", "recorded2",
                                           "inner2")}
    sweep_ratio = s["sweep"] / s["listing"]

    def row(label: str, key: str) -> str:
        return f"| {label} | {r[key]:.2f} | {r['objects'] / r[key]:.0f} | {ratio[key]:.2f}x |"

    def verdict(key: str) -> str:
        return f"{ratio[key]:.2f}x ({'met' if ratio[key] >= 0.9 else 'not met'})"

    lines = [
        SECTION,
        "",
        f"Measured by `python -m bench.bench_recovery` on {datetime.now(timezone.utc):%Y-%m-%d}"
        f" ({platform.machine()}, {os.cpu_count()} cores), the demo's Orthancs on loopback.",
        "",
        f"Restore of one course with a {args.slices}-slice CT ({args.size}x{args.size}, 16-bit; "
        f"{int(r['objects'])} objects: images, structure set, plan, dose, records) from the "
        "backup to a scratch Orthanc. Three runs of each, alternating with the baseline, the "
        "best of each:",
        "",
        "| path | s | objects/s | vs raw C-MOVE |",
        "|---|---|---|---|",
        f"| baseline: one raw C-MOVE of the study, backup to scratch | {r['raw']:.2f} | "
        f"{r['objects'] / r['raw']:.0f} | 1.00x |",
        row("`restore` flow, target `max_associations = 1`, call to return (select, send, "
            "verify each object on the target, artifacts)", "flow"),
        row("the same run as Prefect records it (Running to Completed)", "recorded"),
        row("of which send and verify", "inner"),
        row("`restore` flow, target `max_associations = 2` (the backup's C-STOREs split "
            "between two associations), call to return", "flow2"),
        row("the same run as Prefect records it", "recorded2"),
        row("of which send and verify", "inner2"),
        "",
        "Goal (issue: prove the backup and use it): at least 0.9x. This run, with one "
        f"association: {verdict('flow')} call to return, {verdict('recorded')} as Prefect "
        f"records it; with two: {verdict('flow2')} call to return, {verdict('recorded2')} as "
        "Prefect records it (the baseline uses one association). 'Call to return' is what a "
        "caller of the flow function waits: Prefect's sync engine ends every run by joining "
        "its heartbeat thread, which sleeps in whole seconds, so a run returns 0 to 1 s after "
        "it is Completed on the server (what the UI and `prefect deployment run --watch` "
        "show). The rest of the gap is a Prefect run's fixed cost (start, two task runs, two "
        "artifacts), which a larger restore spreads thinner.",
        "",
        f"Validation sweep at presence depth of {int(s['records']):,} RT Records over "
        f"{int(s['days'])} days (the same files on the R&V stand-in and in the backup, all "
        "verified in the ledger):",
        "",
        "| path | s | records/s | vs raw listing |",
        "|---|---|---|---|",
        f"| baseline: the raw REST listing of the backup's records | {s['listing']:.2f} | "
        f"{s['records'] / s['listing']:.0f} | 1.00x |",
        f"| baseline: the source's C-FIND of each day's records, one a day (the other "
        f"direction must ask it) | {s['finds']:.1f} | {s['records'] / s['finds']:.0f} | "
        f"{s['finds'] / s['listing']:.1f}x the time |",
        f"| `validation_sweep`, presence | {s['sweep']:.1f} | {s['records'] / s['sweep']:.0f} "
        f"| {sweep_ratio:.1f}x the time |",
        "",
        f"Goal: within 2x the listing. This run: {sweep_ratio:.1f}x "
        f"({'met' if sweep_ratio <= 2 else 'not met'}). The goal and the issue's own "
        "correctness rule conflict: \"readability at every depth\" means Orthanc re-reads each "
        "stored file for its MD5 check and each record is fetched and parsed, which a listing "
        "never does; a sweep that only listed would meet the goal and pass a file damaged on "
        "disk (the bug the issue reports). We keep the checks and do not meet this goal. "
        "The C-FIND row is what the source direction costs by itself: the R&V stand-in is an "
        "Orthanc, which does not index TreatmentDate and reads every RT Record it holds to "
        "answer each day's query; a sweep that never asked the source could not find what "
        "the backup lacks.",
        "",
    ]
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    sys.exit(main())
