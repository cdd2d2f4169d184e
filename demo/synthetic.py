"""Synthetic but standard-conformant radiotherapy courses.

A course is what an R&V system holds for one patient and one plan: a planning CT series, an
RT Structure Set on it, an RT Plan with one fraction group, an RT Dose for the plan, and one
RT Beams Treatment Record per delivered fraction. Every object passes ``dciodvfy`` (tested).
UIDs are derived from stable keys, so the same course always has the same UIDs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_BEAMS_RECORD = "1.2.840.10008.5.1.4.1.1.481.4"

UID_ROOT = "1.2.826.0.1.3680043.8.498."


def uid(*keys: object) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(k) for k in keys])


@dataclass(frozen=True)
class Patient:
    patient_id: str
    name: str
    birth_date: str = "19600101"
    sex: str = "O"
    physician: str = "Curie^Marie"


@dataclass(frozen=True)
class Study:
    patient: Patient
    key: str = "study1"
    study_date: str = "20260101"

    @property
    def uid(self) -> str:
        return uid(self.patient.patient_id, self.key)

    @property
    def study_time(self) -> str:
        """Between 07:00 and 16:59, by patient and study: a clinic's studies of one day do not
        all begin at the same second."""
        n = int(self.uid.rsplit(".", 1)[-1]) % 600
        return f"{7 + n // 60:02d}{n % 60:02d}00"


@dataclass
class Series:
    """An image series: its UID, frame of reference and instances."""

    series_uid: str
    frame_of_reference_uid: str
    modality: str
    instances: list[Dataset] = field(default_factory=list)


def _base(study: Study, sop_class: str, sop_uid: str, modality: str, series_uid: str,
          series_number: int) -> Dataset:
    p = study.patient
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = p.physician
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.Manufacturer = "RadOnc Backup synthetic"
    ds.InstanceCreationDate = study.study_date
    return ds


def make_image_series(study: Study, key: str = "ct", slices: int = 20, rows: int = 64,
                      columns: int = 64, modality: str = "CT") -> Series:
    """A planning image series (CT or MR) with a gentle phantom in the pixels."""
    series_uid = uid(study.uid, key, "series")
    for_uid = uid(study.uid, key, "for")
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    yy, xx = np.mgrid[0:rows, 0:columns]
    body = ((yy - rows / 2) ** 2 + (xx - columns / 2) ** 2) < (min(rows, columns) / 2.5) ** 2
    series = Series(series_uid, for_uid, modality)
    for i in range(slices):
        ds = _base(study, sop_class, uid(series_uid, i), modality, series_uid,
                   2 if modality == "CT" else 3)
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.Laterality = ""
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ContentDate = study.study_date
        ds.ContentTime = "080000"
        ds.AcquisitionNumber = 1
        ds.PixelSpacing = [2.0, 2.0]
        ds.SliceThickness = 3.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-columns, -rows, -30.0 + 3.0 * i]
        ds.SliceLocation = -30.0 + 3.0 * i
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if modality == "CT":
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.KVP = 120
            pixels = np.where(body, 1024 + 40 + (i % 7), 24).astype(np.uint16)
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = 10
            ds.RepetitionTime = 500
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 1.5
            pixels = np.where(body, 800 + (i % 5), 0).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        series.instances.append(ds)
    return series


def make_rtstruct(study: Study, images: Series, key: str = "ss1",
                  also: list[Series] | None = None) -> Dataset:
    """A structure set on ``images``; ``also`` lists further referenced series (e.g. an MR)."""
    ds = _base(study, RT_STRUCT, uid(study.uid, key), "RTSTRUCT",
               uid(study.uid, key, "series"), 4)
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = images.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = key.upper()[:16]
    ds.StructureSetDate = study.study_date
    ds.StructureSetTime = "090000"
    ds.ReferencedFrameOfReferenceSequence = Sequence(
        [_referenced_frame(study, s) for s in [images, *(also or [])]])

    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = images.frame_of_reference_uid
    roi.ROIName = "PTV"
    roi.ROIGenerationAlgorithm = "MANUAL"
    ds.StructureSetROISequence = Sequence([roi])

    contours = Sequence()
    for img in images.instances[len(images.instances) // 3: 2 * len(images.instances) // 3]:
        z = float(img.ImagePositionPatient[2])
        c = Dataset()
        ref = Dataset()
        ref.ReferencedSOPClassUID = img.SOPClassUID
        ref.ReferencedSOPInstanceUID = img.SOPInstanceUID
        c.ContourImageSequence = Sequence([ref])
        c.ContourGeometricType = "CLOSED_PLANAR"
        c.NumberOfContourPoints = 4
        c.ContourData = [-10, -10, z, 10, -10, z, 10, 10, z, -10, 10, z]
        contours.append(c)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ContourSequence = contours
    ds.ROIContourSequence = Sequence([roi_contour])

    obs = Dataset()
    obs.ObservationNumber = 1
    obs.ReferencedROINumber = 1
    obs.RTROIInterpretedType = "PTV"
    obs.ROIInterpreter = ""
    ds.RTROIObservationsSequence = Sequence([obs])
    return ds


def _referenced_frame(study: Study, series: Series) -> Dataset:
    contour_images = Sequence()
    for img in series.instances:
        item = Dataset()
        item.ReferencedSOPClassUID = img.SOPClassUID
        item.ReferencedSOPInstanceUID = img.SOPInstanceUID
        contour_images.append(item)
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = series.series_uid
    rt_series.ContourImageSequence = contour_images
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    rt_study.ReferencedSOPInstanceUID = study.uid
    rt_study.RTReferencedSeriesSequence = Sequence([rt_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = series.frame_of_reference_uid
    ref_for.RTReferencedStudySequence = Sequence([rt_study])
    return ref_for


def make_rtplan(study: Study, rtstruct: Dataset, frame_of_reference_uid: str, key: str = "plan1",
                label: str = "PROSTATE", machine: str = "TrueBeam1", fractions: int = 28,
                beams: int = 3, meterset: float = 100.0,
                dose_per_fraction: float = 2.0) -> Dataset:
    ds = _base(study, RT_PLAN, uid(study.uid, key), "RTPLAN", uid(study.uid, key, "series"), 5)
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.RTPlanLabel = label[:16]
    ds.RTPlanName = label
    ds.RTPlanDate = study.study_date
    ds.RTPlanTime = "100000"
    ds.RTPlanGeometry = "PATIENT"
    ss = Dataset()
    ss.ReferencedSOPClassUID = RT_STRUCT
    ss.ReferencedSOPInstanceUID = rtstruct.SOPInstanceUID
    ds.ReferencedStructureSetSequence = Sequence([ss])

    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = "HFS"
    setup.SetupTechnique = "ISOCENTRIC"
    device = Dataset()
    device.FixationDeviceType = "VACUUM_MOLD"
    device.FixationDeviceLabel = "Vac-Lok 1"
    setup.FixationDeviceSequence = Sequence([device])
    ds.PatientSetupSequence = Sequence([setup])

    target = Dataset()  # the prescription: fractions x dose a fraction to the target
    target.DoseReferenceNumber = 1
    target.DoseReferenceStructureType = "SITE"
    target.DoseReferenceDescription = label[:64]
    target.DoseReferenceType = "TARGET"
    target.TargetPrescriptionDose = round(fractions * dose_per_fraction, 3)
    ds.DoseReferenceSequence = Sequence([target])

    fg = Dataset()
    fg.FractionGroupNumber = 1
    fg.NumberOfFractionsPlanned = fractions
    fg.NumberOfBeams = beams
    fg.NumberOfBrachyApplicationSetups = 0
    fg.ReferencedBeamSequence = Sequence()
    ds.BeamSequence = Sequence()
    for b in range(1, beams + 1):
        rb = Dataset()
        rb.ReferencedBeamNumber = b
        rb.BeamMeterset = meterset
        fg.ReferencedBeamSequence.append(rb)
        ds.BeamSequence.append(_plan_beam(b, machine, beams))
    ds.FractionGroupSequence = Sequence([fg])
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = study.study_date
    ds.ReviewTime = "110000"
    ds.ReviewerName = study.patient.physician
    return ds


def _plan_beam(number: int, machine: str, beams: int) -> Dataset:
    beam = Dataset()
    beam.BeamNumber = number
    beam.BeamName = f"Field {number}"
    beam.BeamType = "STATIC"
    beam.RadiationType = "PHOTON"
    beam.TreatmentMachineName = machine
    beam.PrimaryDosimeterUnit = "MU"
    beam.SourceAxisDistance = 1000.0
    beam.TreatmentDeliveryType = "TREATMENT"
    beam.ReferencedPatientSetupNumber = 1
    jaws = Sequence()
    for kind in ("ASYMX", "ASYMY"):
        d = Dataset()
        d.RTBeamLimitingDeviceType = kind
        d.NumberOfLeafJawPairs = 1
        jaws.append(d)
    beam.BeamLimitingDeviceSequence = jaws
    beam.NumberOfWedges = 0
    beam.NumberOfCompensators = 0
    beam.NumberOfBoli = 0
    beam.NumberOfBlocks = 0
    beam.FinalCumulativeMetersetWeight = 1.0
    beam.NumberOfControlPoints = 2
    gantry = (360.0 / beams * (number - 1)) % 360
    first = Dataset()
    first.ControlPointIndex = 0
    first.NominalBeamEnergy = 6.0
    first.DoseRateSet = 600.0
    first.GantryAngle = gantry
    first.GantryRotationDirection = "NONE"
    first.BeamLimitingDeviceAngle = 0.0
    first.BeamLimitingDeviceRotationDirection = "NONE"
    first.PatientSupportAngle = 0.0
    first.PatientSupportRotationDirection = "NONE"
    first.TableTopEccentricAngle = 0.0
    first.TableTopEccentricRotationDirection = "NONE"
    first.TableTopVerticalPosition = 0.0
    first.TableTopLongitudinalPosition = 0.0
    first.TableTopLateralPosition = 0.0
    first.IsocenterPosition = [0.0, 0.0, 0.0]
    first.SourceToSurfaceDistance = 900.0
    positions = Sequence()
    for kind in ("ASYMX", "ASYMY"):
        p = Dataset()
        p.RTBeamLimitingDeviceType = kind
        p.LeafJawPositions = [-50.0, 50.0]
        positions.append(p)
    first.BeamLimitingDevicePositionSequence = positions
    first.CumulativeMetersetWeight = 0.0
    last = Dataset()
    last.ControlPointIndex = 1
    last.CumulativeMetersetWeight = 1.0
    beam.ControlPointSequence = Sequence([first, last])
    return beam


def make_rtdose(study: Study, plan: Dataset, images: Series, key: str = "dose1") -> Dataset:
    ds = _base(study, RT_DOSE, uid(plan.SOPInstanceUID, key), "RTDOSE",
               uid(plan.SOPInstanceUID, key, "series"), 6)
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = images.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ContentDate = study.study_date
    ds.ContentTime = "100000"
    frames, rows, cols = 4, 16, 16
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-32.0, -32.0, -6.0]
    ds.PixelSpacing = [4.0, 4.0]
    ds.SliceThickness = 3.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x3004000C
    ds.GridFrameOffsetVector = [3.0 * i for i in range(frames)]
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = 0.001
    ref = Dataset()
    ref.ReferencedSOPClassUID = RT_PLAN
    ref.ReferencedSOPInstanceUID = plan.SOPInstanceUID
    ds.ReferencedRTPlanSequence = Sequence([ref])
    ds.PixelData = np.full((frames, rows, cols), 2000, dtype=np.uint16).tobytes()
    return ds


def make_treatment_record(study: Study, plan: Dataset, fraction: int, when: datetime,
                          series_uid: str | None = None, beam_fractions: list[int] | None = None,
                          key: str = "", termination: str = "NORMAL") -> Dataset:
    """One RT Beams Treatment Record: the session that delivered ``fraction`` at ``when``.

    ``beam_fractions`` overrides CurrentFractionNumber per beam (R&V systems do record beams of one
    session under different fraction numbers, e.g. after a make-up session). ``termination``
    other than NORMAL ends the last beam early (half its meterset delivered), as an interlock or
    the therapist would.
    """
    plan_uid = plan.SOPInstanceUID
    series_uid = series_uid or uid(plan_uid, "records")
    ds = _base(study, RT_BEAMS_RECORD, uid(plan_uid, "record", fraction, when.isoformat(), key),
               "RTRECORD", series_uid, 7)
    ds.OperatorsName = ""
    ds.InstanceNumber = fraction
    ds.TreatmentDate = when.strftime("%Y%m%d")
    ds.TreatmentTime = when.strftime("%H%M%S")
    ref = Dataset()
    ref.ReferencedSOPClassUID = RT_PLAN
    ref.ReferencedSOPInstanceUID = plan_uid
    ds.ReferencedRTPlanSequence = Sequence([ref])
    machine_name = plan.BeamSequence[0].TreatmentMachineName
    machine = Dataset()
    machine.TreatmentMachineName = machine_name
    machine.Manufacturer = "Varian Medical Systems"
    machine.InstitutionName = "RadOnc Backup Demo Clinic"
    machine.ManufacturerModelName = "Synthetic Linac"
    machine.DeviceSerialNumber = "0001"
    ds.TreatmentMachineSequence = Sequence([machine])
    fg = plan.FractionGroupSequence[0]
    ds.ReferencedFractionGroupNumber = 1
    ds.NumberOfFractionsPlanned = fg.NumberOfFractionsPlanned
    ds.PrimaryDosimeterUnit = "MU"
    ds.TreatmentSessionBeamSequence = Sequence()
    last = len(plan.BeamSequence) - 1
    for i, beam in enumerate(plan.BeamSequence):
        number = beam_fractions[i] if beam_fractions else fraction
        ds.TreatmentSessionBeamSequence.append(
            _session_beam(beam, fg.ReferencedBeamSequence[i].BeamMeterset, number,
                          when + timedelta(minutes=2 * i),
                          termination if i == last else "NORMAL")
        )
    return ds


def _session_beam(beam: Dataset, meterset: float, fraction: int, when: datetime,
                  termination: str = "NORMAL") -> Dataset:
    sb = Dataset()
    sb.ReferencedBeamNumber = beam.BeamNumber
    sb.BeamName = beam.BeamName
    sb.BeamType = beam.BeamType
    sb.RadiationType = beam.RadiationType
    sb.NumberOfWedges = 0
    sb.NumberOfCompensators = 0
    sb.NumberOfBoli = 0
    sb.NumberOfBlocks = 0
    leaf_pairs = Sequence()
    for kind in ("ASYMX", "ASYMY"):
        d = Dataset()
        d.RTBeamLimitingDeviceType = kind
        d.NumberOfLeafJawPairs = 1
        leaf_pairs.append(d)
    sb.BeamLimitingDeviceLeafPairsSequence = leaf_pairs
    sb.CurrentFractionNumber = fraction
    sb.TreatmentDeliveryType = "TREATMENT"
    sb.TreatmentTerminationStatus = termination
    sb.TreatmentVerificationStatus = "VERIFIED_OVR"
    sb.SpecifiedPrimaryMeterset = meterset
    sb.DeliveredPrimaryMeterset = meterset if termination == "NORMAL" else round(meterset / 2, 2)
    sb.NumberOfControlPoints = 2
    cps = Sequence()
    for index, weight in ((0, 0.0), (1, 1.0)):
        cp = Dataset()
        cp.ReferencedControlPointIndex = index
        cp.TreatmentControlPointDate = when.strftime("%Y%m%d")
        cp.TreatmentControlPointTime = (when + timedelta(seconds=30 * index)).strftime("%H%M%S")
        cp.SpecifiedMeterset = meterset * weight
        cp.DeliveredMeterset = meterset * weight
        cp.DoseRateSet = 600.0
        cp.DoseRateDelivered = 600.0
        cp.NominalBeamEnergyUnit = "MV"
        cp.NominalBeamEnergy = 6.0
        cp.GantryAngle = beam.ControlPointSequence[0].GantryAngle
        cp.GantryRotationDirection = "NONE"
        cp.BeamLimitingDeviceAngle = 0.0
        cp.BeamLimitingDeviceRotationDirection = "NONE"
        cp.PatientSupportAngle = 0.0
        cp.PatientSupportRotationDirection = "NONE"
        cp.TableTopEccentricAngle = 0.0
        cp.TableTopEccentricRotationDirection = "NONE"
        cp.TableTopVerticalPosition = 0.0
        cp.TableTopLongitudinalPosition = 0.0
        cp.TableTopLateralPosition = 0.0
        cps.append(cp)
    sb.ControlPointDeliverySequence = cps
    return sb


@dataclass
class Course:
    """Everything an R&V holds for one plan of one patient."""

    patient: Patient
    study: Study
    images: Series
    rtstruct: Dataset
    plan: Dataset
    dose: Dataset
    records: list[Dataset]

    def context(self) -> list[Dataset]:
        return [*self.images.instances, self.rtstruct, self.plan, self.dose]

    def all(self) -> list[Dataset]:
        return [*self.context(), *self.records]

    def add_record(self, when: datetime, fraction: int | None = None) -> Dataset:
        """Deliver one more fraction at ``when`` (local wall-clock time)."""
        record = make_treatment_record(self.study, self.plan, fraction or len(self.records) + 1,
                                       when)
        self.records.append(record)
        return record


def make_course(patient: Patient, first_fraction: datetime, delivered: int, fractions: int = 28,
                label: str = "PROSTATE", machine: str = "TrueBeam1", plan_key: str = "plan1",
                slices: int = 20, every: timedelta = timedelta(days=1)) -> Course:
    """A course with ``delivered`` fractions given ``every`` apart from ``first_fraction``."""
    study = Study(patient, study_date=(first_fraction - timedelta(days=14)).strftime("%Y%m%d"))
    images = make_image_series(study, slices=slices)
    rtstruct = make_rtstruct(study, images)
    plan = make_rtplan(study, rtstruct, images.frame_of_reference_uid, key=plan_key, label=label,
                       machine=machine, fractions=fractions)
    dose = make_rtdose(study, plan, images)
    records = [make_treatment_record(study, plan, n + 1, first_fraction + n * every)
               for n in range(delivered)]
    return Course(patient, study, images, rtstruct, plan, dose, records)


def to_bytes(ds: Dataset) -> bytes:
    """Encode as a DICOM Part 10 file (explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def demo_cohort(today: date, now: datetime | None = None) -> list[Course]:
    """A small clinic day: patients mid-course, one finishing today, one starting today."""
    now = now or datetime.combine(today, datetime.min.time()).replace(hour=16)
    morning = datetime.combine(today, datetime.min.time()).replace(hour=8)
    specs = [
        (Patient("DEMO001", "Doe^Jane", "19580312", "F"), 10, 28, "PROSTATE", "TrueBeam1", 0),
        (Patient("DEMO002", "Smith^John", "19490704", "M"), 25, 25, "LUNG_R", "TrueBeam2", 20),
        (Patient("DEMO003", "Müller^Jürgen", "19711111", "M"), 1, 5, "BRAIN_SRS", "TrueBeam1", 40),
        (Patient("DEMO004", "García^Lucía", "19830221", "F"), 15, 30, "BREAST_L", "TrueBeam2", 60),
    ]
    courses = []
    for patient, delivered, planned, label, machine, minutes in specs:
        last = min(morning + timedelta(minutes=minutes), now - timedelta(minutes=5))
        first = last - timedelta(days=delivered - 1)
        courses.append(make_course(patient, first, delivered, planned, label, machine))
    return courses
