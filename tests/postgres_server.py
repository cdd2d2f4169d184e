"""A real PostgreSQL server: Debian's binaries, a fresh cluster in a temporary folder, password
(SCRAM) logins, on 127.0.0.1 and a free port, stopped by PID.

For the Mosaiq tests it gives what SQLite cannot: a login that is refused and a server that is
down, then up again; and a second SQL dialect for the Mosaiq query. For the deployment tests, the
Prefect server's database, as production runs it (one cluster per test session, a database per
server).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from demo.orthanc import free_port

USER, PASSWORD, DATABASE = "mosaiq_reader", "s3cret-Pw", "mosaiq"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (bootstrap.sh installs "
                           "the Debian package postgresql)")
    return found[-1]


class PostgresServer:
    def __init__(self, folder: Path, user: str = USER, password: str = PASSWORD,
                 database: str = DATABASE) -> None:
        self.user, self.password = user, password
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pw").write_text(password + "\n")
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self._owner:  # PostgreSQL refuses to run as root
            for path in (folder, folder / "pw"):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        self._run([_bin("initdb"), "-D", str(self.data), "-U", user, "-E", "UTF8",
                   "--locale=C.UTF-8", "--auth=scram-sha-256", f"--pwfile={folder / 'pw'}"])
        self.start()
        self._run([_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", user,
                   database], env={"PGPASSWORD": password})

    def admin_url(self) -> str:
        """The administrator's libpq URL (its password: ``PGPASSWORD``)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _user(self) -> dict[str, int]:
        return {"user": self._owner.pw_uid, "group": self._owner.pw_gid,
                "extra_groups": []} if self._owner else {}

    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = subprocess.run(argv, capture_output=True, text=True, cwd=self.folder,
                             env={**os.environ, **(env or {})}, **self._user())
        if out.returncode:
            raise RuntimeError(f"{argv[0]} failed: {out.stderr.strip()}")

    def odbc(self, database: str = DATABASE, user: str = USER) -> str:
        return (f"Driver={{PostgreSQL Unicode}};Server=127.0.0.1;Port={self.port};"
                f"Database={database};UID={user}")

    def start(self) -> None:
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [_bin("postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.folder), "-c", "listen_addresses=127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, **self._user())
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.folder / 'server.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if subprocess.run([_bin("pg_isready"), "-h", "127.0.0.1", "-p",
                                   str(self.port)], capture_output=True).returncode == 0:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("postgres did not start in 30 s")

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT: open sessions are ended), then wait."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
