"""Operating it for real: `prefect server start`, the register step, process workers, CLI triggers.

Nothing here uses the in-process test harness: the server, the workers and every `prefect` command
are separate processes, as a clinic runs them. In this module the server's scheduler is off so that
only the runs a test triggers happen (an auto-scheduled incremental run that fell due mid-test
would race the triggered ones); tests/test_schedules.py runs the production setting, scheduler on,
and sees scheduled runs created and run by a worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo.site import DemoSite
from demo.synthetic import to_bytes
from flows.hooks import MAIL_SENT
from radonc_backup.ledger import Lane, Ledger
from tests.conftest import Inbox, add_notify
from tests.prefect_procs import ROOT, Server, Workers, todays_course, uids
from tests.test_backup_flows import refuse_patient_lua

LANE = Lane("DEMO", "aria", "orthanc")
pytestmark = pytest.mark.slow  # real Prefect servers and workers

# Two groups, each on one server registered once (the registered_server fixture, per process):
# pytest-xdist runs a group in one process, the two groups at once.
GROUP_A, GROUP_B = pytest.mark.xdist_group("server-a"), pytest.mark.xdist_group("server-b")


@pytest.fixture
def server(registered_server: Server) -> Server:
    """The module's server, reset: no run left from an earlier test, every slot free."""
    registered_server.reset()
    return registered_server


def on_rv(site: DemoSite, objects: list[Any]) -> None:
    site.rv.upload([to_bytes(ds) for ds in objects])

HOLD_SLOTS = """
import sys, time
from radonc_backup.config import load_site
from tasks.limits import ensure_rv_limits, rv_slots
source = load_site("DEMO", sys.argv[1]).sources["aria"]
ensure_rv_limits(load_site("DEMO", sys.argv[1]), update=True)
began = time.monotonic()
with rv_slots(source, occupy=source.max_associations):
    print(f"held after {time.monotonic() - began:.1f} s", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(600)
    elif sys.argv[2] == "until-stdin-closes":
        sys.stdin.read()
"""


def hold_rv_slots(server: Server, site: DemoSite) -> subprocess.Popen[str]:
    """A process holding every association slot of the demo R&V until its stdin is closed."""
    env = {**server.env, "PREFECT_LOGGING_LEVEL": "WARNING"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLOTS, str(site.config_path),
                               "until-stdin-closes"], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stderr is not None
    line = holder.stdout.readline()
    assert line.startswith("held"), holder.stderr.read()[-3000:]
    return holder


def release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    assert holder.wait(60) == 0


