"""Every 10 minutes: back up the RT Records delivered since the last run.

The window runs from the watermark minus the site's overlap (records are often written a little
after the session) to now, in the site's local time, one C-FIND per local date. The watermark
advances only after the whole window was queried and every record found is in the ledger; records
that then fail to move stay in the ledger and are retried by every later run.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

from prefect import State, flow, get_run_logger

from flows import naming
from flows.backup_run import backfill_context, catch_up_days, catch_up_note, final_state, \
    raise_if_incomplete, refresh_pack, run_backup
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.lane import OpenLane, open_lane
from radonc_backup.rt_backup import window_label
from radonc_backup.windows import day_queries, local_span, utc_now, wall
from tasks.limits import one_run_of, rv_slots


def incremental_start(watermark: datetime | None, now: datetime, overlap_minutes: int,
                      lookback_days: int, tz: object) -> datetime:
    """Where the window starts: watermark minus overlap, or whole days back on a first run."""
    if watermark is not None:
        return min(watermark, now) - timedelta(minutes=overlap_minutes)
    first_day = (wall(now, tz) - timedelta(days=lookback_days)).date()  # type: ignore[arg-type]
    return datetime.combine(first_day, datetime.min.time(), tzinfo=tz).astimezone(timezone.utc)  # type: ignore[arg-type]


@flow(name="incremental-backup", flow_run_name=naming.INCREMENTAL, log_prints=False,
      **RUN_HOOKS)
def incremental_backup(site: str, source: str | None = None, backup: str | None = None,
                       config: str | None = None, now: datetime | None = None,
                       backfill: bool = True) -> State:
    """Back up new RT Records from a site's R&V (default source) to its backup.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        source: R&V source alias of the site (empty: the site's default_source).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
        now: Replay the window ending at this time; leave empty in production.
        backfill: Then bring the plan context of the records just verified into the backup.
    """
    lane = open_lane(site, source, backup, config)
    # One run of the lane at a time: the watermark is read, and the window chosen, inside.
    with one_run_of(lane, on_wait=get_run_logger().warning):
        return _incremental(lane, now, backfill)


def _incremental(lane: OpenLane, now: datetime | None, backfill: bool) -> State:
    end = (now or utc_now()).astimezone(timezone.utc)
    watermark = lane.ledger.watermark()
    catch_up = catch_up_days(lane) if watermark is None else None
    start = incremental_start(watermark, end, lane.site.settings.window_overlap_minutes,
                              catch_up or lane.site.settings.lookback_days, lane.site.tz)
    local_start, local_end = local_span(start, end, lane.site.tz)
    # Slots first, before any task run; the backfill subflow works within them.
    with rv_slots(lane.source, occupy=lane.site.settings.move_associations):
        summary = run_backup("incremental-backup", lane,
                             day_queries(local_start, local_end),
                             window_label(local_start, local_end), advance_to=end,
                             catch_up=catch_up_note(catch_up) if catch_up else "")
        if backfill:
            backfill_context(lane, summary, summary.verified_uids, now)
    refresh_pack(lane, summary, now)
    raise_if_incomplete(summary)
    return final_state(summary)


if __name__ == "__main__":
    sys.exit(run_cli(incremental_backup, __doc__ or ""))
