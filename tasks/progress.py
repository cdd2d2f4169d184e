"""A Prefect progress artifact for long work, so the UI shows how far a run is and when it ends.

Only work past a threshold gets one (a 10-minute run of three records needs no progress bar).
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

RECORDS_FROM = 300  # records listed for a report
PLANS_FROM = 10  # plan contexts (each a CT series of hundreds of objects)
INSTANCES_FROM = 2000  # verified instances a validation sweep asks the backup about


class Progress:
    def __init__(self, what: str, total: int, threshold: int) -> None:
        self.what, self.total = what, total
        self.started = time.monotonic()
        self.id: UUID | None = None
        if total >= threshold:
            self.id = create_progress_artifact(0.0, description=f"{what}: 0 of {total}")

    def update(self, done: int, note: str = "") -> None:
        if self.id is None or not self.total:
            return
        elapsed = time.monotonic() - self.started
        eta = f", about {elapsed * (self.total - done) / done / 60:.0f} min left" \
            if 0 < done < self.total else ""
        update_progress_artifact(self.id, 100.0 * done / self.total,
                                 description=f"{self.what}: {done} of {self.total}{eta}"
                                             + (f"; {note}" if note else ""))
