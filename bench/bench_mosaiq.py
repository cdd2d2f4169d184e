"""Benchmark: Mosaiq's delivered fields to verified RT Records in the backup.

    .venv/bin/python -m bench.bench_mosaiq [--patients 500] [--sessions 20]

A Mosaiq-shaped database (unixODBC + Debian's SQLite3 ODBC driver) holds ``patients`` x
``sessions`` delivered fields, one field a session, all in one window. Measured in the same run,
each from an empty backup Orthanc:
- baseline: the same SELECT through pyodbc, then C-STORE of prebuilt records (built before the
  clock starts) over one association: the least any path must do;
- ours: the ``nightly_backup`` flow over the window (SELECT, build, stage, ledger, C-STORE by
  the delivery path, presence check in the backup, summary).
Appends its section to docs/performance.md (replacing an older one).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import bench.env  # noqa: E402,F401  (first: the environment every benchmark runs in)
os.environ["TCP_NODELAY"] = "1"

from bench.report_file import replace_section  # noqa: E402
from demo.mosaiq_db import SCHEMA  # noqa: E402
from demo.site import DemoSite, start_demo_site  # noqa: E402
from radonc_backup.config import PROJECT_ROOT, load_site  # noqa: E402
from radonc_backup.mosaiq import SESSIONS_QUERY, connect, read_fields, session_record, \
    sessions  # noqa: E402
from tasks.limits import ensure_rv_limits  # noqa: E402

NY = ZoneInfo("America/New_York")
DAY = datetime(2026, 11, 20)
SECTION = "## Mosaiq source"


def database(path: Path, patients: int, per_patient: int) -> None:
    """Sessions spread over the ``per_patient`` days ending DAY, one field each."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.executemany("INSERT INTO Patient VALUES (?, ?, ?)",
                   [(p, f"Bench{p}", "Patient") for p in range(patients)])
    db.executemany("INSERT INTO Ident VALUES (?, ?)", [(p, f"BM{p:05d}") for p in range(patients)])
    db.executemany("INSERT INTO Site VALUES (?, ?, ?, ?, ?, ?, ?)",
                   [(p, p, p, "Pelvis", 5000.0, 25, 0) for p in range(patients)])
    db.executemany("INSERT INTO TxField VALUES (?, ?, ?, ?, ?)",
                   [(p, p, "Arc", "X", 0) for p in range(patients)])
    rows = []
    for p in range(patients):
        for n in range(per_patient):
            when = DAY - timedelta(days=per_patient - 1 - n) + timedelta(hours=7,
                                                                           seconds=p * 7)
            rows.append((p, p, p, f"{when:%Y-%m-%d %H:%M:%S}", n + 1, 250.0))
    db.executemany("INSERT INTO Dose_Hst (Pat_ID1, FLD_ID, SIT_ID, Tx_DtTm, Fractions_Tx, "
                   "Meterset) VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def clear_backup(site: DemoSite) -> None:
    with site.backup.rest() as client:
        for patient in client.get("/patients").json():
            client.delete(f"/patients/{patient}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_mosaiq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "performance.md"))
    args = parser.parse_args(argv)
    n = args.patients * args.sessions
    workdir = Path(tempfile.mkdtemp(prefix="bench-mosaiq-"))
    site = start_demo_site(workdir / "site")
    try:
        db = workdir / "mosaiq.db"
        database(db, args.patients, args.sessions)
        cfg_path = Path(site.config_path)
        cfg_path.write_text(cfg_path.read_text() + '\n[DEMO.sources.mosaiq]\ntype = "mosaiq"\n'
                            f'odbc = "Driver={{SQLite3}};Database={db}"\n')
        cfg = load_site("DEMO", str(cfg_path))
        ensure_rv_limits(cfg)
        source = cfg.sources["mosaiq"]
        start = DAY - timedelta(days=args.sessions)
        end = DAY + timedelta(hours=23, minutes=59, seconds=59)
        conn = connect(cfg, "mosaiq", source)  # type: ignore[arg-type]
        prebuilt = [session_record(s, cfg, source)  # type: ignore[arg-type]
                    for s in sessions(read_fields(conn, cfg, "mosaiq", source,  # type: ignore
                                                  start, end))]
        conn.close()  # type: ignore[attr-defined]
        assert len(prebuilt) == n, len(prebuilt)

        def baseline() -> float:
            clear_backup(site)
            t = time.perf_counter()
            c = connect(cfg, "mosaiq", source)  # type: ignore[arg-type]
            rows = c.cursor().execute(SESSIONS_QUERY, start, end).fetchall()  # type: ignore
            c.close()  # type: ignore[attr-defined]
            assert len(rows) == n
            results = cfg.client(cfg.backup("orthanc")[1]).store(prebuilt)
            elapsed = time.perf_counter() - t
            assert all(r.ok for r in results) and site.backup.instance_count() == n
            return elapsed

        from flows.nightly_backup import nightly_backup

        def ours() -> float:
            clear_backup(site)
            state_dir = workdir / f"state-{time.monotonic_ns()}"
            os.environ["RADONC_BACKUP_STATE_DIR"] = str(state_dir)
            t = time.perf_counter()
            state = nightly_backup(site="DEMO", source="mosaiq", config=str(cfg_path),
                                   days=args.sessions + 1,
                                   now=(DAY + timedelta(days=1, hours=2)).replace(tzinfo=NY),
                                   return_state=True)
            elapsed = time.perf_counter() - t
            assert state.is_completed(), state.message
            assert site.backup.instance_count() == n
            return elapsed

        results = {"baseline: SELECT, then C-STORE of prebuilt records over one association":
                   min(baseline() for _ in range(2)),
                   "ours: nightly_backup flow (SELECT, build, stage, ledger, store, verify)":
                   min(ours() for _ in range(2))}
        write_report(Path(args.out), results, n, args.patients, args.sessions)
        for name, seconds in results.items():
            print(f"{name}: {seconds:.1f} s, {n / seconds:.0f} records/s")
    finally:
        site.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def write_report(path: Path, results: dict[str, float], n: int, patients: int,
                 per_patient: int) -> None:
    base = min(s for name, s in results.items() if name.startswith("baseline"))
    lines = [
        SECTION, "",
        f"Measured by `python -m bench.bench_mosaiq` on {datetime.now(timezone.utc):%Y-%m-%d} "
        f"({platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}): "
        f"{n} delivered fields ({patients} patients x {per_patient} sessions, one field each) in "
        "a Mosaiq-shaped SQLite database read through unixODBC, to the demo backup Orthanc. "
        "Best of 2, each from an empty backup.", "",
        "| path | s | records/s | vs baseline |", "|---|---|---|---|"]
    for name, seconds in results.items():
        lines.append(f"| {name} | {seconds:.1f} | {n / seconds:.0f} | {base / seconds:.2f}x |")
    ours = min(s for name, s in results.items() if name.startswith("ours"))
    lines += ["", f"This run: {base / ours:.2f}x of the baseline "
                  f"({'met' if base / ours >= 0.5 else 'not met'}). Goal (issue: Mosaiq source): "
                  "at least 0.5x the rate of the bare SELECT and C-STORE of prebuilt objects.",
              ""]
    replace_section(path, SECTION, lines)


if __name__ == "__main__":
    sys.exit(main())
