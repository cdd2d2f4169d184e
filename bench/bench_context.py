"""Benchmark: plan-context backfill throughput against a raw C-MOVE of the same CT series.

    .venv/bin/python -m bench.bench_context [--slices 200] [--size 512]

A 200-slice CT (512x512, 16-bit: 0.5 MB a slice) with plan, structure set and dose sits on the
R&V stand-in; its RT Record is already backed up. Measured in the same run, between the same two
Orthanc processes, TCP_NODELAY on both ends:
- baseline: dcmtk ``movescu`` of the CT series (SERIES level), one process;
- baseline: a bare pynetdicom C-MOVE of the CT series (TCP_NODELAY on its socket);
- ours: ``ContextWalker.walk`` (chain walk, moves, presence checks, ledger);
- ours: the whole ``plan_context_backfill`` flow run through Prefect.
Throughput is images and objects per second; the ratio is ours over the faster raw C-MOVE.
Appends its section to docs/performance.md (replacing an older one).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import bench.env  # noqa: E402,F401  (first: the environment every benchmark runs in)
os.environ["TCP_NODELAY"] = "1"

from pydicom.dataset import Dataset  # noqa: E402

from demo.site import DemoSite, start_demo_site  # noqa: E402
from demo.synthetic import Patient, Study, make_image_series, make_rtdose, make_rtplan, \
    make_rtstruct, make_treatment_record, to_bytes  # noqa: E402
from bench.report_file import replace_section  # noqa: E402
from radonc_backup.config import PROJECT_ROOT, load_site  # noqa: E402
from tasks.limits import ensure_rv_limits  # noqa: E402
from radonc_backup.lane import open_lane  # noqa: E402
from radonc_backup.ledger import Ledger, PlanLink  # noqa: E402
from radonc_backup.plan_context import ContextWalker  # noqa: E402

NY = ZoneInfo("America/New_York")
NOW = datetime(2026, 11, 20, 16, 0)
SECTION = "## Plan-context backfill"


def clear_context(site: DemoSite) -> None:
    """Delete everything but RT Records from the backup."""
    with site.backup.rest() as client:
        for series in client.get("/series", params={"expand": "true"}).json():
            if series["MainDicomTags"].get("Modality") != "RTRECORD":
                client.delete(f"/series/{series['ID']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_context", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "performance.md"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-context-"))
    site = start_demo_site(workdir, settings={"lookback_days": 7, "verify_timeout": 0.0})
    try:
        study = Study(Patient("BENCHCTX", "Bench^Context"), study_date="20261101")
        ct = make_image_series(study, "ct", slices=args.slices, rows=args.size,
                               columns=args.size)
        struct = make_rtstruct(study, ct)
        plan = make_rtplan(study, struct, ct.frame_of_reference_uid)
        dose = make_rtdose(study, plan, ct)
        record = make_treatment_record(study, plan, 1, NOW - timedelta(hours=2))
        site.rv.upload([to_bytes(ds) for ds in [*ct.instances, struct, plan, dose, record]])
        site.backup.upload([to_bytes(record)])
        objects = len(ct.instances) + 3
        mb = sum(len(ds.PixelData) for ds in ct.instances) / 1e6
        cfg = load_site("DEMO", site.config_path)
        link = PlanLink(str(plan.SOPInstanceUID), "BENCHCTX", "TrueBeam1")

        def movescu() -> float:
            clear_context(site)
            t = time.perf_counter()
            subprocess.run(["movescu", "-S", "-aet", cfg.script_ae, "-aec", site.rv.aet,
                            "-aem", site.backup.aet, "-k", "QueryRetrieveLevel=SERIES",
                            "-k", "PatientID=BENCHCTX", "-k", f"StudyInstanceUID={study.uid}",
                            "-k", f"SeriesInstanceUID={ct.series_uid}", "127.0.0.1",
                            str(site.rv.dicom_port)], check=True, capture_output=True)
            return _checked(site, t, len(ct.instances) + 1)

        def pynetdicom_move() -> float:
            clear_context(site)
            ident = Dataset()
            ident.QueryRetrieveLevel = "SERIES"
            ident.PatientID = "BENCHCTX"
            ident.StudyInstanceUID = study.uid
            ident.SeriesInstanceUID = ct.series_uid
            t = time.perf_counter()
            cfg.client(cfg.sources["aria"]).move([ident], site.backup.aet)
            return _checked(site, t, len(ct.instances) + 1)

        def walker() -> float:
            clear_context(site)
            lane = open_lane("DEMO", config=str(site.config_path))
            ledger = Ledger(workdir / f"ledger-{time.monotonic_ns()}.sqlite").at(lane.lane)
            t = time.perf_counter()
            outcome = ContextWalker(replace(lane, ledger=ledger)).walk(link)
            elapsed = time.perf_counter() - t
            assert outcome.state == "complete", outcome.unresolved
            return elapsed

        from flows.plan_context_backfill import plan_context_backfill

        recorded: list[float] = []

        def flow_run() -> float:
            clear_context(site)
            os.environ["RADONC_BACKUP_STATE_DIR"] = str(workdir / f"s-{time.monotonic_ns()}")
            t = time.perf_counter()
            state = plan_context_backfill(site="DEMO", config=str(site.config_path),
                                          patient_ids=["BENCHCTX"], return_state=True)
            elapsed = time.perf_counter() - t
            summary = state.result()
            assert summary["complete"] == 1, summary
            recorded.append(run_seconds(state.state_details.flow_run_id))
            return elapsed

        ensure_rv_limits(cfg)  # what deployments.register does on a real server
        flow_run()  # warm-up: starts the ephemeral Prefect server
        results = {
            "baseline: dcmtk movescu, CT series": (min(movescu() for _ in range(args.repeat)),
                                                   len(ct.instances)),
            "baseline: bare pynetdicom C-MOVE, CT series": (
                min(pynetdicom_move() for _ in range(args.repeat)), len(ct.instances)),
            "ours: ContextWalker.walk (CT + plan + structure set + dose)": (
                min(walker() for _ in range(args.repeat)), objects),
            "ours: plan_context_backfill flow run, call to return": (
                min(flow_run() for _ in range(args.repeat)), objects),
        }
        results["ours: the same runs, start to end as recorded by Prefect"] = (
            min(recorded[1:]), objects)  # recorded[0] is the warm-up
    finally:
        os.environ.pop("RADONC_BACKUP_STATE_DIR", None)
        site.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    write_report(Path(args.out), results, args.slices, args.size, mb)
    print(Path(args.out).read_text().split(SECTION, 1)[1])
    return 0


def run_seconds(flow_run_id: object) -> float:
    """A flow run's time from Running to its final state, as the Prefect server recorded it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
    assert run.start_time and run.end_time
    return (run.end_time - run.start_time).total_seconds()


