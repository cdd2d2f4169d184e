"""A real C-FIND SCP that answers RT Record queries but stops at ``cap`` matches without saying so.

Many Q/R SCPs (ARIA among them) truncate silently; Orthanc instead caps candidates before it
filters on TreatmentDate, so it cannot play this part. Runs in-process on a free loopback port.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from demo.orthanc import free_port

_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
         "TreatmentDate", "TreatmentTime", "Modality")


def _time_matches(value: str, wanted: str) -> bool:
    """DICOM range matching: an empty value matches only a universal (empty) key."""
    if not wanted:
        return True
    if not value:
        return False
    lo, _, hi = wanted.partition("-")
    t = value.split(".")[0]
    return (not lo or t >= lo) and (not hi or t <= hi)


class CappedFindSCP:
    def __init__(self, aet: str, records: list[Dataset], cap: int) -> None:
        self.aet, self.records, self.cap = aet, records, cap
        self.port = free_port()
        self.queries: list[tuple[str, str]] = []
        self.ae = AE(ae_title=aet)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = None

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        q = event.identifier
        date, time = str(q.get("TreatmentDate", "")), str(q.get("TreatmentTime", ""))
        patient = str(q.get("PatientID", "") or "")
        self.queries.append((date, time))
        sent = 0
        for ds in self.records:
            if date and ds.get("TreatmentDate", "") != date \
                    or not _time_matches(str(ds.get("TreatmentTime", "") or ""), time) \
                    or patient and ds.PatientID != patient:
                continue
            if sent == self.cap:
                break
            answer = Dataset()
            for key in _KEYS:
                setattr(answer, key, ds.get(key, ""))
            answer.QueryRetrieveLevel = "IMAGE"
            sent += 1
            yield 0xFF00, answer
        yield 0x0000, None

    def __enter__(self) -> "CappedFindSCP":
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_FIND, self._on_find)])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.shutdown()
