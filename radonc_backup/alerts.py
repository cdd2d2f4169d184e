"""Failure e-mail without the storm: one message per new problem, one when it clears.

A record the backup keeps refusing fails every 10-minute run; mailing each of them trains people
to ignore the mail. The book remembers, per site, flow and deployment, the last problem mailed.
The same problem again (same state, same message: the same UIDs failing) is not mailed again; a
different one is; the first run that completes after a mailed problem sends one "cleared" mail.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class OpenAlert:
    signature: str
    run_name: str
    run_id: str
    state: str


def signature(state: str, message: str) -> str:
    return hashlib.sha256(f"{state}\n{message}".encode()).hexdigest()


class AlertBook:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _save(self, data: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".alerts-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, self.path)

    def is_new(self, key: str, alert: OpenAlert) -> bool:
        """Record ``alert`` as the open problem of ``key``; False when it was already mailed."""
        data = self._load()
        if data.get(key, {}).get("signature") == alert.signature:
            return False
        data[key] = asdict(alert)
        self._save(data)
        return True

    def clear(self, key: str) -> OpenAlert | None:
        """Close the open problem of ``key``; returns it, or None when there was none."""
        data = self._load()
        found = data.pop(key, None)
        if found is None:
            return None
        self._save(data)
        return OpenAlert(**found)
