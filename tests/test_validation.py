"""The validation sweep: what the backup lost after verification is reopened and moved again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, \
    ArtifactFilterType

import tasks.backup

from demo.site import DemoSite
from demo.synthetic import to_bytes
from flows.nightly_backup import nightly_backup
from flows.validation_sweep import validation_sweep
from radonc_backup.backup_target import orthanc_id
from radonc_backup.ledger import Lane
from tests.test_backup_flows import at, course, ledger, push, run, uids

pytestmark = pytest.mark.usefixtures("prefect")
LANE = Lane("DEMO", "aria", "orthanc")


def delete_from_backup(site: DemoSite, ds: object) -> None:
    oid = orthanc_id(str(ds.PatientID), str(ds.StudyInstanceUID),  # type: ignore[attr-defined]
                     str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))  # type: ignore[attr-defined]
    assert site.backup.rest().delete(f"/instances/{oid}").status_code == 200


def test_instances_lost_by_the_backup_are_reopened_and_moved_again(
        make_site: Callable[..., DemoSite], monkeypatch: pytest.MonkeyPatch) -> None:
    site = make_site()
    c = course("VAL001", at(-1, 9), delivered=3)
    push(site, *c.all())
    assert run(nightly_backup, site, at(2, 5), days=3).is_completed()
    everything = uids(*c.all())
    assert site.backup.sop_instance_uids() == everything

    monkeypatch.setattr(tasks.backup, "INSTANCES_FROM", 1)  # 2,000 in production
    clean = validation_sweep(site="DEMO", config=str(site.config_path), return_state=True)
    assert clean.is_completed(), clean.message
    assert clean.result()["checked"] == {"record": 3, "context": len(c.context())}
    with get_client(sync_client=True) as client:
        bars = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[clean.state_details.flow_run_id])))
    assert {b.description.split(":")[0] for b in bars} == {  # type: ignore[union-attr]
        "days compared, site DEMO", "verified instances checked, site DEMO"}
    assert all(float(b.data) == 100.0 for b in bars)  # type: ignore[arg-type]

    lost_record, lost_slice = c.records[1], c.images.instances[0]
    delete_from_backup(site, lost_record)
    delete_from_backup(site, lost_slice)
    state = validation_sweep(site="DEMO", config=str(site.config_path), return_state=True)
    assert state.is_failed()
    message = str(state.message)
    assert "2 instance(s) verified earlier are missing from backup orthanc" in message
    assert str(lost_record.SOPInstanceUID) in message and str(lost_slice.SOPInstanceUID) in message
    rows = {r.ref.sop_instance_uid: r for r in ledger(site).at(LANE).rows("failed")}
    assert set(rows) == {str(lost_record.SOPInstanceUID)}
    error = rows[str(lost_record.SOPInstanceUID)].last_error
    assert "missing from backup orthanc at validation" in error
    assert ledger(site).at(LANE).contexts()[str(c.plan.SOPInstanceUID)][0] == "incomplete"

    assert run(nightly_backup, site, at(3, 5)).is_completed()
    assert site.backup.sop_instance_uids() == everything
    again = validation_sweep(site="DEMO", config=str(site.config_path), return_state=True)
    assert again.is_completed(), again.message


def corrupt_at_rest(site: DemoSite, ds: object) -> None:
    """Flip bytes in the middle of the backup's stored file of ``ds`` (a disk fault), then
    restart the backup so that no cached copy hides it."""
    oid = orthanc_id(str(ds.PatientID), str(ds.StudyInstanceUID),  # type: ignore[attr-defined]
                     str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))  # type: ignore[attr-defined]
    with site.backup.rest() as client:
        uuid = client.get(f"/instances/{oid}/attachments/dicom/info").json()["Uuid"]
    stored = Path(str(site.backup.workdir)) / "storage" / uuid[:2] / uuid[2:4] / uuid
    data = bytearray(stored.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    stored.write_bytes(bytes(data))
    site.backup.stop()
    site.backup.start()


def change_on_source(site: DemoSite, ds: object) -> None:
    """The R&V's copy of ``ds`` changes after the backup (same UIDs, one attribute)."""
    with site.rv.rest() as client:
        [oid] = client.post("/tools/find", json={"Level": "Instance", "Query": {
            "SOPInstanceUID": str(ds.SOPInstanceUID)}}).json()  # type: ignore[attr-defined]
        changed = client.post(f"/instances/{oid}/modify", json={
            "Replace": {"OperatorsName": "Changed^Afterwards"}, "Force": True,
            "Keep": ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]}).content
        assert client.delete(f"/instances/{oid}").status_code == 200
    site.rv.upload([changed])


