"""Real Prefect processes for tests: `prefect server start`, process workers, the register step.

Shared by the server tests (fixtures in conftest.py). Nothing here is the in-process harness: the
server, the workers and every `prefect` command are separate processes, as a clinic runs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from demo.orthanc import free_port
from demo.site import DemoSite
from demo.synthetic import Course, Patient, make_course, to_bytes

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


class Server:
    """``prefect server start`` on ``database_url`` (PostgreSQL, as production runs it; None:
    SQLite under ``home``)."""

    def __init__(self, home: Path, scheduler: bool = False,
                 database_url: str | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        db = {"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}
        self.env = {**os.environ, **db, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
                    "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": str(scheduler).lower(),
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
                    "RADONC_BACKUP_HOME": str(ROOT)}
        self.env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
        self.log = (home / "server.log").open("w")
        # Only the server knows its database: workers and commands talk to its API.
        self.proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=self.env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
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

    def keep_env(self) -> None:
        """What ``reset`` restores (a test may change ``env`` for its own commands)."""
        self._env = dict(self.env)

    def reset(self, timeout: float = 120) -> None:
        """Between tests that share this server: the environment as kept, no flow run left,
        and every concurrency slot free (a test that left one held fails the next here, by
        name, rather than later for a reason it cannot see)."""
        self.env = dict(getattr(self, "_env", self.env))
        for run in self.post("/flow_runs/filter", {"limit": 200}):
            self.http.delete(f"/flow_runs/{run['id']}").raise_for_status()
        deadline = time.monotonic() + timeout
        while held := {c["name"]: c["active_slots"] for c in
                       self.post("/v2/concurrency_limits/filter") if c["active_slots"]}:
            assert time.monotonic() < deadline, f"concurrency slots still held: {held}"
            time.sleep(1)

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

    def trigger(self, name: str) -> str:
        """``prefect deployment run NAME`` without waiting: the new run's ID."""
        out = self.prefect("deployment", "run", name)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        [run_id] = [line.split()[-1] for line in out.stdout.splitlines()
                    if line.strip().startswith("└── UUID:")]
        return run_id

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

    def story(self) -> str:
        """What a failing server test shows: every run with its state and message, the state
        events the server published, and the end of the server's log."""
        runs = self.post("/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
        lines = [f"run {r['id']} {r['name']}: {r['state']['type']} "
                 f"{(r['state'].get('message') or '')[:200]}" for r in runs]
        events = self.post("/events/filter", {"filter": {"event": {"prefix": ["prefect.flow-run."]}},
                                              "limit": 200})
        lines += [f"event {e['occurred']} {e['event']} {e['resource']['prefect.resource.id']}"
                  for e in events["events"] if not e["event"].endswith("heartbeat")]
        lines.append((self.home / "server.log").read_text()[-3000:])
        return "\n".join(lines)

    def wait_terminal(self, run_ids: list[str], timeout: float = 180) -> dict[str, dict[str, Any]]:
        return self.wait_states(run_ids, lambda types: set(types) <= TERMINAL, timeout)

    def wait_states(self, run_ids: list[str], done: Callable[[list[str | None]], bool],
                    timeout: float = 180) -> dict[str, dict[str, Any]]:
        """Poll the runs until ``done`` holds for their state types (in ``run_ids`` order)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = {r["id"]: r for r in self.post("/flow_runs/filter",
                                                 {"flow_runs": {"id": {"any_": run_ids}}})}
            if done([runs.get(i, {}).get("state", {}).get("type") for i in run_ids]):
                return runs
            assert time.monotonic() < deadline, {i: r["state"]["type"] for i, r in runs.items()}
            time.sleep(0.5)


class Workers:
    """Process workers on the radonc-backup pool, each taking one run at a time."""

    def __init__(self, server: Server, site: DemoSite, names: list[str], logdir: Path,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.logs = {name: logdir / f"worker-{name}.log" for name in names}
        # What a service unit sets: the site file, and the backup's password as a secret.
        env = {**server.env, "RADONC_BACKUP_CONFIG": str(site.config_path),
               "RADONC_DEMO_BACKUP_PASSWORD": site.backup.password}
        self.procs = [subprocess.Popen([sys.executable, "-m", "deployments.worker",
                                        "--pool", "radonc-backup",
                                        "--name", name, "--limit", "1", *extra_args],
                                       env=env, cwd=ROOT,
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


def todays_course(patient_id: str) -> Course:
    now = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)  # the DEMO clock
    course = make_course(Patient(patient_id, "Server^Test"), now - timedelta(days=1),
                         delivered=0, slices=2)
    course.add_record(now - timedelta(hours=3))
    course.add_record(now - timedelta(hours=1))
    return course


def register(server: Server, site: DemoSite, objects: list[Any]) -> str:
    """Load the R&V stand-in, then run the register step against the server."""
    site.rv.upload([to_bytes(ds) for ds in objects])
    return register_config(server, site.config_path)


def register_config(server: Server, config: Path | str, *sites: str) -> str:
    """``python -m deployments.register --config CONFIG [--site S ...]`` against the server: what
    it prints. The deployments do not depend on the config's addresses (a worker's environment
    names the config), so one registration serves every site of a test module."""
    done = server.prefect("--version")  # warm the interpreter's import cache before timing out
    assert done.returncode == 0
    chosen = [arg for name in sites for arg in ("--site", name)]
    result = subprocess.run([sys.executable, "-m", "deployments.register", "--config",
                             str(config), *chosen], env=server.env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "work pool radonc-backup: created" in result.stdout
    assert "global concurrency limit dicom-RV_DEMO: 4 association(s)" in result.stdout
    return result.stdout


def uids(course: Course) -> set[str]:
    return {str(r.SOPInstanceUID) for r in course.records}


