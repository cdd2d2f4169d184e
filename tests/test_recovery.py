"""Restore and the disaster-recovery drill, against real Orthanc processes: the backup sends
to a third Orthanc standing in for the rebuilt R&V."""

from __future__ import annotations

import io
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from pydicom import dcmread

from demo.orthanc import OrthancServer, free_port
from demo.site import DemoSite, add_restore_target
from flows.dr_drill import dr_drill
from flows.nightly_backup import nightly_backup
from flows.restore import restore
from radonc_backup.config import load_site
from tests.test_backup_flows import at, course, push, run, uids

pytestmark = pytest.mark.usefixtures("prefect")


@pytest.fixture
def rebuilt(make_site: Callable[..., DemoSite]) -> Iterator[tuple[DemoSite, OrthancServer]]:
    """A site whose backup holds three patients, and an empty Orthanc (the rebuilt R&V) that
    knows the backup's AE (to accept its C-STOREs) and ours (to answer our C-FIND)."""
    site = make_site()
    cfg = load_site("DEMO", str(site.config_path))
    backup_aet = cfg.backup_targets["orthanc"].aet
    server = OrthancServer("REBUILT", modalities={
        "backup": (backup_aet, "127.0.0.1", site.backup.dicom_port),
        "us": (cfg.script_ae, "127.0.0.1", 104)}).start()
    add_restore_target(site, "rebuilt", server, associations=2)
    try:
        yield site, server
    finally:
        server.remove()


def stored(server: OrthancServer, uid: str) -> bytes:
    with server.rest() as client:
        [oid] = client.post("/tools/find", json={"Level": "Instance",
                                                 "Query": {"SOPInstanceUID": uid}}).json()
        return client.get(f"/instances/{oid}/file").content


def whole(server: OrthancServer, uid: str) -> object:
    ds = dcmread(io.BytesIO(stored(server, uid)))
    del ds.file_meta  # group 0002 is the file's, not the object's
    return ds


