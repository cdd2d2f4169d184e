"""What a therapist needs to treat the next fraction of one plan in file mode, read from the
backup alone: the plan's prescription, beams and setup, and what its RT Records say was
delivered. Pure functions of the datasets (the downtime pack reads them from the backup).

Where a fact comes from (docs/downtime-pack.md lists each field):
- prescription: the plan's Dose Reference Sequence (the largest TargetPrescriptionDose of its
  TARGET references; none: blank, with a warning) and its first Fraction Group
  (NumberOfFractionsPlanned, each beam's BeamMeterset); the dose a fraction is their quotient;
- beams: the plan's Beam Sequence (name, radiation type, nominal energy of the first control
  point, machine), TREATMENT beams only (setup beams deliver nothing);
- setup: the plan's first Patient Setup (position, setup technique, fixation and shielding
  devices);
- approval: ApprovalStatus, ReviewerName, ReviewDate/Time;
- delivered: the highest CurrentFractionNumber of the plan's records, the first and last
  session, and the last session's DeliveredPrimaryMeterset and termination per beam.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from .report_facts import readable_name

MU_TOLERANCE = 0.01  # a delivered meterset more than 1% (and 0.5 MU) off the plan is flagged
MU_FLOOR = 0.5


@dataclass
class BeamLine:
    number: str
    name: str
    radiation_type: str
    energy: str
    machine: str
    planned_mu: float | None
    delivered_mu: float | None = None  # in the last session
    termination: str = ""
    flag: str = ""  # why this line needs a look, '' when it does not


@dataclass
class PlanSheet:
    label: str = ""
    approval: str = ""
    reviewer: str = ""
    reviewed: str = ""
    total_dose_gy: float | None = None
    dose_per_fraction_gy: float | None = None
    fractions_planned: int | None = None
    fractions_delivered: int | None = None
    dose_delivered_gy: float | None = None  # fractions delivered x prescribed dose a fraction
    next_fraction: int | None = None
    limit: str = ""  # '' when the next fraction is within the plan, else the red line
    first_treatment: str = ""
    last_treatment: str = ""
    position: str = ""
    setup_technique: str = ""
    devices: list[str] = field(default_factory=list)
    beams: list[BeamLine] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _int(value: object) -> int | None:
    number = _float(value)
    return int(number) if number is not None and number == int(number) else None


def _when(date_text: object, time_text: object) -> str:
    d, t = str(date_text or ""), str(time_text or "").split(".")[0]
    if len(d) != 8 or not d.isdigit():
        return ""
    out = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    if len(t) >= 4 and t.isdigit():
        out += f" {t[:2]}:{t[2:4]}"
    return out


def _record_beams(record: Dataset) -> list[Dataset]:
    return list(record.get("TreatmentSessionBeamSequence")
                or record.get("TreatmentSessionIonBeamSequence") or [])


def _fraction(record: Dataset) -> int | None:
    numbers = [n for n in (_int(b.get("CurrentFractionNumber")) for b in _record_beams(record))
               if n is not None]
    return max(numbers) if numbers else None


def _treated(record: Dataset) -> str:
    return f"{record.get('TreatmentDate', '') or ''}{str(record.get('TreatmentTime', '') or '')}"


def plan_sheet(plan: Dataset | None, records: list[Dataset],
               plan_expected: bool = True) -> PlanSheet:
    """The sheet of one plan from its dataset (None: not in the backup, or ``plan_expected``
    False: a course with no plan, a Mosaiq prescription) and its RT Records."""
    out = PlanSheet()
    # The last session: the latest, and of records of one session the one with most beams.
    dated = sorted((r for r in records if _when(r.get("TreatmentDate"), "")),
                   key=lambda r: (_treated(r), len(_record_beams(r))))
    if plan is not None:
        _read_plan(plan, out)
    elif plan_expected:
        out.warnings.append("plan not in the backup: prescription, beams and setup unknown")
    else:
        out.label = str(records[0].get("SeriesDescription", "") or "") if records else ""
        out.warnings.append("no plan (records made from Mosaiq's SQL): prescription, beams and "
                            "setup from Mosaiq's own screens")
    fractions = [f for f in (_fraction(r) for r in records) if f is not None]
    out.fractions_delivered = max(fractions) if fractions else None
    if out.fractions_planned is None:
        out.fractions_planned = _int(records[-1].get("NumberOfFractionsPlanned")) \
            if records else None
    if out.fractions_delivered is not None:
        out.next_fraction = out.fractions_delivered + 1
        if out.dose_per_fraction_gy is not None:
            out.dose_delivered_gy = round(out.fractions_delivered * out.dose_per_fraction_gy, 3)
    if out.next_fraction is not None and out.fractions_planned is not None \
            and out.next_fraction > out.fractions_planned:
        out.limit = (f"STOP: fraction {out.next_fraction} is beyond the {out.fractions_planned} "
                     "planned")
    if out.next_fraction is None:
        out.warnings.append("no fraction number in the records: the next fraction is unknown")
    if dated:
        out.first_treatment = _when(dated[0].get("TreatmentDate"), dated[0].get("TreatmentTime"))
        last = dated[-1]
        out.last_treatment = _when(last.get("TreatmentDate"), last.get("TreatmentTime"))
        _read_last_session(last, out)
    return out


def _read_plan(plan: Dataset, out: PlanSheet) -> None:
    out.label = str(plan.get("RTPlanLabel", "") or "")
    out.approval = str(plan.get("ApprovalStatus", "") or "")
    out.reviewer = readable_name(plan.get("ReviewerName", ""))
    out.reviewed = _when(plan.get("ReviewDate"), plan.get("ReviewTime"))
    if out.approval and out.approval != "APPROVED":
        out.warnings.append(f"plan approval status {out.approval}")
    targets = [_float(d.get("TargetPrescriptionDose"))
               for d in plan.get("DoseReferenceSequence") or []
               if str(d.get("DoseReferenceType", "")) == "TARGET"]
    targets = [t for t in targets if t is not None]
    out.total_dose_gy = max(targets) if targets else None
    groups = plan.get("FractionGroupSequence") or []
    metersets: dict[str, float | None] = {}
    if groups:
        out.fractions_planned = _int(groups[0].get("NumberOfFractionsPlanned"))
        metersets = {str(b.get("ReferencedBeamNumber", "")): _float(b.get("BeamMeterset"))
                     for b in groups[0].get("ReferencedBeamSequence") or []}
    if out.total_dose_gy is not None and out.fractions_planned:
        out.dose_per_fraction_gy = round(out.total_dose_gy / out.fractions_planned, 4)
    if out.total_dose_gy is None:
        out.warnings.append("the plan names no prescribed target dose")
    setups = plan.get("PatientSetupSequence") or []
    if setups:
        setup = setups[0]
        out.position = str(setup.get("PatientPosition", "") or "")
        out.setup_technique = str(setup.get("SetupTechnique", "") or "")
        for seq, kind in (("FixationDeviceSequence", "FixationDeviceType"),
                          ("ShieldingDeviceSequence", "ShieldingDeviceType")):
            for device in setup.get(seq) or []:
                label = str(device.get(kind, "") or "")
                extra = str(device.get(kind.replace("Type", "Label"), "") or "")
                out.devices.append(f"{label} {extra}".strip())
    for beam in plan.get("BeamSequence") or []:
        if str(beam.get("TreatmentDeliveryType", "TREATMENT") or "TREATMENT") != "TREATMENT":
            continue
        points = beam.get("ControlPointSequence") or []
        energy = _float(points[0].get("NominalBeamEnergy")) if points else None
        number = str(beam.get("BeamNumber", ""))
        out.beams.append(BeamLine(
            number, str(beam.get("BeamName", "") or ""), str(beam.get("RadiationType", "") or ""),
            f"{energy:g}" if energy is not None else "", str(beam.get("TreatmentMachineName", "")
                                                             or ""), metersets.get(number)))


def _read_last_session(record: Dataset, out: PlanSheet) -> None:
    """Each beam's delivered meterset and termination in the last session, against the plan."""
    by_number = {b.number: b for b in out.beams}
    for delivered in _record_beams(record):
        number = str(delivered.get("ReferencedBeamNumber", ""))
        line = by_number.get(number)
        if line is None:  # a beam the plan does not have (or no plan): shown as delivered
            line = BeamLine(number, str(delivered.get("BeamName", "") or ""),
                            str(delivered.get("RadiationType", "") or ""), "", "", None)
            out.beams.append(line)
            by_number[number] = line
        line.delivered_mu = _float(delivered.get("DeliveredPrimaryMeterset"))
        line.termination = str(delivered.get("TreatmentTerminationStatus", "") or "")
        flags = []
        if line.termination and line.termination != "NORMAL":
            flags.append(f"ended {line.termination}")
        if line.delivered_mu is not None and line.planned_mu is not None:
            off = line.delivered_mu - line.planned_mu
            if abs(off) > max(MU_FLOOR, MU_TOLERANCE * line.planned_mu):
                flags.append(f"{off:+.1f} MU against the plan")
        line.flag = "; ".join(flags)
