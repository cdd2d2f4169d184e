"""A rotating log file per site, for clinics whose audit wants files beside the Prefect server.

Each run writes its own lines (its flow run ID is on every record Prefect's run loggers emit),
so a subflow or another site's run in the same process never lands in the wrong file. What is
logged is what the run logs: UIDs, patient IDs and counts, never patient names.
"""

from __future__ import annotations

import logging
from logging.handlers import RotatingFileHandler

from .config import Site

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
FORMAT = "%(asctime)s %(levelname)-7s %(flow_run_name)s %(name)s: %(message)s"


class _OneRun(logging.Filter):
    def __init__(self, flow_run_id: str, flow_run_name: str) -> None:
        super().__init__()
        self.flow_run_id, self.flow_run_name = flow_run_id, flow_run_name

    def filter(self, record: logging.LogRecord) -> bool:
        if str(getattr(record, "flow_run_id", "")) != self.flow_run_id:
            return False
        record.flow_run_name = getattr(record, "flow_run_name", None) or self.flow_run_name
        return True


class SiteLogHandler(RotatingFileHandler):
    """The site's file for one run; remembers the logger levels it lowered, to restore them."""

    def __init__(self, site: Site) -> None:
        super().__init__(site.log_path, maxBytes=int(site.settings.log_max_mb * 1024 * 1024),
                         backupCount=site.settings.log_backups, encoding="utf-8")
        self.saved_levels: dict[str, int] = {}


def open_site_log(site: Site, flow_run_id: str, flow_run_name: str) -> SiteLogHandler:
    """Start copying one run's log records to the site's rotating file."""
    site.log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = SiteLogHandler(site)
    handler.setLevel(site.settings.log_level)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_OneRun(flow_run_id, flow_run_name))
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        handler.saved_levels[name] = logger.level
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > handler.level:
            logger.setLevel(handler.level)  # the file's level may be finer than the console's
    return handler


def close_site_log(handler: SiteLogHandler) -> None:
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        logger.removeHandler(handler)
        if not any(isinstance(h, SiteLogHandler) for h in logger.handlers):  # the outermost run
            logger.setLevel(handler.saved_levels[name])
    handler.close()
