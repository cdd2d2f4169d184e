"""Mosaiq as a source: delivered fields read from its SQL database through ODBC, turned into RT
Beams Treatment Records (one per patient per session) and staged for the one delivery path.

The query contract (docs/backup.md, "Mosaiq"): one row per delivered field, the columns of
``COLUMNS`` (a site's own ``sessions_query`` must return them, by these names), two bound
parameters, the start and end of the window in the site's local time. Nothing Mosaiq lacks is
invented: absent values stay empty; UIDs are derived from the site's UID root and Mosaiq's
keys, so a rerun makes the same objects and the backup never fills with duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import sop_class as sop

from .config import MosaiqSource, Site, resolve_secret
from .errors import ConfigError, RetriableDicomError
from .instance import InstanceRef
from .report_facts import MADE_BY_US, MU_LIMIT

_SELECT = """
SELECT d.Pat_ID1 AS pat_id1, i.IDA AS mrn, p.Last_Name AS last_name,
       p.First_Name AS first_name, d.SIT_ID AS sit_id, s.Site_Name AS site_name,
       s.Dose_Ttl AS dose_ttl, s.Fractions AS fractions, d.FLD_ID AS fld_id,
       f.Field_Name AS field_name, f.Modality AS radiation_type, d.Tx_DtTm AS tx_dttm,
       d.Fractions_Tx AS fraction, d.Meterset AS meterset