def _checked(site: DemoSite, started: float, expected: int) -> float:
    elapsed = time.perf_counter() - started
    assert site.backup.instance_count() == expected, site.backup.instance_count()
    return elapsed


def write_report(path: Path, results: dict[str, tuple[float, int]], slices: int, size: int,
                 mb: float) -> None:
    raw = max(n / s for name, (s, n) in results.items() if name.startswith("baseline"))
    lines = [
        SECTION,
        "",
        f"Measured by `python -m bench.bench_context` on {datetime.now(timezone.utc):%Y-%m-%d} "
        f"({platform.machine()}, {os.cpu_count()} cores): a {slices}-slice CT ({size}x{size}, "
        f"{mb:.0f} MB of pixels) plus plan, structure set and dose, moved between the same two "
        "Orthanc processes with TCP_NODELAY on both ends. Best of 3.",
        "",
        "| path | s | objects | objects/s | vs the faster raw C-MOVE |",
        "|---|---|---|---|---|",
    ]
    for name, (seconds, n) in results.items():
        lines.append(f"| {name} | {seconds:.2f} | {n} | {n / seconds:.0f} | "
                     f"{(n / seconds) / raw:.2f}x |")
    flow = results["ours: plan_context_backfill flow run, call to return"]
    ratio = (flow[1] / flow[0]) / raw
    lines += [
        "",
        f"This run: the flow reaches {ratio:.2f}x ({'met' if ratio >= 0.9 else 'not met'}).",
        "",
        "Goal (issue: plan-context backfill): at least 0.9x the throughput of a raw C-MOVE of the "
        "same series. The walker row is the backfill's own work: it finds the plan, structure "
        "set and series on the R&V, moves the whole series in one SERIES-level C-MOVE (its doses "
        "meanwhile), and checks every UID in the backup. The flow rows add Prefect: a flow run "
        "with four task runs, three artifacts and its slots of the R&V's concurrency limit. "
        "'Call to return' is what a caller waits; Prefect's sync engine ends every run by "
        "joining its heartbeat thread, which sleeps in whole seconds, so a run returns up to "
        "1 s after its work is done. 'Recorded by Prefect' is the run's own start to end.",
        "",
        "Why one plan stays under 0.9x: the series to move is known only after the plan and then "
        "the structure set it references have been found, moved and read from the backup (two "
        "dependent C-FIND + C-MOVE round trips, each with its own sub-association to the "
        "backup), and the walk lists the series' UIDs on the R&V while the series moves, on "
        "the same two cores as both Orthanc processes. The series move itself runs at the raw "
        "rate; the chain before it is a fixed cost per plan that the raw baseline does not "
        "pay. Prefect's part (the gap between the walker row and the recorded run) is a fixed "
        "cost per run, as is the heartbeat join; both shrink relative to the work when a run "
        "backfills many plans or larger series.",
        "",
    ]
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    sys.exit(main())
