"""Find every record whatever the peer does: caps it does not announce, Cancel at any level,
a record series larger than the cap, answers without a UID, another patient's dose.

Each site is set up the way a user would: ``dicom_tools probe``'s advice (its settings lines)
written into the source's TOML, then the real flows against an in-process Q/R SCP that behaves
like the vendor, and an Orthanc backup. What is checked is what a user would check: every
record in the backup, the ledger verified, the run's state and what its summary says.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from demo.site import DemoSite
from demo.synthetic import to_bytes
from flows.incremental_backup import incremental_backup
from flows.nightly_backup import nightly_backup
from radonc_backup.config import load_site
from radonc_backup.probe import probe
from radonc_backup.record_finder import CapMemory, RecordFinder
from tests.conftest import three_numbers
from tests.qr_scp import StrictQRSCP, add_source
from tests.test_backup_flows import DAY, at, course, run, uids
from tests.test_rv_matrix import printed_settings

pytestmark = pytest.mark.usefixtures("prefect")

# peer behaviour -> StrictQRSCP options
PEERS = {
    "silent-cap-relational": {"cap": 3},
    "silent-cap-hierarchical": {"cap": 3, "hierarchical_only": True},
    "cancel-cap-relational": {"cap": 3, "cut_status": True},
    "cancel-cap-hierarchical": {"cap": 3, "cut_status": True, "hierarchical_only": True},
}


def clinic() -> tuple[list, list[Dataset]]:
    """Four patients on treatment, their studies on four dates, 10 records over the last four
    days: more than the cap in a day (4 today), in a study and in one record series (4)."""
    courses = [course(f"FE{n}", at(-n, 8 + n), delivered=n + 1) for n in range(4)]
    return courses, [r for c in courses for r in c.records]


def probed_settings(site: DemoSite, alias: str) -> dict[str, object]:
    """What ``dicom_tools probe`` prints to copy into the source's TOML, as values."""
    cfg = load_site("DEMO", site.config_path)
    source = cfg.sources[alias]
    return printed_settings(probe(cfg.client(source), source, DAY.date()).settings)


def site_as_probe_advises(make_site: Callable[..., DemoSite], server: StrictQRSCP,
                          advised: bool = True) -> tuple[DemoSite, dict[str, object]]:
    """Source "probed": the settings probe printed for the peer, probed as source "new"."""
    site = make_site(extra_backup_modalities={server.aet: (server.aet, "127.0.0.1", 1)})
    add_source(site, server, "new")
    settings = probed_settings(site, "new") if advised else {}
    add_source(site, server, "probed", **settings)
    return site, settings


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_a_capped_peer_set_up_as_probe_advises_loses_no_record(
        make_site: Callable[..., DemoSite], peer: str) -> None:
    """Caps of 3, silent or with Cancel, relational or hierarchical-only: probe names the cap
    (and the profile a hierarchical-only peer needs), and with its settings the first run
    backs up all 10 records, the nightly the 8 delivered the next day; nothing ends Completed
    with a record missing."""
    options = PEERS[peer]
    courses, records = clinic()
    server = StrictQRSCP("CAPPED_RV", records, {}, **options)
    with server:
        site, settings = site_as_probe_advises(make_site, server)
        server.destinations = {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}
        assert settings.get("max_find_results") == 3, settings
        if options.get("hierarchical_only"):
            assert settings.get("profile") == "aria", settings
        state = run(incremental_backup, site, at(0, 16), source="probed", backfill=False)
        assert state.is_completed(), state.message
        assert site.backup.sop_instance_uids() == uids(*records)
        later = [c.add_record(at(1, 7 + n, 10 * k)) for n, c in enumerate(courses)
                 for k in range(2)]
        for ds in later:
            to_bytes(ds)  # a file meta: the syntax its C-STORE sub-operation uses
        server.objects += later
        nightly = run(nightly_backup, site, at(2, 5), days=1, source="probed", backfill=False)
        assert nightly.is_completed(), nightly.message
    assert site.backup.sop_instance_uids() == uids(*records, *later)
    assert three_numbers(site, [*records, *later], DAY.date()) == (0, 0, 0)