def test_restore_sends_the_patients_asked_for_each_identical_and_a_dry_run_sends_nothing(
        rebuilt: tuple[DemoSite, OrthancServer]) -> None:
    site, server = rebuilt
    a, b = course("RST001", at(-1, 9), delivered=2), course("RST002", at(0, 10), delivered=1)
    old = course("RST003", at(-20, 9), delivered=1)
    push(site, *a.all(), *b.all(), *old.all())
    assert run(nightly_backup, site, at(1, 5), days=25).is_completed()
    wanted = uids(*a.all(), *b.all())
    assert wanted | uids(*old.all()) <= site.backup.sop_instance_uids()
    params = {"site": "DEMO", "config": str(site.config_path), "return_state": True}

    dry = restore(target="rebuilt", patient_ids=["RST001", "RST002"], dry_run=True, **params)
    assert dry.is_completed(), dry.message
    assert dry.result()["objects"] == len(wanted) and dry.result()["MB"] > 0
    assert {(r["patient"], r["kind"]) for r in dry.result()["plan"]} == {
        ("RST001", "record"), ("RST001", "context"), ("RST002", "record"), ("RST002", "context")}
    assert server.instance_count() == 0, "a dry run sends nothing"

    done = restore(target="rebuilt", patient_ids=["RST001", "RST002"], **params)
    assert done.is_completed(), done.message
    assert done.result()["verified"] == len(wanted)
    assert server.sop_instance_uids() == wanted, "those two patients, all of them, nothing else"
    # The target takes two associations: the backup sent its objects as two C-STORE jobs.
    with site.backup.rest() as client:
        jobs = [j["Content"] for j in client.get("/jobs?expand").json()
                if j["Type"] == "DicomModalityStore" and j["Content"]["RemoteAet"] == "REBUILT"]
    assert sorted(j["InstancesCount"] for j in jobs) == sorted(
        [len(wanted) // 2, len(wanted) - len(wanted) // 2]), jobs
    for uid in wanted:  # identical to the backup's copy, pixel data included
        assert whole(server, uid) == whole(site.backup, uid), uid

    by_period = restore(ae="REBUILT", host="127.0.0.1", port=server.dicom_port,
                        start_date=at(-20, 0).date(), end_date=at(-20, 0).date(),
                        kinds=["record"], **params)  # a plain AE: verified by C-FIND
    assert by_period.is_completed(), by_period.message
    assert server.sop_instance_uids() == wanted | uids(*old.records)

    closed = free_port()
    down = restore(ae="NOBODY", host="127.0.0.1", port=closed, patient_ids=["RST002"], **params)
    assert down.is_failed()
    message = str(down.message)
    assert f"NOBODY@127.0.0.1:{closed}" in message and len(message.splitlines()) == 1, message


def damage_on_disk(server: OrthancServer, uid: str, cut: bool = False) -> tuple[Path, bytes]:
    """Change (or ``cut`` short) the file a server stores for ``uid``; returns it and its bytes."""
    good = stored(server, uid)
    path = next(p for p in (server.workdir / "storage").rglob("*")  # type: ignore[operator]
                if p.is_file() and p.stat().st_size == len(good) and p.read_bytes() == good)
    if cut:
        path.write_bytes(good[:200])
    else:
        data = bytearray(good)
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    return path, good


def test_a_restore_goes_past_an_object_it_cannot_send_and_names_it(
        rebuilt: tuple[DemoSite, OrthancServer]) -> None:
    """One file of the backup unreadable on disk stopped a whole restore, naming nothing
    (85 of 119 objects arrived). Now every other object is sent and verified, and the run
    fails naming the one it could not send: UID, patient, kind and why."""
    site, server = rebuilt
    a = course("BAD001", at(-1, 9), delivered=2)
    push(site, *a.all())
    assert run(nightly_backup, site, at(1, 5), days=3).is_completed()
    bad = str(a.images.instances[0].SOPInstanceUID)
    damage_on_disk(site.backup, bad, cut=True)
    state = restore(site="DEMO", config=str(site.config_path), target="rebuilt",
                    patient_ids=["BAD001"], return_state=True)
    assert state.is_failed()
    message = str(state.message)
    assert f"{bad} (patient BAD001, context: " in message and "1 of" in message, message
    assert server.sop_instance_uids() == uids(*a.all()) - {bad}

    # The export and the downtime pack go past it too, and name it.
    from flows.downtime_pack import downtime_pack
    from flows.export import export

    out = site.workdir / "export-bad"
    exported = export(site="DEMO", config=str(site.config_path), folder=str(out),
                      patient_ids=["BAD001"], return_state=True)
    assert exported.is_failed() and bad in str(exported.message), exported.message
    assert {str(dcmread(f).SOPInstanceUID) for f in files_under(out)} == uids(*a.all()) - {bad}
    assert bad in json.loads((out / "manifest.json").read_text())["not_written"]
    packs = site.workdir / "packs-bad"
    packed = run(downtime_pack, site, at(1, 6), days=7, folder=str(packs))
    assert packed.is_failed() and "is in use without 1 object(s)" in str(packed.message)
    sheet = text_of(((packs / "current") / "BAD001" / "sheet.html").read_text("utf-8"))
    assert f"Not in this folder: 1 object(s)" in sheet and bad in sheet
    assert "Next fraction 3 of 28" in sheet  # the rest of the sheet is whole


def test_the_drill_restores_a_recent_patient_to_a_scratch_orthanc_and_diffs_every_object(
        rebuilt: tuple[DemoSite, OrthancServer]) -> None:
    site, server = rebuilt
    a, b = course("DRL001", at(-1, 9), delivered=2), course("DRL002", at(0, 10), delivered=1)
    old = course("DRL003", at(-20, 9), delivered=1)
    push(site, *a.all(), *b.all(), *old.all())
    assert run(nightly_backup, site, at(1, 5), days=25).is_completed()

    state = run(dr_drill, site, at(1, 8), target="rebuilt", days=7, seed=3)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["passed"] is True and summary["chosen_among"] == 2
    chosen = {"DRL001": a, "DRL002": b}[summary["patient"]]
    assert server.sop_instance_uids() == uids(*chosen.all())
    assert summary["objects"] == len(chosen.all()) and summary["objects_per_second"] > 0

    with server.rest() as client:  # the scratch copy of one object changes: the drill sees it
        [oid] = client.post("/tools/find", json={"Level": "Instance", "Query": {
            "SOPInstanceUID": str(chosen.records[0].SOPInstanceUID)}}).json()
        changed = client.post(f"/instances/{oid}/modify", json={
            "Replace": {"OperatorsName": "Someone^Else"}, "Force": True,
            "Keep": ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]}).content
        client.delete(f"/instances/{oid}")
    server.upload([changed])  # the drill sends again; Orthanc keeps the copy it holds
    failed = run(dr_drill, site, at(1, 8), target="rebuilt", days=7, seed=3)
    assert failed.is_failed() and "differs" in str(failed.message), failed.message
    assert str(chosen.records[0].SOPInstanceUID) in str(failed.message)
    assert drill_artifact().startswith("# DR drill, site DEMO: FAIL")

    # A stored file of the backup damaged on disk (after Orthanc read it: no cache hides it):
    # the drill names it damaged and never restores it, or compares it with itself.
    plan_uid = str(chosen.plan.SOPInstanceUID)
    damaged_file, good = damage_on_disk(site.backup, plan_uid)
    with server.rest() as client:  # the target loses its copy: only the drill can send it
        [oid] = client.post("/tools/find", json={"Level": "Instance", "Query": {
            "SOPInstanceUID": plan_uid}}).json()
        client.delete(f"/instances/{oid}")
    broken = run(dr_drill, site, at(1, 8), target="rebuilt", days=7, seed=3)
    assert broken.is_failed(), broken.message
    assert f"{plan_uid} (context: damaged in the backup" in str(broken.message), broken.message
    assert plan_uid not in server.sop_instance_uids()
    text = drill_artifact()
    assert text.startswith("# DR drill, site DEMO: FAIL") and plan_uid in text
    damaged_file.write_bytes(good)

    server.stop()  # the scratch target is down: FAIL, with its artifact, never a PASS
    down = run(dr_drill, site, at(1, 8), target="rebuilt", days=7, seed=3)
    assert down.is_failed()
    assert "the drill stopped before its end" in drill_artifact()


def drill_artifact() -> str:
    """The newest DR drill artifact's markdown."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        [latest] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dr-drill-demo"])),
            sort=ArtifactSort.CREATED_DESC, limit=1)
    return str(latest.data)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm"))


def test_export_plain_and_pseudonymized_leaves_the_backup_as_it_was(
        make_site: Callable[..., DemoSite], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past EXPORT_FROM objects (500) an export shows its progress; lowered here to the
    test's few objects."""
    import tasks.recovery
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, \
        ArtifactFilterType

    from flows.export import export

    monkeypatch.setattr(tasks.recovery, "EXPORT_FROM", 1)

    site = make_site()
    a, b = course("EXP001", at(-1, 9), delivered=2), course("EXP002", at(0, 10), delivered=1)
    push(site, *a.all(), *b.all())
    assert run(nightly_backup, site, at(1, 5), days=3).is_completed()
    held_before = site.backup.sop_instance_uids()
    params = {"site": "DEMO", "config": str(site.config_path), "return_state": True}

    plain = export(folder=str(tmp_path / "plain"), patient_ids=["EXP001"], zip=True, **params)
    assert plain.is_completed(), plain.message
    files = files_under(tmp_path / "plain")
    assert {str(dcmread(f).SOPInstanceUID) for f in files} == uids(*a.all())
    record = next(f for f in files if "RTRECORD_" in f.parent.name)
    assert record.relative_to(tmp_path / "plain").parts[0] == "EXP001"  # patient/study/series
    assert record.read_bytes() == stored(site.backup, str(dcmread(record).SOPInstanceUID))
    assert Path(plain.result()["zip"]).stat().st_size > 0
    with get_client(sync_client=True) as client:
        [progress] = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[plain.state_details.flow_run_id])))
    assert float(progress.data) == 100.0  # type: ignore[arg-type]
    assert f"objects exported, site DEMO: {len(a.all())} of {len(a.all())}" in \
        str(progress.description)

    pseudo = export(folder=str(tmp_path / "pseudo"), patient_ids=["EXP001", "EXP002"],
                    pseudonymize=True, **params)
    assert pseudo.is_completed(), pseudo.message
    files = files_under(tmp_path / "pseudo")
    assert len(files) == len(a.all()) + len(b.all())
    for f in files:  # no original name or ID anywhere in a file
        data = f.read_bytes()
        assert b"EXP001" not in data and b"EXP002" not in data and b"Test^" not in data, f
    datasets = [dcmread(f) for f in files]
    assert all(ds.PatientIdentityRemoved == "YES" for ds in datasets)
    manifest = json.loads((tmp_path / "pseudo" / "manifest.json").read_text())
    assert "Basic Application Level Confidentiality Profile" in manifest["profile"]
    assert manifest["pseudonymized"] and manifest["files"] == len(files) and manifest["options"]
    originals = {str(ds.SOPInstanceUID) for ds in datasets}
    assert not originals & uids(*a.all(), *b.all()), "UIDs replaced too"
    by_patient: dict[str, set[str]] = {}
    for ds in datasets:
        by_patient.setdefault(str(ds.PatientID), set()).add(str(ds.StudyInstanceUID))
    assert len(by_patient) == 2 and all(len(s) == 1 for s in by_patient.values()), \
        "each patient's study keeps one pseudonymous patient ID and study UID"
    plans = {str(ds.SOPInstanceUID) for ds in datasets if ds.Modality == "RTPLAN"}
    for ds in datasets:
        if ds.Modality == "RTRECORD":  # references between objects still hold
            assert str(ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID) in plans

    assert site.backup.sop_instance_uids() == held_before
    assert {str(dcmread(io.BytesIO(stored(site.backup, uid))).PatientID)
            for uid in held_before} == {"EXP001", "EXP002"}, "the backup is never altered"
    again = export(folder=str(tmp_path / "plain"), patient_ids=["EXP001"], **params)
    assert again.is_failed() and "exists" in str(again.message)


