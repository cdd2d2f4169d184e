"""Operating it for real: `prefect server start`, the register step, process workers, CLI triggers.

Nothing here uses the in-process test harness: the server, the workers and every `prefect` command
are separate processes, as a clinic runs them. The server's scheduler is off so that only the runs
a test triggers happen; the schedules themselves are checked through the API.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from demo.orthanc import free_port
from demo.site import DemoSite
from demo.synthetic import Course, Patient, make_course, to_bytes
from radonc_backup.ledger import Lane, Ledger
from tests.test_backup_flows import refuse_patient_lua

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
LANE = Lane("DEMO", "aria", "orthanc")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


class Server:
    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
                    "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
                    "RADONC_BACKUP_HOME": str(ROOT)}
        self.env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
        self.log = (home / "server.log").open("w")
        self.proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=self.env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.http = httpx.Client(base_url=self.api, timeout=30)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, (home / "server.log").read_text()[-2000:]
            time.sleep(0.3)
        raise AssertionError("prefect server did not start within 90 s")

    def stop(self) -> None:
        self.http.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()

    def prefect(self, *args: str, extra: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PREFECT, *args], env={**self.env, **(extra or {})}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.post(path, json=body or {})
        r.raise_for_status()
        return r.json()

    def deployment_runs(self, name: str) -> list[dict[str, Any]]:
        flow_name, dep_name = name.split("/")
        dep = self.http.get(f"/deployments/name/{flow_name}/{dep_name}").json()
        runs = self.post("/flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": [dep["id"]]}},
            "sort": "EXPECTED_START_TIME_ASC"})
        return list(runs)

    def wait_terminal(self, run_ids: list[str], timeout: float = 180) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            runs = {r["id"]: r for r in self.post("/flow_runs/filter",
                                                 {"flow_runs": {"id": {"any_": run_ids}}})}
            if all(runs.get(i, {}).get("state", {}).get("type") in TERMINAL for i in run_ids):
                return runs
            assert time.monotonic() < deadline, {i: r["state"]["type"] for i, r in runs.items()}
            time.sleep(0.5)


class Workers:
    """Process workers on the radonc-backup pool, each taking one run at a time."""

    def __init__(self, server: Server, site: DemoSite, names: list[str], logdir: Path) -> None:
        self.logs = {name: logdir / f"worker-{name}.log" for name in names}
        # What a service unit sets: the site file, and the backup's password as a secret.
        env = {**server.env, "RADONC_BACKUP_CONFIG": str(site.config_path),
               "RADONC_DEMO_BACKUP_PASSWORD": site.backup.password}
        self.procs = [subprocess.Popen([*PREFECT, "worker", "start", "--pool", "radonc-backup",
                                        "--name", name, "--limit", "1"], env=env, cwd=ROOT,
                                       stdout=self.logs[name].open("w"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
                      for name in names]

    def submitted(self, name: str) -> str:
        return self.logs[name].read_text()

    def stop(self) -> None:
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    home = tmp_path / "prefect-server"
    home.mkdir()
    srv = Server(home)
    yield srv
    srv.stop()


def todays_course(patient_id: str) -> Course:
    now = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)  # the DEMO clock
    course = make_course(Patient(patient_id, "Server^Test"), now - timedelta(days=1),
                         delivered=0, slices=2)
    course.add_record(now - timedelta(hours=3))
    course.add_record(now - timedelta(hours=1))
    return course


def register(server: Server, site: DemoSite, objects: list[Any]) -> None:
    """Load the R&V stand-in, then run the register step against the server."""
    site.rv.upload([to_bytes(ds) for ds in objects])
    done = server.prefect("--version")  # warm the interpreter's import cache before timing out
    assert done.returncode == 0
    result = subprocess.run([sys.executable, "-m", "deployments.register", "--config",
                             str(site.config_path)], env=server.env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "work pool radonc-backup: created" in result.stdout
    assert "global concurrency limit dicom-RV_DEMO: 4 association(s)" in result.stdout


def uids(course: Course) -> set[str]:
    return {str(r.SOPInstanceUID) for r in course.records}


def test_deployment_run_from_the_cli_on_a_real_server_and_worker(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    course = todays_course("SRV001")
    register(server, site, course.all())

    deployments = server.post("/deployments/filter")
    assert len(deployments) == 5 and all(d["work_pool_name"] == "radonc-backup"
                                         for d in deployments)
    schedules = {d["entrypoint"].split(":")[1]: d["schedules"][0]["schedule"]
                 for d in server.post("/deployments/filter")}
    assert schedules["incremental_backup"]["interval"] == 600
    assert schedules["nightly_backup"]["cron"] == "0 2 * * *"
    assert schedules["nightly_backup"]["timezone"] == "America/New_York"
    limit = server.http.get("/v2/concurrency_limits/dicom-RV_DEMO").json()
    assert limit["limit"] == 4

    workers = Workers(server, site, ["w1"], tmp_path)
    try:
        run = server.prefect("deployment", "run", "incremental-backup/demo", "--watch")
    finally:
        workers.stop()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "Completed" in run.stdout

    [flow_run] = server.deployment_runs("incremental-backup/demo")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["parameters"] == {"site": "DEMO"}
    artifacts = server.post("/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    [report] = [a for a in artifacts if a["key"] == "incremental-backup-demo-aria"]
    assert "| 2 | 2 | 0 | 0 | 0 | 2 | 2 | 0 |" in report["data"]
    assert site.backup.sop_instance_uids() >= uids(course)
    assert str(course.plan.SOPInstanceUID) in site.backup.sop_instance_uids()  # backfill subflow
    assert "Worker 'w1' submitting flow run" in workers.submitted("w1")


def test_two_workers_share_runs_and_an_overlapping_trigger_is_cancelled(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    course = todays_course("SRV002")
    register(server, site, course.all())

    def trigger(name: str) -> str:
        out = server.prefect("deployment", "run", name)
        assert out.returncode == 0, out.stderr
        [uid] = [line.split()[-1] for line in out.stdout.splitlines()
                 if line.strip().startswith("└── UUID:")]
        return uid

    # Two triggers while the workers are down (a restart, a double click in the UI): when the
    # workers come up each takes one, so the two runs overlap for certain.
    triggered = [trigger("incremental-backup/demo"), trigger("incremental-backup/demo")]
    workers = Workers(server, site, ["w1", "w2"], tmp_path)
    try:
        triggered.append(trigger("treatment-report/demo"))
        runs = server.wait_terminal(triggered)
    finally:
        workers.stop()

    first, second, report = (runs[i]["state"]["type"] for i in triggered)
    assert (first, second) in {("COMPLETED", "CANCELLED"), ("CANCELLED", "COMPLETED")}
    assert report == "COMPLETED"
    assert all("submitting flow run" in workers.submitted(w) for w in ("w1", "w2")), \
        "both workers of the pool picked up runs"

    ledger = Ledger.for_state_dir(site.workdir / "state")
    rows = ledger.rows(LANE)
    assert {r.ref.sop_instance_uid for r in rows} == uids(course)
    assert {(r.state, r.attempts) for r in rows} == {("verified", 1)}


def test_retrying_a_failed_run_finishes_only_the_unfinished_work(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site(backup_lua=[refuse_patient_lua("SRV004")])
    ok, refused = todays_course("SRV003"), todays_course("SRV004")
    register(server, site, [*ok.records, *refused.records])

    workers = Workers(server, site, ["w1"], tmp_path)
    try:
        failed = server.prefect("deployment", "run", "incremental-backup/demo", "--watch")
        assert failed.returncode != 0
        [flow_run] = server.deployment_runs("incremental-backup/demo")
        assert flow_run["state"]["type"] == "FAILED"
        assert all(uid in flow_run["state"]["message"] for uid in uids(refused))

        site.backup.stop()
        site.backup.lua_scripts = []
        site.backup.start()
        retried = server.prefect("flow-run", "retry", flow_run["id"])
        assert retried.returncode == 0, retried.stdout[-2000:] + retried.stderr[-2000:]
        runs = server.wait_terminal([flow_run["id"]])
    finally:
        workers.stop()
    assert runs[flow_run["id"]]["state"]["type"] == "COMPLETED"
    assert site.backup.sop_instance_uids() == uids(ok) | uids(refused)
    rows = {r.ref.sop_instance_uid: r for r in Ledger.for_state_dir(site.workdir / "state")
            .rows(LANE)}
    assert {rows[u].attempts for u in uids(ok)} == {1}, "verified records were not moved again"
    assert {rows[u].state for u in rows} == {"verified"}
