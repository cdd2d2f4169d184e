"""The incremental and nightly flows end to end: real Orthanc pair, real Prefect harness.

Times are given to the flows through their ``now`` parameter, in the DEMO site's timezone
(America/New_York), so windows, midnight and late writes are exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, \
    FlowRunFilterId
from pydicom.dataset import Dataset

from demo.site import DemoSite
from demo.synthetic import Course, Patient, make_course, to_bytes
from flows.incremental_backup import incremental_backup
from flows.nightly_backup import nightly_backup
from radonc_backup.ledger import Lane, Ledger
from tests.conftest import missed

pytestmark = pytest.mark.usefixtures("prefect")

NY = ZoneInfo("America/New_York")
LANE = Lane("DEMO", "aria", "orthanc")
DAY = datetime(2026, 11, 20)


def at(day_offset: int, hour: int, minute: int = 0) -> datetime:
    """Local wall-clock time relative to DAY (naive, as R&V systems stamp records)."""
    return DAY + timedelta(days=day_offset, hours=hour, minutes=minute)


def run(flow: Any, site: DemoSite, local_now: datetime, **params: Any) -> Any:
    return flow(site="DEMO", config=str(site.config_path), now=local_now.replace(tzinfo=NY),
                return_state=True, **params)


def course(pid: str, first: datetime, delivered: int = 0) -> Course:
    return make_course(Patient(pid, f"Test^{pid}"), first, delivered=delivered, slices=2)


def push(site: DemoSite, *records: Dataset) -> None:
    site.rv.upload([to_bytes(r) for r in records])


def wait_for_arrivals(site: DemoSite, count: int, timeout: float = 60) -> None:
    """Until the backup holds ``count`` instances (a move is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if site.backup.instance_count() >= count:
                return
        except Exception:  # the backup may be starting
            pass
        time.sleep(0.05)


def ledger(site: DemoSite) -> Ledger:
    return Ledger(Path(site.workdir) / "state" / "ledger.sqlite")


def uids(*records: Dataset) -> set[str]:
    return {str(r.SOPInstanceUID) for r in records}


def task_run_counts(flow_run_id: Any) -> dict[str, int]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    counts: dict[str, int] = {}
    for tr in runs:
        name = tr.name.rsplit("-", 1)[0]
        counts[name] = counts.get(name, 0) + tr.run_count
    return counts


def test_first_run_backs_up_the_window_and_a_second_run_moves_nothing(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site(settings={"window_overlap_minutes": 600})
    c = course("E2E001", at(-4, 8), delivered=5)  # days -4 .. 0 at 08:00
    push(site, *c.records)

    state = run(incremental_backup, site, at(0, 16))
    assert state.is_completed(), state.message
    summary = state.result()
    in_window = uids(*c.records[-2:])  # lookback 1 day: yesterday and today
    assert summary["found"] == 2 and summary["moved"] == 2 and summary["verified"] == 2
    assert site.backup.sop_instance_uids() == in_window
    rows = {r.ref.sop_instance_uid: r for r in ledger(site).rows(LANE)}
    assert set(rows) == in_window and {r.state for r in rows.values()} == {"verified"}

    again = run(incremental_backup, site, at(0, 16, 5))
    assert again.is_completed()
    second = again.result()
    assert second["already_verified"] == 1 and second["moved"] == 0 and second["new"] == 0
    assert site.backup.instance_count() == 2

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(again.state_details.flow_run_id)
        assert flow_run.state.is_completed() and flow_run.parameters["site"] == "DEMO"
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["incremental-backup-demo-aria"])))
    assert any("| 1 | 0 | 1 | 0 | 0 | 0 | 0 | 0 |" in str(a.data) for a in artifacts)


