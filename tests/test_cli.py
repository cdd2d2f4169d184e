"""Flows run from the shell with their parameters, and the exit code tells the outcome."""

from __future__ import annotations

import csv
import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from demo.orthanc import free_port
from demo.site import DemoSite
from demo.synthetic import Patient, make_course, to_bytes
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


SHELL_FLOWS = ["incremental_backup", "nightly_backup", "plan_context_backfill",
               "treatment_report", "validation_sweep", "downtime_pack", "restore", "export",
               "dr_drill", "mosaiq_summary", "inventory_sweep", "fixity_sweep"]


def run_main(module: str, *argv: str) -> int:
    """``python -m flows.<module> ARGV`` in this process: the module's own ``__main__`` block."""
    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        runpy.run_module(f"flows.{module}", run_name="__main__", alter_sys=False)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = saved
    return 0


def test_every_flow_has_help_and_an_unknown_site_is_a_bad_argument(
        capsys: pytest.CaptureFixture[str]) -> None:
    for module in SHELL_FLOWS:
        assert run_main(module, "--help") == 0, module
        said = capsys.readouterr().out
        assert "--site" in said and "--config" in said, module
        assert f"usage: python -m flows.{module} " in said, module
        required = {"export": ["--folder", "out"], "dr_drill": ["--target", "scratch"]}
        assert run_main(module, "--site", "NOSUCH", *required.get(module, [])) == 2, module
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("FAILED: ") and "'NOSUCH'" in err[0] \
            and "DEMO" in err[0], (module, err)
    assert run_main("crash_notice", "--help") == 0
    assert "--hours" in capsys.readouterr().out
    # A depth the sweep does not have is a bad argument (2), named with the ones it has.
    assert run_main("validation_sweep", "--site", "DEMO", "--depth", "readability") == 2
    assert "choose from 'presence', 'content'" in capsys.readouterr().err


@pytest.mark.slow
def test_a_temporary_prefect_that_does_not_come_up_is_one_line(tmp_path: Path) -> None:
    """Prefect's ephemeral server gets a start-up wait fit for a busy machine; when even that
    runs out, the shell says what to do in one line instead of a traceback."""
    result = cli("flows.treatment_report", "--site", "DEMO",
                 env={"PREFECT_HOME": str(tmp_path / "prefect"),
                      "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"})
    assert result.returncode == 1
    [line] = [x for x in result.stderr.splitlines() if "FAILED" in x]
    assert line.startswith("FAILED: site DEMO: the temporary local Prefect server did not answer "
                           "within 0 s"), result.stderr[-2000:]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in line
    assert "Traceback" not in result.stderr


def test_help_lists_the_flow_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("nightly_backup", "--help") == 0
    assert "--days" in capsys.readouterr().out
    assert run_main("treatment_report", "--help") == 0
    report_help = capsys.readouterr().out
    assert "--treatment-start-date" in report_help and "--out" in report_help
    assert run_main("mosaiq_summary", "--help") == 0
    assert "--mrn" in capsys.readouterr().out


@pytest.mark.usefixtures("prefect")
def test_a_missing_password_is_one_line_in_the_shell_and_in_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, \
        LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogHandler

    cfg = tmp_path / "sites.toml"
    cfg.write_text((ROOT / "config" / "environments.toml").read_text().replace(
        '"RADONC_DEMO_BACKUP_PASSWORD"', '"RADONC_TEST_NO_SUCH_PASSWORD"'))
    assert run_main("incremental_backup", "--site", "DEMO", "--config", str(cfg)) == 1
    said = "site DEMO: backup target orthanc (BACKUP_DEMO): environment variable " \
        "RADONC_TEST_NO_SUCH_PASSWORD is not set"
    assert capsys.readouterr().err.strip().splitlines() == [f"FAILED: {said}"]

    APILogHandler().flush()  # the run's log lines reach the server in batches
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["incremental-backup"])),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert run.state is not None and run.state.is_failed() and said in str(run.state.message)
    errors = [log.message for log in logs if log.level >= 40]
    assert len(errors) == 1 and said in errors[0], errors
    assert all("Traceback" not in log.message for log in logs)


@pytest.mark.slow
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
    assert "Completed (context incomplete): site DEMO: every RT Record found (2) verified in " \
        "backup orthanc (presence checked); plan-context backfill Failed" in partial.stderr
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    offline = site.workdir / "state" / "prefect-offline" / "prefect.db"
    assert "running treatment-report with a temporary local Prefect instead; this run's " \
        f"history is kept in {offline}, not in the server's" in result.stderr
    assert offline.stat().st_size > 0, "the history is where the line says"
    assert not (tmp_path / "prefect" / "prefect.db").exists(), "never the server's database"
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


@pytest.mark.slow
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


def test_a_frozen_prefect_server_ends_the_run_with_one_line(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """A server that answers its health check and then nothing (SIGSTOPped, its database
    hung): every API call gives up after PREFECT_API_REQUEST_TIMEOUT and the retries, the run
    stops with one line naming the server, exits 1, and nothing is marked done."""
    import http.server
    import threading

    release = threading.Event()

    class Frozen(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path.endswith("/health"):
                body = b"true"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            release.wait(60)

        do_POST = do_PATCH = do_PUT = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    site = make_site()
    c = make_course(Patient("CLI009", "Frozen^Server"), datetime.now() - timedelta(hours=3),
                    delivered=1, slices=2)
    site.rv.upload([to_bytes(ds) for ds in c.records])
    api = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Frozen)
    api.daemon_threads = True
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        result = cli("flows.incremental_backup", "--site", "DEMO", "--config",
                     str(site.config_path),
                     env={"PREFECT_API_URL": f"http://127.0.0.1:{api.server_port}/api",
                          "PREFECT_API_REQUEST_TIMEOUT": "1", "PREFECT_CLIENT_MAX_RETRIES": "1",
                          "PREFECT_HOME": str(tmp_path / "prefect")})
    finally:
        release.set()
        api.shutdown()
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = [x for x in result.stderr.splitlines() if x.startswith("FAILED")]
    assert f"Prefect server http://127.0.0.1:{api.server_port}/api did not answer" in line
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert site.backup.sop_instance_uids() == set()
