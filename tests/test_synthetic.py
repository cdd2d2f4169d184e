"""Every object the project generates passes dciodvfy, the reference IOD checker."""

from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from demo.synthetic import Patient, Study, make_course, make_image_series, make_treatment_record, \
    to_bytes

COURSE = make_course(Patient("SYN001", "Test^Patient^^^", "19700101", "F"),
                     datetime(2026, 11, 2, 8, 30), delivered=2, fractions=5, slices=3)
MR = make_image_series(Study(COURSE.patient), key="mr", slices=1, modality="MR")
SPLIT = make_treatment_record(Study(COURSE.patient), COURSE.plan, 3, datetime(2026, 11, 4, 9),
                              beam_fractions=[3, 3, 4])
OBJECTS = {
    "CT": (COURSE.images.instances[0], "CTImage"),
    "MR": (MR.instances[0], "MRImage"),
    "RTSTRUCT": (COURSE.rtstruct, "RTStructureSet"),
    "RTPLAN": (COURSE.plan, "RTPlan"),
    "RTDOSE": (COURSE.dose, "RTDose"),
    "RTRECORD": (COURSE.records[0], "RTBeamsTreatmentRecord"),
    "RTRECORD with beams on different fractions": (SPLIT, "RTBeamsTreatmentRecord"),
}


@pytest.mark.parametrize("kind", list(OBJECTS))
def test_generated_object_passes_dciodvfy(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "object.dcm"
    dataset, iod = OBJECTS[kind]
    path.write_bytes(to_bytes(dataset))
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert report.splitlines()[0].strip() == iod, report
    assert errors == [], report


def test_course_references_form_the_chain() -> None:
    record = COURSE.records[1]
    assert record.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == \
        COURSE.plan.SOPInstanceUID
    assert record.TreatmentSessionBeamSequence[0].CurrentFractionNumber == 2
    assert COURSE.plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == \
        COURSE.rtstruct.SOPInstanceUID
    series = COURSE.rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == COURSE.images.series_uid
    assert COURSE.dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == \
        COURSE.plan.SOPInstanceUID
    assert COURSE.plan.FractionGroupSequence[0].NumberOfFractionsPlanned == 5
    again = make_course(COURSE.patient, datetime(2026, 11, 2, 8, 30), 2, 5, slices=3)
    assert again.records[0].SOPInstanceUID == COURSE.records[0].SOPInstanceUID
    assert [s.CurrentFractionNumber for s in SPLIT.TreatmentSessionBeamSequence] == [3, 3, 4]
