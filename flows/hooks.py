"""Flow-run state hooks: the failure e-mail, sent once per failed or crashed run."""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.logging.loggers import flow_run_logger
from prefect.settings import PREFECT_UI_URL

from radonc_backup.config import load_site
from radonc_backup.errors import BackupError
from radonc_backup.notify import RunFailure, failure_message, run_link, send


def _deployment_and_reports(flow_run: Any) -> tuple[str, list[str]]:
    """The run's deployment name and its markdown artifacts (window and counts)."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(flow_run.deployment_id).name \
            if flow_run.deployment_id else ""
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run.id])))
    return deployment, [str(a.data) for a in artifacts if a.type == "markdown" and a.data]


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Mail the site's recipients about this run; a mail problem is logged, never raised."""
    logger = flow_run_logger(flow_run, flow)
    params = dict(flow_run.parameters or {})
    try:
        site = load_site(str(params.get("site")), params.get("config"))
    except BackupError as exc:
        logger.warning("no failure e-mail: %s", exc)
        return
    if site.notify is None:
        return
    try:
        deployment, reports = _deployment_and_reports(flow_run)
    except Exception as exc:  # the API may be what failed; the mail still goes out
        logger.warning("failure e-mail without run details: %s", exc)
        deployment, reports = "", []
    ui = site.notify.ui_url or str(PREFECT_UI_URL.value() or "")
    failure = RunFailure(site.name, flow.name, deployment, flow_run.name, str(flow_run.id),
                         state.name, state.message or "", params, reports,
                         run_link(ui, str(flow_run.id)))
    try:
        send(site, failure_message(site.notify, failure))
    except BackupError as exc:
        logger.error("%s", exc)
        return
    logger.info("failure e-mail sent to %d recipient(s)", len(site.notify.recipients))

