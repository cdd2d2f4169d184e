"""Treatment report from the backup alone: a hand-built clinic with the truth written out."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from demo.site import DemoSite
from demo.synthetic import Patient, Study, make_image_series, make_rtplan, make_rtstruct, \
    make_treatment_record, to_bytes
from flows.treatment_report import treatment_report
from radonc_backup.collation import sort_key
from radonc_backup.report_facts import readable_name
from radonc_backup.treatment_report import COLUMNS

pytestmark = pytest.mark.usefixtures("prefect")

START, END = date(2026, 11, 14), date(2026, 11, 20)


class Clinic:
    def __init__(self) -> None:
        self.objects: list[Dataset] = []
        self.plans: dict[str, Dataset] = {}

    def plan(self, pid: str, name: str, key: str, label: str, fractions: int,
             machine: str = "TrueBeam1", study_date: str = "20261101") -> tuple[Study, Dataset]:
        study = Study(Patient(pid, name, "19600101", "F"), study_date=study_date)
        ct = make_image_series(study, "ct", slices=1)
        struct = make_rtstruct(study, ct, key=f"ss-{key}")
        plan = make_rtplan(study, struct, ct.frame_of_reference_uid, key=key, label=label,
                           fractions=fractions, machine=machine)
        self.plans[f"{pid}/{key}"] = plan
        return study, plan

    def deliver(self, study: Study, plan: Dataset, first: int, last: int, start: datetime,
                **kw: object) -> list[Dataset]:
        records = [make_treatment_record(study, plan, n, start + timedelta(days=n - first),
                                         **kw)  # type: ignore[arg-type]
                   for n in range(first, last + 1)]
        self.objects += records
        return records


def build_clinic() -> tuple[Clinic, dict[tuple[str, str], dict[str, object]]]:
    c = Clinic()
    at8 = lambda d: datetime(2026, 11, d, 8, 0)  # noqa: E731
    truth: dict[tuple[str, str], dict[str, object]] = {}

    s, p = c.plan("R001", "Doe^Jane", "p", "PROSTATE", 28)
    c.deliver(s, p, 1, 10, at8(11))  # days 11..20: mid-course
    truth[("R001", "PROSTATE")] = dict(CurrentFraction=10, FractionsPlanned=28,
                                       FractionsRemaining=18, SessionsInWindow=7,
                                       Status="on treatment", PatientName="Doe, Jane",
                                       FirstTreatment="2026-11-11 08:00")  # the course's
    s, p = c.plan("R002", "Smith^John", "p", "LUNG", 25)
    c.deliver(s, p, 21, 25, at8(14))  # last fraction on the 18th: stays in the report
    truth[("R002", "LUNG")] = dict(CurrentFraction=25, FractionsRemaining=0, SessionsInWindow=5,
                                   Status="completed in window", LastTreatment="2026-11-18 08:00")
    s, p = c.plan("R003", "Old^Finished", "p", "BRAIN", 5)
    c.deliver(s, p, 1, 5, at8(6))  # finished on the 10th: not in the report
    s, p = c.plan("R004", "New^Start", "p", "BREAST", 15)
    c.deliver(s, p, 1, 2, at8(19))
    truth[("R004", "BREAST")] = dict(CurrentFraction=2, SessionsInWindow=2,
                                     FirstTreatment="2026-11-19 08:00")
    s, a = c.plan("R005", "Müller^Jürgen", "a", "HN", 30)
    _, b = c.plan("R005", "Müller^Jürgen", "b", "HN_R1", 30)
    c.deliver(s, a, 1, 5, at8(10))  # revised after the 14th
    c.deliver(s, b, 6, 9, at8(15))
    truth[("R005", "HN")] = dict(CurrentFraction=5, SessionsInWindow=1,
                                 PatientName="Müller, Jürgen")
    truth[("R005", "HN_R1")] = dict(CurrentFraction=9, SessionsInWindow=4, FractionsRemaining=21)
    s, x = c.plan("R006", "García^Lucía^María", "x", "SPINE", 10)
    _, y = c.plan("R006", "García^Lucía^María", "y", "RIB_SBRT", 5, machine="TrueBeam2")
    c.deliver(s, x, 1, 3, datetime(2026, 11, 16, 9))
    c.deliver(s, y, 1, 2, datetime(2026, 11, 17, 14))
    truth[("R006", "SPINE")] = dict(CurrentFraction=3, PatientName="García, Lucía María")
    truth[("R006", "RIB_SBRT")] = dict(CurrentFraction=2, Machine="TrueBeam2")
    s, p = c.plan("R007", "Split^Beams", "p", "PELVIS", 20)
    c.deliver(s, p, 3, 3, datetime(2026, 11, 18, 10), beam_fractions=[3, 3, 4])
    truth[("R007", "PELVIS")] = dict(CurrentFraction=4)
    # Mid-course in a study that began 50 days before the window: an 8-week course is ordinary.
    s, p = c.plan("R008", "Long^Course", "p", "PROSTATE_78GY", 39, study_date="20260925")
    c.deliver(s, p, 30, 35, at8(15))
    truth[("R008", "PROSTATE_78GY")] = dict(CurrentFraction=35, FractionsRemaining=4,
                                            SessionsInWindow=6, Status="on treatment")
    # The last session was interrupted by the machine: the row says so.
    s, p = c.plan("R009", "Cut^Short", "p", "BLADDER", 20)
    c.deliver(s, p, 1, 3, at8(16))
    c.deliver(s, p, 4, 4, at8(19), termination="MACHINE")
    planned_mu = sum(float(b.BeamMeterset) for b in p.FractionGroupSequence[0]
                     .ReferencedBeamSequence)
    last_mu = planned_mu - round(float(p.FractionGroupSequence[0].ReferencedBeamSequence[-1]
                                       .BeamMeterset) / 2, 2)
    truth[("R009", "BLADDER")] = dict(CurrentFraction=4, LastTermination="MACHINE",
                                      LastMeterset=round(last_mu, 3),
                                      Warnings="last session not completed normally (MACHINE)")
    truth[("R001", "PROSTATE")].update(LastTermination="NORMAL", LastMeterset=round(planned_mu, 3))
    return c, truth


def run(site: DemoSite, tmp_path: Path, **params: object) -> dict[str, object]:
    state = treatment_report(site="DEMO", config=str(site.config_path), return_state=True,
                             out=str(tmp_path / "report.csv"), **params)
    assert state.is_completed(), state.message
    return state.result()


def read_csv(path: Path) -> list[dict[str, str]]:
    assert path.read_bytes().startswith(b"\xef\xbb\xbf"), "a BOM, for Excel"
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def test_report_from_the_backup_alone_matches_the_truth(make_site: Callable[..., DemoSite],
                                                        tmp_path: Path) -> None:
    site = make_site()
    clinic, truth = build_clinic()
    missing_plan = clinic.plans["R004/p"]
    site.backup.upload([to_bytes(ds) for ds in [*clinic.objects, *clinic.plans.values()]
                        if ds is not missing_plan])
    site.rv.kill()  # the R&V is down: the report needs only the backup

    result = run(site, tmp_path, treatment_start_date=START, end_date=END)
    rows = read_csv(tmp_path / "report.csv")
    by_key = {(r["PatientID"], r["RTPlanLabel"] or "?"): r for r in rows}
    assert result["rows"] == len(rows) == len(truth)
    assert ("R003", "BRAIN") not in by_key
    for (pid, label), expected in truth.items():
        row = by_key[(pid, label if pid != "R004" else "?")]
        for column, value in expected.items():
            assert row[column] == str(value), (pid, label, column)
    assert by_key[("R004", "?")]["Warnings"] == "plan not in the backup"
    assert by_key[("R004", "?")]["FractionsPlanned"] == "15"  # from the record itself
    names = [r["PatientName"] for r in rows]
    assert names == sorted(names, key=sort_key("en_US"))  # the site's locale (the default)
    assert list(rows[0]) == COLUMNS
    assert COLUMNS[:12] == ["PatientID", "PatientName", "RTPlanLabel", "Machine",
                            "CurrentFraction", "FractionsPlanned", "FractionsRemaining",
                            "LastTreatment", "LastMeterset", "LastTermination", "Status",
                            "Warnings"] and COLUMNS[-1] == "PlanUID"
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Müller, Jürgen" in page and "Cut, Short" in page and 'class="attention"' in page
    assert str(clinic.plans["R001/p"].SOPInstanceUID) in page, "every column is printed"
    assert rows[0]["BirthDate"] == "1960-01-01"
    assert {r["Physician"] for r in rows} == {"Curie, Marie"}
    assert result["records_listed"] == len(clinic.objects)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:  # this run's: the newest of the key
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["treatment-report-demo"])), sort=ArtifactSort.CREATED_DESC)
    assert tables and tables[0].type == "table"
    shown = json.loads(str(tables[0].data))
    assert {r["PatientName"] for r in shown} == {r["PatientName"] for r in rows}
    assert "Müller, Jürgen" in {r["PatientName"] for r in shown}


def test_rerun_fetches_only_new_records_and_empty_window_has_headers(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    clinic, _ = build_clinic()
    site.backup.upload([to_bytes(ds) for ds in [*clinic.objects, *clinic.plans.values()]])
    first = run(site, tmp_path, treatment_start_date=START, end_date=END)
    assert first["records_fetched"] == len(clinic.objects)

    study, plan = clinic.plan("R001", "Doe^Jane", "p", "PROSTATE", 28)
    extra = [make_treatment_record(study, plan, 11, datetime(2026, 11, 20, 17)),
             make_treatment_record(study, plan, 12, datetime(2026, 11, 20, 18))]
    site.backup.upload([to_bytes(ds) for ds in extra])
    second = run(site, tmp_path, treatment_start_date=START, end_date=END)
    assert second["records_fetched"] == 2 and second["rows"] == first["rows"]
    jane = [r for r in read_csv(tmp_path / "report.csv") if r["PatientID"] == "R001"][0]
    assert jane["CurrentFraction"] == "12" and jane["SessionsInWindow"] == "9"

    default = run(site, tmp_path, end_date=END)  # the default window: 7 calendar days
    assert (default["start"], default["end"]) == (str(START), str(END)) == ("2026-11-14",
                                                                            "2026-11-20")
    assert default["rows"] == second["rows"]

    empty = run(site, tmp_path, treatment_start_date=date(2020, 1, 1),
                end_date=date(2020, 1, 7), study_start_date=date(2019, 1, 1))
    assert empty["rows"] == 0 and "No RT Records" in str(empty["message"])
    lines = (tmp_path / "report.csv").read_text(encoding="utf-8-sig").splitlines()
    assert lines == [",".join(COLUMNS)]


def test_reruns_read_the_change_log_and_list_in_full_after_a_deletion_or_a_new_database(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """A rerun reads only the backup's change log since the last run, yet misses no arrival;
    a deletion (which Orthanc's log does not show) and a rebuilt database each make it list in
    full, so a record gone from the backup leaves the report."""
    site = make_site()
    clinic, _ = build_clinic()
    site.backup.upload([to_bytes(ds) for ds in [*clinic.objects, *clinic.plans.values()]])
    first = run(site, tmp_path, treatment_start_date=START, end_date=END)
    assert first["listing"] == "listed in full (first run of this cache)"

    study, plan = clinic.plan("R001", "Doe^Jane", "p", "PROSTATE", 28)
    late = make_treatment_record(study, plan, 11, datetime(2026, 11, 20, 17))
    image = make_image_series(study, "late-ct", slices=3)  # arrivals that are not records
    site.backup.upload([to_bytes(ds) for ds in [late, *image.instances]])
    second = run(site, tmp_path, treatment_start_date=START, end_date=END)
    assert second["listing"] == "4 arrival(s) read from the change log"
    assert second["records_fetched"] == 1
    assert second["records_listed"] == first["records_listed"] + 1  # type: ignore[operator]
    jane = [r for r in read_csv(tmp_path / "report.csv") if r["PatientID"] == "R001"][0]
    assert jane["CurrentFraction"] == "11"

    with site.backup.rest() as client:
        rid = client.post("/tools/lookup", content=str(late.SOPInstanceUID)).json()[0]["ID"]
        client.delete(f"/instances/{rid}").raise_for_status()
    third = run(site, tmp_path, treatment_start_date=START, end_date=END)
    assert third["listing"] == ("listed in full (1 instance(s) deleted from the backup since "
                                "the last run)")
    assert third["records_listed"] == first["records_listed"]
    jane = [r for r in read_csv(tmp_path / "report.csv") if r["PatientID"] == "R001"][0]
    assert jane["CurrentFraction"] == "10"

    site.backup.stop()  # the backup rebuilt from scratch: another change log, same records
    shutil.rmtree(site.backup.workdir / "storage")
    site.backup.start()
    site.backup.upload([to_bytes(ds) for ds in [*clinic.objects, *clinic.plans.values()]])
    fourth = run(site, tmp_path, treatment_start_date=START, end_date=END)
    assert fourth["listing"] == ("listed in full (the backup's change log is not the one the "
                                 "cache last read)")
    assert fourth["records_listed"] == first["records_listed"]
    assert fourth["rows"] == first["rows"]


def test_record_with_missing_fields_gives_a_row_with_warnings(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    site = make_site()
    clinic = Clinic()
    study, plan = clinic.plan("R010", "Gap^Fields", "p", "ABDOMEN", 10)
    record = make_treatment_record(study, plan, 4, datetime(2026, 11, 18, 9))
    del record.TreatmentMachineSequence
    for beam in record.TreatmentSessionBeamSequence:
        del beam.CurrentFractionNumber
    site.backup.upload([to_bytes(record), to_bytes(plan)])
    run(site, tmp_path, treatment_start_date=START, end_date=END)
    (row,) = read_csv(tmp_path / "report.csv")
    assert row["Machine"] == "" and row["CurrentFraction"] == ""
    assert "no treatment machine" in row["Warnings"]
    assert "no CurrentFractionNumber" in row["Warnings"]
    assert row["Status"] == "on treatment"


def test_readable_names() -> None:
    assert readable_name("Müller^Jürgen") == "Müller, Jürgen"
    assert readable_name("García^Lucía^María^Dr.") == "García, Lucía María"
    assert readable_name("Cher") == "Cher"
    assert readable_name("Doe^John=ドウ^ジョン") == "Doe, John"


def test_record_with_an_invalid_value_still_counts_with_a_warning(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """A beam whose fraction number is not a number (IS 'X8765'): the record's other beams and
    sessions still count, the row says what was wrong, and the report does not crash."""
    site = make_site()
    clinic = Clinic()
    study, plan = clinic.plan("R011", "Bad^Value", "p", "LIVER", 10)
    good = make_treatment_record(study, plan, 3, datetime(2026, 11, 17, 9))
    bad = make_treatment_record(study, plan, 4, datetime(2026, 11, 18, 9),
                                beam_fractions=[98765, 4, 4])
    broken = to_bytes(bad)
    assert broken.count(b"98765 ") == 1
    site.backup.upload([to_bytes(good), broken.replace(b"98765 ", b"X8765 "), to_bytes(plan)])
    result = run(site, tmp_path, treatment_start_date=START, end_date=END)
    assert result["records_fetched"] == 2 and result["unreadable"] == {}
    (row,) = read_csv(tmp_path / "report.csv")
    assert row["CurrentFraction"] == "4" and row["SessionsInWindow"] == "2"
    assert "invalid CurrentFractionNumber 'X8765'" in row["Warnings"]


def test_a_record_the_backup_cannot_serve_gets_its_own_row_and_fails_the_run(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """A stored file gone bad: the patient's fraction count could be short, so the report says
    so on a row of its own (from Orthanc's index) and the run ends Failed, CSV written."""
    site = make_site()
    clinic = Clinic()
    study, plan = clinic.plan("R012", "Fine^Record", "p", "PROSTATE", 20)
    good = make_treatment_record(study, plan, 5, datetime(2026, 11, 18, 9))
    study2, plan2 = clinic.plan("R013", "Bad^Storage", "p", "LUNG", 20)
    bad = make_treatment_record(study2, plan2, 6, datetime(2026, 11, 18, 10))
    site.backup.upload([to_bytes(good), to_bytes(bad), to_bytes(plan), to_bytes(plan2)])
    with site.backup.rest() as client:
        (rid,) = client.post("/tools/find", json={"Level": "Instance", "Query": {
            "SOPInstanceUID": str(bad.SOPInstanceUID)}}).json()
        uuid = client.get(f"/instances/{rid}/attachments/dicom/info").json()["Uuid"]
    site.backup.stop()  # and restart: Orthanc keeps recent files in a memory cache
    stored = site.backup.workdir / "storage" / uuid[:2] / uuid[2:4] / uuid
    stored.write_bytes(b"not a DICOM file any more")
    site.backup.start()

    state = treatment_report(site="DEMO", config=str(site.config_path), return_state=True,
                             out=str(tmp_path / "report.csv"), treatment_start_date=START,
                             end_date=END)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert str(bad.SOPInstanceUID) in message and "R013" in message
    assert "Bad" not in message, "no patient names in the run's error"
    rows = {r["PatientID"]: r for r in read_csv(tmp_path / "report.csv")}
    assert rows["R012"]["CurrentFraction"] == "5" and rows["R012"]["Status"] == "on treatment"
    assert rows["R013"]["Status"] == "record unreadable"
    assert rows["R013"]["PatientName"] == "Bad, Storage" and rows["R013"]["CurrentFraction"] == ""
    assert str(bad.SOPInstanceUID) in rows["R013"]["Warnings"]


def test_a_long_report_shows_progress_and_links_its_copies_on_the_share(
        make_site: Callable[..., DemoSite], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past RECORDS_FROM records (300) a report shows a progress artifact; lowered here to the
    clinic's 40-odd records so the test stays small. With a share, the CSV and the print view
    are copied there and the summary links them by the address people open."""
    import flows.treatment_report as report_flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, \
        ArtifactFilterType

    monkeypatch.setattr(report_flow, "RECORDS_FROM", 1)
    share = tmp_path / "share"
    site = make_site(settings={"report_share": str(share),
                               "report_share_url": "file://fileserver/radonc reports"})
    clinic, _ = build_clinic()
    site.backup.upload([to_bytes(ds) for ds in [*clinic.objects, *clinic.plans.values()]])
    state = treatment_report(site="DEMO", config=str(site.config_path), return_state=True,
                             out=str(tmp_path / "report.csv"), treatment_start_date=START,
                             end_date=END)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        [progress] = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
        summary = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["markdown"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert float(progress.data) == 100.0  # type: ignore[arg-type]
    assert f"{len(clinic.objects)} of {len(clinic.objects)}" in str(progress.description)
    assert (share / "report.csv").read_bytes() == (tmp_path / "report.csv").read_bytes()
    assert (share / "report.html").exists()
    text = "".join(str(a.data) for a in summary)
    assert "[report.csv](file://fileserver/radonc reports/report.csv)" in text
    assert "[report.html](file://fileserver/radonc reports/report.html)" in text


def test_a_fraction_missing_from_the_backup_is_named_in_the_warnings(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """Fraction continuity, the second proof: fractions 1-3 and 5 in the backup, 4 missing
    (a record no date query found); the course's row names fraction 4 in its Warnings."""
    site = make_site()
    clinic = Clinic()
    study, plan = clinic.plan("R011", "Gap^Fraction", "p", "PELVIS", 25)
    held = [r for r in clinic.deliver(study, plan, 1, 5, datetime(2026, 11, 14, 9))
            if "4" not in {str(b.CurrentFractionNumber) for b in r.TreatmentSessionBeamSequence}]
    site.backup.upload([to_bytes(ds) for ds in [*held, plan]])
    run(site, tmp_path, treatment_start_date=START, end_date=END)
    (row,) = read_csv(tmp_path / "report.csv")
    assert row["CurrentFraction"] == "5"
    assert "fraction(s) 4 not in the backup" in row["Warnings"]


def test_rows_are_in_the_order_of_the_sites_locale_with_numbers_in_natural_order() -> None:
    """Code-point order put Å and Ł after Z and "Bob15" before "Bob7". In en_US Å sorts with A
    and Ł with L; in sv_SE Å comes after Z, as a Swedish reader looks for it; the locale is
    the site's ``report_locale``, and one ICU does not know is refused by the config."""
    import pytest
    from pydantic import ValidationError

    from radonc_backup.config import Settings
    from radonc_backup.report_facts import RecordFacts
    from radonc_backup.treatment_report import build_report, facts_frame

    names = ["Zeller, Ann", "Åberg, Li", "Łukasiewicz, Jan", "Bob15, X", "Bob7, X", "Þórsson, Ari",
             "李, 明", "adams, Amy"]
    facts = [RecordFacts(f"1.2.{n}", f"P{n}", name, "", "", "", f"1.3.{n}", "LA1",
                         "2026-11-20T08:00:00", 1, 5, course=f"1.3.{n}")
             for n, name in enumerate(names)]
    day = date(2026, 11, 20)

    def order(locale: str) -> list[str]:
        return list(build_report(facts_frame(facts), {}, day, day, locale=locale).PatientName)

    assert order("en_US") == ["Åberg, Li", "adams, Amy", "Bob7, X", "Bob15, X",
                              "Łukasiewicz, Jan", "Zeller, Ann", "Þórsson, Ari", "李, 明"]
    assert order("sv_SE").index("Åberg, Li") > order("sv_SE").index("Zeller, Ann")
    assert Settings(report_locale="pl_PL").report_locale == "pl_PL"
    with pytest.raises(ValidationError, match="report_locale 'xx_QQ'"):
        Settings(report_locale="xx_QQ")


def test_a_record_dated_in_the_future_is_named_on_its_row() -> None:
    """A recording system's clock a day ahead: fraction 6 dated tomorrow is not counted up to
    today, and the row says so instead of quietly showing fraction 5."""
    from radonc_backup.report_facts import RecordFacts
    from radonc_backup.treatment_report import build_report, facts_frame

    facts = [RecordFacts(f"1.2.{n}", "FUT1", "Ahead, Al", "", "", "", "1.3.1", "LA1",
                         f"2026-11-{15 + n}T08:00:00", n, 25, course="1.3.1") for n in range(1, 7)]
    today = date(2026, 11, 20)
    row = build_report(facts_frame(facts), {}, today, today, today=today).iloc[0]
    assert row.CurrentFraction == 5
    assert "record(s) dated in the future, not counted: fraction 6 on 2026-11-21" in row.Warnings
