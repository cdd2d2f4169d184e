"""Each DIMSE status class, as the DICOM layer reads it, against an in-process pynetdicom SCP.

The SCP answers every C-FIND, C-MOVE, C-GET and C-STORE with the status a test sets, after one
match or one sub-operation when the test says so; its own C-STORE service is the move
destination. What is asserted is what callers rely on: which statuses end in data, which raise
a retriable error, which refuse one identifier while the association goes on, and that a code
the standard does not define is never taken for success.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    RTBeamsTreatmentRecordStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from demo.orthanc import free_port
from radonc_backup.dicom_net import DicomClient, Peer, Timeouts, identifier
from radonc_backup.errors import FatalDicomError, FindTruncated, RetriableDicomError

AET = "STATUS_SCP"
FAST = Timeouts(acse=5, dimse=10, network=10, connection=3)


def record() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = RTBeamsTreatmentRecordStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.Modality = "STATUS1", "RTRECORD"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


@dataclass
class StatusSCP:
    """Answers with ``status``; ``send_first``: after one match or sub-operation."""

    status: int = 0x0000
    send_first: bool = False
    store_status: int = 0x0000

    def __post_init__(self) -> None:
        self.port = free_port()
        self.ae = AE(ae_title=AET)
        for model in (StudyRootQueryRetrieveInformationModelFind,
                      StudyRootQueryRetrieveInformationModelGet,
                      StudyRootQueryRetrieveInformationModelMove):
            self.ae.add_supported_context(model)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ExplicitVRLittleEndian,
                                          scp_role=True, scu_role=True)
        self.ae.add_requested_context(RTBeamsTreatmentRecordStorage, ExplicitVRLittleEndian)
        self.stored: list[str] = []

    def _answers(self) -> Iterator[tuple[int, Dataset | None]]:
        if self.send_first:
            yield 0xFF00, record()
        if self.status != 0x0000:
            yield self.status, None

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        yield from self._answers()

    def _on_get(self, event: evt.Event) -> Iterator[object]:
        yield 2 if self.send_first else 1  # the status comes after the one sent, not instead
        yield from self._answers()

    def _on_move(self, event: evt.Event) -> Iterator[object]:
        destination = event.move_destination
        if isinstance(destination, bytes):
            destination = destination.decode()
        known = destination.strip() == AET
        yield ("127.0.0.1", self.port) if known else (None, None)
        yield 2 if self.send_first else 1
        yield from self._answers()

    def _on_store(self, event: evt.Event) -> int:
        self.stored.append(str(event.dataset.SOPInstanceUID))
        return self.store_status

    def __enter__(self) -> "StatusSCP":
        handlers = [(evt.EVT_C_FIND, self._on_find), (evt.EVT_C_GET, self._on_get),
                    (evt.EVT_C_MOVE, self._on_move), (evt.EVT_C_STORE, self._on_store)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=handlers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()

    def client(self) -> DicomClient:
        return DicomClient("TEST", "RADONC_BACKUP", Peer(AET, "127.0.0.1", self.port), FAST)


ASK = identifier("IMAGE", PatientID="STATUS1", SOPInstanceUID="", Modality="RTRECORD")


def fetch(study: str = "1.2.3") -> Dataset:
    return identifier("IMAGE", StudyInstanceUID=study, SeriesInstanceUID="1.2.3.4",
                      SOPInstanceUID="1.2.3.4.5")


@pytest.mark.parametrize("status, send_first, outcome", [
    (0x0000, True, "1 match"),  # Success
    (0x0001, True, "1 match"),  # Warning: final, the matches stand
    (0xFE00, True, FindTruncated),  # Cancel: an answer cut short, the window is split
    (0xA700, False, RetriableDicomError),  # Failure, out of resources
    (0xA900, False, FatalDicomError),  # Failure, identifier does not match SOP class
    (0xC000, False, FatalDicomError),  # Failure, unable to process
    (0x1234, True, FatalDicomError),  # not a DICOM status: never success
])
def test_c_find_status_classes(status: int, send_first: bool,
                               outcome: str | type[Exception]) -> None:
    with StatusSCP(status, send_first) as scp:
        if isinstance(outcome, str):
            assert f"{len(list(scp.client().find(ASK)))} match" == outcome
            return
        with pytest.raises(outcome) as raised:
            list(scp.client().find(ASK))
        assert AET in str(raised.value) and f"0x{status:04X}" in str(raised.value)


@pytest.mark.parametrize("status, send_first, outcome", [
    (0x0000, True, "completed 1"),  # Success
    (0xB000, True, "completed 1"),  # Warning (some sub-operations failed): final, and the
    (0xFE00, True, "completed 1"),  # Cancel: final; the backup is checked for what arrived
    (0xC000, True, "completed 1"),  # Failure after sending: final, what arrived is checked
    (0xC000, False, "failed 1"),  # Failure, its sub-operation counted failed: final
    (0xA900, False, "refused"),  # identifier rejected: this one only, the association goes on
    (0xA702, False, RetriableDicomError),  # out of resources
    (0x1234, True, FatalDicomError),  # not a DICOM status
])
def test_c_move_status_classes(status: int, send_first: bool,
                               outcome: str | type[Exception]) -> None:
    with StatusSCP(status, send_first) as scp:
        if isinstance(outcome, str):
            results = scp.client().move([fetch("1"), fetch("2")], AET)
            assert len(results) == 2  # the second identifier was asked on the same association
            for result in results:
                assert result.status == status
                if outcome == "refused":
                    assert f"0x{status:04X}" in result.error and AET in result.error
                else:
                    assert not result.error
                    assert outcome in (f"completed {result.completed}", f"failed {result.failed}")
            assert len(scp.stored) == (2 if send_first else 0)
            return
        with pytest.raises(outcome) as raised:
            scp.client().move([fetch()], AET)
        assert f"0x{status:04X}" in str(raised.value)


def test_c_move_to_an_unknown_destination_is_fatal_and_names_it() -> None:
    with StatusSCP(0x0000, True) as scp, pytest.raises(FatalDicomError) as raised:
        scp.client().move([fetch()], "NOT_KNOWN")
    assert "NOT_KNOWN is unknown to the peer" in str(raised.value)
    assert not raised.value.refused_identifier


@pytest.mark.parametrize("status, send_first, outcome", [
    (0x0000, True, "received 1"),
    (0xB000, True, "received 1"),
    (0xFE00, True, "received 1"),
    (0xA900, False, "refused"),
    (0xC000, False, "refused"),
    (0xA702, False, RetriableDicomError),
    (0x1234, True, FatalDicomError),
])
def test_c_get_status_classes(status: int, send_first: bool,
                              outcome: str | type[Exception]) -> None:
    received: list[Dataset] = []
    with StatusSCP(status, send_first) as scp:
        if outcome == "refused":
            with pytest.raises(FatalDicomError) as refused:
                scp.client().get(fetch(), received.append, [RTBeamsTreatmentRecordStorage])
            assert refused.value.refused_identifier and refused.value.status == status
            return
        if isinstance(outcome, str):
            scp.client().get(fetch(), received.append, [RTBeamsTreatmentRecordStorage])
            assert f"received {len(received)}" == outcome
            return
        with pytest.raises(outcome) as raised:
            scp.client().get(fetch(), received.append, [RTBeamsTreatmentRecordStorage])
        assert f"0x{status:04X}" in str(raised.value)


@pytest.mark.parametrize("status, ok", [
    (0x0000, True), (0xB000, True), (0xB007, True),  # Success, Warnings (stored, coerced)
    (0xA700, False), (0xC000, False), (0x1234, False),  # Failures, and a code that is none
])
def test_c_store_status_classes(status: int, ok: bool) -> None:
    with StatusSCP(store_status=status) as scp:
        ds = record()
        results = scp.client().store([ds])
    assert [r.sop_instance_uid for r in results] == [ds.SOPInstanceUID]
    assert results[0].ok is ok
    assert (results[0].error == "") is ok
    if not ok:
        assert f"0x{status:04X}" in results[0].error
