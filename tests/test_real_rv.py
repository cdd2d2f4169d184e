"""R&V servers that are not Orthanc (issue "Real R&V servers"): the backup flows against
in-process Q/R SCPs shaped like vendors' conformance statements, with a real backup Orthanc."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest

from demo.site import DemoSite
from demo.synthetic import to_bytes
from flows.incremental_backup import incremental_backup
from flows.nightly_backup import nightly_backup
from radonc_backup.ledger import Lane
from tests.conftest import missed
from tests.qr_scp import StrictQRSCP, add_source
from tests.test_backup_flows import at, course, ledger, run, uids

pytestmark = pytest.mark.usefixtures("prefect")

STRICT = Lane("DEMO", "strict", "orthanc")
NY = ZoneInfo("America/New_York")


def strict_site(make_site: Callable[..., DemoSite], everything: bool = False,
                settings: dict[str, object] | None = None,
                **scp: object) -> tuple[DemoSite, StrictQRSCP, list]:
    """A backup Orthanc and a strict SCP as source "strict" holding three courses' records
    (two each, yesterday and today; ``everything``: also their CT, plan, structure set, dose
    and a record of 70 days ago, before a new ledger's catch-up of 62 days)."""
    site = make_site(extra_backup_modalities={"STRICT_RV": ("STRICT_RV", "127.0.0.1", 1)})
    courses = [course(f"RV1{n}", at(-1, 8 + n), delivered=2) for n in range(3)]
    records = [r for c in courses for r in c.records]
    held = list(records)
    if everything:
        held += [ds for c in courses for ds in c.context()]
        held.append(courses[0].add_record(at(-70, 8)))
    server = StrictQRSCP("STRICT_RV", held,
                         {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}, **scp)
    add_source(site, server, **(settings or {}))
    return site, server, records


def latest_artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC)
    assert found, key
    return str(found[0].data)


def test_a_peer_taking_one_uid_per_move_gets_one_and_a_refused_record_fails_alone(
        make_site: Callable[..., DemoSite]) -> None:
    """A peer that refuses UID lists (0xA900) and one object (0xC000): the lists are asked again
    one UID at a time, the refused record fails with its own error, every other is verified,
    and the run says which setting fits the peer."""
    site, server, records = strict_site(make_site, single_uid=True)
    refused = records[3]
    server.refuse = {str(refused.SOPInstanceUID)}
    with server:
        state = run(incremental_backup, site, at(0, 16), source="strict", backfill=False)
        assert state.is_failed()
        message = str(state.message)
        assert str(refused.SOPInstanceUID) in message and "0xC000" in message, message
        rows = {r.ref.sop_instance_uid: r for r in ledger(site).at(STRICT).rows()}
        assert {u for u, r in rows.items() if r.state == "verified"} == \
            uids(*records) - {str(refused.SOPInstanceUID)}
        assert rows[str(refused.SOPInstanceUID)].state == "failed"
        assert "0xC000" in str(rows[str(refused.SOPInstanceUID)].last_error)
        assert "0xA900" not in str(rows[str(refused.SOPInstanceUID)].last_error)
        assert site.backup.sop_instance_uids() == uids(*records) - {str(refused.SOPInstanceUID)}
        assert any(len(m) > 1 for m in server.moves), "a UID list was tried first"
        summary = latest_artifact("incremental-backup-demo-strict")
        assert 'refused 3 C-MOVE(s) listing several UIDs' in summary
        assert 'set retrieve = "one_uid" for this source' in summary

        server.refuse = set()
        cfg = Path(site.config_path)
        cfg.write_text(cfg.read_text().replace('port = ' + str(server.port) + '\n',
                                               f'port = {server.port}\nretrieve = "one_uid"\n'))
        server.moves.clear()
        again = run(incremental_backup, site, at(0, 16, 10), source="strict", backfill=False)
        assert again.is_completed(), again.message
        assert again.result()["peer_notes"] == []
        assert server.moves == [[str(refused.SOPInstanceUID)]], "one UID, no list tried"
    assert missed(site, uids(*records)) == (0, 0)
    assert site.backup.sop_instance_uids() == uids(*records)