def test_a_silent_cap_nobody_configured_is_found_from_the_answers(
        make_site: Callable[..., DemoSite]) -> None:
    """The hierarchical-only peer caps at 3 and says Success; the site says nothing of a cap
    (the profile only). Answers reaching the largest count the peer has returned are asked
    again in parts, which show more: the cap is found, remembered, every record backed up."""
    courses, records = clinic()
    server = StrictQRSCP("CAPPED_RV", records, {}, cap=3, hierarchical_only=True)
    with server:
        site = make_site(extra_backup_modalities={server.aet: (server.aet, "127.0.0.1", 1)})
        server.destinations = {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}
        add_source(site, server, "unset", profile="aria")
        state = run(incremental_backup, site, at(0, 16), source="unset", backfill=False)
    assert state.is_completed(), state.message
    assert site.backup.sop_instance_uids() == uids(*records)
    notes = " ".join(state.result()["peer_notes"])
    assert "cut a C-FIND answer at 3 matches without being asked to" in notes, notes
    cfg = load_site("DEMO", site.config_path)
    from radonc_backup.ledger import Ledger

    assert Ledger.for_state_dir(cfg.state_dir).peer_cap(cfg.sources["unset"].label) == 3


def test_a_series_with_more_records_than_the_cap_is_walked_by_date() -> None:
    """One record series of 12 records over 12 days, a peer capping every answer at 5: the
    series' answer is split by TreatmentDate until no part reaches the cap (the site is not
    stopped), and every record is found; the undated record in it is named as unproven when
    the cut answer did not show it."""
    from radonc_backup.dicom_net import DicomClient, Peer, Timeouts

    c = course("FE9", at(-11, 8), delivered=12)
    undated = c.add_record(at(0, 9))
    undated.TreatmentDate = ""
    server = StrictQRSCP("SERIES_RV", c.records, {}, cap=5, hierarchical_only=True)
    with server:
        client = DicomClient("DEMO", "RADONC_BACKUP", Peer(server.aet, "127.0.0.1", server.port),
                             Timeouts(5, 20, 10, 3))
        finder = RecordFinder(client, True, CapMemory(configured=5), DAY.date())
        found = finder.of_patients(["FE9"])
    assert {r.sop_instance_uid for r in found.refs} >= uids(*c.records[:-1])
    if str(undated.SOPInstanceUID) not in {r.sop_instance_uid for r in found.refs}:
        assert any("without a date" in u for u in found.unproven), found.unproven
    assert server.refused_finds == 0


def test_an_answer_without_a_sop_instance_uid_fails_the_run_naming_it(
        make_site: Callable[..., DemoSite]) -> None:
    """The peer answers one of three records with an empty SOP Instance UID: the two others are
    backed up, the run fails naming the patient and series, and the watermark stays, so the
    next run asks again."""
    c = course("FE5", at(-1, 8), delivered=2)
    blank = c.add_record(at(0, 9))
    server = StrictQRSCP("BLANK_RV", c.records, {}, blank_uids={str(blank.SOPInstanceUID)})
    with server:
        site = make_site(extra_backup_modalities={server.aet: (server.aet, "127.0.0.1", 1)})
        server.destinations = {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}
        add_source(site, server, "blank")
        state = run(incremental_backup, site, at(0, 16), source="blank", backfill=False)
    assert state.is_failed()
    assert "without a SOP Instance UID" in str(state.message)
    assert "patient FE5" in str(state.message) and str(blank.SeriesInstanceUID) in str(
        state.message)
    assert site.backup.sop_instance_uids() == uids(*c.records[:2])
    cfg = load_site("DEMO", site.config_path)
    from radonc_backup.ledger import Lane, Ledger

    assert Ledger.for_state_dir(cfg.state_dir).at(Lane("DEMO", "blank", "orthanc")) \
        .watermark() is None


