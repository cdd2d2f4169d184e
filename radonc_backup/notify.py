"""Failure e-mail: one message per failed or crashed run, to the site's recipients.

The message says what a physicist on call needs to act: site, flow, deployment, run, state, the
run's parameters, its error (which names UIDs and patient IDs, never names), the run's own
report (window and counts), and a link to the run in the Prefect UI. Nothing in it is read from
a DICOM object, so no patient name can reach a mailbox.
"""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage

from .config import Notify, Site, resolve_secret
from .errors import BackupError

MAX_ERROR_CHARS = 4000


@dataclass
class RunFailure:
    site: str
    flow: str
    deployment: str
    run_name: str
    run_id: str
    state: str
    message: str
    parameters: dict[str, object] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    link: str = ""


def run_link(ui_url: str, run_id: str) -> str:
    return f"{ui_url.rstrip('/')}/runs/flow-run/{run_id}" if ui_url else ""


def failure_message(notify: Notify, failure: RunFailure) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = (f"[RadOnc Backup] {failure.state}: {failure.flow} for site {failure.site}"
                      f" ({failure.run_name})")
    msg["From"] = notify.sender
    msg["To"] = ", ".join(notify.recipients)
    shown = {k: v for k, v in failure.parameters.items() if v not in (None, "", [])}
    lines = [
        f"Site:        {failure.site}",
        f"Flow:        {failure.flow}",
        f"Deployment:  {failure.deployment or '(run without a deployment)'}",
        f"Run:         {failure.run_name} ({failure.run_id})",
        f"State:       {failure.state}",
        f"Parameters:  {', '.join(f'{k}={v}' for k, v in shown.items()) or '(defaults)'}",
    ]
    if failure.link:
        lines.append(f"Open:        {failure.link}")
    lines += ["", "Error:", failure.message[:MAX_ERROR_CHARS] or "(no message)"]
    for report in failure.reports:
        lines += ["", "-" * 60, report[:MAX_ERROR_CHARS]]
    lines += ["", "Nothing unverified is marked done: the next run retries what is left."]
    msg.set_content("\n".join(lines))
    return msg


def cleared_message(notify: Notify, site: str, flow: str, run_name: str, failed_run: str,
                    failed_state: str, link: str) -> EmailMessage:
    """The one mail that says a mailed problem is over."""
    msg = EmailMessage()
    msg["Subject"] = f"[RadOnc Backup] Cleared: {flow} for site {site} ({run_name})"
    msg["From"] = notify.sender
    msg["To"] = ", ".join(notify.recipients)
    lines = [f"Site:        {site}", f"Flow:        {flow}",
             f"Run:         {run_name} completed",
             f"Cleared:     the problem mailed for {failed_run} ({failed_state})"]
    if link:
        lines.append(f"Open:        {link}")
    msg.set_content("\n".join(lines))
    return msg


def send(site: Site, msg: EmailMessage) -> None:
    """Deliver through the site's SMTP server; raises BackupError naming the server."""
    notify = site.notify
    if notify is None:
        return
    password = resolve_secret(site, "notify (SMTP)", notify.password_env, notify.password_secret)
    where = f"site {site.name}: SMTP {notify.smtp_host}:{notify.smtp_port}"
    try:
        with smtplib.SMTP(notify.smtp_host, notify.smtp_port, timeout=notify.timeout) as smtp:
            if notify.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if notify.username and password:
                smtp.login(notify.username, password)
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        raise BackupError(f"{where}: failure e-mail not sent: {exc}") from exc
