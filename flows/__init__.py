"""Prefect flows, each runnable as ``python -m flows.<name>``.

Importing this package sets the Prefect defaults every run of ours needs before Prefect reads its
settings (it reads them once, on import): no analytics (hospitals want it off, and there is no
internet), a start-up wait for the temporary local server long enough for a loaded two-core
machine, and a bound on every API call (a frozen server ends a run instead of holding it). Prefect's own 20 s ran out there and the demo died with a raw traceback; a variable the
operator set is kept.
"""

from __future__ import annotations

import logging
import os

from radonc_backup.errors import BackupError

EPHEMERAL_STARTUP_SECONDS = 180

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                      str(EPHEMERAL_STARTUP_SECONDS))
# Every call to the Prefect API gives up: 20 s a request and 3 retries (Prefect's own 60 s and
# 5 held a run on a frozen server for over 6 minutes without a word).
os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", "20")
os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "3")


ONE_LINE_ERROR = "radonc_backup_error"
"""Set on a run's record of one of our errors: the shell prints that error itself, once."""


class _OneLineBackupErrors(logging.Filter):
    """Drops the traceback from Prefect's "Encountered exception" record when the exception is
    one of ours: a ``BackupError`` already names site, peer and object in its message, and a
    40-line traceback around a missing password hid that one line (in the shell, the run's log
    in the UI and the site's log file alike). Any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BackupError):
            record.exc_info, record.exc_text = None, None
            setattr(record, ONE_LINE_ERROR, True)
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_OneLineBackupErrors())
