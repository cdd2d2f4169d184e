"""Benchmark: peak memory of the C-GET relay (MIM-type sources) against the size of a series.

    .venv/bin/python -m bench.bench_relay_memory [--small 100] [--large 1000] [--size 512]

Two CT series (``small`` and ``large`` slices, ``size`` x ``size``, 16-bit) sit on the R&V
stand-in (an Orthanc, which answers C-GET), declared as a ``mim`` source. Each measurement runs
in a process of its own, so that its peak resident memory (VmHWM) is its own:
- ours: ``transfer.deliver`` of the series' images (C-FIND for the UIDs, C-GET spooled to disk,
  C-STORE from the spool to the backup Orthanc, presence check, ledger);
- baseline, same run: the same C-GET with every object kept in memory and then C-STOREd (what
  a relay without a spool does).
The backup's copy of the series is deleted before each run. Appends its section to
docs/performance.md (replacing an older one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import bench.env  # noqa: E402,F401  (first: the environment every benchmark runs in)
os.environ["TCP_NODELAY"] = "1"

from bench.bench_context import clear_context  # noqa: E402
from bench.report_file import replace_section  # noqa: E402
from demo.site import start_demo_site  # noqa: E402
from demo.synthetic import Patient, Study, make_image_series, to_bytes  # noqa: E402
from radonc_backup.config import PROJECT_ROOT  # noqa: E402

SECTION = "## C-GET relay (MIM): memory against series size"


def child(config: str, series: str, mode: str) -> dict[str, float]:
    """One relay of one series, in this process; returns seconds, objects and peak RSS."""
    from pydicom.dataset import Dataset

    from radonc_backup.dicom_net import identifier
    from radonc_backup.instance import InstanceRef
    from radonc_backup.lane import open_lane
    from radonc_backup.transfer import deliver

    lane = open_lane("DEMO", "mim", None, config)
    client = lane.client()
    refs = [InstanceRef.from_match(m) for m in client.find(identifier(
        "IMAGE", PatientID="", StudyInstanceUID="", SeriesInstanceUID=series,
        SOPInstanceUID="", SOPClassUID=""))]
    start = time.perf_counter()
    if mode == "ours":
        outcome = deliver(lane, refs, "context", 0.0)
        arrived = len(outcome.verified)
    else:
        received: list[Dataset] = []
        ident = identifier("SERIES", PatientID=refs[0].patient_id,
                           StudyInstanceUID=refs[0].study_uid, SeriesInstanceUID=series)
        client.get(ident, received.append, sorted({r.sop_class_uid for r in refs}))
        stored = lane.backup_client().store(received)
        arrived = sum(1 for r in stored if r.ok)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    return {"seconds": seconds, "objects": arrived, "expected": len(refs), "peak_mb": peak_mb}


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM). Not ``ru_maxrss``: on Linux that keeps
    the parent's peak across fork and exec, so a child started by a big parent reports it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_relay_memory",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "performance.md"))
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "SERIES", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    site = start_demo_site(workdir, settings={"verify_timeout": 0.0})
    results: dict[str, dict[str, float]] = {}
    try:
        config = Path(site.config_path)
        config.write_text(config.read_text() + f'\n[DEMO.sources.mim]\ntype = "mim"\n'
                                               f'aet = "{site.rv.aet}"\nip = "127.0.0.1"\n'
                                               f"port = {site.rv.dicom_port}\n")
        series = {}
        for label, slices in (("small", args.small), ("large", args.large)):
            study = Study(Patient(f"RELAY{slices}", f"Bench^Relay{slices}"),
                          study_date="20261101")
            ct = make_image_series(study, f"ct{slices}", slices=slices, rows=args.size,
                                   columns=args.size)
            for i in range(0, slices, 100):
                site.rv.upload([to_bytes(ds) for ds in ct.instances[i:i + 100]])
            series[label] = (ct.series_uid, slices)
        for label, (uid, slices) in series.items():
            for mode in ("baseline", "ours"):
                clear_context(site)
                env = {**os.environ,
                       "RADONC_BACKUP_STATE_DIR": str(workdir / f"state-{label}-{mode}")}
                out = subprocess.run(
                    [sys.executable, "-m", "bench.bench_relay_memory", "--child", str(config),
                     uid, mode], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
                if out.returncode:
                    raise SystemExit(out.stderr)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                assert got["objects"] == got["expected"] == slices, got
                assert site.backup.instance_count() == slices
                results[f"{mode}-{label}"] = got
                print(f"{mode} {slices} slices: {got['peak_mb']:.0f} MB peak, "
                      f"{got['seconds']:.1f} s", flush=True)
    finally:
        site.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(Path(args.out), results, args)
    print(Path(args.out).read_text().split(SECTION, 1)[1])
    return 0


def write_report(path: Path, r: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    mb = args.size * args.size * 2 / 1e6
    ratio = r["ours-large"]["peak_mb"] / r["ours-small"]["peak_mb"]
    rows = []
    for mode, what in (("baseline", "baseline: C-GET kept in memory, then C-STORE"),
                       ("ours", "ours: `deliver`, C-GET spooled to disk, C-STORE from the "
                                "spool, presence check, ledger")):
        for label, slices in (("small", args.small), ("large", args.large)):
            x = r[f"{mode}-{label}"]
            rows.append(f"| {what} | {slices} ({slices * mb:.0f} MB of pixels) | "
                        f"{x['peak_mb']:.0f} | {x['seconds']:.1f} | "
                        f"{slices / x['seconds']:.0f} |")
    lines = [
        SECTION,
        "",
        f"Measured by `python -m bench.bench_relay_memory` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d} ({platform.machine()}, {os.cpu_count()} "
        f"cores): CT series of {args.small} and {args.large} slices ({args.size}x{args.size}, "
        "16-bit) fetched by C-GET from the R&V stand-in (Orthanc) and relayed to the backup "
        "Orthanc, each run in a process of its own (peak RSS is that process's VmHWM).",
        "",
        "| path | series | peak RSS MB | s | images/s |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Goal (issue: plan-context backfill at clinic scale): the relay's peak RSS for the "
        f"{args.large}-slice series within 10% of the {args.small}-slice one. This run: "
        f"{ratio:.2f}x ({'met' if ratio <= 1.10 else 'not met'}).",
        "",
        "Each object is written to a spool folder under the state directory as it arrives, "
        "as the peer encoded it (never decoded), and C-STOREd from there, read when sent and "
        "deleted once sent; the store of one identifier's objects overlaps the C-GET of the "
        "next. The spool needs free disk for the largest identifier asked at once (a series, "
        "or a batch of `batch_size` UIDs).",
        "",
    ]
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    sys.exit(main())
