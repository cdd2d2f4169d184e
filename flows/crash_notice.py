"""Mail the site about a run whose process died, where the run's own hook could not.

A run's ``on_crashed`` hook runs only if something can still load the flow: when the process is
killed (the OOM killer, ``kill -9``, a reboot), Prefect 3.8's worker fails to load it ("Runner
failed to retrieve flow to execute on_crashed hooks") and no mail goes out. ``deployments.register``
therefore creates a server-side automation: every flow run of RadOnc Backup that enters Crashed
starts this flow (deployment ``crash-notice``), which mails the run's site with the same message
the hook would have sent, unless the hook already did.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from flows.hooks import MAIL_SENT, notify_failure

BACKUP_FLOWS = ["incremental-backup", "nightly-backup", "plan-context-backfill",
                "treatment-report", "validation-sweep", "downtime-pack", "dr-drill",
                "mosaiq-summary"]


@flow(name="crash-notice", flow_run_name="crash notice {flow_run_id}", log_prints=False)
def crash_notice(flow_run_id: str) -> str:
    """Send the failure e-mail of a crashed run to its site.

    Args:
        flow_run_id: The crashed run: its ID, or Prefect's resource ID prefect.flow-run.<ID>.
    """
    logger = get_run_logger()
    run_id = UUID(flow_run_id.rsplit(".", 1)[-1])
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        flow_name = client.read_flow(run.flow_id).name
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run_id])))
    if any(MAIL_SENT in log.message for log in logs):
        logger.info("run %s: its own hook already sent the failure e-mail", run_id)
        return "already mailed"
    if run.state is None or not run.state.is_crashed():
        logger.info("run %s is %s, not crashed: no mail", run_id,
                    run.state.name if run.state else "without state")
        return "not crashed"
    notify_failure(SimpleNamespace(name=flow_name), run, run.state)
    return "mailed"


if __name__ == "__main__":
    crash_notice(sys.argv[1])
