"""Flow-run state hooks: the site's log file for the run, and the failure e-mail.

Every flow uses ``RUN_HOOKS``: the log file opens when the run starts running and closes when
it ends, however it ends; a failed or crashed run mails the site's recipients, once per problem
(the same problem again is not mailed again), and the first run that completes afterwards mails
that it cleared (``radonc_backup.alerts``).
"""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.logging.loggers import flow_run_logger
from prefect.settings import PREFECT_UI_URL

from radonc_backup.config import Site, load_site
from radonc_backup.errors import BackupError
from radonc_backup.logfile import SiteLogHandler, close_site_log, open_site_log
from radonc_backup.alerts import AlertBook, OpenAlert, signature
from radonc_backup.notify import RunFailure, cleared_message, failure_message, run_link, send


MAIL_SENT = "failure e-mail sent"
SAME_PROBLEM = "no failure e-mail: the same problem was mailed already"


def _deployment_and_reports(flow_run: Any) -> tuple[str, list[str]]:
    """The run's deployment name and its markdown artifacts (window and counts)."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(flow_run.deployment_id).name \
            if flow_run.deployment_id else ""
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run.id])))
    return deployment, [str(a.data) for a in artifacts if a.type == "markdown" and a.data]


def _run_site(flow_run: Any) -> Site:
    """The site a run is for, from its own parameters (raises ConfigError)."""
    params = flow_run.parameters or {}
    return load_site(str(params.get("site")), params.get("config"))


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Mail the site's recipients about this run; a mail problem is logged, never raised."""
    logger = flow_run_logger(flow_run, flow)
    try:
        site = _run_site(flow_run)
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
    alert = OpenAlert(signature(state.name, state.message or ""), flow_run.name,
                      str(flow_run.id), state.name)
    if not alerts(site).is_new(alert_key(flow, flow_run), alert):
        logger.info("%s; a mail goes out when it changes or clears", SAME_PROBLEM)
        return
    ui = site.notify.ui_url or str(PREFECT_UI_URL.value() or "")
    failure = RunFailure(site.name, flow.name, deployment, flow_run.name, str(flow_run.id),
                         state.name, state.message or "", dict(flow_run.parameters or {}),
                         reports,
                         run_link(ui, str(flow_run.id)))
    try:
        send(site, failure_message(site.notify, failure))
    except BackupError as exc:
        logger.error("%s", exc)
        return
    logger.info("%s to %d recipient(s)", MAIL_SENT, len(site.notify.recipients))


def alerts(site: Site) -> AlertBook:
    return AlertBook(site.state_dir / "alerts.json")


def alert_key(flow: Any, flow_run: Any) -> str:
    return f"{flow.name}|{flow_run.deployment_id or 'no deployment'}"


def notify_cleared(flow: Any, flow_run: Any, state: Any) -> None:
    """One mail when a run completes after a mailed problem of the same flow and deployment."""
    logger = flow_run_logger(flow_run, flow)
    try:
        site = _run_site(flow_run)
    except BackupError:
        return
    if site.notify is None:
        return
    cleared = alerts(site).clear(alert_key(flow, flow_run))
    if cleared is None:
        return
    ui = site.notify.ui_url or str(PREFECT_UI_URL.value() or "")
    try:
        send(site, cleared_message(site.notify, site.name, flow.name, flow_run.name,
                                   cleared.run_name, cleared.state,
                                   run_link(ui, str(flow_run.id))))
    except BackupError as exc:
        logger.error("%s", exc)
        return
    logger.info("cleared e-mail sent: %s ran without the problem of %s", flow_run.name,
                cleared.run_name)


_open_logs: dict[str, SiteLogHandler] = {}


def open_run_log(flow: Any, flow_run: Any, state: Any) -> None:
    try:
        site = _run_site(flow_run)
    except BackupError:
        return  # the run itself reports the config error
    _open_logs[str(flow_run.id)] = open_site_log(site, str(flow_run.id), flow_run.name)


def close_run_log(flow: Any, flow_run: Any, state: Any) -> None:
    handler = _open_logs.pop(str(flow_run.id), None)
    if handler is not None:
        close_site_log(handler)


def fail_and_close(flow: Any, flow_run: Any, state: Any) -> None:
    notify_failure(flow, flow_run, state)
    close_run_log(flow, flow_run, state)


def clear_and_close(flow: Any, flow_run: Any, state: Any) -> None:
    notify_cleared(flow, flow_run, state)
    close_run_log(flow, flow_run, state)


RUN_HOOKS: dict[str, Any] = {
    "on_running": [open_run_log],
    "on_completion": [clear_and_close],
    "on_cancellation": [close_run_log],
    "on_failure": [fail_and_close],
    "on_crashed": [fail_and_close],
}
