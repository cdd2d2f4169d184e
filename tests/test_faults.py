"""Faults that once let a record, an object or a patient drop out with exit 0 (issue "Nothing
missed with exit 0", docs/reliability.md): each runs the real flows against real Orthanc
processes, recovers as an operator would, and holds the same three numbers at zero
(tests.conftest.three_numbers): instances on the source not verified in the backup, ledger rows
verified without the instance in the backup, report rows missing against the truth.

Cases proved elsewhere, because they need another harness: a killed run's crash e-mail and its
R&V slots (tests/test_prefect_server.py, a real server and worker), a failed plan-context
subflow's exit code (tests/test_cli.py), window arithmetic (tests/test_windows.py, hypothesis),
an untimed record of a split day against a silently capping peer (tests/test_dicom_net.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from demo.site import DemoSite
from demo.synthetic import Patient, make_course, to_bytes
from flows.incremental_backup import incremental_backup
from flows.nightly_backup import nightly_backup
from radonc_backup.ledger import Lane, Ledger
from tests.conftest import three_numbers
from tests.qr_scp import StrictQRSCP, add_source
from tests.test_backup_flows import LANE, at, course, ledger, push, run, task_run_counts, uids, \
    wait_for_arrivals

pytestmark = pytest.mark.usefixtures("prefect")

SLOW_BACKUP = ("function ReceivedInstanceFilter(dicom, origin, info)\n"
               "  local t = os.clock()\n  while os.clock() - t < 0.4 do end\n"
               "  return true\nend\n")
TODAY = at(0, 0).date()


def test_a_patient_mid_course_in_an_old_study_is_in_the_report(
        make_site: Callable[..., DemoSite]) -> None:
    """Case 1: the report cut studies older than 30 days before its window. Three patients at
    fraction 30, treated today, in a study 43 days old, and one who finished last week."""
    site = make_site()
    courses = [course(f"E2E05{n}", at(-29, 8 + n), delivered=30) for n in range(3)]
    done = course("E2E059", at(-40, 8), delivered=35)
    records = [r for c in [*courses, done] for r in c.records]
    push(site, *records)
    state = run(nightly_backup, site, at(1, 5), days=45, backfill=False)
    assert state.is_completed(), state.message
    assert three_numbers(site, records, TODAY) == (0, 0, 0)


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
    assert "backup orthanc unreachable during the move from RV_DEMO@127.0.0.1:" \
        in str(state.result(raise_on_failure=False))
    rows = ledger(site).at(LANE).rows()
    verified = {r.ref.sop_instance_uid for r in rows if r.state == "verified"}
    assert len(verified) < 8 and len(rows) == 8

    site.backup.start()
    held_after_restart = site.backup.sop_instance_uids()
    assert verified <= held_after_restart  # nothing marked verified that is not there

    state = run(incremental_backup, site, at(0, 16, 10))
    assert state.is_completed(), state.message
    assert state.result()["retried_from_earlier"] + state.result()["already_verified"] >= 1
    assert three_numbers(site, records, TODAY) == (0, 0, 0)
    assert site.backup.instance_count() == 8
    assert site.backup.sop_instance_uids() == uids(*records)
    assert {r.state for r in ledger(site).at(LANE).rows()} == {"verified"}


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
    rows = ledger(site).at(scp_lane).rows()
    assert {r.ref.sop_instance_uid for r in rows if r.state == "verified"} == uids(*ok.records)
    failed = {r.ref.sop_instance_uid: r.last_error for r in rows if r.state == "failed"}
    assert set(failed) == refused_uids
    assert all(why.startswith("not found in backup scp") for why in failed.values()), failed
    counts = task_run_counts(state.state_details.flow_run_id)
    assert counts["move-batch"] == 7 and counts["settle-moves"] == 1
    assert elapsed < 4 * timeout, f"{elapsed:.1f} s: the waits did not overlap"

    site.backup.stop()  # the PACS administrator lifts the filter
    site.backup.lua_scripts = []
    site.backup.start()
    later = run(incremental_backup, site, at(0, 16, 10), backup="scp", backfill=False)
    assert later.is_completed(), later.message
    assert later.result()["retried_from_earlier"] == 5
    records = [*ok.records, *(r for c in refused for r in c.records)]
    assert three_numbers(site, records, TODAY) == (0, 0, 0)


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
    assert three_numbers(site, [*c.records, late, early], TODAY + timedelta(days=1)) == (0, 0, 0)
    assert {r.ref.sop_instance_uid: r.state for r in ledger(site).at(LANE).rows()} == {
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
    assert {r.state for r in ledger(site).at(LANE).rows()} == {"verified"}
    assert task_run_counts(state.state_details.flow_run_id)["move-batch"] > 3, "a batch retried"
    assert three_numbers(site, records, TODAY) == (0, 0, 0)


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
    assert {r.state for r in ledger(site).at(LANE).rows()} == {"verified"}
    assert three_numbers(site, [*timed, untimed, undated], TODAY) == (0, 0, 0)

    again = run(nightly_backup, site, at(1, 5, 10), days=1, backfill=False)
    assert again.is_completed() and again.result()["found_by_patient"] == {}
    assert again.result()["moved"] == 0

    # The nightly keeps a dated copy of the ledger: a lost ledger is a day old, not gone.
    [copy] = (Path(site.workdir) / "state" / "ledger-copies").glob("ledger-*.sqlite")
    assert copy.name == "ledger-20261121.sqlite"
    assert {r.ref.sop_instance_uid for r in Ledger(copy).at(LANE).rows("verified")} == \
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
    assert three_numbers(site, [*failed_earlier, backed_up], TODAY) == (0, 0, 0)

    again = run(incremental_backup, site, at(0, 16, 10), backfill=False)
    assert again.result()["catch_up"] == "", "only the first run of a new ledger catches up"



def test_the_next_incremental_walks_contexts_a_killed_run_left_unwalked(
        make_site: Callable[..., DemoSite]) -> None:
    """A run killed after verifying its records and before walking their plans: the next
    10-minute run, with nothing new to back up, still walks those contexts."""
    site = make_site()
    now = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)
    c = make_course(Patient("CTX900", "Killed^Walk"), now - timedelta(hours=5), delivered=1,
                    slices=2)
    site.rv.upload([to_bytes(ds) for ds in c.all()])
    first = incremental_backup(site="DEMO", config=str(site.config_path), backfill=False,
                               return_state=True)  # as if killed before its subflow
    assert first.is_completed() and first.result()["verified"] == 1
    assert site.backup.sop_instance_uids() == {c.records[0].SOPInstanceUID}

    second = incremental_backup(site="DEMO", config=str(site.config_path), return_state=True)
    assert second.is_completed(), second.message
    assert second.result()["found"] == 0 and second.result()["moved"] == 0  # nothing new
    assert second.result()["plan_context"] == "Completed"
    assert site.backup.sop_instance_uids() == {ds.SOPInstanceUID for ds in c.all()}

    assert three_numbers(site, c.records, now.date(), others=c.context()) == (0, 0, 0)

    third = incremental_backup(site="DEMO", config=str(site.config_path), return_state=True)
    assert third.result()["plan_context"] == "nothing new"


def test_a_silently_capping_peer_loses_no_record_when_a_day_is_split(
        make_site: Callable[..., DemoSite]) -> None:
    """Case 3: a peer that stops at 5 matches without saying so. The day's 7 records are asked
    again in halves; the record at 11:59:59.5 sits on the halves' boundary, and the one without
    a TreatmentTime matches no time range: the nightly's per-patient pass finds it."""
    site = make_site(extra_backup_modalities={"CAPPED_RV": ("CAPPED_RV", "127.0.0.1", 1)})
    a, b, c = (course(f"E2E80{n}", at(-10, 8)) for n in range(3))
    untimed = a.add_record(at(0, 7, 20))
    del untimed.TreatmentTime
    boundary = b.add_record(at(0, 11, 59) + timedelta(seconds=59))
    boundary.TreatmentTime = "115959.5"
    records = [a.add_record(at(0, 7)), a.add_record(at(0, 7, 10)), untimed, boundary,
               b.add_record(at(0, 13)), c.add_record(at(0, 15)), c.add_record(at(0, 16))]
    server = StrictQRSCP("CAPPED_RV", records,
                         {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}, cap=5)
    add_source(site, server, "capped", max_find_results=5)
    with server:
        state = run(nightly_backup, site, at(1, 5), days=1, source="capped", backfill=False)
    assert state.is_completed(), state.message
    # The cut whole-day answer may hide untimed records its time ranges cannot show: said so,
    # and the per-patient pass (or the cut answer itself) holds the untimed one.
    assert any("without a time" in u for u in state.result()["unproven"]), state.result()
    assert state.name == "Completed (unproven)", state.name  # not a plain Completed (exit 3)
    assert three_numbers(site, records, TODAY) == (0, 0, 0)


