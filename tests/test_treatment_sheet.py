"""The downtime sheet's facts of one plan, field by field against the plan and the records it
was built from (no servers: the pack test renders the same facts from a real backup)."""

from __future__ import annotations

from datetime import datetime, timedelta

from demo.synthetic import Patient, make_course, make_treatment_record
from radonc_backup.report_facts import plan_facts, readable_name, record_facts
from radonc_backup.treatment_report import build_report, facts_frame
from radonc_backup.treatment_sheet import plan_sheet

START = datetime(2026, 11, 16, 8, 30)


def test_every_field_of_a_sheet_matches_its_plan_and_records() -> None:
    c = make_course(Patient("SH001", "Sheet^Ann"), START, delivered=4, fractions=25, slices=1)
    c.plan.PatientSetupSequence[0].PatientPosition = "FFS"
    c.plan.ApprovalStatus = "UNAPPROVED"
    # Fraction 5: the last beam ended early by the therapist (half its MU delivered).
    c.records.append(make_treatment_record(c.study, c.plan, 5, START + timedelta(days=4),
                                           termination="OPERATOR"))
    s = plan_sheet(c.plan, c.records)

    plan, group = c.plan, c.plan.FractionGroupSequence[0]
    assert s.label == plan.RTPlanLabel
    assert s.total_dose_gy == float(plan.DoseReferenceSequence[0].TargetPrescriptionDose) == 50.0
    assert s.fractions_planned == int(group.NumberOfFractionsPlanned) == 25
    assert s.dose_per_fraction_gy == 2.0
    assert (s.fractions_delivered, s.dose_delivered_gy, s.next_fraction) == (5, 10.0, 6)
    assert s.limit == ""
    assert s.first_treatment == "2026-11-16 08:30" and s.last_treatment == "2026-11-20 08:30"
    assert (s.position, s.setup_technique, s.devices) == ("FFS", "ISOCENTRIC",
                                                          ["VACUUM_MOLD Vac-Lok 1"])
    assert s.approval == "UNAPPROVED" and "plan approval status UNAPPROVED" in s.warnings
    assert s.reviewer == readable_name(plan.ReviewerName) != ""
    assert [b.name for b in s.beams] == [str(b.BeamName) for b in plan.BeamSequence]
    for line, beam, ref in zip(s.beams, plan.BeamSequence, group.ReferencedBeamSequence):
        assert (line.radiation_type, line.energy, line.machine) == (
            beam.RadiationType, "6", beam.TreatmentMachineName)
        assert line.planned_mu == float(ref.BeamMeterset)
    delivered = c.records[-1].TreatmentSessionBeamSequence
    assert [b.delivered_mu for b in s.beams] == [float(b.DeliveredPrimaryMeterset)
                                                 for b in delivered]
    assert [b.flag for b in s.beams[:-1]] == ["", ""]
    assert s.beams[-1].termination == "OPERATOR"
    assert s.beams[-1].flag == "ended OPERATOR; -50.0 MU against the plan"

    # The same facts as the treatment report, where they overlap.
    report = build_report(facts_frame(record_facts(r) for r in c.records),
                          {c.plan.SOPInstanceUID: plan_facts(c.plan)}, START.date(),
                          (START + timedelta(days=6)).date())
    row = report.iloc[0]
    assert (row.CurrentFraction, row.FractionsPlanned) == (s.fractions_delivered,
                                                           s.fractions_planned)
    assert (row.FirstTreatment, row.LastTreatment) == (s.first_treatment, s.last_treatment)


def test_the_next_fraction_beyond_the_plan_is_a_stop_line_and_a_missing_plan_is_said() -> None:
    c = make_course(Patient("SH002", "Over^Bob"), START, delivered=3, fractions=3, slices=1)
    s = plan_sheet(c.plan, c.records)
    assert s.next_fraction == 4 and s.limit == "STOP: fraction 4 is beyond the 3 planned"

    lost = plan_sheet(None, c.records)
    assert lost.total_dose_gy is None and lost.beams and lost.next_fraction == 4
    # The records' NumberOfFractionsPlanned (3) still makes it a stop.
    assert lost.limit == "STOP: fraction 4 is beyond the 3 planned"
    assert any("plan not in the backup" in w for w in lost.warnings)
