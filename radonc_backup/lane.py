"""A lane: a site's source, one of its backup targets and the ledger rows of that pair.

Tasks receive a ``LaneRef`` (frozen, four plain values: it hashes, serialises and shows cleanly
in the Prefect UI) and open it here; domain code works on the ``OpenLane``.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from .backup_target import DicomScpBackup, OrthancBackup, open_backup
from .config import AriaSource, MimSource, MosaiqSource, Site, load_site
from .dicom_net import DicomClient
from .errors import BackupError, ConfigError
from .ledger import Lane, LaneLedger, Ledger


@dataclass(frozen=True)
class LaneRef:
    """Which lane, by name: the site, its source and backup aliases, the config file."""

    site: str
    source: str
    backup: str
    config: str | None = None

    def open(self) -> "OpenLane":
        return open_lane(self.site, self.source, self.backup, self.config)


@dataclass
class OpenLane:
    site: Site
    source: AriaSource | MimSource | MosaiqSource
    target: OrthancBackup | DicomScpBackup
    ledger: LaneLedger
    ref: LaneRef
    # Held by each association to the source while it is open (concurrent plan-context walks
    # share a run's associations); None: no bound beyond the R&V's slots.
    gate: threading.Semaphore | None = None

    @property
    def lane(self) -> Lane:
        return self.ledger.lane

    @property
    def source_alias(self) -> str:
        return self.ref.source

    @property
    def dicom(self) -> AriaSource | MimSource:
        """The source, which must be a DICOM one (a Mosaiq source has no plan context and
        no Q/R service: the flows that need one say so in one line)."""
        if isinstance(self.source, MosaiqSource):
            raise ConfigError(f"{self.site.config_path}: site {self.site.name}: source "
                              f"{self.ref.source!r} is a Mosaiq database: this needs an 'aria' "
                              "or 'mim' source")
        return self.source

    def client(self) -> DicomClient:
        """A client of the source (the R&V)."""
        return self.site.client(self.dicom, gate=self.gate)

    def backup_client(self) -> DicomClient:
        """A client of the backup's DICOM port, as our script AE (a MIM-type source's C-GET
        results and a Mosaiq source's records are C-STOREd through it)."""
        return self.site.client(self.site.backup(self.lane.backup)[1])


def open_lane(site: str, source: str | None = None, backup: str | None = None,
              config: str | None = None) -> OpenLane:
    cfg = load_site(site, config)
    source_alias, src = cfg.source(source)
    target = open_backup(cfg, backup)
    lane = Lane(cfg.name, source_alias, target.alias)
    ledger = Ledger.for_state_dir(cfg.state_dir).at(lane)
    return OpenLane(cfg, src, target, ledger, LaneRef(site, source_alias, target.alias, config))


class LaneBusy(BackupError):
    """Another run of the same lane held it for longer than this run would wait."""


@contextmanager
def lane_lock(lane: OpenLane, wait_seconds: float,
              on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """One run of a lane at a time, from the shell or a deployment, on this machine: a second
    waits (up to ``wait_seconds``) and then finds the first one's work in the ledger, so
    nothing is sent twice; past the wait it stops with one line, having sent nothing.

    An advisory lock (``flock``) on ``<state_dir>/locks/<lane>.lock``: the kernel releases it
    when its process dies, however it dies, so a killed run never leaves the lane locked.
    """
    folder = lane.site.state_dir / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{lane.lane.site}-{lane.lane.source}-{lane.lane.backup}.lock"
    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait_seconds
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise LaneBusy(
                        f"site {lane.site.name}: another run of {lane.lane.source} to "
                        f"{lane.lane.backup} is under way ({holder}) and did not end within "
                        f"{wait_seconds:.0f} s: this run sent nothing; run it again later"
                    ) from None
                if not told and on_wait is not None:
                    on_wait(f"site {lane.site.name}: waiting for the run of {lane.lane.source} "
                            f"to {lane.lane.backup} under way ({holder})")
                    told = True
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
