"""The record parser's fast path reads exactly what pydicom reads, in every form a file can take."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from datetime import datetime

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, \
    ImplicitVRLittleEndian

from demo.synthetic import Patient, Study, make_image_series, make_rtplan, make_rtstruct, \
    make_treatment_record, to_bytes
from radonc_backup import report_facts
from radonc_backup.report_facts import RecordFacts, record_facts


def a_record(beam_fractions: list[int] | None = None) -> Dataset:
    study = Study(Patient("F001", "Fast^Path"), study_date="20261101")
    ct = make_image_series(study, "ct", slices=1)
    plan = make_rtplan(study, make_rtstruct(study, ct), ct.frame_of_reference_uid)
    return make_treatment_record(study, plan, 7, datetime(2026, 11, 18, 9),
                                 beam_fractions=beam_fractions)


def encoded(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax is None:
        return to_bytes(ds)
    ds = copy.deepcopy(ds)
    to_bytes(ds)  # file meta
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def both_ways(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[RecordFacts, RecordFacts,
                                                                       bool]:
    """The facts through the fast path (if the file allows it) and through pydicom alone."""
    taken: list[bool] = []
    scan: Callable[..., object] = report_facts._scan_items

    def spy(*args: object) -> object:
        result = scan(*args)
        taken.append(result is not None)
        return result

    with monkeypatch.context() as m:
        m.setattr(report_facts, "_scan_items", spy)
        fast = record_facts(dcmread(io.BytesIO(data)))
    with monkeypatch.context() as m:
        m.setattr(report_facts, "_scan_items", lambda *args: None)
        slow = record_facts(dcmread(io.BytesIO(data)))
    return fast, slow, all(taken)


def test_the_common_form_takes_the_fast_path_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, took_fast_path = both_ways(encoded(a_record([7, 7, 8])), monkeypatch)
    assert took_fast_path
    assert fast == slow and fast.fraction == 8 and fast.plan_uid and not fast.warnings


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_other_transfer_syntaxes_agree(syntax: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow, _ = both_ways(encoded(a_record([3, 4, 4]), syntax), monkeypatch)
    assert fast == slow and fast.fraction == 4


def test_undefined_lengths_fall_back_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = a_record([5, 6, 6])
    ds.TreatmentSessionBeamSequence.is_undefined_length = True
    for beam in ds.TreatmentSessionBeamSequence:
        beam.is_undefined_length_sequence_item = True
        beam.ControlPointDeliverySequence.is_undefined_length = True
    fast, slow, took_fast_path = both_ways(encoded(ds), monkeypatch)
    assert fast == slow and fast.fraction == 6 and not took_fast_path


def test_nested_undefined_lengths_inside_defined_items_agree(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ds = a_record([2, 9, 2])
    for beam in ds.TreatmentSessionBeamSequence:
        beam.ControlPointDeliverySequence.is_undefined_length = True
    fast, slow, _ = both_ways(encoded(ds), monkeypatch)
    assert fast == slow and fast.fraction == 9


@pytest.mark.parametrize("raw, fraction, warning", [
    (b"X8765 ", 5, "invalid CurrentFractionNumber 'X8765'"),
    (b"4.5   ", 5, "invalid CurrentFractionNumber"),
    (b"1\\2   ", 5, "invalid CurrentFractionNumber"),
    (b"      ", 5, None),
    (b"  12  ", 12, None),
])
def test_odd_fraction_values_read_the_same_both_ways(
        raw: bytes, fraction: int, warning: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(a_record([98765, 5, 5]))
    assert data.count(b"98765 ") == 1
    fast, slow, took_fast_path = both_ways(data.replace(b"98765 ", raw), monkeypatch)
    assert took_fast_path and fast == slow and fast.fraction == fraction
    assert (warning in "; ".join(fast.warnings)) if warning else not fast.warnings


def test_a_beam_without_a_fraction_number_and_no_beams_at_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ds = a_record([4, 4, 4])
    del ds.TreatmentSessionBeamSequence[1].CurrentFractionNumber
    fast, slow, took_fast_path = both_ways(encoded(ds), monkeypatch)
    assert took_fast_path and fast == slow and fast.fraction == 4
    del ds.TreatmentSessionBeamSequence
    del ds.ReferencedRTPlanSequence
    fast, slow, _ = both_ways(encoded(ds), monkeypatch)
    assert fast == slow and fast.fraction is None and fast.plan_uid == ""
    assert {"no CurrentFractionNumber", "no referenced RT Plan"} <= set(fast.warnings)


def test_an_ion_record_reads_like_a_beams_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """RT Ion Beams Treatment Records carry TreatmentSessionIonBeamSequence (3008,0021)."""
    ds = a_record([6, 6, 7])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.9"
    ds.TreatmentSessionIonBeamSequence = ds.TreatmentSessionBeamSequence
    del ds.TreatmentSessionBeamSequence
    fast, slow, took_fast_path = both_ways(encoded(ds), monkeypatch)
    beams = both_ways(encoded(a_record([6, 6, 7])), monkeypatch)[0]
    assert took_fast_path and fast == slow and fast.fraction == 7 and not fast.warnings
    assert fast.meterset == beams.meterset and fast.termination == "NORMAL"


def test_an_interrupted_session_shows_its_status_and_what_was_delivered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    study = Study(Patient("F002", "Cut^Short"), study_date="20261101")
    ct = make_image_series(study, "ct", slices=1)
    plan = make_rtplan(study, make_rtstruct(study, ct), ct.frame_of_reference_uid)
    planned = [float(b.BeamMeterset) for b in plan.FractionGroupSequence[0].ReferencedBeamSequence]
    ds = make_treatment_record(study, plan, 3, datetime(2026, 11, 18, 9), termination="OPERATOR")
    fast, slow, took_fast_path = both_ways(encoded(ds), monkeypatch)
    assert took_fast_path and fast == slow and fast.termination == "OPERATOR"
    assert fast.meterset == round(sum(planned[:-1]) + round(planned[-1] / 2, 2), 3)
