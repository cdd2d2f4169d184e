"""Flow-run names an operator can tell apart: site, what the run does, and its time or date.

Prefect calls these when a run starts (``flow_run_name=``); they read the run's parameters and
its scheduled start, in the site's own timezone when the site's config can be read. A name is
never worth failing a run for, so any problem falls back to UTC.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo


def _params() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return dict(flow_run.parameters or {})


def _local_start(params: dict[str, Any]) -> datetime:
    from prefect.runtime import flow_run

    start = params.get("now") or flow_run.scheduled_start_time or datetime.now(timezone.utc)
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    if start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    try:
        from radonc_backup.config import load_site

        return start.astimezone(ZoneInfo(load_site(str(params["site"]),
                                                   params.get("config")).timezone))
    except Exception:
        return start.astimezone(timezone.utc)


def run_namer(kind: str, detail: Callable[[dict[str, Any], datetime], str] | None = None,
              ) -> Callable[[], str]:
    """``"<SITE> <kind> <local YYYY-MM-DD HH:MM>"``, or with ``detail`` its own ending."""

    def name() -> str:
        params = _params()
        when = _local_start(params)
        ending = detail(params, when) if detail else f"{when:%Y-%m-%d %H:%M}"
        return f"{params.get('site', '?')} {kind} {ending}"

    return name


def _report_detail(params: dict[str, Any], when: datetime) -> str:
    return str(params.get("end_date") or f"{when:%Y-%m-%d}")


def _nightly_detail(params: dict[str, Any], when: datetime) -> str:
    return f"{when:%Y-%m-%d} ({params.get('days', 1)} day(s) back)"


INCREMENTAL = run_namer("incremental")
NIGHTLY = run_namer("nightly", _nightly_detail)
BACKFILL = run_namer("plan-context")
REPORT = run_namer("report", _report_detail)
VALIDATION = run_namer("validation")
INVENTORY = run_namer("inventory")
