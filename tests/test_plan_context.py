"""Plan-context backfill end to end: real Orthanc pair, synthetic patients, Prefect harness."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from demo.site import DemoSite
from demo.synthetic import Patient, Series, Study, make_image_series, make_rtdose, \
    make_rtplan, make_rtstruct, make_treatment_record, to_bytes, uid
from flows.incremental_backup import incremental_backup
from flows.plan_context_backfill import plan_context_backfill, read_mrns
from radonc_backup.ledger import Lane, Ledger

pytestmark = pytest.mark.usefixtures("prefect")

NY = ZoneInfo("America/New_York")
LANE = Lane("DEMO", "aria", "orthanc")
TODAY = datetime(2026, 11, 20, 16, 0)


class Scenario:
    """One patient: a shared CT, an extra MR, plan A and its revision B (own structure sets),
    a dose per plan, fractions 1-3 on A and 4-6 on B."""

    def __init__(self, pid: str, ct_slices: int = 6) -> None:
        self.study = Study(Patient(pid, f"Context^{pid}"), study_date="20261101")
        self.ct = make_image_series(self.study, "ct", slices=ct_slices)
        self.mr = make_image_series(self.study, "mr", slices=3, modality="MR")
        self.struct_a = make_rtstruct(self.study, self.ct, key="ssA")
        self.struct_b = make_rtstruct(self.study, self.ct, key="ssB", also=[self.mr])
        self.plan_a = make_rtplan(self.study, self.struct_a, self.ct.frame_of_reference_uid,
                                  key="planA", label="PELVIS", fractions=25)
        self.plan_b = make_rtplan(self.study, self.struct_b, self.ct.frame_of_reference_uid,
                                  key="planB", label="PELVIS_R1", fractions=25)
        self.dose_a = make_rtdose(self.study, self.plan_a, self.ct)
        self.dose_b = make_rtdose(self.study, self.plan_b, self.ct)
        first = TODAY - timedelta(days=5, hours=8)
        self.records = [make_treatment_record(self.study, self.plan_a if n <= 3 else self.plan_b,
                                              n, first + timedelta(days=n - 1))
                        for n in range(1, 7)]

    def context(self) -> list[Dataset]:
        return [*self.ct.instances, *self.mr.instances, self.struct_a, self.struct_b,
                self.plan_a, self.plan_b, self.dose_a, self.dose_b]

    def everything(self) -> list[Dataset]:
        return [*self.context(), *self.records]


def upload(server: Any, datasets: list[Dataset]) -> None:
    server.upload([to_bytes(ds) for ds in datasets])


def uids(datasets: list[Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in datasets}


def back_up_records(site: DemoSite) -> None:
    """The records reach the backup first, as the incremental flow would bring them."""
    state = incremental_backup(site="DEMO", config=str(site.config_path), backfill=False,
                               now=TODAY.replace(tzinfo=NY), return_state=True)
    assert state.is_completed(), state.message


def backfill(site: DemoSite, **params: Any) -> Any:
    return plan_context_backfill(site="DEMO", config=str(site.config_path), return_state=True,
                                 **params)


def ledger(site: DemoSite) -> Ledger:
    return Ledger(Path(site.workdir) / "state" / "ledger.sqlite")


@pytest.fixture
def site(make_site: Callable[..., DemoSite]) -> DemoSite:
    return make_site(settings={"lookback_days": 7})


def test_two_plans_shared_ct_and_extra_mr_all_arrive_once(site: DemoSite) -> None:
    s = Scenario("CTX001")
    upload(site.rv, s.everything())
    back_up_records(site)

    state = backfill(site)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["plans"] == 2 and summary["complete"] == 2
    assert summary["moved"] == {"RTPLAN": 2, "RTSTRUCT": 2, "CT": 6, "MR": 3, "RTDOSE": 2}
    assert summary["cumulative"] == summary["moved"]
    assert site.backup.sop_instance_uids() == uids(s.everything())
    assert {state for state, _ in ledger(site).at(LANE).contexts().values()} == {"complete"}

    again = backfill(site)
    assert again.is_completed() and again.result()["plans"] == 0
    on_demand = backfill(site, patient_ids=["CTX001"])
    assert on_demand.is_completed(), on_demand.message
    assert on_demand.result()["plans"] == 2 and on_demand.result()["moved"] == {}
    assert site.backup.instance_count() == len(s.everything())


def test_half_present_series_moves_only_the_missing_images(site: DemoSite) -> None:
    s = Scenario("CTX002", ct_slices=8)
    upload(site.rv, s.everything())
    upload(site.backup, s.ct.instances[:4])
    back_up_records(site)

    state = backfill(site)
    assert state.is_completed(), state.message
    assert state.result()["moved"]["CT"] == 4
    assert uids(s.ct.instances) <= site.backup.sop_instance_uids()
    assert state.result()["cumulative"]["CT"] == 8


def test_missing_ct_is_unresolved_and_completed_once_it_appears(site: DemoSite) -> None:
    good, missing = Scenario("CTX003"), Scenario("CTX004")
    upload(site.rv, good.everything())
    upload(site.rv, [ds for ds in missing.everything() if ds not in missing.ct.instances])
    back_up_records(site)

    state = backfill(site)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "site DEMO" in message and missing.ct.series_uid in message and "CTX004" in message
    contexts = ledger(site).at(LANE).contexts()
    assert contexts[good.plan_a.SOPInstanceUID][0] == "complete"
    assert contexts[good.plan_b.SOPInstanceUID][0] == "complete"
    assert contexts[missing.plan_a.SOPInstanceUID][0] == "incomplete"
    assert missing.ct.series_uid in contexts[missing.plan_a.SOPInstanceUID][1]
    assert uids(good.everything()) <= site.backup.sop_instance_uids()

    upload(site.rv, missing.ct.instances)
    later = backfill(site)
    assert later.is_completed(), later.message
    assert later.result()["plans"] == 2 and later.result()["moved"] == {"CT": 6}
    assert uids(missing.everything()) <= site.backup.sop_instance_uids()


def test_skipped_machines_are_counted_not_dropped(make_site: Callable[..., DemoSite]) -> None:
    site = make_site(settings={"lookback_days": 7, "skip_machines": ["TrueBeam1"]})
    s = Scenario("CTX005")
    upload(site.rv, s.everything())
    back_up_records(site)
    state = backfill(site)
    assert state.is_completed(), state.message
    assert state.result()["skipped"] == 2 and state.result()["moved"] == {}
    assert all("TrueBeam1" in text[0] for text in state.result()["unresolved"].values())


def compressed_series(study: Study, key: str, files: list[str]) -> Series:
    """pydicom's compressed sample files, re-homed into one series of ``study``."""
    series_uid = uid(study.uid, key, "series")
    series = Series(series_uid, uid(study.uid, key, "for"), "")
    for i, name in enumerate(files):
        ds = dcmread(get_testdata_file(name))
        ds.PatientID, ds.PatientName = study.patient.patient_id, study.patient.name
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series_uid
        ds.SOPInstanceUID = uid(series_uid, i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.FrameOfReferenceUID = series.frame_of_reference_uid
        series.modality = ds.Modality
        series.instances.append(ds)
    return series


def compressed_course(patient: Patient) -> tuple[list[Dataset], list[Dataset]]:
    """A plan whose structure set references a JPEG-LS + RLE series and a JPEG 2000 series, in
    their own transfer syntaxes, and today's record: (the images, [structure set, plan,
    record])."""
    study = Study(patient, study_date="20261101")
    mr = compressed_series(study, "mr-lossless",
                           ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
    j2k = compressed_series(study, "j2k", ["JPEG2000.dcm"])
    struct = make_rtstruct(study, mr, key="ss", also=[j2k])
    plan = make_rtplan(study, struct, mr.frame_of_reference_uid)
    record = make_treatment_record(study, plan, 1, TODAY - timedelta(hours=6))
    return [*mr.instances, *j2k.instances], [struct, plan, record]


def compressed_plan(site: DemoSite, patient: Patient) -> list[Dataset]:
    """On the R&V: ``compressed_course``; returns the images."""
    images, rt = compressed_course(patient)
    site.rv.upload([_file_bytes(ds) for ds in images])
    upload(site.rv, rt)
    return images


def assert_arrived_intact(site: DemoSite, originals: list[Dataset]) -> None:
    """Each image is in the backup in its own transfer syntax, pixel data unchanged."""
    with site.backup.rest() as client:
        for original in originals:
            found = client.post("/tools/lookup", content=original.SOPInstanceUID).json()
            assert found, f"{original.file_meta.TransferSyntaxUID.name} did not arrive"
            copy = dcmread(BytesIO(client.get(f"/instances/{found[0]['ID']}/file").content))
            assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            assert copy.PixelData == original.PixelData


def test_compressed_series_arrive_intact(site: DemoSite) -> None:
    images = compressed_plan(site, Patient("CTX006", "Compressed^Images"))
    back_up_records(site)
    state = backfill(site)
    assert state.is_completed(), state.message
    assert_arrived_intact(site, images)


def _file_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_mrn_csv_is_read_with_or_without_header(tmp_path: Path) -> None:
    path = tmp_path / "mrns.csv"
    path.write_text("MRN,comment\nCTX001,boost\n\nCTX002,\n", encoding="utf-8")
    assert read_mrns(str(path)) == ["CTX001", "CTX002"]
    path.write_text("CTX009\n")
    assert read_mrns(str(path)) == ["CTX009"]


def test_record_without_plan_is_reported_and_others_complete(site: DemoSite) -> None:
    from pydicom.sequence import Sequence

    s = Scenario("CTX007")
    orphan = make_treatment_record(s.study, s.plan_a, 9, TODAY - timedelta(hours=1))
    orphan.ReferencedRTPlanSequence = Sequence()
    upload(site.rv, [*s.everything(), orphan])
    back_up_records(site)
    state = backfill(site)
    assert state.is_completed(), state.message
    assert state.result()["records_without_plan"] == [orphan.SOPInstanceUID]
    assert state.result()["complete"] == 2


def test_record_gone_from_the_backup_fails_the_run_but_not_the_others(site: DemoSite) -> None:
    s = Scenario("CTX008")
    upload(site.rv, s.everything())
    back_up_records(site)
    gone = s.records[0]
    with site.backup.rest() as client:
        orthanc_id = client.post("/tools/lookup", content=gone.SOPInstanceUID).json()[0]["ID"]
        client.delete(f"/instances/{orthanc_id}")
    state = backfill(site)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert gone.SOPInstanceUID in message and "unreadable" in message
    contexts = ledger(site).at(LANE).contexts()
    assert contexts[s.plan_b.SOPInstanceUID][0] == "complete"


def walk_windows(flow_run_id: Any) -> list[tuple[str, Any, Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id])))
    return [(r.name, r.start_time, r.end_time) for r in runs
            if r.name.startswith("walk-plan-context")]


