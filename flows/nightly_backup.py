"""Every night: sweep whole past days for RT Records, and retry everything not yet verified.

Catches what the 10-minute runs cannot: records written hours after their session, records
without a TreatmentTime, and any record that failed to move earlier. It does not move the
watermark.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

from prefect import State, flow, get_run_logger

from flows import naming
from flows.backup_run import backfill_context, catch_up_days, catch_up_note, final_state, \
    raise_if_incomplete, run_backup
from flows.cli import run_cli
from flows.hooks import RUN_HOOKS
from radonc_backup.lane import OpenLane, open_lane
from radonc_backup.windows import utc_now, wall, whole_days
from tasks.backup import copy_ledger
from tasks.limits import one_run_of, rv_slots


@flow(name="nightly-backup", flow_run_name=naming.NIGHTLY, log_prints=False, **RUN_HOOKS)
def nightly_backup(site: str, days: int = 1, source: str | None = None,
                   backup: str | None = None, config: str | None = None,
                   now: datetime | None = None, backfill: bool = True) -> State:
    """Back up the RT Records of the last ``days`` whole days and today so far.

    Args:
        site: Site name, a table of the sites file (e.g. UCLA).
        days: Whole past days to look back over, besides today so far.
        source: R&V source alias of the site (empty: the site's default_source).
        backup: Backup target alias of the site (empty: the site's default_backup).
        config: Sites TOML file (empty: $RADONC_BACKUP_CONFIG, else config/environments.toml).
        now: Replay as if it were this time; leave empty in production.
        backfill: Then sweep every plan context that is not complete yet.
    """
    lane = open_lane(site, source, backup, config)
    with one_run_of(lane, on_wait=get_run_logger().warning):
        return _nightly(lane, days, now, backfill)


def _nightly(lane: OpenLane, days: int, now: datetime | None, backfill: bool) -> State:
    today = wall((now or utc_now()).astimezone(timezone.utc), lane.site.tz).date()
    catch_up = catch_up_days(lane) if lane.ledger.watermark() is None else None
    queries = whole_days(today, max(days, catch_up or 0))
    window = f"{queries[0].day:%Y-%m-%d} to {queries[-1].day:%Y-%m-%d} (whole days)"
    # Slots first, before any task run; the backfill subflow works within them.
    with rv_slots(lane.source, occupy=lane.site.settings.move_associations):
        pass_days = lane.site.settings.patient_pass_days
        summary = run_backup("nightly-backup", lane, queries,
                             window, patients_since=today - timedelta(days=pass_days)
                             if pass_days else None,
                             catch_up=catch_up_note(catch_up) if catch_up else "")
        if backfill:
            backfill_context(lane, summary, None, now)
    copy_ledger(lane.ref, f"{today:%Y%m%d}")
    raise_if_incomplete(summary)
    return final_state(summary)


if __name__ == "__main__":
    sys.exit(run_cli(nightly_backup, __doc__ or ""))