def test_another_patients_dose_is_never_moved(make_site: Callable[..., DemoSite]) -> None:
    """A peer that ignores keys and returns no ReferencedRTPlanSequence: the plan walk of one
    patient moves that patient's dose, never the other patient's."""
    from flows.plan_context_backfill import plan_context_backfill

    mine, theirs = course("FE7", at(-1, 8), delivered=1), course("FE8", at(-1, 9), delivered=0)
    keys = {"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
            "SOPClassUID", "Modality", "TreatmentDate", "TreatmentTime",
            "NumberOfSeriesRelatedInstances"}
    server = StrictQRSCP("IGNORE_RV", [*mine.all(), *theirs.all()], {}, ignore_keys=True,
                         returns=keys)
    with server:
        site = make_site(extra_backup_modalities={server.aet: (server.aet, "127.0.0.1", 1)})
        server.destinations = {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}
        add_source(site, server, "ignoring")
        state = run(incremental_backup, site, at(0, 16), source="ignoring", backfill=False)
        assert state.is_completed(), state.message
        context = plan_context_backfill(site="DEMO", source="ignoring",
                                        config=str(site.config_path), return_state=True)
    held = site.backup.sop_instance_uids()
    assert str(mine.dose.SOPInstanceUID) in held, context.message
    assert not held & uids(*theirs.all()), "nothing of the other patient"


def test_uid_less_answers_are_named_not_dropped_by_the_finder() -> None:
    c = course("FE6", at(0, 8), delivered=1)
    blank = c.records[0]
    server = StrictQRSCP("BLANK_RV", c.records, {}, blank_uids={str(blank.SOPInstanceUID)})
    from radonc_backup.dicom_net import DicomClient, Peer, Timeouts
    from radonc_backup.windows import DayQuery

    with server:
        client = DicomClient("DEMO", "RADONC_BACKUP", Peer(server.aet, "127.0.0.1", server.port),
                             Timeouts(5, 20, 10, 3))
        found = RecordFinder(client, today=DAY.date()).in_windows([DayQuery(DAY.date())])
    assert not found.refs
    assert len(found.unusable) == 1 and "patient FE6" in found.unusable[0]


def test_fraction_continuity_names_what_the_backup_lacks() -> None:
    """The second proof, which does not ask by date: a plan's fractions 1 to the highest."""
    from radonc_backup.continuity import gap_warning, missing_fractions, spans

    assert missing_fractions([5, 7, 1, 2, 3, 4]) == [6]
    assert missing_fractions([3, 4]) == [1, 2], "fewer sessions than the highest fraction"
    assert missing_fractions([1, 2, 2, None, 3]) == [] and gap_warning([1, 2]) == ""
    assert spans([1, 2, 3, 6, 8, 9]) == "1-3, 6, 8-9"
    assert gap_warning([1, 2, 5]).startswith("fraction(s) 3-4 not in the backup")