def text_of(html: str) -> str:
    """The words of a page as a reader sees them: tags out, spaces folded."""
    import re
    from html import unescape

    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def test_the_downtime_pack_holds_each_treated_patient_and_a_failed_build_keeps_the_last(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    from demo.synthetic import Patient, make_course

    from flows.downtime_pack import downtime_pack

    site = make_site()
    a = course("PCK001", at(-1, 9), delivered=2)
    over = make_course(Patient("PCK002", "Over^Plan"), at(-2, 10), delivered=3, fractions=2,
                       slices=2)
    old = course("PCK003", at(-20, 9), delivered=1)
    push(site, *a.all(), *over.all(), *old.all())
    assert run(nightly_backup, site, at(1, 5), days=25).is_completed()
    packs = tmp_path / "packs"

    first = run(downtime_pack, site, at(1, 6), days=7, folder=str(packs))
    assert first.is_completed(), first.message
    summary = first.result()
    current = packs / "current"
    assert current.is_symlink() and current.resolve() == Path(summary["pack"]).resolve()
    assert summary["patients"] == 2 and summary["MB"] > 0 and summary["seconds"] > 0
    assert sorted(p.name for p in current.iterdir() if p.is_dir()) == ["PCK001", "PCK002"]
    held = {str(dcmread(f).SOPInstanceUID) for f in files_under(current / "PCK001")}
    assert held == uids(*a.context(), a.records[-1]), "plan context and the last record only"
    sheet = text_of((current / "PCK001" / "sheet.html").read_text(encoding="utf-8"))
    report = pd.read_csv(current / f"treatment-report-DEMO-{at(1, 0):%Y-%m-%d}.csv", dtype=str,
                         keep_default_na=False, encoding="utf-8-sig")
    row = report[report.PatientID == "PCK001"].iloc[0]
    last = a.records[-1]
    for said in ("ID PCK001", "Prescription 56 Gy in 28 fractions of 2 Gy",
                 "Delivered so far 2 fractions, 4 Gy", "Next fraction 3 of 28",
                 f"First treatment of the course {at(-1, 9):%Y-%m-%d %H:%M}",
                 f"as of the newest record it holds: {at(0, 9):%Y-%m-%d %H:%M}",
                 "Patient setup HFS, ISOCENTRIC; devices: VACUUM_MOLD Vac-Lok 1",
                 "Plan approval APPROVED by", "1 Field 1 PHOTON 6 TrueBeam1 100 100 NORMAL",
                 # the same facts as the report where they overlap
                 f"Next fraction {int(row.CurrentFraction) + 1} of {row.FractionsPlanned}",
                 f"Last treatment {row.LastTreatment}", f"Machine {row.Machine}"):
        assert said in sheet, (said, sheet)
    assert str(last.TreatmentSessionBeamSequence[0].DeliveredPrimaryMeterset) == "100.0"
    warned = text_of((current / "PCK002" / "sheet.html").read_text(encoding="utf-8"))
    assert "fraction 3 is beyond the 2 planned" in warned
    assert "STOP: fraction 4 is beyond the 2 planned" in warned, warned
    assert (current / f"treatment-report-DEMO-{at(1, 0):%Y-%m-%d}.csv").exists()

    site.backup.stop()  # the backup is down at the next build
    failed = run(downtime_pack, site, at(2, 6), days=7, folder=str(packs))
    assert failed.is_failed() and "last good pack" in str(failed.message), failed.message
    assert re.search(r"\(built \d{4}-\d\d-\d\d \d\d:\d\d UTC\) is kept", str(failed.message)), \
        failed.message  # which pack, and from when
    assert current.resolve() == Path(summary["pack"]).resolve(), "the last good pack stays"
    assert not list(packs.glob("*.partial"))
    assert not list(Path(tempfile.gettempdir()).glob("downtime-report-*")), \
        "the day's report (names, birth dates) is left nowhere but in the pack"


def test_an_rv_lost_at_14_leaves_sheets_with_the_mornings_fractions_in_hand_within_minutes(
        make_site: Callable[..., DemoSite]) -> None:
    """The nightly pack at 05:30; three patients treated in the morning, an incremental run
    after each refreshes the pack for them; the R&V is lost at 14:00. From then the runbook's
    first step (one command, no R&V, no Prefect) names the pack and its age, and each sheet
    shows the morning's fraction: the next fraction is not given twice. Measured: R&V down to
    the sheets read, against the 5 minutes ARCS publishes for failover."""
    import subprocess
    import sys
    import time

    from flows.downtime_pack import downtime_pack
    from flows.incremental_backup import incremental_backup

    site = make_site()
    courses = [course(f"AM00{n}", at(-3, 8 + n), delivered=3) for n in range(3)]
    push(site, *[o for c in courses for o in c.all()])
    assert run(nightly_backup, site, at(0, 5), days=5).is_completed()
    assert run(downtime_pack, site, at(0, 5, 30), days=7).is_completed()

    for n, c in enumerate(courses):  # the morning: fraction 4 of each, a run after each
        push(site, c.add_record(at(0, 8 + n)))
        state = run(incremental_backup, site, at(0, 8 + n, 10))
        assert state.is_completed(), state.message
        assert state.result()["downtime_pack"].startswith("refreshed 1 patient(s)"), \
            state.result()["downtime_pack"]

    site.rv.remove()  # 14:00: the R&V is gone
    lost = time.monotonic()
    shown = subprocess.run(
        [sys.executable, "-m", "radonc_backup.dicom_tools", "downtime-pack", "--site", "DEMO",
         "--config", str(site.config_path), "--json"], capture_output=True, text=True,
        timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    import json

    said = json.loads(shown.stdout)
    assert said["patients"] == 3 and said["as_of"] == f"{at(0, 10):%Y-%m-%d %H:%M}", said
    for n, c in enumerate(courses):
        sheet = text_of((Path(said["pack"]) / f"AM00{n}" / "sheet.html").read_text("utf-8"))
        assert "Delivered so far 4 fractions" in sheet and "Next fraction 5 of 28" in sheet, sheet
        assert f"Last treatment {at(0, 8 + n):%Y-%m-%d %H:%M}" in sheet
    in_hand = time.monotonic() - lost
    assert in_hand < 300, f"{in_hand:.0f} s from R&V down to sheets in hand"
    print(f"R&V down to sheets in hand: {in_hand:.1f} s (ARCS publishes 5 minutes)")


def test_patients_whose_ids_sanitize_alike_get_a_folder_and_sheet_each_kept_private(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """PatientIDs ``C3/X1``, ``C3_X1`` and ``C3 X1`` made one folder ``C3_X1`` whose one sheet
    named the last of them. Now each has its own folder (the safe form and, when it differs
    from the real ID, a short digest of it) and a sheet naming its own ID; pack and export are
    for their owner alone (folders 0700, files 0600)."""
    import stat

    from flows.downtime_pack import downtime_pack
    from flows.export import export

    site = make_site()
    ids = ["C3/X1", "C3_X1", "C3 X1"]
    courses = [course(pid, at(-1, 9 + n), delivered=1) for n, pid in enumerate(ids)]
    push(site, *[o for c in courses for o in c.all()])
    assert run(nightly_backup, site, at(0, 5), days=3).is_completed()
    packs = tmp_path / "packs"
    assert run(downtime_pack, site, at(0, 6), days=7, folder=str(packs)).is_completed()
    pack = (packs / "current").resolve()
    folders = [p for p in pack.iterdir() if p.is_dir()]
    assert len(folders) == 3, folders
    named = sorted(text_of((f / "sheet.html").read_text("utf-8")).split("ID ")[1].split(" Born")[0]
                   for f in folders)
    assert named == sorted(ids)
    for path in [pack, *pack.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))

    out = tmp_path / "export"
    state = export(site="DEMO", config=str(site.config_path), folder=str(out),
                   patient_ids=ids, return_state=True)
    assert state.is_completed(), state.message
    assert len([p for p in out.iterdir() if p.is_dir()]) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600)
               for p in [out, *out.rglob("*")])


