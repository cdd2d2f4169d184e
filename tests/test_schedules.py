"""Schedules fire: a real `prefect server start` with every service on, as production runs it.

Prefect 3.8.8's scheduler once failed silently on an unpinned SQLAlchemy 2.1 ("Can't evaluate
bulk DML statement" in the server log, no run ever created) while the other server tests ran with
the scheduler off. Here the scheduler is on: registering creates per-site deployments, the
scheduler creates their runs by itself, and a worker picks up the next scheduled incremental run
and completes it. The only shortcut is time: the test site's ``[DEMO.schedules]`` sets the
incremental interval to one minute (a setting clinics have too), so the first scheduled run is due
a minute after registering instead of ten; tests/test_deployments.py checks the shipped 10.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from demo.site import DemoSite
from tests.prefect_procs import TERMINAL, Server, Workers, register, todays_course, uids

# Every deployment prefect.yaml declares, in its order (register deploys them for the site).
DEPLOYMENTS = [d["name"] for d in yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "prefect.yaml").read_text())["deployments"]]
pytestmark = pytest.mark.slow  # a real Prefect server, its scheduler and a worker


def scheduled(server: Server, name: str) -> list[dict[str, Any]]:
    return [r for r in server.deployment_runs(name) if r["state"]["type"] == "SCHEDULED"]


def test_scheduler_creates_runs_and_a_worker_completes_the_next_three(
        scheduling_server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    server = scheduling_server
    site = make_site(schedules={"incremental_minutes": 1})
    course = todays_course("SCH001")
    server.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = "30"  # the mark-Crashed automation's
    printed = register(server, site, course.all())         # window: 90 s, within this test
    del server.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]
    assert DEPLOYMENTS[-1] == "crash-notice" and "demo-department-backfill" in DEPLOYMENTS
    assert "deployments: " + ", ".join(DEPLOYMENTS) in printed
    assert f"RADONC_BACKUP_HOME={Path(__file__).resolve().parent.parent}" in printed
    [worker_line] = [line for line in printed.splitlines() if "deployments.worker" in line]
    assert worker_line.endswith("-m deployments.worker --pool radonc-backup")
    assert "RADONC_BACKUP_HOME=" in worker_line, "one worker command, the one with our environment"

    deadline = time.monotonic() + 60
    while not (runs := scheduled(server, "incremental-backup/demo-incremental")):
        assert time.monotonic() < deadline, (server.home / "server.log").read_text()[-3000:]
        time.sleep(1)
    starts = sorted(datetime.fromisoformat(r["expected_start_time"]) for r in runs)
    assert len(starts) >= 3, "the scheduler keeps at least three runs ahead"
    assert {(b - a).total_seconds() for a, b in zip(starts, starts[1:])} == {60.0}
    # The scheduler takes deployments one after another: the nightly's runs may come a moment
    # after the incremental's.
    while not (nightlies := scheduled(server, "nightly-backup/demo-nightly")):
        assert time.monotonic() < deadline, (server.home / "server.log").read_text()[-3000:]
        time.sleep(1)
    [nightly, *_] = sorted(datetime.fromisoformat(r["expected_start_time"]) for r in nightlies)
    local = nightly.astimezone(ZoneInfo("America/New_York"))
    assert (local.hour, local.minute) == (2, 0), "cron in the site's timezone"
    log = (server.home / "server.log").read_text()
    assert "Can't evaluate bulk DML" not in log and "InvalidRequestError" not in log

    first = min(runs, key=lambda r: r["expected_start_time"])
    due = (datetime.fromisoformat(first["expected_start_time"])
           - datetime.now(timezone.utc)).total_seconds()
    assert due <= 61
    workers = Workers(server, site, ["w1"], tmp_path)
    try:
        done = server.wait_terminal([first["id"]], timeout=due + 120)
        # Three incremental intervals with the scheduler, the worker and the automations on.
        deadline = time.monotonic() + 3 * 60 + 60
        while len(finished := [r for r in server.deployment_runs(
                "incremental-backup/demo-incremental") if r["state"]["type"] in TERMINAL]) < 3:
            assert time.monotonic() < deadline, server.story()
            time.sleep(2)
    finally:
        workers.stop()
    assert {r["state"]["type"] for r in finished} == {"COMPLETED"}, server.story()
    log = (server.home / "server.log").read_text()
    for trouble in ("database is locked", "dropping", "Traceback", "| ERROR"):
        assert trouble not in log, log[-3000:]
    acted = server.post("/events/filter", {"filter": {"event": {
        "prefix": ["prefect.automation.action"]}}, "limit": 50})["events"]
    assert acted == [], ["no automation acts on runs that ended", acted]
    run = done[first["id"]]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["auto_scheduled"] is True
    assert run["name"].startswith("DEMO incremental "), run["name"]
    assert run["parameters"] == {"site": "DEMO"}
    assert site.backup.sop_instance_uids() >= uids(course)
