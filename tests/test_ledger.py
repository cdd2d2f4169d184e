"""The ledger: states only move forward to verified, watermarks never go back, two writers."""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timedelta, timezone
from pathlib import Path

from radonc_backup.instance import InstanceRef
from radonc_backup.ledger import Lane, Ledger, PlanLink

LANE = Lane("DEMO", "aria", "orthanc")


def refs(n: int, prefix: str = "1.2.3") -> list[InstanceRef]:
    return [InstanceRef(f"{prefix}.{i}", "1.2.840.10008.5.1.4.1.1.481.4", "P1", "1.9", "1.9.1")
            for i in range(n)]


def test_found_moved_verified_failed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.at(LANE).record_found(refs(3)) == 3
    assert ledger.at(LANE).record_found(refs(3)) == 0
    ledger.at(LANE).mark_moved(["1.2.3.0", "1.2.3.1"])
    ledger.at(LANE).mark_verified(["1.2.3.0"])
    ledger.at(LANE).mark_failed({"1.2.3.1": "not in backup", "1.2.3.0": "late failure"})
    rows = {r.ref.sop_instance_uid: r for r in ledger.at(LANE).rows()}
    assert rows["1.2.3.0"].state == "verified" and rows["1.2.3.0"].last_error == ""
    assert rows["1.2.3.1"].state == "failed" and rows["1.2.3.1"].attempts == 1
    assert rows["1.2.3.1"].last_error == "not in backup"
    assert rows["1.2.3.2"].state == "found"
    assert [r.sop_instance_uid for r in ledger.at(LANE).unverified()] == ["1.2.3.1", "1.2.3.2"]
    assert ledger.at(LANE).counts() == {"found": 1, "moved": 0, "verified": 1, "failed": 1}
    other = Lane("DEMO", "aria", "archive")
    assert ledger.at(other).states(["1.2.3.0"]) == {}


def test_watermark_only_moves_forward(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.at(LANE).watermark() is None
    t = datetime(2026, 11, 23, 12, tzinfo=timezone.utc)
    ledger.at(LANE).advance_watermark(t)
    ledger.at(LANE).advance_watermark(t - timedelta(hours=1))
    assert ledger.at(LANE).watermark() == t


def _writer(path: str, prefix: str) -> None:
    ledger = Ledger(path)
    for i in range(50):
        batch = refs(20, f"{prefix}.{i}")
        ledger.at(LANE).record_found(batch)
        ledger.at(LANE).mark_moved([r.sop_instance_uid for r in batch])
        ledger.at(LANE).mark_verified([r.sop_instance_uid for r in batch])


def test_two_processes_share_the_ledger(tmp_path: Path) -> None:
    path = str(tmp_path / "l.sqlite")
    Ledger(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p)) for p in ("7.1", "7.2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert Ledger(path).at(LANE).counts()["verified"] == 2 * 50 * 20


def test_a_damaged_ledger_stops_with_its_path_and_what_to_do(tmp_path: Path) -> None:
    import pytest

    from radonc_backup.errors import ConfigError

    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(ConfigError) as err:
        Ledger(path)
    message = str(err.value)
    assert message.startswith(f"ledger {path}: cannot be opened or written (file is not a "
                              "database)")
    assert f"mv {path} {path}.damaged" in message and "--days" in message


def test_an_orthanc_backup_is_asked_once_a_plain_scp_until_the_timeout() -> None:
    """A refused object must not cost verify_timeout when the backup confirms on receipt."""
    from radonc_backup.backup_target import wait_for

    class Target:
        alias, aet = "b", "B"

        def __init__(self, confirms: bool) -> None:
            self.confirms_on_receipt, self.asked = confirms, 0

        def present(self, refs: list[InstanceRef]) -> set[str]:
            self.asked += 1
            return {r.sop_instance_uid for r in refs if r.sop_instance_uid != "1.2.3"}

    refs = [InstanceRef("1.2.3"), InstanceRef("1.2.4")]
    orthanc, scp = Target(True), Target(False)
    assert wait_for(orthanc, refs, timeout=30) == {"1.2.4"} and orthanc.asked == 1  # type: ignore[arg-type]
    assert wait_for(scp, refs, timeout=0.6) == {"1.2.4"} and scp.asked > 1  # type: ignore[arg-type]


def test_a_run_reads_at_most_link_per_run_records_and_none_is_kept_waiting(
        tmp_path: Path) -> None:
    """Unlinked verified records are taken a bounded number at a time, at random: records whose
    copy cannot be read (never linked) do not keep the others from their turn."""
    lane = Ledger(tmp_path / "l.sqlite").at(LANE)
    lane.record_found(refs(10))
    lane.mark_moved([f"1.2.3.{i}" for i in range(10)])
    lane.mark_verified([f"1.2.3.{i}" for i in range(10)])
    unreadable = {"1.2.3.0", "1.2.3.1", "1.2.3.2"}
    runs = 0
    while lane.count_records_without_plan() > len(unreadable):
        batch = lane.verified_records_without_plan(limit=3)
        assert len(batch) == 3
        lane.link_plans({r.sop_instance_uid: PlanLink("1.9.9", "P1", "TB1")
                         for r in batch if r.sop_instance_uid not in unreadable})
        runs += 1
        assert runs < 200, "a readable record was kept waiting"
    left = {r.sop_instance_uid for r in lane.verified_records_without_plan()}
    assert left == unreadable