@GROUP_A
def test_deployment_run_from_the_cli_on_a_real_server_and_worker(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    course = todays_course("SRV001")
    on_rv(site, course.all())
    assert not list(server.home.glob("*.db")), "the server's database is PostgreSQL, not SQLite"

    deployments = server.post("/deployments/filter")
    spec = yaml.safe_load((Path(__file__).parent.parent / "prefect.yaml").read_text())
    assert {d["name"] for d in deployments} == {d["name"] for d in spec["deployments"]}
    assert len(deployments) == len(spec["deployments"]) == 13 and all(d["work_pool_name"] == "radonc-backup"
                                         for d in deployments)
    schedules = {d["entrypoint"].split(":")[1]: d["schedules"][0]["schedule"]
                 for d in server.post("/deployments/filter") if d["schedules"]}
    assert schedules["incremental_backup"]["interval"] == 600
    assert schedules["nightly_backup"]["cron"] == "0 2 * * *"
    assert schedules["nightly_backup"]["timezone"] == "America/New_York"
    limit = server.http.get("/v2/concurrency_limits/dicom-RV_DEMO").json()
    assert limit["limit"] == 4

    workers = Workers(server, site, ["w1"], tmp_path)
    try:
        run = server.prefect("deployment", "run", "incremental-backup/demo-incremental", "--watch")
    finally:
        workers.stop()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "Completed" in run.stdout

    [flow_run] = server.deployment_runs("incremental-backup/demo-incremental")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["parameters"] == {"site": "DEMO"}
    artifacts = server.post("/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    [report] = [a for a in artifacts if a["key"] == "incremental-backup-demo-aria"]
    assert "| 2 | 2 | 0 | 0 | 0 | 2 | 2 | 0 |" in report["data"]
    assert site.backup.sop_instance_uids() >= uids(course)
    assert str(course.plan.SOPInstanceUID) in site.backup.sop_instance_uids()  # backfill subflow
    assert "Worker 'w1' submitting flow run" in workers.submitted("w1")


@GROUP_B
def test_two_workers_share_runs_and_an_overlapping_trigger_is_cancelled(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    course = todays_course("SRV002")
    on_rv(site, course.all())

    # Another run holds every association slot of the R&V (a nightly, a backfill), so the first
    # incremental run taken stays Running, waiting for a slot, until the test lets the holder go.
    # Two triggers while the workers are down (a restart, a double click in the UI): the second
    # run a worker takes meets the first one Running, for certain, and is cancelled on arrival.
    holder = hold_rv_slots(server, site)
    workers = None
    try:
        triggered = [server.trigger("incremental-backup/demo-incremental"),
                     server.trigger("incremental-backup/demo-incremental")]
        workers = Workers(server, site, ["w1", "w2"], tmp_path)
        server.wait_states(triggered, lambda t: sorted(map(str, t)) == ["CANCELLED", "RUNNING"])
        triggered.append(server.trigger("treatment-report/demo-report"))
        release(holder)
        runs = server.wait_terminal(triggered)
    finally:
        holder.kill()
        if workers is not None:
            workers.stop()

    assert workers is not None
    first, second, report = (runs[i]["state"]["type"] for i in triggered)
    assert (first, second) in {("COMPLETED", "CANCELLED"), ("CANCELLED", "COMPLETED")}
    [cancelled] = [runs[i]["state"] for i in triggered[:2]
                   if runs[i]["state"]["type"] == "CANCELLED"]
    assert cancelled["message"] == "Deployment concurrency limit reached."
    assert report == "COMPLETED"
    assert all("submitting flow run" in workers.submitted(w) for w in ("w1", "w2")), \
        "both workers of the pool picked up runs"

    ledger = Ledger.for_state_dir(site.workdir / "state")
    rows = ledger.at(LANE).rows()
    assert {r.ref.sop_instance_uid for r in rows} == uids(course)
    assert {(r.state, r.attempts) for r in rows} == {("verified", 1)}


@GROUP_B
def test_retrying_a_failed_run_finishes_only_the_unfinished_work(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site(backup_lua=[refuse_patient_lua("SRV004")])
    ok, refused = todays_course("SRV003"), todays_course("SRV004")
    on_rv(site, [*ok.records, *refused.records])

    workers = Workers(server, site, ["w1"], tmp_path)
    try:
        failed = server.prefect("deployment", "run", "incremental-backup/demo-incremental", "--watch")
        assert failed.returncode != 0
        [flow_run] = server.deployment_runs("incremental-backup/demo-incremental")
        assert flow_run["state"]["type"] == "FAILED"
        assert all(uid in flow_run["state"]["message"] for uid in uids(refused))

        site.backup.stop()
        site.backup.lua_scripts = []
        site.backup.start()
        retried = server.prefect("flow-run", "retry", flow_run["id"])
        assert retried.returncode == 0, retried.stdout[-2000:] + retried.stderr[-2000:]
        runs = server.wait_terminal([flow_run["id"]])
    finally:
        workers.stop()
    assert runs[flow_run["id"]]["state"]["type"] == "COMPLETED"
    assert site.backup.sop_instance_uids() == uids(ok) | uids(refused)
    rows = {r.ref.sop_instance_uid: r for r in Ledger.for_state_dir(site.workdir / "state")
            .at(LANE).rows()}
    assert {rows[u].attempts for u in uids(ok)} == {1}, "verified records were not moved again"
    assert {rows[u].state for u in rows} == {"verified"}


@GROUP_A
def test_a_mistyped_site_is_refused_at_trigger_time_naming_the_known_sites(
        server: Server, make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    refused = server.prefect("deployment", "run", "incremental-backup/demo-incremental",
                             "--param", "site=DEMOO")
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "DEMOO" in said and "DEMO" in said.replace("DEMOO", ""), said[-2000:]
    assert server.post("/flow_runs/filter") == [], "no run was created"


@GROUP_A
def test_a_worker_without_radonc_backup_home_fails_the_run_with_one_plain_line(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    server.env.pop("RADONC_BACKUP_HOME")
    workers = Workers(server, site, ["w1"], tmp_path)
    try:
        run = server.prefect("deployment", "run", "incremental-backup/demo-incremental", "--watch")
    finally:
        workers.stop()
    assert run.returncode != 0
    [flow_run] = server.deployment_runs("incremental-backup/demo-incremental")
    assert flow_run["state"]["type"] in {"CRASHED", "FAILED"}
    assert "RADONC_BACKUP_HOME is 'unset': set it in the worker's environment" \
        in workers.submitted("w1")


def _flow_process(run_id: str, timeout: float = 60) -> int:
    """The PID of the process a worker opened for this flow run (found by its environment)."""
    deadline = time.monotonic() + timeout
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "environ").read_bytes():
                    return int(proc.name)
            except OSError:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no process for flow run {run_id}")


@GROUP_B
def test_a_killed_run_ends_crashed_and_mails_the_site_once(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path,
        smtp: tuple[Inbox, int]) -> None:
    """kill -9: the run ends Crashed and its site gets one mail. The automation usually sends
    it within seconds; Prefect's trigger pipeline can miss the event (it did in CI once), so
    crash-notice's 10-minute sweep, run here as its schedule runs it, finds the run and mails
    it if nothing did, and passes it over if the automation did."""
    inbox, port = smtp
    site = make_site()
    add_notify(site, port)
    on_rv(site, todays_course("SRV005").records)
    workers = Workers(server, site, ["w1"], tmp_path)
    try:
        run_id = server.trigger("incremental-backup/demo-incremental")
        os.kill(_flow_process(run_id), signal.SIGKILL)  # the OOM killer, a reboot, kill -9
        runs = server.wait_terminal([run_id], timeout=120)
        deadline = time.monotonic() + 30
        while not inbox.messages and time.monotonic() < deadline:
            time.sleep(0.5)
        by_automation = len(inbox.messages)
        sweep = server.prefect("deployment", "run", "crash-notice/crash-notice", "--watch")
    finally:
        workers.stop()
    assert runs[run_id]["state"]["type"] == "CRASHED"
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-2000:]
    [sweep_run] = [r for r in server.deployment_runs("crash-notice/crash-notice")
                   if not r["parameters"].get("flow_run_id")]
    said = [log["message"] for log in server.post("/logs/filter", {
        "logs": {"flow_run_id": {"any_": [sweep_run["id"]]}}})]
    expected = "mailed already" if by_automation else "mailed"
    assert f"run {run_id}: {expected}" in said, said
    assert len(inbox.messages) == 1, server.story() + workers.submitted("w1")[-3000:]
    [mail] = inbox.messages
    assert "DEMO" in mail["Subject"] and "Crashed" in mail["Subject"], mail["Subject"]
    assert run_id in mail.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "Server^Test" not in mail.as_string() and "Server, Test" not in mail.as_string()
    marks = [log for log in server.post("/logs/filter", {
        "logs": {"flow_run_id": {"any_": [run_id]}}}) if MAIL_SENT in log["message"]]
    assert len(marks) == 1, "the crashed run carries the one mail's line"


@GROUP_B
def test_a_killed_run_gives_its_r_and_v_slots_back_within_its_lease(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """A run killed while holding every association slot of the R&V: the next run gets them
    within slot_lease_seconds plus the server's 15-s sweep, not after Prefect's 300-s default."""
    site = make_site()
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text().replace("max_find_results = 0\n",
                                           "max_find_results = 0\nslot_lease_seconds = 60\n", 1))
    env = {**server.env, "PREFECT_LOGGING_LEVEL": "WARNING"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SLOTS, str(cfg), "hold"], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stderr is not None
    line = holder.stdout.readline()
    assert line.startswith("held"), holder.stderr.read()[-3000:]
    holder.kill()  # the OOM killer, kill -9: no release, no renewal
    holder.wait()
    began = time.monotonic()
    nxt = subprocess.run([sys.executable, "-c", HOLD_SLOTS, str(cfg), "release"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    waited = time.monotonic() - began
    assert nxt.returncode == 0, nxt.stderr[-2000:]
    assert waited < 60 + 15 + 20, f"slots came back after {waited:.0f} s"


def _heartbeats(server: Server, run_id: str) -> int:
    events = server.post("/events/filter", {"filter": {
        "event": {"name": ["prefect.flow-run.heartbeat"]},
        "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 50})
    return len(events["events"])


@GROUP_A
def test_a_run_whose_machine_died_is_marked_crashed_mailed_and_the_next_run_backs_up(
        server: Server, make_site: Callable[..., DemoSite], tmp_path: Path,
        smtp: tuple[Inbox, int]) -> None:
    """A power cut: the worker and the run's process die together, so no worker is left to
    say the run ended and it would stay Running for ever. Its heartbeats stop: crash-notice's
    sweep (every 10 minutes; run here as its schedule runs it) leaves a run that still beats
    alone, marks this one Crashed once three heartbeats were missed and mails it, and the next
    run backs up what the dead one had not."""
    inbox, port = smtp
    site = make_site()
    add_notify(site, port)
    course = todays_course("SRV006")
    on_rv(site, course.all())
    assert "a run without a heartbeat for 90 s (heartbeat every 30 s) is marked Crashed" \
        in server.registered
    holder = hold_rv_slots(server, site)  # the run waits for the R&V: Running, with heartbeats
    box = Workers(server, site, ["w1", "w0"], tmp_path)
    try:
        run_id = server.trigger("incremental-backup/demo-incremental")
        pid = _flow_process(run_id)
        assert b"PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30\0" in Path(f"/proc/{pid}/environ"
                                                                 ).read_bytes()
        server.wait_states([run_id], lambda t: t == ["RUNNING"], timeout=120)
        deadline = time.monotonic() + 30
        while not _heartbeats(server, run_id):
            assert time.monotonic() < deadline, "the run sent no heartbeat"
            time.sleep(0.5)
        alive = server.prefect("deployment", "run", "crash-notice/crash-notice", "--watch")
        assert alive.returncode == 0, alive.stdout[-3000:] + alive.stderr[-2000:]
        server.wait_states([run_id], lambda t: t == ["RUNNING"], timeout=5)  # still beating
        for proc in box.procs:  # the machine goes: worker and run at once, nothing says so
            os.killpg(proc.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        for proc in box.procs:
            proc.wait(30)
        killed = time.monotonic()
    finally:
        release(holder)
    server.wait_states([run_id], lambda t: t == ["RUNNING"], timeout=5)  # nothing said it
    time.sleep(max(0.0, 95 - (time.monotonic() - killed)))  # three intervals, and a little
    box = Workers(server, site, ["w2"], tmp_path)  # the machine is back
    try:
        sweep = server.prefect("deployment", "run", "crash-notice/crash-notice", "--watch")
        runs = server.wait_terminal([run_id], timeout=10)
        again = server.prefect("deployment", "run", "incremental-backup/demo-incremental",
                               "--watch")
    finally:
        box.stop()
    state = runs[run_id]["state"]
    assert state["type"] == "CRASHED", state
    assert state["message"].startswith("no heartbeat for "), state["message"]
    assert "the run's process or its machine died" in state["message"]
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-2000:]
    first, last = [[log["message"] for log in server.post("/logs/filter", {
        "logs": {"flow_run_id": {"any_": [r["id"]]}}})]
        for r in server.deployment_runs("crash-notice/crash-notice")
        if not r["parameters"].get("flow_run_id")]  # the sweeps, not the automation's runs
    assert not any("marked" in line for line in first), ["a live run is left alone", first]
    assert any(f"run {run_id}: no heartbeat for" in line and "marked Crashed" in line
               for line in last), last
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert len(inbox.messages) == 2, [str(m["Subject"]) for m in inbox.messages]
    [mail, cleared] = inbox.messages  # the crash, then the next run that completed
    assert "DEMO" in mail["Subject"] and "Crashed" in mail["Subject"], mail["Subject"]
    assert run_id in mail.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert cleared["Subject"].startswith("[RadOnc Backup] Cleared: incremental-backup"), \
        cleared["Subject"]
    assert site.backup.sop_instance_uids() >= uids(course)
    rows = Ledger.for_state_dir(site.workdir / "state").at(LANE).rows()
    assert {r.ref.sop_instance_uid for r in rows} == uids(course)
    assert {r.state for r in rows} == {"verified"}


@GROUP_B
def test_a_shell_run_that_dies_is_marked_crashed_by_the_sweep(
        server: Server, make_site: Callable[..., DemoSite]) -> None:
    """``python -m flows.incremental_backup`` on the server, killed with -9 while it waits for
    the R&V: it carried the heartbeat tag and beat, so crash-notice's sweep marks it Crashed
    (here with a one-second interval, so the test need not wait three of the real 30 s)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.crash_notice import HEARTBEAT_TAG, mark_dead_runs

    site = make_site()
    on_rv(site, todays_course("SRV008").all())
    holder = hold_rv_slots(server, site)  # the run waits for the R&V: Running, beating
    proc = subprocess.Popen([sys.executable, "-m", "flows.incremental_backup", "--site", "DEMO",
                             "--config", str(site.config_path)], cwd=ROOT,
                            env={**server.env, "RADONC_DEMO_BACKUP_PASSWORD": site.backup.password},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline, runs = time.monotonic() + 90, []
        while not runs:
            assert time.monotonic() < deadline and proc.poll() is None, "no Running shell run"
            runs = server.post("/flow_runs/filter", {"flow_runs": {
                "state": {"type": {"any_": ["RUNNING"]}}, "tags": {"all_": [HEARTBEAT_TAG]}}})
            time.sleep(0.5)
        [run] = runs
        assert run["deployment_id"] is None, "a shell run, not a deployment's"
        while not _heartbeats(server, run["id"]):
            assert time.monotonic() < deadline + 40, "the shell run sent no heartbeat"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        release(holder)
    time.sleep(4)  # three missed one-second intervals, and a little
    with temporary_settings(updates={PREFECT_API_URL: server.api}), \
            get_client(sync_client=True) as client:
        said = mark_dead_runs(client, 1)
    assert any(run["id"] in line and "marked Crashed" in line for line in said), said
    [state] = [r["state"] for r in server.post("/flow_runs/filter", {"flow_runs": {
        "id": {"any_": [run["id"]]}}})]
    assert state["type"] == "CRASHED" and "no heartbeat" in state["message"], state