FROM Dose_Hst d
LEFT JOIN Ident i ON i.Pat_Id1 = d.Pat_ID1
LEFT JOIN Patient p ON p.Pat_ID1 = d.Pat_ID1
LEFT JOIN TxField f ON f.FLD_ID = d.FLD_ID
LEFT JOIN Site s ON s.SIT_ID = d.SIT_ID
"""
SESSIONS_QUERY = _SELECT + """WHERE d.Tx_DtTm >= ? AND d.Tx_DtTm < ?
ORDER BY d.Pat_ID1, d.Tx_DtTm, d.FLD_ID
"""
"""Dose_Hst joined by its own keys (FLD_ID, SIT_ID name the field and prescription rows as
delivered, so a later version of a field or prescription does not rewrite history). Every join
is a LEFT JOIN: a delivery whose patient has no Ident or Patient row is still a delivery (its
record carries Mosaiq's Pat_ID1 and the run summary names what is missing)."""
UNDATED_QUERY = _SELECT + """WHERE d.Tx_DtTm IS NULL
ORDER BY d.Pat_ID1, d.FLD_ID
"""
"""Delivered fields without a treatment date: no window can select them (the nightly asks)."""

COLUMNS = ("pat_id1", "mrn", "last_name", "first_name", "sit_id", "site_name", "dose_ttl",
           "fractions", "fld_id", "field_name", "radiation_type", "tx_dttm", "fraction",
           "meterset")
RADIATION_TYPES = {"X": "PHOTON", "XRAY": "PHOTON", "X-RAY": "PHOTON", "PHOTON": "PHOTON",
                   "E": "ELECTRON", "ELECTRON": "ELECTRON", "P": "PROTON", "PROTON": "PROTON",
                   "ION": "ION", "NEUTRON": "NEUTRON"}


@dataclass(frozen=True)
class DeliveredField:
    pat_id1: str
    mrn: str
    last_name: str
    first_name: str
    sit_id: str
    site_name: str
    dose_ttl: float | None  # cGy
    fractions: int | None
    fld_id: str
    field_name: str
    radiation_type: str  # Mosaiq's word for it; mapped in _beam
    tx_dttm: datetime | None  # None: Mosaiq holds no date for it (the nightly finds these)
    fraction: int | None
    meterset: float | None  # MU


@dataclass
class Session:
    """The fields one patient had delivered for one prescription in one session."""

    first: DeliveredField
    fields: list[DeliveredField] = field(default_factory=list)
    course_start: datetime | None = None  # the prescription's first delivery (StudyDate)

    @property
    def key(self) -> tuple[str, ...]:
        return session_key(self.first)

    def content(self) -> str:
        """What was delivered, field by field: a record made from more (a field delivered
        after the last run) or corrected fields is another record (see ``session_record``)."""
        return "|".join(sorted(f"{f.fld_id}@{f.tx_dttm:%Y%m%d%H%M%S}" if f.tx_dttm else
                               f"{f.fld_id}@" for f in self.fields)) + "|" + "|".join(
            f"{f.fld_id}={f.meterset!r}" for f in sorted(self.fields, key=lambda x: x.fld_id))


SESSION_SPAN = timedelta(hours=24)
"""How far a session's fields may lie apart (a fraction begun before midnight and finished
after): a window's read reaches back this far so that each session it touches is read whole."""


def session_key(f: DeliveredField) -> tuple[str, ...]:
    """What makes one session: patient, prescription and fraction number (across midnight
    too); without a fraction number, the day; a field without a date is a session of its own
    kind (it never joins a dated one, which the incremental reads without it)."""
    if f.fraction is not None and f.tx_dttm is not None:
        return (f.pat_id1, f.sit_id, f"fraction {f.fraction}")
    return (f.pat_id1, f.sit_id, _date(f.tx_dttm),
            str(f.fraction) if f.fraction is not None else "")


def _date(moment: datetime | None) -> str:
    return f"{moment:%Y%m%d}" if moment is not None else ""


def _time(moment: datetime | None) -> str:
    return f"{moment:%H%M%S}" if moment is not None else ""


def connect(site: Site, alias: str, source: MosaiqSource) -> object:
    """A read-only ODBC connection; a driver missing, a login refused or a server down is one
    line naming site and source (down and timeouts retriable)."""
    import pyodbc

    password = resolve_secret(site, f"source {alias}", source.password_env,
                              source.password_secret)
    conn_str = source.odbc + (f";PWD={password}" if password else "")
    try:
        return pyodbc.connect(conn_str, timeout=source.login_timeout, readonly=True,
                              autocommit=True)
    except pyodbc.Error as exc:
        text = _odbc_text(exc)
        if "IM002" in text or "Can't open lib" in text:  # unixODBC: no such driver or DSN
            raise ConfigError(f"site {site.name}: source {alias} ({source.label}): ODBC driver "
                              f"or data source not installed ({text}); `odbcinst -q -d` lists "
                              "the drivers") from None
        if any(m in text.lower() for m in _REFUSED):
            raise ConfigError(f"site {site.name}: source {alias} ({source.label}): login "
                              f"refused ({text}); check the user and database in `odbc` and "
                              f"the password in {_password_from(source)}") from None
        if any(m in text for m in ("08001", "08S01", "HYT00", "HYT01", "timeout", "timed out")):
            raise RetriableDicomError(site.name, source.label, "ODBC connect",
                                      f"database down or unreachable: {text}") from None
        raise ConfigError(f"site {site.name}: source {alias} ({source.label}): connection "
                          f"failed: {text}") from None


_REFUSED = ("28000", "28p01", "authentication failed", "login failed", "password",
            "does not exist", "cannot open database", "permission denied")
"""A refused login, which drivers report in their own words (psqlODBC says 08001 for every
failed connection, so the words decide before the state): never retried."""


def _password_from(source: MosaiqSource) -> str:
    if source.password_env:
        return f"${source.password_env}"
    if source.password_secret:
        return f"Secret block {source.password_secret!r}"
    return "password_env or password_secret (none is set)"


def _odbc_text(exc: Exception) -> str:
    """pyodbc's message on one line, without anything after PWD= (a driver may echo it)."""
    text = " ".join(str(a) for a in exc.args)
    return " ".join(text.split("PWD=")[0].split())


def read_fields(conn: object, site: Site, alias: str, source: MosaiqSource, start: datetime,
                end: datetime) -> list[DeliveredField]:
    """Every field delivered from ``start`` to ``end`` inclusive (site local time).

    The SQL asks one second more on each side (a driver may bind the bound with fractions a
    text column compares differently) and the rows are cut to the window here."""
    rows = _select(conn, site, alias, source, source.sessions_query or SESSIONS_QUERY,
                   start - timedelta(seconds=1), end + timedelta(seconds=1))
    return [f for f in rows if f.tx_dttm is not None and start <= f.tx_dttm <= end]


def read_sessions(conn: object, site: Site, alias: str, source: MosaiqSource, start: datetime,
                  end: datetime) -> list["Session"]:
    """Every session with a field delivered from ``start`` to ``end``, read whole: its fields
    from up to ``SESSION_SPAN`` before the window too (a session the last run saw half of is
    made again with every field it has now)."""
    fields = read_fields(conn, site, alias, source, start - SESSION_SPAN, end)
    touched = {session_key(f) for f in fields if f.tx_dttm is not None and f.tx_dttm >= start}
    return [s for s in sessions(fields) if s.key in touched]


def course_starts(conn: object, site: Site, alias: str, source: MosaiqSource,
                  found: list["Session"]) -> None:
    """Give each session its prescription's first delivery (one query per patient): the
    StudyDate of the prescription's study, and the sheet's first treatment of the course."""
    starts: dict[tuple[str, str], datetime] = {}
    for patient in sorted({s.first.pat_id1 for s in found}):
        for f in fields_of_patient(conn, site, alias, source, pat_id1=patient):
            key = (f.pat_id1, f.sit_id)
            if f.tx_dttm is not None and (key not in starts or f.tx_dttm < starts[key]):
                starts[key] = f.tx_dttm
    for s in found:
        s.course_start = starts.get((s.first.pat_id1, s.first.sit_id))


def read_undated(conn: object, site: Site, alias: str, source: MosaiqSource,
                 ) -> list[DeliveredField]:
    """Every delivered field Mosaiq holds without a treatment date (``undated_query``)."""
    return _select(conn, site, alias, source, source.undated_query or UNDATED_QUERY)


def fields_of_patient(conn: object, site: Site, alias: str, source: MosaiqSource, *,
                      mrn: str | None = None, pat_id1: str | None = None,
                      ) -> list[DeliveredField]:
    """Every field ever delivered to one patient, by MRN or by Mosaiq's Pat_ID1 (bound)."""
    where = "WHERE i.IDA = ?" if mrn is not None else "WHERE d.Pat_ID1 = ?"
    return _select(conn, site, alias, source, _SELECT + where + " ORDER BY d.Tx_DtTm",
                   mrn if mrn is not None else pat_id1)


def _select(conn: object, site: Site, alias: str, source: MosaiqSource, query: str,
            *params: object) -> list[DeliveredField]:
    import pyodbc

    try:
        cursor = conn.cursor()  # type: ignore[attr-defined]
        cursor.execute(query, *params)
        names = [d[0].lower() for d in cursor.description]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise ConfigError(f"site {site.name}: source {alias}: sessions_query returns no "
                              f"column {', '.join(missing)} (docs/backup.md lists the columns)")
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        if any(row["pat_id1"] is None for row in rows):
            raise ConfigError(f"site {site.name}: source {alias}: a query returned a delivered "
                              "field without pat_id1 (docs/backup.md lists the columns)")
    except pyodbc.OperationalError as exc:
        raise RetriableDicomError(site.name, source.label, "SQL",
                                  f"database connection lost: {_odbc_text(exc)}") from None
    except pyodbc.Error as exc:
        raise ConfigError(f"site {site.name}: source {alias} ({source.label}): SQL error: "
                          f"{_odbc_text(exc)}") from None
    return [_field(row) for row in rows]


SUMMARY_COLUMNS = ["PatientID", "PatientName", "Site", "PrescribedDoseGy", "FractionsPlanned",
                   "FractionsDelivered", "FirstTreatment", "LastTreatment"]


def summary_rows(fields: list[DeliveredField]) -> list[dict[str, object]]:
    """Per patient and prescription (Mosaiq's Site row): the prescription, the sessions
    delivered (distinct day and fraction number) and the first and last treatment date."""
    by_site: dict[tuple[str, str], list[DeliveredField]] = {}
    for f in fields:
        by_site.setdefault((f.pat_id1, f.sit_id), []).append(f)
    rows = []
    for group in by_site.values():
        f = group[0]
        days = sorted(x.tx_dttm for x in group if x.tx_dttm is not None)
        rows.append({
            "PatientID": f.mrn or f.pat_id1,
            "PatientName": f"{f.last_name}^{f.first_name}".strip("^"),
            "Site": f.site_name,
            "PrescribedDoseGy": round(f.dose_ttl / 100, 3) if f.dose_ttl is not None else "",
            "FractionsPlanned": f.fractions if f.fractions is not None else "",
            "FractionsDelivered": len({session_key(x) for x in group}),
            "FirstTreatment": f"{days[0]:%Y-%m-%d}" if days else "",
            "LastTreatment": f"{days[-1]:%Y-%m-%d}" if days else ""})
    return sorted(rows, key=lambda r: (str(r["PatientID"]), str(r["FirstTreatment"])))


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _number(value: object) -> float | None:
    if value is None or value == "":
        return None
    return float(value)  # type: ignore[arg-type]  # int, float or Decimal from the driver


def _when(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    return datetime.fromisoformat(str(value).strip())


def _field(row: dict[str, object]) -> DeliveredField:
    when = _when(row["tx_dttm"])
    fractions, fraction = _number(row["fractions"]), _number(row["fraction"])
    return DeliveredField(
        _text(row["pat_id1"]), _text(row["mrn"]), _text(row["last_name"]),
        _text(row["first_name"]), _text(row["sit_id"]), _text(row["site_name"]),
        _number(row["dose_ttl"]), int(fractions) if fractions is not None else None,
        _text(row["fld_id"]), _text(row["field_name"]), _text(row["radiation_type"]),
        when.replace(tzinfo=None) if when is not None else None,
        int(fraction) if fraction is not None else None, _number(row["meterset"]))


def sessions(fields: list[DeliveredField]) -> list[Session]:
    """Fields grouped per patient, prescription, day and fraction number: one record each."""
    grouped: dict[tuple[str, str, str, str], Session] = {}
    for f in sorted(fields, key=lambda f: (f.pat_id1, f.tx_dttm or datetime.min, f.fld_id)):
        grouped.setdefault(session_key(f), Session(f)).fields.append(f)
    return list(grouped.values())


def _uid(root: str, *keys: str) -> str:
    return str(generate_uid(prefix=root, entropy_srcs=["radonc-backup-mosaiq", *keys]))


def _ds_decimal(value: float) -> str:
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.4f}"[:16]




def person_name(last: str, first: str) -> str:
    """A PN value from Mosaiq's two name columns: a delimiter inside a name (``^``, ``=``,
    ``\\``) becomes a space; the whole at most 64 characters (the VR's limit for a component
    group), the family name kept first."""
    def clean(part: str) -> str:
        return " ".join(part.translate(str.maketrans("^=\\", "   ")).split())
    family, given = clean(last), clean(first)
    family = family[:63 - min(len(given), 1)]  # room for the delimiter and a given name
    given = given[:63 - len(family)]
    return f"{family}^{given}" if family or given else ""


def odd_values(session: Session, today: datetime | None = None) -> list[str]:
    """What in a session's rows a physicist must look at, naming the patient by ID (never by
    name) and the prescription: a missing Ident or Patient row, a value cut to its VR's length,
    no fraction number or fraction 0, a negative or absurd meterset, a date in the future."""
    f = session.first
    who = f"patient {f.mrn or f.pat_id1} (Pat_ID1 {f.pat_id1}), prescription {f.sit_id}"
    out = []
    if not f.mrn:
        out.append(f"{who}: no Ident row (no MRN): the record's PatientID is Mosaiq's Pat_ID1")
    if not (f.last_name or f.first_name):
        out.append(f"{who}: no Patient row or no name: the record's PatientName is empty")
    if len(f.mrn) > 64:
        out.append(f"{who}: MRN of {len(f.mrn)} characters cut to 64 (PatientID)")
    if len(f.last_name) + len(f.first_name) > 63 or any(
            c in f.last_name + f.first_name for c in "^=\\"):
        out.append(f"{who}: name cut to 64 characters or delimiters replaced "
                   "(PatientName)")
    for x in session.fields:
        if x.fraction is None:
            out.append(f"{who}: field {x.fld_id} delivered without a fraction number")
        elif x.fraction <= 0:
            out.append(f"{who}: field {x.fld_id} delivered as fraction {x.fraction}")
        if x.meterset is not None and x.meterset < 0:
            out.append(f"{who}: field {x.fld_id} delivered a negative meterset ({x.meterset} MU)")
        elif x.meterset is not None and x.meterset > MU_LIMIT:
            out.append(f"{who}: field {x.fld_id} delivered {x.meterset:g} MU (over "
                       f"{MU_LIMIT:g})")
        if x.tx_dttm is not None and x.tx_dttm > (today or datetime.now()) + timedelta(hours=1):
            out.append(f"{who}: field {x.fld_id} dated in the future ({x.tx_dttm:%Y-%m-%d %H:%M})")
    return list(dict.fromkeys(out))


def session_record(session: Session, site: Site, source: MosaiqSource) -> Dataset:
    """One RT Beams Treatment Record for ``session``: every field delivered in it is a beam of
    ``TreatmentSessionBeamSequence``. Mapping in docs/backup.md.

    The SOP Instance UID is made from the session and what was delivered in it: the same rows
    make the same record (a rerun stores nothing twice); a field delivered after the last run
    (or a corrected row) makes a new record of that session, which supersedes the earlier one
    (both are kept; the report reads the one with the most fields)."""
    dated = [x for x in session.fields if x.tx_dttm is not None]
    f, root = (min(dated, key=lambda x: x.tx_dttm) if dated else session.first), source.uid_root
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop.RTBeamsTreatmentRecordStorage
    ds.SOPInstanceUID = _uid(root, site.name, "record", *session.key, session.content())
    ds.PatientName = person_name(f.last_name, f.first_name)
    ds.PatientID = (f.mrn or f.pat_id1)[:64]
    ds.PatientBirthDate, ds.PatientSex = "", ""
    # One study per prescription, dated by its first delivery.
    ds.StudyInstanceUID = _uid(root, site.name, "study", f.pat_id1, f.sit_id)
    start = session.course_start or f.tx_dttm
    ds.StudyDate, ds.StudyTime = _date(start), _time(start)
    ds.ReferringPhysicianName = ""
    ds.StudyID, ds.AccessionNumber = f.sit_id[:16], ""
    ds.Modality = "RTRECORD"
    ds.SeriesInstanceUID = _uid(root, site.name, "series", f.pat_id1, f.sit_id)
    ds.SeriesNumber, ds.OperatorsName = 1, ""
    ds.SeriesDescription = f.site_name[:64]
    ds.Manufacturer = MADE_BY_US  # the report knows our records by it
    # Type 1: the fraction number, or 0 when Mosaiq holds none (named by odd_values).
    ds.InstanceNumber = f.fraction if f.fraction is not None else 0
    ds.TreatmentDate, ds.TreatmentTime = _date(f.tx_dttm), _time(f.tx_dttm)  # Type 2
    ds.ReferencedRTPlanSequence = Sequence()  # Type 2: Mosaiq's SQL knows no plan UID
    machine = Dataset()
    machine.TreatmentMachineName = ""
    machine.Manufacturer, machine.InstitutionName = "", ""
    machine.ManufacturerModelName, machine.DeviceSerialNumber = "", ""
    ds.TreatmentMachineSequence = Sequence([machine])
    ds.NumberOfFractionsPlanned = f.fractions if f.fractions is not None else ""
    ds.PrimaryDosimeterUnit = "MU"
    ds.TreatmentSessionBeamSequence = Sequence([_beam(x, source) for x in session.fields])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _beam(f: DeliveredField, source: MosaiqSource) -> Dataset:
    """One delivered field. What Mosaiq does not keep and the IOD requires (Type 1) is said as
    little as the IOD allows: the X and Y jaws every linac has (the MLC is not described), the
    radiation type the site declares when Mosaiq's column is empty, and the control points:
    the start of the delivery (nothing delivered yet) and, when Mosaiq has the meterset, its
    end. A NULL meterset leaves the delivered meterset out and the termination UNKNOWN."""
    sb = Dataset()
    sb.ReferencedBeamNumber = int(f.fld_id) if f.fld_id.isdigit() else ""
    sb.BeamName = f.field_name[:64]
    sb.BeamType = "STATIC"
    sb.RadiationType = RADIATION_TYPES.get(f.radiation_type.upper().replace(" ", ""),
                                           source.default_radiation_type)
    sb.NumberOfWedges = sb.NumberOfCompensators = sb.NumberOfBoli = sb.NumberOfBlocks = 0
    jaws = Sequence()
    for kind in ("X", "Y"):
        jaw = Dataset()
        jaw.RTBeamLimitingDeviceType = kind
        jaw.NumberOfLeafJawPairs = 1
        jaws.append(jaw)
    sb.BeamLimitingDeviceLeafPairsSequence = jaws
    sb.CurrentFractionNumber = f.fraction if f.fraction is not None else ""
    sb.TreatmentDeliveryType = "TREATMENT"
    sb.TreatmentTerminationStatus = "NORMAL" if f.meterset is not None else "UNKNOWN"
    sb.TreatmentVerificationStatus = ""
    if f.meterset is not None:
        sb.DeliveredPrimaryMeterset = _ds_decimal(f.meterset)
    points = Sequence()
    for index, meterset in enumerate([0.0] + ([f.meterset] if f.meterset is not None else [])):
        cp = Dataset()
        cp.ReferencedControlPointIndex = index
        cp.TreatmentControlPointDate = _date(f.tx_dttm)
        cp.TreatmentControlPointTime = _time(f.tx_dttm)
        cp.SpecifiedMeterset = ""
        cp.DeliveredMeterset = _ds_decimal(meterset)
        cp.DoseRateSet = ""
        cp.DoseRateDelivered = ""
        points.append(cp)
    sb.NumberOfControlPoints = len(points)
    sb.ControlPointDeliverySequence = points
    return sb


def stage(records: list[Dataset], folder: Path) -> list[InstanceRef]:
    """Write each record as ``folder/<SOPInstanceUID>.dcm`` (what the delivery stores from)."""
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for ds in records:
        partial = folder / f"{ds.SOPInstanceUID}.partial"
        ds.save_as(partial, enforce_file_format=True)
        partial.replace(folder / f"{ds.SOPInstanceUID}.dcm")
        refs.append(InstanceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.PatientID),
                                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                str(ds.TreatmentDate), str(ds.TreatmentTime)))
    return refs


def staging_dir(site: Site, alias: str) -> Path:
    return site.state_dir / "mosaiq-staging" / alias