def test_overlap_midnight_and_late_writes_are_all_backed_up(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site(settings={"window_overlap_minutes": 30})
    a, b, c, e, f = (course(f"E2E1{i}", at(-10, 8)) for i in range(5))
    first = a.add_record(at(0, 23, 40))
    push(site, first)
    assert run(incremental_backup, site, at(0, 23, 50)).is_completed()

    in_overlap = b.add_record(at(0, 23, 45))  # written after the run that covered 23:45
    before_midnight = c.add_record(at(0, 23, 58))
    after_midnight = e.add_record(at(1, 0, 5))
    push(site, in_overlap, before_midnight, after_midnight)
    state = run(incremental_backup, site, at(1, 0, 10))
    assert state.is_completed()
    assert state.result()["window"] == "2026-11-20 23:20:00 to 2026-11-21 00:10:00"
    assert uids(in_overlap, before_midnight, after_midnight) <= site.backup.sop_instance_uids()

    late = f.add_record(at(0, 20, 0))  # written hours after its session
    push(site, late)
    assert run(incremental_backup, site, at(1, 0, 20)).is_completed()
    assert late.SOPInstanceUID not in site.backup.sop_instance_uids()

    nightly = run(nightly_backup, site, at(1, 2, 0), days=1)
    assert nightly.is_completed(), nightly.message
    assert nightly.result()["moved"] == 1
    everything = uids(first, in_overlap, before_midnight, after_midnight, late)
    assert site.backup.sop_instance_uids() == everything
    assert {r.ref.sop_instance_uid for r in ledger(site).rows(LANE, "verified")} == everything


SLOW_BACKUP = ("function ReceivedInstanceFilter(dicom, origin, info)\n"
               "  local t = os.clock()\n  while os.clock() - t < 0.4 do end\n"
               "  return true\nend\n")


def test_backup_stopped_mid_run_loses_nothing_and_duplicates_nothing(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site(backup_lua=[SLOW_BACKUP], settings={"batch_size": 2})
    c = course("E2E200", at(-10, 8))
    records = [c.add_record(at(0, 8, 10 * i)) for i in range(8)]
    push(site, *records)

    def stop_after_first_arrivals() -> None:
        wait_for_arrivals(site, 2)
        site.backup.stop()

    stopper = threading.Thread(target=stop_after_first_arrivals)
    stopper.start()
    state = run(incremental_backup, site, at(0, 16))
    stopper.join()
    assert state.is_failed()
    assert f"backup orthanc unreachable during the move from RV_DEMO@127.0.0.1:" \
        in str(state.result(raise_on_failure=False))
    rows = ledger(site).rows(LANE)
    verified = {r.ref.sop_instance_uid for r in rows if r.state == "verified"}
    assert len(verified) < 8 and len(rows) == 8

    site.backup.start()
    held_after_restart = site.backup.sop_instance_uids()
    assert verified <= held_after_restart  # nothing marked verified that is not there

    state = run(incremental_backup, site, at(0, 16, 10))
    assert state.is_completed(), state.message
    assert state.result()["retried_from_earlier"] + state.result()["already_verified"] >= 1
    assert missed(site, uids(*records)) == (0, 0)
    assert site.backup.instance_count() == 8
    assert site.backup.sop_instance_uids() == uids(*records)
    assert {r.state for r in ledger(site).rows(LANE)} == {"verified"}


def test_unreachable_rv_fails_with_site_and_ae_and_keeps_the_watermark(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    push(site, course("E2E300", at(0, 8), delivered=1).records[0])
    assert run(incremental_backup, site, at(0, 16)).is_completed()
    mark = ledger(site).watermark(LANE)

    site.rv.kill()
    state = run(incremental_backup, site, at(0, 16, 10))
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "site DEMO" in message and "RV_DEMO@127.0.0.1" in message
    assert ledger(site).watermark(LANE) == mark
    assert task_run_counts(state.state_details.flow_run_id)["find-rt-records"] == 2  # retried


def test_rv_rejecting_our_ae_is_not_retried_and_keeps_the_watermark(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text().replace('script_ae = "RADONC_BACKUP"',
                                           'script_ae = "UNKNOWN_SCU"'))
    state = run(incremental_backup, site, at(0, 16))
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "site DEMO" in message and "RV_DEMO" in message
    assert "calling AE title not recognised" in message and "UNKNOWN_SCU" in message
    assert ledger(site).watermark(LANE) is None
    assert task_run_counts(state.state_details.flow_run_id)["find-rt-records"] == 1


def refuse_patient_lua(patient_id: str) -> str:
    return ("function ReceivedInstanceFilter(dicom, origin, info)\n"
            f"  if dicom.PatientID == '{patient_id}' then return false end\n"
            "  return true\nend\n")


def test_refused_objects_are_failed_reported_and_retried_later(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site(backup_lua=[refuse_patient_lua("E2E401")])
    ok, refused = course("E2E400", at(-1, 9), delivered=2), course("E2E401", at(-1, 10),
                                                                  delivered=2)
    push(site, *ok.records, *refused.records)

    state = run(incremental_backup, site, at(0, 16))
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "2 RT Record(s) from aria not verified in backup orthanc" in message
    assert all(uid in message for uid in uids(*refused.records))
    failed = {r.ref.sop_instance_uid: r for r in ledger(site).rows(LANE, "failed")}
    assert set(failed) == uids(*refused.records)
    assert all("not found in backup orthanc (BACKUP_DEMO)" in r.last_error and "C-MOVE status"
               in r.last_error for r in failed.values())
    assert site.backup.sop_instance_uids() == uids(*ok.records)

    site.backup.stop()
    site.backup.lua_scripts = []
    site.backup.start()
    state = run(incremental_backup, site, at(0, 16, 10))
    assert state.is_completed(), state.message
    assert state.result()["retried_from_earlier"] == 2
    assert site.backup.sop_instance_uids() == uids(*ok.records, *refused.records)


def test_mim_source_is_fetched_by_c_get_and_relayed(make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    cfg = Path(site.config_path)
    text = cfg.read_text()
    rv_port = site.rv.dicom_port
    cfg.write_text(text + f'\n[DEMO.sources.mim]\ntype = "mim"\naet = "{site.rv.aet}"\n'
                          f'ip = "127.0.0.1"\nport = {rv_port}\n')
    c = course("E2E500", at(-1, 9), delivered=2)
    push(site, *c.records)
    state = run(incremental_backup, site, at(0, 16), source="mim")
    assert state.is_completed(), state.message
    assert state.result()["verified"] == 2
    assert site.backup.sop_instance_uids() == uids(*c.records)
    mim_lane = Lane("DEMO", "mim", "orthanc")
    assert {r.state for r in ledger(site).rows(mim_lane)} == {"verified"}


def test_dicom_scp_target_is_verified_by_c_find(make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text() + f'\n[DEMO.backup_targets.scp]\ntype = "dicom_scp"\n'
                                     f'aet = "{site.backup.aet}"\nip = "127.0.0.1"\n'
                                     f'port = {site.backup.dicom_port}\n')
    c = course("E2E600", at(-1, 9), delivered=2)
    push(site, *c.records)
    state = run(incremental_backup, site, at(0, 16), backup="scp")
    assert state.is_completed(), state.message
    assert state.result()["verified"] == 2
    scp_lane = Lane("DEMO", "aria", "scp")
    assert {r.ref.sop_instance_uid for r in ledger(site).rows(scp_lane, "verified")} == \
        uids(*c.records)


def test_waits_for_a_plain_scp_backup_overlap_across_batches(
        make_site: Callable[..., DemoSite]) -> None:
    """A plain SCP backup may index what it received later, so it is asked again until
    verify_timeout: once for the whole run, not batch after batch (5 refused one-record batches
    took at least 5 x verify_timeout before)."""
    timeout = 6.0
    refuse = ("function ReceivedInstanceFilter(dicom, origin, info)\n"
              "  return string.find(dicom.PatientID, 'REF', 1, true) == nil\nend\n")
    site = make_site(settings={"verify_timeout": timeout, "batch_size": 1}, backup_lua=[refuse])
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text() + f'\n[DEMO.backup_targets.scp]\ntype = "dicom_scp"\n'
                                     f'aet = "{site.backup.aet}"\nip = "127.0.0.1"\n'
                                     f'port = {site.backup.dicom_port}\n')
    ok = course("E2E610", at(-1, 9), delivered=2)
    refused = [course(f"E2E61REF{n}", at(0, 8 + n), delivered=1) for n in range(5)]
    push(site, *ok.records, *(r for c in refused for r in c.records))
    started = time.monotonic()
    state = run(incremental_backup, site, at(0, 16), backup="scp", backfill=False)
    elapsed = time.monotonic() - started
    assert state.is_failed()
    message = str(state.message)
    refused_uids = {u for c in refused for u in uids(*c.records)}
    assert len(refused_uids) == 5 and all(u in message for u in refused_uids), message
    scp_lane = Lane("DEMO", "aria", "scp")
    rows = ledger(site).rows(scp_lane)
    assert {r.ref.sop_instance_uid for r in rows if r.state == "verified"} == uids(*ok.records)
    failed = {r.ref.sop_instance_uid: r.last_error for r in rows if r.state == "failed"}
    assert set(failed) == refused_uids
    assert all(why.startswith("not found in backup scp") for why in failed.values()), failed
    counts = task_run_counts(state.state_details.flow_run_id)
    assert counts["move-batch"] == 7 and counts["settle-moves"] == 1
    assert elapsed < 4 * timeout, f"{elapsed:.1f} s: the waits did not overlap"
    assert missed(site, uids(*ok.records)) == (0, 0)


def test_backup_password_from_a_prefect_secret_block(make_site: Callable[..., DemoSite]) -> None:
    from prefect.blocks.system import Secret

    site = make_site()
    Secret(value=site.backup.password).save("demo-backup-password", overwrite=True)
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text().replace('password_env = "RADONC_DEMO_BACKUP_PASSWORD"',
                                           'password_secret = "demo-backup-password"'))
    c = course("E2E700", at(-1, 9), delivered=1)
    push(site, *c.records)
    state = run(incremental_backup, site, at(0, 16))
    assert state.is_completed(), state.message
    assert site.backup.sop_instance_uids() == uids(*c.records)


def test_a_record_in_the_last_fraction_of_a_second_of_a_day_is_backed_up(
        make_site: Callable[..., DemoSite]) -> None:
    """TM allows fractions: 23:59:59.6 was outside every window when a day's query ended at
    235959; the incremental queries now reach to 235959.999999 (and Orthanc matches that)."""
    site = make_site(settings={"window_overlap_minutes": 30})
    c = course("E2E090", at(-1, 8))
    assert run(incremental_backup, site, at(0, 23, 50), backfill=False).is_completed()
    late = c.add_record(at(0, 23, 59) + timedelta(seconds=59))
    late.TreatmentTime = "235959.6"
    early = c.add_record(at(1, 0, 0))
    early.TreatmentTime = "000000.000001"
    push(site, late, early)
    state = run(incremental_backup, site, at(1, 0, 10), backfill=False)
    assert state.is_completed(), state.message
    assert uids(late, early) <= site.backup.sop_instance_uids()
    assert missed(site, uids(late, early)) == (0, 0)
    assert {r.ref.sop_instance_uid: r.state for r in ledger(site).rows(LANE)} == {
        str(late.SOPInstanceUID): "verified", str(early.SOPInstanceUID): "verified"}


def test_backup_down_mid_move_is_retried_within_the_run(
        make_site: Callable[..., DemoSite]) -> None:
    """The backup restarts (an update, a reboot) while a batch moves: the batch is retried in
    the same run, which ends Completed with everything verified."""
    site = make_site(backup_lua=[SLOW_BACKUP], settings={
        "batch_size": 2, "retries": 6, "retry_backoff_seconds": 1})
    c = course("E2E201", at(-10, 8))
    records = [c.add_record(at(0, 8, 10 * i)) for i in range(6)]
    push(site, *records)

    def restart_after_first_arrivals() -> None:
        wait_for_arrivals(site, 1)
        site.backup.stop()
        time.sleep(2)
        site.backup.start()

    restarter = threading.Thread(target=restart_after_first_arrivals)
    restarter.start()
    state = run(incremental_backup, site, at(0, 16), backfill=False)
    restarter.join()
    assert state.is_completed(), state.message
    assert site.backup.sop_instance_uids() == uids(*records)
    assert {r.state for r in ledger(site).rows(LANE)} == {"verified"}
    assert task_run_counts(state.state_details.flow_run_id)["move-batch"] > 3, "a batch retried"
    assert missed(site, uids(*records)) == (0, 0)


def test_the_nightly_asks_per_patient_for_records_no_date_query_can_find(
        make_site: Callable[..., DemoSite]) -> None:
    """An RT Record with an empty TreatmentDate (Type 2: legal) matches no date query. The
    nightly asks each recent patient for all of their records, and finds it (an untimed record
    of a split day is the other case: tests/test_dicom_net.py, against a silently capping SCP)."""
    site = make_site()
    a, b = course("E2E300", at(-10, 8)), course("E2E301", at(-10, 8))
    timed = [a.add_record(at(0, 8)), a.add_record(at(0, 9)), b.add_record(at(0, 8, 30)),
             b.add_record(at(0, 9, 30))]
    untimed = a.add_record(at(0, 10))
    del untimed.TreatmentTime
    undated = b.add_record(at(0, 11))
    undated.TreatmentDate = ""
    push(site, *timed, untimed, undated)

    state = run(nightly_backup, site, at(1, 5), days=1, backfill=False)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["patients_asked"] == 2
    assert str(undated.SOPInstanceUID) in summary["found_by_patient"]
    assert "TreatmentDate (empty)" in summary["found_by_patient"][str(undated.SOPInstanceUID)]
    assert site.backup.sop_instance_uids() == uids(*timed, untimed, undated)
    assert {r.state for r in ledger(site).rows(LANE)} == {"verified"}
    assert missed(site, uids(*timed, untimed, undated)) == (0, 0)

    again = run(nightly_backup, site, at(1, 5, 10), days=1, backfill=False)
    assert again.is_completed() and again.result()["found_by_patient"] == {}
    assert again.result()["moved"] == 0

    # The nightly keeps a dated copy of the ledger: a lost ledger is a day old, not gone.
    [copy] = (Path(site.workdir) / "state" / "ledger-copies").glob("ledger-*.sqlite")
    assert copy.name == "ledger-20261121.sqlite"
    assert {r.ref.sop_instance_uid for r in Ledger(copy).rows(LANE, "verified")} == \
        uids(*timed, untimed, undated)


def test_a_lost_ledger_catches_up_on_records_that_had_failed_before(
        make_site: Callable[..., DemoSite]) -> None:
    """Records failed for days, then the ledger was lost: a new ledger for a lane whose backup
    already holds RT Records is not a first run. The run looks back catch_up_days, says so,
    moves what the backup lacks and nothing it holds."""
    site = make_site(settings={"catch_up_days": 10})
    c = course("E2E400", at(-10, 8))
    failed_earlier = [c.add_record(at(-d, 8)) for d in (5, 4, 3)]
    backed_up = c.add_record(at(-1, 8))
    push(site, *failed_earlier, backed_up)
    site.backup.upload([to_bytes(backed_up)])  # what the lost ledger had verified

    state = run(incremental_backup, site, at(0, 16), backfill=False)
    assert state.is_completed(), state.message
    summary = state.result()
    assert "looked back 10 whole days" in summary["catch_up"]
    assert summary["found"] == 4 and summary["already_in_backup"] == 1
    assert summary["moved"] == 3
    assert site.backup.sop_instance_uids() == uids(*failed_earlier, backed_up)
    assert missed(site, uids(*failed_earlier, backed_up)) == (0, 0)

    again = run(incremental_backup, site, at(0, 16, 10), backfill=False)
    assert again.result()["catch_up"] == "", "only the first run of a new ledger catches up"