@pytest.mark.parametrize("associations", [1, 2])
def test_chains_are_walked_ahead_within_the_runs_associations(
        make_site: Callable[..., DemoSite], associations: int) -> None:
    """Three patients (the first with two plans sharing a CT) on a strict Q/R SCP that counts
    what it serves: the walks of different patients overlap (the next chains are walked while
    a series moves), yet the R&V never has more than 2 x move_associations associations open
    nor more than move_associations image series moving at once; a patient's own plans never
    overlap, and each shared CT moves once."""
    from tests.qr_scp import StrictQRSCP, add_source

    site = make_site(settings={"lookback_days": 7, "move_associations": associations},
                     extra_backup_modalities={"PIPE_RV": ("PIPE_RV", "127.0.0.1", 1)})
    a, b, c = (Scenario(f"PIPE0{n}", ct_slices=20) for n in (1, 2, 3))
    everything = [*a.everything(), *b.everything(), *c.everything()]
    records = [*a.records, *b.records, *c.records]
    upload(site.backup, records)
    server = StrictQRSCP("PIPE_RV", everything,
                         {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)})
    add_source(site, server, "strict", "aria", max_associations=8)
    with server:
        state = backfill(site, source="strict", patient_ids=["PIPE01", "PIPE02", "PIPE03"])
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["complete"] == 6
    assert summary["moved"]["CT"] == 60, "each shared CT moved once"
    assert site.backup.sop_instance_uids() == uids(everything)
    assert server.peak_associations <= 2 * associations, server.peak_associations
    assert server.peak_image_retrieves <= associations, server.peak_image_retrieves
    windows = walk_windows(state.state_details.flow_run_id)
    assert len(windows) == 6

    def overlap(x: tuple[str, Any, Any], y: tuple[str, Any, Any]) -> bool:
        return x[1] < y[2] and y[1] < x[2]

    pairs = [(x, y) for i, x in enumerate(windows) for y in windows[i + 1:]]
    same_patient = [(x, y) for x, y in pairs if x[0] == y[0]]
    assert not any(overlap(x, y) for x, y in same_patient)
    assert any(overlap(x, y) for x, y in pairs if x[0] != y[0])


