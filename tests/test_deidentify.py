"""The pseudonymized export meets PS3.15 Annex E's Basic Application Level Confidentiality
Profile: a dataset carrying PHI in every attribute of Table E.1-1 (at the top and in a nested
sequence) and in private attributes comes out with none of it, each attribute handled by its
action, and references between objects still resolving."""

from __future__ import annotations

import io
from datetime import datetime

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from demo.synthetic import Patient, make_course, to_bytes
from radonc_backup.deidentify import Deidentifier, actions

TEXT = "Doe Jane 555-0100"  # a name and a phone number where free text goes
VALUES = {"PN": "Doe^Jane", "DA": "19470321", "TM": "101112", "DT": "19470321101112",
          "UI": "1.2.826.0.1.3680043.8.498.4711", "IS": "4711", "DS": "47.11", "AS": "079Y",
          "CS": "DOEJANE", "AE": "DOEJANE", "SH": "Doe Jane", "US": 4711, "SS": 4711,
          "UL": 4711, "FL": 47.11, "FD": 47.11, "UR": "http://doe.example/jane"}
SKIP_VR = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT", "SV", "UV"}


def phi_everywhere() -> tuple[Dataset, dict[int, object]]:
    """An RT Record with every attribute of the table filled with an identifying value (its
    VR's form of one), the same inside an item of a nested sequence, and private attributes."""
    course = make_course(Patient("PHI0001", "Doe^Jane"), datetime(2026, 11, 2, 8), delivered=1,
                         slices=1)
    ds = course.records[0]
    filled: dict[int, object] = {}
    nested = Dataset()
    for tag, action in actions().items():
        if tag >> 16 in (0x0000, 0x0002):
            continue  # command and file meta groups are not in a dataset
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        vr = vr.split(" or ")[0]
        if vr in SKIP_VR or tag in (0x00080018, 0x0020000D, 0x0020000E, 0x00080016):
            continue  # the object's own identity: replaced (U), checked below
        value = VALUES.get(vr, TEXT)
        ds.add_new(tag, vr, value)
        nested.add_new(tag, vr, value)
        filled[tag] = value
    ds.ReferencedSeriesSequence = Sequence([nested])  # a sequence the table does not name
    ds.add_new(0x00290010, "LO", "ACME 1.0")
    ds.add_new(0x00291001, "LO", "Doe^Jane")
    ds.add_new(0x00291002, "OB", b"Doe Jane")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds, filled


def test_phi_in_every_attribute_of_the_basic_profile_and_in_private_tags_is_gone() -> None:
    ds, filled = phi_everywhere()
    plan_uid = str(ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    before = dcmread(io.BytesIO(out.getvalue()))

    Deidentifier("a seed").anonymize(before)
    written = io.BytesIO()
    before.save_as(written, enforce_file_format=True)
    data = written.getvalue()
    after = dcmread(io.BytesIO(data))

    for marker in (b"Doe", b"Jane", b"555-0100", b"4711", b"19470321", b"ACME", b"PHI0001",
                   b"doe.example"):
        assert marker not in data, marker
    assert not [e for e in after.iterall() if e.tag.is_private]
    table = actions()
    for tag, value in filled.items():
        action = table[tag]
        for where in (after, after.ReferencedSeriesSequence[0]):
            if action == "X":
                assert tag not in where, (hex(tag), action)
            elif tag in where:
                assert where[tag].value != value, (hex(tag), action, where[tag].value)
    assert after.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in after.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    new_plan = str(after.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID)
    assert new_plan != plan_uid and new_plan.startswith("2.")


def test_one_export_gives_one_pseudonym_per_uid_so_references_resolve() -> None:
    course = make_course(Patient("REF0001", "Roe^Richard"), datetime(2026, 11, 2, 8),
                         delivered=1, slices=1)
    same = Deidentifier("seed")
    plan, record = (dcmread(io.BytesIO(to_bytes(ds))) for ds in (course.plan, course.records[0]))
    for ds in (plan, record):
        same.anonymize(ds)
    assert record.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert record.PatientID == plan.PatientID != "REF0001"
