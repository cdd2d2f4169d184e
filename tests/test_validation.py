"""The validation sweep: what the backup lost after verification is reopened and moved again."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, \
    ArtifactFilterType

import tasks.backup

from demo.site import DemoSite
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
        [progress] = client.read_artifacts(artifact_filter=ArtifactFilter(
            type=ArtifactFilterType(any_=["progress"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[clean.state_details.flow_run_id])))
    assert float(progress.data) == 100.0  # type: ignore[arg-type]

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
