"""What we know of one DICOM instance before we hold it: its UIDs and where it sits."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class InstanceRef:
    """An instance on the source, identified by the full hierarchy an R&V needs to move it."""

    sop_instance_uid: str
    sop_class_uid: str = ""
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    treatment_date: str = ""
    treatment_time: str = ""

    @classmethod
    def from_match(cls, ds: Dataset) -> "InstanceRef":
        """From a C-FIND match; raises ValueError when the peer left out the SOP Instance UID."""
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not uid:
            raise ValueError("C-FIND match without SOPInstanceUID")
        return cls(
            sop_instance_uid=uid,
            sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
            patient_id=str(ds.get("PatientID", "") or ""),
            study_uid=str(ds.get("StudyInstanceUID", "") or ""),
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            treatment_date=str(ds.get("TreatmentDate", "") or ""),
            treatment_time=str(ds.get("TreatmentTime", "") or ""),
        )

    @property
    def series_key(self) -> tuple[str, str, str]:
        return (self.patient_id, self.study_uid, self.series_uid)