def test_a_failed_plan_context_is_not_completed_and_the_next_run_completes_it(
        make_site: Callable[..., DemoSite]) -> None:
    """Case 7: the records are safe but a plan's CT is not on the R&V: the run ends
    'Completed (context incomplete)', not Completed; once the CT is there, an incremental run
    with nothing new completes the context, once it was last walked context_retry_minutes
    (60) ago."""
    site = make_site()
    now = datetime.now(ZoneInfo("America/New_York")).replace(tzinfo=None)
    c = make_course(Patient("E2E900", "Context^Incomplete"), now - timedelta(hours=5),
                    delivered=1, slices=2)
    site.rv.upload([to_bytes(ds) for ds in c.all() if ds not in c.images.instances])
    first = incremental_backup(site="DEMO", config=str(site.config_path), return_state=True)
    assert first.name == "Completed (context incomplete)", (first.name, first.message)
    assert first.result()["verified"] == 1

    site.rv.upload([to_bytes(ds) for ds in c.images.instances])
    soon = incremental_backup(site="DEMO", config=str(site.config_path), return_state=True)
    assert soon.result()["plan_context"] == "nothing new", "walked again after an hour"
    later = datetime.now(ZoneInfo("UTC")) + timedelta(minutes=61)
    second = incremental_backup(site="DEMO", config=str(site.config_path), now=later,
                                return_state=True)
    assert second.name == "Completed" and second.result()["plan_context"] == "Completed"
    assert three_numbers(site, c.records, now.date(), others=c.context()) == (0, 0, 0)
