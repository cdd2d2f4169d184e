"""Run a private Orthanc process on loopback, for the demo, the tests and the benchmarks.

Each instance gets its own temporary directory, config and free ports, and is stopped by PID.
Orthanc and the dcmtk tools read ``TCP_NODELAY=1`` from the environment; without it every object
on loopback waits on a delayed ACK (see docs/performance.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def free_port() -> int:
    """A loopback port free now, drawn at random below Linux's ephemeral range (32768 and up).

    Ports the kernel hands out (``bind(0)``) are the ones it also gives outgoing connections,
    and to the next process asking: between our choice and the server binding it, another test
    process or a client socket could take it. Drawn at random from 20000-32767 they rarely meet;
    the suite's test processes (pytest-xdist) each draw from a slice of their own.
    """
    lo, hi = 20000, 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3": a test process of the suite
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        # Each test process draws from a range of its own: two never pick the same port.
        size = (hi - lo) // count
        lo = lo + int(worker[2:]) % count * size
        hi = lo + size
    for _ in range(200):
        port = random.randrange(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32767")


@dataclass
class OrthancServer:
    """One Orthanc process: ``start()``, use ``rest`` / ``dicom_port``, ``stop()``."""

    aet: str
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    username: str = "radonc"
    password: str = "demo-password"
    lua_scripts: list[str] = field(default_factory=list)
    limit_find_instances: int = 0
    dicom_threads: int = 4  # associations served at once (Orthanc's DicomThreadsCount)
    workdir: Path | None = None
    dicom_port: int = 0
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"orthanc-{self.aet.lower()}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, object]:
        assert self.workdir is not None
        lua_files = []
        for i, script in enumerate(self.lua_scripts):
            path = self.workdir / f"script{i}.lua"
            path.write_text(script)
            lua_files.append(str(path))
        return {
            "Name": self.aet,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowMove": False,
            "DicomAlwaysAllowGet": False,
            "DicomModalities": {name: list(peer) for name, peer in self.modalities.items()},
            "LimitFindInstances": self.limit_find_instances,
            "LimitFindResults": self.limit_find_instances,
            "MaximumPduLength": 131072,
            "DicomThreadsCount": self.dicom_threads,
            "LuaScripts": lua_files,
            "Plugins": [],
            "StableAge": 1,
            "HttpVerbose": False,
            "StorageCompression": False,
            # Every read of a stored file from the disk: with Orthanc's storage cache (128 MB by
            # default) verify-md5 answered 200 for a file damaged on disk until a restart. The
            # configuration docs/operations.md asks of a site's backup Orthanc.
            "MaximumStorageCacheSize": 0,
            "SaveJobs": False,
        }

    def start(self, timeout: float = 20.0) -> "OrthancServer":
        assert self.workdir is not None
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        logdir = self.workdir / "logs"
        logdir.mkdir(exist_ok=True)
        env = dict(os.environ, TCP_NODELAY="1")
        self.process = subprocess.Popen(
            [ORTHANC_BINARY, f"--logdir={logdir}", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc {self.aet} exited with {self.process.returncode}; logs in {logdir}"
                )
            try:
                r = httpx.get(f"{self.url}/system", auth=self.auth, timeout=1.0)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc {self.aet} did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        """SIGTERM and wait, so the storage directory can be reused by a restart."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """Stop at once (for teardown, when the storage is thrown away anyway)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def remove(self) -> None:
        self.kill()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def rest(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=self.auth, timeout=30.0)

    def upload(self, files_or_bytes: list[Path] | list[bytes]) -> int:
        """Load objects over REST (the fast way to seed a stand-in); returns how many were stored."""
        stored = 0
        with self.rest() as client:
            for item in files_or_bytes:
                body = item.read_bytes() if isinstance(item, Path) else item
                r = client.post("/instances", content=body)
                r.raise_for_status()
                stored += 1
        return stored

    def instance_count(self) -> int:
        with self.rest() as client:
            return int(client.get("/statistics").json()["CountInstances"])

    def sop_instance_uids(self) -> set[str]:
        with self.rest() as client:
            r = client.post(
                "/tools/find",
                json={"Level": "Instance", "Query": {}, "Expand": True},
            )
            r.raise_for_status()
            return {i["MainDicomTags"]["SOPInstanceUID"] for i in r.json()}

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()