def sweep(site: DemoSite, tmp: Path, **params: object) -> tuple[object, pd.DataFrame]:
    out = tmp / f"sweep-{len(list(tmp.glob('sweep-*')))}.csv"
    state = run(validation_sweep, site, at(3, 8), start_date=at(-1, 0).date(),
                end_date=at(2, 0).date(), out=str(out), **params)
    return state, pd.read_csv(out, dtype=str, keep_default_na=False, encoding="utf-8-sig")


def test_the_two_way_sweep_finds_each_kind_of_damage_and_repairs_what_it_can(
        make_site: Callable[..., DemoSite], tmp_path: Path) -> None:
    """A backup with one record deleted, one corrupted at rest, one changed on the source
    after the backup and one only in the backup: each is reported with its kind; repair moves
    the deleted and the corrupted ones again; the next sweep is clean but for what cannot be
    repaired (the source's change, the stranger), and the backup holds good copies."""
    site = make_site()
    a, b = course("SWP001", at(-1, 9), delivered=3), course("SWP002", at(0, 10), delivered=2)
    push(site, *a.all(), *b.all())
    assert run(nightly_backup, site, at(2, 5), days=3).is_completed()
    state, table = sweep(site, tmp_path, depth="content")
    assert state.is_completed(), state.message
    assert table.empty and state.result()["records_on_source"] == 5

    deleted, corrupted, changed = a.records[0], a.records[1], b.records[0]
    stranger = course("SWP999", at(0, 11), delivered=1).records[0]
    site.backup.upload([to_bytes(stranger)])
    delete_from_backup(site, deleted)
    change_on_source(site, changed)
    corrupt_at_rest(site, corrupted)

    state, table = sweep(site, tmp_path, depth="content")
    assert state.is_failed() and "discrepancies left" in str(state.message)
    kinds = {(r.sop_instance_uid, r.kind) for r in table.itertuples() if r.sop_instance_uid}
    assert kinds == {(str(deleted.SOPInstanceUID), "missing"),
                     (str(corrupted.SOPInstanceUID), "unreadable"),
                     (str(changed.SOPInstanceUID), "content-differs"),
                     (str(stranger.SOPInstanceUID), "unknown-to-ledger")}, table
    row = {r.kind: r for r in table.itertuples()}
    assert "OperatorsName" in row["content-differs"].detail
    assert row["missing"].patient_id == "SWP001" and row["missing"].day == \
        str(deleted.TreatmentDate)
    assert "MD5" in row["unreadable"].detail
    assert "count-differs" in set(table.kind)  # the deleted record's series: 1 fewer

    state, table = sweep(site, tmp_path, depth="content", repair=True)
    assert state.is_failed()
    repaired = {r.kind: r.repaired for r in table.itertuples() if r.sop_instance_uid}
    assert repaired["missing"] == repaired["unreadable"] == "repaired", table
    # The series' count row is derived from its instances: repaired with them, never "left".
    assert {r.repaired for r in table.itertuples() if r.kind == "count-differs"} == {"repaired"}
    assert "count-differs" not in str(state.message), state.message
    # The ledger's history of the record: verified once, reopened by the first sweep.
    detail = next(r.detail for r in table.itertuples() if r.kind == "missing")
    assert detail.startswith("verified on ") and ", failed on " in detail, detail
    assert repaired["content-differs"].startswith("not repaired")
    assert repaired["unknown-to-ledger"].startswith("not repaired")

    state, table = sweep(site, tmp_path, depth="content")
    assert state.is_failed(), "what cannot be repaired stays reported"
    assert set(table.kind) == {"content-differs", "unknown-to-ledger"}, table
    assert state.result(raise_on_failure=False) is not None
    held = site.backup.sop_instance_uids()
    assert {str(deleted.SOPInstanceUID), str(corrupted.SOPInstanceUID)} <= held
    rows = ledger(site).at(LANE).states([str(deleted.SOPInstanceUID),
                                         str(corrupted.SOPInstanceUID)])
    assert set(rows.values()) == {"verified"}
