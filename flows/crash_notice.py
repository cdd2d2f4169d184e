"""Mail the site about a run whose process died, where the run's own hook could not.

A run's ``on_crashed`` hook runs only if something can still load the flow: when the process is
killed (the OOM killer, ``kill -9``, a reboot), Prefect 3.8's worker fails to load it ("Runner
failed to retrieve flow to execute on_crashed hooks") and no mail goes out. So this flow
(deployment ``crash-notice``) mails the run's site with the same message the hook would have
sent, unless a mail about it went out already. Two things start it:

- the automation ``deployments.register`` creates: every run of RadOnc Backup that enters
  Crashed starts it for that run, usually within seconds;
- its schedule, every 10 minutes, with no run named: it sweeps every run of RadOnc Backup that
  ended Crashed in the last 24 hours. Prefect's trigger pipeline can miss an event (CI saw a
  killed run end Crashed and no automation run follow within a minute; PrefectHQ/prefect#21932
  reports state events the triggers never see), so the sweep is what makes the mail certain.
  First, the sweep marks Crashed the deployments' runs whose heartbeats stopped (their machine
  died: no worker is left to say so), so they are mailed in the same sweep.

Each crashed run is mailed once: the mail's log line is written to the crashed run itself
(``MAIL_SENT``), and a run carrying it, or the line saying the same problem was mailed already,
is passed over.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter,
                                            FlowRunFilterExpectedStartTime, FlowRunFilterState,
                                            FlowRunFilterStateType, FlowRunFilterTags,
                                            LogFilter, LogFilterFlowRunId)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import LogSort
from prefect.events.filters import (EventFilter, EventNameFilter, EventOccurredFilter,
                                    EventResourceFilter)
from prefect.states import Crashed

from flows.hooks import MAIL_SENT, SAME_PROBLEM, notify_failure

BACKUP_FLOWS = ["incremental-backup", "nightly-backup", "plan-context-backfill",
                "treatment-report", "validation-sweep", "downtime-pack", "dr-drill",
                "mosaiq-summary", "inventory-sweep", "fixity-sweep", "restore", "export"]
SWEEP_HOURS = 24
"""How far back the scheduled sweep looks for crashed runs (by their expected start)."""


def _mailed(client: SyncPrefectClient, run_id: UUID) -> bool:
    """Whether the run's log says a mail went out (or was not owed). Newest lines first: the
    API returns a page of them (200), a long run logs more, and these lines come last."""
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                            sort=LogSort.TIMESTAMP_DESC)
    return any(MAIL_SENT in log.message or SAME_PROBLEM in log.message for log in logs)


def mail_crashed(client: SyncPrefectClient, run_id: UUID) -> str:
    """Mail one crashed run's site unless that was done; says what it did."""
    run = client.read_flow_run(run_id)
    if run.state is None or not run.state.is_crashed():
        return f"run {run_id} is {run.state.name if run.state else 'without state'}: no mail"
    if _mailed(client, run_id):
        return f"run {run_id}: mailed already"
    notify_failure(SimpleNamespace(name=client.read_flow(run.flow_id).name), run, run.state)
    return f"run {run_id}: mailed"


HEARTBEAT_TAG = "radonc-heartbeat"
"""Carried by the deployments' runs, whose heartbeat interval the register step set."""
MISSED_HEARTBEATS = 3
"""A deployment's run that sends no heartbeat for this many of its intervals is marked Crashed."""


def mark_dead_runs(client: SyncPrefectClient, heartbeat_seconds: int) -> list[str]:
    """Mark Crashed every Running run of a deployment whose last heartbeat (or start, before
    its first) is older than ``MISSED_HEARTBEATS`` intervals: its process or its machine died
    and nothing else will say so. Done here, by reading the heartbeats, not by an automation:
    Prefect's trigger pipeline sometimes saw a run's last heartbeat after its Completed event
    and then tried to mark a finished run Crashed. A run that ended meanwhile is refused by the
    server (the state is proposed, never forced)."""
    limit = timedelta(seconds=heartbeat_seconds * MISSED_HEARTBEATS)
    now = datetime.now(timezone.utc)
    said = []
    for run in client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=BACKUP_FLOWS)),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                tags=FlowRunFilterTags(all_=[HEARTBEAT_TAG]))):
        started = run.start_time or run.expected_start_time or now
        beats = client.read_events(filter=EventFilter(
            event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
            occurred=EventOccurredFilter(since=started, until=now)), limit=1).events
        last = max([started, *(b.occurred for b in beats)])
        if now - last <= limit:
            continue
        quiet = int((now - last).total_seconds())
        result = client.set_flow_run_state(run.id, Crashed(message=(
            f"no heartbeat for {quiet} s (over {MISSED_HEARTBEATS} x {heartbeat_seconds} s): "
            "the run's process or its machine died (nothing it had not verified is marked "
            "done; the next run takes it up)")))
        said.append(f"run {run.id}: no heartbeat for {quiet} s: "
                    + ("marked Crashed" if result.status.value == "ACCEPT"
                       else f"not marked ({result.status.value})"))
    return said


def crashed_runs(client: SyncPrefectClient, hours: float) -> list[UUID]:
    """Runs of RadOnc Backup's flows that are Crashed, expected to start in the last ``hours``."""
    since = datetime.now(timezone.utc) - timedelta(hours=hours)
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=BACKUP_FLOWS)),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
            expected_start_time=FlowRunFilterExpectedStartTime(after_=since)))
    return [r.id for r in runs]


def _run_name() -> str:
    from prefect.runtime import flow_run

    run_id = str((flow_run.parameters or {}).get("flow_run_id") or "")
    return f"crash notice {run_id.rsplit('.', 1)[-1]}" if run_id else "crash notice sweep"


@flow(name="crash-notice", flow_run_name=_run_name, log_prints=False)
def crash_notice(flow_run_id: str = "", hours: float = SWEEP_HOURS,
                 heartbeat_seconds: int = 0) -> list[str]:
    """Mark Crashed the runs whose heartbeats stopped, and mail crashed runs to their sites.

    Args:
        flow_run_id: One crashed run: its ID, or Prefect's resource ID prefect.flow-run.<ID>.
            Empty: every run of RadOnc Backup that ended Crashed in the last ``hours``.
        hours: How far back the sweep looks.
        heartbeat_seconds: The deployments' heartbeat interval (the register step sets it): a
            sweep first marks Crashed a Running run silent for three of them. 0: not done.
    """
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        marked = mark_dead_runs(client, heartbeat_seconds) \
            if heartbeat_seconds and not flow_run_id else []
        ids = [UUID(flow_run_id.rsplit(".", 1)[-1])] if flow_run_id else \
            crashed_runs(client, hours)
        said = marked + [mail_crashed(client, run_id) for run_id in ids]
    for line in said:
        logger.info("%s", line)
    if not flow_run_id:
        logger.info("sweep: %d crashed run(s) in the last %g h", len(ids), hours)
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.crash_notice", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("flow_run_id", nargs="?", default="",
                        help="one crashed run's ID (empty: sweep the last --hours)")
    parser.add_argument("--hours", type=float, default=SWEEP_HOURS,
                        help=f"how far back the sweep looks (default: {SWEEP_HOURS:g})")
    args = parser.parse_args(argv)
    state = crash_notice(args.flow_run_id, args.hours, return_state=True)
    for line in state.result(raise_on_failure=False) if state.is_completed() else []:
        print(line)
    if not state.is_completed():
        print(f"FAILED: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
