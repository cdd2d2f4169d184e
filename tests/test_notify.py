"""Failure e-mail through a real SMTP server started by the test (aiosmtpd on loopback)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from demo.orthanc import free_port
from demo.site import DemoSite
from demo.synthetic import Patient, make_course
from flows.incremental_backup import incremental_backup
from tests.conftest import Inbox, add_notify
from tests.test_backup_flows import at, push, refuse_patient_lua, run, uids

pytestmark = pytest.mark.usefixtures("prefect")


def test_a_failed_run_mails_the_site_once_without_patient_names(
        make_site: Callable[..., DemoSite], smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    site = make_site(backup_lua=[refuse_patient_lua("MAIL002")])
    add_notify(site, port)
    ok = make_course(Patient("MAIL001", "Zyxwv^Quillon"), at(-1, 9), delivered=1, slices=2)
    refused = make_course(Patient("MAIL002", "Vrokk^Ottilie^Marie"), at(-1, 10), delivered=2,
                          slices=2)
    push(site, *ok.records, *refused.records)

    state = run(incremental_backup, site, at(0, 16), backfill=False)
    assert state.is_failed()
    assert len(inbox.messages) == 1
    mail = inbox.messages[0]
    body = mail.get_payload(decode=True).decode()
    assert mail["To"] == "physics-oncall@clinic.test, it@clinic.test"
    assert "Failed: incremental-backup for site DEMO" in mail["Subject"]
    assert "Site:        DEMO" in body and "Flow:        incremental-backup" in body
    assert "(run without a deployment)" in body
    run_id = str(state.state_details.flow_run_id)
    assert f"http://prefect.clinic.test:4200/runs/flow-run/{run_id}" in body
    assert "2 RT Record(s) from aria not verified in backup orthanc" in body
    assert all(uid in body for uid in uids(*refused.records))
    assert "| found | new |" in body and "| 3 | 3 |" in body  # the run's report: counts
    assert "Window (site local time)" in body
    for name_part in ("Zyxwv", "Quillon", "Vrokk", "Ottilie"):
        assert name_part not in body and name_part not in mail["Subject"]


def test_a_completed_run_and_an_unreachable_mail_server_send_nothing_and_break_nothing(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    add_notify(site, free_port())  # nothing listens there
    c = make_course(Patient("MAIL003", "Quiet^Run"), at(-1, 9), delivered=1, slices=2)
    push(site, *c.records)
    state = run(incremental_backup, site, at(0, 16), backfill=False)
    assert state.is_completed(), state.message
    site.rv.stop()
    state = run(incremental_backup, site, at(0, 16, 10), backfill=False)
    assert state.is_failed()  # the run's own failure, not a mail error
    assert "RV_DEMO" in str(state.message)


def test_the_same_problem_is_mailed_once_and_its_end_once(
        make_site: Callable[..., DemoSite], smtp: tuple[Inbox, int]) -> None:
    """A record the backup keeps refusing fails every 10-minute run: one mail, not one a run;
    the run that completes afterwards sends one 'cleared' mail."""
    inbox, port = smtp
    site = make_site(backup_lua=[refuse_patient_lua("MAIL010")])
    add_notify(site, port)
    refused = make_course(Patient("MAIL010", "Stuck^Record"), at(-1, 10), delivered=1, slices=2)
    push(site, *refused.records)

    for minute in (0, 10, 20):
        assert run(incremental_backup, site, at(0, 16, minute), backfill=False).is_failed()
    assert len(inbox.messages) == 1 and "Failed" in inbox.messages[0]["Subject"]

    site.backup.stop()
    site.backup.lua_scripts = []
    site.backup.start()
    assert run(incremental_backup, site, at(0, 16, 30), backfill=False).is_completed()
    assert run(incremental_backup, site, at(0, 16, 40), backfill=False).is_completed()
    assert len(inbox.messages) == 2
    cleared = inbox.messages[1]
    assert cleared["Subject"].startswith("[RadOnc Backup] Cleared: incremental-backup for site "
                                         "DEMO")
    assert "Stuck" not in cleared.as_string()