def test_retrieve_modes_name_what_to_send() -> None:
    from radonc_backup.instance import InstanceRef
    from radonc_backup.transfer import move_identifiers

    batch = [InstanceRef("1.1", "", "P", "9.1", "8.1"), InstanceRef("1.2", "", "P", "9.1", "8.1"),
             InstanceRef("1.3", "", "P", "9.1", "8.2")]
    lists = move_identifiers(batch)
    assert [i["SOPInstanceUID"].value for i in lists] == [["1.1", "1.2"], "1.3"]
    singles = move_identifiers(batch, retrieve="one_uid")
    assert [(i.QueryRetrieveLevel, i.SeriesInstanceUID, i.SOPInstanceUID) for i in singles] == [
        ("IMAGE", "8.1", "1.1"), ("IMAGE", "8.1", "1.2"), ("IMAGE", "8.2", "1.3")]
    series = move_identifiers(batch, retrieve="series")
    assert [(i.QueryRetrieveLevel, i.SeriesInstanceUID, "SOPInstanceUID" in i) for i in series] \
        == [("SERIES", "8.1", False), ("SERIES", "8.2", False)]


def test_a_peer_that_ignores_keys_gets_only_what_was_asked_for_moved(
        make_site: Callable[..., DemoSite]) -> None:
    """A peer that answers every C-FIND with everything it holds (CT, plans, doses, records of
    other days): the run moves the window's RT Records and nothing else, and says which keys
    the peer ignored."""
    site, server, records = strict_site(make_site, everything=True, ignore_keys=True)
    with server:
        state = run(incremental_backup, site, at(0, 16), source="strict", backfill=False)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["found"] == len(records) == 6, summary
    assert site.backup.sop_instance_uids() == uids(*records), "nothing else moved"
    notes = " ".join(summary["peer_notes"])
    assert "ignored SOPClassUID/Modality" in notes and "ignored TreatmentDate" in notes
    assert missed(site, uids(*records)) == (0, 0)


def test_a_peer_that_does_not_say_what_its_matches_are_moves_nothing_blind(
        make_site: Callable[..., DemoSite]) -> None:
    """A peer that ignores keys and returns only UIDs (no SOPClassUID, Modality or
    TreatmentDate, even asked by UID): nothing is moved, and the run fails in one line."""
    site, server, _ = strict_site(make_site, everything=True, ignore_keys=True,
                                  returns={"PatientID", "StudyInstanceUID",
                                           "SeriesInstanceUID", "SOPInstanceUID"})
    with server:
        state = run(incremental_backup, site, at(0, 16), source="strict", backfill=False)
    assert state.is_failed()
    message = str(state.message)
    assert "STRICT_RV" in message and "does not say what its matches are" in message, message
    assert "nothing is moved blind" in message
    assert site.backup.sop_instance_uids() == set()
    assert ledger(site).at(STRICT).rows() == []


def test_a_c_get_source_relays_compressed_objects_in_their_own_syntax(
        make_site: Callable[..., DemoSite]) -> None:
    """C-GET offers each class in every transfer syntax in a context of its own, and the relay
    stores each object in the syntax it came in: JPEG-LS, RLE and JPEG 2000 images arrive with
    the same transfer syntax and pixel data (one context listing every syntax made the peer
    pick one, and a J2K object was refused before it was sent)."""
    from demo.synthetic import Patient
    from flows.plan_context_backfill import plan_context_backfill
    from tests.test_plan_context import TODAY, assert_arrived_intact, compressed_plan

    site = make_site()
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text() + f'\n[DEMO.sources.mim]\ntype = "mim"\naet = "{site.rv.aet}"\n'
                                     f'ip = "127.0.0.1"\nport = {site.rv.dicom_port}\n')
    images = compressed_plan(site, Patient("RV300", "Compressed^ByGet"))

    first = incremental_backup(site="DEMO", source="mim", config=str(cfg), backfill=False,
                               now=TODAY.replace(tzinfo=NY), return_state=True)
    assert first.is_completed(), first.message
    state = plan_context_backfill(site="DEMO", source="mim", config=str(cfg), return_state=True)
    assert state.is_completed(), state.message
    assert_arrived_intact(site, images)