def test_the_fixity_sweep_records_digests_resumes_and_names_a_file_changed_on_disk(
        make_site: Callable[..., DemoSite]) -> None:
    """Every verified object read back whole: the first sweep records each digest (Orthanc's
    MD5 of its arrival, matching the bytes read), a second within ``days`` reads nothing again
    (a stopped sweep goes on where it stopped), and a file changed on disk is named by UID and
    patient, the run failed."""
    from flows.fixity_sweep import fixity_sweep

    site = make_site()
    a = course("FIX001", at(-1, 9), delivered=2)
    push(site, *a.all())
    assert run(nightly_backup, site, at(1, 5), days=3).is_completed()
    params = {"site": "DEMO", "config": str(site.config_path), "return_state": True}

    first = fixity_sweep(**params)
    assert first.is_completed(), first.message
    assert first.result()["checked"] == first.result()["digests_recorded"] == len(a.all())
    again = fixity_sweep(**params)
    assert again.result()["checked"] == 0
    assert again.result()["skipped_checked_recently"] == len(a.all())

    bad = str(a.records[0].SOPInstanceUID)
    damage_on_disk(site.backup, bad)
    found = fixity_sweep(days=0, **params)
    assert found.is_failed(), found.message
    assert f"{bad} (patient FIX001: its file changed since its digest was recorded" in \
        str(found.message), found.message
    assert "1 of" in str(found.message)