@pytest.mark.parametrize("peer", ["orthanc", "hierarchical-only"])
def test_a_new_patients_undated_record_is_found_by_the_inventory_sweep(
        make_site: Callable[..., DemoSite], peer: str) -> None:
    """A new patient whose only record has an empty TreatmentDate matches no date query, and
    the per-patient pass asks only patients it knows: the incremental and the nightly end
    Completed without it (they say nothing false: they did not list it). The inventory sweep,
    which asks for every record without a date, fails naming it; with --repair it moves it
    and ends Completed, the record verified in the backup."""
    from flows.inventory_sweep import inventory_sweep

    known = course("FE30", at(-1, 8), delivered=2)
    new = course("FE31", at(0, 9), delivered=1)
    undated = new.records[0]
    undated.TreatmentDate = ""
    site = make_site(extra_backup_modalities={"INV_RV": ("INV_RV", "127.0.0.1", 1)})
    records = [*known.records, undated]
    if peer == "orthanc":
        site.rv.upload([to_bytes(ds) for ds in records])
        source, server = "aria", None
    else:
        server = StrictQRSCP("INV_RV", records, {site.backup.aet: (
            "127.0.0.1", site.backup.dicom_port)}, hierarchical_only=True)
        server.__enter__()
        add_source(site, server, "inv", profile="aria")
        source = "inv"
    try:
        state = run(incremental_backup, site, at(0, 16), source=source, backfill=False)
        assert state.is_completed(), state.message
        nightly = run(nightly_backup, site, at(1, 5), days=1, source=source, backfill=False)
        assert nightly.is_completed(), nightly.message
        if peer == "orthanc":  # the hierarchical walk keeps undated records of new studies
            assert str(undated.SOPInstanceUID) not in site.backup.sop_instance_uids()
        check = inventory_sweep(site="DEMO", source=source, config=str(site.config_path),
                                return_state=True)
        if str(undated.SOPInstanceUID) not in site.backup.sop_instance_uids():
            assert check.is_failed()
            assert "patient FE31" in str(check.message) and "--repair" in str(check.message)
        repaired = inventory_sweep(site="DEMO", source=source, config=str(site.config_path),
                                   repair=True, return_state=True)
        assert repaired.is_completed(), repaired.message
        again = inventory_sweep(site="DEMO", source=source, config=str(site.config_path),
                                return_state=True)
        assert again.is_completed() and "presence checked" in str(again.message)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    assert site.backup.sop_instance_uids() == uids(*records)
    assert three_numbers(site, records, DAY.date()) == (0, 0, 0)


def test_one_run_of_a_lane_at_a_time(make_site: Callable[..., DemoSite]) -> None:
    """A second run of the same lane (two shell runs a second apart, or a nightly meeting an
    incremental) waits for the first, then finds its work in the ledger and sends nothing
    twice; past lane_wait_minutes it stops with one line, having sent nothing."""
    import threading

    from radonc_backup.lane import lane_lock, open_lane

    c = course("FE40", at(-1, 8), delivered=2)
    site = make_site(settings={"lane_wait_minutes": 0})
    site.rv.upload([to_bytes(ds) for ds in c.records])
    with lane_lock(open_lane("DEMO", config=str(site.config_path)), 0):
        busy = run(incremental_backup, site, at(0, 16), backfill=False)
    assert busy.is_failed() and "another run of aria to orthanc is under way" in str(
        busy.message)
    assert site.backup.sop_instance_uids() == set(), "sent nothing"

    waiting = make_site(settings={"lane_wait_minutes": 1})
    waiting.rv.upload([to_bytes(ds) for ds in c.records])
    lane = open_lane("DEMO", config=str(waiting.config_path))
    held, release = threading.Event(), threading.Event()

    def first_run() -> None:
        with lane_lock(lane, 0):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=first_run)
    holder.start()
    held.wait(10)
    threading.Timer(2.0, release.set).start()
    state = run(incremental_backup, waiting, at(0, 16), backfill=False)
    holder.join()
    assert state.is_completed(), state.message
    assert waiting.backup.sop_instance_uids() == uids(*c.records)

    # A run of the lane on another machine: no flock here to see, the lane's Prefect slot is
    # taken. The run waits for it (lane_wait_minutes 0: a second), then stops sending nothing.
    from prefect.concurrency.sync import concurrency

    from tasks.limits import lane_limit_name

    elsewhere = make_site(settings={"lane_wait_minutes": 0})
    elsewhere.rv.upload([to_bytes(ds) for ds in c.records])
    other = open_lane("DEMO", config=str(elsewhere.config_path))
    first = run(incremental_backup, elsewhere, at(0, 15), backfill=False)  # makes the limit
    assert first.is_completed(), first.message
    with concurrency(lane_limit_name(other), occupy=1, strict=True):
        busy = run(incremental_backup, elsewhere, at(0, 16), backfill=False)
    assert busy.is_failed() and "under way on another machine" in str(busy.message), \
        busy.message