def probe_cli(site: DemoSite, source: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from radonc_backup.dicom_tools import main

    code = main(["probe", "--site", "DEMO", "--config", str(site.config_path), source])
    return code, capsys.readouterr().out


def test_probe_passes_a_peer_that_works_and_lists_its_c_get_syntaxes(
        make_site: Callable[..., DemoSite], capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site()
    records = course("RV400", at(-1, 9), delivered=2).records
    site.rv.upload([to_bytes(r) for r in records])
    code, out = probe_cli(site, "aria", capsys)
    assert code == 0, out
    assert "works with this configuration" in out and "FAIL" not in out
    assert "C-MOVE service" in out
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text() + f'\n[DEMO.sources.mim]\ntype = "mim"\naet = "{site.rv.aet}"\n'
                                     f'ip = "127.0.0.1"\nport = {site.rv.dicom_port}\n')
    code, out = probe_cli(site, "mim", capsys)
    assert code == 0, out
    syntaxes = [line for line in out.splitlines() if line.startswith("C-GET transfer syntaxes")]
    assert syntaxes and "JPEG 2000" in syntaxes[0] and "JPEG-LS" in syntaxes[0], out


def test_probe_fails_a_hierarchical_only_peer_and_a_blind_one(
        make_site: Callable[..., DemoSite], capsys: pytest.CaptureFixture[str]) -> None:
    """A hierarchical-only peer fails the probe (exit 1) until the profile it prints is in the
    config; a peer that never says what its matches are fails it whatever the settings."""
    site, server, _ = strict_site(make_site, hierarchical_only=True)
    with server:
        code, out = probe_cli(site, "strict", capsys)
    assert code == 1, out
    assert "hierarchical-only" in out and "will NOT work with this configuration" in out
    fits = [line.strip() for line in out.splitlines() if line.strip().startswith("profile =")]
    assert fits and fits[0].startswith('profile = "aria"'), out
    cfg = Path(site.config_path)  # the settings it prints, copied into the source: it works
    cfg.write_text(cfg.read_text().replace(f"port = {server.port}\n",
                                           f"port = {server.port}\n{fits[0]}\n"))
    with server:
        code, out = probe_cli(site, "strict", capsys)
    assert code == 0 and "works with this configuration" in out, out

    blind = StrictQRSCP("BLIND_RV", server.objects, {}, ignore_keys=True,
                        returns={"PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                 "SOPInstanceUID"})
    add_source(site, blind, "blind")
    with blind:
        code, out = probe_cli(site, "blind", capsys)
    assert code == 1, out
    assert "without SOPClassUID or Modality, also when asked by UID" in out


def test_a_c_get_peer_taking_one_uid_gets_one_and_a_refused_record_fails_alone(
        make_site: Callable[..., DemoSite]) -> None:
    """The MIM path (C-GET, relayed by C-STORE) against the same peer: a refused UID list is
    asked one UID at a time, the refused record fails alone with the peer's status."""
    site, server, records = strict_site(make_site, single_uid=True)
    refused = records[2]
    server.refuse = {str(refused.SOPInstanceUID)}
    cfg = Path(site.config_path)
    cfg.write_text(cfg.read_text() + f'\n[DEMO.sources.strictget]\ntype = "mim"\n'
                                     f'aet = "STRICT_RV"\nip = "127.0.0.1"\n'
                                     f'port = {server.port}\n')
    with server:
        state = run(incremental_backup, site, at(0, 16), source="strictget", backfill=False)
    assert state.is_failed()
    rows = {r.ref.sop_instance_uid: r for r in ledger(site).at(Lane("DEMO", "strictget",
                                                                       "orthanc")).rows()}
    assert {u for u, r in rows.items() if r.state == "verified"} == \
        uids(*records) - {str(refused.SOPInstanceUID)}
    assert "0xC000" in str(rows[str(refused.SOPInstanceUID)].last_error)
    assert 'set retrieve = "one_uid"' in latest_artifact("incremental-backup-demo-strictget")
    assert site.backup.sop_instance_uids() == uids(*records) - {str(refused.SOPInstanceUID)}


def test_a_hierarchical_only_peer_is_walked_study_series_image_within_the_stated_cost(
        make_site: Callable[..., DemoSite]) -> None:
    """query = "hierarchical": a peer that refuses relational queries. Each run asks for the
    studies of the last new_study_days, then per study for its RT Record series, then per
    series for its records: 1 + studies + series C-FINDs (here 1 + 3 + 3), plus the checks of
    answers that may be cut, never a relational query; the window's records move and nothing
    else (the CT, plans, doses and the record of 70 days ago are not asked for or are
    dropped)."""
    site, server, records = strict_site(make_site, everything=True, hierarchical_only=True,
                                        settings={"query": "hierarchical"})
    with server:
        state = run(incremental_backup, site, at(0, 16), source="strict", backfill=False)
        assert state.is_completed(), state.message
        assert within(server.finds, {"STUDY": 1, "SERIES": 3, "IMAGE": 3})
        assert server.refused_finds == 0
        assert site.backup.sop_instance_uids() == uids(*records)

        server.finds.clear()
        again = run(incremental_backup, site, at(0, 16, 10), source="strict", backfill=False)
        assert again.is_completed() and again.result()["moved"] == 0
        assert within(server.finds, {"STUDY": 1, "SERIES": 3, "IMAGE": 3})

        server.finds.clear()  # the nightly's per-patient pass: one STUDY query a patient
        nightly = run(nightly_backup, site, at(1, 5), days=1, source="strict", backfill=False)
        assert nightly.is_completed(), nightly.message
        assert server.refused_finds == 0
        assert within(server.finds, {"STUDY": 1 + 3, "SERIES": 3 + 3, "IMAGE": 3 + 3})
    assert missed(site, uids(*records)) == (0, 0)


def within(finds: list[str], base: dict[str, int]) -> bool:
    """The C-FINDs of a run against the stated cost (docs/r-and-v-compatibility.md): the base
    queries, plus the checks of answers that may be cut (each answer that reaches the largest
    count the peer has returned at its level is asked again in parts: at most six more
    C-FINDs per base query here, where the studies share one date); no SERIES query is ever
    checked (it has no key to split by)."""
    from collections import Counter

    counts = Counter(finds)
    assert counts["SERIES"] == base["SERIES"], counts
    assert all(base[level] <= counts[level] <= base[level] * 7 for level in base), counts
    return True


def test_plan_contexts_are_walked_hierarchically_too(make_site: Callable[..., DemoSite]) -> None:
    """With query = "hierarchical" the plan, structure set and doses are found by walking the
    patient's studies and series: the whole context arrives, no relational query is sent."""
    from flows.plan_context_backfill import plan_context_backfill

    site, server, records = strict_site(make_site, everything=True, hierarchical_only=True,
                                        settings={"query": "hierarchical"})
    with server:
        state = run(incremental_backup, site, at(0, 16), source="strict", backfill=False)
        assert state.is_completed(), state.message
        context = plan_context_backfill(site="DEMO", source="strict",
                                        config=str(site.config_path), return_state=True)
        assert context.is_completed(), context.message
        assert server.refused_finds == 0
    plan_context = {str(ds.SOPInstanceUID) for ds in server.objects if ds.Modality != "RTRECORD"}
    assert context.result()["complete"] == 3
    assert site.backup.sop_instance_uids() == uids(*records) | plan_context, "nothing else"
    assert missed(site, uids(*records) | plan_context) == (0, 0)


@pytest.mark.parametrize("query", ["relational", "hierarchical"])
def test_dcmqrscp_as_the_r_and_v_moves_its_rt_records_and_nothing_else(
        make_site: Callable[..., DemoSite], tmp_path: Path, query: str) -> None:
    """DCMTK's dcmqrscp ignores Modality and returns neither SOPClassUID nor TreatmentDate at
    IMAGE level: asked for RT Records (or a patient's RT Doses) it answers with every object it
    holds. The run keeps the RT Records only (by the Modality it returns), with either query
    setting, and says the peer ignored keys; the backfill then brings each plan's context and
    not the patient's other series."""
    from tests.dcmqrscp import Dcmqrscp

    from demo.synthetic import make_image_series

    site = make_site(extra_backup_modalities={"DCMQR_RV": ("DCMQR_RV", "127.0.0.1", 1)})
    courses = [course(f"DQ{n}", at(-1, 8 + n), delivered=2) for n in range(2)]
    records = [r for c in courses for r in c.records]
    unasked = make_image_series(courses[0].study, "mr-unplanned", slices=2, modality="MR")
    with Dcmqrscp(tmp_path / "dcmqrscp", "DCMQR_RV",
                  {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}) as rv:
        rv.store([ds for c in courses for ds in c.all()] + unasked.instances)
        add_source(site, rv, "dcmqr", query=query)  # type: ignore[arg-type]
        state = run(incremental_backup, site, at(0, 16), source="dcmqr", backfill=False)
        assert state.is_completed(), state.message
        assert site.backup.sop_instance_uids() == uids(*records), "RT Records, nothing else"
        if query == "relational":
            assert any("ignored SOPClassUID/Modality" in n for n in state.result()["peer_notes"])

        from flows.plan_context_backfill import plan_context_backfill

        context = plan_context_backfill(site="DEMO", source="dcmqr",
                                        config=str(site.config_path), return_state=True)
    assert context.is_completed(), context.message
    everything = {str(ds.SOPInstanceUID) for c in courses for ds in c.all()}
    assert site.backup.sop_instance_uids() == everything, "the plans' context, not the MR"
    assert missed(site, everything) == (0, 0)


def test_a_cap_once_shown_is_remembered_and_splits_later_silent_cuts(
        make_site: Callable[..., DemoSite]) -> None:
    """A peer that once ended an answer with 0xFE00 after 3 matches, and later cuts at 3 without
    saying so (max_find_results unset): the first run splits and remembers 3 in the ledger; a
    later window with 5 records reaching 3 is split too, and nothing is left behind."""
    from radonc_backup.ledger import Ledger

    site = make_site(extra_backup_modalities={"CAP_RV": ("CAP_RV", "127.0.0.1", 1)})
    courses = [course(f"CAP{n}", at(-1, 8 + n), delivered=2) for n in range(5)]
    records = [r for c in courses for r in c.records]
    server = StrictQRSCP("CAP_RV", list(records),
                         {site.backup.aet: ("127.0.0.1", site.backup.dicom_port)}, cap=3,
                         cut_status=True)
    add_source(site, server, "capper")
    with server:
        first = run(incremental_backup, site, at(0, 16), source="capper", backfill=False)
        assert first.is_completed(), first.message
        assert any("cut a C-FIND answer at 3 matches" in n for n in first.result()["peer_notes"])
        caps = Ledger.for_state_dir(site.workdir / "state")
        assert caps.peer_cap(f"CAP_RV@127.0.0.1:{server.port}") == 3

        server.cut_status = False  # from now on it cuts without saying so
        later = [c.add_record(at(0, 16, 1 + n)) for n, c in enumerate(courses)]
        for ds in later:
            to_bytes(ds)  # a file meta: the transfer syntax its C-STORE goes in
        server.objects += later
        again = run(incremental_backup, site, at(0, 16, 10), source="capper", backfill=False)
        assert again.is_completed(), again.message
        assert any("has shown a C-FIND cap of 3" in n for n in again.result()["peer_notes"])
    assert site.backup.sop_instance_uids() == uids(*records, *later)
    assert missed(site, uids(*records, *later)) == (0, 0)


def test_a_hierarchical_study_search_reaching_the_cap_is_asked_again_in_halves() -> None:
    """The STUDY-level search on StudyDate of a hierarchical walk, against a peer that cuts
    every answer at 2 without saying so: each date range whose answer reaches the cap is asked
    again in halves until none does, and every record of the four studies is found."""
    from radonc_backup.dicom_net import DicomClient, Peer, Timeouts
    from radonc_backup.record_finder import CapMemory, RecordFinder
    from radonc_backup.windows import DayQuery

    courses = [course(f"HS{n}", at(-9 * n, 8), delivered=1) for n in range(4)]
    records = [r for c in courses for r in c.records]
    with StrictQRSCP("HALVES_RV", [ds for c in courses for ds in c.all()], {}, cap=2,
                     hierarchical_only=True) as server:
        client = DicomClient("DEMO", "RADONC_BACKUP", Peer("HALVES_RV", "127.0.0.1",
                                                            server.port), Timeouts(5, 20, 10, 3))
        days = sorted({at(-9 * n, 8).date() for n in range(4)})
        found = RecordFinder(client, True, CapMemory(configured=2)).in_windows(
            [DayQuery(d) for d in days], [], days[0] - timedelta(days=20)).refs
    assert {r.sop_instance_uid for r in found} == uids(*records)
    assert server.finds.count("STUDY") > 1, "the capped range was asked again in halves"
