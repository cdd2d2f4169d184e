"""The incremental and nightly flows end to end: real Orthanc pair, real Prefect harness.

Times are given to the flows through their ``now`` parameter, in the DEMO site's timezone
(America/New_York), so windows, midnight and late writes are exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, \
    ArtifactFilterKey, ArtifactFilterType, FlowRunFilter, FlowRunFilterId
from pydicom.dataset import Dataset

from demo.site import DemoSite
from demo.synthetic import Course, Patient, make_course, to_bytes
from flows.incremental_backup import incremental_backup
from flows.nightly_backup import nightly_backup
from radonc_backup.ledger import Lane, Ledger

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
    # A new ledger catches up catch_up_days (62), not lookback_days: all five fractions.
    in_window = uids(*c.records)
    assert summary["found"] == 5 and summary["moved"] == 5 and summary["verified"] == 5
    assert "looked back 62 whole days" in summary["catch_up"]
    assert site.backup.sop_instance_uids() == in_window
    rows = {r.ref.sop_instance_uid: r for r in ledger(site).at(LANE).rows()}
    assert set(rows) == in_window and {r.state for r in rows.values()} == {"verified"}

    again = run(incremental_backup, site, at(0, 16, 5))
    assert again.is_completed()
    second = again.result()
    assert second["already_verified"] == 1 and second["moved"] == 0 and second["new"] == 0
    assert second["catch_up"] == "", "only a new ledger's first run catches up"
    assert site.backup.instance_count() == 5

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
    assert {r.ref.sop_instance_uid for r in ledger(site).at(LANE).rows("verified")} == everything


def test_unreachable_rv_fails_with_site_and_ae_and_keeps_the_watermark(
        make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    push(site, course("E2E300", at(0, 8), delivered=1).records[0])
    assert run(incremental_backup, site, at(0, 16)).is_completed()
    mark = ledger(site).at(LANE).watermark()

    site.rv.kill()
    state = run(incremental_backup, site, at(0, 16, 10))
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "site DEMO" in message and "RV_DEMO@127.0.0.1" in message
    assert ledger(site).at(LANE).watermark() == mark
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
    assert ledger(site).at(LANE).watermark() is None
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
    failed = {r.ref.sop_instance_uid: r for r in ledger(site).at(LANE).rows("failed")}
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
    assert {r.state for r in ledger(site).at(mim_lane).rows()} == {"verified"}


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
    assert {r.ref.sop_instance_uid for r in ledger(site).at(scp_lane).rows("verified")} == \
        uids(*c.records)


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


def test_a_nightly_over_many_days_shows_its_progress(make_site: Callable[..., DemoSite]) -> None:
    """A long search (a nightly over weeks) has a progress artifact in the UI, not silence."""
    site = make_site()
    record = course("E2E900", at(-5, 8), delivered=1).records[0]
    push(site, record)
    state = run(nightly_backup, site, at(1, 2, 0), days=10)
    assert state.is_completed(), state.message
    assert record.SOPInstanceUID in site.backup.sop_instance_uids()
    with get_client(sync_client=True) as client:
        shown = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    [windows] = [a for a in shown if "date windows asked of RV_DEMO" in str(a.description)]
    assert float(windows.data) == 100.0  # type: ignore[arg-type]
    done, _, total = str(windows.description).split(": ", 1)[1].split()[:3]
    assert done == total and int(total) >= 10, windows.description