def test_a_fraction_gap_is_named_until_found_or_acknowledged(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """Fraction continuity in the runs, from the backup's own records. FE50's fraction 3 is
    not on the R&V at all (delivered, never recorded there); FE51's fraction 2 is there but
    undated, so no date query finds it. The incremental verifies what it found and ends
    ``Completed (fraction gaps)`` naming both; the sweep without --repair fails naming them;
    --repair moves FE51's record and still fails on FE50's gap; the report warns of it. Once
    an operator acknowledges FE50's fraction 3 (the command, kept in the ledger) the sweep,
    the nightly and the report are clean."""
    import subprocess
    import sys

    from flows.inventory_sweep import inventory_sweep
    from flows.treatment_report import treatment_report
    from tests.test_treatment_report import read_csv

    a, b = course("FE50", at(-3, 8), delivered=4), course("FE51", at(-3, 9), delivered=3)
    b.records[1].TreatmentDate = ""
    site = make_site()
    site.rv.upload([to_bytes(ds) for ds in [*a.records[:2], *a.records[3:], *b.records]])
    state = run(incremental_backup, site, at(0, 16), backfill=False)
    assert state.is_completed() and state.name == "Completed (fraction gaps)", state.message
    assert "patient FE50" in str(state.message) and "fraction(s) 3 not in" in str(state.message)
    assert "patient FE51" in str(state.message) and "fraction(s) 2 not in" in str(state.message)
    sweep = dict(site="DEMO", config=str(site.config_path), return_state=True)
    check = inventory_sweep(**sweep)
    assert check.is_failed() and "patient FE51" in str(check.message), check.message
    repaired = inventory_sweep(**sweep, repair=True)
    assert str(b.records[1].SOPInstanceUID) in site.backup.sop_instance_uids()
    assert repaired.is_failed() and "fraction continuity: 1 gap(s)" in str(repaired.message)
    assert "patient FE50" in str(repaired.message) and "FE51" not in str(repaired.message)

    report = dict(site="DEMO", config=str(site.config_path), end_date=DAY.date(),
                  out=str(tmp_path / "report.csv"))
    treatment_report(**report)
    rows = {r["PatientID"]: r for r in read_csv(tmp_path / "report.csv")}
    assert "fraction(s) 3 not in the backup" in rows["FE50"]["Warnings"]

    ack = subprocess.run(
        [sys.executable, "-m", "radonc_backup.dicom_tools", "acknowledge-fractions", "--site",
         "DEMO", "--config", str(site.config_path), "--patient", "FE50", "--plan",
         str(a.plan.SOPInstanceUID), "--fractions", "3", "--note", "given at the other site",
         "--by", "physicist"], capture_output=True, text=True, timeout=120)
    assert ack.returncode == 0, ack.stderr
    assert "1 fraction(s) newly acknowledged by physicist" in ack.stdout
    again = inventory_sweep(**sweep)
    assert again.is_completed() and "every fraction of their plans held" in str(again.message)
    nightly = run(nightly_backup, site, at(1, 5), days=1, backfill=False)
    assert nightly.name == "Completed", nightly.message
    treatment_report(**report)
    rows = {r["PatientID"]: r for r in read_csv(tmp_path / "report.csv")}
    assert "fraction(s)" not in rows["FE50"]["Warnings"], rows["FE50"]["Warnings"]
    assert site.backup.sop_instance_uids() == uids(*a.records[:2], *a.records[3:], *b.records)


def test_record_answers_shorter_than_a_listed_ct_need_no_check_and_unchecked_ones_are_unproven(
        make_site: Callable[..., DemoSite], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record series as long as the longest answer the hierarchical-only peer gave (two
    records each): each answer might be a silent cap and is checked in parts. The backfill's
    listing of a planning CT (6 instances) shows the peer answers longer at IMAGE level; the
    ledger keeps it, and the next run walks each series with one query, no check. A run whose
    budget of checks is spent ends `Completed (unproven)`, naming what it left unchecked."""
    from demo.synthetic import Patient, make_course
    from radonc_backup.ledger import Ledger

    courses = [make_course(Patient(f"UN{n}", f"Test^UN{n}"), at(-2, 8 + n), delivered=2,
                           slices=6) for n in range(3)]
    server = StrictQRSCP("UNIFORM_RV", [o for c in courses for o in c.all()], {},
                         hierarchical_only=True)
    with server:
        site = make_site(extra_backup_modalities={server.aet: (server.aet, "127.0.0.1", 1)})
        server.destinations = {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}
        add_source(site, server, "uniform", profile="aria")
        label = load_site("DEMO", site.config_path).sources["uniform"].label
        ledger = Ledger.for_state_dir(load_site("DEMO", site.config_path).state_dir)

        with monkeypatch.context() as budget:
            budget.setattr(RecordFinder, "CHECKS", 1)
            starved = run(incremental_backup, site, at(0, 7), source="uniform", backfill=False)
        assert starved.name == "Completed (unproven)", (starved.name, starved.message)
        assert any("not checked" in u for u in starved.result()["unproven"]), starved.result()
        assert site.backup.sop_instance_uids() >= uids(*[r for c in courses for r in c.records])

        first = run(incremental_backup, site, at(0, 8), source="uniform")
        assert first.name == "Completed", (first.name, first.message)
        assert ledger.largest_answers(label).get("IMAGE") == 6  # the CT's listing, kept

        server.finds.clear()
        second = run(incremental_backup, site, at(0, 9), source="uniform", backfill=False)
    assert second.name == "Completed", (second.name, second.message)
    assert second.result()["unproven"] == []
    # One SERIES and one IMAGE query a study, no part asked again.
    assert server.finds.count("SERIES") == 3 and server.finds.count("IMAGE") == 3, server.finds
    assert site.backup.sop_instance_uids() >= uids(*[o for c in courses for o in c.all()])


def test_a_studys_record_series_as_many_as_the_largest_answer_are_checked_not_trusted() -> None:
    """No key splits a SERIES query. A study's record series (two or more) as many as the
    largest SERIES answer the peer gave: asked once more for its series of every modality. More
    series there (the CT, plan, structure set, dose) prove the answer whole; a study of record
    series only, cut by a silent cap nobody configured, is named unproven, never whole."""
    from demo.synthetic import make_treatment_record
    from radonc_backup.dicom_net import DicomClient, Peer, Timeouts

    whole = course("SF1", at(-1, 8))  # two record series beside its CT, plan, ...
    mine = [make_treatment_record(whole.study, whole.plan, n, at(-3 + n, 8),
                                  series_uid=f"{whole.study.uid}.{n}") for n in (1, 2)]
    cut = course("SF2", at(-1, 9))
    many = [make_treatment_record(cut.study, cut.plan, n, at(-5 + n, 9),
                                  series_uid=f"{cut.study.uid}.{n}") for n in range(1, 5)]
    for objects, cap, patient, expect_unproven in (
            ([*whole.context(), *mine], 0, "SF1", False), (many, 3, "SF2", True)):
        server = StrictQRSCP("SERIES_RV", objects, {}, cap=cap, hierarchical_only=True)
        with server:
            client = DicomClient("DEMO", "RADONC_BACKUP",
                                 Peer(server.aet, "127.0.0.1", server.port), Timeouts(5, 20, 10, 3))
            memory = CapMemory()
            found = RecordFinder(client, True, memory, DAY.date()).of_patients([patient])
        assert bool(found.unproven) is expect_unproven, found.unproven
        if expect_unproven:
            assert "the study holds no more series of any kind" in found.unproven[0]
        else:
            assert memory.largest["SERIES"] >= 4  # CT, structure set, plan, dose, records
            assert {r.sop_instance_uid for r in found.refs} == uids(*mine)
