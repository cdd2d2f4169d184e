"""DCMTK's `dcmqrscp` (Debian package dcmtk) as an R&V stand-in: a real Q/R archive that is not
Orthanc. Its index knows a few keys per level only: at IMAGE level it matches and returns
neither SOPClassUID, Modality nor TreatmentDate. Started on a free loopback port, stopped by PID.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pydicom.dataset import Dataset

from demo.orthanc import free_port
from demo.synthetic import to_bytes


class Dcmqrscp:
    def __init__(self, workdir: Path, aet: str, destinations: dict[str, tuple[str, int]]) -> None:
        self.aet, self.workdir = aet, workdir
        self.port = free_port()
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        hosts = "\n".join(f"dest{i} = ({name}, {host}, {port})"
                          for i, (name, (host, port)) in enumerate(destinations.items()))
        self.config = workdir / "dcmqrscp.cfg"
        self.config.write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\nVendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{aet} {self.storage} RW (200, 1024mb) ANY\nAETable END\n")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "Dcmqrscp":
        self.process = subprocess.Popen(["dcmqrscp", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["echoscu", "-aec", self.aet, "127.0.0.1", str(self.port)],
                              capture_output=True).returncode == 0:
                return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("dcmqrscp did not start")

    def store(self, datasets: list[Dataset]) -> None:
        """Load objects the way a modality would: storescu, files in their own syntax."""
        folder = self.workdir / "incoming"
        folder.mkdir(exist_ok=True)
        paths = []
        for i, ds in enumerate(datasets):
            path = folder / f"{i}.dcm"
            path.write_bytes(to_bytes(ds))
            paths.append(str(path))
        subprocess.run(["storescu", "-aec", self.aet, "127.0.0.1", str(self.port), *paths],
                       check=True, capture_output=True)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
