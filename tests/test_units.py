"""The documented systemd units, run as systemd would run them: their environment, their
ExecStart, and the signal systemd sends them (their KillSignal, SIGTERM unless set). A server
whose UI can reach its API from another machine, a worker that runs a triggered deployment, and
both stopping within 10 s of that signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from demo.orthanc import free_port
from demo.site import DemoSite
from demo.synthetic import to_bytes
from tests.conftest import PrefectDatabases
from tests.prefect_procs import todays_course, uids

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deployments" / "systemd"
pytestmark = pytest.mark.slow  # real Prefect servers and workers


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Unit:
    """The [Service] of a unit file with the install paths replaced by this test's."""

    def __init__(self, name: str, replace: dict[str, str]) -> None:
        text = (UNITS / name).read_text()
        for old, new in replace.items():
            text = text.replace(old, new)
        self.env: dict[str, str] = {}
        self.env_files: list[Path] = []
        self.kill = signal.SIGTERM  # systemd's default
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key == "Environment":
                name_, _, val = value.partition("=")
                self.env[name_] = val
            elif key == "ExecStart":
                self.argv = value.split()
            elif key == "KillSignal":
                self.kill = signal.Signals[value]
            elif key == "WorkingDirectory":
                self.cwd = value
            elif key == "EnvironmentFile":
                self.env_files.append(Path(value.removeprefix("-")))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Path, extra_env: dict[str, str]) -> None:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        keep.update(line.split("=", 1) for path in self.env_files if path.exists()
                    for line in path.read_text().splitlines() if "=" in line)
        # Started with SIGINT ignored, as from nohup or a non-interactive shell's `&`: Prefect's
        # worker stops on SIGTERM by sending itself SIGINT, so that must still work.
        self.proc = subprocess.Popen(self.argv, env={**keep, **self.env, **extra_env},
                                     cwd=getattr(self, "cwd", str(ROOT)), stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_ignore_sigint)

    def stop(self) -> float:
        """Send the unit's KillSignal as systemd does (to the main process); seconds to exit."""
        assert self.proc is not None
        began = time.monotonic()
        self.proc.send_signal(self.kill)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return time.monotonic() - began


def test_server_and_worker_units_run_a_deployment_and_stop_on_their_signal(
        make_site: Callable[..., DemoSite], tmp_path: Path,
        prefect_postgres: PrefectDatabases) -> None:
    site = make_site()
    course = todays_course("UNIT01")

    site.rv.upload([to_bytes(ds) for ds in course.all()])

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    replace = {"/opt/radonc-backup/.venv/bin": bin_dir, "/opt/radonc-backup": str(ROOT),
               "/var/lib/radonc-backup": str(tmp_path / "var"),
               "/etc/radonc-backup/sites.toml": str(site.config_path),
               "/etc/radonc-backup/prefect-server.env": str(tmp_path / "prefect-server.env"),
               "radonc-backup.example.org": "127.0.0.1", ":4200": f":{port}",
               "--port 4200": f"--port {port}", "%i": "w1", "--host 0.0.0.0": "--host 127.0.0.1"}
    server, worker = Unit("prefect-server.service", replace), Unit("radonc-worker@.service",
                                                                   replace)
    assert server.env["PREFECT_UI_API_URL"] == f"http://127.0.0.1:{port}/api"
    assert worker.env["RADONC_BACKUP_HOME"] == str(ROOT)
    api = f"http://127.0.0.1:{port}/api"
    Path(server.env["PREFECT_HOME"]).mkdir(parents=True)  # the radonc user's home, per the docs
    # The server's PostgreSQL database, made as docs/operations.md says (here on the session's
    # cluster rather than Debian's main one): the URL and its password in the unit's env file.
    cluster = prefect_postgres.cluster
    made = subprocess.run([sys.executable, "-m", "deployments.prefect_database", "--admin-url",
                           cluster.admin_url(), "--port", str(cluster.port), "--database",
                           "prefect_unit", "--user", "prefect_unit", "--env-file",
                           str(server.env_files[0])], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **prefect_postgres.admin_env}, timeout=60)
    assert made.returncode == 0, made.stderr
    assert server.env_files[0].stat().st_mode & 0o777 == 0o600
    assert "PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect_unit:" in \
        server.env_files[0].read_text()
    assert "prefect_unit:" not in made.stdout + made.stderr, "the password is never printed"
    server.start(tmp_path / "server.log", {})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.proc and server.proc.poll() is None, \
                (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.3)
        ui = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=10).json()
        assert ui["api_url"] == server.env["PREFECT_UI_API_URL"]
        assert not list(Path(server.env["PREFECT_HOME"]).glob("*.db")), "PostgreSQL, not SQLite"

        cli_env = {**os.environ, "PREFECT_API_URL": api}
        reg = subprocess.run([sys.executable, "-m", "deployments.register", "--config",
                              str(site.config_path)], env=cli_env, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert reg.returncode == 0, reg.stdout[-2000:] + reg.stderr[-2000:]
        # EnvironmentFile=/etc/radonc-backup/env holds the secrets named by the sites file.
        worker.start(tmp_path / "worker.log",
                     {"RADONC_DEMO_BACKUP_PASSWORD": site.backup.password})
        try:
            run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run",
                                  "incremental-backup/demo-incremental", "--watch"],
                                 env=cli_env, cwd=ROOT, capture_output=True, text=True,
                                 timeout=300)
        finally:
            worker_stop = worker.stop()
        assert run.returncode == 0, run.stdout[-3000:] + (tmp_path / "worker.log").read_text()
        assert site.backup.sop_instance_uids() >= uids(course)
        assert worker_stop < 10, f"worker took {worker_stop:.1f} s to stop"
    finally:
        server_stop = server.stop()
    assert server_stop < 10, f"server took {server_stop:.1f} s to stop"
