"""A Prefect progress artifact for long work, so the UI shows how far a run is and when it ends.

Only work past a threshold gets one (a 10-minute run of three records needs no progress bar).
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

RECORDS_FROM = 300  # records listed for a report
PLANS_FROM = 10  # plan contexts (each a CT series of hundreds of objects)
INSTANCES_FROM = 2000  # verified instances a validation sweep asks the backup about


WINDOWS_FROM = 7  # date windows a backup run asks the R&V (a nightly over a week or more)
PATIENTS_FROM = 50  # patients asked one by one, without a date
EXPORT_FROM = 500  # objects an export writes
LOG_EVERY = 60.0  # seconds between progress lines in the run's log


class Progress:
    """A progress artifact, and a line in the run's log at most once a minute, for work of at
    least ``threshold`` steps; ``update(done, note, total=...)`` takes a total that grew."""

    def __init__(self, what: str, total: int, threshold: int) -> None:
        self.what, self.total = what, total
        self.started = self.logged = time.monotonic()
        self.id: UUID | None = None
        if total >= threshold:
            self.id = create_progress_artifact(0.0, description=f"{what}: 0 of {total}")

    def update(self, done: int, note: str = "", total: int | None = None) -> None:
        self.total = total or self.total
        if self.id is None or not self.total:
            return
        now = time.monotonic()
        elapsed = now - self.started
        eta = f", about {elapsed * (self.total - done) / done / 60:.0f} min left" \
            if 0 < done < self.total else ""
        said = f"{self.what}: {done} of {self.total}{eta}" + (f"; {note}" if note else "")
        update_progress_artifact(self.id, 100.0 * done / self.total, description=said)
        if now - self.logged >= LOG_EVERY:
            self.logged = now
            get_run_logger().info("%s", said)
