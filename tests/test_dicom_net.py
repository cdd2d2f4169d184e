"""The DICOM layer against real Orthanc processes: what each operation returns and raises."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from pydicom.dataset import Dataset

from demo.orthanc import free_port
from demo.site import DemoSite, refuse_modality_lua
from demo.synthetic import Patient, make_course, to_bytes
from radonc_backup.config import load_site
from radonc_backup.dicom_net import DicomClient, NoDelayAE, Peer, Timeouts
from radonc_backup.errors import FatalDicomError, RetriableDicomError
from radonc_backup.windows import DayQuery
from radonc_backup.record_finder import CapMemory, RecordFinder
from radonc_backup.transfer import move_identifiers
from radonc_backup.instance import InstanceRef
from tests.capped_scp import CappedFindSCP
from tests.conftest import load

COURSE = make_course(Patient("NET001", "Net^Test"), datetime(2026, 11, 16, 9, 0), delivered=6,
                     fractions=20, slices=4)
FAST = Timeouts(acse=5, dimse=20, network=10, connection=3)


def rv_client(site: DemoSite, calling_ae: str = "RADONC_BACKUP") -> DicomClient:
    return DicomClient("DEMO", calling_ae, Peer(site.rv.aet, "127.0.0.1", site.rv.dicom_port),
                       FAST)


def test_echo_and_tcp_nodelay(make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    assert rv_client(site).echo() == 0
    ae = NoDelayAE(ae_title="RADONC_BACKUP")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", site.rv.dicom_port, ae_title=site.rv.aet)
    try:
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        assoc.release()
        ae.shutdown()


def test_find_returns_every_record_of_the_window(make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    load(site, COURSE)
    cfg = load_site("DEMO", site.config_path)
    days = [DayQuery(datetime(2026, 11, d).date()) for d in range(15, 23)]
    found = RecordFinder(cfg.client(cfg.sources["aria"])).in_windows(days).refs
    assert sorted(r.sop_instance_uid for r in found) == sorted(
        r.SOPInstanceUID for r in COURSE.records)
    first = COURSE.records[0]
    assert {r.series_key for r in found} == {(COURSE.patient.patient_id, first.StudyInstanceUID,
                                              first.SeriesInstanceUID)}


def test_window_at_the_peers_cap_is_split_until_complete() -> None:
    busy_day = make_course(Patient("NET002", "Net^Many"), datetime(2026, 11, 16, 7, 0),
                           delivered=9, every=timedelta(minutes=10))
    with CappedFindSCP("CAPPED_RV", busy_day.records, cap=4) as scp:
        client = DicomClient("DEMO", "RADONC_BACKUP", Peer("CAPPED_RV", "127.0.0.1", scp.port),
                             FAST)
        splits: list[str] = []
        finder = RecordFinder(client, memory=CapMemory(configured=4))
        finder.on_split = splits.append
        found = finder.in_windows([DayQuery(datetime(2026, 11, 16).date())]).refs
    assert sorted(r.sop_instance_uid for r in found) == sorted(
        r.SOPInstanceUID for r in busy_day.records)
    assert splits and len(scp.queries) > 2


def test_an_untimed_record_of_a_split_day_is_found_by_asking_its_patient() -> None:
    """A time range never matches an empty TreatmentTime: once a capped day is split, the
    untimed record is in no half. Asking its patient, without a date, finds it; a match for
    another patient (a peer that ignores the key) would be dropped."""
    first = make_course(Patient("NET010", "Net^Untimed"), datetime(2026, 11, 16, 7, 0),
                        delivered=3, every=timedelta(minutes=10))
    untimed = first.records[-1]
    del untimed.TreatmentTime
    second = make_course(Patient("NET011", "Net^Timed"), datetime(2026, 11, 16, 9, 0),
                         delivered=3, every=timedelta(minutes=10))
    records = [*first.records[:-1], *second.records, untimed]  # the cut answer lacks it
    with CappedFindSCP("CAPPED_RV", records, cap=4) as scp:
        client = DicomClient("DEMO", "RADONC_BACKUP", Peer("CAPPED_RV", "127.0.0.1", scp.port),
                             FAST)
        dated = RecordFinder(client, memory=CapMemory(configured=4)).in_windows(
            [DayQuery(datetime(2026, 11, 16).date())])
        by_date = dated.refs
        by_patient = RecordFinder(client, memory=CapMemory(configured=4)).of_patients(
            ["NET010"]).refs
    assert str(untimed.SOPInstanceUID) not in {r.sop_instance_uid for r in by_date}
    assert len(by_date) == 5
    assert any("without a time" in u for u in dated.unproven), "never called complete"
    assert {r.sop_instance_uid for r in by_patient} == {str(r.SOPInstanceUID)
                                                        for r in first.records}


def test_orthanc_cut_short_answer_is_never_taken_as_complete(
        make_site: Callable[..., DemoSite]) -> None:
    """Orthanc caps candidates before filtering dates: the error must say so, not return less."""
    site = make_site(rv_find_cap=3)
    load(site, COURSE)
    cfg = load_site("DEMO", site.config_path)
    with pytest.raises(FatalDicomError, match="raise its C-FIND result limit"):
        RecordFinder(cfg.client(cfg.sources["aria"])).in_windows(
            [DayQuery(datetime(2026, 11, 16).date())])


def test_move_reports_success_while_the_backup_refused(make_site: Callable[..., DemoSite]) -> None:
    """Why presence checks exist: Orthanc claims full success for a refused object."""
    site = make_site(backup_lua=[refuse_modality_lua("RTDOSE")])
    load(site, COURSE)
    refs = [InstanceRef(COURSE.dose.SOPInstanceUID, "", COURSE.patient.patient_id,
                        COURSE.dose.StudyInstanceUID, COURSE.dose.SeriesInstanceUID),
            InstanceRef(COURSE.plan.SOPInstanceUID, "", COURSE.patient.patient_id,
                        COURSE.plan.StudyInstanceUID, COURSE.plan.SeriesInstanceUID)]
    results = rv_client(site).move(move_identifiers(refs), site.backup.aet)
    assert len(results) == 2 and all(r.claims_success for r in results)
    assert site.backup.sop_instance_uids() == {COURSE.plan.SOPInstanceUID}


def test_get_and_store_relay(make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    load(site, COURSE)
    received: list[Dataset] = []
    ident = Dataset()
    ident.QueryRetrieveLevel = "SERIES"
    ident.StudyInstanceUID = COURSE.images.instances[0].StudyInstanceUID
    ident.SeriesInstanceUID = COURSE.images.series_uid
    result = rv_client(site).get(ident, received.append)
    assert result.status == 0 and len(received) == 4
    backup = DicomClient("DEMO", "RADONC_BACKUP",
                         Peer(site.backup.aet, "127.0.0.1", site.backup.dicom_port), FAST)
    stored = backup.store(received)
    assert all(r.ok for r in stored)
    assert site.backup.sop_instance_uids() == {ds.SOPInstanceUID for ds in received}


def test_unregistered_calling_ae_is_fatal_and_named(make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    with pytest.raises(FatalDicomError) as err:
        rv_client(site, calling_ae="STRANGER").echo()
    message = str(err.value)
    assert "site DEMO" in message and site.rv.aet in message
    assert f"127.0.0.1:{site.rv.dicom_port}" in message and "STRANGER" in message
    assert "calling AE title not recognised" in message


def test_wrong_called_ae_is_fatal(make_site: Callable[..., DemoSite]) -> None:
    site = make_site()
    client = DicomClient("DEMO", "RADONC_BACKUP", Peer("NOT_THE_RV", "127.0.0.1",
                                                       site.rv.dicom_port), FAST)
    with pytest.raises(FatalDicomError, match="called AE title not recognised"):
        client.echo()


def test_unreachable_peer_is_retriable_and_named() -> None:
    port = free_port()
    client = DicomClient("DEMO", "RADONC_BACKUP", Peer("RV_DEMO", "127.0.0.1", port), FAST)
    with pytest.raises(RetriableDicomError) as err:
        list(client.find(Dataset()))
    assert f"site DEMO: C-FIND from RADONC_BACKUP to RV_DEMO@127.0.0.1:{port}" in str(err.value)
    assert "peer down or unreachable" in str(err.value)


def test_unknown_move_destination_fails_the_identifier_naming_it(
        make_site: Callable[..., DemoSite]) -> None:
    """Orthanc refuses a move to an AE it does not know before sending anything: the identifier
    fails with a message naming the destination (the association goes on for the next)."""
    site = make_site()
    load(site, COURSE)
    ident = move_identifiers([InstanceRef(COURSE.plan.SOPInstanceUID, "",
                                          COURSE.patient.patient_id, COURSE.plan.StudyInstanceUID,
                                          COURSE.plan.SeriesInstanceUID)])
    [result] = rv_client(site).move(ident, "NOWHERE")
    assert "NOWHERE is not registered there as a move destination" in result.error
    assert result.completed == 0


def test_relational_move_sends_one_request_for_many_series(
        make_site: Callable[..., DemoSite]) -> None:
    courses = [make_course(Patient(f"REL{i}", "Rel^Test"), datetime(2026, 11, 16, 9, i),
                           delivered=1, slices=1) for i in range(3)]
    site = make_site()
    for c in courses:
        load(site, c, records_only=True)
    refs = [InstanceRef(c.records[0].SOPInstanceUID, "", c.patient.patient_id,
                        c.records[0].StudyInstanceUID, c.records[0].SeriesInstanceUID)
            for c in courses]
    assert len(move_identifiers(refs)) == 3
    identifiers = move_identifiers(refs, relational=True)
    assert len(identifiers) == 1
    results = rv_client(site).move(identifiers, site.backup.aet)
    assert results[0].completed == 3
    assert site.backup.sop_instance_uids() == {r.sop_instance_uid for r in refs}


def test_orthanc_ids_are_computed_as_orthanc_does(make_site: Callable[..., DemoSite]) -> None:
    from radonc_backup.backup_target import orthanc_id

    site = make_site()
    record = COURSE.records[0]
    site.backup.upload([to_bytes(record)])
    with site.backup.rest() as client:
        found = client.post("/tools/lookup", content=record.SOPInstanceUID).json()
    assert found[0]["ID"] == orthanc_id(record.PatientID, record.StudyInstanceUID,
                                        record.SeriesInstanceUID, record.SOPInstanceUID)
