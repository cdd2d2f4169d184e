"""Flows run from the shell with their parameters, and the exit code tells the outcome."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from demo.orthanc import free_port
from demo.site import DemoSite
from demo.synthetic import Patient, make_course, to_bytes
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_help_lists_the_flow_parameters() -> None:
    for module in ("flows.incremental_backup", "flows.nightly_backup"):
        result = cli(module, "--help")
        assert result.returncode == 0
        assert "--site" in result.stdout and "--config" in result.stdout
    assert "--days" in cli("flows.nightly_backup", "--help").stdout
    report_help = cli("flows.treatment_report", "--help").stdout
    assert "--treatment-start-date" in report_help and "--out" in report_help


def test_cli_run_backs_up_and_a_failed_run_exits_non_zero(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    now = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)  # the DEMO site's clock
    c = make_course(Patient("CLI001", "Cli^Test"), now - timedelta(days=1), delivered=0, slices=2)
    c.add_record(now - timedelta(days=1))
    c.add_record(now - timedelta(hours=2))
    site.rv.upload([to_bytes(r) for r in c.records])
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}

    # Only the records are on the R&V, not their plan: the records are safe, the plan context
    # is not. Not plain Completed (exit 0), not Failed (exit 1): its own state and exit 3.
    partial = cli("flows.incremental_backup", "--site", "DEMO", "--config",
                  str(site.config_path), env=env)
    assert partial.returncode == 3, partial.stderr[-2000:]
    assert '"verified": 2' in partial.stdout
    assert "Completed (context incomplete): site DEMO: every RT Record verified; plan-context " \
        "backfill Failed" in partial.stderr
    assert site.backup.sop_instance_uids() == {r.SOPInstanceUID for r in c.records}

    site.rv.upload([to_bytes(ds) for ds in c.all()])  # the plan context arrives on the R&V
    ok = cli("flows.nightly_backup", "--site", "DEMO", "--config", str(site.config_path),
             env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert site.backup.sop_instance_uids() == {ds.SOPInstanceUID for ds in c.all()}

    bad = Path(site.config_path)
    bad.write_text(bad.read_text().replace('script_ae = "RADONC_BACKUP"',
                                           'script_ae = "UNKNOWN_SCU"'))
    failed = cli("flows.nightly_backup", "--site", "DEMO", "--config", str(bad), env=env)
    assert failed.returncode == 1
    assert "FAILED: site DEMO" in failed.stderr and "UNKNOWN_SCU" in failed.stderr


def test_backfill_cli_on_demand_for_one_patient(make_site: Callable[..., DemoSite],
                                                tmp_path: Path) -> None:
    site = make_site()
    now = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)
    c = make_course(Patient("CLI002", "Cli^Context"), now - timedelta(hours=3), delivered=1,
                    slices=3)
    site.rv.upload([to_bytes(ds) for ds in c.all()])
    site.backup.upload([to_bytes(c.records[0])])
    csv_path = tmp_path / "mrns.csv"
    csv_path.write_text("MRN\nCLI002\n")
    result = cli("flows.plan_context_backfill", "--site", "DEMO", "--config",
                 str(site.config_path), "--mrn-csv", str(csv_path),
                 env={"PREFECT_HOME": str(tmp_path / "prefect")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"complete": 1' in result.stdout
    assert site.backup.sop_instance_uids() == {ds.SOPInstanceUID for ds in c.all()}

    # A department backfill from the shell: every record the backup holds, and the plan that
    # is complete already is not walked again.
    department = cli("flows.plan_context_backfill", "--site", "DEMO", "--config",
                     str(site.config_path), "--department",
                     env={"PREFECT_HOME": str(tmp_path / "prefect")})
    assert department.returncode == 0, department.stderr[-2000:]
    assert '"plans": 0' in department.stdout


def test_report_cli_writes_the_csv_even_with_the_prefect_server_down(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """On the day of a network-wide outage the Prefect server may be down with the R&V: the
    report still comes out, with a temporary local Prefect, and says so in one line."""
    site = make_site()
    now = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)
    c = make_course(Patient("CLI003", "Cli^Report"), now - timedelta(days=2), delivered=3,
                    fractions=5, slices=1)
    site.backup.upload([to_bytes(ds) for ds in [c.plan, *c.records]])
    out = tmp_path / "report.csv"
    down = f"http://127.0.0.1:{free_port()}/api"
    result = cli("flows.treatment_report", "--site", "DEMO", "--config", str(site.config_path),
                 "--out", str(out), env={"PREFECT_HOME": str(tmp_path / "prefect"),
                                         "PREFECT_API_URL": down})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Prefect server {down} is unreachable" in result.stderr
    assert "running treatment-report with a temporary local Prefect" in result.stderr
    assert "Traceback" not in result.stderr
    with out.open(encoding="utf-8-sig", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["PatientID"], row["PatientName"]) == ("CLI003", "Cli, Report")
    assert (row["CurrentFraction"], row["FractionsPlanned"], row["FractionsRemaining"],
            row["SessionsInWindow"], row["Status"]) == ("3", "5", "2", "3", "on treatment")
    assert out.with_suffix(".html").exists()

    backup = cli("flows.incremental_backup", "--site", "DEMO", "--config",
                 str(site.config_path), env={"PREFECT_API_URL": down})
    assert backup.returncode == 1
    assert backup.stderr.strip().splitlines() == [
        f"FAILED: site DEMO: Prefect server {down} is unreachable (ConnectError): start it "
        "(docs/operations.md), or unset PREFECT_API_URL to run with a temporary local Prefect"]


def test_recovery_from_the_shell_a_dry_run_and_an_export(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """The runbook's commands (docs/recovery.md) as typed: a restore dry run lists and sends
    nothing (exit 0) and an export writes the files (a failed restore: tests/test_recovery.py)."""
    site = make_site()
    c = make_course(Patient("CLI002", "Cli^Restore"), datetime(2026, 11, 18, 9), delivered=2,
                    slices=2)
    site.backup.upload([to_bytes(ds) for ds in c.all()])
    env = {"PREFECT_HOME": str(tmp_path / "prefect")}
    common = ["--site", "DEMO", "--config", str(site.config_path)]

    dry = cli("flows.restore", *common, "--ae", "REBUILT", "--host", "127.0.0.1", "--port",
              str(free_port()), "--patient-ids", "CLI002", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert f'"objects": {len(c.all())}' in dry.stdout

    out = tmp_path / "export"
    exported = cli("flows.export", *common, "--folder", str(out), "--patient-ids", "CLI002",
                   "--kinds", "record", env=env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert len(list(out.rglob("*.dcm"))) == len(c.records)
