"""Benchmark: what finding the RT Records costs on a strict hierarchical-only peer, against the
relational query measured in the same run.

    .venv/bin/python -m bench.bench_hierarchical_find [--patients 200] [--fractions 5]

Writes its section of docs/performance.md. The peer is the in-process Q/R SCP the tests use
(``tests/qr_scp.StrictQRSCP``), once relational, once hierarchical-only (a query below STUDY
level must name its study, and its series at IMAGE level), holding ``patients`` courses on
treatment, each with ``fractions`` daily records in one record series. The finder is the one
the flows use (``radonc_backup.record_finder``), asked as ``tasks/backup.find_rt_records`` asks:

- the 10-minute run: the window since the last run (the last 10 minutes of today); the
  hierarchical walk visits the studies the ledger knows (every patient on treatment) and the
  studies of the last ``new_study_days``;
- the nightly: yesterday as one whole day, then the per-patient pass over every patient with a
  record in the last ``patient_pass_days`` (the net under the date queries).

Counted: C-FIND requests the peer received, per run and per patient on treatment; wall time.
The goal (issue "Find every record whatever the peer does"): at most 2 C-FINDs per patient on
treatment per run.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Callable

import bench.env  # noqa: F401  (first: the environment every benchmark runs in)
from bench.report_file import replace_section
from demo.synthetic import Patient, make_course
from radonc_backup.config import PROJECT_ROOT
from radonc_backup.dicom_net import DicomClient, Peer, Timeouts
from radonc_backup.record_finder import CapMemory, Finding, RecordFinder
from radonc_backup.windows import DayQuery, DAY_END
from tests.qr_scp import StrictQRSCP

TODAY = date(2026, 11, 20)
NEW_STUDY_DAYS = 60  # the settings' defaults
HEADING = "## Finding RT Records on a strict hierarchical-only peer"


def clinic(patients: int, fractions: int) -> tuple[list, list[tuple[str, str]]]:
    """Every patient on treatment: ``fractions`` daily records up to today, 08:00 onwards."""
    objects, studies = [], []
    for n in range(patients):
        first = datetime.combine(TODAY - timedelta(days=fractions - 1), datetime.min.time()) \
            + timedelta(hours=8, minutes=2 * (n % 240))
        c = make_course(Patient(f"HB{n:04d}", f"Bench^{n}"), first, delivered=fractions,
                        slices=1)
        objects += c.records
        studies.append((f"HB{n:04d}", c.study.uid))
    return objects, studies


def runs(server: StrictQRSCP, studies: list[tuple[str, str]], hierarchical: bool,
         ) -> dict[str, tuple[int, float, int]]:
    """C-FINDs, seconds and records found of the 10-minute run and of the nightly."""
    client = DicomClient("BENCH", "RADONC_BACKUP", Peer(server.aet, "127.0.0.1", server.port),
                         Timeouts(10, 60, 30, 5))
    memory = CapMemory()  # shared, as the ledger keeps it from run to run

    def timed(search: Callable[[RecordFinder], Finding]) -> tuple[int, float, int]:
        before = len(server.finds)
        started = time.perf_counter()
        found = search(RecordFinder(client, hierarchical, memory, TODAY))
        return (len(server.finds) - before, time.perf_counter() - started,
                len({r.sop_instance_uid for r in found.refs}))

    since = TODAY - timedelta(days=NEW_STUDY_DAYS)
    now = datetime.combine(TODAY, datetime.min.time()) + timedelta(hours=16)
    window = [DayQuery(TODAY, (now - timedelta(minutes=10)).time(), now.time())]
    yesterday = [DayQuery(TODAY - timedelta(days=1))]
    patients = [p for p, _ in studies]
    timed(lambda f: f.in_windows(window, studies, since))  # warm: the answers' largest counts
    incremental = timed(lambda f: f.in_windows(window, studies, since))

    def nightly(f: RecordFinder) -> Finding:
        dated = f.in_windows(yesterday, studies, since)
        dated.refs += f.of_patients(patients).refs
        return dated

    nightly_run = timed(nightly)
    return {"10-minute run": incremental, "nightly": nightly_run,
            "10-minute run, after the nightly": timed(
                lambda f: f.in_windows(window, studies, since))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--fractions", type=int, default=5)
    args = parser.parse_args()
    objects, studies = clinic(args.patients, args.fractions)
    results: dict[str, dict[str, tuple[int, float, int]]] = {}
    for name, hierarchical in (("relational (baseline)", False),
                               ("strict hierarchical", True)):
        with StrictQRSCP("BENCH_RV", objects, {}, hierarchical_only=hierarchical) as server:
            results[name] = runs(server, studies, hierarchical)
            assert server.refused_finds == 0, f"{name}: the peer refused a query"
    n = args.patients
    lines = [HEADING, "",
             f"{n} patients on treatment, {args.fractions} daily records each "
             f"({len(objects)} RT Records), one record series per course; the in-process Q/R "
             f"SCP on loopback; {platform.machine()}, {platform.python_version()}, measured "
             f"{date.today()} by `python -m bench.bench_hierarchical_find`.", "",
             "| peer | run | C-FINDs | per patient | wall time | ratio to relational | "
             "records found |", "|---|---|---|---|---|---|---|"]
    # Each run asks with what the earlier ones showed (the ledger keeps it): the first
    # 10-minute run follows a warm-up run, as every run but a site's first does.
    for name, by_run in results.items():
        for run, (finds, seconds, found) in by_run.items():
            base = results["relational (baseline)"][run][1]
            lines.append(f"| {name} | {run} | {finds} | {finds / n:.2f} | {seconds:.2f} s | "
                         f"{seconds / base:.1f}x | {found} |")
    h_inc = results["strict hierarchical"]["10-minute run, after the nightly"][0] / n
    h_night = results["strict hierarchical"]["nightly"][0] / n
    lines += ["", f"Goal: at most 2 C-FINDs per patient on treatment per run. The 10-minute run "
              f"sends {h_inc:.2f} a patient, the nightly {h_night:.2f}: "
              + ("met." if max(h_inc, h_night) <= 2 else
                 "not met. The walk itself costs 2 a patient (a SERIES query for the study's "
                 "record series, an IMAGE query for its records) plus the STUDY queries; the "
                 "rest are checks: every record series here holds as many records as the "
                 "largest answer the peer ever gave, so each answer is doubted as possibly cut "
                 "by a silent cap and asked again in parts until the run's budget of "
                 f"{RecordFinder.CHECKS} checking C-FINDs is spent (the answers left unchecked "
                 "are then named unproven in the summary). The nightly's per-patient pass adds "
                 "a STUDY query and the same walk per patient. Fewer C-FINDs would mean "
                 "skipping studies the ledger knows, or trusting answers as large as the "
                 "largest ever without a check: the goal and completeness conflict, and "
                 "completeness wins. A decision is wanted on how often an answer that only "
                 "equals the largest count needs a check (e.g. once a day per peer and level)."),
              "", "The relational rows are the baseline: one query a window (split only when "
              "cut), and one a patient in the nightly's per-patient pass."]
    replace_section(PROJECT_ROOT / "docs" / "performance.md", HEADING, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