def test_a_department_backfill_takes_every_record_and_a_rerun_resumes_where_it_stopped(
        site: DemoSite) -> None:
    """The first backfill of a department: every record the backup holds, no patient named.
    Patient 1's plans were walked before (a run that stopped after them) and patient 3's CT is
    not on the R&V yet: the run walks patients 2 and 3 only, completes 2, leaves 3 incomplete
    and fails naming it. Once the CT is there, a rerun walks patient 3's plans alone."""
    a, b, c = (Scenario(f"DEPT0{n}") for n in (1, 2, 3))
    no_ct = [ds for ds in c.everything() if ds not in c.ct.instances]
    upload(site.rv, [*a.everything(), *b.everything(), *no_ct])
    back_up_records(site)
    assert backfill(site, patient_ids=["DEPT01"]).is_completed()

    first = backfill(site, department=True)
    assert first.is_failed() and c.plan_a.SOPInstanceUID in str(first.message)
    walked = sorted(name for name, _, _ in walk_windows(first.state_details.flow_run_id))
    assert walked == ["walk-plan-context DEPT02"] * 2 + ["walk-plan-context DEPT03"] * 2
    contexts = ledger(site).at(LANE).contexts()
    assert {contexts[p.SOPInstanceUID][0] for p in (a.plan_a, a.plan_b, b.plan_a, b.plan_b)} \
        == {"complete"}
    assert contexts[c.plan_a.SOPInstanceUID][0] == "incomplete"

    upload(site.rv, c.ct.instances)
    again = backfill(site, department=True)
    assert again.is_completed(), again.message
    walked = sorted(name for name, _, _ in walk_windows(again.state_details.flow_run_id))
    assert walked == ["walk-plan-context DEPT03"] * 2
    assert site.backup.sop_instance_uids() == uids([*a.everything(), *b.everything(),
                                                    *c.everything()])
